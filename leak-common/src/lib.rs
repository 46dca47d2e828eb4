//! The wire format between leaktrace's eBPF programs and its daemon.
//!
//! Everything here crosses the kernel/user boundary, either as a ring-buffer record
//! or as the key or value of a BPF map, so every type is `#[repr(C)]`, has no
//! implicit padding, and uses integer tags rather than Rust enums or `bool`s: the
//! kernel side writes raw bytes and the daemon decodes them with [`TryFrom`].
//!
//! With the `user` feature the types also implement `aya::Pod`, which the daemon
//! needs to read them out of maps.
#![no_std]

/// Names of the maps and globals in the eBPF object, shared so that a rename on one
/// side fails to compile on the other instead of failing at load time.
pub mod names {
    /// The ring buffer of kernel mode, and of user-mode CPUs without their own.
    pub const EVENTS: &str = "EVENTS";
    /// User mode: one ring buffer per CPU (an array of maps, by CPU number).
    pub const CPU_RINGS: &str = "CPU_RINGS";
    /// Per-CPU counters of everything that could not be recorded, indexed by [`super::Loss`].
    pub const LOSSES: &str = "LOSSES";
    /// Processes being traced: tgid -> [`super::TargetFlags`].
    pub const TARGETS: &str = "TARGETS";
    /// Allocator calls in flight, by thread id.
    pub const CALLS: &str = "CALLS";
    /// Deduplicated user stacks: 64-bit hash -> [`super::Stack`].
    pub const STACKS: &str = "STACKS";
    /// Deduplicated kernel stacks (kernel slab mode).
    pub const KSTACKS: &str = "KSTACKS";
    /// Per-thread scratch for mmap/mremap calls between syscall entry and exit.
    pub const SYSCALLS: &str = "SYSCALLS";
    /// Call sites inside allocation wrappers: [`super::HintKey`] -> bytes from that
    /// return address's stack slot to the wrapper's own return address.
    pub const HINTS: &str = "HINTS";
    /// Bits of the return addresses `HINTS` may hold ([`super::hint_filter_bit`]).
    pub const HINT_FILTER: &str = "HINT_FILTER";
    /// Global: field offsets of the tracepoints we read ([`super::TracepointLayout`]).
    pub const TP_LAYOUT: &str = "TP_LAYOUT";
    /// Kernel mode: cgroup ids to trace (filled when `--cgroup` is given).
    pub const CGROUPS: &str = "CGROUPS";
    /// Global: non-zero when kernel mode traces only the cgroups in `CGROUPS`.
    pub const KERNEL_FILTER_CGROUPS: &str = "KERNEL_FILTER_CGROUPS";
    /// Global: non-zero when children of traced processes are traced too.
    pub const FOLLOW_FORKS: &str = "FOLLOW_FORKS";
    /// Global: wake the reader only once this many bytes wait in the ring.
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    /// Global: kernel mode samples one object in 2^SAMPLE_SHIFT (by address, so an
    /// object's allocation and free are both seen or both skipped).
    pub const SAMPLE_SHIFT: &str = "SAMPLE_SHIFT";
    /// Global: non-zero when kernel mode attaches both a raw and a classic program
    /// to each free tracepoint (see [`super::FreeProbeCount`]).
    pub const DUAL_FREE_PROBES: &str = "DUAL_FREE_PROBES";
    /// Per-CPU counters of how the two free probes shared the frees.
    pub const FREE_PROBES: &str = "FREE_PROBES";
    /// Global: non-zero when every allocator uprobe is attached for one process.
    pub const SCOPED_PROBES: &str = "SCOPED_PROBES";
    /// Global: non-zero when the allocator probes do nothing (the benchmark's floor).
    pub const EMPTY_PROBES: &str = "EMPTY_PROBES";
    /// The counter user-mode records take their order stamps from (one u64).
    pub const ORDER: &str = "ORDER";
    /// Global: non-zero when user-mode records are stamped from `ORDER`, zero when
    /// with the clock (see [`super::UserRecord::stamp`]).
    pub const ORDER_BY_COUNTER: &str = "ORDER_BY_COUNTER";
    /// Global: non-zero when calls in flight are kept in task-local storage
    /// (`TASK_CALLS`) rather than in `CALLS`.
    pub const USE_TASK_CALLS: &str = "USE_TASK_CALLS";
    /// Allocator calls in flight, in task-local storage (kernels that allow it).
    pub const TASK_CALLS: &str = "TASK_CALLS";
    /// Global: non-zero when allocation stacks are captured.
    pub const CAPTURE_STACKS: &str = "CAPTURE_STACKS";
    /// Global: non-zero when kernel mode traces only the processes in `TARGETS`.
    pub const KERNEL_FILTER_PIDS: &str = "KERNEL_FILTER_PIDS";
    /// Global: how user stacks are captured, a [`super::StackMode`] tag.
    pub const STACK_MODE: &str = "STACK_MODE";
    /// Unwind rows of every loaded module, back to back ([`super::UnwindRow`]).
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// Unwind tables: table id -> [`super::UnwindTable`] (a slice of `UNWIND_ROWS`).
    pub const UNWIND_TABLES: &str = "UNWIND_TABLES";
    /// Every table's index into its rows, back to back (u32 row numbers).
    pub const UNWIND_INDEX: &str = "UNWIND_INDEX";
    /// The code modules of each traced process: tgid -> [`super::ModuleSlot`].
    pub const UNWIND_MODULES: &str = "UNWIND_MODULES";
    /// Every process's code mappings, [`super::MAX_MODULES`] per process slot.
    pub const UNWIND_RANGES: &str = "UNWIND_RANGES";
    /// Per-CPU counters of the unwinder, indexed by [`super::UnwindCount`].
    pub const UNWIND_COUNTS: &str = "UNWIND_COUNTS";
    /// Bumped whenever tables, module lists or wrapper hints change: retires the
    /// walks the allocation probe remembered (one u64).
    pub const MEMO_EPOCH: &str = "MEMO_EPOCH";
}

