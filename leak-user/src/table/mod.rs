//! The table of live objects: every block the traced processes hold, by process and
//! address, with where and when it was allocated.
//!
//! One `Mutex<Table>` guards all of it (see ARCHITECTURE.md: kmemleak found that
//! finer locking buys nothing). The ingest task applies events in ring order; the
//! scanner takes a [`Snapshot`] under the lock, releases it while it reads target
//! memory, and re-takes it briefly to apply verdicts.
//!
//! The table stays honest when events are lost:
//! * an allocation that overlaps a live object proves the old one was freed unseen:
//!   the old one is retired and counted;
//! * objects inside a range that is unmapped (or below a lowered program break) are
//!   gone: dropped and counted;
//! * a free of an address the table does not hold is counted, never fatal (in pid
//!   mode most of those are blocks allocated before we attached).

pub mod growth;
pub mod kernel;
pub mod ranges;
pub mod shared;
pub mod sites;
pub mod verdict;

use std::{collections::BTreeMap, ops::Range};

use leak_common::AllocFn;
use rustc_hash::FxHashMap;

use self::verdict::{Observation, Retraction, RetractionReason, ScanVerdicts, VerdictBook};
pub use self::{
    ranges::RangeSet,
    shared::{Shared, SharedTable},
    sites::{AllocSite, SiteInterner},
};
use crate::events::{Alloc, Event};

const PAGE_SIZE: u64 = 4096;

/// One live block. Kept small (20 bytes): a table holds millions of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Object {
    /// Low 32 bits of the requested size.
    size_low: u32,
    /// High 8 bits of the size (blocks up to 1 TiB), and the allocating thread
    /// (24 bits: Linux thread ids stay below 2^22).
    size_high_tid: u32,
    /// Milliseconds since the tracer started.
    pub birth_ms: u32,
    /// Key into the table's [`SiteInterner`].
    pub site: u32,
    /// Distinguishes two lives of one address (wraps; only compared for equality
    /// across a few seconds).
    pub serial: u32,
}

impl Object {
    const MAX_SIZE: u64 = (1 << 40) - 1;
    const TID_MASK: u32 = (1 << 24) - 1;

    pub fn new(size: u64, birth_ms: u32, site: u32, tid: u32, serial: u32) -> Self {
        let size = size.min(Self::MAX_SIZE);
        Self {
            size_low: size as u32,
            size_high_tid: ((size >> 32) as u32) << 24 | (tid & Self::TID_MASK),
            birth_ms,
            site,
            serial,
        }
    }

    /// Requested size in bytes.
    pub fn size(&self) -> u64 {
        u64::from(self.size_high_tid >> 24) << 32 | u64::from(self.size_low)
    }

    /// The allocating thread.
    pub fn tid(&self) -> u32 {
        self.size_high_tid & Self::TID_MASK
    }

    /// The bytes a pointer can point into: a zero-sized block still owns one.
    pub fn span(&self) -> u64 {
        self.size().max(1)
    }
}

/// One traced process's objects and what we know of its memory.
#[derive(Clone, Debug, Default)]
pub struct ProcessTable {
    pub objects: BTreeMap<u64, Object>,
    pub live_bytes: u64,
    /// Memory the allocator mapped for itself since we attached.
    pub owned: RangeSet,
    /// Attached late only: memory of blocks freed since we attached. Free chunks
    /// keep their old contents, stale pointers to blocks that may be live again, so
    /// this memory is never a root. Where it holds a block again, the block is
    /// scanned as an object, so nothing is removed on allocation (the ingest path
    /// stays one lookup per free of memory already freed once).
    pub freed: RangeSet,
    /// The last program break we saw.
    pub brk: Option<u64>,
    /// The process allocated before we attached (pid mode), so untracked heap memory
    /// may hold blocks we never saw.
    pub attached_late: bool,
    /// Between the start of a heap walk and the adoption of its blocks: frees of
    /// addresses the table does not hold (so that a block freed after the walk
    /// read it is not adopted).
    pub freed_during_walk: Option<rustc_hash::FxHashSet<u64>>,
}

impl ProcessTable {
    fn new(attached_late: bool) -> Self {
        Self {
            attached_late,
            ..Self::default()
        }
    }

    /// Removes and returns the object at exactly `addr`.
    fn take(&mut self, addr: u64) -> Option<Object> {
        let object = self.objects.remove(&addr)?;
        self.live_bytes -= object.size();
        Some(object)
    }
}

