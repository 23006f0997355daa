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
        t0.elapsed() < std::time::Duration::from_secs(60),
        "bounded by ltsp.timeout (loosely: a loaded machine must not fail it)"
    );
}

#[test]
#[ignore = "needs root: network namespaces"]
fn the_agent_gets_a_lease_from_ltsp_servers_own_dhcp_server() {
    let (_guard, srv, cli) = served_pair("dhcpd", "52:54:00:aa:bb:dd");
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let leases = state.path().join("dhcp-leases");
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
            "--dhcp-lease-file",
            leases.to_str().unwrap(),
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

/// ltsp-server as the DHCP server on `srv`'s veth0 with 10 s leases (the floor lowered),
/// its files in `dir`.
fn short_lease_server(srv: &str, dir: &std::path::Path) -> ltsp_tests::ServerProc {
    let conf = dir.join("server.toml");
    std::fs::write(
        &conf,
        "[dhcp_server]\nlease_time = 10\nmin_lease_time = 5\n",
    )
    .unwrap();
    let leases = dir.join("dhcp-leases");
    ltsp_tests::ServerProc::start_in(
        srv,
        &[
            "--config",
            conf.to_str().unwrap(),
            "--tftp-root",
            dir.to_str().unwrap(),
            "--tftp-listen",
            "192.0.2.1:69",
            "--no-nbd",
            "--dhcp-server",
            "veth0",
            "--dhcp-range",
            "192.0.2.70-192.0.2.71",
            "--dhcp-lease-file",
            leases.to_str().unwrap(),
        ],
    )
}

/// The lease keeper on `cli`'s eth7 for `addr`, as the boot starts it: /run/ltsp (here
/// `run_dir`) handed over by descriptor. Its log lines arrive on the receiver.
fn spawn_keeper(
    cli: &str,
    mac: &str,
    addr: &str,
    run_dir: &std::path::Path,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(run_dir).unwrap();
    let dir = std::fs::File::open(run_dir).unwrap();
    let fd = dir.as_raw_fd();
    let boottime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).unwrap();
    let obtained_ms = boottime.tv_sec() as u64 * 1000 + boottime.tv_nsec() as u64 / 1_000_000;
    let mut cmd = Command::new(tool("ip"));
    cmd.args(["netns", "exec", cli])
        .arg(bin("ltsp-agent"))
        .args([
            "lease-keep",
            "--iface=eth7",
            &format!("--mac={mac}"),
            &format!("--ip={addr}"),
            "--server=192.0.2.1",
            "--lease-secs=10",
            &format!("--obtained-ms={obtained_ms}"),
            &format!("--run-fd={fd}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only fcntl(2) between fork and exec, on a descriptor this process owns.
    unsafe {
        cmd.pre_exec(move || {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map(drop)
            .map_err(std::io::Error::from)
        });
    }
    let mut keeper = cmd.spawn().unwrap();
    drop(dir);
    let (tx, rx) = std::sync::mpsc::channel();
    let err = keeper.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (keeper, rx)
}

/// Collects the keeper's lines until `n` of them contain `what`; false if `bound` passed
/// first (only a broken run waits that long).
fn wait_lines(
    rx: &std::sync::mpsc::Receiver<String>,
    log: &mut Vec<String>,
    what: &str,
    n: usize,
    bound: std::time::Duration,
) -> bool {
    let until = std::time::Instant::now() + bound;
    let mut seen = log.iter().filter(|l| l.contains(what)).count();
    while seen < n {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen += line.contains(what) as usize;
                log.push(line);
            }
            Err(_) => return false,
        }
    }
    true
}

fn lease_file(run_dir: &std::path::Path) -> String {
    std::fs::read_to_string(run_dir.join("lease")).unwrap_or_default()
}

fn address_is_permanent(cli: &str, addr: &str) -> Result<(), String> {
    let (_, show, _) = run(Command::new(tool("ip")).args(["-n", cli, "addr", "show", "eth7"]));
    if show.contains(&format!("inet {addr}/24")) && show.contains("valid_lft forever") {
        Ok(())
    } else {
        Err(show)
    }
}

/// The boot's lease keeper (`ltsp-agent lease-keep`) against ltsp-server's own DHCP
/// server with 10 s leases: it renews from the address it holds, at T1, again and again,
/// the server ACKs each renewal, the address stays permanent in the kernel, and
/// /run/ltsp/lease says so.
#[test]
#[ignore = "needs root: network namespaces"]
fn the_lease_keeper_renews_with_ltsp_servers_dhcp_server() {
    let mac = "52:54:00:aa:bb:de";
    let (_guard, srv, cli) = served_pair("lkeep", mac);
    let d = tempfile::tempdir().unwrap();
    let s = short_lease_server(&srv, d.path());
    let (ok, out, err) = agent_net(&cli, "BOOTIF=01-52-54-00-aa-bb-de ltsp.timeout=20");
    assert!(ok, "{err}\n{out}\n{}", s.log());
    assert!(out.contains("DHCPLEASETIME='10'\n"), "{out}");
    let addr = "192.0.2.70";
    assert!(out.contains(&format!("IPV4ADDR='{addr}'\n")), "{out}");
    let run_dir = d.path().join("run-ltsp");
    let (mut keeper, rx) = spawn_keeper(&cli, mac, addr, &run_dir);
    let mut log = Vec::new();
    // Three renewals take about 20 s (T1 = 5 s).
    let renewed = wait_lines(
        &rx,
        &mut log,
        "lease: eth7: renewed 192.0.2.70 with 192.0.2.1 for 10 s",
        3,
        std::time::Duration::from_secs(90),
    );
    let state = lease_file(&run_dir);
    let _ = keeper.kill();
    let _ = keeper.wait();
    let log = log.join("\n");
    assert!(renewed, "not 3 renewals:\n{log}\n{}", s.log());
    // The server saw REQUESTs from the node's address and ACKed them: one for the
    // boot, one per renewal.
    let acks = s
        .log()
        .matches(&format!("dhcp-server: {mac}: Ack {addr}"))
        .count();
    assert!(acks >= 4, "{acks} ACKs:\n{}", s.log());
    assert!(!log.contains("ERROR"), "{log}");
    for want in [
        "ADDRESS=192.0.2.70\n",
        "SERVER=192.0.2.1\n",
        "LEASE_SECS=10\n",
        "EXPIRES_EPOCH=",
    ] {
        assert!(state.contains(want), "{want} in\n{state}");
    }
    assert!(!state.contains("RENEWALS=0\n"), "{state}");
    address_is_permanent(&cli, addr).unwrap();
    // The server's lease file has the node.
    let saved = std::fs::read_to_string(d.path().join("dhcp-leases")).unwrap();
    assert!(saved.contains(&format!("{mac} {addr} ")), "{saved}");
}

/// With the server gone, the lease runs out: the keeper says so at error level, the
/// address stays, /run/ltsp/lease says `expired`. The server back (its leases read from
/// its file), the keeper's next REQUEST gets the lease again.
#[test]
#[ignore = "needs root: network namespaces"]
fn a_lost_lease_is_reported_the_address_kept_and_the_lease_regained() {
    let mac = "52:54:00:aa:bb:df";
    let (_guard, srv, cli) = served_pair("llost", mac);
    let d = tempfile::tempdir().unwrap();
    let s = short_lease_server(&srv, d.path());
    let (ok, out, err) = agent_net(&cli, "BOOTIF=01-52-54-00-aa-bb-df ltsp.timeout=20");
    assert!(ok, "{err}\n{out}\n{}", s.log());
    let addr = "192.0.2.70";
    assert!(out.contains(&format!("IPV4ADDR='{addr}'\n")), "{out}");
    assert!(s.terminate(), "ltsp-server stops on SIGTERM");
    let run_dir = d.path().join("run-ltsp");
    let (mut keeper, rx) = spawn_keeper(&cli, mac, addr, &run_dir);
    let mut log = Vec::new();
    let lost = wait_lines(
        &rx,
        &mut log,
        "ERROR lease: eth7: the DHCP lease of 192.0.2.70 has expired",
        1,
        std::time::Duration::from_secs(60),
    );
    let expired = lease_file(&run_dir);
    let kept = address_is_permanent(&cli, addr);
    let s = short_lease_server(&srv, d.path());
    // Asked again once a minute after the end.
    let regained = lost
        && wait_lines(
            &rx,
            &mut log,
            "leased again by 192.0.2.1 after it had expired",
            1,
            std::time::Duration::from_secs(120),
        );
    let state = lease_file(&run_dir);
    let _ = keeper.kill();
    let _ = keeper.wait();
    let log = log.join("\n");
    assert!(lost, "no error for the lost lease:\n{log}");
    assert!(expired.contains("STATE=expired\n"), "{expired}");
    kept.unwrap();
    assert!(regained, "not leased again:\n{log}\n{}", s.log());
    assert!(s.log().contains("leases taken back from"), "{}", s.log());
    assert!(state.contains("STATE=bound\n"), "{state}");
    address_is_permanent(&cli, addr).unwrap();
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
