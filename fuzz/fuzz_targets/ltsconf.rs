#![no_main]
//! Any bytes: parsing and resolving return (LIKE cycles included), never panic or hang.
use libfuzzer_sys::fuzz_target;
use ltsp_common::ltsconf::{self, Identity};

fuzz_target!(|data: &[u8]| {
    let conf = ltsconf::parse("fuzz", data);
    let id = Identity { hostname: Some("n1".into()), ip: Some("192.0.2.1".into()), mac: Some("52:54:00:12:34:56".into()) };
    let r = conf.resolve(&id);
    let _ = r.to_shell();
    let _ = r.list("RCFILE_");
});
