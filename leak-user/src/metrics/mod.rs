//! Prometheus metrics (`--metrics ADDR:PORT`): the figures the NDJSON records
//! carry, kept as gauges, counters and a histogram per traced process, rendered in
//! Prometheus' text format by the official client crate (`prometheus-client`).
//!
//! Nothing here computes a figure of its own: the reporters hand over the records
//! they write (scan, retraction, stats, kernel call sites) and the leaks they
//! keep, so a scrape and the NDJSON stream always agree. Pure (no I/O); the HTTP
//! side is `http.rs` (parsing, responses) and `server.rs` (the tokio listener).

pub mod http;
pub mod server;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{
    report::{
        Leak,
        records::{EventFigures, KernelStats, RetractionRecord, ScanRecord},
    },
    table::{growth::Confidence, verdict::LeakKind},
};

/// The metrics, shared by the reporter (writer) and the HTTP server (reader).
pub type SharedMetrics = Arc<Mutex<Metrics>>;

/// Runs `update` on the shared metrics, if there are any (a reporter that
/// panicked while holding them does not stop the others).
pub fn update(shared: Option<&SharedMetrics>, update: impl FnOnce(&mut Metrics)) {
    if let Some(m) = shared {
        update(&mut m.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

/// The labels of a traced process: pid, command name and cgroup (v2 path; empty
/// when the process is in the root cgroup, which Prometheus treats as absent).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessLabels {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    pid: u32,
    comm: String,
    cgroup: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    pid: u32,
    comm: String,
    cgroup: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LossLabels {
    reason: &'static str,
}

/// A kernel call site: its address, function and slab cache.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    pub call_site: String,
    pub function: String,
    pub cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SuspectLabels {
    call_site: String,
    function: String,
    cache: String,
    confidence: &'static str,
}

/// The kinds a leak gauge is split by, in label order.
const KINDS: [LeakKind; 3] = [LeakKind::Direct, LeakKind::Indirect, LeakKind::Possible];

/// Leaked objects and bytes of one process, by kind (direct, indirect, possible).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakFigures {
    /// (objects, bytes) of direct, indirect and possible leaks, in that order.
    pub by_kind: [(u64, u64); 3],
}

impl LeakFigures {
    /// Sums the reported (not retracted) leaks given.
    pub fn of<'a>(leaks: impl IntoIterator<Item = &'a Leak>) -> Self {
        let mut f = Self::default();
        for l in leaks {
            let i = KINDS.iter().position(|k| *k == l.kind).unwrap_or(0);
            f.by_kind[i].0 += 1;
            f.by_kind[i].1 += l.size;
        }
        f
    }
}

/// One kernel call site as the metrics show it.
pub struct SiteFigure {
    pub labels: SiteLabels,
    pub objects: u64,
    pub bytes: u64,
    /// Its confidence, when it is a suspected leak.
    pub suspected: Option<Confidence>,
}

fn confidence_name(c: Confidence) -> &'static str {
    match c {
        Confidence::Low => "low",
        Confidence::Medium => "medium",
        Confidence::High => "high",
    }
}

/// Every metric leaktrace exports.
pub struct Metrics {
    registry: Registry,
    processes: HashMap<u32, ProcessLabels>,
    targets: Gauge,
    refused: Counter,
    last_refused: u64,
    dropped: Counter,
    throttled: Counter,
    leaked_objects: Family<KindLabels, Gauge>,
    leaked_bytes: Family<KindLabels, Gauge>,
    tracked_objects: Family<ProcessLabels, Gauge>,
    tracked_bytes: Family<ProcessLabels, Gauge>,
    scan_duration: Family<ProcessLabels, Histogram, fn() -> Histogram>,
    incomplete_scans: Family<ProcessLabels, Counter>,
    retractions: Family<ReasonLabels, Counter>,
    records: Counter,
    decode_errors: Counter,
    lost_events: Family<LossLabels, Counter>,
    /// The loss counters as last read (the kernel's are running totals).
    last_lost: HashMap<&'static str, u64>,
    last_records: u64,
    last_decode_errors: u64,
    kernel_objects: Family<SiteLabels, Gauge>,
    kernel_bytes: Family<SiteLabels, Gauge>,
    kernel_suspects: Family<SuspectLabels, Gauge>,
    kernel_total_objects: Gauge,
    kernel_total_bytes: Gauge,
    /// How many call sites get their own series (kernel mode).
    sites: usize,
}

