#![no_main]
//! Any bytes a hostile client sends the HTTP listener, through the very function the
//! accept loop runs for each connection (`Http::serve_connection`): every request is
//! answered or the connection closed, never a panic. The boot files are real (a TFTP root
//! with a kernel, and `[boot]` set so boot.ipxe and grub.cfg are generated).
use libfuzzer_sys::fuzz_target;
use ltsp_server::bootfiles::BootFiles;
use ltsp_server::config::{BootFile, HttpConfig};
use ltsp_server::http::Http;
use ltsp_server::limits::Descriptors;
use ltsp_server::status::Status;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    rt: tokio::runtime::Runtime,
    http: Arc<Http>,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        // One fixed directory (same contents every run), not one per process left behind.
        let root = std::env::temp_dir().join("ltsp-fuzz-http");
        std::fs::create_dir_all(root.join("ltsp/amd64")).unwrap();
        std::fs::write(root.join("ltsp/amd64/vmlinuz"), vec![0x5a; 4096]).unwrap();
        let boot = BootFile {
            kernel: Some("ltsp/amd64/vmlinuz".into()),
            initrd: Some("ltsp/amd64/initrd.img".into()),
            cmdline: Some("root=/dev/nbd0 nbdroot=:root".into()),
            ..Default::default()
        };
        let files = Arc::new(BootFiles::open(&root, boot).unwrap());
        let cfg = HttpConfig::new("127.0.0.1:0".parse().unwrap());
        let http = Http::new(
            cfg,
            Status::new(["root".to_string()]),
            Some(files),
            Descriptors::new(256),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Setup { rt, http }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    s.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut rd, mut wr) = tokio::io::split(client);
        let peer = "192.0.2.10:40000".parse().unwrap();
        let local = "192.0.2.1:8080".parse().unwrap();
        // The client sends everything, then closes its side; its replies are drained so
        // the server never blocks on a full pipe. On this one task, a panic reaches libFuzzer.
        let send = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let drain = async {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let _ = tokio::join!(
            s.http.clone().serve_connection(server, peer, local),
            send,
            drain
        );
    });
});
