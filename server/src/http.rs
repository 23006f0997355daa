//! The HTTP listener: `/healthz` (readiness: every export readable and hashed), `/metrics`
//! (Prometheus text format), `/nodes` (one line per node, for `ltsp-server status`), and
//! the boot files: `/files/PATH` as TFTP gives them (same confinement, same generated
//! scripts) and `/boot.ipxe` (iPXE fetches a kernel and initramfs over HTTP many times
//! faster than over TFTP).
//!
//! A hostile client cannot hold what others need. Connections are capped in total, per
//! client address, and by the descriptors NBD does not keep in reserve: over a cap a
//! connection gets a 503 and is closed at accept. When every slot of the total is taken,
//! the address holding the most gives up its oldest connection, and its slot passes to the
//! newcomer directly: a flood from a few addresses cannot lock a node out. When no address
//! holds more than its share (a boot storm, not a flood), the newcomer waits its turn
//! instead: up to `QUEUE_PER_SLOT` per slot, `QUEUE_WAIT` long, in order, holding its
//! per-client and descriptor slots meanwhile (the queue takes at most half the descriptors
//! HTTP shares with TFTP). A queued connection must send its first request byte within
//! `header_timeout`, and leaves the queue when it hangs up. A request header must
//! arrive whole within `header_timeout` (which also bounds a kept-alive connection's idle
//! time: hyper starts that timer as soon as it waits for the next request) and within
//! `max_header_bytes` (else 431). A response that makes no progress for `write_timeout`
//! is abandoned.

use crate::bootfiles::{BootFiles, Content, Refusal};
use crate::config::HttpConfig;
use crate::limits::{Descriptors, FdSlot, PerClient, Slot};
use crate::status::Status;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};
use hyper::{Request, Response, StatusCode};
use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

type Body = BoxBody<Bytes, io::Error>;

fn reply(code: StatusCode, body: String) -> Response<Body> {
    let full = Full::new(Bytes::from(body)).map_err(|never| match never {});
    let mut r = Response::new(full.boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// A file streamed in chunks: read at once when the page cache has them, else off the
/// async threads (a page-cache miss may block).
struct FileBody {
    file: Arc<File>,
    off: u64,
    end: u64,
    reading: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
    done: Option<Box<dyn FnOnce() + Send + Sync>>,
}

/// A chunk stuck behind a client that stops reading is all a connection holds (hyper
/// queues no more than `max_buf_size` ahead): 256 such connections hold 16 MiB, not 64.
const CHUNK: u64 = 64 * 1024;

/// Up to `n` bytes at `off` if the page cache has them (preadv2 RWF_NOWAIT), read at once
/// on this thread; None on a miss (or a file system without RWF_NOWAIT, or the end of
/// the file): the blocking read then has the last word.
fn read_cached(file: &File, off: u64, n: usize) -> Option<Bytes> {
    use rustix::io::{preadv2, ReadWriteFlags};
    let mut buf = vec![0u8; n];
    match preadv2(
        file,
        &mut [io::IoSliceMut::new(&mut buf)],
        off,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(k) if k > 0 => {
            buf.truncate(k);
            Some(Bytes::from(buf))
        }
        _ => None,
    }
}

impl FileBody {
    fn sent(&mut self, b: Bytes) -> Frame<Bytes> {
        self.off += b.len() as u64;
        // hyper stops polling once is_end_stream() says so: report now.
        if self.off >= self.end {
            if let Some(done) = self.done.take() {
                done();
            }
        }
        Frame::data(b)
    }
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.off >= self.end {
            if let Some(done) = self.done.take() {
                done();
            }
            return Poll::Ready(None);
        }
        let mut reading = match self.reading.take() {
            Some(r) => r,
            None => {
                let (file, off) = (self.file.clone(), self.off);
                let n = CHUNK.min(self.end - off) as usize;
                // Boot files are hot in a boot storm: no thread hop for cached bytes.
                if let Some(b) = read_cached(&file, off, n) {
                    return Poll::Ready(Some(Ok(self.sent(b))));
                }
                // A page-cache miss may block: off the async threads.
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    let mut got = 0;
                    while got < n {
                        let k = file.read_at(&mut buf[got..], off + got as u64)?;
                        if k == 0 {
                            return Err(io::Error::other("file shrank while being sent"));
                        }
                        got += k;
                    }
                    Ok(Bytes::from(buf))
                })
            }
        };
        let joined = match Pin::new(&mut reading).poll(cx) {
            Poll::Ready(j) => j,
            Poll::Pending => {
                self.reading = Some(reading);
                return Poll::Pending;
            }
        };
        let chunk = joined.map_err(io::Error::other).and_then(|r| r);
        Poll::Ready(Some(chunk.map(|b| self.sent(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.off >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.off)
    }
}

/// An IO whose writes fail once one has made no progress for `limit`: a client that stops
/// reading cannot hold a connection, its buffers and its file open for ever.
pub struct WriteTimeout<IO> {
    io: IO,
    limit: Duration,
    /// Armed while a write is pending; reset by any progress.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl<IO> WriteTimeout<IO> {
    pub fn new(io: IO, limit: Duration) -> Self {
        WriteTimeout {
            io,
            limit,
            timer: None,
            armed: false,
        }
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing for {}s (write timeout)",
                    self.limit.as_secs()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteTimeout<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, r)
    }
}

/// What a connection holds while open: one of each cap. Once served, its slot of the
/// total moves into `Http::open`, whence an eviction can hand it to a newcomer.
struct Admitted {
    total: OwnedSemaphorePermit,
    _client: Slot,
    _fd: FdSlot,
}

/// Connections that may queue for a slot, per slot of `max_connections`: 256 slots queue
/// 1,024 more, so a fleet of 1,280 booting at once is served in turns, none refused.
const QUEUE_PER_SLOT: usize = 4;
/// How long a queued connection waits for a slot before its 503: the kernels and
/// initramfs images of a thousand nodes take about 10 s at 10 Gbit/s, 100 s at 1 Gbit/s.
const QUEUE_WAIT: Duration = Duration::from_secs(120);

/// A connection waiting for a slot of the total: its place in the queue, and its slots
/// of the other caps.
struct Queued {
    _place: OwnedSemaphorePermit,
    client: Slot,
    fd: FdSlot,
}

/// The cap a refused connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    Total,
    PerClient,
    Descriptors,
}

