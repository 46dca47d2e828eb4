//! Reachability over the pointer graph that one scan collected: mark, then sweep
//! into direct, indirect and possible leaks.
//!
//! Edges are "object i holds a word pointing into object j", flagged when the word
//! points into j's middle rather than at its start. Roots hit objects the same way.
//! * Strongly reachable: reached from a root through start pointers only.
//! * Possibly leaked: reachable only along a path with an interior pointer
//!   (valgrind's "possibly lost"); not a leak, listed apart.
//! * Interior pointers that one of valgrind's leak-check heuristics recognises
//!   (a `std::string`'s characters, a length-prefixed block, a `new[]` array, a
//!   secondary base class) count as start pointers: the caller's `recognize`
//!   decides, from the target's contents, and only for pointers from strongly
//!   reachable memory (as valgrind does).
//! * Unreachable objects are leaks. Those pointed to by another leaked object are
//!   indirect; the rest are direct. A leaked cycle with no way in gets one direct
//!   leak (its lowest address), so every lost structure shows a head.

use super::{
    edges::{Edges, INTERIOR, Roots},
    mark::{Marks, Strong, mark_strong},
};

/// What the mark phase concluded about one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    Reachable,
    Possible,
    Direct,
    /// Lost through the direct leak at this object index.
    Indirect {
        root: u32,
    },
}

/// The pointer graph of one scan, built in object order.
#[derive(Default)]
#[cfg_attr(test, derive(Debug, PartialEq))]
pub struct Graph {
    objects: usize,
    /// `edges[starts[i]..starts[i + 1]]` are object i's edges. Filled up to the
    /// latest source as edges arrive, and for the rest by [`Self::classify`].
    starts: Vec<u32>,
    edges: Vec<u32>,
    strong_roots: Vec<bool>,
    weak_roots: Vec<bool>,
    /// (edge index, offset into the target) of every interior edge, in edge order.
    interior_edges: Vec<(u32, u32)>,
    /// (object, offset) of every interior root hit.
    interior_roots: Vec<(u32, u32)>,
}

impl Graph {
    pub fn new(objects: usize) -> Self {
        let mut g = Self::default();
        g.reset(objects);
        g
    }

    /// Empties the graph for `objects` objects, keeping its memory.
    pub fn reset(&mut self, objects: usize) {
        self.objects = objects;
        self.starts.clear();
        self.edges.clear();
        self.strong_roots.clear();
        self.strong_roots.resize(objects, false);
        self.weak_roots.clear();
        self.weak_roots.resize(objects, false);
        self.interior_edges.clear();
        self.interior_roots.clear();
    }

    pub fn objects(&self) -> usize {
        self.objects
    }

    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    /// Object `src` holds a pointer `offset` bytes into `dst` (0: its start).
    /// Sources must come in non-decreasing order (the scanner walks memory
    /// upwards). Self pointers do not count.
    #[inline]
    pub fn add_edge(&mut self, src: u32, dst: u32, offset: u64) {
        let interior = offset != 0;
        let src = src as usize;
        debug_assert!(
            src + 1 >= self.starts.len(),
            "edges must be added in source order"
        );
        if src == dst as usize {
            return;
        }
        let edge = dst | if interior { INTERIOR } else { 0 };
        let len = self.edges.len() as u32;
        if self.starts.len() <= src {
            // src's first edge: objects up to it have all theirs.
            self.starts.resize(src + 1, len);
        } else if len > self.starts[src] && self.edges.last() == Some(&edge) {
            return; // the same pointer again in the same object
        }
        if interior {
            self.interior_edges
                .push((len, offset.min(u64::from(u32::MAX)) as u32));
        }
        self.edges.push(edge);
    }

    /// A root (memory outside tracked objects, or a register) points `offset`
    /// bytes into `dst`.
    #[inline]
    pub fn add_root(&mut self, dst: u32, offset: u64) {
        if offset != 0 {
            self.weak_roots[dst as usize] = true;
            self.interior_roots
                .push((dst, offset.min(u64::from(u32::MAX)) as u32));
        } else {
            self.strong_roots[dst as usize] = true;
        }
    }