fn scan_histogram() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
}

impl Metrics {
    /// The metrics of a run; kernel mode shows the `sites` largest call sites.
    pub fn new(sites: usize) -> Self {
        let mut r = Registry::with_prefix("leaktrace");
        let m = Self {
            registry: Registry::default(),
            processes: HashMap::new(),
            targets: Gauge::default(),
            refused: Counter::default(),
            last_refused: 0,
            dropped: Counter::default(),
            throttled: Counter::default(),
            leaked_objects: Family::default(),
            leaked_bytes: Family::default(),
            tracked_objects: Family::default(),
            tracked_bytes: Family::default(),
            scan_duration: Family::new_with_constructor(scan_histogram),
            incomplete_scans: Family::default(),
            retractions: Family::default(),
            records: Counter::default(),
            decode_errors: Counter::default(),
            lost_events: Family::default(),
            last_lost: HashMap::new(),
            last_records: 0,
            last_decode_errors: 0,
            kernel_objects: Family::default(),
            kernel_bytes: Family::default(),
            kernel_suspects: Family::default(),
            kernel_total_objects: Gauge::default(),
            kernel_total_bytes: Gauge::default(),
            sites,
        };
        r.register("targets", "Processes traced now", m.targets.clone());
        r.register(
            "targets_refused",
            "Daemon mode: processes not traced because --max-targets were traced already",
            m.refused.clone(),
        );
        r.register(
            "targets_dropped",
            "Targets let go because the table held more than --max-objects objects",
            m.dropped.clone(),
        );
        r.register(
            "scans_throttled",
            "Scan rounds pushed back beyond --interval to keep scanning within --scan-cpu",
            m.throttled.clone(),
        );
        r.register(
            "leaked_objects",
            "Reported leaks not retracted, by kind (direct, indirect, possible)",
            m.leaked_objects.clone(),
        );
        r.register_with_unit(
            "leaked",
            "Bytes of reported leaks not retracted, by kind (direct, indirect, possible)",
            Unit::Bytes,
            m.leaked_bytes.clone(),
        );
        r.register(
            "tracked_objects",
            "Live blocks the table tracks, at the last scan",
            m.tracked_objects.clone(),
        );
        r.register_with_unit(
            "tracked",
            "Bytes of the live blocks the table tracks, at the last scan",
            Unit::Bytes,
            m.tracked_bytes.clone(),
        );
        r.register_with_unit(
            "scan_duration",
            "Duration of each scan of a process's memory",
            Unit::Seconds,
            m.scan_duration.clone(),
        );
        r.register(
            "incomplete_scans",
            "Scans that decided nothing (the process ended mid-scan)",
            m.incomplete_scans.clone(),
        );
        r.register(
            "retractions",
            "Reported leaks taken back, by reason (freed, reachable)",
            m.retractions.clone(),
        );
        r.register(
            "ring_records",
            "Records read from the ring buffer",
            m.records.clone(),
        );
        r.register(
            "decode_errors",
            "Ring-buffer records that could not be decoded",
            m.decode_errors.clone(),
        );
        r.register(
            "lost_events",
            "Events lost in the kernel, by reason",
            m.lost_events.clone(),
        );
        r.register(
            "kernel_outstanding_objects",
            "Kernel mode: outstanding objects of the largest call sites",
            m.kernel_objects.clone(),
        );
        r.register_with_unit(
            "kernel_outstanding",
            "Kernel mode: outstanding bytes of the largest call sites",
            Unit::Bytes,
            m.kernel_bytes.clone(),
        );
        r.register(
            "kernel_suspect_objects",
            "Kernel mode: outstanding objects of call sites suspected of leaking, by confidence",
            m.kernel_suspects.clone(),
        );
        r.register(
            "kernel_all_outstanding_objects",
            "Kernel mode: outstanding objects of every call site",
            m.kernel_total_objects.clone(),
        );
        r.register_with_unit(
            "kernel_all_outstanding",
            "Kernel mode: outstanding bytes of every call site",
            Unit::Bytes,
            m.kernel_total_bytes.clone(),
        );
        Self { registry: r, ..m }
    }