impl Cap {
    fn why(self) -> &'static str {
        match self {
            Cap::Total => "connections open",
            Cap::PerClient => "connections open from this address",
            Cap::Descriptors => "descriptors in use (the rest is NBD's reserve)",
        }
    }

    fn counter(self, s: &Status) -> &std::sync::atomic::AtomicU64 {
        match self {
            Cap::Total => &s.http_refused_total,
            Cap::PerClient => &s.http_refused_per_client,
            Cap::Descriptors => &s.http_refused_descriptors,
        }
    }
}

/// How often a queued connection whose request has arrived is checked for a hang-up.
const QUEUED_CHECK: Duration = Duration::from_secs(1);

/// Returns when a queued connection is to be dropped: it sent no request byte within
/// `header_timeout` (as an admitted one would be closed), it hung up (before or after its
/// request), or its socket failed. Pends while a live client waits with its request sent.
async fn gone(stream: &tokio::net::TcpStream, header_timeout: Duration) {
    let mut b = [0u8; 1];
    match tokio::time::timeout(header_timeout, stream.peek(&mut b)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return,
    }
    // The request's bytes stay unread until the slot comes: a hang-up shows as the
    // read side closed (EPOLLRDHUP) beside them, not as a read of 0.
    loop {
        match stream.ready(tokio::io::Interest::READABLE).await {
            Ok(r) if !r.is_read_closed() && !r.is_error() => {}
            _ => return,
        }
        tokio::time::sleep(QUEUED_CHECK).await;
    }
}

/// Sent to a connection over a cap, if its socket takes it at once; then it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 20\r\nRetry-After: 1\r\nConnection: close\r\n\r\nbusy: retry shortly\n";

/// The HTTP side of the server: status, and the boot files if TFTP is configured.
pub struct Http {
    cfg: HttpConfig,
    status: Arc<Status>,
    /// The TFTP root and `[boot]`, shared with TFTP.
    files: Option<Arc<BootFiles>>,
    total: Arc<Semaphore>,
    /// Places in the queue for a slot of `total` (see the module's comment).
    queue: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    fds: Arc<Descriptors>,
    started: Instant,
    /// Open connections, so that when all are taken one of the address holding the most
    /// can make room: a few addresses cannot lock everyone else out.
    open: Mutex<HashMap<u64, Open>>,
    next_id: AtomicU64,
}

