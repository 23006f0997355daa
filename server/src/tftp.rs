//! Read-only TFTP: one listening socket; each transfer a task with its own socket bound to
//! the address the request was sent to (a fresh TID, RFC 1350 §4), so replies leave from
//! the address the client talked to even on a multi-homed server.
//!
//! Single-port mode (`single_port`): every reply leaves from the listening port and the
//! listener hands each client's datagrams to its transfer. Behind NAT (a Kubernetes
//! Service, any DNAT) only replies from the port the client sent to are translated back;
//! a fresh TID would reach the client from the server's private address and be dropped.

use crate::bootfiles::{BootFiles, Content, Refusal};
use crate::config::TftpConfig;
use ltsp_common::tftp::{self, Packet};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("tftp root {path}: {source}")]
    Root {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("socket option: {0}")]
    SockOpt(nix::Error),
}

/// The bytes a transfer sends: a file read in place, or a buffer (generated files and
/// the like; netascii is converted on the way out, by [`Blocks`]).
enum Source {
    File(File, u64),
    Memory(Vec<u8>),
}

impl Source {
    fn len(&self) -> u64 {
        match self {
            Source::File(_, n) => *n,
            Source::Memory(v) => v.len() as u64,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            Source::File(f, len) => {
                let want = buf.len().min(len.saturating_sub(offset) as usize);
                let mut done = 0;
                while done < want {
                    let n = f.read_at(&mut buf[done..want], offset + done as u64)?;
                    if n == 0 {
                        // The file shrank under us: end the transfer honestly.
                        return Err(std::io::Error::other("file shrank during transfer"));
                    }
                    done += n;
                }
                Ok(done)
            }
            Source::Memory(v) => {
                let start = (offset as usize).min(v.len());
                let n = buf.len().min(v.len() - start);
                buf[..n].copy_from_slice(&v[start..start + n]);
                Ok(n)
            }
        }
    }
}

/// LF -> CR LF and CR -> CR NUL (RFC 1350 netascii), all at once: the reference the
/// block-by-block conversion of [`Blocks`] is tested against.
pub fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            b => out.push(b),
        }
    }
    out
}

pub struct Server {
    cfg: TftpConfig,
    files: Arc<BootFiles>,
    slots: Arc<Slots>,
    per_client: Arc<crate::limits::PerClient>,
    status: Arc<crate::status::Status>,
    /// boot.ipxe goes by HTTP from this port (`[boot] http`).
    http_port: Option<u16>,
    /// Single-port mode: the transfers in progress, by client address.
    active: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    /// Read-ahead buffers of all transfers (`read_ahead_kib`).
    ahead: Arc<Budget>,
    /// Packet buffers of the windows being sent now, in bytes ([`SEND_BUDGET`]).
    sending: Arc<Semaphore>,
    /// Each transfer binds a socket: it takes a slot of the descriptors left after NBD's
    /// reserve, so a TFTP flood can never stop NBD accepts.
    fds: Arc<crate::limits::Descriptors>,
}

impl Server {
    /// `files`: the TFTP root, opened once and shared with HTTP. `http_port`: the boot
    /// files go by HTTP from this port (`[boot] http`). `fds`: the descriptors HTTP and TFTP
    /// share.
    pub fn new(
        cfg: TftpConfig,
        files: Arc<BootFiles>,
        status: Arc<crate::status::Status>,
        http_port: Option<u16>,
        fds: Arc<crate::limits::Descriptors>,
    ) -> Result<Arc<Self>, TftpError> {
        let slots = Slots::new(cfg.max_transfers);
        let per_client = crate::limits::PerClient::new(cfg.max_transfers_per_client);
        let ahead = Budget::new(cfg.read_ahead_budget);
        Ok(Arc::new(Server {
            cfg,
            files,
            slots,
            per_client,
            status,
            http_port,
            active: Mutex::new(HashMap::new()),
            ahead,
            sending: Arc::new(Semaphore::new(SEND_BUDGET)),
            fds,
        }))
    }

