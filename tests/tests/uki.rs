//! deploy/build-uki on the host: the UKI it makes from systemd-boot's stub has the four
//! sections after the stub's own, at the stub's section alignment, the command line with
//! the root hash appended, and a signature sbverify accepts with the site's certificate;
//! command lines and initramfs files that would leave a hole in the chain are refused.
//! (QEMU boots it under Secure Boot: qemu_boot.rs, qemu_fault.rs.)

use ltsp_tests::workspace_root;
use std::path::Path;
use std::process::{Command, Output};

const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
const HASH: &str = "3aede3abd77b2e137fec1cbcdbe77f375db63ef2dd3cd27c77c62bf4effcf3c6";
const CMDLINE: &str = "console=ttyS0 root=/dev/nbd0 nbdroot=192.0.2.1/root ltsp.server=192.0.2.1 ltsp.on-failure=reboot:30";

fn sh(cmd: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fake kernel (any bytes: the stub is not run here), an initramfs with or without
/// the lts.conf key, the root hash file, and a self-signed db key pair.
fn fixtures(dir: &Path) {
    std::fs::write(dir.join("vmlinuz"), vec![0x5a; 300_001]).unwrap();
    std::fs::write(dir.join("roothash"), format!("{HASH}\n")).unwrap();
    sh(
        "mkdir -p with/etc/ltsp without/etc && echo RWQ > with/etc/ltsp/trust.pub && echo x > without/etc/x \
         && (cd with && find . -mindepth 1 | cpio -o -H newc --quiet) | zstd -q > initrd-key.img \
         && (cd without && find . -mindepth 1 | cpio -o -H newc --quiet) | zstd -q > initrd-nokey.img \
         && openssl req -new -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-db/ \
            -keyout db.key -out db.crt 2>/dev/null \
         && openssl req -new -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=other/ \
            -keyout other.key -out other.crt 2>/dev/null",
        dir,
    );
}

fn build_uki(dir: &Path, initrd: &str, cmdline: &str, extra: &[&str]) -> Output {
    Command::new(workspace_root().join("deploy/build-uki"))
        .current_dir(dir)
        .args([
            "--kernel",
            "vmlinuz",
            "--initrd",
            initrd,
            "--cmdline",
            cmdline,
        ])
        .args(["--output", "ltsp.efi"])
        .args(extra)
        .output()
        .unwrap()
}

/// (name, size, vma, file offset) of each section, from objdump.
fn sections(file: &Path) -> Vec<(String, u64, u64, u64)> {
    let out = Command::new("objdump")
        .args(["-h", "-w"])
        .arg(file)
        .output()
        .unwrap();
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 5 && f[0].parse::<u32>().is_ok())
                .then(|| (f[1].to_string(), hex(f[2]), hex(f[3]), hex(f[5])))
        })
        .collect()
}

fn section_alignment(file: &str) -> u64 {
    let out = Command::new("objdump").args(["-p", file]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("SectionAlignment"))
        .expect("SectionAlignment");
    u64::from_str_radix(v.trim(), 16).unwrap()
}

