//! When the boot cannot go on: say which step failed, why and what to check, then do what
//! the cmdline asked (shell, reboot after N seconds, halt). As PID 1 this never returns:
//! PID 1 exiting panics the kernel with a message nobody can act on.

use crate::boot::BootError;
use crate::net;
use ltsp_common::cmdline::OnFailure;
use ltsp_common::step::Step;
use std::time::Duration;

/// A failed boot: what failed, and what the cmdline wants done about it (unknown when
/// the cmdline itself could not be read).
#[derive(Debug)]
pub struct Failed {
    pub error: BootError,
    pub on_failure: Option<OnFailure>,
}

impl BootError {
    /// The step that failed; `None`: the agent itself (a panic).
    pub fn step(&self) -> Option<Step> {
        Some(match self {
            BootError::EarlyMount { .. } => Step::Mounts,
            BootError::Cmdline { .. } | BootError::NotNetworkRoot => Step::Cmdline,
            BootError::Net(_) => Step::Net,
            BootError::Nbd(_) => Step::Nbd,
            BootError::ToRam(_) => Step::ToRam,
            BootError::Verity(_) => Step::Verity,
            BootError::Root(_) => Step::Root,
            BootError::Apply(_) => Step::Apply,
            BootError::Switch(_) => Step::Switch,
            BootError::Exec { .. } => Step::Init,
            BootError::Panicked => return None,
        })
    }

    /// What the operator should look at.
    pub fn hint(&self) -> &'static str {
        match self {
            BootError::Net(net::NetError::Dhcp(_)) => {
                "the DHCP server (is it running, does it serve this network?)"
            }
            BootError::Net(_) => "the NIC, its driver in the initramfs, the cable, BOOTIF= and ip=",
            BootError::Nbd(crate::nbd::attach::NbdError::Anonymous { .. }) => {
                "the NBD server: it gives no image identity (ltsp-server does); to boot from it anyway, ltsp.allow-anonymous=1 on the kernel command line"
            }
            BootError::Nbd(_) => {
                "that ltsp-server runs, the nbdroot= host/port/export, and firewalls on port 10809"
            }
            BootError::ToRam(_) => {
                "the image file on the server (changed or damaged while the node copied it), or the network path to it"
            }
            BootError::Verity(_) => {
                "that ltsp.verity= is the root.squashfs.roothash of the image the server exports, and that the image file was not changed after it was built"
            }
            BootError::Root(_) => {
                "that the export is a squashfs image and the initramfs has squashfs and overlay"
            }
            BootError::Exec { .. } => "init= and that the image has /sbin/init",
            _ => "",
        }
    }
}

impl Failed {
    /// Says on the console which step failed, why, and what to check.
    pub fn report(&self) {
        let step = self.error.step().map_or("agent", Step::name);
        report(step, &self.error.to_string(), self.error.hint());
    }
}

pub fn report(step: &str, why: &str, hint: &str) {
    log::error!("step `{step}` failed: {why}");
    if !hint.is_empty() {
        log::error!("check: {hint}");
    }
}

fn has_shell() -> Option<&'static str> {
    ["/bin/sh", "/usr/bin/sh", "/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// Runs an interactive shell on the console, if the initramfs has one. Returns whether one ran.
pub fn shell(reason: &str) -> bool {
    let Some(sh) = has_shell() else {
        log::error!("no shell in this initramfs ({reason})");
        return false;
    };
    log::error!("starting a shell ({reason}); leave it to continue");
    let mut c = std::process::Command::new(sh);
    if sh.ends_with("busybox") {
        c.arg("sh");
    }
    let _ = c.status();
    true
}

pub fn act(on_failure: OnFailure) -> ! {
    match on_failure {
        OnFailure::Shell => {
            shell("ltsp.on-failure=shell");
            log::error!("shell left: rebooting in 5 s");
            reboot(Duration::from_secs(5))
        }
        OnFailure::Reboot(d) => reboot(d),
        OnFailure::Halt => {
            log::error!("halting (ltsp.on-failure=halt)");
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_HALT_SYSTEM);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn reboot(after: Duration) -> ! {
    log::error!("rebooting in {} s (ltsp.on-failure)", after.as_secs());
    std::thread::sleep(after);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not PID 1, or no permission: nothing left to do but wait.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
