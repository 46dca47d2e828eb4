//! From "unreferenced in this scan" to "reported leak": kmemleak's false-positive
//! controls, and retractions.
//!
//! An unreachable object is only reported once it is
//! * old enough (`--min-age`): young objects are often in registers or in transit;
//! * unreferenced in enough consecutive scans (`--min-scans`): a pointer can move
//!   from unread to already-read memory while a scan runs;
//! * unchanged since the previous scan (a checksum of its contents): an object that
//!   is being written to is in use;
//! * born after the last event loss that can hide a free: a lost free looks exactly
//!   like a leak, so such objects are withheld and counted instead.
//!
//! A reported leak that is later freed, or found reachable again, is retracted: the
//! retraction count is the tool's own field-measured false-positive rate.

use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use super::{Object, sites::AllocSite};

/// How an unreachable (or weakly reachable) object is classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakKind {
    /// Nothing points to it, or only objects in a leaked cycle it leads.
    Direct,
    /// Only other leaked objects point to it.
    Indirect,
    /// Reachable, but only through pointers into its middle (valgrind's "possibly lost").
    Possible,
}

impl LeakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakKind::Direct => "direct",
            LeakKind::Indirect => "indirect",
            LeakKind::Possible => "possible",
        }
    }
}

/// The false-positive controls (command-line options with kmemleak's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictParams {
    pub min_age_ms: u32,
    pub min_scans: u16,
    pub require_stable_contents: bool,
}

impl VerdictParams {
    /// The rules of an exact scan (a process stopped at its exit): no races to
    /// guard against, so every unreachable object is confirmed at once.
    pub const EXACT: Self = Self {
        min_age_ms: 0,
        min_scans: 1,
        require_stable_contents: false,
    };
}

impl Default for VerdictParams {
    fn default() -> Self {
        Self {
            min_age_ms: 5_000,
            min_scans: 2,
            require_stable_contents: true,
        }
    }
}

/// One object the mark phase did not reach strongly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: u64,
    pub serial: u32,
    pub kind: LeakKind,
    pub checksum: u64,
    /// For indirect leaks: the direct leak through which it is lost.
    pub root: Option<u64>,
}

/// What one scan observed of one process, in the verdict rules' terms.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observation<'a> {
    /// Objects the mark phase did not reach strongly.
    pub candidates: &'a [Candidate],
    /// Objects the scan could not judge (their memory could not be read): their
    /// state stays as it was.
    pub unjudged: &'a [u64],
    /// Reported leaks this scan found reachable, with their checksums: a stale
    /// copy of a lost block's address (in a dead thread's cached stack, a reused
    /// block) does not bring it back while its contents stay the same.
    pub watched_reached: &'a [(u64, u64)],
    /// Every root was read and the process was alive when the scan ended. An
    /// incomplete scan (the target died or exited mid-scan) changes no verdict:
    /// the last complete scan stands.
    pub complete: bool,
}

/// A newly confirmed leak, with what reporting it needs (its allocation site).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    pub pid: u32,
    pub addr: u64,
    pub object: Object,
    pub site: AllocSite,
    pub kind: LeakKind,
    pub root: Option<u64>,
}

/// Why a reported leak was taken back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetractionReason {
    /// The program freed it: something still had its address.
    Freed,
    /// A later scan found a pointer to it.
    Reachable,
}

/// A reported leak taken back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retraction {
    pub pid: u32,
    pub addr: u64,
    pub object: Object,
    pub kind: LeakKind,
    pub reason: RetractionReason,
}

/// What one scan of one process decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanVerdicts {
    /// When the verdicts were applied (ms since the tracer started): the ages of
    /// the findings are counted to here.
    pub now_ms: u32,
    pub findings: Vec<Finding>,
    pub retractions: Vec<Retraction>,
    /// Candidates not (yet) old enough, stable enough, or seen in enough scans.
    pub pending: u64,
    /// Candidates withheld because they were alive when events were lost.
    pub withheld: u64,
    /// The scan was incomplete: nothing was decided.
    pub incomplete: bool,
    /// Reported leaks found reachable only through stale copies of their address
    /// (their contents unchanged): still leaks.
    pub stale_references: u64,
}

