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
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    overhead::{MallocLoop, program_ids, program_stats},
    util::step,
};

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

/// bpftrace, detached (on SIGINT) and reaped when dropped.
struct Bpftrace(Child);

impl Drop for Bpftrace {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// ns per run of a bpftrace program with `body` on the loop's malloc.
fn probe_ns(loop_bin: &Path, body: &str) -> anyhow::Result<f64> {
    let mut target = MallocLoop::start(loop_bin, PAIRS, 1)?;
    let libc_path = library(target.pid(), "libc.so").context("the loop maps no libc")?;
    let script = format!("uprobe:{libc_path}:malloc {{ {body} }}");
    let tracer = Command::new("bpftrace")
        .args(["-p", &target.pid().to_string(), "-e", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start bpftrace")?;
    let tracer = Bpftrace(tracer);
    let deadline = Instant::now() + Duration::from_secs(30);
    while program_ids(tracer.0.id()).is_empty() {
        if Instant::now() > deadline {
            bail!("bpftrace did not load {script:?} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // bpftrace attaches right after loading.
    std::thread::sleep(Duration::from_millis(500));
    target.go()?;
    target.wait_for("READY")?;
    let (time, count) = program_stats(tracer.0.id(), None)?;
    if count < PAIRS {
        bail!("bpftrace's program ran {count} times, not {PAIRS}");
    }
    Ok(time as f64 / count as f64)
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
