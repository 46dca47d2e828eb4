//! The CFI unwinder: whole user stacks on code built without frame pointers.
//!
//! `bpf_get_stack` follows frame pointers, which distributions leave out, so at an
//! allocation in such code it returns one or two frames. Here the stack is walked
//! with tables the daemon built from each module's `.eh_frame`/`.debug_frame`
//! (`UNWIND_ROWS`, shared by every process that maps the module): per frame, find
//! the module of the pc (the process's code mappings, looked up in `UNWIND_MODULES`
//! once a walk; a binary search unless the pc is in the previous frame's module),
//! then its row (the table's index names the few rows of the pc's bucket, a short
//! binary search among them), compute the CFA from rsp or rbp, read the return
//! address at CFA - 8 and, when the row says so, the caller's rbp.
//! A frame whose rule we cannot follow ends the stack with
//! [`FRAME_UNWIND_STOPPED`], counted by reason in `UNWIND_COUNTS`: never a guess.
//! The stack is stored like a frame-pointer one (content hash into `STACKS`).
//! The frame loop is `bpf_loop` (Linux 5.17+; the daemon falls back to frame
//! pointers where this program does not load).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::generated::{bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use leak_common::{
    FRAME_UNWIND_STOPPED, MAX_MODULES, ModuleRange, ModuleSlot, STACK_DEPTH, UNWIND_DEPTH,
    UnwindCount, UnwindRow, UnwindTable, cfa, search,
};

use crate::{
    maps::{STACK_SCRATCH, STACKS},
    record::{bump, store_stack},
};

/// Rows of every module's table, back to back. Sized by the daemon at load time.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1 << 20, 0);

/// Table id -> its slice of `UNWIND_ROWS` and of `UNWIND_INDEX`. Id 0 is never used.
#[map]
pub static UNWIND_TABLES: Array<UnwindTable> = Array::with_max_entries(4096, 0);

/// Every table's index (see [`UnwindTable`]), back to back. Sized by the daemon.
#[map]
pub static UNWIND_INDEX: Array<u32> = Array::with_max_entries(1 << 18, 0);

/// Where each traced process's code mappings are in `UNWIND_RANGES`.
#[map]
pub static UNWIND_MODULES: HashMap<u32, ModuleSlot> = HashMap::with_max_entries(4096, 0);

/// Code mappings, `MAX_MODULES` per process slot. Sized by the daemon at load time.
#[map]
pub static UNWIND_RANGES: Array<ModuleRange> = Array::with_max_entries(MAX_MODULES as u32, 0);

/// The frames of the walk in progress, per CPU. Written through map lookups, not
/// by index into one value: the verifier would then track the frame number
/// exactly and check the loop body once per frame.
#[map]
pub static UNWIND_FRAMES: PerCpuArray<u64> = PerCpuArray::with_max_entries(UNWIND_DEPTH as u32, 0);

/// Bytes of user stack read at once: one read serves the frames above it
/// (a read costs ~60-100 ns here, whatever its size up to a few hundred bytes).
const WINDOW_BYTES: u64 = 512;
const WINDOW_WORDS: usize = WINDOW_BYTES as usize / 8;

/// What the walk in progress keeps from frame to frame, per CPU: the previous
/// frame's module (a [`ModuleRange`]), a copy of part of the user stack, and the
/// stack words the walk read (for `site.rs`).
/// In a map value rather than in [`Walk`] on the probe's stack: the verifier
/// tracks what the program stores on its stack, and checks the frame callback
/// again for every new combination it can see there (a module cache in `Walk`
/// took it from 0.25 to 0.9 of its 1M-instruction budget); map values it does
/// not track.
#[repr(C)]
pub struct WalkScratch {
    module_start: u64,
    module_end: u64,
    module_bias: u64,
    /// The user stack from `window_start` is in `words` (`WINDOW_BYTES` of it),
    /// unless `window_len` is 0 (nothing read yet this walk).
    window_start: u64,
    window_len: u64,
    module_table: u32,
    /// 1 while the walk's rbp is still the probe's register (no frame has
    /// restored a saved one yet).
    rbp_from_regs: u32,
    /// The stack pointer at the probe: read offsets are relative to it.
    entry_sp: u64,
    /// Stack words read so far; more than `MEMO_WORDS` when the walk cannot be
    /// remembered (too many words, or one could not be read). A u64: as a u32,
    /// the compiler bounds-checked one zero-extended copy and indexed with
    /// another, which the verifier refuses.
    pub read_count: u64,
    /// 1 when a CFA was computed from the probe's own rbp.
    pub uses_rbp: u32,
    _pad: u32,
    pub read_offsets: [u32; MEMO_WORDS],
    pub read_values: [u64; MEMO_WORDS],
    words: [u64; WINDOW_WORDS],
}

