//! `ltsp-replay`: replays an NBD request trace (ltsp-server's `--nbd-trace`, format in
//! server/src/nbd_trace.rs) against any NBD server: the same connections, the same
//! requests, the same in-flight depth per connection and the same think times, scaled.
//!
//! Per connection, request i is sent only once every request that had completed before i
//! was recorded has completed here (so the recorded depth is kept and never exceeded),
//! then after the recorded gap since the last thing the client saw (the previous request's
//! send or that completion), times `--think-scale`. Connections open at their recorded
//! time, scaled. Every error (refused or failed connection, short or late reply, an error
//! code other than the recorded one, data unlike `--verify`'s image) is counted, and any
//! makes the exit code 1.
//!
//! Only for addresses the caller controls: loopback, or a network namespace of its own.

use ltsp_common::nbd as w;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};

const USAGE: &str = "\
usage: ltsp-replay --trace FILE --server HOST:PORT [options]
  --export NAME        export to ask for (default: the one recorded; empty: the default)
  --think-scale F      recorded think times and connection starts times F (1); 0: none,
                       the server is the limit
  --verify IMAGE       compare every READ's data with IMAGE at the same offset
  --source IP[,IP...]  bind every connection to this local address; with several, one
                       boot per address, all at once in this process (a storm needs
                       no process per node, whose wakeups would take the servers' CPU)
  --connect-timeout S  seconds for a connection and its handshake (10)
  --reply-timeout S    seconds for each reply once requested (30)
  --start-at T         wait until T (Unix seconds) before starting: many replays started
                       one by one then begin together (at most an hour ahead)
Prints one line per boot: REPLAY source=S time_s=T connections=C requests=R bytes=B
errors=E ... (time_s: from the start, the trace's time 0 scaled, to that boot's last
reply). Exit 0 only when every request of every boot got its reply and no error was seen.";

/// Error messages printed in full, for the whole process (a storm of failing boots must
/// not fill the caller's pipe); every error is counted against its boot all the same.
const SHOWN_ERRORS: u64 = 50;
static SHOWN: AtomicU64 = AtomicU64::new(0);
/// Boots one process replays at once (each holds a socket per recorded connection).
const MAX_BOOTS: usize = 4096;

struct Opts {
    trace: String,
    server: SocketAddr,
    export: Option<String>,
    scale: f64,
    verify: Option<String>,
    /// One boot per address; none: one boot from any address.
    sources: Vec<IpAddr>,
    connect_timeout: Duration,
    reply_timeout: Duration,
    start_at: Option<f64>,
}

fn parse_args() -> Result<Opts, String> {
    let mut a = std::env::args().skip(1);
    let mut trace = None;
    let mut server = None;
    let mut o = Opts {
        trace: String::new(),
        server: SocketAddr::from(([127, 0, 0, 1], 10809)),
        export: None,
        scale: 1.0,
        verify: None,
        sources: Vec::new(),
        connect_timeout: Duration::from_secs(10),
        reply_timeout: Duration::from_secs(30),
        start_at: None,
    };
    let secs = |v: String| -> Result<Duration, String> {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e6)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("{v}: not a number of seconds"))
    };
    while let Some(k) = a.next() {
        if k == "-h" || k == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = a.next().ok_or_else(|| format!("{k}: needs a value"))?;
        match k.as_str() {
            "--trace" => trace = Some(v),
            "--server" => {
                use std::net::ToSocketAddrs;
                server = Some(
                    v.to_socket_addrs()
                        .map_err(|e| format!("--server {v}: {e}"))?
                        .next()
                        .ok_or_else(|| format!("--server {v}: no address"))?,
                )
            }
            "--export" => o.export = Some(v),
            "--think-scale" => {
                o.scale = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 1e3)
                    .ok_or_else(|| format!("--think-scale {v}: a number from 0 to 1000"))?
            }
            "--verify" => o.verify = Some(v),
            "--source" => {
                let mut seen: std::collections::HashSet<IpAddr> =
                    o.sources.iter().copied().collect();
                for ip in v.split(',') {
                    if o.sources.len() >= MAX_BOOTS {
                        return Err(format!("--source: more than {MAX_BOOTS} addresses"));
                    }
                    let ip: IpAddr = ip.parse().map_err(|e| format!("--source {ip}: {e}"))?;
                    // A boot per address: two sharing one would share the server's
                    // per-client limits.
                    if !seen.insert(ip) {
                        return Err(format!("--source {ip}: given twice"));
                    }
                    o.sources.push(ip);
                }
            }
            "--connect-timeout" => o.connect_timeout = secs(v)?,
            "--reply-timeout" => o.reply_timeout = secs(v)?,
            "--start-at" => {
                o.start_at = Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite())
                        .ok_or_else(|| format!("--start-at {v}: not a time"))?,
                )
            }
            _ => return Err(format!("unknown option {k}")),
        }
    }
    o.trace = trace.ok_or("--trace is required")?;
    o.server = server.ok_or("--server is required")?;
    Ok(o)
}

