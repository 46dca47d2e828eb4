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

use leak_common::MAX_WRAPPER_DEPTH;

use crate::{
    allocator::HookPlan,
    config::{Config, OutputConfig},
    ebpf::MapReaders,
    proc::maps::Mapping,
    report::{
        self, Leak, Totals, allocator_name,
        files::{OutputFiles, ReportFile},
        json::Output,
        records::{
            EndReason, EndRecord, HeapWalkRecord, HookedFunction, HookedObject, HooksRecord,
            PossibleLeakGroupRecord, ProcessEvent, ProcessRecord, Record, RetractionRecord,
            RunMode, RunOptions, ScanRecord, StartRecord, Stats, SuppressedRule, Target,
        },
        suppress::Suppressions,
        text,
    },
    scan::scanner::ProcessScan,
    symbolize::{Frame, Symbolizer},
    table::{
        AllocSite,
        verdict::{Finding, LeakKind, Retraction, RetractionReason},
    },
};

fn hooked_objects(plan: &HookPlan) -> Vec<HookedObject> {
    plan.objects
        .iter()
        .map(|o| HookedObject {
            object: o.path.display().to_string(),
            functions: o
                .functions
                .iter()
                .map(|f| HookedFunction {
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

/// The reporter.
pub struct Reporter {
    sink: Output,
    out: OutputConfig,
    /// `--pprof` and `--flamegraph`, opened before anything was attached.
    pprof: Option<ReportFile>,
    flamegraph: Option<ReportFile>,
    readers: MapReaders,
    symbolizer: Symbolizer,
    stacks: HashMap<(u32, AllocSite), Arc<Vec<Frame>>>,
    suppressions: Suppressions,
    /// Confirmed (and possible) leaks not retracted: (pid, address) -> leak.
    reported: BTreeMap<(u32, u64), Leak>,
    retractions: u64,
    scans: u64,
    incomplete_scans: u64,
    comms: HashMap<u32, String>,
}

impl Reporter {
    pub fn new(config: &Config, readers: MapReaders, files: OutputFiles) -> Self {
        Self {
            sink: Output::new(config.output.json, files.report),
            out: config.output.clone(),
            pprof: files.pprof,
            flamegraph: files.flamegraph,
            readers,
            symbolizer: Symbolizer::new(),
            stacks: HashMap::new(),
            suppressions: config.suppressions.clone(),
            reported: BTreeMap::new(),
            retractions: 0,
            scans: 0,
            incomplete_scans: 0,
            comms: HashMap::new(),
        }
    }

    /// The run really started (attached): the report file may be emptied now.
    pub fn begin(&mut self) {
        self.sink.start();
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

    pub fn start(&mut self, mode: RunMode, targets: &[Target], config: &Config) {
        for t in targets {
            self.comms.insert(t.pid, t.comm.clone());
        }
        self.sink.json(&Record::Start(StartRecord {
            options: Some(RunOptions {
                interval_ms: config.interval.as_millis() as u64,
                min_age_ms: config.verdict.min_age_ms,
                min_scans: config.verdict.min_scans,
                checksum: config.verdict.require_stable_contents,
                stop_the_world: config.stop_the_world,
                follow_forks: config.follow_forks,
                heuristics: config.heuristics.to_string(),
                heap_walk: config.heap_walk,
            }),
            ..StartRecord::new(mode, targets)
        }));
    }

    /// Probes were attached for `pid` (0: for every process).
    pub fn hooks(&mut self, pid: u32, plan: &HookPlan) {
        self.sink.json(&Record::Hooks(HooksRecord {
            pid,
            objects: hooked_objects(plan),
        }));
        if !self.out.json && !plan.objects.is_empty() {
            let mut s = format!("leaktrace: probes for pid {pid}:\n");
            for o in &plan.objects {
                s.push_str(&o.to_string());
            }
            self.note(s.trim_end());
        }
    }

    /// The heap of `pid` was walked at attach time.
    pub fn heap_walk(&mut self, record: &HeapWalkRecord) {
        self.sink.json(&Record::HeapWalk(record.clone()));
        let line = match &record.error {
            Some(why) => format!("leaktrace: pid {}: heap not walked: {why}", record.pid),
            None => format!(
                "leaktrace: pid {}: heap walk: {} blocks ({}) allocated before attaching, in {} arenas, {:.1} ms (lock {} µs)",
                record.pid,
                record.blocks,
                text::bytes(record.bytes),
                record.arenas,
                record.duration_ms,
                record.lock_us
            ),
        };
        if self.out.json {
            log::info!("{}", line.trim_start_matches("leaktrace: "));
        } else {
            eprintln!("{line}");
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
        if site.before_attach {
            return Arc::new(Vec::new()); // allocated before we attached: no stack
        }
        let frames = self.readers.stack(site.stack_id, false).unwrap_or_default();
        // frames[0] is the allocator's own entry; the caller may be missing from a
        // frame-pointer walk at a function's first instruction.
        let rest = frames.get(1..).unwrap_or(&[]);
        let mut addrs = Vec::with_capacity(rest.len() + 1);
        // An unwound stack has it already, a few wrapper frames up.
        let walked = rest
            .iter()
            .take(MAX_WRAPPER_DEPTH + 1)
            .any(|a| *a == site.caller);
        if site.caller != 0 && !walked {
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
            before_attach: site.before_attach,
            contents: None,
            stack: self.stack_of(f.pid, site),
        }
    }

    /// Reports one scan: new leaks, retractions, and the scan summary.
    pub fn scan(&mut self, scan: &ProcessScan) {
        self.scans += 1;
        if scan.verdicts.incomplete {
            self.incomplete_scans += 1;
            log::info!(
                "pid {}: the scan could not read all of its memory (it ended mid-scan): \
                 the last complete scan stands",
                scan.pid
            );
        }
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
        if self.out.show_contents {
            show_contents(&mut new);
        }
        for leak in &new {
            // Possible leaks are aggregated by stack at the end unless asked for
            // one by one: a real heap has thousands of them.
            if leak.kind != LeakKind::Possible {
                self.sink.json(&Record::Leak(leak));
            } else if self.out.show_possible {
                self.sink.json(&Record::PossibleLeak(leak));
            }
            self.reported.insert((leak.pid, leak.address), leak.clone());
        }
        let record = ScanRecord {
            pid: scan.pid,
            seq: self.scans,
            duration_ms: scan.duration.as_secs_f64() * 1e3,
            stats: &scan.stats,
            new_leaks: new.len(),
            suppressed,
            pending: scan.verdicts.pending,
            withheld: scan.verdicts.withheld,
            retracted: scan.verdicts.retractions.len(),
            complete: !scan.verdicts.incomplete,
            stale_references: scan.verdicts.stale_references,
            snapshot_lock_us: scan.snapshot_hold.as_micros() as u64,
            apply_lock_us: scan.apply_hold.as_micros() as u64,
            pause_ms: scan.pause.map(|(d, _)| d.as_secs_f64() * 1e3),
            threads_frozen: scan.pause.map(|(_, n)| n),
        };
        self.sink.json(&Record::Scan(record));
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
            let mut body = text::render(&title, &confirmed, self.out.top, self.out.color);
            for l in confirmed.iter().filter(|l| l.contents.is_some()) {
                let hex = l.contents.as_deref().unwrap_or_default();
                body.push_str(&format!(
                    "contents of {:#x} ({} bytes): {hex}\n",
                    l.address, l.size
                ));
            }
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
        let was_reported = self.reported.remove(&(r.pid, r.addr)).is_some();
        if r.kind == LeakKind::Possible && !self.out.show_possible {
            return; // never reported one by one
        }
        self.retractions += 1;
        self.sink.json(&Record::Retraction(RetractionRecord {
            pid: r.pid,
            address: r.addr,
            size: r.object.size(),
            kind: r.kind,
            reason: r.reason,
        }));
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

    /// A process forked, exec'd or ended.
    pub fn process(
        &mut self,
        event: ProcessEvent,
        pid: u32,
        parent: Option<u32>,
        status: Option<i32>,
    ) {
        if event != ProcessEvent::Exit {
            self.comms
                .insert(pid, crate::proc::comm(pid).unwrap_or_default());
        }
        let record = ProcessRecord {
            event,
            pid,
            parent,
            status,
            leaks: None,
        };
        self.sink.json(&if event == ProcessEvent::Exit {
            let leaks = report::totals(self.reported.values().filter(|l| l.pid == pid));
            Record::ProcessExit(ProcessRecord {
                leaks: Some(leaks),
                ..record
            })
        } else {
            Record::Process(record)
        });
        let status = status.map(|s| format!(", status {s}")).unwrap_or_default();
        let what = match event {
            ProcessEvent::Fork => "fork",
            ProcessEvent::Exec => "exec",
            ProcessEvent::Exit => "exit",
        };
        self.note(&format!(
            "leaktrace: {} {what}{status}",
            self.process_name(pid)
        ));
    }

    pub fn stats(&mut self, stats: &Stats) {
        self.sink.json(&Record::Stats(stats));
    }

    /// Totals of the confirmed leaks reported so far.
    pub fn leak_totals(&self) -> Totals {
        report::totals(self.reported.values())
    }

    /// `--error-exitcode`'s status when leaks of its kinds remain reported.
    pub fn error_exit(&self, gate: &report::exitcode::ErrorExit) -> Option<i32> {
        gate.status(self.reported.values())
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
        let suppressed = self.suppressed_rules();
        let possible: Vec<Leak> = leaks
            .iter()
            .filter(|l| l.kind == LeakKind::Possible)
            .cloned()
            .collect();
        for g in report::group(&possible) {
            self.sink
                .json(&Record::PossibleLeakGroup(PossibleLeakGroupRecord {
                    objects: g.objects,
                    bytes: g.bytes,
                    allocator: g.allocator,
                    pids: g.pids.into_iter().collect(),
                    stack: &g.stack,
                }));
        }
        self.sink.json(&Record::End(EndRecord {
            reason,
            exit_status,
            leaks: report::totals(&confirmed),
            possible_leaks: leaks.len() - confirmed.len(),
            retractions: self.retractions,
            incomplete_scans: self.incomplete_scans,
            suppressed: &suppressed,
            stats,
        }));
        if !self.out.json {
            let summary = self.summary_text(&leaks, &suppressed, stats);
            self.sink.text(&summary);
        }
        let mut first_error = self.sink.take_error();
        if let Some(file) = &mut self.pprof {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            let result = report::pprof::encode(&report::pprof::profile(&confirmed, now));
            first_error = first_error.or(write_file(file, result).err());
        }
        if let Some(file) = &mut self.flamegraph {
            let result = report::flamegraph::svg(&confirmed).map_err(io::Error::other);
            first_error = first_error.or(write_file(file, result).err());
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The suppression rules that matched something.
    fn suppressed_rules(&self) -> Vec<SuppressedRule> {
        self.suppressions
            .rules
            .iter()
            .filter(|r| r.objects > 0)
            .map(|r| SuppressedRule {
                rule: r.pattern.clone(),
                builtin: r.builtin,
                objects: r.objects,
                bytes: r.bytes,
            })
            .collect()
    }

    /// The text report's summary: leaks by stack, possible leaks when asked,
    /// suppressions and event figures.
    fn summary_text(&self, leaks: &[Leak], suppressed: &[SuppressedRule], stats: &Stats) -> String {
        let mut body = String::from("\n");
        body.push_str(&text::render(
            "leaktrace summary",
            leaks,
            self.out.top,
            self.out.color,
        ));
        if self.out.show_possible {
            body.push_str(&text::render_possible(leaks, self.out.top, self.out.color));
        }
        for s in suppressed {
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
        body
    }
}

/// `--show-contents`: reads the first bytes of each confirmed leak from its process.
fn show_contents(leaks: &mut [Leak]) {
    use crate::proc::mem::{MemorySource as _, ProcessMemory, ReadMethod};
    let mut memory: HashMap<u32, Option<ProcessMemory>> = HashMap::new();
    for leak in leaks.iter_mut().filter(|l| l.kind != LeakKind::Possible) {
        let Some(mem) = memory
            .entry(leak.pid)
            .or_insert_with(|| ProcessMemory::open(leak.pid, ReadMethod::ProcessVmReadv).ok())
        else {
            continue;
        };
        let mut buf = vec![0u8; leak.size.min(32) as usize];
        let n = mem.read(leak.address, &mut buf);
        leak.contents = Some(buf[..n].iter().map(|b| format!("{b:02x}")).collect());
    }
}

/// Writes a rendered file, naming it in the error.
fn write_file(file: &mut ReportFile, contents: io::Result<Vec<u8>>) -> io::Result<()> {
    contents
        .and_then(|bytes| file.replace(&bytes))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot write {}: {e}", file.path().display()),
            )
        })
}