/// Stack words a walk may read and still be remembered (`site.rs`): at most two
/// per frame (return address, saved rbp) of `UNWIND_DEPTH` frames, and the call
/// site's words (the return address, one per wrapper followed).
pub const MEMO_WORDS: usize = 72;

/// `read_count` of a walk that cannot be remembered.
const UNREMEMBERED: u64 = MEMO_WORDS as u64 + 1;

#[map]
pub static UNWIND_SCRATCH: PerCpuArray<WalkScratch> = PerCpuArray::with_max_entries(1, 0);

/// What the walks met, per CPU, by [`UnwindCount`].
#[map]
pub static UNWIND_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(UnwindCount::COUNT, 0);

/// Binary search steps: enough for `MAX_MODULES` ranges.
const MODULE_STEPS: u32 = 10;

#[inline(always)]
fn note(what: UnwindCount) {
    bump(&UNWIND_COUNTS, what as u32);
}

/// The module range holding `pc`, if any.
#[inline(always)]
fn module_of(slot: ModuleSlot, pc: u64) -> Option<ModuleRange> {
    if slot.count == 0 || slot.count as usize > MAX_MODULES {
        return None;
    }
    let start_of = |i: u32| UNWIND_RANGES.get(i).map(|r| r.start);
    let i = search(slot.first, slot.count, MODULE_STEPS, start_of, pc)?;
    let range = *UNWIND_RANGES.get(slot.first.wrapping_add(i))?;
    (range.start <= pc && pc < range.end).then_some(range)
}

/// The row of `table` that covers module address `pc`, if any: among the few
/// rows the index gives for the pc's bucket (neighbours in the array: a cache
/// line or two), by [`UnwindTable::find_row`].
#[inline(always)]
fn row_of(table: &UnwindTable, pc: u32) -> Option<UnwindRow> {
    let entry_at = |i: u32| UNWIND_INDEX.get(i).copied();
    let pc_at = |i: u32| UNWIND_ROWS.get(i).map(|r| u64::from(r.pc));
    let i = table.find_row(pc, entry_at, pc_at)?;
    UNWIND_ROWS.get(i).copied()
}

/// Makes the walk's window hold the user stack from `lo` up to `hi` (a frame's
/// slots, at most `WINDOW_BYTES` apart): unless it does already, it is read
/// again, `WINDOW_BYTES` of it from `lo` on (walks go up the stack, so the frames
/// above find their slots there too), or, where that runs past the top of the
/// stack, the `WINDOW_BYTES` below `hi` (in use or mapped: a thread's stack is one
/// mapping, the main thread's starts with 128 KiB). Always a constant size:
/// older verifiers (6.1) lose the bounds of a variable size the compiler kept on
/// the stack. False when the stack cannot be read.
#[inline(always)]
pub fn fill(sc: *mut WalkScratch, lo: u64, hi: u64) -> bool {
    let len = hi.wrapping_sub(lo);
    if len > WINDOW_BYTES {
        return false;
    }
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    let sc = unsafe { &mut *sc };
    if sc.window_len != 0 && lo.wrapping_sub(sc.window_start) <= WINDOW_BYTES - len {
        return true;
    }
    let words = (&raw mut sc.words).cast::<c_void>();
    // SAFETY: WINDOW_BYTES into the window; the helper checks the user address
    // and fails cleanly.
    let read = |from: u64| unsafe {
        bpf_probe_read_user(words, WINDOW_BYTES as u32, from as *const c_void) == 0
    };
    let below_hi = hi.wrapping_sub(WINDOW_BYTES);
    let start = if read(lo) {
        lo
    } else if read(below_hi) {
        below_hi
    } else {
        sc.window_len = 0;
        return false;
    };
    sc.window_start = start;
    sc.window_len = WINDOW_BYTES;
    true
}

/// The user stack word at `addr`, read alone.
#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    let mut word = 0u64;
    // SAFETY: 8 bytes into our own variable; the helper checks the user address
    // and fails cleanly.
    let failed = unsafe { bpf_probe_read_user((&raw mut word).cast(), 8, addr as *const c_void) };
    (failed == 0).then_some(word)
}

/// The user stack word at `addr`, which the window holds (see [`fill`]).
#[inline(always)]
pub fn word(sc: *const WalkScratch, addr: u64) -> Option<u64> {
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    let sc = unsafe { &*sc };
    let i = (addr.wrapping_sub(sc.window_start) / 8) as usize;
    (i < WINDOW_WORDS).then(|| sc.words[i])
}

