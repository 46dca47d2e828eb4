//! Finding leaks: a kmemleak-style conservative mark and sweep over the target's
//! memory.
//!
//! One scan of one process, from a [`Snapshot`] of its objects taken under the table
//! lock and released before any target memory is read:
//!
//! 1. Plan: from `/proc/PID/maps`, every mapping that holds tracked objects or may
//!    hold roots. Roots are writable memory outside tracked objects — .data/.bss of
//!    every module, thread stacks (from SP − 128, the red zone, when the SP is
//!    known), TLS, anonymous mappings, untracked heap — minus the memory the
//!    allocator owns (mapped by it since we attached: free chunks and its caches hold
//!    stale addresses that would hide leaks). Mappings are judged by what they hold,
//!    not by name: a static binary's TLS lives in `[heap]`, jemalloc's blocks in
//!    plain anonymous mappings.
//! 2. Walk: read the planned ranges in chunks of up to 256 KiB, on one or more
//!    threads (tasks of a few MiB, appended to the graph in address order, so the
//!    result does not depend on the thread count); words outside the objects'
//!    address ranges are rejected in bulk ([`filter::Filter`]), the rest looked up
//!    ([`index::ObjectIndex`]): every word that points into a tracked object is a
//!    root hit or a graph edge ([`graph::Graph`]).
//! 3. Mark and sweep ([`graph::Graph::classify`]), giving the [`Candidate`]s
//!    that the caller applies under the lock ([`crate::table::verdict::VerdictBook`]).
//!
//! Everything here is pure given a [`MemorySource`]; tests run it on fake memory.

mod edges;
pub mod filter;
pub mod graph;
pub mod heuristics;
pub mod index;
mod mark;
mod prefetch;
pub mod scanner;

use std::{
    ops::Range,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::Serialize;

use rustc_hash::FxHashMap;

use self::{
    filter::{Filter, Passed},
    graph::{Graph, Part, Reach},
    heuristics::{Block, Heuristics},
    index::ObjectIndex,
};
use crate::{
    proc::{maps::Mapping, mem::MemorySource},
    table::{
        RangeSet, Snapshot,
        verdict::{Candidate, LeakKind},
    },
};

/// Bytes below the stack pointer that a leaf function may still use (x86-64 ABI).
const RED_ZONE: u64 = 128;
/// Largest single read: small enough that the window stays in the L2 cache
/// while it is walked, beside the index's busy part and the edges being written
/// (with 1 MiB windows the walk ran a few per cent slower).
const CHUNK: u64 = 256 << 10;
/// Unneeded bytes between two needed ranges that are cheaper to read than to skip.
const READ_THROUGH: u64 = 16 << 10;
/// LSan's filter: smaller values are never pointers.
const MIN_POINTER: u64 = 16 << 10;
/// Planned bytes one worker reads and walks at a time (a task).
const TASK: u64 = 4 << 20;
/// Scans planning fewer bytes run on the calling thread alone.
const PARALLEL_MIN: u64 = 32 << 20;

/// Where ptmalloc's header of the chunk after a `size`-byte block lies, as an offset
/// into the block, when that is inside it (glibc lends the next chunk's first word,
/// `prev_size`, to the block). glibc's arena keeps pointers to chunk headers — the
/// top chunk, bins, the last remainder — so without this rule the block just before
/// the top chunk or a free chunk would look "possibly" reachable. jemalloc and
/// tcmalloc have no headers; a real interior pointer at exactly this offset is rare.
fn next_chunk_offset(size: u64) -> Option<u64> {
    const HEADER: u64 = 16;
    let chunk = ((size + 8 + 15) & !15).max(32);
    let offset = chunk - HEADER;
    (offset > 0 && offset < size).then_some(offset)
}

/// Everything one scan of one process needs.
#[derive(Clone, Debug, Default)]
pub struct ScanInput {
    pub snapshot: Snapshot,
    pub maps: Vec<Mapping>,
    /// Stack pointers of threads whose SP is known (blocked, or frozen).
    pub stack_pointers: Vec<u64>,
    /// Register values of frozen threads: roots like any memory word.
    pub registers: Vec<u64>,
    /// Stacks of exited threads that glibc keeps for reuse: not roots.
    pub idle_stacks: Vec<Range<u64>>,
    /// valgrind's leak-check heuristics in force.
    pub heuristics: Heuristics,
}

/// Figures of one scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScanStats {
    pub objects: u64,
    pub object_bytes: u64,
    pub root_bytes: u64,
    /// Bytes copied out of the target (includes small gaps read through).
    pub bytes_read: u64,
    pub edges: u64,
    pub reachable: u64,
    /// Of the reachable: through an interior pointer a heuristic recognised.
    pub heuristic: u64,
    pub possible: u64,
    pub direct: u64,
    pub indirect: u64,
    /// Objects that could not be read (left without a verdict).
    pub unreadable: u64,
    /// Objects in no mapping at all (their memory is gone).
    pub unmapped: u64,
    /// Root memory that could not be read (a mapping went away mid-scan, or the
    /// process died): the scan is incomplete.
    pub unreadable_root_bytes: u64,
}