    /// Runs mark and sweep, the strong mark on up to `threads` threads.
    /// `recognize(object, offset)` says whether an interior pointer that far into
    /// the object is one a heuristic accepts.
    pub fn classify(
        &mut self,
        threads: usize,
        recognize: impl FnMut(usize, u32) -> bool,
    ) -> Verdicts {
        let n = self.objects;
        self.starts.resize(n + 1, self.edges.len() as u32);
        let edges = Edges {
            starts: &self.starts,
            edges: &self.edges,
            interior: &self.interior_edges,
        };
        let roots = Roots {
            strong: &self.strong_roots,
            weak: &self.weak_roots,
            interior: &self.interior_roots,
        };
        let Strong {
            marks: strong,
            weak_seeds,
            by_heuristic,
        } = mark_strong(&edges, &roots, threads, recognize);
        let reached = mark_weak(&edges, &strong, weak_seeds);
        let leaked: Vec<usize> = reached.zeros(n).collect();
        let swept = sweep(&edges, &reached, &leaked);
        // The leaked objects are among those not strongly reached, in the same order.
        let mut swept = swept.into_iter();
        let unreachable = strong
            .zeros(n)
            .map(|i| {
                let reach = if reached.get(i) {
                    Reach::Possible
                } else {
                    swept.next().expect("the sweep judges every leaked object")
                };
                (i as u32, reach)
            })
            .collect();
        Verdicts {
            objects: n,
            unreachable,
            by_heuristic,
        }
    }
}

/// What mark and sweep concluded. Every object not listed in `unreachable` is
/// reachable: the verdicts take memory and time in proportion to what is not.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdicts {
    pub objects: usize,
    /// (object, verdict) of every object that is not strongly reachable
    /// (possibly lost, or leaked), objects increasing.
    pub unreachable: Vec<(u32, Reach)>,
    /// Objects only a heuristic's acceptance made reachable.
    pub by_heuristic: u64,
}

impl Verdicts {
    /// Object i's verdict.
    pub fn of(&self, i: u32) -> Reach {
        self.unreachable
            .binary_search_by_key(&i, |u| u.0)
            .map_or(Reach::Reachable, |at| self.unreachable[at].1)
    }

    /// One verdict per object.
    pub fn to_vec(&self) -> Vec<Reach> {
        let mut all = vec![Reach::Reachable; self.objects];
        for &(i, reach) in &self.unreachable {
            all[i as usize] = reach;
        }
        all
    }
}

/// The edges and root hits that one run of memory produced, recorded with the
/// same rules as [`Graph::add_edge`] and [`Graph::add_root`] and appended to the
/// graph in address order ([`Graph::append`]). Workers fill parts of one scan at
/// the same time; the graph is the same however the memory was split, provided no
/// object's memory is split between two parts.
#[derive(Default)]
pub struct Part {
    /// (source, index in `edges` of its first edge), sources increasing.
    sources: Vec<(u32, u32)>,
    edges: Vec<u32>,
    /// (index in `edges`, offset) of the interior edges.
    interior_edges: Vec<(u32, u32)>,
    /// Objects a root word points at the start of.
    strong_roots: Vec<u32>,
    /// (object, offset) of root words pointing into an object's middle.
    interior_roots: Vec<(u32, u32)>,
}

impl Part {
    /// Empties the part, keeping its memory.
    pub fn clear(&mut self) {
        self.sources.clear();
        self.edges.clear();
        self.interior_edges.clear();
        self.strong_roots.clear();
        self.interior_roots.clear();
    }

    /// [`Graph::add_edge`], into this part.
    #[inline]
    pub fn add_edge(&mut self, src: u32, dst: u32, offset: u64) {
        if src == dst {
            return;
        }
        let interior = offset != 0;
        let edge = dst | if interior { INTERIOR } else { 0 };
        let len = self.edges.len() as u32;
        match self.sources.last() {
            Some(&(last, _)) if last == src => {
                if self.edges.last() == Some(&edge) {
                    return; // the same pointer again in the same object
                }
            }
            last => {
                debug_assert!(last.is_none_or(|l| l.0 < src), "sources in order");
                self.sources.push((src, len));
            }
        }
        if interior {
            self.interior_edges
                .push((len, offset.min(u64::from(u32::MAX)) as u32));
        }
        self.edges.push(edge);
    }

    /// [`Graph::add_root`], into this part.
    #[inline]
    pub fn add_root(&mut self, dst: u32, offset: u64) {
        if offset != 0 {
            self.interior_roots
                .push((dst, offset.min(u64::from(u32::MAX)) as u32));
        } else {
            self.strong_roots.push(dst);
        }
    }

    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }
}

