//! The clock the eBPF programs stamp records with (`bpf_ktime_get_ns`, i.e.
//! CLOCK_MONOTONIC), read from user space.

/// CLOCK_MONOTONIC in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one read of this clock costs here, in nanoseconds: the median of five
/// batches of reads. The vDSO reads the clock source the kernel reads (the TSC,
/// or a hypervisor's clock page), so this tells what a program's
/// `bpf_ktime_get_ns` costs; a clock source the vDSO cannot read makes every
/// read a system call, and the figure large.
pub fn read_cost_ns() -> f64 {
    const READS: u32 = 2000;
    let mut batches: Vec<f64> = (0..5)
        .map(|_| {
            let start = now_ns();
            for _ in 0..READS {
                std::hint::black_box(now_ns());
            }
            now_ns().saturating_sub(start) as f64 / f64::from(READS)
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    batches[2]
}
