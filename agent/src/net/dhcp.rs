//! DHCPv4 client for a NIC with no address yet: DISCOVER, OFFER, REQUEST, ACK over an
//! AF_PACKET socket (the kernel's IP stack cannot receive before the NIC has an address;
//! klibc's ipconfig and systemd-networkd do the same). Messages are dhcproto's; the
//! IPv4/UDP framing around them is the pure functions below.

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
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
        }
    }
}

pub fn lease_of(m: &Message) -> Lease {
    let o = m.opts();
    let mut l = Lease {
        ip: m.yiaddr(),
        prefix: 24,
        ..Default::default()
    };
    if let Some(DhcpOption::SubnetMask(mask)) = o.get(OptionCode::SubnetMask) {
        l.prefix = super::link::prefix_len(*mask);
    }
    if let Some(DhcpOption::Router(r)) = o.get(OptionCode::Router) {
        l.router = r.first().copied();
    }
    if let Some(DhcpOption::DomainNameServer(d)) = o.get(OptionCode::DomainNameServer) {
        l.dns = d.clone();
    }
    if let Some(DhcpOption::Hostname(h)) = o.get(OptionCode::Hostname) {
        l.hostname = Some(h.clone());
    }
    if let Some(DhcpOption::DomainName(d)) = o.get(OptionCode::DomainName) {
        l.domain = Some(d.clone());
    }
    if let Some(DhcpOption::ServerIdentifier(s)) = o.get(OptionCode::ServerIdentifier) {
        l.server_id = Some(*s);
    }
    if let Some(DhcpOption::AddressLeaseTime(t)) = o.get(OptionCode::AddressLeaseTime) {
        l.lease_secs = Some(*t);
    }
    if let Some(DhcpOption::RootPath(p)) = o.get(OptionCode::RootPath) {
        l.root_path = Some(p.clone());
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
    l.bootfile = m
        .fname()
        .map(|f| {
            String::from_utf8_lossy(f)
                .trim_end_matches('\0')
                .to_string()
        })
        .filter(|f| !f.is_empty())
        .or_else(|| match o.get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(b)) => Some(
                String::from_utf8_lossy(b)
                    .trim_end_matches('\0')
                    .to_string(),
            ),
            _ => None,
        });
    l
}

/// Decodes a DHCP message from anyone on the wire. dhcproto may panic on some malformed
/// options (a debug assertion, found by fuzzing): such a packet is dropped like any
/// other garbage instead of failing the boot.
fn decode(payload: &[u8]) -> Option<Message> {
    std::panic::catch_unwind(|| Message::decode(&mut dhcproto::Decoder::new(payload)).ok())
        .ok()
        .flatten()
}

/// What one received frame says, if it is a DHCP reply to port 68: its xid, message type
/// and lease. Everything a hostile DHCP server sends goes through here (fuzzed).
pub fn parse_reply(p: &[u8]) -> Option<(u32, Option<MessageType>, Lease)> {
    let m = decode(unframe(p)?)?;
    Some((m.xid(), m.opts().msg_type(), lease_of(&m)))
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
    offer: Option<&Message>,
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
    ]));
    if let Some(offer) = offer {
        o.insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        if let Some(DhcpOption::ServerIdentifier(s)) =
            offer.opts().get(OptionCode::ServerIdentifier)
        {
            o.insert(DhcpOption::ServerIdentifier(*s));
        }
    }
    m
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
        let mut offer: Option<Message> = None;
        let mut acked: Option<Message> = None;
        while let Some(left) = round_end.checked_duration_since(Instant::now()) {
            let t = Instant::now();
            let got = sock.recv(&mut buf, left).map_err(sock_err)?;
            waited += t.elapsed();
            let Some(n) = got else {
                break;
            };
            let Some(payload) = unframe(&buf[..n]) else {
                continue;
            };
            let Some(m) = decode(payload) else {
                continue;
            };
            if m.xid() != xid
                || m.opcode() != Opcode::BootReply
                || m.chaddr().get(..6) != Some(&mac[..])
            {
                continue;
            }
            match (m.opts().msg_type(), &offer) {
                (Some(MessageType::Offer), None) => {
                    log::debug!(
                        "dhcp: {iface}: OFFER {} from {:?}",
                        m.yiaddr(),
                        lease_of(&m).server_id
                    );
                    let req = request_message(MessageType::Request, xid, mac, secs, Some(&m))
                        .to_vec()
                        .map_err(|e| DhcpError::Encode(e.to_string()))?;
                    sock.send_broadcast(&req).map_err(sock_err)?;
                    offer = Some(m);
                }
                (Some(MessageType::Ack), Some(o)) if m.yiaddr() == o.yiaddr() => {
                    acked = Some(m);
                    break;
                }
                (Some(MessageType::Nak), Some(_)) => {
                    log::warn!(
                        "dhcp: {iface}: server refused the offered address (NAK); starting over"
                    );
                    break;
                }
                _ => {}
            }
        }
        if let Some(m) = acked {
            return Ok((lease_of(&m), waited));
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

    #[test]
    fn parse_reply_reads_the_fuzz_seed_and_survives_its_truncations() {
        let seed = include_bytes!("../../../fuzz/seeds/dhcp-ack");
        let (xid, kind, l) = parse_reply(seed).expect("a framed ACK");
        assert_eq!(xid, 0x1234);
        assert_eq!(kind, Some(MessageType::Ack));
        assert_eq!(l.ip, Ipv4Addr::new(192, 0, 2, 50));
        assert_eq!(l.hostname.as_deref(), Some("n50"));
        assert_eq!(l.root_path.as_deref(), Some("/srv/root"));
        for n in 0..seed.len() {
            let _ = parse_reply(&seed[..n]);
        }
    }

    #[test]
    fn fuzzer_crashes_stay_fixed() {
        // Option 94 (client network interface) with a length other than 3: dhcproto's
        // debug assertion panicked; the packet must just be dropped or parsed.
        let crash = include_bytes!("../../../fuzz/regressions/dhcp_reply/option94-length");
        let _ = parse_reply(crash);
        // Another of its length assertions (a bulk-leasequery option), found next.
        let crash = include_bytes!("../../../fuzz/regressions/dhcp_reply/option-len-debug-assert");
        let _ = parse_reply(crash);
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
        let l = lease_of(&back);
        assert_eq!(l.ip, Ipv4Addr::new(192, 0, 2, 50));
        assert_eq!(l.prefix, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(192, 0, 2, 254)));
        assert_eq!(l.next_server, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(l.bootfile.as_deref(), Some("boot.ipxe"));
        assert_eq!(l.hostname.as_deref(), Some("n50"));
        assert!(back.flags().broadcast());
    }
}
