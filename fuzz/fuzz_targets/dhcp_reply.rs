#![no_main]
//! Any frame a hostile DHCP server could send the agent, through the very function its
//! client loop calls (`dhcp::parse_reply`): it returns, never panics, and a lease it
//! accepts is one a node can configure. The transaction and MAC are taken from the frame
//! itself, so the fuzzer reaches past the "not ours" check without guessing them.
use libfuzzer_sys::fuzz_target;
use ltsp_agent::net::dhcp::{self, Lease, Reply};
use std::net::Ipv4Addr;

fn host(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] != 0 && o[0] != 127 && o[0] < 224
}

fn quotable(s: &Option<String>) -> bool {
    s.as_deref()
        .map_or(true, |s| s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\''))
}

fn check(l: &Lease) {
    assert!((1..=32).contains(&l.prefix));
    assert!(host(l.ip));
    assert!(l.router.map_or(true, |r| host(r) && r != l.ip));
    assert!(l.dns.len() <= 3 && l.dns.iter().all(|&d| host(d)));
    assert!(l.next_server.map_or(true, host));
    for s in [&l.hostname, &l.domain, &l.root_path, &l.bootfile] {
        assert!(quotable(s));
    }
}

fuzz_target!(|data: &[u8]| {
    let (xid, mac) = match dhcp::unframe(data) {
        Some(p) if p.len() >= 34 => (
            u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
            [p[28], p[29], p[30], p[31], p[32], p[33]],
        ),
        _ => (0, [0; 6]),
    };
    match dhcp::parse_reply(data, xid, &mac) {
        Ok(Reply::Offer(l) | Reply::Ack(l)) => check(&l),
        Ok(Reply::Nak(_)) | Err(_) => {}
    }
});
