//! Read-only NBD: fixed newstyle negotiation, then pipelined transmission. One task reads
//! requests, each READ runs as its own task (so replies go out in completion order, as the
//! kernel allows), one task writes replies and batches them into few syscalls.
//!
//! Memory is bounded whatever a client does: reply data held in user space is charged to a
//! budget per connection (the reader waits when its connection's is spent: a client that
//! does not take its replies stops being read from) and to one for the whole server (when
//! that is spent, a READ goes out by sendfile, with no buffer, instead of waiting: hostile
//! connections holding the shared budget cannot stall a real node). A connection whose
//! socket takes no bytes for the write timeout is closed, and all it held is given back.
//!
//! An export's image is opened when a client selects it and that open file is kept for the
//! whole connection: renaming a new image over the path changes only later connections.
//! `NAME@blake3:<hex>` selects a version by identity ([`crate::versions`]): what a node's
//! reconnect asks for, so it finds the bytes it runs after any upgrade.

use crate::config::{Export, NbdConfig};
use crate::limits::PerClient;
use crate::nbd_trace::{self, Tracer};
use crate::status::Status;
use crate::versions::{Identity, Use, Versions};
use ltsp_common::nbd::{self as w, InfoRequest};
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Transmission flags of every export: read-only, and safe to open many connections to.
pub const EXPORT_FLAGS: u16 = w::TFLAG_HAS_FLAGS | w::TFLAG_READ_ONLY | w::TFLAG_CAN_MULTI_CONN;
/// Requests a connection may have in flight before the server stops reading more. The
/// kernel's NBD client has at most 128 per socket; each slot is fixed memory per connection.
const MAX_IN_FLIGHT: usize = 64;
/// Replies gathered into one writev (at most half of those in flight).
const BATCH: usize = 32;
const _: () = assert!(BATCH < MAX_IN_FLIGHT);
/// Buffer the request reader keeps per connection: 18 request headers per read(2).
const READ_BUF: usize = 512;
/// Info requests a GO/INFO may carry and still be read (real clients send 1 to 4).
const MAX_INFO_REQUESTS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Wire(#[from] w::WireError),
    #[error("client flags {0:#x}: expected fixed newstyle")]
    ClientFlags(u32),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("no request for {0:?}: closed as idle")]
    Idle(std::time::Duration),
    #[error("option {option} with length {len} over the limit")]
    OptionTooLong { option: u32, len: u32 },
}

/// Reply bytes held in user space by the whole server; the count is
/// [`Status::nbd_reply_bytes`], so it shows in the metrics.
pub struct Budget {
    max: u64,
    status: Arc<Status>,
    /// The most ever in use.
    peak: std::sync::atomic::AtomicU64,
}

/// Bytes taken from a [`Budget`], given back when dropped.
pub struct Charge {
    budget: Arc<Budget>,
    n: u64,
}

impl Budget {
    pub fn new(max: u64, status: Arc<Status>) -> Arc<Self> {
        Arc::new(Budget {
            max,
            status,
            peak: Default::default(),
        })
    }

    /// `n` bytes if that keeps the total within the budget; never waits.
    pub fn try_take(self: &Arc<Self>, n: u64) -> Option<Charge> {
        let used = &self.status.nbd_reply_bytes;
        let mut cur = used.load(Relaxed);
        loop {
            let next = cur.checked_add(n).filter(|&x| x <= self.max)?;
            match used.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => {
                    self.peak.fetch_max(next, Relaxed);
                    return Some(Charge {
                        budget: self.clone(),
                        n,
                    });
                }
                Err(x) => cur = x,
            }
        }
    }

    pub fn used(&self) -> u64 {
        self.status.nbd_reply_bytes.load(Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Relaxed)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget
            .status
            .nbd_reply_bytes
            .fetch_sub(self.n, Relaxed);
    }
}

