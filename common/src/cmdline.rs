//! The kernel command line, split the way the kernel splits it, then read into the options
//! the agent acts on. A typo never aborts: it becomes a warning that names the parameter,
//! and the option keeps its default.

use crate::step::Step;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Splits a command line as the kernel's `next_arg()` does: whitespace outside double
/// quotes separates; outer quotes of a word or of its value are removed. Words after a
/// lone `--` are returned separately: they belong to init.
pub fn split(line: &str) -> (Vec<(String, Option<String>)>, Vec<String>) {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut started = false;
    for c in line.chars() {
        if c == '"' {
            in_quote = !in_quote;
        }
        if c.is_whitespace() && !in_quote {
            if started {
                words.push(std::mem::take(&mut cur));
                started = false;
            }
            continue;
        }
        cur.push(c);
        started = true;
    }
    if started {
        words.push(cur);
    }
    let mut params = Vec::new();
    let mut init_args = Vec::new();
    let mut rest = words.into_iter();
    for w in rest.by_ref() {
        if w == "--" {
            break;
        }
        params.push(unquote_param(&w));
    }
    init_args.extend(rest.map(|w| unquote(&w).to_string()));
    (params, init_args)
}

fn unquote(s: &str) -> &str {
    let s = s.strip_prefix('"').unwrap_or(s);
    s.strip_suffix('"').unwrap_or(s)
}

fn unquote_param(w: &str) -> (String, Option<String>) {
    let whole_quoted = w.starts_with('"');
    let w = if whole_quoted { unquote(w) } else { w };
    match w.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(unquote(v).to_string())),
        None => (w.to_string(), None),
    }
}

/// Where the root image comes from: one NBD server and export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    /// `None`: the boot server learnt from DHCP (next-server), or `ltsp.server`.
    pub host: Option<String>,
    pub port: u16,
    /// Empty selects the server's default export.
    pub export: String,
}

pub const NBD_DEFAULT_PORT: u16 = 10809;

impl fmt::Display for NbdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.host.as_deref().unwrap_or("<dhcp next-server>");
        if host.contains(':') {
            write!(f, "nbd://[{host}]:{}/{}", self.port, self.export)
        } else {
            write!(f, "nbd://{host}:{}/{}", self.port, self.export)
        }
    }
}

/// Parses one `nbdroot=` (or `root=nbd:`) value in the forms initramfs-tools, dracut and
/// LTSP users write. Errors say which form was expected.
pub fn parse_nbdroot(v: &str) -> Result<NbdTarget, String> {
    let v = v.trim();
    let mk = |host: &str, port: Option<&str>, export: &str| -> Result<NbdTarget, String> {
        let port = match port {
            None | Some("") => NBD_DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
        };
        let host = host.trim();
        let host = (!host.is_empty() && host != "dhcp").then(|| host.to_string());
        Ok(NbdTarget {
            host,
            port,
            export: export.to_string(),
        })
    };
    if v.is_empty() || v == "dhcp" {
        return mk("", None, "");
    }
    if let Some(url) = v.strip_prefix("nbd://") {
        let (hostport, export) = url.split_once('/').unwrap_or((url, ""));
        let (host, port) = split_host_port(hostport)?;
        return mk(host, port, export);
    }
    let v = v.strip_prefix("nbd:").unwrap_or(v);
    // initramfs-tools: host,port|export[,nbdX]
    if let Some((host, rest)) = v.split_once(',') {
        let second = rest.split(',').next().unwrap_or("");
        return if !second.is_empty() && second.bytes().all(|b| b.is_ascii_digit()) {
            mk(host, Some(second), "")
        } else {
            mk(host, None, second)
        };
    }
    // host[:port][/export], [v6][:port][/export]; LTSP5's `host:export` too.
    let (hostport, export) = match v.find('/') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    };
    let (host, port) = split_host_port(hostport)?;
    match (port, export) {
        (Some(p), None) if !p.bytes().all(|b| b.is_ascii_digit()) => mk(host, None, p),
        (port, export) => mk(host, port, export.unwrap_or("")),
    }
}

fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: expected ']' after an IPv6 address"))?;
        return match after {
            "" => Ok((host, None)),
            a => a
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or_else(|| format!("{s:?}: expected ':port' after ']'")),
        };
    }
    if s.matches(':').count() > 1 {
        return Err(format!(
            "{s:?}: write an IPv6 address in brackets, [addr]:port"
        ));
    }
    Ok(match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    })
}

