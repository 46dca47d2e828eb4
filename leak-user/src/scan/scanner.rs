//! One scan of one live process, with the lock discipline of ARCHITECTURE.md: take
//! a snapshot under the table lock, read target memory without it, re-take it
//! briefly to apply the verdicts (ignoring objects freed meanwhile).
//!
//! With stop-the-world, every thread is frozen first (ptrace), the ring buffer is
//! drained so the table holds every event up to the freeze, the threads' registers
//! become roots, and the threads are resumed as soon as memory has been read.

use std::{
    io,
    time::{Duration, Instant},
};

use super::{ScanInput, ScanOutput, ScanStats, Workspace, heuristics::Heuristics};
use crate::{
    clock,
    proc::{
        self,
        maps::Mapping,
        mem::{ProcessMemory, ReadMethod},
        threads,
    },
    ptrace::{FreezeError, Frozen, PtraceHandle},
    table::{
        SharedTable,
        verdict::{Observation, ScanVerdicts},
    },
};

/// Objects copied per lock hold while taking a snapshot.
const SNAPSHOT_PART: usize = 1 << 16;

/// How to scan.
#[derive(Clone, Copy, Debug)]
pub struct ScanOptions {
    pub read_method: ReadMethod,
    pub stop_the_world: bool,
    /// The target is stopped at its exit: confirm every unreachable object at once.
    pub at_exit: bool,
    /// valgrind's leak-check heuristics in force.
    pub heuristics: Heuristics,
}

/// Everything one scan of one process produced, for reports.
#[derive(Clone, Debug)]
pub struct ProcessScan {
    pub pid: u32,
    pub stats: ScanStats,
    pub verdicts: ScanVerdicts,
    /// Longest lock hold while taking the snapshot.
    pub snapshot_hold: Duration,
    /// Lock held to apply the verdicts.
    pub apply_hold: Duration,
    /// How long the target was frozen (stop-the-world), and how many threads.
    pub pause: Option<(Duration, usize)>,
    pub duration: Duration,
    /// The maps the scan used (for symbolization).
    pub maps: Vec<Mapping>,
}

/// Why a process could not be scanned.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The process is no longer in the table or no longer exists.
    #[error("process {0} is gone")]
    Gone(u32),
    /// Its maps or memory could not be opened.
    #[error("cannot read process {pid}: {source}")]
    Io {
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// Stop-the-world failed (the scan ran without it).
    #[error(transparent)]
    Freeze(#[from] FreezeError),
}

/// Scans `pid` once. `drain` applies every ring-buffer record produced so far
/// (used after a freeze).
pub fn scan_process(
    table: &SharedTable,
    workspace: &mut Workspace,
    pid: u32,
    options: ScanOptions,
    ptrace: Option<&PtraceHandle>,
    drain: &dyn Fn(),
) -> Result<ProcessScan, ScanError> {
    let started = Instant::now();
    if !proc::is_alive(pid) {
        return Err(ScanError::Gone(pid));
    }
    let frozen = match (options.stop_the_world, ptrace) {
        (true, Some(ptrace)) => {
            let frozen = ptrace.freeze(pid)?;
            drain();
            Some(frozen)
        }
        _ => None,
    };
    let result = scan_frozen_or_not(table, workspace, pid, options, frozen.as_ref());
    let pause = match (frozen, ptrace) {
        (Some(f), Some(ptrace)) => {
            let threads = f.threads;
            let paused = ptrace.thaw(f);
            Some((paused, threads))
        }
        _ => None,
    };
    let (out, snapshot_hold, maps) = result?;
    // Memory that could not be read because the process died (or exited) while
    // we read it is no evidence either way: such a scan decides nothing.
    let seen = Observation {
        candidates: &out.candidates,
        unjudged: &out.unjudged,
        watched_reached: &out.watched_reached,
        complete: proc::has_memory(pid),
    };
    let (verdicts, apply_hold) =
        table.with(|t| t.apply_scan(pid, &seen, &out.unmapped, clock::now_ns(), options.at_exit));
    Ok(ProcessScan {
        pid,
        stats: out.stats,
        verdicts,
        snapshot_hold,
        apply_hold,
        pause,
        duration: started.elapsed(),
        maps,
    })
}

/// Snapshot (under the lock), then read and scan (without it).
fn scan_frozen_or_not(
    table: &SharedTable,
    workspace: &mut Workspace,
    pid: u32,
    options: ScanOptions,
    frozen: Option<&Frozen>,
) -> Result<(ScanOutput, Duration, Vec<Mapping>), ScanError> {
    // The snapshot is taken a part at a time, releasing the lock in between, so
    // that ingestion never waits long. Objects that change meanwhile are judged
    // again by the next scan (the consecutive-scans rule), like every other race.
    // The last scan's snapshot buffers, emptied: a big snapshot is neither
    // reallocated nor page-faulted afresh (under the lock) at every scan.
    let taking = Instant::now();
    let mut snapshot = workspace.take_snapshot();
    let mut snapshot_hold = Duration::ZERO;
    let mut from = 0;
    loop {
        let (next, held) = table.with(|t| {
            t.process(pid)?;
            Some(t.snapshot_part(pid, from, SNAPSHOT_PART, &mut snapshot))
        });
        snapshot_hold = snapshot_hold.max(held);
        match next.ok_or(ScanError::Gone(pid))? {
            Some(n) => from = n,
            None => break,
        }
    }
    let io = |source| ScanError::Io { pid, source };
    let maps = proc::maps::read(pid).map_err(io)?;
    if maps.is_empty() {
        // Its memory is already torn down (it is exiting): nothing to judge.
        return Err(ScanError::Gone(pid));
    }
    log::debug!(
        "pid {pid}: scanning {} objects in {} mappings (snapshot taken in {:?}, longest hold {snapshot_hold:?})",
        snapshot.objects.len(),
        maps.len(),
        taking.elapsed()
    );
    let (stack_pointers, registers, every_sp) = match frozen {
        // A thread whose registers could not be read, or an exiting process
        // (its killed threads are gone from the list), leaves stacks unplaced.
        Some(f) => (
            f.stack_pointers.clone(),
            f.registers.clone(),
            f.stack_pointers.len() == f.threads && !threads::exiting(pid),
        ),
        None => {
            let (sps, all) = threads::blocked_stack_pointers(pid);
            (sps, Vec::new(), all)
        }
    };
    let memory = ProcessMemory::open(pid, options.read_method).map_err(io)?;
    // Exited threads' cached stacks are certain only when every thread is placed,
    // and not at the exit stop: the other threads died with the exit itself.
    let idle_stacks = if every_sp && !options.at_exit {
        threads::idle_thread_stacks(&maps, &stack_pointers, &memory)
    } else {
        Vec::new()
    };
    let input = ScanInput {
        snapshot,
        maps,
        stack_pointers,
        registers,
        idle_stacks,
        heuristics: options.heuristics,
    };
    let output = workspace.scan(&input, &memory);
    workspace.keep_snapshot(input.snapshot);
    Ok((output, snapshot_hold, input.maps))
}
