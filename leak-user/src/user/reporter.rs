//! Turns what the daemon learns into output: NDJSON records or the text report,
//! and at the end the pprof and flamegraph files.
//!
//! It owns the symbolizer and the kernel's stack map, so each allocation stack is
//! read and symbolized once, and it keeps the confirmed leaks (minus retractions) for
//! the final report, also those of processes that have exited.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::Arc,
};

use serde::Serialize;

use crate::{
    allocator::HookPlan,
    config::{Config, OutputConfig},
    ebpf::MapReaders,
    proc::maps::Mapping,
    report::{
        self, Leak, Totals, allocator_name,
        json::{Output, SCHEMA_VERSION, hex},
        suppress::Suppressions,
        text,
    },
    scan::{ScanStats, scanner::ProcessScan},
    session::{EndReason, TargetInfo, figures::EventFigures},
    symbolize::{Frame, Symbolizer},
    table::{
        AllocSite, Counters,
        verdict::{Finding, LeakKind, Retraction, RetractionReason},
    },
};

/// A hooked function, as the start and hooks records list it.
#[derive(Serialize)]
struct HookRecord {
    function: String,
    allocator: &'static str,
    #[serde(serialize_with = "hex")]
    file_offset: u64,
    site: String,
    emulated: bool,
    return_probe: bool,
}

#[derive(Serialize)]
struct HookedObjectRecord {
    object: String,
    functions: Vec<HookRecord>,
}

fn hook_records(plan: &HookPlan) -> Vec<HookedObjectRecord> {
    plan.objects
        .iter()
        .map(|o| HookedObjectRecord {
            object: o.path.display().to_string(),
            functions: o
                .functions
                .iter()
                .map(|f| HookRecord {
                    function: f.names.clone(),
                    allocator: allocator_name(f.func),
                    file_offset: f.file_offset,
                    site: format!("+{:#x} {}", f.site.offset, f.site.instruction),
                    emulated: f.site.emulated,
                    return_probe: f.return_probe,
                })
                .collect(),
        })
        .collect()
}

/// The options a run used, echoed in the start record.
#[derive(Serialize)]
struct OptionsRecord {
    interval_ms: u64,
    min_age_ms: u32,
    min_scans: u16,
    checksum: bool,
    stop_the_world: bool,
    follow_forks: bool,
}

/// Figures for a stats record (and the end record).
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub events: EventFigures,
    pub objects: u64,
    pub bytes: u64,
    pub counters: Counters,
}

/// One suppression rule in the end record.
#[derive(Serialize)]
struct SuppressedRecord {
    rule: String,
    builtin: bool,
    objects: u64,
    bytes: u64,
}

/// The reporter.
pub struct Reporter {
    sink: Output,
    out: OutputConfig,
    readers: MapReaders,
    symbolizer: Symbolizer,
    stacks: HashMap<(u32, AllocSite), Arc<Vec<Frame>>>,
    suppressions: Suppressions,
    /// Confirmed (and possible) leaks not retracted: (pid, address) -> leak.
    reported: BTreeMap<(u32, u64), Leak>,
    retractions: u64,
    scans: u64,
    comms: HashMap<u32, String>,
}

impl Reporter {
    pub fn new(config: &Config, readers: MapReaders) -> io::Result<Self> {
        Ok(Self {
            sink: Output::open(&config.output)?,
            out: config.output.clone(),
            readers,
            symbolizer: Symbolizer::new(),
            stacks: HashMap::new(),
            suppressions: config.suppressions.clone(),
            reported: BTreeMap::new(),
            retractions: 0,
            scans: 0,
            comms: HashMap::new(),
        })
    }

    pub fn readers(&self) -> &MapReaders {
        &self.readers
    }

    /// True once the NDJSON reader went away (`| head`).
    pub fn output_closed(&self) -> bool {
        self.sink.is_closed()
    }

    /// Something worth saying on stderr (text mode) — the hooks, process events.
    fn note(&self, s: &str) {
        if !self.out.json && self.out.status {
            eprintln!("{s}");
        } else if !self.out.json {
            log::info!("{s}");
        }
    }

