//! Finding leaks: the scenarios fixture's truth (direct, indirect, cycles, interior
//! pointers, roots in other threads' stacks, TLS, anonymous mappings, untracked
//! heap, reallocated, aligned and mmap-sized blocks, threaded churn) in launch mode,
//! pid mode and stop-the-world, and valgrind's agreement with that truth.

use std::process::Command;

use crate::util::{self, Fixture, Run, Tracer, launch, serial};

/// Short intervals, and possible leaks one by one (the truth lists them).
pub(crate) const FAST: &[&str] = &[
    "--interval",
    "200ms",
    "--min-age",
    "200ms",
    "--show-possible",
];

/// Every true leak found with its kind, every possible leak found as possible,
/// nothing kept reported. Objects the fixture did not make (the C runtime's) may
/// only show up as possible leaks.
pub(crate) fn assert_matches_truth(run: &Run) {
    let leaks = run.leaks();
    assert!(
        !run.truth.is_empty(),
        "the fixture printed no truth:\n{}",
        run.fixture_stdout
    );
    let mut errors = Vec::new();
    let mut cycle_direct = 0;
    for t in &run.truth {
        let got = leaks.get(&t.addr).map(|r| r["kind"].as_str().unwrap());
        let ok = match (t.tag.as_str(), t.kind.as_str()) {
            ("LEAK", "cycle") => {
                cycle_direct += usize::from(got == Some("direct"));
                matches!(got, Some("direct" | "indirect"))
            }
            ("LEAK", kind) => got == Some(kind),
            ("POSSIBLE", _) => got == Some("possible"),
            ("KEEP", _) => got.is_none(),
            _ => true,
        };
        if !ok {
            errors.push(format!(
                "{} {} {:#x} ({} bytes): reported {got:?}",
                t.tag, t.kind, t.addr, t.size
            ));
            if let Some(r) = leaks.get(&t.addr) {
                errors.push(format!("  the report: {r}"));
            }
        }
        if let Some(r) = leaks.get(&t.addr) {
            assert_eq!(r["size"].as_u64(), Some(t.size), "size of {:#x}", t.addr);
        }
    }
    for (addr, r) in &leaks {
        if !run.truth.iter().any(|t| t.addr == *addr) && r["kind"] != "possible" {
            errors.push(format!("not a leak of the fixture: {r}"));
        }
    }
    if !errors.is_empty() {
        // Which scans decided them: the record that precedes each report.
        let scans: Vec<String> = run
            .of_type("scan")
            .iter()
            .map(|r| {
                format!(
                    "seq {} new {} complete {}",
                    r["seq"], r["new_leaks"], r["complete"]
                )
            })
            .collect();
        panic!(
            "{} mismatches:\n{}\nscans: {scans:?}\nstderr:\n{}",
            errors.iter().filter(|e| !e.starts_with("  ")).count(),
            errors.join("\n"),
            run.stderr
        );
    }
    assert_eq!(
        cycle_direct, 1,
        "a leaked cycle has exactly one direct leak"
    );
    assert_eq!(run.end()["retractions"], 0, "no leak was taken back");
}

#[test]
fn scenarios_in_launch_mode() {
    util::require_root();
    let _s = serial();
    let run = launch("scenarios", &["--hold-ms", "1500"], FAST);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_matches_truth(&run);
    let direct = run
        .truth
        .iter()
        .filter(|t| t.tag == "LEAK" && t.kind == "direct")
        .count();
    assert!(direct >= 45, "the fixture leaks enough: {direct}");
}

fn attach_scenarios(args: &[&str]) -> Run {
    let mut fixture = Fixture::start("scenarios", &[], &[]);
    let mut tracer = Tracer::attach(fixture.pid(), args);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(4);
    let run = tracer.stop(&fixture.stdout.clone());
    let (status, _) = fixture.finish();
    assert!(status.success(), "the target kept running fine");
    run
}

