//! "Which tracked object contains this address?" in O(1) time, without branches
//! that depend on the heap's layout.
//!
//! Every aligned word of scanned memory asks this question, so it must not degrade
//! with the number of objects. Words outside [lowest start, highest end) are
//! rejected with one subtraction and one compare. The rest go through a per-span
//! granule table: objects are grouped into spans (a gap of more than 1 MiB
//! starts a new one), and each 256-byte granule of a span records how many objects
//! start before it and a bitmap of the 8-byte slots where objects start inside it.
//! The object containing an address is then that count plus the starts at or below
//! its slot (a popcount), minus one: one table read, one object read, no walk.
//! (Allocators return 8-byte aligned blocks; if two objects ever start in one slot,
//! lookups fall back to a short walk from the count.)
use std::mem::MaybeUninit;

use super::prefetch::prefetch;

/// Makes room for `len` elements in `v` (which is empty). A table of several
/// megabytes gets fresh memory with transparent huge pages asked for before it is
/// first written: its lookups are random, and with 4 KiB pages nearly every one
/// would also miss the TLB (a page walk, costly in a virtual machine).
fn reserve_huge<T>(v: &mut Vec<T>, len: usize) {
    const HUGE: usize = 2 << 20;
    debug_assert!(v.is_empty());
    if v.capacity() >= len {
        return;
    }
    // Some headroom: a growing heap should not get a new table at every scan.
    *v = Vec::with_capacity(len + len / 8);
    let bytes = v.capacity() * size_of::<T>();
    let from = (v.as_ptr() as usize).next_multiple_of(HUGE);
    let to = (v.as_ptr() as usize + bytes) & !(HUGE - 1);
    if from < to {
        // SAFETY: advice on memory this vector owns; it changes no contents.
        unsafe {
            libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
        }
    }
}

/// log2 of the granule size.
const GRANULE_SHIFT: u32 = 8;
/// log2 of a start slot's size: 32 slots per granule, one bit each.
const SLOT_SHIFT: u32 = 3;
/// A larger gap between objects starts a new span (bounds wasted table space to
/// 16 KiB per gap).
const SPAN_GAP: u64 = 1 << 20;

struct Span {
    base: u64,
    end: u64,
    /// Index of its first granule in [`ObjectIndex::granules`].
    first: usize,
}

/// Granule tables this large are filled by several threads.
const PARALLEL_GRANULES: usize = 1 << 20;

/// A contiguous part of one span's granules, filled by one thread.
struct Share {
    /// The address of its first granule.
    base: u64,
    /// The objects from the first one starting at or after `base` to the span's end.
    objects: std::ops::Range<usize>,
    granules: usize,
}

/// A share and the slots of the granule table it fills.
type ShareOut<'a> = (Share, &'a mut [MaybeUninit<Granule>]);

/// Writes every granule of `share` into `out`; whether no two objects started
/// in one slot.
fn fill(ranges: &[(u64, u64)], share: &Share, out: &mut [MaybeUninit<Granule>]) -> bool {
    let mut k = share.objects.start;
    let mut exact = true;
    for (g, slot) in out.iter_mut().enumerate() {
        let granule_start = share.base + ((g as u64) << GRANULE_SHIFT);
        let before = k as u32;
        let mut starts = 0u32;
        while k < share.objects.end && ranges[k].0 < granule_start + (1 << GRANULE_SHIFT) {
            let bit = 1 << ((ranges[k].0 - granule_start) >> SLOT_SHIFT);
            exact &= starts & bit == 0;
            starts |= bit;
            k += 1;
        }
        slot.write(Granule { before, starts });
    }
    exact
}

/// What one granule of a span knows.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
struct Granule {
    /// Index of the first object starting at or after the granule's start.
    before: u32,
    /// Bit k: an object starts in the granule's slot k.
    starts: u32,
}

