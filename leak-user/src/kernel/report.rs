//! Kernel-mode output: per-site records and suspected leaks (NDJSON), or the text
//! report; call sites and stacks symbolized through kallsyms.

use std::{
    collections::{BTreeMap, HashMap},
    io,
};

use serde::Serialize;

use super::{
    growth::{Confidence, Trend},
    table::{CallSiteKey, CallSiteSummary, Figures, KernelCounters},
};
use crate::{
    config::{FreeProbes, OutputConfig},
    ebpf::MapReaders,
    report::{
        json::{Output, SCHEMA_VERSION, hex},
        text::{age, bytes},
    },
    session::{EndReason, TargetInfo, figures::EventFigures},
    symbolize::{Frame, Symbolizer},
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

#[derive(Serialize)]
struct PidRecord {
    pid: u32,
    comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<u64>,
    objects: u64,
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

/// Figures of a call site or stack as written (scaled up by the sampling factor).
#[derive(Serialize)]
struct FiguresRecord {
    outstanding: u64,
    bytes: u64,
    allocated: u64,
    freed: u64,
    aged: u64,
    aged_bytes: u64,
    age_p50_ms: u64,
    age_p90_ms: u64,
    age_max_ms: u64,
    pids: Vec<PidRecord>,
}

impl FiguresRecord {
    fn new(f: &Figures, scale: u64, cgroups: &HashMap<u32, u64>) -> Self {
        Self {
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
                .map(|(pid, comm, n)| PidRecord {
                    pid: *pid,
                    comm: comm.clone(),
                    cgroup: cgroups.get(pid).copied(),
                    objects: n * scale,
                })
                .collect(),
        }
    }
}

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

/// Figures for `kernel_stats` and `kernel_end`.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStats {
    #[serde(flatten)]
    pub events: EventFigures,
    pub outstanding: u64,
    pub bytes: u64,
    pub counters: KernelCounters,
    /// Frees that no program recorded (each one leaves a false outstanding object).
    /// Exact with one kind of free probe; a lower bound with both.
    pub frees_missed: u64,
    /// With both free probes: how they shared the frees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_probes: Option<FreeProbeShare>,
}

/// How the raw and the classic free programs shared the frees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FreeProbeShare {
    pub raw_recorded: u64,
    pub raw_deferred: u64,
    pub raw_skipped: u64,
    pub classic_recorded: u64,
    pub classic_deferred: u64,
    pub classic_skipped: u64,
}

/// The programs attached to the free tracepoints, by kind.
pub const RAW_FREE_PROGRAMS: [&str; 2] = ["kfree_raw", "kmem_cache_free_raw"];
pub const CLASSIC_FREE_PROGRAMS: [&str; 2] = ["kfree", "kmem_cache_free"];

impl FreeProbeShare {
    /// `counts` indexed by [`leak_common::FreeProbeCount`]; `misses`: recursion
    /// misses by program name.
    pub fn new(counts: [u64; 4], misses: &BTreeMap<String, u64>) -> Self {
        let skipped = |names: &[&str]| names.iter().filter_map(|n| misses.get(*n)).sum();
        Self {
            raw_recorded: counts[0],
            raw_deferred: counts[1],
            raw_skipped: skipped(&RAW_FREE_PROGRAMS),
            classic_recorded: counts[2],
            classic_deferred: counts[3],
            classic_skipped: skipped(&CLASSIC_FREE_PROGRAMS),
        }
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            raw_recorded: self.raw_recorded.saturating_sub(earlier.raw_recorded),
            raw_deferred: self.raw_deferred.saturating_sub(earlier.raw_deferred),
            raw_skipped: self.raw_skipped.saturating_sub(earlier.raw_skipped),
            classic_recorded: self
                .classic_recorded
                .saturating_sub(earlier.classic_recorded),
            classic_deferred: self
                .classic_deferred
                .saturating_sub(earlier.classic_deferred),
            classic_skipped: self.classic_skipped.saturating_sub(earlier.classic_skipped),
        }
    }

    /// Frees both programs skipped, at least. Each free is run or skipped by each
    /// program; when both run, one records and one defers; when one runs, it
    /// records. So skips = one-run frees + 2 × no-run frees, and recorded −
    /// deferred = one-run frees (+ 2 × the rare free recorded twice, which makes
    /// this a lower bound).
    pub fn missed_by_both(&self) -> u64 {
        let skipped = self.raw_skipped + self.classic_skipped;
        let recorded = self.raw_recorded + self.classic_recorded;
        let deferred = self.raw_deferred + self.classic_deferred;
        (skipped + deferred).saturating_sub(recorded) / 2
    }
}

/// How kernel records name a call site: its address, function and slab cache.
#[derive(Serialize)]
struct SiteName<'a> {
    #[serde(serialize_with = "hex")]
    call_site: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    function: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    cache: &'a str,
}

impl<'a> SiteName<'a> {
    fn new(c: &'a CallSiteSummary, call: &'a Frame) -> Self {
        Self {
            call_site: c.key.call_site,
            function: call.function.as_deref(),
            cache: &c.key.cache,
        }
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
    /// Every estimate is multiplied by this (the sampling factor).
    scale: u64,
    seq: u64,
}

impl KernelReporter {
    pub fn new(out: &OutputConfig, readers: MapReaders, scale: u64) -> io::Result<Self> {
        Ok(Self {
            sink: Output::open(out)?,
            out: out.clone(),
            readers,
            symbolizer: Symbolizer::new(),
            stacks: HashMap::new(),
            suspected: HashMap::new(),
            scale,
            seq: 0,
        })
    }

