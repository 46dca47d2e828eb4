//! Stack frames to function, file:line, module and offset, with blazesym.
//!
//! Frames are symbolized by (module file, file offset), from the module ranges we
//! remember each time we read a target's maps. So a process that has exited by
//! report time is still symbolized, and so is one in another mount namespace or one
//! whose files were deleted or replaced on disk since it mapped them: its modules
//! are opened through `/proc/PID/map_files/` while it lives, and read through the
//! open descriptor later (a file found replaced on disk, with map_files
//! unreadable, is not read: its symbols would be another file's). Each address is
//! symbolized once and cached. Kernel frames go through kallsyms. A stripped module
//! is symbolized from its separate debug file (`debug_file.rs`); a frame left
//! without a name says why (`NoSymbols`).

mod debug_file;
mod debuginfod;

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blaze,
    source::{Elf, Kernel, Source},
};
use serde::Serialize;

use crate::proc::{self, maps::Mapping};

pub use debug_file::DEFAULT_DEBUG_ROOT;
use debug_file::{DebugRefs, Found};
use debuginfod::Debuginfod;

/// Why a frame has no function name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoSymbols {
    /// The address is in no file-backed code mapping we saw.
    Unmapped,
    /// The module's file could not be opened (deleted, and
    /// `/proc/PID/map_files/` unreadable or the process gone).
    Unreadable,
    /// The file at the module's path is another one now (replaced on disk) and
    /// `/proc/PID/map_files/` was unreadable.
    Replaced,
    /// The module is stripped and no separate debug info was found.
    NoDebugInfo,
    /// A separate debug file was found but its CRC or build id did not match.
    DebugInfoMismatch,
    /// No local debug file, and the `DEBUGINFOD_URLS` servers failed or lacked it.
    DebuginfodFailed,
    /// The module has symbols, but none covers the address.
    NoSymbol,
    /// The module could not be parsed.
    Error,
}

impl NoSymbols {
    pub const ALL: [Self; 8] = [
        Self::Unmapped,
        Self::Unreadable,
        Self::Replaced,
        Self::NoDebugInfo,
        Self::DebugInfoMismatch,
        Self::DebuginfodFailed,
        Self::NoSymbol,
        Self::Error,
    ];

    /// The name used in NDJSON and in the text report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unmapped => "unmapped",
            Self::Unreadable => "unreadable",
            Self::Replaced => "replaced",
            Self::NoDebugInfo => "no_debug_info",
            Self::DebugInfoMismatch => "debug_info_mismatch",
            Self::DebuginfodFailed => "debuginfod_failed",
            Self::NoSymbol => "no_symbol",
            Self::Error => "error",
        }
    }
}

/// One frame of a reported stack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Frame {
    #[serde(serialize_with = "crate::report::json::hex")]
    pub address: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::report::json::hex_opt"
    )]
    pub offset: Option<u64>,
    /// This frame is a function inlined into the next one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// Why `function` is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<NoSymbols>,
}

impl Frame {
    /// `function (file:line)` or the best we know.
    pub fn label(&self) -> String {
        match (&self.function, &self.module, self.offset) {
            (Some(f), _, _) => f.clone(),
            (None, Some(m), Some(o)) => format!("{}+{o:#x}", short_module(m)),
            _ => format!("{:#x}", self.address),
        }
    }

    pub fn location(&self) -> Option<String> {
        let file = self.file.as_ref()?;
        let name = Path::new(file)
            .file_name()
            .map_or(file.as_str(), |n| n.to_str().unwrap_or(file));
        Some(match self.line {
            Some(line) => format!("{name}:{line}"),
            None => name.to_owned(),
        })
    }
}

