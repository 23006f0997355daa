//! A small DHCP server for a lab network that has none (`--dhcp-server IFACE --dhcp-range
//! FIRST-LAST`): addresses from a range, leases kept in memory, and for PXE clients the
//! same boot files as proxyDHCP gives. Sites with a DHCP server use proxyDHCP instead.

use crate::config::{DhcpServerConfig, ProxyDhcpConfig};
use crate::proxydhcp::{boot_file, classify, Client};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// How long an offered address is held for the client's REQUEST.
const OFFER_HOLD: Duration = Duration::from_secs(60);

/// The leases: pure bookkeeping, unit-tested without sockets.
#[derive(Debug)]
pub struct Pool {
    first: u32,
    last: u32,
    /// Never handed out (the server's own address).
    reserved: Vec<Ipv4Addr>,
    leases: HashMap<[u8; 6], (Ipv4Addr, Instant)>,
}

impl Pool {
    pub fn new(first: Ipv4Addr, last: Ipv4Addr, reserved: Vec<Ipv4Addr>) -> Pool {
        Pool {
            first: first.into(),
            last: last.into(),
            reserved,
            leases: HashMap::new(),
        }
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        n >= self.first && n <= self.last && !self.reserved.contains(&ip)
    }

    fn taken_by_other(&self, ip: Ipv4Addr, mac: &[u8; 6], now: Instant) -> bool {
        self.leases
            .iter()
            .any(|(m, (a, until))| m != mac && *a == ip && *until > now)
    }

    /// The address to offer: the client's own (current or expired, if still free), else
    /// the first free one; held for a minute. None: the range is full.
    pub fn offer(&mut self, mac: [u8; 6], now: Instant) -> Option<Ipv4Addr> {
        let ip = match self.leases.get(&mac) {
            Some((ip, _)) if self.in_range(*ip) && !self.taken_by_other(*ip, &mac, now) => *ip,
            _ => (self.first..=self.last)
                .map(Ipv4Addr::from)
                .find(|ip| self.in_range(*ip) && !self.taken_by_other(*ip, &mac, now))?,
        };
        let until = self
            .leases
            .get(&mac)
            .map_or(now, |l| l.1)
            .max(now + OFFER_HOLD);
        self.leases.insert(mac, (ip, until));
        Some(ip)
    }

    /// A REQUEST for `ip`: true when leased for `time` (ACK), false for a NAK (not ours to give).
    pub fn request(&mut self, mac: [u8; 6], ip: Ipv4Addr, time: Duration, now: Instant) -> bool {
        if !self.in_range(ip) || self.taken_by_other(ip, &mac, now) {
            return false;
        }
        self.leases.insert(mac, (ip, now + time));
        true
    }

    pub fn release(&mut self, mac: [u8; 6], now: Instant) {
        if let Some(l) = self.leases.get_mut(&mac) {
            l.1 = now;
        }
    }
}

pub struct DhcpServer {
    cfg: DhcpServerConfig,
    boot: ProxyDhcpConfig,
    server: Ipv4Addr,
    mask: Ipv4Addr,
    pool: Mutex<Pool>,
    status: Arc<crate::status::Status>,
}

fn mac_of(m: &Message) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let c = m.chaddr();
    mac.copy_from_slice(&c[..6.min(c.len())]);
    mac
}

impl DhcpServer {
    pub fn bind(
        cfg: DhcpServerConfig,
        boot: ProxyDhcpConfig,
        status: Arc<crate::status::Status>,
    ) -> Result<(Arc<Self>, UdpSocket), crate::proxydhcp::ProxyDhcpError> {
        let (server, mask) = crate::proxydhcp::ipv4_of(&cfg.interface)
            .ok_or_else(|| crate::proxydhcp::ProxyDhcpError::NoAddress(cfg.interface.clone()))?;
        let sock = crate::proxydhcp::bind(&cfg.interface, 67)?;
        log::info!(
            "dhcp-server: leasing {}-{} on {} as {server}/{mask}",
            cfg.first,
            cfg.last,
            cfg.interface
        );
        Ok((Arc::new(Self::new(cfg, boot, server, mask, status)), sock))
    }

