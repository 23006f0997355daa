//! The NBD wire format (NetworkBlockDevice/nbd doc/proto.md), fixed newstyle negotiation and
//! simple replies. Pure encoders and decoders: the server and the agent do the I/O.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// NBD_INFO_* in INFO/GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Errors in simple replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOTSUP: u32 = 95;

/// The largest option payload a server reads; longer ones are hostile or broken.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The largest READ the server answers (the kernel sends at most max_sectors, well below).
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;

/// The first 18 bytes a fixed-newstyle server sends.
pub fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("option length {0} is over the limit of {MAX_OPTION_LEN}")]
    OptionTooLong(u32),
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
}

/// Decodes the 16-byte header of a client option.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, WireError> {
    let magic = u64::from_be_bytes(b[..8].try_into().unwrap());
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(b[12..16].try_into().unwrap());
    Ok(OptionHeader { option, len })
}

pub fn option_header(option: u32, len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply: header and payload in one buffer.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

pub fn parse_option_reply_header(b: &[u8; 20]) -> Result<OptionReplyHeader, WireError> {
    let magic = u64::from_be_bytes(b[..8].try_into().unwrap());
    if magic != OPT_REPLY_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionReplyHeader {
        option: u32::from_be_bytes(b[8..12].try_into().unwrap()),
        reply: u32::from_be_bytes(b[12..16].try_into().unwrap()),
        len: u32::from_be_bytes(b[16..20].try_into().unwrap()),
    })
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO: export name and the info types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, WireError> {
    let take = |d: &[u8], n: usize| -> Result<(), WireError> {
        if d.len() < n {
            Err(WireError::Malformed(
                "INFO/GO payload shorter than its lengths",
            ))
        } else {
            Ok(())
        }
    };
    take(data, 4)?;
    let nlen = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    take(&data[4..], nlen.saturating_add(2))?;
    let name = std::str::from_utf8(&data[4..4 + nlen])
        .map_err(|_| WireError::Malformed("export name is not UTF-8"))?
        .to_string();
    let rest = &data[4 + nlen..];
    let n = u16::from_be_bytes(rest[..2].try_into().unwrap()) as usize;
    let rest = &rest[2..];
    if rest.len() != n * 2 {
        return Err(WireError::Malformed(
            "INFO/GO request count does not match its length",
        ));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

pub fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(6 + name.len() + requests.len() * 2);
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_LEN: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, WireError> {
    let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

pub const SIMPLE_REPLY_LEN: usize = 16;

pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// What a client learnt about an export in the handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub description: Option<String>,
    pub block_size: Option<(u32, u32, u32)>,
}

/// How ltsp-server's export descriptions begin.
pub const LTSP_DESCRIPTION: &str = "ltsp-rs image ";

impl ExportInfo {
    /// What identifies the image's bytes: ltsp-server's `id=` content hash in the
    /// description, else the whole description (other servers), else nothing. An
    /// ltsp-server description without `id=` (still hashing, or failed) is no identity.
    pub fn identity(&self) -> Option<&str> {
        let d = self.description.as_deref()?;
        match d.split_whitespace().find_map(|w| w.strip_prefix("id=")) {
            Some(id) => Some(id),
            None if d.starts_with(LTSP_DESCRIPTION) => None,
            None => Some(d),
        }
    }

    /// ltsp-server's `hashing=NN%`: the identity is being computed; ask again shortly.
    pub fn hashing(&self) -> Option<&str> {
        let d = self.description.as_deref()?;
        if !d.starts_with(LTSP_DESCRIPTION) {
            return None;
        }
        d.split_whitespace()
            .find_map(|w| w.strip_prefix("hashing="))
    }
}

/// Applies one NBD_REP_INFO payload to `info`; unknown info types are skipped.
pub fn apply_info_reply(info: &mut ExportInfo, data: &[u8]) -> Result<(), WireError> {
    if data.len() < 2 {
        return Err(WireError::Malformed("INFO reply without a type"));
    }
    let kind = u16::from_be_bytes([data[0], data[1]]);
    let d = &data[2..];
    match kind {
        INFO_EXPORT => {
            if d.len() != 10 {
                return Err(WireError::Malformed("NBD_INFO_EXPORT is not 12 bytes"));
            }
            info.size = u64::from_be_bytes(d[..8].try_into().unwrap());
            info.flags = u16::from_be_bytes([d[8], d[9]]);
        }
        INFO_DESCRIPTION => info.description = Some(String::from_utf8_lossy(d).into_owned()),
        INFO_BLOCK_SIZE if d.len() == 12 => {
            let g = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
            info.block_size = Some((g(0), g(4), g(8)));
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_is_the_content_hash_when_there_is_one() {
        let mut i = super::ExportInfo::default();
        assert_eq!(i.identity(), None);
        i.description = Some("some other server's words".into());
        assert_eq!(i.identity(), Some("some other server's words"));
        i.description = Some("ltsp-rs image root size=512 id=blake3:ab12".into());
        assert_eq!(i.identity(), Some("blake3:ab12"));
        assert_eq!(i.hashing(), None);
        i.description = Some("ltsp-rs image root size=512 hashing=42%".into());
        assert_eq!(i.identity(), None, "no identity yet");
        assert_eq!(i.hashing(), Some("42%"));
        i.description = Some("other server hashing=1%".into());
        assert_eq!(i.hashing(), None, "only ltsp-server's word counts");
    }

    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: 1,
            kind: CMD_READ,
            cookie: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        let mut bad = encode_request(&r);
        bad[0] ^= 1;
        assert!(matches!(parse_request(&bad), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn info_request_roundtrip_and_truncation() {
        let b = info_request("img", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(
            parse_info_request(&b),
            Ok(InfoRequest {
                name: "img".into(),
                requests: vec![INFO_NAME, INFO_BLOCK_SIZE]
            })
        );
        for cut in 0..b.len() {
            assert!(parse_info_request(&b[..cut]).is_err(), "cut at {cut}");
        }
        // A name length that overflows the payload must not panic.
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&huge).is_err());
    }

    #[test]
    fn option_reply_layout() {
        let r = option_reply(OPT_GO, REP_ACK, b"");
        assert_eq!(r.len(), 20);
        let h = parse_option_reply_header(r[..20].try_into().unwrap()).unwrap();
        assert_eq!((h.option, h.reply, h.len), (OPT_GO, REP_ACK, 0));
        let mut info = ExportInfo::default();
        apply_info_reply(
            &mut info,
            &info_export(1 << 30, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY),
        )
        .unwrap();
        assert_eq!(info.size, 1 << 30);
        assert_eq!(info.flags, 3);
    }
}
