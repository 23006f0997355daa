//! The HTTP listener under clients that hold what others need, with real clients (curl
//! and raw sockets from several loopback addresses): per-address caps, half-sent headers,
//! clients that never read, huge headers, and the descriptor reserve that keeps NBD
//! accepting whatever HTTP does.

use ltsp_tests::{connect_from, pattern, run, tool, ServerProc};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// curl from a chosen source address: (HTTP code, body), or None when the connection
/// failed (closed or reset before a reply).
fn curl_from(src: &str, url: &str) -> Option<(String, String)> {
    let (ok, out, _) = run(Command::new(tool("curl")).args([
        "-sS",
        "--max-time",
        "60",
        "--interface",
        src,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url,
    ]));
    if !ok {
        return None;
    }
    let (body, code) = out.rsplit_once('\n')?;
    Some((code.to_string(), body.to_string()))
}

/// Polls `cond` for up to a minute (an upper bound for slow machines, not a speed claim).
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("never happened: {what}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Reads until the server closes; a reset counts as closed. Fails if it never closes.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server never closed the connection: {e}"),
        }
    }
}

/// Waits for /metrics to show `line` (counters move just after a connection closes).
fn metric(h: SocketAddr, src: &str, line: &str) -> bool {
    eventually(line, || {
        curl_from(src, &format!("http://{h}/metrics")).is_some_and(|(_, m)| m.contains(line))
    });
    true
}

/// A server with HTTP on loopback and a TFTP root (`dir`), no NBD, plus `extra` flags.
fn start_http(dir: &std::path::Path, extra: &[&str]) -> (ServerProc, SocketAddr) {
    let mut args = vec![
        "--tftp-root",
        dir.to_str().unwrap(),
        "--no-nbd",
        "--http-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let s = ServerProc::start(&args);
    let h = s.http.expect("http address in the log");
    (s, h)
}

#[test]
fn the_ninth_connection_from_one_address_is_refused_while_another_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (s, h) = start_http(
        dir.path(),
        &[
            // Held connections stay open for the whole test.
            "--http-header-timeout",
            "3600",
        ],
    );
    let held: Vec<TcpStream> = (0..8)
        .map(|_| connect_from(ip("127.0.0.1"), h).unwrap())
        .collect();
    // Accepted in order: the ninth meets the cap of 8 (a 503, or a reset before it).
    if let Some((code, body)) = curl_from("127.0.0.1", &format!("http://{h}/healthz")) {
        assert_eq!(code, "503", "{body}");
    }
    assert_eq!(
        curl_from("127.0.0.2", &format!("http://{h}/healthz")),
        Some(("200".into(), "ok\n".into()))
    );
    assert!(metric(
        h,
        "127.0.0.3",
        "ltsp_http_refused_total{reason=\"per_client\"} 1\n"
    ));
    assert!(s.log_has("refused: connections open from this address"));
    // A slot given back is a slot to use again.
    drop(held);
    eventually("127.0.0.1 served again", || {
        curl_from("127.0.0.1", &format!("http://{h}/healthz")).is_some_and(|(c, _)| c == "200")
    });
}

/// A boot storm: every slot is taken, each address within its share. A new client is not
/// refused: it waits its turn and is served when a slot is given back.
#[test]
fn with_every_slot_taken_by_distinct_addresses_curl_waits_its_turn_instead_of_a_503() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinuz"), vec![b'k'; 1 << 20]).unwrap();
    let (s, h) = start_http(
        dir.path(),
        &[
            "--http-max-connections",
            "2",
            "--http-header-timeout",
            "3600",
        ],
    );
    let held: Vec<TcpStream> = ["127.0.0.1", "127.0.0.2"]
        .iter()
        .map(|a| connect_from(ip(a), h).unwrap())
        .collect();
    // Accepted in order: the two held ones take both slots before curl comes.
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("http://{h}/files/vmlinuz");
    let waiting = std::thread::spawn(move || curl_from("127.0.0.3", &url));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !waiting.is_finished(),
        "curl was answered with every slot taken"
    );
    drop(held);
    let (code, body) = waiting.join().unwrap().expect("curl got a reply");
    assert_eq!(code, "200");
    assert_eq!(body.len(), 1 << 20);
    assert!(!s.log().contains("refused"), "{}", s.log());
}

