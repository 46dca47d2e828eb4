//! Kernel slab mode: kmalloc and kmem_cache_alloc (and, with `--pages`, page
//! allocations) with their frees, system-wide.
//!
//! Field offsets come from tracefs at start-up ([`leak_common::TracepointLayout`]):
//! they change between kernel versions. A skipped free is a false leak, and the
//! kernel skips programs that would nest on a CPU: a classic tracepoint program
//! when any tracing program already runs there (a kfree in an interrupt that hits
//! while one of our programs runs), a raw tracepoint program only when that same
//! program already runs there (an RCU callback in the softirq at the end of that
//! interrupt freeing a batch of objects). So each free tracepoint gets both kinds,
//! and they share the work (see [`slab_free`]). The free's pointer is the second
//! `TP_PROTO` argument of both kfree and kmem_cache_free; the daemon checks that
//! against the format file.
//!
//! Allocations are filtered by pid and cgroup when asked; frees never are: RCU frees
//! run later in softirq context on whatever task is current.

use core::{mem::MaybeUninit, ptr::write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use leak_common::{FreeProbeCount, KernelRecord, Loss, RecordKind, TracepointLayout, UserRecord};

use crate::{
    maps::{
        CGROUPS, EVENTS, FREE_PROBES, FREE_SLOT, KSTACKS, capture_stacks, dual_free_probes,
        kernel_filter_cgroups, kernel_filter_pids, layout, sampled,
    },
    record::{bump, capture_stack, count, current_ids, emit, is_target, now_ns, wakeup_flags},
};

const ABSENT: u32 = TracepointLayout::ABSENT;
const PAGE_SHIFT: u64 = 12;

/// The fields of one allocation tracepoint.
struct AllocFields {
    ptr: u32,
    call_site: u32,
    bytes_req: u32,
    bytes_alloc: u32,
    name: u32,
}

fn read<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// Does the allocation belong to what the user asked to watch? (BPF programs cannot
/// tell interrupt context from the tracepoint record: an allocation in an interrupt
/// is attributed to the task it interrupted, as perf does.)
fn wanted(tgid: u32) -> bool {
    if kernel_filter_pids() && !is_target(tgid) {
        return false;
    }
    if kernel_filter_cgroups() {
        // SAFETY: the helper takes no arguments.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if CGROUPS.get_ptr(&cgroup).is_none() {
            return false;
        }
    }
    true
}

fn kernel_alloc(ctx: &TracePointContext, kind: RecordKind, f: AllocFields) {
    let Some(ptr) = read::<u64>(ctx, f.ptr) else {
        return;
    };
    if ptr == 0 || !sampled(ptr) {
        return;
    }
    let (tgid, tid) = current_ids();
    if !wanted(tgid) {
        return;
    }
    let allocation = Allocation {
        kind,
        ptr,
        call_site: read::<u64>(ctx, f.call_site).unwrap_or(0),
        bytes_req: read::<u64>(ctx, f.bytes_req).unwrap_or(0),
        bytes_alloc: read::<u64>(ctx, f.bytes_alloc).unwrap_or(0),
        name: read::<u32>(ctx, f.name).unwrap_or(NO_NAME),
    };
    emit_allocation(ctx, tgid, tid, &allocation);
}

/// No cache name: not a `__data_loc` a tracepoint writes (offset and length 0xffff).
const NO_NAME: u32 = u32::MAX;

/// What an allocation tracepoint says of one allocation.
struct Allocation {
    kind: RecordKind,
    ptr: u64,
    call_site: u64,
    bytes_req: u64,
    bytes_alloc: u64,
    /// `__data_loc` of the slab cache's name in the tracepoint record, or
    /// [`NO_NAME`]. (As an `Option`, LLVM stored its unset payload, which the
    /// verifier refuses.)
    name: u32,
}

