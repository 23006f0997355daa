//! Every command a user runs answers --help with what it does and its options.

use ltsp_tests::{bin, run, workspace_root};
use std::process::Command;

fn help(cmd: &mut Command, what: &str, must: &[&str]) {
    let (ok, out, err) = run(cmd.arg("--help"));
    assert!(ok, "{what} --help failed: {err}");
    let text = format!("{out}{err}");
    assert!(text.len() > 80, "{what} --help says too little: {text}");
    for m in must {
        assert!(
            text.contains(m),
            "{what} --help does not mention {m:?}:\n{text}"
        );
    }
}

#[test]
fn binaries_and_their_subcommands() {
    help(
        &mut Command::new(bin("ltsp-agent")),
        "ltsp-agent",
        &[
            "config",
            "apply",
            "boot",
            "net",
            "options",
            "nbd-watch",
            "verify",
        ],
    );
    for (sub, opt) in [
        ("config", "--lts-conf"),
        ("apply", "--root"),
        ("boot", "--root"),
        ("net", "--cmdline"),
        ("nbd-watch", "--target"),
        ("verify", "--key"),
    ] {
        help(
            Command::new(bin("ltsp-agent")).arg(sub),
            &format!("ltsp-agent {sub}"),
            &[opt],
        );
    }
    help(
        &mut Command::new(bin("ltsp-server")),
        "ltsp-server",
        &["serve", "check", "ipxe", "status"],
    );
    for (sub, opt) in [
        ("serve", "--nbd-max-connections-per-client"),
        ("check", "--config"),
        ("ipxe", "--boot-cmdline"),
        ("status", "--server"),
    ] {
        help(
            Command::new(bin("ltsp-server")).arg(sub),
            &format!("ltsp-server {sub}"),
            &[opt],
        );
    }
}

#[test]
fn scripts() {
    let root = workspace_root();
    for (path, must) in [
        ("mkinitramfs-hook/ltsp-mkinitramfs", "--kernel-root"),
        ("deploy/build-image", "--customize"),
        ("deploy/build-image", "--suite"),
        ("scripts/package", "cargo-deb"),
        ("scripts/setup", "Installs"),
        ("qemu/boot", "--flavour"),
        ("qemu/boot", "--suite"),
        ("qemu/fault", "server-restart"),
        ("qemu/fault", "tamper-uki"),
        ("qemu/boot", "--secure-boot"),
        ("deploy/build-uki", "--roothash"),
    ] {
        help(&mut Command::new(root.join(path)), path, &[must]);
    }
}
