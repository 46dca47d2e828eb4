//! Stack frames to function, file:line, module and offset, with blazesym.
//!
//! Frames are symbolized by (module file, file offset), from the module ranges we
//! remember each time we read a target's maps. So a process that has exited by
//! report time is still symbolized, and so is one in another mount namespace or one
//! whose files were deleted or replaced on disk since it mapped them: its modules
//! are opened through `/proc/PID/map_files/` while it lives, and read through the
//! open descriptor later. Each address is symbolized once and cached. Kernel frames
//! go through kallsyms.

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
    /// The path blazesym opens.
    open_path: PathBuf,
    _file: Option<File>,
    /// Its GNU build ID, lowercase hex (empty when it has none).
    build_id: String,
}

impl Module {
    /// Opens the very file `pid` maps, and keeps it open: the path may be deleted
    /// or replaced on disk (a package upgrade) or live in another mount namespace,
    /// and the process may be gone by report time. Blazesym reads it through
    /// `/proc/self/fd/N`. Out of descriptors, a local path is the fallback.
    fn open(pid: u32, m: &Mapping, display: String, local: bool) -> Option<Self> {
        let opened = proc::mapped_file(pid, m).and_then(|p| File::open(p).ok());
        let (open_path, file) = match opened {
            Some(f) => (
                PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())),
                Some(f),
            ),
            None if local => (m.file()?.to_owned(), None),
            None => return None,
        };
        let build_id = build_id(&open_path).unwrap_or_default();
        Some(Self {
            display,
            open_path,
            _file: file,
            build_id,
        })
    }
}

/// The GNU build ID of an ELF file, in lowercase hex.
fn build_id(path: &Path) -> Option<String> {
    use object::Object as _;
    let data = std::fs::read(path).ok()?;
    let id = object::File::parse(&*data).ok()?.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
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
        Self {
            blaze: Blaze::new(),
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
                    let Some(module) = Module::open(pid, m, display, local) else {
                        continue;
                    };
                    self.modules.push(module);
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

    fn symbolize_user(&self, pid: u32, addr: u64) -> Vec<Frame> {
        let call = addr.saturating_sub(1);
        let range = self
            .ranges
            .get(&pid)
            .and_then(|r| r.iter().find(|r| r.start <= call && call < r.end).copied());
        let Some(range) = range else {
            return vec![Frame {
                address: addr,
                ..Frame::default()
            }];
        };
        let module = &self.modules[range.module];
        let file_offset = call - range.start + range.offset;
        let source = Source::Elf(Elf::new(&module.open_path));
        let symbolized = self
            .blaze
            .symbolize_single(&source, Input::FileOffset(file_offset))
            .ok();
        frames_of(addr, symbolized, Some((&module.display, file_offset)))
    }

    /// Frames for kernel addresses (kallsyms).
    pub fn kernel_frames(&mut self, addrs: &[u64]) -> Vec<Frame> {
        let mut out = Vec::new();
        for &addr in addrs {
            if !self.kernel_cache.contains_key(&addr) {
                let source = Source::Kernel(Kernel::default());
                let symbolized = self
                    .blaze
                    .symbolize_single(&source, Input::AbsAddr(addr))
                    .ok();
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
    symbolized: Option<Symbolized<'_>>,
    module: Option<(&str, u64)>,
) -> Vec<Frame> {
    let base = Frame {
        address: addr,
        module: module.map(|(m, _)| m.to_owned()),
        offset: module.map(|(_, o)| o),
        ..Frame::default()
    };
    let Some(Symbolized::Sym(sym)) = symbolized else {
        return vec![base];
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
