//! The speed and memory benchmarks. Each figure is measured side by side with its
//! baseline in the same run and printed as a ratio: these machines are shared and
//! noisy, so absolute numbers mean little and no test asserts on time.
//!
//! * tracing overhead (`overhead.rs`): a malloc/free loop and two servers, untraced,
//!   at the floor (empty programs) and traced; each program's own time; start-up;
//! * scanning: leaktrace's scan rate over a heap of a million objects, against a plain
//!   sequential read of the same process's memory (the physical limit);
//! * kernel slab mode: eventfd open/close untraced and under `leaktrace --kernel`,
//!   with the event rate sustained and the events lost;
//! * table memory: leaktrace's resident memory per tracked object at a million
//!   objects, and the longest lock holds of those scans;
//! * stack capture (`--only unwind`): the allocation probe's own run time (bpf_stats)
//!   with no stack, frame pointers and the CFI unwinder, at 8, 16 and 32 frames.

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

/// Scan rate, table memory and lock holds over a heap of `objects` objects where
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
    let mut f = Fixture::start(&hog, &hog_args)?;
    let mut t = Tracer::attach(leaktrace, f.pid(), &["--interval", "2s", "--min-age", "1s"])?;
    f.go()?;
    f.wait_for("READY")?;
    t.wait(|r| {
        r.iter()
            .filter(|x| x["type"] == "scan" && x["objects"].as_u64() == Some(objects))
            .count()
            >= 3
    })?;
    // The best of three, as the scan figure is the best of its scans.
    let mut read_mb_s = 0.0f64;
    let mut read_bytes = 0;
    for _ in 0..3 {
        let (rate, bytes) = sequential_read_mb_s(f.pid())?;
        read_mb_s = read_mb_s.max(rate);
        read_bytes = bytes;
    }
    let records = t.stop();
    f.finish();
    let scans: Vec<&Value> = records.iter().filter(|r| r["type"] == "scan").collect();
    let best = scans
        .iter()
        .filter(|s| s["objects"].as_u64() == Some(objects))
        .map(|s| {
            let bytes = s["bytes_read"].as_f64().unwrap_or(0.0);
            let ms = s["duration_ms"].as_f64().unwrap_or(f64::MAX);
            (bytes / 1e6 / (ms / 1e3), s)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .context("no scan covered every object")?;
    let (scan_mb_s, scan) = best;
    let per_object = (rss_table.saturating_sub(rss_before) * 1024) as f64 / objects as f64;
    let longest = records
        .iter()
        .filter_map(|r| r["longest_lock_hold_us"].as_u64())
        .max()
        .unwrap_or(0);
    println!("  heap: {heap}");
    println!(
        "  {:<28} {:>10.0} MB/s  ({} MB in all writable mappings)",
        "sequential read",
        read_mb_s,
        read_bytes / 1_000_000
    );
    println!(
        "  {:<28} {:>10.0} MB/s  {:.2} of the read rate ({} MB read, {:.0} ms)",
        "leaktrace scan",
        scan_mb_s,
        scan_mb_s / read_mb_s,
        scan["bytes_read"].as_u64().unwrap_or(0) / 1_000_000,
        scan["duration_ms"].as_f64().unwrap_or(0.0)
    );
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
    println!(
        "  {:<28} snapshot {} us, apply {} us; longest hold of the run {} us",
        "table lock", scan["snapshot_lock_us"], scan["apply_lock_us"], longest
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
    /// Scan rate, table memory and lock holds at a million objects.
    Scan,
    /// Stack capture cost per allocation: none, frame pointers, CFI unwinding.
    Unwind,
}

pub fn run(quick: bool, only: &[Bench]) -> anyhow::Result<()> {
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
        crate::overhead::run(&leaktrace, &fixtures, quick)?;
    }
    if wanted(Bench::Kernel) {
        kernel(&leaktrace, &fixtures, if quick { 2 } else { 5 })?;
    }
    if wanted(Bench::Scan) {
        // Struct-like heaps (a quarter of the words are pointers), and pointer arrays.
        scanning(&leaktrace, &fixtures, objects, 4)?;
        scanning(&leaktrace, &fixtures, objects, 2)?;
    }
    if wanted(Bench::Unwind) {
        unwind(&leaktrace, &fixtures, if quick { 100_000 } else { 300_000 })?;
    }
    Ok(())
}

/// (run_time_ns, run_cnt) of the program `name` among the BPF programs open in
/// process `pid` (its fds, so that other tracers on the machine do not count).
fn program_stats(pid: u32, name: &str) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(ns), Some(cnt)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "--json"])
            .output()
            .context("cannot run bpftool")?;
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if shown["name"] == name {
            total = (total.0 + ns, total.1 + cnt);
        }
    }
    Ok(total)
}

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The allocation probe's run time per call with each way of taking stacks, at
/// 8, 16 and 32 frames: medians of several runs, side by side.
fn unwind(leaktrace: &Path, fixtures: &Path, pairs: u64) -> anyhow::Result<()> {
    step(&format!(
        "stack capture: {pairs} malloc(16)/free pairs, bpf_stats"
    ));
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(STATS)?.trim().to_owned();
    std::fs::write(STATS, "1")?;
    let result = (|| -> anyhow::Result<()> {
        let n = pairs.to_string();
        // (label, fixture, --stacks)
        let modes: [(&str, &str, &str); 4] = [
            ("no stack", "unwind-loop", "caller"),
            ("fp (built with fp)", "unwind-loop-fp", "fp"),
            ("dwarf (no fp)", "unwind-loop", "dwarf"),
            ("dwarf (built with fp)", "unwind-loop-fp", "dwarf"),
        ];
        println!(
            "  alloc_enter run time per call, ns: median [min-max] of 3 runs; frames per dwarf stack"
        );
        for depth in [8u32, 16, 32] {
            let d = depth.to_string();
            let mut line = format!("  {depth:>2} frames:");
            let mut medians = Vec::new();
            for (label, fixture, how) in modes {
                let mut per_call = Vec::new();
                let mut frames = 0.0;
                for _ in 0..3 {
                    let mut f = Fixture::start(&fixtures.join(fixture), &[&n, &d])?;
                    let t = Tracer::attach(
                        leaktrace,
                        f.pid(),
                        &["--interval", "60s", "--stacks", how],
                    )?;
                    let start = program_stats(t.child.id(), "alloc_enter")?;
                    f.go()?;
                    f.wait_for("NS_PER_PAIR")?;
                    let end = program_stats(t.child.id(), "alloc_enter")?;
                    f.finish();
                    let records = t.stop();
                    let calls = end.1.saturating_sub(start.1).max(1);
                    per_call.push(end.0.saturating_sub(start.0) as f64 / calls as f64);
                    if let Some(u) = records
                        .iter()
                        .rfind(|r| r["type"] == "end")
                        .map(|e| &e["unwind"])
                        && let (Some(fr), Some(st)) = (u["frames"].as_u64(), u["stacks"].as_u64())
                    {
                        frames = fr as f64 / st.max(1) as f64;
                    }
                }
                let (median, min, max) = spread(per_call);
                medians.push(median);
                line += &format!("  {label} {median:.0} [{min:.0}-{max:.0}]");
                if how == "dwarf" {
                    line += &format!(" ({frames:.1} frames)");
                }
            }
            let (none, fp, dwarf) = (medians[0], medians[1], medians[2]);
            line += &format!(
                "  | capture: fp {:.0}, dwarf {:.0} ns = {:.2}x fp",
                fp - none,
                dwarf - none,
                (dwarf - none) / (fp - none).max(1.0)
            );
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
