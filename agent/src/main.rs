//! `ltsp-agent`: PID 1 of a standalone initramfs, the worker of the initramfs-tools boot
//! script, and the operator's commands to see and apply a node's configuration.

use clap::{Args, Parser, Subcommand};
use ltsp_agent::boot::{self, Layout, Mode};
use ltsp_agent::failure::{self, Failed};
use ltsp_agent::{apply, config, system};
use ltsp_common::cmdline::{Cmdline, OnFailure, OPTIONS};
use ltsp_common::ltsconf::Identity;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ltsp-agent",
    version,
    about = "ltsp-rs early-boot agent: boots a node from the network; shows and applies lts.conf"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the configuration lts.conf gives one client, one KEY="value" per line (as getltscfg -a).
    Config(Inputs),
    /// Write into a root directory what the boot would write (fstab, rc.local, hosts, services...).
    Apply {
        #[command(flatten)]
        inputs: Inputs,
        /// The root directory to change.
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The boot NIC's name, marked unmanaged for the image's network managers.
        #[arg(long, value_name = "IFACE")]
        iface: Option<String>,
        /// The boot server's IPv4 address (named `server` in /etc/hosts).
        #[arg(long, value_name = "IP")]
        server: Option<std::net::Ipv4Addr>,
        /// A DNS server, as DHCP would give it; repeatable.
        #[arg(long, value_name = "IP")]
        dns: Vec<std::net::Ipv4Addr>,
    },
    /// Boot as the initramfs-tools worker: set up the network root at --root and return.
    Boot {
        /// Where initramfs-tools expects the root ($rootmnt).
        #[arg(long, default_value = "/root")]
        root: String,
    },
    /// Bring up the boot NIC as the boot would (driver already loaded), and print what it
    /// learnt in /run/net-IFACE.conf format: try a site's DHCP from a node's point of view.
    Net {
        /// Kernel-cmdline options to use (BOOTIF=, ip=, ltsp.timeout=...).
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// Check lts.conf against its minisign signature as the boot does: print the signed
    /// (trusted) comment and exit 0 when valid, else say why and exit 1.
    Verify {
        /// The site's minisign public key (as baked into the initramfs).
        #[arg(long, value_name = "FILE", default_value = ltsp_agent::trust::TRUST_KEY)]
        key: PathBuf,
        /// The lts.conf to check.
        #[arg(value_name = "LTSCONF")]
        lts_conf: PathBuf,
        /// Its signature [default: LTSCONF.sig].
        #[arg(value_name = "SIG")]
        sig: Option<PathBuf>,
    },
    /// Print every kernel cmdline option the agent reads, with its default.
    Options,
    /// Keep the boot NIC's DHCP lease: renew it at T1 from its server, rebind at T2 with
    /// any, never remove the address; /run/ltsp/lease says where it stands. The boot
    /// starts it; it runs until the node powers off.
    LeaseKeep {
        #[arg(long)]
        iface: String,
        #[arg(long, value_parser = ltsp_agent::net::lease::parse_mac)]
        mac: [u8; 6],
        #[arg(long)]
        ip: std::net::Ipv4Addr,
        /// The server that gave the lease (option 54); without it, REQUESTs are broadcast.
        #[arg(long)]
        server: Option<std::net::Ipv4Addr>,
        #[arg(long)]
        lease_secs: u32,
        /// T1 and T2 as the server gave them (options 58 and 59).
        #[arg(long)]
        t1: Option<u32>,
        #[arg(long)]
        t2: Option<u32>,
        /// CLOCK_BOOTTIME in milliseconds when the lease was obtained.
        #[arg(long)]
        obtained_ms: u64,
        /// Inherited descriptors: /run/ltsp (where `lease` is written), /dev/console and
        /// /dev/kmsg (the log; without them, stderr).
        #[arg(long)]
        run_fd: Option<i32>,
        #[arg(long)]
        console_fd: Option<i32>,
        #[arg(long)]
        kmsg_fd: Option<i32>,
        /// The console log level (kmsg lines below it are echoed by the kernel).
        #[arg(long)]
        console_level: Option<u8>,
    },
    /// Keep an NBD root alive: answer the kernel's link-dead events with a new connection
    /// to the same image (the server in use, then the others), as NBD_CMD_RECONFIGURE.
    /// The boot starts it; it runs until the node powers off.
    NbdWatch {
        /// The device: N of /dev/nbdN.
        #[arg(long, default_value_t = 0)]
        index: u32,
        /// The export's size in bytes; a server offering another size is refused.
        #[arg(long)]
        size: u64,
        /// The image identity (content hash) the boot saw; other bytes are refused.
        #[arg(long)]
        identity: Option<String>,
        /// A server, as nbdroot= takes it; the first is the one in use. Repeatable.
        #[arg(long = "target", required = true, value_parser = parse_target)]
        targets: Vec<ltsp_common::cmdline::NbdTarget>,
        /// An inherited generic-netlink socket already subscribed to the nbd events
        /// (the boot passes one); without it the helper subscribes itself.
        #[arg(long)]
        events_fd: Option<i32>,
        /// Inherited /dev/console and /dev/kmsg for the log (the boot passes them: the
        /// helper may first run after the switch, when /dev is out of its reach).
        #[arg(long)]
        console_fd: Option<i32>,
        #[arg(long)]
        kmsg_fd: Option<i32>,
        /// An inherited pipe: a byte on it once the boot switched root tells the helper
        /// to delete the initramfs's files (its own root).
        #[arg(long)]
        initramfs_fd: Option<i32>,
    },
}

