#![no_main]
//! A valid negotiation (fixed newstyle, no zeroes, EXPORT_NAME "root"), then any bytes as
//! the transmission phase: requests, payloads, garbage.
use libfuzzer_sys::fuzz_target;
use ltsp_common::nbd as w;

#[path = "nbd_common.rs"]
mod nbd_common;

fuzz_target!(|data: &[u8]| {
    let mut b = (w::CLIENT_FIXED_NEWSTYLE | w::CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    b.extend_from_slice(&w::option_header(w::OPT_EXPORT_NAME, 4));
    b.extend_from_slice(b"root");
    b.extend_from_slice(data);
    nbd_common::session(b);
});