/// Sorted, non-overlapping object ranges and the granule tables over them.
/// Rebuilt for every scan ([`Self::rebuild`]) in the same memory, so that a big
/// index is not page-faulted afresh each time.
#[derive(Default)]
pub struct ObjectIndex {
    /// (start, end) side by side: a lookup touches one cache line, not two.
    ranges: Vec<(u64, u64)>,
    lo: u64,
    width: u64,
    spans: Vec<Span>,
    /// Every span's granules, one after the other.
    granules: Vec<Granule>,
    /// No two objects start in one slot: the popcount lookup is exact.
    exact_slots: bool,
    /// Every object starts on an 8-byte boundary: with `exact_slots`, an aligned
    /// address in a slot where an object starts is that object's start, and the
    /// lookup needs no more than its granule.
    aligned_starts: bool,
    /// No two objects overlap (a snapshot taken in parts while the table changed
    /// can hold two that do).
    disjoint: bool,
    /// The span with the most granules (the main heap, usually): its base,
    /// length and first granule, tried before any search of the spans, so that
    /// finding the granule of an address in it is a subtraction, a compare and a
    /// shift (other spans, as a thread arena's, cost a binary search).
    main_span: (u64, u64, usize),
}

impl ObjectIndex {
    /// `ranges` are (start, length) pairs sorted by start, not overlapping.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut index = Self::default();
        index.rebuild(ranges);
        index
    }

    /// [`Self::new`], reusing this index's memory.
    pub fn rebuild(&mut self, ranges: impl IntoIterator<Item = (u64, u64)>) {
        self.rebuild_on(ranges, 1);
    }

    /// [`Self::rebuild`], the granule table of a large heap filled by up to
    /// `threads` threads (each a contiguous share of it).
    pub fn rebuild_on(&mut self, ranges: impl IntoIterator<Item = (u64, u64)>, threads: usize) {
        let ranges = ranges.into_iter();
        self.ranges.clear();
        reserve_huge(&mut self.ranges, ranges.size_hint().0);
        self.ranges
            .extend(ranges.map(|(s, len)| (s, s.saturating_add(len.max(1)))));
        let ranges = &self.ranges;
        debug_assert!(ranges.windows(2).all(|w| w[0].0 < w[1].0), "sorted starts");
        self.lo = ranges.first().map_or(0, |r| r.0);
        // One pass over the objects for the spans (to size the granule table
        // before writing it) and the layout's properties.
        self.spans.clear();
        let mut bounds = Vec::new();
        let mut granules = 0;
        let (mut hi, mut aligned_starts, mut disjoint) = (0, true, true);
        let mut i = 0;
        while i < ranges.len() {
            let first_obj = i;
            let mut end = ranges[i].1;
            aligned_starts &= ranges[i].0.is_multiple_of(8);
            i += 1;
            while i < ranges.len() && ranges[i].0 <= end.saturating_add(SPAN_GAP) {
                aligned_starts &= ranges[i].0.is_multiple_of(8);
                disjoint &= ranges[i - 1].1 <= ranges[i].0;
                end = end.max(ranges[i].1);
                i += 1;
            }
            hi = hi.max(end);
            let base = ranges[first_obj].0 & !((1 << GRANULE_SHIFT) - 1);
            self.spans.push(Span {
                base,
                end,
                first: granules,
            });
            bounds.push(first_obj..i);
            granules += ((end - base) >> GRANULE_SHIFT) as usize + 1;
        }
        self.width = hi.saturating_sub(self.lo);
        self.aligned_starts = aligned_starts;
        self.disjoint = disjoint;
        // Each granule written once, whole (no zeroing pass over the table
        // first). A large span is cut into one share per thread; a share's first
        // object is found by binary search.
        self.granules.clear();
        reserve_huge(&mut self.granules, granules);
        let threads = if granules >= PARALLEL_GRANULES {
            threads.max(1)
        } else {
            1
        };
        let mut shares = Vec::new();
        for (span, objects) in self.spans.iter().zip(bounds) {
            let count = ((span.end - span.base) >> GRANULE_SHIFT) as usize + 1;
            let cuts = if count >= PARALLEL_GRANULES {
                threads
            } else {
                1
            };
            for c in 0..cuts {
                let (from, to) = (count * c / cuts, count * (c + 1) / cuts);
                let base = span.base + ((from as u64) << GRANULE_SHIFT);
                let first = objects.start + ranges[objects.clone()].partition_point(|r| r.0 < base);
                shares.push(Share {
                    base,
                    objects: first..objects.end,
                    granules: to - from,
                });
            }
        }
        let mut out = &mut self.granules.spare_capacity_mut()[..granules];
        let mut work: Vec<Vec<ShareOut>> = (0..threads).map(|_| Vec::new()).collect();
        for (k, share) in shares.into_iter().enumerate() {
            let (these, rest) = out.split_at_mut(share.granules);
            out = rest;
            work[k % threads].push((share, these));
        }
        let fill_all = |work: Vec<ShareOut>| {
            work.into_iter().fold(true, |exact, (share, out)| {
                fill(ranges, &share, out) && exact
            })
        };
        let exact_slots = std::thread::scope(|s| {
            let mut work = work.into_iter();
            let mine = work.next().expect("one share list per thread");
            let others: Vec<_> = work.map(|w| s.spawn(move || fill_all(w))).collect();
            let exact = fill_all(mine);
            others
                .into_iter()
                .fold(exact, |e, h| h.join().expect("index thread") && e)
        });
        // SAFETY: the shares cover the first `granules` slots, each written by `fill`.
        unsafe { self.granules.set_len(granules) };
        self.exact_slots = exact_slots;
        self.main_span = self
            .spans
            .iter()
            .max_by_key(|span| span.end - span.base)
            .map_or((0, 0, 0), |span| {
                (span.base, span.end - span.base, span.first)
            });
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn start(&self, i: u32) -> u64 {
        self.ranges[i as usize].0
    }

    pub fn end(&self, i: u32) -> u64 {
        self.ranges[i as usize].1
    }

    /// Whether no two objects overlap.
    pub fn disjoint(&self) -> bool {
        self.disjoint
    }

    /// Index of the first object whose end is above `addr`.
    pub fn first_ending_after(&self, addr: u64) -> usize {
        self.ranges.partition_point(|r| r.1 <= addr)
    }

    /// (lowest start, highest end − lowest start): an address `a` can only be in an
    /// object when `a - lo < width` (wrapping), the scan's cheap first filter.
    pub fn bounds(&self) -> (u64, u64) {
        (self.lo, self.width)
    }

    /// The address ranges holding objects, sorted: gaps of more than 1 MiB
    /// between objects separate them (the bulk filter's ranges).
    pub fn spans(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.spans.iter().map(|s| s.base..s.end)
    }

    /// The granule of `addr`, if it lies in a span.
    #[inline(always)]
    fn granule_of(&self, addr: u64) -> Option<&Granule> {
        let (base, len, first) = self.main_span;
        let offset = addr.wrapping_sub(base);
        if offset < len {
            let g = first + (offset >> GRANULE_SHIFT) as usize;
            // SAFETY: the span's granules cover base..base + len, from `first`.
            return Some(unsafe { self.granules.get_unchecked(g) });
        }
        if self.spans.len() > 1 {
            self.granule_in_other_span(addr)
        } else {
            None
        }
    }

    /// [`Self::granule_of`] outside the main span.
    #[inline(never)]
    fn granule_in_other_span(&self, addr: u64) -> Option<&Granule> {
        let k = self.spans.partition_point(|s| s.base <= addr);
        let span = &self.spans[k.checked_sub(1)?];
        (addr < span.end).then(|| {
            let g = span.first + ((addr - span.base) >> GRANULE_SHIFT) as usize;
            // SAFETY: a span's granules cover base..end.
            unsafe { self.granules.get_unchecked(g) }
        })
    }

    /// The one object that can contain `addr`, from its granule: the last one
    /// starting at or below it (`u32::MAX` when none does).
    #[inline]
    fn candidate(&self, granule: Granule, addr: u64) -> u32 {
        let slot = (addr >> SLOT_SHIFT) & ((1 << (GRANULE_SHIFT - SLOT_SHIFT)) - 1);
        let at_or_below = granule.starts & (u32::MAX >> (31 - slot));
        (granule.before + at_or_below.count_ones()).wrapping_sub(1)
    }

    /// Whether object `i` (a [`Self::candidate`]) contains `addr`; corrects for an
    /// object starting later inside the slot, or two sharing it.
    #[inline]
    fn check(&self, i: u32, addr: u64) -> Option<u32> {
        let (start, end) = *self.ranges.get(i as usize)?;
        if start <= addr {
            return (addr < end).then_some(i);
        }
        self.walk_back_from(i, addr)
    }

    /// The slow path: starts not 8-byte aligned (never from a real allocator).
    #[cold]
    fn walk_back_from(&self, i: u32, addr: u64) -> Option<u32> {
        let i = self.ranges[..i as usize].partition_point(|r| r.0 <= addr);
        let j = i.checked_sub(1)?;
        (addr < self.ranges[j].1).then_some(j as u32)
    }

    /// Starts loading the memory a [`Self::lookup`] of `addr` will read first
    /// (its granule), a little ahead of that lookup: lookups into a big heap miss
    /// the cache, and prefetching keeps several misses in flight instead of one.
    #[inline(always)]
    pub fn prefetch(&self, addr: u64) {
        if let Some(granule) = self.granule_of(addr) {
            prefetch(granule);
        }
    }

    /// The object containing `addr` and how far into it `addr` lies. An aligned
    /// pointer to a slot where an object starts (the usual pointer) is resolved
    /// from its granule alone; others read the candidate object's bounds.
    #[inline(always)]
    pub fn lookup(&self, addr: u64) -> Option<(u32, u64)> {
        if !self.exact_slots {
            return self.find(addr).map(|j| (j, addr - self.start(j)));
        }
        let granule = *self.granule_of(addr)?;
        let slot = (addr >> SLOT_SHIFT) & ((1 << (GRANULE_SHIFT - SLOT_SHIFT)) - 1);
        let candidate = self.candidate(granule, addr);
        if self.aligned_starts && addr.is_multiple_of(8) && granule.starts >> slot & 1 == 1 {
            return Some((candidate, 0));
        }
        self.lookup_interior(candidate, addr)
    }

    /// [`Self::lookup`] of an address that is not an object's start.
    #[inline(never)]
    fn lookup_interior(&self, candidate: u32, addr: u64) -> Option<(u32, u64)> {
        let j = self.check(candidate, addr)?;
        Some((j, addr - self.start(j)))
    }

    /// The object containing `addr`, if any.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<u32> {
        if addr.wrapping_sub(self.lo) >= self.width {
            return None;
        }
        let granule = *self.granule_of(addr)?;
        if self.exact_slots {
            return self.check(self.candidate(granule, addr), addr);
        }
        // Walk from the object that may reach into the granule.
        let mut i = granule.before.saturating_sub(1) as usize;
        while let Some(&(start, end)) = self.ranges.get(i)
            && start <= addr
        {
            if addr < end {
                return Some(i as u32);
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_fill_the_granule_table_one_thread_fills() {
        // A main span of 600 MB (2.4 M granules: cut in shares), objects of
        // 16..4096 bytes at pseudo-random gaps (a few of 512 KiB); a small span
        // far above it.
        let mut x: u64 = 7;
        let mut ranges = Vec::new();
        let mut at = 0x5555_0000_0000u64;
        while at < 0x5555_0000_0000 + (600 << 20) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 16 + x % 4096;
            ranges.push((at, len));
            at += len + (x >> 20) % 64 * 8 + if x.is_multiple_of(97) { 512 << 10 } else { 0 };
        }
        ranges.push((0x7f00_0000_0000, 64));
        let one = ObjectIndex::new(ranges.iter().copied());
        assert!(
            one.granules.len() >= 2 * PARALLEL_GRANULES,
            "{}",
            one.granules.len()
        );
        for threads in [2, 3] {
            let mut many = ObjectIndex::default();
            many.rebuild_on(ranges.iter().copied(), threads);
            assert!(many.granules == one.granules, "{threads} threads");
            assert_eq!(many.exact_slots, one.exact_slots);
            for &(s, len) in ranges.iter().step_by(101) {
                assert_eq!(many.lookup(s + len / 2), one.lookup(s + len / 2));
            }
        }
    }

    fn brute(ranges: &[(u64, u64)], addr: u64) -> Option<u32> {
        ranges
            .iter()
            .position(|&(s, l)| s <= addr && addr < s + l.max(1))
            .map(|i| i as u32)
    }

    #[test]
    fn finds_objects_by_interior_address() {
        let ranges = vec![
            (0x1000, 16),
            (0x1010, 0),
            (0x1020, 0x300),
            (0x5000_0000, 64),
        ];
        let index = ObjectIndex::new(ranges.clone());
        for addr in [
            0xfff,
            0x1000,
            0x100f,
            0x1010,
            0x1011,
            0x1020,
            0x131f,
            0x1320,
            0x4fff_ffff,
            0x5000_0000,
            0x5000_003f,
            0x5000_0040,
            0,
            u64::MAX,
        ] {
            assert_eq!(index.find(addr), brute(&ranges, addr), "address {addr:#x}");
        }
        assert_eq!(index.spans.len(), 2);
    }

    /// A pseudo-random heap (small and large blocks, gaps, far spans), starts
    /// rounded to `align`; checks every kind of lookup against brute force.
    fn agrees_with_brute_force(align: u64, exact_slots: bool) {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ranges = Vec::new();
        let mut addr = 0x5555_0000_0000u64;
        for _ in 0..2000 {
            addr += next() % 64 * 16;
            if next() % 97 == 0 {
                addr += 1 << 22;
            }
            let len = if next() % 50 == 0 {
                next() % 200_000
            } else {
                next() % 512
            };
            addr = addr.next_multiple_of(align);
            ranges.push((addr, len));
            addr += len.max(1);
        }
        if !exact_slots {
            // Tiny objects back to back: several start in one 8-byte slot.
            for len in [1, 2, 0, 3, 9, 1, 1] {
                ranges.push((addr, len));
                addr += len.max(1);
            }
        }
        let index = ObjectIndex::new(ranges.clone());
        assert_eq!(index.exact_slots, exact_slots);
        let (lo, hi) = (ranges[0].0 - 100, addr + 100);
        for _ in 0..20_000 {
            let probe = lo + next() % (hi - lo);
            assert_eq!(
                index.find(probe),
                brute(&ranges, probe),
                "address {probe:#x}"
            );
        }
        for &(s, l) in &ranges {
            assert!(index.find(s).is_some());
            assert_eq!(index.find(s + l.max(1) - 1), index.find(s));
        }
        // Starts (the granule-only path), middles and misses, through lookup.
        for &(s, l) in &ranges {
            for probe in [s, s + l / 2, s + l.max(1), s.wrapping_sub(1)] {
                let want = brute(&ranges, probe).map(|j| (j, probe - ranges[j as usize].0));
                assert_eq!(index.lookup(probe), want, "address {probe:#x}");
            }
        }
    }

    #[test]
    fn agrees_with_brute_force_on_an_allocator_like_heap() {
        agrees_with_brute_force(16, true);
    }

    #[test]
    fn agrees_with_brute_force_with_odd_starts_and_shared_slots() {
        // Byte-aligned starts: some objects start mid-slot, some share a slot.
        agrees_with_brute_force(1, false);
    }

    #[test]
    fn odd_starts_in_distinct_slots_stay_exact() {
        let ranges = vec![(0x1003, 4), (0x100b, 20), (0x1104, 8)];
        let index = ObjectIndex::new(ranges.clone());
        assert!(index.exact_slots);
        for addr in 0x1000..0x1120 {
            assert_eq!(index.find(addr), brute(&ranges, addr), "address {addr:#x}");
        }
    }

    #[test]
    fn lookups_agree_with_finds_in_one_span_and_in_several() {
        let one: Vec<(u64, u64)> = (0..500)
            .map(|i| (0x10000 + i * 0x90, 0x40 + i % 7))
            .collect();
        let several: Vec<(u64, u64)> = one
            .iter()
            .map(|&(s, l)| (s + (s - 0x10000) / 0x900 * (SPAN_GAP + 0x1000), l))
            .collect();
        // A big span between two small ones (a heap between thread arenas): the
        // big one is looked up first, the others by search.
        let small = |base: u64| (0..5u64).map(move |i| (base + i * 0x100, 0x20));
        let big_in_the_middle: Vec<(u64, u64)> = small(0x1000)
            .chain(one.iter().map(|&(s, l)| (s + (4 << 20), l)))
            .chain(small(64 << 20))
            .collect();
        for (ranges, spans) in [(one, 1), (several, 32), (big_in_the_middle, 3)] {
            let index = ObjectIndex::new(ranges.clone());
            assert_eq!(index.spans.len(), spans);
            let biggest = index.spans.iter().map(|s| s.end - s.base).max();
            assert_eq!(Some(index.main_span.1), biggest);
            let (lo, hi) = (ranges[0].0 - 0x1000, ranges[ranges.len() - 1].0 + 0x1000);
            let mut hits = 0;
            for addr in (lo..hi).step_by(0x5d).chain([0, 8, u64::MAX - 7, lo, hi]) {
                let found = index.find(addr).map(|j| (j, addr - index.start(j)));
                assert_eq!(index.lookup(addr), found, "address {addr:#x}");
                hits += usize::from(found.is_some());
                // A hint, for any address.
                index.prefetch(addr);
            }
            assert!(hits > 100);
        }
    }

    #[test]
    fn empty_index_finds_nothing() {
        let index = ObjectIndex::new(Vec::new());
        assert!(index.is_empty());
        assert_eq!(index.find(0x1000), None);
    }
}
