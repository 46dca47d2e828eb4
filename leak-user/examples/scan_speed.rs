//! Where a scan's time goes, without a live target: a heap shaped like the `hog`
//! fixture (objects of 16..1024 bytes with 16-byte headers between them, one word
//! in K a pointer to another object, the rest small numbers) built in this
//! process and read back through `process_vm_readv` of our own pid, the way the
//! scanner reads a target. Each round times, side by side:
//!
//! * `read`: the memory alone, 1 MiB at a time (the physical limit);
//! * `+ reject`: the read plus the bulk filter over every word;
//! * `+ lookup`: that plus the index lookups of the words that pass;
//! * `walk` (1 and 2 threads): the scanner's read and walk with edge recording;
//! * `scan` (1 and 2 threads): the whole scan (index, plan, walk, mark, sweep).
//!
//! Prints medians (min–max) of MB/s, the ratio to the read of the same round, and
//! cycles per word, from the TSC (this VM exposes no cycle counters, so these are
//! nominal-clock cycles of wall time, not core cycles).
//!
//! `cargo run --release -p leaktrace --example scan_speed -- [objects] [every] [rounds]`

use std::{alloc::Layout, time::Instant};

use leaktrace::{
    proc::{
        maps::{Backing, Mapping},
        mem::{MemorySource as _, ProcessMemory, ReadMethod},
    },
    scan::{
        ScanInput, Workspace,
        filter::{Filter, Passed, word_at},
        index::ObjectIndex,
    },
    table::{Object, Snapshot},
};

const CHUNK: usize = 1 << 20;
const LISTS: usize = 4096;

fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// The heap: list heads (a root) then the objects, in one page-aligned block.
struct Heap {
    base: u64,
    len: u64,
    objects: Vec<(u64, Object)>,
}

fn build(n: usize, every: u64) -> Heap {
    let mut x: u32 = 12345;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let sizes: Vec<u64> = (0..n)
        .map(|i| {
            if i % 97 == 0 {
                1024
            } else {
                16 + u64::from(next() % 64) * 16
            }
        })
        .collect();
    let table_bytes = (LISTS * 8) as u64;
    let len = table_bytes + sizes.iter().map(|s| s + 16).sum::<u64>() + 16;
    let layout = Layout::from_size_align(len as usize, 4096).expect("layout");
    // SAFETY: a non-zero size; the block lives as long as the process (leaked).
    let base = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
    assert_ne!(base, 0, "out of memory");
    let word = |a: u64| a as *mut u64;
    let mut objects = Vec::with_capacity(n);
    let mut addr = base + table_bytes + 16;
    for (i, &size) in sizes.iter().enumerate() {
        objects.push((addr, Object::new(size, 0, 0, 1, i as u32 + 1)));
        addr += size + 16;
    }
    let mut heads = vec![0u64; LISTS];
    for (i, &(a, o)) in objects.iter().enumerate() {
        let r = u64::from(next());
        for w in 1..o.size() / 8 {
            let value = if w % every == 0 {
                heads[((r + w) % LISTS as u64) as usize]
            } else {
                r * w
            };
            // SAFETY: inside the block allocated above.
            unsafe { *word(a + w * 8) = value };
        }
        // SAFETY: as above.
        unsafe { *word(a) = heads[i % LISTS] };
        heads[i % LISTS] = a;
    }
    for (k, &h) in heads.iter().enumerate() {
        // SAFETY: the table at the block's start.
        unsafe { *word(base + k as u64 * 8) = h };
    }
    Heap { base, len, objects }
}

fn input(heap: &Heap) -> ScanInput {
    ScanInput {
        snapshot: Snapshot {
            objects: heap.objects.clone(),
            // As for a heap that grew after leaktrace attached: the allocator's
            // memory (headers between blocks) is not a root; the list heads are.
            owned: std::iter::once(heap.base + (LISTS * 8) as u64..heap.base + heap.len).collect(),
            ..Snapshot::default()
        },
        maps: vec![Mapping {
            start: heap.base,
            end: heap.base + heap.len.next_multiple_of(4096),
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset: 0,
            dev: 0,
            inode: 0,
            backing: Backing::Anonymous,
        }],
        ..ScanInput::default()
    }
}

/// Reads the heap 1 MiB at a time, handing each window to `each`.
fn read_all(memory: &ProcessMemory, heap: &Heap, buf: &mut [u8], mut each: impl FnMut(&[u8])) {
    let mut at = heap.base;
    let end = heap.base + heap.len;
    while at < end {
        let len = ((end - at) as usize).min(CHUNK);
        let got = memory.read(at, &mut buf[..len]);
        assert_eq!(got, len, "short read of our own memory");
        each(&buf[..len]);
        at += len as u64;
    }
}

/// Seconds and TSC ticks of `f`.
fn timed(f: impl FnOnce()) -> (f64, u64) {
    let (t0, c0) = (Instant::now(), ticks());
    f();
    (t0.elapsed().as_secs_f64(), ticks() - c0)
}