    /// Unconfirmed transfers cancelled to make room for a new request, since start.
    pub fn evictions(&self) -> u64 {
        self.slots.evicted.load(Ordering::Relaxed)
    }
    /// Binds the listening socket; separate from [`Server::run`] so callers learn the port.
    pub fn bind(&self) -> Result<UdpSocket, TftpError> {
        let addr = self.cfg.listen;
        let std =
            std::net::UdpSocket::bind(addr).map_err(|source| TftpError::Bind { addr, source })?;
        use nix::sys::socket::{setsockopt, sockopt};
        if addr.is_ipv4() {
            setsockopt(&std, sockopt::Ipv4PacketInfo, &true).map_err(TftpError::SockOpt)?;
        } else {
            setsockopt(&std, sockopt::Ipv6RecvPacketInfo, &true).map_err(TftpError::SockOpt)?;
        }
        std.set_nonblocking(true)
            .map_err(|source| TftpError::Bind { addr, source })?;
        UdpSocket::from_std(std).map_err(|source| TftpError::Bind { addr, source })
    }

    pub async fn run(self: Arc<Self>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, peer, local) = match recv_with_dst(&sock, &mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("tftp: receive: {e}");
                    // A persistent error must not spin the loop.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.cfg.single_port {
                let tx = self.active.lock().unwrap().get(&peer).cloned();
                if let Some(tx) = tx {
                    // A full queue means the transfer is behind: drop, as a network would.
                    // Longer datagrams are nothing a transfer waits for.
                    if n <= MAX_INBOUND {
                        let _ = tx.try_send(buf[..n].to_vec());
                    }
                    continue;
                }
            }
            let packet = match tftp::decode(&buf[..n]) {
                Ok(p) => p,
                Err(e) => {
                    log::debug!("tftp: {peer}: ignored malformed packet: {e}");
                    continue;
                }
            };
            match packet {
                Packet::Rrq(req) => {
                    // Per client first: a request refused here must not evict anyone.
                    let Some(slot) = self.per_client.try_acquire(peer.ip()) else {
                        log::debug!(
                            "tftp: {peer}: refused {:?}: {} transfers open from {}",
                            req.filename,
                            self.cfg.max_transfers_per_client,
                            peer.ip()
                        );
                        let _ = sock
                            .send_to(
                                &tftp::error(
                                    tftp::ERR_UNDEFINED,
                                    "too many transfers from you, retry",
                                ),
                                peer,
                            )
                            .await;
                        continue;
                    };
                    // A descriptor for its socket, then a slot (maybe an unconfirmed one's).
                    let admitted = self
                        .fds
                        .try_acquire()
                        .and_then(|fd| self.slots.acquire().map(|slot| (fd, slot)));
                    let Some((fd, (ticket, evicted))) = admitted else {
                        log::debug!(
                            "tftp: {peer}: refused {:?}: too many transfers",
                            req.filename
                        );
                        let _ = sock
                            .send_to(
                                &tftp::error(tftp::ERR_UNDEFINED, "server busy, retry"),
                                peer,
                            )
                            .await;
                        continue;
                    };
                    // The listener does not know whether someone was evicted: count here.
                    self.status.tftp_evicted.store(
                        self.slots.evicted.load(Ordering::Relaxed),
                        Ordering::Relaxed,
                    );
                    let me = self.clone();
                    let link = if self.cfg.single_port {
                        let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
                        self.active.lock().unwrap().insert(peer, tx);
                        Some(Link::Shared {
                            sock: sock.clone(),
                            rx,
                        })
                    } else {
                        None
                    };
                    tokio::spawn(async move {
                        let single = link.is_some();
                        me.transfer(req, peer, local, link, ticket, evicted).await;
                        if single {
                            me.active.lock().unwrap().remove(&peer);
                        }
                        drop((slot, fd));
                    });
                }
                Packet::Wrq(req) => {
                    log::debug!("tftp: {peer}: refused write of {:?}", req.filename);
                    let _ = sock
                        .send_to(&tftp::error(tftp::ERR_ACCESS, "read-only server"), peer)
                        .await;
                }
                // Stray DATA/ACK/ERROR on the listening port belong to no transfer.
                _ => log::debug!("tftp: {peer}: ignored non-request packet on the listening port"),
            }
        }
    }

    /// `local`: the address the request came to (this server, as the node reaches it).
    /// The source, and whether it goes as netascii.
    fn open(&self, filename: &str, mode: &str, local: IpAddr) -> Result<(Source, bool), Refusal> {
        let src = match self.files.lookup(filename, local, self.http_port)?.content {
            Content::File(f, len) => Source::File(f, len),
            Content::Generated(s) => Source::Memory(s.into_bytes()),
        };
        match mode {
            "octet" => Ok((src, false)),
            "netascii" => Ok((src, true)),
            m => Err(Refusal::new(
                tftp::ERR_ILLEGAL_OP,
                format!("transfer mode {m:?} not supported"),
            )),
        }
    }

    /// One transfer. `link` is given in single-port mode; else a fresh socket is bound.
    /// It ends when done, failed, past `max_transfer_time`, or when `evicted` fires.
    async fn transfer(
        &self,
        req: tftp::Request,
        peer: SocketAddr,
        local: IpAddr,
        link: Option<Link>,
        mut ticket: Ticket,
        evicted: oneshot::Receiver<()>,
    ) {
        let started = std::time::Instant::now();
        let deadline = Instant::now() + self.cfg.max_transfer_time;
        let sock = match link {
            Some(l) => l,
            None => match bind_reply_socket(local) {
                Ok(s) => Link::Own(s),
                Err(e) => {
                    log::warn!("tftp: {peer}: cannot bind reply socket on {local}: {e}");
                    return;
                }
            },
        };
        let (src, ascii) = match self.open(&req.filename, &req.mode, local) {
            Ok(s) => s,
            Err(r) => {
                self.status.tftp_done(peer.ip(), &req.filename, 0, false);
                if let Some(n) = NOTICES.allow() {
                    log::info!(
                        "tftp: {peer}: {:?}: {}{}",
                        req.filename,
                        r.message,
                        crate::limits::suppressed(n)
                    );
                }
                let _ = sock.send_to(&tftp::error(r.code, &r.message), peer).await;
                return;
            }
        };
        let default_timeout = self.cfg.timeout.as_secs().clamp(1, 255) as u8;
        let max_timeout = self.cfg.max_client_timeout.as_secs().clamp(1, 255) as u8;
        let (neg, mut accepted) =
            tftp::negotiate(&req, default_timeout, max_timeout, self.cfg.max_windowsize);
        // A request may carry up to 64 KiB of options; the transfer keeps only its name.
        let req = tftp::Request {
            options: Vec::new(),
            ..req
        };
        if ascii {
            // The netascii size is known only by converting the whole file; RFC 2349 lets
            // the server leave tsize out, and a request must not cost a pass over the file.
            accepted.retain(|(k, _)| k != "tsize");
        }
        for (k, v) in &mut accepted {
            if k == "tsize" {
                *v = src.len().to_string();
            }
        }
        let blksize = neg.blksize as usize;
        // The client's timeout if granted (at most max_client_timeout), else our own.
        let timeout = if accepted.iter().any(|(k, _)| k == "timeout") {
            Duration::from_secs(neg.timeout_secs as u64)
        } else {
            self.cfg.timeout
        };
        let mut t = Transfer {
            sock,
            peer,
            data: Blocks::new(src, blksize, ascii, Some(self.ahead.clone())),
            window: neg.windowsize as u64,
            timeout,
            retries: self.cfg.retries,
            sending: self.sending.clone(),
        };
        let evicted = async {
            if evicted.await.is_err() {
                // Confirmed: the sender is gone and nobody can evict this transfer.
                std::future::pending::<()>().await
            }
        };
        let r = tokio::select! {
            r = tokio::time::timeout_at(deadline, t.run(&accepted, &mut ticket)) => {
                r.unwrap_or(Err(TransferError::TooLong(self.cfg.max_transfer_time)))
            }
            () = evicted => Err(TransferError::Evicted),
        };
        if let Err(TransferError::TooLong(_)) = r {
            let e = tftp::error(tftp::ERR_UNDEFINED, "transfer time limit reached");
            // Bounded too: the socket may be full.
            let _ = tokio::time::timeout(t.timeout, t.sock.send_to(&e, peer)).await;
        }
        self.status.tftp_done(
            peer.ip(),
            &req.filename,
            *r.as_ref().unwrap_or(&0),
            r.is_ok(),
        );
        match r {
            Ok(len) => log::info!(
                "tftp: {peer}: sent {:?} ({} bytes, blksize {}, windowsize {}) in {:.3}s",
                req.filename,
                len,
                blksize,
                t.window,
                started.elapsed().as_secs_f64()
            ),
            Err(TransferError::Evicted) => log::debug!(
                "tftp: {peer}: {:?}: cancelled: never acknowledged, and its slot went to a \
                 new request",
                req.filename
            ),
            Err(e) => {
                if let Some(n) = NOTICES.allow() {
                    log::warn!(
                        "tftp: {peer}: {:?}: {e}{}",
                        req.filename,
                        crate::limits::suppressed(n)
                    );
                }
            }
        }
    }
}

