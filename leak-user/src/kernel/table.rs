//! Outstanding kernel objects, by address, and their totals per allocation site.
//!
//! The same single-mutex design as the user table: the ingest task applies events
//! in ring order, the session takes summaries briefly under the lock. Kernel memory
//! cannot be scanned from user space, so this table answers "what is outstanding,
//! where was it allocated, by whom, since when" and the growth tracker
//! ([`super::growth`]) turns the per-site counts into suspected leaks.

use std::collections::hash_map::Entry;

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
pub struct SiteTotals {
    pub outstanding: u64,
    pub bytes: u64,
    pub allocated: u64,
    pub freed: u64,
    /// Outstanding objects by the process that allocated them (0: interrupt context).
    pub by_pid: FxHashMap<u32, u64>,
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
}

/// A site's figures at one moment, for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteSummary {
    pub site: u32,
    pub key: KernelSite,
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
    /// (pid, comm, outstanding objects), most first.
    pub top_pids: Vec<(u32, String, u64)>,
}

/// All outstanding kernel objects we saw being allocated.
pub struct KernelTable {
    epoch_ns: u64,
    objects: FxHashMap<u64, KernelObject>,
    sites: Vec<KernelSite>,
    site_index: FxHashMap<KernelSite, u32>,
    totals: Vec<SiteTotals>,
    comms: FxHashMap<u32, String>,
    cgroups: FxHashMap<u32, u64>,
    caches: Vec<String>,
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
            comms: FxHashMap::default(),
            cgroups: FxHashMap::default(),
            caches,
            counters: KernelCounters::default(),
        }
    }

    fn ms(&self, ts_ns: u64) -> u32 {
        u32::try_from(ts_ns.saturating_sub(self.epoch_ns) / 1_000_000).unwrap_or(u32::MAX)
    }

    pub fn outstanding(&self) -> (u64, u64) {
        (
            self.objects.len() as u64,
            self.objects.values().map(|o| u64::from(o.bytes)).sum(),
        )
    }

    pub fn site(&self, site: u32) -> Option<&KernelSite> {
        self.sites.get(site as usize)
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

    fn alloc(&mut self, k: &KernelAlloc) {
        if !self.caches.is_empty() && !self.caches.contains(&k.cache) {
            self.counters.filtered += 1;
            return;
        }
        self.counters.allocs += 1;
        let key = KernelSite {
            call_site: k.call_site,
            stack_id: k.stack_id,
            cache: k.cache.clone(),
            page: k.page,
        };
        let site = match self.site_index.get(&key) {
            Some(&s) => s,
            None => {
                let s = self.sites.len() as u32;
                self.sites.push(key.clone());
                self.site_index.insert(key, s);
                self.totals.push(SiteTotals::default());
                s
            }
        };
        // pid 0: the idle task (an allocation in an interrupt that hit it).
        let pid = k.tgid;
        if pid != 0 {
            self.comms.insert(pid, k.comm.clone());
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
        let t = &mut self.totals[site as usize];
        t.outstanding += 1;
        t.bytes += u64::from(object.bytes);
        t.allocated += 1;
        *t.by_pid.entry(pid).or_default() += 1;
    }

    fn release(&mut self, o: KernelObject) {
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

    /// Outstanding counts of every site (for the growth tracker).
    pub fn outstanding_by_site(&self) -> Vec<u64> {
        self.totals.iter().map(|t| t.outstanding).collect()
    }

    /// Summaries of the sites with outstanding objects, largest first.
    pub fn summaries(&self, now_ns: u64, min_age_ms: u32) -> Vec<SiteSummary> {
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
        let mut out = Vec::new();
        for (i, t) in self.totals.iter().enumerate() {
            if t.outstanding == 0 {
                continue;
            }
            let a = &mut ages[i];
            a.sort_unstable();
            let pct = |p: usize| u64::from(a.get((a.len() - 1) * p / 100).copied().unwrap_or(0));
            let mut top: Vec<(u32, String, u64)> = t
                .by_pid
                .iter()
                .map(|(&pid, &n)| {
                    let comm = if pid == 0 {
                        "[idle]".to_owned()
                    } else {
                        self.comms.get(&pid).cloned().unwrap_or_default()
                    };
                    (pid, comm, n)
                })
                .collect();
            top.sort_by(|x, y| y.2.cmp(&x.2).then(x.0.cmp(&y.0)));
            top.truncate(3);
            out.push(SiteSummary {
                site: i as u32,
                key: self.sites[i].clone(),
                outstanding: t.outstanding,
                bytes: t.bytes,
                allocated: t.allocated,
                freed: t.freed,
                aged: aged[i].0,
                aged_bytes: aged[i].1,
                age_p50_ms: pct(50),
                age_p90_ms: pct(90),
                age_max_ms: pct(100),
                top_pids: top,
            });
        }
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.site.cmp(&b.site)));
        out
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
        Event::KernelFree {
            ptr,
            page: false,
            ts_ns: 0,
        }
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
        assert_eq!((s[0].outstanding, s[0].allocated, s[0].freed), (9, 10, 1));
        assert_eq!(s[0].top_pids, vec![(5, "proc5".into(), 9)]);
        assert_eq!(s[0].age_max_ms, 1900);
        assert_eq!(s[0].aged, 5, "born at 100..=500 ms");
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
}
