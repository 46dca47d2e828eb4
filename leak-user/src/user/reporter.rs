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
    metrics::{LeakFigures, SharedMetrics},
    proc::maps::Mapping,
    report::{
        self, Leak, Totals, allocator_name,
        files::{OutputFiles, ReportFile},
        json::Output,
        profile_dir::ProfileDir,
        records::{
            EndReason, EndRecord, HeapWalkRecord, HookedFunction, HookedObject, HooksRecord,
            PossibleLeakGroupRecord, ProcessEvent, ProcessRecord, Record, RetractionRecord,
            RunMode, RunOptions, ScanRecord, StartRecord, Stats, SuppressedRule, Target,
        },
        suppress::Suppressions,
        text,
    },
    scan::scanner::ProcessScan,
    session::progress::Progress,
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
    /// `--pprof`, `--flamegraph` and `--xml`, opened before anything was attached.
    pprof: Option<ReportFile>,
    flamegraph: Option<ReportFile>,
    xml: Option<ReportFile>,
    /// The first target (pid, parent, command line), for the XML document.
    first_target: Option<(u32, u32, Vec<String>)>,
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
    /// `--metrics`: fed the same records and leaks as the report.
    metrics: Option<SharedMetrics>,
    /// `--pprof-dir`: a profile per interval.
    profile_dir: Option<ProfileDir>,
}

impl Reporter {
    pub fn new(config: &Config, readers: MapReaders, files: OutputFiles) -> Self {
        Self {
            sink: Output::new(config.output.json, files.report),
            out: config.output.clone(),
            pprof: files.pprof,
            flamegraph: files.flamegraph,
            xml: files.xml,
            first_target: None,
            readers,
            symbolizer: Symbolizer::with_debug_roots(config.debug_dirs.clone()),
            stacks: HashMap::new(),
            suppressions: config.suppressions.clone(),
            reported: BTreeMap::new(),
            retractions: 0,
            scans: 0,
            incomplete_scans: 0,
            comms: HashMap::new(),
            metrics: None,
            profile_dir: None,
        }
    }

    /// Writes a profile into `dir` every interval from now on.
    pub fn with_profile_dir(mut self, dir: Option<ProfileDir>) -> Self {
        self.profile_dir = dir;
        self
    }

    /// `--pprof-dir`: a profile of the confirmed leaks outstanding now. A write
    /// error is logged and the run goes on (the next interval tries again).
    pub fn interval_profile(&mut self) {
        if self.profile_dir.is_none() {
            return;
        }
        let leaks: Vec<Leak> = self
            .reported
            .values()
            .filter(|l| l.kind != LeakKind::Possible)
            .cloned()
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let profile = report::pprof::profile_with(
            &leaks,
            now.as_nanos() as i64,
            report::pprof::SampleNames::InUse,
            &self.symbolizer.build_ids(),
        );
        let dir = self.profile_dir.as_mut().expect("checked above");
        let written = report::pprof::encode(&profile)
            .and_then(|bytes| dir.write(&bytes, now.as_millis() as u64));
        if let Err(err) = written {
            log::error!("{err}");
        }
    }

