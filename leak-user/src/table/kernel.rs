//! Outstanding kernel objects, by address, and their totals per allocation site.
//!
//! The same single-mutex design as the user table: the ingest task applies events
//! in ring order, the session takes summaries briefly under the lock. Kernel memory
//! cannot be scanned from user space, so this table answers "what is outstanding,
//! where was it allocated, by whom, since when" and the growth tracker
//! ([`super::growth`]) turns the per-site counts into suspected leaks.

use std::collections::{BTreeMap, hash_map::Entry};

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::events::{Event, KernelAlloc};

/// Where kernel objects are allocated: call site, stack, slab cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelSite {
    pub call_site: u64,
    /// Key into the kernel stack map; 0 when none.
    pub stack_id: u64,
    /// Slab cache name; empty for kmalloc (and pages).
    pub cache: String,
    pub page: bool,
}

impl KernelSite {
    /// The call site this stack belongs to.
    fn call_site_key(&self) -> CallSiteKey {
        CallSiteKey {
            call_site: self.call_site,
            cache: self.cache.clone(),
            page: self.page,
        }
    }
}

/// A call site: the allocating instruction (and slab cache), whatever the stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallSiteKey {
    pub call_site: u64,
    pub cache: String,
    pub page: bool,
}

/// One outstanding object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KernelObject {
    bytes: u32,
    birth_ms: u32,
    site: u32,
    pid: u32,
}

/// Totals of one site.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SiteTotals {
    outstanding: u64,
    bytes: u64,
    allocated: u64,
    freed: u64,
    /// Outstanding objects by the process that allocated them (0: the idle task).
    by_pid: FxHashMap<u32, u64>,
}

/// Which tracepoint programs see kernel frees (`--free-probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FreeProbes {
    /// A raw and a classic program on each free tracepoint: one covers for the other.
    #[default]
    Both,
    /// Raw tracepoints only.
    Raw,
    /// Classic tracepoints only.
    Classic,
}

impl FreeProbes {
    pub fn raw(self) -> bool {
        self != Self::Classic
    }

    pub fn classic(self) -> bool {
        self != Self::Raw
    }
}

/// Counters of the kernel event stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelCounters {
    pub allocs: u64,
    pub frees: u64,
    /// Frees of objects allocated before tracing started (or lost allocations).
    pub untracked_frees: u64,
    /// Allocations at an address still outstanding: the free in between was lost.
    pub replaced: u64,
    /// Allocations from slab caches other than `--cache`.
    pub filtered: u64,
    /// Allocations made by leaktrace itself (loading programs, reading /proc),
    /// left out unless `--include-tracer`.
    pub tracer: u64,
}

/// The figures of a stack or a call site at one moment, for reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub outstanding: u64,
    pub bytes: u64,
    pub allocated: u64,
    pub freed: u64,
    /// Outstanding objects at least `--min-age` old.
    pub aged: u64,
    pub aged_bytes: u64,
    /// Age percentiles of the outstanding objects, in ms.
    pub age_p50_ms: u64,
    pub age_p90_ms: u64,
    pub age_max_ms: u64,
    /// (pid, comm, outstanding objects), most first, at most three.
    pub top_pids: Vec<(u32, String, u64)>,
}

/// One allocation stack (of one call site) with outstanding objects.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSummary {
    pub site: u32,
    pub key: KernelSite,
    pub figures: Figures,
}

/// One call site with outstanding objects, all its stacks together.
#[derive(Clone, Debug, PartialEq)]
pub struct CallSiteSummary {
    pub index: u32,
    pub key: CallSiteKey,
    pub figures: Figures,
    /// Its stacks with outstanding objects, largest first.
    pub stacks: Vec<SiteSummary>,
}

/// All outstanding kernel objects we saw being allocated.
pub struct KernelTable {
    epoch_ns: u64,
    objects: FxHashMap<u64, KernelObject>,
    sites: Vec<KernelSite>,
    site_index: FxHashMap<KernelSite, u32>,
    totals: Vec<SiteTotals>,
    /// The call site (index into `call_sites`) of each site.
    call_site_of: Vec<u32>,
    call_sites: Vec<CallSiteKey>,
    call_site_index: FxHashMap<CallSiteKey, u32>,
    comms: FxHashMap<u32, String>,
    cgroups: FxHashMap<u32, u64>,
    caches: Vec<String>,
    /// Allocations of this process (leaktrace's own) are left out.
    tracer_pid: Option<u32>,
    outstanding_bytes: u64,
    pub counters: KernelCounters,
}

