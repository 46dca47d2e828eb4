//! Kernel-mode output: per-site records and suspected leaks (NDJSON), or the text
//! report; call sites and stacks symbolized through kallsyms.

use std::{collections::HashMap, io};

use crate::{
    config::OutputConfig,
    ebpf::MapReaders,
    metrics::{SharedMetrics, SiteFigure, SiteLabels},
    report::{
        files::ReportFile,
        json::Output,
        records::{
            EndReason, KernelCallSiteRecord, KernelEndRecord, KernelOptions, KernelStats,
            KernelSuspectRecord, PidShare, Record, RunMode, SiteFigures, SiteName, StackFigures,
            StartRecord, Target,
        },
        text::{age, bytes},
    },
    symbolize::{Frame, Symbolizer},
    table::{
        growth::{Confidence, Trend},
        kernel::{CallSiteKey, CallSiteSummary, Figures},
    },
};

/// Kernel frames that belong to the tracing machinery, not to the allocation.
const TRACING_FRAMES: &[&str] = &[
    "bpf_",
    "__bpf",
    "perf_trace",
    "perf_tp",
    "trace_event",
    "__traceiter",
    "trace_call_bpf",
    "perf_",
];

fn is_tracing(f: &Frame) -> bool {
    f.function
        .as_deref()
        .is_some_and(|n| TRACING_FRAMES.iter().any(|p| n.starts_with(p)))
}

/// One report's worth of kernel figures: the call sites with outstanding objects
/// (each with its stacks), their trends and the cgroups of the processes named.
pub struct KernelView {
    pub call_sites: Vec<CallSiteSummary>,
    /// By call-site index.
    pub call_site_trends: HashMap<u32, Trend>,
    /// By stack site.
    pub stack_trends: HashMap<u32, Trend>,
    pub cgroups: HashMap<u32, u64>,
}

impl KernelView {
    fn suspected(&self, c: &CallSiteSummary) -> Option<(Confidence, &Trend)> {
        let t = self.call_site_trends.get(&c.index)?;
        Some((t.suspected?, t))
    }
}

/// Stacks listed per call site in a `kernel_call_site` record.
const STACKS_PER_CALL_SITE: usize = 3;

/// `function [cache]`, or the address.
fn call_site_label(call: &Frame, key: &CallSiteKey) -> String {
    let what = if key.page {
        "page allocation".to_owned()
    } else {
        call.label()
    };
    if key.cache.is_empty() {
        what
    } else {
        format!("{what} [{}]", key.cache)
    }
}

/// Writes kernel-mode reports.
pub struct KernelReporter {
    sink: Output,
    out: OutputConfig,
    pub readers: MapReaders,
    symbolizer: Symbolizer,
    stacks: HashMap<u64, Vec<Frame>>,
    suspected: HashMap<u32, Confidence>,
    /// Slab caches known to be reclaimable (or not), by name.
    reclaimable: HashMap<String, bool>,
    /// Every estimate is multiplied by this (the sampling factor).
    scale: u64,
    seq: u64,
    /// `--metrics`: fed the same figures as the records.
    metrics: Option<SharedMetrics>,
}

impl KernelReporter {
    pub fn new(
        out: &OutputConfig,
        readers: MapReaders,
        scale: u64,
        file: Option<ReportFile>,
    ) -> Self {
        Self {
            sink: Output::new(out.json, file),
            out: out.clone(),
            readers,
            symbolizer: Symbolizer::new(),
            stacks: HashMap::new(),
            suspected: HashMap::new(),
            reclaimable: HashMap::new(),
            scale,
            seq: 0,
            metrics: None,
        }
    }

