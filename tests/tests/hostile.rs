//! A hostile boot network against the release server (the shipped profile: optimised,
//! panic=abort, so a panic on any input kills the process). From 31 addresses in a network
//! namespace the test makes, `ltsp-flood` throws random and malformed datagrams at every UDP
//! port (DHCP 67, proxyDHCP 4011, TFTP 69), random bytes at every TCP port (NBD, HTTP), and
//! the protocol floods (NBD reads never taken, TFTP requests never ACKed, HTTP requests
//! half-sent or never read). During and after it, real clients (nbdcopy, tftp-hpa, curl)
//! must get the right bytes, the server must still run, and its peak RSS must stay within
//! the 64 MiB budget.

use ltsp_tests::{ip, pattern, run, tool, veth_pair, Netns, ServerProc};
use std::process::{Command, Stdio};

const SERVER: &str = "192.0.2.1";
/// The real client's own address; the flood comes from the others.
const CLIENT: &str = "192.0.2.9";
const FLOOD_FIRST: u8 = 10;
const FLOOD_LAST: u8 = 40;
const BUDGET_KIB: u64 = 64 * 1024;

struct Fixture {
    _ns: Netns,
    cli: String,
    server: ServerProc,
    dir: tempfile::TempDir,
    image: Vec<u8>,
    file: Vec<u8>,
}

