//! Every NDJSON record leaktrace writes, in one place, next to the schema version.
//!
//! A record is one [`Record`] variant; its `"type"` is the variant's name in
//! snake case ([`Record::TYPES`] lists them all). The reporters of both modes fill
//! these types and hand them to [`super::json::Output`]; README.md documents each
//! field, and the schema test holds every record a run writes against it.

use serde::Serialize;

use super::{Leak, Totals, json::hex};
use crate::{
    scan::ScanStats,
    symbolize::Frame,
    table::{
        Counters,
        growth::{Confidence, Trend},
        kernel::{FreeProbeShare, FreeProbes, KernelCounters},
        verdict::{LeakKind, RetractionReason},
    },
};

/// Bumped when a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

/// One line of the NDJSON stream.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record<'a> {
    /// The first record of every run.
    Start(StartRecord<'a>),
    /// Probes were attached.
    Hooks(HooksRecord),
    /// The heap walk of a process attached to (blocks allocated before).
    HeapWalk(HeapWalkRecord),
    /// A confirmed leak (direct or indirect).
    Leak(&'a Leak),
    /// A block reachable only through interior pointers (`--show-possible`).
    PossibleLeak(&'a Leak),
    /// Possible leaks that share an allocation stack, at the end of a run
    /// (valgrind's loss records).
    PossibleLeakGroup(PossibleLeakGroupRecord<'a>),
    /// A reported leak taken back.
    Retraction(RetractionRecord),
    /// One scan of one process.
    Scan(ScanRecord<'a>),
    /// A process forked or exec'd.
    Process(ProcessRecord),
    /// A traced process ended.
    ProcessExit(ProcessRecord),
    /// Periodic figures (user modes).
    Stats(&'a Stats),
    /// The last record of a user-mode run.
    End(EndRecord<'a>),
    /// A kernel call site with outstanding objects.
    KernelCallSite(KernelCallSiteRecord<'a>),
    /// A kernel call site whose outstanding count keeps growing.
    KernelSuspect(KernelSuspectRecord<'a>),
    /// Periodic figures (kernel mode).
    KernelStats(&'a KernelStats),
    /// The last record of a kernel-mode run.
    KernelEnd(KernelEndRecord<'a>),
}

impl Record<'_> {
    /// Every record type, as written in `"type"`.
    pub const TYPES: [&'static str; 16] = [
        "start",
        "hooks",
        "heap_walk",
        "leak",
        "possible_leak",
        "possible_leak_group",
        "retraction",
        "scan",
        "process",
        "process_exit",
        "stats",
        "end",
        "kernel_call_site",
        "kernel_suspect",
        "kernel_stats",
        "kernel_end",
    ];
}

/// How leaktrace was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    Pid,
    Launch,
    Kernel,
    /// `--all`, `--comm`, `--cgroup`: processes picked as they start.
    Daemon,
}

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Every target exited.
    TargetsExited,
    /// SIGINT or SIGTERM.
    Signal,
    /// --duration elapsed.
    Duration,
    /// The output reader went away.
    OutputClosed,
    /// `q` in the live view.
    Quit,
}

/// A traced process, as the start record names it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    pub cmdline: Vec<String>,
}

#[derive(Serialize)]
pub struct StartRecord<'a> {
    pub schema: u32,
    pub version: &'static str,
    pub ebpf_object: &'static str,
    pub mode: RunMode,
    pub targets: &'a [Target],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub options: Option<RunOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<&'a KernelOptions>,
}

impl<'a> StartRecord<'a> {
    /// A start record of this build.
    pub fn new(mode: RunMode, targets: &'a [Target]) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            version: env!("CARGO_PKG_VERSION"),
            ebpf_object: crate::ebpf::OBJECT_ORIGIN,
            mode,
            targets,
            options: None,
            kernel: None,
        }
    }
}

/// The options of a user-mode run.
#[derive(Clone, Debug, Serialize)]
pub struct RunOptions {
    pub interval_ms: u64,
    pub min_age_ms: u32,
    pub min_scans: u16,
    pub checksum: bool,
    pub stop_the_world: bool,
    pub follow_forks: bool,
    /// valgrind's leak-check heuristics in force.
    pub heuristics: String,
    /// Pid mode: the heap is walked at attach time (`--no-heap-walk` turns it off).
    pub heap_walk: bool,
}

/// The options of a kernel-mode run.
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
    /// `--min-growth-window`.
    pub min_growth_window_ms: u64,
    /// `--include-tracer`.
    pub include_tracer: bool,
}

#[derive(Serialize)]
pub struct HooksRecord {
    /// The target the probes are for; 0 when they fire for every process.
    pub pid: u32,
    pub objects: Vec<HookedObject>,
}

/// An ELF object with probes.
#[derive(Serialize)]
pub struct HookedObject {
    pub object: String,
    pub functions: Vec<HookedFunction>,
}

/// A hooked function.
#[derive(Serialize)]
pub struct HookedFunction {
    pub function: String,
    pub allocator: &'static str,
    #[serde(serialize_with = "hex")]
    pub file_offset: u64,
    pub site: String,
    pub emulated: bool,
    pub return_probe: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeapWalkRecord {
    pub pid: u32,
    /// Live blocks found and adopted as allocated before attaching.
    pub blocks: u64,
    pub bytes: u64,
    pub arenas: usize,
    /// Chunks seen free in a tcache or a fastbin (not blocks).
    pub cached_free: usize,
    pub duration_ms: f64,
    /// The table lock held to adopt the blocks.
    pub lock_us: u64,
    /// Why the heap was not walked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct PossibleLeakGroupRecord<'a> {
    pub objects: u64,
    pub bytes: u64,
    pub allocator: &'static str,
    pub pids: Vec<u32>,
    pub stack: &'a [Frame],
}

#[derive(Serialize)]
pub struct RetractionRecord {
    pub pid: u32,
    #[serde(serialize_with = "hex")]
    pub address: u64,
    pub size: u64,
    pub kind: LeakKind,
    pub reason: RetractionReason,
}

#[derive(Serialize)]
pub struct ScanRecord<'a> {
    pub pid: u32,
    pub seq: u64,
    pub duration_ms: f64,
    #[serde(flatten)]
    pub stats: &'a ScanStats,
    pub new_leaks: usize,
    pub suppressed: u64,
    pub pending: u64,
    pub withheld: u64,
    pub retracted: usize,
    /// Every root was read and the process was alive at the end of the scan; an
    /// incomplete scan decides nothing.
    pub complete: bool,
    /// Reported leaks reached only through stale copies of their address.
    pub stale_references: u64,
    pub snapshot_lock_us: u64,
    pub apply_lock_us: u64,
    pub pause_ms: Option<f64>,
    pub threads_frozen: Option<usize>,
}

/// What happened to a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessEvent {
    Fork,
    Exec,
    Exit,
    /// Daemon mode picked up a running process.
    Attach,
}

#[derive(Serialize)]
pub struct ProcessRecord {
    pub event: ProcessEvent,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    /// At exit: the process's confirmed leaks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leaks: Option<Totals>,
}

/// Figures of the event stream since the run started, in every stats and end
/// record (`session::figures::event_figures` fills them).
#[derive(Clone, Debug, Default, Serialize)]
pub struct EventFigures {
    pub elapsed_ms: u64,
    pub records: u64,
    pub records_per_sec: f64,
    /// Losses by reason ([`leak_common::Loss::name`]).
    pub lost: std::collections::BTreeMap<&'static str, u64>,
    /// Events lost (failed stack captures and stale calls lose none).
    pub lost_total: u64,
    pub decode_errors: u64,
    pub longest_lock_hold_us: u64,
    /// Runs the kernel skipped, by program.
    pub recursion_misses: std::collections::BTreeMap<String, u64>,
}

/// Figures for a stats record (and the end record) of a user-mode run.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub events: EventFigures,
    pub objects: u64,
    pub bytes: u64,
    pub counters: Counters,
    /// The CFI unwinder's tables and walks (`--stacks dwarf`/`auto`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwind: Option<UnwindStats>,
}

/// The CFI unwinder in a `stats` record.
#[derive(Serialize, Clone, Debug, Default)]
pub struct UnwindStats {
    /// Bytes of unwind rows and indexes loaded, over every module (each file once).
    pub table_bytes: u64,
    /// Bytes the kernel preallocated for rows and indexes.
    pub table_capacity_bytes: u64,
    pub modules: Vec<UnwindModule>,
    /// Code files mapped by targets that have no table (no CFI, unreadable, full).
    pub modules_without_table: u64,
    /// Stacks walked.
    pub stacks: u64,
    /// Stacks not walked: the stack still held every word an earlier walk from
    /// the same registers had read, and its result was reused.
    pub reused: u64,
    pub frames: u64,
    /// Walks that reached the outermost frame.
    pub complete: u64,
    /// Walks cut at the depth limit.
    pub truncated: u64,
    /// Walks that ended with the "cannot unwind" marker, by reason.
    pub stopped: std::collections::BTreeMap<&'static str, u64>,
}

/// One module's unwind table.
#[derive(Serialize, Clone, Debug)]
pub struct UnwindModule {
    pub path: String,
    pub rows: u32,
    /// Rows and index.
    pub bytes: u64,
    /// The index's share of `bytes`.
    pub index_bytes: u64,
}

/// One suppression rule that matched, in the end record.
#[derive(Serialize)]
pub struct SuppressedRule {
    pub rule: String,
    pub builtin: bool,
    pub objects: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct EndRecord<'a> {
    pub reason: EndReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    pub leaks: Totals,
    pub possible_leaks: usize,
    pub retractions: u64,
    /// Scans that decided nothing (a target died or exited mid-scan): the verdicts
    /// of each process's last complete scan stand.
    pub incomplete_scans: u64,
    pub suppressed: &'a [SuppressedRule],
    /// Distinct frames of the reported leaks without a function name, by reason
    /// ([`crate::symbolize::NoSymbols::name`]).
    pub unsymbolized_frames: std::collections::BTreeMap<&'static str, u64>,
    #[serde(flatten)]
    pub stats: &'a Stats,
}

/// How kernel records name a call site: its address, function and slab cache.
#[derive(Serialize)]
pub struct SiteName<'a> {
    #[serde(serialize_with = "hex")]
    pub call_site: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub cache: &'a str,
}

