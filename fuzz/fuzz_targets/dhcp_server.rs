#![no_main]
//! Any datagram a hostile client sends ltsp-server's DHCP server, through the very function
//! its receive loop calls (`Responder::handle`): it answers or drops, never panics. The
//! lease table is shared across inputs, so sequences of messages are exercised too, and it
//! must stay within its bound.
use libfuzzer_sys::fuzz_target;
use ltsp_server::config::{DhcpServerConfig, ProxyDhcpConfig};
use ltsp_server::dhcpd::DhcpServer;
use ltsp_server::proxydhcp::Responder;
use ltsp_server::status::Status;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

const MAX_LEASES: usize = 8;

fn server() -> &'static DhcpServer {
    static S: OnceLock<DhcpServer> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = DhcpServerConfig {
            interface: "fuzz0".into(),
            first: "192.0.2.100".parse().unwrap(),
            last: "192.0.2.110".parse().unwrap(),
            lease_secs: 3600,
            router: Some("192.0.2.101".parse().unwrap()),
            dns: vec!["192.0.2.102".parse().unwrap()],
            max_leases: MAX_LEASES,
            reuse_after_secs: 3600,
            lease_file: None,
        };
        let files = ProxyDhcpConfig {
            interface: String::new(),
            bios: "undionly.kpxe".into(),
            uefi: "ipxe.efi".into(),
            arm64: "grub/arm64-efi/core.efi".into(),
            ipxe_script: "boot.ipxe".into(),
        };
        DhcpServer::new(
            cfg,
            files,
            "192.0.2.1".parse().unwrap(),
            "255.255.255.0".parse().unwrap(),
            Status::new([]),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let s = server();
    let peer = SocketAddr::from(([192, 0, 2, 77], 68));
    let _ = s.handle(data, 67, peer, Instant::now());
    assert!(s.table_len() <= MAX_LEASES);
});
