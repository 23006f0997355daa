//! `lts.conf` as LTSP5's `getltscfg` read it: the same tokens and grammar, so a file that
//! getltscfg accepted gives the same values; where getltscfg failed (a syntax error made it
//! drop the rest of the file) or misbehaved, a tolerant reading that reports every problem
//! with its place. The rules, and where they differ from getltscfg, are in the README's
//! "lts.conf: how settings are resolved".
//!
//! Parsing never gives up on the first error: a node must boot on what could be read, so
//! [`parse`] returns the sections it understood together with the errors and warnings met.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// One `KEY = value` line, the value as written (`NONE` is resolved later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Upper-cased.
    pub key: String,
    pub value: String,
    pub line: usize,
}

impl Entry {
    /// `NONE` (any case, quoted or not) unsets the key.
    pub fn is_none(&self) -> bool {
        self.value.eq_ignore_ascii_case("none")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The name between the brackets, ASCII lower-cased (trimmed unless it was quoted).
    pub name: String,
    pub line: usize,
    /// A header that could not be read: the section matches nothing, and its keys are
    /// reported, never applied.
    pub rejected: bool,
    pub entries: Vec<Entry>,
}

impl Section {
    /// The section's own value for `key` (last duplicate wins); `Some(None)` means `NONE`.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key.eq_ignore_ascii_case(key))
            .map(|e| (!e.is_none()).then_some(e.value.as_str()))
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

/// The sections understood, in file order, and every problem met on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LtsConf {
    pub file: String,
    pub sections: Vec<Section>,
    /// Lines or keys not applied.
    pub errors: Vec<ParseError>,
    /// Lines read, but not byte for byte as written, or not as getltscfg read them.
    pub warnings: Vec<ParseError>,
}

/// Bounds the work on hostile input: longer files are cut (and the cut reported).
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// Bounds the memory of the reports: past this many errors (or warnings), one line says
/// how many more there were.
pub const MAX_REPORTS: usize = 500;

/// Keeps the first [`MAX_REPORTS`] reports; counts the rest.
fn keep(list: &mut Vec<ParseError>, dropped: &mut usize, e: ParseError) {
    if list.len() < MAX_REPORTS {
        list.push(e);
    } else {
        *dropped += 1;
    }
}

fn summarise(file: &str, list: &mut Vec<ParseError>, dropped: usize, what: &str) {
    list.sort_by_key(|e| (e.line, e.column));
    if dropped > 0 {
        let last = list.last().map_or(1, |e| e.line);
        list.push(ParseError {
            file: file.to_string(),
            line: last,
            column: 1,
            message: format!("and {dropped} more {what} after this line, not listed"),
        });
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Eq,
    Lb,
    Rb,
    /// Unquoted text (trimmed as getltscfg's isspace trim did) or the inside of quotes.
    Str(String),
    /// `include PATH` at the start of a line.
    Include,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
    column: usize,
}

/// C `isspace` in the C locale: getltscfg trimmed with it.
fn c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// What getltscfg's unquoted-text rule took: anything but `= [ ] " ' #` and newline.
fn str_char(c: char) -> bool {
    !matches!(c, '=' | '[' | ']' | '"' | '\'' | '#' | '\n')
}

/// The longest `include` match at the start of `line` (getltscfg's `inc` rule), in chars.
fn include_len(line: &[char]) -> usize {
    let mut i = line.iter().take_while(|c| matches!(c, ' ' | '\t')).count();
    let word: Vec<char> = "include".chars().collect();
    if line.len() < i + word.len() || line[i..i + word.len()] != word[..] {
        return 0;
    }
    i += word.len();
    let ws = line[i..]
        .iter()
        .take_while(|c| matches!(c, ' ' | '\t'))
        .count();
    if ws == 0 {
        return 0;
    }
    i += ws;
    let trail = |j: usize| {
        j + line[j..]
            .iter()
            .take_while(|c| matches!(c, ' ' | '\t'))
            .count()
    };
    let plain = trail(i + line[i..].iter().take_while(|&&c| str_char(c)).count());
    let quoted = if line.get(i) == Some(&'"') {
        line[i + 1..]
            .iter()
            .rposition(|&c| c == '"')
            .map_or(0, |q| trail(i + 1 + q + 1))
    } else {
        0
    };
    plain.max(quoted)
}

/// Splits one line into getltscfg's tokens. `terminated`: a newline follows (a `#`
/// comment needs one). Characters getltscfg's lexer did not match (`'`, an unpaired `"`,
/// `#` on a last line without newline) were echoed to its stdout and otherwise skipped:
/// they are skipped here too, and reported.
fn lex_line(
    line_no: usize,
    line: &[char],
    terminated: bool,
    out: &mut Vec<Token>,
    warn: &mut dyn FnMut(usize, String),
) {
    let mut i = 0;
    let inc = include_len(line);
    let plain = line.iter().take_while(|&&c| str_char(c)).count();
    if inc > 0 && inc >= plain {
        out.push(Token {
            tok: Tok::Include,
            line: line_no,
            column: 1,
        });
        i = inc;
    }
    while i < line.len() {
        let c = line[i];
        let column = i + 1;
        let mut push = |tok| {
            out.push(Token {
                tok,
                line: line_no,
                column,
            })
        };
        match c {
            '=' => push(Tok::Eq),
            '[' => push(Tok::Lb),
            ']' => push(Tok::Rb),
            '"' => {
                if let Some(q) = line[i + 1..].iter().rposition(|&c| c == '"') {
                    let end = i + 1 + q;
                    push(Tok::Str(line[i + 1..end].iter().collect()));
                    i = end + 1;
                    continue;
                }
                warn(
                    column,
                    "a '\"' with no closing '\"' on the line is ignored (as getltscfg did, \
                     which also printed it into its output)"
                        .into(),
                );
            }
            '#' => {
                if !terminated {
                    // getltscfg's comment needed a newline: it read this one as text.
                    warn(
                        column,
                        "comment on a last line without newline: getltscfg read its text \
                         as keys and values"
                            .into(),
                    );
                }
                return;
            }
            '\'' => warn(
                column,
                "\"'\" ignored (as getltscfg did, which also printed it into its output): \
                 quote values with '\"'"
                    .into(),
            ),
            _ => {
                let run = line[i..].iter().take_while(|&&c| str_char(c)).count();
                let blanks = line[i..]
                    .iter()
                    .take_while(|c| matches!(c, ' ' | '\t'))
                    .count();
                if run > blanks {
                    let text: String = line[i..i + run].iter().collect();
                    let lead = text.chars().take_while(|&c| c_space(c)).count();
                    out.push(Token {
                        tok: Tok::Str(text.trim_matches(c_space).to_string()),
                        line: line_no,
                        column: column + lead,
                    });
                    i += run;
                } else {
                    i += blanks;
                }
                continue;
            }
        }
        i += 1;
    }
}

/// Lines as text: a leading UTF-8 byte-order mark dropped, `\r` before `\n` dropped,
/// invalid UTF-8 and NUL replaced by U+FFFD (each such line reported).
fn decode(bytes: &[u8], warn: &mut dyn FnMut(usize, usize, String)) -> Vec<(String, bool)> {
    let bytes = match bytes.strip_prefix(b"\xef\xbb\xbf") {
        Some(rest) => {
            warn(
                1,
                1,
                "UTF-8 byte-order mark ignored (getltscfg failed on it)".into(),
            );
            rest
        }
        None => bytes,
    };
    let mut crlf = false;
    let mut lines = Vec::new();
    let mut rest = bytes;
    let mut line_no = 0;
    while !rest.is_empty() {
        line_no += 1;
        let (raw, terminated) = match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                let l = &rest[..n];
                rest = &rest[n + 1..];
                (l, true)
            }
            None => (std::mem::take(&mut rest), false),
        };
        let raw = match raw.strip_suffix(b"\r") {
            Some(r) if terminated => {
                if !crlf {
                    crlf = true;
                    let col = String::from_utf8_lossy(r).chars().count() + 1;
                    let m = "CR LF line ends read as LF (getltscfg failed on them)";
                    warn(line_no, col, m.into());
                }
                r
            }
            _ => raw,
        };
        let text = match std::str::from_utf8(raw) {
            Ok(t) if !t.contains('\0') => t.to_string(),
            Ok(t) => {
                let col = t[..t.find('\0').unwrap_or(0)].chars().count() + 1;
                warn(
                    line_no,
                    col,
                    "NUL byte replaced by U+FFFD (getltscfg cut the value there)".into(),
                );
                t.replace('\0', "\u{fffd}")
            }
            Err(e) => {
                let col = String::from_utf8_lossy(&raw[..e.valid_up_to()])
                    .chars()
                    .count()
                    + 1;
                warn(
                    line_no,
                    col,
                    "invalid UTF-8 (replaced by U+FFFD; save lts.conf as UTF-8)".into(),
                );
                String::from_utf8_lossy(raw).replace('\0', "\u{fffd}")
            }
        };
        lines.push((text, terminated));
    }
    lines
}