pub fn short_module(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

struct Module {
    display: String,
    /// The path blazesym opens; `None`: the file could not be opened.
    open_path: Option<PathBuf>,
    _file: Option<File>,
    /// Where its symbols come from, decided at its first frame.
    symbols: Option<ModuleSymbols>,
    /// Its GNU build ID, lowercase hex (empty when it has none): pprof mappings.
    build_id: String,
}

/// Where a module's symbols come from.
#[derive(Clone, Debug, Default)]
struct ModuleSymbols {
    refs: Option<DebugRefs>,
    /// Its separate debug file, when it has no DWARF of its own.
    separate: Option<PathBuf>,
    /// Why its frames may have no names (stripped, nothing found).
    missing: Option<NoSymbols>,
}

impl Module {
    /// Opens the very file `pid` maps, and keeps it open: the path may be deleted
    /// or replaced on disk (a package upgrade) or live in another mount namespace,
    /// and the process may be gone by report time. Blazesym reads it through
    /// `/proc/self/fd/N`. Out of descriptors, a local path is the fallback; with
    /// neither, the module is kept as unreadable so its frames say so.
    fn open(pid: u32, m: &Mapping, display: String, local: bool) -> Self {
        let opened = proc::mapped_file(pid, m).and_then(|p| File::open(p).ok());
        // Through a path (map_files unreadable), the file there now may be
        // another one: an upgrade renamed a new file over the mapped one.
        let opened = opened.filter(|f| is_mapped_file(f, m));
        let replaced = || {
            m.file()
                .and_then(|p| File::open(proc::path_in_root(pid, p)).ok())
                .is_some_and(|f| !is_mapped_file(&f, m))
        };
        let (open_path, file, why) = match opened {
            Some(f) => (
                Some(PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))),
                Some(f),
                None,
            ),
            None if replaced() => (None, None, Some(NoSymbols::Replaced)),
            None if local && m.file().is_some_and(Path::exists) => {
                (m.file().map(Path::to_owned), None, None)
            }
            None => (None, None, Some(NoSymbols::Unreadable)),
        };
        let build_id = open_path.as_deref().and_then(build_id).unwrap_or_default();
        Self {
            display,
            open_path,
            _file: file,
            symbols: why.map(|why| ModuleSymbols {
                missing: Some(why),
                ..ModuleSymbols::default()
            }),
            build_id,
        }
    }

    /// Reads the module's build id and debug link and finds its debug file.
    fn find_symbols(
        &self,
        debug_roots: &[PathBuf],
        debuginfod: &mut Option<Debuginfod>,
    ) -> ModuleSymbols {
        let Some(path) = &self.open_path else {
            return ModuleSymbols::default();
        };
        let Some(refs) = std::fs::read(path)
            .ok()
            .and_then(|data| DebugRefs::parse(&data).ok())
        else {
            return ModuleSymbols {
                missing: Some(NoSymbols::Error),
                ..ModuleSymbols::default()
            };
        };
        let mut symbols = ModuleSymbols::default();
        if !refs.has_dwarf {
            match debug_file::find(debug_roots, Path::new(&self.display), &refs) {
                Found::File(f) => {
                    log::debug!("debug info of {} in {}", self.display, f.display());
                    symbols.separate = Some(f);
                }
                Found::Nothing { rejected } => {
                    let fetched = match (debuginfod.as_mut(), &refs.build_id) {
                        (Some(d), Some(id)) => Some(d.fetch(id)),
                        _ => None,
                    };
                    match fetched {
                        Some(Ok(f)) => symbols.separate = Some(f),
                        _ if !refs.is_stripped() => {}
                        Some(Err(())) => symbols.missing = Some(NoSymbols::DebuginfodFailed),
                        None if rejected > 0 => {
                            symbols.missing = Some(NoSymbols::DebugInfoMismatch)
                        }
                        None => symbols.missing = Some(NoSymbols::NoDebugInfo),
                    }
                }
            }
        }
        symbols.refs = Some(refs);
        symbols
    }
}

/// Is `f` the file `m` maps? Inodes only: overlayfs reports another device in
/// maps than `stat` does.
fn is_mapped_file(f: &File, m: &Mapping) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    m.inode == 0 || f.metadata().is_ok_and(|md| md.ino() == m.inode)
}

/// Which file a module is: by device and inode (two processes may map different
/// files under one path, before and after an upgrade), or by path for the rare
/// mapping without an inode.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ModuleKey {
    Inode(u64, u64),
    Path(u32, String),
}

impl ModuleKey {
    fn of(pid: u32, m: &Mapping, display: &str) -> Self {
        if m.inode != 0 {
            Self::Inode(m.dev, m.inode)
        } else {
            Self::Path(pid, display.to_owned())
        }
    }
}

/// The GNU build ID of an ELF file, in lowercase hex.
fn build_id(path: &Path) -> Option<String> {
    use object::Object as _;
    let data = std::fs::read(path).ok()?;
    let id = object::File::parse(&*data).ok()?.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Clone, Copy)]
struct ModuleRange {
    start: u64,
    end: u64,
    offset: u64,
    module: usize,
}

