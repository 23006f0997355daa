//! ltsp-server's TFTP against real clients (curl, tftp-hpa, atftp) and a raw client that
//! checks the protocol details real clients hide.

use ltsp_common::tftp::{self as t, Packet};
use ltsp_tests::{pattern, run, tool, ServerProc};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Fixture {
    dir: tempfile::TempDir,
    files: Vec<(String, Vec<u8>)>,
}

/// Files at the sizes that break TFTP servers: empty, around one block, exact multiples
/// of each block size, and over 32 MiB (65535 blocks of 512: block numbers roll over).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        0,
        1,
        511,
        512,
        513,
        1468 * 3,
        8192 * 4,
        100_000,
        33 * 1024 * 1024 + 7,
    ];
    let mut files = Vec::new();
    for (i, n) in sizes.into_iter().enumerate() {
        let name = format!("f{n}");
        let data = pattern(n, i as u64 + 1);
        std::fs::write(dir.path().join(&name), &data).unwrap();
        files.push((name, data));
    }
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/nested"), b"nested file\n").unwrap();
    Fixture { dir, files }
}

fn server(root: &Path, extra: &[&str]) -> ServerProc {
    let mut args = vec!["--tftp-root", root.to_str().unwrap(), "--no-nbd"];
    args.extend_from_slice(extra);
    ServerProc::start(&args)
}

fn check(out: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(out).unwrap_or_else(|e| panic!("{what}: no output file: {e}"));
    assert!(
        got.len() == want.len() && got == want,
        "{what}: {} bytes, want {}",
        got.len(),
        want.len()
    );
}

#[test]
fn curl_every_size_at_three_block_sizes() {
    let fx = fixture();
    let s = server(fx.dir.path(), &[]);
    let a = s.tftp.unwrap();
    let out = tempfile::tempdir().unwrap();
    for blksize in ["512", "1468", "8192"] {
        // curl 7.88 fails on an empty file against tftpd-hpa too (getpeername errno 107);
        // size 0 is covered by tftp-hpa and atftp below.
        for (name, data) in fx.files.iter().filter(|(_, d)| !d.is_empty()) {
            let dst = out.path().join(format!("{name}.{blksize}"));
            let (ok, _, err) = run(Command::new(tool("curl"))
                .args(["-sS", "--tftp-blksize", blksize, "-o"])
                .arg(&dst)
                .arg(format!("tftp://{a}/{name}")));
            assert!(ok, "curl {name} blksize {blksize}: {err}");
            check(&dst, data, &format!("curl {name} blksize {blksize}"));
        }
    }
    assert!(s.log().contains("blksize 8192"));
}

#[test]
fn tftp_hpa_and_atftp_with_windowsize() {
    let fx = fixture();
    let s = server(fx.dir.path(), &[]);
    let a = s.tftp.unwrap();
    let out = tempfile::tempdir().unwrap();
    for (name, data) in fx.files.iter().filter(|(n, _)| n != "f34603015") {
        let dst = out.path().join(format!("{name}.hpa"));
        let (ok, _, err) = run(Command::new(tool("tftp"))
            .args([
                &a.ip().to_string(),
                &a.port().to_string(),
                "-m",
                "binary",
                "-c",
                "get",
                name,
            ])
            .arg(&dst));
        assert!(ok, "tftp-hpa {name}: {err}");
        check(&dst, data, &format!("tftp-hpa {name}"));
    }
    for (name, data) in &fx.files {
        let dst = out.path().join(format!("{name}.atftp"));
        let (ok, _, err) = run(Command::new(tool("atftp"))
            .args([
                "--option",
                "windowsize 16",
                "--option",
                "blksize 1468",
                "--option",
                "tsize 0",
                "-g",
                "-r",
                name,
                "-l",
            ])
            .arg(&dst)
            .args([&a.ip().to_string(), &a.port().to_string()]));
        assert!(ok, "atftp {name}: {err}");
        check(&dst, data, &format!("atftp windowsize 16 {name}"));
    }
    assert!(
        s.log().contains("windowsize 16"),
        "the server never granted windowsize 16"
    );
}

/// A minimal client that shows what the server sends, packet by packet.
struct Raw {
    sock: UdpSocket,
    server: SocketAddr,
}

impl Raw {
    fn new(server: SocketAddr) -> Raw {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { sock, server }
    }

    fn rrq(&self, name: &str, opts: &[(&str, String)]) {
        self.sock
            .send_to(&t::rrq(name, "octet", opts), self.server)
            .unwrap();
    }