    /// True once the NDJSON reader went away (`| head`).
    pub fn output_closed(&self) -> bool {
        self.sink.is_closed()
    }

    pub fn start(&mut self, targets: &[TargetInfo], options: &KernelOptions) {
        #[derive(Serialize)]
        struct Start<'a> {
            r#type: &'static str,
            schema: u32,
            version: &'static str,
            ebpf_object: &'static str,
            mode: &'static str,
            targets: &'a [TargetInfo],
            kernel: &'a KernelOptions,
        }
        self.sink.json(&Start {
            r#type: "start",
            schema: SCHEMA_VERSION,
            version: env!("CARGO_PKG_VERSION"),
            ebpf_object: crate::ebpf::OBJECT_ORIGIN,
            mode: "kernel",
            targets,
            kernel: options,
        });
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
        for (rank, c) in view.call_sites.iter().enumerate() {
            let suspected = view.suspected(c);
            if rank >= self.out.top && suspected.is_none() {
                continue;
            }
            let stacks: Vec<StackRecord> = c
                .stacks
                .iter()
                .take(STACKS_PER_CALL_SITE)
                .map(|st| StackRecord {
                    site: st.site,
                    figures: FiguresRecord::new(&st.figures, scale, &view.cgroups),
                    trend: view.stack_trends.get(&st.site),
                    frames: self.stack_frames(st.key.stack_id),
                })
                .collect();
            let call = self.call_frame(c.key.call_site);
            #[derive(Serialize)]
            struct CallSiteRecord<'a> {
                r#type: &'static str,
                seq: u64,
                #[serde(flatten)]
                site: SiteName<'a>,
                #[serde(skip_serializing_if = "std::ops::Not::not")]
                page: bool,
                #[serde(flatten)]
                figures: FiguresRecord,
                #[serde(skip_serializing_if = "Option::is_none")]
                trend: Option<&'a Trend>,
                stacks_total: usize,
                stacks: &'a [StackRecord<'a>],
            }
            self.sink.json(&CallSiteRecord {
                r#type: "kernel_call_site",
                seq: self.seq,
                site: SiteName::new(c, &call),
                page: c.key.page,
                figures: FiguresRecord::new(&c.figures, scale, &view.cgroups),
                trend: view.call_site_trends.get(&c.index),
                stacks_total: c.stacks.len(),
                stacks: &stacks,
            });
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
        if !text.is_empty() {
            self.sink.text(&text);
        }
    }

    fn call_frame(&mut self, call_site: u64) -> Frame {
        self.symbolizer
            .kernel_frames(&[call_site])
            .into_iter()
            .last()
            .unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
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
        #[derive(Serialize)]
        struct Suspect<'a> {
            r#type: &'static str,
            #[serde(flatten)]
            site: SiteName<'a>,
            confidence: Confidence,
            slope_per_s: f64,
            r2: f64,
            net_growth: i64,
            window_s: f64,
            outstanding: u64,
            bytes: u64,
            reason: String,
            pids: Vec<PidRecord>,
            stack: &'a [Frame],
        }
        let scale = self.scale;
        let figures = FiguresRecord::new(&c.figures, scale, &view.cgroups);
        self.sink.json(&Suspect {
            r#type: "kernel_suspect",
            site: SiteName::new(c, call),
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
        });
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
        #[derive(Serialize)]
        struct Record<'a> {
            r#type: &'static str,
            #[serde(flatten)]
            stats: &'a KernelStats,
        }
        self.sink.json(&Record {
            r#type: "kernel_stats",
            stats,
        });
    }

    /// The final record and, in text mode, the summary table.
    pub fn end(&mut self, reason: EndReason, view: &KernelView, stats: &KernelStats) {
        #[derive(Serialize)]
        struct End<'a> {
            r#type: &'static str,
            reason: EndReason,
            suspected: usize,
            #[serde(flatten)]
            stats: &'a KernelStats,
        }
        let suspected = self.suspected.len();
        self.sink.json(&End {
            r#type: "kernel_end",
            reason,
            suspected,
            stats,
        });
        if self.sink.is_json() {
            return;
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
    }
}

/// One stack of a call site, in a `kernel_call_site` record.
#[derive(Serialize)]
struct StackRecord<'a> {
    site: u32,
    #[serde(flatten)]
    figures: FiguresRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    trend: Option<&'a Trend>,
    frames: Vec<Frame>,
}

/// Kernel-mode options echoed in the start record.
#[derive(Clone, Debug, Serialize)]
pub struct KernelOptions {
    pub caches: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub pages: bool,
    pub free_probes: FreeProbes,
    pub sample: u64,
    pub interval_ms: u64,
    pub min_age_ms: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn misses(raw: u64, classic: u64) -> BTreeMap<String, u64> {
        BTreeMap::from([
            ("kfree_raw".to_owned(), raw),
            ("kmem_cache_free".to_owned(), classic),
            ("kmalloc".to_owned(), 1000),
        ])
    }

    #[test]
    fn every_free_covered_by_one_probe_is_not_missed() {
        // 100 frees: 90 seen by both (raw first), 7 only by classic, 3 only by raw.
        let share = FreeProbeShare::new([93, 0, 7, 90], &misses(7, 3));
        assert_eq!(share.missed_by_both(), 0);
    }

    #[test]
    fn frees_skipped_by_both_are_counted() {
        // 100 frees: 90 by both, 6 only by classic, 4 by neither.
        let share = FreeProbeShare::new([90, 0, 6, 90], &misses(10, 4));
        assert_eq!(share.missed_by_both(), 4);
        assert_eq!(share.raw_skipped, 10);
        assert_eq!(share.classic_skipped, 4);
    }
}
