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
        "--xml",
        "--format",
        "--live",
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
    assert!(run.ended_well(), "{}", run.stderr);
    assert_eq!(run.end()["reason"], "signal");
    assert!(run.end()["leaks"]["objects"].as_u64().unwrap() > 0);
    assert!(std::fs::metadata(&pprof).unwrap().len() > 0);
    assert!(std::fs::metadata(&svg).unwrap().len() > 0);
}

#[test]
fn big_numbers_are_refused_naming_the_flag_and_the_limit() {
    for (flag, value, limit) in [
        ("--interval", "99999999999999999999s", "at most 365 days"),
        ("--duration", "18446744073709551615s", "at most 365 days"),
        ("--min-age", "25h", "at most 24h"),
        ("--stack-map-entries", "100000000", "at most 524288"),
        ("--stack-map-entries", "4294967295", "at most 524288"),
        ("--min-scans", "65535", "at most 1000"),
        ("--scan-threads", "257", "at most 256"),
        ("--top", "99999999999", "at most 1000000"),
    ] {
        let out = leaktrace(&["-p", "1", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert_one_line_error(&out, &format!("{flag} must be {limit}, not {value}"));
    }
    let out = leaktrace(&["--kernel", "--min-growth-window", "99999999999h"]);
    assert_one_line_error(&out, "--min-growth-window must be at most 365 days");
}

#[test]
fn kernel_mode_refuses_the_options_it_would_ignore() {
    for args in [
        &["--pprof", "p.pb.gz"][..],
        &["--flamegraph", "f.svg"],
        &["--stop-the-world"],
        &["--follow-forks"],
        &["--xml", "v.xml"],
        &["--live"],
    ] {
        let mut argv = vec!["--kernel"];
        argv.extend_from_slice(args);
        let out = leaktrace(&argv);
        assert_eq!(out.status.code(), Some(2));
        assert_one_line_error(
            &out,
            &format!("{} has no meaning in kernel mode (--kernel)", args[0]),
        );
    }
}

#[test]
fn the_live_view_is_for_running_processes() {
    let out = leaktrace(&["--live", "--", "/bin/true"]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "--live watches running processes: give --pid");
    let out = leaktrace(&["--live", "--format", "json", "--pid", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "--live draws on stdout");
    let out = leaktrace(&["--format", "xml", "--pid", "1"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn launch_mode_json_on_the_commands_stdout_is_refused() {
    let dir = util::scratch("json-stdout");
    let marker = dir.join("ran");
    let out = leaktrace(&["--json", "--", "/bin/touch", marker.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "add --output FILE");
    assert!(!marker.exists(), "the command must not run");
}

#[test]
fn leaktrace_refuses_to_trace_itself() {
    // The shell's pid becomes leaktrace's when it execs.
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg("exec \"$0\" --pid $$")
        .arg(util::leaktrace())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "is leaktrace itself");
}

#[test]
fn an_error_names_its_cause_once() {
    util::require_root();
    let _s = serial();
    // A file that is not executable: the exec fails with EACCES.
    let out = leaktrace(&["--", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
    assert_one_line_error(&out, "cannot start /etc/passwd: Permission denied");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("Permission denied").count(), 1, "{stderr}");
}