/// Where replies are written: a TCP socket (large replies then go by splice or sendfile) or any
/// other byte stream (tests and fuzzing), where they are copied through a small buffer.
pub trait ReplySink: AsyncWrite + Unpin + Send + 'static {
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl ReplySink for OwnedWriteHalf {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncWrite + Send + 'static> ReplySink for tokio::io::WriteHalf<T> {}

pub struct Server {
    cfg: NbdConfig,
    status: Arc<Status>,
    conns: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    versions: Arc<Versions>,
    budget: Arc<Budget>,
    pool: Arc<Pool>,
    pipes: Arc<Pipes>,
    tracer: Option<Arc<Tracer>>,
}

/// What a connection serves once negotiated.
pub struct Opened {
    pub name: String,
    pub file: File,
    pub size: u64,
    pub identity: Identity,
    /// Keeps the version available while the connection lives.
    _used: Use,
}

/// How long a client that asks for the identity waits for a hash in progress before it is
/// told `hashing=NN%` and retries: short images are answered at once, long ones do not
/// hold the handshake.
const HASH_WAIT: Duration = Duration::from_secs(1);

/// `NAME@blake3:<hex>`: the export and the version asked for; else the name alone.
pub fn split_version(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('@') {
        Some((base, v)) if v.starts_with("blake3:") => (base, Some(v)),
        _ => (name, None),
    }
}

impl Server {
    pub fn new(cfg: NbdConfig, status: Arc<Status>) -> Arc<Self> {
        Self::with_tracer(cfg, status, None)
    }

    /// `tracer`: every request of every connection is recorded there ([`nbd_trace`]).
    pub fn with_tracer(
        cfg: NbdConfig,
        status: Arc<Status>,
        tracer: Option<Arc<Tracer>>,
    ) -> Arc<Self> {
        let conns = Arc::new(Semaphore::new(
            cfg.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        let per_client = PerClient::new(cfg.max_connections_per_client);
        let budget = Budget::new(cfg.max_reply_bytes as u64, status.clone());
        let versions = Versions::new(
            cfg.exports.clone(),
            cfg.versions_dir.clone(),
            cfg.version_retention,
            status.clone(),
        );
        // Freed buffers kept for reuse: a quarter of the budget on top of it, at most.
        let pool = Arc::new(Pool::new(cfg.max_reply_bytes / 4));
        let pipes = Arc::new(Pipes::new(PIPES, status.clone()));
        Arc::new(Server {
            cfg,
            status,
            conns,
            per_client,
            versions,
            budget,
            pool,
            pipes,
            tracer,
        })
    }

    /// Hashes every export and follows their paths (see [`crate::versions`]); `run` does
    /// it, tests and fuzz targets that drive sessions directly call it themselves.
    pub fn start_versions(&self) {
        self.versions.start();
    }

    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        self.start_versions();
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("nbd: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                // Debug: a flood of refusals must not become a flood of log lines.
                log::debug!(
                    "nbd: {peer}: refused: {} connections open",
                    self.cfg.max_connections
                );
                continue;
            };
            let Some(slot) = self.per_client.try_acquire(peer.ip()) else {
                log::debug!(
                    "nbd: {peer}: refused: {} connections open from {}",
                    self.cfg.max_connections_per_client,
                    peer.ip()
                );
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                crate::limits::bound_kernel_queues(&stream, "nbd", me.cfg.write_timeout);
                match me.session(stream).await {
                    Ok(Some(name)) => log::info!("nbd: {peer}: export {name:?} closed"),
                    Ok(None) => log::debug!("nbd: {peer}: left during negotiation"),
                    Err(e) => log::info!("nbd: {peer}: {e}"),
                }
                drop(permit);
            });
        }
    }

    async fn session(&self, stream: TcpStream) -> Result<Option<String>, SessionError> {
        let peer = stream.peer_addr()?;
        let (rd, wr) = stream.into_split();
        self.serve_halves(rd, wr, peer.to_string(), peer.ip()).await
    }

    /// One whole connection (negotiation, then transmission) over any byte stream, through
    /// the same code as a TCP client: for fuzzing and tests. `peer` is who Status sees.
    pub async fn serve_stream<S>(
        &self,
        stream: S,
        peer: std::net::IpAddr,
    ) -> Result<Option<String>, SessionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        self.serve_halves(rd, wr, peer.to_string(), peer).await
    }

    async fn serve_halves<R, W>(
        &self,
        rd: R,
        wr: W,
        who: String,
        ip: std::net::IpAddr,
    ) -> Result<Option<String>, SessionError>
    where
        R: AsyncRead + Unpin + Send,
        W: ReplySink,
    {
        // Small buffers: a request header is 28 bytes, an option reply rarely more than a
        // few hundred; replies go by writev/sendfile, not through a buffer.
        let mut rd = BufReader::with_capacity(READ_BUF, rd);
        let mut wr = BufWriter::with_capacity(512, wr);
        let t = self.cfg.handshake_timeout;
        let opened = match tokio::time::timeout(t, self.negotiate(&mut rd, &mut wr)).await {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::HandshakeTimeout(t)),
        };
        let Some(opened) = opened else {
            return Ok(None);
        };
        log::info!(
            "nbd: {who}: export {:?} ({} bytes) connected",
            opened.name,
            opened.size
        );
        let name = opened.name.clone();
        wr.flush().await?;
        let version = match &opened.identity {
            Identity::Known(id) => Some(id.as_str()),
            _ => None,
        };
        self.status.nbd_connected(ip, &name, version);
        let size = opened.size;
        let trace = self.tracer.as_ref().map(|t| Trace {
            conn: t.connection(&who, &name, size),
            tracer: t.clone(),
        });
        let r = transmit(rd, wr.into_inner(), Arc::new(opened), self, trace).await;
        self.status.nbd_closed(ip);
        r?;
        Ok(Some(name))
    }

    fn lookup(&self, name: &str) -> Option<&Export> {
        let name = if name.is_empty() {
            match &self.cfg.default_export {
                Some(d) => d.as_str(),
                // With one export there is no doubt which one the empty name means.
                None if self.cfg.exports.len() == 1 => return self.cfg.exports.first(),
                None => return None,
            }
        } else {
            name
        };
        self.cfg.exports.iter().find(|e| e.name == name)
    }

    /// `wait`: how long to wait for a hash in progress (clients that ask for the identity).
    async fn open(&self, name: &str, wait: Duration) -> Result<Opened, (u32, String)> {
        let (base, version) = split_version(name);
        let e = self
            .lookup(base)
            .ok_or_else(|| (w::REP_ERR_UNKNOWN, format!("no export named {base:?}")))?;
        // Stats and opens, maybe on network storage: on the blocking pool, never on the
        // workers that carry every node's I/O.
        let vs = self.versions.clone();
        let v = match version {
            Some(id) => {
                let id2 = id.to_string();
                let got = tokio::task::spawn_blocking(move || vs.get(&id2))
                    .await
                    .ok()
                    .flatten();
                got.ok_or_else(|| {
                    (
                        w::REP_ERR_UNKNOWN,
                        format!(
                            "export {:?}: version {id} is not held by this server",
                            e.name
                        ),
                    )
                })?
            }
            None => {
                // The file at the path now (a stat; inotify may not have told us yet).
                let e2 = e.clone();
                let _ = tokio::task::spawn_blocking(move || vs.refresh(&e2)).await;
                self.versions.current(e, wait).await.ok_or_else(|| {
                    (
                        w::REP_ERR_UNKNOWN,
                        format!("export {:?}: image not readable", e.name),
                    )
                })?
            }
        };
        Ok(Opened {
            name: e.name.clone(),
            file: v.file,
            size: v.size,
            identity: v.identity,
            _used: v.used,
        })
    }

    /// Fixed newstyle negotiation. `Ok(None)`: the client aborted or left cleanly.
    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Opened>, SessionError>
    where
        R: tokio::io::AsyncBufRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&w::server_greeting()).await?;
        wr.flush().await?;
        let flags = rd.read_u32().await?;
        if flags & w::CLIENT_FIXED_NEWSTYLE == 0
            || flags & !(w::CLIENT_FIXED_NEWSTYLE | w::CLIENT_NO_ZEROES) != 0
        {
            return Err(SessionError::ClientFlags(flags));
        }
        let no_zeroes = flags & w::CLIENT_NO_ZEROES != 0;
        loop {
            // Every reply is out before the client is expected to send its next option.
            wr.flush().await?;
            let mut hdr = [0u8; 16];
            match rd.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            let h = w::parse_option_header(&hdr)?;
            if h.len > w::MAX_OPTION_LEN {
                // Nothing legitimate is this long; reading it would let a client pin memory.
                let reply = w::option_reply(h.option, w::REP_ERR_TOO_BIG, b"option too long");
                wr.write_all(&reply).await?;
                wr.flush().await?;
                return Err(SessionError::OptionTooLong {
                    option: h.option,
                    len: h.len,
                });
            }
            if h.len > self.max_option_data() {
                // Longer than any option naming one of our exports: skipped, not kept, so
                // connections stalled mid-option pin little memory.
                let n =
                    tokio::io::copy_buf(&mut (&mut *rd).take(h.len as u64), &mut tokio::io::sink())
                        .await?;
                if n < h.len as u64 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                if h.option == w::OPT_EXPORT_NAME {
                    return Err(SessionError::UnknownExport(format!("({} bytes)", h.len)));
                }
                let why = "option too long for any export of this server";
                self.reply_err(wr, h.option, w::REP_ERR_TOO_BIG, why)
                    .await?;
                continue;
            }
            // Grown as bytes arrive: a length alone pins no memory.
            let mut data = Vec::new();
            (&mut *rd).take(h.len as u64).read_to_end(&mut data).await?;
            if data.len() < h.len as usize {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            match h.option {
                w::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    // This option has no error reply: an unknown name can only be a close.
                    let Ok(o) = self.open(&name, Duration::ZERO).await else {
                        return Err(SessionError::UnknownExport(name));
                    };
                    wr.write_all(&o.size.to_be_bytes()).await?;
                    wr.write_all(&EXPORT_FLAGS.to_be_bytes()).await?;
                    if !no_zeroes {
                        wr.write_all(&[0u8; 124]).await?;
                    }
                    wr.flush().await?;
                    return Ok(Some(o));
                }
                w::OPT_ABORT => {
                    let _ = wr
                        .write_all(&w::option_reply(h.option, w::REP_ACK, b""))
                        .await;
                    let _ = wr.flush().await;
                    return Ok(None);
                }
                w::OPT_LIST => {
                    if !data.is_empty() {
                        self.reply_err(wr, h.option, w::REP_ERR_INVALID, "LIST takes no data")
                            .await?;
                        continue;
                    }
                    for e in &self.cfg.exports {
                        let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(e.name.as_bytes());
                        wr.write_all(&w::option_reply(h.option, w::REP_SERVER, &d))
                            .await?;
                    }
                    wr.write_all(&w::option_reply(h.option, w::REP_ACK, b""))
                        .await?;
                }
                w::OPT_STARTTLS => {
                    let why = "TLS is not offered by this server";
                    let code = if data.is_empty() {
                        w::REP_ERR_UNSUP
                    } else {
                        w::REP_ERR_INVALID
                    };
                    self.reply_err(wr, h.option, code, why).await?;
                }
                w::OPT_INFO | w::OPT_GO => {
                    let req = match w::parse_info_request(&data) {
                        Ok(r) => r,
                        Err(e) => {
                            self.reply_err(wr, h.option, w::REP_ERR_INVALID, &e.to_string())
                                .await?;
                            continue;
                        }
                    };
                    // Only a client that asks for the description needs the identity.
                    let wait = if req.requests.contains(&w::INFO_DESCRIPTION) {
                        HASH_WAIT
                    } else {
                        Duration::ZERO
                    };
                    let o = match self.open(&req.name, wait).await {
                        Ok(o) => o,
                        Err((code, msg)) => {
                            self.reply_err(wr, h.option, code, &msg).await?;
                            continue;
                        }
                    };
                    self.send_info(wr, h.option, &req, &o).await?;
                    wr.write_all(&w::option_reply(h.option, w::REP_ACK, b""))
                        .await?;
                    wr.flush().await?;
                    if h.option == w::OPT_GO {
                        return Ok(Some(o));
                    }
                }
                other => {
                    let msg = format!("option {other} is not supported");
                    self.reply_err(wr, other, w::REP_ERR_UNSUP, &msg).await?;
                }
            }
        }
    }

    /// The longest option data that can name one of the exports: a GO/INFO with the longest
    /// name and [`MAX_INFO_REQUESTS`] info requests.
    fn max_option_data(&self) -> u32 {
        let name = self
            .cfg
            .exports
            .iter()
            .map(|e| e.name.len())
            .max()
            .unwrap_or(0);
        // `@blake3:<hex>` may follow the name.
        let name = name + 1 + crate::identity::LEN;
        (4 + name as u32 + 2 + 2 * MAX_INFO_REQUESTS).max(256)
    }

    async fn reply_err<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        option: u32,
        code: u32,
        msg: &str,
    ) -> std::io::Result<()> {
        wr.write_all(&w::option_reply(option, code, msg.as_bytes()))
            .await
    }

    async fn send_info<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        option: u32,
        req: &InfoRequest,
        o: &Opened,
    ) -> std::io::Result<()> {
        wr.write_all(&w::option_reply(
            option,
            w::REP_INFO,
            &w::info_export(o.size, EXPORT_FLAGS),
        ))
        .await?;
        for &r in &req.requests {
            let mut d = r.to_be_bytes().to_vec();
            match r {
                w::INFO_NAME => d.extend_from_slice(o.name.as_bytes()),
                w::INFO_DESCRIPTION => d.extend_from_slice(describe(o).as_bytes()),
                w::INFO_BLOCK_SIZE => {
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&4096u32.to_be_bytes());
                    d.extend_from_slice(&w::MAX_REQUEST_LEN.to_be_bytes());
                }
                _ => continue,
            }
            wr.write_all(&w::option_reply(option, w::REP_INFO, &d))
                .await?;
        }
        Ok(())
    }
}

/// A human-readable description that also identifies the image's bytes: `id=` is the
/// content hash ([`crate::identity`]), equal on every server that has a copy. While the
/// hash is computed, `hashing=NN%` instead: a client that needs the identity retries.
pub fn describe(o: &Opened) -> String {
    match &o.identity {
        Identity::Known(id) => format!("ltsp-rs image {} size={} id={id}", o.name, o.size),
        Identity::Hashing(pct) => {
            format!("ltsp-rs image {} size={} hashing={pct}%", o.name, o.size)
        }
        Identity::Unknown => format!("ltsp-rs image {} size={}", o.name, o.size),
    }
}

/// One reply on its way to the writer; small, as up to [`MAX_IN_FLIGHT`] wait per connection.
struct Reply {
    cookie: u64,
    error: u32,
    /// Data length of a successful READ: from `buf`, or else sent with sendfile(2).
    len: u32,
    offset: u64,
    buf: Option<Box<Buffered>>,
    /// The request as the trace records it, when tracing. Boxed: a Reply waits in every
    /// connection's queue, and thousands of connections' queues are the server's memory.
    traced: Option<Box<Traced>>,
}
const _: () = assert!(std::mem::size_of::<Reply>() <= 40);

/// A connection's place in the request trace.
#[derive(Clone)]
struct Trace {
    tracer: Arc<Tracer>,
    conn: u64,
}

