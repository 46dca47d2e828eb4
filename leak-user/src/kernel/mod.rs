//! Kernel slab mode: system-wide kmalloc/kmem_cache allocations and their frees
//! (and pages with `--pages`), by call site and stack, with the process and cgroup
//! that caused them, and growth detection.
//!
//! The kmem tracepoints are the interface (this kernel has no kprobes); their
//! field offsets come from tracefs. Allocations go through classic tracepoints;
//! frees through raw tracepoints by default, which the kernel does not skip when
//! another BPF program is running on the CPU (a skipped free is a false leak).
//! Allocations are filtered by `--pid` and `--cgroup` in the kernel, frees never
//! are: RCU frees run later on other tasks.

pub mod growth;
pub mod report;
pub mod table;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval},
};

use self::{
    growth::GrowthTracker,
    report::{FreeProbeShare, KernelOptions, KernelReporter, KernelStats, KernelView},
    table::KernelTable,
};
use crate::{
    cli::FreeProbesArg,
    clock,
    config::Config,
    ebpf::{LoadOptions, Probes, tracefs},
    events::Event,
    proc,
    session::{
        ingest::{self, EventSink},
        reporter::{EndReason, TargetInfo, lost_map},
        spawn_logger,
        status::{Status, StatusLine},
    },
    table::Shared,
};

/// Objects a site must have gained to be suspected (after scaling by sampling).
const MIN_GROWTH: u64 = 20;

struct KernelSink(Shared<KernelTable>);

/// Outstanding counts over time, per stack and per call site.
#[derive(Default)]
struct Growth {
    stacks: GrowthTracker,
    call_sites: GrowthTracker,
}

impl EventSink for KernelSink {
    fn apply(&mut self, events: &[Event]) -> bool {
        self.0.lock(|t| {
            for e in events {
                t.apply(e);
            }
        });
        false
    }
}

