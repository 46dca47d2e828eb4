//! The live blocks of a glibc heap, read from outside the process: what a late
//! attach needs to find leaks made before it.
//!
//! glibc's chunks carry a 16-byte header before the user pointer (`prev_size`,
//! then `size` with flag bits PREV_INUSE = 1, IS_MMAPPED = 2, NON_MAIN_ARENA = 4);
//! the next chunk starts `size` bytes on. A chunk is in use when the next chunk's
//! PREV_INUSE bit is set — except chunks cached in a tcache or a fastbin, which
//! keep the bit set. We walk:
//! * the main arena, from the start of `[heap]` to its top chunk;
//! * each thread arena's heaps (64 MiB-aligned, each starting with a `heap_info`:
//!   the arena, the previous heap, the size in use): the current one from its
//!   chunks to the arena's top chunk, the older ones (followed through `prev`) to
//!   the fenceposts glibc leaves at their end when it moves to a new heap;
//! * big blocks: chunks with IS_MMAPPED set at page starts of anonymous mappings (each
//!   mapped on its own, but the kernel may merge it with a neighbour).
//!
//! The free-but-cached chunks are subtracted: tcache entries hold, 8 bytes into
//! their user data, the process's random `tcache_key` (glibc 2.34+), learnt from
//! the main thread's tcache (the first chunk of `[heap]`, whose entry lists are
//! followed through glibc's pointer mangling, "safe-linking"); fastbin lists start
//! in the arena (`malloc_state`), found without symbols as the word in libc's data
//! that points at the main heap's top chunk.
//!
//! Every step is validated (sizes aligned and inside the mapping, the walk ending
//! exactly at the top chunk, lists inside the heap); what does not validate is
//! refused with a reason, never guessed. The layout is read from the version of
//! the target's libc ([`Layout::of_version`]): glibc 2.34 to 2.41 on x86-64
//! (RHEL 9, Ubuntu 22.04 and 24.04, Debian 12 and 13, Fedora up to 42); other
//! versions are refused, naming the version.

use std::ops::Range;

use rustc_hash::FxHashSet;

use crate::proc::{
    maps::{Backing, Mapping},
    mem::MemorySource,
};

const WORD: u64 = 8;
const HEADER: u64 = 16;
const MIN_CHUNK: u64 = 32;
const PREV_INUSE: u64 = 1;
const IS_MMAPPED: u64 = 2;
const FLAGS: u64 = 7;
/// Mapped chunks start and end on pages.
const PAGE: u64 = 4096;
/// A thread arena's heaps are this big and this aligned (2 × the largest mmap
/// threshold on 64-bit).
const HEAP_MAX: u64 = 64 << 20;
/// `sizeof(tcache_perthread_struct)` + header: 64 u16 counts, 64 entries.
const TCACHE_CHUNK: u64 = 0x290;
const TCACHE_BINS: u64 = 64;
/// `malloc_state` offsets (glibc 2.27+): fastbinsY, top, next.
const ARENA_FASTBINS: u64 = 0x10;
const FASTBINS: u64 = 10;
const ARENA_TOP: u64 = 0x60;
const ARENA_NEXT: u64 = 0x870;
const ARENA_SIZE: u64 = 0x898;
/// Most entries followed in one free list (glibc's limits are far smaller).
const MAX_LIST: usize = 1 << 16;
/// Most arenas followed.
const MAX_ARENAS: usize = 1024;
/// Most heaps followed per thread arena (64 GiB of them).
const MAX_HEAPS: usize = 1024;
/// The glibc versions whose heap layout this walk knows.
pub const KNOWN_VERSIONS: std::ops::RangeInclusive<(u32, u32)> = (2, 34)..=(2, 41);

/// Where glibc keeps things, by version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `sizeof(heap_info)` rounded to 16: a thread heap's first chunk (or its
    /// arena, in the arena's first heap) follows it. glibc 2.35 added `pagesize`.
    heap_info_size: u64,
}

impl Layout {
    /// The layout of glibc `major.minor`, or why it cannot be walked.
    pub fn of_version(version: (u32, u32)) -> Result<Self, WalkError> {
        if !KNOWN_VERSIONS.contains(&version) {
            return Err(WalkError::UnknownVersion(version.0, version.1));
        }
        Ok(Layout {
            heap_info_size: if version >= (2, 35) { 0x30 } else { 0x20 },
        })
    }
}