/// Everything the counters say about the event stream; reported in stats records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub allocs: u64,
    pub frees: u64,
    pub reallocs: u64,
    /// Frees of addresses the table did not hold (pid mode: mostly blocks allocated
    /// before attaching; otherwise double or invalid frees, or lost allocations).
    pub untracked_frees: u64,
    /// Live objects retired because a new allocation overlapped them (their free was lost).
    pub overlap_retired: u64,
    /// Objects dropped because their memory was unmapped or trimmed from the heap.
    pub unmapped_dropped: u64,
    /// Objects dropped because their process called execve.
    pub exec_dropped: u64,
    /// realloc calls that failed (the old block stays).
    pub failed_reallocs: u64,
    /// Ring-buffer records that could not be decoded.
    pub decode_errors: u64,
    /// Retractions of reported leaks (their blocks were freed or became reachable).
    pub retractions: u64,
    /// Allocations reported for a process the table does not track (it had ended).
    pub foreign: u64,
}

/// What the ingest side must tell the user about, drained by the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A reported leak turned out not to be one.
    Retraction(Retraction),
    ProcessForked {
        parent: u32,
        child: u32,
    },
    ProcessExited {
        pid: u32,
    },
    ProcessExeced {
        pid: u32,
    },
}

/// What the scanner needs of one process, copied under the lock.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// (address, object), sorted by address.
    pub objects: Vec<(u64, Object)>,
    /// Memory that is never a root: what the allocator mapped for itself since we
    /// attached, and (attached late) blocks freed since then. Not sorted.
    pub owned: Vec<Range<u64>>,
    pub attached_late: bool,
    /// Reported leaks (sorted addresses): the scan checksums them even when it
    /// finds them reachable, to tell a stale copy of their address from use.
    pub watched: Vec<u64>,
    /// What the scan needs to know of each allocation site the objects name, by
    /// site key (a few hundred sites for a million objects: copied per site, not
    /// per object, under the lock).
    pub sites: Vec<SiteTraits>,
}

impl Snapshot {
    /// The traits of the site of object `i`.
    pub fn traits(&self, i: usize) -> SiteTraits {
        self.objects
            .get(i)
            .and_then(|(_, o)| self.sites.get(o.site as usize))
            .copied()
            .unwrap_or_default()
    }
}

/// What a scan needs to know of an allocation site.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteTraits {
    /// Allocated by `operator new` (valgrind applies some of its heuristics to
    /// those only).
    pub by_new: bool,
    /// Sizes are the allocator's usable sizes, not the requested ones (blocks the
    /// heap walk found, allocated before we attached).
    pub usable_size: bool,
}

impl SiteTraits {
    fn of(site: &AllocSite) -> Self {
        Self {
            by_new: matches!(
                site.func,
                AllocFn::OperatorNew | AllocFn::OperatorNewAligned
            ),
            usable_size: site.before_attach,
        }
    }
}

/// Whether the object at `a` reaches past `addr`, for one starting below the end
/// of a block at `addr`: then the two overlap.
fn reaches_past(a: u64, o: &Object, addr: u64) -> bool {
    a > addr || a.saturating_add(o.span()) > addr
}

/// A realloc between its entry and its return.
#[derive(Clone, Copy, Debug)]
struct Detached {
    old: u64,
    object: Option<Object>,
    /// The thread already freed `old` inside the realloc (realloc(p, 0) calls
    /// free(p) once): a second free of it is the program's own.
    freed_inside: bool,
}

/// All live objects of all traced processes.
pub struct Table {
    /// CLOCK_MONOTONIC nanoseconds at which the tracer started.
    epoch_ns: u64,
    processes: FxHashMap<u32, ProcessTable>,
    pub sites: SiteInterner,
    pending_reallocs: FxHashMap<(u32, u32), Detached>,
    pub counters: Counters,
    next_serial: u32,
    pub verdicts: VerdictBook,
    notices: Vec<Notice>,
    /// The latest time (ms since start) at which a free may have been lost.
    free_loss_ms: Option<u32>,
}

impl Table {
    pub fn new(epoch_ns: u64, verdicts: VerdictBook) -> Self {
        Self {
            epoch_ns,
            processes: FxHashMap::default(),
            sites: SiteInterner::default(),
            pending_reallocs: FxHashMap::default(),
            counters: Counters::default(),
            next_serial: 0,
            verdicts,
            notices: Vec::new(),
            free_loss_ms: None,
        }
    }

    /// Records that a free may have been lost before `now_ns`: objects alive then
    /// can no longer be confirmed as leaks.
    pub fn note_free_loss(&mut self, now_ns: u64) {
        self.free_loss_ms = Some(self.ms_since_start(now_ns));
    }

