//! Kernel modules: by name with their dependencies from `modules.dep`, and NIC drivers for
//! the devices present, matched through `modules.alias` against each device's modalias.

use crate::system::System;
use ltsp_common::ltsconf::glob_match;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("module {0}: not in modules.dep (is it in the initramfs?)")]
    Unknown(String),
    #[error("module {name} ({path}): {source}")]
    Load {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "module {name} ({path}): the kernel cannot load {} modules ({source}): it needs \
         CONFIG_MODULE_DECOMPRESS=y and {}; build the initramfs from uncompressed modules \
         or use a kernel with them",
        .compression.name(),
        .compression.config()
    )]
    NoDecompress {
        name: String,
        path: PathBuf,
        compression: Compression,
        source: std::io::Error,
    },
}

/// How a module file is compressed, from its name (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`).
/// A compressed module goes to `finit_module` as it is, with MODULE_INIT_COMPRESSED_FILE:
/// the kernel decompresses it (CONFIG_MODULE_DECOMPRESS, Linux 6.1+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Gzip,
}

impl Compression {
    /// `None` for a name that is not a module file.
    pub fn of(path: &Path) -> Option<Compression> {
        let name = path.file_name()?.to_str()?;
        let (_, ext) = name.split_once(".ko")?;
        match ext {
            "" => Some(Compression::None),
            ".xz" => Some(Compression::Xz),
            ".zst" => Some(Compression::Zstd),
            ".gz" => Some(Compression::Gzip),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Xz => "xz-compressed",
            Compression::Zstd => "zstd-compressed",
            Compression::Gzip => "gzip-compressed",
        }
    }

    /// The kernel option that lets it decompress this format.
    pub fn config(self) -> &'static str {
        match self {
            Compression::None => "nothing",
            Compression::Xz => "CONFIG_MODULE_COMPRESS_XZ",
            Compression::Zstd => "CONFIG_MODULE_COMPRESS_ZSTD",
            Compression::Gzip => "CONFIG_MODULE_COMPRESS_GZIP",
        }
    }
}

/// The modules directory of kernel `release` below `root`: `lib/modules/RELEASE`, or
/// `usr/lib/modules/RELEASE` (merged /usr, Debian 13), whichever has a `modules.dep`;
/// `lib/modules/RELEASE` when neither does, for the error to name.
pub fn modules_dir(root: &Path, release: &str) -> PathBuf {
    let candidates = [
        root.join("lib/modules").join(release),
        root.join("usr/lib/modules").join(release),
    ];
    candidates
        .iter()
        .find(|d| d.join("modules.dep").is_file())
        .unwrap_or(&candidates[0])
        .clone()
}

/// A failed load: a compressed module the kernel refused as unsupported gets an error
/// that names the kernel options it lacks. Without CONFIG_MODULE_DECOMPRESS finit_module
/// says EOPNOTSUPP; a kernel older than the flag (or built for another format) says EINVAL.
fn load_error(name: String, path: PathBuf, source: std::io::Error) -> ModuleError {
    let compression = Compression::of(&path).unwrap_or(Compression::None);
    use nix::errno::Errno;
    let refused = [Errno::EOPNOTSUPP as i32, Errno::EINVAL as i32]
        .iter()
        .any(|e| source.raw_os_error() == Some(*e));
    if compression != Compression::None && refused {
        return ModuleError::NoDecompress {
            name,
            path,
            compression,
            source,
        };
    }
    ModuleError::Load { name, path, source }
}

/// `virtio-net` and `virtio_net` are the same module to the kernel.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file
        .as_bytes()
        .windows(3)
        .position(|w| w == b".ko")
        .map_or(file, |i| &file[..i]);
    canonical(stem)
}

/// The index is a dozen modules in an initramfs: plain vectors and lazy lookups, not hash
/// maps. Under QEMU TCG, first-run code is what costs (each new code path is translated
/// once): parsing into maps took 4-10 ms, mostly for modules.builtin, read only when a
/// name is not in modules.dep.
#[derive(Debug, Default)]
pub struct Modules {
    dir: PathBuf,
    /// (name, path relative to dir, dependencies as listed)
    dep: Vec<(String, String, Vec<String>)>,
    builtin: String,
    aliases: Vec<(String, String)>,
    loaded: Vec<String>,
    params: Vec<(String, String)>,
}

