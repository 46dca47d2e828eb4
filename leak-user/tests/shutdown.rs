//! How quickly leaktrace gets out of the way once its target has exited: the
//! caller waits for it. Detaching a hooked libc's probes one by one took ~2 s.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::util::{self, serial};

/// From the launched command's last output line (it exits right after) to
/// leaktrace's own exit.
fn time_to_exit_after_the_command(fixture_args: &[&str]) -> Duration {
    let dir = util::scratch("shutdown");
    let mut child = Command::new(util::leaktrace())
        .args(["--json", "--output"])
        .arg(dir.join("out.json"))
        .arg("--")
        .arg(util::fixture("counts"))
        .args(fixture_args)
        .args(["--hold-ms", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let done = lines
        .find(|l| l.as_ref().is_ok_and(|l| l.starts_with("DONE")))
        .expect("the command ran")
        .unwrap();
    let seen = Instant::now();
    let status = child.wait().unwrap();
    let took = seen.elapsed();
    assert!(status.success(), "{status} after {done}");
    let records = util::read_json_lines(&dir.join("out.json"));
    assert_eq!(records.last().unwrap()["type"], "end", "{records:?}");
    took
}

#[test]
fn leaktrace_exits_promptly_after_its_command() {
    util::require_root();
    let _s = serial();
    for _ in 0..3 {
        let took = time_to_exit_after_the_command(&["10", "5"]);
        // The final scan, report and exit: well under a second (the probes of a
        // hooked libc took 2 s to detach one by one).
        assert!(took < Duration::from_millis(700), "took {took:?}");
    }
}
