//! `lts.conf` as LTSP5's `getltscfg` read it: a tolerant parser that reports every bad line
//! with its position, and the resolver that picks the sections that apply to one client.
//!
//! Parsing never gives up on the first error: a node must boot on what could be read, so
//! [`parse`] returns the sections it understood together with the errors it met.

use std::collections::BTreeMap;
use std::fmt;

/// One `KEY = value` line. `value == None` is the `NONE` value, which unsets the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Option<String>,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Lower-cased, trimmed name as written between the brackets.
    pub name: String,
    pub line: usize,
    pub entries: Vec<Entry>,
}

impl Section {
    /// The section's own value for `key` (last duplicate wins); `Some(None)` means `NONE`.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key.eq_ignore_ascii_case(key))
            .map(|e| e.value.as_deref())
    }

    /// The line of the LIKE that applies (the last one), else the header's.
    fn like_line(&self) -> usize {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key == "LIKE")
            .map_or(self.line, |e| e.line)
    }

    fn is_glob(&self) -> bool {
        self.name.contains(['*', '?', '['])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ParseError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The sections understood, in file order, and every error met on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LtsConf {
    pub file: String,
    pub sections: Vec<Section>,
    pub errors: Vec<ParseError>,
}

/// Parses `text`; `file` only labels error messages.
pub fn parse(file: &str, text: &str) -> LtsConf {
    let mut conf = LtsConf {
        file: file.to_string(),
        ..Default::default()
    };
    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let mut err = |column: usize, message: String| {
            conf.errors.push(ParseError {
                file: file.to_string(),
                line: line_no,
                column,
                message,
            })
        };
        let body = line.trim_start();
        let indent = line.len() - body.len();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        if let Some(rest) = body.strip_prefix('[') {
            let Some(close) = rest.find(']') else {
                err(indent + 1, "section header: expected ']'".into());
                continue;
            };
            let name = rest[..close].trim();
            let after = rest[close + 1..].trim_start();
            if name.is_empty() {
                err(
                    indent + 1,
                    "section header: expected a name between '[' and ']'".into(),
                );
                continue;
            }
            if !after.is_empty() && !after.starts_with('#') {
                let col = line.len() - after.len() + 1;
                err(
                    col,
                    format!("expected end of line after section header, found {after:?}"),
                );
                continue;
            }
            conf.sections.push(Section {
                name: name.to_ascii_lowercase(),
                line: line_no,
                entries: Vec::new(),
            });
            continue;
        }
        let Some(eq) = body.find('=') else {
            err(
                indent + 1,
                "expected 'KEY = value' or a [section] header".into(),
            );
            continue;
        };
        let key = body[..eq].trim();
        if key.is_empty() {
            err(indent + 1, "expected a key before '='".into());
            continue;
        }
        if let Some(bad) = key.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            err(
                indent + bad + 1,
                format!("key {key:?}: expected only letters, digits and '_'"),
            );
            continue;
        }
        let value_start = indent + eq + 1;
        let value = match parse_value(&line[value_start..]) {
            Ok(v) => v,
            Err((offset, message)) => {
                err(value_start + offset + 1, message);
                continue;
            }
        };
        let Some(section) = conf.sections.last_mut() else {
            err(
                indent + 1,
                format!("key {key} before any section: expected a [section] header first"),
            );
            continue;
        };
        let value = if value.eq_ignore_ascii_case("none") {
            None
        } else {
            Some(value)
        };
        section.entries.push(Entry {
            key: key.to_ascii_uppercase(),
            value,
            line: line_no,
        });
    }
    conf
}

/// The text after `=`. A double quote opens a value that runs to the last quote on the line;
/// `#` starts a comment only outside quotes. Errors carry the byte offset into `text`.
fn parse_value(text: &str) -> Result<String, (usize, String)> {
    let lead = text.len() - text.trim_start().len();
    let body = &text[lead..];
    if let Some(inner) = body.strip_prefix('"') {
        let Some(last) = inner.rfind('"') else {
            return Err((
                lead,
                "unterminated double quote: expected a closing '\"'".into(),
            ));
        };
        let after = inner[last + 1..].trim_start();
        if !after.is_empty() && !after.starts_with('#') {
            let off = text.len() - after.len();
            return Err((
                off,
                format!("expected end of line after closing quote, found {after:?}"),
            ));
        }
        return Ok(inner[..last].to_string());
    }
    // Unquoted: quotes inside keep '#' literal between the first and the last of them.
    let first_q = body.find('"');
    let last_q = body.rfind('"');
    let comment = body.char_indices().find(|&(i, c)| {
        c == '#'
            && match (first_q, last_q) {
                (Some(f), Some(l)) => i < f || i > l,
                _ => true,
            }
    });
    let end = comment.map_or(body.len(), |(i, _)| i);
    Ok(body[..end].trim_end().to_string())
}

