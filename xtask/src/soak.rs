//! `cargo xtask soak`: the long run that unit and integration tests cannot be.
//! leaktrace traces the `soak` fixture (four threads churning the allocator at a
//! steady rate, and a slow steady leak whose every block the fixture prints) in
//! launch mode with `--json` and short intervals, for N minutes. It proves, and
//! prints as a table:
//!
//! * every leak found, none false: the reported `leak` records are exactly the
//!   fixture's `LEAK` lines, with no retraction;
//! * nothing lost: `lost_total` and `decode_errors` are 0 in the `end` record;
//! * the tracer's memory is flat after warm-up: VmRSS sampled every second, and
//!   the median of the last quarter of the run at most [`RSS_GROWTH_LIMIT`] above
//!   the median of the second quarter (the first quarter is warm-up). State kept
//!   for freed or reported objects would pile up and fail this;
//! * the table holds only what the churn holds: tracked objects minus reported
//!   leaks, compared the same way (freed objects must leave the table);
//! * a full stack map is reported, not silent: a short second phase with a tiny
//!   `--stack-map-entries` and allocations from many distinct stacks must show
//!   `lost.stack_map_full` > 0 in the periodic `stats` records and in `end`.
//!
//! Not part of the quick test loop: `cargo xtask test` runs a one-minute version.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{fixtures, util};

/// The most the tracer's VmRSS may grow from the second quarter of the run to the
/// last (medians), as a fraction.
pub const RSS_GROWTH_LIMIT: f64 = 0.10;

/// A fixture leak every this many ms.
const LEAK_PERIOD_MS: u64 = 500;
/// Allocator operations per ms per churn thread (about 4 × 5000 per second).
const RATE: u64 = 5;
/// The stack-map phase: seconds and map size.
const STACK_PHASE_SECONDS: u64 = 8;
const TINY_STACK_MAP: u32 = 16;

