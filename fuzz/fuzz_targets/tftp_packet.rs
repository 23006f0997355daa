#![no_main]
//! Any datagram: decode must return, never panic; what decodes as a request negotiates.
use libfuzzer_sys::fuzz_target;
use ltsp_common::tftp;

fuzz_target!(|data: &[u8]| {
    if let Ok(tftp::Packet::Rrq(r)) = tftp::decode(data) {
        let (n, _) = tftp::negotiate(&r, 1, 5, 64);
        assert!(n.blksize >= tftp::BLKSIZE_MIN && n.blksize <= tftp::BLKSIZE_MAX);
        assert!(n.windowsize >= 1);
    }
});
