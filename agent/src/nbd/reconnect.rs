//! The reconnect helper: keeps a node's root alive across server restarts and failures.
//!
//! The kernel marks an NBD connection dead when its socket fails or a request times out,
//! multicasts NBD_CMD_LINK_DEAD, and holds I/O for the dead-connection timeout. This
//! helper answers each event with a new connection, negotiated with the server in use or
//! the next one given, checked to serve the same bytes (size and content hash), and handed
//! over with NBD_CMD_RECONFIGURE (which replaces only connections already marked dead).
//!
//! It is started by the boot before switch root and runs from the initramfs, never from
//! the network root it repairs: a helper paged in from a dead root device could not run.
//! Its argv[0] starts with `@`, so systemd leaves it alone at shutdown.

use super::handshake::{self, Connected, HandshakeError};
use super::netlink::{Genl, NbdNetlinkError};
use ltsp_common::cmdline::NbdTarget;
use ltsp_common::nbd::ExportInfo;
use std::time::{Duration, Instant};

/// What the helper keeps alive, as the boot negotiated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub index: u32,
    pub size: u64,
    /// The image identity the boot saw ([`ExportInfo::identity`]); a server offering other
    /// bytes is refused.
    pub identity: Option<String>,
    /// Servers in the order given; `current` is the one in use.
    pub targets: Vec<NbdTarget>,
    pub current: usize,
    /// Descriptors the boot hands over (see [`Inherited`]).
    pub fds: Inherited,
}

/// What the boot opens for the helper, which starts in the idle scheduling class and may
/// first run after the switch, when /dev is no longer reachable from its root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inherited {
    /// A LINK_DEAD listener subscribed before the helper started: events from the moment
    /// of NBD_CMD_CONNECT wait in it however late the helper runs.
    pub events: Option<i32>,
    /// /dev/console and /dev/kmsg, for its log.
    pub console: Option<i32>,
    pub kmsg: Option<i32>,
    /// A pipe: one byte once the boot has moved its mounts into the new root. The helper,
    /// whose root is the initramfs, then deletes the initramfs's files in idle time (they
    /// hold RAM for the node's life), a step the boot no longer waits for.
    pub initramfs: Option<i32>,
}

impl Inherited {
    pub fn list(&self) -> Vec<i32> {
        [self.events, self.console, self.kmsg, self.initramfs]
            .into_iter()
            .flatten()
            .collect()
    }
}

impl Watch {
    /// The argv the boot starts the helper with (see `ltsp-agent nbd-watch`).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "nbd-watch".to_string(),
            format!("--index={}", self.index),
            format!("--size={}", self.size),
        ];
        if let Some(id) = &self.identity {
            a.push(format!("--identity={id}"));
        }
        for (name, fd) in [
            ("events", self.fds.events),
            ("console", self.fds.console),
            ("kmsg", self.fds.kmsg),
            ("initramfs", self.fds.initramfs),
        ] {
            if let Some(fd) = fd {
                a.push(format!("--{name}-fd={fd}"));
            }
        }
        // The server in use first, then the others in the order given.
        for i in order(self.targets.len(), self.current) {
            a.push(format!("--target={}", self.targets[i]));
        }
        a
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconnectError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("{target}: serves {got_size} bytes with identity {got:?}, not the image this node runs ({want_size} bytes, {want:?}): refused")]
    OtherImage {
        target: String,
        got: Option<String>,
        want: Option<String>,
        got_size: u64,
        want_size: u64,
    },
}

/// Indexes of `n` targets to try, the one in use first.
pub fn order(n: usize, current: usize) -> Vec<usize> {
    (0..n).map(|i| (current + i) % n.max(1)).collect()
}

/// A new connection must reach exactly the bytes the kernel already caches. A node booted
/// with no identity (`ltsp.allow-anonymous=1`, the boot refused it otherwise) can only
/// check the size.
pub fn check(w: &Watch, target: &NbdTarget, info: &ExportInfo) -> Result<(), Box<ReconnectError>> {
    let got = info.identity().map(str::to_string);
    if info.size != w.size || (w.identity.is_some() && got != w.identity) {
        return Err(Box::new(ReconnectError::OtherImage {
            target: target.to_string(),
            got,
            want: w.identity.clone(),
            got_size: info.size,
            want_size: w.size,
        }));
    }
    Ok(())
}

