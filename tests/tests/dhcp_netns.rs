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
    let (ok, out, err) = agent_net(&cli, "BOOTIF=01-52-54-00-aa-bb-cc ltsp.timeout=20");
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
    let (ok, out, err) = agent_net(&cli, "BOOTIF=01-52-54-00-aa-bb-dd ltsp.timeout=20");
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

/// A DHCP server that answers every DISCOVER and REQUEST with hostile replies first
/// (addresses no host can have, a hole-y mask, hlen 200, another transaction, a NAK from
/// a server the client did not choose) and only then a good one. Runs in namespace `ns`
/// until `stop`; returns how many of each message it answered.
fn hostile_server(
    ns: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, u32)> {
    use nix::sys::socket::{setsockopt, sockopt};
    use std::net::UdpSocket;
    let netns = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // Only this thread enters the namespace.
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let sock = UdpSocket::bind("0.0.0.0:67").unwrap();
        setsockopt(&sock, sockopt::BindToDevice, &"veth0".into()).unwrap();
        sock.set_broadcast(true).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let to = "255.255.255.255:68";
        let server_id = [192, 0, 2, 1];
        let (mut discovers, mut requests) = (0, 0);
        let mut buf = [0u8; 1500];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok(n) = sock.recv(&mut buf) else {
                continue;
            };
            let req = &buf[..n];
            if n < 240 {
                continue;
            }
            let good_opts = |kind: u8| -> Vec<u8> {
                let mut o = vec![53, 1, kind, 54, 4];
                o.extend_from_slice(&server_id);
                o.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
                // A multicast router first, then the real one.
                o.extend_from_slice(&[3, 8, 224, 0, 0, 9, 192, 0, 2, 1]);
                o.extend_from_slice(&[6, 8, 0, 0, 0, 0, 192, 0, 2, 53]);
                let name = b"evil'$(reboot)'";
                o.extend_from_slice(&[12, name.len() as u8]);
                o.extend_from_slice(name);
                o.push(255);
                o
            };
            match message_type(req) {
                Some(1) => {
                    discovers += 1;
                    let mut bad_mask = good_opts(2);
                    bad_mask.splice(11..15, [0, 0, 0, 0]);
                    let mut other_xid = dhcp_reply(req, [192, 0, 2, 82], &good_opts(2));
                    other_xid[4] ^= 0xff;
                    let mut hlen = dhcp_reply(req, [192, 0, 2, 83], &good_opts(2));
                    hlen[2] = 200;
                    for r in [
                        dhcp_reply(req, [255, 255, 255, 255], &good_opts(2)),
                        dhcp_reply(req, [224, 0, 0, 1], &good_opts(2)),
                        dhcp_reply(req, [192, 0, 2, 81], &bad_mask),
                        hlen,
                        other_xid,
                        dhcp_reply(req, [192, 0, 2, 80], &good_opts(2)),
                    ] {
                        sock.send_to(&r, to).unwrap();
                    }
                }
                Some(3) => {
                    requests += 1;
                    let nak = [53, 1, 6, 54, 4, 192, 0, 2, 99, 255];
                    let mut holey = good_opts(5);
                    holey.splice(11..15, [255, 0, 255, 0]);
                    for r in [
                        dhcp_reply(req, [0, 0, 0, 0], &nak),
                        dhcp_reply(req, [192, 0, 2, 80], &holey),
                        dhcp_reply(req, [192, 0, 2, 80], &good_opts(5)),
                    ] {
                        sock.send_to(&r, to).unwrap();
                    }
                }
                _ => {}
            }
        }
        (discovers, requests)
    })
}

/// Option 53 of a BOOTP/DHCP datagram.
fn message_type(p: &[u8]) -> Option<u8> {
    let mut i = 240;
    while i + 1 < p.len() {
        match p[i] {
            0 => i += 1,
            255 => return None,
            53 if p[i + 1] == 1 => return p.get(i + 2).copied(),
            _ => i += 2 + p[i + 1] as usize,
        }
    }
    None
}

/// A BOOTREPLY to `req` offering `yiaddr`, with raw options `opts`.
fn dhcp_reply(req: &[u8], yiaddr: [u8; 4], opts: &[u8]) -> Vec<u8> {
    let mut r = req[..240].to_vec();
    r[0] = 2;
    r[16..20].copy_from_slice(&yiaddr);
    r.extend_from_slice(opts);
    r
}

#[test]
#[ignore = "needs root: network namespaces"]
fn hostile_replies_are_ignored_and_the_good_one_is_taken() {
    let (_guard, srv, cli) = served_pair("hostile", "52:54:00:aa:bb:ee");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = hostile_server(&srv, stop.clone());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (ok, out, err) = agent_net(&cli, "BOOTIF=01-52-54-00-aa-bb-ee ltsp.timeout=20");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (discovers, requests) = server.join().unwrap();
    assert!(ok, "{err}\n{out}");
    assert!(discovers >= 1 && requests >= 1, "{discovers} {requests}");
    assert!(out.contains("IPV4ADDR='192.0.2.80'\n"), "{out}");
    assert!(out.contains("IPV4NETMASK='255.255.255.0'\n"), "{out}");
    assert!(out.contains("IPV4GATEWAY='192.0.2.1'\n"), "{out}");
    assert!(out.contains("IPV4DNS0='192.0.2.53'\n"), "{out}");
    assert!(
        out.contains("HOSTNAME=''\n"),
        "no quote reaches the file: {out}"
    );
    assert!(err.contains("ignored a reply"), "{err}");
    let (_, show, _) = run(Command::new(tool("ip")).args(["-n", &cli, "addr", "show", "eth7"]));
    assert!(show.contains("inet 192.0.2.80/24"), "{show}");
}

/// `ltsp-agent net --cmdline CMDLINE` in the client namespace: (ok, stdout, stderr).
fn agent_net(cli: &str, cmdline: &str) -> (bool, String, String) {
    run(Command::new(tool("ip"))
        .args(["netns", "exec", cli])
        .arg(bin("ltsp-agent"))
        .args(["net", "--cmdline", cmdline]))
}