    fn recv(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 70000];
        let (n, from) = self.sock.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some((buf, from))
    }

    fn expect_error(&self, name: &str) -> (u16, String) {
        self.rrq(name, &[]);
        let (b, _) = self.recv().expect("an answer");
        match t::decode(&b).unwrap() {
            Packet::Error { code, message } => (code, message),
            p => panic!("{name}: expected an error, got {p:?}"),
        }
    }
}

#[test]
fn escapes_and_non_files_are_refused_with_the_right_codes() {
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(top.path().join("secret"), b"secret").unwrap();
    std::fs::write(root.join("ok"), b"fine").unwrap();
    std::os::unix::fs::symlink("../secret", root.join("up")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
    std::os::unix::fs::symlink("ok", root.join("good-link")).unwrap();
    std::fs::create_dir(root.join("d")).unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let s = server(&root, &[]);
    let raw = Raw::new(s.tftp.unwrap());
    for (name, code) in [
        ("../secret", t::ERR_ACCESS),
        ("/../secret", t::ERR_ACCESS),
        ("d/../../secret", t::ERR_ACCESS),
        ("..\\secret", t::ERR_ACCESS),
        ("up", t::ERR_ACCESS),
        ("abs", t::ERR_ACCESS),
        ("d", t::ERR_ACCESS),
        ("fifo", t::ERR_ACCESS),
        ("missing", t::ERR_NOT_FOUND),
    ] {
        assert_eq!(raw.expect_error(name).0, code, "{name}");
    }
    // Allowed: a leading '/', and a symlink that stays inside.
    for name in ["/ok", "good-link", "\\ok"] {
        raw.rrq(name, &[]);
        let (b, from) = raw.recv().unwrap();
        assert!(
            matches!(t::decode(&b).unwrap(), Packet::Data { block: 1, data } if data == b"fine"),
            "{name}"
        );
        raw.sock.send_to(&t::ack(1), from).unwrap();
    }
    // WRQ: refused, read-only server.
    let mut wrq = t::rrq("new", "octet", &[]);
    wrq[1] = t::OP_WRQ as u8;
    raw.sock.send_to(&wrq, raw.server).unwrap();
    let (b, _) = raw.recv().unwrap();
    assert!(matches!(
        t::decode(&b).unwrap(),
        Packet::Error {
            code: t::ERR_ACCESS,
            ..
        }
    ));
    // Mode "mail" is refused as an illegal operation.
    raw.sock
        .send_to(&t::rrq("ok", "mail", &[]), raw.server)
        .unwrap();
    let (b, _) = raw.recv().unwrap();
    assert!(matches!(
        t::decode(&b).unwrap(),
        Packet::Error {
            code: t::ERR_ILLEGAL_OP,
            ..
        }
    ));
}

#[test]
fn replies_come_from_a_fresh_port_on_the_address_asked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), pattern(3000, 9)).unwrap();
    // Listen on every address; ask on 127.0.0.2: the reply must come from 127.0.0.2.
    let s = server(dir.path(), &["--tftp-listen", "0.0.0.0:0"]);
    let port = s.tftp.unwrap().port();
    let raw = Raw::new(format!("127.0.0.2:{port}").parse().unwrap());
    raw.rrq("f", &[]);
    let (b, from) = raw.recv().unwrap();
    assert!(matches!(
        t::decode(&b).unwrap(),
        Packet::Data { block: 1, .. }
    ));
    assert_eq!(from.ip().to_string(), "127.0.0.2");
    assert_ne!(from.port(), port, "reply must come from a new transfer ID");
    // A stranger writing to the transfer port gets ERROR 5; the transfer goes on.
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stranger.send_to(&t::ack(1), from).unwrap();
    let mut buf = [0u8; 600];
    let (n, _) = stranger.recv_from(&mut buf).unwrap();
    assert!(matches!(
        t::decode(&buf[..n]).unwrap(),
        Packet::Error {
            code: t::ERR_UNKNOWN_TID,
            ..
        }
    ));
    raw.sock.send_to(&t::ack(1), from).unwrap();
    let (b, _) = raw.recv().unwrap();
    assert!(matches!(
        t::decode(&b).unwrap(),
        Packet::Data { block: 2, .. }
    ));
}