/// Refusals and failed transfers: a spoofed flood triggers one per request.
static NOTICES: crate::limits::LogLimit = crate::limits::LogLimit::new(20);

/// Largest datagram a transfer waits for: an ERROR with a 512-byte message (an ACK is 4).
/// Anything longer is not for a transfer, and is not queued or buffered for it.
const MAX_INBOUND: usize = 516;
/// Bytes of packet buffers all transfers may hold at once. A transfer holds one only
/// while it sends a window; one whose socket is full waits for it with the buffer, so past
/// this budget a window waits its turn (the link is saturated anyway).
const SEND_BUDGET: usize = 4 << 20;
/// Datagrams queued per transfer in single-port mode: at most this many x [`MAX_INBOUND`]
/// bytes, whatever the client sends.
const FORWARD_QUEUE: usize = 4;

/// Bytes that all transfers together may hold for one purpose, taken by [`Lease`]s that
/// give them back when dropped.
pub struct Budget {
    max: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Budget {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// `n` bytes if they fit in what is left.
    fn take(self: &Arc<Self>, n: usize) -> Option<Lease> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(n).filter(|&x| x <= self.max)?;
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Lease {
                        budget: self.clone(),
                        n,
                    })
                }
                Err(c) => cur = c,
            }
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

struct Lease {
    budget: Arc<Budget>,
    n: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// The global transfer slots. A transfer is unconfirmed until the client's first ACK shows
/// that it receives at its source address, which a spoofed request never does. When every
/// slot is taken, a new request takes the slot of the oldest unconfirmed transfer (which is
/// cancelled); confirmed transfers keep theirs, and only when all are confirmed is a
/// request told "busy".
struct Slots {
    max: usize,
    inner: Mutex<SlotsInner>,
    evicted: AtomicU64,
}

struct SlotsInner {
    next: u64,
    held: usize,
    /// Unconfirmed transfers by id, oldest first; sending on the channel cancels one.
    unconfirmed: BTreeMap<u64, oneshot::Sender<()>>,
}

/// One transfer's slot; given back when dropped (unless it was taken by an eviction).
struct Ticket {
    slots: Arc<Slots>,
    id: u64,
    confirmed: bool,
}

impl Slots {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Slots {
            max,
            inner: Mutex::new(SlotsInner {
                next: 0,
                held: 0,
                unconfirmed: BTreeMap::new(),
            }),
            evicted: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot, and what resolves if the transfer is evicted; None when every slot is held
    /// by a confirmed transfer.
    fn acquire(self: &Arc<Self>) -> Option<(Ticket, oneshot::Receiver<()>)> {
        let mut g = self.lock();
        if g.held >= self.max {
            let (_, cancel) = g.unconfirmed.pop_first()?;
            let _ = cancel.send(());
            g.held -= 1;
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let id = g.next;
        g.next += 1;
        g.held += 1;
        let (tx, rx) = oneshot::channel();
        g.unconfirmed.insert(id, tx);
        Some((
            Ticket {
                slots: self.clone(),
                id,
                confirmed: false,
            },
            rx,
        ))
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().held
    }
}

impl Ticket {
    /// The client acknowledged: it receives at its address, and keeps its slot.
    fn confirm(&mut self) {
        if !self.confirmed {
            // Not there: evicted already, and its task is being cancelled.
            self.confirmed = self.slots.lock().unconfirmed.remove(&self.id).is_some();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.slots.lock();
        if self.confirmed || g.unconfirmed.remove(&self.id).is_some() {
            g.held -= 1;
        }
    }
}

#[cfg(test)]
#[path = "tftp_limits_tests.rs"]
mod limits_tests;

fn bind_reply_socket(local: IpAddr) -> std::io::Result<UdpSocket> {
    let std = std::net::UdpSocket::bind(SocketAddr::new(local, 0))?;
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

/// Receives one datagram with the local address it was sent to (IP_PKTINFO).
async fn recv_with_dst(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, IpAddr)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    let fallback = sock.local_addr()?.ip();
    sock.async_io(Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(buf)];
        let mut cmsg = nix::cmsg_space!(nix::libc::in6_pktinfo);
        let msg = recvmsg::<SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(std::io::Error::from)?;
        let mut local = fallback;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            match c {
                ControlMessageOwned::Ipv4PacketInfo(pi) => {
                    local = IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr)));
                }
                ControlMessageOwned::Ipv6PacketInfo(pi) => {
                    local = IpAddr::V6(std::net::Ipv6Addr::from(pi.ipi6_addr.s6_addr));
                }
                _ => {}
            }
        }
        let peer = msg
            .address
            .and_then(|a: SockaddrStorage| {
                a.as_sockaddr_in()
                    .map(|s| SocketAddr::from(std::net::SocketAddrV4::from(*s)))
                    .or_else(|| {
                        a.as_sockaddr_in6()
                            .map(|s| SocketAddr::from(std::net::SocketAddrV6::from(*s)))
                    })
            })
            .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
        Ok((msg.bytes, peer, local))
    })
    .await
}

