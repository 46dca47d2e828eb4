//! Helpers every program uses: who is running, is it traced, write a record or count
//! why not, capture a stack.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_stack},
    maps::HashMap,
};
use leak_common::{Loss, STACK_DEPTH, Stack, UserRecord};

use aya_ebpf::maps::PerCpuArray;

use crate::maps::{EVENTS, LOSSES, RING_WRITTEN, STACK_SCRATCH, TARGETS, wakeup_bytes};

/// `bpf_get_stack` flag: walk the user stack instead of the kernel one.
pub const USER_STACK: u64 = 1 << 8;

/// (tgid, tid) of the running task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
pub fn is_target(tgid: u32) -> bool {
    TARGETS.get_ptr(&tgid).is_some()
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: the helper takes no arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Counts one record that could not be made.
#[inline(always)]
pub fn count(loss: Loss) {
    bump(&LOSSES, loss as u32);
}

/// Adds one to a per-CPU counter. No other CPU writes the slot; in kernel mode a
/// program nested on the same CPU between the load and the store (a window of two
/// instructions) could lose one count. The BPF target has no atomic add in `core`.
#[inline(always)]
pub fn bump(counters: &PerCpuArray<u64>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: the map value is a live, aligned u64 for the program's duration.
        unsafe { *counter += 1 };
    }
}

/// Ring-buffer flags for a write of `bytes`: wake the reader only when enough is
/// waiting. Each CPU counts what it wrote since it last woke the reader and wakes it
/// at its share of `WAKEUP_BYTES`. Asking the ring how much is waiting
/// (`bpf_ringbuf_query`) would be exact but costs a helper call per record, and a
/// helper call is the dearest thing a probe does on kernels that guard every return.
#[inline(always)]
pub fn wakeup_flags(bytes: u64) -> u64 {
    let Some(written) = RING_WRITTEN.get_ptr_mut(0) else {
        return BPF_RB_NO_WAKEUP as u64;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid during the run.
    let total = unsafe { *written } + bytes;
    if total >= wakeup_bytes() {
        // SAFETY: as above.
        unsafe { *written = 0 };
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        // SAFETY: as above.
        unsafe { *written = total };
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Writes a user-mode record, or counts it under `loss` when the ring is full.
///
/// The record is copied field by field with volatile stores. Built in place, the
/// zero fields of a record (`..UserRecord::default()`) become a call to a memset
/// that writes a byte at a time, dearer than the rest of a free's probe; volatile
/// stores cannot be merged into one.
#[inline(always)]
pub fn emit(record: &UserRecord, loss: Loss) {
    let mut out = MaybeUninit::<UserRecord>::uninit();
    let to = out.as_mut_ptr();
    // SAFETY: every field of `out` is written before it is read; the pointers are
    // to fields of our own stack variable.
    let out = unsafe {
        write_volatile(&raw mut (*to).kind, record.kind);
        write_volatile(&raw mut (*to).tgid, record.tgid);
        write_volatile(&raw mut (*to).tid, record.tid);
        write_volatile(&raw mut (*to).func, record.func);
        write_volatile(&raw mut (*to).ts_ns, record.ts_ns);
        write_volatile(&raw mut (*to).addr, record.addr);
        write_volatile(&raw mut (*to).size, record.size);
        write_volatile(&raw mut (*to).old_addr, record.old_addr);
        write_volatile(&raw mut (*to).stack_id, record.stack_id);
        write_volatile(&raw mut (*to).caller, record.caller);
        out.assume_init_ref()
    };
    if EVENTS
        .output::<UserRecord>(out, wakeup_flags(size_of::<UserRecord>() as u64))
        .is_err()
    {
        count(loss);
    }
}

/// Captures the current stack (user or kernel, by `flags`) into `map` and returns
/// its key, or 0 when it could not be captured or stored (counted).
#[inline(always)]
pub fn capture_stack<C: EbpfContext>(ctx: &C, map: &HashMap<u64, Stack>, flags: u64) -> u64 {
    let Some(buf) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: buf is this CPU's scratch value, and the write is bounded by its size.
    let copied = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.cast(),
            core::mem::size_of::<Stack>() as u32,
            flags,
        )
    };
    if copied <= 0 {
        count(Loss::StackCaptureFailed);
        return 0;
    }
    // bpf_get_stack zeroes what it did not fill, so a 0 frame ends the stack.
    store_stack(buf, map)
}

/// Stores the stack in the scratch buffer `buf` (ended by a 0 frame or full) in
/// `map` under a hash of its frames; returns the hash, or 0 when the map is full
/// (counted).
#[inline(always)]
pub fn store_stack(buf: *mut Stack, map: &HashMap<u64, Stack>) -> u64 {
    // SAFETY: a map value from get_ptr_mut is valid and aligned during the run.
    let frames = unsafe { &(*buf).frames };
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for frame in frames.iter().take(STACK_DEPTH) {
        if *frame == 0 {
            break;
        }
        hash = (hash ^ *frame).wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= hash >> 29;
    }
    if hash == 0 {
        hash = 1;
    }
    if map.get_ptr(&hash).is_none() {
        // EEXIST means another CPU stored the same stack first: that is fine.
        // SAFETY: a map value from get_ptr_mut is valid and aligned during the run.
        if let Err(err) = map.insert(&hash, unsafe { &*buf }, BPF_NOEXIST as u64)
            && err != -17
        {
            count(Loss::StackMapFull);
            return 0;
        }
    }
    hash
}