#[test]
fn a_signed_uki_has_the_stubs_alignment_the_pinned_cmdline_and_a_valid_signature() {
    assert!(
        Path::new(STUB).exists(),
        "{STUB} missing: scripts/setup installs systemd-boot-efi"
    );
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    fixtures(dir);
    let out = build_uki(
        dir,
        "initrd-key.img",
        CMDLINE,
        &[
            "--roothash",
            "roothash",
            "--key",
            "db.key",
            "--cert",
            "db.crt",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uki = dir.join("ltsp.efi");
    let stub = sections(Path::new(STUB));
    let all = sections(&uki);
    let align = section_alignment(STUB);
    // The stub's sections are untouched, ours follow its last one, in order, aligned,
    // without overlap, holding exactly the input files.
    assert_eq!(&all[..stub.len()], &stub[..]);
    let stub_end = stub.iter().map(|s| s.2 + s.1).max().unwrap();
    let ours = &all[stub.len()..];
    let names: Vec<&str> = ours.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, [".osrel", ".cmdline", ".initrd", ".linux"]);
    let mut end = stub_end;
    for (name, size, vma, _) in ours {
        assert_eq!(vma % align, 0, "{name} at {vma:#x}, alignment {align:#x}");
        assert!(
            *vma >= end,
            "{name} at {vma:#x} overlaps what ends at {end:#x}"
        );
        end = vma + size;
    }
    let bytes = std::fs::read(&uki).unwrap();
    let body = |name: &str| {
        let s = ours.iter().find(|s| s.0 == name).unwrap();
        bytes[s.3 as usize..(s.3 + s.1) as usize].to_vec()
    };
    assert_eq!(
        String::from_utf8(body(".cmdline")).unwrap(),
        format!("{CMDLINE} ltsp.verity={HASH}")
    );
    assert_eq!(body(".linux"), std::fs::read(dir.join("vmlinuz")).unwrap());
    assert_eq!(
        body(".initrd"),
        std::fs::read(dir.join("initrd-key.img")).unwrap()
    );
    // Signed: sbverify accepts it with the site's certificate, not with another one, and
    // not once one byte of the command line has changed.
    let verify = |cert: &str, file: &Path| {
        Command::new("sbverify")
            .args(["--cert", cert])
            .arg(file)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(verify(&dir.join("db.crt").to_string_lossy(), &uki));
    assert!(!verify(&dir.join("other.crt").to_string_lossy(), &uki));
    let cmd = ours.iter().find(|s| s.0 == ".cmdline").unwrap();
    let mut tampered = bytes.clone();
    tampered[cmd.3 as usize + 8] ^= 1;
    std::fs::write(dir.join("tampered.efi"), tampered).unwrap();
    assert!(!verify(
        &dir.join("db.crt").to_string_lossy(),
        &dir.join("tampered.efi")
    ));
}

#[test]
fn command_lines_and_initramfs_that_leave_a_hole_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    fixtures(dir);
    let refused = |initrd: &str, cmdline: &str, extra: &[&str], why: &str| {
        let out = build_uki(dir, initrd, cmdline, extra);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{cmdline:?} {extra:?} was accepted");
        assert!(err.contains(why), "{err}");
        assert!(!dir.join("ltsp.efi").exists());
    };
    // The root server from DHCP, or none: a forged DHCP answer would choose it.
    refused(
        "initrd-key.img",
        "root=/dev/nbd0 nbdroot=:root",
        &[],
        ":EXPORT takes it from DHCP",
    );
    refused("initrd-key.img", "root=/dev/nbd0", &[], "no nbdroot=");
    for bad in [
        "nbdroot=dhcp",
        "nbdroot=/root",
        "nbdroot=nbd:,root",
        "nbdroot=192.0.2.1/root nbdroot=:root",
    ] {
        refused(
            "initrd-key.img",
            &format!("root=/dev/nbd0 {bad}"),
            &[],
            "name it",
        );
    }
    // What follows `--` goes to init, past every check.
    refused(
        "initrd-key.img",
        &format!("{CMDLINE} -- init=/bin/sh"),
        &[],
        "goes to init",
    );
    // No lts.conf key: a forged lts.conf would run as root.
    refused("initrd-nokey.img", CMDLINE, &[], "etc/ltsp/trust.pub");
    // Two root hashes, or a root hash file that is not one.
    refused(
        "initrd-key.img",
        &format!("{CMDLINE} ltsp.verity={HASH}"),
        &["--roothash", "roothash"],
        "choose one",
    );
    refused(
        "initrd-key.img",
        CMDLINE,
        &["--roothash", "vmlinuz"],
        "not a root hash",
    );
    refused(
        "initrd-key.img",
        CMDLINE,
        &["--key", "db.key"],
        "--key and --cert go together",
    );
    // A systemd-stub that appends SMBIOS kernel-cmdline-extra to the signed command line
    // (254 and later), unless the site says it trusts its machines' SMBIOS.
    sh(
        &format!(
            "cp {STUB} new.stub && printf '#### LoaderInfo: systemd-stub 257.9-1~deb13u1 ####' >magic \
             && objcopy --update-section .sdmagic=magic new.stub"
        ),
        dir,
    );
    refused(
        "initrd-key.img",
        CMDLINE,
        &["--stub", "new.stub"],
        "appends SMBIOS io.systemd.stub.kernel-cmdline-extra",
    );
    let out = build_uki(
        dir,
        "initrd-key.img",
        CMDLINE,
        &["--stub", "new.stub", "--allow-smbios-cmdline"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(dir.join("ltsp.efi")).unwrap();
    // Accepted without a key when asked, with the warnings, and left unsigned.
    let out = build_uki(dir, "initrd-nokey.img", CMDLINE, &["--allow-no-trust-key"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no ltsp.verity="), "{err}");
    assert!(err.contains("UNSIGNED"), "{err}");
}
