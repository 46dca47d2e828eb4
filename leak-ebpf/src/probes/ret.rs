//! Return of every allocating function: the new block's address is known here.
//!
//! Only a return one word above the stack pointer `alloc_enter` recorded completes
//! the call. That is the outermost call's own return, or the return of a function
//! it tail-called (reallocarray jumps to realloc), which hands back the same value
//! on the same stack: either completes it, as the function entered. So this probe
//! needs neither its cookie nor the thread's ids (the entry kept them). Where the
//! entry left the call site to it (no CFI walk), the call site is the address
//! this return goes back to.

use aya_ebpf::{helpers::bpf_probe_read_user, macros::uretprobe, programs::RetProbeContext};
use leak_common::{AllocFn, Loss, RecordKind, UserRecord};

use super::regs;
use crate::{calls, record::emit, site};

const MALLOC: u32 = AllocFn::Malloc as u32;
const OPERATOR_NEW: u32 = AllocFn::OperatorNew as u32;
const REALLOC: u32 = AllocFn::Realloc as u32;
const REALLOCARRAY: u32 = AllocFn::Reallocarray as u32;
const POSIX_MEMALIGN: u32 = AllocFn::PosixMemalign as u32;

/// What glibc returns from a failed mmap inside an allocator (MAP_FAILED).
const MAP_FAILED: u64 = u64::MAX;

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    if crate::maps::empty_probes() {
        return 0;
    }
    try_alloc_return(&ctx);
    0
}

fn try_alloc_return(ctx: &RetProbeContext) {
    // SAFETY: a uprobe's context points at the saved registers.
    let r = unsafe { &*ctx.regs };
    let sp = regs::sp(r);
    // Anything else is the return of a nested call.
    let Some(call) = calls::finish(|c| c.sp.wrapping_add(8) == sp) else {
        return;
    };
    let func = call.func;
    let ret = regs::ret(r);
    let addr = if func == POSIX_MEMALIGN {
        if ret as u32 == 0 {
            // SAFETY: the helper checks the user address and fails cleanly.
            unsafe { bpf_probe_read_user(call.out_ptr as *const u64) }.unwrap_or(0)
        } else {
            0
        }
    } else if ret == MAP_FAILED {
        0
    } else {
        ret
    };
    let resized = (func == REALLOC || func == REALLOCARRAY) && call.old_addr != 0;
    if addr == 0 && !resized {
        return; // a failed allocation is not an object
    }
    let (caller, via_new) = if call.caller != 0 {
        (call.caller, call.via_new != 0)
    } else {
        site::at_return(call.tgid, call.sp, regs::ip(r))
    };
    // malloc called by operator new: a block of new's (for valgrind's heuristics).
    let func = if func == MALLOC && via_new {
        OPERATOR_NEW
    } else {
        func
    };
    let record = UserRecord {
        kind: if resized {
            RecordKind::Realloc
        } else {
            RecordKind::Alloc
        } as u32,
        tgid: call.tgid,
        tid: call.tid,
        func,
        stamp: 0, // emit stamps it
        addr,
        size: call.size,
        old_addr: call.old_addr,
        stack_id: call.stack_id,
        caller,
    };
    // A lost realloc record also loses the old block's release.
    let loss = if resized {
        Loss::RingFullFree
    } else {
        Loss::RingFullAlloc
    };
    emit(&record, loss);
}
