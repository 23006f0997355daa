//! NBD request trace: one line per request, written by one thread so the serving path only
//! pays a `try_send` into a bounded channel. When the writer falls behind (a slow disk, a
//! flood of requests) records are dropped and counted, never queued without bound; so are
//! those past the file's cap of 1 GiB.
//!
//! The file is text, one record per line, fields separated by one space:
//!
//! ```text
//! # ltsp-nbd-trace v1
//! C <t_us> <conn> <peer> <export> <size>
//! R <t_us> <conn> <cmd> <offset> <len> <done_us> <error>
//! # dropped <n>
//! ```
//!
//! `t_us`: microseconds since the trace started, when the connection finished negotiating
//! (`C`) or when the request header was read (`R`). `conn`: a counter, one per connection
//! that reached transmission; its `C` line comes before its requests'. `size`: the
//! export's size in bytes. `cmd`: `read`,
//! `write`, `flush`, `trim`, `write_zeroes`, `disc` or the number. `done_us`: when the
//! reply was fully written (for `disc`, which has none: `t_us`). `error`: the NBD error
//! sent (0 for success). `R` lines are in reply order; sort by `t_us` for request order.
//! `peer` and `export` are percent-encoded where not printable ASCII or a space.
//! Lines starting with `#` are comments; the last one counts the records dropped. A request
//! whose reply was never fully written (the connection failed first) has no `R` line.

use crate::status::Status;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

/// Records waiting for the writer; about 64 bytes each, so a few MiB at most. Enough for
/// 600,000 requests a second at the writer's poll interval.
const QUEUE: usize = 32 * 1024;
/// The file stops growing here (about 20 million requests, 17,000 boots); later records
/// are dropped and counted, so clients cannot fill the disk.
const MAX_FILE_BYTES: u64 = 1 << 30;
/// How often the writer takes what is queued.
const POLL: std::time::Duration = std::time::Duration::from_millis(50);

pub const HEADER: &str = "# ltsp-nbd-trace v1";

enum Record {
    Conn {
        t: u64,
        conn: u64,
        peer: Box<str>,
        export: Box<str>,
        size: u64,
    },
    Req(Req),
}

/// One request, as the reply writer hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Req {
    pub t: u64,
    pub conn: u64,
    pub kind: u16,
    pub offset: u64,
    pub len: u32,
    pub done: u64,
    pub error: u32,
}

pub struct Tracer {
    /// None only while dropping.
    tx: Option<SyncSender<Record>>,
    start: Instant,
    next_conn: AtomicU64,
    status: Arc<Status>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Tracer {
    /// Creates (truncates) `path` and starts the writer thread.
    pub fn open(path: &Path, status: Arc<Status>) -> std::io::Result<Arc<Tracer>> {
        let file = std::fs::File::create(path)?;
        Self::start(Box::new(file), status, QUEUE, MAX_FILE_BYTES)
    }

    fn start(
        out: Box<dyn Write + Send>,
        status: Arc<Status>,
        queue: usize,
        max_bytes: u64,
    ) -> std::io::Result<Arc<Tracer>> {
        let (tx, rx) = sync_channel(queue);
        let st = status.clone();
        let writer = std::thread::Builder::new()
            .name("nbd-trace".into())
            .spawn(move || write_records(out, rx, st, max_bytes))?;
        Ok(Arc::new(Tracer {
            tx: Some(tx),
            start: Instant::now(),
            next_conn: AtomicU64::new(1),
            status,
            writer: Some(writer),
        }))
    }

    /// Microseconds since the trace started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// A new connection's id, with its `C` record.
    pub fn connection(&self, peer: &str, export: &str, size: u64) -> u64 {
        let conn = self.next_conn.fetch_add(1, Relaxed);
        self.send(Record::Conn {
            t: self.now(),
            conn,
            peer: encode(peer).into(),
            export: encode(export).into(),
            size,
        });
        conn
    }

    pub fn request(&self, r: Req) {
        self.send(Record::Req(r));
    }

    fn send(&self, r: Record) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if self.status.nbd_trace_dropped.fetch_add(1, Relaxed) == 0 {
                    log::warn!("nbd: trace writer behind: records dropped (counted)");
                }
            }
        }
    }
}

