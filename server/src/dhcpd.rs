//! A small DHCP server for a lab network that has none (`--dhcp-server IFACE --dhcp-range
//! FIRST-LAST`): addresses from a range, leases kept in a file across restarts, and for
//! PXE clients the same boot files as proxyDHCP gives. Sites with a DHCP server use
//! proxyDHCP instead.
//!
//! An address is never given to another client while its holder may still use it: an
//! expired lease's address is reused only `reuse_after` past its end, and only once no
//! never-used address is left (the longest-expired first). ltsp-rs nodes keep their
//! address for good whatever happens to the lease, so the margin matters.

use crate::config::{DhcpServerConfig, ProxyDhcpConfig, MAX_BOOT_FILE};
use crate::proxydhcp::{boot_file, classify, decode_request, serve, Client, Reply, Responder};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::Encodable;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

/// How long an offered address is held for the client's REQUEST.
const OFFER_HOLD: Duration = Duration::from_secs(60);
/// How long an address a client declined (RFC 2131 §4.4.1: someone else answers ARP for
/// it) is kept out of the pool.
pub const DECLINE_HOLD: Duration = Duration::from_secs(600);
/// Expired offers and declines dropped per call, so no call scans the table.
const PRUNE_BATCH: usize = 64;

/// `now + d`, or a far time when that overflows (a lease time near u32::MAX seconds).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(u32::MAX as u64)))
        .unwrap_or(now)
}

/// A client's binding: offered (held briefly) or leased (kept after expiry, so the client
/// gets its address back, until the address is needed for someone else).
#[derive(Debug, Clone, Copy)]
struct Binding {
    ip: u32,
    until: Instant,
    leased: bool,
}

/// Who holds an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Client([u8; 6]),
    /// Declined by a client until then: in use by someone we do not know.
    Declined(Instant),
}

/// The leases: pure bookkeeping, unit-tested without sockets. Every operation is
/// O(log n) (plus a bounded batch of pruning): addresses are taken from a cursor over
/// never-used ones, a set of free ones and a set of leases ordered by expiry, never by a
/// scan of the range.
#[derive(Debug)]
pub struct Pool {
    first: u32,
    last: u32,
    /// Never handed out: the server's own address, the router, the DNS servers.
    reserved: HashSet<u32>,
    /// Bound of the table: addresses held by clients or declined.
    max: usize,
    /// Addresses from here to `last` were never handed out.
    fresh: u64,
    /// Offered or declined once, never leased, free again.
    free: BTreeSet<u32>,
    by_mac: HashMap<[u8; 6], Binding>,
    by_ip: HashMap<u32, Holder>,
    /// Offers and declines by end of hold.
    holds: BTreeSet<(Instant, u32)>,
    /// Leases by expiry, expired ones included until reclaimed.
    leases: BTreeSet<(Instant, u32)>,
    /// Addresses held as declined now: capped, so DISCOVER-then-DECLINE from spoofed MACs
    /// cannot take the whole range out of service.
    declined: usize,
    /// How long past its end a lease's address stays its holder's.
    grace: Duration,
    /// Addresses and entries examined, for the tests' proof that nothing scans the range.
    pub examined: u64,
}

impl Pool {
    pub fn new(first: Ipv4Addr, last: Ipv4Addr, reserved: &[Ipv4Addr], max: usize) -> Pool {
        Pool {
            first: first.into(),
            last: last.into(),
            reserved: reserved.iter().map(|&a| u32::from(a)).collect(),
            max: max.max(1),
            fresh: u32::from(first) as u64,
            free: BTreeSet::new(),
            by_mac: HashMap::new(),
            by_ip: HashMap::new(),
            holds: BTreeSet::new(),
            declined: 0,
            leases: BTreeSet::new(),
            grace: Duration::ZERO,
            examined: 0,
        }
    }

    /// How long past its end a lease's address stays its holder's (see the module).
    pub fn with_grace(mut self, grace: Duration) -> Pool {
        self.grace = grace;
        self
    }

    /// Whether the lease or hold ending at `t` is over for good at `now`: a lease only
    /// once its grace has passed too.
    fn over(&self, t: Instant, leased: bool, now: Instant) -> bool {
        if leased {
            later(t, self.grace) <= now
        } else {
            t <= now
        }
    }