#[test]
fn a_process_in_another_mount_namespace() {
    util::require_root();
    let _s = serial();
    // The target runs from a tmpfs only its own mount namespace has: the tracer must
    // find its binary (probes, symbols) through /proc/PID/root.
    let script = format!(
        "mount -t tmpfs leaktrace-test /mnt && cp {} /mnt/app && exec /mnt/app --wait-go",
        util::fixture("scenarios").display()
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let mut fixture = Fixture::spawn(command);
    let pid = fixture.pid();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("/mnt/app"), "the target runs /mnt/app");
    assert!(
        !std::path::Path::new("/mnt/app").exists(),
        "/mnt/app is not in the tracer's namespace"
    );
    let mut tracer = Tracer::attach(pid, FAST);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(4);
    let run = tracer.stop(&fixture.stdout.clone());
    let (status, _) = fixture.finish();
    assert!(status.success());
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_matches_truth(&run);
    let (_, leak) = run.leaks().into_iter().next().expect("leaks");
    let frame = &leak["stack"][0];
    assert_eq!(frame["module"], "/mnt/app", "{leak}");
    assert!(
        frame["function"].is_string() && frame["line"].is_u64(),
        "{leak}"
    );
}

#[test]
fn scenarios_in_pid_mode() {
    util::require_root();
    let _s = serial();
    let run = attach_scenarios(FAST);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_matches_truth(&run);
}

#[test]
fn scenarios_with_the_world_stopped() {
    util::require_root();
    let _s = serial();
    let mut args = FAST.to_vec();
    args.push("--stop-the-world");
    let run = attach_scenarios(&args);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_matches_truth(&run);
    let scans = run.of_type("scan");
    let paused: Vec<f64> = scans
        .iter()
        .filter_map(|s| s["pause_ms"].as_f64())
        .collect();
    assert!(!paused.is_empty(), "pauses are reported");
    assert!(
        scans
            .iter()
            .any(|s| s["threads_frozen"].as_u64() >= Some(2))
    );
    eprintln!("stop-the-world pauses (ms): {paused:?}");
}

/// valgrind's memcheck on the same fixture: its "definitely" and "indirectly lost"
/// must match the fixture's own truth, so the truth is not self-serving.
#[test]
fn valgrind_agrees_with_the_fixture_truth() {
    let _s = serial();
    let valgrind = which_valgrind();
    let out = Command::new(valgrind)
        .args([
            "--leak-check=full",
            "--show-leak-kinds=all",
            "--errors-for-leak-kinds=none",
        ])
        .arg(util::fixture("scenarios"))
        .args(["--hold-ms", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let truth = util::parse_truth(&stdout);
    let sum = |pred: &dyn Fn(&util::Truth) -> bool| -> (u64, u64) {
        truth
            .iter()
            .filter(|t| pred(t))
            .fold((0, 0), |(n, b), t| (n + 1, b + t.size))
    };
    let cycles = truth.iter().filter(|t| t.kind == "cycle").count() as u64;
    let cycle_leader = truth
        .iter()
        .find(|t| t.kind == "cycle")
        .map_or(0, |t| t.size);
    let (direct, direct_bytes) = sum(&|t| t.tag == "LEAK" && t.kind == "direct");
    let (indirect, indirect_bytes) =
        sum(&|t| t.tag == "LEAK" && (t.kind == "indirect" || t.kind == "cycle"));
    // valgrind reports one block of a leaked cycle as definitely lost.
    let expect_definite = (direct + cycles / 2, direct_bytes + cycle_leader);
    let expect_indirect = (indirect - cycles / 2, indirect_bytes - cycle_leader);
    let definite = valgrind_figure(&stderr, "definitely lost:");
    let indirect_got = valgrind_figure(&stderr, "indirectly lost:");
    assert_eq!(definite, expect_definite, "valgrind said:\n{stderr}");
    assert_eq!(indirect_got, expect_indirect, "valgrind said:\n{stderr}");
}

fn which_valgrind() -> &'static str {
    let ok = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "this test needs valgrind (apt-get install valgrind)");
    "valgrind"
}

