//! The lease keeper: renews the boot NIC's DHCP lease for as long as the node runs
//! (RFC 2131 4.4.5), and never removes the address, which the network root depends on.
//!
//! At T1 (option 58, else half the lease) it unicasts a REQUEST to the server that gave
//! the lease (RENEWING); at T2 (option 59, else 7/8 of it) it broadcasts one to any server
//! (REBINDING). Without an answer it sends again after half the time left until T2 or the
//! lease's end, at least `min_retry` apart. A NAK or an ACK for another address is logged
//! as an error and changes nothing: the kernel keeps the address (added without lifetime).
//! Past the lease's end it says once a minute on the console and in the journal that the
//! lease is lost, and keeps asking. /run/ltsp/lease says where things stand.
//!
//! Started by the boot after the network step, like the NBD reconnect helper: it runs
//! from the initramfs, never from the network root, and its argv[0] starts with `@`, so
//! systemd leaves it alone at shutdown.

use super::dhcp::{self, Reply};
use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

/// How often a lost lease is reported (and asked for again).
pub const LOST_EVERY: Duration = Duration::from_secs(60);
/// The shortest lease acted on: a hostile or broken server's 0-second lease must not turn
/// the keeper into a busy loop.
const MIN_LEASE: Duration = Duration::from_secs(4);

/// Where the keeper stands (RFC 2131's client states, and the two it adds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before T1.
    Bound,
    /// T1..T2: asking the server that gave the lease.
    Renewing,
    /// T2..end: asking any server.
    Rebinding,
    /// Past the lease's end: the address is kept, the lease is not.
    Expired,
    /// An infinite lease (0xffffffff): nothing to renew.
    Infinite,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Bound => "bound",
            Phase::Renewing => "renewing",
            Phase::Rebinding => "rebinding",
            Phase::Expired => "expired",
            Phase::Infinite => "infinite",
        }
    }
}

/// A REQUEST to send: to the lease's server, or broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    Renew(Ipv4Addr),
    Rebind,
}

/// What a reply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ACK for our address: the lease runs again from now.
    Renewed { lease_secs: Option<u32> },
    /// ACK after the lease had ended.
    Regained,
    /// ACK for another address: refused, ours kept.
    OtherAddress(Ipv4Addr),
    /// NAK: the server will not extend the lease; the address is kept anyway.
    Refused(Option<Ipv4Addr>),
    /// Not acted on (an OFFER, a reply while nothing was asked, a repeated NAK).
    Ignored,
}

/// The lease's times, checked: T1 < T2 < lease, else RFC 2131's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    /// None: infinite.
    pub lease: Option<Duration>,
    pub t1: Duration,
    pub t2: Duration,
}

impl Times {
    pub fn of(lease_secs: u32, t1: Option<u32>, t2: Option<u32>) -> Times {
        if lease_secs == u32::MAX {
            return Times {
                lease: None,
                t1: Duration::MAX,
                t2: Duration::MAX,
            };
        }
        let lease = Duration::from_secs(lease_secs as u64).max(MIN_LEASE);
        let (d1, d2) = (lease / 2, lease * 7 / 8);
        let secs = |t: Option<u32>| t.map(|t| Duration::from_secs(t as u64));
        let (t1, t2) = match (secs(t1), secs(t2)) {
            (Some(a), Some(b)) if !a.is_zero() && a < b && b < lease => (a, b),
            (Some(a), None) if !a.is_zero() && a < d2 => (a, d2),
            (None, Some(b)) if d1 < b && b < lease => (d1, b),
            _ => (d1, d2),
        };
        Times {
            lease: Some(lease),
            t1,
            t2,
        }
    }
}

/// The renewal logic, without sockets or clocks: times are durations on a monotonic clock
/// (CLOCK_BOOTTIME at run time), given by the caller.
#[derive(Debug, Clone)]
pub struct Keeper {
    pub ip: Ipv4Addr,
    pub server: Option<Ipv4Addr>,
    /// When the lease in force started (the last ACK).
    pub start: Duration,
    pub times: Times,
    /// When the lease was first obtained (the boot's ACK).
    pub obtained: Duration,
    /// When the next REQUEST goes out.
    next_send: Duration,
    /// The transaction of the current renewal: one per cycle, kept by its retransmissions.
    pub xid: u32,
    /// Whether a REQUEST of this transaction is out (replies are ignored otherwise).
    asked: bool,
    /// A NAK was logged since the last REQUEST: a NAK flood costs one line per REQUEST.
    nak_logged: bool,
    pub renewals: u64,
    /// When a lost lease was last reported.
    lost_reported: Option<Duration>,
}

impl Keeper {
    pub fn new(
        ip: Ipv4Addr,
        server: Option<Ipv4Addr>,
        times: Times,
        start: Duration,
        xid: u32,
    ) -> Keeper {
        Keeper {
            ip,
            server,
            start,
            times,
            obtained: start,
            next_send: start.saturating_add(times.t1),
            xid,
            asked: false,
            nak_logged: false,
            renewals: 0,
            lost_reported: None,
        }
    }

    /// When the lease ends; None: never.
    pub fn end(&self) -> Option<Duration> {
        self.times.lease.map(|l| self.start.saturating_add(l))
    }