/// Symbolizes user and kernel frames, caching every answer.
pub struct Symbolizer {
    blaze: Blaze,
    /// Where separate debug files are looked for (gdb's `debug-file-directory`).
    debug_roots: Vec<PathBuf>,
    /// `DEBUGINFOD_URLS`, when set.
    debuginfod: Option<Debuginfod>,
    modules: Vec<Module>,
    module_index: HashMap<ModuleKey, usize>,
    ranges: HashMap<u32, Vec<ModuleRange>>,
    user_cache: HashMap<(u32, u64), Vec<Frame>>,
    kernel_cache: HashMap<u64, Vec<Frame>>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

fn same_mount_namespace(pid: u32) -> bool {
    let ns = |p: &str| std::fs::read_link(p).ok();
    ns(&format!("/proc/{pid}/ns/mnt")).is_some_and(|theirs| ns("/proc/self/ns/mnt") == Some(theirs))
}

impl Symbolizer {
    pub fn new() -> Self {
        Self::with_debug_roots(vec![PathBuf::from(DEFAULT_DEBUG_ROOT)])
    }

    /// Looks for separate debug files under `debug_roots` (build-id paths and
    /// debug links) as well as next to each module, then asks the servers of
    /// `DEBUGINFOD_URLS` if the user set it.
    pub fn with_debug_roots(debug_roots: Vec<PathBuf>) -> Self {
        Self {
            blaze: Blaze::builder()
                .set_debug_dirs(Some(debug_roots.clone()))
                .build(),
            debug_roots,
            debuginfod: Debuginfod::from_env(),
            modules: Vec::new(),
            module_index: HashMap::new(),
            ranges: HashMap::new(),
            user_cache: HashMap::new(),
            kernel_cache: HashMap::new(),
        }
    }

    /// Remembers where `pid`'s modules are mapped (call while it is alive).
    pub fn remember(&mut self, pid: u32, maps: &[Mapping]) {
        let mut local = None;
        let mut ranges = Vec::new();
        for m in maps.iter().filter(|m| m.exec) {
            let Some(path) = m.file() else { continue };
            let display = path.display().to_string();
            let key = ModuleKey::of(pid, m, &display);
            let module = match self.module_index.get(&key) {
                Some(&i) => i,
                None => {
                    let local = *local.get_or_insert_with(|| same_mount_namespace(pid));
                    self.modules.push(Module::open(pid, m, display, local));
                    self.module_index.insert(key, self.modules.len() - 1);
                    self.modules.len() - 1
                }
            };
            ranges.push(ModuleRange {
                start: m.start,
                end: m.end,
                offset: m.offset,
                module,
            });
        }
        if !ranges.is_empty() {
            self.ranges.insert(pid, ranges);
        }
    }

    /// The build IDs of the modules known, by the name frames carry.
    pub fn build_ids(&self) -> HashMap<String, String> {
        self.modules
            .iter()
            .filter(|m| !m.build_id.is_empty())
            .map(|m| (m.display.clone(), m.build_id.clone()))
            .collect()
    }

    /// Is `addr` inside code `pid` had mapped (as far as we know)? Frame-pointer
    /// walks through code built without frame pointers yield garbage.
    pub fn is_code(&self, pid: u32, addr: u64) -> bool {
        let call = addr.saturating_sub(1);
        self.ranges
            .get(&pid)
            .is_some_and(|r| r.iter().any(|r| r.start <= call && call < r.end))
    }

    /// Frames for the return addresses of one user stack of `pid`. Each is looked
    /// up one byte back, inside its call instruction, so the line is the call's.
    pub fn user_frames(&mut self, pid: u32, addrs: &[u64]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &addr in addrs {
            if let Some(frames) = self.user_cache.get(&(pid, addr)) {
                out.extend(frames.iter().cloned());
                continue;
            }
            let frames = self.symbolize_user(pid, addr);
            out.extend(frames.iter().cloned());
            self.user_cache.insert((pid, addr), frames);
        }
        out
    }

