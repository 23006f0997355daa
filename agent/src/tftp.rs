//! A small TFTP client: enough to fetch lts.conf from the boot server (RFC 1350 with
//! blksize and tsize), with per-packet timeouts, an overall deadline and a size limit.

use ltsp_common::tftp::{self as t, Packet};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: not on the server")]
    NotFound { path: String },
    #[error("{path}: server said error {code}: {message}")]
    Server {
        path: String,
        code: u16,
        message: String,
    },
    #[error("{path}: no answer from {server} after {tries} tries")]
    Timeout {
        path: String,
        server: SocketAddr,
        tries: u32,
    },
    /// The server answers, but the transfer does not end in time: it resends, or trickles.
    #[error(
        "{path}: transfer from {server} not done by the deadline ({got} bytes after {secs:.1} s)"
    )]
    Deadline {
        path: String,
        server: SocketAddr,
        got: usize,
        secs: f64,
    },
    #[error("{path}: larger than {limit} bytes")]
    TooLarge { path: String, limit: usize },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Fetches `path` from `server`; `limit` bounds what a broken server can make us hold,
/// `deadline` how long it can make us wait in all (`timeout` and `tries` only bound
/// silence: a server that keeps resending or trickles blocks is never silent).
pub fn fetch(
    server: SocketAddr,
    path: &str,
    timeout: Duration,
    tries: u32,
    limit: usize,
    deadline: Instant,
) -> Result<Vec<u8>, FetchError> {
    let start = Instant::now();
    let io = |source| FetchError::Io {
        path: path.into(),
        source,
    };
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind).map_err(io)?;
    const BLK: usize = 1468;
    let rrq = t::rrq(
        path,
        "octet",
        &[("blksize", BLK.to_string()), ("tsize", "0".into())],
    );
    let mut last: Vec<u8> = rrq;
    let mut dest = server;
    let mut peer: Option<SocketAddr> = None;
    let mut data = Vec::new();
    let mut expect: u16 = 1;
    let mut blksize = 512;
    let mut buf = vec![0u8; 65536];
    let mut left = tries;
    sock.send_to(&last, dest).map_err(io)?;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(FetchError::Deadline {
                path: path.into(),
                server,
                got: data.len(),
                secs: (now - start).as_secs_f64(),
            });
        }
        // Never zero: a zero read timeout means none at all.
        let wait = timeout.min(deadline - now).max(Duration::from_millis(1));
        sock.set_read_timeout(Some(wait)).map_err(io)?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    continue;
                }
                left = left.saturating_sub(1);
                if left == 0 {
                    return Err(FetchError::Timeout {
                        path: path.into(),
                        server,
                        tries,
                    });
                }
                sock.send_to(&last, dest).map_err(io)?;
                continue;
            }
            Err(e) => return Err(io(e)),
        };
        if from.ip() != server.ip() || peer.is_some_and(|p| p != from) {
            continue;
        }
        match t::decode(&buf[..n]) {
            Ok(Packet::Oack(opts)) if peer.is_none() => {
                peer = Some(from);
                dest = from;
                for (k, v) in opts {
                    match (k.as_str(), v.parse::<usize>()) {
                        ("blksize", Ok(b)) => blksize = b,
                        ("tsize", Ok(s)) if s > limit => {
                            let _ = sock.send_to(&t::error(t::ERR_UNDEFINED, "too large"), from);
                            return Err(FetchError::TooLarge {
                                path: path.into(),
                                limit,
                            });
                        }
                        _ => {}
                    }
                }
                last = t::ack(0).to_vec();
                sock.send_to(&last, dest).map_err(io)?;
            }
            Ok(Packet::Data { block, data: d }) => {
                if peer.is_none() {
                    peer = Some(from);
                    dest = from;
                }
                if block == expect {
                    data.extend_from_slice(d);
                    if data.len() > limit {
                        let _ = sock.send_to(&t::error(t::ERR_UNDEFINED, "too large"), from);
                        return Err(FetchError::TooLarge {
                            path: path.into(),
                            limit,
                        });
                    }
                    last = t::ack(block).to_vec();
                    sock.send_to(&last, dest).map_err(io)?;
                    left = tries;
                    if d.len() < blksize {
                        return Ok(data);
                    }
                    expect = expect.wrapping_add(1);
                } else {
                    // A duplicate: re-acknowledge so the server moves on.
                    sock.send_to(&last, dest).map_err(io)?;
                }
            }
            Ok(Packet::Error { code, message }) => {
                return Err(if code == t::ERR_NOT_FOUND {
                    FetchError::NotFound { path: path.into() }
                } else {
                    FetchError::Server {
                        path: path.into(),
                        code,
                        message,
                    }
                })
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn data(block: u16, len: usize) -> Vec<u8> {
        let mut d = t::data_header(block).to_vec();
        d.extend(std::iter::repeat_n(b'x', len));
        d
    }

    /// A loopback server that answers the read request with `serve`, given its socket,
    /// the client's address and a flag the test sets when it is done. It gives up by itself
    /// after 20 s, so a client without a deadline ends with a timeout, not a hang.
    fn server(
        serve: impl FnOnce(&UdpSocket, SocketAddr, &AtomicBool) + Send + 'static,
    ) -> (SocketAddr, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let (_, client) = sock.recv_from(&mut buf).unwrap();
            serve(&sock, client, &d);
        });
        (addr, done, h)
    }

    fn until_done(done: &AtomicBool) -> impl Iterator<Item = ()> + '_ {
        let t0 = Instant::now();
        std::iter::from_fn(move || {
            (!done.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(20)).then_some(())
        })
    }

    fn fetch_from(addr: SocketAddr, deadline: Duration) -> Result<Vec<u8>, FetchError> {
        fetch(
            addr,
            "/ltsp/amd64/lts.conf",
            Duration::from_millis(500),
            4,
            1 << 30,
            Instant::now() + deadline,
        )
    }

    #[test]
    fn a_whole_file_is_fetched() {
        let (addr, done, h) = server(|s, client, _| {
            s.send_to(&data(1, 512), client).unwrap();
            let mut buf = [0u8; 64];
            s.recv_from(&mut buf).unwrap();
            s.send_to(&data(2, 10), client).unwrap();
            s.recv_from(&mut buf).unwrap();
        });
        let got = fetch_from(addr, Duration::from_secs(20)).unwrap();
        done.store(true, Ordering::Relaxed);
        h.join().unwrap();
        assert_eq!(got.len(), 522);
    }

    #[test]
    fn a_server_that_keeps_resending_cannot_hang_the_fetch() {
        // Block 1 again and again, whatever the client acknowledges: never silent, so the
        // per-packet timeout never fires.
        let (addr, done, h) = server(|s, client, done| {
            for () in until_done(done) {
                let _ = s.send_to(&data(1, 512), client);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let r = fetch_from(addr, Duration::from_millis(300));
        done.store(true, Ordering::Relaxed);
        h.join().unwrap();
        match r {
            Err(e @ FetchError::Deadline { got: 512, .. }) => {
                assert!(e.to_string().contains("not done by the deadline"), "{e}")
            }
            other => panic!("want a deadline error after block 1, got {other:?}"),
        }
    }

    #[test]
    fn a_server_that_trickles_blocks_cannot_hang_the_fetch() {
        // A new full block after each acknowledgement, slowly, without end.
        let (addr, done, h) = server(|s, client, done| {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut block = 1u16;
            let mut buf = [0u8; 64];
            for () in until_done(done) {
                std::thread::sleep(Duration::from_millis(20));
                let _ = s.send_to(&data(block, 512), client);
                if s.recv_from(&mut buf).is_ok() {
                    block = block.wrapping_add(1);
                }
            }
        });
        let r = fetch_from(addr, Duration::from_millis(500));
        done.store(true, Ordering::Relaxed);
        h.join().unwrap();
        assert!(
            matches!(r, Err(FetchError::Deadline { got, .. }) if got >= 512),
            "{r:?}"
        );
    }
}