/// The signal the entry-point probe sends to hold a launched command at its entry
/// point: SIGURG, whose default action is to ignore it. A traced thread stops for it
/// (even ignored signals stop a tracee) and the tracer suppresses it; if the tracer
/// dies first, it is delivered and ignored, so the command runs on unharmed.
pub const ENTRY_HOLD_SIGNAL: u32 = 23;

/// How many frames a captured stack holds (deeper stacks are truncated).
pub const STACK_DEPTH: usize = 64;

/// A captured stack, innermost frame first; unused slots are zero.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stack {
    pub frames: [u64; STACK_DEPTH],
}

/// How the allocation probes capture user stacks (the `STACK_MODE` global).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackMode {
    /// `bpf_get_stack`: the kernel's frame-pointer walk.
    FramePointers = 0,
    /// The CFI unwinder over the tables in `UNWIND_*`.
    Cfi = 1,
}

/// A stack frame that says "the walk stopped here: the next frame could not be
/// unwound". Only ever the last frame of a stack; never a code address.
pub const FRAME_UNWIND_STOPPED: u64 = u64::MAX;

/// How many frames the CFI unwinder walks at most.
pub const UNWIND_DEPTH: usize = 32;

/// How many code mappings of one process the unwinder knows.
pub const MAX_MODULES: usize = 512;

/// How the CFA of an [`UnwindRow`] is found.
pub mod cfa {
    /// No rule we can follow (no CFI, an expression, another register): stop.
    pub const UNKNOWN: u8 = 0;
    /// CFA = rsp + offset.
    pub const RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 2;
    /// The outermost frame (`_start`, a thread's start: the return address is
    /// undefined): the stack is complete.
    pub const END: u8 = 3;
}

