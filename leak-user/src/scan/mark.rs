//! The strong mark: every object that start pointers reach from the roots (and
//! interior pointers one of valgrind's heuristics accepts), on one thread or
//! several.
//!
//! A mark visits each reached object once and tests the mark of every edge's
//! target: at a million objects and tens of millions of edges, most of a scan's
//! time after the walk. Two things keep it fast:
//! * Breadth first: objects are walked in the order they were first reached, so
//!   the next ones are known long before their turn and their edge lists (anywhere
//!   in a large array) are prefetched. Depth first, a linked list is walked one
//!   cache miss after another.
//! * Several threads share the work: marks are atomic bits, each thread walks a
//!   queue of its own and hands a batch of a long one to a thread that ran dry.
//!
//! What is marked does not depend on the order or the thread count. Interior
//! pointers are judged after the start pointers' closure, one at a time, in edge
//! order (the heuristics read target memory and are neither thread-safe nor
//! cheap), and the objects they accept seed the next closure. So an object that
//! start pointers reach from the roots is not counted as reached by a heuristic
//! (the depth-first mark before counted whatever a heuristic met first); two
//! objects accepted in one round are both counted, even when one points to the
//! other's start.

use std::sync::{
    Condvar, Mutex, PoisonError,
    atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
};

use super::edges::{Edges, Roots};

/// One bit per object. The mark tests a random object's bit for every edge: as
/// bits, a million objects' marks stay in the L2 cache (as bytes they do not).
pub struct Marks {
    words: Vec<AtomicU64>,
    /// Set by several threads at once: setting a bit takes an atomic
    /// read-modify-write (else a plain load and store).
    shared: bool,
}

impl Marks {
    pub fn new(n: usize) -> Self {
        Self {
            words: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            shared: false,
        }
    }

    /// A copy, for one thread.
    pub fn copy(&self) -> Self {
        Self {
            words: self
                .words
                .iter()
                .map(|w| AtomicU64::new(w.load(Relaxed)))
                .collect(),
            shared: false,
        }
    }

    /// Bits it holds (a multiple of 64).
    pub fn len(&self) -> usize {
        self.words.len() * 64
    }

    #[inline(always)]
    pub fn get(&self, i: usize) -> bool {
        self.words[i / 64].load(Relaxed) & (1 << (i % 64)) != 0
    }

    /// The clear bits below `n`, in order.
    pub fn zeros(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(move |(k, w)| {
            let mut clear = !w.load(Relaxed);
            std::iter::from_fn(move || {
                let i = k * 64 + clear.trailing_zeros() as usize;
                (clear != 0 && i < n).then(|| {
                    clear &= clear - 1;
                    i
                })
            })
        })
    }

    /// Sets bit i; whether this call set it (it was clear).
    #[inline(always)]
    pub fn insert(&self, i: usize) -> bool {
        let word = &self.words[i / 64];
        let bit = 1 << (i % 64);
        if self.shared {
            return word.fetch_or(bit, Relaxed) & bit == 0;
        }
        let old = word.load(Relaxed);
        word.store(old | bit, Relaxed);
        old & bit == 0
    }
}

/// How far ahead of the object being walked a thread prefetches the entries of
/// `starts` (and, half as far, the edge lists they give).
const AHEAD: usize = 16;

/// Queued objects a thread hands over at once to one that ran dry.
const SHARE: usize = 256;

/// Rounds that start from fewer objects run on one thread (the rounds a
/// heuristic's acceptances start are usually small).
const PARALLEL_SEEDS: usize = 64;

/// What the strong mark concluded.
pub struct Strong {
    pub marks: Marks,
    /// Objects that interior pointers (from strongly reached memory, roots
    /// included) point into and no heuristic accepted, where the weak pass
    /// starts; some may be strongly marked after all.
    pub weak_seeds: Vec<usize>,
    /// Objects only a heuristic's acceptance made strongly reachable.
    pub by_heuristic: u64,
}

/// Marks what start pointers reach from the roots, then what each interior
/// pointer that `recognize(object, offset)` accepts adds, until none does.
pub fn mark_strong(
    edges: &Edges,
    roots: &Roots,
    threads: usize,
    mut recognize: impl FnMut(usize, u32) -> bool,
) -> Strong {
    let n = roots.strong.len();
    let mut marks = Marks::new(n);
    let mut seeds: Vec<u32> = (0..n as u32)
        .filter(|&i| roots.strong[i as usize])
        .collect();
    for &i in &seeds {
        marks.insert(i as usize);
    }
    let mut weak_seeds: Vec<usize> = (0..n).filter(|&i| roots.weak[i]).collect();
    let mut by_heuristic = 0;
    // Interior pointers to judge: (object, offset), root hits first.
    let mut interior: Vec<(u32, u32)> = roots.interior.to_vec();
    loop {
        let threads = if seeds.len() >= PARALLEL_SEEDS {
            threads.max(1)
        } else {
            1
        };
        marks.shared = threads > 1;
        let mut met = close(edges, &marks, std::mem::take(&mut seeds), threads);
        // Edge order, whatever thread met them.
        met.sort_unstable();
        interior.extend(met.iter().map(|&(k, j)| (j, edges.offset(k))));
        for (j, offset) in interior.drain(..) {
            let j = j as usize;
            if marks.get(j) {
                continue;
            }
            if recognize(j, offset) {
                marks.insert(j);
                by_heuristic += 1;
                seeds.push(j as u32);
            } else {
                weak_seeds.push(j);
            }
        }
        if seeds.is_empty() {
            break;
        }
    }
    marks.shared = false;
    Strong {
        marks,
        weak_seeds,
        by_heuristic,
    }
}

