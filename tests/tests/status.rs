//! The server's status endpoints with a real HTTP client (curl): readiness waits for the
//! exports, metrics count what nodes fetched, `ltsp-server status` lists the nodes.

use ltsp_tests::{bin, pattern, run, tool, ServerProc};
use std::process::Command;

fn curl(url: &str) -> (String, String) {
    let (ok, out, err) =
        run(Command::new(tool("curl")).args(["-sS", "-o", "-", "-w", "\n%{http_code}", url]));
    assert!(ok, "{err}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

#[test]
fn healthz_metrics_and_nodes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinuz"), pattern(100_000, 1)).unwrap();
    let img = dir.path().join("root.img");
    std::fs::write(&img, pattern(1 << 20, 2)).unwrap();
    let s = ServerProc::start(&[
        "--tftp-root",
        dir.path().to_str().unwrap(),
        "--export",
        &format!("root={}", img.display()),
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let h = s.http.expect("http address in the log");
    // Ready once the export is hashed (a 1 MiB image takes milliseconds).
    assert!(s.log_has("nbd: export \"root\": blake3:"));
    assert_eq!(
        curl(&format!("http://{h}/healthz")),
        ("200".into(), "ok\n".into())
    );
    // A node fetches its kernel and reads its root.
    let t = s.tftp.unwrap();
    let (ok, _, err) = run(Command::new(tool("curl")).args([
        "-sS",
        "-o",
        "/dev/null",
        &format!("tftp://{t}/vmlinuz"),
    ]));
    assert!(ok, "{err}");
    let n = s.nbd.unwrap();
    let (ok, _, err) =
        run(Command::new(tool("nbdcopy")).args([&format!("nbd://{n}/root"), "null:"]));
    assert!(ok, "{err}");
    let (code, m) = curl(&format!("http://{h}/metrics"));
    assert_eq!(code, "200");
    for want in [
        "ltsp_tftp_transfers_total 1",
        "ltsp_tftp_bytes_total 100000",
        "ltsp_nbd_read_bytes_total 1048576",
        "ltsp_nodes_seen 1",
        "ltsp_export_info{export=\"root\",identity=\"blake3:",
    ] {
        assert!(m.contains(want), "{want} not in\n{m}");
    }
    // The operator's view.
    let (ok, out, err) =
        run(Command::new(bin("ltsp-server")).args(["status", "--server", &h.to_string()]));
    assert!(ok, "{err}");
    assert!(
        out.starts_with("NODE\tNBD\tEXPORT\tLAST-FILE\tLAST-SEEN\n"),
        "{out}"
    );
    assert!(out.contains("127.0.0.1\t-\troot\tvmlinuz\t"), "{out}");
    assert_eq!(curl(&format!("http://{h}/nope")).0, "404");
}

#[test]
fn status_says_what_to_check_when_no_server_answers() {
    let (ok, _, err) =
        run(Command::new(bin("ltsp-server")).args(["status", "--server", "127.0.0.1:1"]));
    assert!(!ok);
    assert!(
        err.contains("is ltsp-server running with --http-listen?"),
        "{err}"
    );
}