impl KernelTable {
    /// `caches`: keep only these slab caches (all when empty).
    pub fn new(epoch_ns: u64, caches: Vec<String>) -> Self {
        Self {
            epoch_ns,
            objects: FxHashMap::default(),
            sites: Vec::new(),
            site_index: FxHashMap::default(),
            totals: Vec::new(),
            call_site_of: Vec::new(),
            call_sites: Vec::new(),
            call_site_index: FxHashMap::default(),
            comms: FxHashMap::default(),
            cgroups: FxHashMap::default(),
            caches,
            tracer_pid: None,
            outstanding_bytes: 0,
            counters: KernelCounters::default(),
        }
    }

    /// Leaves the allocations of process `pid` (the tracer's) out.
    pub fn exclude_tracer(&mut self, pid: u32) {
        self.tracer_pid = Some(pid);
    }

    fn ms(&self, ts_ns: u64) -> u32 {
        u32::try_from(ts_ns.saturating_sub(self.epoch_ns) / 1_000_000).unwrap_or(u32::MAX)
    }

    /// Outstanding objects and their bytes.
    pub fn outstanding(&self) -> (u64, u64) {
        (self.objects.len() as u64, self.outstanding_bytes)
    }

    /// The cgroup id of a process, as last seen.
    pub fn cgroup_of(&self, pid: u32) -> Option<u64> {
        self.cgroups.get(&pid).copied()
    }

    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::KernelAlloc(k) => self.alloc(k),
            Event::KernelFree { ptr, .. } => self.free(*ptr),
            _ => {}
        }
    }

    fn intern(&mut self, key: KernelSite) -> u32 {
        if let Some(&s) = self.site_index.get(&key) {
            return s;
        }
        let group = self.call_site_key_index(key.call_site_key());
        let s = self.sites.len() as u32;
        self.sites.push(key.clone());
        self.site_index.insert(key, s);
        self.totals.push(SiteTotals::default());
        self.call_site_of.push(group);
        s
    }

    fn call_site_key_index(&mut self, key: CallSiteKey) -> u32 {
        if let Some(&g) = self.call_site_index.get(&key) {
            return g;
        }
        let g = self.call_sites.len() as u32;
        self.call_sites.push(key.clone());
        self.call_site_index.insert(key, g);
        g
    }

    fn alloc(&mut self, k: &KernelAlloc) {
        if !self.caches.is_empty() && !self.caches.contains(&k.cache) {
            self.counters.filtered += 1;
            return;
        }
        if self.tracer_pid == Some(k.tgid) {
            self.counters.tracer += 1;
            return;
        }
        self.counters.allocs += 1;
        let site = self.intern(KernelSite {
            call_site: k.call_site,
            stack_id: k.stack_id,
            cache: k.cache.clone(),
            page: k.page,
        });
        // pid 0: the idle task (an allocation in an interrupt that hit it).
        let pid = k.tgid;
        if pid != 0 {
            if self.comms.get(&pid) != Some(&k.comm) {
                self.comms.insert(pid, k.comm.clone());
            }
            self.cgroups.insert(pid, k.cgroup_id);
        }
        let object = KernelObject {
            bytes: u32::try_from(k.bytes_alloc.max(k.bytes_req)).unwrap_or(u32::MAX),
            birth_ms: self.ms(k.ts_ns),
            site,
            pid,
        };
        if let Some(old) = self.objects.insert(k.ptr, object) {
            self.counters.replaced += 1;
            self.release(old);
        }
        self.outstanding_bytes += u64::from(object.bytes);
        let t = &mut self.totals[site as usize];
        t.outstanding += 1;
        t.bytes += u64::from(object.bytes);
        t.allocated += 1;
        *t.by_pid.entry(pid).or_default() += 1;
    }

    fn release(&mut self, o: KernelObject) {
        self.outstanding_bytes -= u64::from(o.bytes);
        let t = &mut self.totals[o.site as usize];
        t.outstanding -= 1;
        t.bytes -= u64::from(o.bytes);
        t.freed += 1;
        if let Entry::Occupied(mut e) = t.by_pid.entry(o.pid) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    fn free(&mut self, ptr: u64) {
        self.counters.frees += 1;
        match self.objects.remove(&ptr) {
            Some(o) => self.release(o),
            None => self.counters.untracked_frees += 1,
        }
    }

    /// Outstanding counts of every stack site, by site index (for the growth tracker).
    pub fn outstanding_by_site(&self) -> Vec<u64> {
        self.totals.iter().map(|t| t.outstanding).collect()
    }

    /// Outstanding counts of every call site, by call-site index.
    pub fn outstanding_by_call_site(&self) -> Vec<u64> {
        let mut out = vec![0; self.call_sites.len()];
        for (t, &g) in self.totals.iter().zip(&self.call_site_of) {
            out[g as usize] += t.outstanding;
        }
        out
    }

    fn comm(&self, pid: u32) -> String {
        if pid == 0 {
            "[idle]".to_owned()
        } else {
            self.comms.get(&pid).cloned().unwrap_or_default()
        }
    }

    /// The figures of a set of sites, whose outstanding objects' ages are `ages`.
    fn figures<'a>(
        &self,
        totals: impl Iterator<Item = &'a SiteTotals>,
        ages: &mut [u32],
        aged: (u64, u64),
    ) -> Figures {
        let mut f = Figures::default();
        let mut by_pid: FxHashMap<u32, u64> = FxHashMap::default();
        for t in totals {
            f.outstanding += t.outstanding;
            f.bytes += t.bytes;
            f.allocated += t.allocated;
            f.freed += t.freed;
            for (&pid, &n) in &t.by_pid {
                *by_pid.entry(pid).or_default() += n;
            }
        }
        ages.sort_unstable();
        let pct = |p: usize| {
            if ages.is_empty() {
                0
            } else {
                u64::from(ages[(ages.len() - 1) * p / 100])
            }
        };
        (f.age_p50_ms, f.age_p90_ms, f.age_max_ms) = (pct(50), pct(90), pct(100));
        (f.aged, f.aged_bytes) = aged;
        let mut top: Vec<(u32, String, u64)> = by_pid
            .into_iter()
            .map(|(pid, n)| (pid, self.comm(pid), n))
            .collect();
        top.sort_by(|x, y| y.2.cmp(&x.2).then(x.0.cmp(&y.0)));
        top.truncate(3);
        f.top_pids = top;
        f
    }

    /// Summaries of the call sites with outstanding objects, largest (in bytes)
    /// first, each with its stacks.
    pub fn summaries(&self, now_ns: u64, min_age_ms: u32) -> Vec<CallSiteSummary> {
        let now = self.ms(now_ns);
        let mut ages: Vec<Vec<u32>> = vec![Vec::new(); self.sites.len()];
        let mut aged = vec![(0u64, 0u64); self.sites.len()];
        for o in self.objects.values() {
            let age = now.saturating_sub(o.birth_ms);
            ages[o.site as usize].push(age);
            if age >= min_age_ms {
                let a = &mut aged[o.site as usize];
                a.0 += 1;
                a.1 += u64::from(o.bytes);
            }
        }
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); self.call_sites.len()];
        for (site, t) in self.totals.iter().enumerate() {
            if t.outstanding > 0 {
                members[self.call_site_of[site] as usize].push(site as u32);
            }
        }
        let mut out = Vec::new();
        for (g, sites) in members.iter().enumerate() {
            if sites.is_empty() {
                continue;
            }
            let mut group_ages: Vec<u32> = sites
                .iter()
                .flat_map(|&s| ages[s as usize].iter().copied())
                .collect();
            let group_aged = sites.iter().fold((0, 0), |(n, b), &s| {
                (n + aged[s as usize].0, b + aged[s as usize].1)
            });
            let figures = self.figures(
                sites.iter().map(|&s| &self.totals[s as usize]),
                &mut group_ages,
                group_aged,
            );
            let mut stacks: Vec<SiteSummary> = sites
                .iter()
                .map(|&s| SiteSummary {
                    site: s,
                    key: self.sites[s as usize].clone(),
                    figures: self.figures(
                        std::iter::once(&self.totals[s as usize]),
                        &mut ages[s as usize],
                        aged[s as usize],
                    ),
                })
                .collect();
            stacks.sort_by(|a, b| (b.figures.bytes, a.site).cmp(&(a.figures.bytes, b.site)));
            out.push(CallSiteSummary {
                index: g as u32,
                key: self.call_sites[g].clone(),
                figures,
                stacks,
            });
        }
        out.sort_by(|a, b| (b.figures.bytes, a.index).cmp(&(a.figures.bytes, b.index)));
        out
    }
}

