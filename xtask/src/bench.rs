//! The speed and memory benchmarks. Each figure is measured side by side with its
//! baseline in the same run and printed as a ratio: these machines are shared and
//! noisy, so absolute numbers mean little and no test asserts on time.
//!
//! * tracing overhead (`overhead.rs`): a malloc/free loop and two servers, untraced,
//!   at the floor (empty programs) and traced; each program's own time; start-up;
//! * scanning: leaktrace's scan rate over a heap of a million objects with 1 and 2
//!   scan threads, each scan paired with a plain sequential `process_vm_readv` of the
//!   same process's memory right after it (the physical limit), and cycles per word;
//! * kernel slab mode: eventfd open/close untraced and under `leaktrace --kernel`,
//!   with the event rate sustained and the events lost;
//! * table memory: leaktrace's resident memory per tracked object at a million
//!   objects, and the longest lock holds of those scans;
//! * scanning under churn: events lost while a 2 GB heap is scanned and a thread
//!   churns malloc/free;
//! * stack capture (`--only unwind`): the allocation probe's own run time (bpf_stats)
//!   with no stack, frame pointers and the CFI unwinder (each stack walked, and
//!   walks reused as by default), at 8, 16 and 32 frames;
//! * helper costs (`--only helpers`, `helper_costs.rs`): what one clock read, one id
//!   read and one user-memory read cost a uprobe program on this machine.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::util::{self, step};

