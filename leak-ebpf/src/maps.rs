//! The maps and globals shared by all programs. Sizes here are defaults: the daemon
//! resizes the ring buffer and the stack maps at load time from its options.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps,
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use leak_common::{
    FreeProbeCount, HINT_FILTER_WORDS, HintKey, Loss, PendingCall, PendingSyscall, Stack,
    TargetFlags, TracepointLayout,
};

/// Every record of kernel mode, and of user mode on a CPU without a ring of its
/// own in `CPU_RINGS`, in reservation order.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// One ring per CPU for user mode, made and put in by the daemon (the size here
/// is only the template's). Probes on two CPUs writing one ring wait on each
/// other's lock and positions: at two threads that was most of what a record
/// cost. Records from different rings are put back in order by the daemon, by
/// the stamp each carries (`record.rs`).
#[btf_map]
pub static CPU_RINGS: btf_maps::ArrayOfMaps<btf_maps::RingBuf<u8, { 1 << 20 }>, 4096> =
    btf_maps::ArrayOfMaps::new();

/// The counter user-mode records take their stamps from, with `ORDER_BY_COUNTER`
/// (`record::stamp`); the daemon reads it when it starts a drain.
#[map]
pub static ORDER: Array<u64> = Array::with_max_entries(1, 0);

/// Bytes this CPU wrote to `EVENTS` since it last woke the reader.
#[map]
pub static RING_WRITTEN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// What could not be recorded, per CPU, indexed by [`Loss`].
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(Loss::COUNT, 0);

/// The processes being traced (tgid).
#[map]
pub static TARGETS: HashMap<u32, TargetFlags> = HashMap::with_max_entries(4096, 0);

/// The outermost allocator call each thread is in, between entry and return, on
/// kernels without task storage for uprobes (`calls.rs`).
#[map]
pub static CALLS: HashMap<u32, PendingCall> = HashMap::with_max_entries(1 << 16, 0);

/// Call sites inside allocation wrappers, filled by the daemon (see [`HintKey`]).
#[map]
pub static HINTS: HashMap<HintKey, u32> = HashMap::with_max_entries(1 << 14, 0);

/// The bits of the return addresses `HINTS` may hold: a call site whose bit is
/// clear is in no wrapper (see [`leak_common::hint_filter_bit`]).
#[map]
pub static HINT_FILTER: Array<u64> = Array::with_max_entries(HINT_FILTER_WORDS, 0);

/// mmap/mremap arguments between syscall entry and exit, per thread.
#[map]
pub static SYSCALLS: HashMap<u32, PendingSyscall> = HashMap::with_max_entries(1 << 14, 0);

/// User stacks by content hash. Not preallocated: only distinct stacks use memory.
#[map]
pub static STACKS: HashMap<u64, Stack> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// Kernel stacks by content hash (kernel slab mode).
#[map]
pub static KSTACKS: HashMap<u64, Stack> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// One stack-sized scratch buffer per CPU (too big for the 512-byte BPF stack).
#[map]
pub static STACK_SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);

/// Kernel mode `--cgroup`: the cgroup ids to trace.
#[map]
pub static CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// Kernel mode, both free probes: the last pointer recorded as freed on this CPU.
#[map]
pub static FREE_SLOT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Kernel mode, both free probes: how they shared the frees, by [`FreeProbeCount`].
#[map]
pub static FREE_PROBES: PerCpuArray<u64> = PerCpuArray::with_max_entries(FreeProbeCount::COUNT, 0);

/// Set by the daemon: trace the children of traced processes.
#[unsafe(no_mangle)]
static FOLLOW_FORKS: u32 = 0;

/// Set by the daemon: records are written without waking the reader (which polls
/// every few milliseconds) until one CPU wrote this many bytes since it last woke
/// it: a wakeup per record would cost more than the record.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 1 << 20;

/// Set by the daemon when the kernel lets uprobe programs use task-local storage:
/// calls in flight live there instead of in `CALLS` (see `calls.rs`).
#[unsafe(no_mangle)]
static USE_TASK_CALLS: u32 = 0;

