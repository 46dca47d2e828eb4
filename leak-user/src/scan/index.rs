//! "Which tracked object contains this address?" in O(1) expected time.
//!
//! Every aligned word of scanned memory asks this question, so it must not degrade
//! with the number of objects. Words outside [lowest start, highest end) are
//! rejected with one subtraction and one compare. The rest go through a per-span
//! granule table: objects are grouped into spans (a gap of more than 1 MiB
//! starts a new one), and each 256-byte granule of a span records the first object
//! that ends after the granule's start. A lookup is then a table read and a short
//! forward walk (at most the objects that start inside one granule).

/// Lookups resolved together by [`ObjectIndex::find_batch`].
pub const BATCH: usize = 32;

#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; any address is allowed, even an invalid one.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p.cast::<i8>(), core::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// log2 of the granule size.
const GRANULE_SHIFT: u32 = 8;
/// A larger gap between objects starts a new span (bounds wasted table space to
/// 16 KiB per gap).
const SPAN_GAP: u64 = 1 << 20;

struct Span {
    base: u64,
    end: u64,
    /// first[g] = index of the first object whose end is above granule g's start.
    first: Vec<u32>,
}

/// Sorted, non-overlapping object ranges and the granule tables over them.
pub struct ObjectIndex {
    /// (start, end) side by side: a lookup touches one cache line, not two.
    ranges: Vec<(u64, u64)>,
    lo: u64,
    width: u64,
    spans: Vec<Span>,
}

impl ObjectIndex {
    /// `ranges` are (start, length) pairs sorted by start, not overlapping.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let ranges: Vec<(u64, u64)> = ranges
            .into_iter()
            .map(|(s, len)| (s, s.saturating_add(len.max(1))))
            .collect();
        debug_assert!(ranges.windows(2).all(|w| w[0].0 < w[1].0), "sorted starts");
        let lo = ranges.first().map_or(0, |r| r.0);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let mut spans = Vec::new();
        let mut i = 0;
        while i < ranges.len() {
            let first_obj = i;
            let mut end = ranges[i].1;
            i += 1;
            while i < ranges.len() && ranges[i].0 <= end.saturating_add(SPAN_GAP) {
                end = end.max(ranges[i].1);
                i += 1;
            }
            let base = ranges[first_obj].0 & !((1 << GRANULE_SHIFT) - 1);
            let granules = ((end - base) >> GRANULE_SHIFT) as usize + 1;
            let mut first = Vec::with_capacity(granules);
            let mut k = first_obj;
            for g in 0..granules {
                let granule_start = base + ((g as u64) << GRANULE_SHIFT);
                while k < i && ranges[k].1 <= granule_start {
                    k += 1;
                }
                first.push(k as u32);
            }
            spans.push(Span { base, end, first });
        }
        Self {
            ranges,
            lo,
            width: hi.saturating_sub(lo),
            spans,
        }
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

    /// Index of the first object whose end is above `addr`.
    pub fn first_ending_after(&self, addr: u64) -> usize {
        self.ranges.partition_point(|r| r.1 <= addr)
    }

    /// (lowest start, highest end − lowest start): an address `a` can only be in an
    /// object when `a - lo < width` (wrapping), the scan's cheap first filter.
    pub fn bounds(&self) -> (u64, u64) {
        (self.lo, self.width)
    }

    /// The span and granule slot of `addr` (which passed [`Self::in_range`]).
    #[inline]
    fn slot(&self, addr: u64) -> Option<(&Span, usize)> {
        let span = if self.spans.len() == 1 {
            &self.spans[0]
        } else {
            let k = self.spans.partition_point(|s| s.base <= addr);
            &self.spans[k.checked_sub(1)?]
        };
        (addr < span.end).then(|| (span, ((addr - span.base) >> GRANULE_SHIFT) as usize))
    }

    /// Looks up a batch of in-range addresses at once, prefetching each step's
    /// memory for the whole batch before using it: lookups into a big heap miss the
    /// cache, and a batch keeps many misses in flight instead of one. Each hit is
    /// (object index, object start).
    pub fn find_batch(&self, addrs: &[u64], out: &mut Vec<Option<(u32, u64)>>) {
        out.clear();
        let mut firsts = [u32::MAX; BATCH];
        let mut slots: [Option<(&Span, usize)>; BATCH] = [None; BATCH];
        for (k, &a) in addrs.iter().enumerate() {
            slots[k] = self.slot(a);
            if let Some((span, g)) = slots[k] {
                prefetch(span.first.as_ptr().wrapping_add(g));
            }
        }
        for (k, slot) in slots.iter().take(addrs.len()).enumerate() {
            if let Some((span, g)) = *slot {
                firsts[k] = span.first[g];
                prefetch(self.ranges.as_ptr().wrapping_add(firsts[k] as usize));
            }
        }
        for (k, &a) in addrs.iter().enumerate() {
            out.push(
                self.walk_from(firsts[k], a)
                    .map(|j| (j, self.ranges[j as usize].0)),
            );
        }
    }

    #[inline]
    fn walk_from(&self, first: u32, addr: u64) -> Option<u32> {
        if first == u32::MAX {
            return None;
        }
        let mut i = first as usize;
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

    /// The object containing `addr`, if any.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<u32> {
        if addr.wrapping_sub(self.lo) >= self.width {
            return None;
        }
        let span = if self.spans.len() == 1 {
            &self.spans[0]
        } else {
            let k = self.spans.partition_point(|s| s.base <= addr);
            &self.spans[k.checked_sub(1)?]
        };
        if addr >= span.end {
            return None;
        }
        let mut i = span.first[((addr - span.base) >> GRANULE_SHIFT) as usize] as usize;
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

    #[test]
    fn agrees_with_brute_force_on_a_random_heap() {
        // Deterministic pseudo-random layout: small and large blocks, gaps, far spans.
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
            ranges.push((addr, len));
            addr += len.max(1);
        }
        let index = ObjectIndex::new(ranges.clone());
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
    }

    #[test]
    fn batches_agree_with_single_lookups() {
        let ranges: Vec<(u64, u64)> = (0..500)
            .map(|i| (0x10000 + i * 0x90, 0x40 + i % 7))
            .collect();
        let index = ObjectIndex::new(ranges);
        let addrs: Vec<u64> = (0..BATCH as u64).map(|k| 0x10000 + k * 0x5d3).collect();
        let mut out = Vec::new();
        index.find_batch(&addrs, &mut out);
        let out: Vec<Option<u32>> = out.iter().map(|h| h.map(|(j, _)| j)).collect();
        let single: Vec<Option<u32>> = addrs.iter().map(|&a| index.find(a)).collect();
        assert_eq!(out, single);
        assert!(out.iter().any(Option::is_some) && out.iter().any(Option::is_none));
    }

    #[test]
    fn empty_index_finds_nothing() {
        let index = ObjectIndex::new(Vec::new());
        assert!(index.is_empty());
        assert_eq!(index.find(0x1000), None);
    }
}