#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("no acknowledgement after {0} tries")]
    Timeout(u32),
    #[error("client sent error {code}: {message}")]
    Client { code: u16, message: String },
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("still going after {0:?}, the longest a transfer may last")]
    TooLong(Duration),
    #[error("evicted: never acknowledged, and every slot was taken")]
    Evicted,
}

/// Where a transfer's datagrams come and go.
enum Link {
    /// Its own socket: a fresh TID.
    Own(UdpSocket),
    /// The listening socket, shared; the listener forwards this client's datagrams.
    Shared {
        sock: Arc<UdpSocket>,
        rx: mpsc::Receiver<Vec<u8>>,
    },
}

impl Link {
    async fn send_to(&self, pkt: &[u8], peer: SocketAddr) -> std::io::Result<usize> {
        match self {
            Link::Own(s) => s.send_to(pkt, peer).await,
            Link::Shared { sock, .. } => sock.send_to(pkt, peer).await,
        }
    }

    /// The next datagram for this transfer; in shared mode it is from the peer by
    /// construction.
    async fn recv_from(
        &mut self,
        buf: &mut [u8],
        peer: SocketAddr,
    ) -> std::io::Result<(usize, SocketAddr)> {
        match self {
            Link::Own(s) => s.recv_from(buf).await,
            Link::Shared { rx, .. } => match rx.recv().await {
                Some(d) => {
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    Ok((n, peer))
                }
                None => Err(std::io::ErrorKind::BrokenPipe.into()),
            },
        }
    }
}