/// How the raw and the classic free programs shared the frees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FreeProbeShare {
    pub raw_recorded: u64,
    pub raw_deferred: u64,
    pub raw_skipped: u64,
    pub classic_recorded: u64,
    pub classic_deferred: u64,
    pub classic_skipped: u64,
}

/// The programs attached to the free tracepoints, by kind.
pub const RAW_FREE_PROGRAMS: [&str; 2] = ["kfree_raw", "kmem_cache_free_raw"];
pub const CLASSIC_FREE_PROGRAMS: [&str; 2] = ["kfree", "kmem_cache_free"];

impl FreeProbeShare {
    /// `counts` indexed by [`leak_common::FreeProbeCount`]; `misses`: recursion
    /// misses by program name.
    pub fn new(counts: [u64; 4], misses: &BTreeMap<String, u64>) -> Self {
        let skipped = |names: &[&str]| names.iter().filter_map(|n| misses.get(*n)).sum();
        Self {
            raw_recorded: counts[0],
            raw_deferred: counts[1],
            raw_skipped: skipped(&RAW_FREE_PROGRAMS),
            classic_recorded: counts[2],
            classic_deferred: counts[3],
            classic_skipped: skipped(&CLASSIC_FREE_PROGRAMS),
        }
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            raw_recorded: self.raw_recorded.saturating_sub(earlier.raw_recorded),
            raw_deferred: self.raw_deferred.saturating_sub(earlier.raw_deferred),
            raw_skipped: self.raw_skipped.saturating_sub(earlier.raw_skipped),
            classic_recorded: self
                .classic_recorded
                .saturating_sub(earlier.classic_recorded),
            classic_deferred: self
                .classic_deferred
                .saturating_sub(earlier.classic_deferred),
            classic_skipped: self.classic_skipped.saturating_sub(earlier.classic_skipped),
        }
    }

    /// Frees both programs skipped, at least. Each free is run or skipped by each
    /// program; when both run, one records and one defers; when one runs, it
    /// records. So skips = one-run frees + 2 × no-run frees, and recorded −
    /// deferred = one-run frees (+ 2 × the rare free recorded twice, which makes
    /// this a lower bound).
    pub fn missed_by_both(&self) -> u64 {
        let skipped = self.raw_skipped + self.classic_skipped;
        let recorded = self.raw_recorded + self.classic_recorded;
        let deferred = self.raw_deferred + self.classic_deferred;
        (skipped + deferred).saturating_sub(recorded) / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(ptr: u64, call_site: u64, pid: u32, ts_ms: u64) -> Event {
        Event::KernelAlloc(KernelAlloc {
            tgid: pid,
            tid: pid,
            in_irq: false,
            page: false,
            ts_ns: ts_ms * 1_000_000,
            ptr,
            call_site,
            bytes_req: 60,
            bytes_alloc: 64,
            stack_id: 0,
            cgroup_id: 7,
            cache: String::new(),
            comm: format!("proc{pid}"),
        })
    }

    fn free(ptr: u64) -> Event {
        Event::KernelFree { ptr, page: false }
    }

    #[test]
    fn tracks_outstanding_objects_per_site_and_process() {
        let mut t = KernelTable::new(0, Vec::new());
        for i in 0..10 {
            t.apply(&alloc(0x1000 + i * 64, 0xffff_0001, 5, i * 100));
        }
        t.apply(&alloc(0x9000, 0xffff_0002, 6, 0));
        t.apply(&free(0x1000));
        t.apply(&free(0x5555)); // allocated before we started
        assert_eq!(t.outstanding(), (10, 640));
        assert_eq!(t.counters.untracked_frees, 1);
        let s = t.summaries(2_000_000_000, 1500);
        assert_eq!(s.len(), 2);
        let f = &s[0].figures;
        assert_eq!((f.outstanding, f.allocated, f.freed), (9, 10, 1));
        assert_eq!(f.top_pids, vec![(5, "proc5".into(), 9)]);
        assert_eq!(f.age_max_ms, 1900);
        assert_eq!(f.age_p50_ms, 1500);
        assert_eq!(f.aged, 5, "born at 100..=500 ms");
        assert_eq!(t.cgroup_of(5), Some(7));
    }

    #[test]
    fn an_allocation_over_a_live_object_retires_it() {
        let mut t = KernelTable::new(0, Vec::new());
        t.apply(&alloc(0x1000, 1, 5, 0));
        t.apply(&alloc(0x1000, 2, 5, 0));
        assert_eq!(t.counters.replaced, 1);
        assert_eq!(t.outstanding_by_site(), vec![0, 1]);
    }

    #[test]
    fn cache_filter_keeps_only_named_caches() {
        let mut t = KernelTable::new(0, vec!["filp".into()]);
        t.apply(&alloc(0x1000, 1, 5, 0));
        let Event::KernelAlloc(mut k) = alloc(0x2000, 1, 5, 0) else {
            unreachable!()
        };
        k.cache = "filp".into();
        t.apply(&Event::KernelAlloc(k));
        assert_eq!(t.outstanding().0, 1);
        assert_eq!(t.counters.filtered, 1);
    }

    #[test]
    fn call_sites_gather_their_stacks() {
        let mut t = KernelTable::new(0, Vec::new());
        let with_stack = |ptr, call_site, stack_id, pid| {
            let Event::KernelAlloc(mut k) = alloc(ptr, call_site, pid, 0) else {
                unreachable!()
            };
            k.stack_id = stack_id;
            Event::KernelAlloc(k)
        };
        t.apply(&with_stack(0x1000, 1, 10, 5));
        t.apply(&with_stack(0x2000, 1, 10, 5));
        t.apply(&with_stack(0x3000, 1, 11, 6));
        t.apply(&with_stack(0x4000, 2, 12, 6));
        t.apply(&free(0x4000));
        assert_eq!(t.outstanding_by_site(), vec![2, 1, 0]);
        assert_eq!(t.outstanding_by_call_site(), vec![3, 0]);
        let s = t.summaries(1_000_000_000, 0);
        assert_eq!(s.len(), 1, "call site 2 has nothing outstanding");
        assert_eq!(s[0].figures.outstanding, 3);
        assert_eq!(s[0].figures.bytes, 192);
        assert_eq!(
            s[0].figures.top_pids,
            vec![(5, "proc5".into(), 2), (6, "proc6".into(), 1)]
        );
        let stacks: Vec<(u64, u64)> = s[0]
            .stacks
            .iter()
            .map(|x| (x.key.stack_id, x.figures.outstanding))
            .collect();
        assert_eq!(stacks, vec![(10, 2), (11, 1)]);
    }
}

#[cfg(test)]
mod free_probe_tests {
    use super::*;

    fn misses(raw: u64, classic: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([
            ("kfree_raw".to_owned(), raw),
            ("kmem_cache_free".to_owned(), classic),
            ("kmalloc".to_owned(), 1000),
        ])
    }

    #[test]
    fn every_free_covered_by_one_probe_is_not_missed() {
        // 100 frees: 90 seen by both (raw first), 7 only by classic, 3 only by raw.
        let share = FreeProbeShare::new([93, 0, 7, 90], &misses(7, 3));
        assert_eq!(share.missed_by_both(), 0);
    }

    #[test]
    fn frees_skipped_by_both_are_counted() {
        // 100 frees: 90 by both, 6 only by classic, 4 by neither.
        let share = FreeProbeShare::new([90, 0, 6, 90], &misses(10, 4));
        assert_eq!(share.missed_by_both(), 4);
        assert_eq!(share.raw_skipped, 10);
        assert_eq!(share.classic_skipped, 4);
    }
}
