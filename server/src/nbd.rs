//! Read-only NBD: fixed newstyle negotiation, then pipelined transmission. One task reads
//! requests, each READ runs as its own task (so replies go out in completion order, as the
//! kernel allows), one task writes replies and batches them into few syscalls.
//!
//! An export's image is opened when a client selects it and that open file is kept for the
//! whole connection: renaming a new image over the path changes only later connections.

use crate::config::{Export, NbdConfig};
use crate::identity::Identities;
use crate::limits::PerClient;
use crate::status::Status;
use ltsp_common::nbd::{self as w, InfoRequest};
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// Transmission flags of every export: read-only, and safe to open many connections to.
pub const EXPORT_FLAGS: u16 = w::TFLAG_HAS_FLAGS | w::TFLAG_READ_ONLY | w::TFLAG_CAN_MULTI_CONN;
/// Requests a connection may have in flight before the server stops reading more.
const MAX_IN_FLIGHT: usize = 256;
/// Replies gathered into one writev.
const BATCH: usize = 64;

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

pub struct Server {
    cfg: NbdConfig,
    status: Arc<Status>,
    conns: Arc<Semaphore>,
    per_client: Arc<PerClient>,
    ids: Identities,
}

/// What a connection serves once negotiated.
pub struct Opened {
    pub name: String,
    pub file: File,
    pub size: u64,
}

impl Server {
    pub fn new(cfg: NbdConfig, status: Arc<Status>) -> Arc<Self> {
        let conns = Arc::new(Semaphore::new(cfg.max_connections));
        let per_client = PerClient::new(cfg.max_connections_per_client);
        Arc::new(Server {
            cfg,
            status,
            conns,
            per_client,
            ids: Identities::default(),
        })
    }

