//! proxyDHCP (PXE specification 2.1, §2.2.1): next to a site DHCP server that knows nothing
//! of PXE, answer only PXE clients, and only with where to boot from; the address comes
//! from the site's server. Port 67 takes the DISCOVER broadcasts, port 4011 the requests
//! some firmware (EDK2, iPXE) sends to the proxy afterwards.
//!
//! Which file: firmware PXE gets an iPXE binary for its architecture (BIOS: option 93 = 0;
//! UEFI x86-64: 7 or 9); iPXE itself (user class `iPXE` or option 175) gets `boot.ipxe`,
//! so the chain ends there instead of looping.

use crate::config::ProxyDhcpConfig;
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
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
        // ARM, Itanium, HTTP-boot clients...: not served; say so once per request.
        Client::Firmware(other) => {
            log::info!("proxy-dhcp: client architecture {other} is not served");
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
        &req.chaddr()[..(req.hlen() as usize).min(16)],
    );
    r.set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_flags(Flags::default().set_broadcast())
        .set_fname_str(file);
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
    m.chaddr()[..6.min(m.chaddr().len())]
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
            "proxy-dhcp: answering PXE clients on {} as {server} (BIOS {}, UEFI {}, iPXE {})",
            cfg.interface,
            cfg.bios,
            cfg.uefi,
            cfg.ipxe_script
        );
        Ok((
            Arc::new(ProxyDhcp {
                cfg,
                server,
                status,
            }),
            s67,
            s4011,
        ))
    }

    pub async fn run(self: Arc<Self>, sock: UdpSocket, port: u16) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("proxy-dhcp: receive: {e}");
                    continue;
                }
            };
            let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                continue;
            };
            if m.opcode() != Opcode::BootRequest {
                continue;
            }
            let kind = match (port, m.opts().msg_type()) {
                (67, Some(MessageType::Discover)) => MessageType::Offer,
                (4011, Some(MessageType::Request)) => MessageType::Ack,
                _ => continue,
            };
            let client = classify(&m);
            let Some(file) = boot_file(client, &self.cfg) else {
                continue;
            };
            let reply = answer(&m, kind, self.server, &file);
            let Ok(bytes) = reply.to_vec() else { continue };
            // A request to 4011 comes from an address: answer there.
            let to = if port == 4011 {
                peer
            } else {
                reply_to_unaddressed(&m)
            };
            let mac = mac_text(&m);
            match sock.send_to(&bytes, to).await {
                Ok(_) => {
                    log::info!("proxy-dhcp: {mac} ({client:?}): {kind:?} with {file:?} to {to}");
                    self.status.dhcp_seen(&mac, &file);
                }
                Err(e) => log::warn!("proxy-dhcp: {mac}: send to {to}: {e}"),
            }
        }
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
        assert_eq!(file(&discover(pxe(11))), None, "ARM64 is not served");
        let mut ipxe = pxe(7);
        ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        assert_eq!(file(&discover(ipxe)).as_deref(), Some("boot.ipxe"));
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
}
