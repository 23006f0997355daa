//! `ltsp-replay` with the recorded boot (tests/fixtures/boot-trace.txt) against ltsp-server
//! and nbdkit on loopback: every READ verified against the served image, no error; a
//! different image or a closed port makes it fail. ltsp-server records the replay with
//! `--nbd-trace`, and that trace has the boot's requests at no more than its depth.

use ltsp_tests::{pattern, run, tool, workspace_root, ServerProc};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/boot-trace.txt")
}

/// A trace's READs: (connection, send time, offset, length, reply time).
fn reads(text: &str) -> Vec<(u64, u64, u64, u64, u64)> {
    text.lines()
        .filter(|l| l.starts_with("R ") && l.split(' ').nth(3) == Some("read"))
        .map(|l| {
            let f: Vec<u64> = l
                .split(' ')
                .enumerate()
                .filter(|(i, _)| ![0, 3].contains(i))
                .map(|(_, x)| x.parse().unwrap())
                .collect();
            (f[1], f[0], f[2], f[3], f[4])
        })
        .collect()
}

/// The export size of the trace's first connection.
fn export_size(text: &str) -> usize {
    let c = text.lines().find(|l| l.starts_with("C ")).unwrap();
    c.split(' ').nth(5).unwrap().parse().unwrap()
}

/// The most requests of one connection in flight at once.
fn max_depth(rs: &[(u64, u64, u64, u64, u64)]) -> usize {
    let mut by_conn: BTreeMap<u64, Vec<(u64, i32)>> = BTreeMap::new();
    for &(c, t, _, _, done) in rs {
        let e = by_conn.entry(c).or_default();
        e.push((t, 1));
        // A reply at the same instant as a later request still counts as in flight.
        e.push((done + 1, -1));
    }
    let mut m = 0;
    for mut ev in by_conn.into_values() {
        ev.sort();
        let mut d = 0;
        for (_, x) in ev {
            d += x;
            m = m.max(d);
        }
    }
    m as usize
}

struct Images {
    dir: tempfile::TempDir,
    trace: String,
}

