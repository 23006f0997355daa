//! What LTSP's init scripts did to the new root, as file operations on a path: fstab,
//! rc.local, hostname, hosts, DNS, time zone, services. Tested on temporary directories;
//! at boot the path is the overlay root before switch_root.

use ltsp_common::ltsconf::Resolved;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Units a diskless node must not run, masked unless KEEP_SYSTEM_SERVICES names them.
/// The first group would reconfigure or take down the boot NIC that carries the root
/// filesystem, or wait for a network that is already up; the second writes to a disk
/// that is RAM and vanishes at reboot, or upgrades an image that a reboot replaces.
pub const DEFAULT_MASKED: &[&str] = &[
    "networking.service",
    "ifupdown-wait-online.service",
    "systemd-networkd-wait-online.service",
    "NetworkManager-wait-online.service",
    "dhcpcd.service",
    "wpa_supplicant.service",
    "ModemManager.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "unattended-upgrades.service",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
];

/// Everything `apply` needs to know about the node besides lts.conf.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<String>,
    pub iface: Option<String>,
    pub server: Option<Ipv4Addr>,
    /// Hostname from DHCP or `ip=`, used when lts.conf sets none.
    pub hostname: Option<String>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("HOSTNAME {0:?}: not a valid host name (letters, digits, '-', '.'; 1-253 chars)")]
    BadHostname(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What was done, for the log and the `apply` command's output.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub written: Vec<String>,
    pub masked: Vec<String>,
    pub warnings: Vec<String>,
}

/// `PREINIT_*` values in natural key order: run by the boot just before exec init.
pub fn preinit_commands(cfg: &Resolved) -> Vec<String> {
    cfg.list("PREINIT_")
        .into_iter()
        .map(|(_, v)| v.to_string())
        .collect()
}

/// The hostname the node gets: HOSTNAME, else the one DHCP or `ip=` gave, else
/// HOSTNAME_BASE (default `ltsp`) with HOSTNAME_EXTRA: `ip` (default, last octet) or
/// `mac` (the MAC's hex digits), as LTSP5 built it.
pub fn hostname(cfg: &Resolved, node: &Node) -> Option<String> {
    if let Some(h) = cfg.get("HOSTNAME") {
        return Some(h.to_string());
    }
    if let Some(h) = &node.hostname {
        return Some(h.clone());
    }
    let base = cfg.get("HOSTNAME_BASE").unwrap_or("ltsp");
    match cfg.get("HOSTNAME_EXTRA").unwrap_or("ip") {
        e if e.eq_ignore_ascii_case("mac") => node
            .mac
            .as_ref()
            .map(|m| format!("{base}{}", m.replace([':', '-'], "").to_ascii_lowercase())),
        _ => node.ip.map(|ip| format!("{base}{}", ip.octets()[3])),
    }
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn write(
    root: &Path,
    rel: &str,
    content: &str,
    mode: u32,
    report: &mut Report,
) -> Result<(), ApplyError> {
    let path = root.join(rel.trim_start_matches('/'));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
    }
    // A symlink here (resolv.conf -> /run/...) would make us write outside the root.
    if path.is_symlink() {
        fs::remove_file(&path).map_err(io_at(&path))?;
    }
    fs::write(&path, content).map_err(io_at(&path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_at(&path))?;
    report.written.push(rel.to_string());
    Ok(())
}

/// Applies `cfg` for `node` to the tree at `root`.
pub fn apply(root: &Path, cfg: &Resolved, node: &Node) -> Result<Report, ApplyError> {
    let mut r = Report::default();
    fstab(root, cfg, &mut r)?;
    rc_local(root, cfg, &mut r)?;
    hosts(root, cfg, node, &mut r)?;
    dns(root, cfg, node, &mut r)?;
    timezone(root, cfg, &mut r)?;
    boot_nic_unmanaged(root, node, &mut r)?;
    services(root, cfg, &mut r)?;
    Ok(r)
}

fn fstab(root: &Path, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
    let lines = cfg.list("FSTAB_");
    if lines.is_empty() {
        return Ok(());
    }
    let mut s = String::from("# Written by ltsp-agent from lts.conf FSTAB_* at boot.\n");
    for (_, v) in lines {
        s.push_str(v);
        s.push('\n');
    }
    write(root, "/etc/fstab", &s, 0o644, r)
}

fn rc_local(root: &Path, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
    let lines = cfg.list("RCFILE_");
    if lines.is_empty() {
        return Ok(());
    }
    let path = root.join("etc/rc.local");
    let mut s = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => "#!/bin/sh\n".to_string(),
        Err(e) => return Err(io_at(&path)(e)),
    };
    // An `exit 0` at the end would stop our lines from running: drop it.
    let trimmed = s.trim_end();
    if let Some(cut) = trimmed.strip_suffix("exit 0") {
        if cut.is_empty() || cut.ends_with('\n') {
            s = cut.to_string();
        }
    }
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str("# Added by ltsp-agent from lts.conf RCFILE_* at boot.\n");
    for (_, v) in lines {
        s.push_str(v);
        s.push('\n');
    }
    write(root, "/etc/rc.local", &s, 0o755, r)
}

