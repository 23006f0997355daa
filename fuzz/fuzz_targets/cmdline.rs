#![no_main]
//! Any kernel command line: parsed into options and warnings, never a panic.
use libfuzzer_sys::fuzz_target;
use ltsp_common::cmdline::Cmdline;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let c = Cmdline::parse(&text);
    let _ = c.nbd_targets(Some("192.0.2.1"));
    let _ = c.wants_network_root();
});
