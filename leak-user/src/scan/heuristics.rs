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
//! One more, not valgrind's, for a string library many C programs share:
//! * `sds`: a pointer 1, 3, 5, 9 or 17 bytes into a block, just past an sds string
//!   header (redis, hiredis and others): the byte before the pointer holds the
//!   header's type in its low three bits (matching the offset), and the header's
//!   length and capacity fit the block.
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
    pub sds: bool,
}

/// A heuristic name that `--leak-check-heuristics` does not know.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown heuristic {0:?}: give all, none, or a comma-separated list of stdstring, length64, newarray, multipleinheritance, sds"
)]
pub struct UnknownHeuristic(pub String);

impl Heuristics {
    pub const ALL: Self = Self {
        stdstring: true,
        length64: true,
        newarray: true,
        multiple_inheritance: true,
        sds: true,
    };
    pub const NONE: Self = Self {
        stdstring: false,
        length64: false,
        newarray: false,
        multiple_inheritance: false,
        sds: false,
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
                "sds" => h.sds = true,
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
        if self.sds && matches!(offset, 1 | 3 | 5 | 9 | 17) {
            return sds_header(block.size, offset, &mut word_at);
        }
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
        if self.length64 && offset == WORD && first > 0 && block.fits(first.saturating_add(WORD)) {
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
            && capacity
                .checked_add(3 * WORD + 1)
                .is_some_and(|asked| block.fits(asked))
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

/// Whether a block of `size` bytes starts with an sds header `offset` bytes long
/// (types 0 to 4: 1, 3, 5, 9, 17 bytes): flags just before the string with that
/// type, length ≤ capacity (type 0: the length in the flags' high bits), and the
/// string with its terminating zero inside the block.
fn sds_header(size: u64, offset: u64, word_at: &mut impl FnMut(u64) -> Option<u64>) -> bool {
    let (kind, field) = match offset {
        1 => (0, 0),
        3 => (1, 1),
        5 => (2, 2),
        9 => (3, 4),
        17 => (4, 8),
        _ => return false,
    };
    let mut head = [0u8; 24];
    for (i, chunk) in head.chunks_exact_mut(8).enumerate() {
        match word_at(i as u64 * 8) {
            Some(w) => chunk.copy_from_slice(&w.to_ne_bytes()),
            None if (i as u64 * 8) < offset => return false,
            None => break,
        }
    }
    let flags = head[offset as usize - 1];
    if flags & 7 != kind {
        return false;
    }
    let room = size.saturating_sub(offset + 1);
    if kind == 0 {
        return u64::from(flags >> 3) <= room;
    }
    let read = |at: usize| {
        let mut v = [0u8; 8];
        v[..field].copy_from_slice(&head[at..at + field]);
        u64::from_le_bytes(v)
    };
    let (len, alloc) = (read(0), read(field));
    len <= alloc && alloc <= room
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
            (self.sds, "sds"),
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
    /// `size` is the allocator's usable size (a block found by the heap walk),
    /// up to [`USABLE_SLACK`] bytes more than was asked for.
    pub usable_size: bool,
}

/// How much more than the request an allocator's usable size can be (glibc:
/// rounding to 16 bytes, and a realloc that shrank in place by less than a chunk).
pub const USABLE_SLACK: u64 = 46;

impl Block {
    /// Whether a request of `asked` bytes fits this block's size.
    fn fits(&self, asked: u64) -> bool {
        if self.usable_size {
            asked <= self.size && self.size - asked <= USABLE_SLACK
        } else {
            asked == self.size
        }
    }
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
            usable_size: false,
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
            usable_size: false,
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
            usable_size: false,
        };
        assert!(h.recognize(&string, 24, words(&[10, 40, 0]), vtable));
        assert!(!h.recognize(&string, 24, words(&[41, 40, 0]), vtable));
        // A secondary base at +16 of an object whose first word is a vtable.
        let object = Block {
            size: 48,
            by_new: true,
            usable_size: false,
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
        assert!(Heuristics::parse("sds").unwrap().sds);
        assert!(Heuristics::parse("zstring").is_err());
    }

    #[test]
    fn sds_strings_are_recognised_by_their_header() {
        let h = Heuristics::ALL;
        let block = |size| Block {
            size,
            by_new: false,
            usable_size: false,
        };
        // sdshdr8: len 5, alloc 10, flags 1, then "hello": pointer at +3.
        let hdr8 = u64::from_le_bytes([5, 10, 1, b'h', b'e', b'l', b'l', b'o']);
        assert!(h.recognize(&block(16), 3, words(&[hdr8, 0]), vtable));
        // The wrong type for the offset, or a capacity beyond the block.
        let wrong = u64::from_le_bytes([5, 10, 2, 0, 0, 0, 0, 0]);
        assert!(!h.recognize(&block(16), 3, words(&[wrong, 0]), vtable));
        assert!(!h.recognize(&block(8), 3, words(&[hdr8]), vtable));
        // sdshdr5: flags (len 3 << 3 | type 0) then the string: pointer at +1.
        let hdr5 = u64::from_le_bytes([3 << 3, b'a', b'b', b'c', 0, 0, 0, 0]);
        assert!(h.recognize(&block(8), 1, words(&[hdr5]), vtable));
        // Not without the heuristic, and not at +16 (no sds header is 16 long).
        let valgrinds = Heuristics {
            sds: false,
            ..Heuristics::ALL
        };
        assert!(!valgrinds.recognize(&block(16), 3, words(&[hdr8, 0]), vtable));
        assert!(!h.recognize(&block(64), 16, words(&[hdr8, 0, 0]), vtable));
    }

    #[test]
    fn a_walked_block_fits_with_its_usable_size() {
        // sqlite's header says 64 bytes follow; the heap walk knows 72 + 8 usable.
        let walked = Block {
            size: 80,
            by_new: false,
            usable_size: true,
        };
        assert!(Heuristics::ALL.recognize(&walked, 8, words(&[64]), vtable));
        let exact = Block {
            usable_size: false,
            ..walked
        };
        assert!(!Heuristics::ALL.recognize(&exact, 8, words(&[64]), vtable));
    }
}