/// The version in a glibc binary's banner ("... release version 2.36."), which
/// `gnu_get_libc_version` and `ldd --version` print.
pub fn version_in(libc: &[u8]) -> Option<(u32, u32)> {
    const BANNER: &[u8] = b"release version ";
    let at = libc.windows(BANNER.len()).position(|w| w == BANNER)? + BANNER.len();
    let text = libc.get(at..at + 16.min(libc.len() - at))?;
    let text =
        std::str::from_utf8(text.split(|b| !(b.is_ascii_digit() || *b == b'.')).next()?).ok()?;
    let mut parts = text.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A live block found by the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveBlock {
    /// The user pointer.
    pub addr: u64,
    /// Bytes usable from `addr` (the requested size is not known).
    pub size: u64,
}

/// What the walk found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapWalk {
    pub blocks: Vec<LiveBlock>,
    /// Arenas walked (the main one included).
    pub arenas: usize,
    /// Chunks seen free in a tcache or a fastbin.
    pub cached_free: usize,
}

/// Why a heap could not be walked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalkError {
    /// The memory could not be read.
    #[error("cannot read the heap at {0:#x}")]
    Unreadable(u64),
    /// A chunk header makes no sense.
    #[error(
        "the chunk at {0:#x} has an impossible size {1:#x} (not a glibc heap, or a layout we do not know)"
    )]
    BadChunk(u64, u64),
    /// There is no main heap: another allocator serves malloc.
    #[error(
        "the process has no glibc main heap ([heap]): another allocator (jemalloc, tcmalloc) serves malloc"
    )]
    NoHeap,
    /// The main heap does not start with a tcache.
    #[error(
        "the heap at {0:#x} does not start with glibc's tcache (glibc older than 2.34, or another allocator)"
    )]
    NoTcache(u64),
    /// The arena could not be found from its top chunk.
    #[error("glibc's main arena (the word pointing at the top chunk {0:#x}) is not in libc's data")]
    NoArena(u64),
    /// A thread heap's `heap_info` does not belong to its arena or is too big.
    #[error("the thread heap at {0:#x} has no valid heap_info (arena {1:#x})")]
    BadHeapInfo(u64, u64),
    /// A heap's chunks do not end where the arena says its top chunk is.
    #[error("the chunks of the heap at {0:#x} do not end at the arena's top chunk {1:#x}")]
    TopMismatch(u64, u64),
    /// The target's glibc is a version whose layout this walk does not know.
    #[error("glibc {0}.{1}: its heap layout is not one leaktrace knows (2.34 to 2.41); not walked")]
    UnknownVersion(u32, u32),
}

impl WalkError {
    /// Whether a walk made while the target runs may have seen the heap change
    /// under it (a chunk split or merged between two reads, a thread heap
    /// unmapped): worth another try, unlike a heap that is not glibc's.
    pub fn may_be_torn(&self) -> bool {
        matches!(
            self,
            Self::Unreadable(_)
                | Self::BadChunk(..)
                | Self::BadHeapInfo(..)
                | Self::TopMismatch(..)
        )
    }
}

/// Reads words of the target.
struct Words<'a> {
    memory: &'a dyn MemorySource,
}

impl Words<'_> {
    fn word(&self, addr: u64) -> Result<u64, WalkError> {
        let mut buf = [0u8; 8];
        if self.memory.read(addr, &mut buf) == 8 {
            Ok(u64::from_ne_bytes(buf))
        } else {
            Err(WalkError::Unreadable(addr))
        }
    }

    fn bytes(&self, addr: u64, len: u64) -> Result<Vec<u8>, WalkError> {
        let mut buf = vec![0u8; len as usize];
        if self.memory.read(addr, &mut buf) == buf.len() {
            Ok(buf)
        } else {
            Err(WalkError::Unreadable(addr))
        }
    }
}

/// glibc's safe-linking: a free-list pointer stored at `at` is mangled with the
/// address it is stored at.
fn demangle(at: u64, stored: u64) -> u64 {
    (at >> 12) ^ stored
}

