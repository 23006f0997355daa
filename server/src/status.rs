//! What the server and its nodes are doing: counters, each node's progress, and an HTTP
//! listener for `/healthz` (readiness: every export readable and hashed), `/metrics`
//! (Prometheus text format), `/nodes` (one line per node, for `ltsp-server status`), and
//! the boot files: `/files/PATH` from the TFTP root (same confinement) and `/boot.ipxe`
//! (iPXE fetches a kernel and initramfs over HTTP many times faster than over TFTP).

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, SizeHint};
use hyper::{Request, Response, StatusCode};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// One node's progress, as the server saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Files fetched over TFTP, in order (the last few).
    pub files: Vec<String>,
    pub nbd_open: u32,
    pub export: Option<String>,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// Files remembered per node.
const FILES: usize = 8;
/// Nodes remembered; the longest unseen go first.
const NODES: usize = 10_000;

#[derive(Default)]
pub struct Status {
    pub nbd_open: AtomicU64,
    pub nbd_connections: AtomicU64,
    pub nbd_reads: AtomicU64,
    pub nbd_read_bytes: AtomicU64,
    /// NBD reply bytes held in user space now (the server-wide budget's use).
    pub nbd_reply_bytes: AtomicU64,
    pub tftp_sent: AtomicU64,
    pub tftp_failed: AtomicU64,
    pub tftp_bytes: AtomicU64,
    pub proxy_dhcp_answers: AtomicU64,
    /// Export name -> identity once hashed; None while hashing or unreadable.
    exports: Mutex<BTreeMap<String, Option<String>>>,
    nodes: Mutex<BTreeMap<IpAddr, Node>>,
    /// PXE clients answered by proxyDHCP, by MAC: (file given, unix seconds).
    pxe: Mutex<BTreeMap<String, (String, u64)>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Status {
    pub fn new(exports: impl IntoIterator<Item = String>) -> Arc<Status> {
        let s = Status::default();
        *s.exports.lock().unwrap() = exports.into_iter().map(|e| (e, None)).collect();
        Arc::new(s)
    }

    pub fn export_ready(&self, name: &str, identity: &str) {
        self.exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Some(identity.to_string()));
    }

