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
use std::collections::HashMap;
use std::fs::File;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Semaphore};
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
/// netascii conversions).
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

/// LF -> CR LF and CR -> CR NUL (RFC 1350 netascii).
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
    slots: Arc<Semaphore>,
    per_client: Arc<crate::limits::PerClient>,
    status: Arc<crate::status::Status>,
    /// boot.ipxe goes by HTTP from this port (`[boot] http`).
    http_port: Option<u16>,
    /// Single-port mode: the transfers in progress, by client address.
    active: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
}

impl Server {
    /// `files`: the TFTP root, opened once and shared with HTTP. `http_port`: the boot
    /// files go by HTTP from this port (`[boot] http`).
    pub fn new(
        cfg: TftpConfig,
        files: Arc<BootFiles>,
        status: Arc<crate::status::Status>,
        http_port: Option<u16>,
    ) -> Result<Arc<Self>, TftpError> {
        let slots = Arc::new(Semaphore::new(cfg.max_transfers));
        let per_client = crate::limits::PerClient::new(cfg.max_transfers_per_client);
        Ok(Arc::new(Server {
            cfg,
            files,
            slots,
            per_client,
            status,
            http_port,
            active: Mutex::new(HashMap::new()),
        }))
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
                    continue;
                }
            };
            if self.cfg.single_port {
                let tx = self.active.lock().unwrap().get(&peer).cloned();
                if let Some(tx) = tx {
                    // A full queue means the transfer is behind: drop, as a network would.
                    let _ = tx.try_send(buf[..n].to_vec());
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
                    let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                        log::warn!(
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
                    let Some(slot) = self.per_client.try_acquire(peer.ip()) else {
                        log::warn!(
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
                    let me = self.clone();
                    let link = if self.cfg.single_port {
                        let (tx, rx) = mpsc::channel(64);
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
                        me.transfer(req, peer, local, link).await;
                        if single {
                            me.active.lock().unwrap().remove(&peer);
                        }
                        drop((permit, slot));
                    });
                }
                Packet::Wrq(req) => {
                    log::info!("tftp: {peer}: refused write of {:?}", req.filename);
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
    fn open(&self, filename: &str, mode: &str, local: IpAddr) -> Result<Source, Refusal> {
        let src = match self.files.lookup(filename, local, self.http_port)?.content {
            Content::File(f, len) => Source::File(f, len),
            Content::Generated(s) => Source::Memory(s.into_bytes()),
        };
        match mode {
            "octet" => Ok(src),
            "netascii" => {
                let mut data = vec![0u8; src.len() as usize];
                src.read_at(&mut data, 0)
                    .map_err(|e| Refusal::new(tftp::ERR_ACCESS, e.to_string()))?;
                Ok(Source::Memory(to_netascii(&data)))
            }
            m => Err(Refusal::new(
                tftp::ERR_ILLEGAL_OP,
                format!("transfer mode {m:?} not supported"),
            )),
        }
    }

    /// One transfer. `link` is given in single-port mode; else a fresh socket is bound.
    async fn transfer(
        &self,
        req: tftp::Request,
        peer: SocketAddr,
        local: IpAddr,
        link: Option<Link>,
    ) {
        let started = std::time::Instant::now();
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
        let src = match self.open(&req.filename, &req.mode, local) {
            Ok(s) => s,
            Err(r) => {
                self.status.tftp_done(peer.ip(), &req.filename, 0, false);
                log::info!("tftp: {peer}: {:?}: {}", req.filename, r.message);
                let _ = sock.send_to(&tftp::error(r.code, &r.message), peer).await;
                return;
            }
        };
        let default_timeout = self.cfg.timeout.as_secs().clamp(1, 255) as u8;
        let (neg, mut accepted) = tftp::negotiate(&req, default_timeout, self.cfg.max_windowsize);
        for (k, v) in &mut accepted {
            if k == "tsize" {
                *v = src.len().to_string();
            }
        }
        let mut t = Transfer {
            sock,
            peer,
            src,
            ahead: Ahead::default(),
            blksize: neg.blksize as usize,
            window: neg.windowsize as u64,
            timeout: Duration::from_secs(neg.timeout_secs as u64),
            retries: self.cfg.retries,
        };
        let r = t.run(&accepted).await;
        let len = t.src.len();
        self.status
            .tftp_done(peer.ip(), &req.filename, len, r.is_ok());
        match r {
            Ok(()) => log::info!(
                "tftp: {peer}: sent {:?} ({} bytes, blksize {}, windowsize {}) in {:.3}s",
                req.filename,
                len,
                t.blksize,
                t.window,
                started.elapsed().as_secs_f64()
            ),
            Err(e) => log::warn!("tftp: {peer}: {:?}: {e}", req.filename),
        }
    }
}

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
/// (lock-step at blksize 512 would otherwise cost a read per 512 bytes).
#[derive(Default)]
struct Ahead {
    buf: Vec<u8>,
    at: u64,
}

impl Ahead {
    /// Small enough that 200 transfers at once stay within a few MiB.
    const CHUNK: usize = 64 * 1024;

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
        let end = offset + want as u64;
        if offset < self.at || end > self.at + self.buf.len() as u64 {
            let chunk = Self::CHUNK.max(len) / len.max(1) * len.max(1);
            self.buf.resize(chunk, 0);
            let n = src.read_at(&mut self.buf, offset)?;
            self.buf.truncate(n);
            self.at = offset;
        }
        let start = (offset - self.at) as usize;
        out[..want].copy_from_slice(&self.buf[start..start + want]);
        Ok(want)
    }
}

struct Transfer {
    sock: Link,
    peer: SocketAddr,
    src: Source,
    ahead: Ahead,
    blksize: usize,
    window: u64,
    timeout: Duration,
    retries: u32,
}

enum Ack {
    /// The client acknowledged up to this (full, 64-bit) block number.
    Upto(u64),
    Timeout,
}

impl Transfer {
    async fn run(&mut self, oack: &[(String, String)]) -> Result<(), TransferError> {
        // Blocks are numbered from 1; the last one is shorter than blksize (maybe empty).
        let last_block = self.src.len() / self.blksize as u64 + 1;
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
        }
        let mut acked: u64 = 0;
        let mut tries = 0;
        let mut pkt = vec![0u8; 4 + self.blksize];
        loop {
            let end = (acked + self.window).min(last_block);
            for b in acked + 1..=end {
                pkt[..4].copy_from_slice(&tftp::data_header(b as u16));
                let n = self.ahead.read(
                    &self.src,
                    &mut pkt[4..],
                    (b - 1) * self.blksize as u64,
                    self.blksize,
                )?;
                self.sock.send_to(&pkt[..4 + n], self.peer).await?;
            }
            match self.wait_ack(acked, end).await? {
                Ack::Upto(n) => {
                    acked = n;
                    tries = 0;
                    if acked == last_block {
                        return Ok(());
                    }
                }
                Ack::Timeout => {
                    tries += 1;
                    if tries > self.retries {
                        return Err(TransferError::Timeout(tries));
                    }
                }
            }
        }
    }

    /// Waits for an ACK that moves the window: one for a block in (`acked`, `sent`].
    /// Stale and duplicate ACKs are ignored, so they never trigger a resend (no Sorcerer's
    /// Apprentice storm). Datagrams from another port get ERROR 5 and change nothing.
    async fn wait_ack(&mut self, acked: u64, sent: u64) -> Result<Ack, TransferError> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 1024];
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
        for blk in [512usize, 1468, 8192, 65464] {
            let mut a = Ahead::default();
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
        assert_eq!(Ahead::default().read(&mem, &mut out, 4, 4).unwrap(), 1);
        assert_eq!(out[0], b'o');
    }

    #[test]
    fn netascii_conversion() {
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
    }
}
