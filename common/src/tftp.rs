//! TFTP packets (RFC 1350) with option extension (RFC 2347): blksize (RFC 2348), timeout
//! and tsize (RFC 2349), windowsize (RFC 7440). Pure codec, used by the server and by the
//! agent's lts.conf fetch.

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

pub const ERR_UNDEFINED: u16 = 0;
pub const ERR_NOT_FOUND: u16 = 1;
pub const ERR_ACCESS: u16 = 2;
pub const ERR_ILLEGAL_OP: u16 = 4;
pub const ERR_UNKNOWN_TID: u16 = 5;
pub const ERR_OPTION: u16 = 8;

pub const BLKSIZE_MIN: u16 = 8;
pub const BLKSIZE_MAX: u16 = 65464;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: &'a [u8] },
    Ack { block: u16 },
    Error { code: u16, message: String },
    Oack(Vec<(String, String)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    /// Lower-cased: `octet`, `netascii` or `mail`.
    pub mode: String,
    /// Option names lower-cased, in the order sent.
    pub options: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet shorter than 4 bytes")]
    Short,
    #[error("unknown opcode {0}")]
    Opcode(u16),
    #[error("string field not terminated by NUL")]
    Unterminated,
    #[error("string field is not valid text")]
    NotText,
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
    #[error("file name of {0} bytes; at most {MAX_NAME}")]
    NameTooLong(usize),
}

/// Longest file name a request may carry: a boot path is short, and a transfer keeps its
/// name for its whole life (status, logs).
pub const MAX_NAME: usize = 512;

pub fn decode(b: &[u8]) -> Result<Packet<'_>, DecodeError> {
    if b.len() < 2 {
        return Err(DecodeError::Short);
    }
    let op = u16::from_be_bytes([b[0], b[1]]);
    let body = &b[2..];
    let block = || -> Result<u16, DecodeError> {
        (body.len() >= 2)
            .then(|| u16::from_be_bytes([body[0], body[1]]))
            .ok_or(DecodeError::Short)
    };
    match op {
        OP_RRQ | OP_WRQ => {
            let mut fields = strings(body)?;
            if fields.len() < 2 {
                return Err(DecodeError::Unterminated);
            }
            let filename = fields.remove(0);
            if filename.len() > MAX_NAME {
                return Err(DecodeError::NameTooLong(filename.len()));
            }
            let mode = fields.remove(0).to_ascii_lowercase();
            if fields.len() % 2 != 0 {
                return Err(DecodeError::OptionWithoutValue(fields.pop().unwrap()));
            }
            let options = fields
                .chunks_exact(2)
                .map(|kv| (kv[0].to_ascii_lowercase(), kv[1].clone()))
                .collect();
            let r = Request {
                filename,
                mode,
                options,
            };
            Ok(if op == OP_RRQ {
                Packet::Rrq(r)
            } else {
                Packet::Wrq(r)
            })
        }
        OP_DATA => Ok(Packet::Data {
            block: block()?,
            data: &body[2..],
        }),
        OP_ACK => Ok(Packet::Ack { block: block()? }),
        OP_ERROR => {
            let code = block()?;
            let message = strings(&body[2..])
                .ok()
                .and_then(|mut v| (!v.is_empty()).then(|| v.remove(0)))
                .unwrap_or_default();
            Ok(Packet::Error { code, message })
        }
        OP_OACK => {
            let fields = strings(body)?;
            if fields.len() % 2 != 0 {
                return Err(DecodeError::OptionWithoutValue(
                    fields.last().unwrap().clone(),
                ));
            }
            Ok(Packet::Oack(
                fields
                    .chunks_exact(2)
                    .map(|kv| (kv[0].to_ascii_lowercase(), kv[1].clone()))
                    .collect(),
            ))
        }
        other => Err(DecodeError::Opcode(other)),
    }
}

/// NUL-terminated strings filling `b` exactly.
fn strings(b: &[u8]) -> Result<Vec<String>, DecodeError> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    if *b.last().unwrap() != 0 {
        return Err(DecodeError::Unterminated);
    }
    b[..b.len() - 1]
        .split(|&c| c == 0)
        .map(|s| {
            std::str::from_utf8(s)
                .map(str::to_string)
                .map_err(|_| DecodeError::NotText)
        })
        .collect()
}

/// Writes a DATA header into the first 4 bytes of `buf` (the payload follows in place).
pub fn data_header(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, OP_DATA as u8, b[0], b[1]]
}

pub fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, OP_ACK as u8, b[0], b[1]]
}

pub fn error(code: u16, message: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + message.len());
    v.extend_from_slice(&OP_ERROR.to_be_bytes());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(message.as_bytes());
    v.push(0);
    v
}

