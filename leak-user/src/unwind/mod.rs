//! Whole allocation stacks without frame pointers: the daemon's half of the CFI
//! unwinder (the eBPF half is `leak-ebpf/src/unwind.rs`).
//!
//! For every code mapping of a traced process, the file's CFI is parsed once
//! (`cfi.rs`) into a table shared by every process that maps the same file or build
//! id (`tables.rs`), written to the eBPF maps; the process's list of code mappings
//! is written each time it changes (at attach, at the entry-point hold, and when a
//! later look at `/proc/PID/maps` finds new code, e.g. a `dlopen`). Frames in code
//! mapped since the last look end their stack, counted as `no_module`.

pub mod cfi;
pub mod tables;

use std::{collections::HashMap, path::PathBuf};

use leak_common::{ModuleRange, UnwindCount};

use crate::{
    ebpf::UnwindMaps,
    proc::maps::{Backing, Mapping},
};
use tables::{CodeMapping, Entry, MAX_TABLES, TableSet, index_capacity};

/// Default rows of the shared table array (8 bytes each, preallocated by the
/// kernel): 2^21 rows, 16 MiB; glibc takes about 30,000.
pub const DEFAULT_ROWS: u32 = 1 << 21;

/// Processes whose code mappings the eBPF side holds at once (512 code mappings
/// each, 32 bytes a mapping: 8 MiB). Beyond, a process's stacks end at once
/// (counted as `no_tables_yet`).
pub const PROCESS_SLOTS: u32 = 512;

/// The unwinder's state in the daemon.
pub struct Unwinder {
    maps: UnwindMaps,
    set: TableSet,
    /// Each process's slot and its module list when last written.
    written: HashMap<u32, (u32, Vec<ModuleRange>)>,
    /// Process slots not in use.
    free_slots: Vec<u32>,
}

/// One module's table, for the `stats` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFigure {
    pub path: PathBuf,
    pub rows: u32,
    /// Rows and index.
    pub bytes: u64,
    pub index_bytes: u64,
}

/// The unwinder's figures for the `stats` record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnwindFigures {
    pub modules: Vec<ModuleFigure>,
    pub table_bytes: u64,
    pub capacity_bytes: u64,
    pub modules_without_table: u64,
    pub counts: [u64; UnwindCount::COUNT as usize],
}

impl Unwinder {
    pub fn new(maps: UnwindMaps, rows: u32, process_slots: u32) -> Self {
        Self {
            maps,
            set: TableSet::new(rows, index_capacity(rows), MAX_TABLES),
            written: HashMap::new(),
            free_slots: (0..process_slots).rev().collect(),
        }
    }

    /// Makes sure every code mapping of `pid` has its table and the eBPF side has
    /// the process's current module list.
    pub fn refresh(&mut self, pid: u32, maps: &[Mapping]) {
        let mut code = Vec::new();
        for m in maps.iter().filter(|m| m.exec && m.inode != 0) {
            let Backing::File(path) = &m.backing else {
                continue;
            };
            let key = (m.dev, m.inode);
            if self.set.known(key).is_none() {
                self.load(pid, m, path.clone());
            }
            if let Some(Entry::Table(id)) = self.set.known(key) {
                code.push(CodeMapping {
                    start: m.start,
                    end: m.end,
                    offset: m.offset,
                    table: *id,
                });
            }
        }
        let ranges = tables::module_ranges(&self.set, code);
        let slot = match self.written.get(&pid) {
            Some((_, written)) if *written == ranges => return,
            Some((slot, _)) => *slot,
            None => match self.free_slots.pop() {
                Some(slot) => slot,
                None => {
                    log::warn!(
                        "pid {pid}: the unwinder holds no more processes; its stacks end at once"
                    );
                    return;
                }
            },
        };
        match self.maps.set_modules(pid, slot, &ranges) {
            Ok(()) => {
                self.written.insert(pid, (slot, ranges));
            }
            Err(err) => {
                log::warn!("pid {pid}: cannot give the unwinder its modules: {err}");
                if !self.written.contains_key(&pid) {
                    self.free_slots.push(slot);
                }
            }
        }
    }

    /// Reads and parses a file through the process's own mapping (so a file
    /// deleted or replaced since is still the one it runs).
    fn load(&mut self, pid: u32, m: &Mapping, path: PathBuf) {
        let key = (m.dev, m.inode);
        let via = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
        let data = std::fs::read(&via).or_else(|_| std::fs::read(&path));
        let parsed = match data {
            Ok(bytes) => cfi::parse(&bytes).map_err(|e| e.to_string()),
            Err(err) => Err(format!("cannot read it: {err}")),
        };
        let cfi = match parsed {
            Ok(cfi) => cfi,
            Err(why) => {
                log::debug!("{}: no unwind table: {why}", path.display());
                self.set.refuse(key, format!("{}: {why}", path.display()));
                return;
            }
        };
        let Some(new) = self.set.add(key, path.clone(), cfi) else {
            return;
        };
        let table = new
            .index
            .table(new.first, new.rows.len() as u32, new.index_first);
        if let Err(err) = self
            .maps
            .write_table(new.id, table, &new.rows, &new.index.entries)
        {
            log::warn!("{}: cannot load its unwind table: {err}", path.display());
            self.set.refuse(key, format!("{}: {err}", path.display()));
        }
    }

    /// Forgets a process that ended.
    pub fn forget(&mut self, pid: u32) {
        if let Some((slot, _)) = self.written.remove(&pid) {
            self.maps.remove_modules(pid);
            self.free_slots.push(slot);
        }
    }

    pub fn figures(&self) -> UnwindFigures {
        let (_, capacity) = self.set.rows_used();
        let (_, index_capacity) = self.set.index_used();
        let modules: Vec<ModuleFigure> = self
            .set
            .tables()
            .iter()
            .map(|t| ModuleFigure {
                path: t.path.clone(),
                rows: t.rows,
                bytes: t.bytes(),
                index_bytes: t.index_bytes(),
            })
            .collect();
        UnwindFigures {
            table_bytes: modules.iter().map(|m| m.bytes).sum(),
            capacity_bytes: u64::from(capacity) * 8 + u64::from(index_capacity) * 4,
            modules,
            modules_without_table: self.set.missing().count() as u64,
            counts: self.maps.counts(),
        }
    }
}