    pub fn free_loss_ms(&self) -> Option<u32> {
        self.free_loss_ms
    }

    /// Applies one scan's conclusions: drops the objects found in no mapping
    /// (`unmapped`: address and serial), then runs the verdict rules on what the
    /// scan observed of the objects that are still the same. The verdicts carry
    /// each finding's allocation site and the time of judgement, so that reporting
    /// them needs no further hold of the lock.
    pub fn apply_scan(
        &mut self,
        pid: u32,
        seen: &Observation,
        unmapped: &[(u64, u32)],
        now_ns: u64,
        exact: bool,
    ) -> ScanVerdicts {
        self.drop_unmapped(pid, unmapped);
        let now_ms = self.ms_since_start(now_ns);
        let objects = self.processes.get(&pid).map(|p| &p.objects);
        let lookup =
            |addr: u64, serial: u32| objects?.get(&addr).filter(|o| o.serial == serial).copied();
        let sites = &self.sites;
        self.verdicts.apply_scan(
            pid,
            seen,
            lookup,
            |site| sites.get(site).copied(),
            now_ms,
            self.free_loss_ms,
            exact,
        )
    }

    /// Milliseconds since the tracer started, for a CLOCK_MONOTONIC timestamp.
    pub fn ms_since_start(&self, ts_ns: u64) -> u32 {
        u32::try_from(ts_ns.saturating_sub(self.epoch_ns) / 1_000_000).unwrap_or(u32::MAX)
    }

    pub fn epoch_ns(&self) -> u64 {
        self.epoch_ns
    }

    /// Starts tracking a process. `attached_late` when it may hold blocks we never saw.
    pub fn add_process(&mut self, pid: u32, attached_late: bool) {
        self.processes
            .entry(pid)
            .or_insert_with(|| ProcessTable::new(attached_late));
    }

    pub fn process(&self, pid: u32) -> Option<&ProcessTable> {
        self.processes.get(&pid)
    }

