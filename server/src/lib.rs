//! ltsp-server: TFTP and NBD for network-booted nodes, in one async process.

pub mod config;
pub mod identity;
pub mod limits;
pub mod nbd;
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
    if let Some(addr) = cfg.http_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::HttpBind { addr, source })?;
        log::info!(
            "http: /healthz /metrics /nodes on {}",
            listener.local_addr().unwrap_or(addr)
        );
        tasks.spawn(status::serve_http(status.clone(), listener));
    }
    if let Some(t) = cfg.tftp {
        let root = t.root.clone();
        let single = t.single_port;
        let server = tftp::Server::new(t, status.clone())?;
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
