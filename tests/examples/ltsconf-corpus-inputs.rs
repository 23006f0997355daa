//! Writes the differential corpus's inputs: DIR/NNNN.conf (the lts.conf) and DIR/NNNN.id
//! ("hostname ip mac"), for a reference resolver (getltscfg) to be run on.
//! Usage: ltsconf-corpus-inputs DIR [SEED [COUNT]] (defaults: the committed corpus's).
//! Another seed gives a fresh corpus; LTSCONF_CORPUS=DIR runs the differential test on it.
use ltsp_tests::ltsconf_gen::{case, CASES, SEED};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .expect("usage: ltsconf-corpus-inputs DIR [SEED [COUNT]]");
    let seed = args
        .get(2)
        .map_or(SEED, |s| s.parse().expect("SEED: a number"));
    let count = args
        .get(3)
        .map_or(CASES, |s| s.parse().expect("COUNT: a number"));
    std::fs::create_dir_all(dir).expect("create DIR");
    for i in 0..count {
        let c = case(seed, i);
        std::fs::write(format!("{dir}/{i:04}.conf"), &c.lts_conf).expect("write .conf");
        std::fs::write(
            format!("{dir}/{i:04}.id"),
            format!("{} {} {}\n", c.hostname, c.ip, c.mac),
        )
        .expect("write .id");
    }
}
