//! C++ class names of leaked blocks, read from the objects themselves.
//!
//! A block allocated before attaching has no stack; what it holds may still say
//! what it is. A polymorphic C++ object starts with a pointer into its class's
//! vtable, two words past the vtable's start (offset-to-top, then the typeinfo
//! pointer); the typeinfo's second word points at the mangled type name. All of
//! it lives in the program's files (RTTI is kept by stripped distribution
//! binaries), so the name is read without any symbols. Each step is checked — the
//! pointers land in file-backed mappings, offset-to-top is 0 (the block starts
//! with the object's primary vtable), the name is a mangled type that demangles —
//! and any doubt gives no name.

use crate::proc::{maps::Mapping, mem::MemorySource};

/// Longest mangled type name read.
const MAX_NAME: usize = 512;

fn word(memory: &dyn MemorySource, addr: u64) -> Option<u64> {
    let mut buf = [0u8; 8];
    (memory.read(addr, &mut buf) == 8).then(|| u64::from_ne_bytes(buf))
}

/// Is `addr` inside a readable mapping of a file (a program or library)?
fn in_file(maps: &[Mapping], addr: u64) -> bool {
    maps.iter()
        .any(|m| m.start <= addr && addr < m.end && m.read && m.file().is_some())
}

/// The class of the C++ object at `addr`, from its vtable's typeinfo.
pub fn class_name(memory: &dyn MemorySource, maps: &[Mapping], addr: u64) -> Option<String> {
    let vptr = word(memory, addr)?;
    if !vptr.is_multiple_of(8) || !in_file(maps, vptr) {
        return None;
    }
    let offset_to_top = word(memory, vptr.checked_sub(16)?)?;
    let typeinfo = word(memory, vptr - 8)?;
    if offset_to_top != 0 || !typeinfo.is_multiple_of(8) || !in_file(maps, typeinfo) {
        return None;
    }
    let name_at = word(memory, typeinfo + 8)?;
    if !in_file(maps, name_at) {
        return None;
    }
    let mut buf = [0u8; MAX_NAME];
    let n = memory.read(name_at, &mut buf);
    let name = &buf[..n];
    let name = &name[..name.iter().position(|&b| b == 0)?];
    demangle_type(std::str::from_utf8(name).ok()?)
}

/// `4Node` → `Node`, `N3app7SessionE` → `app::Session`. GCC marks types local to
/// a translation unit with a leading `*`.
pub fn demangle_type(mangled: &str) -> Option<String> {
    let mangled = mangled.strip_prefix('*').unwrap_or(mangled);
    if mangled.is_empty()
        || !mangled
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return None;
    }
    let symbol = cpp_demangle::Symbol::new(format!("_ZTS{mangled}").into_bytes()).ok()?;
    let text = symbol.demangle().ok()?;
    text.strip_prefix("typeinfo name for ").map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::{maps::parse, mem::FakeMemory};

    const DATA: u64 = 0x5555_5555_0000; // the program's .data.rel.ro
    const HEAP: u64 = 0x5555_6000_0000;

    fn maps() -> Vec<Mapping> {
        parse(&format!(
            "{DATA:x}-{:x} r--p 00003000 08:01 42 /usr/bin/server\n\
             {HEAP:x}-{:x} rw-p 00000000 00:00 0 [heap]\n",
            DATA + 0x1000,
            HEAP + 0x1000
        ))
        .unwrap()
    }

    /// An object at HEAP whose vtable (at DATA + 0x100) names `mangled`.
    fn object(mangled: &str, offset_to_top: u64) -> FakeMemory {
        let mut m = FakeMemory::new();
        m.map(DATA, 0x1000);
        m.map(HEAP, 0x1000);
        let (vtable, typeinfo, name) = (DATA + 0x100, DATA + 0x200, DATA + 0x300);
        m.write_u64(vtable, offset_to_top);
        m.write_u64(vtable + 8, typeinfo);
        m.write_u64(typeinfo + 8, name);
        for (i, chunk) in mangled.as_bytes().chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            m.write_u64(name + i as u64 * 8, u64::from_ne_bytes(word));
        }
        m.write_u64(HEAP, vtable + 16);
        m
    }

    #[test]
    fn the_vtable_names_the_class() {
        let memory = object("N3app7SessionE", 0);
        assert_eq!(
            class_name(&memory, &maps(), HEAP).as_deref(),
            Some("app::Session")
        );
        let memory = object("*N12_GLOBAL__N_14NodeE", 0);
        assert_eq!(
            class_name(&memory, &maps(), HEAP).as_deref(),
            Some("(anonymous namespace)::Node")
        );
    }

    #[test]
    fn anything_doubtful_gives_no_name() {
        // A secondary vtable (the block does not start with the object).
        assert_eq!(class_name(&object("4Node", 16), &maps(), HEAP), None);
        // Not a mangled name.
        assert_eq!(class_name(&object("hello world", 0), &maps(), HEAP), None);
        // A first word that points into the heap, not into a file.
        let mut memory = object("4Node", 0);
        memory.write_u64(HEAP, HEAP + 0x100);
        assert_eq!(class_name(&memory, &maps(), HEAP), None);
        // Plain data.
        memory.write_u64(HEAP, 0x4141_4141_4141_4141);
        assert_eq!(class_name(&memory, &maps(), HEAP), None);
    }
}