/// One recorded request.
#[derive(Clone, Copy, Debug)]
struct Req {
    t: u64,
    kind: u16,
    offset: u64,
    len: u32,
    done: u64,
    error: u32,
}

/// One recorded connection: when it began, what it asked for, its requests by send time.
#[derive(Clone, Debug, Default)]
struct Conn {
    id: u64,
    t: u64,
    export: String,
    reqs: Vec<Req>,
}

fn decode(s: &str) -> String {
    if s == "-" {
        return String::new();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn command(name: &str) -> Option<u16> {
    Some(match name {
        "read" => w::CMD_READ,
        "write" => w::CMD_WRITE,
        "disc" => w::CMD_DISC,
        "flush" => w::CMD_FLUSH,
        "trim" => w::CMD_TRIM,
        "write_zeroes" => w::CMD_WRITE_ZEROES,
        n => n.parse().ok()?,
    })
}

/// The trace's connections, by id, each with its requests in send order. Requests whose
/// connection line was dropped make a connection starting at its first request.
fn parse_trace(text: &str) -> Result<(Vec<Conn>, u64), String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, l)) if l.trim_end() == "# ltsp-nbd-trace v1" => {}
        _ => return Err("not an ltsp-nbd-trace v1 file (first line)".into()),
    }
    let mut conns: BTreeMap<u64, Conn> = BTreeMap::new();
    let mut dropped = 0;
    for (n, l) in lines {
        let bad = |why: &str| format!("line {}: {why}: {l:?}", n + 1);
        let f: Vec<&str> = l.split_ascii_whitespace().collect();
        let num = |i: usize| -> Result<u64, String> {
            f.get(i)
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| bad(&format!("field {} is not a number", i + 1)))
        };
        match f.first().copied() {
            None => {}
            Some("#") if f.get(1) == Some(&"dropped") => dropped = num(2)?,
            Some("#") => {}
            Some("C") => {
                if f.len() < 5 {
                    return Err(bad("a C line has at least 5 fields"));
                }
                let id = num(2)?;
                let c = conns.entry(id).or_default();
                c.id = id;
                c.t = num(1)?;
                c.export = decode(f[4]);
            }
            Some("R") => {
                if f.len() != 8 {
                    return Err(bad("an R line has 8 fields"));
                }
                let kind = command(f[3]).ok_or_else(|| bad("unknown command"))?;
                let len = u32::try_from(num(5)?).map_err(|_| bad("length over 32 bits"))?;
                let error = u32::try_from(num(7)?).map_err(|_| bad("error over 32 bits"))?;
                let r = Req {
                    t: num(1)?,
                    kind,
                    offset: num(4)?,
                    len,
                    done: num(6)?,
                    error,
                };
                if r.done < r.t {
                    return Err(bad("reply before request"));
                }
                let id = num(2)?;
                let c = conns.entry(id).or_insert_with(|| Conn {
                    id,
                    t: r.t,
                    ..Default::default()
                });
                c.reqs.push(r);
            }
            Some(_) => return Err(bad("unknown record")),
        }
    }
    let mut conns: Vec<Conn> = conns.into_values().collect();
    for c in &mut conns {
        // DISC is sent at the end of every connection anyway; no reply to wait for.
        c.reqs.retain(|r| r.kind != w::CMD_DISC);
        c.reqs.sort_by_key(|r| (r.t, r.done));
        c.t = c.t.min(c.reqs.first().map_or(u64::MAX, |r| r.t));
    }
    Ok((conns, dropped))
}

