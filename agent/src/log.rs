//! Logging for PID 1: every line to /dev/kmsg (so it lands in the journal after switch
//! root) and on the console once: the kernel echoes kmsg lines above the console log
//! level there itself (`[  1.234567] ltsp-agent: ...`), the others are written to the
//! console directly, stamped the same way (`ltsp-agent [  1.234] ...`) with seconds since
//! the kernel started, which is what the boot timeline is measured in.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

pub struct BootLogger {
    console: Mutex<Option<File>>,
    kmsg: Mutex<Option<File>>,
    /// The kernel prints kmsg lines of a priority below this on the console; 0: unknown.
    console_loglevel: AtomicU8,
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
        let prio = match r.level() {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            log::Level::Info => 6,
            _ => 7,
        };
        let mut kmsg = self.kmsg.lock().unwrap_or_else(|p| p.into_inner());
        let echoed = kmsg.is_some() && prio < self.console_loglevel.load(Ordering::Relaxed);
        if let Some(k) = kmsg.as_mut() {
            let _ = k.write_all(format!("<{prio}>ltsp-agent: {level}{}\n", r.args()).as_bytes());
        }
        drop(kmsg);
        if echoed {
            return;
        }
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
        let level = std::fs::read_to_string("/proc/sys/kernel/printk")
            .ok()
            .and_then(|t| console_loglevel(&t));
        l.console_loglevel
            .store(level.unwrap_or(0), Ordering::Relaxed);
    }
}

/// The console log level: the first field of /proc/sys/kernel/printk.
fn console_loglevel(printk: &str) -> Option<u8> {
    printk.split_whitespace().next()?.parse().ok()
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
        // Read while /proc is in reach; a helper that first runs after the switch is told
        // it instead ([`set_console_level`]).
        let level = std::fs::read_to_string("/proc/sys/kernel/printk")
            .ok()
            .and_then(|t| console_loglevel(&t));
        l.console_loglevel
            .store(level.unwrap_or(0), Ordering::Relaxed);
    }
}

/// The console log level in use (the kernel echoes kmsg lines below it), if known.
pub fn console_level() -> Option<u8> {
    let l = LOGGER.get()?.console_loglevel.load(Ordering::Relaxed);
    (l > 0).then_some(l)
}

/// Sets the console log level a parent read: without it, lines the kernel echoes from
/// kmsg would also be written to the console.
pub fn set_console_level(level: u8) {
    if let Some(l) = LOGGER.get() {
        l.console_loglevel.store(level, Ordering::Relaxed);
    }
}

/// For the operator commands: stderr only (until [`reopen`]).
pub fn init_stderr(debug: bool) {
    let l = LOGGER.get_or_init(|| BootLogger {
        console: Mutex::new(None),
        kmsg: Mutex::new(None),
        console_loglevel: AtomicU8::new(0),
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

#[cfg(test)]
mod tests {
    #[test]
    fn console_loglevel_is_the_first_printk_field() {
        assert_eq!(super::console_loglevel("7\t4\t1\t7\n"), Some(7));
        assert_eq!(super::console_loglevel("4 4 1 7"), Some(4));
        assert_eq!(super::console_loglevel(""), None);
    }
}