    /// Addresses held (by clients, or declined): the table's size.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    fn in_range(&self, ip: u32) -> bool {
        ip >= self.first && ip <= self.last && !self.reserved.contains(&ip)
    }

    /// At most a quarter of the range (and of the table) is held as declined.
    fn max_declined(&self) -> usize {
        let range = (self.last - self.first) as usize + 1;
        (range.min(self.max) / 4).max(1)
    }

    /// The entry of `ip` in `holds` or `leases`.
    fn timer(&self, ip: u32) -> Option<(Instant, bool)> {
        match self.by_ip.get(&ip)? {
            Holder::Declined(t) => Some((*t, false)),
            Holder::Client(m) => self.by_mac.get(m).map(|b| (b.until, b.leased)),
        }
    }

    /// Forgets who holds `ip` (the address itself goes nowhere: the caller decides).
    fn unlink(&mut self, ip: u32) {
        if let Some((t, leased)) = self.timer(ip) {
            if leased {
                self.leases.remove(&(t, ip));
            } else {
                self.holds.remove(&(t, ip));
            }
        }
        match self.by_ip.remove(&ip) {
            Some(Holder::Client(m)) => {
                self.by_mac.remove(&m);
            }
            Some(Holder::Declined(_)) => self.declined -= 1,
            None => {}
        }
    }

    fn bind(&mut self, mac: [u8; 6], ip: u32, until: Instant, leased: bool) {
        self.by_ip.insert(ip, Holder::Client(mac));
        self.by_mac.insert(mac, Binding { ip, until, leased });
        if leased {
            self.leases.insert((until, ip));
        } else {
            self.holds.insert((until, ip));
        }
    }

    /// Changes the end (and kind) of `mac`'s binding.
    fn rebind(&mut self, mac: [u8; 6], until: Instant, leased: bool) {
        if let Some(b) = self.by_mac.get(&mac).copied() {
            self.unlink(b.ip);
            self.bind(mac, b.ip, until, leased);
        }
    }

    /// Drops up to `limit` expired offers and declines; their addresses are free again.
    fn prune(&mut self, now: Instant, limit: usize) -> usize {
        let mut n = 0;
        while n < limit {
            match self.holds.first() {
                Some(&(t, ip)) if t <= now => {
                    self.examined += 1;
                    self.unlink(ip);
                    self.free.insert(ip);
                    n += 1;
                }
                _ => break,
            }
        }
        n
    }

    /// The oldest expired lease's address, taken from its client once its grace is over.
    fn reclaim(&mut self, now: Instant) -> Option<u32> {
        let &(t, ip) = self.leases.first()?;
        if !self.over(t, true, now) {
            return None;
        }
        self.examined += 1;
        self.unlink(ip);
        Some(ip)
    }

    /// A never-leased address: never used at all first, then offered-and-dropped ones.
    fn take_unused(&mut self) -> Option<u32> {
        // Skips only reserved addresses and ones taken by a direct REQUEST: each is
        // passed once in the pool's life.
        while self.fresh <= self.last as u64 {
            let ip = self.fresh as u32;
            self.fresh += 1;
            self.examined += 1;
            if self.in_range(ip) && !self.by_ip.contains_key(&ip) {
                return Some(ip);
            }
        }
        while let Some(ip) = self.free.pop_first() {
            self.examined += 1;
            if !self.by_ip.contains_key(&ip) {
                return Some(ip);
            }
        }
        None
    }

    /// Room for one more entry: true when the table is under its bound, or made so.
    fn room(&mut self, now: Instant) -> bool {
        if self.by_ip.len() < self.max {
            return true;
        }
        if self.prune(now, 1) == 1 {
            return true;
        }
        match self.reclaim(now) {
            Some(ip) => {
                self.free.insert(ip);
                true
            }
            None => false,
        }
    }

    /// The address to offer: the client's own (current or expired, if nobody took it),
    /// else a never-used one, else the longest-expired lease; held for a minute. None:
    /// every address is held (or the table is at its bound with nothing expired).
    pub fn offer(&mut self, mac: [u8; 6], now: Instant) -> Option<Ipv4Addr> {
        self.prune(now, PRUNE_BATCH);
        let hold = later(now, OFFER_HOLD);
        if let Some(b) = self.by_mac.get(&mac).copied() {
            self.rebind(mac, b.until.max(hold), b.leased);
            return Some(b.ip.into());
        }
        if !self.room(now) {
            return None;
        }
        let ip = match self.take_unused() {
            Some(ip) => ip,
            None => self.reclaim(now)?,
        };
        self.bind(mac, ip, hold, false);
        Some(ip.into())
    }

    /// A REQUEST for `ip`: true when leased for `time` (ACK), false for a NAK (not ours to
    /// give, or someone else's).
    pub fn request(&mut self, mac: [u8; 6], ip: Ipv4Addr, time: Duration, now: Instant) -> bool {
        self.prune(now, PRUNE_BATCH);
        let ip = u32::from(ip);
        if !self.in_range(ip) {
            return false;
        }
        let until = later(now, time);
        match self.by_ip.get(&ip).copied() {
            Some(Holder::Client(m)) if m == mac => {
                self.rebind(mac, until, true);
                return true;
            }
            // Someone else's, or declined: only once that has ended (a lease: and its
            // grace).
            Some(_) => match self.timer(ip) {
                Some((t, leased)) if self.over(t, leased, now) => self.unlink(ip),
                _ => return false,
            },
            None => {}
        }
        // A free address (a client that kept it across our restart, or INIT-REBOOT):
        // the client gives up any other one it held.
        if let Some(b) = self.by_mac.get(&mac).copied() {
            self.unlink(b.ip);
            self.free.insert(b.ip);
        } else if !self.room(now) {
            return false;
        }
        self.free.remove(&ip);
        self.bind(mac, ip, until, true);
        true
    }

    /// Whether `mac` holds a lease (running or not) on `ip`.
    pub fn holds(&self, mac: [u8; 6], ip: Ipv4Addr) -> bool {
        self.by_mac
            .get(&mac)
            .is_some_and(|b| b.leased && b.ip == u32::from(ip))
    }

    /// The client gives its address back: it stays the client's until someone needs it.
    pub fn release(&mut self, mac: [u8; 6], now: Instant) {
        let Some(b) = self.by_mac.get(&mac).copied() else {
            return;
        };
        if b.leased {
            self.rebind(mac, now, true);
        } else {
            self.unlink(b.ip);
            self.free.insert(b.ip);
        }
    }

    /// The client chose another server: its offer here ends.
    pub fn withdraw(&mut self, mac: [u8; 6]) {
        if let Some(b) = self.by_mac.get(&mac).copied().filter(|b| !b.leased) {
            self.unlink(b.ip);
            self.free.insert(b.ip);
        }
    }

    /// The client found `ip` in use (DHCPDECLINE): nobody gets it for [`DECLINE_HOLD`].
    pub fn decline(&mut self, mac: [u8; 6], ip: Ipv4Addr, now: Instant) {
        let ip = u32::from(ip);
        if self.by_mac.get(&mac).map(|b| b.ip) != Some(ip) {
            return;
        }
        if self.declined >= self.max_declined() {
            // Declines past the cap are not believed: the offer simply ends.
            self.unlink(ip);
            self.free.insert(ip);
            return;
        }
        self.unlink(ip);
        self.declined += 1;
        let until = later(now, DECLINE_HOLD);
        self.by_ip.insert(ip, Holder::Declined(until));
        self.holds.insert((until, ip));
    }
}

/// One lease as the lease file keeps it: the client, its address, and when the lease
/// ends (seconds since the epoch, UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub ends: i64,
}

