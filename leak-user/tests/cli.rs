//! The command line: help, and one-line errors that say what to do.

use std::process::{Command, Output};

use crate::util::{self, Fixture, Tracer, serial};

fn leaktrace(args: &[&str]) -> Output {
    Command::new(util::leaktrace()).args(args).output().unwrap()
}

/// One line on stderr, starting `leaktrace: error:`, and no panic.
fn assert_one_line_error(out: &Output, contains: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("leaktrace: error: "), "{stderr}");
    assert!(
        stderr.contains(contains),
        "{stderr} should mention {contains:?}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn help_describes_every_mode() {
    let out = leaktrace(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--pid",
        "--kernel",
        "--json",
        "--interval",
        "--min-age",
        "--stop-the-world",
        "--pprof",
        "--flamegraph",
        "--suppressions",
        "--follow-forks",
    ] {
        assert!(help.contains(option), "--help mentions {option}");
    }
}

#[test]
fn bad_command_lines_say_what_to_do() {
    let out = leaktrace(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "give --pid PID, a command after --, or --kernel");
    assert_one_line_error(&leaktrace(&["-p", "1", "--interval", "soon"]), "500ms");
    assert_one_line_error(
        &leaktrace(&["-p", "1", "--ring-buffer", "3"]),
        "power of two",
    );
    assert_one_line_error(&leaktrace(&["-p", "1", "--", "ls"]), "not both");
}

#[test]
fn missing_targets_say_so() {
    assert_one_line_error(&leaktrace(&["-p", "4194000"]), "no such process: 4194000");
    assert_one_line_error(&leaktrace(&["--", "/no/such/program"]), "/no/such/program");
    assert_one_line_error(
        &leaktrace(&["--", "no-such-command-here"]),
        "command not found",
    );
}

#[test]
fn without_root_it_says_to_use_sudo() {
    util::require_root();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(util::leaktrace())
        .args(["--", "/bin/true"])
        .output()
        .expect("setpriv (util-linux) runs leaktrace as nobody");
    assert_one_line_error(&out, "run it with sudo");
}

#[test]
fn interrupt_writes_the_final_report_and_files() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("interrupt");
    let pprof = dir.join("p.pb.gz");
    let svg = dir.join("f.svg");
    let mut fixture = Fixture::start("scenarios", &[], &[]);
    let mut tracer = Tracer::attach(
        fixture.pid(),
        &[
            "--interval",
            "200ms",
            "--min-age",
            "200ms",
            "--pprof",
            pprof.to_str().unwrap(),
            "--flamegraph",
            svg.to_str().unwrap(),
        ],
    );
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(3);
    let run = tracer.stop(&fixture.stdout.clone());
    fixture.finish();
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.end()["reason"], "signal");
    assert!(run.end()["leaks"]["objects"].as_u64().unwrap() > 0);
    assert!(std::fs::metadata(&pprof).unwrap().len() > 0);
    assert!(std::fs::metadata(&svg).unwrap().len() > 0);
}
