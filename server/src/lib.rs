//! ltsp-server: TFTP and NBD for network-booted nodes, in one async process.

pub mod config;
pub mod dhcpd;
pub mod identity;
pub mod limits;
pub mod nbd;
pub mod proxydhcp;
pub mod status;
pub mod tftp;

use config::Config;
use std::net::SocketAddr;

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
    let exports = cfg
        .nbd
        .iter()
        .flat_map(|n| n.exports.iter().map(|e| e.name.clone()));
    let status = status::Status::new(exports);
    let mut http_port = None;
    if let Some(addr) = cfg.http_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::HttpBind { addr, source })?;
        let local = listener.local_addr().unwrap_or(addr);
        let root = match &cfg.tftp {
            Some(t) => Some(std::sync::Arc::new(std::fs::File::open(&t.root).map_err(
                |source| tftp::TftpError::Root {
                    path: t.root.clone(),
                    source,
                },
            )?)),
            None => None,
        };
        let h = status::Http {
            status: status.clone(),
            root,
            boot: cfg.tftp.as_ref().map(|t| t.boot.clone()),
        };
        log::info!("http: /healthz /metrics /nodes /boot.ipxe /files/ on {local}");
        http_port = Some(local.port());
        tasks.spawn(status::serve_http(std::sync::Arc::new(h), listener));
    }
    if let Some(d) = cfg.dhcp_server {
        let (srv, sock) = dhcpd::DhcpServer::bind(d, cfg.pxe_files.clone(), status.clone())?;
        tasks.spawn(srv.run(sock));
    }
    if let Some(p) = cfg.proxy_dhcp {
        let (proxy, s67, s4011) = proxydhcp::ProxyDhcp::bind(p, status.clone())?;
        tasks.spawn(proxy.clone().run(s67, 67));
        tasks.spawn(proxy.run(s4011, 4011));
    }
    if let Some(t) = cfg.tftp {
        let root = t.root.clone();
        let single = t.single_port;
        let http_port = http_port.filter(|_| t.boot.http == Some(true));
        let server = tftp::Server::new(t, status.clone(), http_port)?;
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
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::NbdBind { addr, source })?;
        for e in &n.exports {
            log::info!("nbd: export {:?} = {}", e.name, e.path.display());
        }
        log::info!(
            "nbd: listening on {}",
            listener.local_addr().unwrap_or(addr)
        );
        tasks.spawn(nbd::Server::new(n, status.clone()).run(listener));
    }
    shutdown.await;
    log::info!("shutting down");
    tasks.shutdown().await;
    Ok(())
}