/// A process's share of a kernel site's outstanding objects.
#[derive(Serialize)]
pub struct PidShare {
    pub pid: u32,
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<u64>,
    pub objects: u64,
}

/// Figures of a kernel call site or stack as written (scaled up by the sampling
/// factor).
#[derive(Serialize)]
pub struct SiteFigures {
    pub outstanding: u64,
    pub bytes: u64,
    pub allocated: u64,
    pub freed: u64,
    pub aged: u64,
    pub aged_bytes: u64,
    pub age_p50_ms: u64,
    pub age_p90_ms: u64,
    pub age_max_ms: u64,
    pub pids: Vec<PidShare>,
}

/// One stack of a kernel call site.
#[derive(Serialize)]
pub struct StackFigures<'a> {
    pub site: u32,
    #[serde(flatten)]
    pub figures: SiteFigures,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trend: Option<&'a Trend>,
    pub frames: Vec<Frame>,
}

#[derive(Serialize)]
pub struct KernelCallSiteRecord<'a> {
    pub seq: u64,
    #[serde(flatten)]
    pub site: SiteName<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub page: bool,
    #[serde(flatten)]
    pub figures: SiteFigures,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trend: Option<&'a Trend>,
    pub stacks_total: usize,
    pub stacks: &'a [StackFigures<'a>],
}