    /// A shared handle on new metrics.
    pub fn shared(sites: usize) -> SharedMetrics {
        Arc::new(Mutex::new(Self::new(sites)))
    }

    /// A process is traced from now on, under these names.
    pub fn add_process(&mut self, pid: u32, comm: &str, cgroup: Option<&str>) {
        let labels = ProcessLabels {
            pid,
            comm: comm.to_owned(),
            cgroup: cgroup.unwrap_or_default().to_owned(),
        };
        if let Some(old) = self.processes.get(&pid)
            && *old != labels
        {
            // Renamed (an exec): its series move to the new names.
            self.remove_process(pid);
        }
        self.processes.insert(pid, labels);
        self.targets.set(self.processes.len() as i64);
    }

    /// The labels of `pid`; none once it has exited (a late figure of an
    /// exited process must not bring its series back).
    fn labels(&self, pid: u32) -> Option<ProcessLabels> {
        self.processes.get(&pid).cloned()
    }

    fn kind_labels(p: &ProcessLabels, kind: LeakKind) -> KindLabels {
        KindLabels {
            pid: p.pid,
            comm: p.comm.clone(),
            cgroup: p.cgroup.clone(),
            kind: kind.as_str(),
        }
    }

    /// The leaks of `pid` now (after a scan or a retraction).
    pub fn leaks(&mut self, pid: u32, figures: &LeakFigures) {
        let Some(p) = self.labels(pid) else { return };
        for (kind, (objects, bytes)) in KINDS.iter().zip(figures.by_kind) {
            let labels = Self::kind_labels(&p, *kind);
            self.leaked_objects
                .get_or_create(&labels)
                .set(objects as i64);
            self.leaked_bytes.get_or_create(&labels).set(bytes as i64);
        }
    }

    /// One scan, as its record says.
    pub fn scan(&mut self, record: &ScanRecord) {
        let Some(p) = self.labels(record.pid) else {
            return;
        };
        self.tracked_objects
            .get_or_create(&p)
            .set(record.stats.objects as i64);
        self.tracked_bytes
            .get_or_create(&p)
            .set(record.stats.object_bytes as i64);
        self.scan_duration
            .get_or_create(&p)
            .observe(record.duration_ms / 1e3);
        let incomplete = self.incomplete_scans.get_or_create(&p);
        if !record.complete {
            incomplete.inc();
        }
    }

    /// A retraction, as its record says.
    pub fn retraction(&mut self, record: &RetractionRecord) {
        let Some(p) = self.labels(record.pid) else {
            return;
        };
        let reason = match record.reason {
            crate::table::verdict::RetractionReason::Freed => "freed",
            crate::table::verdict::RetractionReason::Reachable => "reachable",
        };
        self.retractions
            .get_or_create(&ReasonLabels {
                pid: p.pid,
                comm: p.comm,
                cgroup: p.cgroup,
                reason,
            })
            .inc();
    }

    /// The event figures of a stats record (running totals: counters move by
    /// the difference).
    pub fn events(&mut self, e: &EventFigures) {
        self.records
            .inc_by(e.records.saturating_sub(self.last_records));
        self.last_records = self.last_records.max(e.records);
        self.decode_errors
            .inc_by(e.decode_errors.saturating_sub(self.last_decode_errors));
        self.last_decode_errors = self.last_decode_errors.max(e.decode_errors);
        for (&reason, &count) in &e.lost {
            let last = self.last_lost.entry(reason).or_default();
            self.lost_events
                .get_or_create(&LossLabels { reason })
                .inc_by(count.saturating_sub(*last));
            *last = (*last).max(count);
        }
    }

    /// Daemon mode: processes refused at the cap so far (a running total).
    pub fn refused(&mut self, total: u64) {
        self.refused.inc_by(total.saturating_sub(self.last_refused));
        self.last_refused = self.last_refused.max(total);
    }

    /// A target was let go at the object cap.
    pub fn dropped(&mut self) {
        self.dropped.inc();
    }

    /// A scan round was pushed back to keep to the CPU share.
    pub fn throttled(&mut self) {
        self.throttled.inc();
    }

