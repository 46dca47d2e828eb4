//! Return of every allocating function: the new block's address is known here.
//!
//! The cookie names the function the uretprobe sits on. Only the return of the
//! outermost call recorded by `alloc_enter` completes it: same function, and a stack
//! pointer one return address above the entry's.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_user, generated::bpf_get_attach_cookie},
    macros::uretprobe,
    programs::RetProbeContext,
};
use leak_common::{AllocFn, Loss, RecordKind, UserRecord};

use super::regs;
use crate::{
    calls,
    record::{current_ids, emit},
};

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
    let (tgid, tid) = current_ids();
    // SAFETY: the helper only reads the program's own context.
    let func = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    // SAFETY: a uprobe's context points at the saved registers.
    let r = unsafe { &*ctx.regs };
    let sp = regs::sp(r);
    // Anything else is the return of a nested call.
    let Some(call) = calls::finish(tid, |c| c.func == func && c.sp.wrapping_add(8) == sp) else {
        return;
    };
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
    // malloc called by operator new: a block of new's (for valgrind's heuristics).
    let func = if func == MALLOC && call.via_new != 0 {
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
        tgid,
        tid,
        func,
        ts_ns: 0, // the daemon stamps the allocation when it reads it
        addr,
        size: call.size,
        old_addr: call.old_addr,
        stack_id: call.stack_id,
        caller: call.caller,
    };
    // A lost realloc record also loses the old block's release.
    let loss = if resized {
        Loss::RingFullFree
    } else {
        Loss::RingFullAlloc
    };
    emit(&record, loss);
}