#[derive(Clone, Copy)]
struct Traced {
    t: u64,
    kind: u16,
    offset: u64,
    len: u32,
}

impl Trace {
    fn record(&self, r: Traced, error: u32, done: u64) {
        self.tracer.request(nbd_trace::Req {
            t: r.t,
            conn: self.conn,
            kind: r.kind,
            offset: r.offset,
            len: r.len,
            done,
            error,
        });
    }

    /// Replies now fully written.
    fn written(&self, replies: &[Reply]) {
        let done = self.tracer.now();
        for r in replies {
            if let Some(t) = &r.traced {
                self.record(**t, r.error, done);
            }
        }
    }
}

/// READ data in user space, with what it is charged to (given back when dropped).
struct Buffered {
    data: Vec<u8>,
    // Fields drop in this order: the server-wide charge goes back before the connection's
    // permit, or the connection's next READ could be charged while this one still is, and
    // the server would hold one READ over its budget.
    _all: Charge,
    _conn: OwnedSemaphorePermit,
}

impl Reply {
    fn header_only(error: u32, cookie: u64, traced: Option<Box<Traced>>) -> Reply {
        Reply {
            cookie,
            error,
            len: 0,
            offset: 0,
            buf: None,
            traced,
        }
    }
}

/// READs at least this large go page cache -> socket by splice or sendfile (one copy
/// less); smaller ones are read into pooled buffers and batched into one writev.
const SENDFILE_MIN: u32 = 64 * 1024;

/// The smallest buffer a READ holds: tiny READs must not slip under the budget in numbers.
const MIN_CLASS: usize = 4096;
/// Buffer size classes, powers of two from MIN_CLASS up to SENDFILE_MIN.
const CLASSES: usize = (SENDFILE_MIN as usize / MIN_CLASS).trailing_zeros() as usize + 1;

/// The bytes a buffered READ of `len` holds and is charged for: its size class. A pooled
/// buffer serves only READs of its own class, so a small READ never keeps a large buffer
/// that the budget counted as small.
fn class_of(len: u32) -> usize {
    (len as usize).max(MIN_CLASS).next_power_of_two()
}

fn writer_ended() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer ended")
}

async fn transmit<R, W>(
    mut rd: R,
    wr: W,
    img: Arc<Opened>,
    srv: &Server,
    trace: Option<Trace>,
) -> Result<(), SessionError>
where
    R: AsyncBufReadUnpin,
    W: ReplySink,
{
    // The writer's batch holds replies taken off the channel: both together are in flight.
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT - BATCH);
    let per_conn = srv.cfg.max_reply_bytes_per_connection;
    let conn = Arc::new(Semaphore::new(per_conn.min(Semaphore::MAX_PERMITS)));
    let mut writer = tokio::spawn(write_replies(
        wr,
        rx,
        img.clone(),
        srv.pool.clone(),
        srv.pipes.clone(),
        srv.cfg.write_timeout,
        trace.clone(),
    ));
    let ended = {
        let reading = read_requests(&mut rd, &tx, &img, srv, &conn, trace.as_ref());
        tokio::pin!(reading);
        tokio::select! {
            r = &mut reading => Ok(r),
            // The writer ends first only on an error (a write timeout, a reset): then
            // nothing more is read, and what is in flight is dropped with the channel.
            w = &mut writer => Err(w),
        }
    };
    // Dropping our sender lets the writer finish once every in-flight READ has replied:
    // NBD_CMD_DISC "finishes what is in flight".
    drop(tx);
    match ended {
        Ok(r) => {
            // A failed writer is the cause when both failed (the reader then saw the
            // channel close).
            writer.await.unwrap_or(Ok(()))?;
            r
        }
        Err(Ok(Err(e))) => Err(e.into()),
        Err(_) => Ok(()),
    }
}

/// What the request reader needs of its input: buffered, so headers are not a syscall each.
pub trait AsyncBufReadUnpin: tokio::io::AsyncBufRead + Unpin + Send {}
impl<T: tokio::io::AsyncBufRead + Unpin + Send> AsyncBufReadUnpin for T {}

async fn read_requests<R: AsyncBufReadUnpin>(
    rd: &mut R,
    tx: &mpsc::Sender<Reply>,
    img: &Arc<Opened>,
    srv: &Server,
    conn: &Arc<Semaphore>,
    trace: Option<&Trace>,
) -> Result<(), SessionError> {
    let idle = srv.cfg.idle_timeout;
    let status = &srv.status;
    let mut hdr = [0u8; w::REQUEST_LEN];
    loop {
        let next = match idle {
            None => rd.read_exact(&mut hdr).await,
            Some(t) => match tokio::time::timeout(t, rd.read_exact(&mut hdr)).await {
                Ok(r) => r,
                // What is in flight is still answered (as for DISC), then the close.
                Err(_) => return Err(SessionError::Idle(t)),
            },
        };
        match next {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = w::parse_request(&hdr)?;
        let traced = trace.map(|tr| {
            Box::new(Traced {
                t: tr.tracer.now(),
                kind: req.kind,
                offset: req.offset,
                len: req.len,
            })
        });
        let error = match req.kind {
            w::CMD_READ => {
                if let Some(e) = check_range(&req, img.size) {
                    e
                } else {
                    status.nbd_read(req.len);
                    // A free slot first: when the client does not take its replies, this
                    // is where the reading stops.
                    let permit = tx
                        .clone()
                        .reserve_owned()
                        .await
                        .map_err(|_| writer_ended())?;
                    let by_file = Reply {
                        cookie: req.cookie,
                        error: 0,
                        len: req.len,
                        offset: req.offset,
                        buf: None,
                        traced,
                    };
                    let held = if req.len < SENDFILE_MIN {
                        charge(srv, conn, req.len).await
                    } else {
                        None
                    };
                    let Some((conn_permit, all)) = held else {
                        permit.send(by_file);
                        continue;
                    };
                    // From the page cache (the common case) the read is done here, at once.
                    // A cache miss would block: that READ goes to its own task and its reply
                    // overtakes nothing it should not, while later READs go on.
                    let mut data = srv.pool.get(req.len);
                    if read_cached(&img.file, &mut data, req.offset) {
                        permit.send(Reply {
                            buf: Some(Box::new(Buffered {
                                data,
                                _conn: conn_permit,
                                _all: all,
                            })),
                            ..by_file
                        });
                        continue;
                    }
                    srv.pool.put(data);
                    let img = img.clone();
                    let pool = srv.pool.clone();
                    // A thread of the (capped) blocking pool: a disk read must not stall
                    // the event loop every other client is served from.
                    tokio::task::spawn_blocking(move || {
                        let mut data = pool.get(req.len);
                        let reply = match img.file.read_exact_at(&mut data, req.offset) {
                            Ok(()) => Reply {
                                buf: Some(Box::new(Buffered {
                                    data,
                                    _conn: conn_permit,
                                    _all: all,
                                })),
                                ..by_file
                            },
                            Err(e) => {
                                log::error!("nbd: read {}+{}: {e}", req.offset, req.len);
                                // The server-wide charge first, as in `Buffered`.
                                drop(all);
                                drop(conn_permit);
                                pool.put(data);
                                Reply::header_only(w::EIO, req.cookie, by_file.traced)
                            }
                        };
                        permit.send(reply);
                    });
                    continue;
                }
            }
            w::CMD_WRITE => {
                // The payload follows the header whatever the answer: drain it, or the
                // next "request" would be the client's data.
                let n = tokio::io::copy_buf(
                    &mut (&mut *rd).take(req.len as u64),
                    &mut tokio::io::sink(),
                )
                .await?;
                if n < req.len as u64 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                w::EPERM
            }
            w::CMD_TRIM | w::CMD_WRITE_ZEROES => w::EPERM,
            w::CMD_FLUSH => 0,
            w::CMD_DISC => {
                // It has no reply: recorded as done when read.
                if let (Some(tr), Some(t)) = (trace, traced) {
                    tr.record(*t, 0, t.t);
                }
                return Ok(());
            }
            _ => w::EINVAL,
        };
        tx.send(Reply::header_only(error, req.cookie, traced))
            .await
            .map_err(|_| writer_ended())?;
    }
}

/// Charges a buffered READ of `len` bytes: waits for the connection's own budget (so a
/// client that does not take its replies stops being read from), then takes from the
/// server's without waiting. None: send it by sendfile, with no buffer.
async fn charge(
    srv: &Server,
    conn: &Arc<Semaphore>,
    len: u32,
) -> Option<(OwnedSemaphorePermit, Charge)> {
    let class = class_of(len);
    if class
        > srv
            .cfg
            .max_reply_bytes_per_connection
            .min(Semaphore::MAX_PERMITS)
    {
        return None;
    }
    let cost = u32::try_from(class).ok()?;
    let p = conn.clone().acquire_many_owned(cost).await.ok()?;
    let all = srv.budget.try_take(cost as u64)?;
    Some((p, all))
}

/// Fills `buf` from `file` at `offset` only if that never waits for the disk
/// (preadv2 with RWF_NOWAIT); false means "not all in the page cache, read it elsewhere".
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> bool {
    use rustix::io::{preadv2, ReadWriteFlags};
    let mut done = 0;
    while done < buf.len() {
        let mut iov = [std::io::IoSliceMut::new(&mut buf[done..])];
        match preadv2(file, &mut iov, offset + done as u64, ReadWriteFlags::NOWAIT) {
            Ok(0) | Err(_) => return false,
            Ok(n) => done += n,
        }
    }
    true
}

fn check_range(req: &w::Request, size: u64) -> Option<u32> {
    let end = req.offset.checked_add(req.len as u64);
    match end {
        _ if req.len == 0 || req.len > w::MAX_REQUEST_LEN => Some(w::EINVAL),
        Some(end) if end <= size => None,
        _ => Some(w::EINVAL),
    }
}

/// `what` with the write timeout: each call is one wait for the socket to take bytes, so
/// the timeout is "no progress for that long", not a limit on a long reply.
async fn progress<T>(
    t: Duration,
    what: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match tokio::time::timeout(t, what).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no write progress for {t:?}: closed"),
        )),
    }
}

