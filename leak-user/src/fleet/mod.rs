//! Daemon mode's choice of processes (`--all`, `--comm`, `--cgroup`,
//! `--exclude-comm`, `--max-targets`): which running processes to trace, decided
//! from what `/proc` says about each. Pure; `discover.rs` lists the processes,
//! `limits.rs` keeps the tracer inside its own memory and CPU limits.

pub mod discover;
pub mod limits;

/// A shell-style pattern over a command name (`comm`): `*` any run of
/// characters, `?` one character, everything else itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does `name` match the whole pattern?
    pub fn matches(&self, name: &str) -> bool {
        let p: Vec<char> = self.0.chars().collect();
        let n: Vec<char> = name.chars().collect();
        // Iterative glob with one backtrack point (the last `*`): linear enough
        // for names of 15 characters.
        let (mut pi, mut ni) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ni < n.len() {
            match p.get(pi) {
                Some('*') => {
                    star = Some((pi, ni));
                    pi += 1;
                }
                Some(&c) if c == '?' || c == n[ni] => {
                    pi += 1;
                    ni += 1;
                }
                _ => match star {
                    Some((sp, sn)) => {
                        pi = sp + 1;
                        ni = sn + 1;
                        star = Some((sp, sn + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// Which processes daemon mode traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// `--all`: every process that uses a hooked allocator.
    pub all: bool,
    /// `--comm`: command names to trace (any of them).
    pub comms: Vec<Pattern>,
    /// `--cgroup`: a cgroup (v2 path, relative to the cgroup root) whose
    /// processes, and its descendants' processes, are traced.
    pub cgroup: Option<String>,
    /// `--exclude-comm`: never these.
    pub exclude: Vec<Pattern>,
    /// `--max-targets`: at most this many traced at once.
    pub max_targets: usize,
}

/// What `/proc` says about a candidate process.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub pid: u32,
    pub comm: &'a str,
    /// Its cgroup v2 path (None: the root cgroup).
    pub cgroup: Option<&'a str>,
}

impl Selector {
    /// The cgroup path as `/proc/PID/cgroup` shows it: `/sys/fs/cgroup/a/b`,
    /// `a/b` and `/a/b` all mean `/a/b`.
    pub fn normalize_cgroup(path: &str) -> String {
        let rest = path.strip_prefix("/sys/fs/cgroup").unwrap_or(path);
        let trimmed = rest.trim_matches('/');
        format!("/{trimmed}")
    }

    /// Should `c` be traced (the cap aside)? Never leaktrace itself (`own_pid`).
    pub fn wants(&self, c: &Candidate, own_pid: u32) -> bool {
        if c.pid == own_pid || self.exclude.iter().any(|p| p.matches(c.comm)) {
            return false;
        }
        let by_comm = self.comms.is_empty() || self.comms.iter().any(|p| p.matches(c.comm));
        let by_cgroup = self.cgroup.as_deref().is_none_or(|want| {
            let have = c.cgroup.unwrap_or("/");
            want == "/" || have == want || have.starts_with(&format!("{want}/"))
        });
        by_comm && by_cgroup
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = Pattern::new;
        assert!(p("nginx").matches("nginx"));
        assert!(!p("nginx").matches("nginx2"));
        assert!(p("ngi*").matches("nginx"));
        assert!(p("*x").matches("nginx"));
        assert!(p("*").matches(""));
        assert!(p("n?inx").matches("nginx"));
        assert!(p("a*b*c").matches("aXXbYYbc"));
        assert!(!p("a*b*c").matches("aXXbYYb"));
        assert!(!p("").matches("a"));
    }

    fn selector() -> Selector {
        Selector {
            all: false,
            comms: Vec::new(),
            cgroup: None,
            exclude: Vec::new(),
            max_targets: 10,
        }
    }

    #[test]
    fn picks_by_name_and_cgroup_never_itself() {
        let c = |pid, comm, cgroup| Candidate { pid, comm, cgroup };
        let all = Selector {
            all: true,
            exclude: vec![Pattern::new("sshd*")],
            ..selector()
        };
        assert!(all.wants(&c(10, "redis", None), 1));
        assert!(!all.wants(&c(1, "leaktrace", None), 1), "itself");
        assert!(!all.wants(&c(10, "sshd-session", None), 1), "excluded");
        let by_name = Selector {
            comms: vec![Pattern::new("web*"), Pattern::new("db")],
            ..selector()
        };
        assert!(by_name.wants(&c(10, "web-1", None), 1));
        assert!(by_name.wants(&c(10, "db", None), 1));
        assert!(!by_name.wants(&c(10, "dbx", None), 1));
        let by_cgroup = Selector {
            cgroup: Some(Selector::normalize_cgroup(
                "/sys/fs/cgroup/system.slice/app",
            )),
            ..selector()
        };
        assert!(by_cgroup.wants(&c(10, "x", Some("/system.slice/app")), 1));
        assert!(by_cgroup.wants(&c(10, "x", Some("/system.slice/app/worker")), 1));
        assert!(!by_cgroup.wants(&c(10, "x", Some("/system.slice/app2")), 1));
        assert!(!by_cgroup.wants(&c(10, "x", None), 1));
    }

    #[test]
    fn cgroup_paths_normalize() {
        for p in ["/sys/fs/cgroup/a/b", "a/b", "/a/b/", "/sys/fs/cgroup/a/b/"] {
            assert_eq!(Selector::normalize_cgroup(p), "/a/b");
        }
        assert_eq!(Selector::normalize_cgroup("/sys/fs/cgroup"), "/");
    }
}