impl Graph {
    /// Appends a part's edges and root hits, as if they had been added here one
    /// by one. Its sources must all come after the graph's.
    pub fn append(&mut self, part: &Part) {
        let base = self.edges.len() as u32;
        for &(src, first) in &part.sources {
            debug_assert!(self.starts.len() <= src as usize, "parts in order");
            self.starts.resize(src as usize + 1, base + first);
        }
        self.edges.extend_from_slice(&part.edges);
        self.interior_edges
            .extend(part.interior_edges.iter().map(|&(k, off)| (base + k, off)));
        for &j in &part.strong_roots {
            self.strong_roots[j as usize] = true;
        }
        for &(j, off) in &part.interior_roots {
            self.weak_roots[j as usize] = true;
            self.interior_roots.push((j, off));
        }
    }
}

/// Marks what any pointer reaches from the weak seeds: every object reached at
/// all (strongly or not).
fn mark_weak(edges: &Edges, strong: &Marks, mut stack: Vec<usize>) -> Marks {
    let reached = strong.copy();
    stack.retain(|&i| reached.insert(i));
    while let Some(i) = stack.pop() {
        for (j, _) in edges.of(i) {
            if reached.insert(j) {
                stack.push(j);
            }
        }
    }
    reached
}

/// Sweeps the objects nothing reached into direct and indirect leaks (`None` for
/// the reached ones). Leaders, valgrind's way: first every leaked object nothing
/// leaked points to, then the rest in address order (leaked cycles). Each leader
/// takes what it reaches; a cycle's leader reached from a later leader is
/// absorbed, so the blocks a lost structure holds are never direct leaks of their
/// own.
fn sweep(edges: &Edges, reached: &Marks, leaked: &[usize]) -> Vec<Reach> {
    let n = reached.len();
    let at = |j: usize| leaked.binary_search(&j).expect("a leaked object");
    // A leader stays direct; what it absorbs becomes indirect.
    let mut verdict = vec![Reach::Direct; leaked.len()];
    if leaked.is_empty() {
        return verdict;
    }
    let has_leaked_parent = Marks::new(n);
    for &i in leaked {
        for (j, _) in edges.of(i) {
            has_leaked_parent.insert(j);
        }
    }
    let judged = Marks::new(n);
    let heads = leaked.iter().filter(|&&i| !has_leaked_parent.get(i));
    let cycles = leaked.iter().filter(|&&i| has_leaked_parent.get(i));
    for &leader in heads.chain(cycles) {
        if !judged.insert(leader) {
            continue;
        }
        let mut stack = vec![leader];
        while let Some(i) = stack.pop() {
            for (j, _) in edges.of(i) {
                if reached.get(j) {
                    continue;
                }
                let k = at(j);
                if !judged.get(j) || (verdict[k] == Reach::Direct && j != leader) {
                    judged.insert(j);
                    verdict[k] = Reach::Indirect {
                        root: leader as u32,
                    };
                    stack.push(j);
                }
            }
        }
    }
    // Objects of an absorbed leader: their root is where the chain ends.
    for k in 0..verdict.len() {
        if let Reach::Indirect { mut root } = verdict[k] {
            while let Reach::Indirect { root: up } = verdict[at(root as usize)] {
                root = up;
            }
            verdict[k] = Reach::Indirect { root };
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph of `n` objects with (source, target, interior) edges and (target,
    /// interior) root hits; interior pointers point 8 bytes in.
    fn build(n: usize, edges: &[(u32, u32, bool)], roots: &[(u32, bool)]) -> Graph {
        let mut g = Graph::new(n);
        let mut edges = edges.to_vec();
        edges.sort_by_key(|e| e.0);
        for (s, d, i) in edges {
            g.add_edge(s, d, u64::from(i) * 8);
        }
        for &(d, i) in roots {
            g.add_root(d, u64::from(i) * 8);
        }
        g
    }

    fn graph(n: usize, edges: &[(u32, u32, bool)], roots: &[(u32, bool)]) -> Vec<Reach> {
        build(n, edges, roots).classify(1, |_, _| false).to_vec()
    }

    #[test]
    fn dropped_list_is_one_direct_and_the_rest_indirect() {
        // 0 -> 1 -> 2 -> 3, nothing points to 0.
        let r = graph(4, &[(0, 1, false), (1, 2, false), (2, 3, false)], &[]);
        assert_eq!(
            r,
            vec![
                Reach::Direct,
                Reach::Indirect { root: 0 },
                Reach::Indirect { root: 0 },
                Reach::Indirect { root: 0 }
            ]
        );
    }

    #[test]
    fn objects_without_edges_between_sources_keep_edge_lists_apart() {
        // 1 and 4 have no edges of their own; 0's and 3's must not leak into them.
        let r = graph(
            6,
            &[(0, 2, false), (0, 2, false), (3, 5, false), (3, 4, false)],
            &[(0, false)],
        );
        assert_eq!(
            r,
            vec![
                Reach::Reachable,
                Reach::Direct,
                Reach::Reachable,
                Reach::Direct,
                Reach::Indirect { root: 3 },
                Reach::Indirect { root: 3 }
            ]
        );
    }

    #[test]
    fn a_lost_structure_with_a_cycle_owns_what_it_points_to() {
        // A session (1) owns a string (0, lower address, pointing nowhere) and a
        // map node (2) that points back into the session (its header): no object
        // is free of leaked parents, yet the session is the one lost block.
        let r = graph(3, &[(1, 0, false), (1, 2, false), (2, 1, true)], &[]);
        assert_eq!(
            r,
            vec![
                Reach::Indirect { root: 1 },
                Reach::Direct,
                Reach::Indirect { root: 1 }
            ]
        );
        // The same with a tail behind the string: the absorbed leader's own
        // objects move to the session too.
        let r = graph(
            4,
            &[(0, 3, false), (1, 0, false), (1, 2, false), (2, 1, true)],
            &[],
        );
        assert_eq!(r[1], Reach::Direct);
        for i in [0, 2, 3] {
            assert_eq!(r[i], Reach::Indirect { root: 1 }, "object {i}");
        }
    }

    #[test]
    fn rooted_list_is_reachable() {
        let r = graph(3, &[(0, 1, false), (1, 2, false)], &[(0, false)]);
        assert_eq!(r, vec![Reach::Reachable; 3]);
    }

    #[test]
    fn cycle_is_leaked_with_one_head() {
        let r = graph(3, &[(1, 2, false), (2, 1, false)], &[(0, false)]);
        assert_eq!(
            r,
            vec![Reach::Reachable, Reach::Direct, Reach::Indirect { root: 1 }]
        );
    }

    #[test]
    fn interior_pointers_make_possible_leaks() {
        // Root -> 0 by interior pointer; 0 -> 1 by start pointer; 2 reached from a
        // strong object through an interior pointer.
        let r = graph(4, &[(0, 1, false), (3, 2, true)], &[(0, true), (3, false)]);
        assert_eq!(
            r,
            vec![
                Reach::Possible,
                Reach::Possible,
                Reach::Possible,
                Reach::Reachable
            ]
        );
    }

    #[test]
    fn self_pointers_do_not_keep_objects_alive() {
        let r = graph(1, &[(0, 0, false)], &[]);
        assert_eq!(r, vec![Reach::Direct]);
    }

    #[test]
    fn leaked_object_pointing_into_live_memory_does_not_change_it() {
        let r = graph(2, &[(0, 1, false)], &[(1, false)]);
        assert_eq!(r, vec![Reach::Direct, Reach::Reachable]);
    }

    /// A pseudo-random edge and root list, in source order.
    fn random_calls(n: u32, seed: u64) -> Vec<(Option<u32>, u32, u64)> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut calls = Vec::new();
        let mut src = 0;
        while src < n {
            // A root word, an edge (sometimes the same one twice), or the next source.
            match next() % 6 {
                0 => calls.push((None, (next() % u64::from(n)) as u32, next() % 3 * 8)),
                1 => src += 1 + (next() % 3) as u32,
                _ => {
                    let call = (Some(src), (next() % u64::from(n)) as u32, next() % 2 * 16);
                    calls.push(call);
                    if next() % 4 == 0 {
                        calls.push(call);
                    }
                }
            }
        }
        calls
    }

    #[test]
    fn parts_appended_in_order_make_the_same_graph_as_direct_calls() {
        let n = 300;
        for seed in 1..20u64 {
            let calls = random_calls(n, seed * 0x9e37_79b9);
            let mut direct = Graph::new(n as usize);
            for &(src, dst, off) in &calls {
                match src {
                    Some(s) => direct.add_edge(s, dst, off),
                    None => direct.add_root(dst, off),
                }
            }
            // Split wherever the source changes, as the scanner does.
            let mut merged = Graph::new(n as usize);
            let mut part = Part::default();
            let mut last_src = None;
            for (k, &(src, dst, off)) in calls.iter().enumerate() {
                if src.is_some() && last_src.is_some() && src != last_src && k % 3 == 0 {
                    merged.append(&part);
                    part.clear();
                }
                match src {
                    Some(s) => {
                        part.add_edge(s, dst, off);
                        last_src = src;
                    }
                    None => part.add_root(dst, off),
                }
            }
            merged.append(&part);
            assert_eq!(merged.edges, direct.edges, "seed {seed}");
            assert_eq!(merged.interior_edges, direct.interior_edges);
            assert_eq!(merged.interior_roots, direct.interior_roots);
            assert_eq!(merged.strong_roots, direct.strong_roots);
            assert_eq!(merged.weak_roots, direct.weak_roots);
            assert_eq!(
                merged.classify(2, |_, _| false),
                direct.classify(1, |_, _| false)
            );
            assert_eq!(merged.starts, direct.starts);
        }
    }

    #[test]
    fn duplicate_edges_are_stored_once() {
        let mut g = Graph::new(2);
        for _ in 0..5 {
            g.add_edge(0, 1, 0);
        }
        assert_eq!(g.edge_count(), 1);
    }

    // The strong mark on several threads (mark.rs), through classify.

    /// A graph of `n` objects: `roots` start-pointer roots, each object pointing
    /// to the next of its chain (long lists, as linked lists are) and to a few
    /// random others, a tenth of those pointers interior ones.
    fn random_graph(n: u32, roots: u32, seed: u64) -> Graph {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut g = Graph::new(n as usize);
        for src in 0..n {
            if src + 97 < n {
                g.add_edge(src, src + 97, 0);
            }
            for _ in 0..next() % 4 {
                let dst = (next() % u64::from(n)) as u32;
                let offset = if next() % 10 == 0 { 8 } else { 0 };
                g.add_edge(src, dst, offset);
            }
        }
        for _ in 0..roots {
            g.add_root((next() % u64::from(n)) as u32, 0);
        }
        g
    }

    #[test]
    fn threads_mark_what_one_thread_marks() {
        for (n, roots, seed) in [(200_000, 300, 1), (50_000, 70, 2), (10_000, 5, 3)] {
            // A heuristic that accepts interior pointers into every third object.
            let accept = |j: usize, _| j.is_multiple_of(3);
            let one = random_graph(n, roots, seed).classify(1, accept);
            for threads in [2, 4] {
                let many = random_graph(n, roots, seed).classify(threads, accept);
                assert_eq!(one, many, "{n} objects, {threads} threads");
            }
            let kinds = |r: &[Reach], k: fn(&Reach) -> bool| r.iter().filter(|x| k(x)).count();
            let (reach, by_heuristic) = (one.to_vec(), one.by_heuristic);
            // Not vacuous: every verdict occurs, and the heuristic accepted some.
            assert!(kinds(&reach, |r| *r == Reach::Reachable) > 0);
            assert!(kinds(&reach, |r| *r == Reach::Direct) > 0);
            assert!(by_heuristic > 0 || roots < 10);
        }
    }

    #[test]
    fn an_object_start_pointers_reach_is_not_reached_by_a_heuristic() {
        // Root -> 0; 0 points into 2's middle before it points at 1; 1 -> 2.
        let mut g = build(
            3,
            &[(0, 2, true), (0, 1, false), (1, 2, false)],
            &[(0, false)],
        );
        let verdicts = g.classify(1, |_, _| true);
        assert_eq!(verdicts.to_vec(), vec![Reach::Reachable; 3]);
        assert_eq!(verdicts.by_heuristic, 0);
        // Only the interior pointer leads to 2: the heuristic did it.
        let mut g = build(3, &[(0, 2, true), (0, 1, false)], &[(0, false)]);
        let verdicts = g.classify(1, |_, _| true);
        assert_eq!(
            (verdicts.to_vec(), verdicts.by_heuristic),
            (vec![Reach::Reachable; 3], 1)
        );
    }

    #[test]
    fn what_a_heuristic_accepts_is_walked_too() {
        // Root -> 0 -interior-> 1 -> 2 -interior-> 3 -> 4; the heuristic accepts 1 and 3.
        let edges = [(0, 1, true), (1, 2, false), (2, 3, true), (3, 4, false)];
        let mut g = build(5, &edges, &[(0, false)]);
        let verdicts = g.classify(2, |_, _| true);
        assert_eq!(
            (verdicts.to_vec(), verdicts.by_heuristic),
            (vec![Reach::Reachable; 5], 2)
        );
        // Refused, the interior pointers leave them possibly lost.
        let reach = g.classify(2, |_, _| false).to_vec();
        assert_eq!(reach[0], Reach::Reachable);
        assert!(
            reach[1..].iter().all(|r| *r == Reach::Possible),
            "{reach:?}"
        );
    }
}
