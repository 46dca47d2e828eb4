//! Stop-the-world: freeze every thread of a process with ptrace (SEIZE + INTERRUPT),
//! read their registers, and always resume them.
//!
//! New threads can appear while we freeze, so `/proc/PID/task` is re-read until the
//! set of threads is stable. A thread that takes a signal while we stop it is
//! already stopped; the signal is remembered and delivered when it is resumed.

use std::{
    thread,
    time::{Duration, Instant},
};

use super::sys::{self, Wait, pid_t};
use crate::proc::threads;

/// How long a thread may take to stop before we give up and resume everything.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a process could not be frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// Another tracer (gdb, strace) owns a thread.
    #[error("cannot stop thread {tid} for --stop-the-world: {source} (is a debugger attached?)")]
    Seize {
        tid: u32,
        #[source]
        source: std::io::Error,
    },
    /// The launched command has not reached its entry point yet.
    #[error("process {0} is still starting; scanned without stopping the world")]
    Starting(u32),
    /// A thread did not stop in time (e.g. in uninterruptible sleep).
    #[error("thread {0} did not stop within 2 s; scanned without stopping the world")]
    Timeout(u32),
    /// The process could not be listed.
    #[error("cannot list the threads of process {pid}: {source}")]
    Threads {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// The ptrace worker is gone.
    #[error("the ptrace worker has stopped")]
    WorkerGone,
}

/// How a frozen thread stopped, which decides how it is resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// Our interrupt (or a group-stop, or a signal it took: see `pending_signal`).
    Interrupted,
    /// It reached its exit (launch mode's main thread): left stopped for the caller.
    Exiting,
    /// It was already held stopped by the caller: left stopped.
    AlreadyHeld,
}

/// One stopped thread.
#[derive(Clone, Copy, Debug)]
pub struct FrozenThread {
    pub tid: u32,
    /// Did we seize it for this freeze (detach on thaw), or was it already ours?
    pub seized_here: bool,
    /// A signal it took while we stopped it, to deliver on resume.
    pub pending_signal: i32,
    pub stop: StopKind,
}

/// A frozen process: what the scanner needs, and what thaw needs.
#[derive(Clone, Debug)]
pub struct Frozen {
    pub pid: u32,
    pub threads: usize,
    pub stack_pointers: Vec<u64>,
    pub registers: Vec<u64>,
    pub since: Instant,
    pub stopped: Vec<FrozenThread>,
}

/// A thread this worker already traces (launch mode's main thread), and whether it
/// is held stopped right now.
#[derive(Clone, Copy, Debug)]
pub struct Ours {
    pub tid: u32,
    pub held: bool,
}

/// Freezes `pid`.
pub fn freeze(pid: u32, ours: Option<Ours>) -> Result<Frozen, FreezeError> {
    let mut stopped: Vec<FrozenThread> = Vec::new();
    let result = stop_all(pid, ours, &mut stopped);
    if let Err(err) = result {
        resume(&stopped);
        return Err(err);
    }
    let mut frozen = Frozen {
        pid,
        threads: stopped.len(),
        stack_pointers: Vec::new(),
        registers: Vec::new(),
        since: Instant::now(),
        stopped,
    };
    for t in &frozen.stopped {
        if let Ok(r) = sys::get_regs(t.tid as pid_t) {
            frozen.stack_pointers.push(r.rsp);
            frozen.registers.extend([
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ]);
        }
    }
    Ok(frozen)
}

fn stop_all(
    pid: u32,
    ours: Option<Ours>,
    stopped: &mut Vec<FrozenThread>,
) -> Result<(), FreezeError> {
    loop {
        let tids = threads::list(pid).map_err(|source| FreezeError::Threads { pid, source })?;
        let new: Vec<u32> = tids
            .into_iter()
            .filter(|t| !stopped.iter().any(|s| s.tid == *t))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        for tid in new {
            let mine = ours.filter(|o| o.tid == tid);
            if mine.is_some_and(|o| o.held) {
                stopped.push(FrozenThread {
                    tid,
                    seized_here: false,
                    pending_signal: 0,
                    stop: StopKind::AlreadyHeld,
                });
                continue;
            }
            let seized_here = mine.is_none();
            if seized_here {
                match sys::seize(tid as pid_t, 0) {
                    Ok(()) => {}
                    // Exited meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                    Err(source) => return Err(FreezeError::Seize { tid, source }),
                }
            }
            let mut thread = FrozenThread {
                tid,
                seized_here,
                pending_signal: 0,
                stop: StopKind::Interrupted,
            };
            if sys::interrupt(tid as pid_t).is_err() {
                if seized_here {
                    let _ = sys::detach(tid as pid_t, 0);
                }
                continue;
            }
            if wait_stopped(&mut thread)? {
                stopped.push(thread);
            }
        }
    }
}

/// Waits until `t` is stopped; false if it exited instead.
fn wait_stopped(t: &mut FrozenThread) -> Result<bool, FreezeError> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match sys::wait(t.tid as pid_t, false) {
            Ok(Wait::Stopped { signal, event }) => {
                match event {
                    0 => t.pending_signal = signal,
                    sys::EVENT_EXIT => t.stop = StopKind::Exiting,
                    _ => {}
                }
                return Ok(true);
            }
            Ok(Wait::Exited(_) | Wait::Signaled(_)) | Err(_) => return Ok(false),
            Ok(Wait::Nothing) => {}
        }
        if Instant::now() > deadline {
            if t.seized_here {
                let _ = sys::detach(t.tid as pid_t, 0);
            }
            return Err(FreezeError::Timeout(t.tid));
        }
        thread::sleep(Duration::from_micros(100));
    }
}

/// Resumes every thread: detaches the ones seized for the freeze, continues ours
/// (unless it is held in its exit or was held before: the caller handles those).
pub fn resume(stopped: &[FrozenThread]) {
    for t in stopped {
        let tid = t.tid as pid_t;
        if t.seized_here {
            let _ = sys::detach(tid, t.pending_signal);
        } else if t.stop == StopKind::Interrupted {
            let _ = sys::cont(tid, t.pending_signal);
        }
    }
}