/// Who the client is, as the resolver matches sections against it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub hostname: Option<String>,
    pub ip: Option<String>,
    /// Any case, `:` or `-` separated; normalised to lowercase `aa:bb:..`.
    pub mac: Option<String>,
}

impl Identity {
    fn names(&self) -> Vec<String> {
        [
            self.hostname.clone(),
            self.ip.clone(),
            self.mac.as_deref().map(normalise_mac),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .map(|s| s.to_ascii_lowercase())
        .collect()
    }
}

pub fn normalise_mac(mac: &str) -> String {
    mac.trim().replace('-', ":").to_ascii_lowercase()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{file}:{line}: LIKE cycle {chain}: the section is not applied twice")]
    LikeCycle {
        file: String,
        line: usize,
        chain: String,
    },
    #[error("{file}:{line}: LIKE = {target}: no section [{target}] in the file")]
    LikeMissing {
        file: String,
        line: usize,
        target: String,
    },
}

/// The configuration that applies to one client: earliest section wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Upper-cased key to value; keys unset by `NONE` are absent.
    values: BTreeMap<String, String>,
    /// The sections applied, earliest (strongest) first.
    pub sections: Vec<String>,
    pub problems: Vec<ResolveError>,
}

impl Resolved {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(&key.to_ascii_uppercase())
            .map(String::as_str)
    }

    /// `ltsp.KEY=value` on the cmdline: wins over every section; `NONE` unsets.
    pub fn set_override(&mut self, key: &str, value: &str) {
        let key = key.to_ascii_uppercase();
        if value.eq_ignore_ascii_case("none") {
            self.values.remove(&key);
        } else {
            self.values.insert(key, value.to_string());
        }
    }

    /// Values of every key starting with `prefix`, in natural order of the full key
    /// (`_2` before `_10`, as `sort -V`).
    pub fn list(&self, prefix: &str) -> Vec<(&str, &str)> {
        let prefix = prefix.to_ascii_uppercase();
        let mut items: Vec<(&str, &str)> = self
            .values
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        items.sort_by(|a, b| natural_cmp(a.0, b.0));
        items
    }

    /// Every key and value, natural key order.
    pub fn all(&self) -> Vec<(&str, &str)> {
        self.list("")
    }

    /// `KEY="value"` lines that a POSIX shell can `eval`, as `getltscfg -a` printed.
    pub fn to_shell(&self) -> String {
        self.all()
            .into_iter()
            .map(|(k, v)| format!("{k}=\"{}\"\n", shell_escape_dq(v)))
            .collect()
    }
}

/// Escapes what is special inside a double-quoted POSIX shell word.
pub fn shell_escape_dq(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl LtsConf {
    fn find(&self, name: &str) -> Option<&Section> {
        let name = name.to_ascii_lowercase();
        self.sections.iter().find(|s| s.name == name)
    }

    /// Entries of every section named `name` (a name may appear twice; later lines win).
    fn merged(&self, name: &str) -> Section {
        let name = name.to_ascii_lowercase();
        let mut merged = Section {
            name: name.clone(),
            line: 0,
            entries: Vec::new(),
        };
        for s in self.sections.iter().filter(|s| s.name == name) {
            if merged.line == 0 {
                merged.line = s.line;
            }
            merged.entries.extend(s.entries.iter().cloned());
        }
        merged
    }

    /// The sections that apply to `id`, in LTSP5's order, and the values they give.
    pub fn resolve(&self, id: &Identity) -> Resolved {
        let mut order: Vec<String> = Vec::new();
        let mut problems = Vec::new();
        let names = id.names();

        // One exact section: hostname, else IP, else MAC.
        if let Some(exact) = names
            .iter()
            .find(|n| self.find(n).is_some_and(|s| !s.is_glob()))
        {
            self.follow(exact, &mut Vec::new(), &mut order, &mut problems);
        }
        // The first glob section per identity.
        for n in &names {
            if let Some(g) = self
                .sections
                .iter()
                .find(|s| s.is_glob() && s.name != "default" && glob_match(&s.name, n))
            {
                let g = g.name.clone();
                self.follow(&g, &mut Vec::new(), &mut order, &mut problems);
            }
        }
        if self.find("default").is_some() {
            self.follow("default", &mut Vec::new(), &mut order, &mut problems);
        }

        let merged: Vec<Section> = order.iter().map(|n| self.merged(n)).collect();
        let mut values = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        for s in &merged {
            // Walk backwards so a later duplicate inside one section wins.
            for e in s.entries.iter().rev() {
                if e.key == "LIKE" || !seen.insert(e.key.clone()) {
                    continue;
                }
                if let Some(v) = &e.value {
                    values.insert(e.key.clone(), v.clone());
                }
            }
        }
        Resolved {
            values,
            sections: order,
            problems,
        }
    }

    /// Adds `name` then, depth first, the sections its LIKE names. `stack` is the current
    /// LIKE path: meeting a name on it again is a cycle, reported and cut.
    fn follow(
        &self,
        name: &str,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
        problems: &mut Vec<ResolveError>,
    ) {
        let name = name.to_ascii_lowercase();
        if stack.contains(&name) {
            let section = self.merged(stack.last().map_or(&name, |s| s));
            let line = section.like_line();
            let mut chain = stack.clone();
            chain.push(name);
            problems.push(ResolveError::LikeCycle {
                file: self.file.clone(),
                line,
                chain: chain.join(" -> "),
            });
            return;
        }
        if order.contains(&name) {
            return;
        }
        order.push(name.clone());
        let section = self.merged(&name);
        if let Some(Some(like)) = section.get("LIKE") {
            let like = like.trim().to_string();
            let line = section.like_line();
            if self.find(&like).is_none() {
                problems.push(ResolveError::LikeMissing {
                    file: self.file.clone(),
                    line,
                    target: like,
                });
                return;
            }
            stack.push(name);
            self.follow(&like, stack, order, problems);
            stack.pop();
        }
    }
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_shell())
    }
}