/// What one scan concluded, before the verdict rules.
#[derive(Clone, Debug, Default)]
pub struct ScanOutput {
    pub candidates: Vec<Candidate>,
    /// (address, serial) of objects whose memory is no longer mapped.
    pub unmapped: Vec<(u64, u32)>,
    /// Objects whose memory could not be read: no verdict either way.
    pub unjudged: Vec<u64>,
    /// Watched objects (reported leaks) found reachable: (address, checksum).
    pub watched_reached: Vec<(u64, u64)>,
    pub stats: ScanStats,
    pub timings: ScanTimings,
}

/// Where one scan's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanTimings {
    /// Building the object index and planning the reads.
    pub index_and_plan: std::time::Duration,
    /// Reading target memory and looking up its words (all threads).
    pub read_and_walk: std::time::Duration,
    /// Mark, sweep and the candidates' checksums.
    pub mark_and_sweep: std::time::Duration,
    /// Threads that read and walked.
    pub threads: usize,
}

/// A range to read, and what its words are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Root,
    /// Objects `first..=last`, each inside the piece or clipped to it (a large one
    /// is split); what lies between them is not a root (allocator headers, free
    /// chunks).
    Objects(u32, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Piece {
    range: Range<u64>,
    role: Role,
}

/// The pieces of memory to read, in address order (in `pieces`), and the objects
/// no readable mapping holds.
struct Plan {
    unmapped: Vec<u32>,
    unreadable: Vec<u32>,
}

/// Plans the reads of one scan into `pieces`. Runs of objects with nothing but
/// non-root memory between them become one piece: a heap of millions of small
/// objects is a few hundred pieces, not millions.
fn plan(input: &ScanInput, index: &ObjectIndex, pieces: &mut Vec<Piece>) -> Plan {
    let mut not_roots = RangeSet::new();
    for r in &input.snapshot.owned {
        not_roots.insert(r.clone());
    }
    for r in &input.idle_stacks {
        not_roots.insert(r.clone());
    }
    // The dead part of each stack whose pointer we know.
    for &sp in &input.stack_pointers {
        if let Some(m) = input.maps.iter().find(|m| m.contains(sp)) {
            not_roots.insert(m.start..sp.saturating_sub(RED_ZONE).max(m.start));
        }
    }
    let mut holes = Holes {
        ranges: not_roots.iter().collect(),
        next: 0,
    };
    pieces.clear();
    let mut covered = vec![false; index.len()];
    let mut unreadable = Vec::new();
    for m in &input.maps {
        let mut i = index.first_ending_after(m.start);
        let readable = m.read && !m.is_unscannable();
        let mut cursor = m.start;
        // Whether the last piece is an object run this mapping may extend.
        let mut run_open = false;
        while cursor < m.end {
            // The next object starting at or after the cursor, clipped to the mapping.
            let next = (i < index.len() && index.start(i as u32) < m.end).then_some(i as u32);
            let gap_end = next.map_or(m.end, |o| index.start(o).max(cursor));
            if readable && m.write && cursor < gap_end {
                run_open &= !holes.push_roots(cursor..gap_end, pieces);
            }
            let Some(o) = next else { break };
            let obj_end = index.end(o).min(m.end);
            if readable {
                run_open = push_object(pieces, run_open, o, gap_end..obj_end);
            } else if !covered[o as usize] {
                unreadable.push(o);
            }
            covered[o as usize] = true;
            cursor = obj_end;
            i += 1;
        }
    }
    let unmapped = (0..index.len() as u32)
        .filter(|&o| !covered[o as usize])
        .collect();
    Plan {
        unmapped,
        unreadable,
    }
}

/// Memory that is never a root (sorted, disjoint), consumed in address order.
struct Holes {
    ranges: Vec<Range<u64>>,
    /// The first hole that may still overlap what comes next.
    next: usize,
}

impl Holes {
    /// Adds the root parts of `gap` (it minus the holes); the gaps come in address
    /// order. Returns whether any part was a root.
    fn push_roots(&mut self, gap: Range<u64>, pieces: &mut Vec<Piece>) -> bool {
        while self
            .ranges
            .get(self.next)
            .is_some_and(|h| h.end <= gap.start)
        {
            self.next += 1;
        }
        let mut cursor = gap.start;
        let mut any = false;
        for hole in &self.ranges[self.next..] {
            if hole.start >= gap.end {
                break;
            }
            if hole.start > cursor {
                push_split(pieces, cursor..hole.start, Role::Root);
                any = true;
            }
            cursor = cursor.max(hole.end);
        }
        if cursor < gap.end {
            push_split(pieces, cursor..gap.end, Role::Root);
            any = true;
        }
        any
    }
}

/// Adds object `o` at `range`: to the open run of objects before it when the run
/// stays within one read window, else as a piece of its own (split when larger
/// than a window). Returns whether a run is open after it.
fn push_object(pieces: &mut Vec<Piece>, run_open: bool, o: u32, range: Range<u64>) -> bool {
    if range.end - range.start > CHUNK {
        push_split(pieces, range, Role::Objects(o, o));
        return false;
    }
    if run_open
        && let Some(last) = pieces.last_mut()
        && let Role::Objects(first, _) = last.role
        && range.end - last.range.start <= CHUNK
    {
        last.range.end = range.end;
        last.role = Role::Objects(first, o);
        return true;
    }
    pieces.push(Piece {
        range,
        role: Role::Objects(o, o),
    });
    true
}

/// Adds `range` as pieces of at most one read window each.
fn push_split(pieces: &mut Vec<Piece>, range: Range<u64>, role: Role) {
    let mut from = range.start;
    while from < range.end {
        let to = range.end.min(from + CHUNK);
        pieces.push(Piece {
            range: from..to,
            role,
        });
        from = to;
    }
}

/// The bytes of the aligned words of `len` bytes at `addr` (a partial word at
/// the end included, as scanned memory is counted).
fn aligned_len(addr: u64, len: usize) -> u64 {
    (len as u64).saturating_sub(addr.next_multiple_of(8) - addr)
}

/// A checksum of an object's contents, to tell whether it changed between scans.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(bytes.len() as u64, |h, c| {
        let w = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        (h.rotate_left(5) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    })
}