/// For each request (in send order), how many requests had completed before it was sent:
/// those are the first `need[i]` of the requests ordered by completion.
fn dependencies(reqs: &[Req]) -> (Vec<usize>, Vec<usize>) {
    let mut by_done: Vec<usize> = (0..reqs.len()).collect();
    by_done.sort_by_key(|&i| (reqs[i].done, i));
    let need = reqs
        .iter()
        .map(|r| by_done.partition_point(|&j| reqs[j].done < r.t))
        .collect();
    (by_done, need)
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    unanswered: AtomicU64,
    /// Connections replayed to their end.
    finished: AtomicU64,
    skipped: AtomicU64,
    /// Microseconds from the start to the last reply.
    last_reply_us: AtomicU64,
}

struct Ctx {
    o: Arc<Opts>,
    start: Instant,
    /// This boot's local address.
    source: Option<IpAddr>,
    counts: Counts,
    image: Option<Arc<std::fs::File>>,
}

impl Ctx {
    fn error(&self, what: String) {
        self.counts.errors.fetch_add(1, Relaxed);
        if SHOWN.fetch_add(1, Relaxed) < SHOWN_ERRORS {
            match self.source {
                Some(ip) => eprintln!("ltsp-replay: {ip}: {what}"),
                None => eprintln!("ltsp-replay: {what}"),
            }
        }
    }
}

/// A connection's progress, shared by its sender and its reply reader.
#[derive(Clone, Default)]
struct State {
    /// When each request (send order) completed here.
    done: Vec<Option<Instant>>,
    /// How many of the completion order have completed here, all of them.
    prefix: usize,
    in_flight: usize,
    all_sent: bool,
    /// The connection failed: nothing more is sent or read.
    failed: bool,
}

async fn handshake<S>(s: &mut S, export: &str) -> Result<u64, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.map_err(io("greeting"))?;
    if u64::from_be_bytes(g[..8].try_into().unwrap()) != w::NBDMAGIC
        || u64::from_be_bytes(g[8..16].try_into().unwrap()) != w::IHAVEOPT
    {
        return Err("greeting: not a newstyle NBD server".into());
    }
    let sflags = u16::from_be_bytes([g[16], g[17]]);
    if sflags & w::FLAG_FIXED_NEWSTYLE == 0 {
        return Err("greeting: server is not fixed newstyle".into());
    }
    let no_zeroes = sflags & w::FLAG_NO_ZEROES != 0;
    let mut cflags = w::CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= w::CLIENT_NO_ZEROES;
    }
    let go = w::info_request(export, &[]);
    let mut b = cflags.to_be_bytes().to_vec();
    b.extend_from_slice(&w::option_header(w::OPT_GO, go.len() as u32));
    b.extend_from_slice(&go);
    s.write_all(&b).await.map_err(io("send GO"))?;
    let mut size = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.map_err(io("GO reply"))?;
        let h = w::parse_option_reply_header(&h).map_err(|e| format!("GO reply: {e}"))?;
        if h.len > 64 * 1024 {
            return Err(format!("GO reply: {} bytes of data", h.len));
        }
        let mut d = vec![0u8; h.len as usize];
        s.read_exact(&mut d).await.map_err(io("GO reply data"))?;
        match h.reply {
            w::REP_ACK => break,
            w::REP_INFO => {
                if d.len() >= 12 && u16::from_be_bytes([d[0], d[1]]) == w::INFO_EXPORT {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                }
            }
            w::REP_ERR_UNSUP => {
                // An old server: EXPORT_NAME, which has no error reply.
                let mut b = w::option_header(w::OPT_EXPORT_NAME, export.len() as u32).to_vec();
                b.extend_from_slice(export.as_bytes());
                s.write_all(&b).await.map_err(io("send EXPORT_NAME"))?;
                let mut r = vec![0u8; if no_zeroes { 10 } else { 134 }];
                s.read_exact(&mut r)
                    .await
                    .map_err(io("EXPORT_NAME reply (unknown export?)"))?;
                return Ok(u64::from_be_bytes(r[..8].try_into().unwrap()));
            }
            e => {
                return Err(format!(
                    "export {export:?} refused ({e:#x}): {}",
                    String::from_utf8_lossy(&d)
                ))
            }
        }
    }
    size.ok_or_else(|| "GO: no export size in the reply".into())
}

