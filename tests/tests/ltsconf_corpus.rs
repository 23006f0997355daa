//! Differential test against getltscfg (LTSP5): the committed corpus holds generated
//! lts.conf files (ltsp_tests::ltsconf_gen, fixed seed) with what getltscfg, built from
//! LTSP5's source, printed for each as the client the case names
//! (tests/fixtures/ltsconf-corpus/expect-with-getltscfg.sh wrote them).
//!
//! Where getltscfg read the file cleanly, `ltsp-agent config` must give exactly its values.
//! Where it did not (a syntax error, after which it ignored the rest of the file; a LIKE
//! cycle, on which it never returned; quotes it echoed into its output; keys no shell can
//! assign), we must not differ silently: the difference is reported.

use ltsp_agent::config;
use ltsp_common::cmdline::Cmdline;
use ltsp_common::ltsconf::Identity;
use ltsp_tests::ltsconf_gen::{case, CASES, SEED};
use ltsp_tests::{bin, run, workspace_root};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

struct Expected {
    name: String,
    identity: Identity,
    exit: i32,
    stderr: Vec<String>,
    stdout: Vec<Vec<u8>>,
    lts_conf: Vec<u8>,
}

fn corpus_dir() -> PathBuf {
    workspace_root().join("tests/fixtures/ltsconf-corpus")
}

fn load() -> Vec<Expected> {
    load_from(corpus_dir())
}

fn load_from(dir: PathBuf) -> Vec<Expected> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the corpus directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "case"))
        .collect();
    files.sort();
    files.iter().map(parse_case).collect()
}

fn parse_case(path: &PathBuf) -> Expected {
    let bytes = std::fs::read(path).unwrap();
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let split = bytes
        .windows(10)
        .position(|w| w == b"\nlts.conf\n")
        .unwrap_or_else(|| panic!("{name}: no 'lts.conf' line"));
    let (head, conf) = (&bytes[..split], &bytes[split + 10..]);
    let mut e = Expected {
        name: name.clone(),
        identity: Identity::default(),
        exit: -1,
        stderr: Vec::new(),
        stdout: Vec::new(),
        lts_conf: conf.to_vec(),
    };
    for line in head.split(|&b| b == b'\n') {
        let (tag, rest) = match line.iter().position(|&b| b == b' ') {
            Some(n) => (&line[..n], &line[n + 1..]),
            None => (line, &line[line.len()..]),
        };
        let text = String::from_utf8_lossy(rest).into_owned();
        match tag {
            b"identity" => {
                let f: Vec<&str> = text.split(' ').collect();
                e.identity = Identity {
                    hostname: Some(f[0].into()),
                    ip: Some(f[1].into()),
                    mac: Some(f[2].into()),
                };
            }
            b"getltscfg-exit" => e.exit = text.parse().unwrap(),
            b"err" => e.stderr.push(text),
            b"out" => e.stdout.push(rest.to_vec()),
            _ => panic!("{name}: unknown line {:?}", String::from_utf8_lossy(line)),
        }
    }
    e
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Read without a complaint: our values must be getltscfg's.
    Clean,
    /// Read, but `'` or an unpaired `"` went into its output (it breaks the eval).
    StrayOutput,
    /// Read, but some key is no shell variable name.
    BadKey,
    /// A syntax error: getltscfg ignored the rest of the file.
    SyntaxError,
    /// No result: it crashed (an include line naming a missing file: fclose(NULL)) or
    /// never returned (a LIKE cycle; stopped by the time or memory bound).
    NoResult,
}

/// getltscfg's values, its class, and the keys no shell can assign.
fn theirs(e: &Expected) -> (Class, BTreeMap<String, String>, Vec<String>) {
    let syntax = e.stderr.iter().any(|l| l.contains("syntax error"));
    if syntax {
        // Whether it then returned or not, it read only the part before the error.
        return (Class::SyntaxError, BTreeMap::new(), Vec::new());
    }
    if e.exit != 0 {
        return (Class::NoResult, BTreeMap::new(), Vec::new());
    }
    assert!(
        e.stderr.is_empty(),
        "{}: unexpected stderr {:?}",
        e.name,
        e.stderr
    );
    let mut stray = false;
    let mut values = BTreeMap::new();
    let mut bad = Vec::new();
    for (i, line) in e.stdout.iter().enumerate() {
        let mut line = &line[..];
        if i == 0 {
            // What its lexer echoed comes before the first line.
            let n = line
                .iter()
                .take_while(|b| matches!(b, b'\'' | b'"' | b'#'))
                .count();
            stray = n > 0;
            line = &line[n..];
            if line.is_empty() {
                continue;
            }
        }
        let eq = line
            .iter()
            .position(|&b| b == b'=')
            .unwrap_or_else(|| panic!("{}: output line without '='", e.name));
        let key = String::from_utf8_lossy(&line[..eq]).into_owned();
        let v = &line[eq + 1..];
        assert!(
            v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"',
            "{}",
            e.name
        );
        let value = String::from_utf8_lossy(&v[1..v.len() - 1]).into_owned();
        let shell = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if shell {
            values.insert(key, value);
        } else {
            bad.push(key);
        }
    }
    let class = if stray {
        Class::StrayOutput
    } else if !bad.is_empty() {
        Class::BadKey
    } else {
        Class::Clean
    };
    (class, values, bad)
}