/// Buffers one scan needs, kept between scans so that a large target does not
/// page-fault hundreds of megabytes of fresh memory at every scan.
pub struct Workspace {
    index: ObjectIndex,
    graph: Graph,
    /// Indices of the watched objects the last scan found reachable.
    watched: Vec<usize>,
    read_ok: Vec<bool>,
    /// One read window per worker (the first also serves the checksums).
    bufs: Vec<Vec<u8>>,
    pieces: Vec<Piece>,
    tasks: Vec<Range<usize>>,
    /// Parts ready for the next tasks.
    parts: Vec<Part>,
    /// Most threads one scan uses (0 and 1: the calling thread only).
    threads: usize,
    /// [`TASK`] and [`PARALLEL_MIN`] (tests shrink them).
    task_bytes: u64,
    parallel_min: u64,
    /// The last snapshot's buffers, for the next one.
    snapshot: Snapshot,
}

impl Default for Workspace {
    /// Scans on the calling thread alone.
    fn default() -> Self {
        Self::with_threads(1)
    }
}

/// Words of objects an interior pointer points into, read on demand for the
/// heuristics (only for pointers into objects no start pointer reached).
struct Contents<'a> {
    memory: &'a dyn MemorySource,
    /// The first words of each object read so far, by start address.
    heads: FxHashMap<u64, [u64; HEAD_WORDS]>,
}

/// Words of an object's head read at once.
const HEAD_WORDS: usize = 4;

impl Contents<'_> {
    /// The word `offset` bytes into the object at `start` of `size` bytes (the
    /// bytes past its end belong to its allocator slot).
    fn word(&mut self, start: u64, size: u64, offset: u64) -> Option<u64> {
        // A word that starts inside the block: blocks are 8-byte aligned and
        // allocators hand out at least 8 bytes, so the whole word is readable.
        if offset >= size.max(8) {
            return None;
        }
        let read = |addr: u64, buf: &mut [u8]| self.memory.read(addr, buf) == buf.len();
        let index = (offset / 8) as usize;
        if offset.is_multiple_of(8) && index < HEAD_WORDS {
            if let Some(head) = self.heads.get(&start) {
                return Some(head[index]);
            }
            let len = size.min((HEAD_WORDS * 8) as u64) as usize / 8 * 8;
            let mut buf = [0u8; HEAD_WORDS * 8];
            if !read(start, &mut buf[..len]) {
                return None;
            }
            let mut head = [0u64; HEAD_WORDS];
            for (w, chunk) in head.iter_mut().zip(buf.chunks_exact(8)) {
                *w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
            }
            self.heads.insert(start, head);
            return Some(head[index]);
        }
        let mut buf = [0u8; 8];
        read(start + offset, &mut buf).then(|| u64::from_ne_bytes(buf))
    }
}

