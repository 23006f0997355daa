//! `ltsp.to-ram=1` (LTSP's IMAGE_TO_RAM): the image is copied from the NBD device into a
//! tmpfs before anything mounts it, hashed on the way and checked against the identity the
//! server gave, then mounted from a read-only loop device; the NBD device is disconnected,
//! so the node needs no server from then on.
//!
//! The copy finishes before the root is mounted rather than streaming behind a running
//! system: the root then never changes under the node, and the copy is whole and checked
//! before anything runs from it.

use crate::system::System;
use nix::mount::MsFlags;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

/// RAM left for the system beside the copy: an eighth of the image, at least 128 MiB.
pub fn headroom(size: u64) -> u64 {
    (size / 8).max(128 << 20)
}

/// Why the image stays on the network, or (only [`ToRamError::Mismatch`]) why the boot
/// stops: one variant per step of the copy.
#[derive(Debug, thiserror::Error)]
pub enum ToRamError {
    #[error("reading /proc/meminfo: {0}")]
    Meminfo(std::io::Error),
    #[error("not enough RAM: the image is {size} bytes and {available} are available; {needed} are needed with room for the system")]
    Short {
        size: u64,
        available: u64,
        needed: u64,
    },
    #[error("mount tmpfs (size={size}) on {target}: {source}")]
    Tmpfs {
        size: u64,
        target: String,
        source: std::io::Error,
    },
    #[error("open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("read {path} at {offset}: {source}")]
    Read {
        path: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("{path} ended at {offset} of {size} bytes")]
    Short0 {
        path: String,
        offset: u64,
        size: u64,
    },
    #[error("write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the copy was not done within its deadline ({done} of {size} bytes)")]
    Deadline { done: u64, size: u64 },
    #[error("the copy is {got}, the image's identity is {want}: the bytes read over NBD are not the image the server named")]
    Mismatch { got: String, want: String },
    #[error("loop device over {file}: {source}")]
    Loop {
        file: String,
        source: std::io::Error,
    },
}

/// `MemAvailable` of /proc/meminfo, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut w = line.split_whitespace().skip(1);
    let n: u64 = w.next()?.parse().ok()?;
    match w.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Whether `available` bytes of RAM hold an image of `size` with room for the system.
pub fn check_room(size: u64, available: u64) -> Result<(), ToRamError> {
    let needed = size.checked_add(headroom(size));
    let needed = needed.unwrap_or(u64::MAX);
    if available < needed || needed == u64::MAX {
        return Err(ToRamError::Short {
            size,
            available,
            needed,
        });
    }
    Ok(())
}

const CHUNK: usize = 1 << 20;
/// How often the source's page cache is dropped: the copy must not hold the image twice.
const DROP_EVERY: u64 = 64 << 20;

/// Copies `size` bytes of `from` into a new file `to`, checking `deadline` at every MiB;
/// returns `blake3:<hex>` of the bytes copied (the server's identity of the same image).
pub fn copy_and_hash(
    from: &Path,
    to: &Path,
    size: u64,
    deadline: Instant,
    mut progress: impl FnMut(u64),
) -> Result<String, ToRamError> {
    let src = File::open(from).map_err(|source| ToRamError::Open {
        path: from.display().to_string(),
        source,
    })?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|source| ToRamError::Open {
            path: to.display().to_string(),
            source,
        })?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    let mut dropped = 0u64;
    while off < size {
        if Instant::now() >= deadline {
            return Err(ToRamError::Deadline { done: off, size });
        }
        let want = (size - off).min(CHUNK as u64) as usize;
        let n = (&src)
            .read(&mut buf[..want])
            .map_err(|source| ToRamError::Read {
                path: from.display().to_string(),
                offset: off,
                source,
            })?;
        if n == 0 {
            return Err(ToRamError::Short0 {
                path: from.display().to_string(),
                offset: off,
                size,
            });
        }
        h.update(&buf[..n]);
        dst.write_all(&buf[..n])
            .map_err(|source| ToRamError::Write {
                path: to.display().to_string(),
                source,
            })?;
        off += n as u64;
        if off - dropped >= DROP_EVERY || off == size {
            // Advice only: a failure costs memory the kernel can reclaim anyway.
            let _ = nix::fcntl::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&src),
                dropped as i64,
                (off - dropped) as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            dropped = off;
            progress(off);
        }
    }
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