async fn connect(ctx: &Ctx) -> std::io::Result<tokio::net::TcpStream> {
    let sock = match ctx.o.server {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = ctx.source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = sock.connect(ctx.o.server).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One connection replayed; errors are counted in `ctx`.
async fn replay_conn(ctx: Arc<Ctx>, c: Arc<Conn>) {
    let at = ctx.start + Duration::from_secs_f64(c.t as f64 * ctx.o.scale / 1e6);
    sleep_until(at).await;
    let export = ctx.o.export.clone().unwrap_or_else(|| c.export.clone());
    let n = c.reqs.len() as u64;
    let opened = timeout(ctx.o.connect_timeout, async {
        let mut s = connect(&ctx)
            .await
            .map_err(|e| format!("connect {}: {e}", ctx.o.server))?;
        let size = handshake(&mut s, &export).await?;
        Ok::<_, String>((s, size))
    })
    .await;
    let (stream, size) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            ctx.error(format!("connection {}: {e}", c.id));
            ctx.counts.unanswered.fetch_add(n, Relaxed);
            return;
        }
        Err(_) => {
            ctx.error(format!(
                "connection {}: no connection and handshake within {:?}",
                c.id, ctx.o.connect_timeout
            ));
            ctx.counts.unanswered.fetch_add(n, Relaxed);
            return;
        }
    };
    ctx.counts.connections.fetch_add(1, Relaxed);
    let reqs = &c.reqs;
    if let Some(r) = reqs.iter().find(|r| {
        r.kind == w::CMD_READ
            && r.error == 0
            && r.offset
                .checked_add(r.len as u64)
                .is_none_or(|end| end > size)
    }) {
        ctx.error(format!(
            "connection {}: export is {size} bytes, the trace reads {}+{}",
            c.id, r.offset, r.len
        ));
    }
    let (by_done, need) = dependencies(reqs);
    let by_done = Arc::new(by_done);
    let (tx, mut rx) = watch::channel(State {
        done: vec![None; reqs.len()],
        ..Default::default()
    });
    let tx = Arc::new(tx);
    let (rd, mut wr) = stream.into_split();
    let reader = tokio::spawn(read_replies(
        ctx.clone(),
        c.id,
        BufReader::with_capacity(256 * 1024, rd),
        c.clone(),
        by_done.clone(),
        tx.clone(),
    ));
    let scale = ctx.o.scale;
    let mut prev_sent: Option<Instant> = None;
    let mut late = Duration::ZERO;
    for (i, r) in reqs.iter().enumerate() {
        if !matches!(r.kind, w::CMD_READ | w::CMD_FLUSH) {
            // Writes and trims change an image: not replayed to a read-only peer.
            ctx.counts.skipped.fetch_add(1, Relaxed);
            tx.send_modify(|s| mark_done(s, i, &by_done, Instant::now()));
            continue;
        }
        // The last thing the client saw before sending this one, recorded and here.
        // The latest completion recorded before this request is the last of its `need`.
        let dep_of = |st: &State| {
            need[i]
                .checked_sub(1)
                .map(|k| by_done[k])
                .and_then(|j| Some((reqs[j].done, st.done[j]?)))
        };
        let dep = match rx.wait_for(|s| s.failed || s.prefix >= need[i]).await {
            Ok(st) if !st.failed => dep_of(&st),
            _ => break,
        };
        let (rec_ref, here_ref) = {
            let prev = i.checked_sub(1).map(|p| reqs[p].t).zip(prev_sent);
            match (dep, prev) {
                (Some(d), Some(p)) if p.0 > d.0 => p,
                (Some(d), Some(p)) => (d.0, d.1.max(p.1)),
                (Some(d), None) => d,
                (None, Some(p)) => p,
                (None, None) => (c.t, Instant::now()),
            }
        };
        let gap = Duration::from_secs_f64(r.t.saturating_sub(rec_ref) as f64 * scale / 1e6);
        if !gap.is_zero() {
            // Timers wake up to a millisecond late; that lateness is taken off the next
            // gaps so it does not add up over thousands of requests.
            let g = gap.saturating_sub(late);
            late -= gap - g;
            let target = here_ref + g;
            sleep_until(target).await;
            late += Instant::now().saturating_duration_since(target);
        }
        tx.send_modify(|s| s.in_flight += 1);
        let b = w::encode_request(&w::Request {
            flags: 0,
            kind: r.kind,
            cookie: i as u64,
            offset: r.offset,
            len: r.len,
        });
        prev_sent = Some(Instant::now());
        match timeout(ctx.o.reply_timeout, wr.write_all(&b)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                ctx.error(format!("connection {}: send request: {e}", c.id));
                tx.send_modify(|s| s.failed = true);
                break;
            }
            Err(_) => {
                ctx.error(format!("connection {}: request not taken in time", c.id));
                tx.send_modify(|s| s.failed = true);
                break;
            }
        }
    }
    tx.send_modify(|s| s.all_sent = true);
    let _ = rx.wait_for(|s| s.failed || s.in_flight == 0).await;
    let st = rx.borrow().clone();
    if !st.failed {
        let disc = w::encode_request(&w::Request {
            flags: 0,
            kind: w::CMD_DISC,
            cookie: u64::MAX,
            offset: 0,
            len: 0,
        });
        let _ = timeout(ctx.o.reply_timeout, async {
            wr.write_all(&disc).await?;
            wr.shutdown().await
        })
        .await;
    }
    drop(wr);
    let _ = reader.await;
    let st = tx.borrow().clone();
    let missing = st.done.iter().filter(|d| d.is_none()).count() as u64;
    ctx.counts.unanswered.fetch_add(missing, Relaxed);
}

