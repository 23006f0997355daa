//! proxyDHCP (PXE specification 2.1, §2.2.1): next to a site DHCP server that knows nothing
//! of PXE, answer only PXE clients, and only with where to boot from; the address comes
//! from the site's server. Port 67 takes the DISCOVER broadcasts, port 4011 the requests
//! some firmware (EDK2, iPXE) sends to the proxy afterwards.
//!
//! Which file: firmware PXE gets a loader for its architecture (BIOS: option 93 = 0;
//! UEFI x86-64: 7 or 9, an iPXE binary; UEFI arm64: 11, GRUB by default); iPXE itself (user class `iPXE` or option 175) gets `boot.ipxe`,
//! so the chain ends there instead of looping.
//!
//! Both DHCP modes (this one and `dhcpd`) run the one receive loop here, [`serve`], around
//! their pure [`Responder::handle`]; that function is what the fuzz targets drive.

use crate::config::{ProxyDhcpConfig, MAX_BOOT_FILE};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::UdpSocket;

#[derive(Debug, thiserror::Error)]
pub enum ProxyDhcpError {
    #[error("proxy-dhcp: interface {0:?} has no IPv4 address")]
    NoAddress(String),
    #[error("proxy-dhcp: bind port {port} on {iface}: {source}")]
    Bind {
        port: u16,
        iface: String,
        source: std::io::Error,
    },
}

/// One reply to send, from [`Responder::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub to: SocketAddr,
    /// The client's hardware address as text, for logs and status.
    pub mac: String,
    /// What was answered, for the log line (after "NAME: ").
    pub summary: String,
    /// The boot file given, recorded in status.
    pub file: Option<String>,
}

/// One DHCP mode's logic: from a datagram to the reply, without sockets.
pub trait Responder: Send + Sync + 'static {
    /// Log prefix: "proxy-dhcp" or "dhcp-server".
    fn name(&self) -> &'static str;
    /// Everything a client on the boot network sends goes through here (fuzzed): it
    /// answers or drops, never panics. `port` is the local port it came in on.
    fn handle(&self, datagram: &[u8], port: u16, peer: SocketAddr, now: Instant) -> Option<Reply>;
    fn status(&self) -> &crate::status::Status;
    /// Waits until the reply may go out: the DHCP server's new leases are on disk first,
    /// so a restart never forgets an address it gave.
    fn commit(&self) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
}

/// Answers logged: a flood of DISCOVERs with random MACs would log one line each.
static ANSWERS: crate::limits::LogLimit = crate::limits::LogLimit::new(50);

/// The receive loop of both DHCP modes: receive, [`Responder::handle`], send.
pub async fn serve<R: Responder>(r: Arc<R>, sock: UdpSocket, port: u16) {
    let name = r.name();
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("{name}: receive on port {port}: {e}");
                // A persistent error must not spin the loop.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(reply) = r.handle(&buf[..n], port, peer, Instant::now()) else {
            continue;
        };
        r.commit().await;
        match sock.send_to(&reply.bytes, reply.to).await {
            Ok(_) => {
                if let Some(n) = ANSWERS.allow() {
                    log::info!("{name}: {}{}", reply.summary, crate::limits::suppressed(n));
                }
                if let Some(f) = &reply.file {
                    r.status().dhcp_seen(&reply.mac, f);
                }
            }
            Err(e) => log::warn!("{name}: {}: send to {}: {e}", reply.mac, reply.to),
        }
    }
}

/// A BOOTREQUEST from the network, decoded only once the fields dhcproto trusts are
/// checked (see `ltsp_common::dhcp`); anything else is dropped here.
pub fn decode_request(datagram: &[u8], who: &str) -> Option<Message> {
    if let Err(e) = ltsp_common::dhcp::check(datagram, ltsp_common::dhcp::BOOTREQUEST) {
        // Debug only: a flood of garbage must not flood the log too.
        log::debug!("{who}: dropped a malformed datagram: {e}");
        return None;
    }
    Message::decode(&mut Decoder::new(datagram)).ok()
}