/// The work queues the threads of one closure hand to each other.
struct Pool {
    batches: Vec<Vec<u32>>,
    /// Threads with nothing to walk.
    idle: usize,
    /// A thread panicked: the others stop waiting for work (the scope then
    /// passes the panic on instead of hanging).
    abandoned: bool,
}

struct Closure<'a> {
    edges: &'a Edges<'a>,
    marks: &'a Marks,
    threads: usize,
    pool: Mutex<Pool>,
    wake: Condvar,
    /// `pool.idle`, read without the lock: whether to hand work over.
    idle: AtomicUsize,
}

/// Marks everything start pointers reach from `seeds` (marked already), on
/// `threads` threads. Returns the interior edges met from the objects walked to
/// objects not marked at the time: (edge index, target).
fn close(edges: &Edges, marks: &Marks, seeds: Vec<u32>, threads: usize) -> Vec<(u32, u32)> {
    let closure = Closure {
        edges,
        marks,
        threads,
        pool: Mutex::new(Pool {
            batches: Vec::new(),
            idle: 0,
            abandoned: false,
        }),
        wake: Condvar::new(),
        idle: AtomicUsize::new(0),
    };
    if threads <= 1 {
        return closure.walk(seeds);
    }
    let share = seeds.len().div_ceil(threads);
    let mut queues: Vec<Vec<u32>> = seeds.chunks(share).map(<[u32]>::to_vec).collect();
    queues.resize_with(threads, Vec::new);
    let first = queues.remove(0);
    std::thread::scope(|s| {
        let others: Vec<_> = queues
            .into_iter()
            .map(|q| s.spawn(|| closure.walk(q)))
            .collect();
        let mut met = closure.walk(first);
        for h in others {
            met.extend(h.join().expect("mark thread"));
        }
        met
    })
}

impl Closure<'_> {
    /// One thread's part: walks its queue, then queues others hand over, until
    /// every thread is out of work.
    fn walk(&self, mut queue: Vec<u32>) -> Vec<(u32, u32)> {
        let _abandon_on_panic = AbandonOnPanic(self);
        let edges = self.edges;
        let mut met = Vec::new();
        loop {
            let mut next = 0;
            while let Some(&i) = queue.get(next) {
                if let Some(&later) = queue.get(next + AHEAD) {
                    edges.prefetch_start(later as usize);
                }
                if let Some(&soon) = queue.get(next + AHEAD / 2) {
                    edges.prefetch_list(soon as usize);
                }
                next += 1;
                for (k, j, interior) in edges.indexed(i as usize) {
                    if self.marks.get(j) {
                        continue;
                    }
                    if interior {
                        met.push((k, j as u32));
                    } else if self.marks.insert(j) {
                        queue.push(j as u32);
                    }
                }
                if queue.len() - next >= 2 * SHARE && self.idle.load(Relaxed) > 0 {
                    let batch = queue.split_off(queue.len() - SHARE);
                    self.lock().batches.push(batch);
                    self.wake.notify_one();
                }
            }
            match self.more() {
                Some(batch) => queue = batch,
                None => return met,
            }
        }
    }

    /// A batch another thread handed over, waiting for one; None once every
    /// thread is out of work.
    fn more(&self) -> Option<Vec<u32>> {
        let mut pool = self.lock();
        pool.idle += 1;
        self.idle.store(pool.idle, Relaxed);
        loop {
            if let Some(batch) = pool.batches.pop() {
                pool.idle -= 1;
                self.idle.store(pool.idle, Relaxed);
                return Some(batch);
            }
            if pool.idle == self.threads || pool.abandoned {
                // Nobody is walking: nobody can hand anything over any more.
                self.wake.notify_all();
                return None;
            }
            pool = self.wake.wait(pool).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wakes the other threads of a closure for good when its thread unwinds.
struct AbandonOnPanic<'a>(&'a Closure<'a>);

impl Drop for AbandonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().abandoned = true;
            self.0.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_panics_does_not_leave_the_others_waiting() {
        // 200 objects; the last one's edge points past the marks: the thread that
        // walks it panics while the other, out of work, waits for a batch.
        let n = 200;
        let starts: Vec<u32> = (0..=n).collect();
        let mut targets: Vec<u32> = (0..n).map(|i| (i + 1) % n).collect();
        targets[n as usize - 1] = 10 * n;
        let edges = Edges {
            starts: &starts,
            edges: &targets,
            interior: &[],
        };
        let marks = Marks::new(n as usize);
        let seeds: Vec<u32> = (0..n).filter(|i| i % 2 == 0).collect();
        for &i in &seeds {
            marks.insert(i as usize);
        }
        let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            close(&edges, &marks, seeds, 2)
        }));
        assert!(walked.is_err(), "the bad edge was walked without a panic");
    }
}