    /// A process ended: its series go (labels stay bounded on a busy host).
    pub fn remove_process(&mut self, pid: u32) {
        let Some(p) = self.processes.remove(&pid) else {
            return;
        };
        for kind in KINDS {
            let labels = Self::kind_labels(&p, kind);
            self.leaked_objects.remove(&labels);
            self.leaked_bytes.remove(&labels);
        }
        for reason in ["freed", "reachable"] {
            self.retractions.remove(&ReasonLabels {
                pid: p.pid,
                comm: p.comm.clone(),
                cgroup: p.cgroup.clone(),
                reason,
            });
        }
        self.tracked_objects.remove(&p);
        self.tracked_bytes.remove(&p);
        self.scan_duration.remove(&p);
        self.incomplete_scans.remove(&p);
        self.targets.set(self.processes.len() as i64);
    }

    /// Kernel mode: one report's call sites, largest first. Only the first
    /// `sites` (and every suspect among them) get series; the rest drop out.
    pub fn kernel_sites(&mut self, sites: &[SiteFigure]) {
        self.kernel_objects.clear();
        self.kernel_bytes.clear();
        self.kernel_suspects.clear();
        for s in sites.iter().take(self.sites) {
            self.kernel_objects
                .get_or_create(&s.labels)
                .set(s.objects as i64);
            self.kernel_bytes
                .get_or_create(&s.labels)
                .set(s.bytes as i64);
        }
        for s in sites
            .iter()
            .filter(|s| s.suspected.is_some())
            .take(self.sites)
        {
            let confidence = confidence_name(s.suspected.expect("filtered"));
            self.kernel_suspects
                .get_or_create(&SuspectLabels {
                    call_site: s.labels.call_site.clone(),
                    function: s.labels.function.clone(),
                    cache: s.labels.cache.clone(),
                    confidence,
                })
                .set(s.objects as i64);
        }
    }

    /// Kernel mode: the figures of a `kernel_stats` record.
    pub fn kernel_stats(&mut self, stats: &KernelStats) {
        self.kernel_total_objects.set(stats.outstanding as i64);
        self.kernel_total_bytes.set(stats.bytes as i64);
        self.events(&stats.events);
    }

    /// The pids that have series now.
    pub fn pids(&self) -> HashSet<u32> {
        self.processes.keys().copied().collect()
    }

    /// The exposition in Prometheus' text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// The Content-Type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{report::tests::sample, scan::ScanStats};

    const DEFAULT_SITES: usize = 20;

