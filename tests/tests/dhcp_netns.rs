//! The agent's DHCP client against dnsmasq, across a veth pair between two network
//! namespaces the test creates (192.0.2.0/24, the documentation range). Needs root.

use ltsp_tests::{bin, ip, run, tool, veth_pair, Netns};
use std::process::{Command, Stdio};

/// The client side is `eth7`, left down for the agent to bring up.
fn pair(tag: &str) -> (Netns, String, String) {
    veth_pair(tag, "eth7")
}

/// A pair with the server side at 192.0.2.1/24 and the client NIC given `mac`.
fn served_pair(tag: &str, mac: &str) -> (Netns, String, String) {
    let (guard, srv, cli) = pair(tag);
    ip(&["-n", &srv, "addr", "add", "192.0.2.1/24", "dev", "veth0"]);
    ip(&["-n", &cli, "link", "set", "eth7", "address", mac]);
    (guard, srv, cli)
}

#[test]
#[ignore = "needs root: network namespaces"]
fn dhcp_against_dnsmasq_gives_a_permanent_address() {
    let (_guard, srv, cli) = served_pair("dhcp", "52:54:00:aa:bb:cc");
    let d = tempfile::tempdir().unwrap();
    let mut dns = Command::new(tool("ip"))
        .args([
            "netns",
            "exec",
            &srv,
            "dnsmasq",
            "-k",
            "--conf-file=/dev/null",
            "--port=0",
            "--interface=veth0",
            "--bind-interfaces",
        ])
        .args([
            "--dhcp-range=192.0.2.50,192.0.2.60,255.255.255.0,1h",
            "--dhcp-option=option:router,192.0.2.1",
            "--dhcp-option=option:dns-server,192.0.2.53",
        ])
        .args([
            "--dhcp-host=52:54:00:aa:bb:cc,node-aa",
            "--no-ping",
            "--user=root",
        ])
        .arg(format!(
            "--dhcp-leasefile={}",
            d.path().join("leases").display()
        ))
        .arg(format!("--pid-file={}", d.path().join("pid").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (ok, out, err) = run(Command::new(tool("ip"))
        .args(["netns", "exec", &cli])
        .arg(bin("ltsp-agent"))
        .args([
            "net",
            "--cmdline",
            "BOOTIF=01-52-54-00-aa-bb-cc ltsp.timeout=20",
        ]));
    let _ = dns.kill();
    let _ = dns.wait();
    assert!(ok, "{err}\n{out}");
    assert!(out.contains("DEVICE='eth7'\n"), "{out}");
    assert!(out.contains("PROTO='dhcp'\n"));
    let addr = out
        .lines()
        .find_map(|l| l.strip_prefix("IPV4ADDR='"))
        .unwrap()
        .trim_end_matches('\'');
    let last: u8 = addr.rsplit('.').next().unwrap().parse().unwrap();
    assert!(
        addr.starts_with("192.0.2.") && (50..=60).contains(&last),
        "{addr}"
    );
    assert!(out.contains("IPV4GATEWAY='192.0.2.1'\n") && out.contains("IPV4DNS0='192.0.2.53'\n"));
    assert!(out.contains("HOSTNAME='node-aa'\n"), "{out}");
    assert!(out.contains("ROOTSERVER='192.0.2.1'\n") || out.contains("ROOTSERVER='0.0.0.0'\n"));
    // The root lives on this address: it must never expire.
    let (_, show, _) = run(Command::new(tool("ip")).args(["-n", &cli, "addr", "show", "eth7"]));
    assert!(show.contains(&format!("inet {addr}/24")), "{show}");
    assert!(
        show.contains("valid_lft forever preferred_lft forever"),
        "{show}"
    );
    let (_, routes, _) = run(Command::new(tool("ip")).args(["-n", &cli, "route"]));
    assert!(
        routes.contains("default via 192.0.2.1 dev eth7"),
        "{routes}"
    );
}

#[test]
#[ignore = "needs root: network namespaces"]
fn no_dhcp_server_fails_with_a_clear_message_within_the_deadline() {
    let (_guard, _srv, cli) = pair("nodhcp");
    let t0 = std::time::Instant::now();
    let (ok, _, err) = run(Command::new(tool("ip"))
        .args(["netns", "exec", &cli])
        .arg(bin("ltsp-agent"))
        .args(["net", "--cmdline", "ltsp.timeout=3"]));
    assert!(!ok);
    assert!(err.contains("no DHCP answer on eth7"), "{err}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(8),
        "bounded by ltsp.timeout"
    );
}

#[test]
#[ignore = "needs root: network namespaces"]
fn the_agent_gets_a_lease_from_ltsp_servers_own_dhcp_server() {
    let (_guard, srv, cli) = served_pair("dhcpd", "52:54:00:aa:bb:dd");
    let root = tempfile::tempdir().unwrap();
    let s = ltsp_tests::ServerProc::start_in(
        &srv,
        &[
            "--tftp-root",
            root.path().to_str().unwrap(),
            "--tftp-listen",
            "192.0.2.1:69",
            "--no-nbd",
            "--dhcp-server",
            "veth0",
            "--dhcp-range",
            "192.0.2.70-192.0.2.71",
        ],
    );
    assert!(
        s.log_has("dhcp-server: leasing 192.0.2.70-192.0.2.71 on veth0 as 192.0.2.1/255.255.255.0")
    );
    let (ok, out, err) = run(Command::new(tool("ip"))
        .args(["netns", "exec", &cli])
        .arg(bin("ltsp-agent"))
        .args([
            "net",
            "--cmdline",
            "BOOTIF=01-52-54-00-aa-bb-dd ltsp.timeout=20",
        ]));
    assert!(ok, "{err}\n{out}\n{}", s.log());
    assert!(out.contains("IPV4ADDR='192.0.2.70'\n"), "{out}");
    assert!(
        out.contains("IPV4NETMASK='255.255.255.0'\n") || out.contains("/24"),
        "{out}"
    );
    // The server logged the offer and the ack; the agent is no PXE client: no boot file.
    assert!(
        s.log_has("dhcp-server: 52:54:00:aa:bb:dd: Ack 192.0.2.70"),
        "{}",
        s.log()
    );
}