/// One row of a module's unwind table: from `pc` (an ELF virtual address of the
/// module, up to the next row's) the caller's frame is found this way. The return
/// address is at CFA - 8 (x86-64's rule everywhere we accept a row).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    /// Added to the register [`UnwindRow::cfa_reg`] names.
    pub cfa_offset: u16,
    /// One of the [`cfa`] constants.
    pub cfa_reg: u8,
    /// 0: rbp is unchanged in this frame; otherwise the caller's rbp is saved at
    /// CFA + 8 * `rbp_slot` (negative).
    pub rbp_slot: i8,
}

/// A module's table: rows `first .. first + rows` of `UNWIND_ROWS`, sorted by pc,
/// and its index: entries `index ..= index + buckets` of `UNWIND_INDEX`.
///
/// The index cuts the module's addresses from `base` (the first row's pc) into
/// buckets of `1 << shift` bytes; entry `b` is the table's last row (counted from
/// `first`) at or below `base + (b << shift)`, and entry `buckets` is its last row.
/// Bucket `b`'s pcs are covered by rows `entry[b] ..= entry[b + 1]`, at most
/// `1 << steps` of them (the daemon picks `shift` so), so the unwinder finds a
/// pc's row in `steps` halvings among neighbouring rows instead of searching the
/// whole table. Pcs past the last bucket belong to the last one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindTable {
    pub first: u32,
    pub rows: u32,
    pub index: u32,
    pub buckets: u32,
    pub base: u32,
    pub shift: u32,
    /// [`INDEX_STEPS_SHORT`] or [`INDEX_STEPS_LONG`].
    pub steps: u32,
}

/// Search steps within a bucket of an index: 5 (32 rows) where the index this
/// takes is small next to the rows (glibc: 0.39 entries a row), else 7 (code
/// whose densest spots would make the short index large). 32 rows always fit a
/// 16-byte bucket (one row per instruction at most), so every table has an index.
pub const INDEX_STEPS_SHORT: u32 = 5;
pub const INDEX_STEPS_LONG: u32 = 7;

/// The smallest bucket of an index, as a shift (16 bytes).
pub const INDEX_MIN_SHIFT: u32 = 4;

impl UnwindTable {
    /// The bucket of module address `pc`: pcs past the last bucket belong to it;
    /// `None` below the first row or when the table has no buckets.
    #[inline(always)]
    pub fn bucket(&self, pc: u32) -> Option<u32> {
        if self.buckets == 0 || pc < self.base {
            return None;
        }
        let b = (pc - self.base) >> (self.shift & 31);
        Some(if b < self.buckets {
            b
        } else {
            self.buckets - 1
        })
    }

    /// Where in the row array the row covering module address `pc` is, given
    /// the index array's entries (`entry_at`) and the row array's pcs (`pc_at`):
    /// the eBPF unwinder's lookup, here so the daemon's tests run the same steps.
    #[inline(always)]
    pub fn find_row(
        &self,
        pc: u32,
        entry_at: impl Fn(u32) -> Option<u32>,
        pc_at: impl Fn(u32) -> Option<u64>,
    ) -> Option<u32> {
        let at = self.index.wrapping_add(self.bucket(pc)?);
        let lo = entry_at(at)?;
        let hi = entry_at(at.wrapping_add(1))?;
        let count = hi.wrapping_sub(lo).wrapping_add(1);
        let long = self.steps == INDEX_STEPS_LONG;
        let most = if long {
            1 << INDEX_STEPS_LONG
        } else {
            1 << INDEX_STEPS_SHORT
        };
        if count == 0 || count > most || hi >= self.rows {
            return None;
        }
        let from = self.first.wrapping_add(lo);
        let pc64 = u64::from(pc);
        // Two copies of the search, each with a constant number of steps.
        let i = if long {
            search(from, count, INDEX_STEPS_LONG, &pc_at, pc64)
        } else {
            search(from, count, INDEX_STEPS_SHORT, &pc_at, pc64)
        }?;
        let row = from.wrapping_add(i);
        (pc_at(row)? <= pc64).then_some(row)
    }
}

