//! The agent's real code on the host: the overlay root over a loop-mounted squashfs (needs root:
//! ignored otherwise, run by tests/run-all), and the NBD handshake against ltsp-server and
//! against nbd-server.

use ltsp_agent::nbd::handshake;
use ltsp_agent::{apply, rootfs, system, toram};
use ltsp_common::cmdline::NbdTarget;
use ltsp_tests::{pattern, run, tool, ServerProc};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

struct Mounted {
    points: Vec<String>,
    loopdev: Option<String>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for p in self.points.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        if let Some(l) = &self.loopdev {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
    }
}

#[test]
#[ignore = "needs root: loop devices and mounts"]
fn overlay_root_over_a_loop_mounted_squashfs() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("etc/ssh")).unwrap();
    std::fs::write(src.join("etc/hostname"), "image\n").unwrap();
    std::fs::write(src.join("etc/ssh/sshd_config"), "Port 22\n").unwrap();
    let img = d.path().join("root.squashfs");
    let (ok, _, err) = run(Command::new(tool("mksquashfs")).arg(&src).arg(&img).args([
        "-comp",
        "zstd",
        "-quiet",
        "-noappend",
    ]));
    assert!(ok, "{err}");
    let (ok, out, err) = run(Command::new(tool("losetup"))
        .args(["-f", "--show", "-r"])
        .arg(&img));
    assert!(ok, "{err}");
    let mut guard = Mounted {
        points: vec![],
        loopdev: Some(out.trim().to_string()),
    };
    let run_dir = d.path().join("run").display().to_string();
    let newroot = d.path().join("root").display().to_string();
    std::fs::create_dir_all(&run_dir).unwrap();
    let lower = rootfs::lower_dir(&run_dir);
    let rw = rootfs::rw_dir(&run_dir);
    guard.points = vec![
        lower.clone(),
        rw.clone(),
        newroot.clone(),
        format!("{newroot}/rofs"),
    ];
    // As the boot does it: layers, lts.conf applied into the upper layer, then the overlay.
    rootfs::mount_layers(&system::Real, out.trim(), "16M", &run_dir).expect("mount_layers");
    let upper = rootfs::upper_dir(&run_dir);
    let tree = apply::Tree::layers(Path::new(&lower), Path::new(&upper)).expect("a real /etc");
    let conf = ltsp_common::ltsconf::parse("t", "[default]\nHOSTNAME = node\nRCFILE_1 = echo rc\n")
        .resolve(&Default::default());
    apply::apply(tree, &conf, &apply::Node::default()).expect("apply");
    rootfs::mount_overlay(&system::Real, &run_dir, &newroot).expect("mount_overlay");

    let root = Path::new(&newroot);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "node\n"
    );
    // The image's /etc merges with the written one.
    assert!(root.join("etc/ssh/sshd_config").exists());
    assert!(std::fs::read_to_string(root.join("etc/rc.local"))
        .unwrap()
        .ends_with("echo rc\n"));
    // Writes land in the tmpfs, never in the image.
    std::fs::write(root.join("etc/ssh/sshd_config"), "Port 2222\n").unwrap();
    std::fs::write(root.join("new-file"), "x").unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(&rw).join("upper/etc/ssh/sshd_config")).unwrap(),
        "Port 2222\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("rofs/etc/hostname")).unwrap(),
        "image\n"
    );
    assert!(
        std::fs::write(root.join("rofs/x"), "y").is_err(),
        "the lower layer is read-only"
    );
    // The fixture's RCFILE_01 copies from /rofs/etc/ssh: it must be there.
    assert!(root.join("rofs/etc/ssh/sshd_config").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(newroot.as_str()))
        .expect("overlay mounted");
    assert!(line.contains(" - overlay overlay "), "{line}");
    let tmpfs = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(rw.as_str()))
        .unwrap();
    assert!(tmpfs.contains("size=16384k"), "{tmpfs}");
}