    fn scan_record(
        stats: &ScanStats,
        pid: u32,
        duration_ms: f64,
        complete: bool,
    ) -> ScanRecord<'_> {
        ScanRecord {
            pid,
            seq: 1,
            duration_ms,
            stats,
            new_leaks: 0,
            suppressed: 0,
            pending: 0,
            withheld: 0,
            retracted: 0,
            complete,
            stale_references: 0,
            snapshot_lock_us: 0,
            apply_lock_us: 0,
            pause_ms: None,
            threads_frozen: None,
        }
    }

    /// The value of the one sample whose line starts with `prefix`.
    fn value(text: &str, prefix: &str) -> Option<f64> {
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
        assert!(lines.len() <= 1, "{prefix} matches {lines:?}");
        lines
            .first()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }

    #[test]
    fn leaks_by_kind_with_process_labels_and_units() {
        let mut m = Metrics::new(DEFAULT_SITES);
        let leaks = sample();
        let pid = leaks[0].pid;
        m.add_process(pid, "server", Some("/system.slice/app.scope"));
        m.leaks(pid, &LeakFigures::of(leaks.iter().filter(|l| l.pid == pid)));
        let text = m.render();
        let direct: Vec<&Leak> = leaks
            .iter()
            .filter(|l| l.pid == pid && l.kind == LeakKind::Direct)
            .collect();
        let labels = format!(
            "{{pid=\"{pid}\",comm=\"server\",cgroup=\"/system.slice/app.scope\",kind=\"direct\"}}"
        );
        assert_eq!(
            value(&text, &format!("leaktrace_leaked_objects{labels}")),
            Some(direct.len() as f64)
        );
        assert_eq!(
            value(&text, &format!("leaktrace_leaked_bytes{labels}")),
            Some(direct.iter().map(|l| l.size).sum::<u64>() as f64)
        );
        assert!(text.contains("# TYPE leaktrace_leaked_bytes gauge\n"));
        assert!(text.contains("# HELP leaktrace_leaked_bytes Bytes of reported leaks"));
        assert_eq!(value(&text, "leaktrace_targets "), Some(1.0));
    }

    #[test]
    fn scans_fill_the_histogram_and_the_tracked_figures() {
        let mut m = Metrics::new(DEFAULT_SITES);
        m.add_process(7, "a", None);
        let stats = ScanStats {
            objects: 12,
            object_bytes: 4096,
            ..ScanStats::default()
        };
        m.scan(&scan_record(&stats, 7, 3.0, true));
        m.scan(&scan_record(&stats, 7, 30.0, false));
        let text = m.render();
        let l = "{pid=\"7\",comm=\"a\",cgroup=\"\"}";
        assert_eq!(
            value(&text, &format!("leaktrace_tracked_objects{l}")),
            Some(12.0)
        );
        assert_eq!(
            value(&text, &format!("leaktrace_tracked_bytes{l}")),
            Some(4096.0)
        );
        assert_eq!(
            value(&text, &format!("leaktrace_scan_duration_seconds_count{l}")),
            Some(2.0)
        );
        assert_eq!(
            value(&text, &format!("leaktrace_scan_duration_seconds_sum{l}")),
            Some(0.033)
        );
        // 3 ms is above the 1 ms bucket, within the 4 ms one.
        assert!(text.contains(
            "leaktrace_scan_duration_seconds_bucket{le=\"0.004\",pid=\"7\",comm=\"a\",cgroup=\"\"} 1\n"
        ) || text.contains(
            "leaktrace_scan_duration_seconds_bucket{pid=\"7\",comm=\"a\",cgroup=\"\",le=\"0.004\"} 1\n"
        ), "{text}");
        assert_eq!(
            value(&text, &format!("leaktrace_incomplete_scans_total{l}")),
            Some(1.0)
        );
    }

    #[test]
    fn counters_follow_running_totals_and_exited_processes_disappear() {
        let mut m = Metrics::new(DEFAULT_SITES);
        m.add_process(7, "a", None);
        m.add_process(8, "b", None);
        let mut e = EventFigures {
            records: 10,
            ..EventFigures::default()
        };
        e.lost.insert("ring_full_alloc", 2);
        m.events(&e);
        e.records = 25;
        e.lost.insert("ring_full_alloc", 5);
        m.events(&e);
        m.retraction(&RetractionRecord {
            pid: 8,
            address: 0x1000,
            size: 8,
            kind: LeakKind::Direct,
            reason: crate::table::verdict::RetractionReason::Freed,
        });
        let text = m.render();
        assert_eq!(value(&text, "leaktrace_ring_records_total "), Some(25.0));
        assert_eq!(
            value(
                &text,
                "leaktrace_lost_events_total{reason=\"ring_full_alloc\"}"
            ),
            Some(5.0)
        );
        assert_eq!(
            value(
                &text,
                "leaktrace_retractions_total{pid=\"8\",comm=\"b\",cgroup=\"\",reason=\"freed\"}"
            ),
            Some(1.0)
        );
        m.remove_process(8);
        let text = m.render();
        assert!(!text.contains("pid=\"8\""), "{text}");
        assert_eq!(value(&text, "leaktrace_targets "), Some(1.0));
        assert_eq!(m.pids(), HashSet::from([7]));
    }

    #[test]
    fn kernel_sites_are_bounded_and_replaced_each_report() {
        let mut m = Metrics::new(2);
        let site = |i: u64, suspected| SiteFigure {
            labels: SiteLabels {
                call_site: format!("{:#x}", 0xffff_0000u64 + i),
                function: format!("f{i}"),
                cache: String::new(),
            },
            objects: 100 - i,
            bytes: 1000 - i,
            suspected,
        };
        let sites: Vec<SiteFigure> = (0..5)
            .map(|i| site(i, (i == 1).then_some(Confidence::High)))
            .collect();
        m.kernel_sites(&sites);
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("leaktrace_kernel_outstanding_objects{"))
            .count();
        assert_eq!(series, 2);
        assert!(text.contains("confidence=\"high\"} 99\n"), "{text}");
        m.kernel_sites(&sites[3..]);
        let text = m.render();
        assert!(!text.contains("function=\"f0\""));
        assert!(!text.contains("confidence="));
        assert!(text.contains("function=\"f4\""));
    }
}
