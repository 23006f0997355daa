//! The boot NIC: chosen (BOOTIF=, the ip= device, else the first with carrier), brought up
//! over rtnetlink, configured by DHCP or a static ip=, and described in /run for the
//! initramfs-tools tools and for the root system.

pub mod dhcp;
pub mod lease;
pub mod link;

use ltsp_common::cmdline::{Cmdline, IpConfig};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default)]
pub struct NetInfo {
    pub iface: String,
    pub index: u32,
    pub mac: String,
    pub lease: dhcp::Lease,
    pub proto: &'static str,
    /// Time spent waiting for the DHCP server's answer (not ours to speed up).
    pub dhcp_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("rtnetlink: {0}")]
    Netlink(#[from] std::io::Error),
    #[error(
        "no network interface {0}: check BOOTIF= / ip= and that its driver is in the initramfs"
    )]
    NoSuchNic(String),
    #[error("no NIC got a carrier within {0} s: check the cable / switch port")]
    NoCarrier(u64),
    #[error("no network interface at all: is the NIC driver in the initramfs?")]
    NoNic,
    #[error(transparent)]
    Dhcp(#[from] dhcp::DhcpError),
    #[error("ip=off: the network root needs a network")]
    Off,
}

pub(crate) fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut b = [0u8; 6];
    for (i, p) in mac.split(':').take(6).enumerate() {
        b[i] = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    b
}

