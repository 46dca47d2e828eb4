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

/// A pseudo-random heap in a larger mapping: objects of every size (some spanning
/// several read windows), pointers between them (start and interior), roots in
/// the data mapping, stale words in allocator-owned memory, and an object whose
/// memory went away.
fn random_heap(seed: u64) -> Fixture {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut f = Fixture::new();
    let big_heap = HEAP + LEN;
    let big_len = 6 * CHUNK;
    // Its last page went away after the maps were read.
    let readable_end = big_heap + big_len - 0x1000;
    f.memory.map(big_heap, (readable_end - big_heap) as usize);
    f.input.maps.push(Mapping {
        end: big_heap + big_len,
        ..mapping(big_heap, Backing::Anonymous, true)
    });
    f.input.maps.sort_by_key(|m| m.start);
    let mut objects = Vec::new();
    for (base, len) in [(HEAP, LEN), (big_heap, big_len)] {
        let mut addr = base + 0x100;
        loop {
            let size = match next() % 200 {
                0 => CHUNK + next() % (2 * CHUNK),
                1..=20 => next() % 4096 + 1,
                _ => next() % 256 + 8,
            };
            if addr + size > base + len - 0x1000 {
                break;
            }
            objects.push((addr, size));
            addr = (addr + size + 16 + next() % 3 * 16).next_multiple_of(16);
        }
    }
    for &(a, size) in &objects {
        f.object(a, size);
    }
    // An object in the page that went away: never read whole.
    f.object(big_heap + big_len - 64, 256);
    let pointer = |r: u64, objects: &[(u64, u64)]| {
        let (a, size) = objects[(r % objects.len() as u64) as usize];
        if r.is_multiple_of(5) {
            a + (r >> 20) % size
        } else {
            a
        }
    };
    for &(a, size) in &objects {
        let words = (size / 8).min(64);
        for w in 0..words {
            let r = next();
            let value = if r % 40 == 0 {
                pointer(r >> 6, &objects)
            } else {
                r >> 40
            };
            if a + w * 8 + 8 <= readable_end {
                f.memory.write_u64(a + w * 8, value);
            }
        }
    }
    // Big objects: the same pointer on both sides of their first split into read
    // windows (a task boundary there would keep it twice), and more at their end.
    for &(a, size) in objects.iter().filter(|o| o.1 > CHUNK) {
        let p = pointer(next(), &objects);
        for at in [a + CHUNK - 8, a + CHUNK, a + size / 8 * 8 - 8] {
            if at + 8 <= readable_end {
                f.memory.write_u64(at, p);
            }
        }
    }
    for k in 0..20 {
        let r = next();
        f.memory.write_u64(DATA + k * 8, pointer(r, &objects));
    }
    f.input.snapshot.owned = std::iter::once(HEAP + LEN - 0x4000..HEAP + LEN).collect();
    f
}

/// The verdicts of a scan, and its figures but for the bytes read (a task
/// boundary decides which small gaps a window reads through).
fn verdicts(o: &ScanOutput) -> String {
    let stats = ScanStats {
        bytes_read: 0,
        ..o.stats
    };
    format!(
        "{:?}",
        (
            &o.candidates,
            &o.unmapped,
            &o.unjudged,
            &o.watched_reached,
            stats
        )
    )
}