/// Is `a <= b`, as 0 or 1, without a branch? (Both below 2^63.)
#[inline(always)]
pub fn at_or_below(a: u64, b: u64) -> u64 {
    (b.wrapping_sub(a) >> 63) ^ 1
}

/// The index (from `first`) of the last of `count` sorted keys at or below `pc`,
/// assuming the first is, in `steps` halvings (enough for `count <= 1 << steps`).
/// Branch-free with a fixed number of steps: in eBPF, a search that branches gives
/// the verifier two paths per step, and it follows them all. `key_at` fails only
/// where the unwinder's map lookups fail.
#[inline(always)]
pub fn search(
    first: u32,
    count: u32,
    steps: u32,
    key_at: impl Fn(u32) -> Option<u64>,
    pc: u64,
) -> Option<u32> {
    let mut base = 0u32;
    let mut n = count;
    for _ in 0..steps {
        let half = n / 2;
        let key = key_at(first.wrapping_add(base + half))?;
        base += half * at_or_below(key, pc) as u32;
        n -= half;
    }
    Some(base)
}

/// One executable mapping of a process: `[start, end)` runs code whose ELF virtual
/// address is `pc - bias`, described by table `table`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleRange {
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub table: u32,
    pub _pad: u32,
}

/// Where the code mappings of one process are: entries `first .. first + count`
/// of `UNWIND_RANGES`, sorted by start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleSlot {
    pub first: u32,
    pub count: u32,
}

/// Counters of the CFI unwinder, per CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwindCount {
    /// Stacks walked.
    Stacks = 0,
    /// Frames produced.
    Frames = 1,
    /// Walks that reached the outermost frame (or a zero return address).
    Complete = 2,
    /// Walks stopped at a pc in no known module (e.g. a library mapped since the
    /// daemon last read the process's maps, or JIT code).
    NoModule = 3,
    /// Walks stopped at a pc whose CFI we cannot follow (or that has none).
    NoRule = 4,
    /// Walks stopped because the stack could not be read.
    ReadFailed = 5,
    /// Walks cut at [`UNWIND_DEPTH`] frames.
    Truncated = 6,
    /// Processes with no module list at all (their tables are not loaded yet).
    NoProcess = 7,
    /// Stacks not walked: the stack still held every word an earlier walk from the
    /// same registers had read, so its result was reused (see the eBPF `memo`).
    Reused = 8,
}

impl UnwindCount {
    pub const COUNT: u32 = 9;
}

/// Tags the first `u32` of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// An allocating call returned a new block ([`UserRecord`]).
    Alloc = 1,
    /// A block was handed back ([`FreeRecord`]).
    Free = 2,
    /// `realloc` was entered with a non-NULL block: from here on the old block may
    /// be released and its address handed to another thread ([`UserRecord`]).
    ReallocDetach = 3,
    /// `realloc` returned ([`UserRecord`]; `addr` 0 means it failed or freed).
    Realloc = 4,
    /// The allocator mapped memory for itself (mmap/mremap inside an allocator call).
    AllocatorMap = 5,
    /// The process unmapped a range.
    Unmap = 6,
    /// The program break moved; `func` is 1 when the allocator moved it.
    Brk = 7,
    /// A traced process created a child process (`addr` is the child's tgid).
    Fork = 8,
    /// A traced process ended (its last thread exited).
    Exit = 9,
    /// A traced process replaced its image with execve.
    Exec = 10,
    /// A kernel slab allocation ([`KernelRecord`]).
    KernelAlloc = 16,
    /// A kernel slab free ([`KernelRecord`]).
    KernelFree = 17,
    /// A page allocation (`--pages`, [`KernelRecord`]).
    PageAlloc = 18,
    /// A page free (`--pages`, [`KernelRecord`]).
    PageFree = 19,
}

/// The tag was not one this version knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownTag(pub u32);

