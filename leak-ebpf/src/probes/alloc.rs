//! Entry of every allocating function: malloc, calloc, realloc, reallocarray,
//! posix_memalign, aligned_alloc/memalign, valloc, pvalloc, operator new.
//!
//! The attach cookie says which function this is ([`AllocFn`]). The entry remembers
//! the arguments and the stack (`calls.rs`) for the return probe. Only the outermost
//! allocator call of a thread is recorded: glibc's posix_memalign and realloc(NULL, n)
//! call malloc, reallocarray tail-calls realloc, operator new calls malloc. A nested
//! (or tail) call runs on a stack pointer at or below the outer call's one.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_attach_cookie, macros::uprobe,
    programs::ProbeContext,
};
use aya_log_ebpf::debug;
use leak_common::{AllocFn, Loss, PendingCall, RecordKind, UserRecord};

use super::regs;
use crate::{
    calls,
    maps::{capture_stacks, cfi_stacks, scoped_probes},
    record::{count, current_ids, emit, is_target},
    site,
};

const CALLOC: u32 = AllocFn::Calloc as u32;
const REALLOC: u32 = AllocFn::Realloc as u32;
const REALLOCARRAY: u32 = AllocFn::Reallocarray as u32;
const POSIX_MEMALIGN: u32 = AllocFn::PosixMemalign as u32;
const ALIGNED_ALLOC: u32 = AllocFn::AlignedAlloc as u32;

#[uprobe]
pub fn alloc_enter(ctx: ProbeContext) -> u32 {
    if crate::maps::empty_probes() {
        return 0;
    }
    let _ = try_alloc_enter(&ctx);
    0
}

/// `a * b`, or `u64::MAX` when it overflows (the call will fail with ENOMEM).
///
/// Written with 32-bit halves: LLVM turns the usual overflow checks into a
/// 128-bit multiply, which BPF does not have.
#[inline(always)]
fn mul_or_max(a: u64, b: u64) -> u64 {
    let (big, small) = if a >= b { (a, b) } else { (b, a) };
    if small >> 32 != 0 {
        return u64::MAX;
    }
    let high = (big >> 32) * small;
    if high >> 32 != 0 {
        return u64::MAX;
    }
    let shifted = high << 32;
    let sum = shifted.wrapping_add((big & 0xffff_ffff) * small);
    if sum < shifted { u64::MAX } else { sum }
}

fn try_alloc_enter(ctx: &ProbeContext) -> Result<(), ()> {
    let (tgid, tid) = current_ids();
    if !scoped_probes() && !is_target(tgid) {
        return Ok(());
    }
    // SAFETY: a uprobe's context points at the saved registers.
    let r = unsafe { &*ctx.regs };
    let sp = regs::sp(r);
    let entry = calls::Entry::of(tid);
    if let Some(outer_sp) = entry.outer_sp() {
        if sp <= outer_sp {
            return Ok(()); // nested in (or tail-called from) another allocator call
        }
        // The outer call's frame is gone but its return was never seen.
        count(Loss::StaleCall);
        debug!(ctx, "tid {} left an allocator call without a return", tid);
    }
    // SAFETY: the helper only reads the program's own context.
    let func = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let (a0, a1, a2) = (regs::arg(r, 0), regs::arg(r, 1), regs::arg(r, 2));
    // (size, old_addr, out_ptr)
    let (size, old_addr, out_ptr) = match func {
        CALLOC => (mul_or_max(a0, a1), 0, 0),
        REALLOC => (a1, a0, 0),
        REALLOCARRAY => (mul_or_max(a1, a2), a0, 0),
        POSIX_MEMALIGN => (a2, 0, a0),
        ALIGNED_ALLOC => (a1, 0, 0),
        // malloc, valloc, pvalloc, operator new (plain and aligned): size first.
        _ => (a0, 0, 0),
    };
    let site = if capture_stacks() && cfi_stacks() {
        site::by_cfi(r, tgid)
    } else {
        site::by_frame_pointers(ctx, capture_stacks())
    };
    // Every field is written: a struct update from `default()` makes LLVM call a
    // byte-at-a-time memset, which costs more than the rest of the probe.
    let call = PendingCall {
        sp,
        tgid,
        tid,
        func,
        via_new: u32::from(site.via_new),
        size,
        old_addr,
        out_ptr,
        stack_id: site.stack_id,
        caller: site.caller,
    };
    if entry.begin(&call).is_err() {
        count(Loss::CallsFull);
        return Err(());
    }
    if call.old_addr != 0 {
        // From here on glibc may release the old block, and another thread may be
        // handed its address before realloc returns: say so now, in ring order.
        let record = UserRecord {
            kind: RecordKind::ReallocDetach as u32,
            tgid,
            tid,
            func,
            old_addr: call.old_addr,
            ..UserRecord::default()
        };
        emit(&record, Loss::RingFullFree);
    }
    Ok(())
}