fn hosts(root: &Path, cfg: &Resolved, node: &Node, r: &mut Report) -> Result<(), ApplyError> {
    let Some(name) = hostname(cfg, node) else {
        r.warnings
            .push("no hostname: neither HOSTNAME, DHCP, nor an IP address to build one".into());
        return Ok(());
    };
    if !valid_hostname(&name) {
        return Err(ApplyError::BadHostname(name));
    }
    write(root, "/etc/hostname", &format!("{name}\n"), 0o644, r)?;
    let short = name.split('.').next().unwrap_or(&name);
    let mut s = String::from(
        "# Written by ltsp-agent at boot.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    // The hostname maps to the node's real address, never a loopback one: kubeadm and
    // many cluster tools take the address the hostname resolves to as the node's.
    if let Some(ip) = node.ip {
        if short != name {
            s.push_str(&format!("{ip}\t{name} {short}\n"));
        } else {
            s.push_str(&format!("{ip}\t{name}\n"));
        }
    }
    if let Some(server) = node.server {
        s.push_str(&format!("{server}\tserver\n"));
    }
    for (_, v) in cfg.list("HOSTS_") {
        s.push_str(v);
        s.push('\n');
    }
    write(root, "/etc/hosts", &s, 0o644, r)
}

fn dns(root: &Path, cfg: &Resolved, node: &Node, r: &mut Report) -> Result<(), ApplyError> {
    let servers: Vec<String> = match cfg.get("DNS_SERVER") {
        Some(v) => v.split_whitespace().map(str::to_string).collect(),
        None => node.dns.iter().map(|d| d.to_string()).collect(),
    };
    let search = cfg
        .get("SEARCH_DOMAIN")
        .map(str::to_string)
        .or_else(|| node.domain.clone());
    if servers.is_empty() && search.is_none() {
        return Ok(());
    }
    let mut s = String::from("# Written by ltsp-agent at boot.\n");
    if let Some(d) = search {
        s.push_str(&format!("search {d}\n"));
    }
    for d in servers {
        s.push_str(&format!("nameserver {d}\n"));
    }
    write(root, "/etc/resolv.conf", &s, 0o644, r)
}

fn timezone(root: &Path, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
    let Some(tz) = cfg.get("TIMEZONE") else {
        return Ok(());
    };
    if tz.contains("..") || tz.starts_with('/') {
        r.warnings
            .push(format!("TIMEZONE {tz:?}: not a zone name; left alone"));
        return Ok(());
    }
    let zone = format!("/usr/share/zoneinfo/{tz}");
    if !root.join(zone.trim_start_matches('/')).exists() {
        r.warnings.push(format!(
            "TIMEZONE {tz:?}: {zone} is not in the image; left alone"
        ));
        return Ok(());
    }
    let link = root.join("etc/localtime");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&zone, &link).map_err(io_at(&link))?;
    r.written.push("/etc/localtime".into());
    write(root, "/etc/timezone", &format!("{tz}\n"), 0o644, r)
}

