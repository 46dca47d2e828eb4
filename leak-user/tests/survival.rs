//! The target survives its tracer: SIGKILL or SIGINT leaktrace at moments during
//! a launched command's start-up (its exec stop, the attach, its entry point) and
//! the command must run to its own end, with its own output and exit status.
//!
//! leaktrace runs under the `reaper` fixture, a child subreaper: when leaktrace
//! dies, the command it launched is reparented to the reaper, which reports how
//! it ended.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::util::{self, serial};

/// How each process under the reaper ended.
#[derive(Debug)]
struct Fates {
    tracer: u32,
    /// (pid, "EXIT"/"SIGNAL", value) for every reaped process.
    reaped: Vec<(u32, String, i32)>,
    stdout: String,
    records: Vec<serde_json::Value>,
}

impl Fates {
    fn tracer(&self) -> (&str, i32) {
        self.reaped
            .iter()
            .find(|(p, _, _)| *p == self.tracer)
            .map(|(_, how, v)| (how.as_str(), *v))
            .unwrap_or_else(|| panic!("the tracer was not reaped: {self:?}"))
    }

    fn others(&self) -> Vec<(&str, i32)> {
        self.reaped
            .iter()
            .filter(|(p, _, _)| *p != self.tracer)
            .map(|(_, how, v)| (how.as_str(), *v))
            .collect()
    }
}

/// Launches `counts` (exit status 7) under leaktrace under the reaper; once the
/// `start` record is written, waits `delay` and sends `signal` (to leaktrace's
/// process group with `group`, as a terminal's Ctrl-C would). With
/// `while_loading`, `delay` counts instead from the moment leaktrace catches
/// `signal` (its handlers are set first thing, before the eBPF programs load).
fn run(signal: i32, delay: Duration, group: bool) -> Fates {
    run_at(signal, delay, group, false)
}

fn run_at(signal: i32, delay: Duration, group: bool, while_loading: bool) -> Fates {
    let dir = util::scratch("survival");
    let out = dir.join("out.json");
    let mut cmd = Command::new(util::fixture("reaper"));
    if group {
        cmd.arg("--group");
    }
    let mut child = cmd
        .arg(util::leaktrace())
        .args(["--json", "--output"])
        .arg(&out)
        .arg("--")
        .arg(util::fixture("counts"))
        .args(["10", "5", "--hold-ms", "300", "--exit-code", "7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let tracer: u32 = first
        .strip_prefix("TRACER ")
        .unwrap_or_else(|| panic!("reaper said {first:?}"))
        .parse()
        .unwrap();
    let deadline = Instant::now() + util::patience(60);
    while while_loading && !catches(tracer, signal) {
        assert!(
            Instant::now() < deadline,
            "leaktrace never set a handler for signal {signal}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    while !while_loading
        && !util::complete_records(&out)
            .iter()
            .any(|r| r["type"] == "start")
    {
        assert!(
            Instant::now() < deadline,
            "leaktrace never wrote its start record"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(delay);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{signal}").unwrap();
    drop(stdin);
    let mut fates = Fates {
        tracer,
        reaped: Vec::new(),
        stdout: String::new(),
        records: Vec::new(),
    };
    for line in lines {
        let line = line.unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["END"] => break,
            [how @ ("EXIT" | "SIGNAL"), pid, value] => fates.reaped.push((
                pid.parse().unwrap(),
                (*how).to_owned(),
                value.parse().unwrap(),
            )),
            _ => {
                fates.stdout.push_str(&line);
                fates.stdout.push('\n');
            }
        }
    }
    child.wait().unwrap();
    fates.records = util::read_json_lines(&out);
    fates
}

/// Does `pid` catch `signal` (its SigCgt mask in /proc/PID/status)?
fn catches(pid: u32, signal: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// Moments after the `start` record (the command is held at its exec stop then,
/// while the probes are attached; later ones fall on its entry point and its run).
const MOMENTS_MS: &[u64] = &[0, 2, 5, 20, 80, 150];

#[test]
fn sigkill_of_the_tracer_during_start_up_leaves_the_command_unharmed() {
    util::require_root();
    let _s = serial();
    let mut failures = Vec::new();
    for &ms in MOMENTS_MS {
        let fates = run(libc::SIGKILL, Duration::from_millis(ms), false);
        assert_eq!(fates.tracer(), ("SIGNAL", libc::SIGKILL), "{fates:?}");
        // The command outlived leaktrace, so the reaper reaped it.
        if fates.others() != [("EXIT", 7)] || !fates.stdout.contains("DONE 10 5\n") {
            failures.push(format!(
                "killed {ms} ms after start: command {:?}, output {:?}",
                fates.others(),
                fates.stdout
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn assert_clean_interrupt(group: bool) {
    util::require_root();
    let _s = serial();
    let mut failures = Vec::new();
    for &ms in &MOMENTS_MS[..3] {
        let fates = run(libc::SIGINT, Duration::from_millis(ms), group);
        // leaktrace passes the interrupt on (or the terminal did), waits for the
        // command to end of it, and passes its status through: 128 + SIGINT. (The
        // only other process the reaper may see is the child that releases
        // leaktrace's probes after it exits: it exits 0.)
        let ends = fates.records.iter().filter(|r| r["type"] == "end").count();
        if fates.tracer() != ("EXIT", 128 + libc::SIGINT)
            || fates.others().iter().any(|o| *o != ("EXIT", 0))
            || ends != 1
        {
            failures.push(format!(
                "SIGINT {ms} ms after start: leaktrace {:?}, others {:?}, {ends} end records",
                fates.tracer(),
                fates.others()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_early_sigint_to_the_tracer_ends_the_run_cleanly() {
    assert_clean_interrupt(false);
}

#[test]
fn an_early_ctrl_c_to_the_process_group_ends_the_run_cleanly() {
    assert_clean_interrupt(true);
}

#[test]
fn a_sigint_while_leaktrace_loads_launches_nothing() {
    util::require_root();
    let _s = serial();
    // Right after its handlers are set, leaktrace is loading its eBPF programs
    // (that takes hundreds of milliseconds; under emulation, seconds).
    let fates = run_at(libc::SIGINT, Duration::from_millis(5), false, true);
    let started = fates.records.iter().any(|r| r["type"] == "start");
    assert!(!started, "nothing is started once interrupted: {fates:?}");
    assert_eq!(fates.tracer(), ("EXIT", 128 + libc::SIGINT), "{fates:?}");
    assert!(
        fates.others().iter().all(|o| *o == ("EXIT", 0)) && !fates.stdout.contains("DONE"),
        "the command never ran: {fates:?}"
    );
}
