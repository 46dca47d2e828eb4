//! Which unwind tables exist, where their rows sit in the shared row array, and
//! each process's code mappings in the form the eBPF unwinder searches.
//!
//! A table is made once per file and shared by every process that maps it: found
//! first by (device, inode) from `/proc/PID/maps` (no file read), then by build id
//! (the same library in two containers is two inodes, one table). Rows are handed
//! out from one array the kernel preallocates; when it is full a module gets no
//! table (its frames end stacks, counted) and the others keep theirs. Tables live
//! until the run ends: a library unloaded and loaded again finds its own. Pure:
//! the caller reads files and writes maps.

use std::{collections::HashMap, path::PathBuf};

use leak_common::{MAX_MODULES, ModuleRange, UnwindRow};

use super::cfi::{ModuleCfi, Segment};

/// A table in the row array.
#[derive(Debug, Clone)]
pub struct Table {
    /// Its id in `UNWIND_TABLES` (from 1).
    pub id: u32,
    /// The first file it was made from (for the figures).
    pub path: PathBuf,
    pub first: u32,
    pub rows: u32,
    pub segments: Vec<Segment>,
}

impl Table {
    /// Bytes of kernel memory its rows take.
    pub fn bytes(&self) -> u64 {
        u64::from(self.rows) * size_of::<UnwindRow>() as u64
    }

    /// Runtime address - ELF address of a mapping of file offset `offset` at `start`.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        ModuleCfi {
            rows: Vec::new(),
            segments: self.segments.clone(),
            build_id: None,
        }
        .bias(start, offset)
    }
}

/// A file's identity in `/proc/PID/maps`.
pub type FileKey = (u64, u64);

/// What became of a file.
#[derive(Debug, Clone)]
pub enum Entry {
    Table(u32),
    /// It has no usable table: why (shown once, in the figures).
    Missing(String),
}

/// Every table of the run.
#[derive(Debug)]
pub struct TableSet {
    capacity_rows: u32,
    max_tables: u32,
    next_row: u32,
    tables: Vec<Table>,
    by_file: HashMap<FileKey, Entry>,
    by_build_id: HashMap<Vec<u8>, u32>,
}

/// Rows to write at `first` for a new table.
#[derive(Debug)]
pub struct NewTable {
    pub id: u32,
    pub first: u32,
    pub rows: Vec<UnwindRow>,
}

impl TableSet {
    pub fn new(capacity_rows: u32, max_tables: u32) -> Self {
        Self {
            capacity_rows,
            max_tables,
            next_row: 0,
            tables: Vec::new(),
            by_file: HashMap::new(),
            by_build_id: HashMap::new(),
        }
    }

    /// What is known of a file already.
    pub fn known(&self, key: FileKey) -> Option<&Entry> {
        self.by_file.get(&key)
    }

    pub fn table(&self, id: u32) -> Option<&Table> {
        self.tables.get(id.checked_sub(1)? as usize)
    }

    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Files that have no table, with why.
    pub fn missing(&self) -> impl Iterator<Item = &str> {
        self.by_file.values().filter_map(|e| match e {
            Entry::Missing(why) => Some(why.as_str()),
            Entry::Table(_) => None,
        })
    }

    /// Rows in use, and the array's capacity.
    pub fn rows_used(&self) -> (u32, u32) {
        (self.next_row, self.capacity_rows)
    }

    /// Notes that a file has no table.
    pub fn refuse(&mut self, key: FileKey, why: String) {
        self.by_file.insert(key, Entry::Missing(why));
    }

