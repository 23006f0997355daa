//! TFTP against hostile clients: netascii by blocks, the life bound, eviction of
//! unconfirmed transfers, and the bytes transfers hold. In-process server on loopback.

use super::*;
use std::path::PathBuf;

/// splitmix64: reproducible numbers without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let z = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Text dense in CR and LF, so that they fall on every block boundary.
    fn text(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| match self.next() % 6 {
                0 => b'\n',
                1 => b'\r',
                2 => 0,
                _ => b'a' + (self.next() % 26) as u8,
            })
            .collect()
    }
}

/// What a client receives over a whole transfer in which it acknowledges a random part
/// of each window (nothing: a timeout, the window is sent again).
fn fetch_blocks(blocks: &mut Blocks, window: u64, rng: &mut Rng) -> Vec<u8> {
    let blksize = blocks.blksize;
    let mut out = vec![0u8; blksize];
    let mut got = Vec::new();
    let mut acked = 0u64;
    let mut last = None;
    loop {
        let mut sent = Vec::new();
        let mut b = acked + 1;
        loop {
            let n = blocks.block(b, &mut out).unwrap();
            sent.push(out[..n].to_vec());
            if n < blksize {
                last = Some(b);
            }
            if last.is_some_and(|l| b >= l) || b >= acked + window {
                break;
            }
            b += 1;
        }
        let k = (rng.next() % (sent.len() as u64 + 1)) as usize;
        if k == 0 {
            blocks.ahead.pause();
            continue;
        }
        blocks.ahead.resume();
        for s in &sent[..k] {
            got.extend_from_slice(s);
        }
        acked += k as u64;
        blocks.forget(acked);
        if last == Some(acked) {
            return got;
        }
    }
}

#[test]
fn netascii_by_blocks_matches_the_whole_conversion() {
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\n".to_vec(),
        b"\r".to_vec(),
        // Converted length an exact multiple of the block size: an empty last block.
        b"abc\n".to_vec(),
        b"\r\n\r\n\n\n\r\r".to_vec(),
    ];
    for n in [1, 2, 3, 511, 512, 513, 1024, 4099, 70_001] {
        cases.push(rng.text(n));
    }
    for (i, data) in cases.iter().enumerate() {
        let want = to_netascii(data);
        let path = d.path().join(format!("t{i}"));
        std::fs::write(&path, data).unwrap();
        // Tiny blocks put CR and LF on every boundary; keep them to the smaller cases.
        let sizes: &[usize] = if data.len() > 5000 {
            &[8, 512, 1468]
        } else {
            &[1, 2, 3, 5, 8, 512, 1468]
        };
        for &blksize in sizes {
            for window in [1u64, 4, 16] {
                let file = |budget| {
                    let f = File::open(&path).unwrap();
                    (Source::File(f, data.len() as u64), budget)
                };
                let srcs = [
                    file(Some(Budget::new(1 << 20))),
                    file(None),
                    (Source::Memory(data.clone()), None),
                ];
                for (src, budget) in srcs {
                    let mut blocks = Blocks::new(src, blksize, true, budget);
                    let got = fetch_blocks(&mut blocks, window, &mut rng);
                    assert!(
                        got == want,
                        "case {i} ({} bytes), blksize {blksize}, window {window}: {} bytes, \
                             want {}",
                        data.len(),
                        got.len(),
                        want.len()
                    );
                    // Marks kept: at most the window and the next block's.
                    assert!(blocks.marks.as_ref().unwrap().len() as u64 <= window + 1);
                }
            }
        }
    }
}

#[test]
fn octet_blocks_go_back_after_a_timeout() {
    let mut rng = Rng(7);
    let data = rng.text(100_000);
    for blksize in [512usize, 1468, 65464] {
        let mut blocks = Blocks::new(
            Source::Memory(data.clone()),
            blksize,
            false,
            Some(Budget::new(1 << 20)),
        );
        assert_eq!(fetch_blocks(&mut blocks, 8, &mut rng), data);
    }
}