    pub fn process_mut(&mut self, pid: u32) -> Option<&mut ProcessTable> {
        self.processes.get_mut(&pid)
    }

    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.processes.keys().copied().collect();
        pids.sort_unstable();
        pids
    }

    /// Stops tracking a process and forgets its objects.
    pub fn remove_process(&mut self, pid: u32) -> Option<ProcessTable> {
        self.pending_reallocs.retain(|(p, _), _| *p != pid);
        self.verdicts.forget_process(pid);
        self.processes.remove(&pid)
    }

    /// Live objects and bytes over all processes.
    pub fn totals(&self) -> (u64, u64) {
        self.processes.values().fold((0, 0), |(n, b), p| {
            (n + p.objects.len() as u64, b + p.live_bytes)
        })
    }

    /// Objects tracked per process: (pid, objects).
    pub fn objects_per_process(&self) -> Vec<(u32, u64)> {
        self.processes
            .iter()
            .map(|(&pid, p)| (pid, p.objects.len() as u64))
            .collect()
    }

    pub fn has_notices(&self) -> bool {
        !self.notices.is_empty()
    }

    /// Takes what the ingest side has to report since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Part of a snapshot: up to `max` objects from address `from` on, appended to
    /// `snapshot` (whose owned ranges are taken on the first call). Returns where to
    /// continue, or None when done (or when the process is gone).
    pub fn snapshot_part(
        &self,
        pid: u32,
        from: u64,
        max: usize,
        snapshot: &mut Snapshot,
    ) -> Option<u64> {
        let p = self.processes.get(&pid)?;
        if from == 0 {
            // Never roots, either way (the scanner merges the two).
            snapshot.owned = p.owned.iter().chain(p.freed.iter()).collect();
            snapshot.attached_late = p.attached_late;
            snapshot.watched = self.verdicts.reported(pid).iter().map(|r| r.0).collect();
            // One allocation now rather than a copy at every doubling (a caller that
            // reuses its snapshot has the room already).
            snapshot.objects.reserve(p.objects.len());
        }
        let mut next = None;
        for (i, (&a, &o)) in p.objects.range(from..).enumerate() {
            if i == max {
                next = Some(a);
                break;
            }
            snapshot.objects.push((a, o));
        }
        // Sites are only ever added: those interned since the last part.
        let known = snapshot.sites.len();
        snapshot
            .sites
            .extend(self.sites.since(known).iter().map(SiteTraits::of));
        next
    }

    /// Applies one event, in ring order.
    pub fn apply(&mut self, event: &Event) {
        match *event {
            Event::Alloc(ref a) => {
                self.counters.allocs += 1;
                if !self.pending_reallocs.is_empty() {
                    // Nested calls are never recorded: the thread's realloc is
                    // over, and its return record was lost.
                    self.pending_reallocs.remove(&(a.tgid, a.tid));
                }
                let object = self.new_object(a);
                self.insert(a.tgid, a.addr, object);
            }
            Event::Free { tgid, tid, addr } => {
                if let Some(d) = self.pending_reallocs.get_mut(&(tgid, tid))
                    && d.old == addr
                    && !d.freed_inside
                {
                    // realloc(p, 0) calling free(p): part of the realloc, whose
                    // record says what became of the block.
                    d.freed_inside = true;
                    return;
                }
                self.counters.frees += 1;
                if self.release(tgid, addr).is_none() {
                    self.counters.untracked_frees += 1;
                    self.freed_untracked(tgid, addr);
                }
            }
            Event::ReallocDetach { tgid, tid, old } => {
                let object = self.release(tgid, old);
                if object.is_none() {
                    // A block from before attaching that realloc may move: the
                    // walk must not adopt its old address.
                    self.freed_untracked(tgid, old);
                }
                self.pending_reallocs.insert(
                    (tgid, tid),
                    Detached {
                        old,
                        object,
                        freed_inside: false,
                    },
                );
            }
            Event::Realloc { ref alloc, old } => self.apply_realloc(alloc, old),
            Event::AllocatorMap { tgid, addr, len } => {
                if let Some(p) = self.processes.get_mut(&tgid) {
                    p.owned.insert(addr..addr.saturating_add(len));
                }
            }
            Event::Unmap { tgid, addr, len } => {
                let end = addr.saturating_add(len);
                if let Some(p) = self.processes.get_mut(&tgid) {
                    p.owned.remove(addr..end);
                    p.freed.remove(addr..end);
                }
                self.drop_range(tgid, addr..end);
            }
            Event::Brk {
                tgid,
                brk,
                by_allocator,
            } => self.apply_brk(tgid, brk, by_allocator),
            Event::Fork { parent, child } => {
                // The child starts with a copy of the parent's heap.
                let copy = self
                    .processes
                    .get(&parent)
                    .map(|p| ProcessTable {
                        objects: p.objects.clone(),
                        live_bytes: p.live_bytes,
                        owned: p.owned.clone(),
                        freed: p.freed.clone(),
                        brk: p.brk,
                        attached_late: p.attached_late,
                        freed_during_walk: None,
                    })
                    .unwrap_or_default();
                self.processes.insert(child, copy);
                self.notices.push(Notice::ProcessForked { parent, child });
            }
            Event::Exit { tgid } => self.notices.push(Notice::ProcessExited { pid: tgid }),
            Event::Exec { tgid } => {
                if let Some(p) = self.processes.get_mut(&tgid) {
                    self.counters.exec_dropped += p.objects.len() as u64;
                    *p = ProcessTable::new(false);
                }
                self.pending_reallocs.retain(|(p, _), _| *p != tgid);
                self.verdicts.forget_process(tgid);
                self.notices.push(Notice::ProcessExeced { pid: tgid });
            }
            Event::KernelAlloc(_) | Event::KernelFree { .. } => {}
        }
    }

    fn new_object(&mut self, a: &Alloc) -> Object {
        let site = self.sites.intern(AllocSite {
            stack_id: a.stack_id,
            caller: a.caller,
            func: a.func,
            before_attach: false,
        });
        let size = if a.func == AllocFn::Pvalloc {
            a.size.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE
        } else {
            a.size
        };
        self.next_serial = self.next_serial.wrapping_add(1);
        Object::new(
            size,
            self.ms_since_start(a.ts_ns),
            site,
            a.tid,
            self.next_serial,
        )
    }

    fn apply_realloc(&mut self, alloc: &Alloc, old: u64) {
        self.counters.reallocs += 1;
        let detached = self.pending_reallocs.remove(&(alloc.tgid, alloc.tid));
        let detached = match detached {
            Some(d) if d.old == old => d,
            // The detach record was lost: the old block is released now.
            _ => Detached {
                old,
                object: self.release(alloc.tgid, old),
                freed_inside: false,
            },
        };
        if alloc.addr != 0 {
            let object = self.new_object(alloc);
            self.insert(alloc.tgid, alloc.addr, object);
        } else if alloc.size != 0 {
            // Failed: the old block is untouched and still live.
            self.counters.failed_reallocs += 1;
            if let Some(object) = detached.object {
                self.insert(alloc.tgid, detached.old, object);
            }
        }
        // realloc(p, 0) returning NULL freed p: nothing to put back.
    }

    fn apply_brk(&mut self, tgid: u32, brk: u64, by_allocator: bool) {
        let Some(p) = self.processes.get_mut(&tgid) else {
            return;
        };
        let previous = p.brk.replace(brk);
        let Some(previous) = previous else {
            return;
        };
        if brk > previous && by_allocator {
            p.owned.insert(previous..brk);
        } else if brk < previous {
            p.owned.remove(brk..previous);
            p.freed.remove(brk..previous);
            self.drop_range(tgid, brk..previous);
        }
    }

    /// Inserts an object, retiring every live object it overlaps.
    fn insert(&mut self, pid: u32, addr: u64, object: Object) {
        let end = addr.saturating_add(object.span());
        let Some(p) = self.processes.get_mut(&pid) else {
            self.counters.foreign += 1;
            return;
        };
        // The last object starting below `end` overlaps this one unless it ends
        // at or before `addr` (one descent of the tree; usually it does end).
        let overlaps = p
            .objects
            .range(..end)
            .next_back()
            .is_some_and(|(&a, o)| reaches_past(a, o, addr));
        let p = if overlaps {
            self.retire_overlapping(pid, addr, end);
            self.processes.get_mut(&pid).expect("looked up above")
        } else {
            p
        };
        p.live_bytes += object.size();
        if let Some(old) = p.objects.insert(addr, object) {
            p.live_bytes -= old.size();
        }
    }

    /// Retires the objects that overlap `addr..end` (their frees were missed):
    /// walking down from the last one starting below `end` while they reach past
    /// `addr`, retired in address order.
    fn retire_overlapping(&mut self, pid: u32, addr: u64, end: u64) {
        let retired: Vec<u64> = self.processes.get(&pid).map_or_else(Vec::new, |p| {
            p.objects
                .range(..end)
                .rev()
                .take_while(|&(&a, o)| reaches_past(a, o, addr))
                .map(|(&a, _)| a)
                .collect()
        });
        for a in retired.into_iter().rev() {
            self.counters.overlap_retired += 1;
            self.remove(pid, a, RetractionReason::Freed);
        }
    }

    /// The program freed the block at `addr`: removes it and, when we attached
    /// late, remembers its memory as freed.
    fn release(&mut self, pid: u32, addr: u64) -> Option<Object> {
        let p = self.processes.get_mut(&pid)?;
        let object = p.take(addr)?;
        if p.attached_late {
            p.freed
                .insert(addr..addr.saturating_add(object.span().next_multiple_of(8)));
        }
        self.on_gone(pid, addr, &object, RetractionReason::Freed);
        Some(object)
    }

    /// Removes the object at exactly `addr`, retracting it if it was reported.
    fn remove(&mut self, pid: u32, addr: u64, reason: RetractionReason) -> Option<(Object, u64)> {
        let object = self.processes.get_mut(&pid)?.take(addr)?;
        self.on_gone(pid, addr, &object, reason);
        Some((object, addr))
    }

    /// Retracts the object that was at `addr` if it was reported.
    fn on_gone(&mut self, pid: u32, addr: u64, object: &Object, reason: RetractionReason) {
        if let Some(retraction) = self.verdicts.on_gone(pid, addr, object, reason) {
            self.counters.retractions += 1;
            self.notices.push(Notice::Retraction(retraction));
        }
    }

    /// Drops every object that starts inside `range` (its memory is gone).
    fn drop_range(&mut self, pid: u32, range: Range<u64>) {
        let Some(p) = self.processes.get(&pid) else {
            return;
        };
        let gone: Vec<u64> = p.objects.range(range).map(|(&a, _)| a).collect();
        for a in gone {
            self.counters.unmapped_dropped += 1;
            self.remove(pid, a, RetractionReason::Freed);
        }
    }

    /// Drops objects the scanner found in no mapping at all (their memory is gone).
    pub fn drop_unmapped(&mut self, pid: u32, objects: &[(u64, u32)]) {
        for &(addr, serial) in objects {
            let same = self
                .processes
                .get(&pid)
                .and_then(|p| p.objects.get(&addr))
                .is_some_and(|o| o.serial == serial);
            if same {
                self.counters.unmapped_dropped += 1;
                self.remove(pid, addr, RetractionReason::Freed);
            }
        }
    }

    /// An address the table does not hold was freed (or left by realloc):
    /// remembered while a heap walk runs, so that the walk does not adopt it.
    fn freed_untracked(&mut self, tgid: u32, addr: u64) {
        if let Some(set) = self
            .processes
            .get_mut(&tgid)
            .and_then(|p| p.freed_during_walk.as_mut())
        {
            set.insert(addr);
        }
    }

    /// A heap walk of `pid` starts: frees of untracked addresses are remembered
    /// until [`Self::adopt`].
    pub fn begin_walk(&mut self, pid: u32) {
        if let Some(p) = self.processes.get_mut(&pid) {
            p.freed_during_walk = Some(Default::default());
        }
    }

    /// Adds the live blocks a heap walk found as objects allocated before we
    /// attached — except where the table already holds an object (allocated since),
    /// where memory was freed since attaching, and blocks freed since the walk
    /// began. Every event up to now must have been applied. Returns the blocks and
    /// bytes adopted.
    pub fn adopt(&mut self, pid: u32, blocks: &[(u64, u64)]) -> (u64, u64) {
        let Some(p) = self.processes.get_mut(&pid) else {
            return (0, 0);
        };
        let freed_during_walk = p.freed_during_walk.take().unwrap_or_default();
        let site = self.sites.intern(AllocSite::BEFORE_ATTACH);
        let (mut n, mut bytes) = (0, 0);
        for &(addr, size) in blocks {
            let p = self.processes.get(&pid).expect("checked above");
            let end = addr.saturating_add(size.max(1));
            let taken = p
                .objects
                .range(..end)
                .next_back()
                .is_some_and(|(&a, o)| a.saturating_add(o.span()) > addr);
            if taken
                || freed_during_walk.contains(&addr)
                || p.freed.overlapping(addr..end).next().is_some()
            {
                continue;
            }
            self.next_serial = self.next_serial.wrapping_add(1);
            let object = Object::new(size, 0, site, 0, self.next_serial);
            let p = self.processes.get_mut(&pid).expect("checked above");
            p.objects.insert(addr, object);
            p.live_bytes += size;
            n += 1;
            bytes += size;
        }
        (n, bytes)
    }

    /// The object at `addr` if it is still the one with `serial`.
    pub fn object(&self, pid: u32, addr: u64, serial: u32) -> Option<&Object> {
        self.processes
            .get(&pid)?
            .objects
            .get(&addr)
            .filter(|o| o.serial == serial)
    }
}