/// "definitely lost: 1,049,300 bytes in 46 blocks" -> (46, 1049300)
fn valgrind_figure(text: &str, label: &str) -> (u64, u64) {
    let line = text
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("valgrind printed no {label:?}:\n{text}"));
    let rest = &line[line.find(label).unwrap() + label.len()..];
    let numbers: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|w| w.replace(',', "").parse().ok())
        .collect();
    (numbers[1], numbers[0])
}

/// A target killed while traced: its memory can no longer be read, which is no
/// evidence that its leaks were reachable. Every reported leak stays reported.
#[test]
fn a_killed_target_keeps_its_leaks() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("lifetimes", &["400"], &[]);
    let mut tracer = Tracer::attach(fixture.pid(), FAST);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_records(
        |r| r.iter().filter(|x| x["type"] == "leak").count() >= 400,
        "the 400 leaks",
    );
    fixture.child.kill().unwrap();
    let stdout = fixture.stdout.clone();
    let _ = fixture.child.wait();
    tracer.wait_records(|r| r.iter().any(|x| x["type"] == "end"), "the end record");
    let run = tracer.stop(&stdout);
    let leaks = run.leaks();
    let missing: Vec<_> = run
        .truth
        .iter()
        .filter(|t| !leaks.contains_key(&t.addr))
        .collect();
    assert!(missing.is_empty(), "not reported: {missing:?}");
    assert_eq!(run.end()["retractions"], 0, "no leak was taken back");
    assert_eq!(run.end()["leaks"]["objects"], 400);
}

/// 500 threads each leak a block and exit: stale copies of the addresses stay in
/// the dead threads' cached stacks and in reused memory. Every leak is found and
/// none is taken back.
#[test]
fn leaks_of_exited_threads_stay_leaks() {
    util::require_root();
    let _s = serial();
    // The dead threads' stacks are roots at the exit stop (the threads killed by
    // the exit itself look the same): the leaks are found by the scans while it
    // holds.
    let run = launch(
        "lifetimes",
        &["--threads", "500", "--hold-ms", "2500"],
        FAST,
    );
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_eq!(run.truth.len(), 500);
    let leaks = run.leaks();
    let missing = run
        .truth
        .iter()
        .filter(|t| leaks.get(&t.addr).map(|r| &r["kind"]) != Some(&"direct".into()))
        .count();
    assert_eq!(missing, 0, "leaks not reported as direct");
    assert_eq!(run.end()["retractions"], 0, "no leak was taken back");
}

/// valgrind's leak-check heuristics: blocks held only through the interior
/// pointers they recognise are reachable by default, possible leaks without them;
/// an interior pointer no heuristic accepts stays a possible leak either way.
#[test]
fn leak_check_heuristics_as_valgrind_applies_them() {
    util::require_root();
    let _s = serial();
    let run = launch("heuristics", &["--hold-ms", "1500"], FAST);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    let heuristic = |t: &&util::Truth| t.tag == "KEEP" && t.kind != "-";
    assert_eq!(
        run.truth.iter().filter(heuristic).count(),
        4,
        "{}",
        run.fixture_stdout
    );
    let leaks = run.leaks();
    let kind_of = |addr: u64| {
        leaks
            .get(&addr)
            .map(|r| r["kind"].as_str().unwrap().to_owned())
    };
    for t in &run.truth {
        let expected = (t.tag == "POSSIBLE").then(|| "possible".to_owned());
        assert_eq!(
            kind_of(t.addr),
            expected,
            "{} {} {:#x}",
            t.tag,
            t.kind,
            t.addr
        );
    }
    let mut args = FAST.to_vec();
    args.extend(["--leak-check-heuristics", "none"]);
    let run = launch("heuristics", &["--hold-ms", "1500"], &args);
    let leaks = run.leaks();
    for t in run.truth.iter().filter(heuristic) {
        assert_eq!(
            leaks.get(&t.addr).map(|r| r["kind"].as_str().unwrap()),
            Some("possible"),
            "without heuristics, {} {:#x}",
            t.kind,
            t.addr
        );
    }
}