    /// Hashes every export now, so the first node does not wait for it.
    fn hash_exports(self: &Arc<Self>) {
        for e in self.cfg.exports.clone() {
            let me = self.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let id = match File::open(&e.path) {
                    Ok(f) => me.ids.of(&f).await,
                    Err(err) => Err(err),
                };
                match id {
                    Ok(id) => {
                        log::info!(
                            "nbd: export {:?}: {id} (hashed in {:.2} s)",
                            e.name,
                            t.elapsed().as_secs_f64()
                        );
                        me.status.export_ready(&e.name, &id);
                    }
                    Err(err) => log::warn!("nbd: export {:?}: {}: {err}", e.name, e.path.display()),
                }
            });
        }
    }

    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        self.hash_exports();
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
                log::warn!(
                    "nbd: {peer}: refused: {} connections open",
                    self.cfg.max_connections
                );
                continue;
            };
            let Some(slot) = self.per_client.try_acquire(peer.ip()) else {
                log::warn!(
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
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        let t = self.cfg.handshake_timeout;
        let opened = match tokio::time::timeout(t, self.negotiate(&mut rd, &mut wr)).await {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::HandshakeTimeout(t)),
        };
        let Some(opened) = opened else {
            return Ok(None);
        };
        log::info!(
            "nbd: {peer}: export {:?} ({} bytes) connected",
            opened.name,
            opened.size
        );
        let name = opened.name.clone();
        // Replies are written with writev straight to the socket, not through the buffer.
        wr.flush().await?;
        self.status.nbd_connected(peer.ip(), &name);
        let r = transmit(
            rd,
            wr.into_inner(),
            Arc::new(opened),
            self.cfg.idle_timeout,
            &self.status,
        )
        .await;
        self.status.nbd_closed(peer.ip());
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

    fn open(&self, name: &str) -> Result<Opened, u32> {
        let e = self.lookup(name).ok_or(w::REP_ERR_UNKNOWN)?;
        let file = File::open(&e.path).map_err(|err| {
            log::error!("nbd: export {:?}: {}: {err}", e.name, e.path.display());
            w::REP_ERR_UNKNOWN
        })?;
        let size = file.metadata().map_err(|_| w::REP_ERR_UNKNOWN)?.len();
        Ok(Opened {
            name: e.name.clone(),
            file,
            size,
        })
    }

    /// Fixed newstyle negotiation. `Ok(None)`: the client aborted or left cleanly.
    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Opened>, SessionError>
    where
        R: AsyncRead + Unpin,
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
            let mut data = vec![0u8; h.len as usize];
            rd.read_exact(&mut data).await?;
            match h.option {
                w::OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    // This option has no error reply: an unknown name can only be a close.
                    let Ok(o) = self.open(&name) else {
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
                    let o = match self.open(&req.name) {
                        Ok(o) => o,
                        Err(code) => {
                            let msg = format!("no export named {:?}", req.name);
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
                w::INFO_DESCRIPTION => {
                    let id = match self.ids.of(&o.file).await {
                        Ok(id) => Some(id),
                        Err(e) => {
                            log::error!("nbd: export {:?}: hashing the image: {e}", o.name);
                            None
                        }
                    };
                    d.extend_from_slice(describe(o, id.as_deref()).as_bytes())
                }
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
/// content hash ([`crate::identity`]), equal on every server that has a copy.
pub fn describe(o: &Opened, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("ltsp-rs image {} size={} id={id}", o.name, o.size),
        None => format!("ltsp-rs image {} size={}", o.name, o.size),
    }
}

/// One reply on its way to the writer: header plus data for a successful READ.
struct Reply {
    header: [u8; w::SIMPLE_REPLY_LEN],
    data: Vec<u8>,
    /// A large READ sent with sendfile(2) by the writer: (image, offset, length).
    file: Option<(Arc<Opened>, u64, u32)>,
}

/// READs at least this large go page cache -> socket with sendfile (one copy less);
/// smaller ones are read into pooled buffers and batched into one writev.
const SENDFILE_MIN: u32 = 64 * 1024;

async fn transmit<R>(
    mut rd: R,
    wr: OwnedWriteHalf,
    img: Arc<Opened>,
    idle: Option<std::time::Duration>,
    status: &Status,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
{
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    let pool = Arc::new(Pool::default());
    let writer = tokio::spawn(write_replies(wr, rx, pool.clone()));
    let result = read_requests(&mut rd, &tx, &img, &pool, idle, status).await;
    // Dropping our sender lets the writer finish once every in-flight READ has replied:
    // NBD_CMD_DISC "finishes what is in flight".
    drop(tx);
    let written = writer.await.unwrap_or(Ok(()));
    result?;
    written.map_err(SessionError::Io)
}

async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    tx: &mpsc::Sender<Reply>,
    img: &Arc<Opened>,
    pool: &Arc<Pool>,
    idle: Option<std::time::Duration>,
    status: &Status,
) -> Result<(), SessionError> {
    let mut hdr = [0u8; w::REQUEST_LEN];
    let mut drain = vec![0u8; 64 * 1024];
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
        let error = match req.kind {
            w::CMD_READ => {
                if let Some(e) = check_range(&req, img.size) {
                    e
                } else if req.len >= SENDFILE_MIN {
                    status.nbd_read(req.len);
                    tx.send(Reply {
                        header: w::simple_reply(0, req.cookie),
                        data: Vec::new(),
                        file: Some((img.clone(), req.offset, req.len)),
                    })
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer ended")
                    })?;
                    continue;
                } else {
                    status.nbd_read(req.len);
                    let permit = tx.clone().reserve_owned().await.map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer ended")
                    })?;
                    // From the page cache (the common case) the read is done here, at once.
                    // A cache miss would block: that READ goes to its own task and its reply
                    // overtakes nothing it should not, while later READs go on.
                    let mut data = pool.get(req.len as usize);
                    if read_cached(&img.file, &mut data, req.offset) {
                        permit.send(Reply {
                            header: w::simple_reply(0, req.cookie),
                            data,
                            file: None,
                        });
                        continue;
                    }
                    pool.put(data);
                    let img = img.clone();
                    let pool = pool.clone();
                    // A thread of the blocking pool: a disk read must not stall the
                    // event loop every other client is served from.
                    tokio::task::spawn_blocking(move || {
                        let mut data = pool.get(req.len as usize);
                        let error = match img.file.read_exact_at(&mut data, req.offset) {
                            Ok(()) => 0,
                            Err(e) => {
                                log::error!("nbd: read {}+{}: {e}", req.offset, req.len);
                                data = Vec::new();
                                w::EIO
                            }
                        };
                        permit.send(Reply {
                            header: w::simple_reply(error, req.cookie),
                            data,
                            file: None,
                        });
                    });
                    continue;
                }
            }
            w::CMD_WRITE => {
                // The payload follows the header whatever the answer: drain it, or the
                // next "request" would be the client's data.
                let mut left = req.len as usize;
                while left > 0 {
                    let n = left.min(drain.len());
                    rd.read_exact(&mut drain[..n]).await?;
                    left -= n;
                }
                w::EPERM
            }
            w::CMD_TRIM | w::CMD_WRITE_ZEROES => w::EPERM,
            w::CMD_FLUSH => 0,
            w::CMD_DISC => return Ok(()),
            _ => w::EINVAL,
        };
        tx.send(Reply {
            header: w::simple_reply(error, req.cookie),
            data: Vec::new(),
            file: None,
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer ended"))?;
    }
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

async fn write_replies(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Reply>,
    pool: Arc<Pool>,
) -> std::io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(BATCH);
    while let Some(r) = rx.recv().await {
        batch.push(r);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // Runs of buffered replies go out in one writev (one syscall for many small
        // replies); a sendfile reply is its header with MSG_MORE, then the file's pages.
        let mut i = 0;
        while i < batch.len() {
            let j = batch[i..]
                .iter()
                .position(|r| r.file.is_some())
                .map_or(batch.len(), |k| i + k);
            if j > i {
                write_buffered(&mut wr, &batch[i..j]).await?;
            }
            if j < batch.len() {
                let (img, offset, len) = batch[j].file.clone().expect("a sendfile reply");
                send_with_more(&wr, &batch[j].header).await?;
                send_file(&wr, &img.file, offset, len as usize).await?;
                i = j + 1;
            } else {
                i = j;
            }
        }
        for r in batch.drain(..) {
            pool.put(r.data);
        }
    }
    wr.shutdown().await
}

async fn write_buffered(wr: &mut OwnedWriteHalf, replies: &[Reply]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(replies.len() * 2);
    for r in replies {
        slices.push(IoSlice::new(&r.header));
        if !r.data.is_empty() {
            slices.push(IoSlice::new(&r.data));
        }
    }
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = wr.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// The reply header, with MSG_MORE so it leaves in the same segment as the data after it.
async fn send_with_more(wr: &OwnedWriteHalf, mut b: &[u8]) -> std::io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    let sock = wr.as_ref();
    while !b.is_empty() {
        sock.writable().await?;
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

/// `len` bytes of `file` from `offset` into the socket, without a copy through user space.
/// The header already promised the data: a short or failed read ends the connection.
async fn send_file(
    wr: &OwnedWriteHalf,
    file: &File,
    offset: u64,
    len: usize,
) -> std::io::Result<()> {
    let sock = wr.as_ref();
    let mut off = offset as i64;
    let mut left = len;
    while left > 0 {
        sock.writable().await?;
        match sock.try_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile64(sock, file, Some(&mut off), left)
                .map_err(std::io::Error::from)
        }) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "image shorter than its size",
                ))
            }
            Ok(n) => left -= n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read buffers reused across requests: a fresh 256 KiB allocation per READ would be
/// mmap'ed, faulted in page by page and unmapped again.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        // Shrinking is free; only growth is zero-filled. The read overwrites all `len`
        // bytes before any is sent.
        b.resize(len, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        if b.capacity() == 0 {
            return;
        }
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < MAX_IN_FLIGHT {
            v.push(b);
        }
    }
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
}