fn parse_target(s: &str) -> Result<ltsp_common::cmdline::NbdTarget, String> {
    ltsp_common::cmdline::parse_nbdroot(s)
}

#[derive(Args)]
struct Inputs {
    /// The lts.conf to read.
    #[arg(long, value_name = "FILE")]
    lts_conf: PathBuf,
    /// A file holding a kernel command line: its ltsp.KEY= overrides apply.
    #[arg(long, value_name = "FILE")]
    cmdline: Option<PathBuf>,
    /// The client's MAC address.
    #[arg(long)]
    mac: Option<String>,
    /// The client's IPv4 address.
    #[arg(long)]
    ip: Option<std::net::Ipv4Addr>,
    /// The client's host name.
    #[arg(long)]
    hostname: Option<String>,
    /// Also print which sections applied, strongest first (to stderr).
    #[arg(long)]
    explain: bool,
}

impl Inputs {
    fn load(&self) -> Result<config::NodeConfig, String> {
        let bytes = std::fs::read(&self.lts_conf)
            .map_err(|e| format!("{}: {e}", self.lts_conf.display()))?;
        let cmd = match &self.cmdline {
            Some(p) => Cmdline::parse(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("{}: {e}", p.display()))?
                    .trim(),
            ),
            None => Cmdline::default(),
        };
        let id = Identity {
            hostname: self.hostname.clone(),
            ip: self.ip.map(|i| i.to_string()),
            mac: self.mac.clone(),
        };
        let name = self.lts_conf.display().to_string();
        let c = config::resolve(Some((&name, &bytes)), &cmd, &id);
        if self.explain {
            eprintln!("sections applied: {}", c.resolved.sections.join(" > "));
        }
        Ok(c)
    }
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        pid1();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Config(inputs) => {
            ltsp_agent::log::init_stderr(false);
            match inputs.load() {
                Ok(c) => {
                    print!("{}", c.resolved.to_shell());
                    report_problems(&c)
                }
                Err(e) => fail(&e),
            }
        }
        Command::Apply {
            inputs,
            root,
            iface,
            server,
            dns,
        } => {
            ltsp_agent::log::init_stderr(false);
            let c = match inputs.load() {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            let node = apply::Node {
                ip: inputs.ip,
                mac: inputs.mac.clone(),
                iface,
                server,
                hostname: inputs.hostname.clone(),
                dns,
                domain: None,
            };
            match apply::apply(apply::Tree::Dir(&root), &c.resolved, &node) {
                Ok(r) => {
                    for w in &r.written {
                        println!("wrote {w}");
                    }
                    for m in &r.masked {
                        println!("masked {m}");
                    }
                    for (_, p) in apply::preinit_commands(&c.resolved) {
                        println!("preinit (run at boot): {p}");
                    }
                    for w in &r.warnings {
                        eprintln!("ltsp-agent: warning: {w}");
                    }
                    report_problems(&c)
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::Boot { root } => worker(&root),
        Command::Net { cmdline } => {
            ltsp_agent::log::init_stderr(false);
            let cmd = Cmdline::parse(&cmdline);
            for w in &cmd.warnings {
                eprintln!("ltsp-agent: {w}");
            }
            let deadline = std::time::Instant::now() + cmd.timeout;
            match ltsp_agent::net::bring_up(&cmd, deadline) {
                Ok(n) => {
                    print!("{}", ltsp_agent::net::net_conf(&n, 0.0));
                    println!("DHCP_WAIT_MS='{}'", n.dhcp_wait.as_millis());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        Command::NbdWatch {
            index,
            size,
            identity,
            targets,
            events_fd,
            console_fd,
            kmsg_fd,
            initramfs_fd,
        } => {
            if console_fd.is_some() || kmsg_fd.is_some() {
                ltsp_agent::log::init_inherited(console_fd, kmsg_fd);
            } else {
                ltsp_agent::log::init_boot(false);
            }
            ltsp_agent::nbd::reconnect::harden();
            let w = ltsp_agent::nbd::reconnect::Watch {
                index,
                size,
                identity,
                targets,
                current: 0,
                fds: ltsp_agent::nbd::reconnect::Inherited {
                    events: events_fd,
                    console: console_fd,
                    kmsg: kmsg_fd,
                    initramfs: initramfs_fd,
                },
            };
            match ltsp_agent::nbd::reconnect::run(w) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("nbd-watch: {e}")),
            }
        }
        Command::LeaseKeep {
            iface,
            mac,
            ip,
            server,
            lease_secs,
            t1,
            t2,
            obtained_ms,
            run_fd,
            console_fd,
            kmsg_fd,
            console_level,
        } => {
            // Started by hand (no descriptors handed over), it logs to stderr.
            if console_fd.is_some() || kmsg_fd.is_some() {
                ltsp_agent::log::init_inherited(console_fd, kmsg_fd);
                if let Some(l) = console_level {
                    ltsp_agent::log::set_console_level(l);
                }
            } else {
                ltsp_agent::log::init_stderr(false);
            }
            ltsp_agent::nbd::reconnect::harden();
            let p = ltsp_agent::net::lease::Params {
                iface,
                mac,
                ip,
                server,
                lease_secs,
                t1,
                t2,
                obtained_ms,
                run_fd,
                console_fd,
                kmsg_fd,
                console_level,
            };
            match ltsp_agent::net::lease::run(p) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&format!("lease-keep: {e}")),
            }
        }
        Command::Verify { key, lts_conf, sig } => verify(&key, &lts_conf, sig),
        Command::Options => {
            println!("| option | default | meaning |\n|---|---|---|");
            for (name, default, meaning) in OPTIONS {
                let cell = |s: &str| s.replace('|', "\\|");
                println!(
                    "| `{}` | {} | {} |",
                    cell(name),
                    cell(default),
                    cell(meaning)
                );
            }
            ExitCode::SUCCESS
        }
    }
}

/// `ltsp-agent verify`: 0 valid, 1 refused (as the boot would), 2 a file unreadable.
fn verify(key: &std::path::Path, conf: &std::path::Path, sig: Option<PathBuf>) -> ExitCode {
    use ltsp_agent::trust::{read_bounded, TrustKey, MAX_SIG};
    let sig = sig.unwrap_or_else(|| {
        let mut s = conf.as_os_str().to_owned();
        s.push(".sig");
        s.into()
    });
    let key = match TrustKey::load(key) {
        Ok(k) => k,
        Err(e) => return fail(&e.to_string()),
    };
    // The boot's TFTP limit on lts.conf: a larger file never reaches a node.
    let data = match read_bounded(conf, boot::LTSCONF_MAX) {
        Ok(d) => d,
        Err(e) => return fail(&format!("{}: {e}", conf.display())),
    };
    let sig_bytes = match read_bounded(&sig, MAX_SIG) {
        Ok(s) => s,
        Err(e) => return fail(&format!("signature {}: {e}", sig.display())),
    };
    match key.verify(&data, &sig_bytes) {
        Ok(comment) => {
            println!("{comment}");
            eprintln!(
                "ltsp-agent: {}: signature {} verified",
                conf.display(),
                sig.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "ltsp-agent: {}: REFUSED: {e} (signature {})",
                conf.display(),
                sig.display()
            );
            ExitCode::from(1)
        }
    }
}

fn report_problems(c: &config::NodeConfig) -> ExitCode {
    for w in &c.warnings {
        eprintln!("ltsp-agent: warning: {w}");
    }
    for p in &c.problems {
        eprintln!("ltsp-agent: {p}");
    }
    if c.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("ltsp-agent: {msg}");
    ExitCode::from(2)
}

const DEFAULT_FAILURE: OnFailure = OnFailure::Reboot(Duration::from_secs(60));

/// Runs the boot with logging and a panic hook; a panic becomes a reported failure.
fn run_boot(mode: Mode, root: &str) -> Option<Box<Failed>> {
    ltsp_agent::log::init_boot(false);
    std::panic::set_hook(Box::new(|info| log::error!("internal error: {info}")));
    let r = std::panic::catch_unwind(|| {
        boot::boot(
            &system::Real,
            &mut boot::RealPlatform::default(),
            mode,
            &Layout::real(root),
        )
    });
    match r {
        Ok(Ok(_)) => None,
        Ok(Err(f)) => {
            f.report();
            Some(f)
        }
        Err(_) => {
            failure::report(
                "agent",
                "internal error (see the line above)",
                "report it with the console log",
            );
            Some(Box::new(Failed {
                error: boot::BootError::Panicked,
                on_failure: None,
            }))
        }
    }
}

/// PID 1: never returns, never panics out. Success ends in exec of init, inside boot.
fn pid1() -> ! {
    let f = run_boot(Mode::Pid1, "/root");
    if f.is_none() {
        failure::report(
            "init",
            "boot returned without exec",
            "report it with the console log",
        );
    }
    failure::act(f.and_then(|f| f.on_failure).unwrap_or(DEFAULT_FAILURE))
}

/// The initramfs-tools worker: exit 0 with the root mounted, else non-zero so the boot
/// script can fall back to initramfs-tools' own panic shell.
fn worker(root: &str) -> ExitCode {
    match run_boot(Mode::Worker, root) {
        None => ExitCode::SUCCESS,
        Some(f) => match f.on_failure.unwrap_or(DEFAULT_FAILURE) {
            OnFailure::Shell => ExitCode::from(1),
            other => failure::act(other),
        },
    }
}
