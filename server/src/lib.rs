//! ltsp-server: TFTP and NBD for network-booted nodes, in one async process.

pub mod bootfiles;
pub mod config;
pub mod dhcpd;
pub mod http;
pub mod identity;
pub mod limits;
pub mod nbd;
pub mod nbd_trace;
pub mod proxydhcp;
pub mod status;
pub mod tftp;
pub mod versions;

use config::Config;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("tftp: {0}")]
    Tftp(#[from] tftp::TftpError),
    #[error("http: bind {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    ProxyDhcp(#[from] proxydhcp::ProxyDhcpError),
    #[error("nbd: trace file {}: {source}", path.display())]
    NbdTrace {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("nbd: bind {addr}: {source}")]
    NbdBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds every listener first (so a busy port fails before anything is served), then
/// serves until `shutdown` resolves.
pub async fn serve(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut tasks = tokio::task::JoinSet::new();
    let fds = descriptors(cfg.nbd.as_ref().map_or(0, |n| n.max_connections));
    let exports = cfg
        .nbd
        .iter()
        .flat_map(|n| n.exports.iter().map(|e| e.name.clone()));
    let status = status::Status::new(exports);
    // The TFTP root, opened once: TFTP and HTTP serve the same files.
    let files = match &cfg.tftp {
        Some(t) => Some(Arc::new(
            bootfiles::BootFiles::open(&t.root, t.boot.clone()).map_err(|source| {
                tftp::TftpError::Root {
                    path: t.root.clone(),
                    source,
                }
            })?,
        )),
        None => None,
    };
    let mut http_port = None;
    if let Some(h) = cfg.http.clone() {
        let addr = h.listen;
        let listener =
            limits::listen(addr).map_err(|source| ServeError::HttpBind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        log::info!("http: /healthz /metrics /nodes /boot.ipxe /files/ on {local}");
        http_port = Some(local.port());
        let http = http::Http::new(h, status.clone(), files.clone(), fds.clone());
        tasks.spawn(http.run(listener));
    }
    if let Some(d) = cfg.dhcp_server {
        // No port 4011 here: the offers carry PXE discovery control 8, so firmware takes
        // its boot file from them and asks no boot server.
        let (srv, sock) = dhcpd::DhcpServer::bind(d, cfg.pxe_files.clone(), status.clone())?;
        tasks.spawn(srv.run(sock));
    }
    if let Some(p) = cfg.proxy_dhcp {
        let (proxy, s67, s4011) = proxydhcp::ProxyDhcp::bind(p, status.clone())?;
        tasks.spawn(proxy.clone().run(s67, 67));
        tasks.spawn(proxy.run(s4011, 4011));
    }
    if let (Some(t), Some(files)) = (cfg.tftp, files) {
        let root = t.root.clone();
        let single = t.single_port;
        let http_port = http_port.filter(|_| t.boot.http == Some(true));
        let server = tftp::Server::new(t, files, status.clone(), http_port, fds.clone())?;
        let sock = server.bind()?;
        let local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
        if single {
            log::info!("tftp: single-port mode: every reply from the listening port");
        }
        log::info!("tftp: serving {} on {local}", root.display());
        tasks.spawn(server.run(sock));
    }
    if let Some(n) = cfg.nbd {
        let addr = n.listen;
        let listener =
            limits::listen(addr).map_err(|source| ServeError::NbdBind { addr, source })?;
        for e in &n.exports {
            log::info!("nbd: export {:?} = {}", e.name, e.path.display());
        }
        log::info!(
            "nbd: listening on {}",
            listener.local_addr().unwrap_or(addr)
        );
        let tracer = match &n.trace_file {
            Some(path) => {
                let t = nbd_trace::Tracer::open(path, status.clone()).map_err(|source| {
                    ServeError::NbdTrace {
                        path: path.clone(),
                        source,
                    }
                })?;
                log::info!("nbd: tracing requests to {}", path.display());
                Some(t)
            }
            None => None,
        };
        tasks.spawn(nbd::Server::with_tracer(n, status.clone(), tracer).run(listener));
    }
    shutdown.await;
    log::info!("shutting down");
    tasks.shutdown().await;
    Ok(())
}

/// Raises the descriptor limit, then sets NBD's reserve aside (accepting a node's root
/// must never fail because HTTP or TFTP used every descriptor): the rest is the pool HTTP
/// connections and TFTP transfers take a slot from.
fn descriptors(nbd_max_connections: usize) -> Arc<limits::Descriptors> {
    let limit = match limits::raise_nofile() {
        Ok(n) if n.soft_before < n.soft => {
            log::info!(
                "descriptors: soft limit raised from {} to {} (the hard limit)",
                n.soft_before,
                n.soft
            );
            n.soft
        }
        Ok(n) => {
            log::info!("descriptors: soft limit {} (hard limit {})", n.soft, n.hard);
            n.soft
        }
        Err(e) => {
            let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
            let soft = now.current.unwrap_or(u64::MAX);
            log::warn!("descriptors: cannot raise the soft limit {soft} to the hard one: {e}");
            soft
        }
    };
    let plan = limits::FdPlan::new(limit, nbd_max_connections);
    if plan.covered {
        log::info!(
            "descriptors: {} kept for NBD ({nbd_max_connections} connections) and the server; \
             HTTP connections and TFTP transfers share {} slots",
            plan.reserve,
            plan.slots
        );
    } else {
        log::warn!(
            "descriptors: the limit {limit} cannot keep {} for NBD's {nbd_max_connections} \
             connections: HTTP and TFTP get {} slots, and NBD accepts may fail while those are \
             all in use (raise LimitNOFILE or lower [nbd] max_connections)",
            limits::FDS_BASE
                .saturating_add(limits::FDS_PER_NBD.saturating_mul(nbd_max_connections as u64)),
            plan.slots
        );
    }
    limits::Descriptors::new(plan.slots)
}