async fn write_replies<W: ReplySink>(
    mut wr: W,
    rx: mpsc::Receiver<Reply>,
    img: Arc<Opened>,
    pool: Arc<Pool>,
    pipes: Arc<Pipes>,
    t: Duration,
    trace: Option<Trace>,
) -> std::io::Result<()> {
    let r = write_all_replies(&mut wr, rx, img, pool, &pipes, t, trace).await;
    if let (Err(e), Some(sock)) = (&r, wr.socket()) {
        if e.kind() == std::io::ErrorKind::TimedOut {
            // A client that took nothing for the write timeout: what the kernel still
            // queues for it goes now, not after minutes of retransmission.
            crate::limits::reset_on_close(sock);
        }
    }
    r
}

async fn write_all_replies<W: ReplySink>(
    wr: &mut W,
    mut rx: mpsc::Receiver<Reply>,
    img: Arc<Opened>,
    pool: Arc<Pool>,
    pipes: &Pipes,
    t: Duration,
    trace: Option<Trace>,
) -> std::io::Result<()> {
    let mut batch: Vec<Reply> = Vec::new();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        // Runs of buffered replies go out in one writev (one syscall for many small
        // replies); a large reply is its header with MSG_MORE, then the file's pages.
        let mut i = 0;
        while i < batch.len() {
            let j = batch[i..]
                .iter()
                .position(|r| r.buf.is_none() && r.len > 0)
                .map_or(batch.len(), |k| i + k);
            if j > i {
                write_buffered(wr, &batch[i..j], t).await?;
                if let Some(tr) = &trace {
                    tr.written(&batch[i..j]);
                }
            }
            if j < batch.len() {
                let r = &batch[j];
                let header = w::simple_reply(0, r.cookie);
                match wr.socket() {
                    Some(sock) => {
                        send_with_more(sock, &header, t).await?;
                        let (off, len) = (r.offset, r.len as usize);
                        send_range(sock, &img.file, off, len, t, pipes).await?;
                    }
                    None => copy_file(wr, &header, &img.file, r.offset, r.len, t).await?,
                }
                if let Some(tr) = &trace {
                    tr.written(std::slice::from_ref(r));
                }
                i = j + 1;
            } else {
                i = j;
            }
        }
        for r in batch.drain(..) {
            if let Some(b) = r.buf {
                pool.put(b.data);
            }
        }
    }
    progress(t, wr.shutdown()).await
}

async fn write_buffered<W: ReplySink>(
    wr: &mut W,
    replies: &[Reply],
    t: Duration,
) -> std::io::Result<()> {
    let headers: Vec<[u8; w::SIMPLE_REPLY_LEN]> = replies
        .iter()
        .map(|r| w::simple_reply(r.error, r.cookie))
        .collect();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(replies.len() * 2);
    for (r, h) in replies.iter().zip(&headers) {
        slices.push(IoSlice::new(h));
        if let Some(b) = &r.buf {
            slices.push(IoSlice::new(&b.data));
        }
    }
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = progress(t, wr.write_vectored(bufs)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// A READ reply without sendfile (the sink is not a socket): through a 64 KiB buffer.
async fn copy_file<W: ReplySink>(
    wr: &mut W,
    header: &[u8],
    file: &File,
    offset: u64,
    len: u32,
    t: Duration,
) -> std::io::Result<()> {
    progress(t, wr.write_all(header)).await?;
    let mut buf = vec![0u8; (len as usize).min(64 * 1024)];
    let mut done = 0u64;
    while done < len as u64 {
        let n = buf.len().min((len as u64 - done) as usize);
        file.read_exact_at(&mut buf[..n], offset + done)?;
        let mut b = &buf[..n];
        while !b.is_empty() {
            let k = progress(t, wr.write(b)).await?;
            if k == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            b = &b[k..];
        }
        done += n as u64;
    }
    Ok(())
}

/// The reply header, with MSG_MORE so it leaves in the same segment as the data after it.
async fn send_with_more(sock: &TcpStream, mut b: &[u8], t: Duration) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    while !b.is_empty() {
        progress(t, sock.writable()).await?;
        match sock.try_io(Interest::WRITABLE, || {
            send(
                sock.as_raw_fd(),
                b,
                MsgFlags::from_bits_retain(nix::libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pipes that large READs are spliced through, file -> pipe -> socket, with no copy.
/// sendfile(2) does the same through a pipe of 16 pages inside the kernel, so it hands TCP
/// 64 KiB per step; with many sockets near full that made many small sends, which cost
/// the server and its clients more (docs/benchmarks.md). A pipe hands the socket what it
/// has room for at once, up to 1 MiB. Shared by all connections and made on demand up
/// to a cap; a reply takes a pipe for one step and gives it back empty (see
/// [`send_range`]), so a few pipes serve thousands of connections and no client keeps
/// one by reading slowly. A step that finds none free goes by sendfile.
pub struct Pipes {
    free: std::sync::Mutex<Vec<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>>,
    made: std::sync::atomic::AtomicUsize,
    max: usize,
    /// Set when the kernel refused a pipe its full size: from then on, sendfile.
    refused: std::sync::atomic::AtomicBool,
    /// Where the bytes a socket refused go, so that the pipe comes back empty; without it
    /// such a pipe is closed instead.
    null: Option<File>,
    /// Counts spliced, sendfile and refused bytes (`/metrics`).
    status: Arc<Status>,
}

/// Pipes at most: two descriptors each, and one for /dev/null, counted in
/// [`crate::limits::FDS_BASE`].
pub const PIPES: usize = 32;
/// Each pipe's capacity: a whole large READ of a to-RAM copy at once. A server without
/// CAP_SYS_RESOURCE may be refused it (`/proc/sys/fs/pipe-user-pages-soft`, shared by
/// every process of its user); a smaller pipe would be worse than sendfile, so the pool
/// then stops making pipes.
const PIPE_BYTES: i32 = 1 << 20;

/// A pipe taken from [`Pipes`]: back to the pool when dropped empty; closed (and its
/// place freed) when dropped with bytes still in it, as when emptying it failed.
pub struct PipeLease<'a> {
    pipes: &'a Pipes,
    fds: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    held: usize,
}

impl Pipes {
    pub fn new(max: usize, status: Arc<Status>) -> Pipes {
        Pipes {
            free: Default::default(),
            made: Default::default(),
            max,
            refused: Default::default(),
            null: std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .inspect_err(|e| {
                    log::warn!(
                        "nbd: cannot open /dev/null ({e}): a pipe whose socket refused \
                         bytes is closed instead of emptied"
                    )
                })
                .ok(),
            status,
        }
    }

    /// A free pipe, or a new one under the cap; None: send by sendfile instead.
    pub fn take(&self) -> Option<PipeLease<'_>> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let fds = match free {
            Some(fds) => fds,
            None => {
                if self.refused.load(Relaxed) {
                    return None;
                }
                self.made
                    .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
                    .ok()?;
                match new_pipe() {
                    Ok(fds) => fds,
                    Err(e) => {
                        self.made.fetch_sub(1, Relaxed);
                        if e == nix::errno::Errno::EPERM && !self.refused.swap(true, Relaxed) {
                            log::warn!(
                                "nbd: the kernel refused a pipe of {PIPE_BYTES} bytes \
                                 (fs.pipe-user-pages-soft): large READs go by sendfile"
                            );
                        } else {
                            log::debug!("nbd: no pipe for a large READ ({e}): sendfile");
                        }
                        return None;
                    }
                }
            }
        };
        Some(PipeLease {
            pipes: self,
            fds: Some(fds),
            held: 0,
        })
    }

    /// Pipes made and not closed.
    #[cfg(test)]
    fn made(&self) -> usize {
        self.made.load(Relaxed)
    }
}

impl PipeLease<'_> {
    /// Empties the pipe into /dev/null; if that fails the bytes stay, and the pipe is
    /// closed when dropped.
    fn drop_held(&mut self) {
        use nix::fcntl::{splice, SpliceFFlags};
        let (Some((pr, _)), Some(null)) = (self.fds.as_ref(), self.pipes.null.as_ref()) else {
            return;
        };
        while self.held > 0 {
            match splice(
                pr,
                None,
                null,
                None,
                self.held,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(n) if n > 0 => {
                    self.held -= n;
                    let refused = &self.pipes.status.nbd_splice_refused_bytes;
                    refused.fetch_add(n as u64, Relaxed);
                }
                _ => return,
            }
        }
    }
}

impl Drop for PipeLease<'_> {
    fn drop(&mut self) {
        if let Some(fds) = self.fds.take() {
            if self.held == 0 {
                let mut free = self.pipes.free.lock().unwrap_or_else(|p| p.into_inner());
                free.push(fds);
            } else {
                // Bytes of another reply must never reach the next one's socket.
                drop(fds);
                self.pipes.made.fetch_sub(1, Relaxed);
            }
        }
    }
}

/// A pipe of PIPE_BYTES, or EPERM when the kernel gives less (the pipe is closed).
fn new_pipe() -> nix::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    // Over the user's soft limit the kernel may refuse, or quietly give 2 pages.
    let size = fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_BYTES))?;
    if size < PIPE_BYTES {
        return Err(nix::errno::Errno::EPERM);
    }
    Ok((r, w))
}

