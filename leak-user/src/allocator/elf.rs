//! The parts of an ELF file that decide where to hook: its allocator symbols, its
//! code bytes, how virtual addresses map to file offsets (uprobes attach by file
//! offset), and its dynamic dependencies.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use object::{
    Object as _, ObjectSymbol as _, SymbolKind,
    elf::{DT_NEEDED, DT_RPATH, DT_RUNPATH, PT_INTERP, PT_LOAD},
    read::elf::{Dyn as _, ElfFile64, ProgramHeader as _},
};

/// A defined function symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub vaddr: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug)]
struct Load {
    vaddr: u64,
    filesz: u64,
    offset: u64,
}

/// One parsed ELF object.
pub struct ElfFile {
    pub path: PathBuf,
    data: Vec<u8>,
    loads: Vec<Load>,
    /// Has a PT_INTERP: a dynamically linked executable.
    pub has_interp: bool,
    pub needed: Vec<String>,
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
    symbols: HashMap<String, Symbol>,
    /// (device, inode) of the file, to recognise it in /proc/PID/maps.
    pub file_id: Option<(u64, u64)>,
}

/// Why an ELF file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a 64-bit little-endian ELF file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::read::Error,
    },
}

impl ElfFile {
    /// Reads and parses `path`, keeping the symbols for which `wanted` is true.
    pub fn open(path: &Path, wanted: impl Fn(&str) -> bool) -> Result<Self, ElfError> {
        use std::os::unix::fs::MetadataExt as _;
        let read_err = |source| ElfError::Read {
            path: path.to_owned(),
            source,
        };
        let data = std::fs::read(path).map_err(read_err)?;
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mut elf = Self::parse(path, data, wanted)?;
        elf.file_id = Some((meta.dev(), meta.ino()));
        Ok(elf)
    }

    pub fn parse(
        path: &Path,
        data: Vec<u8>,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Self, ElfError> {
        let parse_err = |source| ElfError::Parse {
            path: path.to_owned(),
            source,
        };
        let (loads, has_interp, needed, rpath, runpath, symbols) = {
            let file = ElfFile64::<object::LittleEndian>::parse(&data[..]).map_err(parse_err)?;
            let endian = file.endian();
            let mut loads = Vec::new();
            let mut has_interp = false;
            for ph in file.elf_program_headers() {
                match ph.p_type(endian) {
                    PT_LOAD => loads.push(Load {
                        vaddr: ph.p_vaddr(endian),
                        filesz: ph.p_filesz(endian),
                        offset: ph.p_offset(endian),
                    }),
                    PT_INTERP => has_interp = true,
                    _ => {}
                }
            }
            let (mut needed, mut rpath, mut runpath) = (Vec::new(), Vec::new(), Vec::new());
            let sections = file.elf_section_table();
            if let Ok(Some((entries, strings_index))) = sections.dynamic(endian, &data[..])
                && let Ok(strings) = sections.strings(endian, &data[..], strings_index)
            {
                for entry in entries {
                    let tag = entry.d_tag(endian) as u32;
                    let Ok(value) = entry.string(endian, strings) else {
                        continue;
                    };
                    let value = String::from_utf8_lossy(value).into_owned();
                    match tag {
                        DT_NEEDED => needed.push(value),
                        DT_RPATH => rpath.extend(value.split(':').map(str::to_owned)),
                        DT_RUNPATH => runpath.extend(value.split(':').map(str::to_owned)),
                        _ => {}
                    }
                }
            }
            let mut symbols = HashMap::new();
            // Exported symbols first; the static symbol table fills in the rest
            // (statically linked executables have no dynamic symbols).
            for sym in file.dynamic_symbols().chain(file.symbols()) {
                if sym.is_undefined() || sym.kind() != SymbolKind::Text || sym.address() == 0 {
                    continue;
                }
                let Ok(name) = sym.name() else { continue };
                if wanted(name) && !symbols.contains_key(name) {
                    symbols.insert(
                        name.to_owned(),
                        Symbol {
                            vaddr: sym.address(),
                            size: sym.size(),
                        },
                    );
                }
            }
            (loads, has_interp, needed, rpath, runpath, symbols)
        };
        Ok(Self {
            path: path.to_owned(),
            data,
            loads,
            has_interp,
            needed,
            rpath,
            runpath,
            symbols,
            file_id: None,
        })
    }

    pub fn symbol(&self, name: &str) -> Option<Symbol> {
        self.symbols.get(name).copied()
    }

    pub fn symbols(&self) -> impl Iterator<Item = (&str, Symbol)> {
        self.symbols.iter().map(|(n, s)| (n.as_str(), *s))
    }

    /// The load segment that holds `vaddr` in the file, and how far into it.
    /// Checked arithmetic: a corrupted header may put a segment anywhere.
    fn locate(&self, vaddr: u64) -> Option<(&Load, u64)> {
        self.loads.iter().find_map(|l| {
            let into = vaddr.checked_sub(l.vaddr)?;
            (into < l.filesz).then_some((l, into))
        })
    }

    /// The file offset of a virtual address (what uprobes attach to).
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        let (load, into) = self.locate(vaddr)?;
        load.offset.checked_add(into)
    }

