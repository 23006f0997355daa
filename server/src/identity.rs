//! Image identity: a BLAKE3 hash of an image's whole content, sent in the NBD export
//! description. A node that reconnects, to this server after a restart or to another one,
//! asks for that identity and refuses different bytes; two servers with copies of one image
//! agree. [`crate::versions`] hashes each file version once, in a task of its own.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Length of `blake3:` and 64 hex digits.
pub const LEN: usize = 7 + 64;

/// `blake3:<hex>` of the file's content. Positional reads leave the file offset others
/// see untouched; `done` counts the bytes hashed so far (progress for waiting clients).
pub fn hash_file(f: &File, done: &AtomicU64) -> std::io::Result<String> {
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
        done.store(off, Relaxed);
    }
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

/// Whether `s` is an identity this server could have made: `blake3:` and 64 lowercase hex
/// digits. Checked before it names a file in the store, so it can never be a path.
pub fn is_identity(s: &str) -> bool {
    s.len() == LEN
        && s.starts_with("blake3:")
        && s[7..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(data: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, data).unwrap();
        let done = AtomicU64::new(0);
        let id = hash_file(&File::open(p).unwrap(), &done).unwrap();
        assert_eq!(
            done.load(Relaxed),
            data.len() as u64,
            "progress reaches the size"
        );
        id
    }

    #[test]
    fn same_bytes_same_identity_other_bytes_other() {
        let a = hash(b"image one");
        assert_eq!(
            a,
            hash(b"image one"),
            "a copy elsewhere has the same identity"
        );
        assert_ne!(a, hash(b"image two"));
        assert!(is_identity(&a), "{a}");
        // The known BLAKE3 of the empty input.
        assert_eq!(
            hash(b""),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        // More than one buffer.
        assert_ne!(hash(&vec![1u8; 3 << 20]), hash(&vec![2u8; 3 << 20]));
    }

    #[test]
    fn only_well_formed_identities_pass() {
        let good = format!("blake3:{}", "0123456789abcdef".repeat(4));
        assert!(is_identity(&good));
        for bad in [
            "",
            "blake3:",
            &good[..LEN - 1],
            &format!("{good}0"),
            &good.replace("blake3", "sha256"),
            &good.replace('a', "A"),
            &format!("blake3:../../{}", "0".repeat(58)),
            &format!("blake3:{}/", "0".repeat(63)),
        ] {
            assert!(!is_identity(bad), "{bad:?}");
        }
    }
}