    /// Feeds `metrics` from now on.
    pub fn with_metrics(mut self, metrics: Option<SharedMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    fn metrics(&self, update: impl FnOnce(&mut crate::metrics::Metrics)) {
        crate::metrics::update(self.metrics.as_ref(), update);
    }

    /// The probes are attached: the report file may be emptied now.
    pub fn begin(&mut self) {
        self.sink.start();
    }

    /// True once the NDJSON reader went away (`| head`).
    pub fn output_closed(&self) -> bool {
        self.sink.is_closed()
    }

    pub fn start(&mut self, targets: &[Target], options: &KernelOptions) {
        self.sink.json(&Record::Start(StartRecord {
            kernel: Some(options),
            ..StartRecord::new(RunMode::Kernel, targets)
        }));
    }

    /// The frames of a kernel stack, innermost first, tracing frames dropped.
    fn stack_frames(&mut self, stack_id: u64) -> Vec<Frame> {
        if let Some(frames) = self.stacks.get(&stack_id) {
            return frames.clone();
        }
        let addrs = self.readers.stack(stack_id, true).unwrap_or_default();
        let frames: Vec<Frame> = self
            .symbolizer
            .kernel_frames(&addrs)
            .into_iter()
            .skip_while(is_tracing)
            .collect();
        self.stacks.insert(stack_id, frames.clone());
        frames
    }

    /// One report: the largest call sites (and every suspected one) with their
    /// largest stacks, and new suspects.
    pub fn report(&mut self, view: &KernelView) {
        self.seq += 1;
        let scale = self.scale;
        let mut text = String::new();
        let mut metric_sites = Vec::new();
        for (rank, c) in view.call_sites.iter().enumerate() {
            let mut suspected = view.suspected(c);
            let in_metrics =
                self.metrics.is_some() && (rank < self.out.metrics_sites || suspected.is_some());
            if rank >= self.out.top && suspected.is_none() && !in_metrics {
                continue;
            }
            let call = self.call_frame(c.key.call_site);
            if let Some((confidence, _)) = &mut suspected
                && self.is_kernel_cache(c, &call)
            {
                // The kernel's own caches grow with use and shrink under memory
                // pressure: growth there is weak evidence.
                *confidence = Confidence::Low;
            }
            if in_metrics {
                metric_sites.push(SiteFigure {
                    labels: SiteLabels {
                        call_site: format!("{:#x}", c.key.call_site),
                        function: call.function.clone().unwrap_or_default(),
                        cache: c.key.cache.clone(),
                    },
                    objects: c.figures.outstanding * scale,
                    bytes: c.figures.bytes * scale,
                    suspected: suspected.map(|(confidence, _)| confidence),
                });
            }
            if rank >= self.out.top && suspected.is_none() {
                continue;
            }
            let stacks: Vec<StackFigures> = c
                .stacks
                .iter()
                .take(STACKS_PER_CALL_SITE)
                .map(|st| StackFigures {
                    site: st.site,
                    figures: site_figures(&st.figures, scale, &view.cgroups),
                    trend: view.stack_trends.get(&st.site),
                    frames: self.stack_frames(st.key.stack_id),
                })
                .collect();
            self.sink
                .json(&Record::KernelCallSite(KernelCallSiteRecord {
                    seq: self.seq,
                    site: site_name(c, &call),
                    page: c.key.page,
                    figures: site_figures(&c.figures, scale, &view.cgroups),
                    trend: view.call_site_trends.get(&c.index),
                    stacks_total: c.stacks.len(),
                    stacks: &stacks,
                }));
            if let Some((confidence, trend)) = suspected
                && self
                    .suspected
                    .get(&c.index)
                    .is_none_or(|old| *old < confidence)
            {
                self.suspected.insert(c.index, confidence);
                let frames = stacks.first().map_or(&[][..], |s| &s.frames[..]);
                self.suspect(c, &call, frames, confidence, trend, view, &mut text);
            }
        }
        self.metrics(|m| m.kernel_sites(&metric_sites));
        if !text.is_empty() {
            self.sink.text(&text);
        }
    }

    /// Whether a call site fills one of the kernel's reclaimable caches: its slab
    /// cache is reclaimable (`/sys/kernel/slab/NAME/reclaim_account`: dentries,
    /// inodes, radix-tree nodes, extent status, buffer heads), or the call site is
    /// one of the functions that fill such caches with kmalloc'd parts (a dentry's
    /// long name, an inode's security blob and lock context) or that cycle through
    /// regions (DAMON's monitoring thread).
    fn is_kernel_cache(&mut self, c: &CallSiteSummary, call: &Frame) -> bool {
        const CACHE_FILLERS: &[&str] = &[
            "__d_alloc",
            "d_alloc",
            "alloc_inode",
            "xas_alloc",
            "radix_tree_node_alloc",
            "__es_insert_extent",
            "alloc_buffer_head",
            "alloc_slab_obj_exts",
            // Freed with their inode: they follow the inode cache.
            "security_inode_alloc",
            "locks_get_lock_context",
            "damon_",
        ];
        let cache = &c.key.cache;
        let reclaimable = !cache.is_empty()
            && *self.reclaimable.entry(cache.clone()).or_insert_with(|| {
                std::fs::read_to_string(format!("/sys/kernel/slab/{cache}/reclaim_account"))
                    .is_ok_and(|v| v.trim() == "1")
            });
        reclaimable
            || call.function.as_deref().is_some_and(|f| {
                CACHE_FILLERS
                    .iter()
                    .any(|filler| f.starts_with(filler) || f.ends_with("_alloc_inode"))
            })
    }

    fn call_frame(&mut self, call_site: u64) -> Frame {
        self.symbolizer
            .kernel_frames(&[call_site])
            .into_iter()
            .last()
            .unwrap_or_default()
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one suspect's pieces, each distinct"
    )]
    fn suspect(
        &mut self,
        c: &CallSiteSummary,
        call: &Frame,
        stack: &[Frame],
        confidence: Confidence,
        t: &Trend,
        view: &KernelView,
        text: &mut String,
    ) {
        let scale = self.scale;
        let figures = site_figures(&c.figures, scale, &view.cgroups);
        self.sink.json(&Record::KernelSuspect(KernelSuspectRecord {
            site: site_name(c, call),
            confidence,
            slope_per_s: t.slope_per_s * scale as f64,
            r2: t.r2,
            net_growth: t.net_growth * scale as i64,
            window_s: t.window_s,
            outstanding: figures.outstanding,
            bytes: figures.bytes,
            reason: t.reason(),
            pids: figures.pids,
            stack,
        }));
        text.push_str(&format!(
            "suspected kernel leak ({confidence:?} confidence): {}\n  {}\n",
            call_site_label(call, &c.key),
            t.reason()
        ));
        for f in stack.iter().take(6) {
            text.push_str(&format!("    {}\n", f.label()));
        }
    }