/// The client hardware address; empty for an hlen that does not fit chaddr (dhcproto's
/// `chaddr()` would panic on it).
pub(crate) fn chaddr(m: &Message) -> &[u8] {
    if m.hlen() <= ltsp_common::dhcp::MAX_HLEN {
        m.chaddr()
    } else {
        &[]
    }
}

/// The kind of client asking, from its DISCOVER/REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Not a PXE client: the site's DHCP server alone answers it.
    NotPxe,
    /// iPXE, already running: give it the script.
    Ipxe,
    /// Firmware PXE with this client architecture (RFC 4578 option 93).
    Firmware(u16),
}

pub fn classify(m: &Message) -> Client {
    let o = m.opts();
    let pxe = matches!(o.get(OptionCode::ClassIdentifier),
        Some(DhcpOption::ClassIdentifier(c)) if c.starts_with(b"PXEClient"));
    if !pxe {
        return Client::NotPxe;
    }
    let user_class_ipxe = matches!(o.get(OptionCode::UserClass),
        Some(DhcpOption::UserClass(u)) if u.windows(4).any(|w| w == b"iPXE"));
    if user_class_ipxe || o.get(OptionCode::from(175u8)).is_some() {
        return Client::Ipxe;
    }
    let arch = match o.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => u16::from(*a),
        _ => 0,
    };
    Client::Firmware(arch)
}

/// The boot file a client gets, or None when it is not ours to answer.
pub fn boot_file(c: Client, cfg: &ProxyDhcpConfig) -> Option<String> {
    match c {
        Client::NotPxe => None,
        Client::Ipxe => Some(cfg.ipxe_script.clone()),
        Client::Firmware(0) => Some(cfg.bios.clone()),
        Client::Firmware(6 | 7 | 9) => Some(cfg.uefi.clone()),
        Client::Firmware(11) => Some(cfg.arm64.clone()),
        // 32-bit ARM, Itanium, HTTP-boot clients...: not served; say so once per request.
        Client::Firmware(other) => {
            log::debug!("proxy-dhcp: client architecture {other} is not served");
            None
        }
    }
}

/// The proxy's answer: no address, only the server and the file (and option 60, which
/// PXE firmware requires to take a proxy offer at all).
pub fn answer(req: &Message, kind: MessageType, server: Ipv4Addr, file: &str) -> Message {
    let mut r = Message::new_with_id(
        req.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        server,
        req.giaddr(),
        chaddr(req),
    );
    r.set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_flags(Flags::default().set_broadcast())
        // Config refuses longer names; cut rather than let set_fname panic.
        .set_fname(&file.as_bytes()[..file.len().min(MAX_BOOT_FILE)]);
    let o = r.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(server));
    o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
    // PXE discovery control 8: no boot server discovery, take the file named here.
    o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    if let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
        req.opts().get(OptionCode::ClientMachineIdentifier)
    {
        o.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
    }
    r
}

/// Where a reply goes to a client that has no address yet: its relay, else a broadcast.
pub(crate) fn reply_to_unaddressed(m: &Message) -> SocketAddr {
    if m.giaddr().is_unspecified() {
        SocketAddr::from((Ipv4Addr::BROADCAST, 68))
    } else {
        SocketAddr::from((m.giaddr(), 67))
    }
}

/// The client's hardware address as `aa:bb:cc:dd:ee:ff`, for logs and status.
pub(crate) fn mac_text(m: &Message) -> String {
    let c = chaddr(m);
    c[..6.min(c.len())]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The interface's IPv4 address and netmask.
pub(crate) fn ipv4_of(iface: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        if a.interface_name != iface {
            return None;
        }
        let ip = a.address?.as_sockaddr_in()?.ip();
        let mask = a
            .netmask
            .and_then(|m| m.as_sockaddr_in().map(|s| s.ip()))
            .unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
        Some((ip, mask))
    })
}

pub(crate) fn bind(iface: &str, port: u16) -> Result<UdpSocket, ProxyDhcpError> {
    use nix::sys::socket::{setsockopt, sockopt};
    let err = |source: std::io::Error| ProxyDhcpError::Bind {
        port,
        iface: iface.to_string(),
        source,
    };
    let s = socket2_free_bind(port).map_err(err)?;
    // Replies to clients without an address are broadcasts: out of this interface only.
    setsockopt(&s, sockopt::BindToDevice, &std::ffi::OsString::from(iface))
        .map_err(|e| err(e.into()))?;
    setsockopt(&s, sockopt::Broadcast, &true).map_err(|e| err(e.into()))?;
    s.set_nonblocking(true).map_err(err)?;
    UdpSocket::from_std(s).map_err(err)
}

