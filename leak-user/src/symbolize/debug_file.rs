//! Where a stripped module's debug info lives, found the way gdb finds it.
//!
//! Distributions ship binaries stripped and their DWARF apart: Debian's `-dbgsym`
//! packages under `/usr/lib/debug/.build-id/xx/rest.debug`, others next to the
//! binary through `.gnu_debuglink`. blazesym 0.2.7 follows a debug link but not a
//! build id alone, nor gdb's `.debug/` subdirectory, and fails the whole lookup on
//! a CRC mismatch; so we find the file ourselves, in gdb's order, and check it: a
//! build-id candidate must carry the same build id, a debug-link one the CRC32 the
//! link records. A wrong debug file would put wrong names on frames.

use std::{
    fs,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSection as _, read::elf::ProgramHeader as _};

/// gdb's default `debug-file-directory`.
pub const DEFAULT_DEBUG_ROOT: &str = "/usr/lib/debug";

/// What a module says about its debug info, and how it is laid out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebugRefs {
    pub build_id: Option<Vec<u8>>,
    /// `.gnu_debuglink`: the debug file's name and the CRC32 of its contents.
    pub debuglink: Option<(String, u32)>,
    /// It carries its own DWARF (`.debug_info`).
    pub has_dwarf: bool,
    /// It has a full symbol table (`.symtab`), not only the dynamic one.
    pub has_symtab: bool,
    /// PT_LOAD segments as (file offset, virtual address, file size).
    loads: Vec<(u64, u64, u64)>,
}

impl DebugRefs {
    /// Reads them from an ELF file's bytes.
    pub fn parse(data: &[u8]) -> Result<Self, object::Error> {
        let file = object::read::elf::ElfFile64::<object::Endianness>::parse(data)?;
        let endian = file.endian();
        let loads = file
            .elf_program_headers()
            .iter()
            .filter(|p| p.p_type(endian) == object::elf::PT_LOAD)
            .map(|p| (p.p_offset(endian), p.p_vaddr(endian), p.p_filesz(endian)))
            .collect();
        let debuglink = file
            .gnu_debuglink()?
            .map(|(name, crc)| (String::from_utf8_lossy(name).into_owned(), crc));
        Ok(Self {
            build_id: file.build_id()?.map(<[u8]>::to_vec),
            debuglink,
            has_dwarf: file
                .section_by_name(".debug_info")
                .is_some_and(|s| s.size() > 0),
            has_symtab: file.section_by_name(".symtab").is_some(),
            loads,
        })
    }

    /// The virtual address (as in the file and its debug file) at `offset`.
    pub fn vaddr_of(&self, offset: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|&&(off, _, size)| off <= offset && offset < off + size)
            .map(|&(off, vaddr, _)| vaddr + (offset - off))
    }

    /// Stripped: neither symbols nor DWARF of its own.
    pub fn is_stripped(&self) -> bool {
        !self.has_dwarf && !self.has_symtab
    }
}

/// How a candidate proves it belongs to the module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    BuildId(Vec<u8>),
    Crc(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub check: Check,
}

/// Lower-case hex of a build id.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ROOT/.build-id/xx/rest.debug`.
pub fn build_id_path(root: &Path, id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    Some(
        root.join(".build-id")
            .join(format!("{first:02x}"))
            .join(format!("{}.debug", hex(rest))),
    )
}

/// Where to look, in gdb's order: the build-id path under each root, then for a
/// debug link the module's directory, its `.debug/` subdirectory, and the
/// module's directory under each root. `module` is the path the target mapped.
pub fn candidates(roots: &[PathBuf], module: &Path, refs: &DebugRefs) -> Vec<Candidate> {
    let mut out = Vec::new();
    if let Some(id) = &refs.build_id {
        out.extend(roots.iter().filter_map(|root| {
            Some(Candidate {
                path: build_id_path(root, id)?,
                check: Check::BuildId(id.clone()),
            })
        }));
    }
    if let Some((name, crc)) = &refs.debuglink {
        // A name with a directory in it is not a debug link gdb would follow.
        if name.is_empty() || name.contains('/') {
            return out;
        }
        let dir = module.parent().unwrap_or(Path::new("/"));
        let relative = dir.strip_prefix("/").unwrap_or(dir);
        let mut dirs = vec![dir.to_path_buf(), dir.join(".debug")];
        dirs.extend(roots.iter().map(|root| root.join(relative)));
        out.extend(dirs.into_iter().map(|d| Candidate {
            path: d.join(name),
            check: Check::Crc(*crc),
        }));
    }
    out.retain(|c| c.path != module);
    out
}

