//! Rejecting words that cannot point into a tracked object, in bulk, before any
//! index lookup.
//!
//! Most scanned words are data, or pointers to code, stacks and libraries: only
//! those inside the address ranges that hold tracked objects need the index. A
//! [`Filter`] holds up to [`RANGES`] such ranges (the index's spans, merged across
//! their smallest gaps, and never below LSan's 16 KiB floor) and tests eight words
//! at a time: with AVX2 (detected at run time) as four 4-lane subtract-and-compare
//! steps per range, otherwise with scalar code. Both give the same mask, so the
//! scan's results do not depend on the machine. The words that pass are not
//! handed on one by one: their positions are packed into a [`Passed`] list (with
//! AVX2, one table look-up and one store per eight words, no branch per word),
//! which the caller then resolves in a loop of its own.
use std::ops::Range;

/// Most ranges a filter checks; more spans are merged across their smallest gaps.
pub const RANGES: usize = 4;

/// Words tested together.
pub const BLOCK: usize = 8;

/// The address ranges a pointer into a tracked object can lie in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// (start, length), `a` passes when `a - start < length` (wrapping) for one
    /// of them; unused entries have length 0.
    ranges: [(u64, u64); RANGES],
    avx2: bool,
}

impl Filter {
    /// A filter passing exactly the words in `spans` (sorted, disjoint) that are
    /// at least `floor`, plus the gaps between spans it had to merge.
    pub fn new(spans: impl IntoIterator<Item = Range<u64>>, floor: u64) -> Self {
        let mut merged: Vec<Range<u64>> = spans
            .into_iter()
            .filter_map(|r| {
                let start = r.start.max(floor);
                (start < r.end).then_some(start..r.end)
            })
            .collect();
        while merged.len() > RANGES {
            let k = (1..merged.len())
                .min_by_key(|&k| merged[k].start - merged[k - 1].end)
                .expect("more than one range");
            merged[k - 1].end = merged[k].end;
            merged.remove(k);
        }
        let mut ranges = [(0, 0); RANGES];
        for (slot, r) in ranges.iter_mut().zip(&merged) {
            *slot = (r.start, r.end - r.start);
        }
        Self {
            ranges,
            avx2: avx2_available(),
        }
    }

    /// The same filter, never using AVX2 (to compare the two).
    pub fn scalar(mut self) -> Self {
        self.avx2 = false;
        self
    }

    /// Whether `w` may point into a tracked object.
    #[inline]
    pub fn passes(&self, w: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(start, len)| w.wrapping_sub(start) < len)
    }

    /// Packs into `passed` the positions (in words from the start of `bytes`) of
    /// the aligned words of `bytes` that pass, in order (a partial word at the
    /// end is ignored).
    pub fn collect(&self, bytes: &[u8], passed: &mut Passed) {
        passed.make_room(bytes.len() / 8);
        let blocks = bytes.len() / (BLOCK * 8) * BLOCK;
        let whole = &bytes[..blocks * 8];
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: AVX2 was detected at run time; `passed` has room for every
            // word of `bytes` and a block more.
            unsafe { avx2::collect(&self.ranges, whole, passed) };
            return self.collect_tail(bytes, blocks, passed);
        }
        // The same, without branches on the words either: every position is
        // written, the count advances only past those that pass.
        let mut n = 0;
        for (k, w) in whole.chunks_exact(8).enumerate() {
            passed.positions[n] = k as u32;
            n += usize::from(self.passes(word(w)));
        }
        passed.len = n;
        self.collect_tail(bytes, blocks, passed);
    }

    /// The words of `bytes` from word `from` on, one at a time (the tail that
    /// fills no block), appended to `passed`.
    fn collect_tail(&self, bytes: &[u8], from: usize, passed: &mut Passed) {
        for (k, w) in bytes[from * 8..].chunks_exact(8).enumerate() {
            if self.passes(word(w)) {
                passed.positions[passed.len] = (from + k) as u32;
                passed.len += 1;
            }
        }
    }
}

