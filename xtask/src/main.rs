//! `cargo xtask`: the developer tasks of leaktrace, each one doing its own set-up.
//!
//! * `setup`    nightly `rust-src` and a `bpf-linker` built against the nightly's own LLVM
//! * `ebpf`     rebuild the eBPF object from source; `--check` it against the committed
//!   one, or `--update` the committed one
//! * `fixtures` build the C/C++ fixture programs the integration tests trace
//! * `test`     everything CI runs: setup, eBPF check, fmt, clippy, unit and
//!   integration tests (the latter load real eBPF programs: run as root)
//! * `bench`    the speed and memory benchmarks, printed as side-by-side ratios
//! * `vm-test`  the integration tests on other kernels (Debian's), booted in qemu

mod bench;
mod ebpf;
mod fixtures;
mod setup;
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
        /// Only tests whose name contains this.
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
        /// Stop a kernel's run after this many seconds, boot included.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// Guest CPUs (TCG runs one host thread per CPU).
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Ebpf { check, update } => ebpf::run(check, update),
        Task::Fixtures => fixtures::build().map(drop),
        Task::Test { no_lint, filter } => test(no_lint, filter.as_deref()),
        Task::Bench { quick, only } => bench::run(quick, &only),
        Task::VmTest {
            kernels,
            filter,
            skip,
            timeout,
            memory,
            cpus,
        } => vm::run(&vm::Options {
            kernels,
            filters: filter,
            skips: skip,
            timeout: std::time::Duration::from_secs(timeout),
            memory_mib: memory,
            cpus,
        }),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn test(no_lint: bool, filter: Option<&str>) -> anyhow::Result<()> {
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
    util::cargo(
        &args,
        &[("LEAKTRACE_FIXTURES", &fixtures::dir().display().to_string())],
    )?;
    Ok(())
}
