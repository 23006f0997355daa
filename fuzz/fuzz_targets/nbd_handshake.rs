#![no_main]
//! Any client bytes from the first one: negotiation (and what follows if it succeeds) must
//! end without a panic.
use libfuzzer_sys::fuzz_target;

#[path = "nbd_common.rs"]
mod nbd_common;

fuzz_target!(|data: &[u8]| {
    nbd_common::session(data.to_vec());
});
