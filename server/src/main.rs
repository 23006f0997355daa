//! `ltsp-server`: the command line around the library.

use clap::{Args, Parser, Subcommand};
use ltsp_server::config::{Config, Overrides};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ltsp-server",
    version,
    about = "TFTP and NBD server for network-booted ltsp-rs nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve TFTP and NBD in the foreground until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Load and check the configuration, print what would be served, and exit.
    Check(ServeArgs),
    /// Print the iPXE script the server generates from its [boot] settings.
    Ipxe(ServeArgs),
    /// List the nodes a running server has seen (its /nodes endpoint): address, NBD
    /// connections, export, last file fetched, last seen.
    Status {
        /// The server's --http-listen address.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8080")]
        server: SocketAddr,
    },
}

/// GET over plain HTTP/1.0 from a status endpoint; returns the body of a 200.
fn http_get(server: SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(5);
    let mut s = std::net::TcpStream::connect_timeout(&server, timeout)
        .map_err(|e| format!("{server}: {e} (is ltsp-server running with --http-listen?)"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {server}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("{server}: {e}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(body.to_string())
    } else {
        Err(format!("{server}{path}: {status}: {}", body.trim()))
    }
}

#[derive(Args)]
struct ServeArgs {
    /// TOML settings file; every flag below overrides the file's value.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory served over TFTP (default /srv/tftp).
    #[arg(long, value_name = "DIR")]
    tftp_root: Option<PathBuf>,
    /// TFTP listening address (default 0.0.0.0:69).
    #[arg(long, value_name = "ADDR:PORT")]
    tftp_listen: Option<SocketAddr>,
    /// Seconds before an unacknowledged TFTP window is sent again (default 1).
    #[arg(long, value_name = "SECS")]
    tftp_timeout: Option<u8>,
    /// Resends of one TFTP window before the transfer is abandoned (default 6).
    #[arg(long, value_name = "N")]
    tftp_retries: Option<u32>,
    /// Largest RFC 7440 windowsize granted (default 64).
    #[arg(long, value_name = "N")]
    tftp_max_windowsize: Option<u16>,
    /// TFTP transfers at once; more are told to retry (default 2048).
    #[arg(long, value_name = "N")]
    tftp_max_transfers: Option<usize>,
    /// TFTP transfers one client address may have at once; 0: no limit (default 8).
    #[arg(long, value_name = "N")]
    tftp_max_transfers_per_client: Option<usize>,
    /// Largest TFTP `timeout` option a client is granted; above it the server's own
    /// timeout applies (default 5).
    #[arg(long, value_name = "SECS")]
    tftp_max_client_timeout: Option<u8>,
    /// Seconds one TFTP transfer may last, whatever the client does (default 600).
    #[arg(long, value_name = "SECS")]
    tftp_max_transfer_secs: Option<u64>,
    /// KiB of TFTP read-ahead buffers for all transfers together; 0: read block by block
    /// (default 8192).
    #[arg(long, value_name = "KIB")]
    tftp_read_ahead_kib: Option<usize>,
    /// Send every TFTP reply from the listening port instead of a fresh one, so TFTP works
    /// behind NAT (a Kubernetes Service, DNAT). Off by default: RFC 1350 clients expect a
    /// fresh port, and on a plain network it changes nothing for them.
    #[arg(long)]
    tftp_single_port: bool,
    /// Do not serve TFTP.
    #[arg(long)]
    no_tftp: bool,
    /// NBD listening address (default 0.0.0.0:10809).
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_listen: Option<SocketAddr>,
    /// An NBD export, NAME=PATH of a read-only image; repeatable.
    #[arg(long = "export", value_name = "NAME=PATH")]
    exports: Vec<String>,
    /// Export selected by the empty name (default: the only export, if there is one).
    #[arg(long, value_name = "NAME")]
    default_export: Option<String>,
    /// Seconds a client may take to finish NBD negotiation (default 10).
    #[arg(long, value_name = "SECS")]
    nbd_handshake_timeout: Option<u64>,
    /// NBD connections at once; more are closed at accept (default 4096).
    #[arg(long, value_name = "N")]
    nbd_max_connections: Option<usize>,
    /// NBD connections one client address may have open; 0: no limit (default 16).
    #[arg(long, value_name = "N")]
    nbd_max_connections_per_client: Option<usize>,
    /// Seconds without a request before an NBD connection is closed; 0: never (default).
    /// A node's kernel reconnects through its helper, so this only frees idle sockets.
    #[arg(long, value_name = "SECS")]
    nbd_idle_timeout: Option<u64>,
    /// Bytes of NBD replies one connection may hold in memory; a client that does not take
    /// its replies is not read from past it (default 1048576).
    #[arg(long, value_name = "BYTES")]
    nbd_max_reply_bytes_per_connection: Option<usize>,
    /// Bytes of NBD replies all connections may hold in memory; past it, READs are sent
    /// from the page cache by splice or sendfile, without a buffer (default 8388608).
    #[arg(long, value_name = "BYTES")]
    nbd_max_reply_bytes: Option<usize>,
    /// Seconds an NBD connection's socket may take no reply bytes before the connection
    /// is closed (default 30).
    #[arg(long, value_name = "SECS")]
    nbd_write_timeout: Option<u64>,
    /// Content-addressed store of image versions; replicas sharing it serve each other's
    /// versions (default: .ltsp-versions beside each export).
    #[arg(long, value_name = "DIR")]
    nbd_versions_dir: Option<PathBuf>,
    /// Seconds a version stays available after its last connection closed (default
    /// 604800, a week).
    #[arg(long, value_name = "SECS")]
    nbd_version_retention: Option<u64>,
    /// Write every NBD request (time, connection, command, offset, length, reply time)
    /// to FILE, for replay with ltsp-replay (default: off). Never slows the server:
    /// records are dropped, and counted, when the writer falls behind.
    #[arg(long, value_name = "FILE")]
    nbd_trace: Option<PathBuf>,
    /// Do not serve NBD.
    #[arg(long)]
    no_nbd: bool,
    /// Answer PXE clients on this interface as a proxyDHCP server (ports 67 and 4011),
    /// beside the site's DHCP server: BIOS gets undionly.kpxe, UEFI ipxe.efi, iPXE
    /// boot.ipxe (names set in [proxy_dhcp]). Off by default.
    #[arg(long, value_name = "IFACE")]
    proxy_dhcp: Option<String>,
    /// Be the DHCP server on this interface (a lab network with none): addresses from
    /// --dhcp-range, and PXE boot files as proxyDHCP gives them. Off by default.
    #[arg(long, value_name = "IFACE")]
    dhcp_server: Option<String>,
    /// Addresses the DHCP server leases: FIRST-LAST.
    #[arg(long, value_name = "FIRST-LAST")]
    dhcp_range: Option<String>,
    /// Where the DHCP server keeps its leases across restarts ([dhcp_server] lease_file;
    /// default /var/lib/ltsp/dhcp-leases).
    #[arg(long, value_name = "FILE")]
    dhcp_lease_file: Option<PathBuf>,
    /// The boot file UEFI x86-64 firmware PXE gets from proxyDHCP or the DHCP server
    /// ([proxy_dhcp] uefi; default ipxe.efi): a signed UKI (deploy/build-uki) boots
    /// under Secure Boot with no iPXE in the chain.
    #[arg(long, value_name = "PATH")]
    pxe_uefi: Option<String>,
    /// Address for /healthz, /metrics and /nodes over HTTP (default: off).
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<SocketAddr>,
    /// HTTP connections served at once (default 256); more wait for a slot in a storm
    /// (up to 4 per slot, 120 s), or get a 503 when an address holds more than its share.
    #[arg(long, value_name = "N")]
    http_max_connections: Option<usize>,
    /// HTTP connections one client address may have open; 0: no limit (default 8).
    #[arg(long, value_name = "N")]
    http_max_connections_per_client: Option<usize>,
    /// Seconds a client has to send a request header, and to send the next request on a
    /// kept-alive connection (default 10).
    #[arg(long, value_name = "SECS")]
    http_header_timeout: Option<u64>,
    /// Largest HTTP request header in bytes; larger gets 431 (default 16384).
    #[arg(long, value_name = "BYTES")]
    http_max_header_bytes: Option<usize>,
    /// Seconds an HTTP response may make no progress (a client not reading) before the
    /// connection is closed (default 30).
    #[arg(long, value_name = "SECS")]
    http_write_timeout: Option<u64>,
    /// Kernel file, relative to the TFTP root, for the generated boot.ipxe.
    #[arg(long, value_name = "PATH")]
    boot_kernel: Option<String>,
    /// Initramfs file, relative to the TFTP root, for the generated boot.ipxe.
    #[arg(long, value_name = "PATH")]
    boot_initrd: Option<String>,
    /// boot.ipxe fetches kernel and initramfs by HTTP from --http-listen (much faster
    /// than TFTP for large files).
    #[arg(long)]
    boot_http: bool,
    /// Kernel command line for the generated boot.ipxe.
    #[arg(long, value_name = "CMDLINE", allow_hyphen_values = true)]
    boot_cmdline: Option<String>,
}

impl ServeArgs {
    fn load(&self) -> Result<Config, ltsp_server::config::ConfigError> {
        let o = Overrides {
            tftp_root: self.tftp_root.clone(),
            tftp_listen: self.tftp_listen,
            tftp_timeout: self.tftp_timeout,
            tftp_retries: self.tftp_retries,
            tftp_max_windowsize: self.tftp_max_windowsize,
            tftp_max_transfers: self.tftp_max_transfers,
            tftp_max_transfers_per_client: self.tftp_max_transfers_per_client,
            tftp_max_client_timeout: self.tftp_max_client_timeout,
            tftp_max_transfer_secs: self.tftp_max_transfer_secs,
            tftp_read_ahead_kib: self.tftp_read_ahead_kib,
            tftp_single_port: self.tftp_single_port,
            no_tftp: self.no_tftp,
            nbd_listen: self.nbd_listen,
            exports: self.exports.clone(),
            default_export: self.default_export.clone(),
            nbd_handshake_timeout: self.nbd_handshake_timeout,
            nbd_max_connections: self.nbd_max_connections,
            nbd_max_connections_per_client: self.nbd_max_connections_per_client,
            nbd_idle_timeout: self.nbd_idle_timeout,
            nbd_max_reply_bytes_per_connection: self.nbd_max_reply_bytes_per_connection,
            nbd_max_reply_bytes: self.nbd_max_reply_bytes,
            nbd_write_timeout: self.nbd_write_timeout,
            nbd_versions_dir: self.nbd_versions_dir.clone(),
            nbd_version_retention: self.nbd_version_retention,
            nbd_trace: self.nbd_trace.clone(),
            no_nbd: self.no_nbd,
            http_listen: self.http_listen,
            http_max_connections: self.http_max_connections,
            http_max_connections_per_client: self.http_max_connections_per_client,
            http_header_timeout: self.http_header_timeout,
            http_max_header_bytes: self.http_max_header_bytes,
            http_write_timeout: self.http_write_timeout,
            boot_kernel: self.boot_kernel.clone(),
            boot_initrd: self.boot_initrd.clone(),
            boot_cmdline: self.boot_cmdline.clone(),
            boot_http: self.boot_http,
            proxy_dhcp: self.proxy_dhcp.clone(),
            dhcp_server: self.dhcp_server.clone(),
            dhcp_range: self.dhcp_range.clone(),
            dhcp_lease_file: self.dhcp_lease_file.clone(),
            pxe_uefi: self.pxe_uefi.clone(),
        };
        Config::load(self.config.as_deref(), &o)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let (args, action) = match &cli.command {
        Command::Serve(a) => (a, "serve"),
        Command::Check(a) => (a, "check"),
        Command::Ipxe(a) => (a, "ipxe"),
        Command::Status { server } => {
            return match http_get(*server, "/nodes") {
                Ok(body) => {
                    print!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ltsp-server: {e}");
                    ExitCode::from(1)
                }
            };
        }
    };
    let cfg = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ltsp-server: {e}");
            return ExitCode::from(2);
        }
    };
    match action {
        "check" => {
            println!("{cfg:#?}");
            ExitCode::SUCCESS
        }
        "ipxe" => match cfg.tftp.as_ref().and_then(|t| {
            let port = cfg.http.as_ref().filter(|_| t.boot.http == Some(true));
            ltsp_server::bootfiles::ipxe_script(&t.boot, port.map(|h| h.listen.port()), None)
        }) {
            Some(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("ltsp-server: no [boot] kernel set: nothing to generate");
                ExitCode::from(2)
            }
        },
        _ => run(cfg),
    }
}

/// Threads for blocking work (NBD reads that miss the page cache, file opens): enough to
/// keep a disk busy; a flood of cache misses queues instead of starting 512 threads.
const BLOCKING_THREADS: usize = 32;

fn run(cfg: Config) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ltsp-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => log::info!("SIGTERM"),
                        _ = int.recv() => log::info!("SIGINT"),
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        ltsp_server::serve(cfg, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ltsp-server: {e}");
            ExitCode::FAILURE
        }
    }
}
