//! Every parser on many generated inputs: they return (value or error), never panic or
//! hang. Deterministic (xorshift), so a failure reproduces; the cargo-fuzz targets in
//! fuzz/ explore further with coverage guidance.

use ltsp_common::{cmdline, ltsconf, nbd, tftp};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[(self.next() % v.len() as u64) as usize]
    }
}

/// Text built from the fragments that matter to each grammar, in random order.
fn text(r: &mut Rng, pieces: &[&str]) -> String {
    let n = r.next() % 40;
    (0..n).map(|_| r.pick(pieces)).collect()
}

#[test]
fn lts_conf_and_cmdline_never_panic() {
    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let conf = [
        "[",
        "]",
        "default",
        "node*",
        "LIKE",
        " = ",
        "=",
        "\"",
        "#",
        "\n",
        "\t",
        "NONE",
        "a",
        "[x]\nLIKE = y\n",
        "[y]\nLIKE = x\n",
        "RCFILE_1",
        "é",
        "\r\n",
        "[!a-",
        "*?",
        "'",
        "include ",
        "\\",
        "[[:digit:]",
        "\"K\" = ",
    ];
    let cmd = [
        "root=",
        "/dev/nbd0 ",
        "nbdroot=",
        "[",
        "]",
        ":",
        "/",
        ",",
        "nbd://",
        "ip=",
        "::::",
        "dhcp",
        "\"",
        " ",
        "--",
        "ltsp.",
        "=",
        "BOOTIF=01-",
        "aa-",
        "on-failure",
        "reboot:",
        "9999999999999999999999",
        "break=",
        "é",
    ];
    for _ in 0..20_000 {
        let t = text(&mut r, &conf);
        // As bytes too: a fragment cut anywhere, a stray Latin-1 byte, a byte-order mark.
        let mut b = t.clone().into_bytes();
        if !b.is_empty() {
            let at = (r.next() % b.len() as u64) as usize;
            b.insert(at, [0xe9, 0xef, 0xbb, 0xbf, b'\r', 0][at % 6]);
            let _ = ltsconf::parse("gen", &b[..at]).resolve(&Default::default());
        }
        let _ = ltsconf::parse("gen", &b);
        let c = ltsconf::parse("gen", &t);
        let id = ltsconf::Identity {
            hostname: Some("x".into()),
            ip: Some("192.0.2.1".into()),
            mac: Some("aa:bb:cc:dd:ee:ff".into()),
        };
        let res = c.resolve(&id);
        let _ = res.to_shell();
        let line = text(&mut r, &cmd);
        let p = cmdline::Cmdline::parse(&line);
        let _ = p.nbd_targets(None);
    }
}

#[test]
fn wire_decoders_never_panic() {
    let mut r = Rng(42);
    for _ in 0..200_000 {
        let len = (r.next() % 64) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
        if len >= 2 && r.next().is_multiple_of(2) {
            b[0] = 0;
            b[1] = (r.next() % 7) as u8; // a plausible opcode
        }
        if let Ok(tftp::Packet::Rrq(req)) = tftp::decode(&b) {
            let _ = tftp::negotiate(&req, 1, 5, 64);
        }
        let _ = nbd::parse_info_request(&b);
        let mut info = nbd::ExportInfo::default();
        let _ = nbd::apply_info_reply(&mut info, &b);
        if b.len() >= nbd::REQUEST_LEN {
            let _ = nbd::parse_request(b[..nbd::REQUEST_LEN].try_into().unwrap());
        }
    }
}