/// A shell variable name: getltscfg's `KEY="value"` output is `eval`ed.
fn shell_name(key: &str) -> bool {
    let mut c = key.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses the bytes of an lts.conf; `file` only labels messages.
pub fn parse(file: &str, bytes: impl AsRef<[u8]>) -> LtsConf {
    let mut bytes = bytes.as_ref();
    let mut conf = LtsConf {
        file: file.to_string(),
        ..Default::default()
    };
    let mk = |line, column, message| ParseError {
        file: file.to_string(),
        line,
        column,
        message,
    };
    if bytes.len() > MAX_FILE_BYTES {
        conf.errors.push(mk(
            1,
            1,
            format!("file longer than {MAX_FILE_BYTES} bytes: the rest is not read"),
        ));
        bytes = &bytes[..MAX_FILE_BYTES];
    }
    let mut warnings = Vec::new();
    let mut dropped = 0;
    let lines = decode(bytes, &mut |l, c, m| {
        keep(&mut warnings, &mut dropped, mk(l, c, m))
    });
    let mut toks = Vec::new();
    for (idx, (text, terminated)) in lines.iter().enumerate() {
        let chars: Vec<char> = text.chars().collect();
        lex_line(idx + 1, &chars, *terminated, &mut toks, &mut |c, m| {
            keep(&mut warnings, &mut dropped, mk(idx + 1, c, m))
        });
    }
    let mut p = Parser {
        toks,
        lines: lines.into_iter().map(|(t, _)| t).collect(),
        conf,
        warnings,
        current: None,
        last: None,
        dropped_errors: 0,
        dropped_warnings: dropped,
    };
    p.run();
    let mut conf = p.conf;
    conf.warnings = p.warnings;
    summarise(file, &mut conf.errors, p.dropped_errors, "errors");
    summarise(file, &mut conf.warnings, p.dropped_warnings, "warnings");
    conf
}

/// The declaration read last, for the one repair done in place (see [`Parser::failure`]).
struct LastDecl {
    /// Where it went: (section, entry), or None if it was not applied (already reported).
    at: Option<(usize, usize)>,
    line: usize,
    eq_column: usize,
}

struct Parser {
    toks: Vec<Token>,
    lines: Vec<String>,
    conf: LtsConf,
    warnings: Vec<ParseError>,
    current: Option<usize>,
    last: Option<LastDecl>,
    dropped_errors: usize,
    dropped_warnings: usize,
}

impl Parser {
    fn err(&mut self, line: usize, column: usize, message: String) {
        let e = ParseError {
            file: self.conf.file.clone(),
            line,
            column,
            message,
        };
        keep(&mut self.conf.errors, &mut self.dropped_errors, e);
    }

    fn warn(&mut self, line: usize, column: usize, message: String) {
        let e = ParseError {
            file: self.conf.file.clone(),
            line,
            column,
            message,
        };
        keep(&mut self.warnings, &mut self.dropped_warnings, e);
    }

    fn tok(&self, i: usize) -> Option<&Tok> {
        self.toks.get(i).map(|t| &t.tok)
    }

    /// The column of token `i` if it is on `line`, else the end of that line.
    fn column_on(&self, i: usize, line: usize) -> usize {
        match self.toks.get(i) {
            Some(t) if t.line == line => t.column,
            _ => self.lines[line - 1].chars().count() + 1,
        }
    }

    /// The first token after line `line`.
    fn next_line(&self, mut i: usize, line: usize) -> usize {
        while i < self.toks.len() && self.toks[i].line <= line {
            i += 1;
        }
        i
    }

    fn run(&mut self) {
        let mut i = 0;
        while i < self.toks.len() {
            let t = self.toks[i].clone();
            i = match t.tok {
                Tok::Include => {
                    self.err(
                        t.line,
                        t.column,
                        "include is not supported: copy the file's sections into lts.conf \
                         (the line is ignored)"
                            .into(),
                    );
                    self.last = None;
                    self.next_line(i, t.line)
                }
                Tok::Lb => self.header(i),
                Tok::Str(_) if self.tok(i + 1) == Some(&Tok::Eq) => self.declaration(i),
                _ => self.failure(i),
            };
        }
    }

    /// `[ name ]`: accepted where getltscfg accepted it; otherwise a rejected section.
    fn header(&mut self, i: usize) -> usize {
        let lb = self.toks[i].clone();
        self.last = None;
        let (name, rb) = match (self.tok(i + 1), self.tok(i + 2)) {
            (Some(Tok::Str(n)), Some(Tok::Rb)) => (n.clone(), i + 2),
            (Some(Tok::Rb), _) => {
                return self.reject(i, lb.column, "expected a name between '[' and ']'");
            }
            (Some(Tok::Str(_)), _) => {
                let col = self.column_on(i + 2, lb.line);
                return self.reject(i, col, "expected ']' after the name");
            }
            _ => {
                let col = self.column_on(i + 1, lb.line);
                return self.reject(i, col, "expected a name after '['");
            }
        };
        let rb_line = self.toks[rb].line;
        let next = rb + 1;
        // What follows on the header's line must start a KEY = value, as getltscfg read it.
        if let Some(t) = self.toks.get(next) {
            if t.line == rb_line
                && !(matches!(t.tok, Tok::Str(_)) && self.tok(next + 1) == Some(&Tok::Eq))
            {
                let col = t.column;
                return self.reject(i, col, "expected the end of the line after ']'");
            }
        }
        if !matches!(self.tok(next), Some(Tok::Str(_))) {
            self.warn(
                lb.line,
                lb.column,
                format!("section [{name}] has no keys (getltscfg stopped reading the file here)"),
            );
        }
        self.conf.sections.push(Section {
            name: name.to_ascii_lowercase(),
            line: lb.line,
            rejected: false,
            entries: Vec::new(),
        });
        self.current = Some(self.conf.sections.len() - 1);
        next
    }

    fn reject(&mut self, i: usize, column: usize, why: &str) -> usize {
        let line = self.toks[i].line;
        let text = self.lines[line - 1].trim().to_string();
        self.err(
            line,
            column,
            format!(
                "section header {text:?} rejected: {why}; the keys up to the next header \
                 are not applied"
            ),
        );
        self.conf.sections.push(Section {
            name: text,
            line,
            rejected: true,
            entries: Vec::new(),
        });
        self.current = Some(self.conf.sections.len() - 1);
        self.next_line(i, line)
    }

    /// `KEY = value` (the tokens may span lines, as in getltscfg).
    fn declaration(&mut self, i: usize) -> usize {
        let key_tok = self.toks[i].clone();
        let eq = self.toks[i + 1].clone();
        let Tok::Str(key) = key_tok.tok else {
            unreachable!("declaration starts at a Str")
        };
        let v = i + 2;
        let value_tok = match self.toks.get(v) {
            Some(
                t @ Token {
                    tok: Tok::Str(_), ..
                },
            ) if !(t.line > eq.line && self.tok(v + 1) == Some(&Tok::Eq)) => Some(t.clone()),
            _ => None,
        };
        let (value, next) = match value_tok {
            Some(Token {
                tok: Tok::Str(s), ..
            }) => (s, v + 1),
            _ => {
                self.warn(
                    eq.line,
                    eq.column,
                    format!(
                        "{key} has no value: read as empty (getltscfg stopped reading the file \
                         here; write {key} = \"\")"
                    ),
                );
                (String::new(), v)
            }
        };
        let at = self.add(&key, value, key_tok.line, key_tok.column);
        self.last = Some(LastDecl {
            at,
            line: eq.line,
            eq_column: eq.column,
        });
        next
    }

    /// Stores a declaration in the current section, or reports why it is not applied.
    fn add(
        &mut self,
        key: &str,
        value: String,
        line: usize,
        column: usize,
    ) -> Option<(usize, usize)> {
        let Some(s) = self.current else {
            self.err(
                line,
                column,
                format!("{key:?} before any section: expected a [section] header first"),
            );
            return None;
        };
        if self.conf.sections[s].rejected {
            let at = self.conf.sections[s].line;
            self.err(
                line,
                column,
                format!("{key:?} not applied: the section header at line {at} was rejected"),
            );
            return None;
        }
        if !shell_name(key) {
            self.err(
                line,
                column,
                format!(
                    "key {key:?}: expected a shell variable name (letters, digits and '_', \
                     not starting with a digit); not applied"
                ),
            );
            return None;
        }
        let entries = &mut self.conf.sections[s].entries;
        entries.push(Entry {
            key: key.to_ascii_uppercase(),
            value,
            line,
        });
        Some((s, entries.len() - 1))
    }

    /// A token where getltscfg's grammar failed (it then ignored the rest of the file).
    /// Right after a declaration on the same line, the line is read again as one
    /// `KEY = value` (`A = x=y` gives `x=y`); anything else: the rest of the line is skipped.
    fn failure(&mut self, i: usize) -> usize {
        let t = self.toks[i].clone();
        let next = self.next_line(i, t.line);
        if let Some(last) = self.last.take() {
            if last.line == t.line {
                let Some((s, e)) = last.at else {
                    return next; // that declaration was already reported
                };
                let after: String = self.lines[t.line - 1]
                    .chars()
                    .skip(last.eq_column)
                    .collect();
                let key = self.conf.sections[s].entries[e].key.clone();
                match parse_value(&after) {
                    Ok(v) => {
                        self.warn(
                            t.line,
                            t.column,
                            format!(
                                "{key}: the value continues after it ends for getltscfg \
                                 (which stopped reading the file here); read as {v:?}: \
                                 quote the value"
                            ),
                        );
                        self.conf.sections[s].entries[e].value = v;
                    }
                    Err((offset, message)) => {
                        self.conf.sections[s].entries.remove(e);
                        self.err(
                            t.line,
                            last.eq_column + offset + 1,
                            format!("{key}: {message}; not applied"),
                        );
                    }
                }
                return next;
            }
        }
        let what = match &t.tok {
            Tok::Str(s) => format!("{s:?}"),
            Tok::Eq => "'='".into(),
            Tok::Rb => "']'".into(),
            Tok::Lb => "'['".into(),
            Tok::Include => "include".into(),
        };
        self.err(
            t.line,
            t.column,
            format!("expected 'KEY = value' or a [section] header, found {what}; line ignored"),
        );
        next
    }
}

/// The text after `=` of a line getltscfg could not read. A double quote opens a value
/// that runs to the last quote on the line; `#` starts a comment only outside quotes.
/// Errors carry the char offset into `text`.
fn parse_value(text: &str) -> Result<String, (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let lead = chars.iter().take_while(|&&c| c_space(c)).count();
    let body = &chars[lead..];
    if body.first() == Some(&'"') {
        let Some(last) = body[1..].iter().rposition(|&c| c == '"') else {
            return Err((lead, "unterminated double quote".into()));
        };
        let after = &body[last + 2..];
        let skip = after.iter().take_while(|&&c| c_space(c)).count();
        if skip < after.len() && after[skip] != '#' {
            let rest: String = after[skip..].iter().collect();
            return Err((
                lead + last + 2 + skip,
                format!("expected the end of the line after the closing quote, found {rest:?}"),
            ));
        }
        return Ok(body[1..last + 1].iter().collect());
    }
    // Unquoted: quotes inside keep '#' literal between the first and the last of them.
    let first_q = body.iter().position(|&c| c == '"');
    let last_q = body.iter().rposition(|&c| c == '"');
    let end = body
        .iter()
        .enumerate()
        .position(|(i, &c)| {
            c == '#'
                && match (first_q, last_q) {
                    (Some(f), Some(l)) => i < f || i > l,
                    _ => true,
                }
        })
        .unwrap_or(body.len());
    let v: String = body[..end].iter().collect();
    Ok(v.trim_matches(c_space).to_string())
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
    /// The first section named `name` (ASCII case-insensitive): a later copy of a
    /// duplicated section is never used, as in getltscfg.
    fn index(&self) -> HashMap<String, usize> {
        let mut index = HashMap::new();
        for (i, s) in self.sections.iter().enumerate() {
            if !s.rejected {
                index.entry(s.name.clone()).or_insert(i);
            }
        }
        index
    }

    /// The sections that apply to `id` and the values they give, as getltscfg computed
    /// them: the section named exactly by the hostname, else the IP, else the MAC; the
    /// sections its LIKE lines name, breadth first, each section's LIKE lines in order;
    /// then per identity the first other section whose name matches it as a glob, with
    /// its LIKEs; then [default], whose own LIKE lines are not followed. Earlier sections
    /// win; inside one section the last line for a key wins.
    pub fn resolve(&self, id: &Identity) -> Resolved {
        let names = id.names();
        let mut w = Walk {
            conf: self,
            index: self.index(),
            order: Vec::new(),
            in_order: vec![false; self.sections.len()],
            problems: Vec::new(),
            next: 0,
            cycle_checks: 0,
        };
        if let Some(s) = names.iter().find_map(|n| w.find(n)) {
            w.push(s);
            w.follow();
        }
        for n in &names {
            if let Some(g) = self.sections.iter().position(|s| {
                !s.rejected && !s.name.eq_ignore_ascii_case(n) && glob_match(&s.name, n)
            }) {
                w.push(g);
                w.follow();
            }
        }
        if let Some(d) = w.find("default") {
            w.push(d);
        }
        let mut values: BTreeMap<String, &Entry> = BTreeMap::new();
        for &s in w.order.iter().rev() {
            for e in &self.sections[s].entries {
                if e.key != "LIKE" {
                    values.insert(e.key.clone(), e);
                }
            }
        }
        Resolved {
            values: values
                .into_iter()
                .filter(|(_, e)| !e.is_none())
                .map(|(k, e)| (k, e.value.clone()))
                .collect(),
            sections: w
                .order
                .iter()
                .map(|&s| self.sections[s].name.clone())
                .collect(),
            problems: w.problems,
        }
    }
}

/// The chain of sections being built: `order` holds each section once, at its first
/// (strongest) place, which is where getltscfg's chain (which repeats sections) had it.
struct Walk<'a> {
    conf: &'a LtsConf,
    /// Lower-cased name to the first section of that name.
    index: HashMap<String, usize>,
    order: Vec<usize>,
    in_order: Vec<bool>,
    problems: Vec<ResolveError>,
    /// The first section in `order` whose LIKE lines are not followed yet.
    next: usize,
    /// Bounds the cycle searches on hostile files.
    cycle_checks: usize,
}

