//! free, cfree and operator delete. No return probe: the record is written on entry,
//! before the allocator can hand the address out again.
//!
//! The probe may sit a few instructions into the function (on an instruction the
//! kernel emulates instead of single-stepping) but always where the pointer is still
//! in the first argument register. free(NULL) is nothing; a free inside another
//! allocator call (realloc(p, 0) calls free in glibc) is part of that call.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_attach_cookie, macros::uprobe,
    programs::ProbeContext,
};
use leak_common::{Loss, RecordKind, UserRecord};

use super::regs;
use crate::{
    calls,
    maps::scoped_probes,
    record::{current_ids, emit, is_target},
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
    if calls::outer_sp(tid).is_some_and(|outer| regs::sp(r) <= outer) {
        return;
    }
    let record = UserRecord {
        kind: RecordKind::Free as u32,
        tgid,
        tid,
        // SAFETY: the helper only reads the program's own context.
        func: unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32,
        addr: ptr,
        ..UserRecord::default() // no time: the daemon needs none for a free
    };
    emit(&record, Loss::RingFullFree);
}