/// The boot NIC carries the root filesystem: network managers in the image must leave it
/// alone, while they may still manage the node's other NICs.
fn boot_nic_unmanaged(root: &Path, node: &Node, r: &mut Report) -> Result<(), ApplyError> {
    let Some(iface) = &node.iface else {
        return Ok(());
    };
    write(
        root,
        "/etc/systemd/network/00-ltsp-boot-nic.network",
        &format!("# ltsp-agent: the root filesystem runs over this NIC.\n[Match]\nName={iface}\n\n[Link]\nUnmanaged=yes\n"),
        0o644,
        r,
    )?;
    write(
        root,
        "/etc/NetworkManager/conf.d/00-ltsp-boot-nic.conf",
        &format!("# ltsp-agent: the root filesystem runs over this NIC.\n[keyfile]\nunmanaged-devices=interface-name:{iface}\n"),
        0o644,
        r,
    )
}

fn unit_name(n: &str) -> String {
    if n.contains('.') {
        n.to_string()
    } else {
        format!("{n}.service")
    }
}

fn unit_exists(root: &Path, unit: &str) -> bool {
    [
        "etc/systemd/system",
        "lib/systemd/system",
        "usr/lib/systemd/system",
    ]
    .iter()
    .any(|d| root.join(d).join(unit).symlink_metadata().is_ok())
}

