//! Image identity: a BLAKE3 hash of an image's whole content, sent in the NBD export
//! description. A node that reconnects, to this server after a restart or to another one,
//! compares it and refuses different bytes; two servers with copies of one image agree.
//!
//! Hashing 1 GiB takes about a second, so each file version is hashed once (keyed by
//! device, inode, size and mtime) and exports are hashed when the server starts.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// File versions remembered; old ones are forgotten first.
const REMEMBERED: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

type Cell = Arc<OnceCell<String>>;

/// Per file version, its hash once computed; and the versions oldest first.
#[derive(Default)]
pub struct Identities {
    known: Mutex<(HashMap<Key, Cell>, Vec<Key>)>,
}

impl Identities {
    /// `blake3:<hex>` of the open file's content, computed at most once per file version.
    pub async fn of(&self, file: &File) -> std::io::Result<String> {
        let m = file.metadata()?;
        let key = Key {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        };
        let cell = {
            let mut g = self.known.lock().unwrap();
            let (map, order) = &mut *g;
            if !map.contains_key(&key) {
                if order.len() >= REMEMBERED {
                    let old = order.remove(0);
                    map.remove(&old);
                }
                order.push(key);
            }
            map.entry(key).or_default().clone()
        };
        let f = file.try_clone()?;
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || hash_file(&f))
                .await
                .map_err(std::io::Error::other)?
        })
        .await
        .cloned()
    }
}

/// Hashes with positional reads, so the file offset other users see is untouched.
pub fn hash_file(f: &File) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn same_bytes_same_identity_other_bytes_other() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, data: &[u8]| {
            let p = dir.path().join(name);
            std::fs::File::create(&p).unwrap().write_all(data).unwrap();
            File::open(p).unwrap()
        };
        let ids = Identities::default();
        let a = ids.of(&write("a", b"image one")).await.unwrap();
        let copy = ids.of(&write("b", b"image one")).await.unwrap();
        let other = ids.of(&write("c", b"image two")).await.unwrap();
        assert_eq!(a, copy, "a copy elsewhere has the same identity");
        assert_ne!(a, other);
        assert!(a.starts_with("blake3:") && a.len() == 7 + 64, "{a}");
        // The known BLAKE3 of the empty input.
        assert_eq!(
            ids.of(&write("e", b"")).await.unwrap(),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[tokio::test]
    async fn a_rewritten_file_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"version 1").unwrap();
        let ids = Identities::default();
        let v1 = ids.of(&File::open(&p).unwrap()).await.unwrap();
        // Same inode, new content and mtime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"version 2").unwrap();
        let v2 = ids.of(&File::open(&p).unwrap()).await.unwrap();
        assert_ne!(v1, v2);
    }
}
