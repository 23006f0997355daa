//! The node's configuration: lts.conf resolved for this client, then `ltsp.KEY=` from the
//! kernel cmdline on top. Problems are collected, never fatal: the boot goes on with what
//! could be read, and the operator commands turn them into a non-zero exit.

use ltsp_common::cmdline::Cmdline;
use ltsp_common::ltsconf::{self, Identity, Resolved};

#[derive(Debug, Default)]
pub struct NodeConfig {
    pub resolved: Resolved,
    /// Parse errors, LIKE problems and cmdline warnings, each a full sentence with a place.
    pub problems: Vec<String>,
}

pub fn resolve(conf: Option<(&str, &str)>, cmdline: &Cmdline, id: &Identity) -> NodeConfig {
    let mut problems: Vec<String> = cmdline
        .warnings
        .iter()
        .map(|w| format!("kernel cmdline: {w}"))
        .collect();
    let mut resolved = match conf {
        Some((name, text)) => {
            let parsed = ltsconf::parse(name, text);
            problems.extend(parsed.errors.iter().map(|e| e.to_string()));
            let r = parsed.resolve(id);
            problems.extend(r.problems.iter().map(|p| p.to_string()));
            r
        }
        None => Resolved::default(),
    };
    for (k, v) in &cmdline.overrides {
        resolved.set_override(k, v);
    }
    NodeConfig { resolved, problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_overrides_win_and_problems_are_kept() {
        let c = Cmdline::parse("ltsp.HOSTNAME=from-cmdline ltsp.SOUND=none ltsp.timeout=x");
        let n = resolve(
            Some((
                "lts.conf",
                "[default]\nHOSTNAME = file\nSOUND = True\nbroken line\n",
            )),
            &c,
            &Identity::default(),
        );
        assert_eq!(n.resolved.get("HOSTNAME"), Some("from-cmdline"));
        assert_eq!(n.resolved.get("SOUND"), None);
        assert_eq!(n.problems.len(), 2, "{:?}", n.problems);
        assert!(n.problems[0].starts_with("kernel cmdline: ltsp.timeout=x"));
        assert!(n.problems[1].starts_with("lts.conf:4:1: "));
    }
}
