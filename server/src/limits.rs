//! Limits: one misbehaving or hostile address cannot take every slot, and HTTP or TFTP
//! cannot take the descriptors NBD (the nodes' roots) needs to accept.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counts what each client address holds open, up to `max` each (0: no limit).
pub struct PerClient {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot of one client; given back when dropped.
pub struct Slot {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerClient {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            ip,
        })
    }

    pub fn held_by(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Descriptors for everything but connections: listeners, the runtime, images being
/// hashed, DHCP sockets, and NBD's pipes for large READs with the /dev/null they empty
/// into.
pub const FDS_BASE: u64 = 64 + 2 * crate::nbd::PIPES as u64 + 1;
/// An NBD connection holds its socket and its own handle on the image.
pub const FDS_PER_NBD: u64 = 2;
/// An HTTP connection or a TFTP transfer holds a socket and the file it sends.
pub const FDS_PER_SLOT: u64 = 2;
/// HTTP and TFTP always get at least this many slots, even when NBD's reserve cannot be
/// kept whole.
const MIN_SLOTS: u64 = 16;

/// The descriptor limit (RLIMIT_NOFILE) before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft descriptor limit to the hard one (an unlimited hard limit means the
/// kernel's fs.nr_open). Connections are many and cheap; select() is never used.
pub fn raise_nofile() -> std::io::Result<Nofile> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let nr_open = || {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    };
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or_else(nr_open);
    let soft_before = now.current.unwrap_or(hard);
    if soft_before < hard {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: now.maximum,
            },
        )?;
    }
    let after = getrlimit(Resource::Nofile);
    Ok(Nofile {
        soft_before,
        soft: after.current.unwrap_or(hard),
        hard,
    })
}

/// How a descriptor limit is shared: NBD's reserve, and slots for HTTP and TFTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdPlan {
    /// Descriptors kept back for NBD and the base.
    pub reserve: u64,
    /// HTTP connections and TFTP transfers at once, together.
    pub slots: usize,
    /// False when the limit is too low to keep the whole reserve: NBD accepts may then
    /// fail once HTTP and TFTP use all their slots.
    pub covered: bool,
}

impl FdPlan {
    pub fn new(limit: u64, nbd_max_connections: usize) -> FdPlan {
        let reserve =
            FDS_BASE.saturating_add(FDS_PER_NBD.saturating_mul(nbd_max_connections as u64));
        let rest = limit.saturating_sub(reserve);
        if rest >= MIN_SLOTS * FDS_PER_SLOT {
            FdPlan {
                reserve,
                slots: usize::try_from(rest / FDS_PER_SLOT).unwrap_or(usize::MAX),
                covered: true,
            }
        } else {
            // Half of what the base leaves: NBD keeps the other half.
            let slots = (limit.saturating_sub(FDS_BASE) / 2 / FDS_PER_SLOT).max(1);
            FdPlan {
                reserve: limit.saturating_sub(slots * FDS_PER_SLOT),
                slots: slots as usize,
                covered: false,
            }
        }
    }
}

/// The descriptors HTTP connections and TFTP transfers may hold, as slots; NBD is not
/// counted here: what is left over is its reserve.
pub struct Descriptors {
    max: usize,
    used: AtomicUsize,
}

/// One slot of the pool; given back when dropped.
pub struct FdSlot {
    owner: Arc<Descriptors>,
}

impl Descriptors {
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Descriptors {
            max: slots,
            used: AtomicUsize::new(0),
        })
    }

    /// A slot, or None when the pool is used up (never waits).
    pub fn try_acquire(self: &Arc<Self>) -> Option<FdSlot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(FdSlot {
            owner: self.clone(),
        })
    }

    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for FdSlot {
    fn drop(&mut self) {
        self.owner.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The note a rate-limited line carries about the lines left out before it.
pub fn suppressed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar lines suppressed)")
    }
}

/// At most `per_sec` log lines a second from one source of lines a flood could trigger
/// (a hostile client must not turn into a flood of log lines); the rest are counted and
/// reported with the next line let through.
pub struct LogLimit {
    per_sec: u32,
    /// (second of the window, lines let through in it, lines suppressed since the last).
    state: Mutex<(u64, u32, u64)>,
}

