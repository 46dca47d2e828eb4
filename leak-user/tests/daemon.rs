//! Daemon mode (`--comm`, `--exclude-comm`, `--max-targets`): processes that
//! leak at different rates, one started later, one excluded and one beyond the
//! cap; each is found as it starts, labelled by name in the metrics, and its
//! leaks are the ones it made.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::util::{self, serial};

/// The soak fixture under another name (the name is what `--comm` matches; a
/// unique one keeps other runs' processes out of ours).
fn named_copy(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(util::fixture("soak"), &path).unwrap();
    path
}

/// Runs it: `seconds` of work (longer where everything runs slower, so that it
/// is still running when the tracer, slowed as much, looks for it), one leak
/// every `period_ms`, `churn` allocator calls per ms in each of 4 threads.
fn start(exe: &Path, seconds: u32, period_ms: u32, churn: u32) -> Child {
    let seconds = seconds * util::slowness();
    Command::new(exe)
        .args([seconds, period_ms, churn].map(|n| n.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(mut child: Child) -> String {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    out
}

fn metrics(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// Waits until `done` holds for the records written so far; on a timeout, the
/// tracer's stderr says why.
fn wait(tracer: &mut Child, out: &Path, done: impl Fn(&[Value]) -> bool, what: &str) {
    let deadline = Instant::now() + util::patience(60);
    while !done(&util::complete_records(out)) {
        if Instant::now() > deadline || tracer.try_wait().unwrap().is_some() {
            let _ = tracer.kill();
            let mut err = String::new();
            let _ = tracer.stderr.take().unwrap().read_to_string(&mut err);
            panic!("no {what}: leaktrace said:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn attached(records: &[Value]) -> BTreeSet<u64> {
    records
        .iter()
        .filter(|r| r["type"] == "process" && r["event"] == "attach")
        .map(|r| r["pid"].as_u64().unwrap())
        .collect()
}

#[test]
fn processes_are_found_as_they_start_and_labelled() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("daemon");
    let tag = format!("ltd{}", std::process::id() % 100_000);
    let [a, b, c, d, x] = ["a", "b", "c", "d", "x"].map(|s| named_copy(&dir, &format!("{tag}{s}")));
    let out = dir.join("out.json");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut tracer = Command::new(util::leaktrace())
        .args(["--json", "--output"])
        .arg(&out)
        .args([
            "--comm",
            &format!("{tag}?"),
            "--exclude-comm",
            &format!("{tag}x"),
        ])
        .args(["--max-targets", "3", "--metrics", &port.to_string()])
        .args([
            "--interval",
            "500ms",
            "--min-age",
            "1s",
            "--no-heap-walk",
            "-v",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Started once the tracer is running (its start record is written when its
    // programs are loaded). A leaks three times as fast as B.
    wait(
        &mut tracer,
        &out,
        |r| r.iter().any(|x| x["type"] == "start"),
        "start record",
    );
    // Light churn, none under emulation: there four processes' traps alone would
    // take the guest's one host thread, and scans would come seconds apart.
    let churn = u32::from(util::slowness() == 1);
    let fa = start(&a, 6, 100, churn);
    let fb = start(&b, 6, 300, churn);
    let (pa, pb) = (u64::from(fa.id()), u64::from(fb.id()));
    wait(
        &mut tracer,
        &out,
        |r| attached(r).is_superset(&BTreeSet::from([pa, pb])),
        "the first two processes to be attached",
    );
    // Started later: C is picked up; X is excluded; D waits beyond the cap of 3
    // until A or B exits.
    let fc = start(&c, 4, 200, churn);
    let fx = start(&x, 3, 200, churn);
    let pc = u64::from(fc.id());
    wait(
        &mut tracer,
        &out,
        |r| attached(r).contains(&pc),
        "the later process to be attached",
    );
    let fd = start(&d, 9, 200, churn);
    let pd = u64::from(fd.id());
    let deadline = Instant::now() + util::patience(20);
    let exposition = loop {
        let text = metrics(port);
        let refused = text
            .lines()
            .find_map(|l| l.strip_prefix("leaktrace_targets_refused_total "))
            .map(|v| v.parse::<f64>().unwrap());
        let labelled = [pa, pb, pc]
            .iter()
            .all(|p| text.contains(&format!("leaktrace_tracked_objects{{pid=\"{p}\"")));
        if refused >= Some(1.0) && labelled {
            break text;
        }
        if Instant::now() > deadline {
            let mut seen = std::collections::BTreeMap::<String, usize>::new();
            let mut scans = Vec::new();
            for r in util::complete_records(&out) {
                let key = format!("{} {}", r["type"], r["pid"]);
                *seen.entry(key).or_default() += 1;
                if r["type"] == "scan" {
                    scans.push(format!("{}: {} ms", r["pid"], r["duration_ms"]));
                }
            }
            let _ = tracer.kill();
            let mut err = String::new();
            let _ = tracer.stderr.take().unwrap().read_to_string(&mut err);
            panic!(
                "D was never refused, or A, B, C ({pa}, {pb}, {pc}) never scanned:\n{text}\n\
                 records (type pid: count): {seen:?}\nscans: {scans:?}\nleaktrace said:\n{err}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for (pid, name) in [(pa, "a"), (pb, "b"), (pc, "c")] {
        assert!(
            exposition.contains(&format!(
                "leaktrace_tracked_objects{{pid=\"{pid}\",comm=\"{tag}{name}\""
            )),
            "{pid} labelled {tag}{name}:\n{exposition}"
        );
    }
    assert!(exposition.contains("leaktrace_targets 3\n"), "{exposition}");
    let outputs = [fa, fb, fc, fx].map(finish);
    // D gets room once the others are gone.
    wait(
        &mut tracer,
        &out,
        |r| attached(r).contains(&pd),
        "the process refused at the cap to be attached once room freed",
    );
    let out_d = finish(fd);
    wait(
        &mut tracer,
        &out,
        |r| {
            r.iter()
                .any(|x| x["type"] == "process_exit" && x["pid"] == pd)
        },
        "the last process to exit",
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let status = tracer.wait().unwrap();
    let mut stderr = String::new();
    tracer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let records = util::read_json_lines(&out);
    assert_eq!(records[0]["mode"], "daemon");
    assert_eq!(
        attached(&records),
        BTreeSet::from([pa, pb, pc, pd]),
        "X is excluded"
    );
    // Each process's leaks are its own: what stands at the end (not retracted) is
    // a block it leaked, and the faster leaker has more. (Blocks that change
    // hands while the probes are being attached to a running process can be
    // reported and then retracted; the retraction is the correction.)
    let mut found = Vec::new();
    for (pid, stdout) in [
        (pa, &outputs[0]),
        (pb, &outputs[1]),
        (pc, &outputs[2]),
        (pd, &out_d),
    ] {
        let truth: BTreeSet<u64> = util::parse_truth(stdout)
            .into_iter()
            .filter(|t| t.tag == "LEAK")
            .map(|t| t.addr)
            .collect();
        let mut standing = BTreeSet::new();
        for r in records.iter().filter(|r| r["pid"] == pid) {
            match r["type"].as_str() {
                Some("leak") => {
                    standing.insert(util::hex(&r["address"]));
                }
                Some("retraction") => {
                    standing.remove(&util::hex(&r["address"]));
                }
                _ => {}
            }
        }
        let false_ones = standing.difference(&truth).count();
        assert_eq!(false_ones, 0, "{pid}: reported blocks it did not leak");
        assert!(!standing.is_empty(), "{pid}: no leak found");
        found.push(standing.len());
    }
    assert!(found[0] > found[1], "A leaks faster than B: {found:?}");
    let ours = std::process::id().to_string();
    assert!(!stderr.contains(&format!("pid {ours}")));
}

/// The value of an unlabelled series in an exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn the_tracer_keeps_to_its_object_cap_and_cpu_share() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("daemon-caps");
    let tag = format!("ltc{}", std::process::id() % 100_000);
    let [a, b] = ["a", "b"].map(|s| named_copy(&dir, &format!("{tag}{s}")));
    let out = dir.join("out.json");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Each keeps a window of 2048 live blocks: two of them go over 3000.
    let fa = start(&a, 8, 200, 1);
    let fb = start(&b, 8, 200, 1);
    let (pa, pb) = (u64::from(fa.id()), u64::from(fb.id()));
    let mut tracer = Command::new(util::leaktrace())
        .args(["--json", "--output"])
        .arg(&out)
        .args(["--comm", &format!("{tag}?")])
        .args(["--max-objects", "3000", "--scan-cpu", "1"])
        .args(["--metrics", &port.to_string(), "--interval", "200ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait(
        &mut tracer,
        &out,
        |r| {
            attached(r).is_superset(&BTreeSet::from([pa, pb]))
                && r.iter().any(|x| x["type"] == "process_exit")
        },
        "a target let go at the object cap",
    );
    let dropped = util::complete_records(&out)
        .iter()
        .find(|x| x["type"] == "process_exit")
        .unwrap()["pid"]
        .as_u64()
        .unwrap();
    assert!(
        Path::new(&format!("/proc/{dropped}")).exists(),
        "{dropped} was let go while it still ran, not at its exit"
    );
    let deadline = Instant::now() + util::patience(30);
    let text = loop {
        let text = metrics(port);
        if sample(&text, "leaktrace_scans_throttled_total") >= 1.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "scans never throttled:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sample(&text, "leaktrace_targets_dropped_total"), 1.0);
    assert_eq!(
        sample(&text, "leaktrace_targets"),
        1.0,
        "not picked up again"
    );
    // Scans came less often than every 200 ms.
    let records = util::complete_records(&out);
    let kept = if dropped == pa { pb } else { pa };
    let scans = records
        .iter()
        .filter(|r| r["type"] == "scan" && r["pid"] == kept)
        .count();
    for f in [fa, fb] {
        finish(f);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    assert_eq!(tracer.wait().unwrap().code(), Some(130));
    let elapsed_ms = util::read_json_lines(&out)
        .iter()
        .find(|r| r["type"] == "end")
        .unwrap()["elapsed_ms"]
        .as_u64()
        .unwrap();
    assert!(
        (scans as u64) < elapsed_ms / 200,
        "{scans} scans in {elapsed_ms} ms: not throttled"
    );
}
