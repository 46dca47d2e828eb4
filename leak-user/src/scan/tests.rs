//! The scanner on fake address spaces with a known truth.

use super::*;
use crate::{
    proc::{
        maps::{Backing, Mapping},
        mem::FakeMemory,
    },
    table::Object,
};

const DATA: u64 = 0x5555_0000_0000;
const HEAP: u64 = 0x5555_1000_0000;
const ANON: u64 = 0x7f00_0000_0000;
const STACK: u64 = 0x7ffd_0000_0000;
const LEN: u64 = 0x10_0000;

fn mapping(start: u64, backing: Backing, write: bool) -> Mapping {
    Mapping {
        start,
        end: start + LEN,
        read: true,
        write,
        exec: false,
        shared: false,
        offset: 0,
        dev: 0,
        inode: 0,
        backing,
    }
}

struct Fixture {
    memory: FakeMemory,
    input: ScanInput,
}

impl Fixture {
    fn new() -> Self {
        let mut memory = FakeMemory::new();
        for base in [DATA, HEAP, ANON, STACK] {
            memory.map(base, LEN as usize);
        }
        let maps = vec![
            mapping(DATA, Backing::File("/bin/prog".into()), true),
            mapping(HEAP, Backing::Heap, true),
            mapping(ANON, Backing::Anonymous, true),
            mapping(STACK, Backing::Stack, true),
        ];
        Self {
            memory,
            input: ScanInput {
                maps,
                ..ScanInput::default()
            },
        }
    }

    /// Adds a tracked object of `size` bytes at `addr`.
    fn object(&mut self, addr: u64, size: u64) {
        let serial = self.input.snapshot.objects.len() as u32 + 1;
        self.input
            .snapshot
            .objects
            .push((addr, Object::new(size, 0, 0, 1, serial)));
        self.input.snapshot.objects.sort_by_key(|o| o.0);
    }

    fn kinds(&self) -> Vec<(u64, LeakKind)> {
        let out = scan(&self.input, &self.memory);
        let mut v: Vec<_> = out.candidates.iter().map(|c| (c.addr, c.kind)).collect();
        v.sort_unstable();
        v
    }
}

const A: u64 = HEAP + 0x100;
const B: u64 = HEAP + 0x200;
const C: u64 = HEAP + 0x300;

#[test]
fn pointer_from_data_keeps_an_object_alive() {
    let mut f = Fixture::new();
    f.object(A, 32);
    f.object(B, 32);
    f.memory.write_u64(DATA + 8, A);
    assert_eq!(f.kinds(), vec![(B, LeakKind::Direct)]);
}

#[test]
fn dropped_list_is_direct_plus_indirect_with_its_root() {
    let mut f = Fixture::new();
    for a in [A, B, C] {
        f.object(a, 32);
    }
    f.memory.write_u64(A, B);
    f.memory.write_u64(B + 8, C);
    let out = scan(&f.input, &f.memory);
    let by_addr: Vec<_> = out
        .candidates
        .iter()
        .map(|c| (c.addr, c.kind, c.root))
        .collect();
    assert_eq!(
        by_addr,
        vec![
            (A, LeakKind::Direct, None),
            (B, LeakKind::Indirect, Some(A)),
            (C, LeakKind::Indirect, Some(A))
        ]
    );
    assert_eq!((out.stats.direct, out.stats.indirect), (1, 2));
}

#[test]
fn interior_pointer_makes_a_possible_leak() {
    let mut f = Fixture::new();
    f.object(A, 64);
    f.memory.write_u64(DATA, A + 8);
    assert_eq!(f.kinds(), vec![(A, LeakKind::Possible)]);
}

#[test]
fn glibc_next_chunk_header_pointers_do_not_keep_a_block() {
    let mut f = Fixture::new();
    // 24 bytes: chunk of 32, the next chunk's header 16 bytes in (its prev_size
    // word is the block's last 8 bytes). main_arena.top points there.
    f.object(A, 24);
    f.memory.write_u64(DATA, A + 16);
    // 40 bytes: chunk of 48, next header at +32.
    f.object(B, 40);
    f.memory.write_u64(DATA + 8, B + 32);
    // 48 bytes: chunk of 64, next header at +48, outside the block: +40 is real.
    f.object(C, 48);
    f.memory.write_u64(DATA + 16, C + 40);
    assert_eq!(
        f.kinds(),
        vec![
            (A, LeakKind::Direct),
            (B, LeakKind::Direct),
            (C, LeakKind::Possible)
        ]
    );
}

