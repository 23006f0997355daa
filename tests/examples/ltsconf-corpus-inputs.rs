//! Writes the differential corpus's inputs: DIR/NNNN.conf (the lts.conf) and DIR/NNNN.id
//! ("hostname ip mac"), for a reference resolver (getltscfg) to be run on.
//! Usage: ltsconf-corpus-inputs DIR
use ltsp_tests::ltsconf_gen::{case, CASES, SEED};

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: ltsconf-corpus-inputs DIR");
    std::fs::create_dir_all(&dir).expect("create DIR");
    for i in 0..CASES {
        let c = case(SEED, i);
        std::fs::write(format!("{dir}/{i:04}.conf"), &c.lts_conf).expect("write .conf");
        std::fs::write(
            format!("{dir}/{i:04}.id"),
            format!("{} {} {}\n", c.hostname, c.ip, c.mac),
        )
        .expect("write .id");
    }
}