pub fn oack(options: &[(String, String)]) -> Vec<u8> {
    let mut v = OP_OACK.to_be_bytes().to_vec();
    for (k, val) in options {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

pub fn rrq(filename: &str, mode: &str, options: &[(&str, String)]) -> Vec<u8> {
    let mut v = OP_RRQ.to_be_bytes().to_vec();
    for s in [filename, mode] {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }
    for (k, val) in options {
        v.extend_from_slice(k.as_bytes());
        v.push(0);
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

/// Options a server accepted for one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout_secs: u8,
    /// Whether the client asked for tsize (the server then reports the size).
    pub tsize: bool,
}

/// Server-side option negotiation: which requested options are accepted, with what values
/// (RFC 2347: unknown or unacceptable options are left out of the OACK, not refused).
/// A `timeout` above `max_timeout` is left out and `default_timeout` is used: the server
/// never lets a client stretch the life of a transfer it may never acknowledge.
pub fn negotiate(
    req: &Request,
    default_timeout: u8,
    max_timeout: u8,
    max_window: u16,
) -> (Negotiated, Vec<(String, String)>) {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout_secs: default_timeout,
        tsize: false,
    };
    let mut accepted: Vec<(String, String)> = Vec::new();
    for (k, v) in &req.options {
        // Each option once: repeats would make the OACK as long as the request.
        if accepted.iter().any(|(a, _)| a == k) {
            continue;
        }
        match k.as_str() {
            "blksize" => {
                if let Ok(b) = v.parse::<u32>() {
                    if b >= BLKSIZE_MIN as u32 {
                        n.blksize = b.min(BLKSIZE_MAX as u32) as u16;
                        accepted.push((k.clone(), n.blksize.to_string()));
                    }
                }
            }
            "windowsize" => {
                if let Ok(w) = v.parse::<u32>() {
                    if (1..=65535).contains(&w) {
                        n.windowsize = (w as u16).min(max_window.max(1));
                        accepted.push((k.clone(), n.windowsize.to_string()));
                    }
                }
            }
            "timeout" => {
                if let Ok(t) = v.parse::<u8>() {
                    if (1..=max_timeout).contains(&t) {
                        n.timeout_secs = t;
                        accepted.push((k.clone(), t.to_string()));
                    }
                }
            }
            "tsize" => {
                // The value is filled in by the caller, who knows the file's size.
                n.tsize = true;
                accepted.push((k.clone(), String::new()));
            }
            _ => {}
        }
    }
    (n, accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrq_roundtrip_with_options() {
        let b = rrq(
            "/boot/x",
            "OCTET",
            &[("BLKSIZE", "1468".into()), ("tsize", "0".into())],
        );
        let Packet::Rrq(r) = decode(&b).unwrap() else {
            panic!()
        };
        assert_eq!(r.filename, "/boot/x");
        assert_eq!(r.mode, "octet");
        assert_eq!(
            r.options,
            vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into())
            ]
        );
    }

    #[test]
    fn malformed_packets_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x00",
            b"\x00\x01",
            b"\x00\x01file",
            b"\x00\x01file\x00",
            b"\x00\x01f\x00octet\x00blksize\x00",
            b"\x00\x04\x00",
            b"\x00\x09\x00\x00",
            b"\x00\x01\xff\xfe\x00octet\x00",
        ];
        for c in cases {
            assert!(decode(c).is_err(), "{c:?}");
        }
    }

    #[test]
    fn negotiation_clamps_and_drops() {
        let req = Request {
            filename: "f".into(),
            mode: "octet".into(),
            options: vec![
                ("blksize".into(), "100000".into()),
                ("windowsize".into(), "0".into()),
                ("timeout".into(), "300".into()),
                ("tsize".into(), "0".into()),
                ("multicast".into(), "".into()),
            ],
        };
        let (n, acc) = negotiate(&req, 3, 255, 64);
        assert_eq!(n.blksize, BLKSIZE_MAX);
        assert_eq!(n.windowsize, 1);
        assert_eq!(n.timeout_secs, 3);
        assert!(n.tsize);
        let names: Vec<&str> = acc.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["blksize", "tsize"]);
        let (n, _) = negotiate(
            &Request {
                options: vec![("blksize".into(), "4".into())],
                ..req
            },
            3,
            255,
            64,
        );
        assert_eq!(n.blksize, 512);
    }

    #[test]
    fn repeated_options_are_answered_once() {
        let req = Request {
            filename: "f".into(),
            mode: "octet".into(),
            options: [("blksize", "1468"), ("tsize", "0")]
                .iter()
                .cycle()
                .take(2000)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let (n, acc) = negotiate(&req, 1, 5, 64);
        assert_eq!(n.blksize, 1468);
        let names: Vec<&str> = acc.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["blksize", "tsize"]);
    }

    #[test]
    fn client_timeout_is_capped() {
        let req = |t: &str| Request {
            filename: "f".into(),
            mode: "octet".into(),
            options: vec![("timeout".into(), t.into())],
        };
        // At or below the cap: granted and echoed.
        let (n, acc) = negotiate(&req("5"), 1, 5, 64);
        assert_eq!(n.timeout_secs, 5);
        assert_eq!(acc, vec![("timeout".to_string(), "5".to_string())]);
        // Above it: left out of the OACK, the server's own timeout applies.
        for t in ["6", "255", "0", "-1", "1000"] {
            let (n, acc) = negotiate(&req(t), 1, 5, 64);
            assert_eq!(n.timeout_secs, 1, "{t}");
            assert!(acc.is_empty(), "{t}: {acc:?}");
        }
    }

    #[test]
    fn names_past_the_limit_are_refused() {
        let ok = rrq(&"a".repeat(MAX_NAME), "octet", &[]);
        assert!(matches!(decode(&ok), Ok(Packet::Rrq(_))));
        let long = rrq(&"/".repeat(65_000), "octet", &[]);
        assert_eq!(decode(&long), Err(DecodeError::NameTooLong(65_000)));
    }
}
