//! `cargo xtask fuzz`: runs the coverage-guided fuzz targets in `fuzz/` (cargo-fuzz,
//! libFuzzer, AddressSanitizer, overflow checks on) for a bounded time each, so that
//! the parsers that read what leaktrace does not control (`/proc/PID/maps`, tracefs
//! formats, ring-buffer records, suppressions files, ELF files and their code) are
//! pounded on by every CI run, not just once. It installs what it needs (the nightly
//! toolchain is already required for the eBPF build; cargo-fuzz comes from
//! crates.io), seeds each corpus from real inputs of this machine plus the committed
//! regression seeds in `fuzz/seeds/`, and prints a table of executions per target.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{fixtures, util};

/// Every target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "maps",
    "tracefs_format",
    "events",
    "suppress",
    "elf",
    "placement",
];

fn fuzz_dir() -> PathBuf {
    util::root().join("fuzz")
}

fn work_dir() -> PathBuf {
    util::root().join("target/fuzz")
}

/// `rustup run nightly cargo ARGS` in the fuzz crate, with the committed eBPF
/// object (the fuzz build does not need a fresh one).
fn nightly_cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .args(args)
        .current_dir(util::root())
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env("LEAKTRACE_EBPF", "prebuilt");
    cmd
}

/// Installs cargo-fuzz when `cargo +nightly fuzz` is missing.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let have = nightly_cargo(&["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    util::step("cargo install cargo-fuzz");
    util::run(nightly_cargo(&["install", "cargo-fuzz", "--locked"]).current_dir("/"))
        .context("cannot install cargo-fuzz from crates.io")
}