#[derive(Clone, Copy, Debug)]
struct LeakState {
    serial: u32,
    scans: u16,
    checksum: u64,
    kind: LeakKind,
    root: Option<u64>,
    reported: bool,
}

/// Per-object verdict state, kept in the table (under its lock) so that frees can
/// retract reported leaks.
pub struct VerdictBook {
    params: VerdictParams,
    states: FxHashMap<(u32, u64), LeakState>,
}

impl VerdictBook {
    pub fn new(params: VerdictParams) -> Self {
        Self {
            params,
            states: FxHashMap::default(),
        }
    }

    pub fn params(&self) -> VerdictParams {
        self.params
    }

    /// The object at `addr` was freed or dropped: forget it, retracting a report.
    pub fn on_gone(
        &mut self,
        pid: u32,
        addr: u64,
        object: &Object,
        reason: RetractionReason,
    ) -> Option<Retraction> {
        if self.states.is_empty() {
            return None;
        }
        let state = self.states.remove(&(pid, addr))?;
        (state.reported && state.serial == object.serial).then_some(Retraction {
            pid,
            addr,
            object: *object,
            kind: state.kind,
            reason,
        })
    }

    pub fn forget_process(&mut self, pid: u32) {
        self.states.retain(|(p, _), _| *p != pid);
    }