    /// The server's logic without sockets (tests and the fuzzer use it directly).
    pub fn new(
        cfg: DhcpServerConfig,
        boot: ProxyDhcpConfig,
        server: Ipv4Addr,
        mask: Ipv4Addr,
        status: Arc<crate::status::Status>,
    ) -> DhcpServer {
        let pool = Mutex::new(Pool::new(cfg.first, cfg.last, vec![server]));
        DhcpServer {
            cfg,
            boot,
            server,
            mask,
            pool,
            status,
        }
    }

    /// What the server does with one datagram: decode, answer, encode. Everything a
    /// hostile client sends goes through here (fuzzed).
    pub fn handle(&self, datagram: &[u8], now: Instant) -> Option<Vec<u8>> {
        let m = Message::decode(&mut Decoder::new(datagram)).ok()?;
        self.answer(&m, now)?.to_vec().ok()
    }

    /// The reply to one message, if it gets one.
    pub fn answer(&self, m: &Message, now: Instant) -> Option<Message> {
        if m.opcode() != Opcode::BootRequest || m.hlen() != 6 {
            return None;
        }
        let mac = mac_of(m);
        let lease = Duration::from_secs(self.cfg.lease_secs);
        let (kind, ip) = match m.opts().msg_type()? {
            MessageType::Discover => (
                MessageType::Offer,
                self.pool.lock().unwrap().offer(mac, now)?,
            ),
            MessageType::Request => {
                // A REQUEST naming another server: the client chose that one.
                if let Some(DhcpOption::ServerIdentifier(s)) =
                    m.opts().get(OptionCode::ServerIdentifier)
                {
                    if *s != self.server {
                        return None;
                    }
                }
                let ip = match m.opts().get(OptionCode::RequestedIpAddress) {
                    Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
                    _ => m.ciaddr(),
                };
                if self.pool.lock().unwrap().request(mac, ip, lease, now) {
                    (MessageType::Ack, ip)
                } else {
                    (MessageType::Nak, Ipv4Addr::UNSPECIFIED)
                }
            }
            MessageType::Release => {
                self.pool.lock().unwrap().release(mac, now);
                return None;
            }
            _ => return None,
        };
        let client = classify(m);
        let file = if kind == MessageType::Nak {
            None
        } else {
            boot_file(client, &self.boot)
        };
        let mut r = Message::new_with_id(
            m.xid(),
            Ipv4Addr::UNSPECIFIED,
            ip,
            if file.is_some() {
                self.server
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            m.giaddr(),
            &m.chaddr()[..6],
        );
        r.set_opcode(Opcode::BootReply)
            .set_htype(m.htype())
            .set_flags(Flags::default().set_broadcast());
        if let Some(f) = &file {
            r.set_fname_str(f);
        }
        let o = r.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(self.server));
        if kind != MessageType::Nak {
            o.insert(DhcpOption::AddressLeaseTime(self.cfg.lease_secs as u32));
            o.insert(DhcpOption::SubnetMask(self.mask));
            if let Some(gw) = self.cfg.router {
                o.insert(DhcpOption::Router(vec![gw]));
            }
            if !self.cfg.dns.is_empty() {
                o.insert(DhcpOption::DomainNameServer(self.cfg.dns.clone()));
            }
            if client != Client::NotPxe && file.is_some() {
                o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
            }
        }
        Some(r)
    }

