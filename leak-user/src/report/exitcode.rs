//! CI gates: `--error-exitcode N` makes a run fail with N when leaks of the kinds
//! chosen by `--errors-for-leak-kinds` (valgrind's options) remain at the end, so
//! `leaktrace --error-exitcode 23 -- ./test` fails a CI job that leaks.

use std::fmt;

use super::Leak;
use crate::table::verdict::LeakKind;

/// Which leak kinds count as errors. valgrind's names are accepted too:
/// `definite` is leaktrace's `direct`; `reachable` names blocks leaktrace never
/// reports, so it adds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeakKinds {
    pub direct: bool,
    pub indirect: bool,
    pub possible: bool,
}

/// A `--errors-for-leak-kinds` value that names no kind.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown leak kind {0:?}: expected all, none, or a list of direct (definite), indirect, possible, reachable"
)]
pub struct UnknownLeakKind(pub String);

impl LeakKinds {
    /// valgrind's default: definite and indirect.
    pub const DEFAULT: Self = Self {
        direct: true,
        indirect: true,
        possible: false,
    };

    /// Parses `all`, `none` or a comma-separated list of kinds.
    pub fn parse(s: &str) -> Result<Self, UnknownLeakKind> {
        let mut kinds = Self {
            direct: false,
            indirect: false,
            possible: false,
        };
        match s.trim() {
            "all" => {
                return Ok(Self {
                    direct: true,
                    indirect: true,
                    possible: true,
                });
            }
            "none" => return Ok(kinds),
            _ => {}
        }
        for word in s.split(',').map(str::trim) {
            match word {
                "direct" | "definite" => kinds.direct = true,
                "indirect" => kinds.indirect = true,
                "possible" => kinds.possible = true,
                "reachable" => {}
                _ => return Err(UnknownLeakKind(word.to_owned())),
            }
        }
        Ok(kinds)
    }

    pub fn contains(self, kind: LeakKind) -> bool {
        match kind {
            LeakKind::Direct => self.direct,
            LeakKind::Indirect => self.indirect,
            LeakKind::Possible => self.possible,
        }
    }
}

impl fmt::Display for LeakKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.direct, "direct"),
            (self.indirect, "indirect"),
            (self.possible, "possible"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// `--error-exitcode N` with the kinds that trigger it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorExit {
    pub code: u8,
    pub kinds: LeakKinds,
}

impl ErrorExit {
    /// The status to exit with, given the leaks that remain at the end: `Some(code)`
    /// when one of them is of a chosen kind.
    pub fn status<'a>(&self, leaks: impl IntoIterator<Item = &'a Leak>) -> Option<i32> {
        leaks
            .into_iter()
            .any(|l| self.kinds.contains(l.kind))
            .then_some(i32::from(self.code))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::report::tests::{leak, sample};

    #[test]
    fn parses_leaktrace_and_valgrind_names() {
        assert_eq!(
            LeakKinds::parse("direct,indirect").unwrap(),
            LeakKinds::DEFAULT
        );
        assert_eq!(
            LeakKinds::parse("definite, indirect").unwrap(),
            LeakKinds::DEFAULT
        );
        assert_eq!(
            LeakKinds::parse("all").unwrap().to_string(),
            "direct,indirect,possible"
        );
        assert_eq!(LeakKinds::parse("none").unwrap().to_string(), "none");
        assert_eq!(LeakKinds::parse("reachable").unwrap().to_string(), "none");
        assert_eq!(
            LeakKinds::parse("possible").unwrap().to_string(),
            "possible"
        );
        assert_eq!(
            LeakKinds::parse("direct,lost").unwrap_err().to_string(),
            "unknown leak kind \"lost\": expected all, none, or a list of direct (definite), indirect, possible, reachable"
        );
    }

    #[test]
    fn fails_only_on_chosen_kinds() {
        let gate = ErrorExit {
            code: 23,
            kinds: LeakKinds::DEFAULT,
        };
        assert_eq!(gate.status(&sample()), Some(23));
        assert_eq!(gate.status(&[]), None);
        let possible = [leak(LeakKind::Possible, 8, &Arc::new(Vec::new()))];
        assert_eq!(gate.status(&possible), None);
        let gate = ErrorExit {
            code: 9,
            kinds: LeakKinds::parse("possible").unwrap(),
        };
        assert_eq!(gate.status(&possible), Some(9));
        assert_eq!(gate.status(&sample()), None);
    }
}