/// A UDP socket on 0.0.0.0:`port` with SO_REUSEADDR (a restart must not wait).
fn socket2_free_bind(port: u16) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )?;
    Ok(std::net::UdpSocket::from(fd))
}

pub struct ProxyDhcp {
    cfg: ProxyDhcpConfig,
    server: Ipv4Addr,
    status: Arc<crate::status::Status>,
}

impl ProxyDhcp {
    /// Binds ports 67 and 4011 on the configured interface.
    pub fn bind(
        cfg: ProxyDhcpConfig,
        status: Arc<crate::status::Status>,
    ) -> Result<(Arc<Self>, UdpSocket, UdpSocket), ProxyDhcpError> {
        let (server, _) = ipv4_of(&cfg.interface)
            .ok_or_else(|| ProxyDhcpError::NoAddress(cfg.interface.clone()))?;
        let s67 = bind(&cfg.interface, 67)?;
        let s4011 = bind(&cfg.interface, 4011)?;
        log::info!(
            "proxy-dhcp: answering PXE clients on {} as {server} (BIOS {}, UEFI {}, arm64 {}, iPXE {})",
            cfg.interface,
            cfg.bios,
            cfg.uefi,
            cfg.arm64,
            cfg.ipxe_script
        );
        Ok((Arc::new(ProxyDhcp::new(cfg, server, status)), s67, s4011))
    }

    /// The logic without sockets (tests and fuzzing build it directly).
    pub fn new(cfg: ProxyDhcpConfig, server: Ipv4Addr, status: Arc<crate::status::Status>) -> Self {
        ProxyDhcp {
            cfg,
            server,
            status,
        }
    }

    /// Serves one of the two ports ([`serve`]).
    pub async fn run(self: Arc<Self>, sock: UdpSocket, port: u16) {
        serve(self, sock, port).await
    }
}