/// A fixture started with --wait-go, reading its stdout.
struct Fixture {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Fixture {
    fn start(path: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(path)
            .arg("--wait-go")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut f = Self { child, lines };
        f.wait_for("WAITING")?;
        Ok(f)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_for(&mut self, prefix: &str) -> anyhow::Result<String> {
        for line in self.lines.by_ref() {
            let line = line?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
        bail!("the fixture ended before printing {prefix}")
    }

    fn go(&mut self) -> anyhow::Result<()> {
        let stdin = self.child.stdin.as_mut().expect("piped");
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }

    fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// leaktrace attached to a pid, writing NDJSON to a file.
struct Tracer {
    child: Child,
    out: PathBuf,
}

impl Tracer {
    fn attach(leaktrace: &Path, pid: u32, args: &[&str]) -> anyhow::Result<Self> {
        let out = util::root().join(format!("target/bench-{pid}.json"));
        let _ = std::fs::remove_file(&out);
        let child = Command::new(leaktrace)
            .args(["--json", "--output"])
            .arg(&out)
            .args(["--pid", &pid.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let mut t = Self { child, out };
        t.wait(|r| r.iter().any(|x| x["type"] == "hooks"))?;
        Ok(t)
    }

    /// `leaktrace --kernel ARGS`, system-wide unless ARGS filter.
    fn kernel(leaktrace: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let out = util::root().join("target/bench-kernel.json");
        let _ = std::fs::remove_file(&out);
        let child = Command::new(leaktrace)
            .args(["--kernel", "--json", "--output"])
            .arg(&out)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let mut t = Self { child, out };
        t.wait(|r| r.iter().any(|x| x["type"] == "start"))?;
        Ok(t)
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn wait(&mut self, done: impl Fn(&[Value]) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !done(&self.records()) {
            if let Some(status) = self.child.try_wait()? {
                bail!("leaktrace exited early: {status}");
            }
            if Instant::now() > deadline {
                bail!("leaktrace took too long");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    fn stop(mut self) -> Vec<Value> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let records = self.records();
        let _ = std::fs::remove_file(&self.out);
        records
    }
}

/// Anonymous resident memory (the ring buffer's mapping is not ours to count).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel slab mode: eventfd open/close as fast as one process can, untraced and
/// under `leaktrace --kernel` system-wide; the event rate it sustains and the
/// events it loses.
fn kernel(leaktrace: &Path, fixtures: &Path, seconds: u64) -> anyhow::Result<()> {
    step(&format!(
        "kernel slab mode: {seconds} s of eventfd open/close"
    ));
    let storm = fixtures.join("kobjects");
    let secs = seconds.to_string();
    let run = || -> anyhow::Result<f64> {
        let mut f = Fixture::start(&storm, &["storm", &secs])?;
        f.go()?;
        let line = f.wait_for("OPS_PER_SEC")?;
        f.finish();
        line.strip_prefix("OPS_PER_SEC ")
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("unexpected line {line:?}"))
    };
    let untraced = run()?;
    println!(
        "  {:<24} {:>9.0} ops/s {:>6.2}x {:>12} {:>8} {:>8}",
        "untraced", untraced, 1.0, "events/s", "lost", "missed"
    );
    for extra in [&[][..], &["--no-stacks"], &["--sample", "16"]] {
        let mut args = vec!["--interval", "1s"];
        args.extend_from_slice(extra);
        let tracer = Tracer::kernel(leaktrace, &args)?;
        let records_before = tracer
            .records()
            .iter()
            .rev()
            .find_map(|r| r["records"].as_u64())
            .unwrap_or(0);
        let ops = run()?;
        let records = tracer.stop();
        let end = records
            .iter()
            .rfind(|r| r["type"] == "kernel_end")
            .context("no kernel_end record")?;
        let events = end["records"].as_u64().unwrap_or(0) - records_before;
        println!(
            "  {:<24} {:>9.0} ops/s {:>6.2}x {:>12.0} {:>8} {:>8}",
            format!("leaktrace {}", extra.join(" ")),
            ops,
            untraced / ops,
            events as f64 / seconds as f64,
            end["lost_total"],
            end["frees_missed"]
        );
    }
    println!(
        "  (events/s: ring-buffer records read per second of load; slowdown = untraced/traced)"
    );
    Ok(())
}

/// Sequential read of every readable, writable mapping of `pid`, 1 MiB at a time.
fn sequential_read_mb_s(pid: u32) -> anyhow::Result<(f64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let start = Instant::now();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with("rw") || line.contains("[vvar") {
            continue;
        }
        let (a, b) = range.split_once('-').context("maps range")?;
        let (mut a, b) = (u64::from_str_radix(a, 16)?, u64::from_str_radix(b, 16)?);
        while a < b {
            let len = ((b - a) as usize).min(buf.len());
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: len,
            };
            let remote = libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: len,
            };
            // SAFETY: `local` describes our own buffer.
            let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
            if n <= 0 {
                break;
            }
            std::hint::black_box(&buf);
            total += n as u64;
            a += n as u64;
        }
    }
    Ok((total as f64 / 1e6 / start.elapsed().as_secs_f64(), total))
}

/// Scans of the same configuration, each paired with a sequential read of the
/// same process right after it.
const SCAN_ROUNDS: usize = 5;

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn show(v: Vec<f64>, precision: usize) -> String {
    let (m, lo, hi) = spread(v);
    format!("{m:.precision$} ({lo:.precision$}-{hi:.precision$})")
}

/// The nominal clock (the TSC's, in this VM kind), from /proc/cpuinfo.
fn nominal_mhz() -> Option<f64> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
}

/// One figure per scan round: (scan MB/s, process_vm_readv MB/s, scan record).
type Rounds = Vec<(f64, f64, Value)>;

/// Attaches with `--scan-threads threads` to a hog and pairs each full scan with
/// a sequential read of the same memory right after it (scans come every 3 s and
/// take less than that, so the two never run at once).
fn scan_rounds(
    leaktrace: &Path,
    hog: &Path,
    hog_args: &[&str],
    objects: u64,
    threads: u32,
) -> anyhow::Result<(Rounds, u64)> {
    let mut f = Fixture::start(hog, hog_args)?;
    let threads = threads.to_string();
    let args = [
        "--interval",
        "3s",
        "--min-age",
        "1s",
        "--scan-threads",
        &threads,
    ];
    let t = Tracer::attach(leaktrace, f.pid(), &args)?;
    f.go()?;
    f.wait_for("READY")?;
    let full = |r: &Value| r["type"] == "scan" && r["objects"].as_u64() == Some(objects);
    let mut rounds = Vec::new();
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while rounds.len() < SCAN_ROUNDS {
        if Instant::now() > deadline {
            bail!("leaktrace took too long to scan");
        }
        std::thread::sleep(Duration::from_millis(20));
        let scans: Vec<Value> = t.records().into_iter().filter(full).collect();
        if scans.len() <= seen {
            continue;
        }
        seen = scans.len();
        let scan = scans.last().expect("a scan").clone();
        let (read_mb_s, _) = sequential_read_mb_s(f.pid())?;
        let bytes = scan["bytes_read"].as_f64().unwrap_or(0.0);
        let ms = scan["duration_ms"].as_f64().unwrap_or(f64::MAX);
        rounds.push((bytes / 1e6 / (ms / 1e3), read_mb_s, scan));
    }
    let records = t.stop();
    f.finish();
    let longest = records
        .iter()
        .filter_map(|r| r["longest_lock_hold_us"].as_u64())
        .max()
        .unwrap_or(0);
    Ok((rounds, longest))
}

/// Scan rate against `process_vm_readv` of the same memory, with 1 and 2 scan
/// threads, table memory and lock holds over a heap of `objects` objects where
/// one word in `every` is a pointer.
fn scanning(leaktrace: &Path, fixtures: &Path, objects: u64, every: u32) -> anyhow::Result<()> {
    step(&format!(
        "scanning and memory: {objects} tracked objects, one word in {every} a pointer"
    ));
    let hog = fixtures.join("hog");
    let hog_args = [objects.to_string(), every.to_string()];
    let hog_args: Vec<&str> = hog_args.iter().map(String::as_str).collect();
    // Table memory: resident growth once every allocation is ingested, before any
    // scan (the scanner's buffers are not the table's).
    let (rss_before, rss_table, heap) = {
        let mut f = Fixture::start(&hog, &hog_args)?;
        let t = Tracer::attach(leaktrace, f.pid(), &["--interval", "600s"])?;
        std::thread::sleep(Duration::from_millis(300));
        let before = t.rss_kib();
        f.go()?;
        let heap = f.wait_for("HEAP")?;
        f.wait_for("READY")?;
        let mut last = 0;
        let mut stable = 0;
        while stable < 5 {
            std::thread::sleep(Duration::from_millis(200));
            let now = t.rss_kib();
            stable = if now == last { stable + 1 } else { 0 };
            last = now;
        }
        t.stop();
        f.finish();
        (before, last, heap)
    };
    let mhz = nominal_mhz();
    println!("  heap: {heap}");
    println!(
        "  {:<8} {:>22} {:>22} {:>18} {:>20}",
        "threads", "scan MB/s", "process_vm_readv MB/s", "scan/readv", "cycles/word"
    );
    let mut holds = Vec::new();
    for threads in [1, 2] {
        let (rounds, longest) = scan_rounds(leaktrace, &hog, &hog_args, objects, threads)?;
        let cycles = |r: &(f64, f64, Value)| {
            let words = r.2["bytes_read"].as_f64().unwrap_or(0.0) / 8.0;
            let secs = r.2["duration_ms"].as_f64().unwrap_or(0.0) / 1e3;
            mhz.map_or(f64::NAN, |mhz| secs * mhz * 1e6 / words)
        };
        println!(
            "  {:<8} {:>22} {:>22} {:>18} {:>20}",
            threads,
            show(rounds.iter().map(|r| r.0).collect(), 0),
            show(rounds.iter().map(|r| r.1).collect(), 0),
            show(rounds.iter().map(|r| r.0 / r.1).collect(), 2),
            show(rounds.iter().map(cycles).collect(), 1),
        );
        let us = |k: &str| {
            rounds
                .iter()
                .map(|r| r.2[k].as_f64().unwrap_or(0.0))
                .collect()
        };
        holds.push((
            threads,
            us("snapshot_lock_us"),
            us("apply_lock_us"),
            longest,
        ));
    }
    println!(
        "  (medians (min-max) of {SCAN_ROUNDS} scans, each paired with a process_vm_readv of every writable mapping of the target right after it; a scan's time is its whole duration: snapshot, index, read, walk, mark and sweep; cycles/word: wall time x {} MHz nominal / words read: this VM has no cycle counters)",
        mhz.map_or("?".to_owned(), |m| format!("{m:.0}"))
    );
    let per_object = (rss_table.saturating_sub(rss_before) * 1024) as f64 / objects as f64;
    println!(
        "  {:<28} {:>10.1} bytes/object (resident memory growth over {objects} objects)",
        "table memory", per_object
    );
    println!(
        "  {:<28} {:>10.1} MiB resident at {objects} objects (anonymous)",
        "leaktrace memory",
        rss_table as f64 / 1024.0
    );
    println!(
        "  (resident memory before, with the eBPF maps set up: {:.1} MiB)",
        rss_before as f64 / 1024.0
    );
    for (threads, snapshot, apply, longest) in holds {
        println!(
            "  {:<28} snapshot {} us, apply {} us (longest per scan, median (min-max)); longest hold of the run {longest} us",
            format!("table lock, {threads} thread(s)"),
            show(snapshot, 0),
            show(apply, 0)
        );
    }
    Ok(())
}

/// A scan must never make the ingest fall behind: a hog of `objects` objects (4
/// million: about 2 GB) with a thread churning malloc/free as fast as it can,
/// traced with a 1 s interval (default scan threads and ring buffer); the events
/// lost while full scans run back to back, from the stats records.
fn scan_under_churn(leaktrace: &Path, fixtures: &Path, objects: u64) -> anyhow::Result<()> {
    step(&format!(
        "scanning under churn: {objects} tracked objects and a thread churning malloc/free"
    ));
    let hog = fixtures.join("hog");
    let n = objects.to_string();
    let mut f = Fixture::start(&hog, &[&n, "4", "--churn"])?;
    let t = Tracer::attach(leaktrace, f.pid(), &["--interval", "1s", "--min-age", "1s"])?;
    f.go()?;
    let heap = f.wait_for("HEAP")?;
    f.wait_for("READY")?;
    let churning = Instant::now();
    let full = |r: &Value| r["type"] == "scan" && r["objects"].as_u64() >= Some(objects);
    let deadline = Instant::now() + Duration::from_secs(600);
    while t.records().iter().filter(|r| full(r)).count() < SCAN_ROUNDS {
        if Instant::now() > deadline {
            bail!("leaktrace took too long to scan");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let records = t.stop();
    let seconds = churning.elapsed().as_secs_f64();
    drop(f.child.stdin.take());
    let pairs: f64 = f
        .wait_for("CHURN")?
        .strip_prefix("CHURN ")
        .and_then(|n| n.trim().parse().ok())
        .context("unexpected CHURN line")?;
    f.finish();
    let scans: Vec<&Value> = records.iter().filter(|r| full(r)).collect();
    let ms = |k: &str| {
        scans
            .iter()
            .map(|s| s[k].as_f64().unwrap_or(0.0))
            .collect::<Vec<_>>()
    };
    let end = records
        .iter()
        .rfind(|r| r["type"] == "end")
        .context("no end record")?;
    let lost_in_stats = records
        .iter()
        .filter(|r| r["type"] == "stats")
        .filter_map(|r| r["lost_total"].as_u64())
        .max()
        .unwrap_or(0);
    println!("  heap: {heap}");
    println!(
        "  {} full scans of {:.0} MB, {} ms each (median (min-max)), while the churn ran {:.0} malloc/free pairs/s for {seconds:.0} s",
        scans.len(),
        ms("bytes_read").iter().copied().fold(0.0, f64::max) / 1e6,
        show(ms("duration_ms"), 0),
        pairs / seconds
    );
    println!(
        "  events lost: {} (end), {lost_in_stats} (highest in stats records); {} records read at {:.0}/s; longest lock hold {} us",
        end["lost_total"],
        end["records"],
        end["records_per_sec"].as_f64().unwrap_or(0.0),
        end["longest_lock_hold_us"]
    );
    Ok(())
}

/// The benchmarks, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Bench {
    /// Tracing overhead against untraced and the floor: loop, servers, start-up.
    Overhead,
    /// Kernel slab mode event rate and losses.
    Kernel,
    /// Scan rate against process_vm_readv (1 and 2 threads), table memory and
    /// lock holds at a million objects; events lost while a 2 GB heap is scanned
    /// under churn.
    Scan,
    /// Stack capture cost per allocation: none, frame pointers, CFI unwinding.
    Unwind,
    /// What one call of each kind of BPF helper the probes make costs on this
    /// machine (bpftrace programs, bpf_stats).
    Helpers,
}

pub fn run(quick: bool, only: &[Bench], against: Option<&Path>) -> anyhow::Result<()> {
    let wanted = |b: Bench| only.is_empty() || only.contains(&b);
    if !util::is_root() {
        bail!("the benchmarks load eBPF programs and need root: run `sudo -E cargo xtask bench`");
    }
    crate::setup::run()?;
    let fixtures = crate::fixtures::build()?;
    step("building leaktrace (release)");
    util::cargo(&["build", "--release", "--package", "leaktrace"], &[])?;
    let leaktrace = util::root().join("target/release/leaktrace");
    let objects = if quick { 200_000 } else { 1_000_000 };
    println!("leaktrace benchmarks (ratios are measured side by side in this run)");
    if wanted(Bench::Overhead) {
        crate::overhead::run(&leaktrace, against, &fixtures, quick)?;
    }
    if wanted(Bench::Kernel) {
        kernel(&leaktrace, &fixtures, if quick { 2 } else { 5 })?;
    }
    if wanted(Bench::Scan) {
        // Struct-like heaps (a quarter of the words are pointers), and pointer arrays.
        scanning(&leaktrace, &fixtures, objects, 4)?;
        scanning(&leaktrace, &fixtures, objects, 2)?;
        scan_under_churn(
            &leaktrace,
            &fixtures,
            if quick { 400_000 } else { 4_000_000 },
        )?;
    }
    if wanted(Bench::Unwind) {
        let pairs = if quick { 100_000 } else { 300_000 };
        unwind(&leaktrace, against, &fixtures, pairs)?;
    }
    if wanted(Bench::Helpers) {
        crate::helper_costs::run(&fixtures, if quick { 3 } else { 5 })?;
    }
    Ok(())
}

/// The allocation probe's run time per call with each way of taking stacks, at
/// 8, 16 and 32 frames: medians of several runs, side by side; with `against`,
/// also CFI unwinding with that other binary, for before/after figures.
fn unwind(
    leaktrace: &Path,
    against: Option<&Path>,
    fixtures: &Path,
    pairs: u64,
) -> anyhow::Result<()> {
    step(&format!(
        "stack capture: {pairs} malloc(16)/free pairs, bpf_stats"
    ));
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(STATS)?.trim().to_owned();
    std::fs::write(STATS, "1")?;
    let result = (|| -> anyhow::Result<()> {
        let n = pairs.to_string();
        // (label, binary, fixture, --stacks, the fixture's options). The loop
        // allocates from one call path: every call after the first reuses the
        // remembered walk, unless each call comes on another stack pointer
        // (`--vary-sp`), which times the walk itself.
        const WALK: &[&str] = &["--vary-sp"];
        let mut modes: Vec<(&str, &Path, &str, &str, &[&str])> = vec![
            ("no stack", leaktrace, "unwind-loop", "caller", &[]),
            ("fp (built with fp)", leaktrace, "unwind-loop-fp", "fp", &[]),
            (
                "dwarf walked (no fp)",
                leaktrace,
                "unwind-loop",
                "dwarf",
                WALK,
            ),
            (
                "dwarf reused (no fp)",
                leaktrace,
                "unwind-loop",
                "dwarf",
                &[],
            ),
            (
                "dwarf walked (built with fp)",
                leaktrace,
                "unwind-loop-fp",
                "dwarf",
                WALK,
            ),
        ];
        if let Some(other) = against {
            println!("  \"against\": {}", other.display());
            modes.push(("against: dwarf (no fp)", other, "unwind-loop", "dwarf", &[]));
        }
        println!(
            "  alloc_enter run time per call, ns: median [min-max] of 3 interleaved runs; frames per dwarf stack"
        );
        for depth in [8u32, 16, 32] {
            let d = depth.to_string();
            let mut line = format!("  {depth:>2} frames:");
            // Three rounds, each running every mode once: a slow minute on this
            // shared machine then weighs on every mode alike.
            let mut per_call = vec![Vec::new(); modes.len()];
            let mut frames = vec![0.0; modes.len()];
            for _ in 0..3 {
                for (m, &(_, binary, fixture, how, more)) in modes.iter().enumerate() {
                    let mut fixture_args = vec![n.as_str(), d.as_str()];
                    fixture_args.extend(more);
                    let mut f = Fixture::start(&fixtures.join(fixture), &fixture_args)?;
                    let t =
                        Tracer::attach(binary, f.pid(), &["--interval", "60s", "--stacks", how])?;
                    let start = crate::overhead::program_stats(t.child.id(), Some("alloc_enter"))?;
                    f.go()?;
                    f.wait_for("NS_PER_PAIR")?;
                    let end = crate::overhead::program_stats(t.child.id(), Some("alloc_enter"))?;
                    f.finish();
                    let records = t.stop();
                    let calls = end.1.saturating_sub(start.1).max(1);
                    per_call[m].push(end.0.saturating_sub(start.0) as f64 / calls as f64);
                    if let Some(u) = records
                        .iter()
                        .rfind(|r| r["type"] == "end")
                        .map(|e| &e["unwind"])
                        && let (Some(fr), Some(st)) = (u["frames"].as_u64(), u["stacks"].as_u64())
                    {
                        frames[m] = fr as f64 / st.max(1) as f64;
                    }
                }
            }
            let mut medians = Vec::new();
            for (m, &(label, _, _, how, _)) in modes.iter().enumerate() {
                let (median, min, max) = spread(std::mem::take(&mut per_call[m]));
                medians.push(median);
                line += &format!("  {label} {median:.0} [{min:.0}-{max:.0}]");
                if how == "dwarf" {
                    line += &format!(" ({:.1} frames)", frames[m]);
                }
            }
            let (none, fp, walked, reused) = (medians[0], medians[1], medians[2], medians[3]);
            line += &format!(
                "  | capture: fp {:.0}, dwarf walked {:.0} ns = {:.2}x fp, reused {:.0} ns",
                fp - none,
                walked - none,
                (walked - none) / (fp - none).max(1.0),
                reused - none
            );
            if let Some(&other) = medians.get(5) {
                line += &format!(
                    "; against: dwarf {:.0} ns = {:.2}x fp",
                    other - none,
                    (other - none) / (fp - none).max(1.0)
                );
            }
            println!("{line}");
        }
        println!(
            "  (capture = run time minus the no-stack run's; frame pointers stop at libc's \
             start-up code, built without them: 2 frames fewer than dwarf at each depth)"
        );
        Ok(())
    })();
    std::fs::write(STATS, before)?;
    result
}