#[test]
fn duplicate_acks_cause_no_resends_and_options_are_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(512 * 40 + 100, 3);
    std::fs::write(dir.path().join("f"), &data).unwrap();
    let s = server(dir.path(), &["--tftp-timeout", "2"]);
    let raw = Raw::new(s.tftp.unwrap());
    raw.rrq(
        "f",
        &[
            ("tsize", "0".into()),
            ("blksize", "512".into()),
            ("bogus", "1".into()),
        ],
    );
    let (b, from) = raw.recv().unwrap();
    match t::decode(&b).unwrap() {
        Packet::Oack(o) => assert_eq!(
            o,
            vec![
                ("tsize".into(), data.len().to_string()),
                ("blksize".into(), "512".into())
            ]
        ),
        p => panic!("expected OACK, got {p:?}"),
    }
    raw.sock.send_to(&t::ack(0), from).unwrap();
    raw.sock.send_to(&t::ack(0), from).unwrap();
    let mut got = Vec::new();
    let mut blocks = Vec::new();
    loop {
        let (b, _) = raw.recv().expect("data");
        let Packet::Data { block, data } = t::decode(&b).unwrap() else {
            panic!()
        };
        blocks.push(block);
        got.extend_from_slice(data);
        // Every ACK twice: a naive server answers each duplicate with a resend.
        raw.sock.send_to(&t::ack(block), from).unwrap();
        raw.sock.send_to(&t::ack(block), from).unwrap();
        if data.len() < 512 {
            break;
        }
    }
    assert_eq!(got, data);
    let want: Vec<u16> = (1..=41).collect();
    assert_eq!(blocks, want, "each block exactly once");
    raw.sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(raw.recv().is_none(), "nothing after the last block");
}

#[test]
fn unanswered_transfers_resend_a_bounded_number_of_times() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), pattern(5000, 4)).unwrap();
    let s = server(dir.path(), &["--tftp-retries", "2"]);
    let raw = Raw::new(s.tftp.unwrap());
    raw.rrq("f", &[("timeout", "1".into())]);
    let (b, from) = raw.recv().unwrap();
    assert!(matches!(t::decode(&b).unwrap(), Packet::Oack(_)));
    raw.sock.send_to(&t::ack(0), from).unwrap();
    let start = Instant::now();
    let mut copies = 0;
    while let Some((b, _)) = raw.recv() {
        assert!(matches!(
            t::decode(&b).unwrap(),
            Packet::Data { block: 1, .. }
        ));
        copies += 1;
    }
    assert_eq!(copies, 3, "first send plus two retries");
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert!(
        s.log().contains("no acknowledgement after 3 tries"),
        "{}",
        s.log()
    );
}

#[test]
fn windowed_transfer_recovers_from_a_lost_block() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(1000 * 20 + 5, 5);
    std::fs::write(dir.path().join("f"), &data).unwrap();
    let s = server(dir.path(), &[]);
    let raw = Raw::new(s.tftp.unwrap());
    raw.rrq(
        "f",
        &[("blksize", "1000".into()), ("windowsize", "8".into())],
    );
    let (_, from) = raw.recv().unwrap();
    raw.sock.send_to(&t::ack(0), from).unwrap();
    let mut got: Vec<u8> = Vec::new();
    let mut next: u16 = 1;
    let mut dropped = false;
    loop {
        let (b, _) = raw.recv().expect("data");
        let Packet::Data { block, data: d } = t::decode(&b).unwrap() else {
            panic!()
        };
        if block == 5 && !dropped {
            dropped = true; // pretend block 5 was lost
            continue;
        }
        if block != next {
            // Out of sequence: RFC 7440 says ACK the last in-order block.
            raw.sock.send_to(&t::ack(next - 1), from).unwrap();
            // Swallow the rest of this window.
            continue;
        }
        got.extend_from_slice(d);
        next += 1;
        if d.len() < 1000 {
            raw.sock.send_to(&t::ack(block), from).unwrap();
            break;
        }
        if block % 8 == 0 {
            raw.sock.send_to(&t::ack(block), from).unwrap();
        }
    }
    assert!(dropped);
    assert_eq!(got, data);
}

#[test]
fn garbage_floods_do_not_stop_a_real_client() {
    let fx = fixture();
    let s = server(fx.dir.path(), &[]);
    let a = s.tftp.unwrap();
    let flood = std::thread::spawn(move || {
        // From another machine (any 127.x is this host) and from the client's own address.
        let other = UdpSocket::bind("127.0.0.2:0").unwrap();
        let same = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut x = 1u32;
        for i in 0..20_000u32 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let len = (x % 700) as usize;
            let mut pkt = pattern(len, i as u64);
            if i % 3 == 0 && pkt.len() > 2 {
                pkt[0] = 0;
                pkt[1] = (x % 8) as u8; // plausible opcodes with junk bodies
            }
            let _ = if i % 2 == 0 { &other } else { &same }.send_to(&pkt, a);
        }
    });
    let out = tempfile::tempdir().unwrap();
    let (name, data) = &fx.files[7];
    let dst = out.path().join("x");
    let (ok, _, err) = run(Command::new(tool("curl"))
        .args(["-sS", "--tftp-blksize", "1468", "-o"])
        .arg(&dst)
        .arg(format!("tftp://{a}/{name}")));
    flood.join().unwrap();
    assert!(ok, "{err}");
    check(&dst, data, "during a flood");
    // And after it.
    let (ok, _, err) = run(Command::new(tool("curl"))
        .args(["-sS", "-o"])
        .arg(&dst)
        .arg(format!("tftp://{a}/sub/nested")));
    assert!(ok, "{err}");
    check(&dst, b"nested file\n", "after a flood");
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), &[]);
    assert!(s.terminate(), "ltsp-server did not exit 0 on SIGTERM");
}