/// A file read ahead in chunks of several blocks: one pread serves many DATA packets
/// (lock-step at blksize 512 would otherwise cost a read per 512 bytes). The chunk comes
/// from a byte budget shared by all transfers; without one, blocks are read one by one.
struct Ahead {
    buf: Vec<u8>,
    at: u64,
    chunk: usize,
    budget: Option<Arc<Budget>>,
    /// Held while `buf` is allocated.
    lease: Option<Lease>,
    /// Set by a timeout, cleared by the next ACK: a stalled client reads block by block.
    paused: bool,
}

impl Ahead {
    /// 128 transfers at once in the default 8 MiB budget.
    const CHUNK: usize = 64 * 1024;

    /// `blksize`: the largest read asked for.
    fn new(budget: Option<Arc<Budget>>, blksize: usize) -> Ahead {
        let blksize = blksize.max(1);
        Ahead {
            buf: Vec::new(),
            at: 0,
            chunk: Self::CHUNK.max(blksize) / blksize * blksize,
            budget,
            lease: None,
            paused: false,
        }
    }

    /// `len` bytes (fewer at the end of the source) at `offset`, into `out`.
    fn read(
        &mut self,
        src: &Source,
        out: &mut [u8],
        offset: u64,
        len: usize,
    ) -> std::io::Result<usize> {
        let Source::File(..) = src else {
            return src.read_at(&mut out[..len], offset);
        };
        let want = len.min(src.len().saturating_sub(offset) as usize);
        if want == 0 {
            return Ok(0);
        }
        let end = offset + want as u64;
        if offset < self.at || end > self.at + self.buf.len() as u64 {
            if self.lease.is_none() && !self.paused && want <= self.chunk {
                self.lease = self.budget.as_ref().and_then(|b| b.take(self.chunk));
            }
            if self.lease.is_none() || want > self.chunk {
                return src.read_at(&mut out[..want], offset);
            }
            // Capacity stays `chunk` (the leased bytes): resize after truncate does not
            // reallocate.
            self.buf.resize(self.chunk, 0);
            let n = src.read_at(&mut self.buf, offset)?;
            self.buf.truncate(n);
            self.at = offset;
        }
        let start = (offset - self.at) as usize;
        out[..want].copy_from_slice(&self.buf[start..start + want]);
        Ok(want)
    }