/// Set by the daemon when records are stamped from the `ORDER` counter rather
/// than with the clock: on a machine of few CPUs, where the counter's cache line
/// moves between them in less time than a clock read takes.
#[unsafe(no_mangle)]
static ORDER_BY_COUNTER: u32 = 0;

/// Set by the daemon when every allocator uprobe is attached for one process only
/// (no `--follow-forks`): the kernel runs the programs for the targets alone, so
/// they need not look the process up in `TARGETS`.
#[unsafe(no_mangle)]
static SCOPED_PROBES: u32 = 0;

/// Set by the daemon for the overhead benchmark's floor: the allocator probes
/// return at once, so what is left is the cost of the traps themselves.
#[unsafe(no_mangle)]
static EMPTY_PROBES: u32 = 0;

/// Set by the daemon (`--sample N`): kernel mode keeps one object in 2^shift.
#[unsafe(no_mangle)]
static SAMPLE_SHIFT: u32 = 0;

/// Set by the daemon: capture allocation stacks (`--no-stacks` clears it).
#[unsafe(no_mangle)]
static CAPTURE_STACKS: u32 = 1;

/// Set by the daemon: how user stacks are captured ([`leak_common::StackMode`]).
#[unsafe(no_mangle)]
static STACK_MODE: u32 = 0;

/// Set by the daemon: kernel mode traces only the tgids in `TARGETS`.
#[unsafe(no_mangle)]
static KERNEL_FILTER_PIDS: u32 = 0;

/// Set by the daemon: kernel mode traces only the cgroups in `CGROUPS`.
#[unsafe(no_mangle)]
static KERNEL_FILTER_CGROUPS: u32 = 0;

/// Set by the daemon: kernel mode has a raw and a classic program on each free
/// tracepoint, which share the work through `FREE_SLOT`.
#[unsafe(no_mangle)]
static DUAL_FREE_PROBES: u32 = 0;

/// Set by the daemon from tracefs: where the tracepoint fields are on this kernel.
#[unsafe(no_mangle)]
static TP_LAYOUT: TracepointLayout = TracepointLayout::absent();

// Globals must be read with volatile loads, or the compiler folds in the defaults
// above instead of the values the daemon wrote at load time.

pub fn follow_forks() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const FOLLOW_FORKS) != 0 }
}

pub fn use_task_calls() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const USE_TASK_CALLS) != 0 }
}

pub fn scoped_probes() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const SCOPED_PROBES) != 0 }
}

pub fn order_by_counter() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const ORDER_BY_COUNTER) != 0 }
}

pub fn empty_probes() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const EMPTY_PROBES) != 0 }
}

pub fn wakeup_bytes() -> u64 {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const WAKEUP_BYTES) }
}

/// Is the kernel object at `ptr` in the sample? The same answer for its allocation
/// and its free.
#[inline(always)]
pub fn sampled(ptr: u64) -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    let shift = unsafe { core::ptr::read_volatile(&raw const SAMPLE_SHIFT) };
    if shift == 0 || shift >= 32 {
        return true;
    }
    let mixed = (ptr ^ (ptr >> 21)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    mixed & ((1u64 << shift) - 1) == 0
}

pub fn capture_stacks() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const CAPTURE_STACKS) != 0 }
}

/// Are user stacks walked with the CFI unwinder (rather than frame pointers)?
pub fn cfi_stacks() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const STACK_MODE) == leak_common::StackMode::Cfi as u32 }
}

pub fn kernel_filter_pids() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const KERNEL_FILTER_PIDS) != 0 }
}

pub fn kernel_filter_cgroups() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const KERNEL_FILTER_CGROUPS) != 0 }
}

pub fn dual_free_probes() -> bool {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const DUAL_FREE_PROBES) != 0 }
}

pub fn layout() -> TracepointLayout {
    // SAFETY: a global the daemon wrote before load; reading it has no precondition.
    unsafe { core::ptr::read_volatile(&raw const TP_LAYOUT) }
}