fn ours(e: &Expected) -> (config::NodeConfig, BTreeMap<String, String>) {
    let c = config::resolve(
        Some((&e.name, &e.lts_conf)),
        &Cmdline::default(),
        &e.identity,
    );
    let values = c
        .resolved
        .all()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (c, values)
}

#[test]
fn corpus_is_the_generators_output() {
    let cases = load();
    assert_eq!(cases.len(), CASES, "one .case file per generated case");
    for (i, e) in cases.iter().enumerate() {
        let g = case(SEED, i);
        assert_eq!(e.name, format!("{i:04}"));
        assert!(
            e.lts_conf == g.lts_conf,
            "{}: lts.conf differs from the generator's",
            e.name
        );
        let id = &e.identity;
        assert_eq!(
            (id.hostname.as_deref(), id.ip.as_deref(), id.mac.as_deref()),
            (Some(&*g.hostname), Some(&*g.ip), Some(&*g.mac)),
            "{}",
            e.name
        );
    }
}

#[test]
fn config_gives_getltscfgs_result_or_reports_the_difference() {
    // LTSCONF_CORPUS: another corpus (another seed) made the same way.
    let cases = match std::env::var_os("LTSCONF_CORPUS") {
        Some(dir) => load_from(dir.into()),
        None => load(),
    };
    let mut count: BTreeMap<Class, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for e in &cases {
        let (class, theirs, bad) = theirs(e);
        *count.entry(class).or_default() += 1;
        let (c, ours) = ours(e);
        let ok = match class {
            Class::Clean => ours == theirs,
            // Same values, except where it read a comment on an unterminated last line.
            Class::StrayOutput => {
                let last = e.lts_conf.rsplit(|&b| b == b'\n').next().unwrap_or(&[]);
                !c.warnings.is_empty() && (ours == theirs || last.contains(&b'#'))
            }
            Class::BadKey => {
                ours == theirs
                    && bad.iter().all(|k| {
                        c.problems.iter().any(|p| {
                            p.contains(&format!("key {:?}", k.to_ascii_uppercase()))
                                || p.contains(&format!("key {k:?}"))
                        })
                    })
            }
            // Reported at the latest where getltscfg failed.
            Class::SyntaxError => {
                let their_line = e
                    .stderr
                    .iter()
                    .find_map(|l| l.rsplit_once("line=").and_then(|(_, n)| n.parse().ok()))
                    .unwrap_or(usize::MAX);
                let first = c
                    .problems
                    .iter()
                    .chain(&c.warnings)
                    .filter_map(|p| p.split(':').nth(1).and_then(|n| n.parse::<usize>().ok()))
                    .min();
                first.is_some_and(|l| l <= their_line)
            }
            Class::NoResult => c
                .problems
                .iter()
                .any(|p| p.contains("LIKE cycle") || p.contains("include is not supported")),
        };
        if !ok {
            failures.push(format!(
                "{} ({class:?}):\n  getltscfg {theirs:?}\n  ours      {ours:?}\n  problems {:?}\n  warnings {:?}",
                e.name, c.problems, c.warnings
            ));
        }
    }
    eprintln!("getltscfg differential: {} cases: {count:?}", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // The corpus must keep exercising the equality, not only the reported differences.
    assert!(count[&Class::Clean] * 2 > cases.len(), "{count:?}");
}

/// The command itself, on a few cases: the same values as the library gives.
#[test]
fn the_config_command_prints_the_same() {
    let cases = load();
    for e in cases.iter().take(40) {
        let (class, theirs, _) = theirs(e);
        if class != Class::Clean {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lts.conf");
        std::fs::write(&file, &e.lts_conf).unwrap();
        let id = &e.identity;
        let (_, out, err) = run(Command::new(bin("ltsp-agent"))
            .args(["config", "--lts-conf"])
            .arg(&file)
            .args(["--hostname", id.hostname.as_deref().unwrap()])
            .args(["--ip", id.ip.as_deref().unwrap()])
            .args(["--mac", id.mac.as_deref().unwrap()]));
        // sh evaluates what config printed back into the values.
        let keys: Vec<&String> = theirs.keys().collect();
        let script = keys
            .iter()
            .map(|k| format!("printf '%s\\0%s\\0' {k} \"${k}\"\n"))
            .collect::<String>();
        let (ok, got, _) = run(Command::new("sh").arg("-c").arg(format!("{out}\n{script}")));
        assert!(ok, "{}: {err}", e.name);
        let mut fields = got.split('\0');
        let mut back = BTreeMap::new();
        while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
            back.insert(k.to_string(), v.to_string());
        }
        assert_eq!(back, theirs, "{}: {err}", e.name);
        assert_eq!(out.lines().count(), theirs.len(), "{}: {out}", e.name);
    }
}