/// Notes that the walk read `value` at `addr` (see `site.rs`).
#[inline(always)]
pub fn remember(sc: *mut WalkScratch, addr: u64, value: u64) {
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    let sc = unsafe { &mut *sc };
    let n = sc.read_count;
    let offset = addr.wrapping_sub(sc.entry_sp);
    if n as usize >= MEMO_WORDS || offset > u64::from(u32::MAX) {
        sc.read_count = UNREMEMBERED;
        return;
    }
    sc.read_offsets[n as usize] = offset as u32;
    sc.read_values[n as usize] = value;
    sc.read_count = n + 1;
}

/// The walk's result depends on more than the words it read: never reuse it.
#[inline(always)]
pub fn unrememberable(sc: *mut WalkScratch) {
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    unsafe { (*sc).read_count = UNREMEMBERED };
}

/// This CPU's scratch.
#[inline(always)]
pub fn scratch() -> Option<*mut WalkScratch> {
    UNWIND_SCRATCH.get_ptr_mut(0)
}

/// The scratch, ready for a walk from stack pointer `sp`: no module, no stack
/// window, no words read.
#[inline(always)]
pub fn begin(sp: u64) -> Option<*mut WalkScratch> {
    let sc = UNWIND_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    unsafe {
        (*sc).module_end = 0;
        (*sc).window_len = 0;
        (*sc).entry_sp = sp;
        (*sc).read_count = 0;
        (*sc).rbp_from_regs = 1;
        (*sc).uses_rbp = 0;
    }
    Some(sc)
}

/// How one frame step ended.
enum Step {
    /// The caller's registers: (pc, sp, rbp).
    Caller(u64, u64, u64),
    /// The stack is complete.
    End,
    /// The walk cannot go on: why.
    Stop(UnwindCount),
}

/// Unwinds one frame of `walk`: from its pc (exact for the first frame, a return
/// address after: `after_first` is 1 then) to the caller's registers.
#[inline(always)]
fn step(walk: &Walk, after_first: u64) -> Step {
    let (pc, sp, rbp) = (walk.pc, walk.sp, walk.rbp);
    // A return address may point past the last instruction of its function (a
    // call to a noreturn function): look up the call instruction instead. The
    // first frame's pc is exact.
    let lookup = pc.wrapping_sub(after_first);
    let Some(sc) = UNWIND_SCRATCH.get_ptr_mut(0) else {
        return Step::Stop(UnwindCount::NoModule);
    };
    // Most callers are in the module of their callee: search only when not.
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    let cached = unsafe { (*sc).module_start <= lookup && lookup < (*sc).module_end };
    if !cached {
        let Some(range) = module_of(walk.modules, lookup) else {
            return Step::Stop(UnwindCount::NoModule);
        };
        // SAFETY: as above.
        unsafe {
            (*sc).module_start = range.start;
            (*sc).module_end = range.end;
            (*sc).module_bias = range.bias;
            (*sc).module_table = range.table;
        }
    }
    // SAFETY: as above.
    let (bias, table) = unsafe { ((*sc).module_bias, (*sc).module_table) };
    let offset = lookup.wrapping_sub(bias);
    if offset > u64::from(u32::MAX) {
        return Step::Stop(UnwindCount::NoRule);
    }
    let Some(table) = UNWIND_TABLES.get(table) else {
        return Step::Stop(UnwindCount::NoRule);
    };
    let Some(row) = row_of(table, offset as u32) else {
        return Step::Stop(UnwindCount::NoRule);
    };
    let base = match row.cfa_reg {
        cfa::RSP => sp,
        cfa::RBP => {
            // SAFETY: as above.
            unsafe { (*sc).uses_rbp |= (*sc).rbp_from_regs };
            rbp
        }
        cfa::END => return Step::End,
        _ => return Step::Stop(UnwindCount::NoRule),
    };
    let cfa = base.wrapping_add(u64::from(row.cfa_offset));
    // The return address is at CFA - 8, the saved rbp (if any) below it: both
    // from one window, unless rbp was saved too far below (then read alone).
    let ra_at = cfa.wrapping_sub(8);
    let rbp_at = cfa.wrapping_add((i64::from(row.rbp_slot) * 8) as u64);
    let rbp_near = cfa.wrapping_sub(rbp_at).wrapping_sub(1) < WINDOW_BYTES;
    let lo = if row.rbp_slot != 0 && rbp_near {
        rbp_at
    } else {
        ra_at
    };
    // Slots are 8-byte aligned (the ABI aligns the CFA to 16 bytes); the window
    // is read in words.
    if (ra_at | lo) & 7 != 0 || !fill(sc, lo, cfa) {
        unrememberable(sc);
        return Step::Stop(UnwindCount::ReadFailed);
    }
    let Some(ret) = word(sc, ra_at) else {
        unrememberable(sc);
        return Step::Stop(UnwindCount::ReadFailed);
    };
    remember(sc, ra_at, ret);
    let caller_rbp = if row.rbp_slot == 0 {
        Some(rbp)
    } else if rbp_near {
        word(sc, rbp_at)
    } else {
        read_user(rbp_at)
    };
    let Some(caller_rbp) = caller_rbp else {
        unrememberable(sc);
        return Step::Stop(UnwindCount::ReadFailed);
    };
    if row.rbp_slot != 0 {
        remember(sc, rbp_at, caller_rbp);
        // SAFETY: as above.
        unsafe { (*sc).rbp_from_regs = 0 };
    }
    if ret == 0 {
        return Step::End;
    }
    Step::Caller(ret, cfa, caller_rbp)
}

