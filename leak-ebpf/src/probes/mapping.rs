//! Which memory does the allocator own? mmap and mremap made from inside an allocator
//! call (the thread has a call in flight, `calls.rs`) map allocator memory: heap arenas,
//! jemalloc extents and metadata, big blocks. brk moves the main heap. munmap ends
//! any mapping. In launch mode the daemon uses this to keep allocator-owned memory
//! (free lists, caches of stale block addresses) out of the scanner's roots.
//!
//! Syscall tracepoints have a fixed layout on every kernel: after the 8-byte common
//! header and the syscall number, argument N is at 16 + 8 * N, and the return value
//! of an exit event is at 16.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use leak_common::{Loss, PendingSyscall, RecordKind, UserRecord};

use crate::{
    calls,
    maps::SYSCALLS,
    record::{count, current_ids, emit, is_target},
};

const fn arg_offset(n: usize) -> usize {
    16 + 8 * n
}
const RET_OFFSET: usize = 16;

/// Error returns of syscalls are -4095..=-1.
fn failed(ret: i64) -> bool {
    (-4095..0).contains(&ret)
}

fn mapping_record(
    kind: RecordKind,
    tgid: u32,
    tid: u32,
    addr: u64,
    size: u64,
    inside: bool,
) -> UserRecord {
    UserRecord {
        kind: kind as u32,
        tgid,
        tid,
        func: inside as u32,
        addr,
        size,
        ..UserRecord::default()
    }
}

fn inside_allocator(tid: u32) -> bool {
    calls::outer_sp(tid).is_some()
}

fn remember(tid: u32, pending: &PendingSyscall) {
    if SYSCALLS.insert(&tid, pending, 0).is_err() {
        count(Loss::SyscallScratchFull);
    }
}

fn take(tid: u32) -> Option<PendingSyscall> {
    // SAFETY: a map value from get_ptr is valid and aligned during the run.
    let pending = unsafe { *SYSCALLS.get_ptr(&tid)? };
    let _ = SYSCALLS.remove(&tid);
    Some(pending)
}

#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if is_target(tgid) && inside_allocator(tid) {
        // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
        let len = unsafe { ctx.read_at::<u64>(arg_offset(1)) }.unwrap_or(0);
        remember(
            tid,
            &PendingSyscall {
                inside_allocator: 1,
                len,
                ..PendingSyscall::default()
            },
        );
    }
    0
}

#[tracepoint]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if let Some(pending) = take(tid) {
        // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
        let ret = unsafe { ctx.read_at::<i64>(RET_OFFSET) }.unwrap_or(-1);
        if !failed(ret) {
            let record = mapping_record(
                RecordKind::AllocatorMap,
                tgid,
                tid,
                ret as u64,
                pending.len,
                true,
            );
            emit(&record, Loss::RingFullOther);
        }
    }
    0
}

#[tracepoint]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if is_target(tgid) {
        // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
        let addr = unsafe { ctx.read_at::<u64>(arg_offset(0)) }.unwrap_or(0);
        // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
        let len = unsafe { ctx.read_at::<u64>(arg_offset(1)) }.unwrap_or(0);
        let record = mapping_record(
            RecordKind::Unmap,
            tgid,
            tid,
            addr,
            len,
            inside_allocator(tid),
        );
        emit(&record, Loss::RingFullOther);
    }
    0
}

#[tracepoint]
pub fn sys_enter_mremap(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if is_target(tgid) {
        let pending = PendingSyscall {
            inside_allocator: inside_allocator(tid) as u32,
            _pad: 0,
            // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
            old_addr: unsafe { ctx.read_at::<u64>(arg_offset(0)) }.unwrap_or(0),
            // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
            old_len: unsafe { ctx.read_at::<u64>(arg_offset(1)) }.unwrap_or(0),
            // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
            len: unsafe { ctx.read_at::<u64>(arg_offset(2)) }.unwrap_or(0),
        };
        remember(tid, &pending);
    }
    0
}

#[tracepoint]
pub fn sys_exit_mremap(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if let Some(pending) = take(tid) {
        // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
        let ret = unsafe { ctx.read_at::<i64>(RET_OFFSET) }.unwrap_or(-1);
        if !failed(ret) {
            let inside = pending.inside_allocator != 0;
            let old = mapping_record(
                RecordKind::Unmap,
                tgid,
                tid,
                pending.old_addr,
                pending.old_len,
                inside,
            );
            emit(&old, Loss::RingFullOther);
            if inside {
                let new = mapping_record(
                    RecordKind::AllocatorMap,
                    tgid,
                    tid,
                    ret as u64,
                    pending.len,
                    true,
                );
                emit(&new, Loss::RingFullOther);
            }
        }
    }
    0
}

#[tracepoint]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if is_target(tgid) {
        // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
        let ret = unsafe { ctx.read_at::<i64>(RET_OFFSET) }.unwrap_or(-1);
        if !failed(ret) {
            let record = mapping_record(
                RecordKind::Brk,
                tgid,
                tid,
                ret as u64,
                0,
                inside_allocator(tid),
            );
            emit(&record, Loss::RingFullOther);
        }
    }
    0
}