/// Writes the record of an allocation by `tgid`/`tid`, with its stack, cgroup and
/// task name, or counts it when the ring is full.
fn emit_allocation(ctx: &TracePointContext, tgid: u32, tid: u32, a: &Allocation) {
    let stack_id = if capture_stacks() {
        capture_stack(ctx, &KSTACKS, 0)
    } else {
        0
    };
    // SAFETY: the helper takes no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // Written field by field with volatile stores, the byte arrays included: a
    // `[0; 32]` in a struct literal becomes a call to a memset that writes one byte
    // per iteration, four of them per allocation.
    let mut out = MaybeUninit::<KernelRecord>::uninit();
    let r = out.as_mut_ptr();
    // SAFETY: every field of `out` is written before it is read; the pointers are
    // to fields of our own stack variable, `cache` is 8-byte aligned (after seven
    // u64s and four u32s), and the helpers write within the sizes given.
    let record = unsafe {
        write_volatile(&raw mut (*r).kind, a.kind as u32);
        write_volatile(&raw mut (*r).tgid, tgid);
        write_volatile(&raw mut (*r).tid, tid);
        write_volatile(&raw mut (*r).in_irq, 0);
        write_volatile(&raw mut (*r).ts_ns, now_ns());
        write_volatile(&raw mut (*r).ptr, a.ptr);
        write_volatile(&raw mut (*r).call_site, a.call_site);
        write_volatile(&raw mut (*r).bytes_req, a.bytes_req);
        write_volatile(&raw mut (*r).bytes_alloc, a.bytes_alloc);
        write_volatile(&raw mut (*r).stack_id, stack_id);
        write_volatile(&raw mut (*r).cgroup_id, cgroup_id);
        let cache = (&raw mut (*r).cache).cast::<u64>();
        for i in 0..size_of::<[u8; 32]>() / 8 {
            write_volatile(cache.add(i), 0);
        }
        // The helper pads the name with NULs, or zeroes the buffer when it fails.
        bpf_get_current_comm((&raw mut (*r).comm).cast(), size_of::<[u8; 16]>() as u32);
        if a.name != NO_NAME {
            // __data_loc: offset of the string in the record (low 16 bits), length (high).
            let src = (ctx.as_ptr() as *const u8).add((a.name & 0xffff) as usize);
            // The helper checks the address and bounds the copy.
            let _ = bpf_probe_read_kernel_str_bytes(src, &mut (*r).cache);
        }
        out.assume_init_ref()
    };
    if EVENTS
        .output::<KernelRecord>(record, wakeup_flags(size_of::<KernelRecord>() as u64))
        .is_err()
    {
        count(Loss::RingFullKernel);
    }
}

fn kernel_free(kind: RecordKind, ptr: u64) {
    let (tgid, tid) = current_ids();
    let record = UserRecord {
        kind: kind as u32,
        tgid,
        tid,
        addr: ptr,
        ..UserRecord::default()
    };
    emit(&record, Loss::RingFullKernel);
}

/// Which program on a free tracepoint is running.
#[derive(Clone, Copy)]
enum FreeProbe {
    Raw,
    Classic,
}

/// A kfree or kmem_cache_free. With both probes attached, the first of the two
/// programs to run records it and leaves the pointer in `FREE_SLOT`; the second
/// finds it there and only clears the slot. When the kernel skips one of them
/// (nested on this CPU), the other still records the free. A free nested between
/// the two programs can be recorded twice, which is harmless: the object is not
/// released before the tracepoint returns, so no allocation of the same address
/// can come between the two records.
fn slab_free(probe: FreeProbe, ptr: u64) {
    if ptr == 0 || !sampled(ptr) {
        return;
    }
    if !dual_free_probes() {
        kernel_free(RecordKind::KernelFree, ptr);
        return;
    }
    let Some(slot) = FREE_SLOT.get_ptr_mut(0) else {
        kernel_free(RecordKind::KernelFree, ptr);
        return;
    };
    let (recorded, deferred) = match probe {
        FreeProbe::Raw => (FreeProbeCount::RawRecorded, FreeProbeCount::RawDeferred),
        FreeProbe::Classic => (
            FreeProbeCount::ClassicRecorded,
            FreeProbeCount::ClassicDeferred,
        ),
    };
    // SAFETY: the per-CPU slot is a live u64; only programs on this CPU touch it.
    unsafe {
        if core::ptr::read_volatile(slot) == ptr {
            core::ptr::write_volatile(slot, 0);
            bump(&FREE_PROBES, deferred as u32);
            return;
        }
        kernel_free(RecordKind::KernelFree, ptr);
        core::ptr::write_volatile(slot, ptr);
    }
    bump(&FREE_PROBES, recorded as u32);
}

