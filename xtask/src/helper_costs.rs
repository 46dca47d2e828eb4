//! What the kernel's BPF helpers cost on this machine, one at a time: the price
//! list behind the programs' own run time.
//!
//! The same helper costs several times more on one host than on another (a
//! clock read, a user-memory read: on one AMD EPYC guest of this kind 60–90 ns
//! each, on an Intel Xeon guest 5–25 ns), and that, more than the programs' own
//! logic, decides how far leaktrace's programs stay above the floor. Each probe
//! below is a bpftrace program on the loop's `malloc` (a uprobe, as leaktrace's
//! own) whose body makes one kind of helper call; its run time per run comes
//! from bpf_stats, minus the empty program's of the same round.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{overhead::program_ids, util::step};

/// (what is measured, the bpftrace body that does it once).
const PROBES: [(&str, &str); 5] = [
    ("empty program", ""),
    ("bpf_ktime_get_ns", "$t = nsecs;"),
    ("bpf_get_current_pid_tgid", "$p = pid;"),
    (
        "bpf_probe_read_user, 8 bytes",
        "$w = *(uint64 *)reg(\"sp\");",
    ),
    (
        "bpf_probe_read_user, 256 bytes",
        "$b = buf(reg(\"sp\"), 256);",
    ),
];

/// Allocations per run.
const PAIRS: u64 = 200_000;

/// The library `pid` maps whose file name starts with `name`.
fn library(pid: u32, name: &str) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(name))
        })
        .map(str::to_owned)
}

/// Ends a child for good (bpftrace detaches on SIGINT).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// ns per run of a bpftrace program with `body` on the loop's malloc.
fn probe_ns(loop_bin: &Path, body: &str) -> anyhow::Result<f64> {
    let child = Command::new(loop_bin)
        .args(["--wait-go", &PAIRS.to_string(), "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", loop_bin.display()))?;
    let mut target = Reaped(child);
    let pid = target.0.id();
    let mut lines = BufReader::new(target.0.stdout.take().expect("piped")).lines();
    let mut wait_for = |prefix: &str| -> anyhow::Result<()> {
        for line in lines.by_ref() {
            if line?.starts_with(prefix) {
                return Ok(());
            }
        }
        bail!("the loop ended before printing {prefix}")
    };
    wait_for("WAITING")?;
    let libc_path = library(pid, "libc.so").context("the loop maps no libc")?;
    let script = format!("uprobe:{libc_path}:malloc {{ {body} }}");
    let tracer = Command::new("bpftrace")
        .args(["-p", &pid.to_string(), "-e", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start bpftrace")?;
    let tracer = Reaped(tracer);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ids = loop {
        let ids = program_ids(tracer.0.id());
        if !ids.is_empty() {
            break ids;
        }
        if Instant::now() > deadline {
            bail!("bpftrace did not load {script:?} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // bpftrace attaches right after loading.
    std::thread::sleep(Duration::from_millis(500));
    let mut stdin = target.0.stdin.take().expect("piped");
    stdin.write_all(b"go\n")?;
    wait_for("READY")?;
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("cannot run bpftool")?;
    let progs: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let ns = progs
        .iter()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .filter_map(|p| {
            let count = p["run_cnt"].as_f64()?;
            (count >= PAIRS as f64).then(|| p["run_time_ns"].as_f64().unwrap_or(0.0) / count)
        })
        .next()
        .with_context(|| format!("no program of bpftrace ran {PAIRS} times"))?;
    drop(stdin);
    Ok(ns)
}

/// Prints each helper's cost per call on this machine: medians (min–max) of
/// `rounds` interleaved rounds, each minus the same round's empty program.
pub fn run(fixtures: &Path, rounds: usize) -> anyhow::Result<()> {
    step("helper costs: one call per run of a uprobe program on malloc, from bpf_stats");
    if let Err(err) = crate::setup::ensure_packages(&[("bpftrace", "/usr/bin/bpftrace")]) {
        println!("  (skipped: cannot install bpftrace: {err:#})");
        return Ok(());
    }
    let loop_bin = fixtures.join("malloc-loop");
    let _stats = crate::overhead::BpfStats::on();
    let mut ns = vec![Vec::new(); PROBES.len()];
    for _ in 0..rounds {
        let empty = probe_ns(&loop_bin, PROBES[0].1)?;
        ns[0].push(empty);
        for (k, (what, body)) in PROBES.iter().enumerate().skip(1) {
            match probe_ns(&loop_bin, body) {
                Ok(n) => ns[k].push(n - empty),
                Err(err) => println!("  ({what}: {err:#})"),
            }
        }
    }
    for (k, ((what, _), values)) in PROBES.iter().zip(ns).enumerate() {
        let per = if k == 0 { "per run" } else { "per call" };
        if !values.is_empty() {
            println!(
                "  {what:<32} {} {per}",
                crate::overhead::Spread::of(&values).show("ns")
            );
        }
    }
    println!(
        "  (the empty program's figure includes bpf_stats' own clock reads; the others are \
         what one call adds to it)"
    );
    Ok(())
}
