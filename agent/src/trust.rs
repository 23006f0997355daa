//! Signed lts.conf: with the site's minisign public key in the initramfs, the server's
//! lts.conf applies only with a valid minisign signature beside it (`lts.conf.sig`).
//! Both minisign formats verify: prehashed (`ED`, minisign's default) and legacy (`Ed`).
//! The key and the signature come from files a site or an attacker wrote: every length is
//! bounded here, and minisign-verify checks each decoded length before it slices.

use minisign_verify::{Error as MsError, PublicKey, Signature};
use std::path::{Path, PathBuf};

/// Where the initramfs carries the site's minisign public key.
pub const TRUST_KEY: &str = "/etc/ltsp/trust.pub";

/// Longest key file read: minisign's is two lines, under 200 bytes.
pub const MAX_KEY: usize = 4096;
/// Longest signature file read: four lines; the trusted comment is the only long one.
pub const MAX_SIG: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error("trust key {path}: {why}")]
    Key { path: String, why: String },
    #[error("signature {0}")]
    Sig(String),
    #[error("signed by another key than the trusted one (key id differs)")]
    OtherKey,
    #[error("the signature does not match the file: changed after signing, or a forged signature")]
    Mismatch,
}

/// The site's public key, as read from a minisign `.pub` file (or its bare base64 line).
pub struct TrustKey(PublicKey);

