//! `ltsp-flood`: the hostile boot network, for tests, `qemu/fault hostile-network` and the
//! benchmarks. From many source addresses at once it sends what an attacker on a flat L2
//! segment can send ltsp-server: NBD connections that send READs and never take the replies,
//! TFTP requests with the longest timeout that never ACK, half-sent HTTP requests held open
//! (and requests whose replies are never read), malformed DHCP datagrams, and random bytes to
//! any port. It runs for `--duration` seconds and stops by itself; every loop is bounded.
//!
//! Only for addresses the caller controls: loopback, or a network namespace of the test's own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::{sleep, timeout, Instant};

const USAGE: &str = "\
usage: ltsp-flood --server IP --sources FIRST-LAST|IP[,IP...] --duration SECS [attacks]
attacks (any number, all at once):
  --nbd N            per source: N NBD connections sending READs, never reading replies
  --nbd-port P       (10809)    --export NAME (root)
  --tftp N           per source: N TFTP RRQs in flight (timeout 255, blksize 65464,
                     windowsize 64), never ACKed, renewed every 2 s
  --tftp-port P      (69)       --tftp-file PATH (the file requested)
  --http N           per source: N HTTP connections: half-sent requests held open, and
                     requests for --http-path whose replies are never read
  --http-port P      (8080)     --http-path PATH (/healthz)
  --dhcp RATE        malformed and random DHCP datagrams per second, to 67 (broadcast and
                     unicast) and 4011 (unicast)
  --random-tcp PORTS random bytes to each TCP port (comma list), RATE connections/s (--rate)
  --random-udp PORTS random datagrams to each UDP port (comma list), RATE/s (--rate)
  --rate RATE        (100)
Prints FLOOD lines with counts; exits 0 unless no attack could start at all.";

#[derive(Default)]
struct Counts {
    nbd_open: AtomicU64,
    nbd_refused: AtomicU64,
    nbd_closed: AtomicU64,
    nbd_requests: AtomicU64,
    tftp_rrq: AtomicU64,
    tftp_replies: AtomicU64,
    http_open: AtomicU64,
    http_refused: AtomicU64,
    http_closed: AtomicU64,
    dhcp_sent: AtomicU64,
    random_tcp: AtomicU64,
    random_udp: AtomicU64,
    errors: AtomicU64,
}

struct Opts {
    server: IpAddr,
    sources: Vec<IpAddr>,
    duration: Duration,
    nbd: usize,
    nbd_port: u16,
    export: String,
    tftp: usize,
    tftp_port: u16,
    tftp_file: String,
    http: usize,
    http_port: u16,
    http_path: String,
    dhcp: u32,
    random_tcp: Vec<u16>,
    random_udp: Vec<u16>,
    rate: u32,
}

fn parse_sources(s: &str) -> Result<Vec<IpAddr>, String> {
    if let Some((a, b)) = s.split_once('-') {
        let a: Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
        let b: Ipv4Addr = b.parse().map_err(|e| format!("{b}: {e}"))?;
        let (a, b) = (u32::from(a), u32::from(b));
        if b < a || b - a > 65535 {
            return Err(format!("bad range {s}"));
        }
        return Ok((a..=b).map(|i| IpAddr::V4(Ipv4Addr::from(i))).collect());
    }
    s.split(',')
        .map(|a| a.parse().map_err(|e| format!("{a}: {e}")))
        .collect()
}

fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(|p| p.parse().map_err(|e| format!("port {p}: {e}")))
        .collect()
}

