//! Which unwind tables exist, where their rows sit in the shared row array, and
//! each process's code mappings in the form the eBPF unwinder searches.
//!
//! A table is made once per file and shared by every process that maps it: found
//! first by (device, inode) from `/proc/PID/maps` (no file read), then by build id
//! (the same library in two containers is two inodes, one table). Rows are handed
//! out from one array the kernel preallocates, and so are the entries of each
//! table's index (which rows cover which bucket of addresses, see [`RowIndex`]);
//! when either is full a module gets no table (its frames end stacks, counted) and
//! the others keep theirs. Tables live until the run ends: a library unloaded and
//! loaded again finds its own. Pure: the caller reads files and writes maps.

use std::{collections::HashMap, path::PathBuf};

use leak_common::{
    INDEX_MIN_SHIFT, INDEX_STEPS_LONG, INDEX_STEPS_SHORT, MAX_MODULES, ModuleRange, UnwindRow,
    UnwindTable,
};

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
    /// Its index's first entry and entry count.
    pub index_first: u32,
    pub index_entries: u32,
    pub segments: Vec<Segment>,
}

impl Table {
    /// Bytes of kernel memory its rows and index take.
    pub fn bytes(&self) -> u64 {
        u64::from(self.rows) * size_of::<UnwindRow>() as u64 + self.index_bytes()
    }

    /// Bytes of kernel memory its index takes.
    pub fn index_bytes(&self) -> u64 {
        u64::from(self.index_entries) * size_of::<u32>() as u64
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

/// A table's index (the layout is [`leak_common::UnwindTable`]'s): the module's
/// addresses from `base` cut into buckets of `1 << shift` bytes; `entries[b]` is
/// the last row at or below `base + (b << shift)`, one entry per bucket and one
/// for the end (the last row). Every bucket spans at most `1 << steps` rows, so
/// the unwinder finds a pc's row in `steps` halvings among neighbouring rows.
/// The largest such bucket is chosen: the smallest index for those steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowIndex {
    pub base: u32,
    pub shift: u32,
    pub steps: u32,
    pub entries: Vec<u32>,
}

impl RowIndex {
    pub fn buckets(&self) -> u32 {
        self.entries.len().saturating_sub(1) as u32
    }

    /// The index of sorted `rows`, or `None` when they are not strictly sorted
    /// (never made by `cfi.rs`). Short searches (`INDEX_STEPS_SHORT`) unless their
    /// index would take more than an entry for every two rows (a quarter of the
    /// rows' bytes), then long ones. No rows, no buckets.
    pub fn build(rows: &[UnwindRow]) -> Option<Self> {
        if rows.is_empty() {
            return Some(Self {
                base: 0,
                shift: INDEX_MIN_SHIFT,
                steps: INDEX_STEPS_SHORT,
                entries: Vec::new(),
            });
        }
        if rows.windows(2).any(|w| w[0].pc >= w[1].pc) {
            return None;
        }
        let short = Self::with_steps(rows, INDEX_STEPS_SHORT)?;
        if short.entries.len() <= rows.len() / 2 + 2 {
            return Some(short);
        }
        Self::with_steps(rows, INDEX_STEPS_LONG)
    }

    /// The index (of rows, at least one) with the largest buckets that searches
    /// of `steps` cover.
    fn with_steps(rows: &[UnwindRow], steps: u32) -> Option<Self> {
        let base = rows[0].pc;
        // A smaller bucket never spans more rows than the one it is part of:
        // the first size that fits, from the largest, is the largest that does.
        (INDEX_MIN_SHIFT..32).rev().find_map(|shift| {
            Self::entries(rows, shift, steps).map(|entries| Self {
                base,
                shift,
                steps,
                entries,
            })
        })
    }

    /// The entries for buckets of `1 << shift` bytes, if none spans more than
    /// `1 << steps` rows.
    fn entries(rows: &[UnwindRow], shift: u32, steps: u32) -> Option<Vec<u32>> {
        let base = u64::from(rows[0].pc);
        let last = u64::from(rows[rows.len() - 1].pc);
        let buckets = ((last - base) >> shift) + 1;
        let mut entries: Vec<u32> = Vec::with_capacity(buckets as usize + 1);
        let mut row = 0usize;
        for b in 0..=buckets {
            let at = base + (b << shift);
            while row + 1 < rows.len() && u64::from(rows[row + 1].pc) <= at {
                row += 1;
            }
            if let Some(&prev) = entries.last()
                && row - prev as usize + 1 > 1 << steps
            {
                return None;
            }
            entries.push(row as u32);
        }
        Some(entries)
    }

