//! Resource limits of the tracer itself: a cap on the objects its table holds
//! (`--max-objects`) and a share of one CPU for scanning (`--scan-cpu`). Pure
//! decisions; the session applies them and counts each time they bite.

use std::time::Duration;

/// The limits in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// At most this many objects tracked over all targets (None: no cap).
    pub max_objects: Option<u64>,
    /// Scanning may take at most this percentage of one CPU (100: no limit).
    pub scan_cpu_percent: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_objects: None,
            scan_cpu_percent: 100,
        }
    }
}

impl Limits {
    /// Over the object cap: the target to let go, the one with the most objects
    /// among `per_process` (pid, objects); `kept` objects belong to a target
    /// that is never let go. None when under the cap.
    pub fn over_cap(&self, per_process: &[(u32, u64)], kept: u64) -> Option<u32> {
        let cap = self.max_objects?;
        let total: u64 = kept + per_process.iter().map(|(_, n)| n).sum::<u64>();
        if total <= cap {
            return None;
        }
        per_process
            .iter()
            .max_by_key(|(pid, n)| (*n, std::cmp::Reverse(*pid)))
            .map(|(pid, _)| *pid)
    }

    /// After a round of scans that took `busy`: how long from its start the next
    /// round must wait so that scanning stays within its CPU share, when that is
    /// longer than `interval` (None: the interval is enough).
    pub fn scan_wait(&self, busy: Duration, interval: Duration) -> Option<Duration> {
        if self.scan_cpu_percent >= 100 {
            return None;
        }
        let needed = busy.mul_f64(100.0 / f64::from(self.scan_cpu_percent.max(1)));
        (needed > interval).then_some(needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_target_goes_over_the_cap() {
        let limits = Limits {
            max_objects: Some(100),
            ..Limits::default()
        };
        assert_eq!(limits.over_cap(&[(1, 50), (2, 50)], 0), None);
        assert_eq!(limits.over_cap(&[(1, 30), (2, 60), (3, 20)], 0), Some(2));
        // Ties: the older (lower) pid goes.
        assert_eq!(limits.over_cap(&[(7, 60), (3, 60)], 0), Some(3));
        // A kept target counts, but is not chosen.
        assert_eq!(limits.over_cap(&[(7, 10)], 95), Some(7));
        assert_eq!(limits.over_cap(&[], 500), None);
        assert_eq!(Limits::default().over_cap(&[(1, u64::MAX)], 0), None);
    }

    #[test]
    fn scanning_keeps_to_its_cpu_share() {
        let s = Duration::from_secs;
        let limits = Limits {
            scan_cpu_percent: 25,
            ..Limits::default()
        };
        // 1 s of scanning every 5 s is 20 %: fine.
        assert_eq!(limits.scan_wait(s(1), s(5)), None);
        // 2 s needs 8 s between starts to stay at 25 %.
        assert_eq!(limits.scan_wait(s(2), s(5)), Some(s(8)));
        assert_eq!(Limits::default().scan_wait(s(100), s(1)), None);
    }
}