    pub fn phase(&self, now: Duration) -> Phase {
        let Some(end) = self.end() else {
            return Phase::Infinite;
        };
        if now >= end {
            Phase::Expired
        } else if now >= self.start + self.times.t2 {
            Phase::Rebinding
        } else if now >= self.start + self.times.t1 {
            Phase::Renewing
        } else {
            Phase::Bound
        }
    }

    /// The least time between two REQUESTs: RFC 2131's 60 s, scaled down for leases under
    /// 16 minutes (a 30 s test lease could not be renewed at all otherwise), at least 2 s.
    pub fn min_retry(&self) -> Duration {
        self.times.lease.map_or(Duration::from_secs(60), |l| {
            (l / 16).clamp(Duration::from_secs(2), Duration::from_secs(60))
        })
    }

    /// What to send at `now`, if anything, and when to be called again (a reply may come
    /// in between: [`Keeper::on_reply`]).
    pub fn poll(&mut self, now: Duration) -> (Option<Send>, Duration) {
        let phase = self.phase(now);
        if phase == Phase::Infinite {
            return (None, now.saturating_add(Duration::from_secs(86400)));
        }
        if now < self.next_send {
            return (None, self.next_send);
        }
        let end = self.end().expect("finite");
        let t2 = self.start + self.times.t2;
        let min = self.min_retry();
        // Half the time left until the phase's end, at least `min`, and never past it: the
        // next phase starts on time.
        let (send, next) = match phase {
            Phase::Bound | Phase::Renewing => {
                let send = match self.server {
                    Some(s) => Send::Renew(s),
                    None => Send::Rebind,
                };
                (send, (now + ((t2 - now) / 2).max(min)).min(t2))
            }
            Phase::Rebinding => (Send::Rebind, (now + ((end - now) / 2).max(min)).min(end)),
            Phase::Expired | Phase::Infinite => (Send::Rebind, now + LOST_EVERY),
        };
        // Never twice at one instant.
        self.next_send = next.max(now + Duration::from_millis(1));
        self.asked = true;
        self.nak_logged = false;
        (Some(send), self.next_send)
    }

    /// A lost lease is reported now (true at most once a [`LOST_EVERY`]).
    pub fn report_lost(&mut self, now: Duration) -> bool {
        if self.phase(now) != Phase::Expired {
            self.lost_reported = None;
            return false;
        }
        match self.lost_reported {
            Some(t) if now < t + LOST_EVERY => false,
            _ => {
                self.lost_reported = Some(now);
                true
            }
        }
    }

    /// Acts on a checked reply to our transaction (see [`dhcp::parse_payload`]).
    pub fn on_reply(&mut self, now: Duration, r: Reply, next_xid: u32) -> Outcome {
        if !self.asked {
            return Outcome::Ignored;
        }
        match r {
            Reply::Ack(l) if l.ip == self.ip => {
                let was = self.phase(now);
                let lease_secs = l.lease_secs;
                // RFC 2131 has the lease time in every ACK; without one, the old holds.
                let times = match lease_secs {
                    Some(s) => Times::of(s, l.renew_secs, l.rebind_secs),
                    None => self.times,
                };
                self.times = times;
                self.start = now;
                if l.server_id.is_some() {
                    self.server = l.server_id;
                }
                self.next_send = now.saturating_add(times.t1);
                self.xid = next_xid;
                self.asked = false;
                self.renewals += 1;
                self.lost_reported = None;
                if was == Phase::Expired {
                    Outcome::Regained
                } else {
                    Outcome::Renewed { lease_secs }
                }
            }
            Reply::Ack(l) => Outcome::OtherAddress(l.ip),
            Reply::Nak(from) if !self.nak_logged => {
                self.nak_logged = true;
                Outcome::Refused(from)
            }
            Reply::Nak(_) | Reply::Offer(_) => Outcome::Ignored,
        }
    }
}

/// A monotonic clock (CLOCK_BOOTTIME at run time) and the wall clock (seconds since the
/// epoch), for the lease file.
pub trait Clock {
    fn now(&self) -> Duration;
    fn wall(&self) -> i64;
}

/// Where REQUESTs go and replies come from: a UDP socket on port 68 bound to the boot
/// NIC at run time, a script in tests.
pub trait Transport {
    /// `to`: None broadcasts.
    fn send(&mut self, to: Option<Ipv4Addr>, payload: &[u8]) -> io::Result<()>;
    /// One datagram's UDP payload, or None once `until` (on the clock) has come.
    fn recv(&mut self, buf: &mut [u8], until: Duration) -> io::Result<Option<usize>>;
}

/// What [`step`] did, for the log and the lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Sent(Send),
    Reply(Outcome),
    /// The lease is past its end (reported once a minute).
    Lost,
}

/// The boot NIC's identity, for messages.
#[derive(Debug, Clone)]
pub struct Nic {
    pub iface: String,
    pub mac: [u8; 6],
}