fn cfg(root: PathBuf) -> TftpConfig {
    TftpConfig {
        root,
        listen: "127.0.0.1:0".parse().unwrap(),
        timeout: Duration::from_millis(300),
        retries: 10_000,
        max_windowsize: 64,
        max_transfers: 2048,
        max_transfers_per_client: 0,
        max_client_timeout: Duration::from_secs(5),
        max_transfer_time: Duration::from_secs(600),
        read_ahead_budget: 8 << 20,
        single_port: false,
        boot: Default::default(),
    }
}

fn start(cfg: TftpConfig) -> (Arc<Server>, SocketAddr) {
    let status = crate::status::Status::new(Vec::<String>::new());
    let files = Arc::new(
        crate::bootfiles::BootFiles::open(&cfg.root, cfg.boot.clone()).expect("open the root"),
    );
    let fds = crate::limits::Descriptors::new(1 << 16);
    let srv = Server::new(cfg, files, status, None, fds).unwrap();
    let sock = srv.bind().unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(srv.clone().run(sock));
    (srv, addr)
}

async fn client() -> tokio::net::UdpSocket {
    tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn recv(sock: &tokio::net::UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = tokio::time::timeout(Duration::from_secs(20), sock.recv_from(&mut buf))
        .await
        .expect("an answer from the server")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

/// Waits (polling) until `cond` holds; panics after a generous while.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

/// A lock-step octet fetch at blksize 512, ACKing each block after `delay`.
async fn fetch(server: SocketAddr, name: &str, delay: Duration) -> Result<Vec<u8>, String> {
    let sock = client().await;
    sock.send_to(&tftp::rrq(name, "octet", &[]), server)
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut next: u16 = 1;
    loop {
        let (b, from) = recv(&sock).await;
        match tftp::decode(&b).unwrap() {
            Packet::Data { block, data } => {
                if block == next {
                    got.extend_from_slice(data);
                    next = next.wrapping_add(1);
                }
                tokio::time::sleep(delay).await;
                sock.send_to(&tftp::ack(next.wrapping_sub(1)), from)
                    .await
                    .unwrap();
                if block == next.wrapping_sub(1) && data.len() < 512 {
                    return Ok(got);
                }
            }
            Packet::Error { message, .. } => return Err(message),
            p => panic!("unexpected {p:?}"),
        }
    }
}

#[tokio::test]
async fn a_transfer_ends_at_its_time_limit_even_if_the_client_keeps_acking() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), vec![7u8; 512 * 1000]).unwrap();
    let mut c = cfg(d.path().into());
    c.max_transfer_time = Duration::from_secs(1);
    let (srv, addr) = start(c);
    // An ACK every 100 ms, before each 300 ms timeout: 1000 blocks would take 100 s.
    let r = fetch(addr, "f", Duration::from_millis(100)).await;
    assert_eq!(r, Err("transfer time limit reached".to_string()));
    until("the slot is given back", || srv.slots.held() == 0).await;
}

