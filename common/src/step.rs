//! The agent's boot steps, in order. One name per step serves the console (`step `net`
//! failed`), `ltsp.break=net` and the boot timeline (`net=1.234`), so the three cannot
//! drift apart.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// /proc, /sys, /dev and /run, when the agent is PID 1.
    Mounts,
    /// The kernel command line.
    Cmdline,
    /// NIC drivers, then (beside the network steps) nbd, squashfs, overlay.
    Modules,
    /// The boot NIC up with an address.
    Net,
    /// lts.conf fetched by TFTP.
    LtsConf,
    /// The NBD device attached.
    Nbd,
    /// `ltsp.to-ram=1`: the image copied into RAM and checked; the NBD device let go.
    ToRam,
    /// `ltsp.verity=`: dm-verity mapped over the root device.
    Verity,
    /// The image and the writable layer mounted, then the overlay.
    Root,
    /// lts.conf applied to the new root.
    Apply,
    /// The switch into the new root (PID 1 only).
    Switch,
    /// The PREINIT commands.
    Preinit,
    /// exec of init (PID 1 only).
    Init,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::Mounts,
        Step::Cmdline,
        Step::Modules,
        Step::Net,
        Step::LtsConf,
        Step::Nbd,
        Step::ToRam,
        Step::Verity,
        Step::Root,
        Step::Apply,
        Step::Switch,
        Step::Preinit,
        Step::Init,
    ];

    /// The step's name on the console, in `ltsp.break=` and on the timeline.
    pub fn name(self) -> &'static str {
        match self {
            Step::Mounts => "mounts",
            Step::Cmdline => "cmdline",
            Step::Modules => "modules",
            Step::Net => "net",
            Step::LtsConf => "ltsconf",
            Step::Nbd => "nbd",
            Step::ToRam => "to-ram",
            Step::Verity => "verity",
            Step::Root => "root",
            Step::Apply => "apply",
            Step::Switch => "switch",
            Step::Preinit => "preinit",
            Step::Init => "init",
        }
    }

    /// Whether `ltsp.break=` can stop before it: not before the cmdline is read.
    pub fn can_break(self) -> bool {
        !matches!(self, Step::Mounts | Step::Cmdline)
    }

    /// The step a `ltsp.break=` name stands for.
    pub fn from_break(name: &str) -> Option<Step> {
        Step::ALL
            .into_iter()
            .find(|s| s.can_break() && s.name() == name)
    }

    /// The names `ltsp.break=` accepts, comma separated.
    pub fn break_names() -> String {
        Step::ALL
            .into_iter()
            .filter(|s| s.can_break())
            .map(Step::name)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A point on the boot timeline (`/run/ltsp/timeline`, the console's one-word lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The agent's first instruction.
    Start,
    /// A step begins: its own name.
    Begin(Step),
    /// A step is done.
    Done(Step),
    /// The root is whole: the overlay mounted and lts.conf applied.
    RootMounted,
    /// Worker mode: the root is left to initramfs-tools.
    Handover,
}

impl Mark {
    /// The marks the boot records, in order, for the documentation and its test.
    pub const ALL: [Mark; 17] = [
        Mark::Start,
        Mark::Begin(Step::Modules),
        Mark::Begin(Step::Net),
        Mark::Done(Step::Net),
        Mark::Begin(Step::LtsConf),
        Mark::Begin(Step::Nbd),
        Mark::Done(Step::Nbd),
        Mark::Begin(Step::ToRam),
        Mark::Done(Step::ToRam),
        Mark::Begin(Step::Verity),
        Mark::Done(Step::Verity),
        Mark::Done(Step::Root),
        Mark::Done(Step::Apply),
        Mark::RootMounted,
        Mark::Handover,
        Mark::Done(Step::Switch),
        Mark::Begin(Step::Init),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mark::Start => "start",
            Mark::Begin(Step::Init) => "exec-init",
            Mark::Begin(s) => s.name(),
            Mark::Done(Step::Net) => "net-up",
            Mark::Done(Step::Nbd) => "nbd-connected",
            Mark::Done(Step::ToRam) => "in-ram",
            Mark::Done(Step::Verity) => "verified",
            Mark::Done(Step::Root) => "layers",
            Mark::Done(Step::Apply) => "applied",
            Mark::Done(Step::Switch) => "switched",
            Mark::Done(s) => s.name(),
            Mark::RootMounted => "root-mounted",
            Mark::Handover => "handover",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn break_names_are_the_step_names_after_the_cmdline() {
        assert_eq!(
            Step::break_names(),
            "modules,net,ltsconf,nbd,to-ram,verity,root,apply,switch,preinit,init"
        );
        assert_eq!(Step::from_break("ltsconf"), Some(Step::LtsConf));
        assert_eq!(Step::from_break("cmdline"), None);
        assert_eq!(Step::from_break("nope"), None);
    }

    #[test]
    fn timeline_names_are_unique_and_one_word() {
        let names: Vec<&str> = Mark::ALL.iter().map(|m| m.name()).collect();
        for (i, n) in names.iter().enumerate() {
            assert!(!names[..i].contains(n), "{n} twice");
            assert!(!n.contains(' '), "{n}");
        }
        assert_eq!(Mark::Begin(Step::Net).name(), Step::Net.name());
    }
}