    pub async fn run(self: Arc<Self>, sock: UdpSocket) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, _peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("dhcp-server: receive: {e}");
                    continue;
                }
            };
            let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                continue;
            };
            let Some(r) = self.answer(&m, Instant::now()) else {
                continue;
            };
            let Ok(bytes) = r.to_vec() else { continue };
            let to = crate::proxydhcp::reply_to_unaddressed(&m);
            let mac = crate::proxydhcp::mac_text(&m);
            match sock.send_to(&bytes, to).await {
                Ok(_) => {
                    log::info!(
                        "dhcp-server: {mac}: {:?} {} {}",
                        r.opts().msg_type().unwrap_or(MessageType::Unknown(0)),
                        r.yiaddr(),
                        String::from_utf8_lossy(r.fname().unwrap_or_default())
                            .trim_end_matches('\0')
                    );
                    if let Some(f) = r.fname().filter(|f| f.first() != Some(&0)) {
                        self.status
                            .dhcp_seen(&mac, String::from_utf8_lossy(f).trim_end_matches('\0'));
                    }
                }
                Err(e) => log::warn!("dhcp-server: {mac}: send: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn a_discover_gets_an_offer_and_garbage_nothing() {
        let cfg = DhcpServerConfig {
            interface: "x".into(),
            first: ip("192.0.2.100"),
            last: ip("192.0.2.110"),
            lease_secs: 3600,
            router: Some(ip("192.0.2.254")),
            dns: vec![],
        };
        let files = ProxyDhcpConfig {
            interface: String::new(),
            bios: "undionly.kpxe".into(),
            uefi: "ipxe.efi".into(),
            ipxe_script: "boot.ipxe".into(),
        };
        let s = DhcpServer::new(
            cfg,
            files,
            ip("192.0.2.1"),
            ip("255.255.255.0"),
            crate::status::Status::new([]),
        );
        let mut d = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &A,
        );
        d.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        d.opts_mut().insert(DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00000".to_vec(),
        ));
        let bytes = d.to_vec().unwrap();
        let now = Instant::now();
        let r = Message::decode(&mut Decoder::new(&s.handle(&bytes, now).unwrap())).unwrap();
        assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(r.yiaddr(), ip("192.0.2.100"));
        assert_eq!(r.siaddr(), ip("192.0.2.1"));
        assert!(r.fname().unwrap().starts_with(b"undionly.kpxe\0"));
        assert!(
            matches!(r.opts().get(OptionCode::Router), Some(DhcpOption::Router(g)) if g == &vec![ip("192.0.2.254")])
        );
        for n in 0..bytes.len() {
            let _ = s.handle(&bytes[..n], now);
        }
        assert!(s.handle(b"not dhcp at all", now).is_none());
    }

    #[test]
    fn leases_are_stable_per_client_and_never_shared() {
        let now = Instant::now();
        let mut p = Pool::new(
            ip("192.0.2.100"),
            ip("192.0.2.102"),
            vec![ip("192.0.2.101")],
        );
        let a = p.offer(A, now).unwrap();
        assert_eq!(a, ip("192.0.2.100"));
        assert_eq!(
            p.offer(A, now),
            Some(a),
            "the same client, the same address"
        );
        let b = p.offer(B, now).unwrap();
        assert_eq!(b, ip("192.0.2.102"), "the server's own address is skipped");
        let day = Duration::from_secs(86400);
        assert!(p.request(A, a, day, now));
        assert!(!p.request(B, a, day, now), "NAK: A holds it");
        assert!(!p.request(B, ip("192.0.2.101"), day, now), "NAK: reserved");
        assert!(!p.request(B, ip("198.51.100.1"), day, now), "NAK: not ours");
        // Range full for a third client until a lease ends.
        let c = [0x52, 0x54, 0, 0, 0, 3];
        assert!(p.request(B, b, day, now));
        assert_eq!(p.offer(c, now), None);
        p.release(B, now);
        assert_eq!(p.offer(c, now + Duration::from_secs(1)), Some(b));
        // After a reboot A gets its address back.
        assert_eq!(p.offer(A, now + Duration::from_secs(10)), Some(a));
    }
}
