//! Fault scenarios on the QEMU test bed (`qemu/fault`): a node survives its server
//! restarting, fails over to a second one, is untouched by an image update, and reports
//! boot failures with their cause and does what `ltsp.on-failure` says. Needs root.

use ltsp_tests::{is_root, workspace_root};
use std::process::Command;
use std::sync::Mutex;

/// One QEMU at a time: they share the prepared artifacts and two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs a scenario; returns its output once it passed.
fn fault(scenario: &str) -> Option<String> {
    if !is_root() {
        eprintln!("skipped: QEMU boots need root");
        return None;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new("python3")
        .arg(workspace_root().join("qemu/fault"))
        .args([scenario, "--timeout", "420"])
        .output()
        .expect("run qemu/fault");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    assert!(
        out.status.success() && text.contains(&format!("RESULT ok: {scenario}")),
        "qemu/fault {scenario} failed:\n{tail}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(text)
}

fn fault_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("FAULT ")).collect()
}

fn has(out: &str, what: &str) {
    assert!(
        fault_lines(out).iter().any(|l| l.contains(what)),
        "no FAULT line with {what:?}:\n{}",
        fault_lines(out).join("\n")
    );
}

#[test]
fn server_restart_is_a_non_event_for_a_running_node() {
    let Some(out) = fault("server-restart") else {
        return;
    };
    has(&out, "replaced via nbd://192.0.2.1");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
}

#[test]
fn a_hung_server_is_waited_out_without_an_io_error() {
    let Some(out) = fault("server-hang") else {
        return;
    };
    has(&out, "replaced via nbd://192.0.2.1");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
}

#[test]
fn a_node_fails_over_to_the_second_server() {
    let Some(out) = fault("failover") else { return };
    // The second server's copy is another file: only the content hash lets it in.
    has(&out, "replaced via nbd://192.0.2.2");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
}

#[test]
fn an_image_update_leaves_running_nodes_alone_and_reaches_rebooted_ones() {
    let Some(out) = fault("image-swap") else {
        return;
    };
    has(&out, "image-swap (running node)");
    has(&out, "checksums equal");
    has(&out, "after reboot /ltsp-image-version=2");
}

#[test]
fn no_dhcp_answer_is_reported_and_the_node_halts() {
    let Some(out) = fault("no-dhcp") else { return };
    has(&out, "step `net` failed: no DHCP answer");
    has(&out, "check: the DHCP server");
    has(&out, "reboot: System halted");
}

#[test]
fn an_nbd_server_down_at_boot_reboots_the_node_until_it_is_back() {
    let Some(out) = fault("server-down-at-boot") else {
        return;
    };
    has(&out, "step `nbd` failed");
    has(&out, "Connection refused");
    has(&out, "rebooting in 3 s");
    has(&out, "booted once the server was back");
}

#[test]
fn a_missing_export_is_named_and_the_node_halts() {
    let Some(out) = fault("bad-export") else {
        return;
    };
    has(&out, "export \"nosuch\" does not exist on the server");
    has(
        &out,
        "check: that ltsp-server runs, the nbdroot= host/port/export",
    );
    has(&out, "reboot: System halted");
    // Retried with backoff before giving up.
    assert!(out.contains("nbd: try 1 failed"));
}

#[test]
fn a_malformed_lts_conf_is_logged_with_its_line_and_the_node_boots() {
    let Some(out) = fault("bad-ltsconf") else {
        return;
    };
    has(&out, "lts.conf:3:1: section header: expected ']'");
    has(&out, "lts.conf:5:1: expected 'KEY = value'");
}

#[test]
fn a_node_reboots_twice_cleanly() {
    let Some(out) = fault("reboot") else { return };
    has(&out, "reboot 1: shutdown took");
    has(&out, "reboot 2: shutdown took");
}
