//! End to end: a node PXE-boots under QEMU from ltsp-server (TFTP, then NBD) into
//! systemd, with the lts.conf served by TFTP, and reboots cleanly with nothing kept.
//! Both initramfs flavours, on the default image (Debian 13, trixie: xz modules under
//! /usr/lib/modules), and Debian 12 (bookworm) once. Stock tools on either side: Debian's
//! initramfs-tools + nbd-client node from ltsp-server, our agent from Debian's nbd-server.
//! Each boot covers what it can beside its own subject, to keep the suite short. Needs
//! root (network namespace, tap, chroot). The failure and fault scenarios are in
//! qemu_fault.rs.

use ltsp_tests::{qemu_slot, workspace_root};
use std::process::Command;

// Each node holds a QEMU slot (ltsp_tests::qemu_slot) while it runs; nodes have
// qemu/boot's one vCPU, so a slot is a core.

fn boot(flavour: &str, reboot: bool) -> String {
    let _slot = qemu_slot();
    let out = Command::new("python3")
        .arg(workspace_root().join("qemu/boot"))
        .args(["--flavour", flavour, "--timeout", "300"])
        .args(reboot.then_some("--reboot"))
        .args([
            "--run",
            "systemctl show -p ExecStart --value ltsp-e2e.service",
        ])
        .args(["--run", "cat /etc/fstab"])
        .args([
            "--run",
            "systemctl is-enabled apt-daily.timer ssh.service 2>&1",
        ])
        .args(["--run", "cat /run/rofs-hostname"])
        .args([
            "--run",
            "ls /dev/nbd0 && cat /sys/block/nbd0/backend 2>/dev/null; echo",
        ])
        .args(["--run", "ps -eo args= | grep '^@ltsp' | cut -c1-60"])
        .args([
            "--run",
            "dpkg-query -W -f='${Status} ${Version}' ltsp-agent",
        ])
        .args([
            "--run",
            "systemctl show -p ConditionResult --value ldconfig.service \
             systemd-journal-catalog-update.service | xargs echo",
        ])
        .output()
        .expect("run qemu/boot");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu/boot {flavour} failed:\n{}\n{}",
        tail(&text),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// NBD connections ltsp-server accepted for the root export, from its log.
fn nbd_connections(out: &str) -> usize {
    out.lines()
        .filter(|l| {
            l.starts_with("SERVER nbd: ")
                && l.contains("export \"root\"")
                && l.ends_with(" connected")
        })
        .count()
}

/// The RESULT line (why it failed), then the output's last lines.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let result = lines
        .iter()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or(&"");
    format!(
        "{result}\n{}",
        lines[lines.len().saturating_sub(80)..].join("\n")
    )
}

/// `what` is in the boot's output; else the test fails showing the output's tail.
fn has(out: &str, what: &str) {
    assert!(out.contains(what), "{what:?} not found:\n{}", tail(out));
}

fn check<'a>(out: &'a str, name: &str) -> &'a str {
    let key = format!("CHECK {name}=");
    out.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .unwrap_or_else(|| panic!("no {key} in output:\n{}", tail(out)))
}

fn pos(out: &str, marker: &str) -> usize {
    out.find(marker)
        .unwrap_or_else(|| panic!("{marker} not on the console:\n{}", tail(out)))
}

