//! Validated options: what the daemon runs with, built from [`crate::cli::Args`].
//! Every rejection is a one-line message that says what to do.

use std::{
    ffi::OsString,
    io::IsTerminal as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    cli::{Args, ColorArg, FormatArg, FreeProbesArg, ReadMethodArg, RecordOrderArg, StacksArg},
    ebpf::StampKind,
    fleet::{Pattern, Selector, limits::Limits},
    proc::mem::ReadMethod,
    report::{
        exitcode::{ErrorExit, LeakKinds},
        fold::WrapperFold,
        suppress::Suppressions,
    },
    scan::heuristics::Heuristics,
    table::kernel::FreeProbes,
    table::verdict::VerdictParams,
};

/// What to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Running processes.
    Pids(Vec<u32>),
    /// A command to launch (argv).
    Launch(Vec<OsString>),
    /// The kernel's own allocations.
    Kernel,
    /// Daemon mode: processes picked by name or cgroup (or all), as they start.
    Daemon(Selector),
}

/// How the live view (`--live`) draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveOutput {
    /// stdout is a terminal: redrawn in place on the alternate screen.
    Screen,
    /// stdout is a file or a pipe: each view appended as plain text.
    Lines,
}

/// Where and how reports go.
#[derive(Clone, Debug)]
pub struct OutputConfig {
    pub json: bool,
    /// `--format lsan`: LeakSanitizer's report at the end, nothing per scan.
    pub lsan: bool,
    /// `--xml FILE`: valgrind memcheck's XML at the end.
    pub xml: Option<PathBuf>,
    /// `--live`: the live view and how it draws.
    pub live: Option<LiveOutput>,
    pub path: Option<PathBuf>,
    pub color: bool,
    pub top: usize,
    pub show_possible: bool,
    /// Hex dump of each confirmed leak's first bytes (`--show-contents`).
    pub show_contents: bool,
    pub pprof: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
    /// Status line and hook listing on stderr.
    pub status: bool,
    /// `--pprof-dir` and `--pprof-keep`: a profile per interval, rotated.
    pub pprof_dir: Option<PathBuf>,
    pub pprof_keep: usize,
    /// `--metrics`: where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// `--metrics-sites`: kernel call sites with their own series.
    pub metrics_sites: usize,
    /// `--fold-wrappers` / `--fold-wrapper NAME`: the text report groups by the
    /// first frame outside these.
    pub fold: Option<WrapperFold>,
}

impl From<FreeProbesArg> for FreeProbes {
    fn from(arg: FreeProbesArg) -> Self {
        match arg {
            FreeProbesArg::Both => Self::Both,
            FreeProbesArg::Raw => Self::Raw,
            FreeProbesArg::Classic => Self::Classic,
        }
    }
}

/// `--error-exitcode` and the leak kinds it counts.
fn error_exit_of(args: &Args) -> Result<Option<ErrorExit>, ConfigError> {
    let kinds = LeakKinds::parse(&args.errors_for_leak_kinds)?;
    Ok(args.error_exitcode.map(|code| ErrorExit { code, kinds }))
}

/// Kernel-mode options.
#[derive(Clone, Debug, Default)]
pub struct KernelConfig {
    pub pids: Vec<u32>,
    pub cgroup: Option<PathBuf>,
    pub caches: Vec<String>,
    pub pages: bool,
    pub free_probes: FreeProbes,
    /// Keep one object in 2^sample_shift.
    pub sample_shift: u32,
    /// How long a call site must be watched before it can be suspected.
    pub min_growth_window: Duration,
    /// Count leaktrace's own allocations too.
    pub include_tracer: bool,
}

