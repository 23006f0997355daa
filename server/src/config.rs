//! Settings: a TOML file, then command-line flags on top. Every setting of the file is also
//! a flag. Errors name the file, the line and the key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("--export {0:?}: expected NAME=PATH")]
    ExportFlag(String),
    #[error("export {name:?}: {path}: {why}")]
    Export {
        name: String,
        path: PathBuf,
        why: String,
    },
    #[error("default_export {0:?} is not one of the exports")]
    DefaultExport(String),
    #[error("tftp root {path}: {why}")]
    TftpRoot { path: PathBuf, why: String },
    #[error("{0}")]
    Invalid(String),
}

/// The file's shape. Unknown keys are errors, so a typo never goes unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub tftp: TftpFile,
    #[serde(default)]
    pub nbd: NbdFile,
    #[serde(default)]
    pub boot: BootFile,
    #[serde(default)]
    pub http: HttpFile,
    #[serde(default)]
    pub proxy_dhcp: ProxyDhcpFile,
    #[serde(default)]
    pub dhcp_server: DhcpServerFile,
}

/// proxyDHCP: on when `interface` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyDhcpFile {
    /// The interface facing the nodes (its IPv4 address is the next-server given out).
    pub interface: Option<String>,
    /// Boot file for BIOS firmware PXE (client architecture 0).
    pub bios: Option<String>,
    /// Boot file for UEFI x86-64 firmware PXE (architectures 7 and 9), in proxyDHCP and
    /// DHCP server modes alike: ipxe.efi, or a signed UKI (deploy/build-uki) for Secure Boot.
    pub uefi: Option<String>,
    /// Boot file for UEFI arm64 firmware PXE (architecture 11).
    pub arm64: Option<String>,
    /// What iPXE itself is given.
    pub ipxe_script: Option<String>,
}

/// A DHCP server for a lab network without one: on when `interface` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpServerFile {
    pub interface: Option<String>,
    /// `FIRST-LAST`, e.g. "192.0.2.100-192.0.2.199".
    pub range: Option<String>,
    /// Seconds (default 12 h).
    pub lease_time: Option<u64>,
    /// The shortest lease_time accepted, in seconds (default 60); a shorter one is raised
    /// to it.
    pub min_lease_time: Option<u64>,
    /// Seconds after a lease ends before its address may go to another client, and then
    /// only when no never-used address is left (default: the lease time).
    pub reuse_after: Option<u64>,
    /// Where the leases are kept across restarts (default /var/lib/ltsp/dhcp-leases);
    /// "" keeps them in memory only.
    pub lease_file: Option<PathBuf>,
    pub router: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Clients the lease table remembers at most (offers, leases and expired leases kept
    /// so a client gets its address back). Default: the range size, at most 65536.
    pub max_leases: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct DhcpServerConfig {
    pub interface: String,
    pub first: std::net::Ipv4Addr,
    pub last: std::net::Ipv4Addr,
    pub lease_secs: u64,
    pub router: Option<std::net::Ipv4Addr>,
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Bound of the lease table (entries).
    pub max_leases: usize,
    /// Seconds after a lease's end before its address may be leased to another client.
    pub reuse_after_secs: u64,
    /// The lease file; None: leases in memory only.
    pub lease_file: Option<PathBuf>,
}

/// Default `[dhcp_server] min_lease_time`, in seconds.
pub const MIN_LEASE_TIME_DEFAULT: u64 = 60;
/// Default `[dhcp_server] lease_file`: state, so under /var/lib (the configuration may be
/// read-only, e.g. a Kubernetes ConfigMap).
pub const LEASE_FILE_DEFAULT: &str = "/var/lib/ltsp/dhcp-leases";

/// Default bound of the DHCP server's lease table: the range size, at most this.
pub const MAX_LEASES_DEFAULT_CAP: usize = 65536;
/// The longest boot file name: the BOOTP `file` field is 128 bytes, NUL included.
pub const MAX_BOOT_FILE: usize = 127;

/// `FIRST-LAST` as two IPv4 addresses, FIRST <= LAST.
/// Addresses a DHCP server range may hold (a /16).
pub const MAX_DHCP_RANGE: u32 = 65536;

pub fn parse_range(s: &str) -> Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)> {
    let (a, b) = s.split_once('-')?;
    let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (u32::from(a) <= u32::from(b)).then_some((a, b))
}

#[derive(Debug, Clone)]
pub struct ProxyDhcpConfig {
    pub interface: String,
    pub bios: String,
    pub uefi: String,
    /// UEFI arm64 (architecture 11): GRUB's netboot image by default (grub-mknetdir
    /// with arm64-efi modules); Debian packages no arm64 iPXE.
    pub arm64: String,
    pub ipxe_script: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// Status endpoints (/healthz, /metrics, /nodes); off unless set.
    pub listen: Option<SocketAddr>,
    /// Connections open at once; more are closed at accept.
    pub max_connections: Option<usize>,
    /// Connections one client address may have open (0: no limit).
    pub max_connections_per_client: Option<usize>,
    /// Seconds a client has to send a request's header, and to send the next one on a
    /// kept-alive connection.
    pub header_timeout: Option<u64>,
    /// Largest request header (request line included), in bytes.
    pub max_header_bytes: Option<usize>,
    /// Seconds a response may make no progress (a client not reading) before closing.
    pub write_timeout: Option<u64>,
}

