//! The whole boot, from the initramfs's first instruction to exec of the real init, as one
//! function over named steps ([`Step`]). The steps that touch the machine go through
//! [`System`]; the network ones through [`Platform`], so the plan is unit-tested with fakes.

use crate::apply::{self, Node};
use crate::config::{self, NodeConfig};
use crate::failure::Failed;
use crate::modules::{self, Modules};
use crate::nbd::attach::{self as nbd, nbd_index};
use crate::nbd::netlink;
use crate::net::{self, NetInfo};
use crate::system::{Limit, Outcome, System};
use crate::trust::{self, Trust};
use crate::{log as blog, rootfs, switch_root, tftp, toram, verity};
use ltsp_common::cmdline::{Cmdline, NbdTarget, OnFailure};
use ltsp_common::ltsconf::Identity;
pub use ltsp_common::step::{Mark, Step};
use nix::mount::MsFlags;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use crate::nbd::attach::{NbdAttached, NbdError};

/// Which entry point runs the boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/init` of a standalone initramfs: mounts the API filesystems, switches root and
    /// execs init itself.
    Pid1,
    /// Called by the initramfs-tools boot script, which already mounted /dev, /proc, /sys
    /// and /run and will switch root itself: the root is left mounted at `newroot`.
    Worker,
}

/// Where things are; the real paths at boot, temporary directories in tests.
#[derive(Debug, Clone)]
pub struct Layout {
    pub run: String,
    pub newroot: String,
    pub proc_cmdline: PathBuf,
    pub modules: PathBuf,
    pub sysfs: PathBuf,
    /// The site's minisign public key: when present, lts.conf must be signed with it.
    pub trust_key: PathBuf,
}

impl Layout {
    pub fn real(newroot: &str) -> Layout {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Layout {
            run: "/run".into(),
            newroot: newroot.into(),
            proc_cmdline: "/proc/cmdline".into(),
            modules: modules::modules_dir(Path::new("/"), &release),
            sysfs: "/sys".into(),
            trust_key: trust::TRUST_KEY.into(),
        }
    }
}

/// The network side of the boot: real sockets at boot, scripted answers in tests.
pub trait Platform {
    fn bring_up(&mut self, cmd: &Cmdline, deadline: Instant) -> Result<NetInfo, net::NetError>;
    /// Fetches `path` by TFTP; gives up at `deadline` whatever the server does.
    fn fetch(
        &mut self,
        server: SocketAddr,
        path: &str,
        deadline: Instant,
    ) -> Result<Vec<u8>, tftp::FetchError>;
    /// Negotiates with `target` and hands the connections to the kernel as /dev/nbd`index`.
    fn attach_nbd(
        &mut self,
        target: &NbdTarget,
        index: u32,
        cmd: &Cmdline,
    ) -> Result<NbdAttached, NbdError>;
    /// A socket subscribed to the kernel's NBD link-dead events, for the reconnect helper;
    /// `None` if it cannot be had (the helper then subscribes itself).
    fn link_dead_events(&mut self) -> Option<OwnedFd>;
    /// Disconnects /dev/nbd`index` (its server is no longer needed).
    fn detach_nbd(&mut self, index: u32) -> Result<(), NbdError>;
}