/// Everything the daemon needs, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub follow_forks: bool,
    pub output: OutputConfig,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub verdict: VerdictParams,
    /// valgrind's leak-check heuristics (interior pointers that count as start
    /// pointers).
    pub heuristics: Heuristics,
    /// Pid mode: walk the heap at attach time to find blocks allocated before.
    pub heap_walk: bool,
    pub stop_the_world: bool,
    pub ring_bytes: u32,
    pub stack_entries: u32,
    pub read_method: ReadMethod,
    /// `--record-order`: what user-mode records are stamped with (`None`: as
    /// suits the machine, `StampKind::choose`).
    pub record_order: Option<StampKind>,
    /// Threads one scan uses, the CPUs available or fewer.
    pub scan_threads: usize,
    pub suppressions: Suppressions,
    /// `--debug-dir`: roots for separate debug files.
    pub debug_dirs: Vec<PathBuf>,
    pub kernel: KernelConfig,
    /// Capture allocation stacks (user and kernel mode).
    pub stacks: bool,
    /// How user-mode stacks are walked (when `stacks`).
    pub stack_walk: StackWalk,
    /// Benchmarks only: the allocator probes do nothing (`--empty-probes`).
    pub empty_probes: bool,
    /// `--error-exitcode`: the status for leaks left at the end.
    pub error_exit: Option<ErrorExit>,
    pub verbose: u8,
    /// Hidden test aid: where to dump the live objects at each final scan.
    pub dump_objects: Option<PathBuf>,
    /// The tracer's own memory and CPU limits (user modes).
    pub limits: Limits,
}

/// A bad command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--debug-dir {}: not a directory", .0.display())]
    DebugDir(PathBuf),
    #[error("nothing to trace: give --pid PID, a command after --, or --kernel")]
    NoTarget,
    #[error("give either --pid or a command after --, not both")]
    PidAndCommand,
    #[error(
        "--all, --comm and --cgroup pick processes themselves: leave out --pid and the command"
    )]
    DaemonAndTargets,
    #[error("--exclude-comm only applies with --all, --comm or --cgroup")]
    ExcludeWithoutDaemon,
    #[error("invalid {what} {value:?}: expected a duration such as 500ms, 5s or 2m")]
    Duration { what: &'static str, value: String },
    #[error("{what} must be greater than zero")]
    Zero { what: &'static str },
    #[error("--ring-buffer must be a power of two between 1 and 1024 MiB, not {0}")]
    RingSize(u32),
    #[error("pid {0} is not a valid process id")]
    BadPid(u32),
    #[error("{0}")]
    Suppressions(String),
    #[error("--sample must be a power of two between 1 and 65536, not {0}")]
    Sample(u64),
    #[error("--errors-for-leak-kinds: {0}")]
    LeakKinds(#[from] crate::report::exitcode::UnknownLeakKind),
    #[error("--leak-check-heuristics: {0}")]
    Heuristics(#[from] crate::scan::heuristics::UnknownHeuristic),
    #[error("{what} must be at most {limit}, not {value}")]
    TooLarge {
        what: &'static str,
        limit: String,
        value: String,
    },
    #[error("{0} has no meaning in kernel mode (--kernel): leave it out")]
    NotInKernelMode(&'static str),
    #[error("pid {0} is leaktrace itself: give the pid of another process")]
    SelfPid(u32),
    #[error("--metrics {0:?}: expected PORT, :PORT or ADDR:PORT (e.g. 9464 or 127.0.0.1:9464)")]
    MetricsAddr(String),
    #[error(
        "--json on stdout would mix the command's own output into the stream: add --output FILE"
    )]
    JsonSharesStdout,
    #[error(
        "--live watches running processes: give --pid (a launched command would share the terminal)"
    )]
    LiveNeedsPid,
    #[error("--live draws on stdout: send the NDJSON stream elsewhere with --output FILE")]
    LiveSharesStdout,
}

