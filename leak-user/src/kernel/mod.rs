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

pub mod report;

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

use self::report::{KernelReporter, KernelView};
use crate::{
    clock,
    config::{Config, KernelConfig},
    ebpf::{LoadOptions, Probes, StampKind, tracefs},
    events::Event,
    proc,
    report::{
        files::OutputFiles,
        records::{EndReason, KernelOptions, KernelStats, Target},
    },
    session::{
        self, figures,
        ingest::{self, EventSink, IngestHandle},
        logging::spawn_logger,
        status::{Status, StatusLine},
    },
    table::{
        Shared,
        growth::{Evidence, GrowthTracker},
        kernel::{FreeProbeShare, FreeProbes, KernelTable},
    },
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
    let files = OutputFiles::open(
        config.output.path.as_deref(),
        config.output.pprof.as_deref(),
        config.output.flamegraph.as_deref(),
        None,
    )?;
    let metrics =
        crate::metrics::server::start(config.output.metrics, config.output.metrics_sites).await?;
    let epoch = clock::now_ns();
    let started = Instant::now();
    let mut probes = load(&config, &k, cgroups.as_deref())?;
    let free_probes = attach(&mut probes, &k)?;
    probes.started();
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
    let rings = probes.take_rings()?;
    let stamps = probes.stamp_reader()?;
    let mut kernel_table = KernelTable::new(epoch, k.caches.clone());
    if !k.include_tracer {
        kernel_table.exclude_tracer(std::process::id());
    }
    let table = Shared::new(kernel_table);
    let ingest = ingest::spawn(rings, stamps, KernelSink(table.clone()))
        .context("cannot watch the ring buffer")?;
    let scale = 1u64 << k.sample_shift;
    let mut reporter =
        KernelReporter::new(&config.output, readers, scale, files.report).with_metrics(metrics);
    let targets: Vec<Target> = k.pids.iter().map(|&p| session::target(p)).collect();
    reporter.start(
        &targets,
        &KernelOptions {
            caches: k.caches.clone(),
            cgroup: k.cgroup.as_ref().map(|p| p.display().to_string()),
            pages: k.pages,
            free_probes,
            sample: scale,
            interval_ms: config.interval.as_millis() as u64,
            min_age_ms: config.verdict.min_age_ms,
            min_growth_window_ms: k.min_growth_window.as_millis() as u64,
            include_tracer: k.include_tracer,
        },
    );
    reporter.begin();
    let mut session = KernelSession {
        probes,
        table,
        ingest,
        reporter,
        growth: Growth::default(),
        free_probes,
        share_at_start,
        started,
        scale,
        min_age_ms: config.verdict.min_age_ms,
        min_window_s: k.min_growth_window.as_secs_f64(),
        signal: None,
    };
    let reason = session.main_loop(&config).await?;
    session.finish(reason).await?;
    Ok(session.signal.map_or(0, |s| 128 + s))
}

