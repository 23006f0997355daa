//! `ltsp-agent verify` as an operator runs it, against signatures the real minisign made.

use ltsp_tests::{bin, workspace_root};
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

#[test]
#[ignore = "needs root: ltsp-mkinitramfs makes /dev/console with mknod"]
fn ltsp_mkinitramfs_bakes_in_the_trust_key_and_refuses_a_non_key() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    minisign(dir, &["-G", "-W", "-p", "site.pub", "-s", "site.key"]);
    // A kernel tree with no modules: only the key matters here.
    std::fs::create_dir_all(dir.join("k/lib/modules/1.0")).unwrap();
    std::fs::write(dir.join("k/lib/modules/1.0/modules.dep"), "").unwrap();
    let build = |key: &str, out: &str| {
        Command::new(workspace_root().join("mkinitramfs-hook/ltsp-mkinitramfs"))
            .args([
                "--agent",
                "/bin/true",
                "--kernel-root",
                "k",
                "--version",
                "1.0",
            ])
            .args(["--modules", "", "--compress", "none", "--output", out])
            .args(["--trust-key", key])
            .current_dir(dir)
            .output()
            .unwrap()
    };
    let out = build("site.pub", "initrd.img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cpio = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", "etc/ltsp/trust.pub"])
        .stdin(std::fs::File::open(dir.join("initrd.img")).unwrap())
        .output()
        .unwrap();
    assert!(cpio.status.success());
    // The key line only (the untrusted comment dropped), which the agent reads as the key.
    let public = std::fs::read_to_string(dir.join("site.pub")).unwrap();
    let line = public.lines().find(|l| l.starts_with("RW")).unwrap();
    assert_eq!(String::from_utf8_lossy(&cpio.stdout), format!("{line}\n"));
    assert!(ltsp_agent::trust::TrustKey::parse("trust.pub", &cpio.stdout).is_ok());
    // A file with a comment line before the key: the same key line is installed.
    std::fs::write(dir.join("commented.pub"), format!("# site key\n{public}")).unwrap();
    let out = build("commented.pub", "commented.img");
    assert!(out.status.success());
    assert_eq!(
        ltsp_agent::trust::TRUST_KEY,
        "/etc/ltsp/trust.pub",
        "where the agent looks"
    );
    // The secret key by mistake: refused, no image.
    let out = build("site.key", "bad.img");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a minisign public key"));
    assert!(!dir.join("bad.img").exists());
}
