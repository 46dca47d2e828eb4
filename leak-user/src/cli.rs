//! The command line as the user types it. [`crate::config`] validates it into the
//! options the daemon runs with.

use std::{ffi::OsString, path::PathBuf};

use clap::{Parser, ValueEnum};

/// Find real memory leaks in running processes: blocks that nothing points to any
/// more, found by scanning the target's memory like kmemleak, with eBPF probes on its
/// allocator. No restart, no recompilation, no LD_PRELOAD.
#[derive(Debug, Parser)]
#[command(
    name = "leaktrace",
    version,
    after_help = "Examples:\n  sudo leaktrace --pid 1234\n  sudo leaktrace -- ./server --port 8080\n  sudo leaktrace --kernel --duration 60s\n  sudo leaktrace --json -p 1234 | jq 'select(.type == \"leak\")'"
)]
pub struct Args {
    /// Attach to a running process (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Daemon mode: trace every process that uses a hooked allocator, attaching
    /// to processes as they start. Every allocation of every process that maps
    /// the hooked library then traps into the kernel (a few µs each), traced or not.
    #[arg(long, conflicts_with = "command")]
    pub all: bool,

    /// Daemon mode: trace processes whose command name matches PATTERN (`*`, `?`;
    /// repeatable), attaching to them as they start.
    #[arg(long = "comm", value_name = "PATTERN", conflicts_with = "command")]
    pub comms: Vec<String>,

    /// Daemon mode: never trace processes whose command name matches PATTERN
    /// (repeatable).
    #[arg(long = "exclude-comm", value_name = "PATTERN")]
    pub exclude_comms: Vec<String>,

    /// Daemon mode: trace at most N processes at once (more are counted and
    /// picked up when room frees).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_targets: usize,

    /// Track at most N objects over all targets: past it, the target with the
    /// most objects is let go (detached; what it leaked stays in the report).
    #[arg(long, value_name = "N")]
    pub max_objects: Option<u64>,

    /// Scanning may take at most PERCENT of one CPU: longer scans push the next
    /// one back (beyond --interval).
    #[arg(long, value_name = "PERCENT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub scan_cpu: u32,

    /// Kernel slab mode: track kmalloc/kmem_cache allocations system-wide.
    #[arg(long, conflicts_with = "command")]
    pub kernel: bool,

    /// Also trace the children of traced processes (from their first instruction).
    /// Costs a trap in every process that uses the hooked allocator while tracing.
    #[arg(long)]
    pub follow_forks: bool,

    /// Stream NDJSON records (one JSON object per line) instead of text (the same
    /// as --format json).
    #[arg(long)]
    pub json: bool,

    /// Report format: text (leaks grouped by stack, every scan and at the end),
    /// json (the NDJSON stream, as --json) or lsan (LeakSanitizer's report, at the
    /// end).
    #[arg(long, value_enum, value_name = "FORMAT", conflicts_with = "json")]
    pub format: Option<FormatArg>,

    /// Also write valgrind memcheck's XML (protocol 4) of the leaks left at the end
    /// to FILE, for the tools that read valgrind's --xml-file.
    #[arg(long, value_name = "FILE")]
    pub xml: Option<PathBuf>,

    /// A live view on the terminal, redrawn every scan like top: the leaking stacks
    /// and their growth since attaching. q or Ctrl-C ends the run. Plain text
    /// appended when stdout is not a terminal.
    #[arg(long)]
    pub live: bool,

    /// Write the report (or the NDJSON stream) to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Time between scans, e.g. 500ms, 5s, 1m.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub interval: String,

    /// Minimum age before an unreferenced block is reported (kmemleak's default: 5s).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub min_age: String,

    /// Consecutive scans a block must stay unreferenced before it is reported.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub min_scans: u16,

    /// Leak-check heuristics: interior pointers that count as pointers to the block
    /// (all, none, or a list of valgrind's stdstring, length64, newarray,
    /// multipleinheritance, and sds for sds strings).
    #[arg(long, value_name = "SET", default_value = "all")]
    pub leak_check_heuristics: String,