    pub fn stats(&mut self, stats: &KernelStats) {
        self.metrics(|m| m.kernel_stats(stats));
        self.sink.json(&Record::KernelStats(stats));
    }

    /// The final record and, in text mode, the summary table. Returns the first
    /// error writing the report.
    pub fn end(
        &mut self,
        reason: EndReason,
        view: &KernelView,
        stats: &KernelStats,
    ) -> io::Result<()> {
        let suspected = self.suspected.len();
        self.sink.json(&Record::KernelEnd(KernelEndRecord {
            reason,
            suspected,
            stats,
        }));
        if self.sink.is_json() {
            return self.sink.take_error().map_or(Ok(()), Err);
        }
        let scale = self.scale;
        let mut text = format!(
            "\nleaktrace kernel summary: {} objects ({}) allocated since start still outstanding; {suspected} suspected leak sites\n\n",
            stats.outstanding,
            bytes(stats.bytes)
        );
        text.push_str(&format!(
            "{:>8} {:>9} {:>7} {:>7}  {}\n",
            "objects", "bytes", "p50 age", "oldest", "call site [cache] (top process)"
        ));
        for c in view.call_sites.iter().take(self.out.top) {
            let f = &c.figures;
            let call = self.call_frame(c.key.call_site);
            let who = f
                .top_pids
                .first()
                .map(|(pid, comm, _)| format!(" ({comm} {pid})"))
                .unwrap_or_default();
            let stacks = match c.stacks.len() {
                1 => String::new(),
                n => format!(" {n} stacks"),
            };
            let mark = if view.suspected(c).is_some() {
                " GROWING"
            } else {
                ""
            };
            let line = format!(
                "{:>8} {:>9} {:>7} {:>7}  {}{who}{stacks}{mark}",
                f.outstanding * scale,
                bytes(f.bytes * scale),
                age(f.age_p50_ms),
                age(f.age_max_ms),
                call_site_label(&call, &c.key)
            );
            text.push_str(&line.chars().take(100).collect::<String>());
            text.push('\n');
        }
        text.push_str(&format!(
            "\nevents: {} records, {} lost, {} frees missed, {} recursion misses\n",
            stats.events.records,
            stats.events.lost_total,
            stats.frees_missed,
            stats.events.recursion_misses.values().sum::<u64>()
        ));
        self.sink.text(&text);
        self.sink.take_error().map_or(Ok(()), Err)
    }
}

/// A site's figures as written: scaled up by the sampling factor, with the
/// cgroups of the processes named.
fn site_figures(f: &Figures, scale: u64, cgroups: &HashMap<u32, u64>) -> SiteFigures {
    SiteFigures {
        outstanding: f.outstanding * scale,
        bytes: f.bytes * scale,
        allocated: f.allocated * scale,
        freed: f.freed * scale,
        aged: f.aged * scale,
        aged_bytes: f.aged_bytes * scale,
        age_p50_ms: f.age_p50_ms,
        age_p90_ms: f.age_p90_ms,
        age_max_ms: f.age_max_ms,
        pids: f
            .top_pids
            .iter()
            .map(|(pid, comm, n)| PidShare {
                pid: *pid,
                comm: comm.clone(),
                cgroup: cgroups.get(pid).copied(),
                objects: n * scale,
            })
            .collect(),
    }
}

fn site_name<'a>(c: &'a CallSiteSummary, call: &'a Frame) -> SiteName<'a> {
    SiteName {
        call_site: c.key.call_site,
        function: call.function.as_deref(),
        cache: &c.key.cache,
    }
}