impl TryFrom<u32> for RecordKind {
    type Error = UnknownTag;
    fn try_from(v: u32) -> Result<Self, UnknownTag> {
        Ok(match v {
            1 => Self::Alloc,
            2 => Self::Free,
            3 => Self::ReallocDetach,
            4 => Self::Realloc,
            5 => Self::AllocatorMap,
            6 => Self::Unmap,
            7 => Self::Brk,
            8 => Self::Fork,
            9 => Self::Exit,
            10 => Self::Exec,
            16 => Self::KernelAlloc,
            17 => Self::KernelFree,
            18 => Self::PageAlloc,
            19 => Self::PageFree,
            other => return Err(UnknownTag(other)),
        })
    }
}

/// Which allocator entry point a probe sits on. Passed to the programs as the
/// attach cookie, and carried in records so reports can say how a block was made.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllocFn {
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    Reallocarray = 4,
    PosixMemalign = 5,
    /// `aligned_alloc` and `memalign` (one function in glibc).
    AlignedAlloc = 6,
    Valloc = 7,
    Pvalloc = 8,
    /// `operator new(size_t)` and its nothrow and array forms.
    OperatorNew = 9,
    /// `operator new(size_t, align_val_t)` and its nothrow and array forms.
    OperatorNewAligned = 10,
    /// `free`, `cfree`, and `operator delete` in all its forms.
    Free = 11,
}

impl TryFrom<u32> for AllocFn {
    type Error = UnknownTag;
    fn try_from(v: u32) -> Result<Self, UnknownTag> {
        Ok(match v {
            1 => Self::Malloc,
            2 => Self::Calloc,
            3 => Self::Realloc,
            4 => Self::Reallocarray,
            5 => Self::PosixMemalign,
            6 => Self::AlignedAlloc,
            7 => Self::Valloc,
            8 => Self::Pvalloc,
            9 => Self::OperatorNew,
            10 => Self::OperatorNewAligned,
            11 => Self::Free,
            other => return Err(UnknownTag(other)),
        })
    }
}

/// One user-space allocator or process event. All user-mode records share this
/// layout; which fields are meaningful depends on `kind` (see [`RecordKind`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserRecord {
    /// A [`RecordKind`].
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// An [`AllocFn`] for allocator records; 1 = "made by the allocator" for mapping records.
    pub func: u32,
    /// Where the record falls in the order of all records, taken after its room
    /// in the ring was reserved so that the daemon can merge the rings of all CPUs
    /// (`session/merge.rs`): the next value of the `ORDER` counter all CPUs share
    /// (with `ORDER_BY_COUNTER`), else `bpf_ktime_get_ns()`. Either way a record
    /// whose program ended before another's began has the lower stamp. Not a time
    /// the daemon shows: it dates an allocation when it reads it. At offset 16 in
    /// every record type.
    pub stamp: u64,
    /// The block (or range, or child tgid) the record is about.
    pub addr: u64,
    /// Requested size in bytes (range length for mapping records).
    pub size: u64,
    /// realloc: the block passed in.
    pub old_addr: u64,
    /// Key into the `STACKS` map; 0 when no stack could be captured.
    pub stack_id: u64,
    /// The return address of the allocator call (the allocating call site).
    pub caller: u64,
}

/// A user-mode free: half a [`UserRecord`]. Frees are half of all records,
/// and each one's bytes are copied into the ring, kept there and read back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeRecord {
    /// [`RecordKind::Free`].
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub _pad: u32,
    /// Its place in the order of all records (see [`UserRecord::stamp`]).
    pub stamp: u64,
    /// The block handed back.
    pub addr: u64,
}

