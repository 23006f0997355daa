//! lts.conf files generated from getltscfg's grammar (fixed seed), for the differential
//! corpus in `tests/fixtures/ltsconf-corpus/`: sections by hostname, IP, MAC and glob,
//! LIKE chains, duplicated sections, comments, quoting, odd headers, bytes that are not
//! UTF-8, byte-order marks, CRLF. Most files are ones getltscfg reads without a syntax
//! error (the cases that must give its result); the rest exercise what it rejects.

/// The seed the committed corpus was generated with.
pub const SEED: u64 = 0x1975_1e75_c0f1;
/// The number of cases in the committed corpus.
pub const CASES: usize = 1200;

pub struct Case {
    pub lts_conf: Vec<u8>,
    pub hostname: String,
    pub ip: String,
    pub mac: String,
}

/// xorshift64*: small, fixed, and the same on every platform.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// True with probability `pct` percent.
    fn pct(&mut self, pct: usize) -> bool {
        self.below(100) < pct
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const HOSTS: &[&str] = &["node1", "node2", "ws-a", "kube7", "lab-pc12"];
const IPS: &[&str] = &["10.0.0.5", "10.0.0.17", "192.168.67.20"];
const MACS: &[&str] = &[
    "aa:bb:cc:dd:ee:ff",
    "52:54:00:12:34:56",
    "00:11:25:84:ce:ba",
];
const GROUPS: &[&str] = &["kube", "base", "gpu", "crt_monitor", "lab"];
const GLOBS: &[&str] = &[
    "node*",
    "10.0.0.*",
    "node[1-3]",
    "aa:bb:*",
    "*",
    "?ode1",
    "node[!1]",
    "ws-?",
    "192.168.*",
    "52:54:00:*",
    "KUBE*",
    "lab-pc[0-9][0-9]",
    "node\\1",
    "[[:alpha:]]*",
];
const KEYS: &[&str] = &[
    "SOUND",
    "HOSTNAME",
    "X_MODE_0",
    "RCFILE_01",
    "RCFILE_10",
    "FSTAB_01",
    "SCREEN_07",
    "LDM_DEBUG",
    "KEEP_SYSTEM_SERVICES",
    "PREINIT_00",
    "timezone",
];

/// Generates case `i` of the corpus seeded with `seed`.
pub fn case(seed: u64, i: usize) -> Case {
    let mut r = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for _ in 0..4 {
        r.next_u64();
    }
    let hostname = r.pick(HOSTS).to_string();
    let ip = r.pick(IPS).to_string();
    let mac = r.pick(MACS).to_string();
    let mut g = Gen {
        r,
        out: Vec::new(),
        hostname: hostname.clone(),
        ip: ip.clone(),
        mac: mac.clone(),
        sections: Vec::new(),
        bad: false,
    };
    g.bad = g.r.pct(30);
    g.file();
    Case {
        lts_conf: g.out,
        hostname,
        ip,
        mac,
    }
}

struct Gen {
    r: Rng,
    out: Vec<u8>,
    hostname: String,
    ip: String,
    mac: String,
    /// Section names written so far (for duplicates and LIKE targets).
    sections: Vec<String>,
    /// Whether this file may hold what getltscfg rejects or misreads (about 30% of files);
    /// the others must give exactly its result.
    bad: bool,
}

impl Gen {
    fn put(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
    }

    fn nl(&mut self, crlf: bool) {
        self.put(if crlf { "\r\n" } else { "\n" });
    }

    fn file(&mut self) {
        let crlf = self.bad && self.r.pct(8);
        if self.bad && self.r.pct(8) {
            self.put("\u{feff}");
        }
        if self.r.pct(40) {
            self.comment();
            self.nl(crlf);
        }
        let n = 1 + self.r.below(7);
        for _ in 0..n {
            self.section(crlf);
        }
        if self.r.pct(8) {
            // A last line without newline: a key, or a comment (getltscfg echoes its '#').
            if self.bad && self.r.pct(50) {
                self.comment();
            } else {
                self.declaration(crlf);
            }
        }
    }

    fn comment(&mut self) {
        let lead = self.r.pick(&["", "  ", "\t"]);
        let text = self.r.pick(&[
            "# comment",
            "#",
            "## [not a section]",
            "# KEY = value",
            "# it's \"quoted\"",
            "# caf\u{e9} UTF-8",
        ]);
        self.put(lead);
        self.put(text);
        if self.r.pct(5) {
            // Latin-1 in a comment: not UTF-8.
            self.out.extend_from_slice(b" caf\xe9");
        }
    }

    fn section_name(&mut self) -> String {
        let hostname = self.hostname.clone();
        let ip = self.ip.clone();
        let mac = self.mac.clone();
        let pool: Vec<String> = match self.r.below(12) {
            0..=1 => vec!["default".into(), "Default".into(), "DEFAULT".into()],
            2..=3 => HOSTS
                .iter()
                .map(|s| s.to_string())
                .chain([hostname.clone(), hostname.to_uppercase()])
                .collect(),
            4 => IPS.iter().map(|s| s.to_string()).chain([ip]).collect(),
            5 => MACS
                .iter()
                .map(|s| s.to_string())
                .chain([mac.to_uppercase(), mac])
                .collect(),
            6..=7 => GLOBS.iter().map(|s| s.to_string()).collect(),
            8 if !self.sections.is_empty() => self.sections.clone(),
            _ => GROUPS.iter().map(|s| s.to_string()).collect(),
        };
        pool[self.r.below(pool.len())].clone()
    }

    fn section(&mut self, crlf: bool) {
        let name = self.section_name();
        self.sections.push(name.clone());
        // getltscfg reads no '[' or ']' inside a header: a bracket glob must be quoted.
        let brackets = name.contains(['[', ']']);
        let form = if brackets && !self.bad {
            4
        } else if self.bad {
            self.r.below(100)
        } else {
            4 + self.r.below(96)
        };
        match form {
            // Odd headers getltscfg rejects.
            0 => self.put(&format!("[{name}] trailing words")),
            1 => self.put("[]"),
            2 => self.put(&format!("[{name}")),
            3 => self.put(&format!("[{name}]]")),
            // Forms it accepts.
            4..=6 => self.put(&format!("[\"{name}\"]")),
            7..=9 => self.put(&format!("[ {name} ]")),
            10..=12 => self.put(&format!("[{name}] # {name}")),
            13 => self.put(&format!("  [{name}]")),
            // A key on the header's line: getltscfg's grammar allows it.
            14..=15 => {
                self.put(&format!("[{name}] "));
                self.declaration(crlf);
            }
            _ => self.put(&format!("[{name}]")),
        }
        if !(14..=15).contains(&form) {
            self.nl(crlf);
        }
        if self.bad && self.r.pct(4) {
            self.put("include other.conf");
            self.nl(crlf);
        }
        // getltscfg rejects an empty section: rare.
        let n = if self.bad && self.r.pct(8) {
            0
        } else {
            1 + self.r.below(6)
        };
        for _ in 0..n {
            if self.r.pct(12) {
                self.comment();
                self.nl(crlf);
            }
            if self.r.pct(6) {
                self.nl(crlf);
            }
            if self.r.pct(22) {
                self.like(crlf);
            } else {
                self.declaration(crlf);
            }
        }
    }

    fn like(&mut self, crlf: bool) {
        let key = self.r.pick(&["LIKE", "LIKE", "like", "Like"]);
        let target = match self.r.below(10) {
            0..=4 => self.r.pick(GROUPS).to_string(),
            5..=6 if !self.sections.is_empty() => {
                self.sections[self.r.below(self.sections.len())].clone()
            }
            7 => "default".into(),
            8 => "missing".into(),
            _ => self.r.pick(HOSTS).to_string(),
        };
        let sp = self.r.pick(&[" = ", "=", " =\t"]);
        let target = if target.contains(['[', ']']) && !(self.bad && self.r.pct(50)) {
            format!("\"{target}\"")
        } else {
            target
        };
        self.put(&format!("{key}{sp}{target}"));
        self.nl(crlf);
    }

    fn declaration(&mut self, crlf: bool) {
        let mut key = self.r.pick(KEYS).to_string();
        if self.r.pct(10) {
            key = key.to_lowercase();
        }
        let quoted_key = self.r.pct(5);
        let key = match self.r.below(100) {
            _ if quoted_key => format!("\"{key}\""),
            0..=2 if self.bad => "MY KEY".into(),
            3..=4 if self.bad => "1ST".into(),
            _ => key,
        };
        let indent = self.r.pick(&["", "", "    ", "\t"]);
        let sp = self.r.pick(&[" = ", "=", " =  ", "\t=\t"]);
        self.put(&format!("{indent}{key}"));
        if self.r.pct(2) {
            // A declaration across lines: getltscfg's tokens ignore newlines.
            self.nl(crlf);
            self.put("=");
            self.nl(crlf);
            self.put("  split");
            self.nl(crlf);
            return;
        }
        if self.r.pct(2) {
            // The value on the next line.
            self.put(" =");
            self.nl(crlf);
            self.put("    next-line value");
            self.nl(crlf);
            return;
        }
        self.put(sp);
        self.value(quoted_key);
        if self.r.pct(10) {
            let c = self.r.pick(&[" # comment", "\t# x = y", " #"]);
            self.put(c);
        }
        if self.r.pct(5) {
            self.put(" ");
        }
        self.nl(crlf);
    }

    /// `after_quote`: the key was quoted, so a quoted value would join it in getltscfg's
    /// longest-match quoted string: only bad files get one.
    fn value(&mut self, after_quote: bool) {
        let n = match self.r.below(100) {
            n @ 45..=54 | n @ 68..=69 if after_quote && !self.bad => n - 40,
            n @ 70.. if !self.bad => n - 70,
            n => n,
        };
        match n {
            0..=34 => {
                let v = self
                    .r
                    .pick(&["True", "False", "1024x768", "server", "16", "vesa"]);
                self.put(v)
            }
            35..=44 => {
                let v =
                    self.r
                        .pick(&["echo hello world", "/dev/ttyS0", "a b  c", "mount -t tmpfs"]);
                self.put(v)
            }
            45..=54 => {
                let v = self.r.pick(&[
                    "\"quoted value\"",
                    "\"with # hash\"",
                    "\"x = y\"",
                    "\"[brackets]\"",
                    "\"say \"hi\" now\"",
                    "\"\"",
                    "\"it's\"",
                ]);
                self.put(v)
            }
            55..=62 => {
                let v = self.r.pick(&["NONE", "none", "\"None\""]);
                self.put(v)
            }
            63..=65 => self.put("caf\u{e9}"),
            66..=67 => self.out.extend_from_slice(b"caf\xe9"),
            68..=69 => self.out.extend_from_slice(b"\"Gr\xfc\xdfe\""),
            // What getltscfg rejects or reads oddly.
            70..=71 => self.put("x=y"),
            72 => self.put("b[1]"),
            73..=74 => self.put("'single quoted'"),
            75 => self.put("\"unterminated"),
            76 => self.put(""),
            77 => self.put("\"a\" trailing"),
            _ => {
                let v = self
                    .r
                    .pick(&["yes", "0", "/opt/ltsp", "pc-$HOSTNAME", "`id`"]);
                self.put(v)
            }
        }
    }
}