/// One round: sends what is due, then reads replies until the next thing is due or one
/// changed the lease. Returns what happened, in order; `on` hears of each event as it
/// happens (the log and /run/ltsp/lease must not wait for the round's end).
pub fn step<N: Clock + Transport>(
    k: &mut Keeper,
    nic: &Nic,
    n: &mut N,
    xids: &mut dyn FnMut() -> u32,
    on: &mut dyn FnMut(&Keeper, &Event, Duration),
) -> io::Result<Vec<Event>> {
    let mut events = Vec::new();
    let now = n.now();
    if k.report_lost(now) {
        on(k, &Event::Lost, now);
        events.push(Event::Lost);
    }
    let (send, wake) = k.poll(now);
    if let Some(s) = send {
        // Seconds since the renewal began (RFC 2131's `secs`).
        let secs = now
            .saturating_sub(k.start.saturating_add(k.times.t1))
            .as_secs()
            .min(u16::MAX as u64) as u16;
        let payload = dhcp::renew_request(k.xid, &nic.mac, secs, k.ip)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let to = match s {
            Send::Renew(server) => Some(server),
            Send::Rebind => None,
        };
        // A failed send (no route, link down) is like a lost datagram: retried on time.
        if let Err(e) = n.send(to, &payload) {
            log::warn!("lease: {}: sending a REQUEST: {e}", nic.iface);
        }
        on(k, &Event::Sent(s), now);
        events.push(Event::Sent(s));
    }
    let mut buf = [0u8; 1500];
    let mut ignored = 0u32;
    while let Some(len) = n.recv(&mut buf, wake)? {
        match dhcp::parse_payload(&buf[..len], k.xid, &nic.mac) {
            Ok(r) => {
                let o = k.on_reply(n.now(), r, xids());
                if o != Outcome::Ignored {
                    let done = matches!(o, Outcome::Renewed { .. } | Outcome::Regained);
                    let e = Event::Reply(o);
                    on(k, &e, n.now());
                    events.push(e);
                    if done {
                        break;
                    }
                }
            }
            Err(dhcp::Ignored::NotOurs) => {}
            Err(e) => {
                ignored += 1;
                if ignored <= 3 {
                    log::warn!("lease: {}: ignored a reply: {e}", nic.iface);
                }
            }
        }
    }
    Ok(events)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC; civil-from-days, H. Hinnant).
pub fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let s = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// /run/ltsp/lease: KEY=value lines (values need no quoting). Absolute times are the wall
/// clock's now, shifted by the monotonic time since: a clock set by NTP after the boot
/// moves them with it.
pub fn lease_file(k: &Keeper, nic: &Nic, now: Duration, wall: i64) -> String {
    let at = |t: Duration| -> i64 {
        if t >= now {
            wall.saturating_add((t - now).as_secs() as i64)
        } else {
            wall.saturating_sub((now - t).as_secs() as i64)
        }
    };
    let mut s = format!(
        "IFACE={}\nADDRESS={}\nSERVER={}\nSTATE={}\nRENEWALS={}\n",
        nic.iface,
        k.ip,
        k.server.map_or("-".into(), |s| s.to_string()),
        k.phase(now).name(),
        k.renewals
    );
    let mut time = |key: &str, t: Option<Duration>| match t {
        Some(t) => {
            let e = at(t);
            s.push_str(&format!("{key}={}\n{key}_EPOCH={e}\n", utc(e)));
        }
        None => s.push_str(&format!("{key}=never\n{key}_EPOCH=-\n")),
    };
    time("OBTAINED", Some(k.obtained));
    time("RENEWED", Some(k.start));
    time("EXPIRES", k.end());
    s.push_str(&format!(
        "LEASE_SECS={}\n",
        k.times
            .lease
            .map_or("infinite".into(), |l| l.as_secs().to_string())
    ));
    s
}

/// Writes `text` as `name` in the directory `dir`, atomically: a temporary file, then
/// rename. `dir` is a descriptor: after the switch the keeper's / is the old initramfs,
/// and /run is reachable only through the directory the boot opened for it.
pub fn write_atomic(dir: std::os::fd::BorrowedFd, name: &str, text: &str) -> io::Result<()> {
    use nix::fcntl::{openat, renameat, OFlag};
    use nix::sys::stat::Mode;
    let tmp = format!(".{name}.tmp");
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let d = Some(dir.as_raw_fd());
    let fd = openat(
        d,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    io::Write::write_all(&mut f, text.as_bytes())?;
    drop(f);
    renameat(d, tmp.as_str(), d, name)?;
    Ok(())
}

/// What the boot tells the keeper (`ltsp-agent lease-keep`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub iface: String,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub server: Option<Ipv4Addr>,
    pub lease_secs: u32,
    pub t1: Option<u32>,
    pub t2: Option<u32>,
    /// CLOCK_BOOTTIME, in milliseconds, when the lease was obtained.
    pub obtained_ms: u64,
    /// Inherited descriptors: /run/ltsp (a directory), /dev/console, /dev/kmsg.
    pub run_fd: Option<i32>,
    pub console_fd: Option<i32>,
    pub kmsg_fd: Option<i32>,
    /// The console log level the boot read (the keeper may have no /proc).
    pub console_level: Option<u8>,
}