#[derive(Serialize)]
pub struct KernelSuspectRecord<'a> {
    #[serde(flatten)]
    pub site: SiteName<'a>,
    pub confidence: Confidence,
    pub slope_per_s: f64,
    pub r2: f64,
    pub net_growth: i64,
    pub window_s: f64,
    pub outstanding: u64,
    pub bytes: u64,
    pub reason: String,
    pub pids: Vec<PidShare>,
    pub stack: &'a [Frame],
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

#[derive(Serialize)]
pub struct KernelEndRecord<'a> {
    pub reason: EndReason,
    pub suspected: usize,
    #[serde(flatten)]
    pub stats: &'a KernelStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_type_of_a_record_is_its_variant_in_snake_case() {
        let record = Record::Retraction(RetractionRecord {
            pid: 7,
            address: 0x1000,
            size: 16,
            kind: LeakKind::Direct,
            reason: RetractionReason::Freed,
        });
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(
            line,
            r#"{"type":"retraction","pid":7,"address":"0x1000","size":16,"kind":"direct","reason":"freed"}"#
        );
        let end = Record::KernelEnd(KernelEndRecord {
            reason: EndReason::Signal,
            suspected: 0,
            stats: &KernelStats {
                events: EventFigures::default(),
                outstanding: 0,
                bytes: 0,
                counters: KernelCounters::default(),
                frees_missed: 0,
                free_probes: None,
            },
        });
        let value: serde_json::Value = serde_json::to_value(&end).unwrap();
        assert_eq!(value["type"], "kernel_end");
        assert!(Record::TYPES.contains(&"kernel_end"));
    }
}
