//! Software prefetch: the scan's random accesses (the index's granules for each
//! candidate word, the graph's edge lists during the mark) go to tables larger
//! than the caches, and asking for a line a little before it is needed keeps
//! several misses in flight instead of one at a time.

/// Starts loading the cache line holding `p` into every cache level. A hint:
/// any address is allowed, even an invalid one.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint; it never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(p.cast::<i8>(), core::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