    /// Adds a parsed file: shares the table of the same build id, or places a new
    /// one (returned, to be written) if the row array has room.
    pub fn add(&mut self, key: FileKey, path: PathBuf, cfi: ModuleCfi) -> Option<NewTable> {
        if let Some(id) = cfi.build_id.as_ref().and_then(|b| self.by_build_id.get(b)) {
            self.by_file.insert(key, Entry::Table(*id));
            return None;
        }
        let rows = u32::try_from(cfi.rows.len()).unwrap_or(u32::MAX);
        let fits = self
            .next_row
            .checked_add(rows)
            .is_some_and(|end| end <= self.capacity_rows);
        if !fits || self.tables.len() as u32 + 1 >= self.max_tables {
            let why = format!(
                "{}: the unwind tables are full ({} of {} rows used, {} more needed)",
                path.display(),
                self.next_row,
                self.capacity_rows,
                rows
            );
            self.refuse(key, why);
            return None;
        }
        let id = self.tables.len() as u32 + 1;
        let first = self.next_row;
        self.next_row += rows;
        self.tables.push(Table {
            id,
            path,
            first,
            rows,
            segments: cfi.segments,
        });
        if let Some(b) = cfi.build_id {
            self.by_build_id.insert(b, id);
        }
        self.by_file.insert(key, Entry::Table(id));
        Some(NewTable {
            id,
            first,
            rows: cfi.rows,
        })
    }
}

/// A code mapping of a process with the table that describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeMapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub table: u32,
}

/// The process's module list for the eBPF side: sorted by start, with biases; at
/// most [`MAX_MODULES`] (the rest are left out and their frames end stacks).
pub fn module_ranges(set: &TableSet, mut code: Vec<CodeMapping>) -> Vec<ModuleRange> {
    code.sort_by_key(|c| c.start);
    code.iter()
        .filter_map(|c| {
            let bias = set.table(c.table)?.bias(c.start, c.offset)?;
            Some(ModuleRange {
                start: c.start,
                end: c.end,
                bias,
                table: c.table,
                _pad: 0,
            })
        })
        .take(MAX_MODULES)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfi(rows: usize, build_id: Option<&[u8]>) -> ModuleCfi {
        ModuleCfi {
            rows: vec![UnwindRow::default(); rows],
            segments: vec![Segment {
                offset: 0x1000,
                size: 0x5000,
                vaddr: 0x1000,
            }],
            build_id: build_id.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn tables_are_shared_by_build_id_and_placed_back_to_back() {
        let mut set = TableSet::new(100, 16);
        let a = set
            .add((1, 10), "a".into(), cfi(30, Some(b"AAAA")))
            .unwrap();
        assert_eq!((a.id, a.first, a.rows.len()), (1, 0, 30));
        // Same build id, another inode (a container's copy): no new rows.
        assert!(
            set.add((2, 20), "a2".into(), cfi(30, Some(b"AAAA")))
                .is_none()
        );
        assert!(matches!(set.known((2, 20)), Some(Entry::Table(1))));
        let b = set.add((1, 11), "b".into(), cfi(50, None)).unwrap();
        assert_eq!((b.id, b.first), (2, 30));
        assert_eq!(set.rows_used(), (80, 100));
        // No room left: refused with a reason, the others keep theirs.
        assert!(set.add((1, 12), "c".into(), cfi(21, None)).is_none());
        assert!(matches!(set.known((1, 12)), Some(Entry::Missing(_))));
        assert_eq!(set.missing().count(), 1);
        assert_eq!(set.tables().iter().map(Table::bytes).sum::<u64>(), 80 * 8);
    }

    #[test]
    fn module_ranges_are_sorted_with_biases() {
        let mut set = TableSet::new(100, 16);
        set.add((1, 10), "a".into(), cfi(3, None)).unwrap();
        let code = vec![
            CodeMapping {
                start: 0x7f00_0000_2000,
                end: 0x7f00_0000_6000,
                offset: 0x1000,
                table: 1,
            },
            CodeMapping {
                start: 0x5555_0000_1000,
                end: 0x5555_0000_2000,
                offset: 0x1000,
                table: 1,
            },
            // An unknown table: left out.
            CodeMapping {
                start: 0x6000_0000_0000,
                end: 0x6000_0000_1000,
                offset: 0,
                table: 9,
            },
        ];
        let ranges = module_ranges(&set, code);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].start, 0x5555_0000_1000);
        assert_eq!(ranges[0].bias, 0x5555_0000_0000);
        assert_eq!(ranges[1].bias, 0x7f00_0000_1000);
    }
}