/// One sample of the tracer.
struct Sample {
    secs: f64,
    rss_kib: u64,
    /// From the latest `stats` record: live tracked objects and records read.
    objects: Option<u64>,
    records: Option<u64>,
    /// Leaks reported so far: they stay tracked (not freed), so `objects - leaks`
    /// is what the churn holds, and must stay flat.
    leaks: usize,
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn hex(v: &Value) -> Option<u64> {
    u64::from_str_radix(v.as_str()?.trim_start_matches("0x"), 16).ok()
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// What one traced run gave.
struct Run {
    records: Vec<Value>,
    samples: Vec<Sample>,
    /// The fixture's `LEAK` lines: addresses.
    truth: BTreeSet<u64>,
    elapsed: Duration,
}

impl Run {
    fn end(&self) -> anyhow::Result<&Value> {
        self.records
            .iter()
            .rfind(|r| r["type"] == "end")
            .context("leaktrace wrote no end record")
    }

    fn reported(&self) -> BTreeSet<u64> {
        self.records
            .iter()
            .filter(|r| r["type"] == "leak" || r["type"] == "possible_leak")
            .filter_map(|r| hex(&r["address"]))
            .collect()
    }

    fn count(&self, kind: &str) -> usize {
        self.records.iter().filter(|r| r["type"] == kind).count()
    }
}

/// Runs leaktrace on the soak fixture for `seconds`, sampling its RSS every second.
fn trace(
    name: &str,
    seconds: u64,
    tracer_args: &[&str],
    fixture_args: &[&str],
) -> anyhow::Result<Run> {
    let dir = dir();
    fs::create_dir_all(&dir)?;
    let out = dir.join(format!("{name}.ndjson"));
    let truth_file = dir.join(format!("{name}.fixture-stdout"));
    let err_file = dir.join(format!("{name}.stderr"));
    let _ = fs::remove_file(&out);
    let leaktrace = util::root().join("target/debug/leaktrace");
    let mut cmd = Command::new(&leaktrace);
    cmd.args(["--json", "--quiet", "--output"])
        .arg(&out)
        .args(tracer_args)
        .arg("--")
        .arg(fixtures::dir().join("soak"))
        .arg(seconds.to_string())
        .arg(LEAK_PERIOD_MS.to_string())
        .arg(RATE.to_string())
        .args(fixture_args)
        .args(["--hold-ms", "0"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&truth_file)?)
        .stderr(fs::File::create(&err_file)?);
    util::step(&format!("soak {name}: {cmd:?}"));
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start leaktrace")?;
    let pid = child.id();
    let deadline = started + Duration::from_secs(seconds + 120);
    let mut samples = Vec::new();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("leaktrace did not finish within {} s", seconds + 120);
        }
        if let Some(rss_kib) = vm_rss_kib(pid) {
            let so_far = records(&out);
            let stats = so_far.iter().rfind(|r| r["type"] == "stats");
            samples.push(Sample {
                secs: started.elapsed().as_secs_f64(),
                rss_kib,
                objects: stats.and_then(|s| s["objects"].as_u64()),
                records: stats.and_then(|s| s["records"].as_u64()),
                leaks: so_far.iter().filter(|r| r["type"] == "leak").count(),
            });
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let elapsed = started.elapsed();
    if !status.success() {
        bail!(
            "leaktrace failed ({status}); stderr in {}:\n{}",
            err_file.display(),
            fs::read_to_string(&err_file).unwrap_or_default()
        );
    }
    let truth = fs::read_to_string(&truth_file)?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[0] == "LEAK")
                .then(|| u64::from_str_radix(f[2].trim_start_matches("0x"), 16).ok())
                .flatten()
        })
        .collect();
    Ok(Run {
        records: records(&out),
        samples,
        truth,
        elapsed,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the soak for `minutes` and the stack-map phase; fails on any broken promise.
pub fn run(minutes: u64) -> anyhow::Result<()> {
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    if !util::is_root() {
        bail!("the soak loads eBPF programs and needs root: run `sudo -E cargo xtask soak`");
    }
    fixtures::build()?;
    util::step("cargo build leaktrace");
    util::cargo(
        &["build", "--package", "leaktrace", "--bin", "leaktrace"],
        &[],
    )?;
    let mut failures = Vec::new();

    // Phase 1: the long churn.
    let seconds = minutes * 60;
    let run = trace(
        "churn",
        seconds,
        &["--interval", "1s", "--min-age", "2s"],
        &[],
    )?;
    let end = run.end()?;
    let reported = run.reported();
    let missing = run.truth.difference(&reported).count();
    let false_leaks = reported.difference(&run.truth).count();
    let retractions = run.count("retraction");
    let lost_total = end["lost_total"].as_u64().unwrap_or(u64::MAX);
    let decode_errors = end["decode_errors"].as_u64().unwrap_or(u64::MAX);
    let n = run.samples.len();
    if n < 8 {
        bail!("only {n} RSS samples: the run was too short to judge");
    }
    let rss: Vec<u64> = run.samples.iter().map(|s| s.rss_kib).collect();
    let q2 = median(&rss[n / 4..n / 2]);
    let q4 = median(&rss[n * 3 / 4..]);
    let growth = (q4 as f64 - q2 as f64) / q2.max(1) as f64;

    println!();
    println!(
        "soak: {minutes} min, 4 churn threads at {} ops/s, one leak every {LEAK_PERIOD_MS} ms; leaktrace --interval 1s --min-age 2s",
        4 * RATE * 1000
    );
    println!(
        "{:>8} {:>10} {:>12} {:>8} {:>15} {:>12}",
        "t (s)", "VmRSS MiB", "live objects", "leaks", "objects - leaks", "records"
    );
    let step = (n / 12).max(1);
    for s in run.samples.iter().step_by(step).chain(run.samples.last()) {
        println!(
            "{:>8.0} {:>10.1} {:>12} {:>8} {:>15} {:>12}",
            s.secs,
            mib(s.rss_kib),
            s.objects.map_or("-".into(), |v| v.to_string()),
            s.leaks,
            s.objects
                .map_or("-".into(), |v| (v as i64 - s.leaks as i64).to_string()),
            s.records.map_or("-".into(), |v| v.to_string())
        );
    }
    let mut check = |what: &str, figure: String, ok: bool| {
        println!(
            "{:<44} {:>24}  {}",
            what,
            figure,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(what.to_owned());
        }
    };
    println!();
    check(
        "leaks found / fixture's leaks",
        format!("{} / {}", run.truth.len() - missing, run.truth.len()),
        missing == 0 && !run.truth.is_empty(),
    );
    check("false leaks", false_leaks.to_string(), false_leaks == 0);
    check("retractions", retractions.to_string(), retractions == 0);
    check(
        "events lost (lost_total) / undecodable",
        format!("{lost_total} / {decode_errors}"),
        lost_total == 0 && decode_errors == 0,
    );
    check(
        "records read",
        end["records"].as_u64().unwrap_or(0).to_string(),
        end["records"].as_u64().unwrap_or(0) > 0,
    );
    check(
        "VmRSS median, 2nd quarter -> last quarter",
        format!("{:.1} -> {:.1} MiB", mib(q2), mib(q4)),
        growth <= RSS_GROWTH_LIMIT,
    );
    check(
        &format!("VmRSS growth (limit {:.0}%)", RSS_GROWTH_LIMIT * 100.0),
        format!("{:+.1}%", growth * 100.0),
        growth <= RSS_GROWTH_LIMIT,
    );
    // The table itself: objects the churn holds (tracked minus reported leaks).
    let held: Vec<u64> = run
        .samples
        .iter()
        .filter_map(|s| s.objects.map(|o| o.saturating_sub(s.leaks as u64)))
        .collect();
    let h = held.len();
    let (h2, h4) = if h >= 8 {
        (median(&held[h / 4..h / 2]), median(&held[h * 3 / 4..]))
    } else {
        (0, u64::MAX)
    };
    check(
        "tracked objects - leaks, 2nd -> last quarter",
        format!("{h2} -> {h4}"),
        h4 as f64 <= h2 as f64 * (1.0 + RSS_GROWTH_LIMIT),
    );
    check(
        "VmRSS peak",
        format!("{:.1} MiB", mib(rss.iter().copied().max().unwrap_or(0))),
        true,
    );
    check(
        "run time",
        format!("{:.0} s", run.elapsed.as_secs_f64()),
        true,
    );

    // Phase 2: a stack map too small for the churn's stacks.
    let tiny = TINY_STACK_MAP.to_string();
    let stacks = trace(
        "stack-map",
        STACK_PHASE_SECONDS,
        &[
            "--interval",
            "1s",
            "--min-age",
            "2s",
            "--stack-map-entries",
            &tiny,
        ],
        &["--many-stacks"],
    )?;
    let full_in = |r: &Value| r["lost"]["stack_map_full"].as_u64().unwrap_or(0);
    let stats: Vec<u64> = stacks
        .records
        .iter()
        .filter(|r| r["type"] == "stats")
        .map(full_in)
        .collect();
    let end_full = full_in(stacks.end()?);
    let reported = stacks.reported();
    let stack_false = reported.difference(&stacks.truth).count();
    let stack_missing = stacks.truth.difference(&reported).count();
    let mut check = |what: &str, figure: String, ok: bool| {
        println!(
            "{:<44} {:>24}  {}",
            what,
            figure,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(what.to_owned());
        }
    };
    check(
        &format!("--stack-map-entries {tiny}: stats with stack_map_full > 0"),
        format!(
            "{} / {} (max {})",
            stats.iter().filter(|&&v| v > 0).count(),
            stats.len(),
            stats.iter().max().copied().unwrap_or(0)
        ),
        stats.iter().any(|&v| v > 0),
    );
    check(
        "  end record: lost.stack_map_full",
        end_full.to_string(),
        end_full > 0,
    );
    check(
        "  leaks found / fixture's leaks (no stacks)",
        format!(
            "{} / {}",
            stacks.truth.len() - stack_missing,
            stacks.truth.len()
        ),
        stack_missing == 0,
    );
    check("  false leaks", stack_false.to_string(), stack_false == 0);

    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    Ok(())
}

/// Where the soak keeps its outputs (NDJSON streams, fixture stdout, stderr).
pub fn dir() -> PathBuf {
    util::root().join("target/soak")
}