/// A READ this short goes in one step, without asking the socket what fits.
const WHOLE: usize = 64 * 1024;
/// The least a larger step puts in a pipe, whatever the estimate of the socket's room.
const MIN_STEP: usize = 16 * 1024;

/// `len` bytes of `file` from `offset` into the socket with no copy through user space, a
/// step each time the socket has room: spliced through a pipe of `pipes` when one is
/// free, else by sendfile. A splice step fills the pipe with about what the socket has
/// room for ([`send_room`]); what the socket still refuses is dropped from the pipe and
/// read again on the next step. So a pipe is never held across a wait: it goes back
/// empty after each step. The header already promised the data: a short or failed read
/// ends the connection.
async fn send_range(
    sock: &TcpStream,
    file: &File,
    offset: u64,
    len: usize,
    t: Duration,
    pipes: &Pipes,
) -> std::io::Result<()> {
    // Read once a reply (it does not change); 0 means never set on this socket, so the
    // unbounded sysctl applies.
    let lowat = socket2::SockRef::from(sock)
        .tcp_notsent_lowat()
        .ok()
        .filter(|&l| l > 0)
        .unwrap_or(u32::MAX);
    let room = |s: &TcpStream| send_room(s, lowat);
    send_range_with(sock, file, offset, len, t, pipes, room).await
}

/// [`send_range`] with the estimate of the socket's room given (tests overfill with it).
async fn send_range_with(
    sock: &TcpStream,
    file: &File,
    offset: u64,
    len: usize,
    t: Duration,
    pipes: &Pipes,
    room: impl Fn(&TcpStream) -> usize,
) -> std::io::Result<()> {
    let mut off = offset;
    let mut left = len;
    while left > 0 {
        progress(t, sock.writable()).await?;
        let (mut moved, mut by_pipe) = (0, false);
        let r = sock.try_io(Interest::WRITABLE, || match pipes.take() {
            Some(mut p) => {
                by_pipe = true;
                let want = match left <= WHOLE {
                    true => left,
                    false => room(sock).max(MIN_STEP),
                };
                let (sent, filled) = splice_step(sock, file, off, left, want, &mut p)?;
                moved = sent;
                // A socket that refused bytes is full: wait for it (WouldBlock clears
                // the readiness tokio caches, as its own writes do after a short one).
                match sent < filled {
                    true => Err(std::io::ErrorKind::WouldBlock.into()),
                    false => Ok(()),
                }
            }
            None => {
                let mut o = off as i64;
                moved = nix::sys::sendfile::sendfile64(sock, file, Some(&mut o), left)?;
                match moved {
                    0 => Err(short_image()),
                    _ => Ok(()),
                }
            }
        });
        // What the socket took counts on every path, the one that found it full too.
        off += moved as u64;
        left -= moved;
        let count = match by_pipe {
            true => &pipes.status.nbd_spliced_bytes,
            false => &pipes.status.nbd_sendfile_bytes,
        };
        count.fetch_add(moved as u64, Relaxed);
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn short_image() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "image shorter than its size",
    )
}

/// One step of [`send_range`] through `pipe`: up to `want` bytes of the `left` at `off`
/// into the pipe, then into the socket. Returns the bytes the socket took and the bytes
/// put in the pipe. The pipe is empty on return unless dropping what the socket refused
/// failed; then the pipe is closed when its lease is dropped.
fn splice_step(
    sock: &TcpStream,
    file: &File,
    off: u64,
    left: usize,
    want: usize,
    pipe: &mut PipeLease<'_>,
) -> std::io::Result<(usize, usize)> {
    use nix::fcntl::{splice, SpliceFFlags};
    let Some((pr, pw)) = pipe.fds.as_ref() else {
        return Err(std::io::Error::other("pipe lease without a pipe"));
    };
    let mut o = off as i64;
    let fill = left.min(want).min(PIPE_BYTES as usize);
    // Page-cache pages go in by reference; an uncached page is read here, as sendfile
    // would. A failure here is the image's: never WouldBlock, which would be taken for
    // the socket's.
    let n = splice(
        file,
        Some(&mut o),
        pw,
        None,
        fill,
        SpliceFFlags::SPLICE_F_MOVE,
    )
    .map_err(|e| std::io::Error::other(format!("reading the image: {e}")))?;
    if n == 0 {
        return Err(short_image());
    }
    debug_assert_eq!(pipe.held, 0, "a pipe is filled only empty");
    pipe.held = n;
    let mut flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    if left > n {
        flags |= SpliceFFlags::SPLICE_F_MORE;
    }
    let sent = match splice(pr, None, sock, None, n, flags) {
        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
        Ok(s) => s,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => return Err(e.into()),
    };
    pipe.held -= sent;
    if pipe.held > 0 {
        pipe.drop_held();
    }
    Ok((sent, n))
}

/// About what one write to the socket takes now, so that a step fills its pipe with no
/// more: what may wait unsent (`lowat`, the socket's TCP_NOTSENT_LOWAT) less what does,
/// plus a segment, plus what leaves during the write, within the send buffer's room.
/// What leaves is bounded by the congestion and receive windows and by TCP small
/// queues, which let a socket have only about 1 ms of its pacing rate (2 segments at
/// least, tcp_limit_output_bytes at most) in the device's queue; that queue's bytes come
/// from SO_MEMINFO. Estimates that left it out had a shaped link refuse 2-3 times what
/// it took (docs/benchmarks.md). 0 when the kernel does not say.
fn send_room(sock: &TcpStream, lowat: u32) -> usize {
    let Some(i) = tcp_info(sock) else {
        return 0;
    };
    let mss = i.tcpi_snd_mss as usize;
    let notsent = i.tcpi_notsent_bytes as usize;
    let unsent = (lowat as usize).saturating_sub(notsent).saturating_add(mss);
    let Some(m) = meminfo(sock) else {
        return unsent;
    };
    let room = (m[MEM_SNDBUF] as usize).saturating_sub(m[MEM_WMEM_QUEUED] as usize);
    let in_queue = m[MEM_WMEM_ALLOC] as usize;
    let pacing = usize::try_from(i.tcpi_pacing_rate >> 10).unwrap_or(usize::MAX);
    // 4 MiB caps it: the kernel's tcp_limit_output_bytes (1 MiB by default) is not
    // read, so this may say more, never less.
    let small_queue = pacing.max(2 * (mss + 1024)).min(4 << 20);
    let unacked = i.tcpi_unacked as usize;
    let cwnd_free = (i.tcpi_snd_cwnd as usize)
        .saturating_sub(unacked)
        .saturating_mul(mss);
    // Segments in flight counted full: an estimate on the safe side. A kernel too old
    // to report the peer's window (0) leaves only `unsent`.
    let peer_free = (i.tcpi_snd_wnd as usize).saturating_sub(unacked.saturating_mul(mss));
    let leaves = cwnd_free
        .min(peer_free)
        .min(small_queue.saturating_sub(in_queue).saturating_add(mss));
    room.min(unsent.saturating_add(leaves))
}

/// Indexes into SO_MEMINFO's counters (linux/sock_diag.h).
const MEM_WMEM_ALLOC: usize = 2;
const MEM_SNDBUF: usize = 3;
const MEM_WMEM_QUEUED: usize = 5;

/// SO_MEMINFO: the socket's memory counters (rmem_alloc, rcvbuf, wmem_alloc, sndbuf,
/// fwd_alloc, wmem_queued, optmem, backlog, drops).
fn meminfo(sock: &TcpStream) -> Option<[u32; 9]> {
    use nix::libc;
    // The asm-generic value (x86_64, aarch64 and most others); libc does not name it.
    const SO_MEMINFO: libc::c_int = 55;
    let mut m = [0u32; 9];
    let mut len = std::mem::size_of_val(&m) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes at the pointer, which points at `m`,
    // that large, alive for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            m.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize >= 6 * 4).then_some(m)
}

/// The kernel's TCP state of the socket.
fn tcp_info(sock: &TcpStream) -> Option<nix::libc::tcp_info> {
    use nix::libc;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes at the pointer, which points at a
    // zeroed tcp_info of that size, alive for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // The fields read here (up to tcpi_notsent_bytes) date from Linux 4.6.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + 4;
    if r != 0 || (len as usize) < needed {
        return None;
    }
    // SAFETY: tcp_info is integers only, so any bytes are a valid value: zeros where the
    // kernel wrote nothing.
    Some(unsafe { info.assume_init() })
}

/// Read buffers reused across requests and connections (a fresh allocation per READ would
/// be zero-filled and faulted in again), keeping at most `max` bytes.
struct Pool {
    max: usize,
    /// The buffers of each size class ([`class_of`]) and the sum of their capacities.
    inner: std::sync::Mutex<([Vec<Vec<u8>>; CLASSES], usize)>,
}

impl Pool {
    fn new(max: usize) -> Self {
        Pool {
            max,
            inner: Default::default(),
        }
    }

    /// The slot of a buffer of `capacity` bytes: only an exact class is pooled.
    fn slot(capacity: usize) -> Option<usize> {
        let i = (capacity / MIN_CLASS).trailing_zeros() as usize;
        (capacity.is_power_of_two() && capacity >= MIN_CLASS && i < CLASSES).then_some(i)
    }

