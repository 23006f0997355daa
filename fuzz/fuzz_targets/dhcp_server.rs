#![no_main]
//! Any datagram a hostile client sends ltsp-server's DHCP side: the DHCP server must
//! answer or drop it, never panic, and the proxyDHCP classification must hold up too.
use libfuzzer_sys::fuzz_target;
use ltsp_server::config::{DhcpServerConfig, ProxyDhcpConfig};
use ltsp_server::dhcpd::DhcpServer;
use ltsp_server::status::Status;
use std::sync::OnceLock;
use std::time::Instant;

fn server() -> &'static DhcpServer {
    static S: OnceLock<DhcpServer> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = DhcpServerConfig {
            interface: "fuzz0".into(),
            first: "192.0.2.100".parse().unwrap(),
            last: "192.0.2.110".parse().unwrap(),
            lease_secs: 3600,
            router: None,
            dns: vec![],
        };
        let files = ProxyDhcpConfig {
            interface: String::new(),
            bios: "undionly.kpxe".into(),
            uefi: "ipxe.efi".into(),
            ipxe_script: "boot.ipxe".into(),
        };
        DhcpServer::new(cfg, files, "192.0.2.1".parse().unwrap(), "255.255.255.0".parse().unwrap(), Status::new([]))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = server().handle(data, Instant::now());
});