#[tokio::test]
async fn unconfirmed_transfers_give_their_slots_to_new_requests() {
    let d = tempfile::tempdir().unwrap();
    let data = Rng(3).text(5000);
    std::fs::write(d.path().join("f"), &data).unwrap();
    let mut c = cfg(d.path().into());
    c.max_transfers = 3;
    let (srv, addr) = start(c);
    // Three requests that never acknowledge, as spoofed ones cannot.
    let mut spoofed = Vec::new();
    let mut tids = Vec::new();
    for _ in 0..3 {
        let s = client().await;
        s.send_to(&tftp::rrq("f", "octet", &[("tsize", "0".into())]), addr)
            .await
            .unwrap();
        let (_, tid) = recv(&s).await; // the OACK: the transfer holds its slot
        spoofed.push(s);
        tids.push(tid);
    }
    assert_eq!(srv.slots.held(), 3);
    // A real node still gets its file, in the slot of the oldest.
    assert_eq!(fetch(addr, "f", Duration::ZERO).await, Ok(data.clone()));
    assert_eq!(srv.evictions(), 1);
    until("the real transfer's slot is back", || srv.slots.held() == 2).await;
    // The oldest was evicted: its transfer port is closed (an ACK there is refused),
    // while the second one still answers.
    for (s, alive) in [(&spoofed[0], false), (&spoofed[1], true)] {
        let mut buf = [0u8; 600];
        while s.try_recv_from(&mut buf).is_ok() {} // resent OACKs
        s.connect(tids[spoofed.iter().position(|x| std::ptr::eq(x, s)).unwrap()])
            .await
            .unwrap();
        s.send(&tftp::ack(0)).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), s.recv(&mut buf))
            .await
            .expect("an answer or a refusal");
        if alive {
            let n = r.unwrap();
            assert!(matches!(
                tftp::decode(&buf[..n]).unwrap(),
                Packet::Data { block: 1, .. }
            ));
        } else {
            let e = r.expect_err("the evicted transfer answered");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        }
    }
}

#[tokio::test]
async fn confirmed_transfers_are_never_evicted() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), vec![1u8; 5000]).unwrap();
    let mut c = cfg(d.path().into());
    c.max_transfers = 3;
    let (srv, addr) = start(c);
    let mut held = Vec::new();
    for _ in 0..3 {
        let s = client().await;
        s.send_to(&tftp::rrq("f", "octet", &[]), addr)
            .await
            .unwrap();
        let (_, from) = recv(&s).await; // DATA 1
        s.send_to(&tftp::ack(1), from).await.unwrap();
        recv(&s).await; // DATA 2: block 1 was acknowledged, so confirmed
        held.push(s);
    }
    assert_eq!(
        fetch(addr, "f", Duration::ZERO).await,
        Err("server busy, retry".to_string())
    );
    assert_eq!(srv.evictions(), 0);
    assert_eq!(srv.slots.held(), 3);
}

#[tokio::test]
async fn waiting_transfers_hold_no_packet_buffer_and_read_ahead_stays_in_budget() {
    let d = tempfile::tempdir().unwrap();
    let data = Rng(5).text(300_000);
    std::fs::write(d.path().join("f"), &data).unwrap();
    let mut c = cfg(d.path().into());
    // Two chunks of read-ahead for everyone; no timeout while the clients line up.
    c.read_ahead_budget = 2 * Ahead::CHUNK;
    c.timeout = Duration::from_secs(2);
    let (srv, addr) = start(c);
    // Six clients take blksize 8192, acknowledge the OACK, receive a window of 4, stall.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let s = client().await;
        let opts = [("blksize", "8192".into()), ("windowsize", "4".into())];
        s.send_to(&tftp::rrq("f", "octet", &opts), addr)
            .await
            .unwrap();
        let (b, from) = recv(&s).await;
        assert!(matches!(tftp::decode(&b).unwrap(), Packet::Oack(_)));
        s.send_to(&tftp::ack(0), from).await.unwrap();
        for _ in 0..4 {
            let (b, _) = recv(&s).await;
            assert!(matches!(tftp::decode(&b).unwrap(), Packet::Data { .. }));
        }
        stalled.push(s);
    }
    until("every window sent", || {
        srv.sending.available_permits() == SEND_BUDGET
    })
    .await;
    assert_eq!(
        srv.ahead.used(),
        2 * Ahead::CHUNK,
        "the budget, and no more"
    );
    // Past the budget, a transfer reads block by block and is served all the same.
    assert_eq!(fetch(addr, "f", Duration::ZERO).await, Ok(data));
    // A stalled client's timeout gives its read-ahead back; the transfers live on.
    until("read-ahead released", || srv.ahead.used() == 0).await;
    assert_eq!(srv.slots.held(), 6);
}