#[test]
fn single_port_mode_replies_from_the_listening_port() {
    let fx = fixture();
    let s = server(fx.dir.path(), &["--tftp-single-port"]);
    let a = s.tftp.unwrap();
    // A raw client: every DATA must come from the port the request went to.
    let (name, data) = &fx.files[5];
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut rrq = vec![0, 1];
    rrq.extend_from_slice(name.as_bytes());
    rrq.extend_from_slice(b"\0octet\0");
    sock.send_to(&rrq, a).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(from, a, "a reply from another port than the listening one");
        assert_eq!(&buf[..2], &[0, 3], "DATA");
        got.extend_from_slice(&buf[4..n]);
        sock.send_to(&t::ack(u16::from_be_bytes([buf[2], buf[3]])), a)
            .unwrap();
        if n - 4 < 512 {
            break;
        }
    }
    assert_eq!(&got, data);
    // Real clients, several at once, windowed and not.
    let out = tempfile::tempdir().unwrap();
    let big = fx.files.iter().find(|(n, _)| n == "f34603015").unwrap();
    let dsts: Vec<_> = (0..3).map(|i| out.path().join(format!("w{i}"))).collect();
    let clients: Vec<_> = dsts
        .iter()
        .map(|dst| {
            Command::new(tool("atftp"))
                .args([
                    "--option",
                    "windowsize 16",
                    "--option",
                    "blksize 1468",
                    "-g",
                    "-r",
                ])
                .arg(&big.0)
                .arg("-l")
                .arg(dst)
                .args([&a.ip().to_string(), &a.port().to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect::<Vec<_>>();
    for (c, dst) in clients.iter().zip(&dsts) {
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
        check(dst, &big.1, "atftp windowsize 16, single-port");
    }
    let dst = out.path().join("curl");
    let (ok, _, err) = run(Command::new(tool("curl"))
        .args(["-sS", "--tftp-blksize", "8192", "-o"])
        .arg(&dst)
        .arg(format!("tftp://{a}/{}", big.0)));
    assert!(ok, "{err}");
    check(&dst, &big.1, "curl, single-port");
    assert!(s.log().contains("single-port mode"));
}

/// Text dense in CR and LF, with some on every 512-byte boundary of the converted stream.
fn crlf_text() -> Vec<u8> {
    let mut text = Vec::new();
    // A CR LF split across blocks 1 and 2, then a CR NUL across blocks 2 and 3.
    text.extend_from_slice(&[b'a'; 511]);
    text.push(b'\n');
    text.extend_from_slice(&[b'b'; 511]);
    text.push(b'\r');
    text.push(b'x');
    for (i, b) in pattern(40_000, 11).into_iter().enumerate() {
        text.push(match b % 5 {
            0 => b'\n',
            1 => b'\r',
            _ => b'a' + (i % 26) as u8,
        });
    }
    text
}

#[test]
fn netascii_on_the_wire_is_converted_block_by_block() {
    let dir = tempfile::tempdir().unwrap();
    let text = crlf_text();
    std::fs::write(dir.path().join("text"), &text).unwrap();
    let s = server(dir.path(), &[]);
    let a = s.tftp.unwrap();
    // The bytes on the wire, windowed, with tsize asked for.
    let raw = Raw::new(a);
    let opts = [("tsize", "0".to_string()), ("windowsize", "4".to_string())];
    raw.sock
        .send_to(&t::rrq("text", "netascii", &opts), a)
        .unwrap();
    let (b, from) = raw.recv().unwrap();
    match t::decode(&b).unwrap() {
        // tsize is left out: the converted size is not known without a pass over the file.
        Packet::Oack(o) => assert_eq!(o, vec![("windowsize".into(), "4".into())]),
        p => panic!("expected OACK, got {p:?}"),
    }
    raw.sock.send_to(&t::ack(0), from).unwrap();
    let mut got = Vec::new();
    let mut next: u16 = 1;
    loop {
        let (b, _) = raw.recv().expect("data");
        let Packet::Data { block, data } = t::decode(&b).unwrap() else {
            panic!()
        };
        if block != next {
            continue;
        }
        got.extend_from_slice(data);
        next += 1;
        if data.len() < 512 || block % 4 == 0 {
            raw.sock.send_to(&t::ack(block), from).unwrap();
        }
        if data.len() < 512 {
            break;
        }
    }
    let want = ltsp_server::tftp::to_netascii(&text);
    assert!(got == want, "{} bytes, want {}", got.len(), want.len());
    assert_eq!(&got[510..514], b"a\r\nb", "CR LF across blocks 1 and 2");
    // tftp-hpa in ascii mode turns it back into the file.
    let dst = dir.path().join("out");
    let (ok, _, err) = run(Command::new(tool("tftp"))
        .args([
            &a.ip().to_string(),
            &a.port().to_string(),
            "-m",
            "ascii",
            "-c",
            "get",
            "text",
        ])
        .arg(&dst));
    assert!(ok, "{err}");
    check(&dst, &text, "netascii through tftp-hpa");
}

#[test]
fn client_timeouts_above_the_cap_are_not_granted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    let s = server(dir.path(), &["--tftp-max-client-timeout", "3"]);
    let raw = Raw::new(s.tftp.unwrap());
    for (asked, granted) in [("3", true), ("4", false), ("255", false)] {
        raw.rrq("f", &[("timeout", asked.into()), ("tsize", "0".into())]);
        let (b, from) = raw.recv().unwrap();
        let Packet::Oack(o) = t::decode(&b).unwrap() else {
            panic!("expected OACK")
        };
        let want: Vec<(String, String)> = granted
            .then(|| ("timeout".to_string(), asked.to_string()))
            .into_iter()
            .chain([("tsize".to_string(), "1".to_string())])
            .collect();
        assert_eq!(o, want, "timeout {asked}");
        // End the transfer: the OACK acknowledged, then the one block.
        raw.sock.send_to(&t::ack(0), from).unwrap();
        raw.recv().unwrap();
        raw.sock.send_to(&t::ack(1), from).unwrap();
    }
}

#[test]
fn requests_that_never_acknowledge_cannot_hold_every_slot() {
    let fx = fixture();
    // Every client here is 127.0.0.1: the per-client limit is off, the global one is at stake.
    let s = server(
        fx.dir.path(),
        &[
            "--tftp-max-transfers",
            "8",
            "--tftp-max-transfers-per-client",
            "0",
        ],
    );
    let a = s.tftp.unwrap();
    // Eight requests that never acknowledge, as spoofed ones cannot, take every slot.
    let holders: Vec<Raw> = (0..8)
        .map(|_| {
            let r = Raw::new(a);
            r.rrq("f100000", &[]);
            r.recv().expect("DATA 1");
            r
        })
        .collect();
    // Real clients are served all the same, each in the slot of the oldest.
    let out = tempfile::tempdir().unwrap();
    let (name, data) = &fx.files[7];
    let dst = out.path().join("curl");
    let (ok, _, err) = run(Command::new(tool("curl"))
        .args(["-sS", "-o"])
        .arg(&dst)
        .arg(format!("tftp://{a}/{name}")));
    assert!(ok, "curl: {err}");
    check(&dst, data, "curl while the slots were held");
    let dst = out.path().join("hpa");
    let (ok, _, err) = run(Command::new(tool("tftp"))
        .args([&a.ip().to_string(), &a.port().to_string()])
        .args(["-m", "binary", "-c", "get", name])
        .arg(&dst));
    assert!(ok, "tftp-hpa: {err}");
    check(&dst, data, "tftp-hpa while the slots were held");
    drop(holders);
}

#[test]
fn a_transfer_ends_at_its_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), pattern(512 * 100, 6)).unwrap();
    let s = server(dir.path(), &["--tftp-max-transfer-secs", "2"]);
    let raw = Raw::new(s.tftp.unwrap());
    raw.rrq("f", &[]);
    // An ACK every 300 ms, before each 1 s timeout: 100 blocks would take 30 s.
    let mut blocks = 0;
    let message = loop {
        let (b, from) = raw.recv().expect("DATA or ERROR");
        match t::decode(&b).unwrap() {
            Packet::Data { block, .. } => {
                blocks += 1;
                std::thread::sleep(Duration::from_millis(300));
                raw.sock.send_to(&t::ack(block), from).unwrap();
            }
            Packet::Error { message, .. } => break message,
            p => panic!("unexpected {p:?}"),
        }
    };
    assert_eq!(message, "transfer time limit reached");
    assert!(blocks < 100, "the whole file went out");
}