#[cfg(test)]
mod tests {
    use super::verdict::VerdictParams;
    use super::*;

    fn table() -> Table {
        let mut t = Table::new(0, VerdictBook::new(VerdictParams::default()));
        t.add_process(1, false);
        t
    }

    fn alloc(addr: u64, size: u64) -> Event {
        alloc_by(AllocFn::Malloc, 7, addr, size)
    }

    fn alloc_by(func: AllocFn, tid: u32, addr: u64, size: u64) -> Event {
        Event::Alloc(Alloc {
            tgid: 1,
            tid,
            func,
            ts_ns: 2_000_000,
            addr,
            size,
            stack_id: 9,
            caller: 0x40,
        })
    }

    fn addrs(t: &Table) -> Vec<(u64, u64)> {
        t.process(1)
            .unwrap()
            .objects
            .iter()
            .map(|(&a, o)| (a, o.size()))
            .collect()
    }

    #[test]
    fn tracks_allocations_and_frees() {
        let mut t = table();
        t.apply(&alloc(0x1000, 16));
        t.apply(&alloc(0x2000, 32));
        t.apply(&Event::Free {
            tgid: 1,
            tid: 7,
            addr: 0x1000,
        });
        assert_eq!(addrs(&t), vec![(0x2000, 32)]);
        assert_eq!(t.totals(), (1, 32));
        assert_eq!((t.counters.allocs, t.counters.frees), (2, 1));
        let o = t.process(1).unwrap().objects[&0x2000];
        assert_eq!(o.birth_ms, 2);
        assert_eq!(t.sites.get(o.site).unwrap().caller, 0x40);
    }

