//! What the server and its nodes are doing: counters, each node's progress, readiness
//! (every export readable and hashed), the Prometheus text of `/metrics` and the table of
//! `/nodes` (the HTTP side serves them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// One node's progress, as the server saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Files fetched over TFTP, in order (the last few).
    pub files: Vec<String>,
    pub nbd_open: u32,
    pub export: Option<String>,
    /// The image version its last connection reads, when known.
    pub version: Option<String>,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// Files remembered per node.
const FILES: usize = 8;
/// Nodes remembered; the longest unseen go first.
const NODES: usize = 10_000;

#[derive(Default)]
pub struct Status {
    pub nbd_open: AtomicU64,
    pub nbd_connections: AtomicU64,
    pub nbd_reads: AtomicU64,
    pub nbd_read_bytes: AtomicU64,
    /// NBD reply bytes held in user space now (the server-wide budget's use).
    pub nbd_reply_bytes: AtomicU64,
    /// NBD trace records dropped because the trace writer was behind.
    pub nbd_trace_dropped: AtomicU64,
    /// NBD reply bytes spliced through the server's pipes.
    pub nbd_spliced_bytes: AtomicU64,
    /// NBD reply bytes sent by sendfile when no pipe was available.
    pub nbd_sendfile_bytes: AtomicU64,
    /// Bytes put in a pipe that the socket then had no room for: dropped, read again.
    pub nbd_splice_refused_bytes: AtomicU64,
    pub tftp_sent: AtomicU64,
    pub tftp_failed: AtomicU64,
    pub tftp_bytes: AtomicU64,
    /// Unconfirmed TFTP transfers cancelled to make room for a new request.
    pub tftp_evicted: AtomicU64,
    pub proxy_dhcp_answers: AtomicU64,
    pub http_open: AtomicU64,
    pub http_connections: AtomicU64,
    /// HTTP connections closed at accept, by the cap they met.
    pub http_refused_total: AtomicU64,
    pub http_refused_per_client: AtomicU64,
    pub http_refused_descriptors: AtomicU64,
    /// HTTP connections closed for a header that took too long or a client not reading.
    pub http_timeouts: AtomicU64,
    /// Export name -> identity once hashed; None while hashing or unreadable.
    exports: Mutex<BTreeMap<String, Option<String>>>,
    nodes: Mutex<BTreeMap<IpAddr, Node>>,
    /// PXE clients answered by proxyDHCP, by MAC: (file given, unix seconds).
    pxe: Mutex<BTreeMap<String, (String, u64)>>,
    /// Image versions held: identity -> the exports it is current for (none: kept for the
    /// nodes that still run it).
    versions: Mutex<BTreeMap<String, Vec<String>>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Status {
    pub fn new(exports: impl IntoIterator<Item = String>) -> Arc<Status> {
        let s = Status::default();
        *s.exports.lock().unwrap() = exports.into_iter().map(|e| (e, None)).collect();
        Arc::new(s)
    }

    pub fn export_ready(&self, name: &str, identity: &str) {
        self.exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Some(identity.to_string()));
    }