/// A chunk: its address, size, whether it is in use (the next chunk's
/// PREV_INUSE bit), and the word where a tcache entry keeps the tcache key.
type Chunk = (u64, u64, bool, u64);

/// A heap's range and its chunks.
type HeapChunks = (Range<u64>, Vec<Chunk>);

/// How a run of chunks ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The top chunk, which reaches the end of the range.
    Top,
    /// A heap glibc moved away from: its last chunk is followed by a header of
    /// size 0 (a 16-byte fencepost may come before it). Returns the fencepost.
    Fencepost,
}

/// The chunks of `range` from `first` up to the top chunk, and the top chunk's
/// address.
fn chunks(words: &Words, first: u64, range: &Range<u64>) -> Result<(Vec<Chunk>, u64), WalkError> {
    chunks_until(words, first, range, End::Top)
}

/// The chunks of `range` from `first` to its `end`, and where the run ended.
fn chunks_until(
    words: &Words,
    first: u64,
    range: &Range<u64>,
    end: End,
) -> Result<(Vec<Chunk>, u64), WalkError> {
    let mut out = Vec::new();
    let mut c = first;
    let mut window = Window::new(words, range.clone());
    let mut at = |addr: u64| window.word(addr);
    loop {
        if c + HEADER > range.end {
            return Err(WalkError::BadChunk(c, 0));
        }
        let size = at(c + WORD)? & !FLAGS;
        if end == End::Fencepost {
            // The last chunk of an old heap: a fencepost header (16 bytes) and/or
            // a header of size 0 after it, never a block.
            let last = match size {
                HEADER => at(c + HEADER + WORD)? & !FLAGS == 0,
                0 => true,
                _ => c + size + HEADER <= range.end && at(c + size + WORD)? & !FLAGS == 0,
            };
            if last {
                return Ok((out, c));
            }
        }
        if size < MIN_CHUNK || !size.is_multiple_of(16) || c + size > range.end {
            return Err(WalkError::BadChunk(c, size));
        }
        let next = c + size;
        // The top chunk reaches the end of the heap (less than a chunk may remain).
        if end == End::Top && range.end - next < MIN_CHUNK {
            return Ok((out, c));
        }
        let key_slot = at(c + HEADER + WORD)?;
        let in_use = at(next + WORD)? & PREV_INUSE != 0;
        out.push((c, size, in_use, key_slot));
        c = next;
    }
}

/// Reads a heap's words through a sliding window: chunk walks go forward, and
/// a heap can be gigabytes, which must not be copied whole into the tracer.
struct Window<'a, 'm> {
    words: &'a Words<'m>,
    range: Range<u64>,
    buf: Vec<u8>,
    start: u64,
}

impl<'a, 'm> Window<'a, 'm> {
    const SIZE: u64 = 1 << 20;

