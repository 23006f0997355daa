#![no_main]
//! Any datagrams a hostile client sends, through the very function ltsp-server runs
//! (`tftp::Server::run` and the transfers it spawns), over loopback UDP. The input is a
//! mode byte (bit 0: single-port mode) then datagrams, each a 2-byte big-endian length and
//! its bytes. The first goes to the listening port; each later one goes to whichever port
//! answered last (a transfer's own TID), after waiting for that answer. Tokio's clock is
//! paused, so retransmit timers and deadlines run at once instead of in real time.
use libfuzzer_sys::fuzz_target;
use ltsp_server::bootfiles::BootFiles;
use ltsp_server::config::{BootFile, TftpConfig};
use ltsp_server::limits::Descriptors;
use ltsp_server::status::Status;
use ltsp_server::tftp::Server;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::UdpSocket;

struct Setup {
    rt: tokio::runtime::Runtime,
    /// Listening addresses: [separate TIDs, single port].
    addrs: [SocketAddr; 2],
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        // One fixed directory (same contents every run), not one per process left behind.
        let root = std::env::temp_dir().join("ltsp-fuzz-tftp");
        std::fs::create_dir_all(root.join("ltsp/amd64")).unwrap();
        // Several blocks at any blksize up to 8 KiB, and a last short one.
        let kernel: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(root.join("ltsp/amd64/vmlinuz"), kernel).unwrap();
        // Text with bare LF and CR for netascii, crossing block edges.
        std::fs::write(
            root.join("lts.conf"),
            "[default]\r\nA=1\n\rB=\r\n".repeat(300),
        )
        .unwrap();
        let boot = BootFile {
            kernel: Some("ltsp/amd64/vmlinuz".into()),
            initrd: Some("ltsp/amd64/initrd.img".into()),
            cmdline: Some("root=/dev/nbd0 nbdroot=:root".into()),
            ..Default::default()
        };
        let files = Arc::new(BootFiles::open(&root, boot.clone()).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let addrs = rt.block_on(async {
            let mut addrs = Vec::new();
            for single_port in [false, true] {
                let cfg = TftpConfig {
                    root: root.clone(),
                    listen: "127.0.0.1:0".parse().unwrap(),
                    timeout: Duration::from_secs(1),
                    retries: 3,
                    max_windowsize: 64,
                    max_transfers: 64,
                    max_transfers_per_client: 0,
                    max_client_timeout: Duration::from_secs(5),
                    max_transfer_time: Duration::from_secs(600),
                    read_ahead_budget: 8 << 20,
                    single_port,
                    boot: boot.clone(),
                };
                let status = Status::new(Vec::<String>::new());
                let srv = Server::new(
                    cfg,
                    files.clone(),
                    status,
                    Some(8080),
                    Descriptors::new(4096),
                )
                .unwrap();
                let sock = srv.bind().unwrap();
                addrs.push(sock.local_addr().unwrap());
                tokio::spawn(srv.run(sock));
            }
            [addrs[0], addrs[1]]
        });
        Setup { rt, addrs }
    })
}

/// The datagrams of an input: at most 64, each at most 1,500 bytes.
fn datagrams(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 64 {
        let n = (u16::from_be_bytes([data[0], data[1]]) as usize % 1501).min(data.len() - 2);
        out.push(&data[2..2 + n]);
        data = &data[2 + n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let s = setup();
    let server = s.addrs[(mode & 1) as usize];
    s.rt.block_on(async {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 65536];
        let mut dst = server;
        for d in datagrams(rest) {
            let _ = client.send_to(d, dst).await;
            // The answer (DATA, OACK, ERROR) or nothing: a retransmit timer, under the
            // paused clock, fires at once when the server has nothing to say.
            if let Ok(Ok((_, from))) =
                tokio::time::timeout(Duration::from_millis(1500), client.recv_from(&mut buf)).await
            {
                dst = from;
            }
        }
        // Whatever the transfer still does ends in retries or its deadline; let it run out
        // so that transfers do not pile up across inputs.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
});