/// `ip=` in the kernel's nfsroot form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum IpConfig {
    /// Not given: DHCP on the boot NIC.
    #[default]
    Auto,
    Dhcp {
        device: Option<String>,
    },
    Off,
    Static(StaticIp),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    pub client: Ipv4Addr,
    pub server: Option<Ipv4Addr>,
    pub gateway: Option<Ipv4Addr>,
    pub netmask: Option<Ipv4Addr>,
    pub hostname: Option<String>,
    pub device: Option<String>,
    pub dns: Vec<Ipv4Addr>,
}

pub fn parse_ip(v: &str) -> Result<IpConfig, String> {
    match v {
        "dhcp" | "on" | "any" | "both" | "bootp" => return Ok(IpConfig::Dhcp { device: None }),
        "off" | "none" => return Ok(IpConfig::Off),
        _ => {}
    }
    let f: Vec<&str> = v.split(':').collect();
    if f.len() < 2 {
        return Err(format!(
            "{v:?}: expected dhcp, off, or client:server:gw:netmask:hostname:device:autoconf:dns0:dns1"
        ));
    }
    let field = |i: usize| f.get(i).copied().unwrap_or("");
    let addr = |i: usize, what: &str| -> Result<Option<Ipv4Addr>, String> {
        match field(i) {
            "" => Ok(None),
            s => s
                .parse()
                .map(Some)
                .map_err(|_| format!("{what} {s:?} in ip= is not an IPv4 address")),
        }
    };
    let opt = |i: usize| (!field(i).is_empty()).then(|| field(i).to_string());
    let device = opt(5);
    let autoconf = field(6);
    let client = addr(0, "client")?;
    match (autoconf, client) {
        ("dhcp" | "on" | "any" | "both" | "bootp" | "", None) => Ok(IpConfig::Dhcp { device }),
        ("off" | "none" | "", Some(client)) => Ok(IpConfig::Static(StaticIp {
            client,
            server: addr(1, "server")?,
            gateway: addr(2, "gateway")?,
            netmask: addr(3, "netmask")?,
            hostname: opt(4),
            device,
            dns: [addr(7, "dns0")?, addr(8, "dns1")?]
                .into_iter()
                .flatten()
                .collect(),
        })),
        ("off" | "none", None) => Err(format!("{v:?}: autoconf off needs a client address")),
        (a, Some(_)) if a != "off" && a != "none" => Ok(IpConfig::Dhcp { device }),
        (a, _) => Err(format!(
            "{v:?}: autoconf {a:?} is not one of dhcp, on, any, off, none"
        )),
    }
}

/// What the agent does when a step fails for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Shell,
    Reboot(Duration),
    Halt,
}

impl fmt::Display for OnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnFailure::Shell => f.write_str("shell"),
            OnFailure::Halt => f.write_str("halt"),
            OnFailure::Reboot(d) => write!(f, "reboot:{}", d.as_secs()),
        }
    }
}

/// The Debian name of the architecture the agent was built for: `ltsp.arch=`'s default.
pub const DEFAULT_ARCH: &str = if cfg!(target_arch = "aarch64") {
    "arm64"
} else {
    "amd64"
};