/// [`copy_and_hash`] in a thread of its own, waited for until `deadline` only: a read
/// of a stalled NBD device blocks in the kernel past any deadline (up to its dead
/// timeout). The thread then stops at its next chunk, once the read returns.
fn copy_by_deadline(
    device: &str,
    file: &str,
    size: u64,
    deadline: Instant,
) -> Result<String, ToRamError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (from, to) = (device.to_string(), file.to_string());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = done.clone();
    let spawned = std::thread::Builder::new()
        .name("to-ram".into())
        .spawn(move || {
            let r = copy_and_hash(Path::new(&from), Path::new(&to), size, deadline, |n| {
                seen.store(n, std::sync::atomic::Ordering::Relaxed);
                log::debug!("to-ram: {n} of {size} bytes");
            });
            let _ = tx.send(r);
        });
    if let Err(source) = spawned {
        return Err(ToRamError::Open {
            path: device.to_string(),
            source,
        });
    }
    let wait = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(wait) {
        Ok(r) => r,
        Err(_) => {
            // The thread may hold the file open for as long as its read blocks: emptied
            // by its path, the tmpfs gives its pages back now. At most one more chunk is
            // written after this (the thread stops at the deadline check that follows).
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(file);
            Err(ToRamError::Deadline {
                done: done.load(std::sync::atomic::Ordering::Relaxed),
                size,
            })
        }
    }
}

/// Where the copy lives: a tmpfs of its own, so its size is the image's and nothing else
/// can fill it.
pub fn ram_dir(run: &str) -> String {
    format!("{run}/ltsp/ram")
}

/// The whole step: room checked, tmpfs mounted, image copied and checked, loop device
/// attached. Returns the loop device. The caller disconnects NBD; on an error other than
/// a mismatch it stays on the network root (and this unmounts what it mounted).
pub fn to_ram(
    sys: &dyn System,
    run: &str,
    device: &str,
    size: u64,
    identity: Option<&str>,
    meminfo: &str,
    deadline: Instant,
) -> Result<String, ToRamError> {
    let available = mem_available(meminfo).ok_or_else(|| {
        ToRamError::Meminfo(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no MemAvailable line",
        ))
    })?;
    check_room(size, available)?;
    let dir = ram_dir(run);
    std::fs::create_dir_all(&dir).map_err(|source| ToRamError::Open {
        path: dir.clone(),
        source,
    })?;
    // Rounded up to pages, plus one: tmpfs counts in pages.
    let tmpfs_size = size.div_ceil(4096) * 4096 + 4096;
    sys.mount(
        "tmpfs",
        &dir,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        &format!("mode=0700,size={tmpfs_size}"),
    )
    .map_err(|source| ToRamError::Tmpfs {
        size: tmpfs_size,
        target: dir.clone(),
        source,
    })?;
    let file = format!("{dir}/image");
    let r = copy_checked(sys, device, &file, size, identity, deadline);
    if r.is_err() {
        // The RAM goes back before the boot goes on from the network root.
        if let Err(e) = sys.umount(&dir) {
            log::warn!("to-ram: umount {dir}: {e}");
        }
    }
    r
}