impl Params {
    pub fn to_args(&self) -> Vec<String> {
        let mac = self
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let mut a = vec![
            "lease-keep".to_string(),
            format!("--iface={}", self.iface),
            format!("--mac={mac}"),
            format!("--ip={}", self.ip),
            format!("--lease-secs={}", self.lease_secs),
            format!("--obtained-ms={}", self.obtained_ms),
        ];
        for (k, v) in [
            ("server", self.server.map(|s| s.to_string())),
            ("t1", self.t1.map(|t| t.to_string())),
            ("t2", self.t2.map(|t| t.to_string())),
            ("run-fd", self.run_fd.map(|t| t.to_string())),
            ("console-fd", self.console_fd.map(|t| t.to_string())),
            ("kmsg-fd", self.kmsg_fd.map(|t| t.to_string())),
            ("console-level", self.console_level.map(|t| t.to_string())),
        ] {
            if let Some(v) = v {
                a.push(format!("--{k}={v}"));
            }
        }
        a
    }

    fn fds(&self) -> Vec<i32> {
        [self.run_fd, self.console_fd, self.kmsg_fd]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut b = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?}: not a MAC address"));
    }
    for (i, p) in parts.iter().enumerate() {
        b[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: not a MAC address"))?;
    }
    Ok(b)
}

/// CLOCK_BOOTTIME: monotonic, counts suspend, shared by every process (the boot's
/// `obtained_ms` is on it).
pub fn boottime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Starts the keeper from the boot when the address came from DHCP with a finite lease
/// (a static address, or a lease without a time or an infinite one, has nothing to renew).
pub fn start_keeper(sys: &dyn crate::system::System, info: &super::NetInfo, run: &str) {
    let l = &info.lease;
    let lease_secs = match l.lease_secs {
        Some(s) if info.proto == "dhcp" && s != u32::MAX => s,
        _ => return,
    };
    let dir = format!("{run}/ltsp");
    let _ = std::fs::create_dir_all(&dir);
    // Opened now: the keeper may first run after the switch, with /run out of its reach.
    let run_dir = std::fs::File::open(&dir)
        .map_err(|e| log::warn!("lease: {dir}: {e}; /run/ltsp/lease will not be written"))
        .ok();
    let (console, kmsg) = crate::log::raw_fds();
    let p = Params {
        iface: info.iface.clone(),
        mac: super::mac_bytes(&info.mac),
        ip: l.ip,
        server: l.server_id,
        lease_secs,
        t1: l.renew_secs,
        t2: l.rebind_secs,
        obtained_ms: boottime().as_millis() as u64,
        run_fd: run_dir.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
        console_fd: console,
        kmsg_fd: kmsg,
        console_level: crate::log::console_level(),
    };
    match sys.spawn("@ltsp-lease", &p.to_args(), &p.fds()) {
        Ok(pid) => log::info!(
            "lease: keeper started (pid {pid}): {} on {} for {lease_secs} s",
            l.ip,
            info.iface
        ),
        Err(e) => log::error!(
            "lease: keeper not started: {e}; the lease of {} will not be renewed",
            l.ip
        ),
    }
}

/// The real clocks.
struct SysClock;

impl Clock for SysClock {
    fn now(&self) -> Duration {
        boottime()
    }
    fn wall(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

/// A UDP socket on port 68 bound to the boot NIC: the kernel's stack now has the address,
/// so no packet socket (which would copy every frame the NIC sees, NBD included).
struct Udp {
    sock: std::net::UdpSocket,
}

impl Udp {
    fn open(iface: &str) -> io::Result<Udp> {
        use nix::sys::socket::{setsockopt, sockopt};
        let s = bind_port_68(iface)?;
        setsockopt(&s, sockopt::Broadcast, &true)?;
        Ok(Udp { sock: s })
    }
}

/// A UDP socket bound to 0.0.0.0:68 on `iface` only (SO_BINDTODEVICE before bind, and
/// SO_REUSEADDR so a DHCP client in the image cannot lock the keeper out, nor it them).
fn bind_port_68(iface: &str) -> io::Result<std::net::UdpSocket> {
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
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface))?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(0, 0, 0, 0, 68),
    )?;
    Ok(std::net::UdpSocket::from(fd))
}

