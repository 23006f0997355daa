//! The boot's NBD step: negotiate with a server, hand the connections to the kernel as
//! /dev/nbdN, fail over between the servers given, and start the reconnect helper that
//! keeps the device alive afterwards.

use super::{handshake, netlink, reconnect};
use crate::boot::{retry, Mode, Platform};
use crate::log as blog;
use crate::system::System;
use ltsp_common::cmdline::{Cmdline, NbdTarget};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAttached {
    pub device: String,
    pub size: u64,
    pub connections: u32,
    pub description: Option<String>,
    /// The image's content hash (or description): what a reconnect must find again.
    pub identity: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Handshake(#[from] handshake::HandshakeError),
    #[error(transparent)]
    Netlink(#[from] netlink::NbdNetlinkError),
    #[error("{target}: connection {n} got another image ({got:?}) than the first ({want:?}): was it replaced during the boot?")]
    ImageChanged {
        target: String,
        n: u32,
        got: Option<String>,
        want: Option<String>,
    },
    #[error("{device} did not show its size within {secs} s after NBD_CMD_CONNECT")]
    DeviceTimeout { device: String, secs: u64 },
    #[error("{target}: the server gives no image identity, so a reconnect could not tell its bytes from others: refused (ltsp.allow-anonymous=1 accepts it, checked by size only)")]
    Anonymous { target: String },
    #[error("{target}: ltsp-server has no identity for this image yet (it could not hash it: {description:?}); trying again")]
    NoIdentityYet { target: String, description: String },
}

/// The device the root is on: N of `root=/dev/nbdN`, 0 by default.
pub fn nbd_index(cmd: &Cmdline) -> u32 {
    cmd.root
        .as_deref()
        .and_then(|r| r.strip_prefix("/dev/nbd"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl NbdError {
    /// A refusal that trying again cannot change: the server answered, and what it
    /// serves is not acceptable under this cmdline.
    fn is_refusal(&self) -> bool {
        matches!(self, NbdError::Anonymous { .. })
    }
}

/// The first target that attaches, each tried in turn, again until the deadline. Returns
/// the index of the target in use and the device. When every target refused (see
/// [`NbdError::is_refusal`]), the boot fails at once instead of retrying until the deadline.
pub fn attach_any(
    p: &mut dyn Platform,
    cmd: &Cmdline,
    targets: &[NbdTarget],
    index: u32,
    deadline: Instant,
) -> Result<(usize, NbdAttached), NbdError> {
    // Ok(Err(e)): every target refused, stop retrying.
    let r = retry("nbd", deadline, cmd.retries, |_| {
        let mut last = None;
        let mut refused = 0;
        for (i, t) in targets.iter().enumerate() {
            match p.attach_nbd(t, index, cmd) {
                Ok(a) => return Ok(Ok((i, a))),
                Err(e) => {
                    log::warn!("nbd: {e}");
                    refused += usize::from(e.is_refusal());
                    last = Some(e);
                }
            }
        }
        let e = last.expect("at least one target");
        if refused == targets.len() {
            Ok(Err(e))
        } else {
            Err(e)
        }
    });
    r.and_then(|x| x)
}

/// Negotiates with `t` (more connections if the server allows), connects the device over
/// generic netlink and waits for it to show its size. `genl` keeps the netlink socket for
/// the reconnect helper's events.
pub fn attach(
    genl: &mut Option<netlink::Genl>,
    t: &NbdTarget,
    index: u32,
    cmd: &Cmdline,
) -> Result<NbdAttached, NbdError> {
    let first = handshake::connect(t, Duration::from_secs(5))?;
    let info = first.info.clone();
    log::info!(
        "nbd: {t}: {} bytes, flags {:#x}, {}",
        info.size,
        info.flags,
        info.description.as_deref().unwrap_or("no description")
    );
    let identity = info.identity().map(str::to_string);
    if identity.is_none() {
        // ltsp-server always gives an identity once it hashed the image; without one its
        // hashing failed (an I/O error, the file changed meanwhile): that can pass, so it
        // is retried, not refused, and never a reason to allow anonymous servers.
        if let Some(d) = info
            .description
            .as_deref()
            .filter(|d| d.starts_with(ltsp_common::nbd::LTSP_DESCRIPTION))
        {
            return Err(NbdError::NoIdentityYet {
                target: t.to_string(),
                description: d.chars().take(200).collect(),
            });
        }
        if !cmd.allow_anonymous {
            return Err(NbdError::Anonymous {
                target: t.to_string(),
            });
        }
        log::warn!(
            "nbd: {t} gives no image identity; accepted, checking the size only \
             (ltsp.allow-anonymous=1)"
        );
    }
    let mut conns = vec![first];
    if info.flags & ltsp_common::nbd::TFLAG_CAN_MULTI_CONN != 0 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        for n in 1..cmd.nbd_connections_for(cpus) {
            // By identity: an image swapped meanwhile does not split the device.
            let c = match &identity {
                Some(id) => handshake::connect_version(t, id, Duration::from_secs(5))?,
                None => handshake::connect(t, Duration::from_secs(5))?,
            };
            // Every connection must reach the same bytes.
            if c.info.identity() != identity.as_deref() || c.info.size != info.size {
                return Err(NbdError::ImageChanged {
                    target: t.to_string(),
                    n,
                    got: c.info.description,
                    want: info.description,
                });
            }
            conns.push(c);
        }
    }
    // Listening before NBD_CMD_CONNECT: a link that dies from its first moment is seen.
    // Without it the helper subscribes itself, later; the boot goes on.
    let events = netlink::Genl::open().and_then(|mut ev| ev.subscribe().map(|_| ev));
    let events = events
        .map_err(|e| log::warn!("nbd: link-dead events before connecting: {e}"))
        .ok();
    let mut g = netlink::Genl::open()?;
    let cfg = netlink::DeviceConfig {
        index,
        size: info.size,
        block_size: 4096,
        server_flags: info.flags as u64,
        timeout_secs: cmd.nbd_timeout.as_secs(),
        dead_conn_timeout_secs: cmd.dead_timeout.as_secs(),
        backend: info.identity().map(str::to_string),
    };
    let socks: Vec<&std::net::TcpStream> = conns.iter().map(|c| &c.stream).collect();
    g.connect(&cfg, &socks)?;
    *genl = events;
    let device = format!("/dev/nbd{index}");
    wait_for_device(&device, index)?;
    // The kernel holds its own references to the sockets; ours close here.
    Ok(NbdAttached {
        device,
        size: info.size,
        connections: conns.len() as u32,
        identity,
        description: info.description,
    })
}

/// The device node exists and its size is set, or 10 s have passed.
fn wait_for_device(device: &str, index: u32) -> Result<(), NbdError> {
    let size_file = format!("/sys/block/nbd{index}/size");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let sectors: u64 = std::fs::read_to_string(&size_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if sectors > 0 && Path::new(device).exists() {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(NbdError::DeviceTimeout {
                device: device.into(),
                secs: 10,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The link-dead listener `attach` subscribed before NBD_CMD_CONNECT (else a new one).
pub fn link_dead_events(genl: &mut Option<netlink::Genl>) -> Option<OwnedFd> {
    let subscribed = match genl.take() {
        Some(g) => Ok(g),
        None => netlink::Genl::open().and_then(|mut g| g.subscribe().map(|_| g)),
    };
    match subscribed {
        Ok(g) => Some(g.into_fd()),
        Err(e) => {
            log::warn!("nbd: link-dead events: {e}; the helper will subscribe itself");
            None
        }
    }
}

/// The running reconnect helper.
pub struct Helper {
    pub pid: u32,
    /// PID 1 mode: tells it the boot switched root (it then frees the initramfs).
    pub freer: Option<std::fs::File>,
}

/// Started now, from the initramfs, so it outlives the switch and never reads the root it
/// repairs; `@` in argv[0] keeps systemd's shutdown from killing it (ROOT_STORAGE_DAEMONS).
/// Returns its pid and, in PID 1 mode, the pipe that tells it to free the initramfs (see
/// [`reconnect::Inherited::initramfs`]).
pub fn start_reconnect_helper(
    sys: &dyn System,
    a: &NbdAttached,
    index: u32,
    targets: Vec<NbdTarget>,
    current: usize,
    events: Option<OwnedFd>,
    mode: Mode,
) -> Option<Helper> {
    let (console, kmsg) = blog::raw_fds();
    let pipe = match mode {
        Mode::Pid1 => nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| log::warn!("nbd: pipe: {e}; the boot frees the initramfs itself"))
            .ok(),
        Mode::Worker => None,
    };
    let fds = reconnect::Inherited {
        events: events.as_ref().map(|e| e.as_raw_fd()),
        console,
        kmsg,
        initramfs: pipe.as_ref().map(|(r, _)| r.as_raw_fd()),
    };
    let w = reconnect::Watch {
        index,
        size: a.size,
        identity: a.identity.clone(),
        targets,
        current,
        fds,
    };
    // Our copies of `events` and the pipe's read end close when this returns; the helper
    // keeps its own.
    match sys.spawn("@ltsp-nbd-watch", &w.to_args(), &fds.list()) {
        Ok(pid) => {
            log::info!("nbd: reconnect helper started (pid {pid})");
            Some(Helper {
                pid,
                freer: pipe.map(|(_, w)| std::fs::File::from(w)),
            })
        }
        Err(e) => {
            log::warn!("nbd: reconnect helper not started: {e}; a dead connection will stay dead");
            None
        }
    }
}
