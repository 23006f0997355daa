//! `ltsp-agent verify` as an operator runs it, against signatures the real minisign made.

use ltsp_tests::bin;
use std::path::Path;
use std::process::Command;

/// Runs minisign; a missing tool fails the test (scripts/setup installs it).
fn minisign(dir: &Path, args: &[&str]) {
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

fn verify(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin("ltsp-agent"))
        .arg("verify")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn verify_prints_the_trusted_comment_or_refuses_with_a_reason() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    minisign(dir, &["-G", "-W", "-p", "site.pub", "-s", "site.key"]);
    minisign(dir, &["-G", "-W", "-p", "other.pub", "-s", "other.key"]);
    std::fs::write(dir.join("lts.conf"), "[default]\nPREINIT_1 = echo hi\n").unwrap();
    minisign(
        dir,
        &[
            "-S",
            "-s",
            "site.key",
            "-m",
            "lts.conf",
            "-x",
            "lts.conf.sig",
            "-t",
            "lts.conf for rack 4",
        ],
    );

    // Valid: the trusted comment on stdout, exit 0; SIG defaults to LTSCONF.sig.
    let (code, out, err) = verify(dir, &["--key", "site.pub", "lts.conf"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "lts.conf for rack 4\n");
    let (code, out, _) = verify(dir, &["--key", "site.pub", "lts.conf", "lts.conf.sig"]);
    assert_eq!((code, out.as_str()), (Some(0), "lts.conf for rack 4\n"));

    // Another key: refused, and said so.
    let (code, out, err) = verify(dir, &["--key", "other.pub", "lts.conf"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("REFUSED") && err.contains("another key"),
        "{err}"
    );

    // One byte changed.
    std::fs::write(dir.join("lts.conf"), "[default]\nPREINIT_1 = echo hI\n").unwrap();
    let (code, _, err) = verify(dir, &["--key", "site.pub", "lts.conf"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not match"), "{err}");

    // A garbage signature, an empty key, a missing signature: clear errors, no panic.
    std::fs::write(dir.join("junk.sig"), "untrusted comment: x\n!!!\n").unwrap();
    let (code, _, err) = verify(dir, &["--key", "site.pub", "lts.conf", "junk.sig"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("malformed"), "{err}");
    std::fs::write(dir.join("empty.pub"), "").unwrap();
    let (code, _, err) = verify(dir, &["--key", "empty.pub", "lts.conf"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("empty.pub: empty"), "{err}");
    let (code, _, err) = verify(dir, &["--key", "site.pub", "lts.conf", "none.sig"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("none.sig"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
