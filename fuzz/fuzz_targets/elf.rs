//! Fuzzes the ELF reading and the disassembly that decide where uprobes go, the way
//! leaktrace meets a file: every symbol's code and file offset, the probe sites of
//! the allocator functions, the wrapper hints. Seeded with real libraries and the
//! fixtures; the mutations are truncated and corrupted binaries.

#![no_main]

use std::path::Path;

use leaktrace::allocator::{discover, elf::ElfFile, placement, wrappers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/fuzz/input.so");
    // Keeps what leaktrace keeps (the malloc family, operator new/delete, the
    // wrappers) and some more functions, without the cost of every symbol.
    let wanted = |n: &str| {
        ["alloc", "align", "free", "dup", "_Zn", "_Zd"]
            .iter()
            .any(|w| n.contains(w))
    };
    let Ok(elf) = ElfFile::parse(path, data.to_vec(), wanted) else {
        return;
    };
    for (_, sym) in elf.symbols() {
        let _ = elf.file_offset(sym.vaddr);
        let Some(code) = elf.code(sym.vaddr, 96) else {
            continue;
        };
        assert!(code.len() <= 96);
        for return_probe in [false, true] {
            let site = placement::place(code, sym.vaddr, return_probe);
            assert!(site.offset == 0 || site.offset < code.len() as u64);
        }
    }
    if let Some(hooks) = discover::hooks_for(&elf, path, path) {
        assert!(!hooks.functions.is_empty());
    }
    let _ = wrappers::hints_for(&elf);
});