/// The source of a word that lies in a root.
const ROOT: u32 = u32::MAX;

/// Bytes of a piece filtered at a time: the positions of their passing words
/// stay in the L1 cache until they are resolved.
const STRIDE: usize = 16 << 10;

/// How many passing words ahead of the one being resolved the walk prefetches
/// the index's memory for (enough to overlap a cache miss with the lookups
/// before it).
const PREFETCH_AHEAD: usize = 16;

struct Walker<'a> {
    index: &'a ObjectIndex,
    filter: &'a Filter,
    /// Bytes read and walked.
    stats: ScanStats,
    /// Objects not read whole (they get no verdict).
    not_whole: Vec<u32>,
    /// The words of the stride being walked that passed the filter.
    passed: Passed,
    /// Whether the CPU runs [`Self::scan_x86_64_v3`].
    fast: bool,
}

/// Whether the CPU has what [`Walker::scan_x86_64_v3`] is compiled for.
fn x86_64_v3() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("popcnt")
            && std::arch::is_x86_feature_detected!("bmi1")
            && std::arch::is_x86_feature_detected!("bmi2")
            && std::arch::is_x86_feature_detected!("lzcnt")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl<'a> Walker<'a> {
    fn new(index: &'a ObjectIndex, filter: &'a Filter) -> Self {
        Self {
            index,
            filter,
            stats: ScanStats::default(),
            not_whole: Vec::new(),
            passed: Passed::default(),
            fast: x86_64_v3(),
        }
    }

    /// Scans the aligned words of `bytes`, which hold target memory at `addr`, into
    /// `part`: every word that points into a tracked object becomes a root hit
    /// (`source` says [`ROOT`] for the word's address) or an edge from the object
    /// `source` names (`None`: the word is in neither, as a header between two
    /// objects). Words are filtered a stride at a time, then looked up in order,
    /// the index's memory prefetched a few words ahead.
    #[inline(always)]
    fn scan(
        &mut self,
        part: &mut Part,
        addr: u64,
        bytes: &[u8],
        source: impl FnMut(u64) -> Option<u32>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.fast {
            // SAFETY: the CPU has these features (checked at run time).
            return unsafe { self.scan_x86_64_v3(part, addr, bytes, source) };
        }
        self.scan_words(part, addr, bytes, source);
    }

    /// [`Self::scan_words`] compiled for CPUs with AVX2, POPCNT and BMI (x86-64
    /// v3): the index's popcount is one instruction instead of a dozen, and the
    /// filter is inlined.
    ///
    /// # Safety
    /// The CPU has AVX2, POPCNT, BMI1, BMI2 and LZCNT.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,popcnt,bmi1,bmi2,lzcnt")]
    unsafe fn scan_x86_64_v3(
        &mut self,
        part: &mut Part,
        addr: u64,
        bytes: &[u8],
        source: impl FnMut(u64) -> Option<u32>,
    ) {
        self.scan_words(part, addr, bytes, source);
    }

    /// The body of [`Self::scan`].
    #[inline(always)]
    fn scan_words(
        &mut self,
        part: &mut Part,
        addr: u64,
        bytes: &[u8],
        mut source: impl FnMut(u64) -> Option<u32>,
    ) {
        let skip = (addr.next_multiple_of(8) - addr) as usize;
        let Some(bytes) = bytes.get(skip..) else {
            return;
        };
        let index = self.index;
        let mut base = addr + skip as u64;
        for stride in bytes.chunks(STRIDE) {
            self.filter.collect(stride, &mut self.passed);
            let positions = self.passed.positions();
            for &k in positions.iter().take(PREFETCH_AHEAD) {
                index.prefetch(filter::word_at(stride, k));
            }
            for (n, &k) in positions.iter().enumerate() {
                if let Some(&ahead) = positions.get(n + PREFETCH_AHEAD) {
                    index.prefetch(filter::word_at(stride, ahead));
                }
                let Some(src) = source(base + u64::from(k) * 8) else {
                    continue;
                };
                let w = filter::word_at(stride, k);
                let Some((j, offset)) = index.lookup(w) else {
                    continue;
                };
                if offset != 0 && Some(offset) == next_chunk_offset(index.end(j) - index.start(j)) {
                    // The allocator's own pointer to the next chunk, not the program's.
                    continue;
                }
                if src == ROOT {
                    part.add_root(j, offset);
                } else {
                    part.add_edge(src, j, offset);
                }
            }
            base += stride.len() as u64;
        }
    }

    /// Scans a root's words (see [`Self::scan`]).
    fn scan_root(&mut self, part: &mut Part, addr: u64, bytes: &[u8]) {
        self.stats.root_bytes += aligned_len(addr, bytes.len());
        self.scan(part, addr, bytes, |_| Some(ROOT));
    }

    /// Scans the words of objects `first..=last` in `bytes` (target memory at
    /// `addr`, where they lie in address order, apart): a word belongs to the
    /// object it lies wholly in, if any, which a cursor moving up the objects
    /// finds without a lookup.
    fn scan_objects(&mut self, part: &mut Part, addr: u64, bytes: &[u8], first: u32, last: u32) {
        let index = self.index;
        let mut o = first;
        self.scan(part, addr, bytes, move |at| {
            while index.end(o) < at + 8 && o < last {
                o += 1;
            }
            (index.start(o) <= at && at + 8 <= index.end(o)).then_some(o)
        });
    }

    /// Reads and walks one task's pieces into `part`, in windows of up to CHUNK
    /// bytes covering consecutive pieces. A window may read through small gaps
    /// between pieces; when such a read stops short (a gap between two mappings
    /// is not readable), the pieces after the stop are read again one window
    /// each, so that only memory that really cannot be read is missed.
    fn task(
        &mut self,
        part: &mut Part,
        memory: &dyn MemorySource,
        buf: &mut [u8],
        pieces: &[Piece],
    ) {
        let mut k = 0;
        let mut read_through = true;
        while k < pieces.len() {
            let start = pieces[k].range.start;
            let mut last = k;
            while read_through
                && let Some(next) = pieces.get(last + 1)
                && next.range.start <= pieces[last].range.end + READ_THROUGH
                && next.range.end - start <= CHUNK
            {
                last += 1;
            }
            let end = pieces[last].range.end;
            let got = memory.read(start, &mut buf[..(end - start) as usize]) as u64;
            self.stats.bytes_read += got;
            let readable_end = start + got;
            if readable_end < end && last > k {
                // Walk the pieces read whole; read the rest again, piece by piece.
                let whole = pieces[k..=last]
                    .iter()
                    .take_while(|p| p.range.end <= readable_end)
                    .count();
                self.window(part, &pieces[k..k + whole], start, &buf[..got as usize]);
                k += whole;
                read_through = false;
                continue;
            }
            self.window(part, &pieces[k..=last], start, &buf[..got as usize]);
            k = last + 1;
            read_through = true;
        }
    }

    /// Walks `pieces`, read into `bytes` from `start` on (`bytes` may stop short
    /// of the last pieces: what it lacks is unreadable). An object not read whole
    /// gets no verdict; a root not read is counted.
    fn window(&mut self, part: &mut Part, pieces: &[Piece], start: u64, bytes: &[u8]) {
        let readable_end = start + bytes.len() as u64;
        let window = |r: Range<u64>| {
            let from = r.start.clamp(start, readable_end);
            &bytes[(from - start) as usize..(r.end.clamp(start, readable_end) - start) as usize]
        };
        for piece in pieces {
            let r = &piece.range;
            match piece.role {
                Role::Root => {
                    self.scan_root(part, r.start, window(r.clone()));
                    self.stats.unreadable_root_bytes +=
                        r.end.saturating_sub(r.start.max(readable_end));
                }
                Role::Objects(first, last) => {
                    let index = self.index;
                    let clipped = |o: u32| index.start(o).max(r.start)..index.end(o).min(r.end);
                    // Overlapping objects come from a snapshot taken while the
                    // table changed (under churn): only their runs go slowly.
                    let disjoint = index.disjoint()
                        || (first..last).all(|o| index.end(o) <= index.start(o + 1));
                    if disjoint {
                        let run = clipped(first).start..clipped(last).end;
                        self.scan_objects(part, run.start, window(run.clone()), first, last);
                    } else {
                        // Each object's words are its own.
                        for o in first..=last {
                            let range = clipped(o);
                            self.scan_objects(part, range.start, window(range.clone()), o, o);
                        }
                    }
                    for o in first..=last {
                        let range = clipped(o);
                        let read = window(range.clone()).len();
                        self.stats.object_bytes += aligned_len(range.start, read);
                        if readable_end < range.end {
                            self.not_whole.push(o);
                        }
                    }
                }
            }
        }
    }
}