    /// Gives the buffer back to the budget until [`Ahead::resume`]: a client that stalls
    /// does not keep it, and its resends read block by block.
    fn pause(&mut self) {
        self.buf = Vec::new();
        self.lease = None;
        self.paused = true;
    }

    fn resume(&mut self) {
        self.paused = false;
    }
}

/// Where a netascii block starts: the source offset, and the second byte of a CR LF or
/// CR NUL whose CR ended the block before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    raw: u64,
    owed: Option<u8>,
}

/// A transfer's DATA payloads by block number (from 1). In netascii the source is
/// converted block by block; a mark per block of the window lets a resend go back.
struct Blocks {
    src: Source,
    ahead: Ahead,
    blksize: usize,
    /// netascii only: marks of the blocks not yet acknowledged (and of the next one),
    /// oldest first.
    marks: Option<VecDeque<(u64, Mark)>>,
}

impl Blocks {
    fn new(src: Source, blksize: usize, ascii: bool, budget: Option<Arc<Budget>>) -> Blocks {
        Blocks {
            src,
            ahead: Ahead::new(budget, blksize),
            blksize,
            marks: ascii.then(|| VecDeque::from([(1, Mark { raw: 0, owed: None })])),
        }
    }

    /// Block `b` into `out` (at least `blksize` long); shorter than `blksize` means last.
    /// In netascii, `b` must be at most one past the last block produced and not
    /// acknowledged yet.
    fn block(&mut self, b: u64, out: &mut [u8]) -> std::io::Result<usize> {
        let blksize = self.blksize;
        let Some(marks) = &mut self.marks else {
            let offset = (b - 1).saturating_mul(blksize as u64);
            return self.ahead.read(&self.src, out, offset, blksize);
        };
        let Some(&(_, mark)) = marks.iter().find(|(n, _)| *n == b) else {
            return Err(std::io::Error::other(format!(
                "netascii block {b} is outside the window"
            )));
        };
        let (n, next) = netascii_block(&self.src, &mut self.ahead, mark, &mut out[..blksize])?;
        if marks.back().is_some_and(|(n, _)| *n == b) {
            marks.push_back((b + 1, next));
        }
        Ok(n)
    }