fn copy_checked(
    sys: &dyn System,
    device: &str,
    file: &str,
    size: u64,
    identity: Option<&str>,
    deadline: Instant,
) -> Result<String, ToRamError> {
    let t = Instant::now();
    let got = copy_by_deadline(device, file, size, deadline)?;
    let secs = t.elapsed().as_secs_f64();
    match identity {
        Some(want) if want != got => {
            return Err(ToRamError::Mismatch {
                got,
                want: want.to_string(),
            })
        }
        Some(_) => log::info!(
            "to-ram: {size} bytes copied in {secs:.2} s ({:.0} MiB/s), identity {got} checked",
            size as f64 / secs.max(1e-6) / 1048576.0
        ),
        None => log::warn!(
            "to-ram: {size} bytes copied in {secs:.2} s; the server gave no identity, so the copy is not checked ({got})"
        ),
    }
    sys.attach_loop(file, true)
        .map_err(|source| ToRamError::Loop {
            file: file.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn meminfo_is_read_in_bytes_and_garbage_is_none() {
        let m = "MemTotal:        2030000 kB\nMemFree:  10 kB\nMemAvailable:    1500000 kB\n";
        assert_eq!(mem_available(m), Some(1_500_000 * 1024));
        assert_eq!(mem_available("MemAvailable: x kB"), None);
        assert_eq!(mem_available("MemAvailable: 1 MB"), None);
        assert_eq!(mem_available(""), None);
        assert_eq!(mem_available("MemAvailable: 99999999999999999999 kB"), None);
    }

    #[test]
    fn room_is_the_image_and_headroom() {
        let size = 1 << 30;
        assert!(check_room(size, size + (128 << 20)).is_ok());
        let e = check_room(size, size + (127 << 20)).unwrap_err();
        assert!(e.to_string().contains("not enough RAM"), "{e}");
        // A small image still leaves 128 MiB.
        assert!(check_room(1 << 20, 100 << 20).is_err());
        assert!(check_room(u64::MAX, u64::MAX).is_err(), "no overflow");
    }

    fn image(d: &Path, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let p = d.join("img");
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    #[test]
    fn the_copy_is_the_image_and_its_hash_the_servers_identity() {
        let d = tempfile::tempdir().unwrap();
        let (src, data) = image(d.path(), 3 * CHUNK + 123);
        let dst = d.path().join("copy");
        let far = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let id = copy_and_hash(&src, &dst, data.len() as u64, far, |n| seen.push(n)).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert_eq!(id, format!("blake3:{}", blake3::hash(&data).to_hex()));
        assert_eq!(seen.last(), Some(&(data.len() as u64)));
    }

    #[test]
    fn a_short_source_a_passed_deadline_and_an_existing_target_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let (src, data) = image(d.path(), CHUNK);
        let far = Instant::now() + Duration::from_secs(60);
        let e = copy_and_hash(
            &src,
            &d.path().join("a"),
            data.len() as u64 + 1,
            far,
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, ToRamError::Short0 { .. }), "{e}");
        let e = copy_and_hash(
            &src,
            &d.path().join("b"),
            data.len() as u64,
            Instant::now(),
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, ToRamError::Deadline { done: 0, .. }), "{e}");
        std::fs::write(d.path().join("c"), b"x").unwrap();
        let e = copy_and_hash(&src, &d.path().join("c"), 10, far, |_| {}).unwrap_err();
        assert!(matches!(e, ToRamError::Open { .. }), "{e}");
    }

    /// A source whose read never returns (a stalled NBD device) cannot hold the boot
    /// past the deadline.
    #[test]
    fn a_stalled_source_ends_at_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("stalled");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let writer = {
            let fifo = fifo.clone();
            // A writer that opens and never writes: the copy's read blocks.
            std::thread::spawn(move || {
                let _w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
                let _ = held.recv();
            })
        };
        let deadline = Instant::now() + Duration::from_millis(300);
        let e = copy_by_deadline(
            &fifo.display().to_string(),
            &d.path().join("copy").display().to_string(),
            1 << 20,
            deadline,
        )
        .unwrap_err();
        assert!(matches!(e, ToRamError::Deadline { .. }), "{e}");
        let copy = std::fs::metadata(d.path().join("copy")).map(|m| m.len());
        assert!(matches!(copy, Ok(0) | Err(_)), "emptied: {copy:?}");
        drop(hold);
        writer.join().unwrap();
    }

    #[test]
    fn other_bytes_than_the_identity_are_a_mismatch_and_no_loop_device() {
        let d = tempfile::tempdir().unwrap();
        let (src, data) = image(d.path(), 4096);
        let sys = crate::system::Recorder::default();
        let far = Instant::now() + Duration::from_secs(60);
        let want = format!("blake3:{}", "0".repeat(64));
        let e = copy_checked(
            &sys,
            &src.display().to_string(),
            &d.path().join("copy").display().to_string(),
            data.len() as u64,
            Some(&want),
            far,
        )
        .unwrap_err();
        assert!(matches!(e, ToRamError::Mismatch { .. }), "{e}");
        assert!(
            !sys.calls().iter().any(|c| c.starts_with("loop ")),
            "{:?}",
            sys.calls()
        );
        let right = format!("blake3:{}", blake3::hash(&data).to_hex());
        let dev = copy_checked(
            &sys,
            &src.display().to_string(),
            &d.path().join("copy2").display().to_string(),
            data.len() as u64,
            Some(&right),
            far,
        )
        .unwrap();
        assert_eq!(dev, "/dev/loop0");
        assert!(sys
            .calls()
            .iter()
            .any(|c| c.starts_with("loop ") && c.ends_with(" ro")));
    }
}