/// Splits `pieces` into tasks of about `task` bytes, never between two pieces
/// of one object (so that appending the tasks' parts in order gives the graph one
/// thread would build, duplicate edges dropped alike). The split depends on the
/// plan alone, not on the thread count.
fn split_tasks(pieces: &[Piece], task: u64, tasks: &mut Vec<Range<usize>>) {
    tasks.clear();
    let shares_object = |a: &Piece, b: &Piece| matches!((a.role, b.role), (Role::Objects(_, last), Role::Objects(first, _)) if last == first);
    let (mut from, mut bytes) = (0, 0);
    for (k, piece) in pieces.iter().enumerate() {
        if k > from && bytes >= task && !shares_object(&pieces[k - 1], piece) {
            tasks.push(from..k);
            (from, bytes) = (k, 0);
        }
        bytes += piece.range.end - piece.range.start;
    }
    if from < pieces.len() {
        tasks.push(from..pieces.len());
    }
}

/// Finished parts, appended to the graph in task order as soon as every earlier
/// task's part has been.
struct Merge<'a> {
    graph: &'a mut Graph,
    next: usize,
    done: Vec<Option<Part>>,
    pool: &'a mut Vec<Part>,
}

impl Merge<'_> {
    fn finish(&mut self, task: usize, part: Part) {
        self.done[task] = Some(part);
        while let Some(mut part) = self.done.get_mut(self.next).and_then(Option::take) {
            self.graph.append(&part);
            part.clear();
            self.pool.push(part);
            self.next += 1;
        }
    }
}