    /// Applies one scan's observation. `lookup` answers whether the object a
    /// candidate was computed for is still live (same address and serial),
    /// `site_of` names an object's allocation site. `free_loss_ms` is the latest time
    /// at which a free may have been lost. An `exact` scan (of a process stopped at
    /// its exit) has no races to guard against: every unreachable object is
    /// confirmed at once, as valgrind and LeakSanitizer do at exit.
    #[expect(
        clippy::too_many_arguments,
        reason = "one scan's inputs, each distinct"
    )]
    pub fn apply_scan(
        &mut self,
        pid: u32,
        seen: &Observation,
        lookup: impl Fn(u64, u32) -> Option<Object>,
        site_of: impl Fn(u32) -> Option<AllocSite>,
        now_ms: u32,
        free_loss_ms: Option<u32>,
        exact: bool,
    ) -> ScanVerdicts {
        let mut out = ScanVerdicts {
            now_ms,
            incomplete: !seen.complete,
            ..ScanVerdicts::default()
        };
        if !seen.complete {
            return out;
        }
        let params = if exact {
            VerdictParams::EXACT
        } else {
            self.params
        };
        let mut unreferenced: FxHashSet<u64> = seen.unjudged.iter().copied().collect();
        // Indirect leaks last: one is reported only once the direct leak it is
        // lost through is (a young or withheld root keeps its blocks pending).
        let (indirect, others): (Vec<&Candidate>, Vec<&Candidate>) = seen
            .candidates
            .iter()
            .partition(|c| c.kind == LeakKind::Indirect);
        for c in others.into_iter().chain(indirect) {
            let Some(object) = lookup(c.addr, c.serial) else {
                continue; // freed (or replaced) while we scanned
            };
            unreferenced.insert(c.addr);
            let root_reported = c.kind != LeakKind::Indirect
                || c.root
                    .is_some_and(|r| self.states.get(&(pid, r)).is_some_and(|s| s.reported));
            let state = self.observe(pid, c, params);
            if state.reported {
                continue;
            }
            let age = now_ms.saturating_sub(object.birth_ms);
            if !old_and_stable(state, age, params) || !root_reported {
                out.pending += 1;
            } else if free_loss_ms.is_some_and(|loss| object.birth_ms <= loss) {
                out.withheld += 1;
            } else if let Some(site) = site_of(object.site) {
                state.reported = true;
                out.findings.push(Finding {
                    pid,
                    addr: c.addr,
                    object,
                    site,
                    kind: c.kind,
                    root: c.root,
                });
            }
        }
        let stale: FxHashMap<u64, u64> = seen.watched_reached.iter().copied().collect();
        (out.retractions, out.stale_references) =
            self.forget_referenced(pid, &unreferenced, &stale, lookup);
        out
    }

    /// Records that candidate `c` was unreferenced in one more scan (kmemleak's
    /// `unreferenced_object`), restarting the count for a new life of the address
    /// or for contents that changed since the last scan (an object being written
    /// to is in use).
    fn observe(&mut self, pid: u32, c: &Candidate, params: VerdictParams) -> &mut LeakState {
        let fresh = LeakState {
            serial: c.serial,
            scans: 0,
            checksum: c.checksum,
            kind: c.kind,
            root: c.root,
            reported: false,
        };
        let state = self.states.entry((pid, c.addr)).or_insert(fresh);
        if state.serial != c.serial {
            *state = fresh;
        }
        if params.require_stable_contents && state.scans > 0 && state.checksum != c.checksum {
            state.scans = 0;
        }
        state.checksum = c.checksum;
        state.scans = state.scans.saturating_add(1);
        if !state.reported {
            state.kind = c.kind;
            state.root = c.root;
        }
        state
    }

    /// Forgets every object of `pid` with state that this scan found referenced
    /// (not among `unreferenced`), retracting those that were reported — except a
    /// reported leak whose contents are unchanged (`stale`: address → checksum
    /// now): what reached it is a stale copy of its address. Returns the
    /// retractions and how many reported leaks were kept that way.
    fn forget_referenced(
        &mut self,
        pid: u32,
        unreferenced: &FxHashSet<u64>,
        stale: &FxHashMap<u64, u64>,
        lookup: impl Fn(u64, u32) -> Option<Object>,
    ) -> (Vec<Retraction>, u64) {
        let referenced: Vec<u64> = self
            .states
            .iter()
            .filter(|((p, a), state)| {
                *p == pid
                    && !unreferenced.contains(a)
                    && !(state.reported && stale.get(a) == Some(&state.checksum))
            })
            .map(|(&(_, a), _)| a)
            .collect();
        let kept = self
            .states
            .iter()
            .filter(|((p, a), state)| {
                *p == pid && state.reported && stale.get(a) == Some(&state.checksum)
            })
            .count() as u64;
        let mut retractions = Vec::new();
        for addr in referenced {
            let state = self.states.remove(&(pid, addr)).expect("listed above");
            if !state.reported {
                continue;
            }
            if let Some(object) = lookup(addr, state.serial) {
                retractions.push(Retraction {
                    pid,
                    addr,
                    object,
                    kind: state.kind,
                    reason: RetractionReason::Reachable,
                });
            }
        }
        (retractions, kept)
    }

    /// Every reported (and not retracted) leak of `pid`: (address, serial, kind, root).
    pub fn reported(&self, pid: u32) -> Vec<(u64, u32, LeakKind, Option<u64>)> {
        let mut v: Vec<_> = self
            .states
            .iter()
            .filter(|((p, _), s)| *p == pid && s.reported)
            .map(|(&(_, a), s)| (a, s.serial, s.kind, s.root))
            .collect();
        v.sort_unstable_by_key(|x| x.0);
        v
    }
}