    /// A buffer of `len` bytes whose capacity is `len`'s class.
    fn get(&self, len: u32) -> Vec<u8> {
        let class = class_of(len);
        let pooled = Self::slot(class).and_then(|i| {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let b = g.0[i].pop()?;
            g.1 -= b.capacity();
            Some(b)
        });
        let mut b = pooled.unwrap_or_else(|| Vec::with_capacity(class));
        // Within the capacity: no reallocation. Only growth is zero-filled; the read
        // overwrites all `len` bytes before any is sent.
        b.resize(len as usize, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        let c = b.capacity();
        let Some(i) = Self::slot(c) else {
            return;
        };
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Each class keeps its share: one class filling the pool would leave every READ
        // of another class a fresh, zero-filled buffer.
        let share = self.max / CLASSES;
        if g.1 + c <= self.max && (g.0[i].len() + 1) * c <= share {
            g.1 += c;
            g.0[i].push(b);
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// A node whose link died leaves its connections open on the server, each counting
/// against the per-client limit while the node reconnects: keepalive probes close them
/// within about 90 s of silence.
fn keepalive(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(stream, sockopt::KeepAlive, &true);
    let _ = setsockopt(stream, sockopt::TcpKeepIdle, &60);
    let _ = setsockopt(stream, sockopt::TcpKeepInterval, &10);
    let _ = setsockopt(stream, sockopt::TcpKeepCount, &3);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks() {
        let r = |offset, len| w::Request {
            flags: 0,
            kind: w::CMD_READ,
            cookie: 1,
            offset,
            len,
        };
        assert_eq!(check_range(&r(0, 4096), 8192), None);
        assert_eq!(check_range(&r(4096, 4096), 8192), None);
        assert_eq!(check_range(&r(4097, 4096), 8192), Some(w::EINVAL));
        assert_eq!(check_range(&r(u64::MAX, 4096), 8192), Some(w::EINVAL));
        assert_eq!(check_range(&r(0, 0), 8192), Some(w::EINVAL));
        assert_eq!(
            check_range(&r(0, w::MAX_REQUEST_LEN + 1), u64::MAX),
            Some(w::EINVAL)
        );
    }

    #[test]
    fn the_budget_never_goes_over_and_charges_come_back() {
        let status = Arc::new(Status::default());
        let b = Budget::new(10_000, status.clone());
        let c1 = b.try_take(6_000).unwrap();
        let c2 = b.try_take(4_000).unwrap();
        assert_eq!(b.used(), 10_000);
        assert!(b.try_take(1).is_none(), "over the budget");
        assert!(b.try_take(u64::MAX).is_none(), "no overflow");
        drop(c1);
        assert_eq!(status.nbd_reply_bytes.load(Relaxed), 4_000);
        let c3 = b.try_take(6_000).unwrap();
        drop((c2, c3));
        assert_eq!(b.used(), 0);
        assert_eq!(b.peak(), 10_000);
        // Many threads taking and giving back: the total never passes the budget.
        let b = Budget::new(64 * 1024, Arc::new(Status::default()));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..20_000u64 {
                        let c = b.try_take(1 + i % 8192);
                        assert!(b.used() <= 64 * 1024);
                        drop(c);
                    }
                });
            }
        });
        assert_eq!(b.used(), 0);
        assert!(b.peak() <= 64 * 1024);
    }

    #[test]
    fn the_pool_keeps_at_most_its_bytes() {
        let p = Pool::new(CLASSES * 10_000);
        let bufs: Vec<_> = (0..5).map(|_| p.get(4096)).collect();
        for b in bufs {
            p.put(b);
        }
        assert!(p.bytes() <= 10_000 && p.bytes() >= 8192, "{}", p.bytes());
        let before = p.bytes();
        let b = p.get(100);
        assert_eq!(b.len(), 100);
        assert_eq!(p.bytes(), before - 4096, "a pooled buffer is reused");
        p.put(b);
        assert_eq!(p.bytes(), before);
    }

    #[test]
    fn size_classes_are_powers_of_two_from_a_page() {
        for len in [
            1,
            100,
            4095,
            4096,
            4097,
            8192,
            8193,
            40_000,
            SENDFILE_MIN - 1,
        ] {
            let c = class_of(len);
            assert!(
                c.is_power_of_two() && c >= 4096 && c >= len as usize,
                "{len} -> {c}"
            );
            assert!(
                c == 4096 || c < 2 * len as usize,
                "{len} -> {c}: not the smallest"
            );
            assert!(Pool::slot(c).is_some(), "{len} -> {c}: no slot");
        }
        assert_eq!(Pool::slot(4095), None);
        assert_eq!(Pool::slot(6000), None);
        assert_eq!(Pool::slot(2 * SENDFILE_MIN as usize), None);
    }

    /// A READ holds its class's bytes of the server's budget while it is in flight.
    #[tokio::test]
    async fn a_read_is_charged_its_class() {
        let s = session(1 << 20, 1 << 20);
        let (conn_permit, all) = charge(&s.srv, &Arc::new(Semaphore::new(1 << 20)), 4097)
            .await
            .expect("charged");
        assert_eq!(s.srv.budget.used(), 8192);
        drop((conn_permit, all));
        assert_eq!(s.srv.budget.used(), 0);
        // A per-connection budget below the class: not buffered (it goes by sendfile).
        let small = session(6000, 1 << 20);
        assert!(charge(&small.srv, &Arc::new(Semaphore::new(6000)), 4097)
            .await
            .is_none());
    }

    /// One class filling its share leaves room for the others.
    #[test]
    fn every_class_keeps_its_share_of_the_pool() {
        let p = Pool::new(CLASSES * 64 * 1024);
        let big: Vec<_> = (0..8).map(|_| p.get(SENDFILE_MIN - 1)).collect();
        for b in big {
            p.put(b);
        }
        assert_eq!(p.bytes(), 64 * 1024, "the 64 KiB class kept its share only");
        let b = p.get(10);
        p.put(b);
        assert_eq!(p.bytes(), 64 * 1024 + 4096, "a 4 KiB buffer is still kept");
    }

    /// What a READ is charged is what its buffer holds: a small READ after large ones
    /// never gets a large pooled buffer.
    #[test]
    fn a_buffer_holds_no_more_than_its_charge() {
        let p = Pool::new(1 << 20);
        let big: Vec<_> = (0..4).map(|_| p.get(SENDFILE_MIN - 1)).collect();
        for b in big {
            assert_eq!(b.capacity(), class_of(SENDFILE_MIN - 1));
            p.put(b);
        }
        for len in [1, 512, 4096, 4097, 12_000, 40_000, SENDFILE_MIN - 1] {
            let b = p.get(len);
            assert_eq!(b.len(), len as usize);
            assert_eq!(b.capacity(), class_of(len), "READ of {len}");
            p.put(b);
        }
        // A buffer of no class (grown elsewhere) is not kept.
        let before = p.bytes();
        p.put(Vec::with_capacity(5000));
        assert_eq!(p.bytes(), before);
    }

    struct Session {
        _dir: tempfile::TempDir,
        img: Vec<u8>,
        srv: Arc<Server>,
    }

    impl Session {
        /// A session served over an in-memory stream: (its task, the client's halves).
        #[allow(clippy::type_complexity)]
        fn spawn(
            &self,
        ) -> (
            tokio::task::JoinHandle<Result<Option<String>, SessionError>>,
            tokio::io::ReadHalf<tokio::io::DuplexStream>,
            tokio::io::WriteHalf<tokio::io::DuplexStream>,
        ) {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let srv = self.srv.clone();
            let run = tokio::spawn(async move {
                srv.serve_stream(server, "192.0.2.1".parse().unwrap()).await
            });
            let (crd, cwr) = tokio::io::split(client);
            (run, crd, cwr)
        }
    }

    fn session(per_conn: usize, all: usize) -> Session {
        let dir = tempfile::tempdir().unwrap();
        let img: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.path().join("root.img");
        std::fs::write(&path, &img).unwrap();
        let cfg = NbdConfig::for_tests(path, per_conn, all, Duration::from_secs(1));
        let srv = Server::new(cfg, Arc::new(Status::default()));
        Session {
            _dir: dir,
            img,
            srv,
        }
    }

    /// Client bytes up to transmission: fixed newstyle, no zeroes, EXPORT_NAME "root".
    fn hello() -> Vec<u8> {
        let mut b = (w::CLIENT_FIXED_NEWSTYLE | w::CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        b.extend_from_slice(&w::option_header(w::OPT_EXPORT_NAME, 4));
        b.extend_from_slice(b"root");
        b
    }

    fn read_req(cookie: u64, offset: u64, len: u32) -> [u8; w::REQUEST_LEN] {
        w::encode_request(&w::Request {
            flags: 0,
            kind: w::CMD_READ,
            cookie,
            offset,
            len,
        })
    }

    /// A client that sends READs and never takes a reply: the server stops reading it,
    /// holds no more than the connection's budget, and closes it after the write timeout
    /// with every byte given back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_takes_no_replies_is_not_read_and_is_closed() {
        let s = session(16 * 1024, 1 << 20);
        let (run, mut crd, mut cwr) = s.spawn();
        // The greeting and export answer only, then never read again.
        let mut g = [0u8; 18 + 10];
        let sender = tokio::spawn(async move {
            cwr.write_all(&hello()).await?;
            for i in 0..100_000u64 {
                cwr.write_all(&read_req(i, (i * 4096) % (1 << 20), 4096))
                    .await?;
            }
            std::io::Result::Ok(())
        });
        crd.read_exact(&mut g).await.unwrap();
        let r = run.await.unwrap();
        let e = r.expect_err("closed for its write timeout").to_string();
        assert!(e.contains("no write progress"), "{e}");
        let reads = s.srv.status.nbd_reads.load(Relaxed);
        assert!(reads > 0 && reads < 1000, "{reads} requests were read");
        assert!(s.srv.budget.peak() <= 16 * 1024, "{}", s.srv.budget.peak());
        assert!(s.srv.budget.peak() > 0);
        assert_eq!(s.srv.budget.used(), 0, "charges given back at close");
        drop(crd);
        assert!(
            sender.await.unwrap().is_err(),
            "the client's sends were not all taken"
        );
    }

    /// With the server-wide budget spent, READs still get their data (by the unbuffered
    /// path) instead of waiting or failing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_past_the_server_budget_are_still_served() {
        // Any per-connection setting is accepted, however large.
        let s = session(usize::MAX, 8 * 1024);
        let (run, mut crd, mut cwr) = s.spawn();
        let n = 300u64;
        let sender = tokio::spawn(async move {
            cwr.write_all(&hello()).await?;
            for i in 0..n {
                cwr.write_all(&read_req(i, i * 3000, 3000)).await?;
            }
            cwr.write_all(&w::encode_request(&w::Request {
                flags: 0,
                kind: w::CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }))
            .await?;
            std::io::Result::Ok(())
        });
        let mut g = [0u8; 18 + 10];
        crd.read_exact(&mut g).await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..n {
            let mut h = [0u8; w::SIMPLE_REPLY_LEN];
            crd.read_exact(&mut h).await.unwrap();
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            assert_eq!(error, 0);
            let mut d = vec![0u8; 3000];
            crd.read_exact(&mut d).await.unwrap();
            let off = cookie as usize * 3000;
            assert!(d == s.img[off..off + 3000], "data of cookie {cookie}");
            assert!(seen.insert(cookie));
        }
        sender.await.unwrap().unwrap();
        assert_eq!(run.await.unwrap().unwrap().as_deref(), Some("root"));
        assert!(s.srv.budget.peak() <= 8 * 1024);
        assert_eq!(s.srv.budget.used(), 0);
    }

    /// Over a real TCP connection, a client that sends READs and never takes the replies
    /// makes the kernel hold a bounded amount for it on the server's side: the send queue
    /// (`ss` Send-Q) stays near the unsent bound instead of growing to `tcp_wmem`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_kernel_queues_of_a_client_that_takes_no_replies_are_bounded() {
        let s = session(1 << 20, 8 << 20);
        // The test's own server: session()'s has a 1 s write timeout, and this client
        // must stay connected while the queues are looked at.
        let mut cfg = s.srv.cfg.clone();
        cfg.write_timeout = Duration::from_secs(60);
        let srv = Server::new(cfg, Arc::new(Status::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let run = tokio::spawn(srv.clone().run(listener));
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut c = sock.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let mut g = [0u8; 18];
        c.read_exact(&mut g).await.unwrap();
        c.write_all(&hello()).await.unwrap();
        let mut info = [0u8; 10];
        c.read_exact(&mut info).await.unwrap();
        // Large READs (sendfile, no user-space budget) and small ones, never read.
        let mut b = Vec::new();
        for i in 0..4000u64 {
            let len = if i % 2 == 0 { 256 * 1024 } else { 4096 };
            b.extend_from_slice(&read_req(i, (i * 4096) % (512 * 1024), len));
        }
        let (_crd, mut cwr) = c.into_split();
        // The write half is kept open after the last request: a FIN would let the server
        // finish and close instead of keeping the connection.
        let sender = tokio::spawn(async move {
            cwr.write_all(&b).await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(cwr);
            std::io::Result::Ok(())
        });
        // Until the queue stops growing (a loaded host may take a while), then bounded:
        // at least half the unsent bound (the flood did fill it), at most it plus slack.
        let send_q = |port: u16| -> u64 {
            let out = std::process::Command::new("ss")
                .args(["-tnH", "state", "established", &format!("sport = :{port}")])
                .output()
                .expect("ss (iproute2) runs");
            assert!(
                out.status.success(),
                "ss: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let q: Vec<u64> = text
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
                .collect();
            assert_eq!(q.len(), 1, "one server-side connection: {text:?}");
            q[0]
        };
        let mut seen = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen.push(send_q(port));
            let n = seen.len();
            if n >= 3 && seen[n - 1] == seen[n - 2] && seen[n - 2] == seen[n - 3] {
                break;
            }
        }
        let q = *seen.last().unwrap();
        let unsent = crate::limits::UNSENT_BYTES as u64;
        assert!(q >= unsent / 2, "the queue never filled: {seen:?}");
        // Unsent bound plus what the client's tiny window took and one skb of slack.
        assert!(
            q <= unsent + 192 * 1024,
            "server holds {q} bytes for a client that reads nothing ({seen:?})"
        );
        assert!(srv.status.nbd_reads.load(Relaxed) > 0);
        sender.abort();
        run.abort();
    }

    /// A traced session: one `C` record for the connection, then one `R` record per
    /// request with its command, range, error and a reply time not before the request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_traced_session_records_every_request() {
        let s = session(1 << 20, 8 << 20);
        let trace = s._dir.path().join("trace.txt");
        let status = Arc::new(Status::default());
        let tracer = Tracer::open(&trace, status.clone()).unwrap();
        let srv = Server::with_tracer(s.srv.cfg.clone(), status.clone(), Some(tracer));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let srv2 = srv.clone();
        let run = tokio::spawn(async move {
            srv2.serve_stream(server, "192.0.2.7".parse().unwrap())
                .await
        });
        let (mut crd, mut cwr) = tokio::io::split(client);
        let req = |kind, cookie, offset, len| {
            w::encode_request(&w::Request {
                flags: 0,
                kind,
                cookie,
                offset,
                len,
            })
        };
        let mut b = hello();
        b.extend_from_slice(&req(w::CMD_READ, 1, 4096, 4096));
        // Large enough for the unbuffered path.
        b.extend_from_slice(&req(w::CMD_READ, 2, 65536, 131072));
        b.extend_from_slice(&req(w::CMD_READ, 3, 1 << 20, 4096));
        b.extend_from_slice(&req(w::CMD_FLUSH, 4, 0, 0));
        cwr.write_all(&b).await.unwrap();
        let mut g = [0u8; 18 + 10];
        crd.read_exact(&mut g).await.unwrap();
        for _ in 0..4 {
            let mut h = [0u8; w::SIMPLE_REPLY_LEN];
            crd.read_exact(&mut h).await.unwrap();
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            let len = match (cookie, error) {
                (1, 0) => 4096,
                (2, 0) => 131072,
                _ => 0,
            };
            let mut d = vec![0u8; len];
            crd.read_exact(&mut d).await.unwrap();
        }
        cwr.write_all(&req(w::CMD_DISC, 5, 0, 0)).await.unwrap();
        assert_eq!(run.await.unwrap().unwrap().as_deref(), Some("root"));
        // The last holder of the tracer writes out and closes the file.
        drop(srv);
        let text = std::fs::read_to_string(&trace).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], nbd_trace::HEADER, "{text}");
        let conn: Vec<&str> = lines[1].split(' ').collect();
        assert_eq!(conn[0], "C", "{text}");
        assert_eq!(&conn[2..], ["1", "192.0.2.7", "root", "1048576"], "{text}");
        let mut reqs: Vec<Vec<u64>> = Vec::new();
        let mut cmds = Vec::new();
        for l in lines.iter().filter(|l| l.starts_with("R ")) {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 8, "{l}");
            cmds.push(f[3].to_string());
            let n: Vec<u64> = [1, 2, 4, 5, 6, 7]
                .iter()
                .map(|&i| f[i].parse().unwrap())
                .collect();
            // Reply written after the request was read, and after the connection began.
            assert!(n[4] >= n[0] && n[0] >= conn[1].parse().unwrap(), "{l}");
            assert_eq!(n[1], 1, "connection id: {l}");
            reqs.push(n);
        }
        // Request order is by request time.
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.sort_by_key(|&i| reqs[i][0]);
        let got: Vec<(&str, u64, u64, u64)> = order
            .iter()
            .map(|&i| (cmds[i].as_str(), reqs[i][2], reqs[i][3], reqs[i][5]))
            .collect();
        assert_eq!(
            got,
            [
                ("read", 4096, 4096, 0),
                ("read", 65536, 131072, 0),
                ("read", 1 << 20, 4096, w::EINVAL as u64),
                ("flush", 0, 0, 0),
                ("disc", 0, 0, 0),
            ],
            "{text}"
        );
        assert_eq!(lines.last(), Some(&"# dropped 0"), "{text}");
        assert_eq!(status.nbd_trace_dropped.load(Relaxed), 0);
    }

    /// An option longer than any that names one of our exports is skipped unread into
    /// memory: ERR_TOO_BIG, and the negotiation goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_option_too_long_for_any_export_is_refused_and_negotiation_goes_on() {
        let s = session(1 << 20, 1 << 20);
        let (run, mut crd, mut cwr) = s.spawn();
        let mut g = [0u8; 18];
        crd.read_exact(&mut g).await.unwrap();
        let mut b = (w::CLIENT_FIXED_NEWSTYLE | w::CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        let long = w::info_request(&"x".repeat(3000), &[]);
        b.extend_from_slice(&w::option_header(w::OPT_GO, long.len() as u32));
        b.extend_from_slice(&long);
        let go = w::info_request("root", &[]);
        b.extend_from_slice(&w::option_header(w::OPT_GO, go.len() as u32));
        b.extend_from_slice(&go);
        b.extend_from_slice(&w::encode_request(&w::Request {
            flags: 0,
            kind: w::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }));
        cwr.write_all(&b).await.unwrap();
        let mut h = [0u8; 20];
        crd.read_exact(&mut h).await.unwrap();
        let h = w::parse_option_reply_header(&h).unwrap();
        assert_eq!(h.reply, w::REP_ERR_TOO_BIG);
        let mut d = vec![0u8; h.len as usize];
        crd.read_exact(&mut d).await.unwrap();
        assert_eq!(run.await.unwrap().unwrap().as_deref(), Some("root"));
    }

    /// send_range sends exactly the asked range, whether it fits the pipe or not, and
    /// leaves the pipe empty for the next reply.
    #[tokio::test]
    async fn spliced_ranges_arrive_whole_and_in_order() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * PIPE_BYTES as u32 + 123)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (srv, _) = l.accept().await.unwrap();
        let pipes = Pipes::new(1, Arc::new(Status::default()));
        let ranges = [
            (0u64, 4096usize),
            (5, PIPE_BYTES as usize + 7),
            (PIPE_BYTES as u64 - 3, 2 * PIPE_BYTES as usize + 11),
            (data.len() as u64 - 100, 100),
        ];
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let reader = tokio::spawn(async move {
            let mut c = client;
            let mut got = vec![0u8; total];
            c.read_exact(&mut got).await.unwrap();
            got
        });
        for (off, len) in ranges {
            send_range(&srv, &f, off, len, Duration::from_secs(10), &pipes)
                .await
                .unwrap();
        }
        let got = reader.await.unwrap();
        let mut at = 0;
        for (off, len) in ranges {
            assert!(
                got[at..at + len] == data[off as usize..off as usize + len],
                "range {off}+{len}"
            );
            at += len;
        }
        // The one pipe went back each time: it is still the only one made.
        assert_eq!(pipes.made(), 1);
        let spliced = pipes.status.nbd_spliced_bytes.load(Relaxed);
        assert_eq!(spliced, total as u64, "every byte through the pipe");
        assert_eq!(pipes.status.nbd_sendfile_bytes.load(Relaxed), 0);
    }

    /// A file of `len` patterned bytes, and a connected pair whose client has a small
    /// receive buffer and whose server has a small send buffer: a socket that fills.
    async fn small_pair(len: u32) -> (File, Vec<u8>, TcpStream, TcpStream) {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        c.set_recv_buffer_size(16 << 10).unwrap();
        c.connect(&l.local_addr().unwrap().into()).unwrap();
        c.set_nonblocking(true).unwrap();
        let client = TcpStream::from_std(c.into()).unwrap();
        let (srv, _) = l.accept().await.unwrap();
        socket2::SockRef::from(&srv)
            .set_send_buffer_size(64 << 10)
            .unwrap();
        (f, data, client, srv)
    }

    /// Reads `n` bytes slowly, so that the server's socket fills again and again.
    fn slow_reader(mut c: TcpStream, n: usize) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let mut got = vec![0u8; n];
            for chunk in got.chunks_mut(64 << 10) {
                c.read_exact(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            got
        })
    }

    /// A step that fills the pipe with more than the socket takes drops the rest from
    /// the pipe, which comes back empty; the next steps read those bytes again, so the
    /// client gets every byte once and in order, step after short step.
    #[tokio::test]
    async fn bytes_a_full_socket_refused_are_sent_again_not_lost() {
        let (f, data, client, srv) = small_pair(3 << 20).await;
        let pipes = Pipes::new(1, Arc::new(Status::default()));
        let refused = || pipes.status.nbd_splice_refused_bytes.load(Relaxed);
        let mut p = pipes.take().expect("a pipe");
        let (took, filled) =
            splice_step(&srv, &f, 0, data.len(), PIPE_BYTES as usize, &mut p).unwrap();
        assert_eq!(filled, PIPE_BYTES as usize);
        assert!(took < filled, "took {took} of {filled}");
        assert_eq!(p.held, 0, "the refused bytes left the pipe");
        drop(p);
        assert_eq!(pipes.made(), 1, "an empty pipe goes back to the pool");
        assert_eq!(refused(), (filled - took) as u64);
        // The rest, every step overfilled: each short step must count what it sent.
        let before = refused();
        let reader = slow_reader(client, data.len());
        let rest = data.len() - took;
        let t = Duration::from_secs(20);
        send_range_with(&srv, &f, took as u64, rest, t, &pipes, |_| 1 << 20)
            .await
            .unwrap();
        assert!(reader.await.unwrap() == data, "every byte once, in order");
        assert!(refused() > before, "the steps were short ones");
        assert_eq!(pipes.status.nbd_spliced_bytes.load(Relaxed), rest as u64);
        assert_eq!(pipes.made(), 1);
    }

    /// With no pipe to be had, a reply goes by sendfile, whole and in order; with the
    /// one pipe taken for a while, a reply goes partly each way.
    #[tokio::test]
    async fn without_a_free_pipe_a_reply_goes_by_sendfile() {
        let (f, data, client, srv) = small_pair(2 << 20).await;
        let none = Pipes::new(0, Arc::new(Status::default()));
        let reader = slow_reader(client, data.len());
        let t = Duration::from_secs(20);
        send_range(&srv, &f, 0, data.len(), t, &none).await.unwrap();
        assert!(reader.await.unwrap() == data);
        let sent = none.status.nbd_sendfile_bytes.load(Relaxed);
        assert_eq!(sent, data.len() as u64);
        assert_eq!(none.status.nbd_spliced_bytes.load(Relaxed), 0);

        let (f, data, client, srv) = small_pair(2 << 20).await;
        let one = Pipes::new(1, Arc::new(Status::default()));
        let reader = slow_reader(client, data.len());
        let held = one.take().expect("the pipe");
        let release = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(held);
        };
        let (r, ()) = tokio::join!(send_range(&srv, &f, 0, data.len(), t, &one), release);
        r.unwrap();
        assert!(
            reader.await.unwrap() == data,
            "whole and in order across the switch"
        );
        let by_file = one.status.nbd_sendfile_bytes.load(Relaxed);
        let by_pipe = one.status.nbd_spliced_bytes.load(Relaxed);
        assert!(
            by_file > 0 && by_pipe > 0,
            "sendfile {by_file}, spliced {by_pipe}"
        );
        assert_eq!(by_file + by_pipe, data.len() as u64);
    }

    /// The kernel answers what the estimate reads, and on a socket set up as the server
    /// sets up its connections the estimate is at least a segment and within the buffer.
    #[tokio::test]
    async fn the_room_estimate_reads_the_kernel() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (srv, _) = l.accept().await.unwrap();
        crate::limits::bound_kernel_queues(&srv, "test", Duration::from_secs(30));
        let i = tcp_info(&srv).expect("TCP_INFO");
        let m = meminfo(&srv).expect("SO_MEMINFO");
        let sndbuf = socket2::SockRef::from(&srv).send_buffer_size().unwrap();
        assert_eq!(m[MEM_SNDBUF] as usize, sndbuf);
        let lowat = crate::limits::UNSENT_BYTES;
        let room = send_room(&srv, lowat);
        let mss = i.tcpi_snd_mss as usize;
        assert!(mss > 0);
        assert!(
            room >= mss && room <= sndbuf,
            "room {room}, mss {mss}, sndbuf {sndbuf}"
        );
        // Idle and empty: at least the whole unsent allowance.
        assert!(room >= lowat as usize, "room {room}");
    }

    /// A range past the image's end is an error, and the pipe goes back empty.
    #[tokio::test]
    async fn a_short_image_ends_the_reply_with_an_error() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (srv, _) = l.accept().await.unwrap();
        let pipes = Pipes::new(2, Arc::new(Status::default()));
        let e = send_range(&srv, &f, 0, 8192, Duration::from_secs(10), &pipes)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
        assert_eq!(
            pipes.made(),
            1,
            "the pipe was empty at the short read: kept"
        );
        assert!(pipes.take().is_some());
        assert_eq!(pipes.made(), 1, "and it is the one taken again");
    }

    /// A client that takes nothing keeps no pipe: while its reply waits for room, and
    /// after it times out or is cancelled, the pool's one pipe is free for others.
    #[tokio::test]
    async fn a_client_that_stops_reading_keeps_no_pipe() {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![9u8; 16 << 20]).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (srv, _) = l.accept().await.unwrap();
        // A fixed send buffer: 16 MiB can never fit, whatever the host's tcp_wmem.
        socket2::SockRef::from(&srv)
            .set_send_buffer_size(1 << 20)
            .unwrap();
        let pipes = Pipes::new(1, Arc::new(Status::default()));
        let e = send_range(&srv, &f, 0, 16 << 20, Duration::from_millis(200), &pipes)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert_eq!(pipes.made(), 1);
        // What was counted as sent is exactly what the client can still read.
        drop(srv);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let spliced = pipes.status.nbd_spliced_bytes.load(Relaxed);
        assert_eq!(spliced, got.len() as u64);
        // A second stalled reply, still waiting: another reply gets the pipe meanwhile
        // (no second one is made), and cancelling the stalled one closes nothing.
        let _client2 = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (srv2, _) = l.accept().await.unwrap();
        let mut stalled = Box::pin(send_range(
            &srv2,
            &f,
            0,
            16 << 20,
            Duration::from_secs(30),
            &pipes,
        ));
        let sent = tokio::time::timeout(Duration::from_millis(100), &mut stalled).await;
        assert!(sent.is_err(), "the reply cannot finish: nobody reads");
        drop(pipes.take().expect("the pipe is free"));
        assert_eq!(pipes.made(), 1);
        drop(stalled);
        assert_eq!(pipes.made(), 1, "one pipe, never closed");
    }

    /// At most `max` pipes exist; past that, take() says "use sendfile".
    #[test]
    fn pipes_stop_at_their_cap() {
        let pipes = Pipes::new(2, Arc::new(Status::default()));
        let a = pipes.take().expect("first");
        let b = pipes.take().expect("second");
        assert!(pipes.take().is_none());
        drop(a);
        assert!(pipes.take().is_some(), "a returned pipe is taken again");
        drop(b);
        assert_eq!(pipes.made(), 2);
    }
}