#[tracepoint]
pub fn kmalloc(ctx: TracePointContext) -> u32 {
    let l = layout();
    let fields = AllocFields {
        ptr: l.kmalloc_ptr,
        call_site: l.kmalloc_call_site,
        bytes_req: l.kmalloc_bytes_req,
        bytes_alloc: l.kmalloc_bytes_alloc,
        name: ABSENT,
    };
    kernel_alloc(&ctx, RecordKind::KernelAlloc, fields);
    0
}

#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    let l = layout();
    let fields = AllocFields {
        ptr: l.cache_alloc_ptr,
        call_site: l.cache_alloc_call_site,
        bytes_req: l.cache_alloc_bytes_req,
        bytes_alloc: l.cache_alloc_bytes_alloc,
        name: l.cache_alloc_name,
    };
    kernel_alloc(&ctx, RecordKind::KernelAlloc, fields);
    0
}

/// kfree(call_site, ptr) as a raw tracepoint.
#[raw_tracepoint(tracepoint = "kfree")]
pub fn kfree_raw(ctx: RawTracePointContext) -> u32 {
    slab_free(FreeProbe::Raw, ctx.arg::<u64>(1));
    0
}

/// kmem_cache_free(call_site, ptr, cache) as a raw tracepoint.
#[raw_tracepoint(tracepoint = "kmem_cache_free")]
pub fn kmem_cache_free_raw(ctx: RawTracePointContext) -> u32 {
    slab_free(FreeProbe::Raw, ctx.arg::<u64>(1));
    0
}

/// kfree as a classic tracepoint.
#[tracepoint]
pub fn kfree(ctx: TracePointContext) -> u32 {
    let ptr = read::<u64>(&ctx, layout().kfree_ptr).unwrap_or(0);
    slab_free(FreeProbe::Classic, ptr);
    0
}

/// kmem_cache_free as a classic tracepoint.
#[tracepoint]
pub fn kmem_cache_free(ctx: TracePointContext) -> u32 {
    let ptr = read::<u64>(&ctx, layout().cache_free_ptr).unwrap_or(0);
    slab_free(FreeProbe::Classic, ptr);
    0
}

#[tracepoint]
pub fn mm_page_alloc(ctx: TracePointContext) -> u32 {
    let l = layout();
    if let (Some(pfn), Some(order)) = (
        read::<u64>(&ctx, l.page_alloc_pfn),
        read::<u32>(&ctx, l.page_alloc_order),
    ) {
        let (tgid, tid) = current_ids();
        if pfn != u64::MAX && sampled(pfn << PAGE_SHIFT) && wanted(tgid) {
            let bytes = 1 << (PAGE_SHIFT + order as u64);
            let allocation = Allocation {
                kind: RecordKind::PageAlloc,
                ptr: pfn << PAGE_SHIFT,
                call_site: 0,
                bytes_req: bytes,
                bytes_alloc: bytes,
                name: NO_NAME,
            };
            emit_allocation(&ctx, tgid, tid, &allocation);
        }
    }
    0
}

#[tracepoint]
pub fn mm_page_free(ctx: TracePointContext) -> u32 {
    if let Some(pfn) = read::<u64>(&ctx, layout().page_free_pfn)
        && sampled(pfn << PAGE_SHIFT)
    {
        kernel_free(RecordKind::PageFree, pfn << PAGE_SHIFT);
    }
    0
}