fn mark_done(s: &mut State, i: usize, by_done: &[usize], now: Instant) {
    if s.done[i].is_none() {
        s.done[i] = Some(now);
    }
    while s.prefix < by_done.len() && s.done[by_done[s.prefix]].is_some() {
        s.prefix += 1;
    }
}

async fn read_replies<R: tokio::io::AsyncRead + Unpin>(
    ctx: Arc<Ctx>,
    conn: u64,
    mut rd: R,
    c: Arc<Conn>,
    by_done: Arc<Vec<usize>>,
    tx: Arc<watch::Sender<State>>,
) {
    let reqs = &c.reqs;
    let mut rx = tx.subscribe();
    let mut data = Vec::new();
    let mut expect = Vec::new();
    let fail = |why: String| {
        ctx.error(format!("connection {conn}: {why}"));
        tx.send_modify(|s| s.failed = true);
    };
    loop {
        let go = match rx
            .wait_for(|s| s.failed || s.in_flight > 0 || s.all_sent)
            .await
        {
            Ok(s) => !s.failed && s.in_flight > 0,
            Err(_) => false,
        };
        if !go {
            return;
        }
        let t = ctx.o.reply_timeout;
        let mut h = [0u8; w::SIMPLE_REPLY_LEN];
        match timeout(t, rd.read_exact(&mut h)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return fail(format!("reply header: {e}")),
            Err(_) => return fail(format!("no reply within {t:?}")),
        }
        if u32::from_be_bytes(h[..4].try_into().unwrap()) != w::SIMPLE_REPLY_MAGIC {
            return fail("reply: bad magic".into());
        }
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let i = cookie as usize;
        let Some(r) = reqs.get(i).filter(|_| rx.borrow().done[i].is_none()) else {
            return fail(format!("reply for unknown or answered cookie {cookie}"));
        };
        if r.kind == w::CMD_READ && error == 0 {
            data.resize(r.len as usize, 0);
            match timeout(t, rd.read_exact(&mut data)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return fail(format!("READ {}+{} data: {e}", r.offset, r.len)),
                Err(_) => return fail(format!("READ {}+{}: data late", r.offset, r.len)),
            }
            ctx.counts.bytes.fetch_add(r.len as u64, Relaxed);
            if let Some(img) = &ctx.image {
                expect.resize(r.len as usize, 0);
                match img.read_exact_at(&mut expect, r.offset) {
                    Ok(()) if expect == data => {}
                    Ok(()) => ctx.error(format!(
                        "connection {conn}: READ {}+{}: data differs from the image",
                        r.offset, r.len
                    )),
                    Err(e) => ctx.error(format!(
                        "connection {conn}: READ {}+{}: image: {e}",
                        r.offset, r.len
                    )),
                }
            }
        }
        if error != r.error {
            ctx.error(format!(
                "connection {conn}: {} {}+{}: error {error}, recorded {}",
                if r.kind == w::CMD_READ {
                    "READ"
                } else {
                    "request"
                },
                r.offset,
                r.len,
                r.error
            ));
        }
        ctx.counts.requests.fetch_add(1, Relaxed);
        let now = Instant::now();
        ctx.counts
            .last_reply_us
            .fetch_max((now - ctx.start).as_micros() as u64, Relaxed);
        tx.send_modify(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            mark_done(s, i, &by_done, now);
        });
    }
}