    /// Pid mode: do not walk the target's heap at attach time (its blocks allocated
    /// before attaching, and their leaks, stay invisible).
    #[arg(long)]
    pub no_heap_walk: bool,

    /// Report unreferenced blocks even when their contents changed since the last scan.
    #[arg(long)]
    pub no_checksum: bool,

    /// Stop every thread of the target (ptrace) while its memory is read: exact scans,
    /// at the cost of a pause that is measured and reported.
    #[arg(long)]
    pub stop_the_world: bool,

    /// Stop tracing after this long.
    #[arg(long, value_name = "DURATION")]
    pub duration: Option<String>,

    /// Show at most N allocation stacks in the text report.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// List possible leaks (reachable only through interior pointers) in the text report.
    #[arg(long)]
    pub show_possible: bool,

    /// Show the first 32 bytes of each confirmed leak (a hex dump, as kmemleak
    /// does), read when it is reported. This puts the target's data in the report.
    #[arg(long)]
    pub show_contents: bool,

    /// Write leaked objects and bytes by stack as a pprof profile (gzipped protobuf).
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a bare PORT or :PORT
    /// listens on 127.0.0.1 only; give 0.0.0.0:PORT to serve other hosts).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,

    /// Kernel mode: the largest call sites that get their own metric series.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub metrics_sites: usize,

    /// Write one pprof profile (inuse_objects/inuse_space of the leaks outstanding,
    /// with mappings and build IDs) into DIR every interval, for a profile store.
    #[arg(long, value_name = "DIR")]
    pub pprof_dir: Option<PathBuf>,

    /// Keep the newest N profiles in --pprof-dir (older ones are deleted).
    #[arg(long, value_name = "N", default_value_t = 60, requires = "pprof_dir")]
    pub pprof_keep: usize,

    /// Write a flamegraph (SVG) of leaked bytes by stack.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,

    /// Exit with N when leaks of the kinds of --errors-for-leak-kinds remain at the
    /// end (valgrind's option; LeakSanitizer uses 23). Pid and launch modes.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    pub error_exitcode: Option<u8>,

    /// Leak kinds that --error-exitcode counts: all, none, or a list of direct
    /// (valgrind's definite), indirect, possible.
    #[arg(long, value_name = "SET", default_value = "direct,indirect")]
    pub errors_for_leak_kinds: String,

    /// LeakSanitizer-style suppressions: lines `leak:PATTERN` (repeatable).
    #[arg(long, value_name = "FILE")]
    pub suppressions: Vec<PathBuf>,

    /// Do not apply the built-in suppressions for known runtime noise.
    #[arg(long)]
    pub no_default_suppressions: bool,

    /// Where separate debug info is looked for, like gdb's debug-file-directory:
    /// build-id paths and .gnu_debuglink names (repeatable; default /usr/lib/debug).
    #[arg(long, value_name = "DIR")]
    pub debug_dir: Vec<PathBuf>,

    /// Group the text report by the first frame outside known allocation
    /// wrappers (zmalloc, xmalloc, g_malloc, sqlite3Malloc, PyMem_Malloc, ...).
    #[arg(long)]
    pub fold_wrappers: bool,

    /// A function of yours to fold as an allocation wrapper (repeatable;
    /// implies --fold-wrappers).
    #[arg(long, value_name = "NAME")]
    pub fold_wrapper: Vec<String>,

    /// Ring buffer size in MiB (a power of two). In user mode it is shared out
    /// among the CPUs, each writing a ring of its own (at least 4 MiB).
    #[arg(long, value_name = "MiB", default_value_t = 32)]
    pub ring_buffer: u32,

    /// Distinct stacks the kernel may store.
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub stack_map_entries: u32,

    /// Threads that read and scan one target's memory at once (the tracer's CPU
    /// share during a scan); at most the CPUs available, at most 256.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub scan_threads: u32,

    /// How to read target memory.
    #[arg(long, value_enum, default_value_t = ReadMethodArg::ProcessVmReadv, hide = true)]
    pub read_method: ReadMethodArg,