impl Responder for ProxyDhcp {
    fn name(&self) -> &'static str {
        "proxy-dhcp"
    }

    fn status(&self) -> &crate::status::Status {
        &self.status
    }

    /// Port 67: a DISCOVER gets an OFFER (broadcast, or to its relay). Port 4011: a
    /// REQUEST gets an ACK, sent back where it came from.
    fn handle(&self, datagram: &[u8], port: u16, peer: SocketAddr, _now: Instant) -> Option<Reply> {
        let m = decode_request(datagram, "proxy-dhcp")?;
        let kind = match (port, m.opts().msg_type()) {
            (67, Some(MessageType::Discover)) => MessageType::Offer,
            (4011, Some(MessageType::Request)) => MessageType::Ack,
            _ => return None,
        };
        let client = classify(&m);
        let file = boot_file(client, &self.cfg)?;
        let bytes = answer(&m, kind, self.server, &file).to_vec().ok()?;
        let to = if port == 4011 {
            peer
        } else {
            reply_to_unaddressed(&m)
        };
        let mac = mac_text(&m);
        Some(Reply {
            bytes,
            to,
            summary: format!("{mac} ({client:?}): {kind:?} with {file:?} to {to}"),
            mac,
            file: Some(file),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProxyDhcpConfig {
        ProxyDhcpConfig {
            interface: "br0".into(),
            bios: "undionly.kpxe".into(),
            uefi: "ipxe.efi".into(),
            arm64: "grub/arm64-efi/core.efi".into(),
            ipxe_script: "boot.ipxe".into(),
        }
    }

    fn discover(opts: Vec<DhcpOption>) -> Message {
        let mut m = Message::new_with_id(
            0xabcd,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[0x52, 0x54, 0, 0x12, 0x34, 0x56],
        );
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        for o in opts {
            m.opts_mut().insert(o);
        }
        // Through the wire format, as the server sees it.
        Message::decode(&mut Decoder::new(&m.to_vec().unwrap())).unwrap()
    }

    fn pxe(arch: u16) -> Vec<DhcpOption> {
        vec![
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()),
            DhcpOption::ClientSystemArchitecture(arch.into()),
        ]
    }

    #[test]
    fn each_client_gets_its_file_and_ipxe_never_loops() {
        let c = cfg();
        let file = |m: &Message| boot_file(classify(m), &c);
        assert_eq!(
            file(&discover(vec![])),
            None,
            "plain DHCP clients are not ours"
        );
        assert_eq!(file(&discover(pxe(0))).as_deref(), Some("undionly.kpxe"));
        assert_eq!(file(&discover(pxe(7))).as_deref(), Some("ipxe.efi"));
        assert_eq!(file(&discover(pxe(9))).as_deref(), Some("ipxe.efi"));
        assert_eq!(
            file(&discover(pxe(11))).as_deref(),
            Some("grub/arm64-efi/core.efi"),
            "UEFI arm64 gets its own loader"
        );
        assert_eq!(file(&discover(pxe(10))), None, "32-bit ARM is not served");
        let mut ipxe = pxe(7);
        ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        assert_eq!(file(&discover(ipxe)).as_deref(), Some("boot.ipxe"));
    }

    /// With a signed UKI as the UEFI boot file, UEFI firmware PXE (architectures 7 and 9)
    /// gets it in the proxy OFFER on 67 and the ACK on 4011; iPXE and BIOS are unchanged.
    #[test]
    fn uefi_firmware_gets_the_uki() {
        let p = ProxyDhcp::new(
            ProxyDhcpConfig {
                uefi: "ltsp/amd64/ltsp.efi".into(),
                ..cfg()
            },
            Ipv4Addr::new(192, 0, 2, 1),
            crate::status::Status::new([]),
        );
        let now = Instant::now();
        for arch in [7, 9] {
            let r = p
                .handle(&discover(pxe(arch)).to_vec().unwrap(), 67, peer(), now)
                .unwrap();
            assert_eq!(
                r.file.as_deref(),
                Some("ltsp/amd64/ltsp.efi"),
                "arch {arch}"
            );
            let m = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
            assert_eq!(m.siaddr(), Ipv4Addr::new(192, 0, 2, 1));
            assert!(m.fname().unwrap().starts_with(b"ltsp/amd64/ltsp.efi\0"));
            let mut q = discover(pxe(arch));
            q.opts_mut()
                .insert(DhcpOption::MessageType(MessageType::Request));
            let r = p.handle(&q.to_vec().unwrap(), 4011, peer(), now).unwrap();
            let m = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
            assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
            assert!(m.fname().unwrap().starts_with(b"ltsp/amd64/ltsp.efi\0"));
        }
        let r = p
            .handle(&discover(pxe(0)).to_vec().unwrap(), 67, peer(), now)
            .unwrap();
        assert_eq!(r.file.as_deref(), Some("undionly.kpxe"));
        let mut ipxe = pxe(9);
        ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        let r = p
            .handle(&discover(ipxe).to_vec().unwrap(), 67, peer(), now)
            .unwrap();
        assert_eq!(r.file.as_deref(), Some("boot.ipxe"));
    }

    #[test]
    fn the_offer_names_server_and_file_but_no_address() {
        let mut opts = pxe(0);
        opts.push(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
        let d = discover(opts);
        let r = answer(
            &d,
            MessageType::Offer,
            Ipv4Addr::new(192, 0, 2, 1),
            "undionly.kpxe",
        );
        let r = Message::decode(&mut Decoder::new(&r.to_vec().unwrap())).unwrap();
        assert_eq!(r.opcode(), Opcode::BootReply);
        assert_eq!(r.xid(), 0xabcd);
        assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.siaddr(), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(&r.chaddr()[..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
        assert!(matches!(r.opts().get(OptionCode::ClassIdentifier),
            Some(DhcpOption::ClassIdentifier(c)) if c == b"PXEClient"));
        assert!(r.opts().get(OptionCode::ClientMachineIdentifier).is_some());
        let fname = r.fname().unwrap();
        assert!(fname.starts_with(b"undionly.kpxe\0"));
    }

    fn proxy() -> ProxyDhcp {
        ProxyDhcp::new(
            cfg(),
            Ipv4Addr::new(192, 0, 2, 1),
            crate::status::Status::new([]),
        )
    }

    fn peer() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(192, 0, 2, 77), 68))
    }

    #[test]
    fn the_loops_function_answers_on_67_and_on_4011() {
        let p = proxy();
        let now = Instant::now();
        let d = discover(pxe(7)).to_vec().unwrap();
        let r = p.handle(&d, 67, peer(), now).expect("an offer");
        assert_eq!(r.to, SocketAddr::from((Ipv4Addr::BROADCAST, 68)));
        assert_eq!(r.mac, "52:54:00:12:34:56");
        assert_eq!(r.file.as_deref(), Some("ipxe.efi"));
        let m = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Offer));
        // A DISCOVER on 4011 is not answered; a REQUEST there is, to its sender.
        assert!(p.handle(&d, 4011, peer(), now).is_none());
        let mut q = discover(pxe(0));
        q.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Request));
        let q = q.to_vec().unwrap();
        let r = p.handle(&q, 4011, peer(), now).expect("an ack");
        assert_eq!(r.to, peer());
        let m = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Ack));
        assert!(p.handle(&q, 67, peer(), now).is_none());
        // A proxyDHCP REQUEST on 4011 from UEFI arm64 gets the arm64 loader.
        let mut q = discover(pxe(11));
        q.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Request));
        let r = p.handle(&q.to_vec().unwrap(), 4011, peer(), now);
        assert_eq!(
            r.expect("an ack").file.as_deref(),
            Some("grub/arm64-efi/core.efi")
        );
        // The longest chaddr there is (16 bytes) is still served.
        let mut long = d.clone();
        long[2] = 16;
        let r = p.handle(&long, 67, peer(), now).expect("hlen 16 is valid");
        let m = Message::decode(&mut Decoder::new(&r.bytes)).unwrap();
        assert_eq!(m.hlen(), 16);
    }

    /// The datagrams that aborted the server (hlen past chaddr's 16 bytes: dhcproto's
    /// `chaddr()` slices by it) or tripped dhcproto's option-length assertions, kept in
    /// fuzz/regressions/proxy_dhcp. Each must be dropped on both ports.
    #[test]
    fn crash_inputs_are_dropped_on_both_ports() {
        let p = proxy();
        let now = Instant::now();
        let crashes: [(&str, &[u8]); 6] = [
            (
                "hlen-200-discover",
                include_bytes!("../../fuzz/regressions/proxy_dhcp/hlen-200-discover"),
            ),
            (
                "hlen-17-discover",
                include_bytes!("../../fuzz/regressions/proxy_dhcp/hlen-17-discover"),
            ),
            (
                "hlen-255-request-4011",
                include_bytes!("../../fuzz/regressions/proxy_dhcp/hlen-255-request-4011"),
            ),
            (
                "option94-length-2",
                include_bytes!("../../fuzz/regressions/proxy_dhcp/option94-length-2"),
            ),
            (
                "option151-length-0",
                include_bytes!("../../fuzz/regressions/proxy_dhcp/option151-length-0"),
            ),
            (
                "option81-length-1",
                include_bytes!("../../fuzz/regressions/proxy_dhcp/option81-length-1"),
            ),
        ];
        for (name, bytes) in crashes {
            for port in [67, 4011] {
                assert!(
                    p.handle(bytes, port, peer(), now).is_none(),
                    "{name} on {port}"
                );
            }
        }
        // The same DISCOVER with a sane hlen is answered: the drop is the check, not luck.
        let mut fixed = crashes[0].1.to_vec();
        fixed[1] = 1;
        fixed[2] = 6;
        assert!(p.handle(&fixed, 67, peer(), now).is_some());
        // Every prefix of a real DISCOVER, and each byte flipped, is handled too.
        let d = discover(pxe(0)).to_vec().unwrap();
        for n in 0..d.len() {
            let _ = p.handle(&d[..n], 67, peer(), now);
        }
        for i in 0..d.len() {
            for v in [0u8, 0x7f, 0xff] {
                let mut x = d.clone();
                x[i] = v;
                let _ = p.handle(&x, 67, peer(), now);
                let _ = p.handle(&x, 4011, peer(), now);
            }
        }
    }
}