fn main() -> std::process::ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ltsp-replay: {e}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let text = match std::fs::read_to_string(&o.trace) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ltsp-replay: trace {}: {e}", o.trace);
            return std::process::ExitCode::from(2);
        }
    };
    let (conns, dropped) = match parse_trace(&text) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ltsp-replay: trace {}: {e}", o.trace);
            return std::process::ExitCode::from(2);
        }
    };
    if dropped > 0 {
        eprintln!("ltsp-replay: the trace lost {dropped} records when it was recorded");
    }
    let image = match &o.verify {
        Some(p) => match std::fs::File::open(p) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                eprintln!("ltsp-replay: --verify {p}: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => None,
    };
    // A socket per boot and connection: more than the usual soft limit of 1,024.
    ltsp_tests::raise_nofile();
    let boots_n = o.sources.len().max(1);
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        // A descriptor per boot and connection, and some to spare for the process.
        let need = (boots_n as u64)
            .saturating_mul(conns.len() as u64)
            .saturating_add(64);
        if need > soft {
            eprintln!(
                "ltsp-replay: {boots_n} boots of {} connections need {need} descriptors, the limit is {soft}: fewer --source addresses per process",
                conns.len()
            );
            return std::process::ExitCode::from(2);
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ltsp-replay: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(at) = o.start_at {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let wait = at - now;
        if wait > 3600.0 {
            eprintln!("ltsp-replay: --start-at is more than an hour ahead");
            return std::process::ExitCode::from(2);
        }
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
    let server = o.server;
    let n_conns = conns.len();
    let conns: Vec<Arc<Conn>> = conns.into_iter().map(Arc::new).collect();
    let o = Arc::new(o);
    let start = Instant::now();
    let sources: Vec<Option<IpAddr>> = if o.sources.is_empty() {
        vec![None]
    } else {
        o.sources.iter().copied().map(Some).collect()
    };
    let boots: Vec<Arc<Ctx>> = sources
        .into_iter()
        .map(|source| {
            Arc::new(Ctx {
                o: o.clone(),
                start,
                source,
                counts: Counts::default(),
                image: image.clone(),
            })
        })
        .collect();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for ctx in &boots {
            for c in &conns {
                let ctx = ctx.clone();
                let c = c.clone();
                tasks.spawn(async move {
                    replay_conn(ctx.clone(), c).await;
                    ctx.counts.finished.fetch_add(1, Relaxed);
                });
            }
        }
        // A task that did not finish (a panic, in a build that unwinds; release builds
        // abort) is an error of its boot, counted below.
        while tasks.join_next().await.is_some() {}
    });
    let held_back = SHOWN.load(Relaxed).saturating_sub(SHOWN_ERRORS);
    if held_back > 0 {
        eprintln!("ltsp-replay: {held_back} more error lines not shown (each boot's count is on its REPLAY line)");
    }
    let mut ok = true;
    for ctx in &boots {
        let c = &ctx.counts;
        let errors =
            c.errors.load(Relaxed) + (n_conns as u64).saturating_sub(c.finished.load(Relaxed));
        let unanswered = c.unanswered.load(Relaxed);
        let source = ctx.source.map_or("any".to_string(), |ip| ip.to_string());
        println!(
            "REPLAY server={server} source={source} time_s={:.6} connections={}/{n_conns} requests={} bytes={} errors={errors} unanswered={unanswered} skipped={} think_scale={}",
            c.last_reply_us.load(Relaxed) as f64 / 1e6,
            c.connections.load(Relaxed),
            c.requests.load(Relaxed),
            c.bytes.load(Relaxed),
            c.skipped.load(Relaxed),
            o.scale,
        );
        ok &= errors == 0 && unanswered == 0;
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(t: u64, done: u64) -> Req {
        Req {
            t,
            kind: w::CMD_READ,
            offset: 0,
            len: 512,
            done,
            error: 0,
        }
    }

    #[test]
    fn dependencies_keep_the_recorded_depth() {
        // 0 and 1 in flight together; 2 sent after 0 completed; 3 after both.
        let reqs = [r(0, 10), r(1, 20), r(15, 30), r(25, 26)];
        let (by_done, need) = dependencies(&reqs);
        assert_eq!(by_done, [0, 1, 3, 2]);
        assert_eq!(need, [0, 0, 1, 2]);
    }

    #[test]
    fn traces_parse_and_reject_garbage() {
        let t = "# ltsp-nbd-trace v1\nC 5 1 10.0.0.1:999 ro%20ot 4096\n\
                 R 9 1 read 0 512 12 0\nR 7 1 read 512 512 20 0\nR 30 1 disc 0 0 30 0\n\
                 R 40 2 flush 0 0 41 0\n# dropped 3\n";
        let (c, dropped) = parse_trace(t).unwrap();
        assert_eq!(dropped, 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].export, "ro ot");
        assert_eq!(c[0].t, 5);
        assert_eq!(
            c[0].reqs.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [512, 0],
            "send order, DISC left out"
        );
        assert_eq!((c[1].id, c[1].t, c[1].reqs.len()), (2, 40, 1));
        assert!(parse_trace("R 1 1 read 0 1 2 0\n").is_err(), "no header");
        for bad in [
            "R 1 1 read 0 1 2",
            "R 1 1 nope 0 1 2 0",
            "R 5 1 read 0 1 2 0",
            "R 1 1 read 0 99999999999 2 0",
            "X",
        ] {
            let t = format!("# ltsp-nbd-trace v1\n{bad}\n");
            assert!(parse_trace(&t).is_err(), "{bad}");
        }
    }
}