/// Why the boot stopped; [`BootError::step`] names the step (see `failure.rs`).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mount {fstype} on {target}: {source}")]
    EarlyMount {
        fstype: &'static str,
        target: String,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Cmdline {
        path: String,
        source: std::io::Error,
    },
    #[error("the kernel cmdline asks for no network root (root=/dev/nbd0 or nbdroot=...)")]
    NotNetworkRoot,
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("no NBD server answered with a usable export; last error: {0}")]
    Nbd(NbdError),
    #[error(transparent)]
    ToRam(#[from] toram::ToRamError),
    #[error(transparent)]
    Verity(#[from] verity::VerityError),
    #[error(transparent)]
    Root(#[from] rootfs::RootError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    #[error(transparent)]
    Switch(#[from] switch_root::SwitchError),
    #[error("internal error in the agent")]
    Panicked,
    #[error("exec {init}: {source}")]
    Exec {
        init: String,
        source: std::io::Error,
    },
}

/// Calls `f` until it succeeds, the deadline passes or `max_tries` (0: unlimited) are
/// used, sleeping 0.25, 0.5, 1, 2, 4, 5, 5... s between tries.
pub fn retry<T, E: std::fmt::Display>(
    what: &str,
    deadline: Instant,
    max_tries: u32,
    mut f: impl FnMut(u32) -> Result<T, E>,
) -> Result<T, E> {
    let mut delay = Duration::from_millis(250);
    let mut n = 0;
    loop {
        n += 1;
        match f(n) {
            Ok(v) => return Ok(v),
            Err(e) => {
                let out_of_time = Instant::now() + delay >= deadline;
                if out_of_time || (max_tries > 0 && n >= max_tries) {
                    return Err(e);
                }
                log::warn!(
                    "{what}: try {n} failed: {e}; again in {:.2} s",
                    delay.as_secs_f64()
                );
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The boot timeline: (mark, seconds since kernel start).
#[derive(Debug, Default, Clone)]
pub struct Timeline(pub Vec<(&'static str, f64)>);

impl Timeline {
    fn mark(&mut self, mark: Mark) {
        let t = blog::uptime();
        let name = mark.name();
        log::info!("{name}");
        self.0.push((name, t));
    }

    fn at(&self, mark: Mark) -> Option<f64> {
        self.0
            .iter()
            .find(|(s, _)| *s == mark.name())
            .map(|(_, t)| *t)
    }

    /// The agent's own share of the boot: first line to exec of init, less the DHCP
    /// exchange (the server's answer) and the PREINIT commands (the site's own work).
    pub fn agent_time(&self, dhcp: Duration) -> String {
        let span = |a: Mark, b: Mark| Some(self.at(b)? - self.at(a)?);
        let (switched, exec) = (Mark::Done(Step::Switch), Mark::Begin(Step::Init));
        let total = span(Mark::Start, exec).unwrap_or(0.0);
        let preinit = span(switched, exec).unwrap_or(0.0);
        let dhcp = dhcp.as_secs_f64();
        format!(
            "agent time: {:.3} s own ({total:.3} s first line to exec init, less {dhcp:.3} s waiting for the DHCP server and {preinit:.3} s PREINIT commands)",
            total - dhcp - preinit
        )
    }

    pub fn render(&self) -> String {
        self.0
            .iter()
            .map(|(s, t)| format!("{s}={t:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

pub struct Booted {
    pub cmdline: Cmdline,
    pub net: NetInfo,
    pub config: NodeConfig,
    pub nbd: NbdAttached,
    pub timeline: Timeline,
}

/// The boot. Returns only in [`Mode::Worker`] (root mounted at `newroot`), or on error;
/// in [`Mode::Pid1`] success ends in exec of init.
pub fn boot(
    sys: &(dyn System + Sync),
    p: &mut dyn Platform,
    mode: Mode,
    l: &Layout,
) -> Result<Booted, Box<Failed>> {
    let mut tl = Timeline::default();
    tl.mark(Mark::Start);
    if mode == Mode::Pid1 {
        early_mounts(sys, l).map_err(failed(None))?;
        blog::reopen();
    }
    let kmsg_limit = blog::lift_kmsg_limit();
    let cmd = read_cmdline(l).map_err(failed(None))?;
    let fail = failed(Some(cmd.on_failure));
    if !cmd.wants_network_root() {
        return Err(fail(BootError::NotNetworkRoot));
    }
    let r = Run {
        cmd: &cmd,
        deadline: Instant::now() + cmd.timeout,
        mode,
        l,
    };

    let net = modules_and_network(&r, sys, p, &mut tl).map_err(fail)?;
    net::lease::start_keeper(sys, &net.info, &l.run);
    let nbd = nbd_step(&r, sys, p, &net, &mut tl).map_err(fail)?;
    // Before a copy into RAM too: a server lost during the copy is then replaced.
    let helper = keep_connected(&r, sys, p, &nbd);
    let root_dev = ram_step(&r, sys, p, &nbd, helper.as_ref(), &mut tl).map_err(fail)?;
    let freer = match root_dev == nbd.attached.device {
        true => helper.and_then(|h| h.freer),
        false => None,
    };
    let root_dev = verity_step(&r, sys, &root_dev, &mut tl).map_err(fail)?;
    let layers = root_step(&r, sys, &root_dev, &mut tl).map_err(fail)?;
    let config = configure(&r, sys, &net, &layers, &mut tl).map_err(fail)?;

    let preinit = Preinit::from_config(&config);
    let env = boot_env(
        &cmd,
        &net.info,
        &config,
        &nbd.attached,
        net.server.as_deref(),
    );
    let _ = std::fs::write(format!("{}/ltsp/boot.env", l.run), env_file(&env));
    let booted = Booted {
        cmdline: cmd.clone(),
        net: net.info,
        config,
        nbd: nbd.attached,
        timeline: tl,
    };
    match mode {
        Mode::Worker => Ok(hand_over(sys, booted, &preinit, &env, kmsg_limit, l)),
        Mode::Pid1 => {
            let e = switch_and_exec(sys, booted, freer, &preinit, &env, kmsg_limit, l);
            Err(fail(e))
        }
    }
}

/// What the steps after the cmdline share.
#[derive(Clone, Copy)]
struct Run<'a> {
    cmd: &'a Cmdline,
    /// Until when the network steps retry.
    deadline: Instant,
    mode: Mode,
    l: &'a Layout,
}

/// Turns a step's error into the boot's failure, with what the cmdline wants done.
fn failed(on_failure: Option<OnFailure>) -> impl Fn(BootError) -> Box<Failed> + Copy {
    move |error| Box::new(Failed { error, on_failure })
}

/// lts.conf as fetched: where from, and its text.
#[derive(Debug, Clone)]
pub struct FetchedConf {
    pub source: String,
    /// Bytes: the parser reports invalid UTF-8 by line instead of losing the file.
    pub text: Vec<u8>,
}

/// What the network steps learnt: the boot NIC, lts.conf if the server had one, and the
/// boot server.
pub struct NetStep {
    pub info: NetInfo,
    pub conf: Option<FetchedConf>,
    pub server: Option<String>,
    /// A trust key is in the initramfs: only signed configuration applies.
    pub signed_only: bool,
}

/// The NIC drivers, then the network steps while the storage modules load.
fn modules_and_network(
    r: &Run,
    sys: &(dyn System + Sync),
    p: &mut dyn Platform,
    tl: &mut Timeline,
) -> Result<NetStep, BootError> {
    let Run { cmd, l, .. } = *r;
    pause_at(cmd, Step::Modules);
    tl.mark(Mark::Begin(Step::Modules));
    let mods = load_nic_modules(sys, l);
    // The root's modules load while the network comes up: carrier, DHCP and TFTP waits
    // leave the CPU idle. Joined before the NBD step, which needs them.
    std::thread::scope(|scope| {
        let storage = scope.spawn(|| load_storage_modules(sys, mods, cmd));
        let net = network_steps(r, p, tl);
        if storage.join().is_err() {
            log::error!("modules: the loading thread panicked");
        }
        net
    })
}

/// Boot NIC up, then lts.conf fetched.
fn network_steps(r: &Run, p: &mut dyn Platform, tl: &mut Timeline) -> Result<NetStep, BootError> {
    let Run {
        cmd, deadline, l, ..
    } = *r;
    pause_at(cmd, Step::Net);
    tl.mark(Mark::Begin(Step::Net));
    let info = retry("net", deadline, cmd.retries, |_| p.bring_up(cmd, deadline))?;
    tl.mark(Mark::Done(Step::Net));
    write_run_files(l, &info);
    pause_at(cmd, Step::LtsConf);
    tl.mark(Mark::Begin(Step::LtsConf));
    let server = cmd
        .server
        .clone()
        .or(info.lease.next_server.map(|s| s.to_string()));
    let conf_deadline = (Instant::now() + LTSCONF_DEADLINE).min(deadline);
    let trust = Trust::load(&l.trust_key);
    let conf = fetch_lts_conf(p, cmd, &info, server.as_deref(), &trust, conf_deadline);
    let signed_only = !matches!(trust, Trust::Absent(_));
    Ok(NetStep {
        info,
        conf,
        server,
        signed_only,
    })
}

/// The attached root device, and what the reconnect helper needs to keep it connected.
struct NbdStep {
    attached: NbdAttached,
    index: u32,
    targets: Vec<NbdTarget>,
    current: usize,
}

fn nbd_step(
    r: &Run,
    _sys: &dyn System,
    p: &mut dyn Platform,
    net: &NetStep,
    tl: &mut Timeline,
) -> Result<NbdStep, BootError> {
    let Run { cmd, deadline, .. } = *r;
    pause_at(cmd, Step::Nbd);
    tl.mark(Mark::Begin(Step::Nbd));
    let index = nbd_index(cmd);
    let targets = cmd.nbd_targets(net.server.as_deref());
    let (current, attached) =
        nbd::attach_any(p, cmd, &targets, index, deadline).map_err(BootError::Nbd)?;
    tl.mark(Mark::Done(Step::Nbd));
    Ok(NbdStep {
        attached,
        index,
        targets,
        current,
    })
}

/// The reconnect helper: its pid, and the pipe that tells it the boot switched root (it
/// then deletes the initramfs, in idle time).
fn keep_connected(
    r: &Run,
    sys: &dyn System,
    p: &mut dyn Platform,
    nbd: &NbdStep,
) -> Option<nbd::Helper> {
    if !r.cmd.reconnect {
        return None;
    }
    let events = p.link_dead_events();
    nbd::start_reconnect_helper(
        sys,
        &nbd.attached,
        nbd.index,
        nbd.targets.clone(),
        nbd.current,
        events,
        r.mode,
    )
}

/// `ltsp.to-ram=1`: the image copied into RAM ([`toram`]), then NBD disconnected.
/// Returns the device the root is mounted from: the loop device, or the NBD device when
/// the copy could not be made (a warning; only bytes that differ from the image's
/// identity stop the boot).
fn ram_step(
    r: &Run,
    sys: &dyn System,
    p: &mut dyn Platform,
    nbd: &NbdStep,
    helper: Option<&nbd::Helper>,
    tl: &mut Timeline,
) -> Result<String, BootError> {
    let Run { cmd, l, .. } = *r;
    let dev = nbd.attached.device.clone();
    if !cmd.to_ram {
        return Ok(dev);
    }
    pause_at(cmd, Step::ToRam);
    tl.mark(Mark::Begin(Step::ToRam));
    let meminfo =
        std::fs::read_to_string(l.proc_cmdline.with_file_name("meminfo")).unwrap_or_default();
    let a = &nbd.attached;
    let deadline = Instant::now() + cmd.timeout;
    match toram::to_ram(
        sys,
        &l.run,
        &dev,
        a.size,
        a.identity.as_deref(),
        &meminfo,
        deadline,
    ) {
        Ok(ram) => {
            // The helper first: it would answer the disconnect by reconnecting.
            if let Some(h) = helper {
                if let Err(e) = sys.stop(h.pid, Duration::from_secs(2)) {
                    log::warn!("to-ram: stopping the reconnect helper (pid {}): {e}", h.pid);
                }
            }
            if let Err(e) = p.detach_nbd(nbd.index) {
                log::warn!(
                    "to-ram: disconnecting {dev}: {e}; the copy in RAM is used all the same"
                );
            }
            tl.mark(Mark::Done(Step::ToRam));
            log::info!(
                "to-ram: the root is on {ram}; {dev} disconnected, no server is needed from now on"
            );
            Ok(ram)
        }
        Err(e @ toram::ToRamError::Mismatch { .. }) => Err(BootError::ToRam(e)),
        Err(e) => {
            log::warn!("to-ram: {e}; the root stays on the network ({dev})");
            Ok(dev)
        }
    }
}

/// `ltsp.verity=HASH`: the root device behind dm-verity; returns the device to mount.
/// The dm device sits above the NBD (or loop) device, so the reconnect helper, which
/// swaps the NBD device's connections, never sees it.
fn verity_step(
    r: &Run,
    sys: &dyn System,
    device: &str,
    tl: &mut Timeline,
) -> Result<String, BootError> {
    let Run { cmd, .. } = *r;
    let Some(pinned) = cmd.verity.as_deref() else {
        return Ok(device.to_string());
    };
    pause_at(cmd, Step::Verity);
    tl.mark(Mark::Begin(Step::Verity));
    let mapped = verity::map_root(sys, device, pinned)?;
    tl.mark(Mark::Done(Step::Verity));
    log::info!("verity: {device} verified through {mapped} against ltsp.verity={pinned}");
    Ok(mapped)
}

/// The image and the writable layer; `direct`: apply writes into the upper layer before
/// the overlay exists (else the overlay is already mounted and apply writes through it).
struct RootLayers {
    lower: PathBuf,
    upper: PathBuf,
    direct: bool,
}

fn root_step(
    r: &Run,
    sys: &dyn System,
    device: &str,
    tl: &mut Timeline,
) -> Result<RootLayers, BootError> {
    let Run { cmd, l, .. } = *r;
    pause_at(cmd, Step::Root);
    rootfs::mount_layers(sys, device, &cmd.overlay_size, &l.run)?;
    let lower = PathBuf::from(rootfs::lower_dir(&l.run));
    let upper = PathBuf::from(rootfs::upper_dir(&l.run));
    // Writing straight into the upper layer means the overlay copies nothing up; an image
    // with a symlinked /etc directory gets the overlay first and the writes through it.
    let direct = apply::Tree::layers(&lower, &upper).is_some();
    if !direct {
        log::info!(
            "apply: a directory under /etc is a symlink in the image: writing through the overlay"
        );
        rootfs::mount_overlay(sys, &l.run, &l.newroot)?;
    }
    tl.mark(Mark::Done(Step::Root));
    Ok(RootLayers {
        lower,
        upper,
        direct,
    })
}

/// lts.conf (the server's, else the image's) resolved for this node and applied to the
/// root, which is then whole.
fn configure(
    r: &Run,
    sys: &dyn System,
    net: &NetStep,
    layers: &RootLayers,
    tl: &mut Timeline,
) -> Result<NodeConfig, BootError> {
    let Run { cmd, l, .. } = *r;
    pause_at(cmd, Step::Apply);
    let conf = net.conf.clone().or_else(|| {
        let text = std::fs::read(layers.lower.join("etc/lts.conf")).ok()?;
        Some(FetchedConf {
            source: "/etc/lts.conf (image)".into(),
            text,
        })
    });
    let info = &net.info;
    let id = Identity {
        hostname: info.lease.hostname.clone(),
        ip: Some(info.lease.ip.to_string()),
        mac: Some(info.mac.clone()),
    };
    // With a trust key, lts.conf keys from the command line (`ltsp.PREINIT_1=...`) do not
    // apply: the command line comes as unsigned as a forged lts.conf would.
    let unsigned;
    let cmd = if net.signed_only && !cmd.overrides.is_empty() {
        let keys: Vec<&str> = cmd.overrides.iter().map(|(k, _)| k.as_str()).collect();
        log::error!(
            "lts.conf: keys from the kernel command line ignored, only the signed lts.conf applies: {}",
            keys.join(", ")
        );
        unsigned = Cmdline {
            overrides: Vec::new(),
            ..cmd.clone()
        };
        &unsigned
    } else {
        cmd
    };
    let config = config::resolve(
        conf.as_ref()
            .map(|c| (c.source.as_str(), c.text.as_slice())),
        cmd,
        &id,
    );
    for problem in &config.problems {
        log::warn!("lts.conf: {problem} (the boot goes on with what could be read)");
    }
    for w in &config.warnings {
        log::warn!("lts.conf: warning: {w}");
    }
    log::info!(
        "lts.conf: sections applied: {}",
        config.resolved.sections.join(", ")
    );
    let node = Node {
        ip: Some(info.lease.ip),
        mac: Some(info.mac.clone()),
        iface: Some(info.iface.clone()),
        server: net.server.as_deref().and_then(|s| s.parse().ok()),
        hostname: info.lease.hostname.clone(),
        dns: info.lease.dns.clone(),
        domain: info.lease.domain.clone(),
    };
    let tree = if layers.direct {
        apply::Tree::Layers {
            lower: &layers.lower,
            upper: &layers.upper,
        }
    } else {
        apply::Tree::Dir(Path::new(&l.newroot))
    };
    let report = apply::apply(tree, &config.resolved, &node)?;
    for w in &report.warnings {
        log::warn!("apply: {w}");
    }
    log::info!(
        "apply: wrote {}; masked {}",
        report.written.join(" "),
        report.masked.join(" ")
    );
    tl.mark(Mark::Done(Step::Apply));
    if layers.direct {
        rootfs::mount_overlay(sys, &l.run, &l.newroot)?;
    }
    tl.mark(Mark::RootMounted);
    Ok(config)
}

/// Worker mode: PREINIT runs chrooted now; initramfs-tools moves the mounts and execs init.
fn hand_over(
    sys: &dyn System,
    mut booted: Booted,
    preinit: &Preinit,
    env: &[(String, String)],
    kmsg_limit: Option<String>,
    l: &Layout,
) -> Booted {
    preinit.run(sys, Some(&l.newroot), env);
    booted.timeline.mark(Mark::Handover);
    blog::restore_kmsg_limit(kmsg_limit);
    log::info!("timeline: {}", booted.timeline.render());
    booted
}

/// PID 1: switch root, run PREINIT, exec init. Returns only what went wrong.
fn switch_and_exec(
    sys: &dyn System,
    mut booted: Booted,
    freer: Option<std::fs::File>,
    preinit: &Preinit,
    env: &[(String, String)],
    kmsg_limit: Option<String>,
    l: &Layout,
) -> BootError {
    let cmd = &booted.cmdline;
    let tl = &mut booted.timeline;
    pause_at(cmd, Step::Switch);
    if let Err(e) = switch_root::switch_root(sys, &l.newroot, freer) {
        return e.into();
    }
    tl.mark(Mark::Done(Step::Switch));
    pause_at(cmd, Step::Preinit);
    preinit.run(sys, None, env);
    pause_at(cmd, Step::Init);
    tl.mark(Mark::Begin(Step::Init));
    log::info!("timeline: {}", tl.render());
    log::info!("{}", tl.agent_time(booted.net.dhcp_wait));
    let _ = std::fs::write("/run/ltsp/timeline", format!("{}\n", tl.render()));
    let mut argv = vec![cmd.init.clone()];
    argv.extend(cmd.init_args.iter().cloned());
    blog::restore_kmsg_limit(kmsg_limit);
    close_inherited_fds();
    let source = sys.exec(&argv, &init_env());
    BootError::Exec {
        init: cmd.init.clone(),
        source,
    }
}

/// One of the API filesystems PID 1 mounts first.
struct EarlyMount {
    source: &'static str,
    /// `None`: the layout's /run.
    target: Option<&'static str>,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const EARLY_MOUNTS: [EarlyMount; 4] = [
    EarlyMount {
        source: "proc",
        target: Some("/proc"),
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    EarlyMount {
        source: "sysfs",
        target: Some("/sys"),
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    EarlyMount {
        source: "devtmpfs",
        target: Some("/dev"),
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    // systemd's initrd interface: /run a tmpfs, mode 0755, carried into the new root.
    EarlyMount {
        source: "tmpfs",
        target: None,
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
    },
];

fn early_mounts(sys: &dyn System, l: &Layout) -> Result<(), BootError> {
    for m in &EARLY_MOUNTS {
        let target = m.target.unwrap_or(&l.run);
        let _ = sys.mkdir(target);
        sys.mount(m.source, target, m.fstype, m.flags, m.data)
            .map_err(|source| BootError::EarlyMount {
                fstype: m.fstype,
                target: target.into(),
                source,
            })?;
    }
    Ok(())
}

fn read_cmdline(l: &Layout) -> Result<Cmdline, BootError> {
    let text = std::fs::read_to_string(&l.proc_cmdline).map_err(|source| BootError::Cmdline {
        path: l.proc_cmdline.display().to_string(),
        source,
    })?;
    let cmd = Cmdline::parse(text.trim());
    if cmd.debug {
        log::set_max_level(log::LevelFilter::Debug);
    }
    Ok(cmd)
}

fn names_or(names: &[String], none: &str) -> String {
    if names.is_empty() {
        none.to_string()
    } else {
        names.join(" ")
    }
}

/// NIC drivers for the devices present. Returns the module index for the storage step.
fn load_nic_modules(sys: &dyn System, l: &Layout) -> Option<Modules> {
    let mut m = match Modules::open(&l.modules) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("modules: {e}; relying on built-in drivers");
            return None;
        }
    };
    let nics = modules::load_nic_drivers(&mut m, sys, &l.sysfs);
    log::info!("modules: NIC drivers {}", names_or(&nics, "none needed"));
    Some(m)
}

/// nbd, squashfs, overlay (loop with `ltsp.to-ram=1`, dm-verity and its dependency
/// dm-mod with `ltsp.verity=`) and `ltsp.modules=`. A module that fails is logged; the step
/// that needs it then fails with its own reason.
fn load_storage_modules(sys: &dyn System, m: Option<Modules>, cmd: &Cmdline) {
    let Some(mut m) = m else { return };
    // Only the devices the root needs: each costs the kernel a disk and a workqueue at
    // load (~7 ms under TCG); clients using netlink get more made on demand.
    m.set_params("nbd", &format!("nbds_max={}", nbd_index(cmd) + 1));
    let mut loaded = Vec::new();
    let to_ram = cmd.to_ram.then(|| "loop".to_string());
    let verity = cmd.verity.is_some().then(|| "dm-verity".to_string());
    for name in ["nbd", "squashfs", "overlay"]
        .into_iter()
        .map(str::to_string)
        .chain(to_ram)
        .chain(verity)
        .chain(cmd.modules.iter().cloned())
    {
        match m.load(sys, &name) {
            Ok(v) => loaded.extend(v),
            Err(e) => log::warn!("modules: {e}"),
        }
    }
    log::info!("modules: loaded {}", names_or(&loaded, "none"));
}

fn write_run_files(l: &Layout, net: &NetInfo) {
    let _ = std::fs::create_dir_all(format!("{}/ltsp", l.run));
    let path = format!("{}/net-{}.conf", l.run, net.iface);
    if let Err(e) = std::fs::write(&path, net::net_conf(net, blog::uptime())) {
        log::warn!("writing {path}: {e}");
    }
}

/// How long the whole lts.conf fetch may take, every path tried included. A few-KiB file
/// takes milliseconds on a LAN, and even the 1 MiB limit takes well under a second; a
/// server still sending after this is broken or hostile.
pub const LTSCONF_DEADLINE: Duration = Duration::from_secs(10);

/// The largest lts.conf (or lts.conf.sig) a node takes from the server.
pub const LTSCONF_MAX: usize = 1 << 20;

/// lts.conf by TFTP: `ltsp.conf=`, else next to the boot file, else /ltsp/<arch>/lts.conf.
/// None when the server has none, or did not send it by `deadline`: the image's
/// /etc/lts.conf is read after the root mount, as when the server has no file.
/// With a trust key, the file's signature (`PATH.sig`, same deadline) must verify, else
/// the file is refused whole and the image's /etc/lts.conf is used the same way.
fn fetch_lts_conf(
    p: &mut dyn Platform,
    cmd: &Cmdline,
    net: &NetInfo,
    server: Option<&str>,
    trust: &Trust,
    deadline: Instant,
) -> Option<FetchedConf> {
    let paths: Vec<String> = match cmd.conf_path.as_deref() {
        Some("none") => return None,
        Some(path) => vec![path.to_string()],
        None => {
            let mut v = Vec::new();
            if let Some(dir) = net
                .lease
                .bootfile
                .as_deref()
                .and_then(|b| b.rsplit_once('/'))
                .map(|(d, _)| d)
            {
                v.push(format!("{dir}/lts.conf"));
            }
            v.push(format!("/ltsp/{}/lts.conf", cmd.arch));
            v
        }
    };
    if let Trust::Absent(key) = trust {
        log::warn!(
            "lts.conf is not verified: no trust key in the initramfs ({})",
            key.display()
        );
    }
    let Some(addr) = server.and_then(|s| s.parse::<std::net::IpAddr>().ok()) else {
        log::warn!("lts.conf: no boot server known: using the image's /etc/lts.conf");
        return None;
    };
    for path in paths {
        match p.fetch(SocketAddr::new(addr, 69), &path, deadline) {
            Ok(bytes) => {
                let source = format!("tftp://{addr}{path}");
                log::info!("lts.conf: {} bytes from {source}", bytes.len());
                let key = match trust {
                    Trust::Absent(_) => {
                        return Some(FetchedConf {
                            source,
                            text: bytes,
                        })
                    }
                    Trust::Broken(e) => {
                        refuse(&source, &e.to_string());
                        return None;
                    }
                    Trust::Key(k) => k,
                };
                let sig_path = format!("{path}.sig");
                let sig = match p.fetch(SocketAddr::new(addr, 69), &sig_path, deadline) {
                    Ok(sig) => sig,
                    Err(tftp::FetchError::NotFound { .. }) => {
                        refuse(
                            &source,
                            &format!("no signature: {sig_path} is not on the server"),
                        );
                        return None;
                    }
                    Err(e) => {
                        refuse(&source, &format!("its signature could not be fetched: {e}"));
                        return None;
                    }
                };
                return match key.verify(&bytes, &sig) {
                    Ok(comment) => {
                        log::info!("lts.conf: signature verified ({source}.sig): {comment}");
                        Some(FetchedConf {
                            source,
                            text: bytes,
                        })
                    }
                    Err(e) => {
                        refuse(&source, &e.to_string());
                        None
                    }
                };
            }
            Err(e @ tftp::FetchError::Deadline { .. }) => {
                log::error!(
                    "step `{}`: {e}: giving up on the server's lts.conf; the boot goes on with the image's /etc/lts.conf if it has one",
                    Step::LtsConf.name()
                );
                return None;
            }
            Err(e) => log::info!("lts.conf: {e}"),
        }
    }
    log::info!("lts.conf: none on the server: the image's /etc/lts.conf is used if it has one");
    None
}

/// The one console line that says the server's lts.conf was refused, and why.
fn refuse(source: &str, why: &str) {
    log::error!(
        "lts.conf from {source} REFUSED: {why}; nothing in it is applied: the boot goes on with the image's /etc/lts.conf if it has one, else defaults"
    );
}

/// What PREINIT commands and the root system learn about the boot (also /run/ltsp/boot.env).
fn boot_env(
    cmd: &Cmdline,
    net: &NetInfo,
    config: &NodeConfig,
    nbd: &NbdAttached,
    server: Option<&str>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("DEVICE".into(), net.iface.clone()),
        ("IPV4ADDR".into(), net.lease.ip.to_string()),
        ("MAC".into(), net.mac.clone()),
        ("SERVER".into(), server.unwrap_or("").into()),
        ("NBD_DEVICE".into(), nbd.device.clone()),
        (
            "NBD_SERVER".into(),
            cmd.nbd_targets(server)
                .first()
                .map(|t| t.to_string())
                .unwrap_or_default(),
        ),
    ];
    if let Some(h) = apply::hostname(
        &config.resolved,
        &Node {
            ip: Some(net.lease.ip),
            mac: Some(net.mac.clone()),
            hostname: net.lease.hostname.clone(),
            ..Default::default()
        },
    ) {
        env.push(("HOSTNAME".into(), h));
    }
    for (k, v) in config.resolved.all() {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

fn env_file(env: &[(String, String)]) -> String {
    env.iter()
        .filter(|(k, _)| k != "PATH")
        .map(|(k, v)| format!("{k}=\"{}\"\n", ltsp_common::ltsconf::shell_escape_dq(v)))
        .collect()
}

/// How long a PREINIT command that ignores SIGTERM has before SIGKILL.
pub const PREINIT_GRACE: Duration = Duration::from_secs(5);

/// The PREINIT_* commands (key, command) and how long they may run, all together.
#[derive(Debug, Clone)]
pub struct Preinit {
    pub cmds: Vec<(String, String)>,
    pub limit: Limit,
}

impl Preinit {
    fn from_config(config: &NodeConfig) -> Preinit {
        let (timeout, warning) = apply::preinit_timeout(&config.resolved);
        if let Some(w) = warning {
            log::warn!("lts.conf: {w}");
        }
        Preinit {
            cmds: apply::preinit_commands(&config.resolved),
            limit: Limit {
                timeout,
                grace: PREINIT_GRACE,
            },
        }
    }

    /// One shell runs every command, as LTSP did, so they share variables and the working
    /// directory. Before each command its number goes to descriptor 3, the progress pipe
    /// of [`System::run`], which the command itself does not get.
    fn argv(&self) -> Vec<String> {
        let mut script = String::new();
        for (i, (_, c)) in self.cmds.iter().enumerate() {
            if !c.trim().is_empty() {
                script.push_str(&format!("echo {} >&3\n{{ {c}\n}} 3>&-\n", i + 1));
            }
        }
        vec!["/bin/sh".into(), "-c".into(), script]
    }

    /// PREINIT_* as LTSP ran them: failures logged, the boot goes on; past the timeout
    /// they are killed, which is logged as an error naming the command.
    fn run(&self, sys: &dyn System, root: Option<&str>, env: &[(String, String)]) {
        if self.cmds.is_empty() {
            return;
        }
        log::info!(
            "preinit: {} command(s), {} s at most (PREINIT_TIMEOUT)",
            self.cmds.len(),
            self.limit.timeout.as_secs()
        );
        let (level, msg) = self.report(sys.run(root, &self.argv(), env, self.limit));
        log::log!(level, "{msg}");
    }

    /// What the run's outcome means, for the log.
    fn report(&self, r: std::io::Result<Outcome>) -> (log::Level, String) {
        let (progress, sigkill, left) = match r {
            Ok(Outcome::Exited(0)) => return (log::Level::Info, "preinit: done".into()),
            Ok(Outcome::Exited(code)) => {
                return (
                    log::Level::Warn,
                    format!("preinit: commands exited with {code}; the boot goes on"),
                )
            }
            Err(e) => {
                return (
                    log::Level::Warn,
                    format!("preinit: cannot run /bin/sh: {e}; the boot goes on"),
                )
            }
            Ok(Outcome::TimedOut {
                progress,
                sigkill,
                left,
            }) => (progress, sigkill, left),
        };
        let secs = self.limit.timeout.as_secs_f64();
        let running = progress
            .and_then(|p| p.trim().parse::<usize>().ok())
            .filter(|n| (1..=self.cmds.len()).contains(n));
        let (what, skipped) = match running {
            Some(n) => {
                let (key, c) = &self.cmds[n - 1];
                (format!("{key} `{c}`"), &self.cmds[n..])
            }
            None => ("the PREINIT commands".to_string(), &self.cmds[..0]),
        };
        let mut msg = format!(
            "step `{}`: {what} still running after {secs} s (PREINIT_TIMEOUT): its process group was killed",
            Step::Preinit.name()
        );
        if sigkill {
            msg.push_str(&format!(
                " (SIGTERM, then SIGKILL {} s later)",
                self.limit.grace.as_secs_f64()
            ));
        } else {
            msg.push_str(" (SIGTERM)");
        }
        if left {
            msg.push_str("; some of its processes are stuck in the kernel and were left behind");
        }
        if !skipped.is_empty() {
            let keys: Vec<&str> = skipped.iter().map(|(k, _)| k.as_str()).collect();
            msg.push_str(&format!("; not run: {}", keys.join(" ")));
        }
        msg.push_str("; the boot goes on");
        (log::Level::Error, msg)
    }
}

/// init gets the kernel's environment, not ours.
fn init_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// No descriptor of ours may leak into init: everything above stderr gets close-on-exec.
fn close_inherited_fds() {
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: F_SETFD on a descriptor number only changes its flags; invalid ones
            // (like the one read_dir used) just fail.
            unsafe {
                nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
            }
        }
    }
}

/// `ltsp.break=STEP`: a shell before the step, for debugging a node by hand.
fn pause_at(cmd: &Cmdline, step: Step) {
    if cmd.breaks.contains(&step) {
        crate::failure::shell(&format!("ltsp.break={step}"));
    }
}

/// The real network side.
#[derive(Default)]
pub struct RealPlatform {
    /// The generic-netlink socket NBD_CMD_CONNECT went through: subscribed, it becomes the
    /// helper's link-dead listener (a second family lookup costs ~7 ms under TCG).
    genl: Option<netlink::Genl>,
}

impl Platform for RealPlatform {
    fn bring_up(&mut self, cmd: &Cmdline, deadline: Instant) -> Result<NetInfo, net::NetError> {
        net::bring_up(cmd, deadline)
    }

    fn fetch(
        &mut self,
        server: SocketAddr,
        path: &str,
        deadline: Instant,
    ) -> Result<Vec<u8>, tftp::FetchError> {
        tftp::fetch(
            server,
            path,
            Duration::from_millis(500),
            4,
            LTSCONF_MAX,
            deadline,
        )
    }

    fn attach_nbd(
        &mut self,
        t: &NbdTarget,
        index: u32,
        cmd: &Cmdline,
    ) -> Result<NbdAttached, NbdError> {
        nbd::attach(&mut self.genl, t, index, cmd)
    }

    fn link_dead_events(&mut self) -> Option<OwnedFd> {
        nbd::link_dead_events(&mut self.genl)
    }

    fn detach_nbd(&mut self, index: u32) -> Result<(), NbdError> {
        let mut g = match self.genl.take() {
            Some(g) => g,
            None => netlink::Genl::open()?,
        };
        Ok(g.disconnect(index)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dhcp::Lease;
    use crate::system::Recorder;
    use std::net::Ipv4Addr;

    /// The tests read a failed boot as (error, what the cmdline wants done).
    fn boot(
        sys: &(dyn System + Sync),
        p: &mut dyn Platform,
        mode: Mode,
        l: &Layout,
    ) -> Result<Booted, Box<(BootError, Option<OnFailure>)>> {
        super::boot(sys, p, mode, l).map_err(|f| Box::new((f.error, f.on_failure)))
    }

    #[test]
    fn agent_time_leaves_out_the_dhcp_answer_and_preinit() {
        let tl = Timeline(vec![
            ("start", 1.0),
            ("net", 1.2),
            ("switched", 1.5),
            ("exec-init", 1.7),
        ]);
        let s = tl.agent_time(Duration::from_millis(100));
        assert!(s.starts_with("agent time: 0.400 s own (0.700 s"), "{s}");
        assert!(
            s.contains("0.100 s waiting for the DHCP") && s.contains("0.200 s PREINIT"),
            "{s}"
        );
    }

    #[derive(Default)]
    struct FakePlatform {
        conf: Option<Vec<u8>>,
        /// What `*.sig` paths give.
        sig: Option<Vec<u8>>,
        nbd_failures: u32,
        fetched: Vec<String>,
        attached: Vec<String>,
        /// Paths whose server keeps the transfer going past the deadline.
        endless: Vec<String>,
        /// The deadline each fetch was given.
        deadlines: Vec<Instant>,
        /// The NBD devices disconnected.
        detached: Vec<u32>,
        /// A file that stands for the NBD device, and the identity the server gives.
        image: Option<(PathBuf, String)>,
        /// The server gives no identity (after `nbd_failures`), and the cmdline refuses that.
        anonymous: bool,
    }

    impl Platform for FakePlatform {
        fn bring_up(
            &mut self,
            _cmd: &Cmdline,
            _deadline: Instant,
        ) -> Result<NetInfo, net::NetError> {
            Ok(NetInfo {
                iface: "ens3".into(),
                index: 2,
                mac: "52:54:00:12:34:56".into(),
                proto: "dhcp",
                lease: Lease {
                    ip: Ipv4Addr::new(192, 0, 2, 10),
                    prefix: 24,
                    next_server: Some(Ipv4Addr::new(192, 0, 2, 1)),
                    ..Default::default()
                },
                dhcp_wait: Duration::ZERO,
            })
        }
        fn fetch(
            &mut self,
            server: SocketAddr,
            path: &str,
            deadline: Instant,
        ) -> Result<Vec<u8>, tftp::FetchError> {
            self.fetched.push(format!("{server}{path}"));
            self.deadlines.push(deadline);
            if self.endless.iter().any(|e| e == path) {
                return Err(tftp::FetchError::Deadline {
                    path: path.into(),
                    server,
                    got: 4096,
                    secs: 10.0,
                });
            }
            if path.ends_with(".sig") {
                &self.sig
            } else {
                &self.conf
            }
            .clone()
            .ok_or(tftp::FetchError::NotFound { path: path.into() })
        }
        fn attach_nbd(
            &mut self,
            t: &NbdTarget,
            index: u32,
            _cmd: &Cmdline,
        ) -> Result<NbdAttached, NbdError> {
            self.attached.push(t.to_string());
            if self.nbd_failures > 0 {
                self.nbd_failures -= 1;
                if self.anonymous {
                    // ltsp-server whose hashing failed: no identity yet, unlike a refusal.
                    return Err(NbdError::NoIdentityYet {
                        target: t.to_string(),
                        description: "ltsp-rs image img size=16384".into(),
                    });
                }
                return Err(NbdError::DeviceTimeout {
                    device: "x".into(),
                    secs: 0,
                });
            }
            if self.anonymous {
                return Err(NbdError::Anonymous {
                    target: t.to_string(),
                });
            }
            if let Some((path, identity)) = &self.image {
                return Ok(NbdAttached {
                    device: path.display().to_string(),
                    size: std::fs::metadata(path).unwrap().len(),
                    connections: 1,
                    description: None,
                    identity: Some(identity.clone()),
                });
            }
            Ok(NbdAttached {
                device: format!("/dev/nbd{index}"),
                size: 1 << 20,
                connections: 2,
                description: None,
                identity: Some("blake3:00".into()),
            })
        }
        fn link_dead_events(&mut self) -> Option<OwnedFd> {
            None
        }
        fn detach_nbd(&mut self, index: u32) -> Result<(), NbdError> {
            self.detached.push(index);
            Ok(())
        }
    }

    fn layout(d: &Path, cmdline: &str) -> Layout {
        std::fs::write(d.join("cmdline"), cmdline).unwrap();
        std::fs::create_dir_all(d.join("run")).unwrap();
        std::fs::create_dir_all(d.join("root")).unwrap();
        // What mount_layers makes at boot: the image (empty here) and the upper layer.
        std::fs::create_dir_all(d.join("run/rootfs/lower")).unwrap();
        std::fs::create_dir_all(d.join("run/rootfs/rw/upper")).unwrap();
        Layout {
            run: d.join("run").display().to_string(),
            newroot: d.join("root").display().to_string(),
            proc_cmdline: d.join("cmdline"),
            modules: d.join("modules"),
            sysfs: d.join("sys"),
            trust_key: d.join("trust.pub"),
        }
    }

    #[test]
    fn pid1_plan_mounts_switches_runs_preinit_and_execs_init() {
        let d = tempfile::tempdir().unwrap();
        let l = layout(d.path(), "root=/dev/nbd0 nbdroot=:img ltsp.overlay-size=1G init=/lib/systemd/systemd -- --unit=x");
        let sys = Recorder::default();
        let mut p = FakePlatform {
            // A byte-order mark before the first section, a Latin-1 comment: both read.
            conf: Some(
                b"\xef\xbb\xbf[default]\nPREINIT_02 = echo two\nPREINIT_01 = echo one\n\
                  # caf\xe9\nRCFILE_1 = echo rc\n"
                    .to_vec(),
            ),
            nbd_failures: 1,
            fetched: vec![],
            attached: vec![],
            ..Default::default()
        };
        std::fs::create_dir_all(format!("{}/rootfs/lower/etc", l.run)).unwrap();
        std::fs::write(
            format!("{}/rootfs/lower/etc/rc.local", l.run),
            "#!/bin/sh\nfrom-image\nexit 0\n",
        )
        .unwrap();
        let r = boot(&sys, &mut p, Mode::Pid1, &l);
        let (e, _) = *r.err().expect("the recorded exec 'fails'");
        assert!(matches!(e, BootError::Exec { .. }));
        let (run, root) = (&l.run, &l.newroot);
        let lower = format!("{run}/rootfs/lower");
        let rw = format!("{run}/rootfs/rw");
        let want = vec![
            "mkdir /proc".to_string(),
            "mount proc /proc proc MS_NOSUID | MS_NODEV | MS_NOEXEC".into(),
            "mkdir /sys".into(),
            "mount sysfs /sys sysfs MS_NOSUID | MS_NODEV | MS_NOEXEC".into(),
            "mkdir /dev".into(),
            "mount devtmpfs /dev devtmpfs MS_NOSUID mode=0755".into(),
            format!("mkdir {run}"),
            format!("mount tmpfs {run} tmpfs MS_NOSUID | MS_NODEV mode=0755"),
            "spawn @ltsp-nbd-watch nbd-watch --index=0 --size=1048576 --identity=blake3:00 \
             --initramfs-fd=N --target=nbd://192.0.2.1:10809/img (keeps fds [N])"
                .into(),
            format!("mkdir {lower}"),
            format!("mkdir {rw}"),
            format!("mount /dev/nbd0 {lower} squashfs MS_RDONLY"),
            format!("mount tmpfs {rw} tmpfs MS_NOSUID | MS_NODEV mode=0755,size=1G"),
            format!("mkdir {rw}/upper"),
            format!("mkdir {rw}/work"),
            // apply wrote into the upper layer here, before the overlay exists.
            format!("mkdir {root}"),
            format!("mount overlay {root} overlay (empty) lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work"),
            format!("mkdir {root}/rofs"),
            format!("mount {lower} {root}/rofs  MS_BIND"),
            "mount none /  MS_REC | MS_PRIVATE".into(),
            format!("mkdir {root}/dev"),
            format!("mount /dev {root}/dev  MS_MOVE"),
            format!("mkdir {root}/proc"),
            format!("mount /proc {root}/proc  MS_MOVE"),
            format!("mkdir {root}/sys"),
            format!("mount /sys {root}/sys  MS_MOVE"),
            format!("mkdir {root}/run"),
            format!("mount /run {root}/run  MS_MOVE"),
            format!("chdir {root}"),
            // The helper frees the initramfs, told through the pipe (read below).
            format!("mount {root} /  MS_MOVE"),
            "chroot .".into(),
            "chdir /".into(),
            "run /bin/sh | -c | echo 1 >&3\n{ echo one\n} 3>&-\necho 2 >&3\n{ echo two\n} 3>&-\n (timeout 60 s)".into(),
            "exec /lib/systemd/systemd --unit=x".into(),
        ];
        let pipe = sys.kept.lock().unwrap().pop().expect("the helper's pipe");
        // The pipe's descriptor number depends on what else the test process has open.
        let fd = |c: &str, key: &str| -> Option<String> {
            let i = c.find(key)? + key.len();
            let n = c[i..].chars().take_while(char::is_ascii_digit).count();
            Some(format!("{}N{}", &c[..i], &c[i + n..]))
        };
        let calls: Vec<String> = sys
            .calls()
            .into_iter()
            .map(|c| fd(&c, "--initramfs-fd=").map_or(c.clone(), |c| fd(&c, "fds [").unwrap_or(c)))
            .collect();
        assert_eq!(calls, want);
        let mut told = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(pipe), &mut told).unwrap();
        assert_eq!(told, "1", "the boot told the helper once it had switched");
        // The NBD step was retried after its first failure, against the DHCP server.
        assert_eq!(
            p.attached,
            vec!["nbd://192.0.2.1:10809/img", "nbd://192.0.2.1:10809/img"]
        );
        assert_eq!(p.fetched, vec!["192.0.2.1:69/ltsp/amd64/lts.conf"]);
        // The configuration went into the upper layer, the image's rc.local kept; the
        // boot's files into /run.
        let rc = std::fs::read_to_string(format!("{rw}/upper/etc/rc.local")).unwrap();
        assert!(rc.starts_with("#!/bin/sh\nfrom-image\n"), "{rc}");
        assert!(rc.ends_with("echo rc\n"), "{rc}");
        assert!(
            !Path::new(&format!("{root}/etc")).exists(),
            "nothing written through the overlay"
        );
        assert!(std::fs::read_to_string(format!("{run}/net-ens3.conf"))
            .unwrap()
            .contains("IPV4ADDR='192.0.2.10'"));
        assert!(std::fs::read_to_string(format!("{run}/ltsp/boot.env"))
            .unwrap()
            .contains("HOSTNAME=\"ltsp10\""));
    }

    #[test]
    fn worker_mode_leaves_the_switch_to_initramfs_tools() {
        let d = tempfile::tempdir().unwrap();
        let l = layout(
            d.path(),
            "root=/dev/nbd0 nbdroot=192.0.2.9/img ltsp.conf=none",
        );
        std::fs::create_dir_all(format!("{}/rootfs/lower/etc", l.run)).unwrap();
        // Not UTF-8 (a Latin-1 comment): the file is still read, the line reported.
        std::fs::write(
            format!("{}/rootfs/lower/etc/lts.conf", l.run),
            b"[default]\n# \xe9t\xe9\nPREINIT_1 = true\nHOSTNAME = from-image\nPREINIT_TIMEOUT = 7\n",
        )
        .unwrap();
        let sys = Recorder::default();
        let mut p = FakePlatform {
            conf: None,
            nbd_failures: 0,
            fetched: vec![],
            attached: vec![],
            ..Default::default()
        };
        let b = boot(&sys, &mut p, Mode::Worker, &l)
            .unwrap_or_else(|f| panic!("worker returns: {}", f.0));
        let calls = sys.calls();
        assert!(
            !calls.iter().any(|c| c.starts_with("mount proc")
                || c.contains("MS_MOVE")
                || c.starts_with("exec")),
            "{calls:#?}"
        );
        assert_eq!(
            calls.last().unwrap(),
            &format!(
                "run in {} /bin/sh | -c | echo 1 >&3\n{{ true\n}} 3>&-\n (timeout 7 s)",
                l.newroot
            )
        );
        assert!(p.fetched.is_empty(), "ltsp.conf=none fetches nothing");
        assert_eq!(p.attached, vec!["nbd://192.0.2.9:10809/img"]);
        assert_eq!(b.config.resolved.get("HOSTNAME"), Some("from-image"));
        assert_eq!(b.config.warnings.len(), 1, "{:?}", b.config.warnings);
        assert!(b.config.problems.is_empty(), "{:?}", b.config.problems);
    }

    #[test]
    fn an_lts_conf_transfer_past_its_deadline_falls_back_to_the_image() {
        let cmd = Cmdline::parse("root=/dev/nbd0");
        let net = NetInfo {
            lease: Lease {
                bootfile: Some("ltsp/amd64/pxelinux.0".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let deadline = Instant::now() + LTSCONF_DEADLINE;
        let no_key = Trust::Absent("/k".into());
        // Not there: both paths tried, under one deadline for the whole step.
        let mut p = FakePlatform::default();
        assert!(fetch_lts_conf(&mut p, &cmd, &net, Some("192.0.2.1"), &no_key, deadline).is_none());
        assert_eq!(
            p.fetched,
            [
                "192.0.2.1:69ltsp/amd64/lts.conf",
                "192.0.2.1:69/ltsp/amd64/lts.conf"
            ]
        );
        assert_eq!(p.deadlines, [deadline, deadline]);
        // A transfer that never ends: the step gives up (the deadline is spent, so the
        // second path is not tried) and the boot goes on without the server's file.
        let mut p = FakePlatform {
            conf: Some(b"[default]\nX = 1\n".to_vec()),
            endless: vec!["ltsp/amd64/lts.conf".into()],
            ..Default::default()
        };
        assert!(fetch_lts_conf(&mut p, &cmd, &net, Some("192.0.2.1"), &no_key, deadline).is_none());
        assert_eq!(p.fetched, ["192.0.2.1:69ltsp/amd64/lts.conf"]);

        // The whole boot: the image's lts.conf applies.
        let d = tempfile::tempdir().unwrap();
        let l = layout(d.path(), "root=/dev/nbd0 nbdroot=192.0.2.9/img");
        image_lts_conf(&l);
        let mut p = FakePlatform {
            conf: Some(b"[default]\nHOSTNAME = from-server\n".to_vec()),
            endless: vec!["/ltsp/amd64/lts.conf".into()],
            ..Default::default()
        };
        let before = Instant::now();
        let b = boot(&Recorder::default(), &mut p, Mode::Worker, &l)
            .unwrap_or_else(|f| panic!("the boot goes on: {}", f.0));
        assert_eq!(b.config.resolved.get("HOSTNAME"), Some("from-image"));
        assert_eq!(p.deadlines.len(), 1);
        assert!(p.deadlines[0] <= Instant::now() + LTSCONF_DEADLINE);
        assert!(p.deadlines[0] >= before + LTSCONF_DEADLINE);
    }

    /// A boot in worker mode with the site's key at `l.trust_key`, the server's lts.conf
    /// `conf` and `sig`, and an image whose own lts.conf names it.
    /// The image's own /etc/lts.conf, which names the host `from-image`.
    fn image_lts_conf(l: &Layout) {
        std::fs::create_dir_all(format!("{}/rootfs/lower/etc", l.run)).unwrap();
        std::fs::write(
            format!("{}/rootfs/lower/etc/lts.conf", l.run),
            "[default]\nHOSTNAME = from-image\n",
        )
        .unwrap();
    }

    fn boot_with_key(
        key: &[u8],
        conf: &[u8],
        sig: Option<Vec<u8>>,
    ) -> (Booted, FakePlatform, Vec<String>) {
        boot_with_key_and_cmdline(key, conf, sig, "")
    }

    fn boot_with_key_and_cmdline(
        key: &[u8],
        conf: &[u8],
        sig: Option<Vec<u8>>,
        extra: &str,
    ) -> (Booted, FakePlatform, Vec<String>) {
        let d = tempfile::tempdir().unwrap();
        let l = layout(
            d.path(),
            &format!("root=/dev/nbd0 nbdroot=192.0.2.9/img {extra}"),
        );
        std::fs::write(&l.trust_key, key).unwrap();
        image_lts_conf(&l);
        let mut p = FakePlatform {
            conf: Some(conf.to_vec()),
            sig,
            ..Default::default()
        };
        let sys = Recorder::default();
        let b = boot(&sys, &mut p, Mode::Worker, &l)
            .unwrap_or_else(|f| panic!("the boot goes on: {}", f.0));
        (b, p, sys.calls())
    }

    #[test]
    fn with_a_trust_key_only_a_signed_lts_conf_applies() {
        let site = crate::trust::tests::Site::new();
        let dir = site.dir.path();
        let conf = b"[default]\nHOSTNAME = from-server\nPREINIT_1 = echo signed-marker\n";
        std::fs::write(dir.join("lts.conf"), conf).unwrap();
        crate::trust::tests::minisign(
            dir,
            &["-S", "-s", "k.key", "-m", "lts.conf", "-x", "lts.conf.sig"],
        );
        let key = site.read("k.pub");
        let sig = site.read("lts.conf.sig");

        // Signed: applied, its PREINIT run; the signature was fetched beside it.
        let (b, p, calls) = boot_with_key(&key, conf, Some(sig.clone()));
        assert_eq!(b.config.resolved.get("HOSTNAME"), Some("from-server"));
        assert!(
            calls.iter().any(|c| c.contains("echo signed-marker")),
            "{calls:#?}"
        );
        assert_eq!(
            p.fetched,
            [
                "192.0.2.1:69/ltsp/amd64/lts.conf",
                "192.0.2.1:69/ltsp/amd64/lts.conf.sig"
            ]
        );

        // Refused: tampered (a PREINIT injected), unsigned, signed by another key, a garbage
        // signature, a broken key. Nothing of the server's file applies: the image's does.
        let mut tampered = conf.to_vec();
        tampered.extend_from_slice(b"PREINIT_2 = echo injected-marker\n");
        let other = crate::trust::tests::Site::new();
        type Case<'a> = (&'a str, &'a [u8], &'a [u8], Option<Vec<u8>>);
        let cases: Vec<Case> = vec![
            ("tampered", &key, &tampered, Some(sig.clone())),
            ("unsigned", &key, &tampered, None),
            ("other key", &key, conf, Some(other.read("lts.conf.sig"))),
            ("garbage sig", &key, conf, Some(b"\x00garbage".to_vec())),
            ("empty key", b"", conf, Some(sig.clone())),
        ];
        // lts.conf keys on the (unsigned) command line do not apply either.
        let (b, _, calls) = boot_with_key_and_cmdline(
            &key,
            conf,
            Some(sig.clone()),
            "ltsp.PREINIT_9=echo\\ cmdline-marker ltsp.HOSTNAME=from-cmdline",
        );
        assert_eq!(b.config.resolved.get("HOSTNAME"), Some("from-server"));
        assert!(
            !calls.iter().any(|c| c.contains("cmdline-marker")),
            "{calls:#?}"
        );
        // Without a key they do, as documented.
        let d = tempfile::tempdir().unwrap();
        let l = layout(
            d.path(),
            "root=/dev/nbd0 nbdroot=192.0.2.9/img ltsp.HOSTNAME=from-cmdline",
        );
        let mut p = FakePlatform {
            conf: Some(conf.to_vec()),
            ..Default::default()
        };
        let b = boot(&Recorder::default(), &mut p, Mode::Worker, &l)
            .unwrap_or_else(|f| panic!("{}", f.0));
        assert_eq!(b.config.resolved.get("HOSTNAME"), Some("from-cmdline"));
        for (what, key, conf, sig) in cases {
            let (b, _, calls) = boot_with_key(key, conf, sig);
            assert_eq!(
                b.config.resolved.get("HOSTNAME"),
                Some("from-image"),
                "{what}"
            );
            assert!(
                !calls.iter().any(|c| c.contains("-marker")),
                "{what}: {calls:#?}"
            );
        }
    }

    fn preinit(cmds: &[&str], timeout_ms: u64) -> Preinit {
        Preinit {
            cmds: cmds
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("PREINIT_{}", i + 1), c.to_string()))
                .collect(),
            limit: Limit {
                timeout: Duration::from_millis(timeout_ms),
                grace: Duration::from_millis(300),
            },
        }
    }

    fn path_env(dir: &Path) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("DIR".into(), dir.display().to_string()),
        ]
    }

    #[test]
    fn preinit_commands_share_one_shell_and_report_failures() {
        let d = tempfile::tempdir().unwrap();
        let env = path_env(d.path());
        let real = crate::system::Real;
        let p = preinit(&["X=shared", "cd \"$DIR\"", "echo \"$X\" > out"], 20_000);
        let (level, msg) = p.report(real.run(None, &p.argv(), &env, p.limit));
        assert_eq!((level, msg.as_str()), (log::Level::Info, "preinit: done"));
        assert_eq!(
            std::fs::read_to_string(d.path().join("out")).unwrap(),
            "shared\n"
        );
        let p = preinit(&["true", "false"], 20_000);
        let (level, msg) = p.report(real.run(None, &p.argv(), &env, p.limit));
        assert_eq!(level, log::Level::Warn);
        assert!(msg.contains("exited with 1; the boot goes on"), "{msg}");
    }

    #[test]
    fn a_hung_preinit_command_is_killed_named_and_the_boot_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let env = path_env(d.path());
        let real = crate::system::Real;
        let p = preinit(
            &[
                "echo before > \"$DIR/1\"",
                "sleep 30",
                "echo after > \"$DIR/3\"",
            ],
            300,
        );
        let (level, msg) = p.report(real.run(None, &p.argv(), &env, p.limit));
        assert_eq!(level, log::Level::Error);
        assert!(
            msg.starts_with(
                "step `preinit`: PREINIT_2 `sleep 30` still running after 0.3 s (PREINIT_TIMEOUT)"
            ),
            "{msg}"
        );
        assert!(msg.contains("killed (SIGTERM)"), "{msg}");
        assert!(
            msg.ends_with("; not run: PREINIT_3; the boot goes on"),
            "{msg}"
        );
        assert!(d.path().join("1").exists() && !d.path().join("3").exists());

        // Deaf to SIGTERM: SIGKILL after the grace.
        let p = preinit(&["trap '' TERM; sleep 30"], 300);
        let (_, msg) = p.report(real.run(None, &p.argv(), &env, p.limit));
        assert!(
            msg.contains("PREINIT_1 `trap '' TERM; sleep 30` still running")
                && msg.contains("(SIGTERM, then SIGKILL 0.3 s later)"),
            "{msg}"
        );
    }

    #[test]
    fn preinit_timeout_from_lts_conf_reaches_the_run() {
        let config = config::resolve(
            Some(("t", b"[default]\nPREINIT_1 = x\nPREINIT_TIMEOUT = 9\n")),
            &Cmdline::parse("root=/dev/nbd0"),
            &Identity::default(),
        );
        let p = Preinit::from_config(&config);
        assert_eq!(p.cmds, [("PREINIT_1".to_string(), "x".to_string())]);
        assert_eq!(p.limit.timeout, Duration::from_secs(9));
        assert_eq!(p.limit.grace, PREINIT_GRACE);
        // The cmdline option wins.
        let config = config::resolve(
            Some(("t", b"[default]\nPREINIT_TIMEOUT = 9\n")),
            &Cmdline::parse("root=/dev/nbd0 ltsp.preinit-timeout=3"),
            &Identity::default(),
        );
        assert_eq!(
            Preinit::from_config(&config).limit.timeout,
            Duration::from_secs(3)
        );
    }

    #[test]
    fn failures_name_their_step() {
        let d = tempfile::tempdir().unwrap();
        let l = layout(d.path(), "quiet");
        let sys = Recorder::default();
        let mut p = FakePlatform {
            conf: None,
            nbd_failures: 0,
            fetched: vec![],
            attached: vec![],
            ..Default::default()
        };
        let (e, _) = *boot(&sys, &mut p, Mode::Worker, &l).err().unwrap();
        assert_eq!(e.step(), Some(Step::Cmdline));

        let l = layout(d.path(), "root=/dev/nbd0 ltsp.timeout=1");
        let sys = Recorder {
            failures: vec!["squashfs".into()],
            ..Default::default()
        };
        let (e, _) = *boot(&sys, &mut p, Mode::Worker, &l).err().unwrap();
        assert_eq!(e.step(), Some(Step::Root));
        assert!(
            e.to_string().contains("is the export a squashfs image"),
            "{e}"
        );

        let mut p = FakePlatform {
            conf: None,
            nbd_failures: 100,
            fetched: vec![],
            attached: vec![],
            ..Default::default()
        };
        let t0 = Instant::now();
        let (e, _) = *boot(&Recorder::default(), &mut p, Mode::Worker, &l)
            .err()
            .unwrap();
        assert_eq!(e.step(), Some(Step::Nbd));
        // Without the deadline 100 failures would be retried with back-off for minutes; the
        // bound is loose so that a loaded machine cannot fail it.
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the deadline bounds the retries"
        );
        assert!(e.hint().contains("ltsp-server"));
    }

    #[test]
    fn a_server_without_identity_fails_the_boot_at_once_unlike_a_transient_error() {
        let d = tempfile::tempdir().unwrap();
        let l = layout(
            d.path(),
            "root=/dev/nbd0 nbdroot=192.0.2.9/img ltsp.conf=none ltsp.retries=5",
        );
        // Two transient failures (ltsp-server without an identity yet, as when its hashing
        // failed) are retried; the refusal then ends the step at the third try, not the fifth.
        let mut p = FakePlatform {
            nbd_failures: 2,
            anonymous: true,
            ..Default::default()
        };
        let (e, _) = *boot(&Recorder::default(), &mut p, Mode::Worker, &l)
            .err()
            .unwrap();
        assert_eq!(e.step(), Some(Step::Nbd));
        assert_eq!(p.attached.len(), 3, "{:?}", p.attached);
        assert!(
            e.to_string().contains("gives no image identity")
                && e.to_string().contains("ltsp.allow-anonymous=1"),
            "{e}"
        );
        assert!(e.hint().contains("ltsp.allow-anonymous=1"), "{}", e.hint());
    }

    /// A node whose NBD device holds a 2-block "squashfs" with a verity superblock and one
    /// hash block after it, as deploy/build-image lays it out; booted with `extra`.
    fn verity_node(d: &Path, extra: &str) -> (Layout, FakePlatform, String) {
        let l = layout(
            d,
            &format!("root=/dev/nbd0 nbdroot=192.0.2.9/img ltsp.conf=none {extra}"),
        );
        let mut img = vec![0u8; 4 * 4096];
        img[..4].copy_from_slice(b"hsqs");
        img[40..48].copy_from_slice(&5000u64.to_le_bytes());
        let sb = &mut img[8192..8192 + 512];
        sb[..8].copy_from_slice(b"verity\0\0");
        sb[8..12].copy_from_slice(&1u32.to_le_bytes());
        sb[12..16].copy_from_slice(&1u32.to_le_bytes());
        sb[32..38].copy_from_slice(b"sha256");
        sb[64..68].copy_from_slice(&4096u32.to_le_bytes());
        sb[68..72].copy_from_slice(&4096u32.to_le_bytes());
        sb[72..80].copy_from_slice(&2u64.to_le_bytes());
        let dev = d.join("nbd-device");
        std::fs::write(&dev, &img).unwrap();
        let p = FakePlatform {
            image: Some((
                dev.clone(),
                format!("blake3:{}", blake3::hash(&img).to_hex()),
            )),
            ..Default::default()
        };
        (l, p, dev.display().to_string())
    }

    #[test]
    fn verity_maps_the_nbd_device_and_mounts_the_mapping() {
        let d = tempfile::tempdir().unwrap();
        let hash = "ab".repeat(32);
        let (l, mut p, dev) = verity_node(d.path(), &format!("ltsp.verity={hash}"));
        // What reads through the mapping give (the Recorder's mapped device).
        std::fs::write(format!("{dev}.dm"), vec![0u8; 8192]).unwrap();
        let sys = Recorder::default();
        let b = boot(&sys, &mut p, Mode::Worker, &l).unwrap_or_else(|e| panic!("{:?}", e.0));
        let calls = sys.calls();
        let table = format!("1 {dev} {dev} 4096 4096 2 3 sha256 {hash} -");
        assert!(
            calls.contains(&format!("verity ltsp-root {table}")),
            "{calls:?}"
        );
        assert!(
            calls.contains(&format!(
                "mount {dev}.dm {}/rootfs/lower squashfs MS_RDONLY",
                l.run
            )),
            "{calls:?}"
        );
        assert!(b.timeline.render().contains("verified="));
    }

    #[test]
    fn verity_failures_stop_the_boot_at_the_verity_step() {
        let hash = "ab".repeat(32);
        for (extra, says) in [
            (
                "ltsp.verity=xyz".to_string(),
                "expected the image's root hash",
            ),
            // No file behind the mapping: the first read through it fails.
            (format!("ltsp.verity={hash}"), "dm-verity refused the image"),
            (format!("ltsp.verity={}", &hash[..40]), "needs 64"),
        ] {
            let d = tempfile::tempdir().unwrap();
            let (l, mut p, _) = verity_node(d.path(), &extra);
            let sys = Recorder::default();
            let (e, _) = *boot(&sys, &mut p, Mode::Worker, &l).err().unwrap();
            assert_eq!(e.step(), Some(Step::Verity), "{extra}");
            assert!(e.to_string().contains(says), "{extra}: {}", e);
            assert!(
                !sys.calls().iter().any(|c| c.contains("squashfs")),
                "nothing mounted: {:?}",
                sys.calls()
            );
        }
        // An image without the tree.
        let d = tempfile::tempdir().unwrap();
        let (l, mut p, dev) = verity_node(d.path(), &format!("ltsp.verity={hash}"));
        std::fs::write(&dev, b"hsqs").unwrap();
        let (e, _) = *boot(&Recorder::default(), &mut p, Mode::Worker, &l)
            .err()
            .unwrap();
        assert_eq!(e.step(), Some(Step::Verity));
    }

    /// A node with `ltsp.to-ram=1`: (the layout, the fake server over an image file, the
    /// image's bytes). `avail` is the RAM /proc/meminfo shows.
    fn to_ram_node(d: &Path, avail_kib: u64, identity: Option<&str>) -> (Layout, FakePlatform) {
        let l = layout(
            d,
            "root=/dev/nbd0 nbdroot=192.0.2.9/img ltsp.conf=none ltsp.to-ram=1",
        );
        std::fs::write(
            d.join("meminfo"),
            format!("MemTotal: 4000000 kB\nMemAvailable: {avail_kib} kB\n"),
        )
        .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let img = d.join("nbd-device");
        std::fs::write(&img, &data).unwrap();
        let right = format!("blake3:{}", blake3::hash(&data).to_hex());
        let p = FakePlatform {
            image: Some((img, identity.map_or(right, str::to_string))),
            ..Default::default()
        };
        (l, p)
    }

    #[test]
    fn to_ram_copies_checks_mounts_the_loop_device_and_lets_nbd_go() {
        let d = tempfile::tempdir().unwrap();
        let (l, mut p) = to_ram_node(d.path(), 2_000_000, None);
        let sys = Recorder::default();
        let b = boot(&sys, &mut p, Mode::Worker, &l).unwrap_or_else(|e| panic!("{:?}", e.0));
        let run = &l.run;
        let calls = sys.calls();
        let ram = format!("{run}/ltsp/ram");
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with(&format!("mount tmpfs {ram} tmpfs"))
                    && c.ends_with("mode=0700,size=307200")),
            "{calls:?}"
        );
        assert!(calls.contains(&format!("loop {ram}/image ro")), "{calls:?}");
        assert!(
            calls.contains(&format!(
                "mount /dev/loop0 {run}/rootfs/lower squashfs MS_RDONLY"
            )),
            "{calls:?}"
        );
        // The helper kept the device during the copy, then was stopped before the disconnect.
        let spawned = calls
            .iter()
            .position(|c| c.contains("spawn @ltsp-nbd-watch"));
        let looped = calls.iter().position(|c| c.starts_with("loop "));
        let stopped = calls.iter().position(|c| c == "stop 4242");
        assert!(
            spawned.is_some() && spawned < looped && looped < stopped,
            "{calls:?}"
        );
        assert_eq!(p.detached, vec![0], "NBD disconnected");
        let img = std::fs::read(d.path().join("nbd-device")).unwrap();
        assert_eq!(std::fs::read(format!("{ram}/image")).unwrap(), img);
        assert!(
            b.timeline.render().contains("in-ram="),
            "{}",
            b.timeline.render()
        );
    }

    #[test]
    fn to_ram_without_room_stays_on_the_network_root() {
        let d = tempfile::tempdir().unwrap();
        // 300 KB image, 100 MiB available: under the 128 MiB headroom.
        let (l, mut p) = to_ram_node(d.path(), 100 * 1024, None);
        let sys = Recorder::default();
        boot(&sys, &mut p, Mode::Worker, &l).unwrap_or_else(|e| panic!("{:?}", e.0));
        let calls = sys.calls();
        let dev = d.path().join("nbd-device").display().to_string();
        assert!(
            calls.contains(&format!(
                "mount {dev} {}/rootfs/lower squashfs MS_RDONLY",
                l.run
            )),
            "{calls:?}"
        );
        assert!(
            calls.iter().any(|c| c.contains("@ltsp-nbd-watch")),
            "the helper keeps it: {calls:?}"
        );
        assert!(!calls.iter().any(|c| c.starts_with("stop ")), "{calls:?}");
        assert!(!calls.iter().any(|c| c.starts_with("loop ")), "{calls:?}");
        assert!(p.detached.is_empty());
    }

    #[test]
    fn to_ram_of_bytes_that_are_not_the_identity_stops_the_boot_at_to_ram() {
        let d = tempfile::tempdir().unwrap();
        let wrong = format!("blake3:{}", "1".repeat(64));
        let (l, mut p) = to_ram_node(d.path(), 2_000_000, Some(&wrong));
        let sys = Recorder::default();
        let (e, _) = *boot(&sys, &mut p, Mode::Worker, &l)
            .err()
            .expect("mismatch fails");
        assert_eq!(e.step(), Some(Step::ToRam), "{e}");
        assert!(
            e.to_string().contains("not the image the server named"),
            "{e}"
        );
        let calls = sys.calls();
        assert!(
            calls.contains(&format!("umount {}/ltsp/ram", l.run)),
            "RAM given back: {calls:?}"
        );
        assert!(
            !calls.iter().any(|c| c.contains("squashfs")),
            "nothing mounted: {calls:?}"
        );
    }
}