    /// Blocks up to `acked` will not be asked for again.
    fn forget(&mut self, acked: u64) {
        if let Some(m) = &mut self.marks {
            while m.front().is_some_and(|(n, _)| *n <= acked) {
                m.pop_front();
            }
        }
    }
}

/// Fills `out` with netascii (LF -> CR LF, CR -> CR NUL) from `at` on; fewer bytes only at
/// the end of the source. Returns the bytes written and where the next block starts.
fn netascii_block(
    src: &Source,
    ahead: &mut Ahead,
    at: Mark,
    out: &mut [u8],
) -> std::io::Result<(usize, Mark)> {
    let mut m = at;
    let mut w = 0;
    let mut raw = [0u8; 512];
    'fill: while w < out.len() {
        if let Some(c) = m.owed.take() {
            out[w] = c;
            w += 1;
            continue;
        }
        // Each source byte makes one or two: never read more than there is room for.
        let want = raw.len().min(out.len() - w);
        let n = ahead.read(src, &mut raw[..want], m.raw, want)?;
        if n == 0 {
            break;
        }
        for &c in &raw[..n] {
            if w == out.len() {
                break 'fill;
            }
            let (first, second) = match c {
                b'\n' => (b'\r', Some(b'\n')),
                b'\r' => (b'\r', Some(0)),
                c => (c, None),
            };
            out[w] = first;
            w += 1;
            m.raw += 1;
            if let Some(s) = second {
                if w < out.len() {
                    out[w] = s;
                    w += 1;
                } else {
                    m.owed = Some(s);
                }
            }
        }
    }
    Ok((w, m))
}

struct Transfer {
    sock: Link,
    peer: SocketAddr,
    data: Blocks,
    window: u64,
    timeout: Duration,
    retries: u32,
    /// Bytes for the packet buffer while a window is being sent.
    sending: Arc<Semaphore>,
}

enum Ack {
    /// The client acknowledged up to this (full, 64-bit) block number.
    Upto(u64),
    Timeout,
}

impl Transfer {
    /// Sends the file; the bytes sent. The client's first ACK confirms `ticket`.
    async fn run(
        &mut self,
        oack: &[(String, String)],
        ticket: &mut Ticket,
    ) -> Result<u64, TransferError> {
        if !oack.is_empty() {
            let pkt = tftp::oack(oack);
            let mut tries = 0;
            loop {
                self.sock.send_to(&pkt, self.peer).await?;
                match self.wait_ack(0, 0).await? {
                    Ack::Upto(0) => break,
                    Ack::Upto(_) => unreachable!("wait_ack bounds the answer by the blocks sent"),
                    Ack::Timeout => {
                        tries += 1;
                        if tries > self.retries {
                            return Err(TransferError::Timeout(tries));
                        }
                    }
                }
            }
            ticket.confirm();
        }
        let blksize = self.data.blksize as u64;
        let mut acked: u64 = 0;
        // The last block (number, length), once read: it is shorter than blksize.
        let mut last: Option<(u64, usize)> = None;
        let mut tries = 0;
        loop {
            let sent = self.send_window(acked, &mut last).await?;
            match self.wait_ack(acked, sent).await? {
                Ack::Upto(n) => {
                    acked = n;
                    tries = 0;
                    ticket.confirm();
                    self.data.forget(acked);
                    self.data.ahead.resume();
                    if let Some((b, len)) = last {
                        if acked == b {
                            return Ok((b - 1) * blksize + len as u64);
                        }
                    }
                }
                Ack::Timeout => {
                    tries += 1;
                    if tries > self.retries {
                        return Err(TransferError::Timeout(tries));
                    }
                    self.data.ahead.pause();
                }
            }
        }
    }