fn assert_node(out: &str, rebooted: bool) {
    // The default image is Debian 13 with its 6.12 kernel.
    has(out, "Welcome to Debian GNU/Linux 13 (trixie)!");
    has(out, "Linux version 6.12.");
    assert_eq!(check(out, "root"), "overlay overlay", "/ is an overlay");
    assert_eq!(
        check(out, "lower"),
        "squashfs /dev/nbd0",
        "over a squashfs on /dev/nbd0"
    );
    assert_eq!(
        check(out, "hostname"),
        "k8s-node-1",
        "HOSTNAME from the MAC section"
    );
    assert_eq!(check(out, "state"), "running", "systemd not degraded");
    assert_eq!(check(out, "failed"), "", "no failed units");
    // PREINIT ran in the new root before systemd read the unit it edits.
    assert!(check(out, "run0").contains("marker=EDITED-BY-PREINIT"));
    assert!(!out.contains("LTSP-E2E-UNIT marker=ORIGINAL"));
    // FSTAB_* with the missing nofail disk, in order.
    assert!(check(out, "run1").contains("/dev/disk/by-label/ltsp-data /var/lib/data ext4 nofail"));
    // Default pruning masked apt-daily; KEEP_SYSTEM_SERVICES names survive (ssh absent here).
    assert!(
        check(out, "run2").starts_with("masked"),
        "{}",
        check(out, "run2")
    );
    // RCFILE_02 copied from the read-only lower layer at /rofs.
    assert_eq!(check(out, "run3"), "image");
    // Console order: PREINIT, then rc.local's lines in natural key order, then the unit.
    let (p, r1, r10, u) = (
        pos(out, "LTSP-PREINIT ran"),
        pos(out, "LTSP-RCFILE-01 first"),
        pos(out, "LTSP-RCFILE-10 kubeadm join stand-in from k8s-node-1"),
        pos(out, "LTSP-E2E-UNIT marker=EDITED-BY-PREINIT"),
    );
    assert!(
        p < r1 && r1 < r10 && r10 < u,
        "markers out of order: {p} {r1} {r10} {u}"
    );
    if rebooted {
        // The reboot was clean and nothing written to / survived it.
        assert!(out.contains("reboot: Restarting system"));
        assert_eq!(check(out, "persisted"), "no");
        assert!(out.contains("TIMELINE multi-user2="));
    }
    // The kernel knows the image by its content hash.
    assert!(
        check(out, "run4").contains("blake3:"),
        "{}",
        check(out, "run4")
    );
    // Both long-lived helpers run, marked for systemd with '@': the reconnect helper and
    // the lease keeper (the bed's DHCP lease is finite).
    let helpers: Vec<&str> = check(out, "run5").split(" | ").collect();
    assert!(
        helpers
            .iter()
            .any(|p| p.starts_with("@ltsp-nbd-watch nbd-watch --index=0")),
        "{helpers:?}"
    );
    assert!(
        helpers
            .iter()
            .any(|p| p.starts_with("@ltsp-lease lease-keep")),
        "{helpers:?}"
    );
    // The image got the agent the way users install it: from its .deb, with dpkg.
    assert!(
        check(out, "run6").starts_with("install ok installed 0.1.0"),
        "{}",
        check(out, "run6")
    );
    // The image is stamped as updated when built: no linker cache or catalog rebuilt at boot.
    assert_eq!(check(out, "run7"), "no no", "ConditionNeedsUpdate");
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn standalone_initramfs_boots_into_systemd() {
    // Its reboots: qemu_fault's a_node_reboots_twice_cleanly.
    // One vCPU, so one NBD connection (two vCPUs, two: a_lab_with_no_dhcp_server...).
    let out = boot("standalone", false);
    assert_node(&out, false);
    assert_eq!(nbd_connections(&out), 1, "{}", tail(&out));
    assert!(
        out.lines().any(
            |l| (l.contains("ltsp-agent [") && l.ends_with("] exec-init"))
                || l.ends_with("ltsp-agent: exec-init")
        ),
        "PID 1 path"
    );
    // The boot handed the initramfs's deletion to the reconnect helper, which did it.
    assert!(
        out.contains("nbd-watch: freed the initramfs"),
        "initramfs freed"
    );
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn initramfs_tools_flavour_boots_into_systemd_and_reboots_clean() {
    let out = boot("initramfs-tools", true);
    assert_node(&out, true);
    assert!(
        // Written by the agent, or echoed from kmsg by the kernel.
        out.contains("] handover") || out.contains("ltsp-agent: handover"),
        "the worker path handed over to initramfs-tools"
    );
}

/// qemu/boot with these options; its output, once it succeeded.
fn qemu_boot(args: &[&str]) -> String {
    let _slot = qemu_slot();
    let out = Command::new("python3")
        .arg(workspace_root().join("qemu/boot"))
        .args(args)
        .args(["--timeout", "300"])
        .output()
        .expect("run qemu/boot");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu/boot {args:?} failed:\n{}\n{}",
        tail(&text),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A boot with the given qemu/boot options and no checks beyond reaching multi-user.
fn boot_with(args: &[&str]) -> String {
    let text = qemu_boot(&[args, &["--run", "findmnt -no FSTYPE /"]].concat());
    assert_eq!(check(&text, "run0"), "overlay");
    text
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn bios_node_boots_through_proxy_dhcp_next_to_a_dhcp_server_that_knows_no_pxe() {
    let out = boot_with(&["--dhcp", "proxy"]);
    // The NIC's iPXE ROM asked as iPXE and got the script, from our proxy.
    has(
        &out,
        "SERVER proxy-dhcp: 52:54:00:12:34:56 (Ipxe): Offer with \"boot.ipxe\"",
    );
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn uefi_firmware_pxe_chainloads_ipxe_through_proxy_dhcp_and_fetches_by_http() {
    let out = boot_with(&[
        "--firmware",
        "uefi",
        "--dhcp",
        "proxy",
        "--boot-files",
        "http",
    ]);
    // OVMF's own PXE (arch 7) got ipxe.efi; iPXE then got boot.ipxe: one hop, no loop.
    has(&out, "NBP filename is ipxe.efi");
    has(&out, "(Firmware(7)): Offer with \"ipxe.efi\"");
    has(&out, "(Ipxe): Offer with \"boot.ipxe\"");
    assert_eq!(
        out.matches("NBP filename is").count(),
        1,
        "firmware PXE ran once"
    );
    // Kernel and initramfs over HTTP, as iPXE reported them.
    assert!(out.contains("http://192.0.2.1:8080/files/ltsp/amd64/vmlinuz... ok"));
    assert!(out.contains("SERVER http: "));
}

#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_lab_with_no_dhcp_server_boots_from_ltsp_servers_own() {
    let out = boot_with(&["--dhcp", "server", "--cpus", "2"]);
    // Two vCPUs: two NBD connections to the export (it allows multi-conn).
    assert_eq!(nbd_connections(&out), 2, "{}", tail(&out));
    // iPXE (the NIC's ROM) got an address and boot.ipxe from us; then the agent its lease.
    has(
        &out,
        "dhcp-server: 52:54:00:12:34:56: Ack 192.0.2.100 boot.ipxe",
    );
    assert!(
        out.matches("dhcp-server: 52:54:00:12:34:56: Ack 192.0.2.100")
            .count()
            >= 2,
        "{}",
        tail(&out)
    );
}

/// Debian 12 keeps booting: its 6.1 kernel with uncompressed modules under /lib/modules.
/// The same boot goes through GRUB netboot (grub-mknetdir) instead of iPXE.
#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn bookworm_image_boots_through_grub_netboot_with_the_generated_grub_cfg() {
    let out = boot_with(&[
        "--suite",
        "bookworm",
        "--flavour",
        "standalone",
        "--loader",
        "grub",
    ]);
    has(&out, "Welcome to Debian GNU/Linux 12 (bookworm)!");
    has(&out, "Linux version 6.1.0-");
    has(&out, "ltsp-agent: modules: loaded nbd squashfs overlay");
    // grub-mknetdir's core image, then the grub.cfg ltsp-server generated from [boot].
    has(&out, "sent \"grub/i386-pc/core.0\"");
    has(&out, "sent \"/grub/grub.cfg\"");
    has(&out, "BOOTIF=01-52:54:00:12:34:56 ltsp.server=192.0.2.1");
}

/// Intel NICs: the agent finds e1000 and e1000e through the devices' modalias and
/// modules.alias (Debian's generic kernel; the cloud one has neither driver), waits for
/// their emulated autonegotiation and boots the same image.
#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn nodes_with_e1000_and_e1000e_nics_find_their_driver_by_modalias() {
    for nic in ["e1000", "e1000e"] {
        let out = boot_with(&["--nic", nic]);
        // The whole line: "e1000" must not match "e1000e".
        assert!(
            out.lines()
                .any(|l| l.ends_with(&format!("ltsp-agent: modules: NIC drivers {nic}"))),
            "{nic}: {}",
            tail(&out)
        );
        assert!(
            out.contains("net: eth0 (52:54:00:12:34:56) has carrier"),
            "{nic}"
        );
    }
}

/// The whole chain under Secure Boot: OVMF enforcing with the snakeoil key in db, its own
/// PXE given the signed UKI by ltsp-server as the DHCP server (no iPXE; proxyDHCP gives
/// the same file, unit-tested, and UEFI through proxyDHCP is booted above), the UKI's
/// pinned command line, lockdown, the lts.conf signature, the root through dm-verity,
/// Debian's signed modules.
#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn a_signed_uki_boots_under_secure_boot_with_lockdown_and_a_verity_root() {
    let out = boot_with(&["--secure-boot", "--dhcp", "server"]);
    // Firmware PXE fetched the UKI itself, offered by ltsp-server's DHCP server.
    has(&out, "NBP filename is ltsp/amd64/ltsp.efi");
    has(
        &out,
        "dhcp-server: 52:54:00:12:34:56: Ack 192.0.2.100 ltsp/amd64/ltsp.efi",
    );
    // No iPXE in the chain: neither iPXE nor its script offered or sent, none ran.
    for no in ["boot.ipxe", "sent \"ipxe.efi\"", "iPXE initialising"] {
        assert!(!out.contains(no), "{no}: {}", tail(&out));
    }
    assert!(out.contains("EFI stub: UEFI Secure Boot is enabled."));
    // The SecureBoot variable's value (after 4 attribute bytes) is 1.
    let sb: Vec<&str> = check(&out, "secureboot").split_whitespace().collect();
    assert_eq!(sb.last(), Some(&"1"), "SecureBoot: {sb:?}");
    let lockdown = check(&out, "lockdown");
    assert!(
        lockdown.contains("[integrity]") || lockdown.contains("[confidentiality]"),
        "lockdown: {lockdown}"
    );
    // The kernel runs the UKI's own command line, with the root hash pinned.
    let cmdline = check(&out, "cmdline");
    assert_eq!(cmdline, check(&out, "uki-cmdline"));
    assert!(cmdline.contains(" ltsp.verity="), "{cmdline}");
    assert!(cmdline.contains(" nbdroot=192.0.2.1/root"), "{cmdline}");
    assert_eq!(check(&out, "lower"), "squashfs /dev/dm-0", "{}", tail(&out));
    assert_eq!(
        check(&out, "verity"),
        "ltsp-root /dev/dm-0 over nbd0 0 corrupt"
    );
    has(
        &out,
        "verity: /dev/nbd0 verified through /dev/dm-0 against ltsp.verity=",
    );
    assert!(
        check(&out, "signature").contains("lts.conf: signature verified"),
        "{}",
        tail(&out)
    );
    // Debian's signed modules, stored decompressed in the initramfs, load under lockdown.
    let modules = check(&out, "modules");
    for m in ["nbd:live", "dm_verity:live"] {
        assert!(
            modules.split(' ').any(|x| x == m),
            "{m} not loaded: {modules}"
        );
    }
    assert_eq!(
        check(&out, "unsigned"),
        "0",
        "a module was refused or unsigned"
    );
    assert_eq!(check(&out, "state"), "running", "{}", tail(&out));
}

/// An arm64 node: qemu-system-aarch64 (virt machine, AAVMF UEFI) PXE-boots as client
/// architecture 11 on a lab network whose DHCP server is ltsp-server; it gives the node
/// GRUB's arm64 netboot image, GRUB reads the generated grub.cfg, and the arm64 agent
/// (cross-built, static musl) mounts the arm64 image's root from ltsp-server's NBD.
#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot, binfmt_misc for the arm64 image"]
fn arm64_node_boots_through_uefi_pxe_and_grub_from_ltsp_servers_dhcp() {
    // The arm64 image (minutes under qemu-user-static when not cached) is prepared before
    // taking a QEMU slot, beside the other boots, niced so that they keep their cores.
    let built = Command::new("nice")
        .args(["-n", "10", "python3"])
        .arg(workspace_root().join("qemu/boot"))
        .args(["--arch", "arm64", "--build-only"])
        .output()
        .expect("run qemu/boot --build-only");
    assert!(
        built.status.success(),
        "preparing the arm64 image failed:\n{}",
        tail(&String::from_utf8_lossy(&built.stderr))
    );
    let _slot = qemu_slot();
    let run = Command::new("python3")
        .arg(workspace_root().join("qemu/boot"))
        .args([
            "--arch",
            "arm64",
            "--no-build",
            "--dhcp",
            "server",
            "--timeout",
            "900",
        ])
        .args(["--run", "uname -m"])
        .output()
        .expect("run qemu/boot");
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    let out = text.as_str();
    assert!(
        run.status.success(),
        "qemu/boot --arch arm64 failed:\n{}\n{}",
        tail(out),
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(check(out, "run0"), "aarch64");
    assert_eq!(check(out, "root"), "overlay overlay");
    assert_eq!(check(out, "lower"), "squashfs /dev/nbd0");
    assert_eq!(check(out, "state"), "running", "systemd not degraded");
    // The firmware asked as UEFI arm64 and got GRUB with its lease; GRUB our grub.cfg.
    has(
        out,
        "dhcp-server: 52:54:00:12:34:56: Ack 192.0.2.100 grub/arm64-efi/core.efi",
    );
    // The offer says PXEClient with discovery control 8: EDK2 boots from it (this mode
    // does not serve port 4011, which EDK2 asked of offers without it).
    assert!(!out.contains("to 192.0.2.100:4011"), "{}", tail(out));
    has(out, "sent \"/grub/grub.cfg\"");
    has(out, "Welcome to Debian GNU/Linux 13 (trixie)!");
}

/// A console line of the agent: its own (`ltsp-agent [  1.234] ...`) or echoed from kmsg.
fn agent_console_line(l: &str) -> bool {
    l.contains("ltsp-agent [") || l.contains("] ltsp-agent: ")
}

/// Debian's own initramfs-tools + nbd-client node (qemu/prepare-stock), root from
/// ltsp-server: our server speaks to the stock NBD client.
#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn stock_debian_node_boots_with_nbd_client_from_ltsp_server() {
    let out = qemu_boot(&["--stock", "--nbd-server", "ltsp"]);
    has(&out, "Welcome to Debian GNU/Linux 13 (trixie)!");
    // nbd-client's initramfs script attached the root, no agent in sight.
    has(&out, "Connected /dev/nbd0");
    assert!(!out.lines().any(agent_console_line), "{}", tail(&out));
    assert_eq!(check(&out, "root"), "squashfs /dev/nbd0", "{}", tail(&out));
    assert_eq!(check(&out, "state"), "running", "{}", tail(&out));
    // ltsp-server served it; Debian's nbd-server did not run.
    assert!(
        out.lines().any(|l| l.starts_with("SERVER nbd: 192.0.2.")
            && l.contains(": export \"root\" (")
            && l.ends_with(" bytes) connected")),
        "{}",
        tail(&out)
    );
    assert!(!out.contains("NBD-SERVER "), "{}", tail(&out));
}

/// Our agent with root from Debian's nbd-server, which gives no image identity:
/// qemu/boot passes ltsp.allow-anonymous=1 and the node boots, checked by size only.
#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn agent_boots_from_debians_nbd_server_when_anonymous_is_allowed() {
    let out = qemu_boot(&["--nbd-server", "nbd-server"]);
    assert!(
        out.contains("ltsp.allow-anonymous=1"),
        "the harness passes it: {}",
        tail(&out)
    );
    assert!(
        out.contains(
            "nbd://192.0.2.1:10809/root gives no image identity; accepted, checking the size only"
        ),
        "{}",
        tail(&out)
    );
    has(&out, "nbd-watch: watching /dev/nbd0 (no identity)");
    assert_eq!(check(&out, "root"), "overlay overlay", "{}", tail(&out));
    assert_eq!(check(&out, "lower"), "squashfs /dev/nbd0", "{}", tail(&out));
    assert_eq!(check(&out, "state"), "running", "{}", tail(&out));
    // nbd-server (its syslog) served the node; ltsp-server, with NBD off, did not.
    assert!(
        out.lines()
            .any(|l| l.starts_with("NBD-SERVER ") && l.contains("connect from 192.0.2.")),
        "{}",
        tail(&out)
    );
    has(&out, "Starting to serve");
    assert!(!out.contains("SERVER nbd: "), "{}", tail(&out));
}

