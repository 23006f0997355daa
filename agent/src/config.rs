//! The node's configuration: lts.conf resolved for this client, then `ltsp.KEY=` from the
//! kernel cmdline on top. Problems are collected, never fatal: the boot goes on with what
//! could be read, and the operator commands turn them into a non-zero exit. Warnings (a
//! line read, but not as written or not as getltscfg read it) are shown, not fatal.

use ltsp_common::cmdline::Cmdline;
use ltsp_common::ltsconf::{self, Identity, Resolved};

#[derive(Debug, Default)]
pub struct NodeConfig {
    pub resolved: Resolved,
    /// Parse errors, LIKE problems and cmdline warnings, each a full sentence with a place.
    pub problems: Vec<String>,
    /// lts.conf lines read with a change (invalid UTF-8 replaced, a stray quote dropped...).
    pub warnings: Vec<String>,
}

/// `conf`: the file's name (for messages) and its bytes.
pub fn resolve(conf: Option<(&str, &[u8])>, cmdline: &Cmdline, id: &Identity) -> NodeConfig {
    let mut problems: Vec<String> = cmdline
        .warnings
        .iter()
        .map(|w| format!("kernel cmdline: {w}"))
        .collect();
    let mut warnings = Vec::new();
    let mut resolved = match conf {
        Some((name, bytes)) => {
            let parsed = ltsconf::parse(name, bytes);
            problems.extend(parsed.errors.iter().map(|e| e.to_string()));
            warnings.extend(parsed.warnings.iter().map(|e| e.to_string()));
            let r = parsed.resolve(id);
            problems.extend(r.problems.iter().map(|p| p.to_string()));
            r
        }
        None => Resolved::default(),
    };
    for (k, v) in &cmdline.overrides {
        resolved.set_override(k, v);
    }
    NodeConfig {
        resolved,
        problems,
        warnings,
    }
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
                b"[default]\nHOSTNAME = file\nSOUND = True\nbroken line\nC = caf\xe9\n",
            )),
            &c,
            &Identity::default(),
        );
        assert_eq!(n.resolved.get("HOSTNAME"), Some("from-cmdline"));
        assert_eq!(n.resolved.get("SOUND"), None);
        assert_eq!(n.problems.len(), 2, "{:?}", n.problems);
        assert!(n.problems[0].starts_with("kernel cmdline: ltsp.timeout=x"));
        assert!(n.problems[1].starts_with("lts.conf:4:1: "));
        // A Latin-1 byte costs a warning, not the file.
        assert_eq!(n.warnings.len(), 1, "{:?}", n.warnings);
        assert!(n.warnings[0].starts_with("lts.conf:5:8: invalid UTF-8"));
        assert_eq!(n.resolved.get("C"), Some("caf\u{fffd}"));
    }
}