/// The longest duration any option takes.
const MAX_DURATION_S: f64 = 365.0 * 24.0 * 3600.0;
/// The most stacks a stack map may hold: 64 frames take 512 bytes an entry, so
/// this is 256 MiB of kernel memory.
pub const MAX_STACK_ENTRIES: u32 = 1 << 19;
/// The most consecutive scans --min-scans may ask for.
const MAX_MIN_SCANS: u16 = 1000;
/// More scan threads than this is a typo (and more than the CPUs are not used).
const MAX_SCAN_THREADS: u32 = 256;
/// The most stacks --top may show.
const MAX_TOP: usize = 1_000_000;

/// The most processes --max-targets may allow (each costs its probes' attach
/// time and a scan every interval).
const MAX_TARGETS: usize = 4096;
/// The most profiles --pprof-keep may keep.
const MAX_PPROF_KEEP: usize = 100_000;
/// The most call sites --metrics-sites may ask for (each is three series).
const MAX_METRICS_SITES: usize = 1000;

/// Parses `--metrics`: `PORT` or `:PORT` listen on 127.0.0.1 (never on every
/// interface unless asked), `ADDR:PORT` and `[V6]:PORT` where given.
pub fn parse_metrics_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    let bad = || ConfigError::MetricsAddr(value.to_owned());
    let v = value.trim();
    let port_only = v.strip_prefix(':').unwrap_or(v);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Some(port) = v.strip_prefix("localhost:") {
        let port = port.parse::<u16>().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    v.parse::<SocketAddr>().map_err(|_| bad())
}

/// Parses "500ms", "5s", "2m", "1h" or a bare number of seconds.
pub fn parse_duration(what: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Duration {
        what,
        value: value.to_owned(),
    };
    let v = value.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1e3,
        "us" | "µs" => number / 1e6,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(bad()),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(bad());
    }
    if seconds > MAX_DURATION_S {
        return Err(ConfigError::TooLarge {
            what,
            limit: "365 days".to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(Duration::from_secs_f64(seconds))
}

impl Config {
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let mode = mode_of(&args)?;
        check_limits(&args)?;
        check_combinations(&args, &mode)?;
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let interval = parse_duration("--interval", &args.interval)?;
        if interval.is_zero() {
            return Err(ConfigError::Zero { what: "--interval" });
        }
        let min_age = parse_duration("--min-age", &args.min_age)?;
        if min_age > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::TooLarge {
                what: "--min-age",
                limit: "24h".to_owned(),
                value: args.min_age.clone(),
            });
        }
        let duration = args
            .duration
            .as_deref()
            .map(|d| parse_duration("--duration", d))
            .transpose()?;
        Ok(Self {
            kernel: kernel_of(&args, &mode)?,
            output: output_of(&args)?,
            suppressions: suppressions_of(&args)?,
            debug_dirs: debug_dirs_of(&args)?,
            mode,
            follow_forks: args.follow_forks,
            interval,
            duration,
            verdict: VerdictParams {
                min_age_ms: u32::try_from(min_age.as_millis()).unwrap_or(u32::MAX),
                min_scans: args.min_scans,
                require_stable_contents: !args.no_checksum,
            },
            heuristics: Heuristics::parse(&args.leak_check_heuristics)?,
            error_exit: error_exit_of(&args)?,
            heap_walk: !args.no_heap_walk,
            stop_the_world: args.stop_the_world,
            ring_bytes: args.ring_buffer << 20,
            stack_entries: args.stack_map_entries,
            read_method: match args.read_method {
                ReadMethodArg::ProcessVmReadv => ReadMethod::ProcessVmReadv,
                ReadMethodArg::ProcMem => ReadMethod::ProcMem,
            },
            record_order: match args.record_order {
                RecordOrderArg::Auto => None,
                RecordOrderArg::Counter => Some(StampKind::Counter),
                RecordOrderArg::Clock => Some(StampKind::Clock),
            },
            stacks: !args.no_stacks && args.stacks != StacksArg::Caller,
            stack_walk: match args.stacks {
                StacksArg::Fp => StackWalk::FramePointers,
                StacksArg::Dwarf => StackWalk::Cfi,
                StacksArg::Auto | StacksArg::Caller => StackWalk::Auto,
            },
            empty_probes: args.empty_probes,
            scan_threads: (args.scan_threads as usize).min(cpus),
            verbose: args.verbose,
            dump_objects: args.dump_objects,
            limits: Limits {
                max_objects: args.max_objects,
                scan_cpu_percent: args.scan_cpu,
            },
        })
    }
}