impl LogLimit {
    pub const fn new(per_sec: u32) -> Self {
        LogLimit {
            per_sec,
            state: Mutex::new((0, 0, 0)),
        }
    }

    /// Some(n): log this line, saying that `n` were suppressed before it; None: skip it.
    pub fn allow(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 != now {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 >= self.per_sec {
            s.2 += 1;
            return None;
        }
        s.1 += 1;
        Some(std::mem::take(&mut s.2))
    }
}

/// Bytes written to a TCP socket and not yet sent. The kernel would otherwise queue up to
/// `tcp_wmem` (4 MiB) per connection: thousands of connections that never read then take
/// all of the host's TCP memory, and under that pressure every socket, a real node's too,
/// stalls. What is sent but not yet acknowledged is bounded by the client's window and
/// the send buffer; for a client that stops acknowledging, by time: see
/// [`bound_kernel_queues`].
pub const UNSENT_BYTES: u32 = 64 * 1024;
/// The receive buffer of NBD and HTTP sockets: requests are small (NBD's are 28 bytes and
/// WRITE is refused; HTTP headers are capped at 16 KiB), and a client that sends faster
/// than it takes replies fills this much of the kernel's memory, not `tcp_rmem` (32 MiB).
/// Writable exports, if ever added, would want more: this allows ~16 KiB per round trip.
pub const RECEIVE_BUFFER: usize = 16 * 1024;

/// Bounds what the kernel holds for one accepted connection: [`UNSENT_BYTES`] unsent,
/// [`RECEIVE_BUFFER`] received, and unacknowledged data for at most `write_timeout`
/// (TCP_USER_TIMEOUT: the kernel aborts a connection whose data stays unacknowledged that
/// long, which keepalive and our own write timeout cannot see while the kernel retransmits).
pub fn bound_kernel_queues(stream: &tokio::net::TcpStream, what: &str, write_timeout: Duration) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let s = socket2::SockRef::from(stream);
    let r = s
        .set_tcp_notsent_lowat(UNSENT_BYTES)
        .map_err(|e| ("TCP_NOTSENT_LOWAT", e))
        .and_then(|_| {
            s.set_recv_buffer_size(RECEIVE_BUFFER)
                .map_err(|e| ("SO_RCVBUF", e))
        })
        .and_then(|_| {
            s.set_tcp_user_timeout(Some(write_timeout))
                .map_err(|e| ("TCP_USER_TIMEOUT", e))
        });
    // Once: a kernel or sandbox that refuses these must not go unnoticed, nor flood the log.
    if let Err((opt, e)) = r {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::warn!("{what}: setting {opt} on accepted sockets failed: {e}; the host's TCP memory is not bounded against clients that do not read");
        }
    }
}

/// Asked of `listen(2)`; the kernel caps it at `net.core.somaxconn` (4,096 on current
/// kernels). tokio's `TcpListener::bind` asks 1,024: a fleet of 1,000 booting at once
/// opens up to 2,000 NBD connections within a second, and connections past the backlog
/// wait for SYN retransmits (1 s, 3 s, 7 s...) or fail.
pub const LISTEN_BACKLOG: i32 = 65_535;