    fn new(words: &'a Words<'m>, range: Range<u64>) -> Self {
        Window {
            words,
            range,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// The word at `addr`, which must lie inside the heap.
    fn word(&mut self, addr: u64) -> Result<u64, WalkError> {
        if addr < self.range.start || addr.saturating_add(WORD) > self.range.end {
            return Err(WalkError::BadChunk(addr, 0));
        }
        if addr < self.start || addr + WORD > self.start + self.buf.len() as u64 {
            self.start = addr;
            self.buf = self
                .words
                .bytes(addr, Self::SIZE.min(self.range.end - addr))?;
        }
        let i = (addr - self.start) as usize;
        Ok(u64::from_ne_bytes(
            self.buf[i..i + 8].try_into().expect("8 bytes"),
        ))
    }
}

/// Adds the chunks of a free list (tcache: user pointers; fastbin: chunk
/// pointers) to `free`, each checked to be inside `heaps`.
fn follow_list(
    words: &Words,
    head: u64,
    user_pointers: bool,
    inside: impl Fn(u64) -> bool,
    free: &mut FxHashSet<u64>,
) -> Result<(), WalkError> {
    let mut p = head;
    for _ in 0..MAX_LIST {
        if p == 0 {
            return Ok(());
        }
        let user = if user_pointers { p } else { p + HEADER };
        if !inside(user) || !user.is_multiple_of(16) || !free.insert(user) {
            return Ok(()); // the end of a list we can trust, or a cycle
        }
        p = demangle(user, words.word(user)?);
    }
    Ok(())
}

/// Walks the glibc heaps of a process. `libc_data` are libc's writable ranges
/// (its `.data` and the anonymous `.bss` after it), where the main arena lives.
pub fn walk(
    maps: &[Mapping],
    libc_data: &[Range<u64>],
    memory: &dyn MemorySource,
    layout: Layout,
) -> Result<HeapWalk, WalkError> {
    let words = Words { memory };
    let mut walk = HeapWalk::default();
    let mut free = FxHashSet::default();
    // In-use chunks: address, size, tcache key slot.
    let mut in_use: Vec<(u64, u64, u64)> = Vec::new();
    let heap = maps.iter().find(|m| m.backing == Backing::Heap);
    if heap.is_none() {
        return Err(WalkError::NoHeap);
    }
    let mut heaps: Vec<Range<u64>> = Vec::new();
    if let Some(heap) = heap {
        let range = heap.start..heap.end;
        let (list, top) = chunks(&words, heap.start, &range)?;
        walk.arenas += 1;
        // The main thread's tcache is the heap's first chunk.
        let Some(&(tcache, size, _, _)) = list.first() else {
            return Err(WalkError::NoTcache(heap.start));
        };
        if size != TCACHE_CHUNK {
            return Err(WalkError::NoTcache(heap.start));
        }
        let inside = |a: u64| heap.start < a && a < top;
        let entries = tcache + HEADER + TCACHE_BINS * 2;
        let mut key = None;
        for bin in 0..TCACHE_BINS {
            let head = words.word(entries + bin * WORD)?;
            if head != 0 && inside(head) {
                key.get_or_insert(words.word(head + WORD)?);
                follow_list(&words, head, true, inside, &mut free)?;
            }
        }
        in_use.extend(list.iter().skip(1).filter(|c| c.2).map(|c| (c.0, c.1, c.3)));
        heaps.push(range);
        // The main arena: the word in libc's data that points at the top chunk.
        let arena = libc_data
            .iter()
            .find_map(|r| find_arena(&words, r, top).transpose())
            .transpose()?
            .ok_or(WalkError::NoArena(top))?;
        let mut arenas = vec![arena];
        let mut next = words.word(arena + ARENA_NEXT)?;
        while next != arena && next != 0 && arenas.len() < MAX_ARENAS {
            arenas.push(next);
            next = words.word(next + ARENA_NEXT)?;
        }
        for &a in &arenas {
            if a != arena {
                for (range, list) in thread_heaps(&words, a, layout)? {
                    in_use.extend(list.iter().filter(|c| c.2).map(|c| (c.0, c.1, c.3)));
                    heaps.push(range);
                }
                walk.arenas += 1;
            }
            let inside_any = |u: u64| heaps.iter().any(|h| h.start < u && u < h.end);
            for bin in 0..FASTBINS {
                let head = words.word(a + ARENA_FASTBINS + bin * WORD)?;
                follow_list(&words, head, false, inside_any, &mut free)?;
            }
        }
        // Other threads' tcaches: each is a chunk of the tcache's size whose
        // counts and list heads agree; their lists are followed like the main
        // thread's (and teach the key when the main thread's tcache is empty).
        let inside_any = |u: u64| heaps.iter().any(|h| h.start < u && u < h.end);
        for &(c, size, _) in &in_use {
            if size != TCACHE_CHUNK {
                continue;
            }
            let Ok(body) = words.bytes(c + HEADER, TCACHE_CHUNK - HEADER) else {
                continue;
            };
            for head in tcache_heads(&body, inside_any).unwrap_or_default() {
                key.get_or_insert(words.word(head + WORD)?);
                follow_list(&words, head, true, inside_any, &mut free)?;
            }
        }
        // Any other chunk holding the key where tcache entries do.
        if let Some(key) = key {
            for &(c, size, key_slot) in &in_use {
                if size >= MIN_CHUNK && key_slot == key {
                    free.insert(c + HEADER);
                }
            }
        }
    }
    walk.cached_free = free.len();
    for (c, size, _) in in_use {
        if !free.contains(&(c + HEADER)) {
            walk.blocks.push(LiveBlock {
                addr: c + HEADER,
                size: size - WORD,
            });
        }
    }
    // Big blocks: mapped on their own, chunks with IS_MMAPPED set. Each starts
    // a page, but not always a mapping: the kernel merges anonymous mappings
    // that touch (a block right above a thread stack or another block; kernels
    // before 6.7 do not space large ones apart), so every page of an anonymous
    // mapping outside the arenas' heaps may start one.
    for m in maps {
        if m.backing != Backing::Anonymous || !m.read || !m.write || m.shared {
            continue;
        }
        let mut c = m.start;
        while c + HEADER <= m.end {
            if let Some(h) = heaps.iter().find(|h| h.contains(&c)) {
                c = h.end.next_multiple_of(PAGE);
                continue;
            }
            let Ok(head) = words.word(c + WORD) else {
                break;
            };
            let size = head & !FLAGS;
            let mmapped = head & FLAGS == IS_MMAPPED
                && size.is_multiple_of(PAGE)
                && size != 0
                && c + size <= m.end
                && words.word(c).is_ok_and(|prev| prev == 0);
            if mmapped {
                walk.blocks.push(LiveBlock {
                    addr: c + HEADER,
                    size: size - HEADER,
                });
                c += size;
            } else {
                c += PAGE;
            }
        }
    }
    walk.blocks.sort_unstable_by_key(|b| b.addr);
    Ok(walk)
}

/// The list heads of a thread's tcache (`tcache_perthread_struct`: 64 u16
/// counts, then 64 entry pointers), if `body` is one: every bin's count and head
/// agree (both zero or both not), and every head is an aligned pointer into a heap.
fn tcache_heads(body: &[u8], inside: impl Fn(u64) -> bool) -> Option<Vec<u64>> {
    let bins = TCACHE_BINS as usize;
    let mut heads = Vec::new();
    for bin in 0..bins {
        let count = u16::from_ne_bytes(body.get(bin * 2..bin * 2 + 2)?.try_into().ok()?);
        let at = bins * 2 + bin * 8;
        let head = u64::from_ne_bytes(body.get(at..at + 8)?.try_into().ok()?);
        match (count, head) {
            (0, 0) => {}
            (c, h) if c != 0 && h != 0 && h.is_multiple_of(16) && inside(h) => heads.push(h),
            _ => return None,
        }
    }
    Some(heads)
}

/// The heaps of thread arena `a`, newest first, each with its chunks. A thread
/// arena lives at the start of its first heap, after `heap_info`; the current
/// heap holds its top chunk, and each heap's `heap_info` names the one before.
fn thread_heaps(words: &Words, a: u64, layout: Layout) -> Result<Vec<HeapChunks>, WalkError> {
    let top = words.word(a + ARENA_TOP)?;
    let mut h = top & !(HEAP_MAX - 1);
    let mut out = Vec::new();
    for _ in 0..MAX_HEAPS {
        // heap_info: ar_ptr, prev, size (in use), mprotect_size, ...
        let (owner, prev, size) = (words.word(h)?, words.word(h + WORD)?, words.word(h + 16)?);
        if owner != a || size > HEAP_MAX || size < layout.heap_info_size + MIN_CHUNK {
            return Err(WalkError::BadHeapInfo(h, a));
        }
        let first = if a > h && a < h + 0x100 {
            (a + ARENA_SIZE).next_multiple_of(16)
        } else {
            h + layout.heap_info_size
        };
        let range = h..h + size;
        let list = if out.is_empty() {
            let (list, end) = chunks(words, first, &range)?;
            if end != top {
                return Err(WalkError::TopMismatch(h, top));
            }
            list
        } else {
            chunks_until(words, first, &range, End::Fencepost)?.0
        };
        out.push((range, list));
        if prev == 0 {
            return Ok(out);
        }
        if !prev.is_multiple_of(HEAP_MAX) {
            return Err(WalkError::BadHeapInfo(prev, a));
        }
        h = prev;
    }
    Ok(out)
}

/// The main arena in `range`: the word pointing at `top`, where the rest of
/// `malloc_state` agrees (fastbins empty or inside the heap, `next` set).
fn find_arena(words: &Words, range: &Range<u64>, top: u64) -> Result<Option<u64>, WalkError> {
    let bytes = words.bytes(range.start, range.end - range.start)?;
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        if u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) != top {
            continue;
        }
        let at = range.start + i as u64 * WORD;
        let Some(arena) = at.checked_sub(ARENA_TOP) else {
            continue;
        };
        if arena < range.start || arena + ARENA_SIZE > range.end {
            continue;
        }
        if words.word(arena + ARENA_NEXT)? != 0 {
            return Ok(Some(arena));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::mem::FakeMemory;

    const HEAP: u64 = 0x5555_0000_0000;

    /// A heap of chunks (size, in use) laid out from HEAP, then a top chunk.
    fn heap(chunks: &[(u64, bool)], len: u64) -> FakeMemory {
        let mut m = FakeMemory::new();
        m.map(HEAP, len as usize);
        let mut c = HEAP;
        let mut prev_in_use = true;
        for &(size, in_use) in chunks {
            m.write_u64(c + WORD, size | u64::from(prev_in_use));
            prev_in_use = in_use;
            c += size;
        }
        m.write_u64(c + WORD, (HEAP + len - c) | u64::from(prev_in_use));
        m
    }

    #[test]
    fn chunks_run_to_the_top_and_say_which_are_in_use() {
        let memory = heap(
            &[(0x290, true), (0x20, true), (0x30, false), (0x40, true)],
            0x1000,
        );
        let words = Words { memory: &memory };
        let (list, top) = chunks(&words, HEAP, &(HEAP..HEAP + 0x1000)).unwrap();
        assert_eq!(
            without_key_slots(&list),
            vec![
                (HEAP, 0x290, true),
                (HEAP + 0x290, 0x20, true),
                (HEAP + 0x2b0, 0x30, false),
                (HEAP + 0x2e0, 0x40, true)
            ]
        );
        assert_eq!(top, HEAP + 0x320);
    }

    #[test]
    fn a_heap_bigger_than_the_read_window_is_walked_whole() {
        // 300 chunks of 0x2ff0 bytes: headers on both sides of each 1 MiB window.
        let sizes: Vec<(u64, bool)> = (0..300).map(|i| (0x2ff0, i % 3 != 0)).collect();
        let len = 300 * 0x2ff0 + 0x1000;
        let memory = heap(&sizes, len);
        let words = Words { memory: &memory };
        let (list, top) = chunks(&words, HEAP, &(HEAP..HEAP + len)).unwrap();
        assert_eq!(list.len(), 300);
        assert_eq!(list.iter().filter(|c| c.2).count(), 200);
        assert_eq!(top, HEAP + 300 * 0x2ff0);
        // An old heap whose chunks run off its end without a fencepost: refused.
        let range = HEAP..HEAP + 0x2ff0 * 2;
        assert!(chunks_until(&words, HEAP, &range, End::Fencepost).is_err());
    }

    #[test]
    fn a_broken_chunk_is_refused() {
        let mut memory = heap(&[(0x290, true), (0x20, true)], 0x1000);
        memory.write_u64(HEAP + 0x290 + WORD, 0x17); // size 0x10: impossible
        let words = Words { memory: &memory };
        assert_eq!(
            chunks(&words, HEAP, &(HEAP..HEAP + 0x1000)),
            Err(WalkError::BadChunk(HEAP + 0x290, 0x10))
        );
    }

    fn without_key_slots(list: &[Chunk]) -> Vec<(u64, u64, bool)> {
        list.iter().map(|c| (c.0, c.1, c.2)).collect()
    }

    /// Lays chunks (size, in use) from `at` in `m`; returns where the next begins.
    fn lay(m: &mut FakeMemory, at: u64, chunks: &[(u64, bool)]) -> u64 {
        let mut c = at;
        let mut prev_in_use = true;
        for &(size, in_use) in chunks {
            m.write_u64(c + WORD, size | u64::from(prev_in_use));
            prev_in_use = in_use;
            c += size;
        }
        c
    }

    #[test]
    fn a_thread_arena_is_walked_through_all_its_heaps() {
        const OLD: u64 = 0x7f00_0000_0000;
        const NEW: u64 = OLD + HEAP_MAX;
        let layout = Layout::of_version((2, 36)).unwrap();
        let arena = OLD + 0x30;
        let mut m = FakeMemory::new();
        m.map(OLD, 0x2000);
        m.map(NEW, 0x1000);
        // The first heap: heap_info, the arena, then chunks up to the fenceposts
        // glibc left when the arena moved on (the old top was freed).
        m.write_u64(OLD, arena);
        m.write_u64(OLD + 16, 0x2000);
        let first = OLD + 0x8d0;
        let fence = lay(&mut m, first, &[(0x40, true), (0x50, true), (0x100, false)]);
        m.write_u64(fence + WORD, 0x10); // PREV_INUSE clear: the old top is free
        m.write_u64(fence + HEADER + WORD, PREV_INUSE);
        // The current heap: heap_info naming the old one, chunks, the top.
        m.write_u64(NEW, arena);
        m.write_u64(NEW + WORD, OLD);
        m.write_u64(NEW + 16, 0x1000);
        let top = lay(&mut m, NEW + 0x30, &[(0x30, true), (0x20, false)]);
        m.write_u64(top + WORD, NEW + 0x1000 - top); // the chunk before is free
        m.write_u64(arena + ARENA_TOP, top);
        let words = Words { memory: &m };
        let heaps = thread_heaps(&words, arena, layout).unwrap();
        let got: Vec<_> = heaps
            .iter()
            .map(|(r, list)| (r.clone(), without_key_slots(list)))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    NEW..NEW + 0x1000,
                    vec![(NEW + 0x30, 0x30, true), (NEW + 0x60, 0x20, false)]
                ),
                (
                    OLD..OLD + 0x2000,
                    vec![
                        (first, 0x40, true),
                        (first + 0x40, 0x50, true),
                        (first + 0x90, 0x100, false)
                    ]
                ),
            ]
        );
        // A heap_info that names another arena is refused, not guessed.
        m.write_u64(OLD, arena + 0x1000);
        let words = Words { memory: &m };
        assert_eq!(
            thread_heaps(&words, arena, layout),
            Err(WalkError::BadHeapInfo(OLD, arena))
        );
    }

    #[test]
    fn the_layout_comes_from_the_libc_version() {
        let banner =
            b"\0GNU C Library (Debian GLIBC 2.36-9+deb12u14) stable release version 2.36.\n";
        assert_eq!(version_in(banner), Some((2, 36)));
        assert_eq!(version_in(b"no banner here"), None);
        assert_eq!(Layout::of_version((2, 34)).unwrap().heap_info_size, 0x20);
        assert_eq!(Layout::of_version((2, 39)).unwrap().heap_info_size, 0x30);
        assert_eq!(
            Layout::of_version((2, 31)),
            Err(WalkError::UnknownVersion(2, 31))
        );
        assert_eq!(
            Layout::of_version((2, 42)).unwrap_err().to_string(),
            "glibc 2.42: its heap layout is not one leaktrace knows (2.34 to 2.41); not walked"
        );
    }

    #[test]
    fn free_lists_are_followed_through_safe_linking() {
        let memory = {
            let mut m = heap(
                &[(0x290, true), (0x20, true), (0x20, true), (0x20, true)],
                0x1000,
            );
            let (a, b) = (HEAP + 0x2a0, HEAP + 0x2c0);
            // a -> b -> end, each pointer mangled with where it is stored.
            m.write_u64(a, (a >> 12) ^ b);
            m.write_u64(b, b >> 12);
            m
        };
        let words = Words { memory: &memory };
        let mut free = FxHashSet::default();
        let inside = |a: u64| HEAP < a && a < HEAP + 0x1000;
        follow_list(&words, HEAP + 0x2a0, true, inside, &mut free).unwrap();
        let mut got: Vec<u64> = free.into_iter().collect();
        got.sort_unstable();
        assert_eq!(got, vec![HEAP + 0x2a0, HEAP + 0x2c0]);
    }
}