    fn node(&self, ip: IpAddr, f: impl FnOnce(&mut Node)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if !nodes.contains_key(&ip) && nodes.len() >= NODES {
            let oldest = nodes
                .iter()
                .min_by_key(|(_, n)| n.last_seen)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                nodes.remove(&k);
            }
        }
        let t = now();
        let n = nodes.entry(ip).or_insert_with(|| Node {
            first_seen: t,
            ..Default::default()
        });
        n.last_seen = t;
        f(n);
    }

    pub fn tftp_done(&self, ip: IpAddr, file: &str, bytes: u64, ok: bool) {
        if ok {
            self.tftp_sent.fetch_add(1, Relaxed);
            self.tftp_bytes.fetch_add(bytes, Relaxed);
            self.node(ip, |n| {
                if n.files.len() >= FILES {
                    n.files.remove(0);
                }
                n.files.push(file.to_string());
            });
        } else {
            self.tftp_failed.fetch_add(1, Relaxed);
        }
    }

    /// `version`: the identity of the image served, when known.
    pub fn nbd_connected(&self, ip: IpAddr, export: &str, version: Option<&str>) {
        self.nbd_open.fetch_add(1, Relaxed);
        self.nbd_connections.fetch_add(1, Relaxed);
        self.node(ip, |n| {
            n.nbd_open += 1;
            n.export = Some(export.to_string());
            n.version = version.map(str::to_string);
        });
    }

    /// The versions held now ([`crate::versions`]), each with the exports it is current for.
    pub fn set_versions(&self, list: Vec<(String, Vec<String>)>) {
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()) = list.into_iter().collect();
    }

    /// Nodes with a connection open, by the version they read.
    fn nodes_by_version(&self) -> BTreeMap<String, Vec<IpAddr>> {
        let mut m: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for (ip, n) in nodes.iter().filter(|(_, n)| n.nbd_open > 0) {
            if let Some(v) = &n.version {
                m.entry(v.clone()).or_default().push(*ip);
            }
        }
        m
    }

    pub fn nbd_closed(&self, ip: IpAddr) {
        self.nbd_open.fetch_sub(1, Relaxed);
        self.node(ip, |n| n.nbd_open = n.nbd_open.saturating_sub(1));
    }

    /// A proxyDHCP answer went to a PXE client (known by its MAC: it has no address yet).
    pub fn dhcp_seen(&self, mac: &str, file: &str) {
        self.proxy_dhcp_answers.fetch_add(1, Relaxed);
        let mut pxe = self.pxe.lock().unwrap_or_else(|p| p.into_inner());
        if pxe.len() >= NODES && !pxe.contains_key(mac) {
            if let Some(k) = pxe.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| k.clone()) {
                pxe.remove(&k);
            }
        }
        pxe.insert(mac.to_string(), (file.to_string(), now()));
    }

    pub fn nbd_read(&self, bytes: u32) {
        self.nbd_reads.fetch_add(1, Relaxed);
        self.nbd_read_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Ready when every export has been opened and hashed.
    pub fn health(&self) -> Result<(), String> {
        let ex = self.exports.lock().unwrap_or_else(|p| p.into_inner());
        let waiting: Vec<&str> = ex
            .iter()
            .filter(|(_, id)| id.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "exports not ready (hashing or unreadable): {}",
                waiting.join(" ")
            ))
        }
    }

    pub fn metrics(&self, uptime: f64) -> String {
        let mut m = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        counter(
            "ltsp_nbd_connections_open",
            "NBD connections open now",
            "gauge",
            self.nbd_open.load(Relaxed),
        );
        counter(
            "ltsp_nbd_connections_total",
            "NBD connections negotiated",
            "counter",
            self.nbd_connections.load(Relaxed),
        );
        counter(
            "ltsp_nbd_reads_total",
            "NBD READ requests served",
            "counter",
            self.nbd_reads.load(Relaxed),
        );
        counter(
            "ltsp_nbd_read_bytes_total",
            "Bytes served by NBD READs",
            "counter",
            self.nbd_read_bytes.load(Relaxed),
        );
        counter(
            "ltsp_nbd_reply_bytes",
            "NBD reply bytes held in memory now (the server-wide budget in use)",
            "gauge",
            self.nbd_reply_bytes.load(Relaxed),
        );
        counter(
            "ltsp_nbd_trace_dropped_total",
            "NBD trace records dropped because the trace writer was behind",
            "counter",
            self.nbd_trace_dropped.load(Relaxed),
        );
        counter(
            "ltsp_nbd_spliced_bytes_total",
            "NBD READ data bytes spliced from the image through the server's pipes",
            "counter",
            self.nbd_spliced_bytes.load(Relaxed),
        );
        counter(
            "ltsp_nbd_sendfile_bytes_total",
            "NBD READ data bytes sent from the image by sendfile because no pipe was available",
            "counter",
            self.nbd_sendfile_bytes.load(Relaxed),
        );
        counter(
            "ltsp_nbd_splice_refused_bytes_total",
            "Bytes put in a pipe that the socket then had no room for (dropped and read again)",
            "counter",
            self.nbd_splice_refused_bytes.load(Relaxed),
        );
        counter(
            "ltsp_tftp_evicted_total",
            "Unacknowledged TFTP transfers cancelled to make room for a new request",
            "counter",
            self.tftp_evicted.load(Relaxed),
        );
        counter(
            "ltsp_tftp_transfers_total",
            "TFTP transfers completed",
            "counter",
            self.tftp_sent.load(Relaxed),
        );
        counter(
            "ltsp_tftp_transfers_failed_total",
            "TFTP transfers refused or abandoned",
            "counter",
            self.tftp_failed.load(Relaxed),
        );
        counter(
            "ltsp_tftp_bytes_total",
            "Bytes sent by completed TFTP transfers",
            "counter",
            self.tftp_bytes.load(Relaxed),
        );
        counter(
            "ltsp_proxy_dhcp_answers_total",
            "proxyDHCP offers and acks sent to PXE clients",
            "counter",
            self.proxy_dhcp_answers.load(Relaxed),
        );
        counter(
            "ltsp_http_connections_open",
            "HTTP connections open now",
            "gauge",
            self.http_open.load(Relaxed),
        );
        counter(
            "ltsp_http_connections_total",
            "HTTP connections accepted",
            "counter",
            self.http_connections.load(Relaxed),
        );
        counter(
            "ltsp_http_timeouts_total",
            "HTTP connections closed: request header too slow, idle, or client not reading",
            "counter",
            self.http_timeouts.load(Relaxed),
        );
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        counter(
            "ltsp_nodes_seen",
            "Nodes seen since the server started",
            "gauge",
            nodes.len() as u64,
        );
        counter(
            "ltsp_nodes_connected",
            "Nodes with an NBD connection open",
            "gauge",
            nodes.values().filter(|n| n.nbd_open > 0).count() as u64,
        );
        let _ = writeln!(m, "# HELP ltsp_http_refused_total HTTP connections closed at accept, by the cap they met\n# TYPE ltsp_http_refused_total counter");
        for (reason, n) in [
            ("total", &self.http_refused_total),
            ("per_client", &self.http_refused_per_client),
            ("descriptors", &self.http_refused_descriptors),
        ] {
            let _ = writeln!(
                m,
                "ltsp_http_refused_total{{reason=\"{reason}\"}} {}",
                n.load(Relaxed)
            );
        }
        drop(nodes);
        let using = self.nodes_by_version();
        let _ = writeln!(m, "# HELP ltsp_image_version_nodes Nodes connected to each image version this server holds; current: the exports it is current for\n# TYPE ltsp_image_version_nodes gauge");
        for (id, current) in self
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                m,
                "ltsp_image_version_nodes{{identity=\"{id}\",current=\"{}\"}} {}",
                escape(&current.join(",")),
                using.get(id).map_or(0, Vec::len)
            );
        }
        let _ = writeln!(m, "# HELP ltsp_uptime_seconds Seconds since the server started\n# TYPE ltsp_uptime_seconds gauge\nltsp_uptime_seconds {uptime:.0}");
        let _ = writeln!(m, "# HELP ltsp_export_info An export and its image identity\n# TYPE ltsp_export_info gauge");
        for (name, id) in self
            .exports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let id = id.as_deref().unwrap_or("");
            let _ = writeln!(
                m,
                "ltsp_export_info{{export=\"{}\",identity=\"{id}\"}} 1",
                escape(name)
            );
        }
        m
    }

    /// One line per node: address, NBD state, export, last file, seconds since last seen.
    pub fn nodes_text(&self) -> String {
        let t = now();
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = String::from("NODE\tNBD\tEXPORT\tVERSION\tLAST-FILE\tLAST-SEEN\n");
        for (ip, n) in nodes.iter() {
            let _ = writeln!(
                s,
                "{ip}\t{}\t{}\t{}\t{}\t{}s ago",
                if n.nbd_open > 0 {
                    format!("connected({})", n.nbd_open)
                } else {
                    "-".into()
                },
                n.export.as_deref().unwrap_or("-"),
                n.version.as_deref().map_or("-", short),
                n.files.last().map(String::as_str).unwrap_or("-"),
                t.saturating_sub(n.last_seen)
            );
        }
        drop(nodes);
        let versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        if !versions.is_empty() {
            let using = self.nodes_by_version();
            s.push_str("\nVERSION\tCURRENT-FOR\tNODES\n");
            for (id, current) in versions.iter() {
                let nodes: Vec<String> = using
                    .get(id)
                    .map(|v| v.iter().map(IpAddr::to_string).collect())
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "{id}\t{}\t{}",
                    if current.is_empty() {
                        "-".into()
                    } else {
                        current.join(",")
                    },
                    if nodes.is_empty() {
                        "-".into()
                    } else {
                        nodes.join(" ")
                    }
                );
            }
        }
        let pxe = self.pxe.lock().unwrap_or_else(|p| p.into_inner());
        if !pxe.is_empty() {
            s.push_str("\nPXE-CLIENT\tPROXY-DHCP-FILE\tLAST-SEEN\n");
            for (mac, (file, seen)) in pxe.iter() {
                let _ = writeln!(s, "{mac}\t{file}\t{}s ago", t.saturating_sub(*seen));
            }
        }
        s
    }
}

