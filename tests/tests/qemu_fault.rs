//! Fault scenarios on the QEMU test bed (`qemu/fault`): a node survives its server
//! restarting, fails over to a second one, is untouched by an image update, keeps its
//! DHCP lease, refuses an lts.conf changed after signing, reads a tampered verity root as
//! EIO (both under Secure Boot), never runs a UKI changed after signing, and reports boot
//! failures with their cause and does what `ltsp.on-failure` says.
//! Needs root.

use ltsp_tests::{qemu_slot, workspace_root};
use std::process::Command;

/// Runs a scenario; returns its output once it passed.
fn fault(scenario: &str) -> String {
    fault_with(scenario, &[])
}

/// Runs a scenario with more options (`--secure-boot`); returns its output once it passed.
fn fault_with(scenario: &str, opts: &[&str]) -> String {
    let _slot = qemu_slot();
    let out = Command::new("python3")
        .arg(workspace_root().join("qemu/fault"))
        // Two vCPUs: two NBD connections to cut and restore (one host thread: qemu/testbed.py).
        .args([scenario, "--timeout", "420", "--cpus", "2"])
        .args(opts)
        .output()
        .expect("run qemu/fault");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    // The RESULT line first: it says why, and the logs after it may be cut.
    let result = lines
        .iter()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or(&"no RESULT line");
    assert!(
        out.status.success() && text.contains(&format!("RESULT ok: {scenario}")),
        "qemu/fault {scenario} failed: {result}\n{tail}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
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
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn server_restart_is_a_non_event_for_a_running_node() {
    let out = fault("server-restart");
    has(&out, "replaced via nbd://192.0.2.1");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_hung_server_is_waited_out_without_an_io_error() {
    let out = fault("server-hang");
    has(&out, "replaced via nbd://192.0.2.1");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_node_fails_over_to_the_second_server() {
    let out = fault("failover");
    // The second server's copy is another file: only the content hash lets it in.
    has(&out, "replaced via nbd://192.0.2.2");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn an_image_update_leaves_running_nodes_alone_and_reaches_rebooted_ones() {
    let out = fault("image-swap");
    has(&out, "image-swap (running node)");
    has(&out, "checksums equal");
    has(&out, "after reboot /ltsp-image-version=2");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_rolling_upgrade_strands_no_node() {
    let out = fault("rolling-upgrade");
    has(&out, "step A:");
    has(&out, "step B:");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
    // After both servers were replaced, the node's version came from the shared store.
    has(&out, "from the store:");
    has(&out, "after reboot /ltsp-image-version=2");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn no_dhcp_answer_is_reported_and_the_node_halts() {
    let out = fault("no-dhcp");
    has(&out, "step `net` failed: no DHCP answer");
    has(&out, "check: the DHCP server");
    has(&out, "reboot: System halted");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn an_nbd_server_down_at_boot_reboots_the_node_until_it_is_back() {
    let out = fault("server-down-at-boot");
    has(&out, "step `nbd` failed");
    has(&out, "Connection refused");
    has(&out, "rebooting in 3 s");
    has(&out, "booted once the server was back");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_missing_export_is_named_and_the_node_halts() {
    let out = fault("bad-export");
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
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_malformed_lts_conf_is_logged_with_its_line_and_the_node_boots() {
    let out = fault("bad-ltsconf");
    has(
        &out,
        "lts.conf:3:19: section header \"[52:54:00:12:34:56\" rejected",
    );
    has(&out, "lts.conf:4:1: \"SOUND\" not applied");
    has(&out, "lts.conf:5:1: expected 'KEY = value'");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_node_reboots_twice_cleanly() {
    let out = fault("reboot");
    has(&out, "reboot 1: shutdown took");
    has(&out, "reboot 2: shutdown took");
}

#[test]
#[ignore = "needs root and QEMU: network namespaces, tap, chroot"]
fn a_hostile_network_neither_stops_nor_bloats_the_server() {
    let out = fault("hostile-network");
    has(&out, "hostile-network: ");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
    has(&out, "real client nbdcopy during the floods: same bytes");
    has(&out, "real client tftp-hpa during the floods: same bytes");
    has(&out, "real client curl /healthz during the floods: 0");
    has(&out, "ltsp-server still running; peak RSS");
    has(&out, "FLOOD nbd connections=");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_hung_preinit_command_is_killed_named_and_the_node_boots() {
    let out = fault("preinit-hang");
    has(
        &out,
        "step `preinit`: PREINIT_02_HANG `trap '' TERM; while :; do sleep 1; done` still running after 5 s",
    );
    has(
        &out,
        "SIGKILL 5 s later); not run: PREINIT_03_AFTER; the boot goes on",
    );
    has(
        &out,
        "from PREINIT start to multi-user; none of its processes left",
    );
}

#[test]
#[ignore = "needs root and QEMU: network namespaces, tap, chroot"]
fn a_node_keeps_its_dhcp_lease_and_no_address_is_handed_out_twice() {
    let out = fault("lease-expiry");
    has(&out, "renewals seen on the wire");
    has(&out, "took back");
    has(&out, "no address ACKed to two clients at once");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_node_in_ram_runs_on_with_every_server_gone() {
    let out = fault("to-ram-server-gone");
    has(&out, "bytes copied in");
    has(&out, ", identity blake3:");
    assert!(!out.contains("is not checked"), "the copy was not checked");
    has(&out, "to-ram: the root is on /dev/loop");
    has(&out, "/rofs is on /dev/loop");
    has(&out, "to-ram-server-gone: ");
    has(&out, "checksums equal");
    has(&out, "kernel I/O errors 0");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_tampered_lts_conf_is_refused_and_the_signed_one_applies() {
    let out = fault_with("tamper-ltsconf", &["--secure-boot"]);
    assert_secure_boot(&out);
    has(&out, "REFUSED: the signature does not match");
    has(&out, "refused, none of its commands ran, multi-user");
    has(&out, "lts.conf for the tamper-ltsconf scenario");
    has(
        &out,
        "the signed file verified, its PREINIT ran, hostname signed-conf",
    );
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_tampered_block_of_a_verity_root_reads_as_eio_and_names_verity() {
    let out = fault_with("tamper-image", &["--secure-boot"]);
    assert_secure_boot(&out);
    has(&out, "/rofs on /dev/dm-0, dm-0 is 'ltsp-root' over nbd0");
    has(
        &out,
        "flipped one byte of /usr/share/ltsp-testbed/verity-probe",
    );
    has(&out, "Input/output error");
    has(&out, "FAULT kernel: ");
    has(
        &out,
        "tamper-image: EIO for the tampered file, verity named, untouched files right",
    );
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_wrong_verity_root_hash_stops_the_boot_naming_verity() {
    let out = fault("verity-wrong-hash");
    has(
        &out,
        "step `verity` failed: dm-verity refused the image on /dev/nbd0",
    );
    has(
        &out,
        "check: that ltsp.verity= is the root.squashfs.roothash",
    );
    has(&out, "reboot: System halted");
}

/// The node booted the signed UKI by firmware PXE, and ran under Secure Boot with lockdown.
fn assert_secure_boot(out: &str) {
    assert!(out.contains("NBP filename is ltsp/amd64/ltsp.efi"));
    has(out, "secure boot: SecureBoot=1 lockdown=");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_tampered_uki_is_refused_by_the_firmware_and_no_kernel_runs() {
    let out = fault("tamper-uki");
    assert!(out.contains("NBP filename is ltsp/amd64/ltsp.efi"));
    has(out.as_str(), "firmware at ");
    assert!(
        fault_lines(&out)
            .iter()
            .any(|l| l.contains("Access Denied") || l.contains("Security Violation")),
        "{}",
        fault_lines(&out).join("\n")
    );
    has(&out, "downloaded the whole UKI");
    has(&out, "sbverify accepted it before, refuses it after");
    has(&out, "tamper-uki: refused by the firmware, no kernel line");
    assert!(!out.contains("Linux version"), "a kernel ran");
}