fn services(root: &Path, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
    let keep: Vec<String> = cfg
        .get("KEEP_SYSTEM_SERVICES")
        .unwrap_or("")
        .split_whitespace()
        .map(unit_name)
        .collect();
    let extra: Vec<String> = cfg
        .get("RM_SYSTEM_SERVICES")
        .unwrap_or("")
        .split_whitespace()
        .map(unit_name)
        .collect();
    let dir = root.join("etc/systemd/system");
    for unit in DEFAULT_MASKED.iter().map(|s| s.to_string()).chain(extra) {
        if keep.contains(&unit) || !unit_exists(root, &unit) {
            continue;
        }
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let link = dir.join(&unit);
        // Masking, the systemd way: the unit file stays, a /dev/null link overrides it.
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).map_err(io_at(&link))?;
        }
        std::os::unix::fs::symlink("/dev/null", &link).map_err(io_at(&link))?;
        r.masked.push(unit);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ltsp_common::ltsconf::{parse, Identity};

    fn resolved(text: &str) -> Resolved {
        let c = parse("t", text);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        c.resolve(&Identity::default())
    }

    fn node() -> Node {
        Node {
            ip: Some(Ipv4Addr::new(192, 0, 2, 42)),
            mac: Some("52:54:00:12:34:56".into()),
            iface: Some("ens3".into()),
            server: Some(Ipv4Addr::new(192, 0, 2, 1)),
            hostname: None,
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
            domain: Some("lab.example".into()),
        }
    }

    #[test]
    fn rc_local_keeps_existing_lines_and_drops_trailing_exit() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        fs::write(
            d.path().join("etc/rc.local"),
            "#!/bin/sh -e\necho image\nexit 0\n\n",
        )
        .unwrap();
        let cfg = resolved("[default]\nRCFILE_10 = echo ten\nRCFILE_2 = echo two\n");
        apply(d.path(), &cfg, &Node::default()).unwrap();
        let path = d.path().join("etc/rc.local");
        let s = fs::read_to_string(&path).unwrap();
        assert_eq!(
            s,
            "#!/bin/sh -e\necho image\n# Added by ltsp-agent from lts.conf RCFILE_* at boot.\necho two\necho ten\n"
        );
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn rc_local_created_when_absent() {
        let d = tempfile::tempdir().unwrap();
        let cfg = resolved("[default]\nRCFILE_1 = echo one\n");
        apply(d.path(), &cfg, &Node::default()).unwrap();
        let s = fs::read_to_string(d.path().join("etc/rc.local")).unwrap();
        assert!(
            s.starts_with("#!/bin/sh\n") && s.ends_with("echo one\n"),
            "{s}"
        );
    }

    #[test]
    fn hostname_rules() {
        let n = node();
        assert_eq!(
            hostname(&resolved("[default]\nHOSTNAME = a\n"), &n).as_deref(),
            Some("a")
        );
        assert_eq!(
            hostname(&resolved("[default]\nX = 1\n"), &n).as_deref(),
            Some("ltsp42")
        );
        assert_eq!(
            hostname(
                &resolved("[default]\nHOSTNAME_BASE = k8s-\nHOSTNAME_EXTRA = mac\n"),
                &n
            )
            .as_deref(),
            Some("k8s-525400123456")
        );
        let with_dhcp = Node {
            hostname: Some("dhcp-name".into()),
            ..n
        };
        assert_eq!(
            hostname(&resolved("[default]\nX = 1\n"), &with_dhcp).as_deref(),
            Some("dhcp-name")
        );
    }

    #[test]
    fn hosts_never_map_the_hostname_to_loopback() {
        let d = tempfile::tempdir().unwrap();
        let cfg = resolved("[default]\nHOSTNAME = node7.lab\nHOSTS_01 = 192.0.2.20 kube-api\n");
        apply(d.path(), &cfg, &node()).unwrap();
        let h = fs::read_to_string(d.path().join("etc/hosts")).unwrap();
        for line in h.lines().filter(|l| l.contains("node7")) {
            assert!(line.starts_with("192.0.2.42\t"), "{line}");
        }
        assert!(h.contains("192.0.2.42\tnode7.lab node7\n"));
        assert!(
            h.ends_with("192.0.2.1\tserver\n192.0.2.20 kube-api\n"),
            "{h}"
        );
        assert_eq!(
            fs::read_to_string(d.path().join("etc/hostname")).unwrap(),
            "node7.lab\n"
        );
        let bad = resolved("[default]\nHOSTNAME = bad_name!\n");
        assert!(matches!(
            apply(d.path(), &bad, &node()),
            Err(ApplyError::BadHostname(_))
        ));
    }

    #[test]
    fn dns_from_lts_conf_wins_over_dhcp_and_replaces_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(
            "/run/systemd/resolve/stub-resolv.conf",
            d.path().join("etc/resolv.conf"),
        )
        .unwrap();
        apply(d.path(), &resolved("[default]\nX = 1\n"), &node()).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("etc/resolv.conf")).unwrap(),
            "# Written by ltsp-agent at boot.\nsearch lab.example\nnameserver 192.0.2.53\n"
        );
        apply(
            d.path(),
            &resolved("[default]\nDNS_SERVER = 1.1.1.1 9.9.9.9\nSEARCH_DOMAIN = x\n"),
            &node(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("etc/resolv.conf")).unwrap(),
            "# Written by ltsp-agent at boot.\nsearch x\nnameserver 1.1.1.1\nnameserver 9.9.9.9\n"
        );
    }

    #[test]
    fn services_are_masked_unless_kept() {
        let d = tempfile::tempdir().unwrap();
        let lib = d.path().join("lib/systemd/system");
        fs::create_dir_all(&lib).unwrap();
        for u in [
            "networking.service",
            "apt-daily.timer",
            "ssh.service",
            "cron.service",
        ] {
            fs::write(lib.join(u), "[Unit]\n").unwrap();
        }
        let cfg =
            resolved("[default]\nKEEP_SYSTEM_SERVICES = networking\nRM_SYSTEM_SERVICES = cron\n");
        let r = apply(d.path(), &cfg, &Node::default()).unwrap();
        assert_eq!(r.masked, vec!["apt-daily.timer", "cron.service"]);
        let link = d.path().join("etc/systemd/system/apt-daily.timer");
        assert_eq!(fs::read_link(link).unwrap(), Path::new("/dev/null"));
        assert!(
            lib.join("apt-daily.timer").exists(),
            "unit files are never deleted"
        );
        assert!(!d
            .path()
            .join("etc/systemd/system/networking.service")
            .exists());
    }

    #[test]
    fn timezone_and_boot_nic() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("usr/share/zoneinfo/Europe")).unwrap();
        fs::write(d.path().join("usr/share/zoneinfo/Europe/Prague"), "TZif").unwrap();
        let r = apply(
            d.path(),
            &resolved("[default]\nTIMEZONE = Europe/Prague\n"),
            &node(),
        )
        .unwrap();
        assert_eq!(
            fs::read_link(d.path().join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/Europe/Prague")
        );
        assert!(r.warnings.is_empty());
        let net = fs::read_to_string(
            d.path()
                .join("etc/systemd/network/00-ltsp-boot-nic.network"),
        )
        .unwrap();
        assert!(net.contains("Name=ens3") && net.contains("Unmanaged=yes"));
        let r = apply(
            d.path(),
            &resolved("[default]\nTIMEZONE = Mars/Base\n"),
            &node(),
        )
        .unwrap();
        assert_eq!(r.warnings.len(), 1);
    }
}
