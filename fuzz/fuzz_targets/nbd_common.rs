//! A server with a small temp image, shared by the NBD fuzz targets: each input is a whole
//! client session over an in-memory stream, through `Server::serve_stream`, the function
//! every TCP connection runs.
use ltsp_server::config::NbdConfig;
use ltsp_server::nbd::Server;
use ltsp_server::status::Status;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fx {
    rt: tokio::runtime::Runtime,
    srv: Arc<Server>,
}

fn fx() -> &'static Fx {
    static FX: OnceLock<Fx> = OnceLock::new();
    FX.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ltsp-fuzz-nbd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir for the image");
        let path = dir.join("root.img");
        let img: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, img).expect("write the image");
        // Small budgets: both the buffered and the unbuffered READ paths are taken.
        let mut cfg = NbdConfig::for_tests(path, 16 * 1024, 8 * 1024, Duration::from_secs(5));
        cfg.max_connections = 4;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let srv = Server::new(cfg, Arc::new(Status::default()));
        Fx { rt, srv }
    })
}

/// Runs one session: `client` is everything the client sends, then it closes its side;
/// all the server writes is read and dropped.
pub fn session(client: Vec<u8>) {
    let f = fx();
    let srv = f.srv.clone();
    f.rt.block_on(async move {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let (mut crd, mut cwr) = tokio::io::split(c);
        let feed = tokio::spawn(async move {
            let _ = cwr.write_all(&client).await;
            let _ = cwr.shutdown().await;
        });
        let drain = tokio::spawn(async move {
            let mut b = vec![0u8; 64 * 1024];
            while matches!(crd.read(&mut b).await, Ok(n) if n > 0) {}
        });
        let _ = srv.serve_stream(s, "192.0.2.1".parse().unwrap()).await;
        let _ = feed.await;
        let _ = drain.await;
    });
}
