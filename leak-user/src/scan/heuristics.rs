//! valgrind's leak-check heuristics: interior pointers that real programs keep on
//! purpose, recognised by the contents of the block they point into, so that such
//! blocks count as reachable instead of "possibly lost".
//!
//! The rules follow valgrind memcheck's manual (`--leak-check-heuristics`), for
//! 64-bit targets:
//! * `stdstring`: a pointer 24 bytes into a block from `operator new` whose first
//!   words are a `std::string` representation's length and capacity (the
//!   pre-C++11 libstdc++ string: length, capacity, refcount, characters), the
//!   capacity filling the block;
//! * `length64`: a pointer 8 bytes into a block whose first word is the size of
//!   the rest of the block (sqlite's allocator keeps that header and hands out
//!   block + 8);
//! * `newarray`: a pointer 8 bytes into a block from `operator new[]` whose first
//!   word is a plausible element count (the rest of the block divides by it): C++
//!   arrays of objects with destructors;
//! * `multipleinheritance`: a pointer into a block from `operator new` where both
//!   the pointed-to word and the block's first word are vtable pointers (a
//!   pointer to a secondary base class).
//!
//! valgrind applies `stdstring`, `newarray` and `multipleinheritance` to blocks
//! allocated by `operator new`/`new[]` only; leaktrace records the allocating
//! function of every block (our probes do not tell `new` from `new[]`, so both
//! count as `new`).

use std::fmt;

/// The heuristics in force (`--leak-check-heuristics`, valgrind's name and
/// default: all of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heuristics {
    pub stdstring: bool,
    pub length64: bool,
    pub newarray: bool,
    pub multiple_inheritance: bool,
}

/// A heuristic name that `--leak-check-heuristics` does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown heuristic {0:?}: give all, none, or a comma-separated list of stdstring, length64, newarray, multipleinheritance"
)]
pub struct UnknownHeuristic(pub String);

impl Heuristics {
    pub const ALL: Self = Self {
        stdstring: true,
        length64: true,
        newarray: true,
        multiple_inheritance: true,
    };
    pub const NONE: Self = Self {
        stdstring: false,
        length64: false,
        newarray: false,
        multiple_inheritance: false,
    };

    /// Parses valgrind's syntax: `all`, `none`, or a comma-separated list.
    pub fn parse(list: &str) -> Result<Self, UnknownHeuristic> {
        match list.trim() {
            "all" => return Ok(Self::ALL),
            "none" | "" => return Ok(Self::NONE),
            _ => {}
        }
        let mut h = Self::NONE;
        for name in list.split(',').map(str::trim) {
            match name {
                "stdstring" => h.stdstring = true,
                "length64" => h.length64 = true,
                "newarray" => h.newarray = true,
                "multipleinheritance" => h.multiple_inheritance = true,
                other => return Err(UnknownHeuristic(other.to_owned())),
            }
        }
        Ok(h)
    }

    pub fn any(&self) -> bool {
        *self != Self::NONE
    }

    /// Whether an interior pointer `offset` bytes into `block` is one a heuristic
    /// in force recognises. `word_at` reads a word of the block (at an offset);
    /// `is_vtable` says whether a value points where vtables live.
    pub fn recognize(
        &self,
        block: &Block,
        offset: u64,
        mut word_at: impl FnMut(u64) -> Option<u64>,
        is_vtable: impl Fn(u64) -> bool,
    ) -> bool {
        const WORD: u64 = 8;
        let by_new = block.by_new;
        let applies = (offset == WORD && (self.length64 || (by_new && self.newarray)))
            || (by_new && self.stdstring && offset == 3 * WORD)
            || (by_new && self.multiple_inheritance && offset.is_multiple_of(WORD));
        if !applies {
            return false;
        }
        let Some(first) = word_at(0) else {
            return false;
        };
        if self.length64
            && offset == WORD
            && first > 0
            && block.size.checked_sub(WORD) == Some(first)
        {
            return true;
        }
        if !by_new {
            return false;
        }
        if self.newarray
            && offset == WORD
            && first > 0
            && block.size >= WORD
            && (block.size - WORD).is_multiple_of(first)
        {
            return true;
        }
        if self.stdstring
            && offset == 3 * WORD
            && let Some(capacity) = word_at(WORD)
            && capacity.checked_add(3 * WORD + 1) == Some(block.size)
            && first <= capacity
        {
            return true;
        }
        self.multiple_inheritance
            && offset.is_multiple_of(WORD)
            && is_vtable(first)
            && word_at(offset).is_some_and(&is_vtable)
    }
}

impl Default for Heuristics {
    fn default() -> Self {
        Self::ALL
    }
}

impl fmt::Display for Heuristics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.stdstring, "stdstring"),
            (self.length64, "length64"),
            (self.newarray, "newarray"),
            (self.multiple_inheritance, "multipleinheritance"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

/// What the heuristics need to know of a block besides its contents.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub size: u64,
    /// Allocated by `operator new` or `new[]`.
    pub by_new: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[u64]) -> impl FnMut(u64) -> Option<u64> + '_ {
        move |off| w.get((off / 8) as usize).copied()
    }

    const VTABLE: u64 = 0x5555_0000_1000;
    fn vtable(v: u64) -> bool {
        v == VTABLE || v == VTABLE + 0x40
    }

    #[test]
    fn length64_is_a_size_header() {
        let h = Heuristics::ALL;
        let sqlite = Block {
            size: 72,
            by_new: false,
        };
        assert!(h.recognize(&sqlite, 8, words(&[64]), vtable));
        assert!(!h.recognize(&sqlite, 8, words(&[63]), vtable));
        assert!(!h.recognize(&sqlite, 16, words(&[64]), vtable));
        assert!(!Heuristics::NONE.recognize(&sqlite, 8, words(&[64]), vtable));
    }

    #[test]
    fn new_only_heuristics_need_new() {
        let h = Heuristics::ALL;
        let array = Block {
            size: 8 + 5 * 24,
            by_new: true,
        };
        assert!(h.recognize(&array, 8, words(&[5]), vtable));
        assert!(!h.recognize(&array, 8, words(&[7]), vtable));
        let malloced = Block {
            by_new: false,
            ..array
        };
        assert!(!h.recognize(&malloced, 8, words(&[5]), vtable));
        // A COW std::string: length 10, capacity 40 fills 24 + 40 + 1 bytes.
        let string = Block {
            size: 65,
            by_new: true,
        };
        assert!(h.recognize(&string, 24, words(&[10, 40, 0]), vtable));
        assert!(!h.recognize(&string, 24, words(&[41, 40, 0]), vtable));
        // A secondary base at +16 of an object whose first word is a vtable.
        let object = Block {
            size: 48,
            by_new: true,
        };
        let w = [VTABLE, 7, VTABLE + 0x40, 9];
        assert!(h.recognize(&object, 16, words(&w), vtable));
        assert!(!h.recognize(&object, 8, words(&w), vtable));
    }

    #[test]
    fn parses_valgrinds_syntax() {
        assert_eq!(Heuristics::parse("all"), Ok(Heuristics::ALL));
        assert_eq!(Heuristics::parse("none"), Ok(Heuristics::NONE));
        let h = Heuristics::parse("length64,stdstring").unwrap();
        assert!(h.length64 && h.stdstring && !h.newarray);
        assert_eq!(h.to_string(), "stdstring,length64");
        assert!(Heuristics::parse("sds").is_err());
    }
}