impl Modules {
    /// Reads `modules.dep`, `modules.builtin` and `modules.alias` below `dir`
    /// (see [`modules_dir`]). Only `modules.dep` is required.
    pub fn open(dir: &Path) -> Result<Modules, ModuleError> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let dep_text = read("modules.dep").map_err(|source| ModuleError::Read {
            path: dir.join("modules.dep"),
            source,
        })?;
        let mut m = Modules::parse(&dep_text, "", &read("modules.alias").unwrap_or_default());
        m.dir = dir.to_path_buf();
        Ok(m)
    }

    pub fn parse(dep: &str, builtin: &str, alias: &str) -> Modules {
        let mut m = Modules::default();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(str::to_string).collect();
            m.dep.push((module_name(path), path.to_string(), deps));
        }
        m.builtin = builtin.to_string();
        m.aliases = alias
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some("alias")).then_some(())?;
                Some((it.next()?.to_string(), canonical(it.next()?)))
            })
            .collect();
        m
    }

    /// Parameters for a module loaded later, as finit_module takes them ("a=1 b=2").
    pub fn set_params(&mut self, name: &str, params: &str) {
        let name = canonical(name);
        self.params.retain(|(n, _)| *n != name);
        self.params.push((name, params.to_string()));
    }

    /// `name` is built into the kernel (modules.builtin, read on first need).
    fn is_builtin(&mut self, name: &str) -> bool {
        if self.builtin.is_empty() {
            self.builtin = std::fs::read_to_string(self.dir.join("modules.builtin"))
                .unwrap_or_else(|_| "\n".into());
        }
        self.builtin.lines().any(|l| module_name(l) == name)
    }

    /// Loads `name` after its dependencies (deepest first, as modprobe does).
    /// Built-in and already loaded modules are skipped. Returns the modules loaded.
    pub fn load(&mut self, sys: &dyn System, name: &str) -> Result<Vec<String>, ModuleError> {
        let name = canonical(name);
        if self.loaded.contains(&name) {
            return Ok(Vec::new());
        }
        let Some((_, path, deps)) = self.dep.iter().find(|(n, _, _)| *n == name).cloned() else {
            if self.is_builtin(&name) {
                return Ok(Vec::new());
            }
            return Err(ModuleError::Unknown(name));
        };
        let mut done = Vec::new();
        // modules.dep lists every dependency, the ones needed first last.
        for d in deps.iter().rev() {
            let dn = module_name(d);
            if self.loaded.contains(&dn) {
                continue;
            }
            let p = self.dir.join(d);
            let t = std::time::Instant::now();
            sys.load_module(&p, "")
                .map_err(|source| load_error(dn.clone(), p, source))?;
            log::debug!("modules: {dn} in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
            self.loaded.push(dn.clone());
            done.push(dn);
        }
        let p = self.dir.join(&path);
        let params = self
            .params
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, p)| p.as_str());
        let t = std::time::Instant::now();
        sys.load_module(&p, params)
            .map_err(|source| load_error(name.clone(), p, source))?;
        log::debug!(
            "modules: {name} in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        self.loaded.push(name.clone());
        done.push(name);
        Ok(done)
    }

    /// Modules whose `modules.alias` pattern matches `modalias`.
    pub fn for_alias(&self, modalias: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .aliases
            .iter()
            .filter(|(pat, _)| glob_match(pat, modalias))
            .map(|(_, m)| m.clone())
            .collect();
        v.dedup();
        v
    }
}

/// Whether a device's modalias is a network device or the bus a NIC hangs off: PCI base
/// class 02 (network controller), and virtio device id 1 (net).
pub fn is_nic_alias(modalias: &str) -> bool {
    (modalias.starts_with("pci:") && modalias.contains("bc02"))
        || modalias.starts_with("virtio:d00000001v")
}

