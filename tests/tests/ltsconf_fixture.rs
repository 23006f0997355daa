//! A Kubernetes worker's lts.conf (tests/fixtures/k8s-worker.lts.conf, the shapes a real
//! cluster's file has) through `ltsp-agent config` and `apply`, as an operator runs them:
//! it must resolve and apply as its author meant.

use ltsp_tests::{bin, run, workspace_root};
use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    workspace_root().join("tests/fixtures/k8s-worker.lts.conf")
}

#[test]
fn config_prints_the_fixture_like_getltscfg() {
    let (ok, out, err) = run(Command::new(bin("ltsp-agent"))
        .args([
            "config",
            "--mac",
            "52:54:00:12:34:56",
            "--ip",
            "10.9.0.31",
            "--lts-conf",
        ])
        .arg(fixture()));
    assert!(ok, "{err}");
    assert!(err.is_empty(), "no problems expected: {err}");
    let keys: Vec<&str> = out.lines().map(|l| l.split('=').next().unwrap()).collect();
    assert_eq!(
        keys,
        vec![
            "FSTAB_01_KUBELET",
            "FSTAB_02_CONTAINERD",
            "FSTAB_03_LOGS",
            "KEEP_SYSTEM_SERVICES",
            "PREINIT_00_ZONE",
            "PREINIT_01_HOSTS",
            "PREINIT_02_CONTAINERD",
            "RCFILE_01_HOST_KEYS",
            "RCFILE_02_ADMIN_KEY",
            "RCFILE_03_WATCHDOG",
            "RCFILE_04_LIMITS",
            "RCFILE_05_BRIDGE",
            "RCFILE_06_FORWARD",
            "RCFILE_07_JOIN",
        ]
    );
    assert!(out.contains("RCFILE_06_FORWARD=\"echo 1 > /proc/sys/net/ipv4/ip_forward\"\n"));
    assert!(out.contains(
        "KEEP_SYSTEM_SERVICES=\"ssh dbus-org.freedesktop.login1 systemd-logind chrony\"\n"
    ));
    // The output is what getltscfg -a gave: sh can eval it and get the values back.
    let script = format!("{out}\nprintf '%s' \"$PREINIT_02_CONTAINERD\"");
    let (ok, v, _) = run(Command::new("sh").arg("-c").arg(script));
    assert!(ok);
    assert_eq!(
        v,
        "sed -i 's|^ExecStart=.*|ExecStart=/usr/bin/containerd --config /etc/containerd/config.toml --log-level warn|' /etc/systemd/system/containerd.service"
    );
}

#[test]
fn a_mac_section_overrides_the_default() {
    let (ok, out, err) = run(Command::new(bin("ltsp-agent"))
        .args(["config", "--mac", "52:54:00:00:00:42", "--lts-conf"])
        .arg(fixture()));
    assert!(ok, "{err}");
    assert!(out.contains("HOSTNAME=\"gpu-worker\"\n"), "{out}");
    assert!(
        out.contains("KEEP_SYSTEM_SERVICES=\"ssh dbus-org.freedesktop.login1 systemd-logind chrony nvidia-persistenced\"\n"),
        "{out}"
    );
    assert!(
        out.contains("RCFILE_07_JOIN=\"kubeadm join 192.0.2.50:6443 "),
        "{out}"
    );
}

#[test]
fn apply_writes_what_the_author_meant() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("lib/systemd/system")).unwrap();
    for u in ["ssh.service", "apt-daily.timer", "networking.service"] {
        std::fs::write(root.path().join("lib/systemd/system").join(u), "[Unit]\n").unwrap();
    }
    let (ok, out, err) = run(Command::new(bin("ltsp-agent"))
        .args([
            "apply",
            "--mac",
            "52:54:00:12:34:56",
            "--ip",
            "10.9.0.31",
            "--iface",
            "eno1",
            "--server",
            "10.9.0.15",
            "--root",
        ])
        .arg(root.path())
        .arg("--lts-conf")
        .arg(fixture()));
    assert!(ok, "{err}");
    let fstab = std::fs::read_to_string(root.path().join("etc/fstab")).unwrap();
    let lines: Vec<&str> = fstab.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines[0].starts_with("/dev/node/kubelet ")
            && lines[1].starts_with("/dev/node/containerd ")
            && lines[2].starts_with("/dev/node/logs ")
    );
    assert!(lines.iter().all(|l| l.contains("nofail")));
    let rc = std::fs::read_to_string(root.path().join("etc/rc.local")).unwrap();
    assert!(rc.starts_with("#!/bin/sh\n"));
    let order = [
        "cp /rofs/etc/ssh/sshd_config /etc/ssh; ssh-keygen -A",
        "install -d -m 700 /root/.ssh",
        "sysctl -w kernel.panic=10",
        "sysctl -w fs.inotify.max_user_watches",
        "modprobe br_netfilter overlay",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
        "kubeadm join 192.0.2.50:6443 --token",
    ];
    let pos: Vec<usize> = order
        .iter()
        .map(|s| rc.find(s).unwrap_or_else(|| panic!("{s} not in rc.local")))
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "RCFILE_01..07 out of order: {pos:?}"
    );
    assert!(rc
        .trim_end()
        .ends_with("sha256:0000000000000000000000000000000000000000000000000000000000000000"));
    // PREINIT in order, for the boot to run.
    let pre: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("preinit (run at boot): "))
        .collect();
    assert_eq!(pre.len(), 3);
    assert!(
        pre[0].starts_with("ln -sf /usr/share/zoneinfo/Europe/Berlin")
            && pre[1].starts_with("sed -i '/^127.0.1.1/d'")
            && pre[2].contains("/usr/bin/containerd")
    );
    // KEEP_SYSTEM_SERVICES keeps ssh; the NIC-reconfiguring ifupdown unit is masked.
    assert!(!root.path().join("etc/systemd/system/ssh.service").exists());
    assert_eq!(
        std::fs::read_link(root.path().join("etc/systemd/system/networking.service")).unwrap(),
        PathBuf::from("/dev/null")
    );
    let hosts = std::fs::read_to_string(root.path().join("etc/hosts")).unwrap();
    assert!(hosts.contains("10.9.0.31\tltsp31\n"), "{hosts}");
    assert!(!hosts
        .lines()
        .any(|l| l.starts_with("127.") && l.contains("ltsp31")));
}

#[test]
fn a_broken_file_is_a_clear_error_and_a_non_zero_exit() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("lts.conf");
    std::fs::write(&f, "KEY = before any section\n[default]\nOK = 1\nBROKEN LINE\nQ = \"unterminated\n[a]\nLIKE = b\n[b]\nLIKE = a\n").unwrap();
    let (ok, out, err) = run(Command::new(bin("ltsp-agent"))
        .args(["config", "--hostname", "a", "--lts-conf"])
        .arg(&f));
    assert!(!ok);
    let name = f.display().to_string();
    assert!(
        err.contains(&format!("{name}:1:1: \"KEY\" before any section")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{name}:4:1: expected 'KEY = value'")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{name}:5:5: a '\"' with no closing '\"' on the line is ignored"
        )),
        "{err}"
    );
    assert!(err.contains("LIKE cycle a -> b -> a"), "{err}");
    // What could be read is still shown.
    assert!(out.contains("OK=\"1\""));
    let (ok, _, err) =
        run(Command::new(bin("ltsp-agent")).args(["config", "--lts-conf", "/nonexistent"]));
    assert!(!ok && err.contains("/nonexistent: No such file"), "{err}");
}