    /// A table where thread 7 is inside realloc(0x1000, ..).
    fn realloc_in_flight() -> Table {
        let mut t = table();
        t.apply(&alloc(0x1000, 0x10));
        t.apply(&Event::ReallocDetach {
            tgid: 1,
            tid: 7,
            old: 0x1000,
        });
        t
    }

    #[test]
    fn a_free_inside_realloc_of_the_block_it_detached_is_part_of_the_realloc() {
        let mut t = realloc_in_flight();
        // glibc's realloc(p, 0) frees p through free itself; another thread's free
        // of the same address is not the realloc's.
        let free = |tid| Event::Free {
            tgid: 1,
            tid,
            addr: 0x1000,
        };
        t.apply(&free(7));
        assert_eq!((t.counters.frees, t.counters.untracked_frees), (0, 0));
        t.apply(&free(8));
        assert_eq!((t.counters.frees, t.counters.untracked_frees), (1, 1));
        // Only one free inside: a second one by the thread is its own.
        t.apply(&free(7));
        assert_eq!(t.counters.frees, 2);
    }

    #[test]
    fn a_realloc_whose_return_was_lost_is_over_at_the_threads_next_allocation() {
        let mut t = realloc_in_flight();
        // The realloc's return record is lost; the thread allocates p again
        // (grown in place, or from its cache) and frees it: the free is its own.
        t.apply(&alloc(0x1000, 0x10));
        t.apply(&Event::Free {
            tgid: 1,
            tid: 7,
            addr: 0x1000,
        });
        assert!(addrs(&t).is_empty());
    }