/// The HTTP listener and its limits (a hostile client cannot hold what others need).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// 0: no limit.
    pub max_connections_per_client: usize,
    /// Also bounds how long a kept-alive connection may sit idle.
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub write_timeout: Duration,
}

impl HttpConfig {
    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> HttpConfig {
        HttpConfig {
            listen,
            max_connections: 256,
            max_connections_per_client: 8,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            write_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TftpFile {
    pub root: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// Seconds before an unacknowledged window is sent again (RFC 2349 default).
    pub timeout: Option<u8>,
    pub retries: Option<u32>,
    pub max_windowsize: Option<u16>,
    pub max_transfers: Option<usize>,
    /// Transfers one client address may have at once (0: no limit).
    pub max_transfers_per_client: Option<usize>,
    /// Largest RFC 2349 `timeout` a client may ask for, in seconds; above it the option is
    /// left out of the OACK and `timeout` applies.
    pub max_client_timeout: Option<u8>,
    /// Seconds one transfer may last, whatever the client does.
    pub max_transfer_secs: Option<u64>,
    /// KiB of read-ahead buffers for all transfers together (0: read block by block).
    pub read_ahead_kib: Option<usize>,
    /// Every reply from the listening port, for NAT (see server/src/tftp.rs).
    pub single_port: Option<bool>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdFile {
    pub listen: Option<SocketAddr>,
    /// Export name to image path.
    #[serde(default)]
    pub exports: std::collections::BTreeMap<String, PathBuf>,
    pub default_export: Option<String>,
    pub handshake_timeout: Option<u64>,
    pub max_connections: Option<usize>,
    /// Connections one client address may have open (0: no limit).
    pub max_connections_per_client: Option<usize>,
    /// Seconds without a request before a connection is closed (0: never).
    pub idle_timeout: Option<u64>,
    /// Reply bytes one connection may hold in memory; past it, it is not read from.
    pub max_reply_bytes_per_connection: Option<usize>,
    /// Reply bytes all connections together may hold in memory; past it, READs go by
    /// splice(2) or sendfile(2) with no buffer.
    pub max_reply_bytes: Option<usize>,
    /// Seconds a connection's socket may take no reply bytes before it is closed.
    pub write_timeout: Option<u64>,
    /// Content-addressed store of image versions (default: `.ltsp-versions` beside each
    /// export). Replicas that share it serve each other's versions.
    pub versions_dir: Option<PathBuf>,
    /// Seconds a version is kept after its last connection closed (default 7 days).
    pub version_retention: Option<u64>,
    /// Every NBD request is written to this file (see `docs/nbd-trace.md`); off unless set.
    pub trace_file: Option<PathBuf>,
    pub enabled: Option<bool>,
}

/// What iPXE is told to boot: the server generates `boot.ipxe` from this, so the script
/// always matches the files it serves.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct BootFile {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// boot.ipxe fetches kernel and initramfs over HTTP (needs `[http] listen`).
    pub http: Option<bool>,
    /// Per-node overrides, by MAC address (`[[boot.node]]`).
    #[serde(default)]
    pub node: Vec<NodeBoot>,
}

/// One node's own kernel, initramfs or cmdline; what it leaves out comes from `[boot]`.
#[derive(Debug, Default, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeBoot {
    pub mac: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

/// `aa:bb:cc:dd:ee:ff` in lower case, from the usual spellings (`-` or `:`, any case).
pub fn normalise_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
    {
        return None;
    }
    Some(parts.join(":").to_ascii_lowercase())
}

#[derive(Debug, Clone)]
pub struct TftpConfig {
    pub root: PathBuf,
    pub listen: SocketAddr,
    pub timeout: Duration,
    pub retries: u32,
    pub max_windowsize: u16,
    pub max_transfers: usize,
    pub max_transfers_per_client: usize,
    /// Cap on the client's RFC 2349 timeout.
    pub max_client_timeout: Duration,
    /// Total life of one transfer.
    pub max_transfer_time: Duration,
    /// Bytes of read-ahead all transfers may hold at once.
    pub read_ahead_budget: usize,
    pub single_port: bool,
    pub boot: BootFile,
}

#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub path: PathBuf,
}

/// A version no connection uses is kept this long (seconds): a week covers a node that
/// reconnects after any outage an operator would sit through.
pub const DEFAULT_VERSION_RETENTION: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone)]
pub struct NbdConfig {
    pub listen: SocketAddr,
    pub exports: Vec<Export>,
    pub default_export: Option<String>,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// None: connections are never closed for idleness.
    pub idle_timeout: Option<Duration>,
    pub max_reply_bytes_per_connection: usize,
    pub max_reply_bytes: usize,
    pub write_timeout: Duration,
    /// Content-addressed store of versions; None: `.ltsp-versions` beside each export.
    pub versions_dir: Option<PathBuf>,
    /// How long a version no connection uses stays available.
    pub version_retention: Duration,
    /// Request trace (see [`crate::nbd::Tracer`]); None: off.
    pub trace_file: Option<PathBuf>,
}

