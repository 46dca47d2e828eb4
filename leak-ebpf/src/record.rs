//! Helpers every program uses: who is running, is it traced, write a record or count
//! why not, capture a stack.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_smp_processor_id, bpf_get_stack, bpf_ringbuf_reserve, bpf_ringbuf_submit,
        },
    },
    maps::{HashMap, PerCpuArray},
};
use leak_common::{FreeRecord, Loss, RecordKind, STACK_DEPTH, Stack, UserRecord};

use crate::maps::{
    CPU_RINGS, EVENTS, LOSSES, ORDER, RING_WRITTEN, STACK_SCRATCH, TARGETS, order_by_counter,
    wakeup_bytes,
};

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

/// The stamp of a record whose room was just reserved: its place in the order
/// of all records, across the rings of all CPUs.
///
/// With `ORDER_BY_COUNTER`, the counter all CPUs share, read after an atomic add:
/// the value read is at least the add's result, so a record whose program ended
/// before another's began has the lower stamp, and a record the daemon has not
/// seen when it reads the counter at S (the start of a drain) gets a stamp above
/// S. Two programs running at once may read the same value; they cannot be about
/// one block (a block changes hands only after its program has ended). On a
/// machine of few CPUs the add (the counter's cache line, moving between CPUs)
/// costs less than a clock read; on a big one, many CPUs would wait on that
/// line, and the clock orders records the same way.
#[inline(always)]
fn stamp() -> u64 {
    if !order_by_counter() {
        return now_ns();
    }
    // Slot 0 of a one-slot array is always there. A 0 would be taken as the
    // ring's last stamp (ring order kept); a time would hold the merge back.
    let Some(counter) = ORDER.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the map value is a live, aligned u64 for the program's duration;
    // the add is atomic (BPF_ATOMIC), the read a plain aligned load.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
            counter, 1,
        );
        core::ptr::read_volatile(counter)
    }
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

/// Reserves room for a `T` in this CPU's ring (`CPU_RINGS`; `EVENTS` when the
/// daemon gave the CPU none), has `fill` write it with its [`stamp`], and commits
/// it; or counts it under `loss` when the ring is full.
///
/// The stamp is taken after the reservation. A record the daemon has not seen
/// when it starts a drain at stamp S is either still being written (the drain
/// stops at it) or not reserved yet, and then carries a stamp above S: so the
/// daemon can put records from all rings in order of their stamps, and never
/// apply one before an earlier one it has yet to see. The fields are written one
/// by one into the ring: a record built on the stack from `default()` becomes a
/// byte-at-a-time memset, and a copy is one more pass.
#[inline(always)]
fn write<T>(loss: Loss, fill: impl FnOnce(*mut T, u64)) {
    let size = size_of::<T>() as u64;
    // SAFETY: the helper takes no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // Each CPU's own ring is drained on the daemon's period: no wakeups (a wakeup
    // is an irq_work on this CPU).
    let (ring, flags) = match CPU_RINGS.get(cpu) {
        Some(own) => (
            ptr::from_ref(own).cast_mut().cast::<c_void>(),
            u64::from(BPF_RB_NO_WAKEUP),
        ),
        None => (
            ptr::from_ref(&EVENTS).cast_mut().cast::<c_void>(),
            wakeup_flags(size),
        ),
    };
    // SAFETY: `ring` is a ring-buffer map; the size is a constant.
    let slot = unsafe { bpf_ringbuf_reserve(ring, size, 0) }.cast::<T>();
    if slot.is_null() {
        count(loss);
        return;
    }
    fill(slot, stamp());
    // SAFETY: `slot` was reserved above and is submitted once.
    unsafe { bpf_ringbuf_submit(slot.cast(), flags) };
}

/// Writes a user-mode record, stamped, or counts it under `loss` when the ring is
/// full.
#[inline(always)]
pub fn emit(record: &UserRecord, loss: Loss) {
    write::<UserRecord>(loss, |to, stamp| {
        // SAFETY: `to` is a reserved record of this type, ours until submitted.
        unsafe {
            (*to).kind = record.kind;
            (*to).tgid = record.tgid;
            (*to).tid = record.tid;
            (*to).func = record.func;
            (*to).stamp = stamp;
            (*to).addr = record.addr;
            (*to).size = record.size;
            (*to).old_addr = record.old_addr;
            (*to).stack_id = record.stack_id;
            (*to).caller = record.caller;
        }
    });
}

/// Writes a free's record, stamped, or counts it under [`Loss::RingFullFree`].
#[inline(always)]
pub fn emit_free(tgid: u32, tid: u32, addr: u64) {
    write::<FreeRecord>(Loss::RingFullFree, |to, stamp| {
        // SAFETY: `to` is a reserved record of this type, ours until submitted.
        unsafe {
            (*to).kind = RecordKind::Free as u32;
            (*to).tgid = tgid;
            (*to).tid = tid;
            (*to)._pad = 0;
            (*to).stamp = stamp;
            (*to).addr = addr;
        }
    });
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