    /// Sends the blocks after `acked`, up to a window or the last block; returns the
    /// number of the last one sent. The packet buffer lives only while this runs.
    async fn send_window(
        &mut self,
        acked: u64,
        last: &mut Option<(u64, usize)>,
    ) -> Result<u64, TransferError> {
        let blksize = self.data.blksize;
        // At most 4 + 65464 bytes: always within the budget.
        let _permit = self
            .sending
            .acquire_many((4 + blksize) as u32)
            .await
            .map_err(std::io::Error::other)?;
        let mut pkt = vec![0u8; 4 + blksize];
        let mut b = acked + 1;
        loop {
            let n = self.data.block(b, &mut pkt[4..])?;
            pkt[..4].copy_from_slice(&tftp::data_header(b as u16));
            self.sock.send_to(&pkt[..4 + n], self.peer).await?;
            if n < blksize {
                *last = Some((b, n));
            }
            if last.is_some_and(|(l, _)| b >= l) || b >= acked + self.window {
                return Ok(b);
            }
            b += 1;
        }
    }

    /// Waits for an ACK that moves the window: one for a block in (`acked`, `sent`].
    /// Stale and duplicate ACKs are ignored, so they never trigger a resend (no Sorcerer's
    /// Apprentice storm). Datagrams from another port get ERROR 5 and change nothing.
    async fn wait_ack(&mut self, acked: u64, sent: u64) -> Result<Ack, TransferError> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; MAX_INBOUND];
        let peer = self.peer;
        loop {
            let r = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf, peer)).await;
            let Ok(r) = r else { return Ok(Ack::Timeout) };
            let (n, from) = r?;
            if from != self.peer {
                let _ = self
                    .sock
                    .send_to(
                        &tftp::error(tftp::ERR_UNKNOWN_TID, "unknown transfer ID"),
                        from,
                    )
                    .await;
                continue;
            }
            match tftp::decode(&buf[..n]) {
                Ok(Packet::Ack { block }) => {
                    if sent == 0 {
                        if block == 0 {
                            return Ok(Ack::Upto(0));
                        }
                        continue;
                    }
                    // Map the 16-bit number onto the blocks in flight (they span < 65536).
                    let base = acked + 1;
                    let offset = (block as u64).wrapping_sub(base) & 0xffff;
                    if base + offset <= sent {
                        return Ok(Ack::Upto(base + offset));
                    }
                }
                Ok(Packet::Error { code, message }) => {
                    return Err(TransferError::Client { code, message })
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_serves_every_block_and_resends() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_003u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(d.path().join("f"), &data).unwrap();
        let src = Source::File(File::open(d.path().join("f")).unwrap(), data.len() as u64);
        for (blk, budget) in [512usize, 1468, 8192, 65464]
            .into_iter()
            .flat_map(|b| [(b, Some(Budget::new(1 << 20))), (b, None)])
        {
            let mut a = Ahead::new(budget, blk);
            let mut out = vec![0u8; blk];
            let mut got = Vec::new();
            let blocks = data.len() / blk + 1;
            for b in 0..blocks {
                let n = a.read(&src, &mut out, (b * blk) as u64, blk).unwrap();
                got.extend_from_slice(&out[..n]);
            }
            assert_eq!(got, data, "blksize {blk}");
            // A resend after a timeout goes back to an earlier block.
            let n = a.read(&src, &mut out, blk as u64, blk).unwrap();
            assert_eq!(&out[..n], &data[blk..2 * blk]);
        }
        let mem = Source::Memory(b"hello".to_vec());
        let mut out = [0u8; 4];
        assert_eq!(Ahead::new(None, 4).read(&mem, &mut out, 4, 4).unwrap(), 1);
        assert_eq!(out[0], b'o');
    }

    #[test]
    fn netascii_conversion() {
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
    }
}