/// An identity as the node table shows it: enough hex digits to tell versions apart.
fn short(id: &str) -> &str {
    id.get(..7 + 12).unwrap_or(id)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_waits_for_every_export_and_metrics_count() {
        let s = Status::new(["root".to_string(), "other".to_string()]);
        assert!(s.health().unwrap_err().contains("other root"));
        s.export_ready("root", "blake3:aa");
        s.export_ready("other", "blake3:bb");
        assert_eq!(s.health(), Ok(()));
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        s.tftp_done(ip, "ltsp/amd64/vmlinuz", 1000, true);
        s.tftp_done(ip, "nope", 0, false);
        s.nbd_connected(ip, "root", Some("blake3:aa"));
        s.nbd_read(4096);
        s.nbd_spliced_bytes.fetch_add(3, Relaxed);
        s.nbd_sendfile_bytes.fetch_add(2, Relaxed);
        s.nbd_splice_refused_bytes.fetch_add(1, Relaxed);
        let m = s.metrics(5.0);
        for want in [
            "ltsp_nbd_connections_open 1",
            "ltsp_nbd_spliced_bytes_total 3",
            "ltsp_nbd_sendfile_bytes_total 2",
            "ltsp_nbd_splice_refused_bytes_total 1",
            "ltsp_nbd_read_bytes_total 4096",
            "ltsp_tftp_transfers_total 1",
            "ltsp_tftp_transfers_failed_total 1",
            "ltsp_tftp_bytes_total 1000",
            "ltsp_nodes_connected 1",
            "ltsp_export_info{export=\"root\",identity=\"blake3:aa\"} 1",
        ] {
            assert!(m.contains(want), "{want} missing in\n{m}");
        }
        let nodes = s.nodes_text();
        assert!(
            nodes.contains("192.0.2.10\tconnected(1)\troot\tblake3:aa\tltsp/amd64/vmlinuz\t"),
            "{nodes}"
        );
        // The versions held, the exports each is current for and the nodes on each.
        s.set_versions(vec![
            ("blake3:aa".into(), vec!["root".into()]),
            ("blake3:bb".into(), vec![]),
        ]);
        let m = s.metrics(5.5);
        assert!(
            m.contains("ltsp_image_version_nodes{identity=\"blake3:aa\",current=\"root\"} 1\n"),
            "{m}"
        );
        assert!(
            m.contains("ltsp_image_version_nodes{identity=\"blake3:bb\",current=\"\"} 0\n"),
            "{m}"
        );
        let nodes = s.nodes_text();
        assert!(
            nodes.contains(
                "\nVERSION\tCURRENT-FOR\tNODES\nblake3:aa\troot\t192.0.2.10\nblake3:bb\t-\t-\n"
            ),
            "{nodes}"
        );
        s.nbd_closed(ip);
        assert!(s.metrics(6.0).contains("ltsp_nodes_connected 0"));
        s.dhcp_seen("52:54:00:12:34:56", "ipxe.efi");
        assert!(s
            .nodes_text()
            .contains("\nPXE-CLIENT\tPROXY-DHCP-FILE\tLAST-SEEN\n52:54:00:12:34:56\tipxe.efi\t"));
        assert!(s.metrics(7.0).contains("ltsp_proxy_dhcp_answers_total 1"));
        s.http_refused_per_client.fetch_add(2, Relaxed);
        let m = s.metrics(8.0);
        assert!(
            m.contains("ltsp_http_refused_total{reason=\"per_client\"} 2\n"),
            "{m}"
        );
        assert!(
            m.contains("ltsp_http_refused_total{reason=\"total\"} 0\n"),
            "{m}"
        );
    }
}
