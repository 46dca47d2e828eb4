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
//! 2. Walk: read the planned ranges in chunks of up to 1 MiB; every aligned word that
//!    points into a tracked object ([`index::ObjectIndex`]) is a root hit or a graph
//!    edge ([`graph::Graph`]); each object's contents are checksummed on the way.
//! 3. Mark and sweep ([`graph::Graph::classify`]), giving the [`verdict::Candidate`]s
//!    that the caller applies under the lock ([`verdict::VerdictBook`]).
//!
//! Everything here is pure given a [`MemorySource`]; tests run it on fake memory.

pub mod graph;
pub mod index;
pub mod scanner;
pub mod verdict;

use std::ops::Range;

use serde::Serialize;

use self::{
    graph::{Graph, Reach},
    index::ObjectIndex,
    verdict::{Candidate, LeakKind},
};
use crate::{
    proc::{maps::Mapping, mem::MemorySource},
    table::{RangeSet, Snapshot},
};

/// Bytes below the stack pointer that a leaf function may still use (x86-64 ABI).
const RED_ZONE: u64 = 128;
/// Largest single read.
const CHUNK: u64 = 1 << 20;
/// Unneeded bytes between two needed ranges that are cheaper to read than to skip.
const READ_THROUGH: u64 = 16 << 10;
/// LSan's filter: smaller values are never pointers.
const MIN_POINTER: u64 = 16 << 10;

/// Everything one scan of one process needs.
#[derive(Clone, Debug, Default)]
pub struct ScanInput {
    pub snapshot: Snapshot,
    pub maps: Vec<Mapping>,
    /// Stack pointers of threads whose SP is known (blocked, or frozen).
    pub stack_pointers: Vec<u64>,
    /// Register values of frozen threads: roots like any memory word.
    pub registers: Vec<u64>,
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
    pub possible: u64,
    pub direct: u64,
    pub indirect: u64,
    /// Objects that could not be read (left without a verdict).
    pub unreadable: u64,
    /// Objects in no mapping at all (their memory is gone).
    pub unmapped: u64,
}

/// What one scan concluded, before the verdict rules.
#[derive(Clone, Debug, Default)]
pub struct ScanOutput {
    pub candidates: Vec<Candidate>,
    /// (address, serial) of objects whose memory is no longer mapped.
    pub unmapped: Vec<(u64, u32)>,
    pub stats: ScanStats,
}