impl Images {
    /// The image the trace is replayed against (any bytes of the recorded size), and a
    /// second one of the same size with other bytes.
    fn new() -> Images {
        let trace = std::fs::read_to_string(fixture()).unwrap();
        let size = export_size(&trace);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root.img"), pattern(size, 31)).unwrap();
        std::fs::write(dir.path().join("other.img"), pattern(size, 32)).unwrap();
        Images { dir, trace }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// ltsp-server exporting `img` as "root", NBD only; and its NBD address.
fn serving(img: &str) -> (ServerProc, String) {
    let export = format!("root={img}");
    let s = ServerProc::start(&["--no-tftp", "--export", &export]);
    let addr = s.nbd.unwrap().to_string();
    (s, addr)
}

/// ltsp-replay of the recorded boot against `server`: exit status, stdout, stderr.
fn run_replay(server: &str, args: &[&str]) -> (bool, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_ltsp-replay"))
        .args(["--trace", fixture().to_str().unwrap(), "--server", server])
        .args(args))
}

fn replay(server: &str, args: &[&str]) -> (bool, BTreeMap<String, String>, String) {
    let (ok, out, err) = run_replay(server, args);
    let line = out
        .lines()
        .find(|l| l.starts_with("REPLAY "))
        .unwrap_or_else(|| panic!("no REPLAY line: {out}\n{err}"));
    let kv = line
        .split(' ')
        .skip(1)
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (ok, kv, err)
}

/// The boot's READs all answered with the image's bytes.
fn assert_clean(ok: bool, kv: &BTreeMap<String, String>, err: &str, trace: &str) {
    let rs = reads(trace);
    let bytes: u64 = rs.iter().map(|r| r.3).sum();
    assert!(ok, "{kv:?}\n{err}");
    assert_eq!(kv["errors"], "0", "{err}");
    assert_eq!(kv["unanswered"], "0", "{err}");
    assert_eq!(kv["requests"], rs.len().to_string());
    assert_eq!(kv["bytes"], bytes.to_string());
    assert_eq!(kv["connections"], "1/1");
}

#[test]
fn the_recorded_boot_replays_against_ltsp_server_and_is_traced_again() {
    let im = Images::new();
    let img = im.path("root.img");
    let again = im.dir.path().join("again.txt");
    let export = format!("root={img}");
    let s = ServerProc::start(&[
        "--no-tftp",
        "--export",
        &export,
        "--nbd-trace",
        again.to_str().unwrap(),
    ]);
    let addr = s.nbd.unwrap().to_string();
    let (ok, kv, err) = replay(&addr, &["--think-scale", "0", "--verify", &img]);
    assert_clean(ok, &kv, &err, &im.trace);
    assert!(s.terminate(), "ltsp-server stops cleanly on SIGTERM");
    let text = std::fs::read_to_string(&again).unwrap();
    assert_eq!(text.lines().last(), Some("# dropped 0"), "{text}");
    // The same requests, and never more in flight than when recorded.
    let key = |rs: Vec<(u64, u64, u64, u64, u64)>| {
        let mut v: Vec<(u64, u64)> = rs.iter().map(|r| (r.2, r.3)).collect();
        v.sort();
        v
    };
    assert_eq!(key(reads(&text)), key(reads(&im.trace)));
    let (was, now) = (max_depth(&reads(&im.trace)), max_depth(&reads(&text)));
    assert!(now <= was, "replayed depth {now}, recorded {was}");
}

/// nbdkit serving `img` read-only on a free loopback port, killed on drop.
struct Nbdkit(Child, String);

impl Nbdkit {
    fn start(img: &str) -> Nbdkit {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(tool("nbdkit"))
                .args(["-f", "-r", "-i", "127.0.0.1", "-p", &port.to_string()])
                .args(["-e", "root", "file", img])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("start nbdkit");
            let addr = format!("127.0.0.1:{port}");
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return Nbdkit(child, addr);
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: another one
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nbdkit did not start");
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_recorded_boot_replays_against_nbdkit() {
    let im = Images::new();
    let img = im.path("root.img");
    let k = Nbdkit::start(&img);
    // Think times kept, scaled down: the waits are exercised too.
    let (ok, kv, err) = replay(&k.1, &["--think-scale", "0.01", "--verify", &img]);
    assert_clean(ok, &kv, &err, &im.trace);
}

#[test]
fn other_bytes_and_a_closed_port_are_errors() {
    let im = Images::new();
    let (s, addr) = serving(&im.path("other.img"));
    let root = im.path("root.img");
    let (ok, kv, err) = replay(&addr, &["--think-scale", "0", "--verify", &root]);
    assert!(!ok, "a mismatch fails the exit code: {kv:?}");
    assert_ne!(kv["errors"], "0");
    assert!(err.contains("data differs from the image"), "{err}");
    // Nothing listens there once the server is gone: refused, every request unanswered.
    drop(s);
    let (ok, kv, err) = replay(&addr, &["--think-scale", "0", "--connect-timeout", "5"]);
    assert!(!ok, "{kv:?}");
    assert_eq!(kv["errors"], "1", "{err}");
    assert_eq!(kv["unanswered"], reads(&im.trace).len().to_string());
    assert!(err.contains("connect"), "{err}");
}

/// A short storm, for correctness only: 50 replayed boots at once, each from its own
/// loopback address (so per-client limits apply as in a fleet), every READ verified. The
/// boots run as the bench runs them: several to a process, 10 in each of 5.
#[test]
fn a_storm_of_50_boots_from_50_addresses_is_served_without_error() {
    let im = Images::new();
    let img = im.path("root.img");
    let (s, addr) = serving(&img);
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 2.0;
    let kids: Vec<Child> = (0..5)
        .map(|p| {
            let sources: Vec<String> = (1..=10)
                .map(|b| format!("127.5.0.{}", p * 10 + b))
                .collect();
            Command::new(env!("CARGO_BIN_EXE_ltsp-replay"))
                .args(["--trace", fixture().to_str().unwrap(), "--server", &addr])
                .args(["--think-scale", "0", "--verify", &img])
                .args(["--source", &sources.join(",")])
                .args(["--start-at", &format!("{start:.6}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start ltsp-replay")
        })
        .collect();
    let rs = reads(&im.trace);
    let mut seen = Vec::new();
    for (p, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "process {p}: {text}\n{err}");
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("REPLAY ")).collect();
        assert_eq!(lines.len(), 10, "one line per boot: {text}");
        for l in lines {
            assert!(
                l.contains(&format!("requests={} ", rs.len())) && l.contains(" errors=0 "),
                "process {p}: {l}"
            );
            seen.push(
                l.split(' ')
                    .find_map(|f| f.strip_prefix("source="))
                    .unwrap()
                    .to_string(),
            );
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        50,
        "every boot its own line and address: {seen:?}"
    );
    // Every boot came from its own address.
    let log = s.log();
    for i in 1..=50 {
        assert!(
            log.contains(&format!("nbd: 127.5.0.{i}:")),
            "127.5.0.{i}: {log}"
        );
    }
}

/// Boots that share a process fail on their own: one from an address this host does not
/// have cannot connect, and only its line says so (the exit code says that one failed).
#[test]
fn a_failed_boot_among_several_in_one_process_is_reported_alone() {
    let im = Images::new();
    let img = im.path("root.img");
    let (_server, addr) = serving(&img);
    // 192.0.2.1 (TEST-NET-1) is no address of this host: bind(2) refuses it, no packet is sent.
    let (ok, out, err) = run_replay(
        &addr,
        &[
            "--think-scale",
            "0",
            "--verify",
            &img,
            "--connect-timeout",
            "5",
            "--source",
            "127.5.1.1,192.0.2.1,127.5.1.2",
        ],
    );
    assert!(!ok, "one boot failed, so the exit code fails: {out}");
    let line = |src: &str| -> BTreeMap<String, String> {
        out.lines()
            .find(|l| l.starts_with("REPLAY ") && l.contains(&format!(" source={src} ")))
            .unwrap_or_else(|| panic!("no line for {src}: {out}"))
            .split(' ')
            .skip(1)
            .filter_map(|f| f.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for good in ["127.5.1.1", "127.5.1.2"] {
        let kv = line(good);
        assert_eq!(kv["errors"], "0", "{good}: {kv:?}\n{err}");
        assert_eq!(kv["unanswered"], "0", "{good}: {kv:?}");
        assert_eq!(kv["requests"], reads(&im.trace).len().to_string());
    }
    let bad = line("192.0.2.1");
    assert_eq!(bad["errors"], "1", "{bad:?}");
    assert_eq!(bad["requests"], "0");
    assert!(err.contains("192.0.2.1: connection"), "{err}");
    assert!(!err.contains("more error lines not shown"), "{err}");
}

/// One boot per address: an address given twice is refused before anything is sent.
#[test]
fn an_address_given_twice_is_refused() {
    let (ok, out, err) = run_replay(
        "127.0.0.1:9",
        &["--source", "127.5.2.1,127.5.2.2,127.5.2.1"],
    );
    assert!(!ok, "{out}");
    assert!(err.contains("127.5.2.1: given twice"), "{err}");
    assert!(!out.contains("REPLAY "), "{out}");
}

/// A storm of failing boots prints 50 error lines, says how many it held back, and still
/// counts every boot's error on its own line.
#[test]
fn error_lines_past_50_are_counted_not_printed() {
    // 192.0.2.X (TEST-NET-1) is no address of this host: bind(2) fails, nothing is sent.
    let sources: Vec<String> = (1..=60).map(|i| format!("192.0.2.{i}")).collect();
    let (ok, out, err) = run_replay(
        "127.0.0.1:9",
        &[
            "--think-scale",
            "0",
            "--connect-timeout",
            "5",
            "--source",
            &sources.join(","),
        ],
    );
    assert!(!ok, "{out}");
    let shown = err
        .lines()
        .filter(|l| l.starts_with("ltsp-replay: 192.0.2."))
        .count();
    assert_eq!(shown, 50, "{err}");
    assert!(
        err.contains("ltsp-replay: 10 more error lines not shown"),
        "{err}"
    );
    let failed = out
        .lines()
        .filter(|l| l.starts_with("REPLAY ") && l.contains(" errors=1 "))
        .count();
    assert_eq!(failed, 60, "{out}");
}
