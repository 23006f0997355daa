//! `ltsp.to-ram=stream`: the image copied into RAM behind the running system. The root is
//! mounted at once from a device-mapper linear device over the NBD device; a copier
//! process (`@ltsp-to-ram`, started just before init) copies and hashes the image into the
//! tmpfs, checks it against the server's identity, attaches a read-only loop device over
//! the copy and points the linear device at it (load, suspend, resume); then it stops the
//! reconnect helper and disconnects NBD. A dm-verity device, when pinned, sits above the
//! linear one and never sees the switch.
//!
//! A process, not a thread: the agent, PID 1, execs init, which ends every thread of it.
//! The copier is started after the switch to the new root, so that /dev, /run and /proc
//! are where its paths name them; its binary stays in the initramfs's memory, off the
//! device it switches, and its pages are locked, so it never reads through the device it
//! suspends.
//!
//! Bytes that differ from the identity cannot stop a boot that has already started
//! systemd: the copier then says so at error level, gives the RAM back and does not
//! switch (the node stays on the network root).

use crate::system::System;
use crate::toram::{self, ToRamError};
use crate::verity::DmError;
use std::time::{Duration, Instant};

/// The device-mapper name of the switchable root (`/sys/block/dm-N/dm/name`).
pub const DM_NAME: &str = "ltsp-ram";

/// How long the switch (load, suspend, resume) may take: the suspend waits for the reads
/// in flight on the NBD device, which a live server answers in milliseconds.
pub const SWITCH_DEADLINE: Duration = Duration::from_secs(30);

/// How long NBD_CMD_DISCONNECT may take.
pub const DISCONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// How long the reconnect helper has to go after SIGTERM, and again after SIGKILL.
pub const HELPER_GRACE: Duration = Duration::from_secs(2);

/// Why the root is not (or not yet) on the copy in RAM: one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "{device} is {size} bytes, not whole 512-byte sectors: device-mapper cannot map all of it"
    )]
    Unaligned { device: String, size: u64 },
    #[error(
        "mapping {device} through device-mapper ({name}): {source}; is the dm-mod module loaded?"
    )]
    Map {
        name: String,
        device: String,
        source: DmError,
    },
    #[error(transparent)]
    Copy(#[from] ToRamError),
    #[error("switching {name} to {device}: {source}")]
    Switch {
        name: String,
        device: String,
        source: DmError,
    },
    #[error("switching {name} to {device}: not done within {} s (the suspend waits for reads in flight on the NBD device)", .secs)]
    SwitchDeadline {
        name: String,
        device: String,
        secs: u64,
    },
    #[error("starting the copier: {0}")]
    Spawn(std::io::Error),
}

/// The root device for the boot to mount: a linear mapping of all of `device`.
pub fn map(sys: &dyn System, device: &str, size: u64) -> Result<String, StreamError> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(StreamError::Unaligned {
            device: device.into(),
            size,
        });
    }
    sys.map_linear(DM_NAME, device, size / 512)
        .map_err(|source| StreamError::Map {
            name: DM_NAME.into(),
            device: device.into(),
            source,
        })
}

/// What the copier is told (`ltsp-agent to-ram-stream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copier {
    /// The NBD device read from, and its index for the disconnect.
    pub device: String,
    pub index: u32,
    pub size: u64,
    /// The identity the server gave; without one the copy is used unchecked (with a
    /// warning), as in copy-first.
    pub identity: Option<String>,
    /// /run, where the copy's tmpfs (`ltsp/ram`) is already mounted.
    pub run: String,
    /// The linear device to switch.
    pub dm: String,
    /// The reconnect helper, stopped before the disconnect.
    pub helper: Option<u32>,
    /// How long the copy may take.
    pub timeout: Duration,
    /// Inherited /dev/console and /dev/kmsg, for the log.
    pub console_fd: Option<i32>,
    pub kmsg_fd: Option<i32>,
}