const MAX_CYCLE_CHECKS: usize = 64;

impl Walk<'_> {
    fn find(&self, name: &str) -> Option<usize> {
        self.index.get(&name.to_ascii_lowercase()).copied()
    }

    fn push(&mut self, s: usize) {
        if !self.in_order[s] {
            self.in_order[s] = true;
            self.order.push(s);
        }
    }

    /// Follows the LIKE lines of every section added since the last call, breadth first.
    fn follow(&mut self) {
        while self.next < self.order.len() {
            let s = self.order[self.next];
            self.next += 1;
            let conf = self.conf;
            let section = &conf.sections[s];
            for e in section.entries.iter().filter(|e| e.key == "LIKE") {
                match self.find(&e.value) {
                    None => self.problems.push(ResolveError::LikeMissing {
                        file: conf.file.clone(),
                        line: e.line,
                        target: e.value.clone(),
                    }),
                    Some(t) => {
                        if self.in_order[t] && self.cycle_checks < MAX_CYCLE_CHECKS {
                            self.cycle_checks += 1;
                            if let Some(chain) = self.cycle(t, s) {
                                let problem = ResolveError::LikeCycle {
                                    file: self.conf.file.clone(),
                                    line: e.line,
                                    chain,
                                };
                                if !self.problems.contains(&problem) {
                                    self.problems.push(problem);
                                }
                            }
                        }
                        self.push(t);
                    }
                }
            }
        }
    }

    /// A LIKE path from `from` back to `to` (which names `from`), as "a -> b -> a".
    fn cycle(&self, from: usize, to: usize) -> Option<String> {
        let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([from]);
        let mut seen = std::collections::BTreeSet::from([from]);
        while let Some(s) = queue.pop_front() {
            if s == to {
                let mut path = vec![to];
                let mut at = to;
                while at != from {
                    at = prev[&at];
                    path.push(at);
                }
                path.reverse();
                path.push(from);
                let names: Vec<&str> = path
                    .iter()
                    .map(|&s| self.conf.sections[s].name.as_str())
                    .collect();
                return Some(names.join(" -> "));
            }
            for e in self.conf.sections[s]
                .entries
                .iter()
                .filter(|e| e.key == "LIKE")
            {
                if let Some(t) = self.find(&e.value) {
                    if seen.insert(t) {
                        prev.insert(t, s);
                        queue.push_back(t);
                    }
                }
            }
        }
        None
    }
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_shell())
    }
}