/// `fnmatch(3)` without flags, case-insensitive: `*`, `?`, `[a-z]`, `[!x]`/`[^x]`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    glob_at(&p, &t)
}

fn glob_at(p: &[char], t: &[char]) -> bool {
    // Iterative with one backtrack point for '*': linear in practice, never exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, len)) = class_match(&p[pi..], t[ti]) {
                        if matched {
                            pi += len;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        // An unclosed '[' is a literal.
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the bracket expression at the start of `p`; returns whether it
/// matched and the expression's length, or `None` if the bracket is never closed.
fn class_match(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// `sort -V` order: runs of digits compare as numbers, the rest as text.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].is_ascii_digit() && b[j].is_ascii_digit() {
            let si = i;
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            let sj = j;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let na = trim_zeros(&a[si..i]);
            let nb = trim_zeros(&b[sj..j]);
            let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
            if ord != Ordering::Equal {
                return ord;
            }
        } else {
            if a[i] != b[j] {
                return a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (a.len() - i).cmp(&(b.len() - j)).then_with(|| a.cmp(b))
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, key: &str) -> Option<String> {
        let c = parse("t", text);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        c.resolve(&Identity::default()).get(key).map(str::to_string)
    }

    #[test]
    fn value_syntax_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("[default]\nA = b\n", Some("b")),
            ("[default]\nA\t=\tb\t\n", Some("b")),
            ("[default]\nA=b c  d  # comment\n", Some("b c  d")),
            (
                "[default]\nA = \"x # not a comment\"\n",
                Some("x # not a comment"),
            ),
            (
                "[default]\nA = \"say \"hi\" there\" # c\n",
                Some("say \"hi\" there"),
            ),
            ("[default]\n  a = lower key\n", Some("lower key")),
            ("[DEFAULT]   \nA = 1\n", Some("1")),
            ("[ default ]\nA = 1\n", Some("1")),
            ("[default]\nA = 1\nA = 2\n", Some("2")),
            ("[default]\nA = 1\nA = none\n", None),
            ("[default]\nA = \"NONE\"\n", None),
            ("[default]\nA =\n", Some("")),
            ("[default]\nA = x=y=z\n", Some("x=y=z")),
            ("[default]\r\nA = crlf\r\n", Some("crlf")),
            ("# c\n\n[default] # c\nA = 1\n", Some("1")),
        ];
        for (text, want) in cases {
            assert_eq!(value(text, "A").as_deref(), *want, "input {text:?}");
        }
    }

    #[test]
    fn errors_have_position_and_expectation() {
        let c = parse(
            "f.conf",
            "A = 1\n[default]\nB\n[x\nC = \"open\nD = \"a\" b\n[]\nE-F = 1\nOK = 1\n",
        );
        let got: Vec<(usize, usize)> = c.errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(
            got,
            vec![(1, 1), (3, 1), (4, 1), (5, 5), (6, 9), (7, 1), (8, 2)]
        );
        assert!(c.errors[0].message.contains("before any section"));
        assert!(c.errors[1].message.contains("expected 'KEY = value'"));
        assert!(c.errors[2].message.contains("expected ']'"));
        assert!(c.errors[3].message.contains("unterminated"));
        assert!(c.errors[0].to_string().starts_with("f.conf:1:1: "));
        // What could be read is still there.
        assert_eq!(c.resolve(&Identity::default()).get("OK"), Some("1"));
    }

    fn id(h: Option<&str>, ip: Option<&str>, mac: Option<&str>) -> Identity {
        Identity {
            hostname: h.map(Into::into),
            ip: ip.map(Into::into),
            mac: mac.map(Into::into),
        }
    }

    const SECTIONS: &str = "\
[default]
A = default
B = default
C = default
D = default
[AA:BB:CC:DD:EE:FF]
A = mac
LIKE = kube
[192.0.2.10]
A = ip
[node1]
A = host
[kube]
B = kube
LIKE = base
[base]
C = base
A = base
[192.0.2.*]
D = glob-ip
B = glob-ip
[node*]
D = glob-host
";

    #[test]
    fn section_order_table() {
        let c = parse("t", SECTIONS);
        assert!(c.errors.is_empty());
        let cases = [
            // Exact hostname beats IP and MAC; globs come after exact + LIKEs.
            (
                id(Some("node1"), Some("192.0.2.10"), Some("aa:bb:cc:dd:ee:ff")),
                "host",
                "glob-ip",
                "default",
                "glob-host",
            ),
            // No host section: IP is exact.
            (
                id(Some("other"), Some("192.0.2.10"), Some("aa-bb-cc-dd-ee-ff")),
                "ip",
                "glob-ip",
                "default",
                "glob-ip",
            ),
            // Uppercase MAC section matches lowercase MAC; LIKE chain kube -> base.
            (
                id(None, Some("198.51.100.1"), Some("aa:bb:cc:dd:ee:ff")),
                "mac",
                "kube",
                "base",
                "default",
            ),
            (
                id(None, None, None),
                "default",
                "default",
                "default",
                "default",
            ),
        ];
        for (who, a, b, cc, d) in cases {
            let r = c.resolve(&who);
            assert_eq!(
                (
                    r.get("A").unwrap(),
                    r.get("B").unwrap(),
                    r.get("C").unwrap(),
                    r.get("D").unwrap()
                ),
                (a, b, cc, d),
                "{who:?} via {:?}",
                r.sections
            );
            assert!(r.problems.is_empty());
            assert_eq!(r.get("LIKE"), None);
        }
    }

    #[test]
    fn none_in_stronger_section_unsets() {
        let c = parse("t", "[default]\nX = 1\n[n]\nX = none\n");
        assert_eq!(c.resolve(&id(Some("n"), None, None)).get("X"), None);
        assert_eq!(c.resolve(&id(Some("m"), None, None)).get("X"), Some("1"));
    }

    #[test]
    fn like_cycle_is_reported_not_hung() {
        let c = parse(
            "t",
            "[a]\nLIKE = b\nX = a\n[b]\nLIKE = a\nY = b\n[default]\nZ = d\n",
        );
        let r = c.resolve(&id(Some("a"), None, None));
        assert_eq!(r.sections, vec!["a", "b", "default"]);
        assert_eq!(r.get("Y"), Some("b"));
        assert_eq!(r.get("Z"), Some("d"));
        assert!(
            matches!(&r.problems[..], [ResolveError::LikeCycle { line: 5, chain, .. }] if chain == "a -> b -> a")
        );
        let c = parse("t", "[a]\nLIKE = a\n");
        assert_eq!(c.resolve(&id(Some("a"), None, None)).problems.len(), 1);
        let c = parse("t", "[a]\nLIKE = nope\n");
        assert!(matches!(
            &c.resolve(&id(Some("a"), None, None)).problems[..],
            [ResolveError::LikeMissing { line: 2, .. }]
        ));
    }

    #[test]
    fn natural_order_of_lists() {
        let c = parse(
            "t",
            "[default]\nRCFILE_10 = ten\nRCFILE_2 = two\nRCFILE_01_X = one\nRCFILEX = no\nRCFILE_02 = two0\n",
        );
        let r = c.resolve(&Identity::default());
        let keys: Vec<&str> = r.list("RCFILE_").iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            vec!["RCFILE_01_X", "RCFILE_02", "RCFILE_2", "RCFILE_10"]
        );
    }

    #[test]
    fn glob_table() {
        for (p, t, want) in [
            ("node*", "NODE12", true),
            ("node?", "node1", true),
            ("node?", "node12", false),
            ("192.0.2.[0-9]", "192.0.2.7", true),
            ("192.0.2.[!0-5]", "192.0.2.7", true),
            ("192.0.2.[!0-9]", "192.0.2.7", false),
            ("aa:bb:*", "AA:BB:CC", true),
            (
                "*a*a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
            ("[x", "[x", true),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} vs {t}");
        }
    }

    #[test]
    fn shell_output_escapes() {
        let c = parse("t", "[default]\nA = \"$HOME `x` \\ \"q\"\"\n");
        assert_eq!(
            c.resolve(&Identity::default()).to_shell(),
            "A=\"\\$HOME \\`x\\` \\\\ \\\"q\\\"\"\n"
        );
    }
}