/// Old enough and unreferenced in enough consecutive scans to be reported.
fn old_and_stable(state: &LeakState, age_ms: u32, params: VerdictParams) -> bool {
    state.scans >= params.min_scans && age_ms >= params.min_age_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(candidates: &[Candidate]) -> Observation<'_> {
        Observation {
            candidates,
            complete: true,
            ..Observation::default()
        }
    }

    fn site(_: u32) -> Option<AllocSite> {
        Some(AllocSite {
            stack_id: 0,
            caller: 0x40,
            func: leak_common::AllocFn::Malloc,
            before_attach: false,
        })
    }

    fn object(birth_ms: u32, serial: u32) -> Object {
        Object::new(32, birth_ms, 0, 1, serial)
    }

    fn cand(addr: u64, checksum: u64) -> Candidate {
        Candidate {
            addr,
            serial: 1,
            kind: LeakKind::Direct,
            checksum,
            root: None,
        }
    }

    fn params() -> VerdictParams {
        VerdictParams {
            min_age_ms: 1000,
            min_scans: 2,
            require_stable_contents: true,
        }
    }

    #[test]
    fn reports_after_two_stable_scans_of_an_old_object() {
        let mut book = VerdictBook::new(params());
        let live = |_: u64, s: u32| Some(object(0, s));
        let v = book.apply_scan(1, &seen(&[cand(0x10, 5)]), live, site, 2000, None, false);
        assert!(v.findings.is_empty());
        assert_eq!(v.pending, 1);
        let v = book.apply_scan(1, &seen(&[cand(0x10, 5)]), live, site, 3000, None, false);
        assert_eq!(v.findings.len(), 1);
        assert_eq!(v.findings[0].addr, 0x10);
        // Reported once only.
        let v = book.apply_scan(1, &seen(&[cand(0x10, 5)]), live, site, 4000, None, false);
        assert!(v.findings.is_empty());
        assert_eq!(book.reported(1).len(), 1);
    }

    #[test]
    fn young_or_changing_objects_wait() {
        let mut book = VerdictBook::new(params());
        let young = |_: u64, s: u32| Some(object(2500, s));
        book.apply_scan(1, &seen(&[cand(0x10, 1)]), young, site, 3000, None, false);
        let v = book.apply_scan(1, &seen(&[cand(0x10, 1)]), young, site, 3400, None, false);
        assert!(v.findings.is_empty(), "only 900 ms old");
        let old = |_: u64, s: u32| Some(object(0, s));
        let mut book = VerdictBook::new(params());
        book.apply_scan(1, &seen(&[cand(0x10, 1)]), old, site, 3000, None, false);
        let v = book.apply_scan(1, &seen(&[cand(0x10, 2)]), old, site, 4000, None, false);
        assert!(v.findings.is_empty(), "contents changed");
        let v = book.apply_scan(1, &seen(&[cand(0x10, 2)]), old, site, 5000, None, false);
        assert_eq!(v.findings.len(), 1);
    }

    #[test]
    fn objects_alive_at_a_lost_free_are_withheld() {
        let mut book = VerdictBook::new(params());
        let live = |_: u64, s: u32| Some(object(100, s));
        book.apply_scan(
            1,
            &seen(&[cand(0x10, 1)]),
            live,
            site,
            2000,
            Some(500),
            false,
        );
        let v = book.apply_scan(
            1,
            &seen(&[cand(0x10, 1)]),
            live,
            site,
            3000,
            Some(500),
            false,
        );
        assert_eq!((v.findings.len(), v.withheld), (0, 1));
        let v = book.apply_scan(
            1,
            &seen(&[cand(0x10, 1)]),
            live,
            site,
            3000,
            Some(50),
            false,
        );
        assert_eq!(v.findings.len(), 1, "born after the loss");
    }

    #[test]
    fn reported_leaks_are_retracted_when_freed_or_reached() {
        let mut book = book_with_two_leaks();
        let live = |_: u64, s: u32| Some(object(0, s));
        let r = book.on_gone(1, 0x10, &object(0, 1), RetractionReason::Freed);
        assert_eq!(r.map(|r| r.reason), Some(RetractionReason::Freed));
        let v = book.apply_scan(1, &seen(&[]), live, site, 4000, None, false);
        assert_eq!(v.retractions.len(), 1);
        assert_eq!(v.retractions[0].reason, RetractionReason::Reachable);
        assert!(book.reported(1).is_empty());
    }

    #[test]
    fn an_exact_scan_confirms_at_once() {
        let mut book = VerdictBook::new(params());
        let young = |_: u64, s: u32| Some(object(2900, s));
        let v = book.apply_scan(1, &seen(&[cand(0x10, 1)]), young, site, 3000, None, true);
        assert_eq!(v.findings.len(), 1);
    }

    #[test]
    fn a_new_life_at_the_same_address_starts_over() {
        let mut book = VerdictBook::new(params());
        let first = |_: u64, _: u32| Some(object(0, 1));
        book.apply_scan(1, &seen(&[cand(0x10, 1)]), first, site, 2000, None, false);
        let mut again = cand(0x10, 1);
        again.serial = 2;
        let second = |_: u64, _: u32| Some(object(0, 2));
        let v = book.apply_scan(1, &seen(&[again]), second, site, 3000, None, false);
        assert!(v.findings.is_empty());
        // A candidate whose object has gone is skipped.
        let v = book.apply_scan(1, &seen(&[again]), |_, _| None, site, 4000, None, false);
        assert!(v.findings.is_empty());
    }

    /// Two scans that confirm 0x10 and 0x20 as leaks.
    fn book_with_two_leaks() -> VerdictBook {
        let mut book = VerdictBook::new(params());
        let live = |_: u64, s: u32| Some(object(0, s));
        for now in [2000, 3000] {
            book.apply_scan(
                1,
                &seen(&[cand(0x10, 7), cand(0x20, 7)]),
                live,
                site,
                now,
                None,
                false,
            );
        }
        assert_eq!(book.reported(1).len(), 2);
        book
    }

    #[test]
    fn an_incomplete_scan_decides_nothing() {
        let mut book = book_with_two_leaks();
        let live = |_: u64, s: u32| Some(object(0, s));
        // The target died mid-scan: nothing could be read, nothing is a candidate.
        let dead = Observation {
            complete: false,
            ..Observation::default()
        };
        let v = book.apply_scan(1, &dead, live, site, 4000, None, false);
        assert!(v.incomplete && v.retractions.is_empty() && v.findings.is_empty());
        assert_eq!(book.reported(1).len(), 2);
    }

    #[test]
    fn unreadable_objects_keep_their_verdicts() {
        let mut book = book_with_two_leaks();
        let live = |_: u64, s: u32| Some(object(0, s));
        let partly = Observation {
            candidates: &[],
            unjudged: &[0x10, 0x20],
            complete: true,
            ..Observation::default()
        };
        let v = book.apply_scan(1, &partly, live, site, 4000, None, false);
        assert!(v.retractions.is_empty());
        assert_eq!(book.reported(1).len(), 2);
    }

    #[test]
    fn a_stale_copy_of_a_lost_address_does_not_retract_it() {
        let mut book = book_with_two_leaks();
        let live = |_: u64, s: u32| Some(object(0, s));
        // Both found reachable; 0x10 unchanged (a stale copy), 0x20 written to.
        let reached = Observation {
            watched_reached: &[(0x10, 7), (0x20, 8)],
            complete: true,
            ..Observation::default()
        };
        let v = book.apply_scan(1, &reached, live, site, 4000, None, false);
        assert_eq!(v.stale_references, 1);
        assert_eq!(
            v.retractions.iter().map(|r| r.addr).collect::<Vec<_>>(),
            vec![0x20]
        );
        assert_eq!(
            book.reported(1).iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![0x10]
        );
    }

    #[test]
    fn an_indirect_leak_waits_for_its_root() {
        let mut book = VerdictBook::new(params());
        // The root (0x10) is young; its child (0x20) is old.
        let lookup = |a: u64, s: u32| Some(object(if a == 0x10 { 2500 } else { 0 }, s));
        let child = Candidate {
            kind: LeakKind::Indirect,
            root: Some(0x10),
            ..cand(0x20, 1)
        };
        let both = [cand(0x10, 1), child];
        book.apply_scan(1, &seen(&both), lookup, site, 3000, None, false);
        let v = book.apply_scan(1, &seen(&both), lookup, site, 3400, None, false);
        assert!(v.findings.is_empty(), "the child waits for its root");
        let v = book.apply_scan(1, &seen(&both), lookup, site, 4000, None, false);
        let mut found: Vec<u64> = v.findings.iter().map(|f| f.addr).collect();
        found.sort_unstable();
        assert_eq!(found, vec![0x10, 0x20]);
    }
}
