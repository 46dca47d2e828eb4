//! Finding the allocator: for each ELF object a target maps (or will map), which of
//! the malloc family and of C++'s operator new/delete it defines, and how to hook
//! each one.
//!
//! * glibc's libc.so.6, a statically linked executable, or a preloaded allocator
//!   (jemalloc, tcmalloc, mimalloc) defines `malloc` and `free`: the whole family is
//!   hooked there. Several may be hooked at once; only the one the program calls fires.
//! * libstdc++ defines operator new, which calls malloc: it is not hooked (a return
//!   probe on it would break C++ exceptions), but its call sites get unwind hints
//!   ([`super::wrappers`]) so that malloc's report names the user's code. An
//!   allocator that defines its own operator new and delete (jemalloc, tcmalloc) gets
//!   them hooked, as they do not call malloc and free.
//! * Aliases (glibc's aligned_alloc and memalign, free and cfree) are one address:
//!   hooked once, or every call would count twice.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use leak_common::AllocFn;

use super::{
    elf::ElfFile,
    placement::{self, Site},
    resolve::{self, LoaderEnv},
    wrappers::{self, Hint, WRAPPERS},
};
use crate::proc::{self, maps::Mapping};

/// Every symbol leaktrace hooks, and as what.
const FAMILY: &[(&str, AllocFn)] = &[
    ("malloc", AllocFn::Malloc),
    ("calloc", AllocFn::Calloc),
    ("realloc", AllocFn::Realloc),
    ("reallocarray", AllocFn::Reallocarray),
    ("posix_memalign", AllocFn::PosixMemalign),
    ("aligned_alloc", AllocFn::AlignedAlloc),
    ("memalign", AllocFn::AlignedAlloc),
    ("valloc", AllocFn::Valloc),
    ("pvalloc", AllocFn::Pvalloc),
    ("free", AllocFn::Free),
    ("cfree", AllocFn::Free),
];

const OPERATOR_NEW: &[(&str, AllocFn)] = &[
    ("_Znwm", AllocFn::OperatorNew),
    ("_Znam", AllocFn::OperatorNew),
    ("_ZnwmRKSt9nothrow_t", AllocFn::OperatorNew),
    ("_ZnamRKSt9nothrow_t", AllocFn::OperatorNew),
    ("_ZnwmSt11align_val_t", AllocFn::OperatorNewAligned),
    ("_ZnamSt11align_val_t", AllocFn::OperatorNewAligned),
    (
        "_ZnwmSt11align_val_tRKSt9nothrow_t",
        AllocFn::OperatorNewAligned,
    ),
    (
        "_ZnamSt11align_val_tRKSt9nothrow_t",
        AllocFn::OperatorNewAligned,
    ),
];

const OPERATOR_DELETE: &[&str] = &[
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
    "_ZdlPvRKSt9nothrow_t",
    "_ZdaPvRKSt9nothrow_t",
    "_ZdlPvSt11align_val_t",
    "_ZdaPvSt11align_val_t",
    "_ZdlPvmSt11align_val_t",
    "_ZdaPvmSt11align_val_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t",
    "_ZdaPvSt11align_val_tRKSt9nothrow_t",
];

fn is_wanted(name: &str) -> bool {
    FAMILY.iter().any(|(n, _)| *n == name)
        || OPERATOR_NEW.iter().any(|(n, _)| *n == name)
        || OPERATOR_DELETE.contains(&name)
        || WRAPPERS.contains(&name)
}

/// One function to hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookedFunction {
    /// The symbol names at this address, e.g. `aligned_alloc/memalign`.
    pub names: String,
    pub func: AllocFn,
    /// File offset of the probe site (what the uprobe attaches to).
    pub file_offset: u64,
    /// Allocating functions also get a return probe, at the same (entry) site.
    pub return_probe: bool,
    pub site: Site,
}

/// One ELF object to hook, and its functions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookedObject {
    /// The path to attach through (through /proc/PID/root in pid mode).
    pub attach_path: PathBuf,
    /// The path as the target sees it.
    pub path: PathBuf,
    pub functions: Vec<HookedFunction>,
}

impl HookedObject {
    /// Does it provide malloc itself (as opposed to only operator new)?
    pub fn is_allocator(&self) -> bool {
        self.functions.iter().any(|f| f.func == AllocFn::Malloc)
    }
}

