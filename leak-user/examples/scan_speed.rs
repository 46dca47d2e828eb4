//! Scanner speed without a live target: a million objects in a fake address space
//! shaped like the `hog` fixture (half the words point into other objects).
//! `cargo run --release --features test-support --example scan_speed [objects]`
//! prints MB/s.

use std::time::Instant;

use leaktrace::{
    proc::{
        maps::{Backing, Mapping},
        mem::FakeMemory,
    },
    scan::{ScanInput, scan},
    table::{Object, Snapshot},
};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let base = 0x5555_0000_0000u64;
    let mut x: u32 = 12345;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut objects = Vec::with_capacity(n);
    let mut addr = base + 4096;
    for i in 0..n {
        let size = if i % 97 == 0 {
            1024
        } else {
            16 + (next() as u64 % 64) * 16
        };
        objects.push((addr, Object::new(size, 0, 0, 1, i as u32)));
        addr += size + 16;
    }
    let heap_len = (addr - base) as usize;
    let mut memory = FakeMemory::new();
    memory.map(base, heap_len);
    for (i, (a, o)) in objects.iter().enumerate() {
        for w in 0..o.size() / 8 {
            let value = if w % 2 == 1 {
                objects[next() as usize % n].0
            } else {
                (i as u64) * w
            };
            memory.write_u64(a + w * 8, value);
        }
    }
    let input = ScanInput {
        snapshot: Snapshot {
            objects,
            owned: std::iter::once(base..base + heap_len as u64).collect(),
            attached_late: false,
            ..Snapshot::default()
        },
        maps: vec![Mapping {
            start: base,
            end: base + heap_len as u64,
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset: 0,
            dev: 0,
            inode: 0,
            backing: Backing::Heap,
        }],
        ..ScanInput::default()
    };
    for _ in 0..3 {
        let start = Instant::now();
        let out = scan(&input, &memory);
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{n} objects, {} MB: {:.0} MB/s ({} edges, {} reachable)",
            out.stats.bytes_read / 1_000_000,
            out.stats.bytes_read as f64 / 1e6 / secs,
            out.stats.edges,
            out.stats.reachable
        );
    }
}