#[test]
fn threads_and_task_sizes_do_not_change_a_scan() {
    for seed in [1, 0xdead_beef] {
        let f = random_heap(seed);
        let out = scan(&f.input, &f.memory);
        let s = out.stats;
        assert!(
            s.direct > 0 && s.indirect > 0 && s.possible > 0 && s.reachable > 0,
            "{s:?}"
        );
        assert!(s.edges > 100 && s.unreadable == 1, "{s:?}");
        let whole = verdicts(&out);
        for task in [1, 4096, 64 << 10, 1 << 20] {
            let mut one = Workspace::with_threads(1);
            one.task_bytes = task;
            let single = one.scan(&f.input, &f.memory);
            assert!(one.tasks.len() > 1);
            assert!(
                verdicts(&single) == whole,
                "tasks of {task} bytes: {:?}",
                single.stats
            );
            for threads in [2, 3, 4] {
                let mut ws = Workspace::with_threads(threads);
                ws.task_bytes = task;
                ws.parallel_min = 0;
                // Twice: the second scan reuses the workspace's parts and index.
                for _ in 0..2 {
                    let out = ws.scan(&f.input, &f.memory);
                    assert_eq!(out.timings.threads, threads);
                    assert!(
                        verdicts(&out) == whole && out.stats == single.stats,
                        "{threads} threads, tasks of {task} bytes: {:?}",
                        out.stats
                    );
                }
            }
        }
    }
}

/// The graph a scan should build, the slow way: every aligned word of every
/// planned piece (of each object in it, for a run of objects) read on its own
/// and looked up with [`ObjectIndex::find`], recorded straight into a graph.
fn reference_graph(input: &ScanInput, memory: &FakeMemory) -> Graph {
    let index = ObjectIndex::new(input.snapshot.objects.iter().map(|(a, o)| (*a, o.size())));
    let mut pieces = Vec::new();
    plan(input, &index, &mut pieces);
    let mut graph = Graph::new(index.len());
    let mut record = |src: u32, w: u64| {
        let Some(j) = index.find(w).filter(|_| w >= MIN_POINTER) else {
            return;
        };
        let offset = w - index.start(j);
        if offset != 0 && Some(offset) == next_chunk_offset(index.end(j) - index.start(j)) {
            return;
        }
        if src == ROOT {
            graph.add_root(j, offset);
        } else {
            graph.add_edge(src, j, offset);
        }
    };
    for &r in &input.registers {
        record(ROOT, r);
    }
    for piece in &pieces {
        let r = &piece.range;
        let sources: Vec<(u32, Range<u64>)> = match piece.role {
            Role::Root => vec![(ROOT, r.clone())],
            Role::Objects(first, last) => (first..=last)
                .map(|o| (o, index.start(o).max(r.start)..index.end(o).min(r.end)))
                .collect(),
        };
        for (src, range) in sources {
            let mut at = range.start.next_multiple_of(8);
            while at + 8 <= range.end {
                let mut word = [0u8; 8];
                if memory.read(at, &mut word) == 8 {
                    record(src, u64::from_ne_bytes(word));
                }
                at += 8;
            }
        }
    }
    graph.classify(1, |_, _| false);
    graph
}

#[test]
fn the_walk_builds_the_graph_of_a_word_by_word_reading() {
    for seed in [1, 0xdead_beef, 42] {
        let mut f = random_heap(seed);
        f.input.registers = f.input.snapshot.objects[..3]
            .iter()
            .map(|o| o.0 + 8)
            .collect();
        for threads in [1, 2] {
            let mut ws = Workspace::with_threads(threads);
            ws.task_bytes = 64 << 10;
            ws.parallel_min = 0;
            let out = ws.scan(&f.input, &f.memory);
            assert!(out.stats.edges > 100);
            assert!(
                ws.graph == reference_graph(&f.input, &f.memory),
                "seed {seed}, {threads} threads"
            );
        }
    }
}

#[test]
fn overlapping_objects_each_get_their_words() {
    // A snapshot taken while the table changed can hold two objects that overlap:
    // a word in both is an edge from each.
    let mut f = random_heap(7);
    let (a, size) = f.input.snapshot.objects[10];
    let size = size.size();
    f.object(a + 8, size + 64);
    f.memory.write_u64(a + 16, f.input.snapshot.objects[40].0);
    let mut ws = Workspace::with_threads(1);
    ws.scan(&f.input, &f.memory);
    assert!(ws.graph == reference_graph(&f.input, &f.memory));
}