/// How user stacks are walked (`--stacks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackWalk {
    /// CFI where the kernel can run the unwinder, else frame pointers.
    Auto,
    FramePointers,
    /// CFI, or an error when the unwinder cannot load.
    Cfi,
}

/// What to trace: processes, a command, the kernel, or processes as they start.
fn mode_of(args: &Args) -> Result<Mode, ConfigError> {
    let daemon = !args.kernel && (args.all || !args.comms.is_empty() || args.cgroup.is_some());
    if daemon {
        if !args.pids.is_empty() || !args.command.is_empty() {
            return Err(ConfigError::DaemonAndTargets);
        }
        return Ok(Mode::Daemon(Selector {
            all: args.all,
            comms: args.comms.iter().map(|c| Pattern::new(c)).collect(),
            cgroup: args
                .cgroup
                .as_ref()
                .map(|p| Selector::normalize_cgroup(&p.to_string_lossy())),
            exclude: args.exclude_comms.iter().map(|c| Pattern::new(c)).collect(),
            max_targets: args.max_targets,
        }));
    }
    if !args.exclude_comms.is_empty() {
        return Err(ConfigError::ExcludeWithoutDaemon);
    }
    match (args.kernel, args.pids.is_empty(), args.command.is_empty()) {
        (true, _, _) => Ok(Mode::Kernel),
        (false, false, false) => Err(ConfigError::PidAndCommand),
        (false, false, true) => Ok(Mode::Pids(args.pids.clone())),
        (false, true, false) => Ok(Mode::Launch(args.command.clone())),
        (false, true, true) => Err(ConfigError::NoTarget),
    }
}

/// The numbers that must be in range.
fn check_limits(args: &Args) -> Result<(), ConfigError> {
    if let Some(&pid) = args.pids.iter().find(|&&p| p == 0 || p > i32::MAX as u32) {
        return Err(ConfigError::BadPid(pid));
    }
    if args.min_scans == 0 {
        return Err(ConfigError::Zero {
            what: "--min-scans",
        });
    }
    if args.ring_buffer == 0 || args.ring_buffer > 1024 || !args.ring_buffer.is_power_of_two() {
        return Err(ConfigError::RingSize(args.ring_buffer));
    }
    if args.stack_map_entries == 0 {
        return Err(ConfigError::Zero {
            what: "--stack-map-entries",
        });
    }
    if args.scan_threads == 0 {
        return Err(ConfigError::Zero {
            what: "--scan-threads",
        });
    }
    let too_large = |what, limit: &dyn ToString, value: &dyn ToString| ConfigError::TooLarge {
        what,
        limit: limit.to_string(),
        value: value.to_string(),
    };
    if args.stack_map_entries > MAX_STACK_ENTRIES {
        return Err(too_large(
            "--stack-map-entries",
            &MAX_STACK_ENTRIES,
            &args.stack_map_entries,
        ));
    }
    if args.scan_threads > MAX_SCAN_THREADS {
        return Err(too_large(
            "--scan-threads",
            &MAX_SCAN_THREADS,
            &args.scan_threads,
        ));
    }
    if args.min_scans > MAX_MIN_SCANS {
        return Err(too_large("--min-scans", &MAX_MIN_SCANS, &args.min_scans));
    }
    if args.top > MAX_TOP {
        return Err(too_large("--top", &MAX_TOP, &args.top));
    }
    if let Some(&pid) = args.pids.iter().find(|&&p| p == std::process::id()) {
        return Err(ConfigError::SelfPid(pid));
    }
    if args.max_objects == Some(0) {
        return Err(ConfigError::Zero {
            what: "--max-objects",
        });
    }
    if args.max_targets == 0 {
        return Err(ConfigError::Zero {
            what: "--max-targets",
        });
    }
    if args.max_targets > MAX_TARGETS {
        return Err(too_large("--max-targets", &MAX_TARGETS, &args.max_targets));
    }
    if args.pprof_keep == 0 {
        return Err(ConfigError::Zero {
            what: "--pprof-keep",
        });
    }
    if args.pprof_keep > MAX_PPROF_KEEP {
        return Err(too_large("--pprof-keep", &MAX_PPROF_KEEP, &args.pprof_keep));
    }
    if args.metrics_sites > MAX_METRICS_SITES {
        return Err(too_large(
            "--metrics-sites",
            &MAX_METRICS_SITES,
            &args.metrics_sites,
        ));
    }
    if args.sample == 0 || args.sample > 65536 || !args.sample.is_power_of_two() {
        return Err(ConfigError::Sample(args.sample));
    }
    Ok(())
}