/// What the workers of one scan share.
struct Work<'a> {
    index: &'a ObjectIndex,
    filter: &'a Filter,
    memory: &'a (dyn MemorySource + Sync),
    pieces: &'a [Piece],
    tasks: &'a [Range<usize>],
    next: AtomicUsize,
    merge: Mutex<Merge<'a>>,
}

impl Work<'_> {
    /// Takes tasks until none is left; returns what was read and walked, and the
    /// objects not read whole.
    fn run(&self, buf: &mut [u8]) -> (ScanStats, Vec<u32>) {
        let mut walker = Walker::new(self.index, self.filter);
        let lock = || self.merge.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let t = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(task) = self.tasks.get(t) else { break };
            let mut part = lock().pool.pop().unwrap_or_default();
            walker.task(&mut part, self.memory, buf, &self.pieces[task.clone()]);
            lock().finish(t, part);
        }
        (walker.stats, walker.not_whole)
    }
}

/// Runs one scan with fresh buffers, on the calling thread. Pure apart from
/// reading `memory`.
pub fn scan(input: &ScanInput, memory: &(dyn MemorySource + Sync)) -> ScanOutput {
    Workspace::with_threads(1).scan(input, memory)
}

impl Workspace {
    /// A workspace whose scans use up to `threads` threads (the calling one
    /// included) to read and walk memory.
    pub fn with_threads(threads: usize) -> Self {
        Self {
            index: ObjectIndex::default(),
            graph: Graph::default(),
            watched: Vec::new(),
            read_ok: Vec::new(),
            bufs: Vec::new(),
            pieces: Vec::new(),
            tasks: Vec::new(),
            parts: Vec::new(),
            threads,
            task_bytes: TASK,
            parallel_min: PARALLEL_MIN,
            snapshot: Snapshot::default(),
        }
    }

    /// An empty snapshot with the last one's memory, to fill for the next scan.
    pub fn take_snapshot(&mut self) -> Snapshot {
        let mut s = std::mem::take(&mut self.snapshot);
        s.objects.clear();
        s.owned.clear();
        s.attached_late = false;
        s.watched.clear();
        s.sites.clear();
        s
    }