impl NbdConfig {
    /// One export `root` at `path` on loopback, with limits off and the given reply
    /// budgets: for tests and fuzz targets that drive sessions without sockets.
    pub fn for_tests(path: PathBuf, per_conn: usize, all: usize, write: Duration) -> Self {
        NbdConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            exports: vec![Export {
                name: "root".into(),
                path,
            }],
            default_export: None,
            handshake_timeout: Duration::from_secs(10),
            max_connections: usize::MAX,
            max_connections_per_client: 0,
            idle_timeout: None,
            max_reply_bytes_per_connection: per_conn,
            max_reply_bytes: all,
            write_timeout: write,
            versions_dir: None,
            version_retention: Duration::from_secs(DEFAULT_VERSION_RETENTION),
            trace_file: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub tftp: Option<TftpConfig>,
    pub nbd: Option<NbdConfig>,
    pub http: Option<HttpConfig>,
    pub proxy_dhcp: Option<ProxyDhcpConfig>,
    pub dhcp_server: Option<DhcpServerConfig>,
    /// Boot file names for PXE clients ([proxy_dhcp] bios/uefi/ipxe_script), used by
    /// proxyDHCP and the DHCP server alike.
    pub pxe_files: ProxyDhcpConfig,
}

/// Flags that override the file; `None` leaves the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub tftp_root: Option<PathBuf>,
    pub tftp_listen: Option<SocketAddr>,
    pub tftp_timeout: Option<u8>,
    pub tftp_retries: Option<u32>,
    pub tftp_max_windowsize: Option<u16>,
    pub tftp_max_transfers: Option<usize>,
    pub tftp_max_transfers_per_client: Option<usize>,
    pub tftp_max_client_timeout: Option<u8>,
    pub tftp_max_transfer_secs: Option<u64>,
    pub tftp_read_ahead_kib: Option<usize>,
    pub tftp_single_port: bool,
    pub no_tftp: bool,
    pub nbd_listen: Option<SocketAddr>,
    pub exports: Vec<String>,
    pub default_export: Option<String>,
    pub nbd_handshake_timeout: Option<u64>,
    pub nbd_max_connections: Option<usize>,
    pub nbd_max_connections_per_client: Option<usize>,
    pub nbd_idle_timeout: Option<u64>,
    pub nbd_max_reply_bytes_per_connection: Option<usize>,
    pub nbd_max_reply_bytes: Option<usize>,
    pub nbd_write_timeout: Option<u64>,
    pub nbd_versions_dir: Option<PathBuf>,
    pub nbd_version_retention: Option<u64>,
    pub nbd_trace: Option<PathBuf>,
    pub no_nbd: bool,
    pub http_listen: Option<SocketAddr>,
    pub http_max_connections: Option<usize>,
    pub http_max_connections_per_client: Option<usize>,
    pub http_header_timeout: Option<u64>,
    pub http_max_header_bytes: Option<usize>,
    pub http_write_timeout: Option<u64>,
    pub boot_kernel: Option<String>,
    pub boot_initrd: Option<String>,
    pub boot_cmdline: Option<String>,
    pub boot_http: bool,
    pub proxy_dhcp: Option<String>,
    pub dhcp_server: Option<String>,
    pub dhcp_range: Option<String>,
    pub dhcp_lease_file: Option<PathBuf>,
    /// The UEFI boot file ([proxy_dhcp] uefi).
    pub pxe_uefi: Option<String>,
}

pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().to_string(),
        }
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

