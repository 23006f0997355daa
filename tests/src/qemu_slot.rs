//! QEMU slots: how many test nodes run at once on this host, across test processes.
//!
//! Each slot is a lock file (flock), so the QEMU tests of several processes (qemu_boot and
//! qemu_fault run side by side in tests/run-all) share them, and a holder that dies frees
//! its slot. `LTSP_QEMU_SLOTS` sets the number (default 1: one node at a time);
//! tests/run-all sets one per core and has its image builds hold one while they run.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The slots of this host: `LTSP_QEMU_SLOTS` lock files in `LTSP_QEMU_SLOTS_DIR`
/// (default `$TMPDIR/ltsp-qemu-slots`).
pub struct Slots {
    dir: PathBuf,
    count: usize,
}

/// A slot held until dropped. With a timeline file (`qemu_slot` takes it from
/// `LTSP_QEMU_TIMELINE`), the drop appends one line to it: when the node ran, for how
/// long, and how long it waited for the slot.
pub struct Slot {
    _lock: File,
    timeline: Option<PathBuf>,
    index: usize,
    label: String,
    waited: Duration,
    started: Instant,
    started_at: SystemTime,
}

impl Slots {
    pub fn new(dir: PathBuf, count: usize) -> Slots {
        Slots {
            dir,
            count: count.max(1),
        }
    }

    /// From the environment (see the module's comment).
    pub fn from_env() -> Slots {
        let count = std::env::var("LTSP_QEMU_SLOTS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1);
        let dir = std::env::var_os("LTSP_QEMU_SLOTS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("ltsp-qemu-slots"));
        Slots::new(dir, count)
    }

    /// A free slot now, or None.
    pub fn try_take(&self, label: &str) -> Option<Slot> {
        std::fs::create_dir_all(&self.dir)
            .unwrap_or_else(|e| panic!("QEMU slots: create {}: {e}", self.dir.display()));
        for index in 0..self.count {
            let path = self.dir.join(format!("slot-{index}"));
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("QEMU slots: open {}: {e}", path.display()));
            match f.try_lock() {
                Ok(()) => {
                    return Some(Slot {
                        _lock: f,
                        timeline: None,
                        index,
                        label: label.to_string(),
                        waited: Duration::ZERO,
                        started: Instant::now(),
                        started_at: SystemTime::now(),
                    });
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => panic!("QEMU slots: lock {}: {e}", path.display()),
            }
        }
        None
    }

    /// The first slot that is free, polled every quarter second (a node holds its slot
    /// for a minute or more, so the poll costs nothing measurable). Says every ten
    /// minutes that it still waits, and where: a slot held by a leftover process shows.
    pub fn take(&self, label: &str) -> Slot {
        let t0 = Instant::now();
        let mut said = t0;
        loop {
            if let Some(mut s) = self.try_take(label) {
                s.waited = t0.elapsed();
                return s;
            }
            if said.elapsed() >= Duration::from_secs(600) {
                said = Instant::now();
                eprintln!(
                    "{label}: waiting {} s for one of {} QEMU slots in {} (`fuser` names the holders)",
                    t0.elapsed().as_secs(),
                    self.count,
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A slot for the calling test (named after its thread, which libtest names after the test).
pub fn qemu_slot() -> Slot {
    let label = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("a QEMU test")
        .to_string();
    let mut slot = Slots::from_env().take(&label);
    slot.timeline = std::env::var_os("LTSP_QEMU_TIMELINE").map(PathBuf::from);
    slot
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(path) = &self.timeline else {
            return;
        };
        let clock = |t: SystemTime| {
            let s = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % 86_400;
            format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        };
        let line = format!(
            "{}-{} UTC  slot {}  ran {:>4} s  waited {:>4} s for a slot  {}\n",
            clock(self.started_at),
            clock(SystemTime::now()),
            self.index,
            self.started.elapsed().as_secs(),
            self.waited.as_secs(),
            self.label
        );
        // One write of a short line to a file opened for appending: the lines of
        // several processes do not mix.
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("QEMU timeline {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_held_until_dropped_and_no_more_are_handed_out_than_there_are() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::new(dir.path().to_path_buf(), 2);
        let a = slots.try_take("a").expect("a first slot");
        let b = slots.try_take("b").expect("a second slot");
        assert_ne!(a.index, b.index);
        assert!(slots.try_take("c").is_none(), "a third slot of two");
        drop(a);
        let c = slots.try_take("c").expect("the slot a freed");
        assert!(slots.try_take("d").is_none());
        drop((b, c));
    }

    #[test]
    fn a_slot_held_by_another_open_file_is_busy() {
        // flock belongs to the open file: another process (here another open) is refused.
        let dir = tempfile::tempdir().unwrap();
        let other = File::create(dir.path().join("slot-0")).unwrap();
        other.lock().unwrap();
        let slots = Slots::new(dir.path().to_path_buf(), 1);
        assert!(slots.try_take("x").is_none());
        drop(other);
        assert!(slots.try_take("x").is_some());
    }

    #[test]
    fn a_slot_with_a_timeline_writes_its_line_when_freed_and_one_without_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let timeline = dir.path().join("timeline");
        let slots = Slots::new(dir.path().join("slots"), 2);
        drop(slots.try_take("untimed").unwrap());
        assert!(!timeline.exists());
        let mut s = slots.try_take("some_boot").unwrap();
        s.timeline = Some(timeline.clone());
        drop(s);
        let text = std::fs::read_to_string(&timeline).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("slot 0") && text.ends_with("some_boot\n"),
            "{text}"
        );
    }

    #[test]
    fn take_waits_for_a_slot_to_be_freed() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::new(dir.path().to_path_buf(), 1);
        let held = slots.try_take("first").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600));
            drop(held);
        });
        let s = Slots::new(dir.path().to_path_buf(), 1).take("second");
        assert!(
            s.waited >= Duration::from_millis(500),
            "waited {:?}",
            s.waited
        );
        t.join().unwrap();
    }
}
