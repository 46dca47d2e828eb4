//! LeakSanitizer-style suppressions: `leak:PATTERN` lines. A leak is hidden when
//! any frame of its stack has a function, file or module matching a pattern.
//! Patterns match substrings; `*` matches anything, `^` anchors at the start, `$`
//! at the end (as in LSan). Each rule counts what it hid.

use std::{io, path::Path};

use crate::symbolize::Frame;

/// Built-in rules for known runtime noise (documented in the README).
const BUILTIN: &[(&str, &str)] = &[
    // The dynamic loader's own bookkeeping (link maps, TLS blocks of dlopen'd
    // libraries): reachable through loader state we cannot always see.
    ("_dl_", "dynamic loader internals"),
    // A thread's TLS vector: the thread control block points one 16-byte entry into
    // it, so it looks "possibly" leaked while the thread (or its cached stack) lives.
    ("^allocate_dtv$", "threads' TLS vectors"),
    // NSS module caches (getpwnam & co. keep them for the process lifetime).
    ("^__nss_", "NSS caches"),
    ("^nss_", "NSS caches"),
];

/// One rule and what it hid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub builtin: bool,
    pub objects: u64,
    pub bytes: u64,
}

/// The set of rules in force.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suppressions {
    pub rules: Vec<Rule>,
}

/// A suppressions file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("cannot read suppressions file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: expected `leak:PATTERN`, found {text:?}")]
    Syntax {
        path: String,
        line: usize,
        text: String,
    },
}

/// Glob match with LSan's anchors.
pub fn matches(pattern: &str, text: &str) -> bool {
    let (anchored_start, p) = match pattern.strip_prefix('^') {
        Some(p) => (true, p),
        None => (false, pattern),
    };
    let (anchored_end, p) = match p.strip_suffix('$') {
        Some(p) => (true, p),
        None => (false, p),
    };
    let parts: Vec<&str> = p.split('*').collect();
    let last = parts.len() - 1;
    let mut pos = 0;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 && anchored_start {
            if !text.starts_with(part) {
                return false;
            }
            pos = part.len();
        } else if i == last && anchored_end {
            return text.len() - pos >= part.len() && text.ends_with(part);
        } else {
            match text[pos..].find(part) {
                Some(at) => pos += at + part.len(),
                None => return false,
            }
        }
    }
    !anchored_end || pos == text.len()
}

impl Suppressions {
    pub fn builtin() -> Self {
        Self {
            rules: BUILTIN
                .iter()
                .map(|(p, _)| Rule {
                    pattern: (*p).to_owned(),
                    builtin: true,
                    objects: 0,
                    bytes: 0,
                })
                .collect(),
        }
    }

    /// Adds the rules of one file; `#` starts a comment; blank lines are ignored.
    pub fn parse(&mut self, path: &str, text: &str) -> Result<(), SuppressionError> {
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some(pattern) = line
                .strip_prefix("leak:")
                .map(str::trim)
                .filter(|p| !p.is_empty())
            else {
                return Err(SuppressionError::Syntax {
                    path: path.to_owned(),
                    line: i + 1,
                    text: line.to_owned(),
                });
            };
            self.rules.push(Rule {
                pattern: pattern.to_owned(),
                builtin: false,
                objects: 0,
                bytes: 0,
            });
        }
        Ok(())
    }

    pub fn load_file(&mut self, path: &Path) -> Result<(), SuppressionError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SuppressionError::Read {
            path: display.clone(),
            source,
        })?;
        self.parse(&display, &text)
    }

    /// The index of the first rule matching `stack`, if any.
    pub fn find(&self, stack: &[Frame]) -> Option<usize> {
        self.rules.iter().position(|rule| {
            stack.iter().any(|f| {
                [
                    f.function.as_deref(),
                    f.file.as_deref(),
                    f.module.as_deref(),
                ]
                .into_iter()
                .flatten()
                .any(|text| matches(&rule.pattern, text))
            })
        })
    }

    /// Counts one hidden object against rule `i`.
    pub fn count(&mut self, i: usize, bytes: u64) {
        self.rules[i].objects += 1;
        self.rules[i].bytes += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_and_anchors() {
        assert!(matches("alloc", "my_alloc_fn"));
        assert!(matches("^my_", "my_alloc_fn"));
        assert!(!matches("^alloc", "my_alloc_fn"));
        assert!(matches("fn$", "my_alloc_fn"));
        assert!(!matches("alloc$", "my_alloc_fn"));
        assert!(matches("my*fn", "my_alloc_fn"));
        assert!(matches("^my*fn$", "my_alloc_fn"));
        assert!(!matches("^my*x$", "my_alloc_fn"));
        assert!(matches("libfoo.so*", "/usr/lib/libfoo.so.1"));
    }

    #[test]
    fn parses_files_and_finds_rules() {
        let mut s = Suppressions::default();
        s.parse("f", "# comment\n\nleak:make_cache\nleak:libnoisy.so\n")
            .unwrap();
        assert_eq!(s.rules.len(), 2);
        let frame = |f: &str, m: &str| Frame {
            function: Some(f.into()),
            module: Some(m.into()),
            ..Frame::default()
        };
        assert_eq!(
            s.find(&[frame("main", "/bin/x"), frame("make_cache", "/bin/x")]),
            Some(0)
        );
        assert_eq!(s.find(&[frame("f", "/usr/lib/libnoisy.so")]), Some(1));
        assert_eq!(s.find(&[frame("f", "/bin/x")]), None);
        let err = s.parse("f", "suppress:x").unwrap_err();
        assert!(err.to_string().contains("f:1"));
    }
}
