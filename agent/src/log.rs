//! Logging for PID 1: every line to the console and to /dev/kmsg (so it lands in the
//! journal after switch root), stamped with seconds since the kernel started, which is
//! what the boot timeline is measured in.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

pub struct BootLogger {
    console: Mutex<Option<File>>,
    kmsg: Mutex<Option<File>>,
}

/// Seconds since boot (CLOCK_BOOTTIME), the clock dmesg uses.
pub fn uptime() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

impl log::Log for BootLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        // `ltsp.debug=1` raises the level once the cmdline has been read.
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let t = uptime();
        let level = match r.level() {
            log::Level::Error => "ERROR ",
            log::Level::Warn => "WARNING ",
            _ => "",
        };
        let line = format!("ltsp-agent [{t:9.3}] {level}{}\n", r.args());
        if let Some(c) = self
            .console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            let _ = c.write_all(line.as_bytes());
        } else {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        if let Some(k) = self.kmsg.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let prio = match r.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                _ => 7,
            };
            let _ = k.write_all(format!("<{prio}>ltsp-agent: {level}{}\n", r.args()).as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: std::sync::OnceLock<BootLogger> = std::sync::OnceLock::new();

/// Boot logging: console and kmsg once /dev is mounted (call [`reopen`] then).
pub fn init_boot(debug: bool) {
    init_stderr(debug);
    reopen();
}

/// (Re)opens /dev/console and /dev/kmsg; harmless before /dev exists.
pub fn reopen() {
    if let Some(l) = LOGGER.get() {
        let open = |p: &str| std::fs::OpenOptions::new().write(true).open(p).ok();
        *l.console.lock().unwrap_or_else(|p| p.into_inner()) = open("/dev/console");
        *l.kmsg.lock().unwrap_or_else(|p| p.into_inner()) = open("/dev/kmsg");
    }
}

/// The console and kmsg descriptors in use, to hand to a helper.
pub fn raw_fds() -> (Option<i32>, Option<i32>) {
    use std::os::fd::AsRawFd;
    let Some(l) = LOGGER.get() else {
        return (None, None);
    };
    let fd = |m: &Mutex<Option<File>>| {
        m.lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|f| f.as_raw_fd())
    };
    (fd(&l.console), fd(&l.kmsg))
}

/// Boot logging over descriptors a parent handed over (see [`raw_fds`]); one that is not
/// an open character device is ignored.
pub fn init_inherited(console: Option<i32>, kmsg: Option<i32>) {
    init_stderr(false);
    let adopt = |fd: Option<i32>| {
        crate::system::adopt_inherited(fd?, nix::libc::S_IFCHR, "character device")
            .ok()
            .map(File::from)
    };
    if let Some(l) = LOGGER.get() {
        *l.console.lock().unwrap_or_else(|p| p.into_inner()) = adopt(console);
        *l.kmsg.lock().unwrap_or_else(|p| p.into_inner()) = adopt(kmsg);
    }
}

/// For the operator commands: stderr only (until [`reopen`]).
pub fn init_stderr(debug: bool) {
    let l = LOGGER.get_or_init(|| BootLogger {
        console: Mutex::new(None),
        kmsg: Mutex::new(None),
    });
    let _ = log::set_logger(l);
    log::set_max_level(if debug {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
}

/// The kernel rate-limits /dev/kmsg writes (10 lines per 5 s): a boot's log would be cut.
/// Returns the previous setting, for [`restore_kmsg_limit`] before exec of init.
pub fn lift_kmsg_limit() -> Option<String> {
    let path = "/proc/sys/kernel/printk_devkmsg";
    let prev = std::fs::read_to_string(path).ok()?;
    std::fs::write(path, "on\n").ok()?;
    Some(prev)
}

pub fn restore_kmsg_limit(prev: Option<String>) {
    if let Some(p) = prev {
        let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", p);
    }
}