    #[test]
    fn unknown_frees_are_counted() {
        let mut t = table();
        t.apply(&Event::Free {
            tgid: 1,
            tid: 7,
            addr: 0x99,
        });
        assert_eq!(t.counters.untracked_frees, 1);
    }

    #[test]
    fn overlapping_allocation_retires_the_old_object() {
        let mut t = table();
        t.apply(&alloc(0x1000, 0x100));
        t.apply(&alloc(0x2000, 0x10));
        // Lost free of 0x1000: a block inside it is handed out.
        t.apply(&alloc(0x1080, 0x10));
        assert_eq!(addrs(&t), vec![(0x1080, 0x10), (0x2000, 0x10)]);
        // A big block covering 0x2000.
        t.apply(&alloc(0x1f00, 0x200));
        assert_eq!(addrs(&t), vec![(0x1080, 0x10), (0x1f00, 0x200)]);
        assert_eq!(t.counters.overlap_retired, 2);
        assert_eq!(t.totals().1, 0x210);
    }

    #[test]
    fn realloc_survives_address_reuse_by_another_thread() {
        let mut t = table();
        t.apply(&alloc_by(AllocFn::Malloc, 7, 0x1000, 16));
        // Thread 7 enters realloc(0x1000, 64); glibc releases 0x1000 and thread 8's
        // malloc gets it before thread 7's realloc returns 0x5000.
        t.apply(&Event::ReallocDetach {
            tgid: 1,
            tid: 7,
            old: 0x1000,
        });
        t.apply(&alloc_by(AllocFn::Malloc, 8, 0x1000, 16));
        t.apply(&Event::Realloc {
            alloc: match alloc_by(AllocFn::Realloc, 7, 0x5000, 64) {
                Event::Alloc(a) => a,
                _ => unreachable!(),
            },
            old: 0x1000,
        });
        assert_eq!(addrs(&t), vec![(0x1000, 16), (0x5000, 64)]);
        assert_eq!(t.process(1).unwrap().objects[&0x1000].tid(), 8);
        assert_eq!(t.counters.overlap_retired, 0);
    }

    fn realloc_ret(addr: u64, size: u64, old: u64) -> Event {
        let Event::Alloc(mut a) = alloc_by(AllocFn::Realloc, 7, addr, size) else {
            unreachable!()
        };
        a.addr = addr;
        Event::Realloc { alloc: a, old }
    }

    #[test]
    fn failed_realloc_keeps_the_old_block_and_realloc_zero_frees_it() {
        let mut t = table();
        t.apply(&alloc(0x1000, 16));
        t.apply(&Event::ReallocDetach {
            tgid: 1,
            tid: 7,
            old: 0x1000,
        });
        t.apply(&realloc_ret(0, 1 << 60, 0x1000));
        assert_eq!(addrs(&t), vec![(0x1000, 16)]);
        assert_eq!(t.counters.failed_reallocs, 1);
        t.apply(&Event::ReallocDetach {
            tgid: 1,
            tid: 7,
            old: 0x1000,
        });
        t.apply(&realloc_ret(0, 0, 0x1000));
        assert!(addrs(&t).is_empty());
    }

    #[test]
    fn lost_detach_still_releases_the_old_block() {
        let mut t = table();
        t.apply(&alloc(0x1000, 16));
        t.apply(&realloc_ret(0x3000, 32, 0x1000));
        assert_eq!(addrs(&t), vec![(0x3000, 32)]);
    }

