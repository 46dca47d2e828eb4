//! Leaks made before attaching: at attach time (pid mode), the target's glibc heap
//! is walked from outside ([`crate::allocator::glibc_heap`]) and its live blocks
//! join the table as objects "allocated before attach", with no stack.
//!
//! The handover: the probes are attached first, so every malloc and free from then
//! on reaches the table through the ring. The table remembers frees of addresses it
//! does not hold while the walk runs; after the walk, the ring is drained and the
//! walked blocks are adopted except those the table already holds (allocated
//! since), those in memory freed since attaching, and those freed during the walk.
//! With `--stop-the-world` the target is frozen for the walk: an exact snapshot.

use std::{ops::Range, time::Instant};

use crate::{
    allocator::glibc_heap::{self, HeapWalk, Layout},
    config::Config,
    proc::{
        self,
        maps::Mapping,
        mem::{ProcessMemory, ReadMethod},
    },
    ptrace::PtraceHandle,
    report::records::HeapWalkRecord,
    session::{ingest::IngestHandle, progress::while_running},
    table::SharedTable,
};

fn is_libc(m: &Mapping) -> bool {
    m.file()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-"))
}

/// The heap layout of the target's glibc, from the version in its banner; read
/// through `/proc/PID/map_files`, which still opens a libc deleted by an upgrade.
fn libc_layout(pid: u32, maps: &[Mapping]) -> Result<Layout, String> {
    let m = maps
        .iter()
        .find(|m| is_libc(m))
        .ok_or("it maps no glibc (another allocator, or a static binary): not walked")?;
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read its libc ({path}): {e}"))?;
    let version = glibc_heap::version_in(&bytes)
        .ok_or("its libc has no glibc version banner (not glibc?): not walked")?;
    Layout::of_version(version).map_err(|e| e.to_string())
}

/// libc's writable ranges: its `.data` and the anonymous `.bss` right after it,
/// where glibc's main arena lives.
fn libc_data(maps: &[Mapping]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        if is_libc(m) && m.write && m.read {
            out.push(m.start..m.end);
            if let Some(bss) = maps.get(i + 1)
                && bss.start == m.end
                && bss.file().is_none()
                && bss.write
            {
                out.push(bss.start..bss.end);
            }
        }
    }
    out
}

/// Reads the heap of `pid` (blocking).
fn read_heap(pid: u32, method: ReadMethod) -> Result<HeapWalk, String> {
    let maps = proc::maps::read(pid).map_err(|e| format!("cannot read its maps: {e}"))?;
    let data = libc_data(&maps);
    if data.is_empty() {
        return Err("it maps no glibc (another allocator, or a static binary): not walked".into());
    }
    let layout = libc_layout(pid, &maps)?;
    let memory =
        ProcessMemory::open(pid, method).map_err(|e| format!("cannot read its memory: {e}"))?;
    // A running target's heap changes while it is read: a torn walk is tried
    // again (with fresh maps: a thread heap may have come or gone).
    let mut maps = maps;
    let mut attempt = 1;
    loop {
        match glibc_heap::walk(&maps, &data, &memory, layout) {
            Err(err) if err.may_be_torn() && attempt < WALK_ATTEMPTS => {
                log::debug!("pid {pid}: heap walk {attempt} torn ({err}); walking again");
                maps = proc::maps::read(pid).map_err(|e| format!("cannot read its maps: {e}"))?;
                attempt += 1;
            }
            Err(err) if err.may_be_torn() => {
                return Err(format!("{err} (the heap kept changing: {attempt} walks)"));
            }
            result => return result.map_err(|e| e.to_string()),
        }
    }
}

/// How many times a torn walk of a running target is tried.
const WALK_ATTEMPTS: u32 = 8;

/// Walks the heap of `pid` and adopts its live blocks; the record says what was
/// found (or why nothing was).
pub async fn walk(
    config: &Config,
    table: &SharedTable,
    ingest: &IngestHandle,
    ptrace: &PtraceHandle,
    pid: u32,
) -> HeapWalkRecord {
    let started = Instant::now();
    table.lock(|t| t.begin_walk(pid));
    let frozen = if config.stop_the_world {
        let ptrace = ptrace.clone();
        match tokio::task::spawn_blocking(move || ptrace.freeze(pid)).await {
            Ok(Ok(f)) => Some(f),
            Ok(Err(err)) => {
                log::warn!("pid {pid}: cannot stop it for the heap walk ({err}); walking it live");
                None
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let method = config.read_method;
    let result = while_running(
        config.output.status,
        format!("pid {pid}: walking the heap"),
        tokio::task::spawn_blocking(move || read_heap(pid, method)),
    )
    .await
    .unwrap_or_else(|e| Err(format!("the walk failed: {e}")));
    ingest.drain().await;
    let blocks: Vec<(u64, u64)> = match &result {
        Ok(w) => w.blocks.iter().map(|b| (b.addr, b.size)).collect(),
        Err(_) => Vec::new(),
    };
    let ((adopted, bytes), hold) = table.with(|t| t.adopt(pid, &blocks));
    if let Some(f) = frozen {
        let ptrace = ptrace.clone();
        let _ = tokio::task::spawn_blocking(move || ptrace.thaw(f)).await;
    }
    HeapWalkRecord {
        pid,
        blocks: adopted,
        bytes,
        arenas: result.as_ref().map_or(0, |w| w.arenas),
        cached_free: result.as_ref().map_or(0, |w| w.cached_free),
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
        lock_us: hold.as_micros() as u64,
        error: result.err(),
    }
}