    /// The table's header for the eBPF side, with its rows at `first` and its
    /// index entries at `index_first`.
    pub fn table(&self, first: u32, rows: u32, index_first: u32) -> UnwindTable {
        UnwindTable {
            first,
            rows,
            index: index_first,
            buckets: self.buckets(),
            base: self.base,
            shift: self.shift,
            steps: self.steps,
        }
    }
}

/// The row of `pc` (counted from the table's first) as the eBPF unwinder finds it,
/// by the same steps ([`UnwindTable::find_row`]), in `rows` and `index`, the whole
/// arrays as the maps hold them.
pub fn find_row(table: &UnwindTable, rows: &[UnwindRow], index: &[u32], pc: u32) -> Option<u32> {
    let entry_at = |i: u32| index.get(i as usize).copied();
    let pc_at = |i: u32| rows.get(i as usize).map(|r| u64::from(r.pc));
    Some(table.find_row(pc, entry_at, pc_at)? - table.first)
}

/// Tables at most (the size of `UNWIND_TABLES`).
pub const MAX_TABLES: u32 = 4096;

/// Index entries (4 bytes each, preallocated) for a row array of `rows`: half as
/// many, and two for each table. An index takes at most an entry for every two
/// rows when its searches are short, fewer when they are long (glibc 2.36: 28,271
/// rows, 10,915 entries, 43 KiB; a 127,000-row Rust debug build: long searches,
/// 16,291 entries), so it fills up after the rows (a table that does not fit
/// either is refused, its frames ending stacks).
pub const fn index_capacity(rows: u32) -> u32 {
    rows / 2 + 2 * MAX_TABLES
}

/// Every table of the run.
#[derive(Debug)]
pub struct TableSet {
    capacity_rows: u32,
    capacity_index: u32,
    max_tables: u32,
    next_row: u32,
    next_index: u32,
    tables: Vec<Table>,
    by_file: HashMap<FileKey, Entry>,
    by_build_id: HashMap<Vec<u8>, u32>,
}

/// Rows to write at `first` and index entries at `index_first` for a new table.
#[derive(Debug)]
pub struct NewTable {
    pub id: u32,
    pub first: u32,
    pub rows: Vec<UnwindRow>,
    pub index_first: u32,
    pub index: RowIndex,
}

impl TableSet {
    pub fn new(capacity_rows: u32, capacity_index: u32, max_tables: u32) -> Self {
        Self {
            capacity_rows,
            capacity_index,
            max_tables,
            next_row: 0,
            next_index: 0,
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

    /// Index entries in use, and the array's capacity.
    pub fn index_used(&self) -> (u32, u32) {
        (self.next_index, self.capacity_index)
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
        let Some(index) = RowIndex::build(&cfi.rows) else {
            self.refuse(
                key,
                format!("{}: its rows cannot be indexed", path.display()),
            );
            return None;
        };
        let rows = u32::try_from(cfi.rows.len()).unwrap_or(u32::MAX);
        let entries = u32::try_from(index.entries.len()).unwrap_or(u32::MAX);
        let fits = |next: u32, more: u32, capacity: u32| {
            next.checked_add(more).is_some_and(|end| end <= capacity)
        };
        if !fits(self.next_row, rows, self.capacity_rows)
            || !fits(self.next_index, entries, self.capacity_index)
            || self.tables.len() as u32 + 1 >= self.max_tables
        {
            let why = format!(
                "{}: the unwind tables are full ({} of {} rows used, {} more needed; \
                 {} of {} index entries, {} more)",
                path.display(),
                self.next_row,
                self.capacity_rows,
                rows,
                self.next_index,
                self.capacity_index,
                entries
            );
            self.refuse(key, why);
            return None;
        }
        let id = self.tables.len() as u32 + 1;
        let first = self.next_row;
        self.next_row += rows;
        let index_first = self.next_index;
        self.next_index += entries;
        self.tables.push(Table {
            id,
            path,
            first,
            rows,
            index_first,
            index_entries: entries,
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
            index_first,
            index,
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
    use leak_common::cfa;

    use super::*;

    /// Rows every 16 bytes.
    fn cfi(rows: usize, build_id: Option<&[u8]>) -> ModuleCfi {
        ModuleCfi {
            rows: (0..rows as u32)
                .map(|i| UnwindRow {
                    pc: 0x1000 + 16 * i,
                    ..UnwindRow::default()
                })
                .collect(),
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
        let mut set = TableSet::new(100, 100, 16);
        let a = set
            .add((1, 10), "a".into(), cfi(30, Some(b"AAAA")))
            .unwrap();
        assert_eq!((a.id, a.first, a.rows.len()), (1, 0, 30));
        // 30 rows fit one bucket: two entries.
        assert_eq!(
            (a.index_first, a.index.entries.as_slice()),
            (0, &[0, 29][..])
        );
        // Same build id, another inode (a container's copy): no new rows.
        assert!(
            set.add((2, 20), "a2".into(), cfi(30, Some(b"AAAA")))
                .is_none()
        );
        assert!(matches!(set.known((2, 20)), Some(Entry::Table(1))));
        let b = set.add((1, 11), "b".into(), cfi(50, None)).unwrap();
        assert_eq!((b.id, b.first), (2, 30));
        // 50 rows: 256-byte buckets of 17 rows each (16 start in it, and the
        // next bucket's first), then the end.
        assert_eq!(b.index.shift, 8);
        assert_eq!(b.index.entries, [0, 16, 32, 48, 49]);
        assert_eq!(b.index_first, 2);
        assert_eq!(set.rows_used(), (80, 100));
        assert_eq!(set.index_used(), (7, 100));
        // No room left: refused with a reason, the others keep theirs.
        assert!(set.add((1, 12), "c".into(), cfi(21, None)).is_none());
        assert!(matches!(set.known((1, 12)), Some(Entry::Missing(_))));
        assert_eq!(set.missing().count(), 1);
        assert_eq!(
            set.tables().iter().map(Table::bytes).sum::<u64>(),
            80 * 8 + 7 * 4
        );
    }

    #[test]
    fn a_full_index_refuses_the_table_and_keeps_the_others() {
        let mut set = TableSet::new(1000, 8, 16);
        assert!(set.add((1, 10), "a".into(), cfi(50, None)).is_some()); // 5 entries
        assert!(set.add((1, 11), "b".into(), cfi(50, None)).is_none());
        let Some(Entry::Missing(why)) = set.known((1, 11)) else {
            panic!("b has a table");
        };
        assert!(why.contains("index entries"), "{why}");
        assert!(set.add((1, 12), "c".into(), cfi(30, None)).is_some()); // 2 more
        assert_eq!(set.index_used(), (7, 8));
    }

    /// The row at `pc` of a function that has pushed `pushes` registers.
    fn after_pushes(pc: u32, pushes: u32) -> UnwindRow {
        UnwindRow {
            pc,
            cfa_offset: 8 + 8 * pushes as u16,
            cfa_reg: cfa::RSP,
            rbp_slot: 0,
        }
    }

    /// Rows as code makes them: functions of varied sizes, prologues and
    /// epilogues a push (1-2 bytes) apart, gaps between functions.
    fn realistic_rows(functions: usize, seed: u64) -> Vec<UnwindRow> {
        let mut state = seed;
        let mut next = |n: u32| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as u32) % n
        };
        let mut rows = Vec::new();
        let mut pc = 0x2_0000u32;
        for _ in 0..functions {
            let pushes = next(7);
            for p in 0..=pushes {
                rows.push(after_pushes(pc, p));
                pc += 1 + next(2);
            }
            pc += if next(4) == 0 { next(4000) } else { next(120) };
            for p in (0..pushes).rev() {
                rows.push(after_pushes(pc, p));
                pc += 1 + next(2);
            }
            pc += 1 + next(40);
            rows.push(UnwindRow {
                pc,
                ..UnwindRow::default()
            });
            pc += 1 + next(16);
        }
        rows
    }

    /// Checks `find_row` (the eBPF unwinder's steps) against a plain search for
    /// every pc from below the first row to past the last, and that the bucket
    /// size is the largest that fits.
    fn check_index(rows: &[UnwindRow]) -> RowIndex {
        let index = RowIndex::build(rows).expect("indexed");
        let spans = |entries: &[u32]| entries.windows(2).map(|w| w[1] - w[0] + 1).max();
        assert!(spans(&index.entries).unwrap() <= 1 << index.steps);
        if index.shift < 31 {
            let wider = RowIndex::entries(rows, index.shift + 1, index.steps);
            assert!(wider.is_none(), "shift {} fits too", index.shift + 1);
        }
        // Placed after other tables in the arrays, as in the maps.
        let table = index.table(7, rows.len() as u32, 3);
        let mut all_rows = vec![UnwindRow::default(); 7];
        all_rows.extend_from_slice(rows);
        let mut all_entries = vec![0; 3];
        all_entries.extend_from_slice(&index.entries);
        let last = rows.last().unwrap().pc;
        for pc in rows[0].pc.saturating_sub(40)..=last + 5000 {
            let want = rows.partition_point(|r| r.pc <= pc).checked_sub(1);
            let got = find_row(&table, &all_rows, &all_entries, pc);
            assert_eq!(got.map(|i| i as usize), want, "pc {pc:#x}");
        }
        index
    }

    #[test]
    fn the_index_finds_the_row_of_every_pc() {
        for seed in 0..4 {
            let rows = realistic_rows(300, seed);
            let index = check_index(&rows);
            assert!(index.entries.len() < rows.len(), "{}", index.entries.len());
        }
        // Small tables: one bucket.
        for n in 1..40 {
            let rows = cfi(n, None).rows;
            let index = check_index(&rows);
            if n <= 32 {
                assert_eq!(index.buckets(), 1);
            }
        }
        // The densest code there is: a row at every byte, 16-byte buckets.
        let dense: Vec<UnwindRow> = (0..500)
            .map(|pc| UnwindRow {
                pc: 0x1000 + pc,
                ..UnwindRow::default()
            })
            .collect();
        let index = check_index(&dense);
        assert_eq!((index.shift, index.steps), (4, INDEX_STEPS_SHORT));
        // Long searches where short ones would need an index larger than half
        // the rows: a dense cluster in sparse code.
        let mut mixed: Vec<UnwindRow> = (0..40)
            .map(|i| UnwindRow {
                pc: 0x1000 + i,
                ..UnwindRow::default()
            })
            .collect();
        mixed.extend((0..200).map(|i| UnwindRow {
            pc: 0x2000 + 4096 * i,
            ..UnwindRow::default()
        }));
        let index = check_index(&mixed);
        assert_eq!(index.steps, INDEX_STEPS_LONG);
    }

    #[test]
    fn unsorted_rows_are_not_indexed_and_no_rows_have_no_buckets() {
        let mut rows = cfi(10, None).rows;
        rows.swap(3, 4);
        assert!(RowIndex::build(&rows).is_none());
        rows[4] = rows[3];
        assert!(RowIndex::build(&rows).is_none());
        let empty = RowIndex::build(&[]).unwrap();
        assert_eq!(empty.buckets(), 0);
        assert_eq!(find_row(&empty.table(0, 0, 0), &[], &[], 0x1000), None);
    }

    #[test]
    fn real_tables_are_indexed_and_every_pc_found() {
        // This test binary (a large Rust debug build: dense code, long searches)
        // and the C library it runs on.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let libc = maps
            .split_whitespace()
            .find(|w| w.contains("/libc.so") || w.contains("/libc-"))
            .expect("this test runs on glibc");
        for path in ["/proc/self/exe", libc] {
            let cfi = crate::unwind::cfi::parse(&std::fs::read(path).unwrap()).unwrap();
            let index = check_index(&cfi.rows);
            let rows = cfi.rows.len();
            if index.steps == INDEX_STEPS_SHORT {
                assert!(index.entries.len() <= rows / 2 + 2, "{path}");
            } else {
                let short = RowIndex::with_steps(&cfi.rows, INDEX_STEPS_SHORT);
                assert!(short.unwrap().entries.len() > rows / 2 + 2, "{path}");
                assert!(index.entries.len() < rows / 4, "{path}");
            }
        }
    }

    #[test]
    fn module_ranges_are_sorted_with_biases() {
        let mut set = TableSet::new(100, 100, 16);
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