/// `fnmatch(3)` with `FNM_CASEFOLD` in the C locale, as getltscfg matched section names:
/// `*`, `?`, `[a-z]`, `[!x]`/`[^x]`, `[[:digit:]]`, `\` escaping the next character; ASCII
/// case-insensitive; an unclosed `[` is a literal.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().map(|c| c.to_ascii_lowercase()).collect();
    let t: Vec<char> = text.chars().map(|c| c.to_ascii_lowercase()).collect();
    glob_at(&p, &t)
}

/// One pattern element at `p[pi]`: its length and whether it matches `c`.
fn element(p: &[char], pi: usize, c: char) -> (usize, bool) {
    match p[pi] {
        '?' => (1, true),
        '\\' => match p.get(pi + 1) {
            Some(&e) => (2, e == c),
            None => (1, false), // a trailing '\' matches nothing
        },
        '[' => match class_match(&p[pi..], c) {
            Some((m, len)) => (len, m),
            None => (1, c == '['),
        },
        x => (1, x == c),
    }
}

fn glob_at(p: &[char], t: &[char]) -> bool {
    // Iterative with one backtrack point for '*': linear in practice, never exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            if p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            let (len, matched) = element(p, pi, t[ti]);
            if matched {
                pi += len;
                ti += 1;
                continue;
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

fn in_class(name: &str, c: char) -> bool {
    match name {
        "alnum" => c.is_ascii_alphanumeric(),
        "alpha" => c.is_ascii_alphabetic(),
        "blank" => c == ' ' || c == '\t',
        "cntrl" => c.is_ascii_control(),
        "digit" => c.is_ascii_digit(),
        "graph" => c.is_ascii_graphic(),
        "lower" => c.is_ascii_lowercase(),
        "print" => c.is_ascii_graphic() || c == ' ',
        "punct" => c.is_ascii_punctuation(),
        "space" => c_space(c),
        "upper" => c.is_ascii_uppercase(),
        "xdigit" => c.is_ascii_hexdigit(),
        _ => false,
    }
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
        // A character class name.
        if p[i] == '[' && p.get(i + 1) == Some(&':') {
            if let Some(end) =
                (i + 2..p.len().saturating_sub(1)).find(|&j| p[j] == ':' && p[j + 1] == ']')
            {
                let name: String = p[i + 2..end].iter().collect();
                matched |= in_class(&name, c);
                i = end + 2;
                continue;
            }
        }
        let (lo, len) = match p[i] {
            '\\' if i + 1 < p.len() => (p[i + 1], 2),
            x => (x, 1),
        };
        let after = i + len;
        if after + 1 < p.len() && p[after] == '-' && p[after + 1] != ']' {
            let (hi, hlen) = match p[after + 1] {
                '\\' if after + 2 < p.len() => (p[after + 2], 2),
                x => (x, 1),
            };
            if lo <= c && c <= hi {
                matched = true;
            }
            i = after + 1 + hlen;
        } else {
            if lo == c {
                matched = true;
            }
            i = after;
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
            "A = 1\n[default]\nB\nE-F = 1\nOK = 1\ninclude other.conf\n[x\nC = 1\n[]\nD = 2\n",
        );
        let got: Vec<(usize, usize)> = c.errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(
            got,
            vec![
                (1, 1),
                (3, 1),
                (4, 1),
                (6, 1),
                (7, 3),
                (8, 1),
                (9, 1),
                (10, 1)
            ]
        );
        assert!(c.errors[0].message.contains("before any section"));
        assert!(c.errors[1].message.contains("expected 'KEY = value'"));
        assert!(c.errors[2].message.contains("shell variable name"));
        assert!(c.errors[3].message.contains("include is not supported"));
        assert!(c.errors[4].message.contains("expected ']'"));
        assert!(c.errors[5]
            .message
            .contains("header at line 7 was rejected"));
        assert!(c.errors[6].message.contains("expected a name"));
        assert!(c.errors[0].to_string().starts_with("f.conf:1:1: "));
        // What could be read is still there; nothing under a rejected header applies.
        let r = c.resolve(&Identity::default());
        assert_eq!(r.all(), vec![("OK", "1")]);
    }

    #[test]
    fn rejected_header_keys_apply_nowhere() {
        for header in [
            "[node1] trailing words",
            "[]",
            "[node1",
            "[node1]]",
            "[[node1]",
        ] {
            let text = format!("[default]\nA = d\n{header}\nA = n\nB = n\n[other]\nC = o\n");
            let c = parse("t", &text);
            let bad: Vec<usize> = c.errors.iter().map(|e| e.line).collect();
            assert_eq!(bad, vec![3, 4, 5], "{header}: {:?}", c.errors);
            for who in [id(Some("node1"), None, None), id(Some("x"), None, None)] {
                let r = c.resolve(&who);
                assert_eq!(r.get("A"), Some("d"), "{header}");
                assert_eq!(r.get("B"), None, "{header}");
            }
            assert_eq!(
                c.resolve(&id(Some("other"), None, None)).get("C"),
                Some("o")
            );
        }
        // getltscfg's grammar allows a key after the header on the same line.
        let c = parse("t", "[node1] A = 1\n");
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(
            c.resolve(&id(Some("node1"), None, None)).get("A"),
            Some("1")
        );
    }

    #[test]
    fn getltscfg_resolution_rules() {
        // A duplicated section: only the first copy is used.
        let c = parse("t", "[n]\nA = 1\n[n]\nA = 2\nB = 2\n");
        let r = c.resolve(&id(Some("n"), None, None));
        assert_eq!((r.get("A"), r.get("B")), (Some("1"), None));
        // LIKE inside [default] is ignored, unless [default] is reached through a LIKE.
        let c = parse(
            "t",
            "[default]\nLIKE = x\nA = d\n[x]\nX = 1\n[n]\nLIKE = default\n",
        );
        assert_eq!(c.resolve(&id(Some("m"), None, None)).get("X"), None);
        assert_eq!(c.resolve(&id(Some("n"), None, None)).get("X"), Some("1"));
        // Several LIKE lines: all followed, in order, breadth first; the first listed wins.
        let c = parse(
            "t",
            "[n]\nLIKE = a\nLIKE = b\n[a]\nK = a\nLIKE = c\n[b]\nK = b\nM = b\n[c]\nM = c\n",
        );
        let r = c.resolve(&id(Some("n"), None, None));
        assert_eq!(r.sections, vec!["n", "a", "b", "c"]);
        assert_eq!((r.get("K"), r.get("M")), (Some("a"), Some("b")));
        // Exact before glob; a glob section is not taken for a name it equals.
        let c = parse(
            "t",
            "[node*]\nA = g\nB = g\n[node1]\nB = e\n[node\\*]\nC = esc\n",
        );
        let r = c.resolve(&id(Some("node1"), None, None));
        assert_eq!(r.sections, vec!["node1", "node*"]);
        assert_eq!(
            (r.get("A"), r.get("B"), r.get("C")),
            (Some("g"), Some("e"), None)
        );
        let r = c.resolve(&id(Some("node*"), None, None));
        assert_eq!(r.sections, vec!["node*", "node\\*"]);
    }

    #[test]
    fn bytes_bom_and_quoted_keys() {
        let c = parse(
            "t",
            b"\xef\xbb\xbf[default]\r\nA = caf\xe9 # Latin-1\r\n\"B\" = 2\r\n",
        );
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        // Each change to what was written is reported once, with its place.
        let got: Vec<(usize, usize, &str)> = c
            .warnings
            .iter()
            .map(|w| (w.line, w.column, &w.message[..12]))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 1, "UTF-8 byte-o"),
                (1, 10, "CR LF line e"),
                (2, 8, "invalid UTF-")
            ]
        );
        let r = c.resolve(&Identity::default());
        assert_eq!(r.get("A"), Some("caf\u{fffd}"));
        assert_eq!(r.get("B"), Some("2"));
    }

    #[test]
    fn getltscfg_token_quirks() {
        // A declaration may span lines; single quotes are dropped; "..." runs to the
        // last quote on the line.
        let c = parse(
            "t",
            "[default]\nA\n=\n1\nB = 'x y'\nC = \"a\" # \"b\"\nD = \"open\n",
        );
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        let r = c.resolve(&Identity::default());
        assert_eq!(
            r.all(),
            vec![("A", "1"), ("B", "x y"), ("C", "a\" # \"b"), ("D", "open")]
        );
        // The dropped quotes are reported: getltscfg printed them into its output.
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
        // An empty value before the next key is empty, not the next key.
        let c = parse("t", "[default]\nA =\nB = 1\n");
        let r = c.resolve(&Identity::default());
        assert_eq!((r.get("A"), r.get("B")), (Some(""), Some("1")));
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn reports_on_hostile_input_are_bounded() {
        let text = "'\n[]\n".repeat(100_000);
        let c = parse("t", &text);
        assert_eq!(c.warnings.len(), MAX_REPORTS + 1);
        assert_eq!(c.errors.len(), MAX_REPORTS + 1);
        assert!(c.warnings[MAX_REPORTS]
            .message
            .starts_with(&format!("and {} more warnings", 100_000 - MAX_REPORTS)));
        assert!(c.errors[0].message.contains("rejected"));
    }

    #[test]
    fn like_chain_on_hostile_input_is_bounded() {
        let mut text = String::from("[s0]\n");
        for i in 0..20_000 {
            text.push_str(&format!(
                "LIKE = s{}\n[s{}]\nLIKE = s0\nK{i} = v\n",
                i + 1,
                i + 1
            ));
        }
        let c = parse("t", &text);
        let r = c.resolve(&id(Some("s0"), None, None));
        assert_eq!(r.sections.len(), 20_001);
        assert!(!r.problems.is_empty());
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