/// Opens negotiated connections; real TCP at run time, scripted in tests.
pub trait Dialer {
    type Conn;
    /// A connection to `t`, asking for the version `identity` when the node knows it.
    fn dial(
        &mut self,
        t: &NbdTarget,
        identity: Option<&str>,
    ) -> Result<(Self::Conn, ExportInfo), HandshakeError>;
    fn sleep(&mut self, d: Duration);
}

/// Gets `n` connections to the same image: the server in use first, then the others,
/// round after round with a short backoff (each second of it is a second of stalled I/O),
/// for at most `budget`. Moves `w.current` to the server that answered.
pub fn replace<D: Dialer>(
    w: &mut Watch,
    d: &mut D,
    n: usize,
    budget: Duration,
) -> Result<Vec<D::Conn>, Box<ReconnectError>> {
    let start = Instant::now();
    let mut slept = Duration::ZERO;
    let mut delay = Duration::from_millis(100);
    let mut round = 0u32;
    loop {
        let mut last = None;
        for i in order(w.targets.len(), w.current) {
            let t = w.targets[i].clone();
            let mut conns = Vec::new();
            let mut failed = None;
            while conns.len() < n {
                match d.dial(&t, w.identity.as_deref()) {
                    Ok((c, info)) => match check(w, &t, &info) {
                        Ok(()) => conns.push(c),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    },
                    Err(e) => {
                        failed = Some(Box::new(e.into()));
                        break;
                    }
                }
            }
            match failed {
                None => {
                    w.current = i;
                    return Ok(conns);
                }
                Some(e) => {
                    // The first failure of each server, then every 20th round, so a long
                    // outage does not flood the console.
                    if round.is_multiple_of(20) {
                        log::warn!("nbd-watch: {e}");
                    }
                    last = Some(e);
                }
            }
        }
        round += 1;
        if slept.max(start.elapsed()) + delay > budget {
            return Err(last.expect("at least one target"));
        }
        d.sleep(delay);
        slept += delay;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Real TCP connections, with the boot's handshake.
pub struct TcpDialer {
    pub timeout: Duration,
}

impl Dialer for TcpDialer {
    type Conn = Connected;
    fn dial(
        &mut self,
        t: &NbdTarget,
        identity: Option<&str>,
    ) -> Result<(Connected, ExportInfo), HandshakeError> {
        let c = match identity {
            Some(id) => handshake::connect_version(t, id, self.timeout)?,
            None => handshake::connect(t, self.timeout)?,
        };
        let info = c.info.clone();
        Ok((c, info))
    }
    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Netlink(#[from] NbdNetlinkError),
    #[error("waiting for NBD_CMD_LINK_DEAD: {0}")]
    Events(std::io::Error),
    #[error("--events-fd={0}: {1}")]
    EventsFd(i32, String),
}

/// The helper must not be paged out or OOM-killed: with the root device dead, nothing
/// could bring it back. Best effort: a failure is logged.
pub fn harden() {
    use nix::sys::mman::{mlockall, MlockAllFlags};
    // Its binary lives in the initramfs's memory, never on the device it repairs, so pages
    // are locked as they are touched (MCL_ONFAULT) rather than all faulted in up front,
    // which cost the boot ~50 ms of CPU under TCG.
    let flags = MlockAllFlags::MCL_CURRENT
        | MlockAllFlags::MCL_FUTURE
        | MlockAllFlags::from_bits_retain(nix::libc::MCL_ONFAULT);
    if let Err(e) = mlockall(flags) {
        log::warn!("nbd-watch: mlockall: {e}");
    }
    // Started by the boot, the helper may run first after the switch, with /proc out of
    // its reach: the boot then set this for it.
    let path = "/proc/self/oom_score_adj";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "-1000" => {}
        Ok(_) => {
            if let Err(e) = std::fs::write(path, "-1000") {
                log::warn!("nbd-watch: oom_score_adj: {e}");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("nbd-watch: oom_score_adj: {e}"),
    }
}

/// The descriptor `--events-fd` names, checked to be a socket before it is owned.
fn inherited_socket(fd: i32) -> Result<std::os::fd::OwnedFd, WatchError> {
    crate::system::adopt_inherited(fd, nix::libc::S_IFSOCK, "socket")
        .map_err(|e| WatchError::EventsFd(fd, e))
}

/// Leaves the idle scheduling class the boot started the helper in.
fn normal_priority() {
    if let Err(e) = crate::system::set_scheduler(nix::libc::SCHED_OTHER) {
        log::warn!("nbd-watch: leaving SCHED_IDLE: {e}");
    }
}

/// Waits for the boot's byte, then deletes the initramfs (this process's root). EOF means
/// the boot did not switch root here (initramfs-tools' run-init frees it then).
fn free_initramfs_when_told(p: std::os::fd::OwnedFd) {
    use crate::system::System;
    use std::io::Read;
    let mut byte = [0u8; 1];
    if matches!(std::fs::File::from(p).read(&mut byte), Ok(1)) {
        match crate::system::Real.free_initramfs("") {
            Ok(()) => log::info!("nbd-watch: freed the initramfs"),
            Err(e) => log::warn!("nbd-watch: freeing the initramfs: {e}"),
        }
    }
}

/// RECONFIGUREs tried with fresh connections before the helper waits for a new event.
const RECONFIGURE_TRIES: u32 = 10;

/// The helper's loop: never returns unless netlink itself fails.
pub fn run(mut w: Watch) -> Result<(), WatchError> {
    let mut cmds = Genl::open()?;
    let mut events = match w.fds.events.take() {
        Some(fd) => Genl::adopt(inherited_socket(fd)?, cmds.family()),
        None => {
            let mut e = Genl::open()?;
            e.subscribe()?;
            e
        }
    };
    if let Some(fd) = w.fds.initramfs.take() {
        match crate::system::adopt_inherited(fd, nix::libc::S_IFIFO, "pipe") {
            // Made before normal_priority: the thread stays in the idle class.
            Ok(p) => {
                std::thread::spawn(move || free_initramfs_when_told(p));
            }
            Err(e) => log::warn!("nbd-watch: --initramfs-fd={fd}: {e}"),
        }
    }
    // Set up at idle priority, off the boot's critical path; from here on it must win.
    normal_priority();
    let mut dialer = TcpDialer {
        timeout: Duration::from_secs(3),
    };
    log::info!(
        "nbd-watch: watching /dev/nbd{} ({}); servers: {}",
        w.index,
        w.identity.as_deref().unwrap_or("no identity"),
        w.targets
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    loop {
        let dead = match events.wait_link_dead() {
            Ok(d) => d.into_iter().filter(|i| *i == w.index).count(),
            // ENOBUFS: events were dropped; a spare connection costs nothing (the kernel
            // closes it if nothing is dead), a missed one would stall the root.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => 1,
            Err(e) => return Err(WatchError::Events(e)),
        };
        if dead == 0 {
            continue;
        }
        let t0 = Instant::now();
        log::warn!(
            "nbd-watch: /dev/nbd{}: {dead} connection(s) to {} dead; reconnecting",
            w.index,
            w.targets[w.current]
        );
        // Keep trying for as long as the node lives: after the dead-connection timeout
        // the kernel fails I/O, but a new connection still revives the device. A failed
        // RECONFIGURE brings no new event, so it is retried here, with new connections.
        let mut pause = Duration::from_millis(500);
        for attempt in 1.. {
            if attempt > RECONFIGURE_TRIES {
                // Not a passing failure (the device was disconnected, say): wait for the
                // next event instead of dialling servers for nothing.
                log::error!(
                    "nbd-watch: /dev/nbd{}: RECONFIGURE failed {RECONFIGURE_TRIES} times; \
                     waiting for the next link-dead event",
                    w.index
                );
                break;
            }
            let conns = loop {
                match replace(&mut w, &mut dialer, dead, Duration::from_secs(3600)) {
                    Ok(c) => break c,
                    Err(e) => log::error!("nbd-watch: still no server after an hour: {e}"),
                }
            };
            let socks: Vec<&std::net::TcpStream> = conns.iter().map(|c| &c.stream).collect();
            match cmds.reconfigure(w.index, w.identity.as_deref(), &socks) {
                Ok(()) => {
                    log::info!(
                        "nbd-watch: /dev/nbd{}: {dead} connection(s) replaced via {} after \
                         {:.2} s",
                        w.index,
                        w.targets[w.current],
                        t0.elapsed().as_secs_f64()
                    );
                    break;
                }
                Err(e) => {
                    log::error!("nbd-watch: {e}; trying again in {pause:?}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ltsp_common::cmdline::parse_nbdroot;
    use std::collections::VecDeque;

    fn info(size: u64, id: &str) -> ExportInfo {
        ExportInfo {
            size,
            description: Some(format!("ltsp-rs image root size={size} id={id}")),
            ..Default::default()
        }
    }

    fn watch() -> Watch {
        Watch {
            index: 0,
            size: 4096,
            identity: Some("blake3:aa".into()),
            fds: Inherited::default(),
            targets: vec![
                parse_nbdroot("192.0.2.1/root").unwrap(),
                parse_nbdroot("192.0.2.2/root").unwrap(),
            ],
            current: 0,
        }
    }

    /// Answers dials from a script: per host, a queue of outcomes.
    #[derive(Default)]
    struct Script {
        answers: Vec<(String, VecDeque<Result<ExportInfo, ()>>)>,
        dialed: Vec<String>,
        /// The version each dial asked for.
        asked: Vec<Option<String>>,
        slept: Duration,
    }

    impl Dialer for Script {
        type Conn = String;
        fn dial(
            &mut self,
            t: &NbdTarget,
            identity: Option<&str>,
        ) -> Result<(String, ExportInfo), HandshakeError> {
            let host = t.host.clone().unwrap();
            self.dialed.push(host.clone());
            self.asked.push(identity.map(str::to_string));
            let q = &mut self.answers.iter_mut().find(|(h, _)| *h == host).unwrap().1;
            match q.pop_front().unwrap_or(Err(())) {
                // A server still hashing: what the handshake makes of `hashing=`.
                Ok(i) if i.hashing().is_some() => Err(HandshakeError::Hashing {
                    target: t.to_string(),
                    done: i.hashing().unwrap().into(),
                }),
                Ok(i) => Ok((host, i)),
                Err(()) => Err(HandshakeError::Connect {
                    target: t.to_string(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                }),
            }
        }
        fn sleep(&mut self, d: Duration) {
            self.slept += d;
        }
    }

    #[test]
    fn a_restarted_server_is_waited_for() {
        // The server in use refuses twice (restarting), then serves the same image; the
        // other server is tried between, and serves another image: refused.
        let mut s = Script::default();
        s.answers.push((
            "192.0.2.1".into(),
            VecDeque::from([Err(()), Err(()), Ok(info(4096, "blake3:aa"))]),
        ));
        s.answers.push((
            "192.0.2.2".into(),
            VecDeque::from([Ok(info(4096, "blake3:bb")), Ok(info(4096, "blake3:bb"))]),
        ));
        let mut w = watch();
        let c = replace(&mut w, &mut s, 1, Duration::from_secs(60)).unwrap();
        assert_eq!(c, vec!["192.0.2.1".to_string()]);
        assert_eq!(w.current, 0);
        assert_eq!(
            s.dialed,
            [
                "192.0.2.1",
                "192.0.2.2",
                "192.0.2.1",
                "192.0.2.2",
                "192.0.2.1"
            ]
        );
        assert_eq!(s.slept, Duration::from_millis(300), "0.1 s then 0.2 s");
        assert!(
            s.asked.iter().all(|a| a.as_deref() == Some("blake3:aa")),
            "every dial asks for the version the node runs: {:?}",
            s.asked
        );
    }

    #[test]
    fn a_server_still_hashing_is_asked_again() {
        let mut s = Script::default();
        let hashing = ExportInfo {
            size: 4096,
            description: Some("ltsp-rs image root size=4096 hashing=40%".into()),
            ..Default::default()
        };
        s.answers.push((
            "192.0.2.1".into(),
            VecDeque::from([
                Ok(hashing.clone()),
                Ok(hashing),
                Ok(info(4096, "blake3:aa")),
            ]),
        ));
        s.answers.push(("192.0.2.2".into(), VecDeque::new()));
        let mut w = watch();
        let c = replace(&mut w, &mut s, 1, Duration::from_secs(60)).unwrap();
        assert_eq!(c, vec!["192.0.2.1".to_string()]);
        assert_eq!(s.dialed.iter().filter(|h| *h == "192.0.2.1").count(), 3);
    }

    #[test]
    fn an_anonymous_node_checks_the_size_only() {
        // Booted with ltsp.allow-anonymous=1 from a server that gave no identity.
        let mut w = watch();
        w.identity = None;
        let t = w.targets[0].clone();
        let plain = ExportInfo {
            size: 4096,
            ..Default::default()
        };
        assert!(check(&w, &t, &plain).is_ok());
        assert!(check(&w, &t, &info(4096, "blake3:aa")).is_ok());
        assert!(
            check(&w, &t, &info(8192, "blake3:aa")).is_err(),
            "other size"
        );
        // A node that knows its identity never takes a server without one.
        let w = watch();
        assert!(check(&w, &t, &plain).is_err());
    }

    #[test]
    fn a_dead_server_fails_over_to_the_next_with_the_same_image() {
        let mut s = Script::default();
        s.answers.push(("192.0.2.1".into(), VecDeque::new()));
        s.answers.push((
            "192.0.2.2".into(),
            VecDeque::from([Ok(info(4096, "blake3:aa")), Ok(info(4096, "blake3:aa"))]),
        ));
        let mut w = watch();
        let c = replace(&mut w, &mut s, 2, Duration::from_secs(60)).unwrap();
        assert_eq!(c.len(), 2, "both dead connections replaced");
        assert_eq!(
            w.current, 1,
            "the next failure starts with the server that works"
        );
        assert_eq!(
            w.to_args()[4..],
            [
                "--target=nbd://192.0.2.2:10809/root".to_string(),
                "--target=nbd://192.0.2.1:10809/root".to_string()
            ]
        );
    }

    #[test]
    fn other_bytes_are_never_accepted() {
        let w = watch();
        let t = &w.targets[0];
        assert!(check(&w, t, &info(4096, "blake3:aa")).is_ok());
        let e = check(&w, t, &info(4096, "blake3:ab"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused") && e.contains("blake3:ab"), "{e}");
        assert!(
            check(&w, t, &info(8192, "blake3:aa")).is_err(),
            "other size"
        );
        // Only refusals until the deadline: an error, not a connection.
        let mut s = Script::default();
        for h in ["192.0.2.1", "192.0.2.2"] {
            s.answers.push((
                h.into(),
                (0..50).map(|_| Ok(info(4096, "blake3:zz"))).collect(),
            ));
        }
        let mut w = watch();
        let r = replace(&mut w, &mut s, 1, Duration::from_millis(350));
        assert!(matches!(*r.unwrap_err(), ReconnectError::OtherImage { .. }));
    }

    #[test]
    fn the_subscribed_socket_is_named_and_checked() {
        let mut w = watch();
        assert!(!w.to_args().iter().any(|a| a.ends_with("-fd")));
        w.fds = Inherited {
            events: Some(7),
            console: Some(8),
            kmsg: None,
            initramfs: Some(9),
        };
        let a = w.to_args();
        assert!(a.contains(&"--initramfs-fd=9".to_string()), "{a:?}");
        assert!(a.contains(&"--events-fd=7".to_string()), "{a:?}");
        assert!(a.contains(&"--console-fd=8".to_string()), "{a:?}");
        assert!(!a.iter().any(|a| a.starts_with("--kmsg-fd")), "{a:?}");
        assert_eq!(w.fds.list(), vec![7, 8, 9]);
        // Anything but an inherited socket is refused, not adopted.
        assert!(inherited_socket(1).is_err());
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        let e = inherited_socket(f.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert!(inherited_socket(1 << 20).is_err());
    }

    #[test]
    fn order_starts_with_the_server_in_use() {
        assert_eq!(order(3, 0), vec![0, 1, 2]);
        assert_eq!(order(3, 2), vec![2, 0, 1]);
        assert_eq!(order(1, 0), vec![0]);
    }
}
