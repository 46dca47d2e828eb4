//! Lifecycle of traced processes: a new child (with `--follow-forks`), a new image
//! (execve drops the whole heap), and the end of a process. Thread exits also clear
//! the per-thread scratch maps, so a thread that dies inside an allocator call
//! leaves nothing behind.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use leak_common::{Loss, RecordKind, TargetFlags, TracepointLayout, UserRecord};

use crate::{
    calls,
    maps::{SYSCALLS, TARGETS, follow_forks, layout},
    record::{current_ids, emit, is_target},
};

/// clone(2) flag: the new task is a thread of the caller, not a new process.
const CLONE_THREAD: u64 = 0x0001_0000;

fn process_record(kind: RecordKind, tgid: u32, tid: u32, addr: u64) -> UserRecord {
    UserRecord {
        kind: kind as u32,
        tgid,
        tid,
        addr,
        ..UserRecord::default()
    }
}

/// task:task_newtask runs in the parent before the child can run, so the child is a
/// target before its first instruction.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    try_task_newtask(&ctx);
    0
}

fn try_task_newtask(ctx: &TracePointContext) {
    if !follow_forks() {
        return;
    }
    let (tgid, tid) = current_ids();
    if !is_target(tgid) {
        return;
    }
    let l = layout();
    if l.newtask_pid == TracepointLayout::ABSENT
        || l.newtask_clone_flags == TracepointLayout::ABSENT
    {
        return;
    }
    // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
    let Ok(flags) = (unsafe { ctx.read_at::<u64>(l.newtask_clone_flags as usize) }) else {
        return;
    };
    if flags & CLONE_THREAD != 0 {
        return;
    }
    // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(l.newtask_pid as usize) }) else {
        return;
    };
    let _ = TARGETS.insert(child as u32, TargetFlags { traced: 1 }, 0);
    emit(
        &process_record(RecordKind::Fork, tgid, tid, child as u64),
        Loss::RingFullOther,
    );
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    try_sched_process_exit(&ctx);
    0
}

fn try_sched_process_exit(ctx: &TracePointContext) {
    let (tgid, tid) = current_ids();
    calls::forget(tid);
    let _ = SYSCALLS.remove(&tid);
    if !is_target(tgid) {
        return;
    }
    let l = layout();
    let group_dead = if l.exit_group_dead == TracepointLayout::ABSENT {
        tid == tgid // older kernels: the leader's exit stands for the process
    } else {
        // SAFETY: bpf_probe_read checks the address; the offset is from tracefs.
        unsafe { ctx.read_at::<u8>(l.exit_group_dead as usize) }.unwrap_or(0) != 0
    };
    if group_dead {
        let _ = TARGETS.remove(&tgid);
        emit(
            &process_record(RecordKind::Exit, tgid, tid, 0),
            Loss::RingFullOther,
        );
    }
}

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    if is_target(tgid) {
        emit(
            &process_record(RecordKind::Exec, tgid, tid, 0),
            Loss::RingFullOther,
        );
    }
    0
}