    /// Feeds `metrics` from now on.
    pub fn with_metrics(mut self, metrics: Option<SharedMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Updates the metrics, if any.
    fn metrics(&self, update: impl FnOnce(&mut crate::metrics::Metrics)) {
        crate::metrics::update(self.metrics.as_ref(), update);
    }

    /// The metrics' leak figures of `pid`, from the leaks kept for the report.
    fn metrics_leaks(&self, pid: u32) {
        if self.metrics.is_none() {
            return;
        }
        let figures = LeakFigures::of(
            self.reported
                .range((pid, 0)..=(pid, u64::MAX))
                .map(|(_, l)| l),
        );
        self.metrics(|m| m.leaks(pid, &figures));
    }

    /// A process joins the metrics under its name and cgroup.
    fn metrics_process(&self, pid: u32) {
        let comm = self.comms.get(&pid).cloned().unwrap_or_default();
        let cgroup = crate::proc::cgroup(pid);
        self.metrics(|m| m.add_process(pid, &comm, cgroup.as_deref()));
        self.metrics_leaks(pid);
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
            self.metrics_process(t.pid);
        }
        if let Some(t) = targets.first() {
            let parent = crate::proc::parent(t.pid).unwrap_or_else(std::process::id);
            self.first_target = Some((t.pid, parent, t.cmdline.clone()));
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
            class_name: None,
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
        let findings = &scan.verdicts.findings;
        let what = format!("pid {}: symbolizing {} leaks", scan.pid, findings.len());
        let mut progress = Progress::new(self.out.status, what);
        for (i, f) in findings.iter().enumerate() {
            progress.update(Some((i as u64, findings.len() as u64)));
            let leak = self.leak_of(f, scan.verdicts.now_ms);
            if let Some(rule) = self.suppressions.find(&leak.stack) {
                self.suppressions.count(rule, leak.size);
                suppressed += 1;
                continue;
            }
            new.push(leak);
        }
        drop(progress);
        for r in &scan.verdicts.retractions {
            self.retraction(r);
        }
        name_classes(&mut new);
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
        self.metrics(|m| m.scan(&record));
        self.metrics_leaks(scan.pid);
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
        if !confirmed.is_empty() && self.text_every_scan() {
            let title = format!("pid {}, new", scan.pid);
            let mut body = text::render(
                &title,
                &confirmed,
                self.out.top,
                self.out.color,
                self.out.fold.as_ref(),
            );
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

    /// The text report of each scan's new leaks: not with `--format lsan` (one
    /// report at the end), nor on the stdout that the live view draws on.
    fn text_every_scan(&self) -> bool {
        !self.out.lsan && (self.out.live.is_none() || self.out.path.is_some())
    }

    /// The confirmed and possible leaks standing now.
    pub fn standing(&self) -> Vec<Leak> {
        self.reported.values().cloned().collect()
    }

    /// Scans reported so far.
    pub fn scan_count(&self) -> u64 {
        self.scans
    }

    pub fn process_name(&self, pid: u32) -> String {
        match self.comms.get(&pid) {
            Some(c) if !c.is_empty() => format!("pid {pid} ({c})"),
            _ => format!("pid {pid}"),
        }
    }

    pub fn retraction(&mut self, r: &Retraction) {
        let was_reported = self.reported.remove(&(r.pid, r.addr)).is_some();
        self.metrics_leaks(r.pid);
        if r.kind == LeakKind::Possible && !self.out.show_possible {
            return; // never reported one by one
        }
        self.retractions += 1;
        let record = RetractionRecord {
            pid: r.pid,
            address: r.addr,
            size: r.object.size(),
            kind: r.kind,
            reason: r.reason,
        };
        self.metrics(|m| m.retraction(&record));
        self.sink.json(&Record::Retraction(record));
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
            self.metrics_process(pid);
        } else {
            // Labels stay bounded: an exited process's series go.
            self.metrics(|m| m.remove_process(pid));
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
            ProcessEvent::Attach => "attached",
            ProcessEvent::Fork => "fork",
            ProcessEvent::Exec => "exec",
            ProcessEvent::Exit => "exit",
        };
        self.note(&format!(
            "leaktrace: {} {what}{status}",
            self.process_name(pid)
        ));
    }

    /// A target let go at `--max-objects`.
    pub fn dropped(&self) {
        self.metrics(crate::metrics::Metrics::dropped);
    }

    /// A scan round pushed back by `--scan-cpu`.
    pub fn throttled(&self) {
        self.metrics(crate::metrics::Metrics::throttled);
    }

    /// Daemon mode: processes refused at `--max-targets` so far.
    pub fn refused(&self, total: u64) {
        self.metrics(|m| m.refused(total));
    }

    pub fn stats(&mut self, stats: &Stats) {
        self.metrics(|m| m.events(&stats.events));
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
            unsymbolized_frames: report::unsymbolized::count(&leaks),
            stats,
        }));
        if self.out.lsan {
            self.sink
                .text(&report::lsan::render(&confirmed, &suppressed));
        } else if !self.out.json {
            let summary = self.summary_text(&leaks, &suppressed, stats);
            self.sink.text(&summary);
        }
        let mut first_error = self.sink.take_error();
        if let Some(file) = &mut self.xml {
            let (pid, ppid, target_argv) = self.first_target.clone().unwrap_or_default();
            let tool_argv: Vec<String> = std::env::args().collect();
            let xml = report::xml::render(&report::xml::XmlRun {
                pid,
                ppid,
                tool_argv: &tool_argv,
                target_argv: &target_argv,
                elapsed: std::time::Duration::from_millis(stats.events.elapsed_ms),
                leaks: &leaks,
                suppressed: &suppressed,
            });
            first_error = first_error.or(write_file(file, Ok(xml.into_bytes())).err());
        }
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
            self.out.fold.as_ref(),
        ));
        if self.out.show_possible {
            body.push_str(&text::render_possible(
                leaks,
                self.out.top,
                self.out.color,
                self.out.fold.as_ref(),
            ));
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
        if let Some(line) = report::unsymbolized::summary_line(&report::unsymbolized::count(leaks))
        {
            body.push_str(&line);
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

/// Most leaks of one scan whose class is looked up.
const MAX_CLASS_LOOKUPS: usize = 10_000;

/// Names the C++ class of each confirmed leak that starts with a vtable pointer.
fn name_classes(leaks: &mut [Leak]) {
    use crate::proc::mem::{ProcessMemory, ReadMethod};
    let mut processes: HashMap<u32, Option<(ProcessMemory, Vec<Mapping>)>> = HashMap::new();
    for leak in leaks
        .iter_mut()
        .filter(|l| l.kind != LeakKind::Possible)
        .take(MAX_CLASS_LOOKUPS)
    {
        let Some((memory, maps)) = processes.entry(leak.pid).or_insert_with(|| {
            let memory = ProcessMemory::open(leak.pid, ReadMethod::ProcessVmReadv).ok()?;
            Some((memory, crate::proc::maps::read(leak.pid).ok()?))
        }) else {
            continue;
        };
        leak.class_name = super::class_name::class_name(memory, maps, leak.address);
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