impl TrustKey {
    /// Parses a key file's bytes; `path` names it in errors.
    pub fn parse(path: &str, bytes: &[u8]) -> Result<TrustKey, TrustError> {
        let bad = |why: &str| TrustError::Key {
            path: path.into(),
            why: why.into(),
        };
        if bytes.len() > MAX_KEY {
            return Err(bad(&format!(
                "longer than {MAX_KEY} bytes: not a minisign public key"
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let line = match lines.next() {
            None => return Err(bad("empty")),
            Some(l) if l.starts_with("untrusted comment:") => lines
                .next()
                .ok_or_else(|| bad("no key line after the comment"))?,
            Some(l) => l,
        };
        PublicKey::from_base64(line)
            .map(TrustKey)
            .map_err(|e| bad(&format!("not a minisign Ed25519 public key ({e})")))
    }

    /// Reads and parses a key file.
    pub fn load(path: &Path) -> Result<TrustKey, TrustError> {
        let name = path.display().to_string();
        let bytes = read_bounded(path, MAX_KEY).map_err(|why| TrustError::Key {
            path: name.clone(),
            why,
        })?;
        TrustKey::parse(&name, &bytes)
    }

    /// Checks `sig` (a minisign signature file's bytes) over `data`: the trusted comment
    /// (signed too, shown printable) when both verify.
    pub fn verify(&self, data: &[u8], sig: &[u8]) -> Result<String, TrustError> {
        if sig.len() > MAX_SIG {
            return Err(TrustError::Sig(format!(
                "is longer than {MAX_SIG} bytes: not a minisign signature"
            )));
        }
        let text = std::str::from_utf8(sig)
            .map_err(|_| TrustError::Sig("is not UTF-8 text: not a minisign signature".into()))?;
        let sig = Signature::decode(text).map_err(|e| {
            TrustError::Sig(format!("is malformed: not a minisign signature ({e})"))
        })?;
        match self.0.verify(data, &sig, true) {
            Ok(()) => Ok(printable(sig.trusted_comment())),
            Err(MsError::UnexpectedKeyId) => Err(TrustError::OtherKey),
            Err(MsError::InvalidSignature) => Err(TrustError::Mismatch),
            Err(e) => Err(TrustError::Sig(format!("is not usable: {e}"))),
        }
    }
}

/// Whether the boot verifies lts.conf, as the initramfs says.
pub enum Trust {
    /// No key file: lts.conf applies unverified (one warning says so).
    Absent(PathBuf),
    Key(TrustKey),
    /// A key file that cannot be used: nothing from the server verifies, so nothing applies.
    Broken(TrustError),
}

impl Trust {
    pub fn load(path: &Path) -> Trust {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Trust::Absent(path.into()),
            _ => match TrustKey::load(path) {
                Ok(k) => Trust::Key(k),
                Err(e) => Trust::Broken(e),
            },
        }
    }
}

/// Reads at most `max` bytes; a longer file is an error.
pub fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > max {
        return Err(format!("longer than {max} bytes"));
    }
    Ok(bytes)
}

/// Control characters shown as `?`, so a comment cannot rewrite the console line.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// Runs the real minisign; a missing tool fails the test (scripts/setup installs it).
    pub(crate) fn minisign(dir: &Path, args: &[&str]) {
        let out = Command::new("minisign")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("minisign must be installed (scripts/setup installs it)");
        assert!(
            out.status.success(),
            "minisign {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A key pair made by minisign, and lts.conf signed with it (prehashed and legacy).
    pub(crate) struct Site {
        pub(crate) dir: tempfile::TempDir,
    }

    impl Site {
        pub(crate) fn new() -> Site {
            let dir = tempfile::tempdir().unwrap();
            minisign(dir.path(), &["-G", "-W", "-p", "k.pub", "-s", "k.key"]);
            std::fs::write(
                dir.path().join("lts.conf"),
                "[default]\nPREINIT_1 = echo hi\n",
            )
            .unwrap();
            minisign(
                dir.path(),
                &[
                    "-S",
                    "-s",
                    "k.key",
                    "-m",
                    "lts.conf",
                    "-x",
                    "lts.conf.sig",
                    "-t",
                    "site test\tfile:lts.conf",
                ],
            );
            minisign(
                dir.path(),
                &[
                    "-S",
                    "-l",
                    "-s",
                    "k.key",
                    "-m",
                    "lts.conf",
                    "-x",
                    "legacy.sig",
                ],
            );
            Site { dir }
        }
        pub(crate) fn read(&self, f: &str) -> Vec<u8> {
            std::fs::read(self.dir.path().join(f)).unwrap()
        }
        fn key(&self) -> TrustKey {
            TrustKey::load(&self.dir.path().join("k.pub")).unwrap()
        }
    }

    #[test]
    fn minisign_signatures_verify_and_give_the_trusted_comment() {
        let s = Site::new();
        let conf = s.read("lts.conf");
        let sig = s.read("lts.conf.sig");
        assert_eq!(
            &sig[sig.iter().position(|&b| b == b'\n').unwrap() + 1..][..2],
            b"RU"
        );
        assert_eq!(
            s.key().verify(&conf, &sig),
            Ok("site test?file:lts.conf".into())
        );
        // The legacy format (`Ed`), with minisign's own trusted comment.
        let legacy = s.read("legacy.sig");
        assert_eq!(
            &legacy[legacy.iter().position(|&b| b == b'\n').unwrap() + 1..][..2],
            b"RW"
        );
        let tc = s.key().verify(&conf, &legacy).unwrap();
        assert!(tc.starts_with("timestamp:"), "{tc}");
        // The bare base64 line (minisign -P's form) is a key too.
        let pubfile = String::from_utf8(s.read("k.pub")).unwrap();
        let line = pubfile.lines().nth(1).unwrap();
        let k = TrustKey::parse("inline", line.as_bytes()).unwrap();
        assert!(k.verify(&conf, &sig).is_ok());
    }

    #[test]
    fn tampered_or_foreign_signatures_are_refused() {
        let s = Site::new();
        let conf = s.read("lts.conf");
        let sig = s.read("lts.conf.sig");
        let key = s.key();
        // One byte of lts.conf changed, in both formats.
        for i in [0, conf.len() / 2, conf.len() - 1] {
            let mut c = conf.clone();
            c[i] ^= 1;
            assert_eq!(key.verify(&c, &sig), Err(TrustError::Mismatch), "byte {i}");
            assert_eq!(
                key.verify(&c, &s.read("legacy.sig")),
                Err(TrustError::Mismatch)
            );
        }
        // A line appended (a PREINIT injected).
        let mut c = conf.clone();
        c.extend_from_slice(b"PREINIT_9 = touch /pwned\n");
        assert_eq!(key.verify(&c, &sig), Err(TrustError::Mismatch));
        // The trusted comment changed: the global signature no longer matches.
        let text = String::from_utf8(sig.clone()).unwrap();
        let forged = text.replace("site test", "site tesT");
        assert_ne!(forged, text);
        assert_eq!(
            key.verify(&conf, forged.as_bytes()),
            Err(TrustError::Mismatch)
        );
        // Signed by another key pair.
        let other = Site::new();
        assert_eq!(
            key.verify(&conf, &other.read("lts.conf.sig")),
            Err(TrustError::OtherKey)
        );
        // Another key with this key's id: the signature itself fails.
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let other_text = String::from_utf8(other.read("k.pub")).unwrap();
        let other_key = other_text.lines().nth(1).unwrap();
        let pubfile = String::from_utf8(s.read("k.pub")).unwrap();
        let mine = pubfile.lines().nth(1).unwrap();
        // Key: 2 algorithm bytes, 8 id bytes, 32 key bytes; keep our id, their key.
        let swapped = swap_key_bytes(mine, other_key);
        let k = TrustKey::parse("swapped", swapped.as_bytes()).unwrap();
        assert_eq!(k.verify(&conf, &sig), Err(TrustError::Mismatch));
        // A signature whose key id was changed: refused as another key.
        lines[1] = flip_b64_byte(&lines[1], 5);
        let changed_id = lines.join("\n");
        assert_eq!(
            key.verify(&conf, changed_id.as_bytes()),
            Err(TrustError::OtherKey)
        );
    }

    /// Base64 of `mine`'s first 10 bytes (algorithm, key id) and `theirs`' 32 key bytes.
    fn swap_key_bytes(mine: &str, theirs: &str) -> String {
        let a = b64_decode(mine);
        let b = b64_decode(theirs);
        let mut out = a[..10].to_vec();
        out.extend_from_slice(&b[10..]);
        b64_encode(&out)
    }

    fn flip_b64_byte(s: &str, i: usize) -> String {
        let mut b = b64_decode(s);
        b[i] ^= 0x55;
        b64_encode(&b)
    }

    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    fn b64_decode(s: &str) -> Vec<u8> {
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.bytes().take_while(|&c| c != b'=') {
            bits = (bits << 6) | B64.iter().position(|&x| x == c).unwrap() as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }

    fn b64_encode(b: &[u8]) -> String {
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let v = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &x)| acc | (x as u32) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(B64[(v >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn malformed_signatures_and_keys_are_errors_not_panics() {
        let s = Site::new();
        let conf = s.read("lts.conf");
        let sig = s.read("lts.conf.sig");
        let key = s.key();
        // Every truncation of a real signature (but of its final newline alone).
        assert_eq!(sig.last(), Some(&b'\n'));
        for n in 0..sig.len() - 1 {
            let r = key.verify(&conf, &sig[..n]);
            assert!(r.is_err(), "truncated to {n} bytes: {r:?}");
        }
        // Garbage, non-UTF-8, oversized, and each line blanked or doubled.
        let text = String::from_utf8(sig.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut cases: Vec<Vec<u8>> = vec![
            b"garbage".to_vec(),
            vec![0xff; 200],
            vec![b'A'; MAX_SIG + 1],
            b"\n\n\n\n".to_vec(),
            format!("{}\n{}\n{}\n", lines[0], lines[1], lines[2]).into_bytes(),
            format!("{}\n{}==\n{}\n{}\n", lines[0], lines[1], lines[2], lines[3]).into_bytes(),
            format!("{}\n{}\ncomment: x\n{}\n", lines[0], lines[1], lines[3]).into_bytes(),
            format!("{}\n{}\n{}\n{}\n", lines[0], lines[3], lines[2], lines[1]).into_bytes(),
        ];
        for i in 1..4 {
            let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            l[i] = "AAAA".into();
            cases.push(l.join("\n").into_bytes());
        }
        // The untrusted comment is not signed (minisign's format): any text verifies.
        let other_comment = format!(
            "untrusted comment: x\n{}\n{}\n{}\n",
            lines[1], lines[2], lines[3]
        );
        assert!(key.verify(&conf, other_comment.as_bytes()).is_ok());
        for c in &cases {
            assert!(
                key.verify(&conf, c).is_err(),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
        // Keys: empty, comment only, garbage, too short, too long, not UTF-8.
        for k in [
            &b""[..],
            b"\n\n",
            b"untrusted comment: minisign public key\n",
            b"not base64 !!",
            b"RWQ=",
            &[b'R'; MAX_KEY + 1],
            &[0xc3, 0x28],
        ] {
            assert!(
                matches!(TrustKey::parse("k", k), Err(TrustError::Key { .. })),
                "{k:?}"
            );
        }
        let empty = s.dir.path().join("empty.pub");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(Trust::load(&empty), Trust::Broken(_)));
        assert!(matches!(
            Trust::load(&s.dir.path().join("none.pub")),
            Trust::Absent(_)
        ));
        assert!(matches!(
            Trust::load(&s.dir.path().join("k.pub")),
            Trust::Key(_)
        ));
    }

    #[test]
    fn control_characters_in_the_comment_are_not_written_raw() {
        assert_eq!(printable("a\x1b[2Jb\r"), "a?[2Jb?");
    }
}