fn write_seed(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(name);
    if !path.exists() {
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A ring-buffer user record (leak-common's `UserRecord` layout, 64 bytes).
fn user_record(kind: u32, func: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(64);
    for v in [kind, 1234, 1235, func] {
        r.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [
        5_000_000u64,
        0x55d0_c0a4_b2a0,
        64,
        0x55d0_c0a4_c000,
        7,
        0x55d0_0000_1234,
    ] {
        r.extend_from_slice(&v.to_ne_bytes());
    }
    r
}

/// A ring-buffer kernel record (leak-common's `KernelRecord` layout, 120 bytes).
fn kernel_record(kind: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(120);
    for v in [kind, 1, 2, 0] {
        r.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [
        3u64,
        0xffff_8880_0000_1000,
        0xffff_ffff_8100_0000,
        5,
        8,
        9,
        10,
    ] {
        r.extend_from_slice(&v.to_ne_bytes());
    }
    let mut cache = [0u8; 32];
    cache[..9].copy_from_slice(b"kmalloc-8");
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"bash");
    r.extend_from_slice(&cache);
    r.extend_from_slice(&comm);
    r
}

/// Fills `corpus/TARGET` with real inputs from this machine (once; libFuzzer then
/// keeps what it finds) and the committed regression seeds.
fn seed(target: &str, corpus: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(corpus)?;
    // fuzz/seeds/README.md lists them; the folders hold them.
    let committed = fuzz_dir().join("seeds").join(target);
    if let Ok(entries) = fs::read_dir(&committed) {
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let name = format!("seed-{}", entry.file_name().to_string_lossy());
            write_seed(corpus, &name, &fs::read(entry.path())?)?;
        }
    }
    match target {
        "maps" => {
            for pid in ["self", "1"] {
                if let Ok(text) = fs::read(format!("/proc/{pid}/maps")) {
                    write_seed(corpus, &format!("proc-{pid}"), &text)?;
                }
            }
        }
        "tracefs_format" => {
            for event in [
                "kmem/kmalloc",
                "kmem/kfree",
                "kmem/kmem_cache_alloc",
                "kmem/kmem_cache_free",
                "kmem/mm_page_alloc",
                "task/task_newtask",
                "sched/sched_process_exit",
            ] {
                for base in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
                    let file = Path::new(base).join("events").join(event).join("format");
                    if let Ok(text) = fs::read(&file) {
                        write_seed(corpus, &event.replace('/', "-"), &text)?;
                        break;
                    }
                }
            }
        }
        "events" => {
            for kind in 1..=10 {
                write_seed(corpus, &format!("user-{kind}"), &user_record(kind, 1))?;
            }
            for kind in 16..=19 {
                write_seed(corpus, &format!("kernel-{kind}"), &kernel_record(kind))?;
            }
        }
        "suppress" => {
            write_seed(
                corpus,
                "file",
                b"^allocate_dtv$\tallocate_dtv\n# comment\nleak:make_cache\nleak:libnoisy.so*\n\nleak:^_dl_$\n",
            )?;
            write_seed(corpus, "glob", b"^my*fn$\tmy_alloc_fn\nleak:a*b*c\n")?;
        }
        "elf" => {
            // Real ELF files, whole and truncated: the fixtures (built with -g, one
            // static) and this machine's libc and loader.
            let mut files: Vec<PathBuf> = [
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
                "/bin/true",
            ]
            .iter()
            .map(PathBuf::from)
            .collect();
            for name in ["counts", "cxx", "family-static", "soak"] {
                files.push(fixtures::dir().join(name));
            }
            // And a tiny shared library with the allocator's names: small inputs
            // let the mutations reach headers, symbols and code far more often.
            let tiny = work_dir().join("tiny-allocator.so");
            if !tiny.exists() {
                let src = work_dir().join("tiny-allocator.c");
                fs::write(&src, TINY_ALLOCATOR)?;
                util::run(
                    Command::new("gcc")
                        .args([
                            "-shared",
                            "-fPIC",
                            "-nostdlib",
                            "-O1",
                            "-Wl,--build-id=none",
                        ])
                        .args(["-Wl,-z,noseparate-code", "-o"])
                        .arg(&tiny)
                        .arg(&src),
                )
                .context("cannot build the tiny ELF seed (is gcc installed?)")?;
            }
            files.push(tiny);
            for file in files {
                let Ok(bytes) = fs::read(&file) else { continue };
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                write_seed(corpus, &name, &bytes)?;
                write_seed(
                    corpus,
                    &format!("{name}.head"),
                    &bytes[..bytes.len().min(4096)],
                )?;
            }
        }
        "placement" => {
            let at = 0x1000u64.to_le_bytes();
            // glibc free: test rdi,rdi; je; push rbp; lea rsi,[rdi-0x10]
            let mut free = at.to_vec();
            free.push(0);
            free.extend_from_slice(&[
                0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55, 0x48, 0x8d, 0x77, 0xf0,
            ]);
            write_seed(corpus, "free", &free)?;
            // endbr64; sub rsp,8; call rel32; add rsp,8; ret (a wrapper)
            let mut wrapper = u64::MAX.wrapping_sub(8).to_le_bytes().to_vec();
            wrapper.push(1);
            wrapper.extend_from_slice(&[
                0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0x48, 0x83, 0xc4,
                0x08, 0xc3,
            ]);
            write_seed(corpus, "wrapper", &wrapper)?;
        }
        other => bail!("unknown fuzz target {other}"),
    }
    Ok(())
}

/// Source of the tiny ELF seed: the names leaktrace hooks, a wrapper that calls
/// malloc, and a free that starts with a NULL test.
const TINY_ALLOCATOR: &str = "\
static char heap[4096];
static unsigned long used;
void *malloc(unsigned long n) { void *p = heap + used; used += (n + 15) & ~15UL; return p; }
void *calloc(unsigned long a, unsigned long b) { return malloc(a * b); }
void free(void *p) { if (!p) return; used -= 0; }
char *strdup(const char *s) { unsigned long n = 0; while (s[n]) n++; char *d = malloc(n + 1);
    for (unsigned long i = 0; i <= n; i++) d[i] = s[i]; return d; }
";

/// One target's run.
struct Outcome {
    target: String,
    seconds: f64,
    execs: Option<u64>,
    corpus: usize,
    failed: bool,
}

fn final_stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.strip_prefix(&format!("stat::{name}:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Runs `targets` (all when empty) for `seconds` each; fails if any found a crash.
pub fn run(seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    let targets: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| (*t).to_owned()).collect()
    } else {
        targets.to_vec()
    };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t} (known: {})", TARGETS.join(", "));
        }
    }
    ensure_cargo_fuzz()?;
    // The ELF target is seeded with the fixtures, too.
    fixtures::build()?;
    let work = work_dir();
    let target_dir = work.join("build");
    let target_dir = target_dir.to_str().context("non-UTF-8 target dir")?;
    util::step("cargo fuzz build (nightly, ASan, debug assertions)");
    util::run(&mut nightly_cargo(&[
        "fuzz",
        "build",
        "--fuzz-dir",
        "fuzz",
        "--target-dir",
        target_dir,
        "--debug-assertions",
    ]))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let corpus = work.join("corpus").join(target);
        seed(target, &corpus)?;
        let artifacts = work.join("artifacts").join(target);
        fs::create_dir_all(&artifacts)?;
        util::step(&format!("fuzz {target} for {seconds} s"));
        let started = Instant::now();
        let max_time = format!("-max_total_time={seconds}");
        let prefix = format!("-artifact_prefix={}/", artifacts.display());
        let corpus_arg = corpus.to_str().context("non-UTF-8 corpus path")?;
        let mut args = vec![
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "--target-dir",
            target_dir,
            "--debug-assertions",
            target,
            corpus_arg,
            "--",
            &max_time,
            &prefix,
            // A hang, a runaway allocation or a leak is a finding, too.
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-malloc_limit_mb=512",
            "-print_final_stats=1",
        ];
        if target == "elf" {
            // Whole 2 MiB libraries run at ~100 inputs/s; cut at 64 KiB (truncated
            // binaries are what this target is for) the small seeds run far faster.
            args.push("-max_len=65536");
        }
        let output = nightly_cargo(&args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run the {target} fuzz target"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let log_file = work.join(format!("{target}.log"));
        fs::write(&log_file, log.as_bytes())?;
        let failed = !output.status.success();
        if failed {
            eprintln!(
                "{}",
                log.lines()
                    .rev()
                    .take(60)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            eprintln!(
                "xtask: fuzz target {target} FAILED (full log: {}; crash inputs in {})",
                log_file.display(),
                artifacts.display()
            );
        }
        outcomes.push(Outcome {
            target: target.clone(),
            seconds: started.elapsed().as_secs_f64(),
            execs: final_stat(&log, "number_of_executed_units"),
            corpus: fs::read_dir(&corpus).map(Iterator::count).unwrap_or(0),
            failed,
        });
    }
    println!(
        "{:<16} {:>8} {:>12} {:>10} {:>8}  result",
        "target", "seconds", "executions", "execs/s", "corpus"
    );
    for o in &outcomes {
        let execs = o.execs.map_or("?".to_owned(), |e| e.to_string());
        let rate = o
            .execs
            .map_or("?".to_owned(), |e| format!("{:.0}", e as f64 / o.seconds));
        println!(
            "{:<16} {:>8.1} {:>12} {:>10} {:>8}  {}",
            o.target,
            o.seconds,
            execs,
            rate,
            o.corpus,
            if o.failed { "CRASH" } else { "ok" }
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.failed)
        .map(|o| o.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// rustfmt and clippy for the fuzz crate, which the main workspace leaves out.
pub fn lint() -> anyhow::Result<()> {
    let manifest = fuzz_dir().join("Cargo.toml");
    let manifest = manifest.to_str().context("non-UTF-8 path")?;
    util::step("cargo fmt --check (fuzz crate)");
    util::cargo(&["fmt", "--manifest-path", manifest, "--", "--check"], &[])?;
    util::step("cargo clippy (fuzz crate)");
    let target_dir = work_dir().join("check");
    util::cargo(
        &[
            "clippy",
            "--manifest-path",
            manifest,
            "--target-dir",
            target_dir.to_str().context("non-UTF-8 path")?,
            "--",
            "-D",
            "warnings",
        ],
        &[("LEAKTRACE_EBPF", "prebuilt")],
    )
}
