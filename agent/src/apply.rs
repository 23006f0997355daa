//! What LTSP's init scripts did to the new root, as file operations on a [`Tree`]: fstab,
//! rc.local, hostname, hosts, DNS, time zone, services. Tested on temporary directories.
//! At boot the tree is the overlay's layers before the overlay is mounted: the files go
//! straight into the tmpfs upper layer, so the overlay never copies a file up (under
//! QEMU TCG that was most of this step's ~50 ms).

use ltsp_common::ltsconf::Resolved;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// The lts.conf key that bounds the PREINIT commands' run time; not a command itself.
pub const PREINIT_TIMEOUT: &str = "PREINIT_TIMEOUT";

/// How long the PREINIT commands may run, all together, when PREINIT_TIMEOUT is not set:
/// enough for a mount, a download or a fetch of keys over a slow link; what takes longer
/// belongs in a systemd unit, where it does not hold up the boot.
pub const PREINIT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// `PREINIT_*` keys and values in natural key order (PREINIT_TIMEOUT left out): run by
/// the boot just before exec init.
pub fn preinit_commands(cfg: &Resolved) -> Vec<(String, String)> {
    cfg.list("PREINIT_")
        .into_iter()
        .filter(|(k, _)| *k != PREINIT_TIMEOUT)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// PREINIT_TIMEOUT in whole seconds (1 to a day), else the default with a warning.
pub fn preinit_timeout(cfg: &Resolved) -> (Duration, Option<String>) {
    let Some(v) = cfg.get(PREINIT_TIMEOUT) else {
        return (PREINIT_TIMEOUT_DEFAULT, None);
    };
    match v.trim().parse::<u64>() {
        Ok(n @ 1..=86400) => (Duration::from_secs(n), None),
        _ => (
            PREINIT_TIMEOUT_DEFAULT,
            Some(format!(
                "{PREINIT_TIMEOUT} {v:?}: expected whole seconds, 1 to 86400; using {}",
                PREINIT_TIMEOUT_DEFAULT.as_secs()
            )),
        ),
    }
}

/// The hostname the node gets: HOSTNAME, else the one DHCP or `ip=` gave, else
/// HOSTNAME_BASE (default `ltsp`) with HOSTNAME_EXTRA: `ip` (default, last octet) or
/// `mac` (the MAC's hex digits), as LTSP5 built it. An invalid name is never used: the
/// next source is, and a warning names the value and where it came from.
pub fn hostname(cfg: &Resolved, node: &Node) -> Option<String> {
    choose_hostname(cfg, node).0
}

/// [`hostname`], with a warning for each invalid name passed over.
pub fn choose_hostname(cfg: &Resolved, node: &Node) -> (Option<String>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut take = |name: &str, source: &str| {
        // An absolute name's final dot (from DHCP) is not part of the host name.
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        if valid_hostname(trimmed) {
            Some(trimmed.to_string())
        } else {
            warnings.push(format!(
                "hostname {name:?} from {source} is not a valid host name \
                 (letters, digits, '-', '.'; at most 64 chars): not used"
            ));
            None
        }
    };
    let chosen = cfg
        .get("HOSTNAME")
        .and_then(|h| take(h, "lts.conf HOSTNAME"))
        .or_else(|| {
            node.hostname
                .as_deref()
                .and_then(|h| take(h, "DHCP or ip="))
        })
        .or_else(|| {
            let base = cfg.get("HOSTNAME_BASE").unwrap_or("ltsp");
            generated(base, cfg, node)
                .and_then(|h| take(&h, "HOSTNAME_BASE"))
                .or_else(|| generated("ltsp", cfg, node))
        });
    if let (Some(name), false) = (&chosen, warnings.is_empty()) {
        warnings.push(format!("hostname: using {name:?} instead"));
    }
    (chosen, warnings)
}

fn generated(base: &str, cfg: &Resolved, node: &Node) -> Option<String> {
    match cfg.get("HOSTNAME_EXTRA").unwrap_or("ip") {
        e if e.eq_ignore_ascii_case("mac") => node
            .mac
            .as_ref()
            .map(|m| format!("{base}{}", m.replace([':', '-'], "").to_ascii_lowercase())),
        _ => node.ip.map(|ip| format!("{base}{}", ip.octets()[3])),
    }
}

/// A name sethostname(2) and systemd take: at most 64 bytes (HOST_NAME_MAX), dot-separated
/// labels of letters, digits and inner hyphens.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Directories apply writes into. [`Tree::layers`] needs each to be a directory or absent
/// in the image: a symlinked one would have to be followed as the overlay follows it.
const WRITTEN_DIRS: &[&str] = &[
    "etc",
    "etc/systemd",
    "etc/systemd/system",
    "etc/systemd/network",
    "etc/NetworkManager",
    "etc/NetworkManager/conf.d",
];

/// The root apply works on.
#[derive(Debug, Clone, Copy)]
pub enum Tree<'a> {
    /// One directory: a mounted root, or an image tree (`ltsp-agent apply DIR`).
    Dir(&'a Path),
    /// An overlay's layers before it is mounted: reads see `upper` over `lower` as the
    /// overlay will; writes go to `upper`, its parent directories made with the mode,
    /// owner and mtime of the image's.
    Layers { lower: &'a Path, upper: &'a Path },
}

impl<'a> Tree<'a> {
    /// The layers, if apply can write into them directly: every directory it writes into
    /// is a real directory in `lower`, or absent. None otherwise (mount the overlay and
    /// use [`Tree::Dir`]).
    pub fn layers(lower: &'a Path, upper: &'a Path) -> Option<Tree<'a>> {
        WRITTEN_DIRS
            .iter()
            .all(|d| match lower.join(d).symlink_metadata() {
                Ok(m) => m.is_dir(),
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            })
            .then_some(Tree::Layers { lower, upper })
    }

    /// Where `rel` is read from: the upper layer's entry if it has one.
    fn path(&self, rel: &str) -> PathBuf {
        let rel = rel.trim_start_matches('/');
        match self {
            Tree::Dir(root) => root.join(rel),
            Tree::Layers { lower, upper } => {
                let u = upper.join(rel);
                if u.symlink_metadata().is_ok() {
                    u
                } else {
                    lower.join(rel)
                }
            }
        }
    }

    /// `rel` exists (a symlink counts, followed or not).
    fn exists(&self, rel: &str) -> bool {
        self.path(rel).symlink_metadata().is_ok()
    }

    fn read(&self, rel: &str) -> io::Result<String> {
        fs::read_to_string(self.path(rel))
    }

    /// The path to create `rel` at, its parents made and an old entry removed.
    fn create(&self, rel: &str) -> Result<PathBuf, ApplyError> {
        let rel = rel.trim_start_matches('/');
        let (root, lower) = match self {
            Tree::Dir(root) => (*root, None),
            Tree::Layers { lower, upper } => (*upper, Some(*lower)),
        };
        let path = root.join(rel);
        if let Some(parent) = Path::new(rel).parent() {
            match lower {
                None => {
                    let dir = root.join(parent);
                    fs::create_dir_all(&dir).map_err(io_at(&dir))?
                }
                Some(lower) => mirror_dirs(lower, root, parent)?,
            }
        }
        // A symlink here (resolv.conf -> /run/...) would make us write outside the root.
        if path.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(&path).map_err(io_at(&path))?;
        }
        Ok(path)
    }

    fn write(
        &self,
        rel: &str,
        content: &str,
        mode: u32,
        report: &mut Report,
    ) -> Result<(), ApplyError> {
        let path = self.create(rel)?;
        fs::write(&path, content).map_err(io_at(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_at(&path))?;
        report.written.push(rel.to_string());
        Ok(())
    }

    fn symlink(&self, target: &str, rel: &str) -> Result<(), ApplyError> {
        let path = self.create(rel)?;
        std::os::unix::fs::symlink(target, &path).map_err(io_at(&path))
    }
}

