//! TFTP behind NAT, as behind a Kubernetes Service: the client talks to 192.0.2.1:69, and
//! iptables DNAT in the server's namespace sends it to ltsp-server on 198.51.100.2:1069
//! (the pod's address). Classic TFTP answers from a fresh port, which conntrack does not
//! translate back, so the client never hears it; single-port mode answers from the
//! listening port and goes through. Needs root (namespaces, iptables).

use ltsp_tests::{ip, pattern, run, tool, veth_pair, Netns, ServerProc};
use std::process::Command;

fn nat_bed(tag: &str) -> (Netns, String, String) {
    let (guard, srv, cli) = veth_pair(tag, "eth0");
    ip(&["-n", &srv, "addr", "add", "192.0.2.1/24", "dev", "veth0"]);
    ip(&["-n", &cli, "addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    // The "pod": an address of its own on the server host (on lo: no dummy module here).
    ip(&["-n", &srv, "addr", "add", "198.51.100.2/32", "dev", "lo"]);
    for (ns, dev) in [(&srv, "veth0"), (&srv, "lo"), (&cli, "eth0"), (&cli, "lo")] {
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    let (ok, _, err) = run(Command::new("ip").args([
        "netns",
        "exec",
        &srv,
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "192.0.2.1",
        "-p",
        "udp",
        "--dport",
        "69",
        "-j",
        "DNAT",
        "--to-destination",
        "198.51.100.2:1069",
    ]));
    assert!(ok, "iptables: {err}");
    (guard, srv, cli)
}

fn fetch(cli: &str, name: &str, dst: &std::path::Path) -> (bool, String) {
    let (ok, _, err) = run(Command::new("ip")
        .args(["netns", "exec", cli, tool("curl").to_str().unwrap()])
        .args(["-sS", "--max-time", "6", "--tftp-blksize", "1468", "-o"])
        .arg(dst)
        .arg(format!("tftp://192.0.2.1/{name}")));
    (ok, err)
}

#[test]
#[ignore = "needs root: network namespaces and iptables DNAT"]
fn single_port_mode_works_through_dnat_and_classic_mode_does_not() {
    let (_guard, srv, cli) = nat_bed("nat");
    let root = tempfile::tempdir().unwrap();
    let data = pattern(3 * 1024 * 1024 + 5, 7);
    std::fs::write(root.path().join("initrd"), &data).unwrap();
    let out = tempfile::tempdir().unwrap();
    let start = |single: bool| {
        let mut args = vec![
            "--tftp-root",
            root.path().to_str().unwrap(),
            "--tftp-listen",
            "198.51.100.2:1069",
            "--no-nbd",
        ];
        if single {
            args.push("--tftp-single-port");
        }
        ServerProc::start_in(&srv, &args)
    };

    let classic = start(false);
    let (ok, _) = fetch(&cli, "initrd", &out.path().join("classic"));
    assert!(
        !ok,
        "classic TFTP got through DNAT: conntrack translated a fresh port?"
    );
    drop(classic);

    let single = start(true);
    let dst = out.path().join("single");
    let (ok, err) = fetch(&cli, "initrd", &dst);
    assert!(ok, "single-port TFTP through DNAT: {err}\n{}", single.log());
    assert!(std::fs::read(&dst).unwrap() == data, "bytes differ");
}