/// Loads the programs with the kernel filters (pids, cgroups) in place.
fn load(config: &Config, k: &KernelConfig, cgroups: Option<&[u64]>) -> anyhow::Result<Probes> {
    let mut probes = Probes::load(&LoadOptions {
        ring_bytes: config.ring_bytes,
        stack_entries: config.stack_entries,
        kernel_stacks: true,
        follow_forks: false,
        capture_stacks: config.stacks,
        sample_shift: k.sample_shift,
        kernel_filter_pids: !k.pids.is_empty(),
        kernel_filter_cgroups: cgroups.is_some(),
        task_calls: false,
        empty_probes: false,
        scoped_probes: false,
        stamps: Some(StampKind::Clock),
        dual_free_probes: k.free_probes == FreeProbes::Both,
        stack_mode: leak_common::StackMode::FramePointers,
        unwind_rows: 1,
        unwind_processes: 1,
        unwind_fallback: true,
        cpu_rings: false,
    })?;
    for &pid in &k.pids {
        probes.add_target(pid)?;
    }
    if let Some(ids) = cgroups {
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
    Ok(probes)
}

/// The free probes to use: raw tracepoints read the free's pointer as the second
/// TP_PROTO argument, so they are used only when the record layout (which follows
/// the prototype) agrees.
fn free_probes_for(probes: &Probes, wanted: FreeProbes) -> FreeProbes {
    let raw_ok = ["kmem/kfree", "kmem/kmem_cache_free"].iter().all(|e| {
        tracefs::field_order(&probes.tracefs, e)
            .get(1)
            .map(String::as_str)
            == Some("ptr")
    });
    if wanted.raw() && !raw_ok {
        log::warn!(
            "the kfree tracepoints have an unexpected layout: using classic tracepoints only for frees"
        );
        return FreeProbes::Classic;
    }
    wanted
}

/// Attaches the programs, frees first: loading a program allocates and frees
/// kernel memory (the verifier's states), and a free missed while allocations are
/// traced would leave a false leak behind. Returns the free probes in use.
fn attach(probes: &mut Probes, k: &KernelConfig) -> anyhow::Result<FreeProbes> {
    let free_probes = free_probes_for(probes, k.free_probes);
    if free_probes.raw() {
        probes.attach_raw_tracepoint("kfree_raw", "kfree")?;
        probes.attach_raw_tracepoint("kmem_cache_free_raw", "kmem_cache_free")?;
    }
    if free_probes.classic() {
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
    Ok(free_probes)
}

/// A running kernel-mode trace.
struct KernelSession {
    probes: Probes,
    table: Shared<KernelTable>,
    ingest: IngestHandle,
    reporter: KernelReporter,
    growth: Growth,
    free_probes: FreeProbes,
    share_at_start: FreeProbeShare,
    started: Instant,
    /// Every estimate is multiplied by this (the sampling factor).
    scale: u64,
    min_age_ms: u32,
    /// Seconds a site must be watched before it can be suspected.
    min_window_s: f64,
    /// The signal that ended the run: the exit status is 128 + it, as in shells.
    signal: Option<i32>,
}

impl KernelSession {
    async fn main_loop(&mut self, config: &Config) -> anyhow::Result<EndReason> {
        let mut status = StatusLine::new(config.output.status);
        let mut report_tick = interval(config.interval);
        report_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        report_tick.tick().await;
        let mut status_tick = interval(Duration::from_millis(500));
        let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let reason = loop {
            tokio::select! {
                _ = report_tick.tick() => {
                    let view = self.view();
                    self.reporter.report(&view);
                    let s = self.stats();
                    self.reporter.stats(&s);
                }
                _ = status_tick.tick() => status.show(&self.status()),
                _ = sigint.recv() => {
                    self.signal = Some(libc::SIGINT);
                    break EndReason::Signal;
                }
                _ = sigterm.recv() => {
                    self.signal = Some(libc::SIGTERM);
                    break EndReason::Signal;
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    break EndReason::Duration;
                }
            }
            if self.reporter.output_closed() {
                break EndReason::OutputClosed;
            }
        };
        status.clear();
        Ok(reason)
    }

    /// The last report and the end record.
    async fn finish(&mut self, reason: EndReason) -> std::io::Result<()> {
        self.ingest.drain().await;
        let view = self.view();
        self.reporter.report(&view);
        let s = self.stats();
        self.reporter.end(reason, &view, &s)
    }

    fn stats(&self) -> KernelStats {
        let ((outstanding, bytes), counters) = self.table.lock(|t| (t.outstanding(), t.counters));
        let recursion_misses: std::collections::BTreeMap<String, u64> =
            self.probes.recursion_misses().into_iter().collect();
        let share =
            FreeProbeShare::new(self.reporter.readers.free_probe_counts(), &recursion_misses)
                .since(&self.share_at_start);
        KernelStats {
            events: figures::event_figures(
                self.started,
                &self.ingest.counters,
                &self.reporter.readers.losses(),
                recursion_misses,
                self.table.take_longest_hold().as_micros() as u64,
            ),
            outstanding: outstanding * self.scale,
            bytes: bytes * self.scale,
            counters,
            frees_missed: match self.free_probes {
                FreeProbes::Both => share.missed_by_both(),
                FreeProbes::Raw => share.raw_skipped,
                FreeProbes::Classic => share.classic_skipped,
            },
            free_probes: (self.free_probes == FreeProbes::Both).then_some(share),
        }
    }

    fn status(&self) -> Status {
        let s = self.stats();
        Status {
            objects: s.outstanding,
            bytes: s.bytes,
            allocs: s.counters.allocs * self.scale,
            frees: s.counters.frees * self.scale,
            events_per_sec: s.events.records_per_sec,
            lost: s.events.lost_total,
            leaks: 0,
            leaked_bytes: 0,
        }
    }

    /// The call sites now, with their trends (recorded into the growth trackers).
    fn view(&mut self) -> KernelView {
        let (call_sites, by_site, by_call_site, cgroups) = self.table.lock(|t| {
            let call_sites = t.summaries(clock::now_ns(), self.min_age_ms);
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
        let now = self.started.elapsed().as_secs_f64();
        let growth = &mut self.growth;
        growth.stacks.record(now, &by_site);
        growth.call_sites.record(now, &by_call_site);
        let evidence = Evidence {
            min_growth: MIN_GROWTH.div_ceil(self.scale),
            min_window_s: self.min_window_s,
        };
        KernelView {
            call_site_trends: call_sites
                .iter()
                .filter_map(|c| Some((c.index, growth.call_sites.trend(c.index, evidence)?)))
                .collect(),
            stack_trends: call_sites
                .iter()
                .flat_map(|c| &c.stacks)
                .filter_map(|s| Some((s.site, growth.stacks.trend(s.site, evidence)?)))
                .collect(),
            call_sites,
            cgroups,
        }
    }
}