/// A range to read, and what its words are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Root,
    Object(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Piece {
    range: Range<u64>,
    role: Role,
}

/// The pieces of memory to read, in address order, and the objects no readable
/// mapping holds.
struct Plan {
    pieces: Vec<Piece>,
    unmapped: Vec<u32>,
    unreadable: Vec<u32>,
}

fn plan(input: &ScanInput, index: &ObjectIndex) -> Plan {
    let mut not_roots = RangeSet::new();
    for r in &input.snapshot.owned {
        not_roots.insert(r.clone());
    }
    // The dead part of each stack whose pointer we know.
    for &sp in &input.stack_pointers {
        if let Some(m) = input.maps.iter().find(|m| m.contains(sp)) {
            not_roots.insert(m.start..sp.saturating_sub(RED_ZONE).max(m.start));
        }
    }
    let mut pieces = Vec::new();
    let mut covered = vec![false; index.len()];
    let mut unreadable = Vec::new();
    for m in &input.maps {
        let mut i = index.first_ending_after(m.start);
        let readable = m.read && !m.is_unscannable();
        let mut cursor = m.start;
        while cursor < m.end {
            // The next object starting at or after the cursor, clipped to the mapping.
            let next = (i < index.len() && index.start(i as u32) < m.end).then_some(i as u32);
            let gap_end = next.map_or(m.end, |o| index.start(o).max(cursor));
            if readable && m.write && cursor < gap_end {
                for r in subtract(cursor..gap_end, &not_roots) {
                    push_split(&mut pieces, r, Role::Root);
                }
            }
            let Some(o) = next else { break };
            let obj_end = index.end(o).min(m.end);
            if readable {
                push_split(&mut pieces, gap_end..obj_end, Role::Object(o));
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
        pieces,
        unmapped,
        unreadable,
    }
}

/// Adds `range` as pieces of at most one read window each (kept in order, so an
/// object's checksum sees its words in order).
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

/// `r` minus the ranges of `set`.
fn subtract(r: Range<u64>, set: &RangeSet) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut cursor = r.start;
    for hole in set.overlapping(r.clone()) {
        if hole.start > cursor {
            out.push(cursor..hole.start.min(r.end));
        }
        cursor = cursor.max(hole.end);
    }
    if cursor < r.end {
        out.push(cursor..r.end);
    }
    out
}

/// Per-object running checksums of the words scanned.
fn mix(h: u64, w: u64) -> u64 {
    (h.rotate_left(5) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

struct Walker<'a> {
    index: &'a ObjectIndex,
    graph: Graph,
    checksums: Vec<u64>,
    read_ok: Vec<bool>,
    stats: ScanStats,
    /// Words that may be pointers, waiting for a batched lookup.
    pending: Vec<u64>,
    found: Vec<Option<(u32, u64)>>,
}

impl Walker<'_> {
    /// Scans the aligned words of `bytes`, which hold target memory at `addr`.
    fn scan(&mut self, addr: u64, bytes: &[u8], role: Role) {
        let skip = (addr.next_multiple_of(8) - addr) as usize;
        let Some(bytes) = bytes.get(skip..) else {
            return;
        };
        let words = bytes
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")));
        let index = self.index;
        match role {
            Role::Root => self.stats.root_bytes += bytes.len() as u64,
            Role::Object(_) => self.stats.object_bytes += bytes.len() as u64,
        }
        let mut h = match role {
            Role::Object(i) => self.checksums[i as usize],
            Role::Root => 0,
        };
        for w in words {
            h = mix(h, w);
            if w >= MIN_POINTER && index.in_range(w) {
                self.pending.push(w);
                if self.pending.len() == index::BATCH {
                    self.resolve(role);
                }
            }
        }
        self.resolve(role);
        if let Role::Object(i) = role {
            self.checksums[i as usize] = h;
        }
    }

    /// Looks up the pending words and records what they point to.
    fn resolve(&mut self, role: Role) {
        if self.pending.is_empty() {
            return;
        }
        self.index.find_batch(&self.pending, &mut self.found);
        for (&w, &hit) in self.pending.iter().zip(&self.found) {
            let Some((j, start)) = hit else { continue };
            let interior = w != start;
            match role {
                Role::Root => self.graph.add_root(j, interior),
                Role::Object(i) => self.graph.add_edge(i, j, interior),
            }
        }
        self.pending.clear();
    }
}

/// Runs one scan. Pure apart from reading `memory`.
pub fn scan(input: &ScanInput, memory: &dyn MemorySource) -> ScanOutput {
    let objects = &input.snapshot.objects;
    let started = std::time::Instant::now();
    let index = ObjectIndex::new(objects.iter().map(|(a, o)| (*a, o.size)));
    let plan = plan(input, &index);
    let planned = started.elapsed();
    let mut walker = Walker {
        index: &index,
        pending: Vec::with_capacity(index::BATCH),
        found: Vec::with_capacity(index::BATCH),
        graph: Graph::new(index.len()),
        checksums: objects.iter().map(|(_, o)| o.size).collect(),
        read_ok: vec![true; index.len()],
        stats: ScanStats {
            objects: index.len() as u64,
            ..ScanStats::default()
        },
    };
    for &o in plan.unreadable.iter().chain(&plan.unmapped) {
        walker.read_ok[o as usize] = false;
    }
    for &r in &input.registers {
        if let Some(j) = index.find(r) {
            walker.graph.add_root(j, r != index.start(j));
        }
    }
    // Read windows of up to CHUNK bytes covering consecutive pieces.
    let pieces = &plan.pieces;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut k = 0;
    while k < pieces.len() {
        let start = pieces[k].range.start;
        let mut last = k;
        while let Some(next) = pieces.get(last + 1)
            && next.range.start <= pieces[last].range.end + READ_THROUGH
            && next.range.end - start <= CHUNK
        {
            last += 1;
        }
        let end = pieces[last].range.end;
        let got = memory.read(start, &mut buf[..(end - start) as usize]) as u64;
        walker.stats.bytes_read += got;
        let readable_end = start + got;
        for piece in &pieces[k..=last] {
            let r = &piece.range;
            if readable_end > r.start {
                let bytes =
                    &buf[(r.start - start) as usize..(r.end.min(readable_end) - start) as usize];
                walker.scan(r.start, bytes, piece.role);
            }
            if readable_end < r.end
                && let Role::Object(o) = piece.role
            {
                walker.read_ok[o as usize] = false;
            }
        }
        k = last + 1;
    }
    let walked = started.elapsed();
    let out = finish(input, &index, walker, &plan.unmapped);
    log::debug!(
        "scan of {} objects: index and plan {planned:?}, read and walk {:?}, mark and sweep {:?}",
        objects.len(),
        walked - planned,
        started.elapsed() - walked
    );
    out
}

fn finish(
    input: &ScanInput,
    index: &ObjectIndex,
    mut w: Walker<'_>,
    unmapped: &[u32],
) -> ScanOutput {
    let objects = &input.snapshot.objects;
    let reach = w.graph.classify();
    let mut candidates = Vec::new();
    w.stats.edges = w.graph.edge_count() as u64;
    for (i, r) in reach.iter().enumerate() {
        if !w.read_ok[i] {
            continue;
        }
        let kind = match r {
            Reach::Reachable => {
                w.stats.reachable += 1;
                continue;
            }
            Reach::Possible => {
                w.stats.possible += 1;
                LeakKind::Possible
            }
            Reach::Direct => {
                w.stats.direct += 1;
                LeakKind::Direct
            }
            Reach::Indirect { .. } => {
                w.stats.indirect += 1;
                LeakKind::Indirect
            }
        };
        let root = match r {
            Reach::Indirect { root } => Some(index.start(*root)),
            _ => None,
        };
        candidates.push(Candidate {
            addr: objects[i].0,
            serial: objects[i].1.serial,
            kind,
            checksum: w.checksums[i],
            root,
        });
    }
    w.stats.unreadable = w.read_ok.iter().filter(|ok| !**ok).count() as u64 - unmapped.len() as u64;
    w.stats.unmapped = unmapped.len() as u64;
    ScanOutput {
        candidates,
        unmapped: unmapped
            .iter()
            .map(|&o| (objects[o as usize].0, objects[o as usize].1.serial))
            .collect(),
        stats: w.stats,
    }
}

#[cfg(test)]
mod tests;
