//! `cargo xtask`: the developer tasks of leaktrace, each one doing its own set-up.
//!
//! * `setup`    nightly `rust-src` and a `bpf-linker` built against the nightly's own LLVM
//! * `ebpf`     rebuild the eBPF object from source; `--check` it against the committed
//!   one, or `--update` the committed one
//! * `fixtures` build the C/C++ fixture programs the integration tests trace
//! * `test`     everything CI runs: setup, eBPF check, fmt, clippy, unit and
//!   integration tests (the latter load real eBPF programs: run as root)
//! * `bench`    the speed and memory benchmarks, printed as side-by-side ratios
//! * `corpus`   leaktrace against real Debian programs next to valgrind (not in CI)
//! * `fuzz`     the parsers' fuzz targets (cargo-fuzz), each for a bounded time
//! * `soak`     minutes of a churning, slowly leaking target: leaks, RSS, losses
//! * `vm-test`  the integration tests on other kernels (Debian's), booted in qemu

mod bench;
mod corpus;
mod ebpf;
mod fixtures;
mod fuzz;
mod helper_costs;
mod overhead;
mod setup;
mod soak;
mod util;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "leaktrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs (idempotent).
    Setup,
    /// Build the eBPF object from source and compare it with the committed one.
    Ebpf {
        /// Fail if the committed object differs from a fresh build.
        #[arg(long, conflicts_with = "update")]
        check: bool,
        /// Replace the committed object with a fresh build.
        #[arg(long)]
        update: bool,
    },
    /// Build the fixture programs into target/fixtures.
    Fixtures,
    /// Run every check CI runs.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the short fuzz pass.
        #[arg(long)]
        no_fuzz: bool,
        /// Skip the one-minute soak.
        #[arg(long)]
        no_soak: bool,
        /// Only tests whose name contains this (also skips the fuzz pass and the soak).
        filter: Option<String>,
    },
    /// Run the benchmarks and print ratios.
    Bench {
        /// Fewer iterations (quick look, noisier figures).
        #[arg(long)]
        quick: bool,
        /// Only these benchmarks (repeatable; all by default).
        #[arg(long, value_enum)]
        only: Vec<bench::Bench>,
        /// The stack-capture benchmark also runs CFI unwinding, and the overhead
        /// loop its defaults, with this other leaktrace binary (e.g. a copy of an
        /// earlier build), interleaved with this build's runs: before/after
        /// figures from the same minutes.
        #[arg(long, value_name = "LEAKTRACE")]
        against: Option<std::path::PathBuf>,
    },
    /// Trace real programs (redis, nginx, sqlite3, hunspell, python3, python3-malloc) in pid and
    /// launch mode under a bounded load, next to valgrind; print a table.
    Corpus {
        /// Smaller workloads and shorter idle times.
        #[arg(long)]
        quick: bool,
        /// Do not apt-get install missing programs.
        #[arg(long)]
        no_install: bool,
        /// Skip valgrind (much faster).
        #[arg(long)]
        no_valgrind: bool,
        /// Only these programs (all by default).
        programs: Vec<String>,
    },
    /// Run the fuzz targets (installs cargo-fuzz; needs the nightly toolchain).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (all by default): maps, tracefs_format, events,
        /// suppress, elf, placement.
        targets: Vec<String>,
    },
    /// Trace a churning, slowly leaking target for minutes and check leaks, RSS
    /// and losses (root).
    Soak {
        /// Length of the main phase.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run the integration tests in qemu on Debian's kernels (default: the newest
    /// 6.1, Debian 12's, and the newest kernel apt can see).
    VmTest {
        /// Kernels: a version prefix (`6.1`, `6.12`), a package name
        /// (`linux-image-6.1.0-57-amd64-unsigned`), `newest`, or `host` (native run).
        kernels: Vec<String>,
        /// Only tests whose name contains this (repeatable).
        #[arg(long)]
        filter: Vec<String>,
        /// Leave out tests whose name contains this (repeatable).
        #[arg(long)]
        skip: Vec<String>,
        /// Stop a guest after this many seconds, boot included.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// CPUs of each guest (all emulated on one host thread: single-threaded TCG).
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Guests per kernel run side by side, each with a share of the tests
        /// (default: the host's CPUs).
        #[arg(long)]
        shards: Option<u32>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Ebpf { check, update } => ebpf::run(check, update),
        Task::Fixtures => fixtures::build().map(drop),
        Task::Test {
            no_lint,
            no_fuzz,
            no_soak,
            filter,
        } => test(no_lint, no_fuzz, no_soak, filter.as_deref()),
        Task::Bench {
            quick,
            only,
            against,
        } => bench::run(quick, &only, against.as_deref()),
        Task::Corpus {
            quick,
            no_install,
            no_valgrind,
            programs,
        } => corpus::run(quick, no_install, no_valgrind, &programs),
        Task::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Task::Soak { minutes } => soak::run(minutes),
        Task::VmTest {
            kernels,
            filter,
            skip,
            timeout,
            memory,
            cpus,
            shards,
        } => vm::run(&vm::Options {
            kernels,
            filters: filter,
            skips: skip,
            timeout: std::time::Duration::from_secs(timeout),
            memory_mib: memory,
            cpus,
            shards: shards.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
            }),
        }),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// The short fuzz pass CI runs: six targets in about 2.5 minutes.
const CI_FUZZ_SECONDS: u64 = 25;

fn test(no_lint: bool, no_fuzz: bool, no_soak: bool, filter: Option<&str>) -> anyhow::Result<()> {
    setup::run()?;
    setup::test_packages()?;
    ebpf::run(true, false)?;
    fixtures::build()?;
    if !no_lint {
        util::step("cargo fmt --check");
        util::cargo(&["fmt", "--all", "--", "--check"], &[])?;
        util::step("cargo clippy");
        util::cargo(
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--features",
                "leaktrace/test-support",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
        util::step("cargo doc");
        util::cargo(
            &["doc", "--workspace", "--no-deps"],
            &[("RUSTDOCFLAGS", "-D warnings")],
        )?;
        fuzz::lint()?;
    }
    util::step("unit tests");
    let mut args = vec!["test", "--workspace", "--lib", "--bins"];
    args.extend(filter);
    util::cargo(&args, &[])?;
    util::step("integration tests (real eBPF)");
    if !util::is_root() {
        anyhow::bail!(
            "the integration tests load eBPF programs and need root: run `sudo -E cargo xtask test`"
        );
    }
    let mut args = vec![
        "test",
        "--package",
        "leaktrace",
        "--test",
        "tests",
        "--",
        "--test-threads=2",
    ];
    args.extend(filter);
    let env = setup::test_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    util::cargo(&args, &env)?;
    if filter.is_none() && !no_fuzz {
        util::step("fuzz (short pass)");
        fuzz::run(CI_FUZZ_SECONDS, &[])?;
    }
    if filter.is_none() && !no_soak {
        util::step("soak (one minute)");
        soak::run(1)?;
    }
    Ok(())
}
