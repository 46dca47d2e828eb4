//! Interning of allocation sites, so that each live object carries a 4-byte key
//! instead of its stack.
//!
//! An allocation site is the kernel's stack id (a hash of the frames), the return
//! address of the allocator call (which frame-pointer walks at a function's first
//! instruction miss) and the allocator function.

use leak_common::AllocFn;
use rustc_hash::FxHashMap;

/// Where and how a block was allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocSite {
    /// Key into the kernel's stack map; 0 when no stack was captured.
    pub stack_id: u64,
    /// Return address of the allocator call.
    pub caller: u64,
    pub func: AllocFn,
    /// Found live by the heap walk at attach time: allocated before we attached,
    /// by an unknown stack.
    pub before_attach: bool,
}

impl AllocSite {
    /// The site of every block the heap walk found.
    pub const BEFORE_ATTACH: Self = Self {
        stack_id: 0,
        caller: 0,
        func: AllocFn::Malloc,
        before_attach: true,
    };
}

/// Interned [`AllocSite`]s; keys are dense `u32`s.
#[derive(Default)]
pub struct SiteInterner {
    sites: Vec<AllocSite>,
    index: FxHashMap<AllocSite, u32>,
}

impl SiteInterner {
    pub fn intern(&mut self, site: AllocSite) -> u32 {
        if let Some(&key) = self.index.get(&site) {
            return key;
        }
        let key = u32::try_from(self.sites.len()).expect("fewer than 2^32 allocation sites");
        self.sites.push(site);
        self.index.insert(site, key);
        key
    }

    pub fn get(&self, key: u32) -> Option<&AllocSite> {
        self.sites.get(key as usize)
    }

    /// The sites interned after the first `from` (keys `from..`).
    pub fn since(&self, from: usize) -> &[AllocSite] {
        self.sites.get(from..).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_site_same_key() {
        let mut i = SiteInterner::default();
        let a = AllocSite {
            stack_id: 1,
            caller: 2,
            func: AllocFn::Malloc,
            before_attach: false,
        };
        let b = AllocSite {
            func: AllocFn::Calloc,
            ..a
        };
        let ka = i.intern(a);
        let kb = i.intern(b);
        assert_ne!(ka, kb);
        assert_eq!(i.intern(a), ka);
        assert_eq!(i.get(kb), Some(&b));
        assert_eq!(i.len(), 2);
    }
}