/// One row of the option table: name, default, meaning. The README's table is built from
/// the same words; `ltsp-agent options` prints it.
pub const OPTIONS: &[(&str, &str, &str)] = &[
    ("root=", "(none)", "`/dev/nbd0` or `nbd:...` selects the network root; anything else is left to the initramfs"),
    ("nbdroot=", "dhcp", "NBD server and export: `host[:port][/export]`, `[v6]:port/export`, `host,port|export[,nbdX]`, `nbd://host[:port]/export`, `dhcp`; repeat for failover servers"),
    ("ip=", "dhcp", "`dhcp`, `off`, or `client:server:gw:netmask:hostname:device:autoconf:dns0:dns1`"),
    ("BOOTIF=", "(none)", "MAC of the boot NIC as PXELINUX/iPXE pass it (`01-aa-bb-..`)"),
    ("init=", "/sbin/init", "program exec'd as PID 1 in the new root"),
    ("ltsp.server=", "(DHCP next-server)", "boot server for TFTP (lts.conf) and for NBD targets without a host"),
    ("ltsp.conf=", "(boot file dir)/lts.conf, /ltsp/<arch>/lts.conf", "path of lts.conf on the TFTP server; `none` uses only /etc/lts.conf of the image"),
    ("ltsp.arch=", "the agent's: amd64 or arm64", "the <arch> in /ltsp/<arch>/lts.conf"),
    ("ltsp.overlay-size=", "50%", "size of the tmpfs that takes the node's writes (tmpfs `size=`)"),
    ("ltsp.timeout=", "120", "seconds, from the agent's start, that the network steps (link, DHCP, NBD) keep retrying before the boot fails"),
    ("ltsp.retries=", "0", "at most this many attempts per network step (0: only the timeout limits)"),
    ("ltsp.on-failure=", "reboot:60", "`shell`, `halt`, or `reboot[:SECONDS]` once a step failed for good"),
    ("ltsp.reconnect=", "1", "`0`: start no reconnect helper (a dead NBD connection then stays dead)"),
    ("ltsp.debug=", "0", "`1`: log every decision, not only the steps"),
    ("ltsp.break=", "(none)", "comma list of steps to stop before with a shell: modules,net,ltsconf,nbd,to-ram,verity,root,apply,switch,preinit,init"),
    ("ltsp.nbd-connections=", "auto", "NBD connections per device when the server offers CAN_MULTI_CONN; auto: 2, or 1 on a single CPU (the block layer then uses one queue, so a second connection would only cost)"),
    ("ltsp.nbd-timeout=", "10", "seconds an NBD request may take before the kernel marks its connection dead and resends it (a killed server's unanswered requests wait this long)"),
    ("ltsp.dead-timeout=", "300", "seconds the kernel holds I/O while a dead NBD connection is being replaced"),
    ("ltsp.allow-anonymous=", "0", "1: accept an NBD server that gives no image identity (checked by size only)"),
    ("ltsp.to-ram=", "0", "`1`: copy the image into RAM, check it against its identity, mount it from a loop device and disconnect NBD: the node then needs no server (falls back to the network root when RAM is short or the copy cannot finish within `ltsp.timeout`)"),
    ("ltsp.verity=", "(none)", "the image's dm-verity root hash (`root.squashfs.roothash` from deploy/build-image): every block of the root is checked against the hash tree appended to the squashfs, and a block that does not match reads as an I/O error; a value that is not 40 to 128 hex digits, or an image without the tree, fails the boot"),
    ("ltsp.modules=", "(none)", "extra kernel modules to load, comma separated"),
    ("ltsp.preinit-timeout=", "60", "seconds the PREINIT_* commands may run, all together, before they are killed and the boot goes on (lts.conf's PREINIT_TIMEOUT; this wins)"),
    ("ltsp.KEY=", "", "any other name overrides lts.conf's KEY (upper-cased); `NONE` unsets it"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub params: Vec<(String, Option<String>)>,
    pub init_args: Vec<String>,
    pub root: Option<String>,
    pub init: String,
    pub nbd: Vec<NbdTarget>,
    pub ip: IpConfig,
    pub bootif: Option<String>,
    pub server: Option<String>,
    pub conf_path: Option<String>,
    pub arch: String,
    pub overlay_size: String,
    pub timeout: Duration,
    pub retries: u32,
    pub on_failure: OnFailure,
    pub debug: bool,
    pub reconnect: bool,
    /// Accept an NBD server that gives no image identity (then only the size is checked).
    pub allow_anonymous: bool,
    /// Run from a copy of the image in RAM (`ltsp.to-ram=1`).
    pub to_ram: bool,
    /// The pinned dm-verity root hash, as given (checked by the agent's `verity` step, so
    /// a malformed one fails the boot instead of booting unverified).
    pub verity: Option<String>,
    pub breaks: Vec<Step>,
    /// 0: auto, see [`Cmdline::nbd_connections_for`].
    pub nbd_connections: u32,
    pub nbd_timeout: Duration,
    pub dead_timeout: Duration,
    pub modules: Vec<String>,
    /// `ltsp.KEY=value` for lts.conf keys, upper-cased, in cmdline order.
    pub overrides: Vec<(String, String)>,
    pub warnings: Vec<String>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Cmdline {
            params: Vec::new(),
            init_args: Vec::new(),
            root: None,
            init: "/sbin/init".into(),
            nbd: Vec::new(),
            ip: IpConfig::Auto,
            bootif: None,
            server: None,
            conf_path: None,
            arch: DEFAULT_ARCH.into(),
            overlay_size: "50%".into(),
            timeout: Duration::from_secs(120),
            retries: 0,
            on_failure: OnFailure::Reboot(Duration::from_secs(60)),
            debug: false,
            reconnect: true,
            allow_anonymous: false,
            to_ram: false,
            verity: None,
            breaks: Vec::new(),
            nbd_connections: 0,
            nbd_timeout: Duration::from_secs(10),
            dead_timeout: Duration::from_secs(300),
            modules: Vec::new(),
            overrides: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

impl Cmdline {
    /// NBD connections per device on a node with `cpus` CPUs: as asked, else 2, or 1 on a
    /// single CPU (blk-mq maps each CPU to one hardware queue, i.e. one connection).
    pub fn nbd_connections_for(&self, cpus: usize) -> u32 {
        match self.nbd_connections {
            0 if cpus <= 1 => 1,
            0 => 2,
            n => n,
        }
    }

    /// True when the cmdline asks for a network root: `root=/dev/nbd*`, `root=nbd:...`,
    /// or any `nbdroot=`. The initramfs-tools boot script hands over only then.
    pub fn wants_network_root(&self) -> bool {
        !self.nbd.is_empty()
            || self
                .root
                .as_deref()
                .is_some_and(|r| r.starts_with("/dev/nbd") || r.starts_with("nbd:"))
    }

    /// Every NBD target to try, in order, with missing hosts filled from `fallback`
    /// (`ltsp.server`, else the DHCP next-server).
    pub fn nbd_targets(&self, fallback: Option<&str>) -> Vec<NbdTarget> {
        let mut v = if self.nbd.is_empty() {
            vec![NbdTarget {
                host: None,
                port: NBD_DEFAULT_PORT,
                export: String::new(),
            }]
        } else {
            self.nbd.clone()
        };
        let fallback = self.server.as_deref().or(fallback);
        for t in &mut v {
            if t.host.is_none() {
                t.host = fallback.map(str::to_string);
            }
        }
        v
    }

    pub fn parse(line: &str) -> Cmdline {
        let (params, init_args) = split(line);
        let mut c = Cmdline {
            init_args,
            ..Default::default()
        };
        for (k, v) in &params {
            c.apply(k, v.as_deref());
        }
        c.params = params;
        c
    }

    fn apply(&mut self, key: &str, value: Option<&str>) {
        let val = value.unwrap_or("");
        let warn = |w: &mut Vec<String>, msg: String| w.push(format!("{key}={val}: {msg}"));
        match key {
            "root" => {
                self.root = Some(val.to_string());
                if let Some(rest) = val.strip_prefix("nbd:") {
                    match parse_nbdroot(rest) {
                        Ok(t) => self.nbd.push(t),
                        Err(e) => warn(&mut self.warnings, e),
                    }
                }
            }
            "init" => self.init = val.to_string(),
            "nbdroot" => match parse_nbdroot(val) {
                Ok(t) => self.nbd.push(t),
                Err(e) => warn(&mut self.warnings, e),
            },
            "ip" => match parse_ip(val) {
                Ok(ip) => self.ip = ip,
                Err(e) => warn(&mut self.warnings, format!("{e}; using DHCP")),
            },
            "BOOTIF" => {
                // PXELINUX/iPXE: hardware type, then the MAC: 01-aa-bb-cc-dd-ee-ff.
                let mac = val.split_once('-').map_or(val, |(_, m)| m);
                let mac = crate::ltsconf::normalise_mac(mac);
                if is_mac(&mac) {
                    self.bootif = Some(mac);
                } else {
                    warn(&mut self.warnings, "expected 01-aa-bb-cc-dd-ee-ff".into());
                }
            }
            k if k.starts_with("ltsp.") => self.apply_ltsp(&k[5..], value),
            _ => {}
        }
    }

    fn apply_ltsp(&mut self, name: &str, value: Option<&str>) {
        let val = value.unwrap_or("");
        let full = format!("ltsp.{name}={val}");
        let secs = |w: &mut Vec<String>, v: &str, default: Duration| -> Duration {
            match v.parse::<u64>() {
                Ok(s) => Duration::from_secs(s),
                Err(_) => {
                    w.push(format!(
                        "{full}: expected whole seconds; using {}",
                        default.as_secs()
                    ));
                    default
                }
            }
        };
        // Agent options are lower case; `-` and `_` are the same, as for kernel params.
        let opt = name.replace('_', "-");
        match opt.as_str() {
            "server" => self.server = Some(val.to_string()),
            "conf" => self.conf_path = Some(val.to_string()),
            "arch" => self.arch = val.to_string(),
            "overlay-size" => {
                if val.is_empty()
                    || !val
                        .trim_end_matches(['%', 'k', 'K', 'm', 'M', 'g', 'G'])
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                {
                    self.warnings.push(format!(
                        "{full}: expected a tmpfs size such as 50% or 2G; using {}",
                        self.overlay_size
                    ));
                } else {
                    self.overlay_size = val.to_string();
                }
            }
            "timeout" => self.timeout = secs(&mut self.warnings, val, self.timeout),
            "nbd-timeout" => self.nbd_timeout = secs(&mut self.warnings, val, self.nbd_timeout),
            "dead-timeout" => self.dead_timeout = secs(&mut self.warnings, val, self.dead_timeout),
            "retries" => match val.parse() {
                Ok(n) => self.retries = n,
                Err(_) => self.warnings.push(format!(
                    "{full}: expected a whole number; using {}",
                    self.retries
                )),
            },
            "nbd-connections" => match val.parse::<u32>() {
                Ok(n @ 1..=16) => self.nbd_connections = n,
                _ => self.warnings.push(format!(
                    "{full}: expected 1 to 16; using {}",
                    match self.nbd_connections {
                        0 => "auto".to_string(),
                        n => n.to_string(),
                    }
                )),
            },
            "on-failure" => match parse_on_failure(val) {
                Ok(f) => self.on_failure = f,
                Err(e) => self
                    .warnings
                    .push(format!("{full}: {e}; using {}", self.on_failure)),
            },
            "debug" => self.debug = !matches!(val, "0" | "no" | "false" | "off"),
            "reconnect" => self.reconnect = !matches!(val, "0" | "no" | "false" | "off"),
            "allow-anonymous" => {
                self.allow_anonymous = !matches!(val, "0" | "no" | "false" | "off")
            }
            "to-ram" => self.to_ram = !matches!(val, "0" | "no" | "false" | "off"),
            "verity" => self.verity = Some(val.to_string()),
            "break" => {
                for b in val.split(',').filter(|b| !b.is_empty()) {
                    match Step::from_break(b) {
                        Some(step) => self.breaks.push(step),
                        None => self.warnings.push(format!(
                            "{full}: unknown step {b:?}; expected one of {}",
                            Step::break_names()
                        )),
                    }
                }
            }
            // Checked where it is used, as the lts.conf key it stands for.
            "preinit-timeout" => self
                .overrides
                .push(("PREINIT_TIMEOUT".into(), val.to_string())),
            "modules" => self
                .modules
                .extend(val.split(',').filter(|m| !m.is_empty()).map(str::to_string)),
            _ => {
                // Anything else is an lts.conf key. A lower-case name that is close to no
                // key is most likely a typo of an option: say so, then still pass it on.
                if name.bytes().any(|b| b.is_ascii_lowercase()) && name.contains('-') {
                    self.warnings.push(format!(
                        "{full}: not an agent option (see `ltsp-agent options`); passed on as lts.conf key {}",
                        name.to_ascii_uppercase()
                    ));
                }
                // An agent option in the wrong case is an lts.conf key, so it does nothing
                // here: for `ltsp.VERITY=` that would boot an unverified root unnoticed.
                let lower = format!("ltsp.{}=", opt.to_ascii_lowercase());
                if opt.bytes().any(|b| b.is_ascii_uppercase())
                    && OPTIONS.iter().any(|(o, _, _)| *o == lower)
                {
                    self.warnings.push(format!(
                        "{full}: agent options are lower case; this is read as lts.conf key {}, not as {lower}",
                        name.to_ascii_uppercase()
                    ));
                }
                self.overrides
                    .push((name.to_ascii_uppercase(), val.to_string()));
            }
        }
    }
}

fn parse_on_failure(v: &str) -> Result<OnFailure, String> {
    match v {
        "shell" => Ok(OnFailure::Shell),
        "halt" | "poweroff" => Ok(OnFailure::Halt),
        "reboot" => Ok(OnFailure::Reboot(Duration::from_secs(60))),
        _ => match v.strip_prefix("reboot:").map(str::parse::<u64>) {
            Some(Ok(s)) => Ok(OnFailure::Reboot(Duration::from_secs(s))),
            _ => Err("expected shell, halt, reboot or reboot:SECONDS".into()),
        },
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_table_lists_the_break_steps() {
        let (_, _, meaning) = OPTIONS.iter().find(|o| o.0 == "ltsp.break=").unwrap();
        assert!(meaning.ends_with(&Step::break_names()), "{meaning}");
    }

    #[test]
    fn verity_hash_is_kept_as_given_even_when_malformed() {
        // Checked by the agent's verity step: a bad value must fail the boot, not vanish.
        for v in ["ABCDEF01", "", "not-hex"] {
            let c = Cmdline::parse(&format!("root=/dev/nbd0 ltsp.verity={v}"));
            assert_eq!(c.verity.as_deref(), Some(v));
        }
        assert_eq!(Cmdline::parse("ltsp.verity").verity.as_deref(), Some(""));
        assert_eq!(Cmdline::parse("root=/dev/nbd0").verity, None);
    }

    #[test]
    fn kernel_quoting() {
        let (p, init) =
            split("a=1 b=\"x y=z\" \"c=quoted whole\" flag d=e=f  -- single --weird \"q q\"");
        let p: Vec<(&str, Option<&str>)> =
            p.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        assert_eq!(
            p,
            vec![
                ("a", Some("1")),
                ("b", Some("x y=z")),
                ("c", Some("quoted whole")),
                ("flag", None),
                ("d", Some("e=f")),
            ]
        );
        assert_eq!(init, vec!["single", "--weird", "q q"]);
    }

    #[test]
    fn nbdroot_forms() {
        let t = |h: Option<&str>, port: u16, e: &str| NbdTarget {
            host: h.map(Into::into),
            port,
            export: e.into(),
        };
        let cases = [
            ("192.0.2.1", t(Some("192.0.2.1"), 10809, "")),
            ("192.0.2.1:10810", t(Some("192.0.2.1"), 10810, "")),
            ("192.0.2.1/root", t(Some("192.0.2.1"), 10809, "root")),
            ("192.0.2.1:1234/root", t(Some("192.0.2.1"), 1234, "root")),
            ("srv:ltsp_amd64", t(Some("srv"), 10809, "ltsp_amd64")),
            (":ltsp_amd64", t(None, 10809, "ltsp_amd64")),
            (
                "[2001:db8::1]:10809/img",
                t(Some("2001:db8::1"), 10809, "img"),
            ),
            ("[2001:db8::1]/img", t(Some("2001:db8::1"), 10809, "img")),
            ("192.0.2.1,10810", t(Some("192.0.2.1"), 10810, "")),
            ("192.0.2.1,root,nbd0", t(Some("192.0.2.1"), 10809, "root")),
            ("nbd://srv:99/a/b", t(Some("srv"), 99, "a/b")),
            ("nbd://[::1]/x", t(Some("::1"), 10809, "x")),
            ("nbd:srv:7/x", t(Some("srv"), 7, "x")),
            ("dhcp", t(None, 10809, "")),
        ];
        for (input, want) in cases {
            assert_eq!(parse_nbdroot(input), Ok(want), "{input}");
        }
        for bad in ["srv:99999/x", "2001:db8::1/x", "[::1/x", "srv:0/x"] {
            assert!(parse_nbdroot(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ip_forms() {
        assert_eq!(parse_ip("dhcp"), Ok(IpConfig::Dhcp { device: None }));
        assert_eq!(parse_ip("off"), Ok(IpConfig::Off));
        assert_eq!(
            parse_ip(":::::eth1:dhcp"),
            Ok(IpConfig::Dhcp {
                device: Some("eth1".into())
            })
        );
        let s = parse_ip("192.0.2.5:192.0.2.1:192.0.2.254:255.255.255.0:node5:eth0:off:192.0.2.53")
            .unwrap();
        let IpConfig::Static(s) = s else { panic!() };
        assert_eq!(s.client, Ipv4Addr::new(192, 0, 2, 5));
        assert_eq!(s.gateway, Some(Ipv4Addr::new(192, 0, 2, 254)));
        assert_eq!(s.hostname.as_deref(), Some("node5"));
        assert_eq!(s.device.as_deref(), Some("eth0"));
        assert_eq!(s.dns, vec![Ipv4Addr::new(192, 0, 2, 53)]);
        assert!(parse_ip("192.0.2.500::::::off").is_err());
        assert!(parse_ip("bogus").is_err());
    }

    #[test]
    fn typed_options_and_overrides() {
        let c = Cmdline::parse(
            "BOOT_IMAGE=/vmlinuz root=/dev/nbd0 nbdroot=192.0.2.1/img nbdroot=192.0.2.2/img \
             BOOTIF=01-AA-BB-CC-DD-EE-FF ltsp.overlay_size=2G ltsp.on-failure=reboot:5 \
             ltsp.break=nbd,init ltsp.HOSTNAME=n1 ltsp.timeout=9 init=/lib/systemd/systemd quiet",
        );
        assert!(c.wants_network_root());
        assert_eq!(c.nbd.len(), 2);
        assert_eq!(c.bootif.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(c.overlay_size, "2G");
        assert_eq!(c.on_failure, OnFailure::Reboot(Duration::from_secs(5)));
        assert_eq!(c.breaks, vec![Step::Nbd, Step::Init]);
        assert_eq!(c.overrides, vec![("HOSTNAME".into(), "n1".into())]);
        assert_eq!(c.timeout, Duration::from_secs(9));
        assert_eq!(c.init, "/lib/systemd/systemd");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn typos_warn_and_keep_defaults() {
        let c = Cmdline::parse(
            "ltsp.timeout=ten ltsp.on-failure=explode ltsp.break=nope ltsp.overlay-sise=1G \
             ltsp.nbd-connections=99 BOOTIF=zz ip=1.2.3.999::::::off nbdroot=srv:70000",
        );
        assert_eq!(c.timeout, Duration::from_secs(120));
        assert_eq!(c.on_failure, OnFailure::Reboot(Duration::from_secs(60)));
        assert!(c.breaks.is_empty());
        assert_eq!(c.ip, IpConfig::Auto);
        assert!(c.nbd.is_empty());
        assert_eq!(c.warnings.len(), 8, "{:#?}", c.warnings);
        assert!(c.warnings[0].starts_with("ltsp.timeout=ten: expected whole seconds"));
        assert!(c.warnings[3].contains("not an agent option"));
        assert!(
            c.warnings
                .iter()
                .any(|w| w == "ltsp.nbd-connections=99: expected 1 to 16; using auto"),
            "{:#?}",
            c.warnings
        );
    }

    #[test]
    fn nbd_connections_follow_the_cpus_unless_given() {
        let auto = Cmdline::parse("root=/dev/nbd0");
        assert_eq!(auto.nbd_connections_for(1), 1);
        assert_eq!(auto.nbd_connections_for(64), 2);
        let given = Cmdline::parse("root=/dev/nbd0 ltsp.nbd-connections=4");
        assert_eq!(given.nbd_connections_for(1), 4);
    }

    #[test]
    fn targets_take_the_boot_server() {
        let c = Cmdline::parse("root=/dev/nbd0 nbdroot=:img");
        assert_eq!(
            c.nbd_targets(Some("192.0.2.1"))[0].to_string(),
            "nbd://192.0.2.1:10809/img"
        );
        let c = Cmdline::parse("root=/dev/nbd0 ltsp.server=192.0.2.9");
        assert_eq!(
            c.nbd_targets(Some("192.0.2.1"))[0].host.as_deref(),
            Some("192.0.2.9")
        );
        assert!(!Cmdline::parse("root=/dev/sda1").wants_network_root());
    }

    #[test]
    fn an_agent_option_in_upper_case_is_warned_about() {
        let c = Cmdline::parse("root=/dev/nbd0 ltsp.VERITY=abc ltsp.Timeout=5 ltsp.HOSTNAME=x");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("ltsp.VERITY=abc") && w.contains("ltsp.verity=")),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings.iter().any(|w| w.contains("ltsp.timeout=")),
            "{:?}",
            c.warnings
        );
        assert!(
            !c.warnings.iter().any(|w| w.contains("HOSTNAME")),
            "{:?}",
            c.warnings
        );
        assert!(c.verity.is_none());
    }
}