impl fmt::Display for HookedObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.path.display())?;
        for h in &self.functions {
            writeln!(
                f,
                "  {:<36} {}{}",
                h.names,
                h.site,
                if h.return_probe {
                    " + return probe"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

/// An object with allocation wrappers, and their call sites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrapperObject {
    pub path: PathBuf,
    /// (device, inode): how its mappings are recognised in /proc/PID/maps.
    pub file_id: (u64, u64),
    pub hints: Vec<Hint>,
}

impl WrapperObject {
    /// The hints as runtime addresses of `pid`, from its maps (empty while the
    /// object is not mapped yet).
    pub fn runtime_hints(&self, maps: &[Mapping]) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        for m in maps
            .iter()
            .filter(|m| m.exec && (m.dev, m.inode) == self.file_id)
        {
            for h in &self.hints {
                if m.offset <= h.ret_file_offset && h.ret_file_offset < m.offset + m.len() {
                    out.push((m.start + h.ret_file_offset - m.offset, h.offset));
                }
            }
        }
        out
    }
}

/// Everything to hook for one target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookPlan {
    pub objects: Vec<HookedObject>,
    pub wrappers: Vec<WrapperObject>,
}

impl HookPlan {
    pub fn is_empty(&self) -> bool {
        !self.objects.iter().any(HookedObject::is_allocator)
    }
}

/// What to hook in one parsed object, if anything.
pub fn hooks_for(elf: &ElfFile, attach_path: &Path, path: &Path) -> Option<HookedObject> {
    let defines = |name: &str| elf.symbol(name).is_some();
    let allocator = defines("malloc") && defines("free");
    let mut by_address: BTreeMap<u64, (Vec<&str>, AllocFn)> = BTreeMap::new();
    let mut add = |name: &'static str, func: AllocFn| {
        if let Some(sym) = elf.symbol(name) {
            by_address
                .entry(sym.vaddr)
                .or_insert_with(|| (Vec::new(), func))
                .0
                .push(name);
        }
    };
    if allocator {
        for &(name, func) in FAMILY.iter().chain(OPERATOR_NEW) {
            add(name, func);
        }
        for &name in OPERATOR_DELETE {
            add(name, AllocFn::Free);
        }
    }
    let functions: Vec<HookedFunction> = by_address
        .into_iter()
        .filter_map(|(vaddr, (names, func))| {
            let return_probe = func != AllocFn::Free;
            let code = elf.code(vaddr, 96)?;
            let site = placement::place(code, vaddr, return_probe);
            Some(HookedFunction {
                names: names.join("/"),
                func,
                file_offset: elf.file_offset(vaddr + site.offset)?,
                return_probe,
                site,
            })
        })
        .collect();
    (!functions.is_empty()).then(|| HookedObject {
        attach_path: attach_path.to_owned(),
        path: path.to_owned(),
        functions,
    })
}

fn add_object(plan: &mut HookPlan, elf: &ElfFile, attach_path: &Path, path: &Path) {
    plan.objects.extend(hooks_for(elf, attach_path, path));
    let hints = wrappers::hints_for(elf);
    if let Some(file_id) = elf.file_id
        && !hints.is_empty()
    {
        plan.wrappers.push(WrapperObject {
            path: path.to_owned(),
            file_id,
            hints,
        });
    }
}

/// The objects a running process has mapped that provide allocator functions.
pub fn for_process(pid: u32, maps: &[Mapping]) -> HookPlan {
    let mut seen = Vec::new();
    let mut plan = HookPlan::default();
    for m in maps.iter().filter(|m| m.exec) {
        let Some(path) = m.file() else { continue };
        if seen.contains(&(m.dev, m.inode)) {
            continue;
        }
        seen.push((m.dev, m.inode));
        // Through map_files: a library deleted or replaced by an upgrade since the
        // process mapped it is still the file its code comes from (and uprobes
        // attach to that inode).
        let Some(attach) = proc::mapped_file(pid, m) else {
            continue;
        };
        let Ok(elf) = ElfFile::open(&attach, is_wanted) else {
            continue;
        };
        add_object(&mut plan, &elf, &attach, path);
    }
    plan
}

/// The objects a command will load that provide allocator functions, predicted
/// before its loader runs (launch mode).
pub fn for_command(exe: &Path, env: &LoaderEnv) -> HookPlan {
    let mut plan = HookPlan::default();
    for elf in resolve::load_order(exe, env, &is_wanted) {
        add_object(&mut plan, &elf, &elf.path, &elf.path);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_glibc_malloc_family_once_per_address() {
        let plan = for_command(Path::new("/bin/true"), &LoaderEnv::from_current());
        let libc = plan
            .objects
            .iter()
            .find(|o| o.is_allocator())
            .expect("/bin/true uses glibc's malloc");
        let names: Vec<&str> = libc.functions.iter().map(|f| f.names.as_str()).collect();
        assert!(names.contains(&"malloc"));
        assert!(names.contains(&"aligned_alloc/memalign"), "{names:?}");
        assert!(names.iter().any(|n| n.contains("free")));
        let free = libc
            .functions
            .iter()
            .find(|f| f.func == AllocFn::Free)
            .unwrap();
        assert!(!free.return_probe);
        for f in &libc.functions {
            assert_eq!(f.return_probe, f.func != AllocFn::Free);
        }
    }
}