/// Modaliases of the devices on the PCI and virtio buses below `sys` (`/sys`).
pub fn device_aliases(sys_root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for bus in ["pci", "virtio"] {
        let Ok(devs) = std::fs::read_dir(sys_root.join("bus").join(bus).join("devices")) else {
            continue;
        };
        for d in devs.flatten() {
            if let Ok(a) = std::fs::read_to_string(d.path().join("modalias")) {
                out.push(a.trim().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Loads drivers for the NICs present, in rounds: a virtio NIC appears on the virtio bus
/// only once virtio_pci is loaded. Each round handles the devices that appeared since the
/// last; probing is synchronous, so the loop waits (at most 50 ms) only while no network
/// interface exists yet. Failures are logged: one bad driver must not stop the boot when
/// another NIC may carry it.
pub fn load_nic_drivers(m: &mut Modules, sys: &dyn System, sys_root: &Path) -> Vec<String> {
    let mut loaded = Vec::new();
    let mut seen = BTreeSet::new();
    let mut waited = false;
    for _ in 0..4 {
        let fresh: Vec<String> = device_aliases(sys_root)
            .into_iter()
            .filter(|a| is_nic_alias(a) && !seen.contains(a))
            .collect();
        if fresh.is_empty() {
            if waited || has_nic(sys_root) {
                break;
            }
            let until = std::time::Instant::now() + std::time::Duration::from_millis(50);
            let before = device_aliases(sys_root);
            while device_aliases(sys_root) == before && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            waited = true;
            continue;
        }
        for alias in &fresh {
            for module in m.for_alias(alias) {
                match m.load(sys, &module) {
                    Ok(l) => loaded.extend(l),
                    Err(e) => log::warn!("modules: {e}"),
                }
            }
        }
        seen.extend(fresh);
    }
    loaded
}

/// A network interface other than loopback exists.
pub fn has_nic(sys_root: &Path) -> bool {
    std::fs::read_dir(sys_root.join("class/net"))
        .map(|d| d.flatten().any(|e| e.file_name() != "lo"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::Recorder;

    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_pci.ko.zst: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/block/nbd.ko:
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko.xz:
";
    const ALIAS: &str = "\
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000001v* virtio_net
alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e
alias pci:v00008086d00002922sv*sd*bc*sc*i* ahci
";

    #[test]
    fn dependencies_load_first_deepest_first() {
        let sys = Recorder::default();
        let mut m = Modules::parse(DEP, "kernel/fs/overlayfs/overlay.ko\n", ALIAS);
        m.dir = PathBuf::from("/lib/modules/6.1");
        let l = m.load(&sys, "virtio-net").unwrap();
        assert_eq!(l, vec!["failover", "net_failover", "virtio_net"]);
        assert_eq!(
            sys.calls(),
            vec![
                "load /lib/modules/6.1/kernel/net/core/failover.ko",
                "load /lib/modules/6.1/kernel/drivers/net/net_failover.ko",
                "load /lib/modules/6.1/kernel/drivers/net/virtio_net.ko",
            ]
        );
        // Loaded and built-in modules are not loaded again.
        assert!(m.load(&sys, "virtio_net").unwrap().is_empty());
        assert!(m.load(&sys, "overlay").unwrap().is_empty());
        assert!(matches!(m.load(&sys, "nope"), Err(ModuleError::Unknown(_))));
        // Compressed modules keep their path; nbd gets its device count.
        m.load(&sys, "virtio_pci").unwrap();
        m.set_params("nbd", "nbds_max=3");
        m.load(&sys, "nbd").unwrap();
        let calls = sys.calls();
        assert!(calls.contains(
            &"load /lib/modules/6.1/kernel/drivers/virtio/virtio_pci.ko.zst".to_string()
        ));
        assert_eq!(
            calls.last().unwrap(),
            "load /lib/modules/6.1/kernel/drivers/block/nbd.ko nbds_max=3"
        );
    }

    #[test]
    fn nic_aliases_pick_network_drivers_only() {
        let m = Modules::parse(DEP, "", ALIAS);
        let virtio_net_pci = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00";
        let e1000e = "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00";
        let ahci = "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01";
        assert!(is_nic_alias(virtio_net_pci) && is_nic_alias(e1000e) && !is_nic_alias(ahci));
        assert!(is_nic_alias("virtio:d00000001v00001AF4"));
        assert!(!is_nic_alias("virtio:d00000002v00001AF4"));
        assert_eq!(m.for_alias(virtio_net_pci), vec!["virtio_pci"]);
        assert_eq!(m.for_alias(e1000e), vec!["e1000e"]);
        assert_eq!(m.for_alias("virtio:d00000001v00001AF4"), vec!["virtio_net"]);
    }

    #[test]
    fn real_sysfs_layout_is_read() {
        let d = tempfile::tempdir().unwrap();
        let dev = d.path().join("bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(
            dev.join("modalias"),
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00\n",
        )
        .unwrap();
        assert_eq!(device_aliases(d.path()).len(), 1);
        let sys = Recorder::default();
        let mut m = Modules::parse(DEP, "", ALIAS);
        let loaded = load_nic_drivers(&mut m, &sys, d.path());
        assert_eq!(loaded.last().map(String::as_str), Some("virtio_pci"));
    }

    #[test]
    fn virtio_nic_found_in_a_second_round() {
        let d = tempfile::tempdir().unwrap();
        let pci = d.path().join("bus/pci/devices/0000:00:03.0/modalias");
        std::fs::create_dir_all(pci.parent().unwrap()).unwrap();
        std::fs::write(
            &pci,
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00\n",
        )
        .unwrap();
        // virtio_pci's probe adds virtio0; virtio_net's adds eth0.
        let sys = Recorder {
            probes: vec![
                (
                    "virtio_pci.ko".into(),
                    d.path().join("bus/virtio/devices/virtio0/modalias"),
                    "virtio:d00000001v00001AF4\n".into(),
                ),
                (
                    "virtio_net.ko".into(),
                    d.path().join("class/net/eth0/address"),
                    "52:54:00:12:34:56\n".into(),
                ),
            ],
            ..Default::default()
        };
        let mut m = Modules::parse(DEP, "", ALIAS);
        let loaded = load_nic_drivers(&mut m, &sys, d.path());
        assert_eq!(loaded.last().map(String::as_str), Some("virtio_net"));
        assert!(loaded.contains(&"virtio_pci".to_string()));
        assert!(has_nic(d.path()));
    }

    #[test]
    fn compression_from_the_file_name() {
        let of = |p: &str| Compression::of(Path::new(p));
        assert_eq!(of("kernel/fs/nbd.ko"), Some(Compression::None));
        assert_eq!(
            of("/usr/lib/modules/6.12/kernel/nbd.ko.xz"),
            Some(Compression::Xz)
        );
        assert_eq!(of("nbd.ko.zst"), Some(Compression::Zstd));
        assert_eq!(of("nbd.ko.gz"), Some(Compression::Gzip));
        assert_eq!(of("nbd.ko.bz2"), None);
        assert_eq!(of("modules.dep"), None);
        // The directory's name is not the file's.
        assert_eq!(of("/lib/x.ko.xz/nbd"), None);
        assert_eq!(module_name("kernel/drivers/block/nbd.ko.xz"), "nbd");
        assert_eq!(module_name("kernel/net/virtio-net.ko.zst"), "virtio_net");
    }

    #[test]
    fn modules_dir_finds_lib_or_usr_lib() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        // Neither: lib/modules, for the error to name.
        assert_eq!(modules_dir(root, "6.12"), root.join("lib/modules/6.12"));
        // Merged /usr without the /lib link: usr/lib/modules.
        let usr = root.join("usr/lib/modules/6.12");
        std::fs::create_dir_all(&usr).unwrap();
        std::fs::write(usr.join("modules.dep"), "").unwrap();
        assert_eq!(modules_dir(root, "6.12"), usr);
        // Another release is not taken for this one.
        assert_eq!(modules_dir(root, "6.1"), root.join("lib/modules/6.1"));
        // Both: /lib/modules first, as modprobe looks.
        let lib = root.join("lib/modules/6.12");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("modules.dep"), "").unwrap();
        assert_eq!(modules_dir(root, "6.12"), lib);
    }

    #[test]
    fn compressed_modules_under_usr_lib_load_by_their_paths() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("usr/lib/modules/6.12.48+deb13-cloud-amd64");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/block/nbd.ko.xz:\n\
             kernel/fs/overlayfs/overlay.ko.zst: kernel/fs/netfs/netfs.ko\n\
             kernel/fs/netfs/netfs.ko:\n",
        )
        .unwrap();
        let mut m = Modules::open(&modules_dir(d.path(), "6.12.48+deb13-cloud-amd64")).unwrap();
        let sys = Recorder::default();
        assert_eq!(m.load(&sys, "overlay").unwrap(), vec!["netfs", "overlay"]);
        m.load(&sys, "nbd").unwrap();
        let want: Vec<String> = [
            "kernel/fs/netfs/netfs.ko",
            "kernel/fs/overlayfs/overlay.ko.zst",
            "kernel/drivers/block/nbd.ko.xz",
        ]
        .iter()
        .map(|p| format!("load {}", dir.join(p).display()))
        .collect();
        assert_eq!(sys.calls(), want);
    }

    #[test]
    fn a_kernel_without_decompression_gets_a_clear_error() {
        let refused = |errno: nix::errno::Errno, path: &str| {
            load_error(
                "nbd".into(),
                PathBuf::from(path),
                std::io::Error::from_raw_os_error(errno as i32),
            )
        };
        let e = refused(nix::errno::Errno::EOPNOTSUPP, "/lib/modules/6.12/nbd.ko.xz");
        assert!(matches!(
            e,
            ModuleError::NoDecompress {
                compression: Compression::Xz,
                ..
            }
        ));
        let text = e.to_string();
        assert!(text.contains("module nbd"), "{text}");
        assert!(text.contains("CONFIG_MODULE_DECOMPRESS=y"), "{text}");
        assert!(text.contains("CONFIG_MODULE_COMPRESS_XZ"), "{text}");
        let e = refused(nix::errno::Errno::EINVAL, "/lib/modules/5.10/nbd.ko.zst");
        assert!(e.to_string().contains("CONFIG_MODULE_COMPRESS_ZSTD"), "{e}");
        // An uncompressed module's EINVAL (bad parameters, say) is reported as it is.
        let e = refused(nix::errno::Errno::EINVAL, "/lib/modules/6.12/nbd.ko");
        assert!(matches!(e, ModuleError::Load { .. }));
        // Other failures of a compressed module are not blamed on the kernel's options.
        let e = refused(nix::errno::Errno::ENOENT, "/lib/modules/6.12/nbd.ko.xz");
        assert!(matches!(e, ModuleError::Load { .. }));
    }
}