/// An open connection: its client, when it opened, how to close it, and its slot of the
/// total. Whoever takes it out of `Http::open` owns the slot: the connection's own task,
/// which gives it back when done, or an eviction, which hands it to the newcomer.
struct Open {
    ip: IpAddr,
    since: Instant,
    close: oneshot::Sender<()>,
    slot: OwnedSemaphorePermit,
}

impl Http {
    /// `fds`: the descriptor pool HTTP shares with TFTP (NBD's reserve is what it leaves).
    pub fn new(
        cfg: HttpConfig,
        status: Arc<Status>,
        files: Option<Arc<BootFiles>>,
        fds: Arc<Descriptors>,
    ) -> Arc<Http> {
        Arc::new(Http {
            total: Arc::new(Semaphore::new(cfg.max_connections)),
            queue: Arc::new(Semaphore::new(
                cfg.max_connections
                    .saturating_mul(QUEUE_PER_SLOT)
                    .min(Semaphore::MAX_PERMITS),
            )),
            per_client: PerClient::new(cfg.max_connections_per_client),
            cfg,
            status,
            files,
            fds,
            started: Instant::now(),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        })
    }

    /// All connections are taken: closes the oldest connection of the address that holds
    /// the most, if that is more than `ip` would hold with this one, and returns its slot
    /// for `ip`'s connection. The scan is of the open connections only (at most
    /// `max_connections`).
    fn evict_for(&self, ip: IpAddr) -> Option<OwnedSemaphorePermit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: HashMap<IpAddr, usize> = HashMap::new();
        for c in open.values() {
            *counts.entry(c.ip).or_default() += 1;
        }
        let mine = counts.get(&ip).copied().unwrap_or(0);
        let (top, n) = counts.into_iter().max_by_key(|(_, n)| *n)?;
        if n <= mine + 1 {
            return None;
        }
        let victim = open
            .iter()
            .filter(|(_, c)| c.ip == top)
            .min_by_key(|(_, c)| c.since)
            .map(|(id, _)| *id);
        let c = victim.and_then(|id| open.remove(&id))?;
        log::debug!("http: closed a connection of {top} ({n} open) for {ip}");
        let _ = c.close.send(());
        Some(c.slot)
    }

    /// A place in the queue for a slot of the total, with the per-client and descriptor
    /// slots, or the cap that was met.
    fn queue_for_slot(&self, peer: SocketAddr) -> Result<Queued, Cap> {
        // The queue takes at most half the descriptors HTTP shares with TFTP: a storm's
        // queue must not turn away the TFTP transfers of the same storm.
        if self.fds.in_use() >= self.fds.max() / 2 {
            return Err(Cap::Descriptors);
        }
        let place = self
            .queue
            .clone()
            .try_acquire_owned()
            .map_err(|_| Cap::Total)?;
        let (client, fd) = self.client_and_fd(peer)?;
        Ok(Queued {
            _place: place,
            client,
            fd,
        })
    }

    /// A queued connection's slot, in the order they queued (tokio's semaphore is fair),
    /// within `wait`.
    async fn admit_queued(&self, q: Queued, wait: Duration) -> Result<Admitted, Cap> {
        let total = tokio::time::timeout(wait, self.total.clone().acquire_owned())
            .await
            .ok()
            .and_then(|r| r.ok())
            .ok_or(Cap::Total)?;
        Ok(Admitted {
            total,
            _client: q.client,
            _fd: q.fd,
        })
    }

    /// Serves an admitted connection, registered so that it can be closed to make room.
    async fn serve_admitted(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        admitted: Admitted,
    ) {
        let Admitted {
            total,
            _client,
            _fd,
        } = admitted;
        let id = self.next_id.fetch_add(1, Relaxed);
        let (close, closed) = oneshot::channel();
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Open {
                ip: peer.ip(),
                since: Instant::now(),
                close,
                slot: total,
            },
        );
        self.status.http_connections.fetch_add(1, Relaxed);
        self.status.http_open.fetch_add(1, Relaxed);
        tokio::select! {
            _ = self.clone().serve_connection(stream, peer, local) => {}
            _ = closed => {}
        }
        self.status.http_open.fetch_sub(1, Relaxed);
        // Still there: the slot is ours to give back. Gone: an eviction handed it on.
        let mine = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        drop(mine);
        drop((_client, _fd));
    }

    /// One slot of every cap, or the cap that was met.
    fn admit(&self, peer: SocketAddr) -> Result<Admitted, Cap> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Cap::Total)?;
        self.admit_with(total, peer)
    }

    /// A slot of `peer`'s address and a descriptor slot, or the cap that was met.
    fn client_and_fd(&self, peer: SocketAddr) -> Result<(Slot, FdSlot), Cap> {
        let client = self
            .per_client
            .try_acquire(peer.ip())
            .ok_or(Cap::PerClient)?;
        let fd = self.fds.try_acquire().ok_or(Cap::Descriptors)?;
        Ok((client, fd))
    }

    /// The per-client and descriptor slots, once a slot of the total is held.
    fn admit_with(&self, total: OwnedSemaphorePermit, peer: SocketAddr) -> Result<Admitted, Cap> {
        let (client, fd) = self.client_and_fd(peer)?;
        Ok(Admitted {
            total,
            _client: client,
            _fd: fd,
        })
    }

    /// Accepts and serves connections until the task is dropped. Over a cap a connection
    /// is closed at once, but for the eviction and the queue of the module's comment.
    pub async fn run(self: Arc<Self>, listener: tokio::net::TcpListener) {
        log::info!(
            "http: at most {} connections, {} per client address; header {} bytes within {}s; write timeout {}s",
            self.cfg.max_connections,
            self.cfg.max_connections_per_client,
            self.cfg.max_header_bytes,
            self.cfg.header_timeout.as_secs(),
            self.cfg.write_timeout.as_secs()
        );
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("http: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            crate::limits::bound_kernel_queues(&stream, "http", self.cfg.write_timeout);
            let me = self.clone();
            match self.admit(peer) {
                Ok(a) => {
                    tokio::spawn(me.serve_admitted(stream, peer, local, a));
                }
                Err(Cap::Total) => match self.evict_for(peer.ip()) {
                    // Another address held more than its share: its slot is this one's.
                    Some(slot) => match self.admit_with(slot, peer) {
                        Ok(a) => {
                            tokio::spawn(me.serve_admitted(stream, peer, local, a));
                        }
                        Err(cap) => self.refuse(&stream, peer, cap),
                    },
                    // Every slot is taken by addresses within their share: a storm. Wait.
                    None => match self.queue_for_slot(peer) {
                        Ok(q) => {
                            tokio::spawn(async move {
                                let admitted = tokio::select! {
                                    a = me.admit_queued(q, QUEUE_WAIT) => a,
                                    () = gone(&stream, me.cfg.header_timeout) => return,
                                };
                                match admitted {
                                    Ok(a) => me.serve_admitted(stream, peer, local, a).await,
                                    Err(cap) => me.refuse(&stream, peer, cap),
                                }
                            });
                        }
                        Err(cap) => self.refuse(&stream, peer, cap),
                    },
                },
                Err(cap) => self.refuse(&stream, peer, cap),
            }
        }
    }

    fn refuse(&self, stream: &tokio::net::TcpStream, peer: SocketAddr, cap: Cap) {
        cap.counter(&self.status).fetch_add(1, Relaxed);
        log::debug!("http: {peer}: refused: {}", cap.why());
        let _ = stream.try_write(BUSY);
    }

    /// Serves one connection until it closes: the whole request handling, as the accept
    /// loop runs it (the fuzz target drives this with arbitrary bytes). `peer` and `local`
    /// are the client's address and the address it reached this server at.
    pub async fn serve_connection<IO>(
        self: Arc<Self>,
        io: IO,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<(), hyper::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let me = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let r = me.route(peer, local, &req);
            async move { Ok::<_, std::convert::Infallible>(r) }
        });
        let io = hyper_util::rt::TokioIo::new(WriteTimeout::new(io, self.cfg.write_timeout));
        let r = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.cfg.header_timeout)
            .max_header_size(self.cfg.max_header_bytes)
            // The read buffer holds a header at most (request bodies are never read).
            .max_buf_size(self.cfg.max_header_bytes.max(MIN_BUF))
            .serve_connection(io, svc)
            .await;
        if let Err(e) = &r {
            if is_timeout(e) {
                self.status.http_timeouts.fetch_add(1, Relaxed);
                log::debug!("http: {peer}: closed: {}", describe(e));
            } else {
                log::debug!("http: {peer}: {}", describe(e));
            }
        }
        r
    }

    fn file(&self, peer: SocketAddr, local: SocketAddr, path: &str) -> Response<Body> {
        let Some(files) = &self.files else {
            return reply(StatusCode::NOT_FOUND, "no TFTP root configured\n".into());
        };
        let found = match files.lookup(path, local.ip(), Some(local.port())) {
            Ok(f) => f,
            Err(Refusal { code, message }) => {
                let code = if code == ltsp_common::tftp::ERR_NOT_FOUND {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::FORBIDDEN
                };
                return reply(code, format!("{message}\n"));
            }
        };
        let rel = found.path;
        let (f, len) = match found.content {
            Content::File(f, len) => (f, len),
            Content::Generated(s) => {
                self.status.tftp_done(peer.ip(), &rel, s.len() as u64, true);
                return reply(StatusCode::OK, s);
            }
        };
        let status = self.status.clone();
        let started = Instant::now();
        let body = FileBody {
            file: Arc::new(f),
            off: 0,
            end: len,
            reading: None,
            done: Some(Box::new(move || {
                status.tftp_done(peer.ip(), &rel, len, true);
                log::info!(
                    "http: {peer}: sent {rel:?} ({len} bytes) in {:.3}s",
                    started.elapsed().as_secs_f64()
                );
            })),
        };
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/octet-stream"),
        );
        r
    }

    fn route(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        req: &Request<hyper::body::Incoming>,
    ) -> Response<Body> {
        if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        let status = &self.status;
        match req.uri().path() {
            "/healthz" => match status.health() {
                Ok(()) => reply(StatusCode::OK, "ok\n".into()),
                Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            },
            "/metrics" => reply(
                StatusCode::OK,
                status.metrics(self.started.elapsed().as_secs_f64()),
            ),
            "/nodes" => reply(StatusCode::OK, status.nodes_text()),
            "/boot.ipxe" => match self.files.as_ref().and_then(|f| {
                crate::bootfiles::ipxe_script(f.boot(), Some(local.port()), Some(local.ip()))
            }) {
                Some(s) => {
                    status.tftp_done(peer.ip(), "boot.ipxe", s.len() as u64, true);
                    reply(StatusCode::OK, s)
                }
                None => reply(
                    StatusCode::NOT_FOUND,
                    "no [boot] kernel configured\n".into(),
                ),
            },
            p if p.starts_with("/files/") => self.file(peer, local, &p["/files/".len()..]),
            _ => reply(
                StatusCode::NOT_FOUND,
                "not found: try /healthz /metrics /nodes /boot.ipxe /files/PATH\n".into(),
            ),
        }
    }
}

