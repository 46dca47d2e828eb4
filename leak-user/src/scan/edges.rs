//! The pointer graph as the mark and sweep read it: each object's edge list
//! (CSR style), and what the roots point to.

use super::prefetch::prefetch;

/// Bit set on an edge (or root hit) that points into an object's middle.
pub const INTERIOR: u32 = 1 << 31;

/// What roots point to.
pub struct Roots<'a> {
    pub strong: &'a [bool],
    pub weak: &'a [bool],
    /// (object, offset) of the root words pointing into an object's middle.
    pub interior: &'a [(u32, u32)],
}

/// The graph's edge lists, CSR style.
pub struct Edges<'a> {
    pub starts: &'a [u32],
    pub edges: &'a [u32],
    /// (edge index, offset) of the interior edges, in edge order.
    pub interior: &'a [(u32, u32)],
}

impl Edges<'_> {
    /// Object i's edges: (target, interior).
    pub fn of(&self, i: usize) -> impl Iterator<Item = (usize, bool)> + '_ {
        self.indexed(i).map(|(_, j, interior)| (j, interior))
    }

    /// Object i's edges with their indices: (edge index, target, interior).
    pub fn indexed(&self, i: usize) -> impl Iterator<Item = (u32, usize, bool)> + '_ {
        let (from, to) = (self.starts[i], self.starts[i + 1]);
        self.edges[from as usize..to as usize]
            .iter()
            .zip(from..to)
            .map(|(&e, k)| (k, (e & !INTERIOR) as usize, e & INTERIOR != 0))
    }

    /// Starts loading object i's first edges (its entry in `starts` should be
    /// loaded already, see [`Self::prefetch_start`]).
    #[inline(always)]
    pub fn prefetch_list(&self, i: usize) {
        if let Some(&from) = self.starts.get(i) {
            prefetch(self.edges.as_ptr().wrapping_add(from as usize));
        }
    }

    /// Starts loading object i's entry in `starts`.
    #[inline(always)]
    pub fn prefetch_start(&self, i: usize) {
        prefetch(self.starts.as_ptr().wrapping_add(i));
    }

    /// The offset of interior edge `k`.
    pub fn offset(&self, k: u32) -> u32 {
        self.interior
            .binary_search_by_key(&k, |e| e.0)
            .map_or(0, |at| self.interior[at].1)
    }
}