    /// Keeps a scanned snapshot's memory for [`Self::take_snapshot`].
    pub fn keep_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot = snapshot;
    }

    /// Runs one scan, reusing this workspace's buffers.
    pub fn scan(&mut self, input: &ScanInput, memory: &(dyn MemorySource + Sync)) -> ScanOutput {
        let objects = &input.snapshot.objects;
        let started = std::time::Instant::now();
        let mut index = std::mem::take(&mut self.index);
        index.rebuild_on(objects.iter().map(|(a, o)| (*a, o.size())), self.threads);
        let plan = plan(input, &index, &mut self.pieces);
        let planned = started.elapsed();
        self.graph.reset(index.len());
        self.read_ok.clear();
        self.read_ok.resize(index.len(), true);
        for &o in plan.unreadable.iter().chain(&plan.unmapped) {
            self.read_ok[o as usize] = false;
        }
        let filter = Filter::new(index.spans(), MIN_POINTER);
        let mut stats = ScanStats {
            objects: index.len() as u64,
            ..ScanStats::default()
        };
        for &r in &input.registers {
            if let Some(j) = index.find(r) {
                self.graph.add_root(j, r - index.start(j));
            }
        }
        split_tasks(&self.pieces, self.task_bytes.max(1), &mut self.tasks);
        let planned_bytes: u64 = self
            .pieces
            .iter()
            .map(|p| p.range.end - p.range.start)
            .sum();
        let threads = if planned_bytes < self.parallel_min {
            1
        } else {
            self.threads.clamp(1, self.tasks.len().max(1))
        };
        self.bufs
            .resize_with(self.bufs.len().max(threads), Vec::new);
        for buf in &mut self.bufs[..threads] {
            buf.resize(CHUNK as usize, 0);
        }
        let work = Work {
            index: &index,
            filter: &filter,
            memory,
            pieces: &self.pieces,
            tasks: &self.tasks,
            next: AtomicUsize::new(0),
            merge: Mutex::new(Merge {
                graph: &mut self.graph,
                next: 0,
                done: (0..self.tasks.len()).map(|_| None).collect(),
                pool: &mut self.parts,
            }),
        };
        let (first, others) = self.bufs[..threads].split_first_mut().expect("one buffer");
        let walked: Vec<(ScanStats, Vec<u32>)> = std::thread::scope(|s| {
            let helpers: Vec<_> = others
                .iter_mut()
                .map(|buf| s.spawn(|| work.run(buf)))
                .collect();
            let mut all = vec![work.run(first)];
            all.extend(helpers.into_iter().map(|h| h.join().expect("scan worker")));
            all
        });
        for (walk, not_whole) in walked {
            stats.root_bytes += walk.root_bytes;
            stats.object_bytes += walk.object_bytes;
            stats.bytes_read += walk.bytes_read;
            stats.unreadable_root_bytes += walk.unreadable_root_bytes;
            for o in not_whole {
                self.read_ok[o as usize] = false;
            }
        }
        let walked = started.elapsed();
        let mut out = self.finish(input, &index, &mut stats, &plan.unmapped, memory);
        self.checksum_candidates(&mut out, &index, memory);
        out.stats = stats;
        out.timings = ScanTimings {
            index_and_plan: planned,
            read_and_walk: walked - planned,
            mark_and_sweep: started.elapsed() - walked,
            threads,
        };
        log::debug!(
            "scan of {} objects: index and plan {planned:?}, read and walk {:?} ({threads} threads, {} tasks), mark, sweep and checksums {:?}",
            objects.len(),
            walked - planned,
            self.tasks.len(),
            started.elapsed() - walked
        );
        self.index = index;
        out
    }

    fn finish(
        &mut self,
        input: &ScanInput,
        index: &ObjectIndex,
        stats: &mut ScanStats,
        unmapped: &[u32],
        memory: &dyn MemorySource,
    ) -> ScanOutput {
        let objects = &input.snapshot.objects;
        let mut contents = Contents {
            memory,
            heads: FxHashMap::default(),
        };
        let maps = &input.maps;
        let is_vtable = |v: u64| {
            let at = maps.partition_point(|m| m.end <= v);
            maps.get(at)
                .is_some_and(|m| m.contains(v) && m.read && !m.write && m.file().is_some())
        };
        let heuristics = input.heuristics;
        let recognize = |j: usize, offset: u32| {
            if !heuristics.any() {
                return false;
            }
            let (start, size) = (index.start(j as u32), objects[j].1.size());
            let traits = input.snapshot.traits(j);
            let block = Block {
                size,
                by_new: traits.by_new,
                usable_size: traits.usable_size,
            };
            heuristics.recognize(
                &block,
                u64::from(offset),
                |at| contents.word(start, size, at),
                is_vtable,
            )
        };
        let verdicts = self.graph.classify(self.threads, recognize);
        stats.heuristic = verdicts.by_heuristic;
        stats.edges = self.graph.edge_count() as u64;
        // Objects not read whole get no verdict; those no mapping holds any more
        // are reported apart (`unmapped` is in object order).
        let mut unjudged = Vec::new();
        let mut reachable_unread = 0;
        for i in (0..objects.len()).filter(|&i| !self.read_ok[i]) {
            if verdicts.of(i as u32) == Reach::Reachable {
                reachable_unread += 1;
            }
            if unmapped.binary_search(&(i as u32)).is_err() {
                unjudged.push(objects[i].0);
            }
        }
        // Only the objects that are not reachable are visited.
        let mut candidates = Vec::new();
        for &(i, r) in &verdicts.unreachable {
            if !self.read_ok[i as usize] {
                continue;
            }
            let (kind, root) = match r {
                Reach::Reachable => unreachable!("listed objects are not reachable"),
                Reach::Possible => {
                    stats.possible += 1;
                    (LeakKind::Possible, None)
                }
                Reach::Direct => {
                    stats.direct += 1;
                    (LeakKind::Direct, None)
                }
                Reach::Indirect { root } => {
                    stats.indirect += 1;
                    (LeakKind::Indirect, Some(index.start(root)))
                }
            };
            let (addr, object) = objects[i as usize];
            candidates.push(Candidate {
                addr,
                serial: object.serial,
                kind,
                checksum: 0,
                root,
            });
        }
        stats.reachable = (objects.len() - verdicts.unreachable.len() - reachable_unread) as u64;
        stats.unreadable = unjudged.len() as u64;
        stats.unmapped = unmapped.len() as u64;
        // Watched objects (sorted addresses) found reachable, in object order.
        self.watched = input
            .snapshot
            .watched
            .iter()
            .filter_map(|&addr| {
                let i = objects.binary_search_by_key(&addr, |o| o.0).ok()?;
                (self.read_ok[i] && verdicts.of(i as u32) == Reach::Reachable).then_some(i)
            })
            .collect();
        ScanOutput {
            candidates,
            unmapped: unmapped
                .iter()
                .map(|&o| (objects[o as usize].0, objects[o as usize].1.serial))
                .collect(),
            unjudged,
            watched_reached: Vec::new(),
            stats: *stats,
            timings: ScanTimings::default(),
        }
    }

    /// Checksums the contents of the candidates and of the watched objects found
    /// reachable (few, usually: other reachable objects need none). An object that
    /// can no longer be read gets no verdict.
    fn checksum_candidates(
        &mut self,
        out: &mut ScanOutput,
        index: &ObjectIndex,
        memory: &dyn MemorySource,
    ) {
        let ranges: Vec<Range<u64>> = out
            .candidates
            .iter()
            .map(|c| c.addr..index.find(c.addr).map_or(c.addr + 1, |j| index.end(j)))
            .collect();
        let sums = self.checksums(&ranges, memory);
        let mut kept = Vec::with_capacity(out.candidates.len());
        for (c, sum) in out.candidates.iter().zip(sums) {
            match sum {
                Some(sum) => kept.push(Candidate {
                    checksum: sum,
                    ..*c
                }),
                None => out.unjudged.push(c.addr),
            }
        }
        out.candidates = kept;
        let ranges: Vec<Range<u64>> = self
            .watched
            .iter()
            .map(|&i| index.start(i as u32)..index.end(i as u32))
            .collect();
        let sums = self.checksums(&ranges, memory);
        out.watched_reached = ranges
            .iter()
            .zip(sums)
            .filter_map(|(r, sum)| Some((r.start, sum?)))
            .collect();
    }

    /// Checksums of `ranges` (sorted, disjoint), read in windows; None for a range
    /// that could not be read whole.
    fn checksums(&mut self, ranges: &[Range<u64>], memory: &dyn MemorySource) -> Vec<Option<u64>> {
        let mut sums = Vec::with_capacity(ranges.len());
        let mut k = 0;
        let mut read_through = true;
        while k < ranges.len() {
            let start = ranges[k].start;
            let mut last = k;
            while read_through
                && let Some(next) = ranges.get(last + 1)
                && next.start <= ranges[last].end + READ_THROUGH
                && next.end - start <= CHUNK
            {
                last += 1;
            }
            let end = ranges[last].end.min(start + CHUNK);
            let buf = &mut self.bufs[0];
            let got = memory.read(start, &mut buf[..(end - start) as usize]) as u64;
            let whole = ranges[k..=last]
                .iter()
                .take_while(|r| r.end <= start + got)
                .count();
            for r in &ranges[k..k + whole] {
                let bytes = &buf[(r.start - start) as usize..(r.end - start) as usize];
                sums.push(Some(checksum(bytes)));
            }
            if whole == 0 {
                // Unreadable on its own (or larger than a window: judged by its head).
                let r = &ranges[k];
                let head = (start + got).min(r.end);
                sums.push(
                    (head == end && r.end > end).then(|| checksum(&buf[..(head - start) as usize])),
                );
                k += 1;
                read_through = true;
            } else {
                // A short read: the range after the stop is read on its own next.
                let short = k + whole <= last;
                k += whole;
                read_through = !short;
            }
        }
        sums
    }
}

#[cfg(test)]
mod tests;