/// hyper's smallest allowed read buffer.
const MIN_BUF: usize = 8192;

/// A header that came too slowly (or never, on a kept-alive connection), or a response
/// the client stopped reading.
fn is_timeout(e: &hyper::Error) -> bool {
    if e.is_timeout() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The error and its causes on one line.
fn describe(e: &hyper::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn http(root: Option<&std::path::Path>) -> Arc<Http> {
        http_with(root, 3)
    }

    fn http_with(root: Option<&std::path::Path>, fd_slots: usize) -> Arc<Http> {
        let cfg = HttpConfig {
            max_connections: 4,
            max_connections_per_client: 2,
            ..HttpConfig::new("127.0.0.1:0".parse().unwrap())
        };
        let files = root.map(|r| {
            let boot = crate::config::BootFile {
                kernel: Some("vmlinuz".into()),
                ..Default::default()
            };
            Arc::new(BootFiles::open(r, boot).unwrap())
        });
        Http::new(cfg, Status::new([]), files, Descriptors::new(fd_slots))
    }

    /// Serves one connection on a duplex pipe; returns the client's end and the server task.
    fn connect(
        h: &Arc<Http>,
        pipe: usize,
    ) -> (
        DuplexStream,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ) {
        let (client, server) = tokio::io::duplex(pipe);
        let peer = "192.0.2.10:40000".parse().unwrap();
        let local = "192.0.2.1:8080".parse().unwrap();
        let task = tokio::spawn(h.clone().serve_connection(server, peer, local));
        (client, task)
    }

    /// Everything the server sends until it closes. Time is paused in these tests: if the
    /// server never closes, the hour passes at once and the test fails instead of hanging.
    async fn read_all(c: &mut DuplexStream) -> String {
        let mut v = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3600), c.read_to_end(&mut v)).await;
        assert!(r.is_ok(), "the server never closed the connection");
        String::from_utf8_lossy(&v).into_owned()
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_answered_and_idle_keepalive_is_closed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), b"kernel bytes").unwrap();
        let h = http(Some(d.path()));
        let (mut c, task) = connect(&h, 64 * 1024);
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /files/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\nGET /files/boot.ipxe HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Kept alive, then idle: closed by the header timer (time is paused: no wait).
        let text = read_all(&mut c).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\n\r\nok\n"), "{text}");
        assert!(text.contains("\r\n\r\nkernel bytes"), "{text}");
        // boot.ipxe over /files/ is the generated one, naming this server's HTTP port.
        assert!(
            text.contains("kernel http://192.0.2.1:8080/files/vmlinuz "),
            "{text}"
        );
        assert!(task.await.unwrap().unwrap_err().is_timeout());
        assert_eq!(h.status.http_timeouts.load(Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_are_sent_whole_from_a_cold_page_cache_and_a_warm_one() {
        let d = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(1u32 << 20) + 3).map(|i| (i * 7 % 251) as u8).collect();
        let path = d.path().join("cold");
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        // Written just now: dirty pages are not dropped until written back.
        f.sync_all().unwrap();
        // Dropping pages is best effort (a page still in a per-CPU batch stays): retry.
        let evict = || {
            (0..50).any(|_| {
                rustix::fs::fadvise(&f, 0, 0, rustix::fs::Advice::DontNeed).unwrap();
                std::thread::sleep(Duration::from_millis(10));
                // A miss starts readahead: evict again before the next look.
                read_cached(&f, 0, CHUNK as usize).is_none()
                    && rustix::fs::fadvise(&f, 0, 0, rustix::fs::Advice::DontNeed).is_ok()
            })
        };
        assert!(
            evict(),
            "the file's pages could not be dropped from the page cache"
        );
        let h = http(Some(d.path()));
        for round in ["cold", "warm"] {
            let (mut c, task) = connect(&h, 64 * 1024);
            c.write_all(b"GET /files/cold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            let body = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            assert!(got[body..] == data[..], "{round}: the body differs");
            task.await.unwrap().unwrap();
        }
        assert_eq!(
            read_cached(&f, 0, CHUNK as usize).as_deref(),
            Some(&data[..CHUNK as usize])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_sent_header_is_closed_after_the_header_timeout() {
        let h = http(None);
        let (mut c, task) = connect(&h, 4096);
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let text = read_all(&mut c).await;
        assert!(!text.contains(" 200 "), "{text}");
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert!(task.await.unwrap().is_err());
        assert_eq!(h.status.http_timeouts.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_huge_header_gets_431() {
        let h = http(None);
        let (mut c, task) = connect(&h, 256 * 1024);
        let mut req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        req.resize(req.len() + 32 * 1024, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        c.write_all(&req).await.unwrap();
        let text = read_all(&mut c).await;
        assert!(
            text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{text}"
        );
        assert!(task.await.unwrap().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_dropped_after_the_write_timeout() {
        let d = tempfile::tempdir().unwrap();
        let big = vec![7u8; 4 << 20];
        std::fs::write(d.path().join("big"), &big).unwrap();
        let h = http(Some(d.path()));
        let (mut c, task) = connect(&h, 64 * 1024);
        c.write_all(b"GET /files/big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Never read: the pipe fills and the server's writes stay pending.
        let e = tokio::time::timeout(Duration::from_secs(3600), task)
            .await
            .expect("the server never gave up")
            .unwrap()
            .unwrap_err();
        assert!(is_timeout(&e), "{}", describe(&e));
        assert!(describe(&e).contains("write timeout"), "{}", describe(&e));
        assert_eq!(h.status.http_timeouts.load(Relaxed), 1);
        // What was sent is a truncated body: the connection was given up, not finished.
        let text = read_all(&mut c).await;
        assert!(text.len() < big.len(), "{}", text.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_up_is_not_dropped() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = WriteTimeout::new(a, Duration::from_secs(5));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 512];
            while got < 64 * 1024 {
                // Slower than the pipe, faster than the timeout.
                tokio::time::sleep(Duration::from_secs(4)).await;
                got += b.read(&mut buf).await.unwrap();
            }
            got
        });
        w.write_all(&vec![1u8; 64 * 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 64 * 1024);
        // Nobody reads now: the next write fails after the limit.
        let (a, _b) = tokio::io::duplex(16);
        let mut w = WriteTimeout::new(a, Duration::from_secs(5));
        let e = tokio::time::timeout(Duration::from_secs(3600), w.write_all(&[0u8; 64]))
            .await
            .expect("the write never timed out")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn when_all_are_taken_the_address_holding_most_makes_room() {
        let h = http(None);
        let t0 = Instant::now();
        let mut rx = Vec::new();
        let mut open = |ip: &str, age: u64| {
            let (close, closed) = oneshot::channel();
            let id = h.next_id.fetch_add(1, Relaxed);
            h.open.lock().unwrap().insert(
                id,
                Open {
                    ip: ip.parse().unwrap(),
                    since: t0 - Duration::from_secs(age),
                    close,
                    slot: h.total.clone().try_acquire_owned().unwrap(),
                },
            );
            rx.push((ip.to_string(), age, closed));
        };
        for age in [5, 9, 7] {
            open("192.0.2.10", age);
        }
        open("192.0.2.11", 20);
        // A newcomer: the oldest connection of .10 (three open) goes, not .11's older one.
        assert!(h.evict_for("192.0.2.99".parse().unwrap()).is_some());
        let mut gone = Vec::new();
        for (ip, age, c) in rx.iter_mut() {
            if c.try_recv().is_ok() {
                gone.push((ip.clone(), *age));
            }
        }
        assert_eq!(gone, [("192.0.2.10".to_string(), 9)]);
        // .10 now holds two: a client holding one already is no fairer with a second.
        assert!(h.evict_for("192.0.2.11".parse().unwrap()).is_none());
        assert!(h.evict_for("192.0.2.12".parse().unwrap()).is_some());
    }

    fn storm_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    fn addr(i: usize) -> SocketAddr {
        format!("192.0.2.{}:1", 10 + i).parse().unwrap()
    }

    /// Registers an open connection from `peer` as `serve_admitted` does; returns the
    /// receiver its eviction would fire.
    fn open_from(h: &Http, peer: SocketAddr) -> (Admitted, oneshot::Receiver<()>) {
        let Admitted {
            total,
            _client,
            _fd,
        } = h.admit(peer).ok().unwrap();
        let (close, closed) = oneshot::channel();
        let id = h.next_id.fetch_add(1, Relaxed);
        h.open.lock().unwrap().insert(
            id,
            Open {
                ip: peer.ip(),
                since: Instant::now(),
                close,
                slot: total,
            },
        );
        // The slot is in the map; a permit of a semaphore of its own stands in for it.
        let held = Admitted {
            total: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            _client,
            _fd,
        };
        (held, closed)
    }

    #[test]
    fn in_a_storm_a_connection_queues_for_a_slot_in_turn_and_the_queue_is_bounded() {
        storm_runtime().block_on(async {
            let h = http_with(None, 1000);
            // Four addresses, one connection each: every slot taken, none over its share.
            let mut held: Vec<_> = (0..4).map(|i| h.admit(addr(i)).ok().unwrap()).collect();
            assert!(matches!(h.admit(addr(4)), Err(Cap::Total)));
            assert!(h.evict_for(addr(4).ip()).is_none());
            // A queued connection holds a slot of its address's cap (2) while it waits.
            let mut queued = vec![
                h.queue_for_slot(addr(4)).ok().unwrap(),
                h.queue_for_slot(addr(4)).ok().unwrap(),
            ];
            assert!(matches!(h.queue_for_slot(addr(4)), Err(Cap::PerClient)));
            // Four queue places per slot: sixteen wait, the seventeenth is refused.
            queued.extend((5..19).map(|i| h.queue_for_slot(addr(i)).ok().unwrap()));
            assert!(matches!(h.queue_for_slot(addr(19)), Err(Cap::Total)));
            let mut queued = queued.into_iter();
            let first = queued.next().unwrap();
            let waiting = {
                let h = h.clone();
                tokio::spawn(async move { h.admit_queued(first, Duration::from_secs(60)).await })
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!waiting.is_finished(), "admitted with every slot taken");
            // A slot given back goes to the connection that queued.
            held.pop();
            let admitted = tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("the queued connection got the freed slot")
                .unwrap();
            assert!(admitted.is_ok());
            // Waiting is bounded: with every slot taken, the next gets its 503 in time.
            let second = queued.next().unwrap();
            assert!(matches!(
                h.admit_queued(second, Duration::from_millis(20)).await,
                Err(Cap::Total)
            ));
        });
    }

    /// A queued connection leaves the queue when it hangs up, before or after sending its
    /// request, and when it sends nothing within the header timeout; a live one stays.
    #[tokio::test]
    async fn a_queued_connection_that_hangs_up_or_stays_silent_leaves_the_queue() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let header = Duration::from_secs(2);
        // What gone() does for a client that acts as `client` does, within 5 s.
        async fn left<F, Fut>(
            l: &tokio::net::TcpListener,
            addr: SocketAddr,
            header: Duration,
            client: F,
        ) -> bool
        where
            F: FnOnce(tokio::net::TcpStream) -> Fut,
            Fut: Future<Output = Option<tokio::net::TcpStream>>,
        {
            let c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            let held = client(c).await;
            let r = tokio::time::timeout(Duration::from_secs(5), gone(&s, header))
                .await
                .is_ok();
            drop(held);
            r
        }
        let request = b"GET /files/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(
            left(&l, addr, header, |mut c| async move {
                c.write_all(request).await.unwrap();
                drop(c);
                None
            })
            .await,
            "a client that sent its request and hung up stayed queued"
        );
        assert!(
            left(&l, addr, header, |c| async move {
                drop(c);
                None
            })
            .await,
            "a client that hung up at once stayed queued"
        );
        assert!(
            left(&l, addr, header, |c| async move { Some(c) }).await,
            "a silent client stayed queued past the header timeout"
        );
        assert!(
            !left(&l, addr, header, |mut c| async move {
                c.write_all(request).await.unwrap();
                Some(c)
            })
            .await,
            "a client waiting with its request sent was dropped"
        );
    }

    /// The slot an eviction frees is the newcomer's, not the head of the storm queue's:
    /// else a flood spread over many addresses, queued, would defeat the eviction.
    #[test]
    fn an_evicted_slot_goes_to_the_newcomer_it_was_taken_for_not_to_the_queue() {
        storm_runtime().block_on(async {
            let h = http_with(None, 1000);
            // .10 holds two of the four slots; .11 and .12 one each.
            let (_a1, mut a1_closed) = open_from(&h, addr(0));
            let (_a2, mut a2_closed) = open_from(&h, addr(0));
            let (_b, _) = open_from(&h, addr(1));
            let (_c, _) = open_from(&h, addr(2));
            assert!(matches!(h.admit(addr(3)), Err(Cap::Total)));
            // A storm waits in the queue.
            let q = h.queue_for_slot(addr(5)).ok().unwrap();
            let waiting = {
                let h = h.clone();
                tokio::spawn(async move { h.admit_queued(q, Duration::from_secs(60)).await })
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
            // A newcomer: .10's oldest connection goes, and its slot is the newcomer's.
            let slot = h.evict_for(addr(3).ip()).expect("an eviction");
            let newcomer = h.admit_with(slot, addr(3)).ok().unwrap();
            assert!(a1_closed.try_recv().is_ok() ^ a2_closed.try_recv().is_ok());
            assert_eq!(h.open.lock().unwrap().len(), 3);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!waiting.is_finished(), "the queue took the evicted slot");
            // The newcomer done, its slot goes back to the semaphore: the queue's turn.
            drop(newcomer);
            let admitted = tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("the queued connection got the slot given back")
                .unwrap();
            assert!(admitted.is_ok());
        });
    }

    #[test]
    fn caps_count_total_per_client_and_descriptors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _g = rt.enter();
        let h = http(None);
        let a: SocketAddr = "192.0.2.10:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.11:1".parse().unwrap();
        let c: SocketAddr = "192.0.2.12:1".parse().unwrap();
        let a1 = h.admit(a).ok().unwrap();
        let _a2 = h.admit(a).ok().unwrap();
        assert_eq!(
            h.admit(a).err(),
            Some(Cap::PerClient),
            "a third from one address"
        );
        let _b1 = h.admit(b).ok().unwrap();
        // Three descriptor slots are gone; the total cap (4) is not reached.
        assert!(matches!(h.admit(c), Err(Cap::Descriptors)));
        drop(a1);
        let _c1 = h.admit(c).ok().unwrap();
        assert!(matches!(h.admit(b), Err(Cap::Descriptors)));
        // With descriptors to spare, the total cap (4) is what stops the fifth.
        let h = http_with(None, 100);
        let held: Vec<_> = [a, a, b, b]
            .iter()
            .map(|p| h.admit(*p).ok().unwrap())
            .collect();
        assert!(matches!(h.admit(c), Err(Cap::Total)));
        drop(held);
        assert!(h.admit(c).is_ok());
    }
}