/// Options that make no sense together.
fn check_combinations(args: &Args, mode: &Mode) -> Result<(), ConfigError> {
    if *mode == Mode::Kernel {
        let user_only = [
            ("--pprof", args.pprof.is_some()),
            ("--pprof-dir", args.pprof_dir.is_some()),
            ("--flamegraph", args.flamegraph.is_some()),
            ("--stop-the-world", args.stop_the_world),
            ("--follow-forks", args.follow_forks),
            ("--show-contents", args.show_contents),
            ("--xml", args.xml.is_some()),
            ("--format lsan", args.format == Some(FormatArg::Lsan)),
            ("--live", args.live),
            ("--all", args.all),
            ("--comm", !args.comms.is_empty()),
            ("--exclude-comm", !args.exclude_comms.is_empty()),
            ("--max-objects", args.max_objects.is_some()),
            ("--scan-cpu", args.scan_cpu != 100),
        ];
        if let Some((flag, _)) = user_only.iter().find(|(_, given)| *given) {
            return Err(ConfigError::NotInKernelMode(flag));
        }
    }
    let json = json_of(args);
    // The command inherits our stdout: its output would land inside the stream.
    if matches!(mode, Mode::Launch(_)) && json && args.output.is_none() {
        return Err(ConfigError::JsonSharesStdout);
    }
    if args.live && matches!(mode, Mode::Launch(_)) {
        return Err(ConfigError::LiveNeedsPid);
    }
    if args.live && json && args.output.is_none() {
        return Err(ConfigError::LiveSharesStdout);
    }
    Ok(())
}

/// `--json` or `--format json`.
fn json_of(args: &Args) -> bool {
    args.json || args.format == Some(FormatArg::Json)
}

/// `--debug-dir` directories (each must be one), else gdb's default.
fn debug_dirs_of(args: &Args) -> Result<Vec<PathBuf>, ConfigError> {
    if args.debug_dir.is_empty() {
        return Ok(vec![PathBuf::from(crate::symbolize::DEFAULT_DEBUG_ROOT)]);
    }
    for dir in &args.debug_dir {
        if !dir.is_dir() {
            return Err(ConfigError::DebugDir(dir.clone()));
        }
    }
    Ok(args.debug_dir.clone())
}

/// The built-in suppressions (unless turned off) and the user's files.
fn suppressions_of(args: &Args) -> Result<Suppressions, ConfigError> {
    let mut suppressions = if args.no_default_suppressions {
        Suppressions::default()
    } else {
        Suppressions::builtin()
    };
    for file in &args.suppressions {
        suppressions
            .load_file(file)
            .map_err(|e| ConfigError::Suppressions(e.to_string()))?;
    }
    Ok(suppressions)
}