/// The same pairing without ltsp.allow-anonymous=1: the agent reaches nbd-server, refuses
/// it at the first try with a message naming the option, and halts (ltsp.on-failure=halt).
#[test]
#[ignore = "needs root and QEMU: network namespace, tap, chroot"]
fn agent_refuses_debians_nbd_server_without_allow_anonymous() {
    let out = qemu_boot(&[
        "--nbd-server",
        "nbd-server",
        "--cmdline",
        "ltsp.allow-anonymous=0",
        "--expect-failure",
        "nbd",
    ]);
    let reported = out
        .lines()
        .find_map(|l| l.strip_prefix("FAILURE-REPORTED "))
        .unwrap_or_else(|| panic!("no failure reported:\n{}", tail(&out)));
    assert!(
        reported.contains("nbd://192.0.2.1:10809/root: the server gives no image identity")
            && reported.contains("refused (ltsp.allow-anonymous=1 accepts it"),
        "{reported}"
    );
    let hint = out
        .lines()
        .find_map(|l| l.strip_prefix("FAILURE-HINT "))
        .unwrap_or_else(|| panic!("no hint:\n{}", tail(&out)));
    assert!(hint.contains("ltsp.allow-anonymous=1"), "{hint}");
    // Refused at once: no retries until ltsp.timeout.
    assert!(!out.contains("nbd: try 1 failed"), "{}", tail(&out));
    assert!(
        out.lines()
            .any(|l| l.starts_with("NBD-SERVER ") && l.contains("connect from 192.0.2.")),
        "the agent reached nbd-server: {}",
        tail(&out)
    );
    assert!(!out.contains("Reached target"), "{}", tail(&out));
}