/// One kernel-mode allocation or free.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelRecord {
    /// A [`RecordKind`].
    pub kind: u32,
    /// Process (tgid) and thread of the task that was running.
    pub tgid: u32,
    pub tid: u32,
    /// Reserved (0): a tracepoint program cannot tell interrupt context.
    pub in_irq: u32,
    /// `bpf_ktime_get_ns()` when the record was made: the object's birth. Kernel
    /// mode writes one ring, read in its order. At offset 16, where a user
    /// record keeps its stamp.
    pub ts_ns: u64,
    pub ptr: u64,
    pub call_site: u64,
    pub bytes_req: u64,
    pub bytes_alloc: u64,
    /// Key into `KSTACKS`; 0 when none.
    pub stack_id: u64,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Slab cache name (NUL-padded), empty for kmalloc.
    pub cache: [u8; 32],
    pub comm: [u8; 16],
}

/// Kernel mode with both free probes attached: a free is recorded by whichever of
/// the two programs runs first, and the other one, seeing the same pointer in a
/// per-CPU slot, defers. When the kernel skips one program (it never re-enters a
/// raw tracepoint program, and never runs a classic one inside another tracing
/// program), the other still records the free. Indexes into `FREE_PROBES`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeProbeCount {
    /// The raw tracepoint program recorded a free.
    RawRecorded = 0,
    /// The raw tracepoint program found the free already recorded.
    RawDeferred = 1,
    /// The classic tracepoint program recorded a free.
    ClassicRecorded = 2,
    /// The classic tracepoint program found the free already recorded.
    ClassicDeferred = 3,
}

impl FreeProbeCount {
    /// How many counters there are (size of the `FREE_PROBES` array).
    pub const COUNT: u32 = 4;
}

/// Reasons a record could not be made, as indexes into the `LOSSES` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// An allocation record was dropped: the ring buffer was full.
    RingFullAlloc = 0,
    /// A free (or realloc-detach) record was dropped: the ring buffer was full.
    RingFullFree = 1,
    /// Any other record (mapping, process) was dropped: the ring buffer was full.
    RingFullOther = 2,
    /// An allocator call could not be remembered between entry and return: `CALLS` was full.
    CallsFull = 3,
    /// The user stack could not be captured.
    StackCaptureFailed = 4,
    /// The stack map was full, so the record carries no stack.
    StackMapFull = 5,
    /// An allocator call was entered while a stale call record (whose return was
    /// never seen) was still present for the thread; the stale one was replaced.
    StaleCall = 6,
    /// A kernel record was dropped: the ring buffer was full.
    RingFullKernel = 7,
    /// Scratch map for syscalls was full.
    SyscallScratchFull = 8,
}

impl Loss {
    /// How many counters there are (size of the `LOSSES` array).
    pub const COUNT: u32 = 9;
    /// Every counter, in index order.
    pub const ALL: [Loss; Self::COUNT as usize] = [
        Loss::RingFullAlloc,
        Loss::RingFullFree,
        Loss::RingFullOther,
        Loss::CallsFull,
        Loss::StackCaptureFailed,
        Loss::StackMapFull,
        Loss::StaleCall,
        Loss::RingFullKernel,
        Loss::SyscallScratchFull,
    ];

    /// A stable snake_case name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Loss::RingFullAlloc => "ring_full_alloc",
            Loss::RingFullFree => "ring_full_free",
            Loss::RingFullOther => "ring_full_other",
            Loss::CallsFull => "calls_map_full",
            Loss::StackCaptureFailed => "stack_capture_failed",
            Loss::StackMapFull => "stack_map_full",
            Loss::StaleCall => "stale_call",
            Loss::RingFullKernel => "ring_full_kernel",
            Loss::SyscallScratchFull => "syscall_scratch_full",
        }
    }

    /// True when this loss can hide a free, so a block alive at the time may look
    /// leaked although it was freed.
    pub const fn can_hide_free(self) -> bool {
        matches!(self, Loss::RingFullFree | Loss::RingFullKernel)
    }
}

