#![no_main]
//! Any datagram a hostile host sends ltsp-server's proxyDHCP, on port 67 and on port 4011,
//! through the very function its receive loop calls (`Responder::handle`): it answers or
//! drops, never panics. The first byte picks the port; the rest is the datagram.
use libfuzzer_sys::fuzz_target;
use ltsp_server::config::ProxyDhcpConfig;
use ltsp_server::proxydhcp::{ProxyDhcp, Responder};
use ltsp_server::status::Status;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

fn proxy() -> &'static ProxyDhcp {
    static P: OnceLock<ProxyDhcp> = OnceLock::new();
    P.get_or_init(|| {
        let cfg = ProxyDhcpConfig {
            interface: "fuzz0".into(),
            bios: "undionly.kpxe".into(),
            uefi: "ipxe.efi".into(),
            arm64: "grub/arm64-efi/core.efi".into(),
            ipxe_script: "boot.ipxe".into(),
        };
        ProxyDhcp::new(cfg, "192.0.2.1".parse().unwrap(), Status::new([]))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, datagram)) = data.split_first() else {
        return;
    };
    let port = if sel & 1 == 0 { 67 } else { 4011 };
    let peer = SocketAddr::from(([192, 0, 2, 77], 68));
    if let Some(r) = proxy().handle(datagram, port, peer, Instant::now()) {
        // Port 4011 answers its sender; 67 broadcasts (no relay in these inputs) or
        // answers a relay.
        assert!(port == 67 || r.to == peer);
    }
});
