//! ltsp-server's NBD against real clients (nbdinfo, nbdcopy, qemu-io) and a raw client for
//! the protocol corners and hostile behaviour that real clients never show.

use ltsp_common::nbd as w;
use ltsp_tests::{connect_from, pattern, run, tool, ServerProc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: usize = 8 * 1024 * 1024 + 4096;

struct Fx {
    dir: tempfile::TempDir,
    root: Vec<u8>,
    s: ServerProc,
}

fn start(extra: &[&str]) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let root = pattern(SIZE, 11);
    std::fs::write(dir.path().join("root.img"), &root).unwrap();
    std::fs::write(dir.path().join("other.img"), pattern(65536, 12)).unwrap();
    let a = format!("root={}", dir.path().join("root.img").display());
    let b = format!("other={}", dir.path().join("other.img").display());
    let mut args = vec![
        "--no-tftp",
        "--export",
        &a,
        "--export",
        &b,
        "--default-export",
        "root",
    ];
    args.extend_from_slice(extra);
    let s = ServerProc::start(&args);
    Fx { dir, root, s }
}

fn uri(a: SocketAddr, export: &str) -> String {
    format!("nbd://{a}/{export}")
}

#[test]
fn nbdinfo_sees_size_flags_and_list() {
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    let (ok, out, err) = run(Command::new(tool("nbdinfo")).args(["--size", &uri(a, "root")]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), SIZE.to_string());
    // nbdinfo --is/--can exit 0 for true, 2 for false.
    let st = |args: &[&str]| {
        Command::new(tool("nbdinfo"))
            .args(args)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(st(&["--is", "read-only", &uri(a, "root")]), Some(0));
    assert_eq!(st(&["--can", "multi-conn", &uri(a, "root")]), Some(0));
    assert_eq!(st(&["--can", "write", &uri(a, "root")]), Some(2));
    let (ok, out, err) = run(Command::new(tool("nbdinfo")).args(["--list", &format!("nbd://{a}")]));
    assert!(ok, "{err}");
    assert!(
        out.contains("export=\"root\"") && out.contains("export=\"other\""),
        "{out}"
    );
    // The empty name selects the default export.
    let (ok, out, _) = run(Command::new(tool("nbdinfo")).args(["--size", &format!("nbd://{a}")]));
    assert!(ok);
    assert_eq!(out.trim(), SIZE.to_string());
    let (ok, _, err) = run(Command::new(tool("nbdinfo")).args(["--size", &uri(a, "nope")]));
    assert!(!ok, "unknown export must fail");
    assert!(
        err.to_lowercase().contains("unknown") || err.contains("nope"),
        "{err}"
    );
}

#[test]
fn nbdcopy_whole_export_is_byte_identical() {
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    let out = fx.dir.path().join("copy");
    for conns in ["1", "4"] {
        let (ok, _, err) = run(Command::new(tool("nbdcopy"))
            .args(["--connections", conns, "--requests", "64", &uri(a, "root")])
            .arg(&out));
        assert!(ok, "nbdcopy: {err}");
        assert!(
            std::fs::read(&out).unwrap() == fx.root,
            "copy with {conns} connections differs"
        );
    }
}

/// Reads the page cache cannot answer at once are read on the blocking pool, not the
/// event loop: evicted from the cache, the image still comes back byte for byte, in
/// small requests (buffered path) and large ones (sendfile).
#[test]
fn reads_that_miss_the_page_cache_are_served_intact() {
    use std::os::fd::AsRawFd;
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    let img = fx.dir.path().join("root.img");
    let out = fx.dir.path().join("copy");
    for size in ["4096", "262144"] {
        let f = std::fs::File::open(&img).unwrap();
        // Written just now: dirty pages are not dropped until written back.
        f.sync_all().unwrap();
        // SAFETY: advice on an open descriptor; it changes no memory of ours.
        let r = unsafe {
            nix::libc::posix_fadvise(f.as_raw_fd(), 0, 0, nix::libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(r, 0);
        let (ok, _, err) = run(Command::new(tool("nbdcopy"))
            .args([
                "--connections",
                "2",
                "--request-size",
                size,
                &uri(a, "root"),
            ])
            .arg(&out));
        assert!(ok, "nbdcopy: {err}");
        assert!(
            std::fs::read(&out).unwrap() == fx.root,
            "copy with {size}-byte requests from a cold cache differs"
        );
    }
}

#[test]
fn qemu_io_write_is_refused_and_read_works() {
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    let (ok, out, err) =
        run(Command::new(tool("qemu-io")).args(["-f", "raw", &uri(a, "root"), "-c", "write 0 4k"]));
    assert!(!ok, "write must be refused: {out}");
    assert!(
        err.contains("Permission denied")
            || err.contains("read-only")
            || out.contains("Permission denied"),
        "{err}{out}"
    );
    let (ok, out, err) = run(Command::new(tool("qemu-io")).args([
        "-r",
        "-f",
        "raw",
        &uri(a, "root"),
        "-c",
        "read -P 0 0 1",
    ]));
    // The first byte of the pattern is not zero: qemu-io's pattern check must say so.
    assert!(ok || out.contains("Pattern verification failed"), "{err}");
    assert!(out.contains("Pattern verification failed"), "{out}");
}

/// A raw fixed-newstyle client.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(a: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(g, w::server_greeting());
        s.write_all(&(w::CLIENT_FIXED_NEWSTYLE | w::CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        Raw { s }
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        self.s
            .write_all(&w::option_header(opt, data.len() as u32))
            .unwrap();
        self.s.write_all(data).unwrap();
    }

    fn reply(&mut self) -> (w::OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let h = w::parse_option_reply_header(&h).unwrap();
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d).unwrap();
        (h, d)
    }

    /// NBD_OPT_GO; returns what the server said about the export.
    fn go(&mut self, name: &str, infos: &[u16]) -> Result<w::ExportInfo, u32> {
        self.option(w::OPT_GO, &w::info_request(name, infos));
        let mut info = w::ExportInfo::default();
        loop {
            let (h, d) = self.reply();
            match h.reply {
                w::REP_INFO => w::apply_info_reply(&mut info, &d).unwrap(),
                w::REP_ACK => return Ok(info),
                e => return Err(e),
            }
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) {
        let r = w::Request {
            flags: 0,
            kind,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&w::encode_request(&r)).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut b = [0u8; 16];
        self.s.read_exact(&mut b).unwrap();
        assert_eq!(
            u32::from_be_bytes(b[..4].try_into().unwrap()),
            w::SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(b[4..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..].try_into().unwrap()),
        )
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(w::CMD_READ, 7, offset, len);
        let (e, c) = self.simple();
        assert_eq!((e, c), (0, 7));
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        d
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn negotiation_corners() {
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    let mut c = Raw::connect(a);
    // Unknown option: ERR_UNSUP and the negotiation goes on.
    c.option(42, b"whatever");
    assert_eq!(c.reply().0.reply, w::REP_ERR_UNSUP);
    // STARTTLS: refused properly, still negotiating.
    c.option(w::OPT_STARTTLS, b"");
    assert_eq!(c.reply().0.reply, w::REP_ERR_UNSUP);
    // INFO on a missing export, then a malformed one.
    c.option(w::OPT_INFO, &w::info_request("missing", &[]));
    assert_eq!(c.reply().0.reply, w::REP_ERR_UNKNOWN);
    c.option(w::OPT_INFO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.reply().0.reply, w::REP_ERR_INVALID);
    // LIST with data is invalid.
    c.option(w::OPT_LIST, b"x");
    assert_eq!(c.reply().0.reply, w::REP_ERR_INVALID);
    // INFO with name, description and block size; then GO.
    c.option(
        w::OPT_INFO,
        &w::info_request(
            "other",
            &[w::INFO_NAME, w::INFO_DESCRIPTION, w::INFO_BLOCK_SIZE],
        ),
    );
    let mut info = w::ExportInfo::default();
    let mut name = None;
    loop {
        let (h, d) = c.reply();
        if h.reply == w::REP_ACK {
            break;
        }
        assert_eq!(h.reply, w::REP_INFO);
        if u16::from_be_bytes([d[0], d[1]]) == w::INFO_NAME {
            name = Some(String::from_utf8(d[2..].to_vec()).unwrap());
        }
        w::apply_info_reply(&mut info, &d).unwrap();
    }
    assert_eq!(name.as_deref(), Some("other"));
    assert_eq!(info.size, 65536);
    assert!(info.description.unwrap().contains("other"));
    assert_eq!(info.block_size, Some((1, 4096, w::MAX_REQUEST_LEN)));
    let info = c.go("", &[]).unwrap();
    assert_eq!(info.size, SIZE as u64);
    assert_eq!(
        info.flags,
        w::TFLAG_HAS_FLAGS | w::TFLAG_READ_ONLY | w::TFLAG_CAN_MULTI_CONN
    );
    assert_eq!(c.read(4096, 4096), fx.root[4096..8192]);

    // EXPORT_NAME (old clients) with NO_ZEROES: size and flags only.
    let mut c = Raw::connect(a);
    c.option(w::OPT_EXPORT_NAME, b"root");
    let mut b = [0u8; 10];
    c.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE as u64);
    assert_eq!(c.read(0, 512), fx.root[..512]);
    // ABORT: ACK, then the server closes.
    let mut c = Raw::connect(a);
    c.option(w::OPT_ABORT, b"");
    assert_eq!(c.reply().0.reply, w::REP_ACK);
    assert!(c.closed());
}

#[test]
fn transmission_rules() {
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    let mut c = Raw::connect(a);
    c.go("root", &[]).unwrap();
    // WRITE: EPERM, and the payload is drained (the next request still parses).
    c.request(w::CMD_WRITE, 1, 0, 100_000);
    c.s.write_all(&vec![0xAAu8; 100_000]).unwrap();
    assert_eq!(c.simple(), (w::EPERM, 1));
    c.request(w::CMD_TRIM, 2, 0, 4096);
    assert_eq!(c.simple(), (w::EPERM, 2));
    // Out of range and oversized reads: EINVAL, connection stays usable.
    c.request(w::CMD_READ, 3, SIZE as u64 - 10, 11);
    assert_eq!(c.simple(), (w::EINVAL, 3));
    c.request(w::CMD_READ, 4, u64::MAX - 1, 4096);
    assert_eq!(c.simple(), (w::EINVAL, 4));
    c.request(w::CMD_READ, 5, 0, w::MAX_REQUEST_LEN + 1);
    assert_eq!(c.simple(), (w::EINVAL, 5));
    assert_eq!(c.read(SIZE as u64 - 10, 10), fx.root[SIZE - 10..]);
    // 128 pipelined reads then DISC: every one answered (any order), then close.
    let mut want = std::collections::HashMap::new();
    for i in 0..128u64 {
        let off = (i * 65_537) % (SIZE as u64 - 4096);
        c.request(w::CMD_READ, 1000 + i, off, 4096);
        want.insert(1000 + i, off as usize);
    }
    c.request(w::CMD_DISC, 0, 0, 0);
    for _ in 0..128 {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0);
        let off = want.remove(&cookie).expect("a cookie we sent, once");
        let mut d = vec![0u8; 4096];
        c.s.read_exact(&mut d).unwrap();
        assert!(d == fx.root[off..off + 4096], "data for cookie {cookie}");
    }
    assert!(want.is_empty());
    assert!(c.closed(), "server closes after DISC");
}

#[test]
fn hostile_clients_do_not_hurt_a_good_one() {
    // No per-client limit here: this is about the global behaviour under 1,000 sockets.
    let fx = start(&[
        "--nbd-handshake-timeout",
        "2",
        "--nbd-max-connections-per-client",
        "0",
    ]);
    let a = fx.s.nbd.unwrap();
    // Oversized option length: ERR_TOO_BIG, then closed without reading 4 GiB.
    let mut big = Raw::connect(a);
    big.s
        .write_all(&w::option_header(w::OPT_GO, u32::MAX))
        .unwrap();
    assert_eq!(big.reply().0.reply, w::REP_ERR_TOO_BIG);
    assert!(big.closed());
    // Bad client flags: closed.
    let mut bad = TcpStream::connect(a).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    bad.read_exact(&mut g).unwrap();
    bad.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(matches!(bad.read(&mut g), Ok(0) | Err(_)));
    // Garbage instead of an option header: closed.
    let mut junk = Raw::connect(a);
    junk.s.write_all(&pattern(64, 5)).unwrap();
    assert!(junk.closed());
    // A half-sent handshake is dropped after the handshake timeout.
    let mut half = Raw::connect(a);
    half.s
        .write_all(&w::option_header(w::OPT_GO, 20)[..10])
        .unwrap();
    let t0 = Instant::now();
    // Closed by the server (EOF or reset), not our 10 s read timeout, and not before the
    // handshake timeout.
    let mut b = [0u8; 1];
    let r = half.s.read(&mut b);
    assert!(
        matches!(r, Ok(0))
            || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    assert!(t0.elapsed() >= Duration::from_secs(1));
    // 1,000 idle connections (past the handshake timeout they are gone; during it they
    // hold slots): a real client still gets through meanwhile.
    let idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(a).unwrap()).collect();
    let out = fx.dir.path().join("copy");
    let (ok, _, err) = run(Command::new(tool("nbdcopy"))
        .args([&uri(a, "root")])
        .arg(&out));
    assert!(ok, "{err}");
    assert!(std::fs::read(&out).unwrap() == fx.root);
    drop(idle);
    let log = fx.s.log();
    assert!(log.contains("handshake not finished"), "{log}");
}

#[test]
fn one_address_cannot_take_every_connection_slot() {
    let fx = start(&[
        "--nbd-max-connections-per-client",
        "8",
        "--nbd-handshake-timeout",
        "30",
    ]);
    let a = fx.s.nbd.unwrap();
    // Another machine (127.0.0.2) opens 1,000 connections and sits on them.
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..1000 {
        let s = connect_from(other, a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        held.push(s);
    }
    // Its first 8 got a greeting; the rest were closed at once.
    let mut greeted = 0;
    let mut closed = 0;
    for s in held.iter_mut() {
        let mut g = [0u8; 18];
        match s.read_exact(&mut g) {
            Ok(()) => greeted += 1,
            Err(_) => closed += 1,
        }
    }
    assert_eq!((greeted, closed), (8, 992));
    // A node on another address is served as if nothing happened.
    let out = fx.dir.path().join("copy");
    let (ok, _, err) = run(Command::new(tool("nbdcopy"))
        .args([&uri(a, "root")])
        .arg(&out));
    assert!(ok, "{err}");
    assert!(std::fs::read(&out).unwrap() == fx.root);
    assert!(fx
        .s
        .log()
        .contains("refused: 8 connections open from 127.0.0.2"));
}

#[test]
fn an_idle_connection_is_closed_when_asked() {
    let fx = start(&["--nbd-idle-timeout", "1"]);
    let a = fx.s.nbd.unwrap();
    let mut c = Raw::connect(a);
    c.go("root", &[]).unwrap();
    assert_eq!(c.read(0, 4096), fx.root[..4096]);
    let t0 = Instant::now();
    assert!(c.closed(), "an idle connection stays open");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert!(fx.s.log_has("closed as idle"), "{}", fx.s.log());
}

#[test]
fn an_image_renamed_over_the_export_only_affects_new_connections() {
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    // Identities, not descriptions: on a loaded host both could still read `hashing=`.
    let before = identity_of(a, "root");
    let mut old = Raw::connect(a);
    old.go("root", &[]).unwrap();
    // The operator's image update: write a new file, rename it over the old path.
    let new_img = pattern(SIZE * 2, 99);
    let tmp = fx.dir.path().join("root.img.new");
    std::fs::write(&tmp, &new_img).unwrap();
    std::fs::rename(&tmp, fx.dir.path().join("root.img")).unwrap();
    // The running node keeps reading the bytes it started with.
    assert_eq!(old.read(0, 65536), fx.root[..65536]);
    assert_eq!(old.read(SIZE as u64 - 4096, 4096), fx.root[SIZE - 4096..]);
    // A node connecting now gets the new image, with a different identity.
    let mut new = Raw::connect(a);
    let after = new.go("root", &[]).unwrap();
    assert_eq!(after.size, (SIZE * 2) as u64);
    assert_eq!(new.read(0, 65536), new_img[..65536]);
    assert_ne!(before, identity_of(a, "root"));
}

/// The identity in an ltsp-server description, once hashed (`hashing=` means: retry).
fn identity_of(a: SocketAddr, name: &str) -> String {
    for _ in 0..200 {
        let mut c = Raw::connect(a);
        let i = c.go(name, &[w::INFO_DESCRIPTION]).unwrap();
        if let Some(id) = i.identity() {
            return id.to_string();
        }
        assert!(i.hashing().is_some(), "{:?}", i.description);
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name}: never hashed");
}

/// A running node reconnects by identity (`root@blake3:<hex>`) and finds the bytes it
/// booted from after the image was replaced, and after the server restarted too; the
/// plain name gives the new image; nbdinfo reads a version by its name.
#[test]
fn a_replaced_image_is_still_served_by_its_identity() {
    let fx = start(&[]);
    let a = fx.s.nbd.unwrap();
    let v1 = identity_of(a, "root");
    let new_img = pattern(SIZE, 77);
    let tmp = fx.dir.path().join("root.img.new");
    std::fs::write(&tmp, &new_img).unwrap();
    std::fs::rename(&tmp, fx.dir.path().join("root.img")).unwrap();
    let v2 = identity_of(a, "root");
    assert_ne!(v1, v2);
    let mut old = Raw::connect(a);
    let i = old
        .go(&format!("root@{v1}"), &[w::INFO_DESCRIPTION])
        .unwrap();
    assert_eq!(i.identity(), Some(v1.as_str()));
    assert_eq!(old.read(0, 65536), fx.root[..65536]);
    let mut new = Raw::connect(a);
    new.go("root", &[]).unwrap();
    assert_eq!(new.read(0, 65536), new_img[..65536]);
    // A version never held is an unknown export, with a reason.
    let missing = format!("root@blake3:{}", "0".repeat(64));
    assert_eq!(
        Raw::connect(a).go(&missing, &[]).unwrap_err(),
        w::REP_ERR_UNKNOWN
    );
    let (ok, out, err) =
        run(Command::new(tool("nbdinfo")).args(["--size", &uri(a, &format!("root@{v1}"))]));
    assert!(ok, "nbdinfo of a version: {err}");
    assert_eq!(out.trim(), SIZE.to_string());
    // A restarted server still serves v1: it was kept in .ltsp-versions beside the export.
    let store = fx
        .dir
        .path()
        .join(".ltsp-versions")
        .join(format!("blake3-{}", &v1[7..]));
    assert!(
        std::fs::read(&store).unwrap() == fx.root,
        "the stored version is v1's bytes"
    );
    let mut fx = fx;
    let dir = fx.dir.path().to_path_buf();
    let a_root = format!("root={}", dir.join("root.img").display());
    let s2 = ServerProc::start(&["--no-tftp", "--export", &a_root]);
    fx.s = s2;
    let a = fx.s.nbd.unwrap();
    let mut again = Raw::connect(a);
    let i = again
        .go(&format!("root@{v1}"), &[w::INFO_DESCRIPTION])
        .unwrap();
    assert_eq!(i.identity(), Some(v1.as_str()));
    assert_eq!(again.read(SIZE as u64 - 4096, 4096), fx.root[SIZE - 4096..]);
}

/// A figure of /proc/PID/status, in bytes (VmHWM: peak resident set; VmRSS: now).
fn vm_bytes(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// 32 connections from 8 addresses send READs and never take a reply (before the budgets,
/// 32 such connections grew the server by ~600 MiB). The server's peak memory stays within
/// what its settings allow, every one of them is closed after the write timeout, and
/// meanwhile nbdinfo, nbdcopy and small READs (past the spent server-wide budget) are
/// served intact.
#[test]
fn clients_that_take_no_replies_cost_bounded_memory_and_are_closed() {
    // The connections' own budgets allow 32 MiB together: the server-wide one must hold.
    const PER_CONN: u64 = 1024 * 1024;
    const ALL: u64 = 2 * 1024 * 1024;
    let fx = start(&[
        "--nbd-max-reply-bytes-per-connection",
        &PER_CONN.to_string(),
        "--nbd-max-reply-bytes",
        &ALL.to_string(),
        "--nbd-write-timeout",
        "3",
    ]);
    let a = fx.s.nbd.unwrap();
    let pid = fx.s.pid();
    let out = fx.dir.path().join("copy");
    let copy = || {
        let (ok, _, err) = run(Command::new(tool("nbdcopy"))
            .args(["--connections", "2", &uri(a, "root")])
            .arg(&out));
        assert!(ok, "nbdcopy: {err}");
        assert!(
            std::fs::read(&out).unwrap() == fx.root,
            "nbdcopy got other bytes"
        );
    };
    // Threads, buffers and pools of a served server exist before the baseline.
    copy();
    let mut warm = Raw::connect(a);
    warm.go("root", &[]).unwrap();
    for i in 0..64u64 {
        assert_eq!(
            warm.read(i * 4096, 4096),
            fx.root[i as usize * 4096..][..4096]
        );
    }
    drop(warm);
    let base = vm_bytes(pid, "VmHWM");

    const CONNS: usize = 32;
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = Vec::new();
    for i in 0..CONNS {
        let src: std::net::IpAddr = format!("127.0.0.{}", 11 + i / 4).parse().unwrap();
        let mut s = connect_from(src, a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&(w::CLIENT_FIXED_NEWSTYLE | w::CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        s.write_all(&w::option_header(w::OPT_EXPORT_NAME, 4))
            .unwrap();
        s.write_all(b"root").unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        let ended = ended.clone();
        // 60 KiB READs (the buffered path) as fast as the server takes them; no reply is
        // ever read. The loop ends when the server closes the connection.
        flood.push(std::thread::spawn(move || {
            let blob: Vec<u8> = (0..1024u64)
                .flat_map(|k| {
                    w::encode_request(&w::Request {
                        flags: 0,
                        kind: w::CMD_READ,
                        cookie: k,
                        offset: (k * 61_440) % (SIZE as u64 - 61_440),
                        len: 61_440,
                    })
                })
                .collect();
            while s.write_all(&blob).is_ok() {}
            ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            s
        }));
    }
    // During the flood: nbdinfo, nbdcopy and small READs work and get the right bytes.
    let (ok, info, err) = run(Command::new(tool("nbdinfo")).args(["--size", &uri(a, "root")]));
    assert!(ok, "nbdinfo during the flood: {err}");
    assert_eq!(info.trim(), SIZE.to_string());
    copy();
    let mut c = Raw::connect(a);
    c.go("root", &[]).unwrap();
    for i in 0..256u64 {
        let off = (i * 65_537) % (SIZE as u64 - 4096);
        assert_eq!(
            c.read(off, 4096),
            fx.root[off as usize..][..4096],
            "small read at {off} during the flood"
        );
    }
    // Every flooding connection is closed for making no write progress (the deadline is
    // only a guard against hanging forever).
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended.load(std::sync::atomic::Ordering::SeqCst) < CONNS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        ended.load(std::sync::atomic::Ordering::SeqCst),
        CONNS,
        "flooding connections still open"
    );
    let peak = vm_bytes(pid, "VmHWM");
    for t in flood {
        drop(t.join().unwrap());
    }
    assert!(fx.s.log_has("no write progress for 3s"), "{}", fx.s.log());
    let closed = fx.s.log().matches("no write progress for 3s").count();
    assert_eq!(closed, CONNS, "connections closed for the write timeout");
    // The bound the settings give: the server-wide reply budget, the buffer pool (a
    // quarter of it), 64 KiB of fixed state per connection, and 6 MiB for the allocator's
    // slack. Without the budgets this flood costs hundreds of MiB.
    let bound = ALL + ALL / 4 + CONNS as u64 * 64 * 1024 + 6 * 1024 * 1024;
    let grew = peak.saturating_sub(base);
    eprintln!(
        "server VmHWM: {} KiB before the flood, {} KiB after (+{} KiB, bound {} KiB)",
        base / 1024,
        peak / 1024,
        grew / 1024,
        bound / 1024
    );
    assert!(
        grew <= bound,
        "peak RSS grew by {grew} bytes under the flood, over the {bound} the settings allow"
    );
    // Closed connections gave their budget back: a fresh client is served.
    let mut c = Raw::connect(a);
    c.go("root", &[]).unwrap();
    assert_eq!(c.read(0, 4096), fx.root[..4096]);
}
