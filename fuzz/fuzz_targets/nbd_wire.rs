#![no_main]
//! Option headers, INFO/GO payloads, requests and info replies from arbitrary bytes.
use libfuzzer_sys::fuzz_target;
use ltsp_common::nbd;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 16 {
        let _ = nbd::parse_option_header(data[..16].try_into().unwrap());
    }
    if data.len() >= nbd::REQUEST_LEN {
        if let Ok(r) = nbd::parse_request(data[..nbd::REQUEST_LEN].try_into().unwrap()) {
            assert_eq!(nbd::parse_request(&nbd::encode_request(&r)), Ok(r));
        }
    }
    if let Ok(req) = nbd::parse_info_request(data) {
        assert_eq!(nbd::info_request(&req.name, &req.requests), data);
    }
    let mut info = nbd::ExportInfo::default();
    let _ = nbd::apply_info_reply(&mut info, data);
});