/// The positions of the words that passed a [`Filter::collect`], reused from one
/// slice to the next.
#[derive(Default)]
pub struct Passed {
    /// Room for every word of the slice and one block more: the vector path
    /// stores a whole block's positions at once, however many passed.
    positions: Vec<u32>,
    len: usize,
}

impl Passed {
    /// The positions, in words from the start of the slice, increasing.
    pub fn positions(&self) -> &[u32] {
        &self.positions[..self.len]
    }

    fn make_room(&mut self, words: usize) {
        self.len = 0;
        if self.positions.len() < words + BLOCK {
            self.positions.resize(words + BLOCK, 0);
        }
    }
}

/// The word at position `k` of `bytes` (a [`Passed`] position).
#[inline(always)]
pub fn word_at(bytes: &[u8], k: u32) -> u64 {
    word(&bytes[k as usize * 8..])
}

#[inline(always)]
fn word(bytes: &[u8]) -> u64 {
    u64::from_ne_bytes(bytes[..8].try_into().expect("8 bytes"))
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm_cvtsi64_si128, _mm256_add_epi32, _mm256_castsi256_pd, _mm256_cmpgt_epi64,
        _mm256_cvtepu8_epi32, _mm256_loadu_si256, _mm256_movemask_pd, _mm256_set1_epi32,
        _mm256_set1_epi64x, _mm256_storeu_si256, _mm256_sub_epi64, _mm256_xor_si256,
    };

    use super::{BLOCK, Passed, RANGES};

    /// For each 8-bit mask, the positions of its set bits, one byte each, lowest
    /// first: the left-packing of a block's passing words.
    const PACK: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut mask = 0;
        while mask < 256 {
            let (mut packed, mut n) = (0u64, 0);
            let mut k = 0;
            while k < 8 {
                if mask >> k & 1 == 1 {
                    packed |= (k as u64) << (8 * n);
                    n += 1;
                }
                k += 1;
            }
            table[mask] = packed;
            mask += 1;
        }
        table
    };

    /// [`super::Filter::collect`] eight words at a time: `a - start < len`
    /// unsigned is a signed compare of both sides with the sign bit flipped (AVX2
    /// has no unsigned 64-bit compare); the block's mask picks the packed
    /// positions of its passing words, stored eight at a time.
    ///
    /// # Safety
    /// The CPU has AVX2; `passed` has room for every word of `bytes` and
    /// [`BLOCK`] more.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn collect(ranges: &[(u64, u64); RANGES], bytes: &[u8], passed: &mut Passed) {
        debug_assert!(passed.positions.len() >= bytes.len() / 8 + BLOCK);
        let sign = _mm256_set1_epi64x(i64::MIN);
        let used = ranges.iter().take_while(|r| r.1 != 0).count();
        let starts: [__m256i; RANGES] =
            std::array::from_fn(|r| _mm256_set1_epi64x(ranges[r].0 as i64));
        let limits: [__m256i; RANGES] =
            std::array::from_fn(|r| _mm256_xor_si256(_mm256_set1_epi64x(ranges[r].1 as i64), sign));
        let out = passed.positions.as_mut_ptr();
        let mut n = 0usize;
        let mut blocks = bytes.chunks_exact(BLOCK * 8);
        for (b, block) in (&mut blocks).enumerate() {
            // SAFETY: both loads read 32 bytes inside the 64-byte block.
            let (lo, hi) = unsafe {
                (
                    _mm256_loadu_si256(block.as_ptr().cast::<__m256i>()),
                    _mm256_loadu_si256(block.as_ptr().add(32).cast::<__m256i>()),
                )
            };
            let mut mask = 0u32;
            for r in 0..used {
                let off_lo = _mm256_xor_si256(_mm256_sub_epi64(lo, starts[r]), sign);
                let off_hi = _mm256_xor_si256(_mm256_sub_epi64(hi, starts[r]), sign);
                let pass_lo = _mm256_cmpgt_epi64(limits[r], off_lo);
                let pass_hi = _mm256_cmpgt_epi64(limits[r], off_hi);
                mask |= _mm256_movemask_pd(_mm256_castsi256_pd(pass_lo)) as u32
                    | (_mm256_movemask_pd(_mm256_castsi256_pd(pass_hi)) as u32) << 4;
            }
            let packed = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(PACK[mask as usize] as i64));
            let positions = _mm256_add_epi32(packed, _mm256_set1_epi32((b * BLOCK) as i32));
            // SAFETY: n counts passing words of earlier blocks, so n + 8 is within
            // the room the caller made.
            unsafe { _mm256_storeu_si256(out.add(n).cast::<__m256i>(), positions) };
            n += mask.count_ones() as usize;
        }
        passed.len = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(seed: u64, n: usize, near: &[u64]) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match x % 4 {
                    0 => x,
                    1 => x % 100_000,
                    // Around the range edges, where off-by-ones hide.
                    _ => near[(x >> 8) as usize % near.len()]
                        .wrapping_add((x >> 32) % 5)
                        .wrapping_sub(2),
                }
            })
            .collect()
    }

    fn passing(filter: &Filter, bytes: &[u8]) -> Vec<u64> {
        let mut passed = Passed::default();
        filter.collect(bytes, &mut passed);
        passed
            .positions()
            .iter()
            .map(|&k| word_at(bytes, k))
            .collect()
    }

    #[test]
    fn vector_and_scalar_filters_agree_with_the_definition() {
        let spans = [
            0x1000..0x9000,
            0x5555_0000_0000..0x5555_1000_0000,
            0x5555_2000_0000..0x5555_2000_1000,
            0x7f00_0000_0000..0x7f00_0100_0000,
            0x7fff_0000_0000..0x7fff_0000_0100,
            0xffff_ffff_ffff_0000..u64::MAX,
        ];
        let near: Vec<u64> = spans.iter().flat_map(|r| [r.start, r.end]).collect();
        let ws = words(0x1234_5678, 20_000, &near);
        let bytes: Vec<u8> = ws.iter().flat_map(|w| w.to_ne_bytes()).collect();
        for used in 0..=spans.len() {
            let filter = Filter::new(spans[..used].iter().cloned(), 16 << 10);
            // Every length and start, so tails and partial blocks are covered.
            for (from, len) in [(0, bytes.len()), (8, 8 * 13), (16, 8 * 7), (24, 8 * 64 + 3)] {
                let slice = &bytes[from..from + len];
                let want: Vec<u64> = slice
                    .chunks_exact(8)
                    .map(word)
                    .filter(|&w| filter.passes(w))
                    .collect();
                assert_eq!(passing(&filter, slice), want, "{used} ranges");
                assert_eq!(passing(&filter.clone().scalar(), slice), want);
            }
        }
    }

    #[test]
    fn merged_ranges_cover_every_span_and_respect_the_floor() {
        let spans: Vec<Range<u64>> = (0..10u64)
            .map(|k| {
                (k + 1) * 0x100_0000 + k * k * 0x1000
                    ..(k + 1) * 0x100_0000 + 0x1000 + k * k * 0x1000
            })
            .chain(std::iter::once(0x100..0x5000))
            .collect();
        let mut sorted = spans.clone();
        sorted.sort_by_key(|r| r.start);
        let filter = Filter::new(sorted.clone(), 0x4000);
        for r in &sorted {
            for a in [r.start.max(0x4000), r.end - 1] {
                assert!(filter.passes(a), "{a:#x}");
            }
        }
        assert!(!filter.passes(0x3fff));
        assert!(!filter.passes(0x100));
        assert!(!filter.passes(sorted.last().expect("spans").end));
        assert!(!filter.passes(0));
    }

    #[test]
    fn an_empty_filter_passes_nothing() {
        let filter = Filter::new(std::iter::empty(), 0);
        let bytes: Vec<u8> = [0, 1, u64::MAX, 0x5555_0000_0000, 8, 9, 10, 11, 12]
            .iter()
            .flat_map(|w: &u64| w.to_ne_bytes())
            .collect();
        assert!(passing(&filter, &bytes).is_empty());
    }
}
