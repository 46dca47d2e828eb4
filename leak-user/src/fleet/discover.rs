//! Finding processes to trace as they start: a poll of `/proc` (cheap: a name and
//! a cgroup read per process not yet decided) and the bookkeeping of which pids
//! were tried, given up on, or refused at `--max-targets`. The bookkeeping is
//! pure and unit-tested; `list` reads `/proc`.

use std::collections::{HashMap, HashSet};

use super::{Candidate, Selector};

/// Attempts before a matching process that shows no allocator to hook (still
/// in the loader, or a static binary without symbols) is left alone.
pub const MAX_TRIES: u32 = 10;

/// A running process as the poll saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub pid: u32,
    pub comm: String,
    pub cgroup: Option<String>,
}

/// Every process in `/proc` now (threads are not listed: only thread-group
/// leaders have a directory there).
pub fn list() -> Vec<Listed> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            Some(Listed {
                pid,
                comm: crate::proc::comm(pid)?,
                cgroup: crate::proc::cgroup(pid),
            })
        })
        .collect()
}

/// What the discovery remembers between polls.
#[derive(Debug, Default)]
pub struct Discovery {
    tries: HashMap<u32, u32>,
    given_up: HashSet<u32>,
    /// Pids refused at the cap (each counted once).
    refused: HashSet<u32>,
    /// Processes refused at `--max-targets` since the start.
    pub refused_total: u64,
}

impl Discovery {
    /// The pids to attach to now, at most as many as the cap leaves room for
    /// (`traced` are traced already), lowest pid first. Forgets pids that are gone.
    pub fn pick(
        &mut self,
        selector: &Selector,
        listed: &[Listed],
        traced: &dyn Fn(u32) -> bool,
        traced_count: usize,
        own_pid: u32,
    ) -> Vec<u32> {
        let alive: HashSet<u32> = listed.iter().map(|l| l.pid).collect();
        self.tries.retain(|p, _| alive.contains(p));
        self.given_up.retain(|p| alive.contains(p));
        self.refused.retain(|p| alive.contains(p));
        let mut wanted: Vec<u32> = listed
            .iter()
            .filter(|l| !traced(l.pid) && !self.given_up.contains(&l.pid))
            .filter(|l| {
                selector.wants(
                    &Candidate {
                        pid: l.pid,
                        comm: &l.comm,
                        cgroup: l.cgroup.as_deref(),
                    },
                    own_pid,
                )
            })
            .map(|l| l.pid)
            .collect();
        wanted.sort_unstable();
        let room = selector.max_targets.saturating_sub(traced_count);
        for &pid in wanted.iter().skip(room) {
            if self.refused.insert(pid) {
                self.refused_total += 1;
            }
        }
        wanted.truncate(room);
        for pid in &wanted {
            self.refused.remove(pid);
        }
        wanted
    }

    /// `pid` could not be attached to yet (no allocator mapped): try again at the
    /// next poll, up to [`MAX_TRIES`]. Returns true when that was the last try.
    pub fn failed(&mut self, pid: u32) -> bool {
        let tries = self.tries.entry(pid).or_default();
        *tries += 1;
        let last = *tries >= MAX_TRIES;
        if last {
            self.give_up(pid);
        }
        last
    }

    /// Never try `pid` again (a kernel thread, a process with nothing to hook).
    pub fn give_up(&mut self, pid: u32) {
        self.tries.remove(&pid);
        self.given_up.insert(pid);
    }

    /// Pids waiting for room under the cap now.
    pub fn refused_now(&self) -> usize {
        self.refused.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Pattern;

    fn listed(pid: u32, comm: &str) -> Listed {
        Listed {
            pid,
            comm: comm.to_owned(),
            cgroup: None,
        }
    }

    fn selector(max: usize) -> Selector {
        Selector {
            all: false,
            comms: vec![Pattern::new("app*")],
            cgroup: None,
            exclude: Vec::new(),
            max_targets: max,
        }
    }

    #[test]
    fn picks_new_matching_processes_up_to_the_cap() {
        let mut d = Discovery::default();
        let procs = [
            listed(1, "init"),
            listed(30, "app-c"),
            listed(10, "app-a"),
            listed(20, "app-b"),
            listed(99, "app-self"),
        ];
        let none = |_| false;
        assert_eq!(d.pick(&selector(2), &procs, &none, 0, 99), [10, 20]);
        assert_eq!(d.refused_total, 1, "30 refused at the cap");
        // The same refusal is counted once.
        let first_two = |p| p == 10 || p == 20;
        assert_eq!(
            d.pick(&selector(2), &procs, &first_two, 2, 99),
            Vec::<u32>::new()
        );
        assert_eq!((d.refused_total, d.refused_now()), (1, 1));
        // Room again (20 exited): 30 gets it.
        let procs: Vec<Listed> = procs.into_iter().filter(|l| l.pid != 20).collect();
        let only_10 = |p| p == 10;
        assert_eq!(d.pick(&selector(2), &procs, &only_10, 1, 99), [30]);
        assert_eq!(d.refused_now(), 0);
    }

    #[test]
    fn retries_then_gives_up_and_forgets_the_dead() {
        let mut d = Discovery::default();
        let procs = [listed(10, "app")];
        let none = |_| false;
        for _ in 0..MAX_TRIES - 1 {
            assert_eq!(d.pick(&selector(5), &procs, &none, 0, 1), [10]);
            assert!(!d.failed(10));
        }
        assert_eq!(d.pick(&selector(5), &procs, &none, 0, 1), [10]);
        assert!(d.failed(10), "the last try");
        assert!(d.pick(&selector(5), &procs, &none, 0, 1).is_empty());
        // The pid is reused by a new process after the old one is gone.
        assert!(d.pick(&selector(5), &[], &none, 0, 1).is_empty());
        assert_eq!(d.pick(&selector(5), &procs, &none, 0, 1), [10]);
    }
}
