//! free, cfree and operator delete. No return probe: the record is written on entry,
//! before the allocator can hand the address out again.
//!
//! The probe may sit a few instructions into the function (on an instruction the
//! kernel emulates instead of single-stepping) but always where the pointer is still
//! in the first argument register. free(NULL) is nothing.
//!
//! Half of all calls are frees, so this probe asks the kernel for as little as it
//! can: who is running, and room in the ring for a compact `FreeRecord`. It does
//! not look for an allocator call in flight on the thread: a free inside one
//! (glibc's realloc(p, 0) calls free(p)) is recognised by the daemon, which knows
//! the block the realloc detached.

use aya_ebpf::{macros::uprobe, programs::ProbeContext};

use super::regs;
use crate::{
    maps::scoped_probes,
    record::{current_ids, emit_free, is_target},
};

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    if crate::maps::empty_probes() {
        return 0;
    }
    try_free_enter(&ctx);
    0
}

fn try_free_enter(ctx: &ProbeContext) {
    let (tgid, tid) = current_ids();
    if !scoped_probes() && !is_target(tgid) {
        return;
    }
    // SAFETY: a uprobe's context points at the saved registers.
    let r = unsafe { &*ctx.regs };
    let ptr = regs::arg(r, 0);
    if ptr == 0 {
        return;
    }
    emit_free(tgid, tid, ptr);
}