/// `ltsp.to-ram=1` with the real syscalls: a squashfs standing for the NBD device is
/// copied into a tmpfs, checked against its identity, served by a read-only loop device
/// (LOOP_CONFIGURE), and mounts as the root's lower layer.
#[test]
#[ignore = "needs root: tmpfs, loop devices and mounts"]
fn to_ram_copies_the_image_into_a_read_only_loop_device_that_mounts() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "in-ram\n").unwrap();
    let img = d.path().join("root.squashfs");
    let (ok, _, err) = run(Command::new(tool("mksquashfs"))
        .arg(&src)
        .arg(&img)
        .args(["-quiet", "-noappend"]));
    assert!(ok, "{err}");
    let bytes = std::fs::read(&img).unwrap();
    let id = format!("blake3:{}", blake3::hash(&bytes).to_hex());
    let run_dir = d.path().join("run").display().to_string();
    let ram = toram::ram_dir(&run_dir);
    let lower = rootfs::lower_dir(&run_dir);
    let mut guard = Mounted {
        points: vec![ram.clone(), lower.clone(), rootfs::rw_dir(&run_dir)],
        loopdev: None,
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let dev = toram::to_ram(
        &system::Real,
        &run_dir,
        &img.display().to_string(),
        bytes.len() as u64,
        Some(&id),
        &meminfo,
        deadline,
    )
    .expect("to_ram");
    guard.loopdev = Some(dev.clone());
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(
        std::fs::read(&dev).unwrap(),
        bytes,
        "the loop device reads the image"
    );
    let name = dev.trim_start_matches("/dev/");
    assert_eq!(
        std::fs::read_to_string(format!("/sys/block/{name}/ro"))
            .unwrap()
            .trim(),
        "1",
        "the loop device is read-only"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(ram.as_str()) && l.contains(" - tmpfs ")),
        "the copy is in a tmpfs of its own"
    );
    rootfs::mount_layers(&system::Real, &dev, "16M", &run_dir).expect("mount_layers");
    assert_eq!(
        std::fs::read_to_string(Path::new(&lower).join("etc/hostname")).unwrap(),
        "in-ram\n"
    );
    // Other bytes than the identity: refused, and the tmpfs given back.
    let other = d.path().join("run2").display().to_string();
    let wrong = format!("blake3:{}", "0".repeat(64));
    let e = toram::to_ram(
        &system::Real,
        &other,
        &img.display().to_string(),
        bytes.len() as u64,
        Some(&wrong),
        &meminfo,
        deadline,
    )
    .unwrap_err();
    assert!(matches!(e, toram::ToRamError::Mismatch { .. }), "{e}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ram2 = toram::ram_dir(&other);
    assert!(
        !mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(ram2.as_str())),
        "unmounted after the mismatch"
    );
}

fn target(addr: std::net::SocketAddr, export: &str) -> NbdTarget {
    NbdTarget {
        host: Some(addr.ip().to_string()),
        port: addr.port(),
        export: export.into(),
    }
}

#[test]
fn handshake_against_ltsp_server() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("img"), pattern(1 << 20, 1)).unwrap();
    let s = ServerProc::start(&[
        "--no-tftp",
        "--export",
        &format!("root={}", d.path().join("img").display()),
    ]);
    let c = handshake::connect(&target(s.nbd.unwrap(), "root"), Duration::from_secs(5)).unwrap();
    assert_eq!(c.info.size, 1 << 20);
    assert!(c.info.description.unwrap().contains("ltsp-rs image root"));
    let e = handshake::connect(&target(s.nbd.unwrap(), "missing"), Duration::from_secs(5))
        .err()
        .unwrap();
    assert!(e.to_string().contains("does not exist"), "{e}");
    let dead = NbdTarget {
        host: Some("127.0.0.1".into()),
        port: 1,
        export: String::new(),
    };
    assert!(matches!(
        handshake::connect(&dead, Duration::from_secs(2)),
        Err(handshake::HandshakeError::Connect { .. })
    ));
}

#[test]
fn handshake_against_nbd_server() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img");
    std::fs::write(&img, pattern(2 << 20, 2)).unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let conf = d.path().join("nbd.conf");
    std::fs::write(
        &conf,
        format!("[generic]\nlistenaddr = 127.0.0.1\nport = {port}\nallowlist = true\n[root]\nexportname = {}\nreadonly = true\n", img.display()),
    )
    .unwrap();
    let mut child = Command::new(tool("nbd-server"))
        .args(["-C"])
        .arg(&conf)
        .arg("-d")
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut result = None;
    for _ in 0..100 {
        match handshake::connect(&target(addr, "root"), Duration::from_secs(5)) {
            Ok(c) => {
                result = Some(c);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let c = result.expect("handshake with nbd-server");
    assert_eq!(c.info.size, 2 << 20);
    assert!(c.info.flags & ltsp_common::nbd::TFLAG_READ_ONLY != 0);
}

#[test]
fn a_server_that_accepts_and_says_nothing_is_named_hung() {
    // The kernel accepts into the backlog while the process is stopped: no greeting.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let t0 = std::time::Instant::now();
    let e = handshake::connect(
        &target(l.local_addr().unwrap(), "root"),
        Duration::from_secs(1),
    )
    .err()
    .expect("no greeting, no connection");
    assert!(
        matches!(e, handshake::HandshakeError::Silent { secs: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("hung or overloaded"));
    // Loose: without the deadline it would wait for a greeting forever.
    assert!(t0.elapsed() < Duration::from_secs(30));
}