/// An allocator call between its entry and its return, per thread (`CALLS` map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingCall {
    /// Stack pointer at entry; nested and tail calls have a lower or equal one.
    pub sp: u64,
    /// The calling thread, kept for the return probe (which then asks no helper).
    pub tgid: u32,
    pub tid: u32,
    /// The [`AllocFn`] of the outermost allocator call.
    pub func: u32,
    /// 1 when the call came through `operator new` (a wrapper hint flagged
    /// [`HINT_OPERATOR_NEW`]): the block is reported as allocated by new.
    pub via_new: u32,
    pub size: u64,
    /// realloc: the block passed in.
    pub old_addr: u64,
    /// posix_memalign: where the result will be stored.
    pub out_ptr: u64,
    pub stack_id: u64,
    /// The call site, past known wrappers; 0 when the return probe is to find
    /// it (with `via_new`) from the address it returns to.
    pub caller: u64,
}

/// Per-thread scratch between a syscall's entry and exit (`SYSCALLS` map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingSyscall {
    /// 1 when the syscall was made from inside an allocator call.
    pub inside_allocator: u32,
    pub _pad: u32,
    /// mremap: the old range.
    pub old_addr: u64,
    pub old_len: u64,
    /// Length of the new mapping.
    pub len: u64,
}

/// A return address inside an allocation wrapper (operator new, strdup, …) of one
/// process. When an allocator is called from there, the allocating call site is
/// the wrapper's own return address, found `HINTS[key]` bytes further up the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HintKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ret: u64,
}

/// Words (u64) of `HINT_FILTER`: one bit per return address class.
pub const HINT_FILTER_WORDS: u32 = 1 << 12;

/// Where return address `ret` has its bit in `HINT_FILTER`: (word, bit). The daemon
/// sets the bit of every hinted address before it adds the hint; a probe looks a
/// call site up in `HINTS` only when its bit is set. Most call sites are in no
/// wrapper, and a hash-map lookup is a helper call where the filter is a load.
#[inline(always)]
pub const fn hint_filter_bit(ret: u64) -> (u32, u32) {
    let h = ret.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - 18);
    ((h >> 6) as u32 % HINT_FILTER_WORDS, (h & 63) as u32)
}

/// Set in a `HINTS` value when the wrapper is C++'s `operator new` (or `new[]`):
/// valgrind applies some of its leak-check heuristics to such blocks only. The
/// rest of the value is the byte offset.
pub const HINT_OPERATOR_NEW: u32 = 1 << 31;

/// How many wrapper frames the eBPF side looks through.
pub const MAX_WRAPPER_DEPTH: usize = 4;

/// Flags for a traced process (`TARGETS` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetFlags {
    /// Reserved; 1 for now.
    pub traced: u32,
}

/// Byte offsets of the tracepoint fields the programs read on the running kernel,
/// taken from tracefs `format` files at start-up, because they change between
/// kernel versions. An offset of [`TracepointLayout::ABSENT`] means "no such field".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointLayout {
    pub newtask_pid: u32,
    pub newtask_clone_flags: u32,
    pub exit_group_dead: u32,
    pub kmalloc_call_site: u32,
    pub kmalloc_ptr: u32,
    pub kmalloc_bytes_req: u32,
    pub kmalloc_bytes_alloc: u32,
    pub kfree_call_site: u32,
    pub kfree_ptr: u32,
    pub cache_alloc_call_site: u32,
    pub cache_alloc_ptr: u32,
    pub cache_alloc_bytes_req: u32,
    pub cache_alloc_bytes_alloc: u32,
    /// `__data_loc` word of the cache name (offset << 16 | length), or absent.
    pub cache_alloc_name: u32,
    pub cache_free_call_site: u32,
    pub cache_free_ptr: u32,
    pub cache_free_name: u32,
    pub page_alloc_pfn: u32,
    pub page_alloc_order: u32,
    pub page_free_pfn: u32,
    pub page_free_order: u32,
}