/// Makes `upper/dir` and its parents as the overlay would on copy-up: each with the mode,
/// owner and mtime of the image's directory, or root's 0755 where the image has none.
fn mirror_dirs(lower: &Path, upper: &Path, dir: &Path) -> Result<(), ApplyError> {
    let mut rel = PathBuf::new();
    for part in dir.components() {
        rel.push(part);
        let u = upper.join(&rel);
        if u.is_dir() {
            continue;
        }
        fs::create_dir(&u).map_err(io_at(&u))?;
        let Ok(m) = lower.join(&rel).symlink_metadata() else {
            fs::set_permissions(&u, fs::Permissions::from_mode(0o755)).map_err(io_at(&u))?;
            continue;
        };
        std::os::unix::fs::lchown(&u, Some(m.uid()), Some(m.gid())).map_err(io_at(&u))?;
        fs::set_permissions(&u, fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(io_at(&u))?;
        let mtime = nix::sys::time::TimeSpec::new(m.mtime(), m.mtime_nsec());
        nix::sys::stat::utimensat(
            None,
            &u,
            &mtime,
            &mtime,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_at(&u)(e.into()))?;
    }
    Ok(())
}

/// Applies `cfg` for `node` to `tree`.
pub fn apply(tree: Tree, cfg: &Resolved, node: &Node) -> Result<Report, ApplyError> {
    let mut r = Report::default();
    fstab(tree, cfg, &mut r)?;
    rc_local(tree, cfg, &mut r)?;
    hosts(tree, cfg, node, &mut r)?;
    dns(tree, cfg, node, &mut r)?;
    timezone(tree, cfg, &mut r)?;
    boot_nic_unmanaged(tree, node, &mut r)?;
    services(tree, cfg, &mut r)?;
    Ok(r)
}

fn fstab(root: Tree, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
    let lines = cfg.list("FSTAB_");
    if lines.is_empty() {
        return Ok(());
    }
    let mut s = String::from("# Written by ltsp-agent from lts.conf FSTAB_* at boot.\n");
    for (_, v) in lines {
        s.push_str(v);
        s.push('\n');
    }
    root.write("/etc/fstab", &s, 0o644, r)
}

fn rc_local(root: Tree, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
    let lines = cfg.list("RCFILE_");
    if lines.is_empty() {
        return Ok(());
    }
    let mut s = match root.read("/etc/rc.local") {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => "#!/bin/sh\n".to_string(),
        Err(e) => return Err(io_at(&root.path("/etc/rc.local"))(e)),
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
    root.write("/etc/rc.local", &s, 0o755, r)
}

fn hosts(root: Tree, cfg: &Resolved, node: &Node, r: &mut Report) -> Result<(), ApplyError> {
    let (name, warnings) = choose_hostname(cfg, node);
    r.warnings.extend(warnings);
    let Some(name) = name else {
        r.warnings.push(
            "no hostname: neither a valid HOSTNAME, DHCP name, nor an IP address to build one"
                .into(),
        );
        return Ok(());
    };
    root.write("/etc/hostname", &format!("{name}\n"), 0o644, r)?;
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
    root.write("/etc/hosts", &s, 0o644, r)
}

fn dns(root: Tree, cfg: &Resolved, node: &Node, r: &mut Report) -> Result<(), ApplyError> {
    // Each value becomes a line of resolv.conf: anything but an address or a domain name
    // (a newline from a cmdline override, say) is left out, never written.
    let servers: Vec<String> = match cfg.get("DNS_SERVER") {
        Some(v) => v
            .split_whitespace()
            .filter(|d| {
                let ok = d.parse::<std::net::IpAddr>().is_ok();
                if !ok {
                    r.warnings
                        .push(format!("DNS_SERVER {d:?}: not an IP address; left out"));
                }
                ok
            })
            .map(str::to_string)
            .collect(),
        None => node.dns.iter().map(|d| d.to_string()).collect(),
    };
    let (search, source) = match cfg.get("SEARCH_DOMAIN") {
        Some(v) => (Some(v.to_string()), "SEARCH_DOMAIN"),
        None => (node.domain.clone(), "the DHCP domain name"),
    };
    let search: Vec<&str> = search
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .filter(|d| {
            let ok = valid_domain(d);
            if !ok {
                r.warnings
                    .push(format!("{source} {d:?}: not a domain name; left out"));
            }
            ok
        })
        .collect();
    if servers.is_empty() && search.is_empty() {
        return Ok(());
    }
    let mut s = String::from("# Written by ltsp-agent at boot.\n");
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    for d in servers {
        s.push_str(&format!("nameserver {d}\n"));
    }
    root.write("/etc/resolv.conf", &s, 0o644, r)
}

/// A DNS domain as a search list takes it: dot-separated labels of letters, digits, '-'
/// and '_' (service names), an optional final dot, 253 bytes in all.
pub fn valid_domain(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn timezone(root: Tree, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
    let Some(tz) = cfg.get("TIMEZONE") else {
        return Ok(());
    };
    if tz.contains("..") || tz.starts_with('/') {
        r.warnings
            .push(format!("TIMEZONE {tz:?}: not a zone name; left alone"));
        return Ok(());
    }
    let zone = format!("/usr/share/zoneinfo/{tz}");
    if !root.exists(&zone) {
        r.warnings.push(format!(
            "TIMEZONE {tz:?}: {zone} is not in the image; left alone"
        ));
        return Ok(());
    }
    root.symlink(&zone, "/etc/localtime")?;
    r.written.push("/etc/localtime".into());
    root.write("/etc/timezone", &format!("{tz}\n"), 0o644, r)
}

/// The boot NIC carries the root filesystem: network managers in the image must leave it
/// alone, while they may still manage the node's other NICs.
fn boot_nic_unmanaged(root: Tree, node: &Node, r: &mut Report) -> Result<(), ApplyError> {
    let Some(iface) = &node.iface else {
        return Ok(());
    };
    root.write(
        "/etc/systemd/network/00-ltsp-boot-nic.network",
        &format!("# ltsp-agent: the root filesystem runs over this NIC.\n[Match]\nName={iface}\n\n[Link]\nUnmanaged=yes\n"),
        0o644,
        r,
    )?;
    root.write(
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

fn unit_exists(root: Tree, unit: &str) -> bool {
    [
        "etc/systemd/system",
        "lib/systemd/system",
        "usr/lib/systemd/system",
    ]
    .iter()
    .any(|d| root.exists(&format!("{d}/{unit}")))
}

fn services(root: Tree, cfg: &Resolved, r: &mut Report) -> Result<(), ApplyError> {
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
    for unit in DEFAULT_MASKED.iter().map(|s| s.to_string()).chain(extra) {
        if keep.contains(&unit) || !unit_exists(root, &unit) {
            continue;
        }
        // Masking, the systemd way: the unit file stays, a /dev/null link overrides it.
        root.symlink("/dev/null", &format!("etc/systemd/system/{unit}"))?;
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
        apply(Tree::Dir(d.path()), &cfg, &Node::default()).unwrap();
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
        apply(Tree::Dir(d.path()), &cfg, &Node::default()).unwrap();
        let s = fs::read_to_string(d.path().join("etc/rc.local")).unwrap();
        assert!(
            s.starts_with("#!/bin/sh\n") && s.ends_with("echo one\n"),
            "{s}"
        );
    }

    #[test]
    fn preinit_timeout_is_a_setting_not_a_command() {
        let cfg = resolved("[default]\nPREINIT_10 = b\nPREINIT_2 = a\nPREINIT_TIMEOUT = 5\n");
        assert_eq!(
            preinit_commands(&cfg),
            [
                ("PREINIT_2".to_string(), "a".to_string()),
                ("PREINIT_10".into(), "b".into())
            ]
        );
        assert_eq!(preinit_timeout(&cfg), (Duration::from_secs(5), None));
        assert_eq!(
            preinit_timeout(&resolved("[default]\nX = 1\n")),
            (PREINIT_TIMEOUT_DEFAULT, None)
        );
        for bad in ["0", "-1", "5s", "86401", ""] {
            let (t, w) = preinit_timeout(&resolved(&format!(
                "[default]\nPREINIT_TIMEOUT = \"{bad}\"\n"
            )));
            assert_eq!(t, PREINIT_TIMEOUT_DEFAULT, "{bad:?}");
            assert!(w.unwrap().contains(&format!("{bad:?}")), "{bad:?}");
        }
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
        apply(Tree::Dir(d.path()), &cfg, &node()).unwrap();
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
    }

    #[test]
    fn an_invalid_hostname_is_replaced_by_the_generated_one() {
        let d = tempfile::tempdir().unwrap();
        // A typo in lts.conf: warned about by value and source, never fatal.
        let bad = resolved("[default]\nHOSTNAME = bad_name!\n");
        let r = apply(Tree::Dir(d.path()), &bad, &node()).expect("a typo never fails apply");
        assert_eq!(
            fs::read_to_string(d.path().join("etc/hostname")).unwrap(),
            "ltsp42\n"
        );
        assert!(
            r.warnings[0].contains("\"bad_name!\" from lts.conf HOSTNAME"),
            "{:?}",
            r.warnings
        );
        assert!(
            r.warnings[1].contains("using \"ltsp42\""),
            "{:?}",
            r.warnings
        );
        assert!(fs::read_to_string(d.path().join("etc/hosts"))
            .unwrap()
            .contains("192.0.2.42\tltsp42\n"));
        // Hostile names from DHCP or ip=: shell syntax, a newline, a quote, a NUL, too long.
        for h in [
            "$(reboot)",
            "`reboot`",
            "n1\n192.0.2.66 server",
            "n1'x",
            "n1\0",
            &"a".repeat(65),
            "-lead",
            "trail-",
        ] {
            let n = Node {
                hostname: Some(h.into()),
                ..node()
            };
            let (name, w) = choose_hostname(&resolved("[default]\nX = 1\n"), &n);
            assert_eq!(name.as_deref(), Some("ltsp42"), "{h:?}");
            assert!(
                w[0].contains(&format!("{h:?} from DHCP or ip=")),
                "{h:?}: {w:?}"
            );
            assert!(!w[0].contains('\n'), "the warning is one line: {w:?}");
        }
        // An absolute name's final dot is dropped, not the name.
        let n = Node {
            hostname: Some("node9.lab.".into()),
            ..node()
        };
        assert_eq!(
            hostname(&resolved("[default]\nX = 1\n"), &n).as_deref(),
            Some("node9.lab")
        );
        // A bad HOSTNAME_BASE falls back to the default base.
        let (name, w) = choose_hostname(&resolved("[default]\nHOSTNAME_BASE = k 8\n"), &node());
        assert_eq!(name.as_deref(), Some("ltsp42"));
        assert!(w[0].contains("\"k 842\" from HOSTNAME_BASE"), "{w:?}");
    }

    #[test]
    fn resolv_conf_takes_only_addresses_and_domain_names() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = resolved("[default]\nX = 1\n");
        // What a cmdline override (ltsp.SEARCH_DOMAIN=...) could carry.
        cfg.set_override(
            "SEARCH_DOMAIN",
            "lab.example\nnameserver 203.0.113.66 $(x) _svc.ok.",
        );
        cfg.set_override("DNS_SERVER", "192.0.2.53 evil\nline 2001:db8::1");
        let r = apply(Tree::Dir(d.path()), &cfg, &node()).unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("etc/resolv.conf")).unwrap(),
            "# Written by ltsp-agent at boot.\n\
             search lab.example nameserver 203.0.113.66 _svc.ok.\n\
             nameserver 192.0.2.53\nnameserver 2001:db8::1\n",
            "a newline only separates words: no line of its own"
        );
        let left_out: Vec<_> = r
            .warnings
            .iter()
            .filter(|w| w.contains("left out"))
            .collect();
        assert_eq!(left_out.len(), 3, "{:?}", r.warnings);
        assert!(left_out[0].contains("\"evil\""), "{left_out:?}");
        assert!(left_out[2].contains("\"$(x)\""), "{left_out:?}");
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
        apply(
            Tree::Dir(d.path()),
            &resolved("[default]\nX = 1\n"),
            &node(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(d.path().join("etc/resolv.conf")).unwrap(),
            "# Written by ltsp-agent at boot.\nsearch lab.example\nnameserver 192.0.2.53\n"
        );
        apply(
            Tree::Dir(d.path()),
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
        let r = apply(Tree::Dir(d.path()), &cfg, &Node::default()).unwrap();
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
            Tree::Dir(d.path()),
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
            Tree::Dir(d.path()),
            &resolved("[default]\nTIMEZONE = Mars/Base\n"),
            &node(),
        )
        .unwrap();
        assert_eq!(r.warnings.len(), 1);
    }

    /// An image tree: /etc 0750 with an old mtime, rc.local, resolv.conf a symlink into
    /// /run, a zone, a unit to mask under a merged /usr (lib -> usr/lib).
    fn image(lower: &Path) {
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::write(lower.join("etc/rc.local"), "#!/bin/sh\necho image\n").unwrap();
        std::os::unix::fs::symlink("/run/resolv.conf", lower.join("etc/resolv.conf")).unwrap();
        fs::create_dir_all(lower.join("usr/share/zoneinfo/Europe")).unwrap();
        fs::write(lower.join("usr/share/zoneinfo/Europe/Prague"), "TZif").unwrap();
        fs::create_dir_all(lower.join("usr/lib/systemd/system")).unwrap();
        fs::write(
            lower.join("usr/lib/systemd/system/fstrim.timer"),
            "[Timer]\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("usr/lib", lower.join("lib")).unwrap();
        fs::set_permissions(lower.join("etc"), fs::Permissions::from_mode(0o750)).unwrap();
        let old = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
        nix::sys::stat::utimensat(
            None,
            &lower.join("etc"),
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }

    /// Every file and link below `root`, with its content or target.
    fn listing(root: &Path) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let m = p.symlink_metadata().unwrap();
                let rel = p.strip_prefix(root).unwrap().to_path_buf();
                if m.is_symlink() {
                    out.push((rel, format!("-> {}", fs::read_link(&p).unwrap().display())));
                } else if m.is_dir() {
                    dirs.push(p);
                } else {
                    out.push((rel, fs::read_to_string(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    const CONF: &str = "[default]\nRCFILE_1 = echo rc\nFSTAB_1 = tmpfs /tmp tmpfs 0 0\n\
                        TIMEZONE = Europe/Prague\nDNS_SERVER = 192.0.2.53\n";

    #[test]
    fn layered_writes_go_to_the_upper_layer_as_the_overlay_would_put_them() {
        let d = tempfile::tempdir().unwrap();
        let (lower, upper, plain) = (d.path().join("l"), d.path().join("u"), d.path().join("p"));
        image(&lower);
        image(&plain);
        fs::create_dir(&upper).unwrap();
        let before = listing(&lower);
        let tree = Tree::layers(&lower, &upper).expect("an image with a real /etc");
        let cfg = resolved(CONF);
        let layered = apply(tree, &cfg, &node()).unwrap();
        let direct = apply(Tree::Dir(&plain), &cfg, &node()).unwrap();
        assert_eq!(layered, direct);
        assert_eq!(layered.masked, vec!["fstrim.timer"]);
        // The image is untouched; the upper layer holds exactly what apply wrote to a
        // plain tree (everything there below etc/), so the merged view is the same.
        assert_eq!(listing(&lower), before);
        let changed: Vec<_> = listing(&plain)
            .into_iter()
            .filter(|e| !before.contains(e))
            .collect();
        assert_eq!(listing(&upper), changed);
        let rc = fs::read_to_string(upper.join("etc/rc.local")).unwrap();
        assert_eq!(rc, "#!/bin/sh\necho image\n# Added by ltsp-agent from lts.conf RCFILE_* at boot.\necho rc\n");
        assert!(upper
            .join("etc/resolv.conf")
            .symlink_metadata()
            .unwrap()
            .is_file());
        // Directories copy the image's mode (and owner, mtime: see below); new ones are
        // root's 0755.
        assert_eq!(upper.join("etc").metadata().unwrap().mode() & 0o7777, 0o750);
        let net = upper.join("etc/systemd/network").metadata().unwrap();
        assert_eq!(net.mode() & 0o7777, 0o755);
    }

    #[test]
    fn mirrored_directories_keep_the_image_mtime_until_written_into() {
        let d = tempfile::tempdir().unwrap();
        let (lower, upper) = (d.path().join("l"), d.path().join("u"));
        image(&lower);
        fs::create_dir(&upper).unwrap();
        mirror_dirs(&lower, &upper, Path::new("etc")).unwrap();
        let etc = upper.join("etc").metadata().unwrap();
        assert_eq!((etc.mtime(), etc.mode() & 0o7777), (1_000_000_000, 0o750));
        let lower_etc = lower.join("etc").metadata().unwrap();
        assert_eq!((etc.uid(), etc.gid()), (lower_etc.uid(), lower_etc.gid()));
    }

    #[test]
    fn layers_refused_when_the_image_links_a_directory_apply_writes_into() {
        let d = tempfile::tempdir().unwrap();
        let (lower, upper) = (d.path().join("l"), d.path().join("u"));
        fs::create_dir_all(lower.join("etc/systemd")).unwrap();
        fs::create_dir_all(lower.join("usr/lib/nm")).unwrap();
        assert!(Tree::layers(&lower, &upper).is_some());
        std::os::unix::fs::symlink("/usr/lib/nm", lower.join("etc/NetworkManager")).unwrap();
        assert!(Tree::layers(&lower, &upper).is_none());
    }
}
