//! Client side of fixed newstyle negotiation: NBD_OPT_GO (with the export's description,
//! which carries the image identity), falling back to NBD_OPT_EXPORT_NAME for old servers.

use ltsp_common::cmdline::NbdTarget;
use ltsp_common::nbd as w;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{target}: {host:?} is not an IP address (the initramfs does no DNS)")]
    NotAnAddress { target: String, host: String },
    #[error("{target}: no server given and none learnt from DHCP: set nbdroot= or ltsp.server=")]
    NoServer { target: String },
    #[error("{target}: connect: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("{target}: {source}")]
    Io {
        target: String,
        source: std::io::Error,
    },
    #[error(
        "{target}: no answer within {secs} s after connecting: is the server hung or overloaded?"
    )]
    Silent { target: String, secs: u64 },
    #[error("{target}: not an NBD server (bad magic {magic:#x})")]
    NotNbd { target: String, magic: u64 },
    #[error("{target}: server does not speak fixed newstyle")]
    OldStyle { target: String },
    #[error(
        "{target}: export {export:?} does not exist on the server (error {code:#x}: {message})"
    )]
    NoExport {
        target: String,
        export: String,
        code: u32,
        message: String,
    },
    #[error("{target}: export size {size} is not a whole number of 512-byte sectors")]
    BadSize { target: String, size: u64 },
    #[error("{target}: the server is still hashing the image ({done} done); retrying")]
    Hashing { target: String, done: String },
}

/// A negotiated connection, ready for transmission.
pub struct Connected {
    pub stream: TcpStream,
    pub info: w::ExportInfo,
    pub addr: SocketAddr,
}

pub fn connect(t: &NbdTarget, timeout: Duration) -> Result<Connected, HandshakeError> {
    let target = t.to_string();
    let host = t.host.clone().ok_or_else(|| HandshakeError::NoServer {
        target: target.clone(),
    })?;
    let ip: IpAddr = host.parse().map_err(|_| HandshakeError::NotAnAddress {
        target: target.clone(),
        host: host.clone(),
    })?;
    let addr = SocketAddr::new(ip, t.port);
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| HandshakeError::Connect {
            target: target.clone(),
            source,
        })?;
    let io = |source| HandshakeError::Io {
        target: target.clone(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    keepalive(&stream).map_err(io)?;
    let info = negotiate(&stream, &t.export, &target).map_err(|e| match e {
        // A read timeout: the server accepted (or its kernel did) but says nothing.
        HandshakeError::Io { target, source }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            HandshakeError::Silent {
                target,
                secs: timeout.as_secs(),
            }
        }
        e => e,
    })?;
    stream.set_read_timeout(None).map_err(io)?;
    if info.size == 0 || info.size % 512 != 0 {
        return Err(HandshakeError::BadSize {
            target,
            size: info.size,
        });
    }
    Ok(Connected { stream, info, addr })
}

/// A connection to the version `identity` of `t`'s export (`NAME@blake3:<hex>`, which
/// ltsp-server serves for as long as it holds that version); a server that does not know
/// that name (an older one, or one that never held the version) is asked for the plain
/// name, and the caller checks the identity it gives.
pub fn connect_version(
    t: &NbdTarget,
    identity: &str,
    timeout: Duration,
) -> Result<Connected, HandshakeError> {
    if !identity.starts_with("blake3:") {
        // Another server's description: no version to ask for by name.
        return connect(t, timeout);
    }
    let versioned = NbdTarget {
        export: format!("{}@{identity}", t.export),
        ..t.clone()
    };
    match connect(&versioned, timeout) {
        Err(HandshakeError::NoExport { .. }) => connect(t, timeout),
        r => r,
    }
}

/// A server that vanishes without a FIN (power loss, cable) is noticed on an idle
/// connection within about 25 s, so the reconnect helper gets to work.
fn keepalive(s: &TcpStream) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(s, sockopt::KeepAlive, &true)?;
    setsockopt(s, sockopt::TcpKeepIdle, &10)?;
    setsockopt(s, sockopt::TcpKeepInterval, &5)?;
    setsockopt(s, sockopt::TcpKeepCount, &3)?;
    Ok(())
}