#[test]
fn allocator_owned_gaps_are_not_roots_but_other_heap_gaps_are() {
    let mut f = Fixture::new();
    f.object(A, 32);
    f.object(B, 32);
    // Stale copies in free heap memory.
    f.memory.write_u64(HEAP + 0x1000, A);
    f.memory.write_u64(HEAP + 0x9000, B);
    f.input.snapshot.owned = std::iter::once(HEAP..HEAP + 0x8000).collect();
    assert_eq!(f.kinds(), vec![(A, LeakKind::Direct)]);
}

#[test]
fn anonymous_mappings_and_tls_in_the_heap_are_roots() {
    let mut f = Fixture::new();
    f.object(A, 32);
    f.object(B, 32);
    // A static binary's TLS below the first heap object; a pointer in an anonymous mapping.
    f.memory.write_u64(HEAP + 0x10, A);
    f.memory.write_u64(ANON + 0x40, B);
    assert!(f.kinds().is_empty());
}

#[test]
fn dead_stack_below_the_red_zone_is_not_a_root() {
    let mut f = Fixture::new();
    f.object(A, 32);
    f.object(B, 32);
    let sp = STACK + 0x8000;
    f.memory.write_u64(sp - 0x1000, A); // dead
    f.memory.write_u64(sp - 64, B); // red zone: live
    f.input.stack_pointers = vec![sp];
    assert_eq!(f.kinds(), vec![(A, LeakKind::Direct)]);
}

#[test]
fn registers_are_roots() {
    let mut f = Fixture::new();
    f.object(A, 32);
    f.input.registers = vec![A];
    assert!(f.kinds().is_empty());
}

#[test]
fn objects_outside_every_mapping_are_reported_unmapped() {
    let mut f = Fixture::new();
    f.object(0x1234_0000_0000, 32);
    let out = scan(&f.input, &f.memory);
    assert!(out.candidates.is_empty());
    assert_eq!(out.unmapped.len(), 1);
}

#[test]
fn checksum_follows_contents() {
    let mut f = Fixture::new();
    f.object(A, 32);
    let before = scan(&f.input, &f.memory).candidates[0].checksum;
    f.memory.write_u64(A + 16, 42);
    let after = scan(&f.input, &f.memory).candidates[0].checksum;
    assert_ne!(before, after);
}

#[test]
fn big_objects_spanning_several_read_windows_are_scanned_whole() {
    let mut f = Fixture::new();
    f.memory.map(HEAP + LEN, (3 * CHUNK) as usize);
    f.input.maps[1].end = HEAP + LEN + 3 * CHUNK;
    let big = HEAP + 0x1000;
    let size = 2 * CHUNK + 0x1000;
    f.object(big, size);
    f.object(A, 32);
    f.memory.write_u64(DATA, big + 0x20);
    f.memory.write_u64(big, big);
    // The only pointer to A is near the end of the big block.
    f.memory.write_u64(big + size - 8, A);
    f.input.snapshot.objects.sort_by_key(|o| o.0);
    assert_eq!(
        f.kinds(),
        vec![(A, LeakKind::Possible), (big, LeakKind::Possible)]
    );
}

/// Two small mappings with an unmapped gap between them, both roots: the window
/// that reads through the gap stops short, and the second mapping must still be
/// read (a program's own mmap next to the loader's was missed this way).
#[test]
fn roots_after_an_unreadable_gap_are_still_read() {
    let mut f = Fixture::new();
    let first = ANON + LEN + 0x1000;
    let second = first + 0x2000 + 0x3000; // 12 KiB gap, within read-through distance
    for (base, len) in [(first, 0x2000u64), (second, 0x1000)] {
        f.memory.map(base, len as usize);
        f.input.maps.push(Mapping {
            start: base,
            end: base + len,
            ..mapping(base, Backing::Anonymous, true)
        });
    }
    f.input.maps.sort_by_key(|m| m.start);
    f.object(A, 32);
    f.object(B, 32);
    f.memory.write_u64(second + 16, A);
    let out = scan(&f.input, &f.memory);
    let kinds: Vec<_> = out.candidates.iter().map(|c| (c.addr, c.kind)).collect();
    assert_eq!(kinds, vec![(B, LeakKind::Direct)]);
    assert_eq!(out.stats.unreadable_root_bytes, 0);
}
