//! The DHCPv4 wire checks made before a datagram reaches dhcproto. dhcproto (0.15) trusts
//! several fields of the packet itself: `Message::chaddr()` slices 16 bytes by the
//! packet's `hlen` (a panic for hlen > 16), and some option decoders assert a length
//! (`debug_assert!`) or subtract from it (options 80, 81, 94, 151-155). Both server modes
//! and the agent's client call [`check`] first, so no datagram from the network can make
//! dhcproto panic.

/// BOOTP header up to and including the magic cookie (RFC 2131 §3).
pub const HEADER_LEN: usize = 240;
/// The DHCP magic cookie at offset 236.
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// Longest chaddr: its field is 16 bytes.
pub const MAX_HLEN: u8 = 16;

pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("{0} bytes: shorter than a BOOTP header with magic cookie (240)")]
    Short(usize),
    #[error("op {0}: not the expected BOOTREQUEST/BOOTREPLY")]
    Op(u8),
    #[error("hlen {0}: over the 16 bytes of chaddr")]
    Hlen(u8),
    #[error("no DHCP magic cookie")]
    Magic,
    #[error("option {code} at offset {at}: its length runs past the datagram")]
    Truncated { code: u8, at: usize },
    #[error("option {code}: length {len} where its format allows {expected}")]
    OptionLength {
        code: u8,
        len: usize,
        expected: &'static str,
    },
}

/// Lengths dhcproto asserts or subtracts from, for the value of one option (after
/// RFC 3396 concatenation of adjacent same-code options, as dhcproto does it).
fn length_ok(code: u8, len: usize) -> Result<(), &'static str> {
    let ok = match code {
        // Rapid commit: empty.
        80 => len == 0,
        // Client FQDN: flags, rcode1, rcode2, then the name.
        81 => len >= 3,
        // Client network interface identifier: type, major, minor.
        94 => len == 3,
        // Bulk leasequery status code: the code byte, then a message.
        151 => len >= 1,
        // Bulk leasequery times: 32 bits each.
        152..=155 => len == 4,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(match code {
            80 => "0",
            81 => ">= 3",
            94 => "3",
            151 => ">= 1",
            _ => "4",
        })
    }
}

/// Checks a DHCP datagram before it is decoded: the opcode is `op`, hlen fits chaddr,
/// the magic cookie is there, every option lies inside the datagram, and the options whose
/// decoding asserts a length have that length.
pub fn check(datagram: &[u8], op: u8) -> Result<(), Malformed> {
    if datagram.len() < HEADER_LEN {
        return Err(Malformed::Short(datagram.len()));
    }
    if datagram[0] != op {
        return Err(Malformed::Op(datagram[0]));
    }
    if datagram[2] > MAX_HLEN {
        return Err(Malformed::Hlen(datagram[2]));
    }
    if datagram[236..240] != MAGIC {
        return Err(Malformed::Magic);
    }
    // Walk the options as dhcproto does: pad and end have no length; adjacent options of
    // one code are one value (RFC 3396); anything after End is ignored.
    let opts = &datagram[HEADER_LEN..];
    let mut at = 0;
    // (code, total length) of the run of same-code options being read.
    let mut run: Option<(u8, usize)> = None;
    let close = |run: Option<(u8, usize)>| -> Result<(), Malformed> {
        match run {
            Some((code, len)) => length_ok(code, len).map_err(|expected| Malformed::OptionLength {
                code,
                len,
                expected,
            }),
            None => Ok(()),
        }
    };
    while at < opts.len() {
        let code = opts[at];
        if code == 0 || code == 255 {
            close(run.take())?;
            if code == 255 {
                return Ok(());
            }
            at += 1;
            continue;
        }
        let Some(&len) = opts.get(at + 1) else {
            return Err(Malformed::Truncated {
                code,
                at: HEADER_LEN + at,
            });
        };
        let len = len as usize;
        if at + 2 + len > opts.len() {
            return Err(Malformed::Truncated {
                code,
                at: HEADER_LEN + at,
            });
        }
        run = match run {
            Some((c, total)) if c == code => Some((c, total + len)),
            other => {
                close(other)?;
                Some((code, len))
            }
        };
        at += 2 + len;
    }
    close(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(op: u8, hlen: u8, opts: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HEADER_LEN];
        p[0] = op;
        p[1] = 1;
        p[2] = hlen;
        p[236..240].copy_from_slice(&MAGIC);
        p.extend_from_slice(opts);
        p
    }

    #[test]
    fn a_plain_discover_passes() {
        let p = packet(BOOTREQUEST, 6, &[53, 1, 1, 0, 0, 255]);
        assert_eq!(check(&p, BOOTREQUEST), Ok(()));
        assert_eq!(check(&p, BOOTREPLY), Err(Malformed::Op(1)));
    }

    #[test]
    fn header_fields_dhcproto_trusts_are_refused() {
        assert_eq!(
            check(&packet(BOOTREQUEST, 200, &[255]), BOOTREQUEST),
            Err(Malformed::Hlen(200))
        );
        assert_eq!(
            check(&packet(BOOTREQUEST, 17, &[255]), BOOTREQUEST),
            Err(Malformed::Hlen(17))
        );
        assert_eq!(check(&packet(BOOTREQUEST, 16, &[255]), BOOTREQUEST), Ok(()));
        let mut p = packet(BOOTREQUEST, 6, &[255]);
        p[236] = 0;
        assert_eq!(check(&p, BOOTREQUEST), Err(Malformed::Magic));
        assert_eq!(check(&p[..239], BOOTREQUEST), Err(Malformed::Short(239)));
    }

    #[test]
    fn options_must_fit_and_have_the_lengths_dhcproto_asserts() {
        let r = |opts: &[u8]| check(&packet(BOOTREQUEST, 6, opts), BOOTREQUEST);
        assert!(matches!(
            r(&[53, 5, 1]),
            Err(Malformed::Truncated { code: 53, .. })
        ));
        assert!(matches!(r(&[53]), Err(Malformed::Truncated { .. })));
        assert!(matches!(
            r(&[94, 2, 1, 2, 255]),
            Err(Malformed::OptionLength { code: 94, .. })
        ));
        assert_eq!(r(&[94, 3, 1, 2, 0, 255]), Ok(()));
        // Two adjacent option-94 parts make one 6-byte value for dhcproto.
        assert!(matches!(
            r(&[94, 3, 1, 2, 0, 94, 3, 1, 2, 0, 255]),
            Err(Malformed::OptionLength {
                code: 94,
                len: 6,
                ..
            })
        ));
        // A pad between them keeps them apart.
        assert_eq!(r(&[94, 3, 1, 2, 0, 0, 94, 3, 1, 2, 0, 255]), Ok(()));
        assert!(matches!(
            r(&[151, 0, 255]),
            Err(Malformed::OptionLength { code: 151, .. })
        ));
        assert!(matches!(
            r(&[80, 1, 0, 255]),
            Err(Malformed::OptionLength { code: 80, .. })
        ));
        assert!(matches!(
            r(&[81, 2, 0, 0, 255]),
            Err(Malformed::OptionLength { code: 81, .. })
        ));
        assert!(matches!(
            r(&[153, 3, 0, 0, 0]),
            Err(Malformed::OptionLength { code: 153, .. })
        ));
        // After End, nothing counts.
        assert_eq!(r(&[255, 94, 9]), Ok(()));
        // No End at all is tolerated if every option fits.
        assert_eq!(r(&[53, 1, 1]), Ok(()));
    }
}
