//! Folding allocation wrappers in the text report (`--fold-wrappers`).
//!
//! Programs allocate through wrappers of their own (Redis's `zmalloc`, git's
//! `xmalloc`, GLib's `g_malloc`, SQLite's `sqlite3Malloc`): without folding, every
//! leak's stack starts in one, and a report grouped by whole stack still tells
//! the callers apart. Folding drops the wrappers at the top of a stack so that
//! leaks group by the first frame outside them; the folded names are still listed
//! with the group. This is report-only: the NDJSON stacks stay whole. It is
//! unrelated to the wrapper hints (`allocator/wrappers.rs`), which make the probes
//! record the caller of `operator new` or `strdup` at capture time.

use std::collections::BTreeSet;

use crate::symbolize::Frame;

/// Wrappers folded by `--fold-wrappers`: well-known programs' and libraries'.
pub const BUILTIN_WRAPPERS: &[&str] = &[
    // Redis / Valkey
    "zmalloc",
    "zmalloc_usable",
    "ztrymalloc_usable",
    "ztrymalloc_usable_internal",
    "ztrymalloc",
    "zcalloc",
    "zcalloc_num",
    "zcalloc_usable",
    "ztrycalloc",
    "ztrycalloc_usable",
    "zrealloc",
    "zrealloc_usable",
    "ztryrealloc",
    "ztryrealloc_usable",
    "zstrdup",
    // git, GNU tools
    "xmalloc",
    "xcalloc",
    "xrealloc",
    "xstrdup",
    "xstrndup",
    "xmemdup",
    "xzalloc",
    // GLib
    "g_malloc",
    "g_malloc0",
    "g_malloc_n",
    "g_malloc0_n",
    "g_realloc",
    "g_realloc_n",
    "g_try_malloc",
    "g_try_malloc0",
    "g_strdup",
    "g_strndup",
    "g_memdup2",
    "g_slice_alloc",
    "g_slice_alloc0",
    // SQLite
    "sqlite3Malloc",
    "sqlite3MallocZero",
    "sqlite3DbMallocRaw",
    "sqlite3DbMallocRawNN",
    "sqlite3DbMallocZero",
    "sqlite3Realloc",
    "sqlite3_malloc",
    "sqlite3_malloc64",
    // CPython
    "PyMem_Malloc",
    "PyMem_Calloc",
    "PyMem_Realloc",
    "PyMem_RawMalloc",
    "PyMem_RawCalloc",
    "PyMem_RawRealloc",
    "PyObject_Malloc",
    "PyObject_Calloc",
    "PyObject_Realloc",
];

/// The functions to fold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrapperFold {
    names: BTreeSet<String>,
}

impl WrapperFold {
    /// The built-in list plus the user's names.
    pub fn new(extra: &[String]) -> Self {
        let mut names: BTreeSet<String> = BUILTIN_WRAPPERS.iter().map(|s| s.to_string()).collect();
        names.extend(extra.iter().cloned());
        Self { names }
    }

    fn is_wrapper(&self, frame: &Frame) -> bool {
        frame
            .function
            .as_deref()
            .is_some_and(|f| self.names.contains(f))
    }

    /// Is `stack` nothing but wrappers (and not empty)? Then nothing is folded,
    /// and the report says that no caller outside them was captured.
    pub fn only_wrappers(&self, stack: &[Frame]) -> bool {
        !stack.is_empty() && stack.iter().all(|f| self.is_wrapper(f))
    }

    /// Splits `stack` (innermost first) into the wrappers at its top and the
    /// rest. A stack of nothing but wrappers is not folded: something must stay.
    pub fn split<'a>(&self, stack: &'a [Frame]) -> (&'a [Frame], &'a [Frame]) {
        let n = stack.iter().take_while(|f| self.is_wrapper(f)).count();
        if n == stack.len() {
            (&[], stack)
        } else {
            stack.split_at(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::frame;

    #[test]
    fn folds_the_wrappers_at_the_top_only() {
        let fold = WrapperFold::new(&["my_alloc".to_owned()]);
        let stack = [
            frame("ztrymalloc_usable", "zmalloc.c", 1),
            frame("zmalloc", "zmalloc.c", 2),
            frame("my_alloc", "a.c", 3),
            frame("createClient", "networking.c", 4),
            frame("xmalloc", "b.c", 5),
        ];
        let (folded, rest) = fold.split(&stack);
        assert_eq!(folded.len(), 3);
        assert_eq!(rest[0].function.as_deref(), Some("createClient"));
        assert_eq!(rest.len(), 2, "a wrapper further down is just a frame");
    }

    #[test]
    fn keeps_a_stack_of_only_wrappers_and_unnamed_frames() {
        let fold = WrapperFold::new(&[]);
        let only = [frame("g_malloc", "gmem.c", 1)];
        assert_eq!(fold.split(&only), (&[][..], &only[..]));
        assert!(fold.only_wrappers(&only));
        assert!(!fold.only_wrappers(&[]));
        let unnamed = [Frame::default(), frame("g_malloc", "gmem.c", 1)];
        assert_eq!(fold.split(&unnamed).0.len(), 0);
        assert!(!fold.only_wrappers(&unnamed));
    }
}
