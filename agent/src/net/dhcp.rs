//! DHCPv4 client for a NIC with no address yet: DISCOVER, OFFER, REQUEST, ACK over an
//! AF_PACKET socket (the kernel's IP stack cannot receive before the NIC has an address;
//! klibc's ipconfig and systemd-networkd do the same). Messages are dhcproto's; the
//! IPv4/UDP framing around them is the pure functions below.

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub hostname: Option<String>,
    pub domain: Option<String>,
    pub server_id: Option<Ipv4Addr>,
    /// BOOTP siaddr or option 66: where the boot files came from.
    pub next_server: Option<Ipv4Addr>,
    pub bootfile: Option<String>,
    pub root_path: Option<String>,
    pub lease_secs: Option<u32>,
    /// T1 and T2 (options 58 and 59), as the server gave them.
    pub renew_secs: Option<u32>,
    pub rebind_secs: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("packet socket on {iface}: {source}")]
    Socket { iface: String, source: io::Error },
    #[error("no DHCP answer on {iface} within {secs} s ({tries} DISCOVERs sent): is a DHCP server on this network, and does it answer this MAC?")]
    NoAnswer {
        iface: String,
        secs: u64,
        tries: u32,
    },
    #[error("encode: {0}")]
    Encode(String),
}

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            (c[0] as u16) << 8
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4+UDP datagram from 0.0.0.0:68 to 255.255.255.255:67 around `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0x10]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&[255, 255, 255, 255]);
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    p.extend_from_slice(&SERVER_PORT.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // UDP checksum is optional over IPv4
    p.extend_from_slice(payload);
    p
}

/// The UDP payload of an IPv4 datagram to port 68, if that is what `p` is.
pub fn unframe(p: &[u8]) -> Option<&[u8]> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = ((p[0] & 0x0f) as usize) * 4;
    let total = (u16::from_be_bytes([p[2], p[3]]) as usize).min(p.len());
    let udp = p.get(ihl..total)?;
    if udp.len() < 8 || u16::from_be_bytes([udp[2], udp[3]]) != CLIENT_PORT {
        return None;
    }
    let ulen = (u16::from_be_bytes([udp[4], udp[5]]) as usize).clamp(8, udp.len());
    Some(&udp[8..ulen])
}

impl Default for Lease {
    fn default() -> Self {
        Lease {
            ip: Ipv4Addr::UNSPECIFIED,
            prefix: 24,
            router: None,
            dns: Vec::new(),
            hostname: None,
            domain: None,
            server_id: None,
            next_server: None,
            bootfile: None,
            root_path: None,
            lease_secs: None,
            renew_secs: None,
            rebind_secs: None,
        }
    }
}

/// An address we can take as our own, or use as a router or server: unicast, not
/// 0.0.0.0/8, loopback, multicast, or 240.0.0.0/4 (which holds the broadcast address).
pub fn is_host_address(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] != 0 && !a.is_loopback() && !a.is_multicast() && o[0] < 240
}

/// A host or domain name as /etc/hostname and resolv.conf take it: letters, digits,
/// hyphens, dots; labels of 1..=63 bytes, 253 in all.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A path or file name that can be written between single quotes in a shell file
/// (/run/net-IFACE.conf is sourced by scripts): printable ASCII without quotes or
/// backslashes.
fn is_quotable(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'\'' && b != b'"' && b != b'\\')
}

/// How many DNS servers a lease keeps (resolv.conf reads three).
const MAX_DNS: usize = 3;

/// The lease a reply offers, checked: Err when the address itself is unusable (then the
/// whole reply is ignored); a field that is unusable (a router, a DNS server, a name) is
/// left out and logged.
pub fn lease_of(m: &Message) -> Result<Lease, String> {
    let o = m.opts();
    let ip = m.yiaddr();
    if !is_host_address(ip) {
        return Err(format!("offers {ip}, which no host can have"));
    }
    let mut l = Lease {
        ip,
        prefix: 24,
        ..Default::default()
    };
    if let Some(DhcpOption::SubnetMask(mask)) = o.get(OptionCode::SubnetMask) {
        let m = u32::from(*mask);
        let prefix = m.leading_ones();
        if prefix == 0 || m.count_ones() != prefix {
            return Err(format!("subnet mask {mask} is not a prefix of 1..=32 bits"));
        }
        l.prefix = prefix as u8;
    }
    if l.prefix <= 30 {
        let hostmask = u32::MAX >> l.prefix;
        let host = u32::from(ip) & hostmask;
        if host == 0 || host == hostmask {
            return Err(format!(
                "offers {ip}/{}, the subnet's network or broadcast address",
                l.prefix
            ));
        }
    }
    let mut dropped: Vec<String> = Vec::new();
    if let Some(DhcpOption::Router(r)) = o.get(OptionCode::Router) {
        l.router = r.iter().copied().find(|&g| is_host_address(g) && g != ip);
        if l.router.is_none() {
            dropped.push("router".into());
        }
    }
    if let Some(DhcpOption::DomainNameServer(d)) = o.get(OptionCode::DomainNameServer) {
        l.dns = d
            .iter()
            .copied()
            .filter(|&a| is_host_address(a))
            .take(MAX_DNS)
            .collect();
        if l.dns.len() < d.len().min(MAX_DNS) {
            dropped.push("DNS server".into());
        }
    }
    let mut name = |code: OptionCode, what: &'static str, ok: fn(&str) -> bool| match o.get(code) {
        Some(DhcpOption::Hostname(s) | DhcpOption::DomainName(s) | DhcpOption::RootPath(s)) => {
            let s = s.trim_end_matches('\0');
            if ok(s) {
                Some(s.to_string())
            } else {
                // Named with its value: an operator looks for the typo in the DHCP config.
                dropped.push(format!("{what} {s:?}"));
                None
            }
        }
        _ => None,
    };
    l.hostname = name(OptionCode::Hostname, "host name", is_dns_name);
    l.domain = name(OptionCode::DomainName, "domain name", is_dns_name);
    l.root_path = name(OptionCode::RootPath, "root path", is_quotable);
    if let Some(DhcpOption::ServerIdentifier(s)) = o.get(OptionCode::ServerIdentifier) {
        l.server_id = Some(*s);
    }
    if let Some(DhcpOption::AddressLeaseTime(t)) = o.get(OptionCode::AddressLeaseTime) {
        l.lease_secs = Some(*t);
    }
    if let Some(DhcpOption::Renewal(t)) = o.get(OptionCode::Renewal) {
        l.renew_secs = Some(*t);
    }
    if let Some(DhcpOption::Rebinding(t)) = o.get(OptionCode::Rebinding) {
        l.rebind_secs = Some(*t);
    }
    let siaddr = m.siaddr();
    l.next_server = if !siaddr.is_unspecified() {
        Some(siaddr)
    } else if let Some(DhcpOption::TFTPServerName(n)) = o.get(OptionCode::TFTPServerName) {
        String::from_utf8_lossy(n)
            .trim_end_matches('\0')
            .parse()
            .ok()
    } else {
        None
    };
    if l.next_server.is_some_and(|s| !is_host_address(s)) {
        l.next_server = None;
        dropped.push("next server".into());
    }
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_end_matches('\0')
            .to_string()
    };
    let file = m.fname().map(text).filter(|f| !f.is_empty()).or_else(|| {
        match o.get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(b)) => Some(text(b)),
            _ => None,
        }
    });
    l.bootfile = match file {
        Some(f) if is_quotable(&f) => Some(f),
        Some(_) => {
            dropped.push("boot file".into());
            None
        }
        None => None,
    };
    if !dropped.is_empty() {
        log::warn!(
            "dhcp: reply for {ip}: left out its unusable {}",
            dropped.join(", ")
        );
    }
    Ok(l)
}

/// Decodes a DHCP reply from anyone on the wire, after checking the fields dhcproto
/// trusts (`ltsp_common::dhcp::check`). The unwind guard stays as a second line, for
/// builds where panics unwind.
fn decode(payload: &[u8]) -> Result<Message, Ignored> {
    ltsp_common::dhcp::check(payload, ltsp_common::dhcp::BOOTREPLY).map_err(Ignored::Malformed)?;
    std::panic::catch_unwind(|| Message::decode(&mut dhcproto::Decoder::new(payload)).ok())
        .ok()
        .flatten()
        .ok_or(Ignored::Undecodable)
}

/// A reply to our transaction, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Offer(Lease),
    Ack(Lease),
    /// The server that refused (its option 54).
    Nak(Option<Ipv4Addr>),
}

/// Why a received frame is not acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ignored {
    /// Not a DHCP reply to port 68, or one for another client or transaction: the usual
    /// traffic of a network where many nodes boot at once.
    #[error("not a reply to us")]
    NotOurs,
    #[error("malformed: {0}")]
    Malformed(ltsp_common::dhcp::Malformed),
    #[error("undecodable")]
    Undecodable,
    #[error("{0}")]
    Unusable(String),
}

/// What one received frame is to a client waiting on transaction `xid` for `mac`.
/// Everything a hostile host on the network sends the client goes through here (fuzzed):
/// it never panics, and an `Ok` lease is one the node can configure.
pub fn parse_reply(frame: &[u8], xid: u32, mac: &[u8; 6]) -> Result<Reply, Ignored> {
    parse_payload(unframe(frame).ok_or(Ignored::NotOurs)?, xid, mac)
}

/// [`parse_reply`] for a UDP payload (the lease keeper's socket strips IPv4 and UDP).
pub fn parse_payload(payload: &[u8], xid: u32, mac: &[u8; 6]) -> Result<Reply, Ignored> {
    let m = decode(payload)?;
    if m.xid() != xid || m.hlen() != 6 || m.chaddr() != &mac[..] {
        return Err(Ignored::NotOurs);
    }
    let server = match m.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
        _ => None,
    };
    match m.opts().msg_type() {
        Some(MessageType::Offer) => Ok(Reply::Offer(lease_of(&m).map_err(Ignored::Unusable)?)),
        Some(MessageType::Ack) => Ok(Reply::Ack(lease_of(&m).map_err(Ignored::Unusable)?)),
        Some(MessageType::Nak) => Ok(Reply::Nak(server)),
        other => Err(Ignored::Unusable(format!("message type {other:?}"))),
    }
}

/// An empty BOOTREQUEST. Built by decoding bytes because dhcproto's constructors go
/// through `Message::default()`, which draws a random xid: early in boot that blocks in
/// getrandom() until the kernel's CRNG is seeded (a whole second under QEMU TCG).
fn blank_request(xid: u32, mac: &[u8; 6]) -> Message {
    let mut b = vec![0u8; 240];
    b[0] = 1; // BOOTREQUEST
    b[1] = 1; // Ethernet
    b[2] = 6;
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[28..34].copy_from_slice(mac);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b.push(255);
    Message::decode(&mut dhcproto::Decoder::new(&b)).expect("a well-formed BOOTP header")
}

fn request_message(
    kind: MessageType,
    xid: u32,
    mac: &[u8; 6],
    secs: u16,
    offer: Option<&Lease>,
) -> Message {
    let mut m = blank_request(xid, mac);
    m.set_flags(Flags::default().set_broadcast());
    m.set_secs(secs);
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    let mut cid = vec![1u8];
    cid.extend_from_slice(mac);
    o.insert(DhcpOption::ClientIdentifier(cid));
    o.insert(DhcpOption::ClassIdentifier(b"ltsp-rs".to_vec()));
    o.insert(DhcpOption::MaxMessageSize(1472));
    o.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::Hostname,
        OptionCode::DomainName,
        OptionCode::RootPath,
        OptionCode::TFTPServerName,
        OptionCode::BootfileName,
        OptionCode::Renewal,
        OptionCode::Rebinding,
    ]));
    if let Some(offer) = offer {
        o.insert(DhcpOption::RequestedIpAddress(offer.ip));
        if let Some(s) = offer.server_id {
            o.insert(DhcpOption::ServerIdentifier(s));
        }
    }
    m
}

/// A REQUEST that extends the lease of `ciaddr`, which the client already uses (RFC 2131
/// 4.3.2, RENEWING and REBINDING): ciaddr set, no requested address, no server
/// identifier, no broadcast flag (the client can receive unicast).
pub fn renew_request(
    xid: u32,
    mac: &[u8; 6],
    secs: u16,
    ciaddr: Ipv4Addr,
) -> Result<Vec<u8>, DhcpError> {
    let mut m = request_message(MessageType::Request, xid, mac, secs, None);
    m.set_flags(Flags::default());
    m.set_ciaddr(ciaddr);
    m.to_vec().map_err(|e| DhcpError::Encode(e.to_string()))
}

struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    fn open(ifindex: u32) -> io::Result<PacketSocket> {
        use nix::libc;
        let proto = (libc::ETH_P_IP as u16).to_be();
        // Protocol 0 here and the real one in bind(): the socket is then hooked into the
        // stack once, for this NIC only. Created with ETH_P_IP it would be hooked for all
        // NICs first, and bind() would wait an RCU grace period to unhook it (a whole
        // second under QEMU TCG).
        // SAFETY: plain socket(2) call; the result is checked before it is wrapped.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll and the length passed is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket {
            fd,
            ifindex: ifindex as i32,
        })
    }

    fn send_broadcast(&self, payload: &[u8]) -> io::Result<()> {
        use nix::libc;
        let pkt = frame(payload);
        // SAFETY: as above, plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: pkt outlives the call; sll is valid for its stated size.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram, or None after `timeout`.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let n = nix::sys::socket::recv(
            self.fd.as_raw_fd(),
            buf,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        Ok(Some(n))
    }
}

/// An ACK from the server whose offer we took (when both name themselves).
fn same_server(ack: &Lease, offer: &Lease) -> bool {
    ack.server_id.is_none() || offer.server_id.is_none() || ack.server_id == offer.server_id
}

/// Runs DISCOVER..ACK on `iface` until `deadline`, resending with exponential backoff
/// (1, 2, 4, 4... s). Returns the lease and the time spent blocked waiting for the
/// server's packets (building and reading messages is ours, and not counted).
pub fn acquire(
    iface: &str,
    ifindex: u32,
    mac: &[u8; 6],
    deadline: Instant,
) -> Result<(Lease, Duration), DhcpError> {
    let sock = PacketSocket::open(ifindex).map_err(|source| DhcpError::Socket {
        iface: iface.into(),
        source,
    })?;
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let xid: u32 = std::process::id().wrapping_mul(2_654_435_761)
        ^ (u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]));
    // Short first retransmissions: a DISCOVER lost while the link settles costs little.
    let mut wait = Duration::from_millis(250);
    let mut tries = 0;
    let mut buf = vec![0u8; 2048];
    let mut ignored = 0u32;
    let sock_err = |source| DhcpError::Socket {
        iface: iface.into(),
        source,
    };
    while Instant::now() < deadline {
        tries += 1;
        let secs = started.elapsed().as_secs().min(u16::MAX as u64) as u16;
        let discover = request_message(MessageType::Discover, xid, mac, secs, None)
            .to_vec()
            .map_err(|e| DhcpError::Encode(e.to_string()))?;
        sock.send_broadcast(&discover).map_err(sock_err)?;
        log::debug!("dhcp: {iface}: DISCOVER xid {xid:#x}");
        let round_end = (Instant::now() + wait).min(deadline);
        let mut offer: Option<Lease> = None;
        while let Some(left) = round_end.checked_duration_since(Instant::now()) {
            let t = Instant::now();
            let got = sock.recv(&mut buf, left).map_err(sock_err)?;
            waited += t.elapsed();
            let Some(n) = got else {
                break;
            };
            match (parse_reply(&buf[..n], xid, mac), &offer) {
                (Ok(Reply::Offer(l)), None) => {
                    log::debug!("dhcp: {iface}: OFFER {} from {:?}", l.ip, l.server_id);
                    let req = request_message(MessageType::Request, xid, mac, secs, Some(&l))
                        .to_vec()
                        .map_err(|e| DhcpError::Encode(e.to_string()))?;
                    sock.send_broadcast(&req).map_err(sock_err)?;
                    offer = Some(l);
                }
                (Ok(Reply::Ack(l)), Some(o)) if l.ip == o.ip && same_server(&l, o) => {
                    if ignored > 0 {
                        log::warn!("dhcp: {iface}: {ignored} unusable replies were ignored");
                    }
                    return Ok((l, waited));
                }
                // Only the server we asked can refuse us: anyone else's NAK is noise.
                (Ok(Reply::Nak(from)), Some(o)) if o.server_id.is_none() || from == o.server_id => {
                    log::warn!(
                        "dhcp: {iface}: server refused the offered address (NAK); starting over"
                    );
                    break;
                }
                (Ok(_), _) | (Err(Ignored::NotOurs), _) => {}
                (Err(e @ Ignored::Unusable(_)), _) => {
                    ignored += 1;
                    // The first few are worth a line; a flood must not fill the console.
                    if ignored <= 3 {
                        log::warn!("dhcp: {iface}: ignored a reply: {e}; still waiting");
                    }
                }
                (Err(e), _) => log::debug!("dhcp: {iface}: ignored a frame: {e}"),
            }
        }
        wait = (wait * 2).min(Duration::from_secs(4));
    }
    Err(DhcpError::NoAnswer {
        iface: iface.into(),
        secs: started.elapsed().as_secs(),
        tries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::Opcode;

    #[test]
    fn framing_round_trip() {
        let payload = b"hello dhcp";
        let mut f = frame(payload);
        // Turn our request into what a server reply to port 68 looks like.
        f[20..22].copy_from_slice(&67u16.to_be_bytes());
        f[22..24].copy_from_slice(&68u16.to_be_bytes());
        assert_eq!(unframe(&f), Some(&payload[..]));
        assert_eq!(checksum(&f[..20]), 0, "header checksum verifies");
        for cut in 0..28 {
            assert!(unframe(&f[..cut]).is_none() || cut >= 28);
        }
        let mut tcp = f.clone();
        tcp[9] = 6;
        assert!(unframe(&tcp).is_none());
    }

    #[test]
    fn requests_carry_xid_mac_and_options() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let m = request_message(MessageType::Discover, 0xabcd, &mac, 3, None);
        let back = Message::from_bytes(&m.to_vec().unwrap()).unwrap();
        assert_eq!(back.xid(), 0xabcd);
        assert_eq!(back.opcode(), Opcode::BootRequest);
        assert_eq!(&back.chaddr()[..6], &mac);
        assert!(back.flags().broadcast());
        assert_eq!(back.opts().msg_type(), Some(MessageType::Discover));
    }

    const SEED_MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    #[test]
    fn parse_reply_reads_the_fuzz_seed_and_survives_its_truncations() {
        let seed = include_bytes!("../../../fuzz/seeds/dhcp-ack");
        let Ok(Reply::Ack(l)) = parse_reply(seed, 0x1234, &SEED_MAC) else {
            panic!("a framed ACK: {:?}", parse_reply(seed, 0x1234, &SEED_MAC));
        };
        assert_eq!(l.ip, Ipv4Addr::new(192, 0, 2, 50));
        assert_eq!(l.hostname.as_deref(), Some("n50"));
        assert_eq!(l.root_path.as_deref(), Some("/srv/root"));
        assert_eq!(parse_reply(seed, 0x1235, &SEED_MAC), Err(Ignored::NotOurs));
        assert_eq!(
            parse_reply(seed, 0x1234, &[2, 0, 0, 0, 0, 1]),
            Err(Ignored::NotOurs)
        );
        for n in 0..seed.len() {
            if let Ok(Reply::Ack(l)) = parse_reply(&seed[..n], 0x1234, &SEED_MAC) {
                assert_eq!(l.ip, Ipv4Addr::new(192, 0, 2, 50), "cut at {n}");
            }
        }
    }

    #[test]
    fn fuzzer_crashes_stay_fixed() {
        // Option 94 (client network interface) with a length other than 3, and a
        // bulk-leasequery option of the wrong length: dhcproto's debug assertions
        // panicked on them. They are refused before dhcproto sees them.
        for crash in [
            &include_bytes!("../../../fuzz/regressions/dhcp_reply/option94-length")[..],
            &include_bytes!("../../../fuzz/regressions/dhcp_reply/option-len-debug-assert")[..],
        ] {
            let payload = unframe(crash).expect("framed");
            let xid = u32::from_be_bytes(payload[4..8].try_into().unwrap());
            let mac: [u8; 6] = payload[28..34].try_into().unwrap();
            assert!(matches!(
                parse_reply(crash, xid, &mac),
                Err(Ignored::Malformed(_))
            ));
        }
    }

    /// A reply from a server to SEED_MAC, framed as the packet socket receives it.
    fn reply(kind: MessageType, yiaddr: [u8; 4], opts: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = blank_request(0x77, &SEED_MAC);
        m.set_opcode(Opcode::BootReply);
        m.set_yiaddr(Ipv4Addr::from(yiaddr));
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 0, 2, 1)));
        for o in opts {
            m.opts_mut().insert(o);
        }
        to_client(&m.to_vec().unwrap())
    }

    fn to_client(payload: &[u8]) -> Vec<u8> {
        let mut f = frame(payload);
        f[20..22].copy_from_slice(&67u16.to_be_bytes());
        f[22..24].copy_from_slice(&68u16.to_be_bytes());
        f
    }

    fn parse(f: &[u8]) -> Result<Reply, Ignored> {
        parse_reply(f, 0x77, &SEED_MAC)
    }

    fn ack_lease(f: &[u8]) -> Lease {
        match parse(f) {
            Ok(Reply::Ack(l)) => l,
            other => panic!("an ACK: {other:?}"),
        }
    }

    #[test]
    fn an_unusable_address_or_mask_makes_the_reply_ignored() {
        let mask = |m: [u8; 4]| vec![DhcpOption::SubnetMask(Ipv4Addr::from(m))];
        let good = reply(MessageType::Ack, [192, 0, 2, 50], mask([255, 255, 255, 0]));
        assert_eq!(ack_lease(&good).prefix, 24);
        for (what, ip, opts) in [
            ("0.0.0.0", [0, 0, 0, 0], vec![]),
            ("0/8", [0, 1, 2, 3], vec![]),
            ("broadcast", [255, 255, 255, 255], vec![]),
            ("multicast", [224, 0, 0, 1], vec![]),
            ("loopback", [127, 0, 0, 1], vec![]),
            ("class E", [250, 0, 0, 1], vec![]),
            (
                "subnet broadcast",
                [192, 0, 2, 255],
                mask([255, 255, 255, 0]),
            ),
            ("network address", [192, 0, 2, 0], mask([255, 255, 255, 0])),
            ("mask 0", [192, 0, 2, 50], mask([0, 0, 0, 0])),
            ("holey mask", [192, 0, 2, 50], mask([255, 0, 255, 0])),
        ] {
            for kind in [MessageType::Offer, MessageType::Ack] {
                assert!(
                    matches!(
                        parse(&reply(kind, ip, opts.clone())),
                        Err(Ignored::Unusable(_))
                    ),
                    "{what} in an {kind:?}"
                );
            }
        }
        // /31 and /32 have no network or broadcast address: .0 and .255 are hosts there.
        let p2p = reply(MessageType::Ack, [192, 0, 2, 0], mask([255, 255, 255, 254]));
        assert_eq!(ack_lease(&p2p).prefix, 31);
        let host = reply(
            MessageType::Ack,
            [192, 0, 2, 255],
            mask([255, 255, 255, 255]),
        );
        assert_eq!(ack_lease(&host).prefix, 32);
    }

    #[test]
    fn unusable_fields_are_left_out_and_the_rest_is_kept() {
        let ip = |a, b, c, d| Ipv4Addr::new(a, b, c, d);
        let f = reply(
            MessageType::Ack,
            [192, 0, 2, 50],
            vec![
                DhcpOption::Router(vec![ip(0, 0, 0, 0), ip(192, 0, 2, 50), ip(192, 0, 2, 254)]),
                // 60 servers, the first ones unusable.
                DhcpOption::DomainNameServer(
                    [ip(255, 255, 255, 255), ip(224, 0, 0, 251)]
                        .into_iter()
                        .chain((1..=58).map(|i| ip(192, 0, 2, i)))
                        .collect(),
                ),
                DhcpOption::Hostname("n1'; reboot; '".into()),
                DhcpOption::DomainName("lab.example".into()),
                DhcpOption::RootPath("/srv/root'$(id)".into()),
            ],
        );
        let l = ack_lease(&f);
        assert_eq!(l.router, Some(ip(192, 0, 2, 254)), "first usable, not ours");
        assert_eq!(
            l.dns,
            vec![ip(192, 0, 2, 1), ip(192, 0, 2, 2), ip(192, 0, 2, 3)]
        );
        assert_eq!(l.hostname, None, "a quote cannot reach /run/net-*.conf");
        assert_eq!(l.domain.as_deref(), Some("lab.example"));
        assert_eq!(l.root_path, None);
        let f = reply(
            MessageType::Ack,
            [192, 0, 2, 50],
            vec![
                DhcpOption::Router(vec![ip(224, 0, 0, 1)]),
                DhcpOption::Hostname("node-7".into()),
            ],
        );
        let l = ack_lease(&f);
        assert_eq!(l.router, None);
        assert_eq!(l.hostname.as_deref(), Some("node-7"));
    }

    #[test]
    fn hostile_headers_and_option_floods_are_dropped_or_bounded() {
        let good = reply(MessageType::Offer, [192, 0, 2, 50], vec![]);
        assert!(matches!(parse(&good), Ok(Reply::Offer(_))));
        // hlen 200: dhcproto's chaddr() would slice past its 16 bytes.
        let mut bad = good.clone();
        bad[28 + 2] = 200;
        assert_eq!(
            parse(&bad),
            Err(Ignored::Malformed(ltsp_common::dhcp::Malformed::Hlen(200)))
        );
        // A request (op 1) sent to port 68 is no reply.
        let mut req = good.clone();
        req[28] = 1;
        assert!(matches!(parse(&req), Err(Ignored::Malformed(_))));
        // No message type, or a type a server does not send.
        let none = reply(MessageType::Discover, [192, 0, 2, 50], vec![]);
        assert!(matches!(parse(&none), Err(Ignored::Unusable(_))));
        // 700 unknown options in one datagram: parsed, the lease is the same.
        let mut payload = unframe(&good).unwrap().to_vec();
        payload.pop(); // End
        for _ in 0..350 {
            payload.extend_from_slice(&[200, 0, 201, 0]);
        }
        payload.push(255);
        assert!(
            matches!(parse(&to_client(&payload)), Ok(Reply::Offer(l)) if l.ip == Ipv4Addr::new(192, 0, 2, 50))
        );
    }

    #[test]
    fn lease_from_ack() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let mut m = request_message(MessageType::Ack, 7, &mac, 0, None);
        m.set_opcode(Opcode::BootReply);
        m.set_yiaddr(Ipv4Addr::new(192, 0, 2, 50));
        m.set_siaddr(Ipv4Addr::new(192, 0, 2, 1));
        m.set_fname_str("boot.ipxe");
        let o = m.opts_mut();
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(192, 0, 2, 254)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            192, 0, 2, 53,
        )]));
        o.insert(DhcpOption::Hostname("n50".into()));
        let bytes = m.to_vec().unwrap();
        let back = Message::from_bytes(&bytes).unwrap();
        let l = lease_of(&back).unwrap();
        assert_eq!(l.ip, Ipv4Addr::new(192, 0, 2, 50));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(192, 0, 2, 254)));
        assert_eq!(l.next_server, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(l.bootfile.as_deref(), Some("boot.ipxe"));
        assert_eq!(l.hostname.as_deref(), Some("n50"));
        assert!(back.flags().broadcast());
    }
}