impl Config {
    pub fn load(path: Option<&Path>, o: &Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                parse_file(p, &text)?
            }
            None => FileConfig::default(),
        };
        Self::build(file, o)
    }

    pub fn build(f: FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
        let tftp_enabled = !o.no_tftp && f.tftp.enabled.unwrap_or(true);
        let tftp = if tftp_enabled {
            let root = o
                .tftp_root
                .clone()
                .or(f.tftp.root)
                .unwrap_or_else(|| PathBuf::from("/srv/tftp"));
            let meta = std::fs::metadata(&root).map_err(|e| ConfigError::TftpRoot {
                path: root.clone(),
                why: e.to_string(),
            })?;
            if !meta.is_dir() {
                return Err(ConfigError::TftpRoot {
                    path: root,
                    why: "not a directory".into(),
                });
            }
            let mut boot = f.boot;
            if let Some(k) = &o.boot_kernel {
                boot.kernel = Some(k.clone());
            }
            if let Some(i) = &o.boot_initrd {
                boot.initrd = Some(i.clone());
            }
            if let Some(c) = &o.boot_cmdline {
                boot.cmdline = Some(c.clone());
            }
            if o.boot_http {
                boot.http = Some(true);
            }
            for n in &mut boot.node {
                n.mac = normalise_mac(&n.mac).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "[[boot.node]] mac = {:?}: expected six hex pairs like 52:54:00:12:34:56",
                        n.mac
                    ))
                })?;
            }
            if boot.http == Some(true) && o.http_listen.or(f.http.listen).is_none() {
                return Err(ConfigError::Invalid(
                    "[boot] http = true needs an HTTP listener ([http] listen or --http-listen)"
                        .into(),
                ));
            }
            Some(TftpConfig {
                root,
                listen: o
                    .tftp_listen
                    .or(f.tftp.listen)
                    .unwrap_or_else(|| "0.0.0.0:69".parse().unwrap()),
                timeout: Duration::from_secs(
                    o.tftp_timeout.or(f.tftp.timeout).unwrap_or(1).max(1) as u64
                ),
                retries: o.tftp_retries.or(f.tftp.retries).unwrap_or(6),
                max_windowsize: o
                    .tftp_max_windowsize
                    .or(f.tftp.max_windowsize)
                    .unwrap_or(64)
                    .max(1),
                max_transfers: o
                    .tftp_max_transfers
                    .or(f.tftp.max_transfers)
                    .unwrap_or(2048),
                max_transfers_per_client: o
                    .tftp_max_transfers_per_client
                    .or(f.tftp.max_transfers_per_client)
                    .unwrap_or(8),
                max_client_timeout: Duration::from_secs(
                    o.tftp_max_client_timeout
                        .or(f.tftp.max_client_timeout)
                        .unwrap_or(5)
                        .max(1) as u64,
                ),
                max_transfer_time: Duration::from_secs(
                    o.tftp_max_transfer_secs
                        .or(f.tftp.max_transfer_secs)
                        .unwrap_or(600)
                        .max(1),
                ),
                read_ahead_budget: o
                    .tftp_read_ahead_kib
                    .or(f.tftp.read_ahead_kib)
                    .unwrap_or(8192)
                    .saturating_mul(1024),
                single_port: o.tftp_single_port || f.tftp.single_port.unwrap_or(false),
                boot,
            })
        } else {
            None
        };

        let nbd_enabled = !o.no_nbd && f.nbd.enabled.unwrap_or(true);
        let nbd = if nbd_enabled {
            let mut exports: Vec<Export> = f
                .nbd
                .exports
                .into_iter()
                .map(|(name, path)| Export { name, path })
                .collect();
            for e in &o.exports {
                let (name, path) = e
                    .split_once('=')
                    .ok_or_else(|| ConfigError::ExportFlag(e.clone()))?;
                exports.retain(|x| x.name != name);
                exports.push(Export {
                    name: name.to_string(),
                    path: PathBuf::from(path),
                });
            }
            for e in &exports {
                match std::fs::metadata(&e.path) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(ConfigError::Export {
                            name: e.name.clone(),
                            path: e.path.clone(),
                            why: "not a regular file".into(),
                        })
                    }
                    Err(err) => {
                        return Err(ConfigError::Export {
                            name: e.name.clone(),
                            path: e.path.clone(),
                            why: err.to_string(),
                        })
                    }
                }
            }
            let write_timeout = o.nbd_write_timeout.or(f.nbd.write_timeout).unwrap_or(30);
            if write_timeout == 0 {
                return Err(ConfigError::Invalid(
                    "[nbd] write_timeout must be at least 1 second".into(),
                ));
            }
            let default_export = o.default_export.clone().or(f.nbd.default_export);
            if let Some(d) = &default_export {
                if !exports.iter().any(|e| &e.name == d) {
                    return Err(ConfigError::DefaultExport(d.clone()));
                }
            }
            Some(NbdConfig {
                listen: o
                    .nbd_listen
                    .or(f.nbd.listen)
                    .unwrap_or_else(|| "0.0.0.0:10809".parse().unwrap()),
                exports,
                default_export,
                handshake_timeout: Duration::from_secs(
                    o.nbd_handshake_timeout
                        .or(f.nbd.handshake_timeout)
                        .unwrap_or(10),
                ),
                max_connections: o
                    .nbd_max_connections
                    .or(f.nbd.max_connections)
                    .unwrap_or(4096),
                max_connections_per_client: o
                    .nbd_max_connections_per_client
                    .or(f.nbd.max_connections_per_client)
                    .unwrap_or(16),
                idle_timeout: match o.nbd_idle_timeout.or(f.nbd.idle_timeout).unwrap_or(0) {
                    0 => None,
                    s => Some(Duration::from_secs(s)),
                },
                max_reply_bytes_per_connection: o
                    .nbd_max_reply_bytes_per_connection
                    .or(f.nbd.max_reply_bytes_per_connection)
                    .unwrap_or(1 << 20),
                max_reply_bytes: o
                    .nbd_max_reply_bytes
                    .or(f.nbd.max_reply_bytes)
                    .unwrap_or(8 << 20),
                write_timeout: Duration::from_secs(write_timeout),
                versions_dir: o.nbd_versions_dir.clone().or(f.nbd.versions_dir),
                version_retention: Duration::from_secs(
                    o.nbd_version_retention
                        .or(f.nbd.version_retention)
                        .unwrap_or(DEFAULT_VERSION_RETENTION),
                ),
                trace_file: o.nbd_trace.clone().or(f.nbd.trace_file),
            })
        } else {
            None
        };
        if tftp.is_none() && nbd.is_none() {
            return Err(ConfigError::Invalid(
                "both TFTP and NBD are disabled: nothing to serve".into(),
            ));
        }
        let pd = f.proxy_dhcp;
        let pxe_files = ProxyDhcpConfig {
            interface: String::new(),
            bios: pd.bios.unwrap_or_else(|| "undionly.kpxe".into()),
            uefi: o
                .pxe_uefi
                .clone()
                .or(pd.uefi)
                .unwrap_or_else(|| "ipxe.efi".into()),
            arm64: pd.arm64.unwrap_or_else(|| "grub/arm64-efi/core.efi".into()),
            ipxe_script: pd.ipxe_script.unwrap_or_else(|| "boot.ipxe".into()),
        };
        for (key, name) in [
            ("bios", &pxe_files.bios),
            ("uefi", &pxe_files.uefi),
            ("arm64", &pxe_files.arm64),
            ("ipxe_script", &pxe_files.ipxe_script),
        ] {
            if name.is_empty() || name.len() > MAX_BOOT_FILE || name.contains('\0') {
                return Err(ConfigError::Invalid(format!(
                    "[proxy_dhcp] {key} = {name:?}: a boot file name has 1 to \
                     {MAX_BOOT_FILE} bytes and no NUL (the BOOTP file field)"
                )));
            }
        }
        let proxy_dhcp = o
            .proxy_dhcp
            .clone()
            .or(pd.interface)
            .map(|interface| ProxyDhcpConfig {
                interface,
                ..pxe_files.clone()
            });
        let ds = f.dhcp_server;
        let dhcp_server = match o.dhcp_server.clone().or(ds.interface) {
            None => None,
            Some(interface) => {
                let range = o.dhcp_range.clone().or(ds.range).ok_or_else(|| {
                    ConfigError::Invalid(
                        "the DHCP server needs a range ([dhcp_server] range or --dhcp-range)"
                            .into(),
                    )
                })?;
                let (first, last) = parse_range(&range).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "dhcp range {range:?}: expected FIRST-LAST, e.g. 192.0.2.100-192.0.2.199"
                    ))
                })?;
                // Every address a client can make the server track is in the range: a /16
                // at most keeps that bounded.
                if u32::from(last) - u32::from(first) >= MAX_DHCP_RANGE {
                    return Err(ConfigError::Invalid(format!(
                        "dhcp range {range:?}: at most {MAX_DHCP_RANGE} addresses"
                    )));
                }
                if proxy_dhcp
                    .as_ref()
                    .is_some_and(|p| p.interface == interface)
                {
                    return Err(ConfigError::Invalid(format!(
                        "{interface}: proxyDHCP and the DHCP server cannot share an interface \
                         (proxyDHCP is for networks that already have a DHCP server)"
                    )));
                }
                let size = (u32::from(last) - u32::from(first)) as usize + 1;
                let max_leases = match ds.max_leases {
                    Some(0) => {
                        return Err(ConfigError::Invalid(
                            "[dhcp_server] max_leases = 0: no client could get an address".into(),
                        ))
                    }
                    Some(n) => n,
                    None => size.min(MAX_LEASES_DEFAULT_CAP),
                };
                // A lease shorter than a few seconds could not be renewed in time.
                let min_lease = ds.min_lease_time.unwrap_or(MIN_LEASE_TIME_DEFAULT);
                if !(5..=86400).contains(&min_lease) {
                    return Err(ConfigError::Invalid(format!(
                        "[dhcp_server] min_lease_time = {min_lease}: expected 5..=86400 seconds"
                    )));
                }
                // Option 51 is 32 bits (0xffffffff: infinite).
                let lease_secs = ds
                    .lease_time
                    .unwrap_or(43200)
                    .clamp(min_lease, u32::MAX as u64);
                let lease_file = match o.dhcp_lease_file.clone().or(ds.lease_file) {
                    None => Some(PathBuf::from(LEASE_FILE_DEFAULT)),
                    Some(p) if p.as_os_str().is_empty() => None,
                    Some(p) => Some(p),
                };
                Some(DhcpServerConfig {
                    interface,
                    first,
                    last,
                    lease_secs,
                    router: ds.router,
                    dns: ds.dns,
                    max_leases,
                    reuse_after_secs: ds.reuse_after.unwrap_or(lease_secs),
                    lease_file,
                })
            }
        };
        let h = f.http;
        let http = o.http_listen.or(h.listen).map(|listen| {
            let d = HttpConfig::new(listen);
            let secs = |v: Option<u64>, d: Duration| v.map_or(d, |s| Duration::from_secs(s.max(1)));
            HttpConfig {
                max_connections: o
                    .http_max_connections
                    .or(h.max_connections)
                    .unwrap_or(d.max_connections)
                    .max(1),
                max_connections_per_client: o
                    .http_max_connections_per_client
                    .or(h.max_connections_per_client)
                    .unwrap_or(d.max_connections_per_client),
                header_timeout: secs(o.http_header_timeout.or(h.header_timeout), d.header_timeout),
                // Boot clients send a few hundred bytes; below 1 KiB nothing would get through.
                max_header_bytes: o
                    .http_max_header_bytes
                    .or(h.max_header_bytes)
                    .unwrap_or(d.max_header_bytes)
                    .max(1024),
                write_timeout: secs(o.http_write_timeout.or(h.write_timeout), d.write_timeout),
                ..d
            }
        });
        Ok(Config {
            tftp,
            nbd,
            http,
            proxy_dhcp,
            dhcp_server,
            pxe_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_default_configuration_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.toml");
        let f = parse_file(&p, &std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(f.tftp.root.as_deref(), Some(Path::new("/srv/tftp")));
        assert_eq!(
            f.nbd.exports.get("root").map(PathBuf::as_path),
            Some(Path::new("/srv/ltsp/root.squashfs"))
        );
        assert_eq!(
            f.boot.cmdline.as_deref(),
            Some("root=/dev/nbd0 nbdroot=:root")
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let p = Path::new("/etc/ltsp/server.toml");
        let e = parse_file(p, "[tftp]\nroot = \"/srv\"\nrooot = \"/x\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/ltsp/server.toml:3:1: "), "{s}");
        assert!(s.contains("rooot"), "{s}");
        let e = parse_file(p, "[nbd]\nlisten = \"nope\"\n").unwrap_err();
        assert!(
            e.to_string().starts_with("/etc/ltsp/server.toml:2:10: "),
            "{e}"
        );
    }

    #[test]
    fn flags_override_file_and_exports_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        std::fs::write(&img, b"x").unwrap();
        let f = parse_file(
            Path::new("c.toml"),
            &format!(
                "[tftp]\nroot = {:?}\nlisten = \"127.0.0.1:6969\"\n[nbd]\nexports = {{ root = {:?} }}\n",
                dir.path(),
                img
            ),
        )
        .unwrap();
        let o = Overrides {
            tftp_listen: Some("127.0.0.1:7000".parse().unwrap()),
            exports: vec![format!("other={}", img.display())],
            ..Default::default()
        };
        let c = Config::build(f, &o).unwrap();
        assert_eq!(c.tftp.unwrap().listen.port(), 7000);
        let n = c.nbd.unwrap();
        assert_eq!(n.exports.len(), 2);

        let o = Overrides {
            no_tftp: true,
            exports: vec!["bad=/nonexistent/file".into()],
            ..Default::default()
        };
        let e = Config::build(FileConfig::default(), &o).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("export \"bad\": /nonexistent/file: "),
            "{e}"
        );
        let o = Overrides {
            no_tftp: true,
            exports: vec!["noequals".into()],
            ..Default::default()
        };
        assert!(matches!(
            Config::build(FileConfig::default(), &o),
            Err(ConfigError::ExportFlag(_))
        ));
    }

    /// `[proxy_dhcp] uefi` (or --pxe-uefi) is the UEFI boot file of both DHCP modes.
    #[test]
    fn the_uefi_boot_file_serves_both_dhcp_modes() {
        let f = |text: &str| parse_file(Path::new("c.toml"), text).unwrap();
        let base = "[tftp]\nroot = \"/srv/tftp\"\n[nbd]\nenabled = false\n";
        let uki = "ltsp/amd64/ltsp.efi";
        let c = Config::build(
            f(&format!(
                "{base}[proxy_dhcp]\ninterface = \"br0\"\nuefi = \"{uki}\"\n"
            )),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.proxy_dhcp.unwrap().uefi, uki);
        assert_eq!(c.pxe_files.uefi, uki);
        assert_eq!(c.pxe_files.bios, "undionly.kpxe");
        let o = Overrides {
            dhcp_server: Some("br0".into()),
            dhcp_range: Some("192.0.2.100-192.0.2.199".into()),
            pxe_uefi: Some(uki.into()),
            ..Default::default()
        };
        let c = Config::build(f(base), &o).unwrap();
        assert!(c.dhcp_server.is_some());
        assert_eq!(c.pxe_files.uefi, uki, "the DHCP server gives pxe_files");
        let c = Config::build(f(base), &Overrides::default()).unwrap();
        assert_eq!(c.pxe_files.uefi, "ipxe.efi");
        for bad in ["", &"x".repeat(MAX_BOOT_FILE + 1)] {
            let o = Overrides {
                pxe_uefi: Some(bad.to_string()),
                ..Default::default()
            };
            let e = Config::build(f(base), &o).unwrap_err().to_string();
            assert!(e.contains("[proxy_dhcp] uefi"), "{e}");
        }
    }

    #[test]
    fn tftp_limits_from_file_flags_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides {
            tftp_root: Some(dir.path().into()),
            no_nbd: true,
            ..Default::default()
        };
        let t = Config::build(FileConfig::default(), &o)
            .unwrap()
            .tftp
            .unwrap();
        assert_eq!(t.max_client_timeout, Duration::from_secs(5));
        assert_eq!(t.max_transfer_time, Duration::from_secs(600));
        assert_eq!(t.read_ahead_budget, 8 << 20);
        let f = parse_file(
            Path::new("c.toml"),
            "[tftp]\nmax_client_timeout = 2\nmax_transfer_secs = 30\nread_ahead_kib = 0\n",
        )
        .unwrap();
        let t = Config::build(f, &o).unwrap().tftp.unwrap();
        assert_eq!(t.max_client_timeout, Duration::from_secs(2));
        assert_eq!(t.max_transfer_time, Duration::from_secs(30));
        assert_eq!(t.read_ahead_budget, 0);
        let o = Overrides {
            tftp_max_transfer_secs: Some(0),
            tftp_read_ahead_kib: Some(16),
            ..o
        };
        let t = Config::build(FileConfig::default(), &o)
            .unwrap()
            .tftp
            .unwrap();
        assert_eq!(
            t.max_transfer_time,
            Duration::from_secs(1),
            "never unbounded"
        );
        assert_eq!(t.read_ahead_budget, 16 * 1024);
    }

    #[test]
    fn nbd_memory_settings_default_parse_and_override() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        std::fs::write(&img, b"x").unwrap();
        let text = |extra: &str| {
            format!("[tftp]\nenabled = false\n[nbd]\nexports = {{ root = {img:?} }}\n{extra}")
        };
        let c = Config::build(
            parse_file(Path::new("c.toml"), &text("")).unwrap(),
            &Overrides::default(),
        )
        .unwrap();
        let n = c.nbd.unwrap();
        assert_eq!(n.max_reply_bytes_per_connection, 1 << 20);
        assert_eq!(n.max_reply_bytes, 8 << 20);
        assert_eq!(n.write_timeout, Duration::from_secs(30));
        assert_eq!(n.trace_file, None, "tracing is off by default");
        let f = parse_file(Path::new("c.toml"), &text("trace_file = \"/t/a\"\n")).unwrap();
        let n = Config::build(f, &Overrides::default())
            .unwrap()
            .nbd
            .unwrap();
        assert_eq!(n.trace_file.as_deref(), Some(Path::new("/t/a")));
        let f = parse_file(Path::new("c.toml"), &text("trace_file = \"/t/a\"\n")).unwrap();
        let o = Overrides {
            nbd_trace: Some("/t/b".into()),
            ..Default::default()
        };
        let n = Config::build(f, &o).unwrap().nbd.unwrap();
        assert_eq!(n.trace_file.as_deref(), Some(Path::new("/t/b")));
        let f = parse_file(
            Path::new("c.toml"),
            &text("max_reply_bytes_per_connection = 4096\nmax_reply_bytes = 65536\nwrite_timeout = 5\n"),
        )
        .unwrap();
        let o = Overrides {
            nbd_write_timeout: Some(7),
            ..Default::default()
        };
        let n = Config::build(f, &o).unwrap().nbd.unwrap();
        assert_eq!(
            (n.max_reply_bytes_per_connection, n.max_reply_bytes),
            (4096, 65536)
        );
        assert_eq!(n.write_timeout, Duration::from_secs(7));
        let f = parse_file(Path::new("c.toml"), &text("write_timeout = 0\n")).unwrap();
        let e = Config::build(f, &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("write_timeout"), "{e}");
    }

    #[test]
    fn dhcp_settings_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let build = |extra: &str| {
            let f = parse_file(
                Path::new("c.toml"),
                &format!(
                    "[tftp]\nroot = {:?}\n[nbd]\nlisten = \"127.0.0.1:0\"\n{extra}",
                    dir.path()
                ),
            )
            .unwrap();
            Config::build(f, &Overrides::default())
        };
        let ds = |extra: &str| {
            build(&format!(
                "[dhcp_server]\ninterface = \"x\"\nrange = \"192.0.2.10-192.0.2.19\"\n{extra}"
            ))
        };
        let d = ds("").unwrap().dhcp_server.unwrap();
        assert_eq!(d.max_leases, 10, "default: the range size");
        assert_eq!(d.lease_secs, 43200);
        let d = ds("max_leases = 4\nlease_time = 99999999999").unwrap();
        let d = d.dhcp_server.unwrap();
        assert_eq!(d.max_leases, 4);
        assert_eq!(d.lease_secs, u32::MAX as u64, "option 51 is 32 bits");
        assert!(ds("max_leases = 0").is_err());
        assert_eq!(
            d.reuse_after_secs,
            u32::MAX as u64,
            "default: the lease time"
        );
        assert_eq!(d.lease_file.as_deref(), Some(Path::new(LEASE_FILE_DEFAULT)));
        // The floor: 60 s unless lowered; a lease under it is raised to it.
        assert_eq!(
            ds("lease_time = 30")
                .unwrap()
                .dhcp_server
                .unwrap()
                .lease_secs,
            60
        );
        let d = ds("lease_time = 30\nmin_lease_time = 10\nreuse_after = 5\nlease_file = \"\"")
            .unwrap()
            .dhcp_server
            .unwrap();
        assert_eq!((d.lease_secs, d.reuse_after_secs), (30, 5));
        assert_eq!(d.lease_file, None, "\"\": memory only");
        for bad in [
            "min_lease_time = 0",
            "min_lease_time = 4",
            "min_lease_time = 86401",
        ] {
            let e = ds(bad).unwrap_err().to_string();
            assert!(e.contains("min_lease_time"), "{e}");
        }
        // A /8 range is refused: every address in it is one a client could make us track.
        let big = build("[dhcp_server]\ninterface = \"x\"\nrange = \"10.0.0.1-10.255.255.254\"\n");
        assert!(big.unwrap_err().to_string().contains("at most 65536"));
        let b16 =
            build("[dhcp_server]\ninterface = \"x\"\nrange = \"10.0.0.0-10.0.255.255\"\n").unwrap();
        assert_eq!(b16.dhcp_server.unwrap().max_leases, MAX_LEASES_DEFAULT_CAP);
        // set_fname_str() panics past 128 bytes: such a name is refused at start instead.
        let e = build(&format!("[proxy_dhcp]\nbios = \"{}\"\n", "a".repeat(128))).unwrap_err();
        assert!(e.to_string().contains("1 to 127 bytes"), "{e}");
        assert!(build(&format!("[proxy_dhcp]\nbios = \"{}\"\n", "a".repeat(127))).is_ok());
        // The arm64 loader: GRUB's netboot image unless set, bounded like the others,
        // and the same for both DHCP modes.
        let d = build("[proxy_dhcp]\ninterface = \"x\"\n").unwrap();
        assert_eq!(d.pxe_files.arm64, "grub/arm64-efi/core.efi");
        assert_eq!(d.proxy_dhcp.unwrap().arm64, "grub/arm64-efi/core.efi");
        let d = build("[proxy_dhcp]\ninterface = \"x\"\narm64 = \"arm64/snp.efi\"\n").unwrap();
        assert_eq!(d.pxe_files.arm64, "arm64/snp.efi");
        assert_eq!(d.proxy_dhcp.unwrap().arm64, "arm64/snp.efi");
        let e = build(&format!("[proxy_dhcp]\narm64 = \"{}\"\n", "a".repeat(128))).unwrap_err();
        assert!(e.to_string().contains("[proxy_dhcp] arm64"), "{e}");
    }

    #[test]
    fn http_limits_default_and_come_from_file_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overrides {
            tftp_root: Some(dir.path().to_path_buf()),
            no_nbd: true,
            ..Default::default()
        };
        assert!(Config::build(FileConfig::default(), &o)
            .unwrap()
            .http
            .is_none());
        let f = parse_file(
            Path::new("c.toml"),
            "[http]\nlisten = \"127.0.0.1:8080\"\nmax_connections_per_client = 2\nwrite_timeout = 5\nmax_header_bytes = 10\n",
        )
        .unwrap();
        let o = Overrides {
            http_header_timeout: Some(3),
            ..o
        };
        let h = Config::build(f, &o).unwrap().http.unwrap();
        assert_eq!(h.listen.port(), 8080);
        assert_eq!(h.max_connections, 256);
        assert_eq!(h.max_connections_per_client, 2);
        assert_eq!(h.header_timeout, Duration::from_secs(3));
        assert_eq!(h.write_timeout, Duration::from_secs(5));
        // Too small to carry any real request: raised to the floor.
        assert_eq!(h.max_header_bytes, 1024);
    }
}