/// deploy/Dockerfile built by a real engine (podman, qemu/build-docker-image: no registry,
/// base images from mmdebstrap, selected by the build ARGs), then a node booted from what
/// the image holds: its ltsp-server, kernel, initramfs-tools initramfs and squashfs, with
/// its root hash pinned. The build (a Rust compile inside, minutes) runs before taking a
/// QEMU slot, beside the other boots: its name sorts first so the test harness starts it
/// first, and it runs niced so that the boots keep their cores.
#[test]
#[ignore = "needs root: podman build (chroot isolation), network namespace, tap, QEMU"]
fn a_container_build_of_the_dockerfile_boots_a_node_from_its_server_image() {
    let built = Command::new("nice")
        .args(["-n", "10"])
        .arg(workspace_root().join("qemu/build-docker-image"))
        .output()
        .expect("run qemu/build-docker-image");
    assert!(
        built.status.success(),
        "qemu/build-docker-image failed:\n{}",
        tail(&String::from_utf8_lossy(&built.stderr))
    );
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&built.stdout).trim());
    let roothash = std::fs::read_to_string(dir.join("root.squashfs.roothash"))
        .expect("the image's root.squashfs.roothash");
    let roothash = roothash.trim();
    assert!(
        roothash.len() == 64 && roothash.bytes().all(|b| b.is_ascii_hexdigit()),
        "root hash {roothash:?}"
    );
    let out = {
        let _slot = qemu_slot();
        Command::new("python3")
            .arg(workspace_root().join("qemu/boot"))
            .args([
                "--image",
                "docker",
                "--no-build",
                "--verity",
                "--timeout",
                "300",
            ])
            .args(["--run", "dpkg-query -W -f='${Status}' ltsp-agent"])
            .args(["--run", ". /etc/os-release; echo $VERSION_CODENAME"])
            .output()
            .expect("run qemu/boot --image docker")
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu/boot --image docker failed:\n{}\n{}",
        tail(&text),
        String::from_utf8_lossy(&out.stderr)
    );
    // The image's own ltsp-server served the image's kernel and initramfs...
    has(&text, "Linux version 6.12.");
    assert!(
        text.contains("] handover") || text.contains("ltsp-agent: handover"),
        "the initramfs-tools worker path: {}",
        tail(&text)
    );
    // ...and its squashfs, verified against the root hash the build published.
    assert!(
        text.contains(&format!(
            "verity: /dev/nbd0 verified through /dev/dm-0 against ltsp.verity={roothash}"
        )),
        "{}",
        tail(&text)
    );
    assert_eq!(
        check(&text, "lower"),
        "squashfs /dev/dm-0",
        "{}",
        tail(&text)
    );
    assert_eq!(check(&text, "root"), "overlay overlay");
    assert_eq!(
        check(&text, "hostname"),
        "docker-node-1",
        "lts.conf applied"
    );
    assert_eq!(check(&text, "state"), "running", "systemd not degraded");
    assert_eq!(check(&text, "run0"), "install ok installed");
    assert_eq!(check(&text, "run1"), "trixie");
    assert!(text.contains("LTSP-DOCKER-RCFILE ran on docker-node-1"));
}