    fn node(&self, ip: IpAddr, f: impl FnOnce(&mut Node)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if !nodes.contains_key(&ip) && nodes.len() >= NODES {
            let oldest = nodes
                .iter()
                .min_by_key(|(_, n)| n.last_seen)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                nodes.remove(&k);
            }
        }
        let t = now();
        let n = nodes.entry(ip).or_insert_with(|| Node {
            first_seen: t,
            ..Default::default()
        });
        n.last_seen = t;
        f(n);
    }

    pub fn tftp_done(&self, ip: IpAddr, file: &str, bytes: u64, ok: bool) {
        if ok {
            self.tftp_sent.fetch_add(1, Relaxed);
            self.tftp_bytes.fetch_add(bytes, Relaxed);
            self.node(ip, |n| {
                if n.files.len() >= FILES {
                    n.files.remove(0);
                }
                n.files.push(file.to_string());
            });
        } else {
            self.tftp_failed.fetch_add(1, Relaxed);
        }
    }

    pub fn nbd_connected(&self, ip: IpAddr, export: &str) {
        self.nbd_open.fetch_add(1, Relaxed);
        self.nbd_connections.fetch_add(1, Relaxed);
        self.node(ip, |n| {
            n.nbd_open += 1;
            n.export = Some(export.to_string());
        });
    }

    pub fn nbd_closed(&self, ip: IpAddr) {
        self.nbd_open.fetch_sub(1, Relaxed);
        self.node(ip, |n| n.nbd_open = n.nbd_open.saturating_sub(1));
    }

    /// A proxyDHCP answer went to a PXE client (known by its MAC: it has no address yet).
    pub fn dhcp_seen(&self, mac: &str, file: &str) {
        self.proxy_dhcp_answers.fetch_add(1, Relaxed);
        let mut pxe = self.pxe.lock().unwrap_or_else(|p| p.into_inner());
        if pxe.len() >= NODES && !pxe.contains_key(mac) {
            if let Some(k) = pxe.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| k.clone()) {
                pxe.remove(&k);
            }
        }
        pxe.insert(mac.to_string(), (file.to_string(), now()));
    }

    pub fn nbd_read(&self, bytes: u32) {
        self.nbd_reads.fetch_add(1, Relaxed);
        self.nbd_read_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Ready when every export has been opened and hashed.
    pub fn health(&self) -> Result<(), String> {
        let ex = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        let waiting: Vec<&str> = ex
            .iter()
            .filter(|(_, id)| id.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "exports not ready (hashing or unreadable): {}",
                waiting.join(" ")
            ))
        }
    }

    pub fn metrics(&self, uptime: f64) -> String {
        let mut m = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        counter(
            "ltsp_nbd_connections_open",
            "NBD connections open now",
            "gauge",
            self.nbd_open.load(Relaxed),
        );
        counter(
            "ltsp_nbd_connections_total",
            "NBD connections negotiated",
            "counter",
            self.nbd_connections.load(Relaxed),
        );
        counter(
            "ltsp_nbd_reads_total",
            "NBD READ requests served",
            "counter",
            self.nbd_reads.load(Relaxed),
        );
        counter(
            "ltsp_nbd_read_bytes_total",
            "Bytes served by NBD READs",
            "counter",
            self.nbd_read_bytes.load(Relaxed),
        );
        counter(
            "ltsp_tftp_transfers_total",
            "TFTP transfers completed",
            "counter",
            self.tftp_sent.load(Relaxed),
        );
        counter(
            "ltsp_tftp_transfers_failed_total",
            "TFTP transfers refused or abandoned",
            "counter",
            self.tftp_failed.load(Relaxed),
        );
        counter(
            "ltsp_tftp_bytes_total",
            "Bytes sent by completed TFTP transfers",
            "counter",
            self.tftp_bytes.load(Relaxed),
        );
        counter(
            "ltsp_proxy_dhcp_answers_total",
            "proxyDHCP offers and acks sent to PXE clients",
            "counter",
            self.proxy_dhcp_answers.load(Relaxed),
        );
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        counter(
            "ltsp_nodes_seen",
            "Nodes seen since the server started",
            "gauge",
            nodes.len() as u64,
        );
        counter(
            "ltsp_nodes_connected",
            "Nodes with an NBD connection open",
            "gauge",
            nodes.values().filter(|n| n.nbd_open > 0).count() as u64,
        );
        let _ = writeln!(m, "# HELP ltsp_uptime_seconds Seconds since the server started\n# TYPE ltsp_uptime_seconds gauge\nltsp_uptime_seconds {uptime:.0}");
        let _ = writeln!(m, "# HELP ltsp_export_info An export and its image identity\n# TYPE ltsp_export_info gauge");
        for (name, id) in self
            .exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let id = id.as_deref().unwrap_or("");
            let _ = writeln!(
                m,
                "ltsp_export_info{{export=\"{}\",identity=\"{id}\"}} 1",
                escape(name)
            );
        }
        m
    }

    /// One line per node: address, NBD state, export, last file, seconds since last seen.
    pub fn nodes_text(&self) -> String {
        let t = now();
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = String::from("NODE\tNBD\tEXPORT\tLAST-FILE\tLAST-SEEN\n");
        for (ip, n) in nodes.iter() {
            let _ = writeln!(
                s,
                "{ip}\t{}\t{}\t{}\t{}s ago",
                if n.nbd_open > 0 {
                    format!("connected({})", n.nbd_open)
                } else {
                    "-".into()
                },
                n.export.as_deref().unwrap_or("-"),
                n.files.last().map(String::as_str).unwrap_or("-"),
                t.saturating_sub(n.last_seen)
            );
        }
        let pxe = self.pxe.lock().unwrap_or_else(|p| p.into_inner());
        if !pxe.is_empty() {
            s.push_str("\nPXE-CLIENT\tPROXY-DHCP-FILE\tLAST-SEEN\n");
            for (mac, (file, seen)) in pxe.iter() {
                let _ = writeln!(s, "{mac}\t{file}\t{}s ago", t.saturating_sub(*seen));
            }
        }
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type Body = BoxBody<Bytes, std::io::Error>;

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

/// A file streamed in chunks read off the async threads (a page-cache miss may block).
struct FileBody {
    file: Arc<File>,
    off: u64,
    end: u64,
    reading: Option<tokio::task::JoinHandle<std::io::Result<Bytes>>>,
    done: Option<Box<dyn FnOnce() + Send + Sync>>,
}

const CHUNK: u64 = 256 * 1024;

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.off >= self.end {
            if let Some(done) = self.done.take() {
                done();
            }
            return Poll::Ready(None);
        }
        if self.reading.is_none() {
            let (file, off) = (self.file.clone(), self.off);
            let n = CHUNK.min(self.end - off) as usize;
            self.reading = Some(tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                let mut got = 0;
                while got < n {
                    let k = file.read_at(&mut buf[got..], off + got as u64)?;
                    if k == 0 {
                        return Err(std::io::Error::other("file shrank while being sent"));
                    }
                    got += k;
                }
                Ok(Bytes::from(buf))
            }));
        }
        let joined = std::task::ready!(Pin::new(self.reading.as_mut().unwrap()).poll(cx));
        self.reading = None;
        let chunk = joined.map_err(std::io::Error::other).and_then(|r| r);
        Poll::Ready(Some(chunk.map(|b| {
            self.off += b.len() as u64;
            // hyper stops polling once is_end_stream() says so: report now.
            if self.off >= self.end {
                if let Some(done) = self.done.take() {
                    done();
                }
            }
            Frame::data(b)
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.off >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.off)
    }
}

/// What the HTTP listener serves: status, and the boot files if TFTP is configured.
pub struct Http {
    pub status: Arc<Status>,
    /// The TFTP root, opened once (paths resolve beneath it, as for TFTP).
    pub root: Option<Arc<File>>,
    /// `[boot]`: boot.ipxe is generated from it, with HTTP URLs.
    pub boot: Option<crate::config::BootFile>,
}

fn file(h: &Http, peer: SocketAddr, path: &str) -> Response<Body> {
    let Some(root) = &h.root else {
        return reply(StatusCode::NOT_FOUND, "no TFTP root configured\n".into());
    };
    let refused = |r: crate::tftp::Refusal| {
        let code = if r.code == ltsp_common::tftp::ERR_NOT_FOUND {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::FORBIDDEN
        };
        reply(code, format!("{}\n", r.message))
    };
    let rel = match crate::tftp::normalise_path(path) {
        Ok(r) => r,
        Err(r) => return refused(r),
    };
    let (f, len) = match crate::tftp::open_beneath(root, &rel) {
        Ok(x) => x,
        Err(r) => return refused(r),
    };
    let status = h.status.clone();
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
    h: &Http,
    started: Instant,
    peer: SocketAddr,
    local: SocketAddr,
    req: &Request<hyper::body::Incoming>,
) -> Response<Body> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    let status = &h.status;
    match req.uri().path() {
        "/healthz" => match status.health() {
            Ok(()) => reply(StatusCode::OK, "ok\n".into()),
            Err(e) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        "/metrics" => reply(
            StatusCode::OK,
            status.metrics(started.elapsed().as_secs_f64()),
        ),
        "/nodes" => reply(StatusCode::OK, status.nodes_text()),
        "/boot.ipxe" => match h
            .boot
            .as_ref()
            .and_then(|b| crate::tftp::ipxe_script(b, Some(local.port()), Some(local.ip())))
        {
            Some(s) => {
                status.tftp_done(peer.ip(), "boot.ipxe", s.len() as u64, true);
                reply(StatusCode::OK, s)
            }
            None => reply(
                StatusCode::NOT_FOUND,
                "no [boot] kernel configured\n".into(),
            ),
        },
        p if p.starts_with("/files/") => file(h, peer, &p["/files/".len()..]),
        _ => reply(
            StatusCode::NOT_FOUND,
            "not found: try /healthz /metrics /nodes /boot.ipxe /files/PATH\n".into(),
        ),
    }
}

/// Serves the HTTP endpoints until the task is dropped.
pub async fn serve_http(h: Arc<Http>, listener: tokio::net::TcpListener) {
    let started = Instant::now();
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::warn!("http: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let h = h.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = route(&h, started, peer, local, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, svc);
            if let Err(e) = conn.await {
                log::debug!("http: {peer}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_waits_for_every_export_and_metrics_count() {
        let s = Status::new(["root".to_string(), "other".to_string()]);
        assert!(s.health().unwrap_err().contains("other root"));
        s.export_ready("root", "blake3:aa");
        s.export_ready("other", "blake3:bb");
        assert_eq!(s.health(), Ok(()));
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        s.tftp_done(ip, "ltsp/amd64/vmlinuz", 1000, true);
        s.tftp_done(ip, "nope", 0, false);
        s.nbd_connected(ip, "root");
        s.nbd_read(4096);
        let m = s.metrics(5.0);
        for want in [
            "ltsp_nbd_connections_open 1",
            "ltsp_nbd_read_bytes_total 4096",
            "ltsp_tftp_transfers_total 1",
            "ltsp_tftp_transfers_failed_total 1",
            "ltsp_tftp_bytes_total 1000",
            "ltsp_nodes_connected 1",
            "ltsp_export_info{export=\"root\",identity=\"blake3:aa\"} 1",
        ] {
            assert!(m.contains(want), "{want} missing in\n{m}");
        }
        let nodes = s.nodes_text();
        assert!(
            nodes.contains("192.0.2.10\tconnected(1)\troot\tltsp/amd64/vmlinuz\t"),
            "{nodes}"
        );
        s.nbd_closed(ip);
        assert!(s.metrics(6.0).contains("ltsp_nodes_connected 0"));
        s.dhcp_seen("52:54:00:12:34:56", "ipxe.efi");
        assert!(s
            .nodes_text()
            .contains("\nPXE-CLIENT\tPROXY-DHCP-FILE\tLAST-SEEN\n52:54:00:12:34:56\tipxe.efi\t"));
        assert!(s.metrics(7.0).contains("ltsp_proxy_dhcp_answers_total 1"));
    }
}
