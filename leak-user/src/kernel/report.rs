//! Kernel-mode output: per-site records and suspected leaks (NDJSON), or the text
//! report; call sites and stacks symbolized through kallsyms.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Write},
};

use serde::Serialize;

use super::{
    growth::{Confidence, Trend},
    table::{KernelCounters, SiteSummary},
};
use crate::{
    config::OutputConfig,
    ebpf::MapReaders,
    report::{
        json::{NdjsonWriter, SCHEMA_VERSION, hex},
        text::{age, bytes},
    },
    session::reporter::{EndReason, TargetInfo},
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

/// What the kernel reporter needs to know about a site beyond its summary.
pub struct SiteView<'a> {
    pub summary: &'a SiteSummary,
    pub trend: Option<Trend>,
    pub cgroups: HashMap<u32, u64>,
}

/// Figures for `kernel_stats` and `kernel_end`.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStats {
    pub elapsed_ms: u64,
    pub records: u64,
    pub records_per_sec: f64,
    pub outstanding: u64,
    pub bytes: u64,
    pub lost: BTreeMap<&'static str, u64>,
    pub lost_total: u64,
    pub decode_errors: u64,
    pub counters: KernelCounters,
    pub recursion_misses: BTreeMap<String, u64>,
    pub longest_lock_hold_us: u64,
}

enum Sink {
    Json(NdjsonWriter),
    Text(Box<dyn Write + Send>),
}

/// Writes kernel-mode reports.
pub struct KernelReporter {
    sink: Sink,
    out: OutputConfig,
    pub readers: MapReaders,
    symbolizer: Symbolizer,
    stacks: HashMap<(u64, u64), Vec<Frame>>,
    suspected: HashMap<u32, Confidence>,
    /// Every estimate is multiplied by this (the sampling factor).
    scale: u64,
    seq: u64,
}