    fn symbolize_user(&mut self, pid: u32, addr: u64) -> Vec<Frame> {
        let call = addr.saturating_sub(1);
        let range = self
            .ranges
            .get(&pid)
            .and_then(|r| r.iter().find(|r| r.start <= call && call < r.end).copied());
        let Some(range) = range else {
            return vec![Frame {
                address: addr,
                reason: Some(NoSymbols::Unmapped),
                ..Frame::default()
            }];
        };
        let file_offset = call - range.start + range.offset;
        let module = &mut self.modules[range.module];
        if module.open_path.is_some() && module.symbols.is_none() {
            module.symbols = Some(module.find_symbols(&self.debug_roots, &mut self.debuginfod));
        }
        let module = &self.modules[range.module];
        let at = Some((module.display.as_str(), file_offset));
        let Some(open_path) = module.open_path.clone() else {
            let why = module.symbols.as_ref().and_then(|s| s.missing);
            return frames_of(addr, Err(why.unwrap_or(NoSymbols::Unreadable)), at);
        };
        let symbols = module.symbols.as_ref().expect("just decided");
        let in_separate = symbols.separate.as_ref().and_then(|debug| {
            let vaddr = symbols.refs.as_ref()?.vaddr_of(file_offset)?;
            let source = Source::Elf(Elf::new(debug));
            match self
                .blaze
                .symbolize_single(&source, Input::VirtOffset(vaddr))
            {
                Ok(s @ Symbolized::Sym(_)) => Some(s),
                _ => None,
            }
        });
        let result = match in_separate {
            Some(s) => Ok(s),
            None => {
                // Without a debug file of the right CRC, blazesym must not chase
                // the debug link itself: a mismatch fails the whole lookup.
                let own_dwarf = symbols
                    .refs
                    .as_ref()
                    .is_none_or(|r| r.has_dwarf || r.debuglink.is_none());
                let source = Source::Elf(Elf {
                    debug_syms: own_dwarf,
                    ..Elf::new(&open_path)
                });
                match self
                    .blaze
                    .symbolize_single(&source, Input::FileOffset(file_offset))
                {
                    Ok(s @ Symbolized::Sym(_)) => Ok(s),
                    Ok(Symbolized::Unknown(_)) => {
                        Err(symbols.missing.unwrap_or(NoSymbols::NoSymbol))
                    }
                    Err(e) => {
                        log::debug!("symbolizing {}: {e}", module.display);
                        Err(NoSymbols::Error)
                    }
                }
            }
        };
        frames_of(addr, result, at)
    }

    /// Frames for kernel addresses (kallsyms).
    pub fn kernel_frames(&mut self, addrs: &[u64]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &addr in addrs {
            if !self.kernel_cache.contains_key(&addr) {
                let source = Source::Kernel(Kernel::default());
                let symbolized = match self.blaze.symbolize_single(&source, Input::AbsAddr(addr)) {
                    Ok(s @ Symbolized::Sym(_)) => Ok(s),
                    Ok(Symbolized::Unknown(_)) => Err(NoSymbols::NoSymbol),
                    Err(_) => Err(NoSymbols::Error),
                };
                let frames = frames_of(addr, symbolized, None);
                self.kernel_cache.insert(addr, frames);
            }
            out.extend(self.kernel_cache[&addr].iter().cloned());
        }
        out
    }
}

fn frames_of(
    addr: u64,
    symbolized: Result<Symbolized<'_>, NoSymbols>,
    module: Option<(&str, u64)>,
) -> Vec<Frame> {
    let base = Frame {
        address: addr,
        module: module.map(|(m, _)| m.to_owned()),
        offset: module.map(|(_, o)| o),
        ..Frame::default()
    };
    let sym = match symbolized {
        Ok(Symbolized::Sym(sym)) => sym,
        Ok(Symbolized::Unknown(_)) => {
            return vec![Frame {
                reason: Some(NoSymbols::NoSymbol),
                ..base
            }];
        }
        Err(reason) => {
            return vec![Frame {
                reason: Some(reason),
                ..base
            }];
        }
    };
    let location = |ci: Option<&blazesym::symbolize::CodeInfo<'_>>| {
        ci.map(|c| (Some(c.to_path().display().to_string()), c.line))
            .unwrap_or((None, None))
    };
    // Innermost first: the inlined chain, deepest last in blazesym's order. Each
    // frame's location is where in *that* function the address is (for the outer
    // ones, the line of the call that was inlined).
    let mut frames: Vec<Frame> = sym
        .inlined
        .iter()
        .rev()
        .map(|inlined| {
            let (file, line) = location(inlined.code_info.as_ref());
            Frame {
                function: Some(inlined.name.to_string()),
                file,
                line,
                inlined: true,
                ..base.clone()
            }
        })
        .collect();
    let (file, line) = location(sym.code_info.as_deref());
    frames.push(Frame {
        function: Some(sym.name.to_string()),
        file,
        line,
        ..base
    });
    frames
}
