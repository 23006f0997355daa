//! The Debian packages (scripts/package, cargo-deb): what they carry and that what they
//! carry works. The agent package is also installed with dpkg into the QEMU test image
//! (qemu/prepare), whose boot tests check it is there.

use ltsp_tests::{run, workspace_root};
use std::process::Command;

fn packages() -> (String, String) {
    let (ok, out, err) = run(&mut Command::new(workspace_root().join("scripts/package")));
    assert!(ok, "scripts/package failed: {err}");
    let mut agent = None;
    let mut server = None;
    for p in out.lines() {
        let full = workspace_root().join(p).display().to_string();
        if p.contains("ltsp-agent_") {
            agent = Some(full);
        } else if p.contains("ltsp-server_") {
            server = Some(full);
        }
    }
    (agent.expect("agent .deb"), server.expect("server .deb"))
}

fn deb(args: &[&str]) -> String {
    let (ok, out, err) = run(Command::new("dpkg-deb").args(args));
    assert!(ok, "dpkg-deb {args:?}: {err}");
    out
}

#[test]
fn agent_and_server_packages() {
    let (agent, server) = packages();
    // The agent: a static binary, the initramfs-tools hook and boot script.
    assert_eq!(deb(&["-f", &agent, "Package"]).trim(), "ltsp-agent");
    assert!(deb(&["-f", &agent, "Depends"]).contains("initramfs-tools"));
    let files = deb(&["-c", &agent]);
    for f in [
        "./usr/sbin/ltsp-agent",
        "./usr/sbin/ltsp-mkinitramfs",
        "./usr/share/initramfs-tools/hooks/ltsp",
        "./usr/share/initramfs-tools/scripts/ltsp",
        "./usr/share/ltsp-agent/nic-drivers",
    ] {
        assert!(files.contains(f), "{f} not in the agent package:\n{files}");
    }
    let dir = tempfile::tempdir().unwrap();
    deb(&["-x", &agent, dir.path().to_str().unwrap()]);
    let bin = dir.path().join("usr/sbin/ltsp-agent");
    let (_, kind, _) = run(Command::new("file").arg(&bin));
    assert!(kind.contains("static"), "{kind}");
    let (ok, opts, _) = run(Command::new(&bin).arg("options"));
    assert!(ok && opts.contains("ltsp.reconnect="));

    // The server: binary, unit (not enabled by the package), commented configuration.
    assert_eq!(deb(&["-f", &server, "Package"]).trim(), "ltsp-server");
    let files = deb(&["-c", &server]);
    for f in [
        "./usr/sbin/ltsp-server",
        "./usr/lib/systemd/system/ltsp-server.service",
        "./etc/ltsp/server.toml",
    ] {
        assert!(files.contains(f), "{f} not in the server package:\n{files}");
    }
    let ctl = tempfile::tempdir().unwrap();
    deb(&["-e", &server, ctl.path().to_str().unwrap()]);
    let conffiles = std::fs::read_to_string(ctl.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/ltsp/server.toml");
    let x = tempfile::tempdir().unwrap();
    deb(&["-x", &server, x.path().to_str().unwrap()]);
    let unit = std::fs::read_to_string(x.path().join("usr/lib/systemd/system/ltsp-server.service"))
        .unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/ltsp-server serve --config /etc/ltsp/server.toml"));
    // ProtectSystem=strict, yet the DHCP lease file's directory is writable.
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("StateDirectory=ltsp\n"));
    // The packaged configuration is read and checked: here its paths do not exist
    let (ok, _, err) = run(Command::new(x.path().join("usr/sbin/ltsp-server"))
        .args(["check", "--config"])
        .arg(x.path().join("etc/ltsp/server.toml")));
    // (/srv/tftp exists where tftpd-hpa is installed; the image then is what is missing.)
    assert!(
        !ok && (err.contains("/srv/tftp") || err.contains("/srv/ltsp/root.squashfs")),
        "{err}"
    );
}