/// `mode`: the DHCP side, `--proxy-dhcp veth0` or `--dhcp-server veth0`.
fn start(tag: &str, dhcp: &[&str]) -> Fixture {
    let (ns, srv, cli) = veth_pair(tag, "eth7");
    ip(&[
        "-n",
        &srv,
        "addr",
        "add",
        &format!("{SERVER}/24"),
        "dev",
        "veth0",
    ]);
    ip(&["-n", &srv, "link", "set", "lo", "up"]);
    ip(&["-n", &cli, "link", "set", "lo", "up"]);
    // The first address of the subnet is the primary one: real clients use it.
    ip(&[
        "-n",
        &cli,
        "addr",
        "add",
        &format!("{CLIENT}/24"),
        "dev",
        "eth7",
    ]);
    for i in FLOOD_FIRST..=FLOOD_LAST {
        ip(&[
            "-n",
            &cli,
            "addr",
            "add",
            &format!("192.0.2.{i}/24"),
            "dev",
            "eth7",
        ]);
    }
    ip(&["-n", &cli, "link", "set", "eth7", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let tftp = dir.path().join("tftp");
    std::fs::create_dir(&tftp).unwrap();
    let file = pattern(1 << 20, 7);
    std::fs::write(tftp.join("f"), &file).unwrap();
    let image = pattern(16 << 20, 11);
    let img = dir.path().join("root.img");
    std::fs::write(&img, &image).unwrap();
    let export = format!("root={}", img.display());
    let tftp_root = tftp.display().to_string();
    // The DHCP server mode's lease file stays in the test's directory.
    let leases = dir.path().join("dhcp-leases").display().to_string();
    let mut args = vec![
        "--dhcp-lease-file",
        &leases,
        "--tftp-root",
        &tftp_root,
        "--tftp-listen",
        "192.0.2.1:69",
        "--nbd-listen",
        "192.0.2.1:10809",
        "--export",
        &export,
        "--http-listen",
        "192.0.2.1:8080",
    ];
    args.extend_from_slice(dhcp);
    let server = ServerProc::start_release_in(&srv, &args);
    Fixture {
        _ns: ns,
        cli,
        server,
        dir,
        image,
        file,
    }
}

fn in_client(fx: &Fixture, prog: &str) -> Command {
    let mut c = Command::new(tool("ip"));
    c.args(["netns", "exec", &fx.cli]).arg(tool(prog));
    c
}

/// nbdcopy of the export, a TFTP fetch with tftp-hpa, and /healthz with curl: each must
/// give the right bytes. Returns what failed, for one assertion with every reason.
fn real_clients(fx: &Fixture, when: &str) -> Vec<String> {
    let mut failed = Vec::new();
    let copy = fx.dir.path().join(format!("copy-{when}"));
    let (ok, _, err) = run(in_client(fx, "nbdcopy")
        .args(["nbd://192.0.2.1/root"])
        .arg(&copy));
    if !ok || std::fs::read(&copy).ok().as_deref() != Some(&fx.image[..]) {
        failed.push(format!("{when}: nbdcopy: ok={ok} {err}"));
    }
    let got = fx.dir.path().join(format!("tftp-{when}"));
    let (ok, _, err) = run(in_client(fx, "tftp")
        .args([SERVER, "-m", "binary", "-c", "get", "f"])
        .arg(&got));
    if !ok || std::fs::read(&got).ok().as_deref() != Some(&fx.file[..]) {
        failed.push(format!("{when}: tftp-hpa get: ok={ok} {err}"));
    }
    let (ok, out, err) = run(in_client(fx, "curl").args([
        "-sS",
        "--max-time",
        "20",
        "http://192.0.2.1:8080/healthz",
    ]));
    if !ok || !out.contains("ok") {
        failed.push(format!("{when}: curl /healthz: ok={ok} {out} {err}"));
    }
    failed
}

fn flood(fx: &Fixture, secs: u32) -> std::process::Child {
    let sources = format!("192.0.2.{FLOOD_FIRST}-192.0.2.{FLOOD_LAST}");
    let mut c = Command::new(tool("ip"));
    c.args(["netns", "exec", &fx.cli])
        .arg(env!("CARGO_BIN_EXE_ltsp-flood"))
        .args(["--server", SERVER, "--sources", &sources])
        .args(["--duration", &secs.to_string()])
        .args(["--dhcp", "400", "--rate", "200"])
        .args(["--random-udp", "67,69,4011", "--random-tcp", "10809,8080"])
        .args(["--nbd", "4", "--tftp", "4", "--tftp-file", "f"])
        .args(["--http", "4", "--http-path", "/files/f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("start ltsp-flood")
}

fn survives(tag: &str, dhcp: &[&str]) {
    let mut fx = start(tag, dhcp);
    let before = real_clients(&fx, "before");
    assert!(
        before.is_empty(),
        "real clients before the flood: {before:?}"
    );
    let f = flood(&fx, 25);
    std::thread::sleep(std::time::Duration::from_secs(8));
    let during = real_clients(&fx, "during");
    let out = f.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ltsp-flood failed: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The flood really ran: datagrams and connections went out.
    for what in [
        "dhcp datagrams",
        "udp-datagrams",
        "tcp-connections",
        "nbd connections",
    ] {
        assert!(count(&report, what) > 0, "no {what} sent:\n{report}");
    }
    assert!(
        fx.server.alive(),
        "ltsp-server died under the flood:\n{report}\n{}",
        tail(&fx.server.log())
    );
    let after = real_clients(&fx, "after");
    let (peak, _) = fx.server.memory_kib();
    eprintln!("{report}peak RSS {peak} KiB");
    assert!(
        during.is_empty(),
        "real clients during the flood: {during:?}\n{report}"
    );
    assert!(after.is_empty(), "real clients after the flood: {after:?}");
    assert!(
        peak > 0 && peak < BUDGET_KIB,
        "peak RSS {peak} KiB over the {BUDGET_KIB} KiB budget\n{report}"
    );
}

/// The number after `what=` in ltsp-flood's report.
fn count(report: &str, what: &str) -> u64 {
    let key = format!("{}=", what.rsplit(' ').next().unwrap_or(what));
    report
        .lines()
        .filter(|l| l.contains(what.split(' ').next().unwrap_or(what)))
        .find_map(|l| l.split(&key).nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
#[ignore = "needs root: network namespaces, ports 67/69, a release build"]
fn proxy_dhcp_server_survives_hostile_bytes_on_every_port() {
    survives("hostp", &["--proxy-dhcp", "veth0"]);
}

#[test]
#[ignore = "needs root: network namespaces, ports 67/69, a release build"]
fn dhcp_server_mode_survives_hostile_bytes_on_every_port() {
    survives(
        "hostd",
        &[
            "--dhcp-server",
            "veth0",
            "--dhcp-range",
            "192.0.2.100-192.0.2.150",
        ],
    );
}