/// Seconds since the epoch now.
pub fn wall_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `t` on the wall clock, given that `now` is `wall`; rounded up (a lease never ends
/// earlier than it did).
fn wall_of(t: Instant, now: Instant, wall: i64) -> i64 {
    if t >= now {
        let d = t - now;
        wall.saturating_add(d.as_secs() as i64 + i64::from(d.subsec_nanos() > 0))
    } else {
        wall.saturating_sub((now - t).as_secs() as i64)
    }
}

/// `ends` (wall clock) as an Instant; one too far back to represent is taken as now,
/// which keeps the address from others longer, never shorter.
fn instant_of(ends: i64, now: Instant, wall: i64) -> Instant {
    if ends >= wall {
        later(now, Duration::from_secs(ends.abs_diff(wall)))
    } else {
        now.checked_sub(Duration::from_secs(ends.abs_diff(wall)))
            .unwrap_or(now)
    }
}

impl Pool {
    /// The leases, ended ones included until their address goes to someone else, with
    /// their ends on the wall clock; offers and declines are not kept.
    pub fn saved(&self, now: Instant, wall: i64) -> Vec<Saved> {
        let mut v: Vec<Saved> = self
            .by_mac
            .iter()
            .filter(|(_, b)| b.leased)
            .map(|(mac, b)| Saved {
                mac: *mac,
                ip: b.ip.into(),
                ends: wall_of(b.until, now, wall),
            })
            .collect();
        v.sort_by_key(|s| (s.ends, u32::from(s.ip)));
        v
    }

    /// Takes saved leases back (at start). Returns how many were taken, and why each of
    /// the others was not (a hostile file cannot make two clients share an address: the
    /// later-ending lease of an address wins, and a client has one address).
    pub fn restore(&mut self, saved: &[Saved], now: Instant, wall: i64) -> (usize, Vec<String>) {
        let mut order: Vec<&Saved> = saved.iter().collect();
        order.sort_by_key(|s| std::cmp::Reverse(s.ends));
        let (mut taken, mut skipped) = (0, Vec::new());
        for s in order {
            let ip = u32::from(s.ip);
            let why = if !self.in_range(ip) {
                "not in the range (or reserved)"
            } else if self.by_ip.contains_key(&ip) {
                "address listed twice: the later-ending lease is kept"
            } else if self.by_mac.contains_key(&s.mac) {
                "client listed twice: the later-ending lease is kept"
            } else if self.by_ip.len() >= self.max {
                "the table is full (max_leases)"
            } else {
                self.bind(s.mac, ip, instant_of(s.ends, now, wall), true);
                taken += 1;
                continue;
            };
            skipped.push(format!("{} {}: {why}", mac_string(&s.mac), s.ip));
        }
        (taken, skipped)
    }
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

const LEASE_FILE_HEADER: &str =
    "# ltsp-server DHCP leases: MAC ADDRESS END (seconds since the epoch, UTC)\n";

/// The lease file's text.
pub fn render_leases(saved: &[Saved]) -> String {
    let mut s = String::from(LEASE_FILE_HEADER);
    for l in saved {
        s.push_str(&format!("{} {} {}\n", mac_string(&l.mac), l.ip, l.ends));
    }
    s
}

/// Reads a lease file's text: the leases, and the lines that were not one (with their
/// number), at most `max` leases.
pub fn parse_leases(text: &str, max: usize) -> (Vec<Saved>, Vec<String>) {
    let (mut v, mut bad) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let parsed = match f[..] {
            [mac, ip, ends] => parse_mac(mac).zip(ip.parse().ok()).zip(ends.parse().ok()),
            _ => None,
        };
        match parsed {
            Some(((mac, ip), ends)) if v.len() < max => v.push(Saved { mac, ip, ends }),
            Some(_) => bad.push(format!("line {}: more leases than max_leases", n + 1)),
            None => {
                let shown: String = line.chars().take(60).collect();
                bad.push(format!("line {}: not MAC ADDRESS END: {shown:?}", n + 1));
            }
        }
    }
    (v, bad)
}

/// The lease file's leases. A missing file is an empty table; a file that is not a
/// regular file, larger than `max_bytes` or not text is an error (the caller warns and
/// starts empty). Opened without blocking: a FIFO put there cannot hang the start.
pub fn load_leases(
    path: &std::path::Path,
    max_bytes: u64,
    max: usize,
) -> Result<(Vec<Saved>, Vec<String>), String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(format!("cannot open: {e}")),
    };
    let meta = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > max_bytes {
        return Err(format!(
            "{} bytes, more than {max_bytes} for max_leases entries: not a file this server wrote",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    f.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(format!("grew past {max_bytes} bytes while read"));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not text (invalid UTF-8)".to_string())?;
    Ok(parse_leases(&text, max))
}

/// Writes the lease file atomically: a temporary file beside it, fsync, rename, fsync of
/// the directory. A crash leaves the old file or the new one, never half of one.
pub fn save_leases(path: &std::path::Path, saved: &[Saved]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the lease file path names no file"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(render_leases(saved).as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(&dir)?.sync_all()
}

/// Bytes a lease file may have: a line per lease (at most 17 + 1 + 15 + 1 + 20 + 1 bytes,
/// 64 with slack) and the header.
fn lease_file_bound(max: usize) -> u64 {
    (max as u64 + 1) * 64 + 4096
}

/// Renewals are saved in one write per burst: the first waits this long for others. A new
/// lease is saved before its ACK goes out.
const SAVE_DELAY: Duration = Duration::from_millis(200);

pub struct DhcpServer {
    cfg: DhcpServerConfig,
    boot: ProxyDhcpConfig,
    server: Ipv4Addr,
    mask: Ipv4Addr,
    pool: Mutex<Pool>,
    status: Arc<crate::status::Status>,
    /// Woken when a lease changed, for the task that saves the lease file.
    dirty: tokio::sync::Notify,
    /// New leases made (a client got an address it did not hold): each is saved before
    /// its ACK is sent.
    made: std::sync::atomic::AtomicU64,
    /// How many of them the lease file holds.
    saved: tokio::sync::watch::Sender<u64>,
}

/// An Ethernet client's MAC; None for other hardware (this server leases by MAC).
fn mac_of(m: &Message) -> Option<[u8; 6]> {
    crate::proxydhcp::chaddr(m).try_into().ok()
}

/// Addresses in the range that are never leased: the server's, the router's, the DNS
/// servers', and the subnet's network and broadcast addresses.
pub fn reserved(cfg: &DhcpServerConfig, server: Ipv4Addr, mask: Ipv4Addr) -> Vec<Ipv4Addr> {
    let mut r = vec![server];
    r.extend(cfg.router);
    r.extend(cfg.dns.iter().copied());
    let (ip, m) = (u32::from(server), u32::from(mask));
    // /31 and /32 have no network or broadcast address (RFC 3021).
    if m.leading_ones() <= 30 {
        r.push(Ipv4Addr::from(ip & m));
        r.push(Ipv4Addr::from(ip | !m));
    }
    r
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
        let mut pool = Pool::new(
            cfg.first,
            cfg.last,
            &reserved(&cfg, server, mask),
            cfg.max_leases,
        )
        .with_grace(Duration::from_secs(cfg.reuse_after_secs));
        if let Some(path) = &cfg.lease_file {
            let shown = path.display();
            match load_leases(path, lease_file_bound(cfg.max_leases), cfg.max_leases) {
                Ok((saved, bad)) => {
                    for b in bad.iter().take(5) {
                        log::warn!("dhcp-server: lease file {shown}: {b}: ignored");
                    }
                    if bad.len() > 5 {
                        log::warn!(
                            "dhcp-server: lease file {shown}: {} more lines ignored",
                            bad.len() - 5
                        );
                    }
                    let (taken, skipped) = pool.restore(&saved, Instant::now(), wall_now());
                    for s in skipped.iter().take(5) {
                        log::warn!("dhcp-server: lease file {shown}: {s}: not taken back");
                    }
                    log::info!(
                        "dhcp-server: {taken} leases taken back from {shown} ({} not)",
                        saved.len() - taken
                    );
                }
                Err(e) => log::warn!(
                    "dhcp-server: lease file {shown}: {e}: ignored, starting with no leases \
                     (it is replaced at the next lease)"
                ),
            }
        }
        DhcpServer {
            cfg,
            boot,
            server,
            mask,
            pool: Mutex::new(pool),
            status,
            dirty: tokio::sync::Notify::new(),
            made: std::sync::atomic::AtomicU64::new(0),
            saved: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Writes the lease file now (the saving task does it after each change).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.cfg.lease_file else {
            return Ok(());
        };
        let saved = self.pool().saved(Instant::now(), wall_now());
        save_leases(path, &saved)
    }

    /// Saves the lease file after each change, a burst of changes in one write, off the
    /// receive loop (fsync takes milliseconds).
    async fn keep_saved(self: Arc<Self>) {
        use std::sync::atomic::Ordering::Acquire;
        let mut failing = false;
        loop {
            self.dirty.notified().await;
            // Only renewals to save: they can wait for the rest of a burst.
            if self.made.load(Acquire) == *self.saved.borrow() {
                tokio::time::sleep(SAVE_DELAY).await;
            }
            // Read before the table is: every lease counted here is in what is saved.
            let made = self.made.load(Acquire);
            let me = self.clone();
            let r = tokio::task::spawn_blocking(move || me.save())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            let path = self
                .cfg
                .lease_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""));
            match r {
                Ok(()) if failing => {
                    failing = false;
                    log::info!("dhcp-server: lease file {} saved again", path.display());
                }
                Ok(()) => {}
                // Once per failure streak: a full disk must not flood the log.
                Err(e) if !failing => {
                    failing = true;
                    log::error!(
                        "dhcp-server: saving the leases to {}: {e}; they are kept in memory, \
                         a restart now would forget them",
                        path.display()
                    );
                }
                Err(_) => {}
            }
            // Also after a failure: the ACKs go out (logged above), nodes are not held up.
            self.saved.send_replace(made);
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        // The pool's invariants hold between calls: a poisoned lock is still usable.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Clients in the lease table (for tests and status).
    pub fn table_len(&self) -> usize {
        self.pool().len()
    }

    /// The reply to one checked message, if it gets one.
    pub fn answer(&self, m: &Message, now: Instant) -> Option<Message> {
        if m.opcode() != Opcode::BootRequest {
            return None;
        }
        let mac = mac_of(m)?;
        let lease = Duration::from_secs(self.cfg.lease_secs);
        let requested = match m.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let other_server = matches!(m.opts().get(OptionCode::ServerIdentifier),
            Some(DhcpOption::ServerIdentifier(s)) if *s != self.server);
        let (kind, ip) = match m.opts().msg_type()? {
            MessageType::Discover => (MessageType::Offer, self.pool().offer(mac, now)?),
            MessageType::Request => {
                // A REQUEST naming another server: the client chose that one.
                if other_server {
                    self.pool().withdraw(mac);
                    return None;
                }
                let ip = requested.unwrap_or(m.ciaddr());
                let mut pool = self.pool();
                let renewal = pool.holds(mac, ip);
                if pool.request(mac, ip, lease, now) {
                    drop(pool);
                    if !renewal {
                        self.made.fetch_add(1, std::sync::atomic::Ordering::Release);
                    }
                    self.dirty.notify_one();
                    (MessageType::Ack, ip)
                } else {
                    (MessageType::Nak, Ipv4Addr::UNSPECIFIED)
                }
            }
            MessageType::Decline if !other_server => {
                let ip = requested?;
                log::debug!(
                    "dhcp-server: {}: declined {ip} (in use by another host?); not leased for {} s",
                    crate::proxydhcp::mac_text(m),
                    DECLINE_HOLD.as_secs()
                );
                self.pool().decline(mac, ip, now);
                return None;
            }
            MessageType::Release if !other_server => {
                self.pool().release(mac, now);
                self.dirty.notify_one();
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
            &mac,
        );
        r.set_opcode(Opcode::BootReply)
            .set_htype(m.htype())
            .set_flags(Flags::default().set_broadcast());
        if let Some(f) = &file {
            // Config refuses longer names; cut rather than let set_fname panic.
            r.set_fname(&f.as_bytes()[..f.len().min(MAX_BOOT_FILE)]);
        }
        let o = r.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(self.server));
        if kind != MessageType::Nak {
            o.insert(DhcpOption::AddressLeaseTime(
                self.cfg.lease_secs.min(u32::MAX as u64) as u32,
            ));
            o.insert(DhcpOption::SubnetMask(self.mask));
            if let Some(gw) = self.cfg.router {
                o.insert(DhcpOption::Router(vec![gw]));
            }
            if !self.cfg.dns.is_empty() {
                o.insert(DhcpOption::DomainNameServer(self.cfg.dns.clone()));
            }
            if client != Client::NotPxe && file.is_some() {
                o.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
                // PXE discovery control 8: take the file named here. Without it UEFI
                // firmware (edk2) reads the offer as BINL and asks port 4011 for the
                // file, which nothing answers in this mode.
                o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
                if let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
                    m.opts().get(OptionCode::ClientMachineIdentifier)
                {
                    o.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
                }
            }
        }
        Some(r)
    }

    /// Serves port 67 ([`crate::proxydhcp::serve`]).
    pub async fn run(self: Arc<Self>, sock: UdpSocket) {
        if self.cfg.lease_file.is_some() {
            tokio::spawn(self.clone().keep_saved());
        }
        serve(self, sock, 67).await
    }
}

impl Responder for DhcpServer {
    fn name(&self) -> &'static str {
        "dhcp-server"
    }

    /// Holds a reply until every new lease made so far is in the lease file.
    async fn commit(&self) {
        if self.cfg.lease_file.is_none() {
            return;
        }
        let want = self.made.load(std::sync::atomic::Ordering::Acquire);
        let mut saved = self.saved.subscribe();
        let _ = saved.wait_for(|&n| n >= want).await;
    }

    fn status(&self) -> &crate::status::Status {
        &self.status
    }

    /// Decode (after the checks dhcproto needs), answer, encode.
    fn handle(
        &self,
        datagram: &[u8],
        _port: u16,
        _peer: SocketAddr,
        now: Instant,
    ) -> Option<Reply> {
        let m = decode_request(datagram, "dhcp-server")?;
        let r = self.answer(&m, now)?;
        let bytes = r.to_vec().ok()?;
        let file = r
            .fname()
            .map(|f| {
                String::from_utf8_lossy(f)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .filter(|f| !f.is_empty());
        let mac = crate::proxydhcp::mac_text(&m);
        // A client renewing an address it uses (ciaddr) is answered there (RFC 2131 4.1);
        // a NAK is broadcast, the client may no longer have that address.
        let renewing = !m.ciaddr().is_unspecified()
            && m.giaddr().is_unspecified()
            && r.opts().msg_type() == Some(MessageType::Ack);
        Some(Reply {
            bytes,
            to: if renewing {
                SocketAddr::from((m.ciaddr(), 68))
            } else {
                crate::proxydhcp::reply_to_unaddressed(&m)
            },
            summary: format!(
                "{mac}: {:?} {} {}",
                r.opts().msg_type().unwrap_or(MessageType::Unknown(0)),
                r.yiaddr(),
                file.as_deref().unwrap_or_default()
            ),
            mac,
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::{Decodable, Decoder};

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const DAY: Duration = Duration::from_secs(86400);

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn cfg(first: &str, last: &str, max_leases: usize) -> DhcpServerConfig {
        DhcpServerConfig {
            interface: "x".into(),
            first: ip(first),
            last: ip(last),
            lease_secs: 3600,
            router: Some(ip("192.0.2.254")),
            dns: vec![ip("192.0.2.53")],
            max_leases,
            reuse_after_secs: 0,
            lease_file: None,
        }
    }

    fn server(c: DhcpServerConfig) -> DhcpServer {
        server_with_uefi(c, "ipxe.efi")
    }

    fn server_with_uefi(c: DhcpServerConfig, uefi: &str) -> DhcpServer {
        let files = ProxyDhcpConfig {
            interface: String::new(),
            bios: "undionly.kpxe".into(),
            uefi: uefi.into(),
            arm64: "grub/arm64-efi/core.efi".into(),
            ipxe_script: "boot.ipxe".into(),
        };
        DhcpServer::new(
            c,
            files,
            ip("192.0.2.1"),
            ip("255.255.255.0"),
            crate::status::Status::new([]),
        )
    }

    fn msg(kind: MessageType, mac: &[u8; 6], opts: Vec<DhcpOption>) -> Vec<u8> {
        let mut d = Message::new_with_id(
            7,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            mac,
        );
        d.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            d.opts_mut().insert(o);
        }
        d.to_vec().unwrap()
    }

    fn peer() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68))
    }

    fn reply(s: &DhcpServer, bytes: &[u8], now: Instant) -> Option<Message> {
        let r = s.handle(bytes, 67, peer(), now)?;
        Some(Message::decode(&mut Decoder::new(&r.bytes)).unwrap())
    }

    /// Deterministic pseudo-random MACs (xorshift), locally administered.
    fn macs(seed: u64) -> impl Iterator<Item = [u8; 6]> {
        let mut x = seed | 1;
        std::iter::repeat_with(move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_be_bytes();
            [0x02, b[3], b[4], b[5], b[6], b[7]]
        })
    }

    #[test]
    fn a_discover_gets_an_offer_and_garbage_nothing() {
        let s = server(cfg("192.0.2.100", "192.0.2.110", 11));
        let bytes = msg(
            MessageType::Discover,
            &A,
            vec![DhcpOption::ClassIdentifier(
                b"PXEClient:Arch:00000".to_vec(),
            )],
        );
        let now = Instant::now();
        let out = s.handle(&bytes, 67, peer(), now).unwrap();
        assert_eq!(out.to, SocketAddr::from((Ipv4Addr::BROADCAST, 68)));
        assert_eq!(out.file.as_deref(), Some("undionly.kpxe"));
        let r = Message::decode(&mut Decoder::new(&out.bytes)).unwrap();
        assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(r.yiaddr(), ip("192.0.2.100"));
        assert_eq!(r.siaddr(), ip("192.0.2.1"));
        assert!(r.fname().unwrap().starts_with(b"undionly.kpxe\0"));
        assert!(
            matches!(r.opts().get(OptionCode::Router), Some(DhcpOption::Router(g)) if g == &vec![ip("192.0.2.254")])
        );
        for n in 0..bytes.len() {
            let _ = s.handle(&bytes[..n], 67, peer(), now);
        }
        assert!(s.handle(b"not dhcp at all", 67, peer(), now).is_none());
    }

    /// UEFI firmware PXE (architectures 7 and 9) is offered the configured UEFI file (a
    /// signed UKI here) in the OFFER and the ACK, with this server as next-server; BIOS
    /// and iPXE still get theirs.
    #[test]
    fn uefi_firmware_gets_the_uki_in_offer_and_ack() {
        let uki = "ltsp/amd64/ltsp.efi";
        let s = server_with_uefi(cfg("192.0.2.100", "192.0.2.110", 11), uki);
        let now = Instant::now();
        let pxe = |arch: u16| {
            vec![
                DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:003016").into()),
                DhcpOption::ClientSystemArchitecture(arch.into()),
                DhcpOption::ClientMachineIdentifier(vec![0, 7, 7, 7]),
            ]
        };
        for (n, arch) in [7u16, 9].into_iter().enumerate() {
            let mac = [0x52, 0x54, 0, 0, 0, n as u8 + 1];
            let offer = reply(&s, &msg(MessageType::Discover, &mac, pxe(arch)), now).unwrap();
            assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
            assert_eq!(offer.siaddr(), ip("192.0.2.1"), "arch {arch}");
            assert!(
                offer.fname().unwrap().starts_with(b"ltsp/amd64/ltsp.efi\0"),
                "arch {arch}"
            );
            // A PXE offer edk2 boots from without asking port 4011: PXEClient, discovery
            // control 8 (no boot server discovery), the client's UUID echoed.
            assert!(matches!(offer.opts().get(OptionCode::ClassIdentifier),
                Some(DhcpOption::ClassIdentifier(c)) if c == b"PXEClient"));
            assert!(matches!(offer.opts().get(OptionCode::VendorExtensions),
                Some(DhcpOption::VendorExtensions(v)) if v == &[6, 1, 8, 255]));
            assert!(
                matches!(offer.opts().get(OptionCode::ClientMachineIdentifier),
                Some(DhcpOption::ClientMachineIdentifier(u)) if u == &[0, 7, 7, 7])
            );
            let mut opts = pxe(arch);
            opts.push(DhcpOption::RequestedIpAddress(offer.yiaddr()));
            opts.push(DhcpOption::ServerIdentifier(ip("192.0.2.1")));
            let ack = reply(&s, &msg(MessageType::Request, &mac, opts), now).unwrap();
            assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
            assert_eq!(ack.yiaddr(), offer.yiaddr());
            assert!(
                ack.fname().unwrap().starts_with(b"ltsp/amd64/ltsp.efi\0"),
                "arch {arch}"
            );
        }
        let bios = reply(
            &s,
            &msg(MessageType::Discover, &[2, 0, 0, 0, 0, 9], pxe(0)),
            now,
        )
        .unwrap();
        assert!(bios.fname().unwrap().starts_with(b"undionly.kpxe\0"));
        let mut ipxe = pxe(7);
        ipxe.push(DhcpOption::UserClass(b"iPXE".to_vec()));
        let ipxe = reply(
            &s,
            &msg(MessageType::Discover, &[2, 0, 0, 0, 0, 8], ipxe),
            now,
        )
        .unwrap();
        assert!(ipxe.fname().unwrap().starts_with(b"boot.ipxe\0"));
    }

    #[test]
    fn an_arm64_uefi_client_gets_the_arm64_loader_with_its_lease() {
        let s = server(cfg("192.0.2.100", "192.0.2.110", 11));
        let bytes = msg(
            MessageType::Discover,
            &A,
            vec![
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00011:UNDI:003000".to_vec()),
                DhcpOption::ClientSystemArchitecture(11u16.into()),
            ],
        );
        let out = s.handle(&bytes, 67, peer(), Instant::now()).unwrap();
        assert_eq!(out.file.as_deref(), Some("grub/arm64-efi/core.efi"));
        let r = Message::decode(&mut Decoder::new(&out.bytes)).unwrap();
        assert_eq!(r.yiaddr(), ip("192.0.2.100"));
        assert!(r.fname().unwrap().starts_with(b"grub/arm64-efi/core.efi\0"));
    }

    /// Datagrams that trip dhcproto (hlen past chaddr, option-length assertions), kept
    /// in fuzz/regressions/dhcp_server: dropped, and the table is untouched.
    #[test]
    fn crash_inputs_are_dropped() {
        let s = server(cfg("192.0.2.100", "192.0.2.110", 11));
        let now = Instant::now();
        let crashes: [(&str, &[u8]); 5] = [
            (
                "hlen-200-discover",
                include_bytes!("../../fuzz/regressions/dhcp_server/hlen-200-discover"),
            ),
            (
                "option94-length-2",
                include_bytes!("../../fuzz/regressions/dhcp_server/option94-length-2"),
            ),
            (
                "option151-length-0",
                include_bytes!("../../fuzz/regressions/dhcp_server/option151-length-0"),
            ),
            (
                "option80-length-1",
                include_bytes!("../../fuzz/regressions/dhcp_server/option80-length-1"),
            ),
            (
                "option153-length-3",
                include_bytes!("../../fuzz/regressions/dhcp_server/option153-length-3"),
            ),
        ];
        for (name, bytes) in crashes {
            assert!(s.handle(bytes, 67, peer(), now).is_none(), "{name}");
        }
        assert_eq!(s.table_len(), 0);
        // Repaired, the first one is an ordinary DISCOVER and gets an offer.
        let mut fixed = crashes[0].1.to_vec();
        fixed[1] = 1;
        fixed[2] = 6;
        assert!(s.handle(&fixed, 67, peer(), now).is_some());
    }

    #[test]
    fn leases_are_stable_per_client_and_never_shared() {
        let now = Instant::now();
        let mut p = Pool::new(
            ip("192.0.2.100"),
            ip("192.0.2.102"),
            &[ip("192.0.2.101")],
            10,
        );
        let a = p.offer(A, now).unwrap();
        assert_eq!(a, ip("192.0.2.100"));
        assert_eq!(
            p.offer(A, now),
            Some(a),
            "the same client, the same address"
        );
        let b = p.offer(B, now).unwrap();
        assert_eq!(b, ip("192.0.2.102"), "the reserved address is skipped");
        assert!(p.request(A, a, DAY, now));
        assert!(!p.request(B, a, DAY, now), "NAK: A holds it");
        assert!(!p.request(B, ip("192.0.2.101"), DAY, now), "NAK: reserved");
        assert!(!p.request(B, ip("198.51.100.1"), DAY, now), "NAK: not ours");
        // Range full for a third client until a lease ends.
        let c = [0x52, 0x54, 0, 0, 0, 3];
        assert!(p.request(B, b, DAY, now));
        assert_eq!(p.offer(c, now), None);
        p.release(B, now);
        assert_eq!(p.offer(c, now + Duration::from_secs(1)), Some(b));
        // After a reboot A gets its address back.
        assert_eq!(p.offer(A, now + Duration::from_secs(10)), Some(a));
    }

    #[test]
    fn the_server_router_dns_network_and_broadcast_are_never_leased() {
        // The whole /24 as the range: every address but five can be leased.
        let s = server(cfg("192.0.2.0", "192.0.2.255", 1000));
        let now = Instant::now();
        let mut got = HashSet::new();
        for mac in macs(1).take(300) {
            if let Some(r) = reply(&s, &msg(MessageType::Discover, &mac, vec![]), now) {
                assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
                assert!(got.insert(r.yiaddr()), "{} offered twice", r.yiaddr());
            }
        }
        assert_eq!(got.len(), 256 - 5);
        for never in [
            "192.0.2.1",
            "192.0.2.254",
            "192.0.2.53",
            "192.0.2.0",
            "192.0.2.255",
        ] {
            assert!(!got.contains(&ip(never)), "{never} was offered");
            let req = msg(
                MessageType::Request,
                &B,
                vec![DhcpOption::RequestedIpAddress(ip(never))],
            );
            let r = reply(&s, &req, now).unwrap();
            assert_eq!(r.opts().msg_type(), Some(MessageType::Nak), "{never}");
        }
    }

    #[test]
    fn declines_cannot_take_the_range_out_of_service() {
        // 8 addresses: at most 2 held as declined; DISCOVER-then-DECLINE from ever new
        // (spoofed) MACs must leave the rest to real clients.
        let mut p = Pool::new(ip("192.0.2.100"), ip("192.0.2.107"), &[], 8);
        let now = Instant::now();
        for i in 0..8u8 {
            let mac = [2, 0, 0, 0, 0, i];
            let Some(a) = p.offer(mac, now) else { break };
            p.decline(mac, a, now);
        }
        assert_eq!(p.declined, 2);
        let real = [2, 0, 0, 0, 1, 1];
        assert!(
            p.offer(real, now).is_some(),
            "a real client still gets an address"
        );
    }

    #[test]
    fn a_declined_address_is_kept_from_everyone_for_a_while() {
        let s = server(cfg("192.0.2.100", "192.0.2.101", 10));
        let now = Instant::now();
        let x = reply(&s, &msg(MessageType::Discover, &A, vec![]), now)
            .unwrap()
            .yiaddr();
        let req = msg(
            MessageType::Request,
            &A,
            vec![DhcpOption::RequestedIpAddress(x)],
        );
        assert_eq!(
            reply(&s, &req, now).unwrap().opts().msg_type(),
            Some(MessageType::Ack)
        );
        // B's DECLINE of A's address is ignored: only the holder can decline.
        let b_decline = msg(
            MessageType::Decline,
            &B,
            vec![DhcpOption::RequestedIpAddress(x)],
        );
        assert!(s.handle(&b_decline, 67, peer(), now).is_none());
        assert_eq!(
            reply(&s, &req, now).unwrap().opts().msg_type(),
            Some(MessageType::Ack),
            "still A's"
        );
        let decline = msg(
            MessageType::Decline,
            &A,
            vec![
                DhcpOption::RequestedIpAddress(x),
                DhcpOption::ServerIdentifier(ip("192.0.2.1")),
            ],
        );
        assert!(s.handle(&decline, 67, peer(), now).is_none());
        // Nobody gets it, A included, and a REQUEST for it is refused.
        let t = now + Duration::from_secs(1);
        let a2 = reply(&s, &msg(MessageType::Discover, &A, vec![]), t).unwrap();
        assert_ne!(a2.yiaddr(), x);
        assert!(
            reply(&s, &msg(MessageType::Discover, &B, vec![]), t).is_none(),
            "range full"
        );
        let b_req = msg(
            MessageType::Request,
            &B,
            vec![DhcpOption::RequestedIpAddress(x)],
        );
        assert_eq!(
            reply(&s, &b_req, t).unwrap().opts().msg_type(),
            Some(MessageType::Nak)
        );
        // Once the hold is over, it is offered again.
        let after = now + DECLINE_HOLD + Duration::from_secs(1);
        assert_eq!(
            reply(&s, &msg(MessageType::Discover, &B, vec![]), after)
                .unwrap()
                .yiaddr(),
            x
        );
    }

    #[test]
    fn never_used_addresses_go_before_expired_ones_oldest_expired_first() {
        let now = Instant::now();
        let mut p = Pool::new(ip("192.0.2.100"), ip("192.0.2.103"), &[], 10);
        let hour = Duration::from_secs(3600);
        let a = p.offer(A, now).unwrap();
        assert!(p.request(A, a, hour, now));
        let b = p.offer(B, now).unwrap();
        assert!(p.request(B, b, 2 * hour, now));
        let later = now + 3 * hour;
        // Both leases are over, yet new clients get the two never-used addresses first.
        let c = p.offer([2, 0, 0, 0, 0, 3], later).unwrap();
        let d = p.offer([2, 0, 0, 0, 0, 4], later).unwrap();
        assert_eq!((c, d), (ip("192.0.2.102"), ip("192.0.2.103")));
        // Then the one that expired first (A's), then B's.
        assert_eq!(p.offer([2, 0, 0, 0, 0, 5], later), Some(a));
        assert_eq!(p.offer([2, 0, 0, 0, 0, 6], later), Some(b));
        // A lost its address to someone else: it gets none now (all held), not a shared one.
        assert_eq!(p.offer(A, later), None);
    }

    /// A flood of DISCOVERs (and REQUESTs) with random MACs: the table stays within its
    /// bound, and a real client still renews its own address and gets it back.
    #[test]
    fn a_flood_of_random_macs_neither_grows_the_table_nor_starves_a_renewal() {
        let s = server(cfg("192.0.2.100", "192.0.2.149", 50));
        let t0 = Instant::now();
        let a = reply(&s, &msg(MessageType::Discover, &A, vec![]), t0)
            .unwrap()
            .yiaddr();
        let renew = msg(
            MessageType::Request,
            &A,
            vec![DhcpOption::RequestedIpAddress(a)],
        );
        assert_eq!(
            reply(&s, &renew, t0).unwrap().opts().msg_type(),
            Some(MessageType::Ack)
        );
        let mut offers = 0;
        for (i, mac) in macs(7).take(20_000).enumerate() {
            // 10 ms apart: 200 s in all, so offers expire and are pruned along the way.
            let now = t0 + Duration::from_millis(10 * i as u64);
            if s.handle(&msg(MessageType::Discover, &mac, vec![]), 67, peer(), now)
                .is_some()
            {
                offers += 1;
            }
            if i % 7 == 0 {
                // Spoofed REQUESTs for the real client's address and others.
                let grab = msg(
                    MessageType::Request,
                    &mac,
                    vec![DhcpOption::RequestedIpAddress(Ipv4Addr::from(
                        u32::from(a) + (i as u32 % 3),
                    ))],
                );
                let _ = s.handle(&grab, 67, peer(), now);
            }
            assert!(s.table_len() <= 50, "table {} at {i}", s.table_len());
            if i % 1000 == 999 {
                assert_eq!(
                    reply(&s, &renew, now).unwrap().opts().msg_type(),
                    Some(MessageType::Ack),
                    "renewal at {i}"
                );
            }
        }
        assert!(offers > 100, "offers resumed as holds expired ({offers})");
        let end = t0 + Duration::from_secs(200);
        assert_eq!(
            reply(&s, &msg(MessageType::Discover, &A, vec![]), end)
                .unwrap()
                .yiaddr(),
            a,
            "A's DISCOVER still finds its own address"
        );
    }

    /// A /8 range with a small table: each DISCOVER and REQUEST examines a handful of
    /// entries, never the range.
    #[test]
    fn no_operation_scans_the_range() {
        let mut p = Pool::new(ip("10.0.0.0"), ip("10.255.255.255"), &[], 1000);
        let t0 = Instant::now();
        let n = 50_000u64;
        for (i, mac) in macs(3).take(n as usize).enumerate() {
            let now = t0 + Duration::from_millis(5 * i as u64);
            let _ = p.offer(mac, now);
            let _ = p.request(
                mac,
                Ipv4Addr::from(0x0a00_0000 + (i as u32 * 7919) % (1 << 24)),
                DAY,
                now,
            );
            assert!(p.len() <= 1000);
        }
        assert!(
            p.examined <= 4 * 2 * n,
            "{} entries examined for {} operations",
            p.examined,
            2 * n
        );
    }

    #[test]
    fn a_request_for_another_server_withdraws_our_offer() {
        let s = server(cfg("192.0.2.100", "192.0.2.100", 10));
        let now = Instant::now();
        let x = reply(&s, &msg(MessageType::Discover, &A, vec![]), now)
            .unwrap()
            .yiaddr();
        assert!(reply(&s, &msg(MessageType::Discover, &B, vec![]), now).is_none());
        let elsewhere = msg(
            MessageType::Request,
            &A,
            vec![
                DhcpOption::RequestedIpAddress(ip("198.51.100.9")),
                DhcpOption::ServerIdentifier(ip("198.51.100.1")),
            ],
        );
        assert!(s.handle(&elsewhere, 67, peer(), now).is_none());
        assert_eq!(
            reply(&s, &msg(MessageType::Discover, &B, vec![]), now)
                .unwrap()
                .yiaddr(),
            x
        );
    }

    fn with_file(c: DhcpServerConfig, path: &std::path::Path) -> DhcpServerConfig {
        DhcpServerConfig {
            lease_file: Some(path.to_path_buf()),
            ..c
        }
    }

    /// DISCOVER then REQUEST: the address leased to `mac`.
    fn lease(s: &DhcpServer, mac: &[u8; 6], now: Instant) -> Ipv4Addr {
        let x = reply(s, &msg(MessageType::Discover, mac, vec![]), now)
            .unwrap()
            .yiaddr();
        let r = reply(
            s,
            &msg(
                MessageType::Request,
                mac,
                vec![DhcpOption::RequestedIpAddress(x)],
            ),
            now,
        )
        .unwrap();
        assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
        x
    }

    #[test]
    fn leases_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state/dhcp-leases");
        let c = with_file(cfg("192.0.2.100", "192.0.2.102", 10), &path);
        let now = Instant::now();
        let s1 = server(c.clone());
        let a = lease(&s1, &A, now);
        let b = lease(&s1, &B, now);
        // An offer alone is not a lease: not kept.
        let c_mac = [0x52, 0x54, 0, 0, 0, 3];
        let offered = reply(&s1, &msg(MessageType::Discover, &c_mac, vec![]), now)
            .unwrap()
            .yiaddr();
        s1.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "header and two leases:\n{text}");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["dhcp-leases"], "no temporary file left");
        drop(s1);

        // The restarted server knows both clients.
        let s2 = server(c);
        assert_eq!(s2.table_len(), 2);
        let t = Instant::now();
        assert_eq!(
            reply(&s2, &msg(MessageType::Discover, &A, vec![]), t)
                .unwrap()
                .yiaddr(),
            a
        );
        assert_eq!(
            reply(&s2, &msg(MessageType::Discover, &c_mac, vec![]), t)
                .unwrap()
                .yiaddr(),
            offered,
            "a new client gets the one address nobody leased"
        );
        let grab = msg(
            MessageType::Request,
            &c_mac,
            vec![DhcpOption::RequestedIpAddress(b)],
        );
        assert_eq!(
            reply(&s2, &grab, t).unwrap().opts().msg_type(),
            Some(MessageType::Nak),
            "B's address stays B's"
        );
        // B renews from its address (ciaddr): ACK, sent to that address.
        let mut renew = Message::new_with_id(
            9,
            b,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &B,
        );
        renew
            .opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Request));
        let out = s2.handle(&renew.to_vec().unwrap(), 67, peer(), t).unwrap();
        assert_eq!(out.to, SocketAddr::from((b, 68)));
        let r = Message::decode(&mut Decoder::new(&out.bytes)).unwrap();
        assert_eq!(
            (r.opts().msg_type(), r.yiaddr()),
            (Some(MessageType::Ack), b)
        );
    }

    /// The ACK of a new lease waits for the lease file: a server killed right after it
    /// still knows the address is taken.
    #[tokio::test]
    async fn a_new_lease_is_on_disk_before_its_ack_goes_out() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("dhcp-leases");
        let s = Arc::new(server(with_file(
            cfg("192.0.2.100", "192.0.2.102", 10),
            &path,
        )));
        tokio::spawn(s.clone().keep_saved());
        let a = lease(&s, &A, Instant::now());
        s.commit().await;
        let (saved, bad) = load_leases(&path, 1 << 20, 10).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            saved.iter().map(|l| (l.mac, l.ip)).collect::<Vec<_>>(),
            vec![(A, a)]
        );
        // A server started from it now gives that address to nobody else.
        let s2 = server(with_file(cfg("192.0.2.100", "192.0.2.102", 10), &path));
        let b = lease(&s2, &B, Instant::now());
        assert_ne!(a, b);
    }

    #[test]
    fn an_expired_lease_is_kept_from_others_for_its_grace() {
        let now = Instant::now();
        let grace = Duration::from_secs(100);
        let min = Duration::from_secs(60);
        let mut p = Pool::new(ip("192.0.2.100"), ip("192.0.2.101"), &[], 10).with_grace(grace);
        let x = p.offer(A, now).unwrap();
        assert!(p.request(A, x, min, now));
        let y = p.offer(B, now).unwrap();
        assert!(p.request(B, y, min + Duration::from_secs(10), now));
        let c = [2, 0, 0, 0, 0, 3];
        // Both leases over, neither grace: nothing for C, and no REQUEST takes one.
        let t = now + min + Duration::from_secs(20);
        assert_eq!(p.offer(c, t), None);
        assert!(!p.request(c, x, min, t));
        assert!(!p.request(c, y, min, t));
        // The holders themselves renew at any time.
        assert!(p.request(B, y, min, t));
        // Past A's grace (B renewed): C gets A's address, never B's.
        let t = now + min + grace + Duration::from_secs(1);
        assert_eq!(p.offer(c, t), Some(x));
        assert!(!p.request(c, y, min, t));
    }

    /// Random clients leasing, renewing and vanishing over hours of a small range: no
    /// address is ever ACKed to a client while another's lease on it, plus the grace,
    /// runs; and the table restored from a save at any point keeps that true.
    #[test]
    fn no_address_is_acked_to_two_clients_at_once() {
        let lease = Duration::from_secs(30);
        let grace = Duration::from_secs(30);
        let mut p = Pool::new(ip("192.0.2.100"), ip("192.0.2.107"), &[], 64).with_grace(grace);
        let t0 = Instant::now();
        let wall0 = 1_800_000_000i64;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // ip -> (holder, end of its lease)
        let mut held: HashMap<Ipv4Addr, ([u8; 6], Instant)> = HashMap::new();
        let mut now = t0;
        let mut acks = 0;
        for i in 0..20_000u64 {
            now += Duration::from_millis(rnd(3000));
            let mac = [2, 0, 0, 0, 0, rnd(40) as u8];
            let Some(o) = p.offer(mac, now) else { continue };
            if !p.request(mac, o, lease, now) {
                continue;
            }
            acks += 1;
            if let Some(&(holder, ends)) = held.get(&o) {
                assert!(
                    holder == mac || now >= ends + grace,
                    "op {i}: {o} ACKed to {mac:?} while {holder:?} held it until {:?} (+grace) and now is {:?}",
                    ends - t0,
                    now - t0
                );
            }
            held.insert(o, (mac, now + lease));
            if i % 1000 == 999 {
                // Restart: the saved table, through the file's text, in a new pool.
                let wall = wall0 + (now - t0).as_secs() as i64;
                let text = render_leases(&p.saved(now, wall));
                let (saved, bad) = parse_leases(&text, 64);
                assert!(bad.is_empty(), "{bad:?}");
                let mut q =
                    Pool::new(ip("192.0.2.100"), ip("192.0.2.107"), &[], 64).with_grace(grace);
                let (taken, skipped) = q.restore(&saved, now, wall);
                assert!(skipped.is_empty(), "{skipped:?}");
                assert_eq!(taken, saved.len());
                p = q;
            }
        }
        assert!(acks > 5000, "{acks} ACKs: the range was under pressure");
    }

    #[test]
    fn a_hostile_lease_file_is_filtered_or_ignored_with_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("leases");
        let c = with_file(cfg("192.0.2.100", "192.0.2.109", 10), &path);
        let wall = wall_now();
        let end = wall + 3600;
        std::fs::write(
            &path,
            format!(
                "# a comment\n\
                 52:54:00:00:00:01 192.0.2.100 {end}\n\
                 52:54:00:00:00:02 192.0.2.100 {}\n\
                 52:54:00:00:00:01 192.0.2.105 {}\n\
                 52:54:00:00:00:03 198.51.100.7 {end}\n\
                 52:54:00:00:00:04 192.0.2.1 {end}\n\
                 52:54:00:00:00:05 192.0.2.101 99999999999999999999999\n\
                 52:54:00:00:00:06 192.0.2.102 -9223372036854775808\n\
                 52:54:00:00:00:07 192.0.2.103 9223372036854775807\n\
                 52:54:00:00:00 192.0.2.104 {end}\n\
                 zz:54:00:00:00:08 192.0.2.104 {end}\n\
                 52:54:00:00:00:09 192.0.2.104 {end} extra\n\
                 {}\n",
                end + 60,
                end - 60,
                "x".repeat(3000)
            ),
        )
        .unwrap();
        let s = server(c.clone());
        let t = Instant::now();
        // Kept: 02 (the later of two leases of .100), 01 on .105, 06 (ended long
        // ago), 07 (ends at the end of time).
        assert_eq!(s.table_len(), 4);
        let held_by = |mac: [u8; 6]| {
            reply(&s, &msg(MessageType::Discover, &mac, vec![]), t)
                .unwrap()
                .yiaddr()
        };
        assert_eq!(held_by([0x52, 0x54, 0, 0, 0, 2]), ip("192.0.2.100"));
        assert_eq!(held_by([0x52, 0x54, 0, 0, 0, 1]), ip("192.0.2.105"));
        assert_eq!(held_by([0x52, 0x54, 0, 0, 0, 7]), ip("192.0.2.103"));

        // Files that are not ours at all: ignored whole, the server starts empty.
        let big = "52:54:00:00:00:01 192.0.2.100 1\n".repeat(10_000);
        for (what, bytes) in [
            ("too big", big.into_bytes()),
            ("binary", vec![0xff, 0xfe, 0, 1, 2, 3]),
        ] {
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(server(c.clone()).table_len(), 0, "{what}");
        }
        // A FIFO cannot hang the start, a directory is no file.
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(server(c.clone()).table_len(), 0);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert_eq!(server(c.clone()).table_len(), 0);
        assert!(load_leases(&path, 1 << 20, 10).is_err());
        // No file yet: an empty table, no error.
        let fresh = d.path().join("none");
        assert_eq!(load_leases(&fresh, 1 << 20, 10).unwrap().0, vec![]);
    }
}