impl Copier {
    pub fn file(&self) -> String {
        format!("{}/image", toram::ram_dir(&self.run))
    }

    /// The argv the boot starts it with.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "to-ram-stream".to_string(),
            format!("--device={}", self.device),
            format!("--index={}", self.index),
            format!("--size={}", self.size),
            format!("--run={}", self.run),
            format!("--dm={}", self.dm),
            format!("--timeout={}", self.timeout.as_secs()),
        ];
        if let Some(id) = &self.identity {
            a.push(format!("--identity={id}"));
        }
        if let Some(p) = self.helper {
            a.push(format!("--helper={p}"));
        }
        for (name, fd) in [("console", self.console_fd), ("kmsg", self.kmsg_fd)] {
            if let Some(fd) = fd {
                a.push(format!("--{name}-fd={fd}"));
            }
        }
        a
    }

    fn fds(&self) -> Vec<i32> {
        [self.console_fd, self.kmsg_fd]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Started by the boot just before init (see the module's comment); returns its pid.
pub fn start(sys: &dyn System, c: &Copier) -> Result<u32, StreamError> {
    sys.spawn("@ltsp-to-ram", &c.to_args(), &c.fds())
        .map_err(StreamError::Spawn)
}

/// The copy made and checked, a read-only loop device over it; returns the loop device.
/// On any error the tmpfs is given back; a mismatch is logged at error level.
pub fn copy(sys: &dyn System, c: &Copier, deadline: Instant) -> Result<String, StreamError> {
    let r = toram::copy_checked(
        sys,
        &c.device,
        &c.file(),
        c.size,
        c.identity.as_deref(),
        deadline,
    );
    match r {
        Ok(lo) => Ok(lo),
        Err(e) => {
            toram::give_back(sys, &c.run);
            if let ToRamError::Mismatch { .. } = e {
                log::error!(
                    "to-ram: {e}; the root is NOT switched to RAM and stays on the network ({}); systemd already runs, so the boot cannot be stopped: check the server's image",
                    c.device
                );
            }
            Err(e.into())
        }
    }
}

/// The linear device pointed at the loop device `lo` within `deadline`, then the helper
/// stopped and NBD disconnected (`detach`). Failures after the switch are warnings: the
/// root is on the copy in RAM either way.
pub fn switch(
    sys: &'static (dyn System + Sync),
    c: &Copier,
    lo: &str,
    deadline: Duration,
    detach: &mut dyn FnMut(u32) -> Result<(), String>,
) -> Result<(), StreamError> {
    let (name, device, sectors) = (c.dm.clone(), lo.to_string(), c.size / 512);
    let (tx, rx) = std::sync::mpsc::channel();
    // In a thread: a suspend waiting on a stalled device cannot be interrupted, but the
    // copier can still say so within the deadline.
    let spawned = std::thread::Builder::new()
        .name("to-ram-switch".into())
        .spawn(move || {
            let _ = tx.send(sys.remap_linear(&name, &device, sectors));
        });
    let switch_err = |source| StreamError::Switch {
        name: c.dm.clone(),
        device: lo.to_string(),
        source,
    };
    if let Err(e) = spawned {
        return Err(switch_err(DmError::Control(e)));
    }
    match rx.recv_timeout(deadline) {
        Ok(r) => r.map_err(switch_err)?,
        Err(_) => {
            return Err(StreamError::SwitchDeadline {
                name: c.dm.clone(),
                device: lo.to_string(),
                secs: deadline.as_secs(),
            })
        }
    }
    // The helper first: it would answer the disconnect by reconnecting.
    if let Some(pid) = c.helper {
        if let Err(e) = sys.stop_other(pid, HELPER_GRACE) {
            log::warn!("to-ram: stopping the reconnect helper (pid {pid}): {e}");
        }
    }
    if let Err(e) = detach(c.index) {
        log::warn!(
            "to-ram: disconnecting {}: {e}; the root is on the copy in RAM all the same",
            c.device
        );
    }
    Ok(())
}

/// The copier's whole run (`ltsp-agent to-ram-stream`).
pub fn run(c: &Copier) -> Result<(), StreamError> {
    crate::nbd::reconnect::harden();
    let sys: &'static crate::system::Real = &crate::system::Real;
    let deadline = Instant::now() + c.timeout;
    let lo = copy(sys, c, deadline)?;
    // The switch holds every read of the root while the device is suspended: it must not
    // wait behind the whole system in the idle class the copy ran in.
    if let Err(e) = crate::system::set_scheduler(nix::libc::SCHED_OTHER) {
        log::warn!("to-ram: leaving the idle class: {e}");
    }
    switch(sys, c, &lo, SWITCH_DEADLINE, &mut |index| {
        // In a thread: the kernel shuts the connections down before it answers, and the
        // copier must still say it is done if that hangs.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("to-ram-disconnect".into())
            .spawn(move || {
                let r = crate::nbd::netlink::Genl::open().and_then(|mut g| g.disconnect(index));
                let _ = tx.send(r.map_err(|e| e.to_string()));
            })
            .map_err(|e| e.to_string())?;
        rx.recv_timeout(DISCONNECT_DEADLINE).unwrap_or_else(|_| {
            Err(format!(
                "not done within {} s",
                DISCONNECT_DEADLINE.as_secs()
            ))
        })
    })?;
    log::info!("in-ram");
    toram::mark_in_ram(&c.run);
    log::info!(
        "to-ram: the root is on {lo} (switched under {} from {}); {} disconnected, no server is needed from now on",
        c.dm,
        c.device,
        c.device
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::Recorder;

    fn copier(d: &std::path::Path, data: &[u8], identity: Option<String>) -> Copier {
        let dev = d.join("nbd-device");
        std::fs::write(&dev, data).unwrap();
        let run = d.join("run");
        std::fs::create_dir_all(toram::ram_dir(&run.display().to_string())).unwrap();
        Copier {
            device: dev.display().to_string(),
            index: 0,
            size: data.len() as u64,
            identity,
            run: run.display().to_string(),
            dm: DM_NAME.into(),
            helper: Some(4242),
            timeout: Duration::from_secs(60),
            console_fd: Some(7),
            kmsg_fd: None,
        }
    }

    fn image() -> Vec<u8> {
        (0..8192u32).map(|i| (i % 251) as u8).collect()
    }

    fn leak(r: Recorder) -> &'static Recorder {
        Box::leak(Box::new(r))
    }

    #[test]
    fn only_whole_sectors_map() {
        let sys = Recorder::default();
        assert_eq!(map(&sys, "/dev/nbd0", 8192).unwrap(), "/dev/nbd0");
        assert_eq!(sys.calls(), ["linear ltsp-ram /dev/nbd0 16"]);
        for size in [0, 8191] {
            let e = map(&sys, "/dev/nbd0", size).unwrap_err();
            assert!(matches!(e, StreamError::Unaligned { .. }), "{e}");
        }
        let sys = Recorder {
            failures: vec!["linear".into()],
            ..Default::default()
        };
        let e = map(&sys, "/dev/nbd0", 512).unwrap_err();
        assert!(e.to_string().contains("dm-mod"), "{e}");
    }

    #[test]
    fn the_copier_is_told_everything_it_needs() {
        let d = tempfile::tempdir().unwrap();
        let c = copier(d.path(), &image(), Some("blake3:ab".into()));
        let a = c.to_args();
        assert_eq!(a[0], "to-ram-stream");
        for want in [
            format!("--device={}", c.device),
            "--index=0".into(),
            "--size=8192".into(),
            "--dm=ltsp-ram".into(),
            "--timeout=60".into(),
            "--identity=blake3:ab".into(),
            "--helper=4242".into(),
            "--console-fd=7".into(),
        ] {
            assert!(a.contains(&want), "{want} not in {a:?}");
        }
        let sys = Recorder::default();
        let null = std::fs::File::open("/dev/null").unwrap();
        let c = Copier {
            console_fd: Some(std::os::fd::AsRawFd::as_raw_fd(&null)),
            ..c
        };
        assert_eq!(start(&sys, &c).unwrap(), 4242);
        assert!(sys.calls()[0].ends_with(&format!("(keeps fds [{}])", c.console_fd.unwrap())));
        assert!(sys.calls()[0].starts_with("spawn @ltsp-to-ram to-ram-stream "));
    }

    #[test]
    fn a_checked_copy_is_switched_to_then_the_helper_stopped_and_nbd_let_go() {
        let d = tempfile::tempdir().unwrap();
        let data = image();
        let id = format!("blake3:{}", blake3::hash(&data).to_hex());
        let c = copier(d.path(), &data, Some(id));
        let sys = leak(Recorder::default());
        let far = Instant::now() + Duration::from_secs(60);
        let lo = copy(sys, &c, far).unwrap();
        assert_eq!(std::fs::read(c.file()).unwrap(), data);
        let mut detached = Vec::new();
        switch(sys, &c, &lo, Duration::from_secs(10), &mut |i| {
            sys.calls.lock().unwrap().push(format!("detach {i}"));
            detached.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(detached, [0]);
        let calls = sys.calls();
        let at = |p: &str| calls.iter().position(|c| c.starts_with(p));
        let (looped, remapped) = (at("loop "), at("remap ltsp-ram /dev/loop0 16"));
        let (stopped, gone) = (at("stop-other 4242"), at("detach 0"));
        assert!(
            looped.is_some() && looped < remapped && remapped < stopped && stopped < gone,
            "{calls:?}"
        );
    }

    #[test]
    fn a_copy_that_is_not_the_image_is_never_switched_to() {
        let d = tempfile::tempdir().unwrap();
        let c = copier(
            d.path(),
            &image(),
            Some(format!("blake3:{}", "0".repeat(64))),
        );
        let sys = Recorder::default();
        let far = Instant::now() + Duration::from_secs(60);
        let e = copy(&sys, &c, far).unwrap_err();
        assert!(
            matches!(e, StreamError::Copy(ToRamError::Mismatch { .. })),
            "{e}"
        );
        let calls = sys.calls();
        assert!(!calls.iter().any(|c| c.starts_with("loop ")), "{calls:?}");
        assert!(
            calls.contains(&format!("umount {}", toram::ram_dir(&c.run))),
            "RAM given back: {calls:?}"
        );
    }

    #[test]
    fn a_failed_or_late_switch_keeps_the_helper_and_nbd() {
        let d = tempfile::tempdir().unwrap();
        let c = copier(d.path(), &image(), None);
        let sys = leak(Recorder {
            failures: vec!["remap".into()],
            ..Default::default()
        });
        let mut detached = 0;
        let e = switch(sys, &c, "/dev/loop0", Duration::from_secs(10), &mut |_| {
            detached += 1;
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, StreamError::Switch { .. }), "{e}");
        assert!(e.to_string().contains("switching ltsp-ram to /dev/loop0"));
        assert_eq!(detached, 0);
        assert!(!sys.calls().iter().any(|c| c.starts_with("stop-other")));

        // A remap that does not return in time (a suspend waiting on a stalled device).
        let slow = leak(Recorder {
            stalls: vec!["remap".into()],
            ..Default::default()
        });
        let t0 = Instant::now();
        let e = switch(
            slow,
            &c,
            "/dev/loop0",
            Duration::from_millis(200),
            &mut |_| {
                detached += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert!(matches!(e, StreamError::SwitchDeadline { .. }), "{e}");
        assert!(t0.elapsed() < crate::system::STALL, "{:?}", t0.elapsed());
        assert_eq!(detached, 0);
        assert!(!slow.calls().iter().any(|c| c.starts_with("stop-other")));
    }
}