impl KernelReporter {
    pub fn new(out: &OutputConfig, readers: MapReaders, scale: u64) -> io::Result<Self> {
        let w: Box<dyn Write + Send> = match &out.path {
            Some(p) => Box::new(std::fs::File::create(p).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", p.display()))
            })?),
            None => Box::new(io::stdout()),
        };
        Ok(Self {
            sink: if out.json {
                Sink::Json(NdjsonWriter::new(w))
            } else {
                Sink::Text(w)
            },
            out: out.clone(),
            readers,
            symbolizer: Symbolizer::new(),
            stacks: HashMap::new(),
            suspected: HashMap::new(),
            scale,
            seq: 0,
        })
    }

    pub fn output_closed(&self) -> bool {
        matches!(&self.sink, Sink::Json(w) if w.is_broken())
    }

    fn json<T: Serialize>(&mut self, record: &T) {
        if let Sink::Json(w) = &mut self.sink
            && let Err(err) = w.write(record)
        {
            log::error!("cannot write the JSON stream: {err}");
        }
    }

    fn text(&mut self, s: &str) {
        if let Sink::Text(w) = &mut self.sink {
            let _ = w.write_all(s.as_bytes());
            let _ = w.flush();
        }
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
        self.json(&Start {
            r#type: "start",
            schema: SCHEMA_VERSION,
            version: env!("CARGO_PKG_VERSION"),
            ebpf_object: crate::ebpf::OBJECT_ORIGIN,
            mode: "kernel",
            targets,
            kernel: options,
        });
    }

    /// The call site's frame and the allocation stack (tracing frames dropped).
    fn frames(&mut self, call_site: u64, stack_id: u64) -> (Frame, Vec<Frame>) {
        let call = self
            .symbolizer
            .kernel_frames(&[call_site])
            .into_iter()
            .last()
            .unwrap_or_default();
        let stack = match self.stacks.get(&(call_site, stack_id)) {
            Some(s) => s.clone(),
            None => {
                let addrs = self.readers.stack(stack_id, true).unwrap_or_default();
                let frames: Vec<Frame> = self
                    .symbolizer
                    .kernel_frames(&addrs)
                    .into_iter()
                    .skip_while(is_tracing)
                    .collect();
                self.stacks.insert((call_site, stack_id), frames.clone());
                frames
            }
        };
        (call, stack)
    }

    /// One report: the largest sites (and every growing one), and new suspects.
    pub fn report(&mut self, sites: &[SiteView<'_>]) {
        self.seq += 1;
        let scale = self.scale;
        let mut shown = 0;
        let mut text = String::new();
        for v in sites {
            let s = v.summary;
            let confidence = v.trend.as_ref().and_then(|t| t.suspected);
            if shown >= self.out.top && confidence.is_none() {
                continue;
            }
            shown += 1;
            let (call, stack) = self.frames(s.key.call_site, s.key.stack_id);
            #[derive(Serialize)]
            struct Site<'a> {
                r#type: &'static str,
                seq: u64,
                site: u32,
                #[serde(serialize_with = "hex")]
                call_site: u64,
                #[serde(skip_serializing_if = "Option::is_none")]
                function: Option<String>,
                #[serde(skip_serializing_if = "str::is_empty")]
                cache: &'a str,
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
                #[serde(skip_serializing_if = "Option::is_none")]
                trend: Option<&'a Trend>,
                stack: &'a [Frame],
            }
            let pids = s
                .top_pids
                .iter()
                .map(|(pid, comm, n)| PidRecord {
                    pid: *pid,
                    comm: comm.clone(),
                    cgroup: v.cgroups.get(pid).copied(),
                    objects: n * scale,
                })
                .collect();
            self.json(&Site {
                r#type: "kernel_site",
                seq: self.seq,
                site: s.site,
                call_site: s.key.call_site,
                function: call.function.clone(),
                cache: &s.key.cache,
                outstanding: s.outstanding * scale,
                bytes: s.bytes * scale,
                allocated: s.allocated * scale,
                freed: s.freed * scale,
                aged: s.aged * scale,
                aged_bytes: s.aged_bytes * scale,
                age_p50_ms: s.age_p50_ms,
                age_p90_ms: s.age_p90_ms,
                age_max_ms: s.age_max_ms,
                pids,
                trend: v.trend.as_ref(),
                stack: &stack,
            });
            if let (Some(c), Some(t)) = (confidence, v.trend.as_ref())
                && self.suspected.get(&s.site).is_none_or(|old| *old < c)
            {
                self.suspected.insert(s.site, c);
                self.suspect(s, &call, &stack, c, t, &mut text);
            }
        }
        if !text.is_empty() {
            self.text(&text);
        }
    }

    fn suspect(
        &mut self,
        s: &SiteSummary,
        call: &Frame,
        stack: &[Frame],
        c: Confidence,
        t: &Trend,
        text: &mut String,
    ) {
        #[derive(Serialize)]
        struct Suspect<'a> {
            r#type: &'static str,
            site: u32,
            #[serde(serialize_with = "hex")]
            call_site: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            function: Option<String>,
            #[serde(skip_serializing_if = "str::is_empty")]
            cache: &'a str,
            confidence: Confidence,
            slope_per_s: f64,
            r2: f64,
            net_growth: i64,
            window_s: f64,
            outstanding: u64,
            reason: String,
            stack: &'a [Frame],
        }
        let scale = self.scale;
        self.json(&Suspect {
            r#type: "kernel_suspect",
            site: s.site,
            call_site: s.key.call_site,
            function: call.function.clone(),
            cache: &s.key.cache,
            confidence: c,
            slope_per_s: t.slope_per_s * scale as f64,
            r2: t.r2,
            net_growth: t.net_growth * scale as i64,
            window_s: t.window_s,
            outstanding: s.outstanding * scale,
            reason: t.reason(),
            stack,
        });
        text.push_str(&format!(
            "suspected kernel leak ({c:?} confidence): {}{}\n  {}\n",
            call.label(),
            if s.key.cache.is_empty() {
                String::new()
            } else {
                format!(" [{}]", s.key.cache)
            },
            t.reason()
        ));
    }

    pub fn stats(&mut self, stats: &KernelStats) {
        #[derive(Serialize)]
        struct Record<'a> {
            r#type: &'static str,
            #[serde(flatten)]
            stats: &'a KernelStats,
        }
        self.json(&Record {
            r#type: "kernel_stats",
            stats,
        });
    }

    /// The final record and, in text mode, the summary table.
    pub fn end(&mut self, reason: EndReason, sites: &[SiteView<'_>], stats: &KernelStats) {
        #[derive(Serialize)]
        struct End<'a> {
            r#type: &'static str,
            reason: EndReason,
            suspected: usize,
            #[serde(flatten)]
            stats: &'a KernelStats,
        }
        let suspected = self.suspected.len();
        self.json(&End {
            r#type: "kernel_end",
            reason,
            suspected,
            stats,
        });
        if matches!(self.sink, Sink::Json(_)) {
            return;
        }
        let scale = self.scale;
        let mut text = format!(
            "\nleaktrace kernel summary: {} objects ({}) outstanding of those allocated since start; {suspected} suspected leak sites\n\n",
            stats.outstanding,
            bytes(stats.bytes)
        );
        text.push_str(&format!(
            "{:>9} {:>10} {:>9}  {}\n",
            "objects", "bytes", "oldest", "call site [cache] (top process)"
        ));
        for v in sites.iter().take(self.out.top) {
            let s = v.summary;
            let (call, _) = self.frames(s.key.call_site, s.key.stack_id);
            let who = s
                .top_pids
                .first()
                .map(|(pid, comm, _)| format!(" ({comm} {pid})"))
                .unwrap_or_default();
            let cache = if s.key.cache.is_empty() {
                String::new()
            } else {
                format!(" [{}]", s.key.cache)
            };
            let mark = if v.trend.as_ref().is_some_and(|t| t.suspected.is_some()) {
                " GROWING"
            } else {
                ""
            };
            let line = format!(
                "{:>9} {:>10} {:>9}  {}{cache}{who}{mark}",
                s.outstanding * scale,
                bytes(s.bytes * scale),
                age(s.age_max_ms),
                call.label()
            );
            text.push_str(&line.chars().take(100).collect::<String>());
            text.push('\n');
        }
        text.push_str(&format!(
            "\nevents: {} records, {} lost, {} recursion misses\n",
            stats.records,
            stats.lost_total,
            stats.recursion_misses.values().sum::<u64>()
        ));
        self.text(&text);
    }
}

/// Kernel-mode options echoed in the start record.
#[derive(Clone, Debug, Serialize)]
pub struct KernelOptions {
    pub caches: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub pages: bool,
    pub free_probes: &'static str,
    pub sample: u64,
    pub interval_ms: u64,
    pub min_age_ms: u32,
}
