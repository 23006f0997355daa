//! The server's HTTP side with a real client (curl): readiness waits for the exports,
//! metrics count what nodes fetched, `ltsp-server status` lists the nodes, and the boot
//! files are served from the TFTP root with the same confinement.

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
        out.starts_with("NODE\tNBD\tEXPORT\tVERSION\tLAST-FILE\tLAST-SEEN\n"),
        "{out}"
    );
    // The node read the export's current version; the versions table names it.
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("127.0.0.1\t-\troot\tblake3:") && row.contains("\tvmlinuz\t"),
        "{out}"
    );
    let version = row.split('\t').nth(3).unwrap();
    assert!(
        out.contains("\nVERSION\tCURRENT-FOR\tNODES\n")
            && out
                .lines()
                .any(|l| l.starts_with(version) && l.contains("\troot\t")),
        "{out}"
    );
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

#[test]
fn boot_files_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tftp");
    std::fs::create_dir_all(root.join("ltsp/amd64")).unwrap();
    let kernel = pattern(5 * 1024 * 1024 + 3, 4);
    std::fs::write(root.join("ltsp/amd64/vmlinuz"), &kernel).unwrap();
    std::fs::write(dir.path().join("secret"), b"outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
    let s = ServerProc::start(&[
        "--tftp-root",
        root.to_str().unwrap(),
        "--no-nbd",
        "--http-listen",
        "127.0.0.1:0",
        "--boot-http",
        "--boot-kernel",
        "ltsp/amd64/vmlinuz",
        "--boot-cmdline",
        "root=/dev/nbd0",
    ]);
    let h = s.http.unwrap();
    let out = dir.path().join("got");
    let (ok, _, err) = run(Command::new(tool("curl"))
        .args(["-sS", "-f", "-o"])
        .arg(&out)
        .arg(format!("http://{h}/files/ltsp/amd64/vmlinuz")));
    assert!(ok, "{err}");
    assert!(std::fs::read(&out).unwrap() == kernel);
    assert!(s.log_has("http: 127.0.0.1"));
    // Nothing outside the root, whatever the path says.
    for bad in [
        "/files/../secret",
        "/files/escape",
        "/files/%2e%2e/secret",
        "/files/ltsp",
    ] {
        let (code, _) = curl_as_is(&format!("http://{h}{bad}"));
        assert!(code == "403" || code == "404", "{bad}: {code}");
    }
    assert_eq!(curl(&format!("http://{h}/files/nope")).0, "404");
    // boot.ipxe names the HTTP URLs, by HTTP and by TFTP alike.
    let (code, script) = curl(&format!("http://{h}/boot.ipxe"));
    assert_eq!(code, "200");
    // It names this server as the node reached it (not ${next-server}: with proxyDHCP
    // that is the site DHCP server).
    let want = format!(
        "kernel http://127.0.0.1:{}/files/ltsp/amd64/vmlinuz ",
        h.port()
    );
    assert!(script.contains(&want), "{script}");
    let t = s.tftp.unwrap();
    let (ok, by_tftp, err) =
        run(Command::new(tool("curl")).args(["-sS", &format!("tftp://{t}/boot.ipxe")]));
    assert!(ok, "{err}");
    assert_eq!(by_tftp, script);
}

fn curl_as_is(url: &str) -> (String, String) {
    let (ok, out, err) = run(Command::new(tool("curl")).args([
        "-sS",
        "--path-as-is",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url,
    ]));
    assert!(ok, "{err}");
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}