/// The last holder writes what is queued and the dropped count, and closes the file.
impl Drop for Tracer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_records(
    out: Box<dyn Write + Send>,
    rx: Receiver<Record>,
    status: Arc<Status>,
    max_bytes: u64,
) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, Counting { inner: out, n: 0 });
    let mut full = false;
    let mut ok = writeln!(out, "{HEADER}").and_then(|_| out.flush()).is_ok();
    let failed = |e: std::io::Error, ok: &mut bool| {
        if *ok {
            log::error!("nbd: trace: write: {e}: tracing stopped");
        }
        *ok = false;
    };
    // The writer polls instead of blocking in recv: a blocked receiver would be woken (a
    // futex call and a context switch) for every request the server records.
    loop {
        let mut wrote = false;
        let ended = loop {
            match rx.try_recv() {
                Ok(r) => {
                    // Bytes handed to the file plus those still in the buffer.
                    if !full && out.get_ref().n + out.buffer().len() as u64 >= max_bytes {
                        full = true;
                        log::warn!("nbd: trace file reached {max_bytes} bytes: records dropped");
                    }
                    if ok && !full {
                        if let Err(e) = write_record(&mut out, &r) {
                            failed(e, &mut ok);
                        }
                        wrote = true;
                    } else {
                        status.nbd_trace_dropped.fetch_add(1, Relaxed);
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        // The file is current after every poll: a killed server loses one interval.
        if ok && wrote {
            if let Err(e) = out.flush() {
                failed(e, &mut ok);
            }
        }
        if ended {
            break;
        }
        std::thread::sleep(POLL);
    }
    let dropped = status.nbd_trace_dropped.load(Relaxed);
    if ok {
        let _ = writeln!(out, "# dropped {dropped}").and_then(|_| out.flush());
    }
    if dropped > 0 {
        log::warn!("nbd: trace closed: {dropped} records dropped");
    } else {
        log::info!("nbd: trace closed");
    }
}

fn write_record(out: &mut impl Write, r: &Record) -> std::io::Result<()> {
    match r {
        Record::Conn {
            t,
            conn,
            peer,
            export,
            size,
        } => writeln!(out, "C {t} {conn} {peer} {export} {size}"),
        Record::Req(q) => writeln!(
            out,
            "R {} {} {} {} {} {} {}",
            q.t,
            q.conn,
            command_name(q.kind),
            q.offset,
            q.len,
            q.done,
            q.error
        ),
    }
}

pub fn command_name(kind: u16) -> std::borrow::Cow<'static, str> {
    use ltsp_common::nbd as w;
    match kind {
        w::CMD_READ => "read".into(),
        w::CMD_WRITE => "write".into(),
        w::CMD_DISC => "disc".into(),
        w::CMD_FLUSH => "flush".into(),
        w::CMD_TRIM => "trim".into(),
        w::CMD_WRITE_ZEROES => "write_zeroes".into(),
        n => n.to_string().into(),
    }
}

/// Printable ASCII other than space and `%` as is; every other byte as `%XX`. Empty: `-`.
fn encode(s: &str) -> String {
    if s.is_empty() {
        return "-".into();
    }
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that blocks until told to go on: the writer thread is stuck.
    struct Stuck(Arc<(Mutex<bool>, std::sync::Condvar)>, Shared);
    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.0;
            let mut go = m.lock().unwrap();
            while !*go {
                go = c.wait(go).unwrap();
            }
            self.1.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn names_are_encoded_to_one_field() {
        assert_eq!(encode("root"), "root");
        assert_eq!(encode("a b\n%"), "a%20b%0A%25");
        assert_eq!(encode(""), "-");
        assert_eq!(encode("é"), "%C3%A9");
    }

    /// The file stops growing at its cap; what comes later is dropped and counted.
    #[test]
    fn the_file_stops_at_its_cap() {
        let status = Arc::new(Status::default());
        let sink = Shared::default();
        let t = Tracer::start(Box::new(sink.clone()), status.clone(), 1000, 300).unwrap();
        for i in 0..100 {
            t.request(Req {
                t: i,
                conn: 1,
                kind: ltsp_common::nbd::CMD_READ,
                offset: 4096 * i,
                len: 4096,
                done: i + 1,
                error: 0,
            });
        }
        drop(t);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let reqs = text.lines().filter(|l| l.starts_with("R ")).count() as u64;
        let dropped = status.nbd_trace_dropped.load(Relaxed);
        assert!(reqs > 0 && reqs < 100, "{text}");
        assert_eq!(reqs + dropped, 100);
        // The cap, one record that crossed it, and the closing line.
        assert!(text.len() < 300 + 64 + 32, "{} bytes", text.len());
        assert_eq!(
            text.lines().last(),
            Some(format!("# dropped {dropped}").as_str())
        );
    }

    /// With the writer stuck, requests beyond the queue are dropped and counted (the
    /// caller never waits), and the count is written at close.
    #[test]
    fn a_stuck_writer_drops_and_counts_instead_of_queueing() {
        let status = Arc::new(Status::default());
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let sink = Shared::default();
        let t = Tracer::start(
            Box::new(Stuck(gate.clone(), sink.clone())),
            status.clone(),
            8,
            u64::MAX,
        )
        .unwrap();
        let r = Req {
            t: 1,
            conn: 1,
            kind: ltsp_common::nbd::CMD_READ,
            offset: 0,
            len: 512,
            done: 2,
            error: 0,
        };
        for _ in 0..1000 {
            t.request(r);
        }
        let dropped = status.nbd_trace_dropped.load(Relaxed);
        // The queue (8) and the one the writer holds, at most, got through.
        assert!(dropped >= 1000 - 9, "{dropped} dropped");
        {
            let (m, c) = &*gate;
            *m.lock().unwrap() = true;
            c.notify_all();
        }
        drop(t);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], HEADER);
        let reqs = lines.iter().filter(|l| l.starts_with("R ")).count() as u64;
        assert_eq!(reqs + dropped, 1000, "{text}");
        assert_eq!(lines.last().unwrap(), &format!("# dropped {dropped}"));
    }
}