/// Brings the boot NIC up and configures it, retrying until `deadline`.
pub fn bring_up(cmd: &Cmdline, deadline: Instant) -> Result<NetInfo, NetError> {
    let device = match &cmd.ip {
        IpConfig::Off => return Err(NetError::Off),
        IpConfig::Dhcp { device } => device.clone(),
        IpConfig::Static(s) => s.device.clone(),
        IpConfig::Auto => None,
    };
    let mut rt = link::Rtnl::new()?;
    let mut links = Vec::new();
    // Drivers probe asynchronously: wait for the NIC to appear.
    while Instant::now() < deadline {
        links = rt.links()?;
        if let Some(lo) = links.iter().find(|l| l.loopback) {
            if !lo.up {
                rt.set_up(lo.index)?;
            }
        }
        let found = match (&cmd.bootif, &device) {
            (Some(mac), _) => links.iter().any(|l| l.mac.as_deref() == Some(mac)),
            (None, Some(d)) => links.iter().any(|l| &l.name == d),
            _ => links.iter().any(|l| !l.loopback && l.mac.is_some()),
        };
        if found {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let candidates: Vec<link::Link> = links
        .into_iter()
        .filter(|l| !l.loopback && l.mac.is_some())
        .filter(|l| match (&cmd.bootif, &device) {
            (Some(mac), _) => l.mac.as_deref() == Some(mac),
            (None, Some(d)) => &l.name == d,
            _ => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(match (&cmd.bootif, &device) {
            (Some(m), _) => NetError::NoSuchNic(format!("with MAC {m} (BOOTIF)")),
            (None, Some(d)) => NetError::NoSuchNic(format!("{d} (ip=)")),
            _ => NetError::NoNic,
        });
    }
    // A NIC whose driver already has carrier (virtio reports it at probe) is opened once
    // with its queue started at once; opened without carrier, the queue waits for linkwatch.
    let had_carrier: Vec<u32> = candidates
        .iter()
        .filter(|c| c.carrier_now)
        .map(|c| c.index)
        .collect();
    for c in &candidates {
        rt.set_up(c.index)?;
    }
    // Wait for carrier: a DHCP packet sent before the link is ready is lost, and the
    // retry then costs whole seconds (klibc ipconfig's 10 s stalls).
    let chosen = loop {
        let links = rt.links()?;
        if let Some(l) = candidates
            .iter()
            .find_map(|c| links.iter().find(|l| l.index == c.index && l.carrier))
        {
            break l.clone();
        }
        if Instant::now() >= deadline {
            return Err(NetError::NoCarrier(cmd.timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mac = chosen.mac.clone().unwrap_or_default();
    log::info!("net: {} ({mac}) has carrier", chosen.name);
    if !chosen.running && !had_carrier.contains(&chosen.index) {
        // The NIC was opened before its driver reported carrier, so the kernel starts its
        // transmit queue only at linkwatch's next run, up to a second away, and drops what
        // is sent until then. Opened again now that carrier is on, the queue starts at once.
        log::debug!("net: {} not running yet; opened again", chosen.name);
        rt.set_down(chosen.index)?;
        rt.set_up(chosen.index)?;
    }
    let (lease, proto, dhcp_wait) = match &cmd.ip {
        IpConfig::Static(s) => {
            let lease = dhcp::Lease {
                ip: s.client,
                prefix: s.netmask.map(link::prefix_len).unwrap_or(24),
                router: s.gateway,
                dns: s.dns.clone(),
                hostname: s.hostname.clone(),
                next_server: s.server,
                ..Default::default()
            };
            (lease, "none", Duration::ZERO)
        }
        _ => {
            let (lease, waited) =
                dhcp::acquire(&chosen.name, chosen.index, &mac_bytes(&mac), deadline)?;
            (lease, "dhcp", waited)
        }
    };
    rt.add_address(chosen.index, lease.ip, lease.prefix)?;
    if let Some(gw) = lease.router {
        if let Err(e) = rt.add_default_route(chosen.index, gw) {
            log::warn!("net: default route via {gw}: {e}");
        }
    }
    log::info!(
        "net: {} is {}/{} via {} (server {})",
        chosen.name,
        lease.ip,
        lease.prefix,
        lease
            .router
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into()),
        lease
            .next_server
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into())
    );
    Ok(NetInfo {
        iface: chosen.name,
        index: chosen.index,
        mac,
        lease,
        proto,
        dhcp_wait,
    })
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0))
}

/// A value between single quotes, as a shell reads it back unchanged: `'` becomes `'\''`.
pub fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// `v` if it may go into a line-based file at all: no control characters (a newline
/// would start a line of its own, a NUL ends the value for C readers). Else None, and a
/// warning naming the key.
fn one_line<'a>(key: &str, v: &'a str) -> Option<&'a str> {
    if v.chars().any(char::is_control) {
        log::warn!("net: {key} {v:?} has control characters: left out of /run/net-*.conf");
        None
    } else {
        Some(v)
    }
}

/// `/run/net-IFACE.conf` as initramfs-tools' ipconfig writes it: scripts in the image
/// (and LTSP's) source it to learn how the node booted. Every value is single-quoted and
/// escaped; names that are no host or domain name, and values with control characters,
/// are left empty (the CVE-2011-1930 class: a DHCP string must never run as shell).
pub fn net_conf(n: &NetInfo, uptime: f64) -> String {
    let l = &n.lease;
    let mask = netmask(l.prefix);
    let bcast = Ipv4Addr::from(u32::from(l.ip) | !u32::from(mask));
    let dns = |i: usize| l.dns.get(i).copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
    let name = |key: &str, v: &Option<String>, ok: fn(&str) -> bool| match v.as_deref() {
        Some(v) if ok(v) => v.to_string(),
        Some(v) => {
            log::warn!("net: {key} {v:?} is not a valid name: left out of /run/net-*.conf");
            String::new()
        }
        None => String::new(),
    };
    let hostname = name("HOSTNAME", &l.hostname, crate::apply::valid_hostname);
    let domain = name("DNSDOMAIN", &l.domain, crate::apply::valid_domain);
    let text = |key: &str, v: &Option<String>| {
        v.as_deref()
            .and_then(|v| one_line(key, v))
            .unwrap_or("")
            .to_string()
    };
    let ip = |a: Ipv4Addr| a.to_string();
    let vars: [(&str, String); 17] = [
        ("DEVICE", text("DEVICE", &Some(n.iface.clone()))),
        ("PROTO", n.proto.to_string()),
        ("IPV4ADDR", ip(l.ip)),
        ("IPV4BROADCAST", ip(bcast)),
        ("IPV4NETMASK", ip(mask)),
        ("IPV4GATEWAY", ip(l.router.unwrap_or(Ipv4Addr::UNSPECIFIED))),
        ("IPV4DNS0", ip(dns(0))),
        ("IPV4DNS1", ip(dns(1))),
        ("HOSTNAME", hostname),
        ("DNSDOMAIN", domain.clone()),
        ("NISDOMAIN", String::new()),
        (
            "ROOTSERVER",
            ip(l.next_server.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        ),
        ("ROOTPATH", text("ROOTPATH", &l.root_path)),
        ("filename", text("filename", &l.bootfile)),
        ("UPTIME", (uptime as u64).to_string()),
        ("DHCPLEASETIME", l.lease_secs.unwrap_or(0).to_string()),
        ("DOMAINSEARCH", domain),
    ];
    vars.iter()
        .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_conf_has_initramfs_tools_keys() {
        let n = NetInfo {
            iface: "ens3".into(),
            proto: "dhcp",
            lease: dhcp::Lease {
                ip: Ipv4Addr::new(192, 0, 2, 10),
                prefix: 24,
                router: Some(Ipv4Addr::new(192, 0, 2, 1)),
                dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
                next_server: Some(Ipv4Addr::new(192, 0, 2, 1)),
                bootfile: Some("boot.ipxe".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = net_conf(&n, 3.4);
        for want in [
            "DEVICE='ens3'\n",
            "IPV4ADDR='192.0.2.10'\n",
            "IPV4NETMASK='255.255.255.0'\n",
            "IPV4BROADCAST='192.0.2.255'\n",
            "IPV4GATEWAY='192.0.2.1'\n",
            "IPV4DNS0='192.0.2.53'\n",
            "IPV4DNS1='0.0.0.0'\n",
            "ROOTSERVER='192.0.2.1'\n",
            "filename='boot.ipxe'\n",
        ] {
            assert!(c.contains(want), "{want} in\n{c}");
        }
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
    }

    /// What `sh` makes of the file: every variable it sets, one `KEY=value` line each,
    /// with `$(...)` and backticks left as text; and proof that nothing ran.
    fn sourced(conf: &str) -> (String, bool) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("net.conf");
        std::fs::write(&f, conf).unwrap();
        let ran = d.path().join("ran");
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(r#". "$1" && for k in DEVICE HOSTNAME DNSDOMAIN ROOTPATH filename DOMAINSEARCH; do eval "printf '%s=%s|' \"\$k\" \"\${$k}\""; done"#)
            .arg("sh")
            .arg(&f)
            .env("RAN", &ran)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (String::from_utf8(out.stdout).unwrap(), ran.exists())
    }

    #[test]
    fn hostile_values_never_run_as_shell() {
        let hostile = [
            "$(touch \"$RAN\")",
            "`touch \"$RAN\"`",
            "x'; touch \"$RAN\"; '",
            "x\ntouch \"$RAN\"",
            "x\0y",
            "a\"b\\c",
        ];
        for h in hostile {
            let n = NetInfo {
                iface: format!("e'{}", h.len()),
                proto: "dhcp",
                lease: dhcp::Lease {
                    ip: Ipv4Addr::new(192, 0, 2, 10),
                    prefix: 24,
                    hostname: Some(h.into()),
                    domain: Some(h.into()),
                    root_path: Some(h.into()),
                    bootfile: Some(h.into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            let c = net_conf(&n, 1.0);
            assert!(!c.contains('\0'), "{c:?}");
            assert_eq!(c.lines().count(), 17, "one line per key: {c}");
            let (vars, ran) = sourced(&c);
            assert!(!ran, "{h:?} ran:\n{c}");
            // Names that are no names are left out; text is kept as text, or left out
            // when it has control characters.
            let text = if h.chars().any(char::is_control) {
                ""
            } else {
                h
            };
            assert_eq!(
                vars,
                format!(
                    "DEVICE=e'{}|HOSTNAME=|DNSDOMAIN=|ROOTPATH={text}|filename={text}|DOMAINSEARCH=|",
                    h.len()
                ),
                "{c}"
            );
        }
        // Good names are kept.
        let n = NetInfo {
            lease: dhcp::Lease {
                hostname: Some("node-7".into()),
                domain: Some("lab.example".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let (vars, _) = sourced(&net_conf(&n, 0.0));
        assert!(
            vars.contains("HOSTNAME=node-7|DNSDOMAIN=lab.example|")
                && vars.ends_with("DOMAINSEARCH=lab.example|"),
            "{vars}"
        );
    }
}