    /// Up to `len` code bytes starting at `vaddr`.
    pub fn code(&self, vaddr: u64, len: usize) -> Option<&[u8]> {
        let (load, into) = self.locate(vaddr)?;
        let take = (load.filesz - into).min(len as u64);
        let start = load.offset.checked_add(into)?;
        let end = start.checked_add(take)?;
        self.data
            .get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libc_allocator_symbols() {
        // The machine's own libc is a fine fixture: every Linux test host has one.
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        if !libc.exists() {
            panic!("this test needs glibc at {}", libc.display());
        }
        let elf = ElfFile::open(libc, |n| {
            matches!(n, "malloc" | "free" | "memalign" | "aligned_alloc")
        })
        .unwrap();
        let malloc = elf.symbol("malloc").expect("libc defines malloc");
        assert!(elf.symbol("free").is_some());
        assert_eq!(
            elf.symbol("memalign").unwrap().vaddr,
            elf.symbol("aligned_alloc").unwrap().vaddr
        );
        assert!(elf.file_offset(malloc.vaddr).is_some());
        assert!(elf.code(malloc.vaddr, 16).is_some_and(|c| c.len() == 16));
        assert!(elf.needed.iter().any(|n| n.starts_with("ld-linux")));
    }

    /// libc with its first PT_LOAD header's field at `field` (bytes into the
    /// header) set to `value`.
    fn libc_with_load_field(field: usize, value: u64) -> (ElfFile, Symbol) {
        let mut data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6")
            .expect("this test needs glibc at /lib/x86_64-linux-gnu/libc.so.6");
        let u64_at = |d: &[u8], at: usize| u64::from_le_bytes(d[at..at + 8].try_into().unwrap());
        let u16_at = |d: &[u8], at: usize| u16::from_le_bytes([d[at], d[at + 1]]) as usize;
        let (phoff, phentsize, phnum) = (
            u64_at(&data, 0x20) as usize,
            u16_at(&data, 0x36),
            u16_at(&data, 0x38),
        );
        let first_load = (0..phnum)
            .map(|i| phoff + i * phentsize)
            .find(|&h| data[h..h + 4] == PT_LOAD.to_le_bytes())
            .expect("libc has a PT_LOAD");
        data[first_load + field..first_load + field + 8].copy_from_slice(&value.to_le_bytes());
        let elf = ElfFile::parse(Path::new("libc.so.6"), data, |n| n == "malloc").unwrap();
        let malloc = elf.symbol("malloc").unwrap();
        (elf, malloc)
    }

    #[test]
    fn corrupted_load_headers_give_no_offsets_and_no_panic() {
        // Found by the `elf` fuzz target: `vaddr + filesz` of a corrupted PT_LOAD
        // overflowed in file_offset() and code().
        const P_OFFSET: usize = 0x08;
        const P_VADDR: usize = 0x10;
        const P_FILESZ: usize = 0x20;
        let (elf, malloc) = libc_with_load_field(P_FILESZ, u64::MAX);
        // glibc's first segment starts at vaddr 0, file offset 0: a huge one
        // still maps addresses one to one, and code stops at the end of the file.
        assert_eq!(elf.file_offset(malloc.vaddr), Some(malloc.vaddr));
        assert_eq!(elf.code(malloc.vaddr, 16).map(<[u8]>::len), Some(16));
        assert_eq!(elf.code(u64::MAX - 1, 16), None);
        // A segment at the very top of the address space ends past u64::MAX.
        let (elf, _) = libc_with_load_field(P_VADDR, u64::MAX - 4);
        assert_eq!(elf.file_offset(u64::MAX - 1), Some(3));
        assert_eq!(elf.code(u64::MAX - 1, 96).map(<[u8]>::len), Some(96));
        let (elf, _) = libc_with_load_field(P_OFFSET, u64::MAX);
        assert_eq!(elf.file_offset(0x10), None);
        assert_eq!(elf.code(0x10, 16), None);
    }
}