/// The state of one walk, on the probe's stack, handed to [`walk_frame`].
#[repr(C)]
struct Walk {
    pc: u64,
    sp: u64,
    rbp: u64,
    /// The process's code mappings, looked up once a walk.
    modules: ModuleSlot,
    /// Frames written so far.
    depth: u32,
    /// How the walk ended, an [`UnwindCount`] (`Truncated` until it ends).
    end: u32,
}

/// One frame of a walk, run by `bpf_loop`: the verifier checks this body once,
/// not once per frame (bounded loops nested in a frame loop exceed its budget).
/// Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn walk_frame(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `capture` gave it: its own Walk.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    let Some(slot) = UNWIND_FRAMES.get_ptr_mut(walk.depth) else {
        return 1; // UNWIND_DEPTH frames written
    };
    // SAFETY: this CPU's value, valid and aligned during the run.
    unsafe { *slot = walk.pc };
    // 0 for the first frame, else 1, without a branch (see `search`).
    let after_first = (u64::from(walk.depth) + 0xffff_ffff) >> 32;
    walk.depth += 1;
    match step(walk, after_first) {
        Step::Caller(pc, sp, rbp) => {
            (walk.pc, walk.sp, walk.rbp) = (pc, sp, rbp);
            0
        }
        Step::End => {
            walk.end = UnwindCount::Complete as u32;
            1
        }
        Step::Stop(why) => {
            walk.end = why as u32;
            1
        }
    }
}

/// Walks the user stack of `tgid` from the probe's registers and stores it in
/// `STACKS`; returns its key, or 0 when nothing could be stored (counted).
/// `sc` is the scratch from [`begin`], for these registers.
#[inline(always)]
pub fn capture(regs: &pt_regs, tgid: u32, sc: *mut WalkScratch) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    note(UnwindCount::Stacks);
    let mut walk = Walk {
        pc: regs.rip,
        sp: regs.rsp,
        rbp: regs.rbp,
        modules: ModuleSlot::default(),
        depth: 0,
        end: UnwindCount::NoProcess as u32,
    };
    if let Some(modules) = UNWIND_MODULES.get_ptr(&tgid) {
        // SAFETY: a map value from get_ptr is valid and aligned during the run.
        walk.modules = unsafe { *modules };
        walk.end = UnwindCount::Truncated as u32;
        // SAFETY: the callback is a BPF function taking (index, ctx); ctx is our
        // own stack variable, alive for the whole call.
        unsafe {
            bpf_loop(
                UNWIND_DEPTH as u32,
                walk_frame as *mut c_void,
                (&raw mut walk).cast(),
                0,
            )
        };
    } else {
        // The tables are on their way: do not remember a stack of one frame.
        unrememberable(sc);
    }
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    let frames = unsafe { &mut (*buf).frames };
    for i in 0..UNWIND_DEPTH {
        if i as u32 >= walk.depth {
            break;
        }
        if let Some(frame) = UNWIND_FRAMES.get(i as u32) {
            frames[i] = *frame;
        }
    }
    let mut depth = walk.depth as usize;
    if depth == 0 {
        // No module list for this process yet: the pc alone, then the marker.
        frames[0] = regs.rip;
        depth = 1;
    }
    let end = walk.end;
    if end == UnwindCount::Complete as u32 {
        note(UnwindCount::Complete);
    } else if end == UnwindCount::Truncated as u32 {
        note(UnwindCount::Truncated);
    } else {
        if end < UnwindCount::COUNT {
            bump(&UNWIND_COUNTS, end);
        }
        if depth < STACK_DEPTH {
            frames[depth] = FRAME_UNWIND_STOPPED;
            depth += 1;
        }
    }
    if depth < STACK_DEPTH {
        frames[depth] = 0;
    }
    if let Some(counter) = UNWIND_COUNTS.get_ptr_mut(UnwindCount::Frames as u32) {
        // SAFETY: the map value is a live, aligned u64 for the program's duration.
        unsafe { *counter += depth as u64 };
    }
    store_stack(buf, &STACKS)
}
