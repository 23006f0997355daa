//! Helpers for the tests in `tests/tests/`: they run the project's real binaries against
//! real peers (curl, atftp, tftp-hpa, nbdinfo, nbdcopy, qemu-io, dnsmasq, QEMU).

pub mod ltsconf_gen;
pub mod qemu_slot;

pub use qemu_slot::qemu_slot;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The soft limit on descriptors raised to the hard one: the flood and the replay hold a
/// socket per connection, thousands of them.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a workspace binary, built (once per test process) so it is never stale.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    built(&BUILT, &["-p", "ltsp-server", "-p", "ltsp-agent"], "debug").join(name)
}

/// Path of a workspace binary in the shipped profile (release: optimised, panic=abort),
/// built once per test process. Hostile-input tests run this one: a panic there aborts.
pub fn release_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    built(&BUILT, &["--release", "-p", "ltsp-server"], "release").join(name)
}

/// `cargo build ARGS` once per `once`; the profile's output directory.
fn built(once: &OnceLock<()>, args: &[&str], profile: &str) -> PathBuf {
    once.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet"])
            .args(args)
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(st.success(), "cargo build {args:?} failed");
    });
    std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"))
        .join(profile)
}

/// A peer the set-up installs. Missing is a failed test, not a skip: `scripts/setup`
/// installs every one, so absence means the set-up is broken.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/setup");
}

/// A running `ltsp-server serve`, killed on drop; its stderr is kept for assertions.
pub struct ServerProc {
    child: Child,
    pub tftp: Option<SocketAddr>,
    pub nbd: Option<SocketAddr>,
    /// The status endpoints, when started with --http-listen.
    pub http: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl ServerProc {
    /// Starts the server with `args` after `serve`. Listeners default to loopback port 0;
    /// the real ports are read back from the log.
    pub fn start(args: &[&str]) -> ServerProc {
        Self::spawn(&[], args)
    }

    /// The same, inside the network namespace `ns`.
    pub fn start_in(ns: &str, args: &[&str]) -> ServerProc {
        Self::spawn(&["ip", "netns", "exec", ns], args)
    }

    /// The release build (the shipped profile), inside the network namespace `ns`.
    pub fn start_release_in(ns: &str, args: &[&str]) -> ServerProc {
        Self::spawn_bin(
            release_bin("ltsp-server"),
            &["ip", "netns", "exec", ns],
            args,
        )
    }

    /// The same, run by a command that execs it in place (so the PID is the server's):
    /// e.g. `["prlimit", "--nofile=256:512", "--"]`.
    pub fn start_under(wrapper: &[&str], args: &[&str]) -> ServerProc {
        Self::spawn(wrapper, args)
    }

    fn spawn(wrapper: &[&str], args: &[&str]) -> ServerProc {
        Self::spawn_bin(bin("ltsp-server"), wrapper, args)
    }

    fn spawn_bin(server: PathBuf, wrapper: &[&str], args: &[&str]) -> ServerProc {
        let mut cmd = match wrapper {
            [first, rest @ ..] => {
                let mut c = Command::new(first);
                c.args(rest).arg(server);
                c
            }
            [] => Command::new(server),
        };
        cmd.arg("serve");
        if !args
            .iter()
            .any(|a| a.starts_with("--tftp-listen") || *a == "--no-tftp")
        {
            cmd.args(["--tftp-listen", "127.0.0.1:0"]);
        }
        if !args
            .iter()
            .any(|a| a.starts_with("--nbd-listen") || *a == "--no-nbd")
        {
            cmd.args(["--nbd-listen", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start ltsp-server");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = l2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let want_tftp = !args.contains(&"--no-tftp");
        let want_nbd = !args.contains(&"--no-nbd");
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut tftp, mut nbd, mut http) = (None, None, None);
        while Instant::now() < deadline {
            {
                let l = log.lock().unwrap();
                for line in l.lines() {
                    if let Some(a) = line
                        .split(" on ")
                        .nth(1)
                        .filter(|_| line.contains("tftp: serving"))
                    {
                        tftp = a.trim().parse().ok();
                    }
                    if let Some(a) = line.split("nbd: listening on ").nth(1) {
                        nbd = a.trim().parse().ok();
                    }
                    if let Some(a) = line
                        .split(" on ")
                        .nth(1)
                        .filter(|_| line.contains("http: /healthz"))
                    {
                        http = a.trim().parse().ok();
                    }
                }
            }
            if (tftp.is_some() || !want_tftp) && (nbd.is_some() || !want_nbd) {
                return ServerProc {
                    child,
                    tftp,
                    nbd,
                    http,
                    log,
                };
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("ltsp-server exited with {st}:\n{}", log.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("ltsp-server did not start:\n{}", log.lock().unwrap());
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 5 s for `what` to appear in the log (lines are written after the fact).
    pub fn log_has(&self, what: &str) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it has not exited or been killed).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Peak and current resident memory in KiB (VmHWM, VmRSS of /proc/PID/status).
    pub fn memory_kib(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    /// Sends SIGTERM and waits; returns whether it exited with success.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Runs a command, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP connection from a chosen local address (any 127.x is this host's): lets a test
/// play several client machines on loopback.
pub fn connect_from(
    src: std::net::IpAddr,
    dst: SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let fam = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(dst),
    )?;
    Ok(std::net::TcpStream::from(fd))
}

/// Network namespaces a test made; deleted when dropped.
pub struct Netns(pub Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let (ok, _, err) = run(Command::new(tool("ip")).args(args));
    assert!(ok, "ip {args:?}: {err}");
}

/// Two namespaces, `ltsp-TAG-sPID` and `ltsp-TAG-cPID`, joined by a veth pair: `veth0` on
/// the server side (up) and `client_if` on the client side (left down). Removed when the
/// guard drops.
pub fn veth_pair(tag: &str, client_if: &str) -> (Netns, String, String) {
    let id = std::process::id();
    let (srv, cli) = (format!("ltsp-{tag}-s{id}"), format!("ltsp-{tag}-c{id}"));
    let guard = Netns(vec![srv.clone(), cli.clone()]);
    ip(&["netns", "add", &srv]);
    ip(&["netns", "add", &cli]);
    ip(&[
        "-n", &srv, "link", "add", "veth0", "type", "veth", "peer", "name", client_if, "netns",
        &cli,
    ]);
    ip(&["-n", &srv, "link", "set", "veth0", "up"]);
    (guard, srv, cli)
}