fn median_min_max(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let every: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let heap = build(n, every);
    let input = input(&heap);
    let memory =
        ProcessMemory::open(std::process::id(), ReadMethod::ProcessVmReadv).expect("own memory");
    let index = ObjectIndex::new(input.snapshot.objects.iter().map(|(a, o)| (*a, o.size())));
    let filter = Filter::new(index.spans(), 16 << 10);
    let mut buf = vec![0u8; CHUNK];
    let mut positions = Passed::default();
    let mut one = Workspace::with_threads(1);
    let mut two = Workspace::with_threads(2);
    let words = heap.len as f64 / 8.0;
    let names = [
        "read",
        "+ reject",
        "+ lookup",
        "walk, 1 thread",
        "walk, 2 threads",
        "scan, 1 thread",
        "scan, 2 threads",
    ];
    // Per phase: (MB/s, ratio to this round's read, ticks per word).
    let mut figures: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); names.len()];
    let (mut passed, mut hits, mut edges) = (0u64, 0u64, 0u64);
    // The 2-thread scans' phases, ms: index and plan, read and walk, mark and sweep.
    let mut phases: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds {
        let mut times = Vec::new();
        times.push(timed(|| {
            read_all(&memory, &heap, &mut buf, |w| {
                std::hint::black_box(w);
            })
        }));
        times.push(timed(|| {
            passed = 0;
            read_all(&memory, &heap, &mut buf, |w| {
                filter.collect(w, &mut positions);
                passed += positions.positions().len() as u64;
            });
        }));
        times.push(timed(|| {
            hits = 0;
            read_all(&memory, &heap, &mut buf, |w| {
                filter.collect(w, &mut positions);
                let positions = positions.positions();
                // As the walk does: each word's granule prefetched 16 words ahead.
                for (n, &k) in positions.iter().enumerate() {
                    if let Some(&ahead) = positions.get(n + 16) {
                        index.prefetch(word_at(w, ahead));
                    }
                    hits += u64::from(index.lookup(word_at(w, k)).is_some());
                }
            });
        }));
        for ws in [&mut one, &mut two] {
            let mut walk = 0.0;
            let mut timings = None;
            let (secs, ticks) = timed(|| {
                let out = ws.scan(&input, &memory);
                edges = out.stats.edges;
                walk = out.timings.read_and_walk.as_secs_f64();
                timings = Some(out.timings);
            });
            if let Some(t) = timings.filter(|t| t.threads == 2) {
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                phases[0].push(ms(t.index_and_plan));
                phases[1].push(ms(t.read_and_walk));
                phases[2].push(ms(t.mark_and_sweep));
            }
            // The walk's ticks, pro rata.
            times.push((walk, (ticks as f64 * walk / secs) as u64));
            times.push((secs, ticks));
        }
        // times: read, reject, lookup, walk1, scan1, walk2, scan2 -> names' order.
        let order = [0, 1, 2, 3, 5, 4, 6];
        let read = times[0].0;
        for (k, &(secs, ticks)) in times.iter().enumerate() {
            let phase = order[k];
            figures[phase].push((
                heap.len as f64 / 1e6 / secs,
                read / secs,
                ticks as f64 / words,
            ));
        }
    }
    println!(
        "{n} objects, {:.0} MB, one word in {every} a pointer: {passed} words pass the filter ({:.1}%), {hits} hit objects, {edges} edges; {rounds} rounds",
        heap.len as f64 / 1e6,
        passed as f64 * 100.0 / words
    );
    println!(
        "  {:<18} {:>24} {:>20} {:>22}",
        "phase", "MB/s median (min-max)", "of the read rate", "TSC cycles per word"
    );
    for (name, f) in names.iter().zip(&mut figures) {
        let (mut rate, mut ratio, mut cpw): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            f.iter().map(|x| x.0).collect(),
            f.iter().map(|x| x.1).collect(),
            f.iter().map(|x| x.2).collect(),
        );
        let (r, r0, r1) = median_min_max(&mut rate);
        let (q, q0, q1) = median_min_max(&mut ratio);
        let (c, c0, c1) = median_min_max(&mut cpw);
        println!(
            "  {name:<18} {r:>7.0} ({r0:>5.0}-{r1:<5.0})     {q:>5.2} ({q0:.2}-{q1:.2})     {c:>5.2} ({c0:.2}-{c1:.2})"
        );
    }
    let [mut plan, mut walk, mut mark] = phases;
    let (p, w, m) = (
        median_min_max(&mut plan).0,
        median_min_max(&mut walk).0,
        median_min_max(&mut mark).0,
    );
    println!(
        "  scan, 2 threads, ms (medians): index and plan {p:.1}, read and walk {w:.1}, mark, sweep and checksums {m:.1}"
    );
}