impl TracepointLayout {
    /// Marks a field the running kernel does not have.
    pub const ABSENT: u32 = u32::MAX;
    /// Every field absent; programs that need a field do nothing without it.
    pub const fn absent() -> Self {
        let a = Self::ABSENT;
        Self {
            newtask_pid: a,
            newtask_clone_flags: a,
            exit_group_dead: a,
            kmalloc_call_site: a,
            kmalloc_ptr: a,
            kmalloc_bytes_req: a,
            kmalloc_bytes_alloc: a,
            kfree_call_site: a,
            kfree_ptr: a,
            cache_alloc_call_site: a,
            cache_alloc_ptr: a,
            cache_alloc_bytes_req: a,
            cache_alloc_bytes_alloc: a,
            cache_alloc_name: a,
            cache_free_call_site: a,
            cache_free_ptr: a,
            cache_free_name: a,
            page_alloc_pfn: a,
            page_alloc_order: a,
            page_free_pfn: a,
            page_free_order: a,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], made of integers only, with no padding.
    unsafe impl aya::Pod for super::UserRecord {}
    unsafe impl aya::Pod for super::FreeRecord {}
    unsafe impl aya::Pod for super::KernelRecord {}
    unsafe impl aya::Pod for super::PendingCall {}
    unsafe impl aya::Pod for super::PendingSyscall {}
    unsafe impl aya::Pod for super::TargetFlags {}
    unsafe impl aya::Pod for super::TracepointLayout {}
    unsafe impl aya::Pod for super::Stack {}
    unsafe impl aya::Pod for super::HintKey {}
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::UnwindTable {}
    unsafe impl aya::Pod for super::ModuleRange {}
    unsafe impl aya::Pod for super::ModuleSlot {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn every_record_keeps_its_stamp_at_offset_16() {
        // The daemon merges the rings of all CPUs by this field, whatever the kind.
        assert_eq!(core::mem::offset_of!(UserRecord, stamp), 16);
        assert_eq!(core::mem::offset_of!(FreeRecord, stamp), 16);
        assert_eq!(core::mem::offset_of!(KernelRecord, ts_ns), 16);
    }

    #[test]
    fn records_have_no_padding() {
        assert_eq!(size_of::<UserRecord>(), 4 * 4 + 6 * 8);
        assert_eq!(size_of::<KernelRecord>(), 4 * 4 + 7 * 8 + 32 + 16);
        assert_eq!(size_of::<FreeRecord>(), 4 * 8);
        assert_eq!(size_of::<PendingCall>(), 8 * 8);
        assert_eq!(size_of::<TracepointLayout>(), 21 * 4);
        assert_eq!(size_of::<Stack>(), STACK_DEPTH * 8);
        assert_eq!(size_of::<UnwindRow>(), 8);
        assert_eq!(size_of::<UnwindTable>(), 7 * 4);
        assert_eq!(size_of::<ModuleRange>(), 32);
        assert_eq!(size_of::<ModuleSlot>(), 8);
    }

    #[test]
    fn tags_round_trip() {
        for v in 0..64 {
            if let Ok(k) = RecordKind::try_from(v) {
                assert_eq!(k as u32, v);
            }
            if let Ok(f) = AllocFn::try_from(v) {
                assert_eq!(f as u32, v);
            }
        }
        assert_eq!(RecordKind::try_from(99), Err(UnknownTag(99)));
    }

    #[test]
    fn hint_filter_bits_are_in_range_and_spread() {
        let mut words = [0u32; 1000];
        for (i, w) in words.iter_mut().enumerate() {
            let (word, bit) = hint_filter_bit(0x7f12_3456_0000 + i as u64 * 0x35);
            assert!(word < HINT_FILTER_WORDS && bit < 64);
            *w = word;
        }
        // Call sites a few bytes apart must not crowd into a few words.
        words.sort_unstable();
        let distinct = 1 + words.windows(2).filter(|p| p[0] != p[1]).count();
        assert!(distinct > 800, "{distinct} words");
    }

    #[test]
    fn loss_table_is_complete() {
        for (i, l) in Loss::ALL.iter().enumerate() {
            assert_eq!(*l as usize, i);
        }
    }
}