/// The negotiation itself, over any stream (unit-tested against in-memory scripts).
pub fn negotiate<S: Read + Write>(
    mut s: S,
    export: &str,
    target: &str,
) -> Result<w::ExportInfo, HandshakeError> {
    let io = |source| HandshakeError::Io {
        target: target.into(),
        source,
    };
    let mut g = [0u8; 18];
    s.read_exact(&mut g).map_err(io)?;
    let magic = u64::from_be_bytes(g[..8].try_into().unwrap());
    if magic != w::NBDMAGIC {
        return Err(HandshakeError::NotNbd {
            target: target.into(),
            magic,
        });
    }
    let magic2 = u64::from_be_bytes(g[8..16].try_into().unwrap());
    let flags = u16::from_be_bytes([g[16], g[17]]);
    if magic2 != w::IHAVEOPT || flags & w::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::OldStyle {
            target: target.into(),
        });
    }
    let no_zeroes = flags & w::FLAG_NO_ZEROES != 0;
    let cflags = w::CLIENT_FIXED_NEWSTYLE | if no_zeroes { w::CLIENT_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes()).map_err(io)?;
    let req = w::info_request(export, &[w::INFO_DESCRIPTION, w::INFO_BLOCK_SIZE]);
    s.write_all(&w::option_header(w::OPT_GO, req.len() as u32))
        .map_err(io)?;
    s.write_all(&req).map_err(io)?;
    let mut info = w::ExportInfo::default();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).map_err(io)?;
        let h = w::parse_option_reply_header(&h).map_err(|_| HandshakeError::NotNbd {
            target: target.into(),
            magic: u64::from_be_bytes(h[..8].try_into().unwrap()),
        })?;
        let mut d = vec![0u8; h.len.min(w::MAX_OPTION_LEN) as usize];
        s.read_exact(&mut d).map_err(io)?;
        match h.reply {
            w::REP_INFO => {
                let _ = w::apply_info_reply(&mut info, &d);
            }
            w::REP_ACK => {
                if let Some(done) = info.hashing() {
                    // No identity yet: the caller drops the connection and asks again.
                    return Err(HandshakeError::Hashing {
                        target: target.into(),
                        done: done.to_string(),
                    });
                }
                return Ok(info);
            }
            w::REP_ERR_UNSUP => break, // an old server: EXPORT_NAME below
            code => {
                return Err(HandshakeError::NoExport {
                    target: target.into(),
                    export: export.into(),
                    code,
                    message: String::from_utf8_lossy(&d).into_owned(),
                })
            }
        }
    }
    s.write_all(&w::option_header(w::OPT_EXPORT_NAME, export.len() as u32))
        .map_err(io)?;
    s.write_all(export.as_bytes()).map_err(io)?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            HandshakeError::NoExport {
                target: target.into(),
                export: export.into(),
                code: 0,
                message: "server closed the connection".into(),
            }
        } else {
            io(e)
        }
    })?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z).map_err(io)?;
    }
    info.size = u64::from_be_bytes(b[..8].try_into().unwrap());
    info.flags = u16::from_be_bytes([b[8], b[9]]);
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that reads a scripted server and records what the client wrote.
    struct Script {
        r: Cursor<Vec<u8>>,
        w: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.r.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.w.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn go_then_fallback_to_export_name() {
        let mut srv = w::server_greeting().to_vec();
        srv.extend(w::option_reply(w::OPT_GO, w::REP_ERR_UNSUP, b""));
        srv.extend_from_slice(&(1u64 << 20).to_be_bytes());
        srv.extend_from_slice(&3u16.to_be_bytes());
        let mut s = Script {
            r: Cursor::new(srv),
            w: Vec::new(),
        };
        let info = negotiate(&mut s, "root", "t").unwrap();
        assert_eq!((info.size, info.flags), (1 << 20, 3));
        // The client sent flags, GO, then EXPORT_NAME "root".
        assert_eq!(&s.w[..4], &3u32.to_be_bytes());
        assert!(s.w.ends_with(b"root"));
    }

    #[test]
    fn go_with_description_and_errors() {
        let mut srv = w::server_greeting().to_vec();
        srv.extend(w::option_reply(
            w::OPT_GO,
            w::REP_INFO,
            &w::info_export(4096, 3),
        ));
        let mut d = w::INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(b"image v2");
        srv.extend(w::option_reply(w::OPT_GO, w::REP_INFO, &d));
        srv.extend(w::option_reply(w::OPT_GO, w::REP_ACK, b""));
        let info = negotiate(
            &mut Script {
                r: Cursor::new(srv),
                w: Vec::new(),
            },
            "",
            "t",
        )
        .unwrap();
        assert_eq!(info.size, 4096);
        assert_eq!(info.description.as_deref(), Some("image v2"));

        // ltsp-server still hashing the image: no identity yet, so no connection.
        let mut srv = w::server_greeting().to_vec();
        let mut d = w::INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(b"ltsp-rs image root size=4096 hashing=12%");
        srv.extend(w::option_reply(w::OPT_GO, w::REP_INFO, &d));
        srv.extend(w::option_reply(w::OPT_GO, w::REP_ACK, b""));
        let e = negotiate(
            &mut Script {
                r: Cursor::new(srv),
                w: Vec::new(),
            },
            "root",
            "t",
        )
        .unwrap_err();
        assert!(
            matches!(&e, HandshakeError::Hashing { done, .. } if done == "12%"),
            "{e}"
        );

        let mut srv = w::server_greeting().to_vec();
        srv.extend(w::option_reply(
            w::OPT_GO,
            w::REP_ERR_UNKNOWN,
            b"no export named \"x\"",
        ));
        let e = negotiate(
            &mut Script {
                r: Cursor::new(srv),
                w: Vec::new(),
            },
            "x",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = negotiate(
            &mut Script {
                r: Cursor::new(b"HTTP/1.1 400 Bad Request\r\n".to_vec()),
                w: Vec::new(),
            },
            "x",
            "t",
        )
        .unwrap_err();
        assert!(matches!(e, HandshakeError::NotNbd { .. }));
    }
}