/// Where and how reports go; colour and the status line only on terminals.
fn output_of(args: &Args) -> Result<OutputConfig, ConfigError> {
    let to_file = args.output.is_some();
    let json = json_of(args);
    let lsan = args.format == Some(FormatArg::Lsan);
    let color = match args.color {
        ColorArg::Always => true,
        ColorArg::Never => false,
        ColorArg::Auto => !to_file && !json && !lsan && std::io::stdout().is_terminal(),
    };
    let live = args.live.then(|| {
        if std::io::stdout().is_terminal() {
            LiveOutput::Screen
        } else {
            LiveOutput::Lines
        }
    });
    Ok(OutputConfig {
        json,
        lsan,
        xml: args.xml.clone(),
        live,
        path: args.output.clone(),
        color,
        top: args.top,
        show_possible: args.show_possible,
        show_contents: args.show_contents,
        pprof: args.pprof.clone(),
        flamegraph: args.flamegraph.clone(),
        // The live view owns the terminal.
        status: !args.quiet && std::io::stderr().is_terminal() && live != Some(LiveOutput::Screen),
        pprof_dir: args.pprof_dir.clone(),
        pprof_keep: args.pprof_keep,
        metrics: args
            .metrics
            .as_deref()
            .map(parse_metrics_addr)
            .transpose()?,
        metrics_sites: args.metrics_sites,
        fold: (args.fold_wrappers || !args.fold_wrapper.is_empty())
            .then(|| WrapperFold::new(&args.fold_wrapper)),
    })
}