fn parse(args: Vec<String>) -> Result<Opts, String> {
    let mut o = Opts {
        server: IpAddr::V4(Ipv4Addr::LOCALHOST),
        sources: vec![],
        duration: Duration::from_secs(10),
        nbd: 0,
        nbd_port: 10809,
        export: "root".into(),
        tftp: 0,
        tftp_port: 69,
        tftp_file: "ltsp/amd64/initrd.img".into(),
        http: 0,
        http_port: 8080,
        http_path: "/healthz".into(),
        dhcp: 0,
        random_tcp: vec![],
        random_udp: vec![],
        rate: 100,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match a.as_str() {
            "--server" => o.server = v()?.parse().map_err(|e| format!("--server: {e}"))?,
            "--sources" => o.sources = parse_sources(&v()?)?,
            "--duration" => o.duration = Duration::from_secs(num(v()?)?),
            "--nbd" => o.nbd = num(v()?)? as usize,
            "--nbd-port" => o.nbd_port = num(v()?)? as u16,
            "--export" => o.export = v()?,
            "--tftp" => o.tftp = num(v()?)? as usize,
            "--tftp-port" => o.tftp_port = num(v()?)? as u16,
            "--tftp-file" => o.tftp_file = v()?,
            "--http" => o.http = num(v()?)? as usize,
            "--http-port" => o.http_port = num(v()?)? as u16,
            "--http-path" => o.http_path = v()?,
            "--dhcp" => o.dhcp = num(v()?)? as u32,
            "--random-tcp" => o.random_tcp = parse_ports(&v()?)?,
            "--random-udp" => o.random_udp = parse_ports(&v()?)?,
            "--rate" => o.rate = num(v()?)?.max(1) as u32,
            "-h" | "--help" => return Err(String::new()),
            x => return Err(format!("unknown argument {x}")),
        }
    }
    if o.sources.is_empty() {
        o.sources.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    Ok(o)
}

/// Deterministic per task: the generator the lts.conf corpus uses, seeded apart.
struct Rng(ltsp_tests::ltsconf_gen::Rng);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(ltsp_tests::ltsconf_gen::Rng(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        ))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

async fn connect(src: IpAddr, dst: SocketAddr, rcvbuf: Option<u32>) -> std::io::Result<TcpStream> {
    let s = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(n) = rcvbuf {
        // A small receive window: the server's replies back up into its own buffers at once.
        s.set_recv_buffer_size(n)?;
    }
    // Small send buffers: a remote attacker's queued bytes sit in its own kernel, but here
    // the flood shares the server's host, and its TCP memory would count against the
    // server's (the same pressure a flood from elsewhere cannot cause).
    s.set_send_buffer_size(16 * 1024)?;
    s.bind(SocketAddr::new(src, 0))?;
    timeout(Duration::from_secs(5), s.connect(dst))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// Negotiates an export (fixed newstyle, EXPORT_NAME), then writes READs until the server
/// stops taking them or closes; never reads a reply.
async fn nbd_conn(o: &Opts, src: IpAddr, c: &Counts, rng: &mut Rng) -> std::io::Result<()> {
    let mut s = connect(src, SocketAddr::new(o.server, o.nbd_port), Some(4096)).await?;
    let mut greet = [0u8; 18];
    timeout(Duration::from_secs(10), s.read_exact(&mut greet))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    s.write_all(&3u32.to_be_bytes()).await?; // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(o.export.len() as u32).to_be_bytes());
    opt.extend_from_slice(o.export.as_bytes());
    s.write_all(&opt).await?;
    let mut info = [0u8; 10];
    timeout(Duration::from_secs(10), s.read_exact(&mut info))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let size = u64::from_be_bytes(info[..8].try_into().unwrap_or_default());
    c.nbd_open.fetch_add(1, Relaxed);
    let (_rd, mut wr) = s.into_split();
    let mut batch = Vec::with_capacity(28 * 64);
    loop {
        batch.clear();
        for _ in 0..64 {
            // Mostly small READs (buffered by the server), some large (sendfile).
            let len: u32 = match rng.below(8) {
                0 => 1 << 20,
                1 => 256 << 10,
                _ => 4096 << rng.below(5),
            };
            let max = size.saturating_sub(len as u64) / 4096;
            let off = rng.below(max.max(1)) * 4096;
            batch.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
            batch.extend_from_slice(&rng.next().to_be_bytes());
            batch.extend_from_slice(&off.to_be_bytes());
            batch.extend_from_slice(&len.to_be_bytes());
        }
        wr.write_all(&batch).await?;
        c.nbd_requests.fetch_add(64, Relaxed);
    }
}

async fn nbd_attacker(o: Arc<Opts>, src: IpAddr, seed: u64, c: Arc<Counts>, end: Instant) {
    let mut rng = Rng::new(seed);
    while Instant::now() < end {
        let r = timeout(end - Instant::now(), nbd_conn(&o, src, &c, &mut rng)).await;
        match r {
            Err(_) => return, // the flood's time is up
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                c.nbd_refused.fetch_add(1, Relaxed);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // Closed before the export was granted: refused over a limit.
                c.nbd_refused.fetch_add(1, Relaxed);
            }
            Ok(_) => {
                c.nbd_closed.fetch_add(1, Relaxed);
            }
        }
        sleep(Duration::from_millis(200)).await;
    }
}

fn tftp_rrq(file: &str) -> Vec<u8> {
    let mut p = vec![0, 1];
    for s in [
        file,
        "octet",
        "timeout",
        "255",
        "blksize",
        "65464",
        "windowsize",
        "64",
        "tsize",
        "0",
    ] {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

/// Keeps `o.tftp` requests of this source in flight: each socket sends one RRQ and never
/// ACKs; every 2 s the sockets are replaced by fresh ones (new source ports, new slots).
async fn tftp_attacker(o: Arc<Opts>, src: IpAddr, c: Arc<Counts>, end: Instant) {
    let dst = SocketAddr::new(o.server, o.tftp_port);
    let rrq = tftp_rrq(&o.tftp_file);
    while Instant::now() < end {
        let mut socks = Vec::with_capacity(o.tftp);
        for _ in 0..o.tftp {
            match UdpSocket::bind(SocketAddr::new(src, 0)).await {
                Ok(s) => {
                    if s.send_to(&rrq, dst).await.is_ok() {
                        c.tftp_rrq.fetch_add(1, Relaxed);
                    }
                    socks.push(s);
                }
                Err(_) => {
                    c.errors.fetch_add(1, Relaxed);
                }
            }
        }
        let round = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 2048];
        // Count what comes back (OACK, DATA, ERROR busy) without answering it.
        while Instant::now() < round.min(end) {
            let mut got = false;
            for s in &socks {
                while s.try_recv(&mut buf).is_ok() {
                    c.tftp_replies.fetch_add(1, Relaxed);
                    got = true;
                }
            }
            if !got {
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Half of the connections send part of a request header and hold it; the other half
/// request `http_path` and never read the reply.
async fn http_conn(o: &Opts, src: IpAddr, half: bool, c: &Counts, end: Instant) {
    let dst = SocketAddr::new(o.server, o.http_port);
    let Ok(mut s) = connect(src, dst, Some(4096)).await else {
        c.http_refused.fetch_add(1, Relaxed);
        return;
    };
    c.http_open.fetch_add(1, Relaxed);
    let req = if half {
        "GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Slow: ".to_string()
    } else {
        format!("GET {} HTTP/1.1\r\nHost: flood\r\n\r\n", o.http_path).repeat(64)
    };
    if s.write_all(req.as_bytes()).await.is_err() {
        c.http_closed.fetch_add(1, Relaxed);
        return;
    }
    // Held until the server closes it (read returns 0 or an error) or the flood ends;
    // the half-sent ones never read, so a close shows as an error on a later write.
    loop {
        if Instant::now() >= end {
            return;
        }
        sleep(Duration::from_millis(500)).await;
        let r = if half {
            s.write_all(b"a").await.map(|_| 1)
        } else {
            Ok(1)
        };
        let mut probe = [0u8; 1];
        let closed = match r {
            Err(_) => true,
            Ok(_) if half => matches!(
                timeout(Duration::from_millis(1), s.peek(&mut probe)).await,
                Ok(Ok(0)) | Ok(Err(_))
            ),
            Ok(_) => false,
        };
        if closed {
            c.http_closed.fetch_add(1, Relaxed);
            return;
        }
    }
}

async fn http_attacker(o: Arc<Opts>, src: IpAddr, i: usize, c: Arc<Counts>, end: Instant) {
    while Instant::now() < end {
        http_conn(&o, src, i.is_multiple_of(2), &c, end).await;
        sleep(Duration::from_millis(200)).await;
    }
}

/// A PXE DHCPDISCOVER, then broken in one of several ways (or plain random bytes).
fn hostile_dhcp(rng: &mut Rng) -> Vec<u8> {
    let mut m = vec![0u8; 240];
    m[0] = 1; // BOOTREQUEST
    m[1] = 1; // Ethernet
    m[2] = 6;
    m[4..8].copy_from_slice(&(rng.next() as u32).to_be_bytes());
    m[28..34].copy_from_slice(&rng.bytes(6));
    m[236..240].copy_from_slice(&[99, 130, 83, 99]);
    m.extend_from_slice(&[53, 1, 1]); // DISCOVER
    m.extend_from_slice(&[60, 9]);
    m.extend_from_slice(b"PXEClient");
    m.extend_from_slice(&[93, 2, 0, 0]);
    m.extend_from_slice(&[97, 17, 0]);
    m.extend_from_slice(&rng.bytes(16));
    m.push(255);
    match rng.below(8) {
        0 => m[2] = rng.next() as u8 | 0x10, // hlen past chaddr's 16 bytes
        1 => m[1] = rng.next() as u8,        // htype anything
        2 => {
            // an option whose length runs past the datagram
            let n = m.len();
            m[n - 1] = 43;
            m.push(200);
        }
        3 => m.truncate(rng.below(m.len() as u64) as usize),
        4 => {
            let at = 240 + rng.below((m.len() - 240) as u64) as usize;
            m[at] = rng.next() as u8;
        }
        5 => {
            let n = rng.below(1500) as usize;
            return rng.bytes(n);
        }
        6 => {
            // many tiny options, then garbage
            m.truncate(240);
            for _ in 0..300 {
                m.extend_from_slice(&[rng.below(254) as u8 + 1, 0]);
            }
        }
        _ => {
            let k = rng.below(8) as usize + 1;
            for _ in 0..k {
                let at = rng.below(m.len() as u64) as usize;
                m[at] = rng.next() as u8;
            }
        }
    }
    m
}

async fn dhcp_attacker(o: Arc<Opts>, c: Arc<Counts>, end: Instant) {
    let mut socks = Vec::new();
    for src in o.sources.iter().take(16) {
        if let Ok(s) = UdpSocket::bind(SocketAddr::new(*src, 0)).await {
            let _ = s.set_broadcast(true);
            socks.push(s);
        }
    }
    if socks.is_empty() {
        c.errors.fetch_add(1, Relaxed);
        return;
    }
    let mut rng = Rng::new(67);
    let gap = Duration::from_secs_f64(1.0 / o.dhcp.max(1) as f64);
    let targets = [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::BROADCAST), 67),
        SocketAddr::new(o.server, 67),
        SocketAddr::new(o.server, 4011),
    ];
    let mut i = 0usize;
    while Instant::now() < end {
        let m = hostile_dhcp(&mut rng);
        let s = &socks[i % socks.len()];
        let t = targets[i % targets.len()];
        if s.send_to(&m, t).await.is_ok() {
            c.dhcp_sent.fetch_add(1, Relaxed);
        }
        i += 1;
        sleep(gap).await;
    }
}

async fn random_tcp(o: Arc<Opts>, c: Arc<Counts>, end: Instant) {
    let mut rng = Rng::new(6);
    let gap = Duration::from_secs_f64(1.0 / o.rate as f64);
    let mut i = 0usize;
    while Instant::now() < end {
        let port = o.random_tcp[i % o.random_tcp.len()];
        let src = o.sources[rng.below(o.sources.len() as u64) as usize];
        let n = rng.below(70_000) as usize + 1;
        let data = rng.bytes(n);
        let hold = rng.below(4) == 0;
        let o2 = o.clone();
        let c2 = c.clone();
        tokio::spawn(async move {
            if let Ok(mut s) = connect(src, SocketAddr::new(o2.server, port), None).await {
                c2.random_tcp.fetch_add(1, Relaxed);
                let _ = timeout(Duration::from_secs(2), s.write_all(&data)).await;
                if hold {
                    let mut b = [0u8; 4096];
                    let _ = timeout(Duration::from_secs(3), async {
                        while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                    })
                    .await;
                }
            }
        });
        i += 1;
        sleep(gap).await;
    }
}

async fn random_udp(o: Arc<Opts>, c: Arc<Counts>, end: Instant) {
    let mut rng = Rng::new(17);
    let Ok(s) = UdpSocket::bind(SocketAddr::new(o.sources[0], 0)).await else {
        c.errors.fetch_add(1, Relaxed);
        return;
    };
    let gap = Duration::from_secs_f64(1.0 / o.rate as f64);
    let mut i = 0usize;
    while Instant::now() < end {
        let port = o.random_udp[i % o.random_udp.len()];
        let n = rng.below(1500) as usize;
        let mut data = rng.bytes(n);
        // A share of them look like TFTP/DHCP requests at first glance.
        if rng.below(3) == 0 && data.len() >= 2 {
            data[0] = 0;
            data[1] = rng.below(7) as u8;
        }
        if s.send_to(&data, SocketAddr::new(o.server, port))
            .await
            .is_ok()
        {
            c.random_udp.fetch_add(1, Relaxed);
        }
        i += 1;
        sleep(gap).await;
    }
}

fn main() -> std::process::ExitCode {
    let o = match parse(std::env::args().skip(1).collect()) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            if !e.is_empty() {
                eprintln!("ltsp-flood: {e}");
            }
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    ltsp_tests::raise_nofile();
    // One thread: the flood must not take both cores from the server it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let c = Arc::new(Counts::default());
    rt.block_on(async {
        let end = Instant::now() + o.duration;
        let mut tasks = tokio::task::JoinSet::new();
        for (si, src) in o.sources.iter().enumerate() {
            for k in 0..o.nbd {
                tasks.spawn(nbd_attacker(
                    o.clone(),
                    *src,
                    (si * 1000 + k) as u64,
                    c.clone(),
                    end,
                ));
            }
            if o.tftp > 0 {
                tasks.spawn(tftp_attacker(o.clone(), *src, c.clone(), end));
            }
            for k in 0..o.http {
                tasks.spawn(http_attacker(o.clone(), *src, k, c.clone(), end));
            }
        }
        if o.dhcp > 0 {
            tasks.spawn(dhcp_attacker(o.clone(), c.clone(), end));
        }
        if !o.random_tcp.is_empty() {
            tasks.spawn(random_tcp(o.clone(), c.clone(), end));
        }
        if !o.random_udp.is_empty() {
            tasks.spawn(random_udp(o.clone(), c.clone(), end));
        }
        // Every task ends by `end`; the margin covers a connect or handshake in progress.
        // SIGTERM (the caller is done with the flood) ends it early, with the counts.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let all_done = timeout(o.duration + Duration::from_secs(15), async {
            while tasks.join_next().await.is_some() {}
        });
        tokio::select! {
            _ = all_done => {}
            _ = term.recv() => {}
        }
        tasks.abort_all();
    });
    let g = |a: &AtomicU64| a.load(Relaxed);
    println!(
        "FLOOD nbd connections={} refused={} closed-by-server={} requests={}",
        g(&c.nbd_open),
        g(&c.nbd_refused),
        g(&c.nbd_closed),
        g(&c.nbd_requests)
    );
    println!(
        "FLOOD tftp requests={} replies={}",
        g(&c.tftp_rrq),
        g(&c.tftp_replies)
    );
    println!(
        "FLOOD http connections={} refused={} closed-by-server={}",
        g(&c.http_open),
        g(&c.http_refused),
        g(&c.http_closed)
    );
    println!("FLOOD dhcp datagrams={}", g(&c.dhcp_sent));
    println!(
        "FLOOD random tcp-connections={} udp-datagrams={} local-errors={}",
        g(&c.random_tcp),
        g(&c.random_udp),
        g(&c.errors)
    );
    let sent = [
        &c.nbd_open,
        &c.tftp_rrq,
        &c.http_open,
        &c.dhcp_sent,
        &c.random_tcp,
        &c.random_udp,
    ]
    .iter()
    .map(|a| g(a))
    .sum::<u64>();
    if sent == 0 {
        eprintln!("ltsp-flood: no attack could start");
        return std::process::ExitCode::from(1);
    }
    std::process::ExitCode::SUCCESS
}