/// The cgroup v2 ids of `path` and every cgroup below it (a cgroup's id is its
/// directory's inode number).
pub fn cgroup_ids(path: &Path) -> anyhow::Result<Vec<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    let full = if path.is_absolute() {
        path.to_owned()
    } else {
        PathBuf::from("/sys/fs/cgroup").join(path)
    };
    let mut ids = Vec::new();
    let mut stack = vec![full.clone()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::metadata(&dir).with_context(|| {
            format!(
                "no cgroup at {} (give a path under /sys/fs/cgroup)",
                full.display()
            )
        })?;
        ids.push(meta.ino());
        for entry in std::fs::read_dir(&dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    Ok(ids)
}

/// Runs kernel mode until a signal or --duration.
pub async fn run(config: Config) -> anyhow::Result<i32> {
    let k = config.kernel.clone();
    for &pid in &k.pids {
        if !proc::is_alive(pid) {
            bail!("no such process: {pid} (`pgrep NAME` finds a pid by name)");
        }
    }
    let cgroups = k.cgroup.as_deref().map(cgroup_ids).transpose()?;
    let epoch = clock::now_ns();
    let started = Instant::now();
    let mut probes = Probes::load(&LoadOptions {
        ring_bytes: config.ring_bytes,
        stack_entries: config.stack_entries,
        follow_forks: false,
        capture_stacks: config.stacks,
        sample_shift: k.sample_shift,
        kernel_filter_pids: !k.pids.is_empty(),
        kernel_filter_cgroups: cgroups.is_some(),
        dual_free_probes: k.free_probes == FreeProbesArg::Both,
    })?;
    for &pid in &k.pids {
        probes.add_target(pid)?;
    }
    if let Some(ids) = &cgroups {
        probes.add_cgroups(ids)?;
    }
    if probes.layout.kmalloc_ptr == leak_common::TracepointLayout::ABSENT {
        bail!(
            "this kernel has no kmem:kmalloc tracepoint with a ptr field; kernel mode needs the kmem tracepoints"
        );
    }
    if probes.layout.cache_alloc_name == leak_common::TracepointLayout::ABSENT {
        log::warn!(
            "this kernel's kmem:kmem_cache_alloc tracepoint has no cache name field: slab caches are not named in reports"
        );
    }
    // Frees first: loading a program allocates and frees kernel memory (the
    // verifier's states), and a free missed while allocations are traced would
    // leave a false leak behind.
    // Raw tracepoints read the free's pointer as the second TP_PROTO argument:
    // check that against the record layout, which follows the prototype.
    let raw_ok = ["kmem/kfree", "kmem/kmem_cache_free"].iter().all(|e| {
        tracefs::field_order(&probes.tracefs, e)
            .get(1)
            .map(String::as_str)
            == Some("ptr")
    });
    let free_probes = match k.free_probes {
        FreeProbesArg::Both | FreeProbesArg::Raw if !raw_ok => {
            log::warn!(
                "the kfree tracepoints have an unexpected layout: using classic tracepoints only for frees"
            );
            FreeProbesArg::Classic
        }
        other => other,
    };
    if free_probes != FreeProbesArg::Classic {
        probes.attach_raw_tracepoint("kfree_raw", "kfree")?;
        probes.attach_raw_tracepoint("kmem_cache_free_raw", "kmem_cache_free")?;
    }
    if free_probes != FreeProbesArg::Raw {
        probes.attach_tracepoint("kfree", "kmem", "kfree")?;
        probes.attach_tracepoint("kmem_cache_free", "kmem", "kmem_cache_free")?;
    }
    if k.pages {
        probes.attach_tracepoint("mm_page_free", "kmem", "mm_page_free")?;
    }
    probes.attach_tracepoint("kmalloc", "kmem", "kmalloc")?;
    probes.attach_tracepoint("kmem_cache_alloc", "kmem", "kmem_cache_alloc")?;
    if k.pages {
        probes.attach_tracepoint("mm_page_alloc", "kmem", "mm_page_alloc")?;
    }
    if let Some(logger) = probes.take_logger() {
        spawn_logger(logger);
    }
    let readers = probes.take_readers()?;
    // Until both free programs were attached, one recorded frees alone: count
    // only from here.
    let share_at_start = FreeProbeShare::new(
        readers.free_probe_counts(),
        &probes.recursion_misses().into_iter().collect(),
    );
    let ring = probes.take_ring()?;
    let table = Shared::new(KernelTable::new(epoch, k.caches.clone()));
    let ingest =
        ingest::spawn(ring, KernelSink(table.clone())).context("cannot watch the ring buffer")?;
    let scale = 1u64 << k.sample_shift;
    let mut reporter = KernelReporter::new(&config.output, readers, scale)?;
    let targets: Vec<TargetInfo> = k.pids.iter().map(|&p| TargetInfo::of(p)).collect();
    reporter.start(
        &targets,
        &KernelOptions {
            caches: k.caches.clone(),
            cgroup: k.cgroup.as_ref().map(|p| p.display().to_string()),
            pages: k.pages,
            free_probes: match free_probes {
                FreeProbesArg::Both => "both",
                FreeProbesArg::Raw => "raw",
                FreeProbesArg::Classic => "classic",
            },
            sample: scale,
            interval_ms: config.interval.as_millis() as u64,
            min_age_ms: config.verdict.min_age_ms,
        },
    );
    let mut growth = Growth::default();
    let mut status = StatusLine::new(config.output.status);
    let mut report_tick = interval(config.interval);
    report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    report_tick.tick().await;
    let mut status_tick = interval(Duration::from_millis(500));
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let stats = |probes: &Probes, reporter: &KernelReporter| {
        let ((outstanding, bytes), counters) = table.lock(|t| (t.outstanding(), t.counters));
        let records = ingest
            .counters
            .records
            .load(std::sync::atomic::Ordering::Relaxed);
        let (lost, lost_total) = lost_map(&reporter.readers.losses());
        let recursion_misses = probes.recursion_misses().into_iter().collect();
        let share = FreeProbeShare::new(reporter.readers.free_probe_counts(), &recursion_misses)
            .since(&share_at_start);
        KernelStats {
            elapsed_ms: started.elapsed().as_millis() as u64,
            records,
            records_per_sec: records as f64 / started.elapsed().as_secs_f64().max(1e-3),
            outstanding: outstanding * scale,
            bytes: bytes * scale,
            lost,
            lost_total,
            decode_errors: ingest
                .counters
                .decode_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            counters,
            frees_missed: match free_probes {
                FreeProbesArg::Both => share.missed_by_both(),
                FreeProbesArg::Raw => share.raw_skipped,
                FreeProbesArg::Classic => share.classic_skipped,
            },
            free_probes: (free_probes == FreeProbesArg::Both).then_some(share),
            recursion_misses,
            longest_lock_hold_us: table.take_longest_hold().as_micros() as u64,
        }
    };
    let min_growth = MIN_GROWTH.div_ceil(scale);
    let view_now = |growth: &mut Growth| {
        let (call_sites, by_site, by_call_site, cgroups) = table.lock(|t| {
            let call_sites = t.summaries(clock::now_ns(), config.verdict.min_age_ms);
            let cgroups: HashMap<u32, u64> = call_sites
                .iter()
                .flat_map(|c| c.figures.top_pids.iter().map(|p| p.0))
                .filter_map(|pid| Some((pid, t.cgroup_of(pid)?)))
                .collect();
            (
                call_sites,
                t.outstanding_by_site(),
                t.outstanding_by_call_site(),
                cgroups,
            )
        });
        let now = started.elapsed().as_secs_f64();
        growth.stacks.record(now, &by_site);
        growth.call_sites.record(now, &by_call_site);
        KernelView {
            call_site_trends: call_sites
                .iter()
                .filter_map(|c| Some((c.index, growth.call_sites.trend(c.index, min_growth)?)))
                .collect(),
            stack_trends: call_sites
                .iter()
                .flat_map(|c| &c.stacks)
                .filter_map(|s| Some((s.site, growth.stacks.trend(s.site, min_growth)?)))
                .collect(),
            call_sites,
            cgroups,
        }
    };
    let reason = loop {
        tokio::select! {
            _ = report_tick.tick() => {
                reporter.report(&view_now(&mut growth));
                let s = stats(&probes, &reporter);
                reporter.stats(&s);
            }
            _ = status_tick.tick() => {
                let s = stats(&probes, &reporter);
                status.show(&Status {
                    objects: s.outstanding,
                    bytes: s.bytes,
                    allocs: s.counters.allocs * scale,
                    frees: s.counters.frees * scale,
                    events_per_sec: s.records_per_sec,
                    lost: s.lost_total,
                    leaks: 0,
                    leaked_bytes: 0,
                });
            }
            _ = sigint.recv() => break EndReason::Signal,
            _ = sigterm.recv() => break EndReason::Signal,
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                break EndReason::Duration;
            }
        }
        if reporter.output_closed() {
            break EndReason::OutputClosed;
        }
    };
    status.clear();
    ingest.drain().await;
    let view = view_now(&mut growth);
    reporter.report(&view);
    let s = stats(&probes, &reporter);
    reporter.end(reason, &view, &s);
    Ok(0)
}