/// Does `data` (a candidate's contents) pass `check`?
pub fn passes(check: &Check, data: &[u8]) -> bool {
    match check {
        Check::Crc(crc) => crc32fast::hash(data) == *crc,
        Check::BuildId(id) => DebugRefs::parse(data)
            .ok()
            .and_then(|r| r.build_id)
            .is_some_and(|b| b == *id),
    }
}

/// What the search found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    File(PathBuf),
    /// Nothing there; `rejected` counts files that were there but failed their check.
    Nothing {
        rejected: usize,
    },
}

/// The first candidate that exists and passes its check.
pub fn find(roots: &[PathBuf], module: &Path, refs: &DebugRefs) -> Found {
    let mut rejected = 0;
    for c in candidates(roots, module, refs) {
        let Ok(data) = fs::read(&c.path) else {
            continue;
        };
        if passes(&c.check, &data) {
            return Found::File(c.path);
        }
        log::debug!(
            "{} is not {}'s debug file",
            c.path.display(),
            module.display()
        );
        rejected += 1;
    }
    Found::Nothing { rejected }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(build_id: Option<&[u8]>, link: Option<(&str, u32)>) -> DebugRefs {
        DebugRefs {
            build_id: build_id.map(<[u8]>::to_vec),
            debuglink: link.map(|(n, c)| (n.to_owned(), c)),
            ..DebugRefs::default()
        }
    }

    #[test]
    fn build_id_paths_split_the_first_byte() {
        let p = build_id_path(Path::new("/usr/lib/debug"), &[0xab, 0xcd, 0xef]).unwrap();
        assert_eq!(p, Path::new("/usr/lib/debug/.build-id/ab/cdef.debug"));
        assert_eq!(build_id_path(Path::new("/r"), &[0xab]), None);
    }

    #[test]
    fn candidates_follow_gdbs_order() {
        let roots = [PathBuf::from("/usr/lib/debug"), PathBuf::from("/tmp/dbg")];
        let got: Vec<PathBuf> = candidates(
            &roots,
            Path::new("/opt/app/bin/app"),
            &refs(Some(&[1, 2, 3]), Some(("app.debug", 7))),
        )
        .into_iter()
        .map(|c| c.path)
        .collect();
        let want = [
            "/usr/lib/debug/.build-id/01/0203.debug",
            "/tmp/dbg/.build-id/01/0203.debug",
            "/opt/app/bin/app.debug",
            "/opt/app/bin/.debug/app.debug",
            "/usr/lib/debug/opt/app/bin/app.debug",
            "/tmp/dbg/opt/app/bin/app.debug",
        ];
        assert_eq!(got, want.map(PathBuf::from));
    }

    #[test]
    fn a_link_to_itself_or_with_a_directory_is_not_followed() {
        let roots = [PathBuf::from("/r")];
        let c = candidates(&roots, Path::new("/d/app"), &refs(None, Some(("app", 1))));
        assert!(c.iter().all(|c| c.path != Path::new("/d/app")), "{c:?}");
        assert_eq!(c.len(), 2);
        assert!(candidates(&roots, Path::new("/d/app"), &refs(None, Some(("../x", 1)))).is_empty());
    }

    #[test]
    fn checks_compare_crc_and_build_id() {
        let data = b"some debug file";
        assert!(passes(&Check::Crc(crc32fast::hash(data)), data));
        assert!(!passes(&Check::Crc(crc32fast::hash(data) ^ 1), data));
        // Not an ELF file: no build id to match.
        assert!(!passes(&Check::BuildId(vec![1, 2, 3, 4]), data));
    }

    #[test]
    fn reads_our_own_executable() {
        let data = fs::read("/proc/self/exe").unwrap();
        let r = DebugRefs::parse(&data).unwrap();
        assert!(!r.loads.is_empty());
        let (off, vaddr, _) = r.loads[0];
        assert_eq!(r.vaddr_of(off), Some(vaddr));
        assert!(passes(&Check::Crc(crc32fast::hash(&data)), &data));
        if let Some(id) = &r.build_id {
            assert!(passes(&Check::BuildId(id.clone()), &data));
        }
    }

    #[test]
    fn finds_a_file_that_passes_and_skips_one_that_does_not() {
        let dir = std::env::temp_dir().join(format!("leaktrace-debugfile-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join(".debug")).unwrap();
        let module = dir.join("app");
        let good = b"the right contents";
        fs::write(dir.join("app.debug"), b"stale contents").unwrap();
        fs::write(dir.join(".debug/app.debug"), good).unwrap();
        let r = refs(None, Some(("app.debug", crc32fast::hash(good))));
        assert_eq!(
            find(&[], &module, &r),
            Found::File(dir.join(".debug/app.debug"))
        );
        fs::remove_file(dir.join(".debug/app.debug")).unwrap();
        assert_eq!(find(&[], &module, &r), Found::Nothing { rejected: 1 });
        fs::remove_dir_all(&dir).unwrap();
    }
}