impl Transport for Udp {
    fn send(&mut self, to: Option<Ipv4Addr>, payload: &[u8]) -> io::Result<()> {
        let to = to.unwrap_or(Ipv4Addr::BROADCAST);
        self.sock.send_to(payload, (to, 67)).map(drop)
    }
    fn recv(&mut self, buf: &mut [u8], until: Duration) -> io::Result<Option<usize>> {
        let left = until.saturating_sub(boottime());
        if left.is_zero() {
            return Ok(None);
        }
        self.sock.set_read_timeout(Some(left))?;
        match self.sock.recv_from(buf) {
            Ok((n, _)) => Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

struct Real {
    udp: Udp,
}

impl Clock for Real {
    fn now(&self) -> Duration {
        SysClock.now()
    }
    fn wall(&self) -> i64 {
        SysClock.wall()
    }
}

impl Transport for Real {
    fn send(&mut self, to: Option<Ipv4Addr>, payload: &[u8]) -> io::Result<()> {
        self.udp.send(to, payload)
    }
    fn recv(&mut self, buf: &mut [u8], until: Duration) -> io::Result<Option<usize>> {
        self.udp.recv(buf, until)
    }
}

/// A transaction id no other client guesses: the standard library's per-process random
/// hash keys (the kernel's CRNG is seeded long before T1).
fn random_xid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(boottime().as_nanos() as u64);
    h.finish() as u32
}

/// Logs an event.
fn log_event(e: &Event, k: &Keeper, nic: &Nic, now: Duration) {
    {
        match e {
            Event::Sent(Send::Renew(s)) => {
                log::debug!("lease: {}: REQUEST {} to {s} (renewing)", nic.iface, k.ip)
            }
            Event::Sent(Send::Rebind) => log::debug!(
                "lease: {}: REQUEST {} broadcast ({})",
                nic.iface,
                k.ip,
                k.phase(now).name()
            ),
            Event::Reply(Outcome::Renewed { .. }) => log::info!(
                "lease: {}: renewed {} with {} for {} s (renewal {})",
                nic.iface,
                k.ip,
                k.server.map_or("-".into(), |s| s.to_string()),
                k.times.lease.map_or(0, |l| l.as_secs()),
                k.renewals
            ),
            Event::Reply(Outcome::Regained) => log::error!(
                "lease: {}: {} leased again by {} after it had expired",
                nic.iface,
                k.ip,
                k.server.map_or("-".into(), |s| s.to_string())
            ),
            Event::Reply(Outcome::OtherAddress(ip)) => log::error!(
                "lease: {}: a server offered {ip} instead of {}: refused; the root runs on {} and keeps it",
                nic.iface,
                k.ip,
                k.ip
            ),
            Event::Reply(Outcome::Refused(from)) => log::error!(
                "lease: {}: {} refused to extend the lease of {} (NAK); the address is kept, the root depends on it",
                nic.iface,
                from.map_or("a server".into(), |s| s.to_string()),
                k.ip
            ),
            Event::Reply(Outcome::Ignored) => {}
            Event::Lost => log::error!(
                "lease: {}: the DHCP lease of {} has expired and no server renews it: \
                 the address is kept, but the DHCP server may give it to another host",
                nic.iface,
                k.ip
            ),
        }
    }
}

/// The keeper's loop: never returns unless its socket cannot be opened or read.
pub fn run(p: Params) -> io::Result<()> {
    let run_dir = p.run_fd.and_then(|fd| {
        crate::system::adopt_inherited(fd, nix::libc::S_IFDIR, "directory")
            .map_err(|e| log::warn!("lease: --run-fd={fd}: {e}; /run/ltsp/lease not written"))
            .ok()
    });
    if let Err(e) = crate::system::set_scheduler(nix::libc::SCHED_OTHER) {
        log::warn!("lease: leaving SCHED_IDLE: {e}");
    }
    let nic = Nic {
        iface: p.iface.clone(),
        mac: p.mac,
    };
    let udp = Udp::open(&p.iface)
        .map_err(|e| io::Error::new(e.kind(), format!("UDP port 68 on {}: {e}", p.iface)))?;
    let mut net = Real { udp };
    let mut k = Keeper::new(
        p.ip,
        p.server,
        Times::of(p.lease_secs, p.t1, p.t2),
        Duration::from_millis(p.obtained_ms),
        random_xid(),
    );
    log::info!(
        "lease: keeping {} on {} (server {}, lease {} s, T1 {} s, T2 {} s)",
        k.ip,
        nic.iface,
        k.server.map_or("-".into(), |s| s.to_string()),
        k.times.lease.map_or(0, |l| l.as_secs()),
        k.times.t1.as_secs(),
        k.times.t2.as_secs()
    );
    let mut last_phase = None;
    let mut write = |k: &Keeper, now: Duration, force: bool| {
        let phase = k.phase(now);
        if force || last_phase != Some(phase) {
            last_phase = Some(phase);
            if let Some(d) = &run_dir {
                use std::os::fd::AsFd;
                let text = lease_file(k, &nic, now, SysClock.wall());
                if let Err(e) = write_atomic(d.as_fd(), "lease", &text) {
                    log::warn!("lease: writing /run/ltsp/lease: {e}");
                }
            }
        }
    };
    write(&k, net.now(), true);
    // The file first: whoever reads a line of the log finds the file saying as much.
    let mut on = |k: &Keeper, e: &Event, now: Duration| {
        let renewed = matches!(e, Event::Reply(Outcome::Renewed { .. } | Outcome::Regained));
        write(k, now, renewed);
        log_event(e, k, &nic, now);
    };
    loop {
        step(&mut k, &nic, &mut net, &mut random_xid, &mut on)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dhcp::Lease;
    use std::collections::VecDeque;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    fn ack(ip: Ipv4Addr, server: Ipv4Addr, lease: u32) -> Reply {
        Reply::Ack(Lease {
            ip,
            server_id: Some(server),
            lease_secs: Some(lease),
            ..Default::default()
        })
    }

    #[test]
    fn times_default_to_half_and_seven_eighths_and_refuse_nonsense() {
        let t = Times::of(3600, None, None);
        assert_eq!((t.t1, t.t2), (s(1800.0), s(3150.0)));
        let t = Times::of(3600, Some(600), Some(1200));
        assert_eq!((t.t1, t.t2), (s(600.0), s(1200.0)));
        // T1 after T2, T2 past the lease, zero: the defaults.
        for (a, b) in [
            (Some(2000), Some(1000)),
            (None, Some(4000)),
            (Some(0), None),
        ] {
            let t = Times::of(3600, a, b);
            assert_eq!((t.t1, t.t2), (s(1800.0), s(3150.0)), "{a:?} {b:?}");
        }
        assert_eq!(Times::of(u32::MAX, None, None).lease, None, "infinite");
        assert_eq!(
            Times::of(0, None, None).lease,
            Some(MIN_LEASE),
            "no busy loop"
        );
    }

    #[test]
    fn renewing_unicasts_at_t1_rebinding_broadcasts_at_t2_retries_halve_the_time_left() {
        // An hour's lease obtained at 100 s: T1 at 1900, T2 at 3250, end at 3700.
        let mut k = Keeper::new(IP, Some(SERVER), Times::of(3600, None, None), s(100.0), 7);
        assert_eq!(k.min_retry(), s(60.0), "RFC 2131's minimum for real leases");
        assert_eq!(k.poll(s(500.0)), (None, s(1900.0)));
        assert_eq!(k.phase(s(1900.0)), Phase::Renewing);
        let mut sent = Vec::new();
        let mut now = s(1900.0);
        while now < s(3800.0) {
            let (what, next) = k.poll(now);
            if let Some(w) = what {
                sent.push((now.as_secs_f64(), w));
            }
            now = next;
        }
        let want = vec![
            // Renewing: half the time to T2 (1350 s), then halves, then the 60 s floor,
            // cut at T2.
            (1900.0, Send::Renew(SERVER)),
            (2575.0, Send::Renew(SERVER)),
            (2912.5, Send::Renew(SERVER)),
            (3081.25, Send::Renew(SERVER)),
            (3165.625, Send::Renew(SERVER)),
            (3225.625, Send::Renew(SERVER)),
            // Rebinding: half the time to the end (450 s), then halves, floor 60 s.
            (3250.0, Send::Rebind),
            (3475.0, Send::Rebind),
            (3587.5, Send::Rebind),
            (3647.5, Send::Rebind),
            // Expired: asked again once a minute.
            (3700.0, Send::Rebind),
            (3760.0, Send::Rebind),
        ];
        assert_eq!(sent, want);
        assert_eq!(k.phase(s(3700.0)), Phase::Expired);
    }

    #[test]
    fn a_short_test_lease_is_renewed_with_scaled_retries() {
        // 30 s: T1 15, T2 26.25; the floor is 2 s.
        let mut k = Keeper::new(IP, Some(SERVER), Times::of(30, None, None), s(0.0), 7);
        assert_eq!(k.min_retry(), s(2.0));
        let mut at = Vec::new();
        let mut now = s(15.0);
        while now < s(30.0) {
            let (what, next) = k.poll(now);
            if what.is_some() {
                at.push((now.as_secs_f64() * 1000.0).round() / 1000.0);
            }
            now = next;
        }
        assert_eq!(at, vec![15.0, 20.625, 23.438, 25.438, 26.25, 28.25]);
    }

    #[test]
    fn an_ack_restarts_the_lease_and_takes_the_new_times_and_server() {
        let mut k = Keeper::new(IP, Some(SERVER), Times::of(100, None, None), s(0.0), 7);
        assert_eq!(
            k.on_reply(s(1.0), ack(IP, SERVER, 100), 8),
            Outcome::Ignored,
            "nothing asked yet"
        );
        let (what, _) = k.poll(s(90.0));
        assert_eq!(what, Some(Send::Rebind), "T2 passed: any server");
        // Another server answers the broadcast, with a longer lease and its own T1.
        let mut l = Lease {
            ip: IP,
            server_id: Some(OTHER),
            lease_secs: Some(1000),
            renew_secs: Some(100),
            ..Default::default()
        };
        l.rebind_secs = Some(900);
        assert_eq!(
            k.on_reply(s(91.0), Reply::Ack(l), 8),
            Outcome::Renewed {
                lease_secs: Some(1000)
            }
        );
        assert_eq!(
            (k.start, k.server, k.xid, k.renewals),
            (s(91.0), Some(OTHER), 8, 1)
        );
        assert_eq!(k.end(), Some(s(1091.0)));
        assert_eq!(k.poll(s(92.0)), (None, s(191.0)));
        assert_eq!(k.poll(s(191.0)).0, Some(Send::Renew(OTHER)));
        // A second copy of the ACK (old xid) would not parse as ours; one of the new
        // transaction before any REQUEST is ignored.
    }

    #[test]
    fn a_nak_or_another_address_keeps_the_address_and_the_schedule() {
        let mut k = Keeper::new(IP, Some(SERVER), Times::of(100, None, None), s(0.0), 7);
        let (_, next) = k.poll(s(50.0));
        assert_eq!(
            k.on_reply(s(50.5), Reply::Nak(Some(SERVER)), 8),
            Outcome::Refused(Some(SERVER))
        );
        // A flood of NAKs is one error per REQUEST.
        for _ in 0..100 {
            assert_eq!(
                k.on_reply(s(50.6), Reply::Nak(Some(SERVER)), 8),
                Outcome::Ignored
            );
        }
        assert_eq!(
            k.on_reply(s(50.7), ack(Ipv4Addr::new(192, 0, 2, 99), SERVER, 100), 8),
            Outcome::OtherAddress(Ipv4Addr::new(192, 0, 2, 99))
        );
        assert_eq!((k.ip, k.start, k.renewals, k.xid), (IP, s(0.0), 0, 7));
        assert_eq!(
            k.poll(s(51.0)),
            (None, next),
            "retried on the same schedule"
        );
        let (_, _) = k.poll(next);
        assert_eq!(
            k.on_reply(next, Reply::Nak(None), 8),
            Outcome::Refused(None),
            "one line again for the next REQUEST"
        );
    }

    #[test]
    fn a_lost_lease_is_reported_once_a_minute_and_regained_by_an_ack() {
        let mut k = Keeper::new(IP, Some(SERVER), Times::of(30, None, None), s(0.0), 7);
        assert!(!k.report_lost(s(29.0)));
        let reported: Vec<u64> = (30..200)
            .filter(|&t| k.report_lost(s(t as f64)))
            .map(|t| t as u64)
            .collect();
        assert_eq!(reported, vec![30, 90, 150]);
        k.poll(s(200.0));
        assert_eq!(
            k.on_reply(s(201.0), ack(IP, SERVER, 30), 9),
            Outcome::Regained
        );
        assert_eq!(k.phase(s(202.0)), Phase::Bound);
        assert!(!k.report_lost(s(202.0)));
    }

    /// How the fake server answers a REQUEST of transaction `xid`.
    type Answer = fn(u32) -> Vec<u8>;

    /// A DHCP server on a fake network with a fake clock: answers the REQUESTs it is
    /// scripted to answer, after a delay; `recv` moves the clock.
    struct FakeNet {
        now: Duration,
        /// What the server does with the n-th REQUEST: None drops it.
        answers: VecDeque<Option<Answer>>,
        inbox: VecDeque<(Duration, Vec<u8>)>,
        sent: Vec<(f64, Option<Ipv4Addr>, u32, Ipv4Addr, bool)>,
    }

    impl Clock for FakeNet {
        fn now(&self) -> Duration {
            self.now
        }
        fn wall(&self) -> i64 {
            1_800_000_000 + self.now.as_secs() as i64
        }
    }

    impl Transport for FakeNet {
        fn send(&mut self, to: Option<Ipv4Addr>, payload: &[u8]) -> io::Result<()> {
            use dhcproto::{v4::Message, Decodable};
            let m = Message::from_bytes(payload).unwrap();
            assert_eq!(
                m.opts().msg_type(),
                Some(dhcproto::v4::MessageType::Request)
            );
            assert_eq!(&m.chaddr()[..6], &MAC);
            assert!(
                m.opts()
                    .get(dhcproto::v4::OptionCode::RequestedIpAddress)
                    .is_none()
                    && m.opts()
                        .get(dhcproto::v4::OptionCode::ServerIdentifier)
                        .is_none(),
                "RFC 2131 4.3.2: neither in RENEWING or REBINDING"
            );
            self.sent.push((
                self.now.as_secs_f64(),
                to,
                m.xid(),
                m.ciaddr(),
                m.flags().broadcast(),
            ));
            if let Some(Some(make)) = self.answers.pop_front() {
                self.inbox.push_back((self.now + s(0.01), make(m.xid())));
            }
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8], until: Duration) -> io::Result<Option<usize>> {
            match self.inbox.front() {
                Some((at, _)) if *at <= until => {
                    let (at, b) = self.inbox.pop_front().unwrap();
                    self.now = self.now.max(at);
                    buf[..b.len()].copy_from_slice(&b);
                    Ok(Some(b.len()))
                }
                _ => {
                    self.now = self.now.max(until);
                    Ok(None)
                }
            }
        }
    }

    /// An encoded reply from SERVER to MAC.
    fn wire(kind: dhcproto::v4::MessageType, xid: u32, yiaddr: Ipv4Addr, lease: u32) -> Vec<u8> {
        use dhcproto::v4::{DhcpOption, Message, Opcode};
        use dhcproto::Encodable;
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            yiaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        m.set_opcode(Opcode::BootReply);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        m.opts_mut().insert(DhcpOption::AddressLeaseTime(lease));
        m.to_vec().unwrap()
    }

    fn ack30(xid: u32) -> Vec<u8> {
        wire(dhcproto::v4::MessageType::Ack, xid, IP, 30)
    }
    fn nak(xid: u32) -> Vec<u8> {
        wire(
            dhcproto::v4::MessageType::Nak,
            xid,
            Ipv4Addr::UNSPECIFIED,
            0,
        )
    }
    fn other(xid: u32) -> Vec<u8> {
        wire(
            dhcproto::v4::MessageType::Ack,
            xid,
            Ipv4Addr::new(192, 0, 2, 77),
            30,
        )
    }
    fn garbage(xid: u32) -> Vec<u8> {
        // Our transaction, but hlen 200: refused by the checks before dhcproto.
        let mut b = ack30(xid);
        b[2] = 200;
        b
    }
    fn wrong_xid(xid: u32) -> Vec<u8> {
        ack30(xid ^ 1)
    }

    #[test]
    fn the_loop_renews_over_a_network_that_drops_refuses_and_lies() {
        let nic = Nic {
            iface: "ens3".into(),
            mac: MAC,
        };
        let mut net = FakeNet {
            now: s(0.0),
            answers: VecDeque::from([
                Some(ack30 as Answer), // 15 s: renewed at once
                None,                  // 30.01: lost
                Some(garbage),         // retry: a malformed reply
                Some(wrong_xid),       // another transaction's ACK
                Some(other),           // an ACK for another address
                Some(nak),             // T2: broadcast, NAK
                Some(ack30),           // then an ACK
            ]),
            inbox: VecDeque::new(),
            sent: Vec::new(),
        };
        let mut k = Keeper::new(IP, Some(SERVER), Times::of(30, None, None), s(0.0), 100);
        let mut next_xid = 200;
        let mut xids = || {
            next_xid += 1;
            next_xid
        };
        let mut events = Vec::new();
        while net.now < s(55.0) {
            let mut heard = Vec::new();
            let got = step(&mut k, &nic, &mut net, &mut xids, &mut |_, e, _| {
                heard.push(e.clone())
            })
            .unwrap();
            assert_eq!(got, heard, "each event told as it happened");
            events.extend(got);
        }
        let want = [
            (15.0, Some(SERVER), 100),
            // Renewed at 15.01 with a new transaction: T1 at 30.01, T2 at 41.26.
            (30.01, Some(SERVER), 201),
            (35.635, Some(SERVER), 201),
            (38.4475, Some(SERVER), 201),
            (40.4475, Some(SERVER), 201),
            (41.26, None, 201),
            (43.26, None, 201),
        ];
        assert_eq!(net.sent.len(), want.len(), "{:?}", net.sent);
        for (&(t, to, xid, ciaddr, bcast), &(wt, wto, wxid)) in net.sent.iter().zip(&want) {
            assert!(
                (t - wt).abs() < 1e-6 && to == wto && xid == wxid,
                "{:?}",
                net.sent
            );
            assert_eq!(ciaddr, IP, "ciaddr is the address in use");
            assert!(!bcast, "the node receives unicast");
        }
        assert_eq!(
            events
                .iter()
                .filter(|e| !matches!(e, Event::Sent(_)))
                .cloned()
                .collect::<Vec<_>>(),
            vec![
                Event::Reply(Outcome::Renewed {
                    lease_secs: Some(30)
                }),
                Event::Reply(Outcome::OtherAddress(Ipv4Addr::new(192, 0, 2, 77))),
                Event::Reply(Outcome::Refused(Some(SERVER))),
                Event::Reply(Outcome::Renewed {
                    lease_secs: Some(30)
                }),
            ]
        );
        assert_eq!((k.ip, k.renewals), (IP, 2));
        assert!((k.start.as_secs_f64() - 43.27).abs() < 1e-6);
        // The file says so, in absolute and epoch times.
        // The loop stopped at 58.27, T1 of the last lease.
        let f = lease_file(&k, &nic, net.now, net.wall());
        for want in [
            "ADDRESS=192.0.2.50\n",
            "SERVER=192.0.2.1\n",
            "STATE=renewing\n",
            "RENEWALS=2\n",
            "OBTAINED_EPOCH=1800000000\n",
            "OBTAINED=2027-01-15T08:00:00Z\n",
            "EXPIRES_EPOCH=1800000073\n",
            "LEASE_SECS=30\n",
        ] {
            assert!(f.contains(want), "{want} in\n{f}");
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn the_lease_file_is_replaced_whole_in_the_inherited_directory() {
        use std::os::fd::AsFd;
        let d = tempfile::tempdir().unwrap();
        let dir = std::fs::File::open(d.path()).unwrap();
        write_atomic(dir.as_fd(), "lease", "A=1\n").unwrap();
        write_atomic(dir.as_fd(), "lease", "A=2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("lease")).unwrap(),
            "A=2\n"
        );
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["lease"], "no temporary file left");
    }

    #[test]
    fn the_boot_starts_the_keeper_only_for_a_finite_dhcp_lease() {
        use crate::system::Recorder;
        let d = tempfile::tempdir().unwrap();
        let run = d.path().display().to_string();
        let mut info = crate::net::NetInfo {
            iface: "ens3".into(),
            mac: "52:54:00:12:34:56".into(),
            proto: "dhcp",
            lease: Lease {
                ip: IP,
                server_id: Some(SERVER),
                lease_secs: Some(30),
                renew_secs: Some(10),
                ..Default::default()
            },
            ..Default::default()
        };
        let sys = Recorder::default();
        start_keeper(&sys, &info, &run);
        let calls = sys.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        let c = &calls[0];
        assert!(
            c.starts_with(
                "spawn @ltsp-lease lease-keep --iface=ens3 --mac=52:54:00:12:34:56 --ip=192.0.2.50 \
                 --lease-secs=30 --obtained-ms="
            ) && c.contains(" --server=192.0.2.1 --t1=10 --run-fd="),
            "{c}"
        );
        // The directory it keeps is /run/ltsp.
        let kept = sys.kept.lock().unwrap().pop().unwrap();
        let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&kept)).unwrap();
        assert_eq!(st.st_mode & nix::libc::S_IFMT, nix::libc::S_IFDIR);
        for (proto, secs) in [("none", Some(30)), ("dhcp", None), ("dhcp", Some(u32::MAX))] {
            info.proto = proto;
            info.lease.lease_secs = secs;
            let sys = Recorder::default();
            start_keeper(&sys, &info, &run);
            assert!(sys.calls().is_empty(), "{proto} {secs:?}");
        }
    }

    #[test]
    fn args_round_trip_through_the_mac_parser() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Ok(MAC));
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:zz").is_err());
    }
}
