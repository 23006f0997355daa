//! A fleet reboot: 200 simulated nodes at once, each fetching its initramfs over TFTP
//! (curl) and then reading its root over NBD (nbdcopy), against one ltsp-server. Every
//! node must get every byte right; the wall time and the server's peak memory are printed
//! (the full-size figures are in tests/bench/run --only fleet).

use ltsp_tests::{pattern, run, tool, ServerProc};
use std::process::{Command, Stdio};
use std::time::Instant;

const NODES: usize = 200;

#[test]
fn two_hundred_nodes_boot_at_once_without_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let initrd = pattern(4 << 20, 1);
    let root = pattern(16 << 20, 2);
    std::fs::write(dir.path().join("initrd"), &initrd).unwrap();
    std::fs::write(dir.path().join("root.img"), &root).unwrap();
    let img = dir.path().join("root.img");
    let s = ServerProc::start(&[
        "--tftp-root",
        dir.path().to_str().unwrap(),
        "--export",
        &format!("root={}", img.display()),
        // Every simulated node is 127.0.0.1 here: per-client limits would apply to all.
        "--tftp-max-transfers-per-client",
        "0",
        "--nbd-max-connections-per-client",
        "0",
    ]);
    let (t, n) = (s.tftp.unwrap(), s.nbd.unwrap());
    let want_initrd = sha(&initrd);
    let want_root = sha(&root);
    let t0 = Instant::now();
    // Each node: TFTP to stdout and a checksum, then NBD to stdout and a checksum.
    let script = format!(
        "{curl} -sS --tftp-blksize 1468 tftp://{t}/initrd | sha256sum && \
         {nbdcopy} --connections 2 nbd://{n}/root - | sha256sum",
        curl = tool("curl").display(),
        nbdcopy = tool("nbdcopy").display()
    );
    let nodes: Vec<_> = (0..NODES)
        .map(|_| {
            Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    for (i, c) in nodes.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let sums: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
        if !out.status.success() || sums != [want_initrd.as_str(), want_root.as_str()] {
            failures.push(format!(
                "node {i}: {sums:?} {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let wall = t0.elapsed();
    let rss = peak_rss_kib(s.pid());
    eprintln!(
        "load: {NODES} nodes, 4 MiB TFTP + 16 MiB NBD each, {:.1} s, server peak RSS {} KiB, {} failures",
        wall.as_secs_f64(),
        rss,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(s.log_has("sent \"initrd\""));
}

fn sha(data: &[u8]) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), data).unwrap();
    let (ok, out, _) = run(Command::new("sha256sum").arg(f.path()));
    assert!(ok);
    out.split(' ').next().unwrap().to_string()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