#[test]
fn a_half_sent_header_and_an_idle_keepalive_are_closed_while_curl_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, h) = start_http(dir.path(), &["--http-header-timeout", "2"]);
    let mut half = TcpStream::connect(h).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = TcpStream::connect(h).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(
        curl_from("127.0.0.1", &format!("http://{h}/healthz")),
        Some(("200".into(), "ok\n".into()))
    );
    let got = String::from_utf8_lossy(&read_until_closed(&mut half)).into_owned();
    assert!(!got.contains(" 200 "), "{got}");
    // Answered, then closed once it sat idle for the header timeout.
    let got = String::from_utf8_lossy(&read_until_closed(&mut idle)).into_owned();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(metric(h, "127.0.0.1", "ltsp_http_timeouts_total 2\n"));
}

#[test]
fn a_client_that_never_reads_a_large_file_is_dropped_after_the_write_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Far more than the socket buffers of both ends can hold.
    let size = 64 << 20;
    std::fs::write(dir.path().join("big"), pattern(size, 3)).unwrap();
    let (s, h) = start_http(dir.path(), &["--http-write-timeout", "2"]);
    let mut c = TcpStream::connect(h).unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"GET /files/big HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    eventually("the server gives up on the connection", || {
        s.log()
            .lines()
            .any(|l| l.contains(&format!("http: {me}: closed: ")) && l.contains("write timeout"))
    });
    // Others are served meanwhile.
    assert_eq!(
        curl_from("127.0.0.2", &format!("http://{h}/healthz")).map(|r| r.0),
        Some("200".into())
    );
    // What arrives is what was in flight: a truncated body, then the close.
    let got = read_until_closed(&mut c);
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(got.len() < size, "{} bytes: the whole file", got.len());
    assert!(metric(h, "127.0.0.2", "ltsp_http_timeouts_total 1\n"));
    assert!(!s.log().contains("sent \"big\""));
}

#[test]
fn a_huge_header_gets_431_or_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, h) = start_http(dir.path(), &["--http-max-header-bytes", "16384"]);
    let request = |extra: usize| {
        let mut c = TcpStream::connect(h).unwrap();
        let mut req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: ".to_vec();
        req.resize(req.len() + extra, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        // The server may close before the whole header is in: that is a refusal too.
        let _ = c.write_all(&req);
        String::from_utf8_lossy(&read_until_closed(&mut c)).into_owned()
    };
    // 32 KiB: well under hyper's own default limit (about 400 KiB), over the setting.
    let got = request(32 * 1024);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 431 "), "{got}");
    // A large but allowed header is served.
    let got = request(8 * 1024);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
}

#[test]
fn descriptor_limit_is_raised_and_nbd_accepts_whatever_http_holds() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("root.img");
    std::fs::write(&img, pattern(1 << 20, 5)).unwrap();
    let (soft, hard, nbd_max) = (256u64, 400u64, 40usize);
    let s = ServerProc::start_under(
        &["prlimit", &format!("--nofile={soft}:{hard}"), "--"],
        &[
            "--tftp-root",
            dir.path().to_str().unwrap(),
            "--export",
            &format!("root={}", img.display()),
            "--nbd-max-connections",
            &nbd_max.to_string(),
            // Every client here is 127.0.0.1.
            "--nbd-max-connections-per-client",
            "0",
            "--http-listen",
            "127.0.0.1:0",
            // Only the descriptor pool limits HTTP here, and held connections stay open.
            "--http-max-connections",
            "100000",
            "--http-max-connections-per-client",
            "0",
            "--http-header-timeout",
            "3600",
        ],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["400", "400"], "{line}");
    assert!(s.log_has("descriptors: soft limit raised from 256 to 400 (the hard limit)"));
    let h = s.http.unwrap();
    let n = s.nbd.unwrap();
    // As many HTTP connections as the server has descriptors: without the reserve it
    // would run out, and NBD accepts would fail with it.
    let plan = ltsp_server::limits::FdPlan::new(hard, nbd_max);
    assert!(plan.covered);
    let tries = hard as usize;
    let held: Vec<TcpStream> = (0..tries).map(|_| TcpStream::connect(h).unwrap()).collect();
    eventually("every HTTP connection admitted or refused", || {
        s.log().matches("refused: descriptors in use").count() == tries - plan.slots
    });
    // Every NBD connection up to its cap still gets the server's greeting.
    let nbd: Vec<TcpStream> = (0..nbd_max)
        .map(|i| {
            let mut c = TcpStream::connect(n).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut magic = [0u8; 8];
            c.read_exact(&mut magic)
                .unwrap_or_else(|e| panic!("NBD connection {i}: no greeting: {e}"));
            assert_eq!(&magic, b"NBDMAGIC");
            c
        })
        .collect();
    assert!(!s.log().contains("accept: "), "{}", s.log());
    drop((held, nbd));
    eventually("HTTP served again once its connections close", || {
        curl_from("127.0.0.1", &format!("http://{h}/healthz")).is_some_and(|(c, _)| c == "200")
    });
}