    #[test]
    fn unmap_and_brk_trim_drop_objects_and_ownership() {
        let mut t = table();
        t.apply(&Event::Brk {
            tgid: 1,
            brk: 0x10000,
            by_allocator: true,
        });
        t.apply(&Event::Brk {
            tgid: 1,
            brk: 0x30000,
            by_allocator: true,
        });
        t.apply(&Event::AllocatorMap {
            tgid: 1,
            addr: 0x100000,
            len: 0x10000,
        });
        t.apply(&alloc(0x20000, 16));
        t.apply(&alloc(0x100010, 16));
        let owned: Vec<_> = t.process(1).unwrap().owned.iter().collect();
        assert_eq!(owned, vec![0x10000..0x30000, 0x100000..0x110000]);
        t.apply(&Event::Brk {
            tgid: 1,
            brk: 0x18000,
            by_allocator: false,
        });
        t.apply(&Event::Unmap {
            tgid: 1,
            addr: 0x100000,
            len: 0x10000,
        });
        assert!(addrs(&t).is_empty());
        assert_eq!(t.counters.unmapped_dropped, 2);
        let owned: Vec<_> = t.process(1).unwrap().owned.iter().collect();
        assert_eq!(owned, vec![0x10000..0x18000]);
    }

    #[test]
    fn attached_late_freed_blocks_are_not_roots() {
        let freed = |t: &Table| t.process(1).unwrap().freed.iter().collect::<Vec<_>>();
        let mut t = Table::new(0, VerdictBook::new(VerdictParams::default()));
        t.add_process(1, true);
        t.apply(&alloc(0x1000, 20));
        t.apply(&alloc(0x1020, 32));
        for addr in [0x1000, 0x1020] {
            t.apply(&Event::Free {
                tgid: 1,
                tid: 7,
                addr,
            });
        }
        assert_eq!(freed(&t), vec![0x1000..0x1018, 0x1020..0x1040]);
        // Allocated and freed again: nothing changes.
        t.apply(&alloc(0x1020, 16));
        t.apply(&Event::Free {
            tgid: 1,
            tid: 7,
            addr: 0x1020,
        });
        assert_eq!(freed(&t), vec![0x1000..0x1018, 0x1020..0x1040]);
        let mut snapshot = Snapshot::default();
        t.snapshot_part(1, 0, 10, &mut snapshot);
        assert_eq!(snapshot.owned, freed(&t));
        t.apply(&Event::Unmap {
            tgid: 1,
            addr: 0x1000,
            len: 0x1000,
        });
        assert!(freed(&t).is_empty());
        // Launch mode: every heap is the allocator's since we attached anyway.
        let mut t = table();
        t.apply(&alloc(0x1000, 20));
        t.apply(&Event::Free {
            tgid: 1,
            tid: 7,
            addr: 0x1000,
        });
        assert!(freed(&t).is_empty());
    }

    #[test]
    fn brk_moved_by_the_program_is_not_allocator_memory() {
        let mut t = table();
        t.apply(&Event::Brk {
            tgid: 1,
            brk: 0x10000,
            by_allocator: false,
        });
        t.apply(&Event::Brk {
            tgid: 1,
            brk: 0x12000,
            by_allocator: false,
        });
        assert!(t.process(1).unwrap().owned.is_empty());
    }

    #[test]
    fn fork_copies_and_exec_clears_the_heap() {
        let mut t = table();
        t.apply(&alloc(0x1000, 16));
        t.apply(&Event::Fork {
            parent: 1,
            child: 2,
        });
        assert_eq!(t.process(2).unwrap().objects.len(), 1);
        t.apply(&Event::Exec { tgid: 2 });
        assert!(t.process(2).unwrap().objects.is_empty());
        assert_eq!(t.counters.exec_dropped, 1);
        assert_eq!(
            t.take_notices(),
            vec![
                Notice::ProcessForked {
                    parent: 1,
                    child: 2
                },
                Notice::ProcessExeced { pid: 2 }
            ]
        );
    }

    #[test]
    fn objects_pack_size_and_thread() {
        let o = Object::new((1 << 39) + 12345, 7, 8, 4_194_303, 9);
        assert_eq!(
            (o.size(), o.tid(), o.birth_ms, o.site, o.serial),
            ((1 << 39) + 12345, 4_194_303, 7, 8, 9)
        );
        assert_eq!(size_of::<Object>(), 20);
        assert_eq!(Object::new(u64::MAX, 0, 0, 0, 0).size(), (1 << 40) - 1);
    }

    #[test]
    fn pvalloc_sizes_round_to_pages() {
        let mut t = table();
        t.apply(&alloc_by(AllocFn::Pvalloc, 7, 0x10000, 100));
        assert_eq!(addrs(&t), vec![(0x10000, 4096)]);
    }
}
