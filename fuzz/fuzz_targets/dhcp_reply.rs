#![no_main]
//! Any frame a hostile DHCP server could send the agent: parsing must return, never panic,
//! and a lease it yields must be usable (a prefix length a netmask can have).
use libfuzzer_sys::fuzz_target;
use ltsp_agent::net::dhcp;

fuzz_target!(|data: &[u8]| {
    if let Some((_, _, lease)) = dhcp::parse_reply(data) {
        assert!(lease.prefix <= 32);
    }
});
