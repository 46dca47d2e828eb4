//! Pids that are not (or no longer) processes leaktrace can trace: each gets its
//! own one-line reason, and a target that exits while leaktrace attaches to it
//! still gets a complete stream (every `start` is followed by an `end`).

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use crate::util::{self, serial};

/// `leaktrace --json --output FILE --pid PID`: (success, stderr, records).
fn attach(pid: u32) -> (bool, String, Vec<serde_json::Value>) {
    let out = util::scratch("targets").join("out.json");
    let run = Command::new(util::leaktrace())
        .args(["--json", "--output"])
        .arg(&out)
        .args(["--pid", &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        run.status.success(),
        String::from_utf8_lossy(&run.stderr).into_owned(),
        util::read_json_lines(&out),
    )
}

#[test]
fn a_kernel_thread_is_refused_as_a_kernel_thread() {
    let (ok, stderr, records) = attach(2);
    assert!(!ok);
    assert_eq!(
        stderr.trim_end(),
        "leaktrace: error: process 2 (kthreadd) is a kernel thread: it has no user-space \
         allocator to trace (`--kernel` traces the kernel's own allocations)"
    );
    assert!(records.is_empty(), "{records:?}");
}

#[test]
fn a_zombie_is_refused_as_a_zombie() {
    let mut child = Command::new("true").spawn().unwrap();
    // Not reaped yet: a zombie.
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id();
    let (ok, stderr, _) = attach(pid);
    child.wait().unwrap();
    assert!(!ok);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "leaktrace: error: process {pid} (true) has exited: it is a zombie waiting for \
             its parent to reap it, with no memory left to trace"
        )
    );
}

#[test]
fn a_target_that_exits_during_attach_still_gets_an_end_record() {
    util::require_root();
    let _s = serial();
    let mut exercised = 0;
    // Alive when leaktrace checks it, gone (a zombie: this test reaps it later)
    // by the time the probes are attached; the longest lives through the attach
    // (where everything runs slower, all live longer).
    for ms in [30, 60, 100, 150, 1000] {
        let seconds = f64::from(ms * util::slowness()) / 1000.0;
        let mut target = Command::new("sleep")
            .arg(seconds.to_string())
            .spawn()
            .unwrap();
        let (_, stderr, records) = attach(target.id());
        target.wait().unwrap();
        if !records.iter().any(|r| r["type"] == "start") {
            continue; // refused before it started: nothing to end
        }
        exercised += 1;
        let types: Vec<&str> = records.iter().filter_map(|r| r["type"].as_str()).collect();
        assert_eq!(types.last(), Some(&"end"), "{types:?}; stderr: {stderr}");
        assert_eq!(records.last().unwrap()["reason"], "targets_exited");
    }
    assert!(exercised > 0, "no run got as far as its start record");
}