/// Kernel-mode options (`--pid` filters allocations there).
fn kernel_of(args: &Args, mode: &Mode) -> Result<KernelConfig, ConfigError> {
    Ok(KernelConfig {
        pids: if *mode == Mode::Kernel {
            args.pids.clone()
        } else {
            Vec::new()
        },
        cgroup: args.cgroup.clone(),
        caches: args.caches.clone(),
        pages: args.pages,
        free_probes: args.free_probes.into(),
        sample_shift: args.sample.trailing_zeros(),
        min_growth_window: parse_duration("--min-growth-window", &args.min_growth_window)?,
        include_tracer: args.include_tracer,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn config(argv: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(Args::try_parse_from(argv).expect("clap accepts it"))
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("x", "2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("x", "1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("x", "2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("x", "soon").is_err());
        assert!(parse_duration("x", "5 parsecs").is_err());
    }

    #[test]
    fn modes() {
        assert_eq!(
            config(&["lt", "-p", "12"]).unwrap().mode,
            Mode::Pids(vec![12])
        );
        assert_eq!(
            config(&["lt", "--", "ls", "-l"]).unwrap().mode,
            Mode::Launch(vec!["ls".into(), "-l".into()])
        );
        assert_eq!(config(&["lt", "--kernel"]).unwrap().mode, Mode::Kernel);
        assert_eq!(config(&["lt"]).unwrap_err(), ConfigError::NoTarget);
        assert_eq!(
            config(&["lt", "-p", "1", "--", "ls"]).unwrap_err(),
            ConfigError::PidAndCommand
        );
    }

    #[test]
    fn rejections_say_what_to_do() {
        let err = config(&["lt", "-p", "1", "--interval", "fast"]).unwrap_err();
        assert!(err.to_string().contains("500ms"));
        assert_eq!(
            config(&["lt", "-p", "1", "--ring-buffer", "3"]).unwrap_err(),
            ConfigError::RingSize(3)
        );
        assert_eq!(
            config(&["lt", "-p", "1", "--interval", "0s"]).unwrap_err(),
            ConfigError::Zero { what: "--interval" }
        );
        assert_eq!(
            config(&["lt", "-p", "0"]).unwrap_err(),
            ConfigError::BadPid(0)
        );
        assert_eq!(
            config(&["lt", "-p", "1", "--scan-threads", "0"]).unwrap_err(),
            ConfigError::Zero {
                what: "--scan-threads"
            }
        );
    }

    #[test]
    fn scan_threads_are_at_most_the_cpus() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let threads = |argv: &[&str]| config(argv).expect("valid").scan_threads;
        assert_eq!(threads(&["lt", "-p", "1"]), 2.min(cpus));
        assert_eq!(threads(&["lt", "-p", "1", "--scan-threads", "1"]), 1);
        assert_eq!(
            threads(&["lt", "-p", "1", "--scan-threads", "256"]),
            cpus.min(256)
        );
    }

    #[test]
    fn every_number_has_a_bound_named_in_the_error() {
        for (flag, value, limit) in [
            ("--interval", "99999999999999999999s", "365 days"),
            ("--duration", "18446744073709551615s", "365 days"),
            ("--duration", "8761h", "365 days"),
            ("--min-growth-window", "9999999999h", "365 days"),
            ("--min-age", "25h", "24h"),
            ("--stack-map-entries", "4294967295", "524288"),
            ("--scan-threads", "257", "256"),
            ("--stack-map-entries", "100000000", "524288"),
            ("--min-scans", "60000", "1000"),
            ("--top", "18446744073709551615", "1000000"),
        ] {
            let err = config(&["lt", "--kernel", flag, value])
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag), "{err}");
            assert!(err.contains(limit), "{err}");
            assert_eq!(err.lines().count(), 1);
        }
        assert!(config(&["lt", "-p", "1", "--stack-map-entries", "524288"]).is_ok());
        assert!(config(&["lt", "-p", "1", "--duration", "8760h"]).is_ok());
    }

    #[test]
    fn kernel_mode_refuses_what_it_would_ignore() {
        for flag in [
            "--stop-the-world",
            "--follow-forks",
            "--show-contents",
            "--live",
        ] {
            assert_eq!(
                config(&["lt", "--kernel", flag]).unwrap_err(),
                ConfigError::NotInKernelMode(flag)
            );
        }
        assert_eq!(
            config(&["lt", "--kernel", "--pprof", "p.pb.gz"]).unwrap_err(),
            ConfigError::NotInKernelMode("--pprof")
        );
        assert_eq!(
            config(&["lt", "--kernel", "--flamegraph", "f.svg"]).unwrap_err(),
            ConfigError::NotInKernelMode("--flamegraph")
        );
    }

    #[test]
    fn not_itself_and_not_into_the_commands_stdout() {
        let me = std::process::id().to_string();
        assert_eq!(
            config(&["lt", "-p", &me]).unwrap_err(),
            ConfigError::SelfPid(std::process::id())
        );
        assert_eq!(
            config(&["lt", "--json", "--", "ls"]).unwrap_err(),
            ConfigError::JsonSharesStdout
        );
        assert!(config(&["lt", "--json", "--output", "x", "--", "ls"]).is_ok());
        assert!(config(&["lt", "--json", "-p", "1"]).is_ok());
    }

    #[test]
    fn report_formats() {
        let c = config(&["lt", "-p", "1", "--format", "lsan", "--xml", "v.xml"]).unwrap();
        assert!(c.output.lsan && !c.output.json && !c.output.color);
        assert_eq!(c.output.xml, Some(PathBuf::from("v.xml")));
        assert!(
            config(&["lt", "-p", "1", "--format", "json"])
                .unwrap()
                .output
                .json
        );
        assert!(config(&["lt", "-p", "1", "--json"]).unwrap().output.json);
        assert!(Args::try_parse_from(["lt", "-p", "1", "--json", "--format", "lsan"]).is_err());
        assert_eq!(
            config(&["lt", "--format", "json", "--", "ls"]).unwrap_err(),
            ConfigError::JsonSharesStdout
        );
        assert_eq!(
            config(&["lt", "--kernel", "--xml", "v.xml"]).unwrap_err(),
            ConfigError::NotInKernelMode("--xml")
        );
        assert_eq!(
            config(&["lt", "--kernel", "--format", "lsan"]).unwrap_err(),
            ConfigError::NotInKernelMode("--format lsan")
        );
    }

    #[test]
    fn daemon_mode() {
        let c = config(&["lt", "--comm", "web*", "--exclude-comm", "web-admin"]).unwrap();
        let Mode::Daemon(sel) = c.mode else {
            panic!("daemon mode")
        };
        assert!(!sel.all && sel.comms == [Pattern::new("web*")]);
        assert_eq!(sel.exclude, [Pattern::new("web-admin")]);
        assert_eq!(sel.max_targets, 64);
        let c = config(&["lt", "--cgroup", "/sys/fs/cgroup/system.slice/app.service"]).unwrap();
        assert!(
            matches!(&c.mode, Mode::Daemon(s) if s.cgroup.as_deref() == Some("/system.slice/app.service"))
        );
        assert!(matches!(config(&["lt", "--all"]).unwrap().mode, Mode::Daemon(s) if s.all));
        assert_eq!(
            config(&["lt", "--all", "-p", "3"]).unwrap_err(),
            ConfigError::DaemonAndTargets
        );
        assert_eq!(
            config(&["lt", "-p", "3", "--exclude-comm", "x"]).unwrap_err(),
            ConfigError::ExcludeWithoutDaemon
        );
        assert_eq!(
            config(&["lt", "--all", "--max-targets", "0"]).unwrap_err(),
            ConfigError::Zero {
                what: "--max-targets"
            }
        );
        // Kernel mode keeps its own --cgroup.
        assert_eq!(
            config(&["lt", "--kernel", "--cgroup", "x"]).unwrap().mode,
            Mode::Kernel
        );
    }

    #[test]
    fn the_live_view_watches_pids_on_its_own_stdout() {
        assert!(
            config(&["lt", "-p", "1", "--live"])
                .unwrap()
                .output
                .live
                .is_some()
        );
        assert_eq!(
            config(&["lt", "--live", "--", "ls"]).unwrap_err(),
            ConfigError::LiveNeedsPid
        );
        assert_eq!(
            config(&["lt", "-p", "1", "--live", "--json"]).unwrap_err(),
            ConfigError::LiveSharesStdout
        );
        assert!(config(&["lt", "-p", "1", "--live", "--json", "-o", "x"]).is_ok());
    }

    #[test]
    fn metrics_listen_on_localhost_unless_told() {
        let local = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        assert_eq!(parse_metrics_addr("9464"), Ok(local(9464)));
        assert_eq!(parse_metrics_addr(":9464"), Ok(local(9464)));
        assert_eq!(parse_metrics_addr("localhost:9464"), Ok(local(9464)));
        assert_eq!(
            parse_metrics_addr("0.0.0.0:80"),
            Ok("0.0.0.0:80".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9464"),
            Ok("[::1]:9464".parse().unwrap())
        );
        for bad in ["", "host:port", "99999", "1.2.3.4"] {
            assert_eq!(
                parse_metrics_addr(bad),
                Err(ConfigError::MetricsAddr(bad.to_owned()))
            );
        }
        let c = config(&["lt", "-p", "1", "--metrics", "9464"]).unwrap();
        assert_eq!(c.output.metrics, Some(local(9464)));
        assert!(
            config(&["lt", "-p", "1", "--metrics", "x"])
                .unwrap_err()
                .to_string()
                .contains("ADDR:PORT")
        );
    }

    #[test]
    fn verdict_options() {
        let c = config(&[
            "lt",
            "-p",
            "1",
            "--min-age",
            "200ms",
            "--min-scans",
            "3",
            "--no-checksum",
        ])
        .unwrap();
        assert_eq!(
            c.verdict,
            VerdictParams {
                min_age_ms: 200,
                min_scans: 3,
                require_stable_contents: false
            }
        );
    }
}