    pub fn start(&mut self, mode: &str, targets: &[TargetInfo], config: &Config) {
        for t in targets {
            self.comms.insert(t.pid, t.comm.clone());
        }
        #[derive(Serialize)]
        struct Start<'a> {
            r#type: &'static str,
            schema: u32,
            version: &'static str,
            ebpf_object: &'static str,
            mode: &'a str,
            targets: &'a [TargetInfo],
            options: OptionsRecord,
        }
        let record = Start {
            r#type: "start",
            schema: SCHEMA_VERSION,
            version: env!("CARGO_PKG_VERSION"),
            ebpf_object: crate::ebpf::OBJECT_ORIGIN,
            mode,
            targets,
            options: OptionsRecord {
                interval_ms: config.interval.as_millis() as u64,
                min_age_ms: config.verdict.min_age_ms,
                min_scans: config.verdict.min_scans,
                checksum: config.verdict.require_stable_contents,
                stop_the_world: config.stop_the_world,
                follow_forks: config.follow_forks,
            },
        };
        self.sink.json(&record);
    }

    /// Probes were attached for `pid` (0: for every process).
    pub fn hooks(&mut self, pid: u32, plan: &HookPlan) {
        #[derive(Serialize)]
        struct Hooks {
            r#type: &'static str,
            pid: u32,
            objects: Vec<HookedObjectRecord>,
        }
        self.sink.json(&Hooks {
            r#type: "hooks",
            pid,
            objects: hook_records(plan),
        });
        if !self.out.json && !plan.objects.is_empty() {
            let mut s = format!("leaktrace: probes for pid {pid}:\n");
            for o in &plan.objects {
                s.push_str(&o.to_string());
            }
            self.note(s.trim_end());
        }
    }

    pub fn remember_maps(&mut self, pid: u32, maps: &[Mapping]) {
        self.symbolizer.remember(pid, maps);
    }

    /// The symbolized allocation stack of a site (cached).
    fn stack_of(&mut self, pid: u32, site: AllocSite) -> Arc<Vec<Frame>> {
        if let Some(s) = self.stacks.get(&(pid, site)) {
            return s.clone();
        }
        let frames = self.readers.stack(site.stack_id, false).unwrap_or_default();
        // frames[0] is the allocator's own entry; the caller may be missing from a
        // frame-pointer walk at a function's first instruction.
        let rest = frames.get(1..).unwrap_or(&[]);
        let mut addrs = Vec::with_capacity(rest.len() + 1);
        if site.caller != 0 && rest.first() != Some(&site.caller) {
            addrs.push(site.caller);
        }
        // The walk is only as good as its first frame outside any code: stop there.
        addrs.extend(
            rest.iter()
                .take_while(|a| self.symbolizer.is_code(pid, **a)),
        );
        let stack = Arc::new(self.symbolizer.user_frames(pid, &addrs));
        self.stacks.insert((pid, site), stack.clone());
        stack
    }

    fn leak_of(&mut self, f: &Finding, now_ms: u32) -> Leak {
        let site = f.site;
        Leak {
            pid: f.pid,
            address: f.addr,
            size: f.object.size(),
            kind: f.kind,
            age_ms: u64::from(now_ms.saturating_sub(f.object.birth_ms)),
            tid: f.object.tid(),
            allocator: allocator_name(site.func),
            root: f.root,
            stack: self.stack_of(f.pid, site),
        }
    }

    /// Reports one scan: new leaks, retractions, and the scan summary.
    pub fn scan(&mut self, scan: &ProcessScan) {
        self.scans += 1;
        let mut new = Vec::new();
        let mut suppressed = 0u64;
        for f in &scan.verdicts.findings {
            let leak = self.leak_of(f, scan.verdicts.now_ms);
            if let Some(rule) = self.suppressions.find(&leak.stack) {
                self.suppressions.count(rule, leak.size);
                suppressed += 1;
                continue;
            }
            new.push(leak);
        }
        for r in &scan.verdicts.retractions {
            self.retraction(r);
        }
        for leak in &new {
            #[derive(Serialize)]
            struct Record<'a> {
                r#type: &'static str,
                #[serde(flatten)]
                leak: &'a Leak,
            }
            let kind = if leak.kind == LeakKind::Possible {
                "possible_leak"
            } else {
                "leak"
            };
            self.sink.json(&Record { r#type: kind, leak });
            self.reported.insert((leak.pid, leak.address), leak.clone());
        }
        #[derive(Serialize)]
        struct ScanRecord<'a> {
            r#type: &'static str,
            pid: u32,
            seq: u64,
            duration_ms: f64,
            #[serde(flatten)]
            stats: &'a ScanStats,
            new_leaks: usize,
            suppressed: u64,
            pending: u64,
            withheld: u64,
            retracted: usize,
            snapshot_lock_us: u64,
            apply_lock_us: u64,
            pause_ms: Option<f64>,
            threads_frozen: Option<usize>,
        }
        let record = ScanRecord {
            r#type: "scan",
            pid: scan.pid,
            seq: self.scans,
            duration_ms: scan.duration.as_secs_f64() * 1e3,
            stats: &scan.stats,
            new_leaks: new.len(),
            suppressed,
            pending: scan.verdicts.pending,
            withheld: scan.verdicts.withheld,
            retracted: scan.verdicts.retractions.len(),
            snapshot_lock_us: scan.snapshot_hold.as_micros() as u64,
            apply_lock_us: scan.apply_hold.as_micros() as u64,
            pause_ms: scan.pause.map(|(d, _)| d.as_secs_f64() * 1e3),
            threads_frozen: scan.pause.map(|(_, n)| n),
        };
        self.sink.json(&record);
        if scan.verdicts.withheld > 0 {
            log::warn!(
                "pid {}: {} unreferenced blocks withheld: events were lost while they lived \
                 (a lost free looks like a leak); a larger --ring-buffer helps",
                scan.pid,
                scan.verdicts.withheld
            );
        }
        let confirmed: Vec<Leak> = new
            .into_iter()
            .filter(|l| l.kind != LeakKind::Possible)
            .collect();
        if !confirmed.is_empty() {
            let title = format!("pid {}, new", scan.pid);
            let body = text::render(&title, &confirmed, self.out.top, self.out.color);
            self.sink.text(&body);
        }
    }

    fn process_name(&self, pid: u32) -> String {
        match self.comms.get(&pid) {
            Some(c) if !c.is_empty() => format!("pid {pid} ({c})"),
            _ => format!("pid {pid}"),
        }
    }

    pub fn retraction(&mut self, r: &Retraction) {
        self.retractions += 1;
        let was_reported = self.reported.remove(&(r.pid, r.addr)).is_some();
        #[derive(Serialize)]
        struct Record {
            r#type: &'static str,
            pid: u32,
            #[serde(serialize_with = "hex")]
            address: u64,
            size: u64,
            kind: LeakKind,
            reason: RetractionReason,
        }
        self.sink.json(&Record {
            r#type: "retraction",
            pid: r.pid,
            address: r.addr,
            size: r.object.size(),
            kind: r.kind,
            reason: r.reason,
        });
        if was_reported && r.kind != LeakKind::Possible {
            let reason = match r.reason {
                RetractionReason::Freed => "it was freed",
                RetractionReason::Reachable => "a pointer to it was found",
            };
            let line = format!(
                "retracted: {} bytes at {:#x} in {} ({reason})\n",
                r.object.size(),
                r.addr,
                self.process_name(r.pid)
            );
            self.sink.text(&line);
        }
    }

    /// A process started (fork/exec) or ended.
    pub fn process(&mut self, event: &str, pid: u32, parent: Option<u32>, status: Option<i32>) {
        if event != "exit" {
            self.comms
                .insert(pid, crate::proc::comm(pid).unwrap_or_default());
        }
        let leaks = report::totals(self.reported.values().filter(|l| l.pid == pid));
        #[derive(Serialize)]
        struct Record {
            r#type: &'static str,
            event: String,
            pid: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            parent: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<i32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            leaks: Option<Totals>,
        }
        self.sink.json(&Record {
            r#type: if event == "exit" {
                "process_exit"
            } else {
                "process"
            },
            event: event.to_owned(),
            pid,
            parent,
            status,
            leaks: (event == "exit").then_some(leaks),
        });
        let status = status.map(|s| format!(", status {s}")).unwrap_or_default();
        self.note(&format!(
            "leaktrace: {} {event}{status}",
            self.process_name(pid)
        ));
    }

    pub fn stats(&mut self, stats: &Stats) {
        #[derive(Serialize)]
        struct Record<'a> {
            r#type: &'static str,
            #[serde(flatten)]
            stats: &'a Stats,
        }
        self.sink.json(&Record {
            r#type: "stats",
            stats,
        });
    }

    /// Totals of the confirmed leaks reported so far.
    pub fn leak_totals(&self) -> Totals {
        report::totals(self.reported.values())
    }

    /// The final report and files. Returns the first file error, after trying all.
    pub fn end(
        &mut self,
        reason: EndReason,
        exit_status: Option<i32>,
        stats: &Stats,
    ) -> io::Result<()> {
        let leaks: Vec<Leak> = self.reported.values().cloned().collect();
        let confirmed: Vec<Leak> = leaks
            .iter()
            .filter(|l| l.kind != LeakKind::Possible)
            .cloned()
            .collect();
        let possible = leaks.len() - confirmed.len();
        let suppressed: Vec<SuppressedRecord> = self
            .suppressions
            .rules
            .iter()
            .filter(|r| r.objects > 0)
            .map(|r| SuppressedRecord {
                rule: r.pattern.clone(),
                builtin: r.builtin,
                objects: r.objects,
                bytes: r.bytes,
            })
            .collect();
        #[derive(Serialize)]
        struct End<'a> {
            r#type: &'static str,
            reason: EndReason,
            #[serde(skip_serializing_if = "Option::is_none")]
            exit_status: Option<i32>,
            leaks: Totals,
            possible_leaks: usize,
            retractions: u64,
            suppressed: &'a [SuppressedRecord],
            #[serde(flatten)]
            stats: &'a Stats,
        }
        let totals = report::totals(&confirmed);
        self.sink.json(&End {
            r#type: "end",
            reason,
            exit_status,
            leaks: totals,
            possible_leaks: possible,
            retractions: self.retractions,
            suppressed: &suppressed,
            stats,
        });
        if !self.out.json {
            let mut body = String::from("\n");
            body.push_str(&text::render(
                "leaktrace summary",
                &leaks,
                self.out.top,
                self.out.color,
            ));
            if self.out.show_possible {
                body.push_str(&text::render_possible(&leaks, self.out.top, self.out.color));
            }
            for s in &suppressed {
                body.push_str(&format!(
                    "suppressed by {}{}: {} objects, {}\n",
                    s.rule,
                    if s.builtin { " (built-in)" } else { "" },
                    s.objects,
                    text::bytes(s.bytes)
                ));
            }
            body.push_str(&format!(
                "events: {} records, {} lost, {} undecodable; {} retractions\n",
                stats.events.records,
                stats.events.lost_total,
                stats.events.decode_errors,
                self.retractions
            ));
            self.sink.text(&body);
        }
        let mut first_error = None;
        if let Some(path) = self.out.pprof.clone() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            let result = report::pprof::encode(&report::pprof::profile(&confirmed, now))
                .and_then(|bytes| std::fs::write(&path, bytes));
            if let Err(e) = result {
                first_error.get_or_insert(io::Error::new(
                    e.kind(),
                    format!("cannot write {}: {e}", path.display()),
                ));
            }
        }
        if let Some(path) = self.out.flamegraph.clone() {
            let result = report::flamegraph::svg(&confirmed)
                .map_err(io::Error::other)
                .and_then(|svg| std::fs::write(&path, svg));
            if let Err(e) = result {
                first_error.get_or_insert(io::Error::new(
                    e.kind(),
                    format!("cannot write {}: {e}", path.display()),
                ));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