/// A listening TCP socket on `addr` with the longest backlog the host allows, as tokio's
/// `bind` would make it otherwise (SO_REUSEADDR, non-blocking).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(LISTEN_BACKLOG)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Closes with a reset instead of a FIN: the kernel then frees the connection's queued
/// bytes at once, instead of retransmitting them to a client that takes nothing.
pub fn reset_on_close(stream: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection of a burst larger than tokio's backlog (1,024) completes its
    /// handshake at once while nothing accepts: the kernel holds them all.
    #[tokio::test]
    async fn the_listen_backlog_holds_a_fleets_burst_of_connections() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let burst = 1_500;
        assert!(
            somaxconn > burst,
            "net.core.somaxconn is {somaxconn}: this host caps every listen backlog below a fleet's burst"
        );
        // Two descriptors per connection in this process (the held end, then the accepted).
        let _ = raise_nofile();
        let l = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..burst {
            let c =
                tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                    .await;
            match c {
                Ok(Ok(c)) => held.push(c),
                _ => panic!("connection {i} of {burst} did not complete while none was accepted"),
            }
        }
        let (first, _) = l.accept().await.unwrap();
        assert_eq!(first.peer_addr().unwrap(), held[0].local_addr().unwrap());
    }

    #[tokio::test]
    async fn accepted_sockets_get_the_kernel_queue_bounds() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (c, a) = tokio::join!(c, l.accept());
        let (_c, (a, _)) = (c.unwrap(), a.unwrap());
        bound_kernel_queues(&a, "test", Duration::from_secs(30));
        let s = socket2::SockRef::from(&a);
        assert_eq!(s.tcp_notsent_lowat().unwrap(), UNSENT_BYTES);
        // The kernel doubles SO_RCVBUF for its bookkeeping.
        assert_eq!(s.recv_buffer_size().unwrap(), 2 * RECEIVE_BUFFER);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(30)));
        reset_on_close(&a);
        assert_eq!(s.linger().unwrap(), Some(Duration::ZERO));
    }

    #[test]
    fn each_client_gets_at_most_max_and_slots_come_back() {
        let l = PerClient::new(2);
        let a: IpAddr = "192.0.2.10".parse().unwrap();
        let b: IpAddr = "192.0.2.11".parse().unwrap();
        let s1 = l.try_acquire(a).unwrap();
        let _s2 = l.try_acquire(a).unwrap();
        assert!(l.try_acquire(a).is_none(), "a third for the same client");
        assert!(l.try_acquire(b).is_some(), "another client is not affected");
        drop(s1);
        assert_eq!(l.held_by(a), 1);
        assert!(l.try_acquire(a).is_some());
        let unlimited = PerClient::new(0);
        let many: Vec<_> = (0..100)
            .map(|_| unlimited.try_acquire(a).unwrap())
            .collect();
        assert_eq!(unlimited.held_by(a), 100);
        drop(many);
        assert_eq!(unlimited.held_by(a), 0);
    }

    #[test]
    fn descriptor_slots_run_out_and_come_back() {
        let d = Descriptors::new(2);
        let a = d.try_acquire().unwrap();
        let _b = d.try_acquire().unwrap();
        assert!(d.try_acquire().is_none(), "a third slot of two");
        assert_eq!(d.in_use(), 2);
        drop(a);
        assert_eq!(d.in_use(), 1);
        assert!(d.try_acquire().is_some());
    }

    #[test]
    fn nbd_keeps_its_reserve_when_the_limit_allows() {
        // A usual systemd hard limit and the default NBD cap: everything fits.
        let p = FdPlan::new(524_288, 4096);
        assert_eq!(p.reserve, FDS_BASE + 2 * 4096);
        assert_eq!(p.slots as u64, (524_288 - p.reserve) / FDS_PER_SLOT);
        assert!(p.covered);
        // 1024 cannot hold 4096 NBD connections: HTTP and TFTP get a share, and it says so.
        let p = FdPlan::new(1024, 4096);
        assert!(!p.covered);
        assert_eq!(FDS_BASE, 64 + 2 * crate::nbd::PIPES as u64 + 1);
        assert_eq!(p.slots, (1024 - 129) / 2 / 2);
        assert!(p.reserve + p.slots as u64 * FDS_PER_SLOT <= 1024);
        assert!(FdPlan::new(0, 0).slots >= 1);
        assert!(FdPlan::new(u64::MAX, usize::MAX).slots > 0);
    }

    #[test]
    fn nofile_soft_limit_is_raised_to_the_hard_one() {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        // Start below the hard limit (lowering is always allowed), as under systemd's 1024.
        let was = getrlimit(Resource::Nofile);
        let low = was.maximum.unwrap_or(1 << 20).min(1 << 20) / 2;
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(low),
                maximum: was.maximum,
            },
        )
        .unwrap();
        let n = raise_nofile().unwrap();
        assert_eq!(n.soft_before, low);
        assert_eq!(n.soft, n.hard);
        assert!(n.hard > low);
        assert_eq!(getrlimit(Resource::Nofile).current, Some(n.hard));
    }

    #[test]
    fn log_limit_lets_a_few_lines_through_and_counts_the_rest() {
        let l = LogLimit::new(3);
        let first: Vec<Option<u64>> = (0..5).map(|_| l.allow_at(100)).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        // The next second: the first line says two were suppressed.
        assert_eq!(l.allow_at(101), Some(2));
        assert_eq!(l.allow_at(101), Some(0));
    }
}
