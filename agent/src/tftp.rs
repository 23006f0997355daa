//! A small TFTP client: enough to fetch lts.conf from the boot server (RFC 1350 with
//! blksize and tsize), with timeouts and a size limit.

use ltsp_common::tftp::{self as t, Packet};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

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
    #[error("{path}: larger than {limit} bytes")]
    TooLarge { path: String, limit: usize },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Fetches `path` from `server`; `limit` bounds what a broken server can make us hold.
pub fn fetch(
    server: SocketAddr,
    path: &str,
    timeout: Duration,
    tries: u32,
    limit: usize,
) -> Result<Vec<u8>, FetchError> {
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
    sock.set_read_timeout(Some(timeout)).map_err(io)?;
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
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
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