    /// What puts the records of all CPUs in order: a counter they share or the
    /// clock; `auto` takes the clock unless a clock read is dear (timed at
    /// start) on a machine of few CPUs.
    #[arg(long, value_enum, default_value_t = RecordOrderArg::Auto, hide = true)]
    pub record_order: RecordOrderArg,

    /// When to use colours in the text report.
    #[arg(long, value_enum, default_value_t = ColorArg::Auto)]
    pub color: ColorArg,

    /// No status line and no hook listing on stderr.
    #[arg(short, long)]
    pub quiet: bool,

    /// More diagnostics on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only processes in this cgroup (v2 path) and below it: in kernel mode the
    /// allocations they make; otherwise daemon mode traces them as they start.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Kernel mode: only this slab cache (repeatable).
    #[arg(long = "cache", value_name = "NAME", requires = "kernel")]
    pub caches: Vec<String>,

    /// Kernel mode: also track page allocations (mm_page_alloc / mm_page_free).
    #[arg(long, requires = "kernel")]
    pub pages: bool,

    /// Do not capture allocation stacks: cheaper; reports name the allocating call
    /// site only (the same as `--stacks caller`).
    #[arg(long, conflicts_with = "stacks")]
    pub no_stacks: bool,

    /// How allocation stacks are walked: `dwarf` unwinds with each module's
    /// .eh_frame/.debug_frame (whole stacks without frame pointers), `fp` follows
    /// frame pointers (cheaper, short stacks in code built without them), `caller`
    /// records the call site only, `auto` unwinds with CFI and falls back to frame
    /// pointers where the kernel cannot run the unwinder.
    #[arg(long, value_enum, value_name = "HOW", default_value_t = StacksArg::Auto)]
    pub stacks: StacksArg,

    /// Benchmarks only: attach the allocator probes with programs that return at
    /// once and record nothing (the cost of the traps alone).
    #[arg(long, hide = true, conflicts_with = "kernel")]
    pub empty_probes: bool,

    /// Kernel mode: record one object in N (a power of two), chosen by address so
    /// that an object's allocation and free are both kept or both dropped; counts
    /// are scaled back up. For machines whose allocation rate loses events.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "kernel")]
    pub sample: u64,

    /// Kernel mode: which tracepoint programs see frees. A skipped free is a false
    /// leak, and the kernel skips a program that would nest on a CPU; `both` attaches
    /// a raw and a classic program to each free tracepoint so that one covers for
    /// the other.
    #[arg(long, value_enum, default_value_t = FreeProbesArg::Both, requires = "kernel")]
    pub free_probes: FreeProbesArg,

    /// Kernel mode: how long a call site must be watched before its growth can make
    /// it a suspect (high confidence: half as long again). The kernel's own caches
    /// grow in bursts; a leak keeps growing.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "60s",
        requires = "kernel"
    )]
    pub min_growth_window: String,

    /// Kernel mode: count leaktrace's own allocations too (loading its programs,
    /// reading /proc), which are left out by default.
    #[arg(long, requires = "kernel")]
    pub include_tracer: bool,

    /// For tests: append every live object to FILE (NDJSON) when a target's final
    /// scan is done.
    #[arg(long, value_name = "FILE", hide = true)]
    pub dump_objects: Option<PathBuf>,

    /// The command to launch under the tracer, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StacksArg {
    Auto,
    Fp,
    Dwarf,
    Caller,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReadMethodArg {
    ProcessVmReadv,
    ProcMem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RecordOrderArg {
    Auto,
    Counter,
    Clock,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Leaks grouped by allocation stack.
    Text,
    /// NDJSON records.
    Json,
    /// LeakSanitizer's report.
    Lsan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColorArg {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum FreeProbesArg {
    /// A raw and a classic tracepoint program on each free tracepoint.
    #[default]
    Both,
    /// Raw tracepoints only: skipped when the same program already runs on the CPU.
    Raw,
    /// Classic tracepoints only: skipped when any tracing program runs on the CPU.
    Classic,
}
