//! CI conventions: `--error-exitcode` fails a leaking run and leaves a clean one
//! with the command's own status.

use crate::util::{self, launch, serial};

const FAST: &[&str] = &["--interval", "200ms", "--min-age", "200ms"];

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = FAST.to_vec();
    args.extend_from_slice(extra);
    args
}

#[test]
fn error_exitcode_fails_a_leaking_run_and_passes_a_clean_one() {
    util::require_root();
    let _s = serial();
    let fixture_args = ["--hold-ms", "800", "--exit-code", "3"];

    // scenarios leaks direct, indirect and possible blocks.
    let run = launch(
        "scenarios",
        &fixture_args,
        &with(&["--error-exitcode", "42"]),
    );
    assert!(!run.leaks().is_empty(), "no leaks; stderr:\n{}", run.stderr);
    assert_eq!(run.status.code(), Some(42), "stderr:\n{}", run.stderr);
    assert_eq!(run.end()["exit_status"], 3);

    // valgrind's names; only still-reachable blocks (never reported) count.
    let run = launch(
        "scenarios",
        &fixture_args,
        &with(&[
            "--error-exitcode",
            "42",
            "--errors-for-leak-kinds",
            "reachable",
        ]),
    );
    assert_eq!(run.status.code(), Some(3), "stderr:\n{}", run.stderr);
    let run = launch(
        "scenarios",
        &fixture_args,
        &with(&[
            "--error-exitcode",
            "42",
            "--errors-for-leak-kinds",
            "possible",
        ]),
    );
    assert_eq!(run.status.code(), Some(42), "stderr:\n{}", run.stderr);

    // counts frees every block it made: the command's own status passes through.
    let run = launch(
        "counts",
        &["10", "10", "--hold-ms", "0", "--exit-code", "3"],
        &with(&["--error-exitcode", "42"]),
    );
    assert!(run.leaks().is_empty(), "leaks: {:?}", run.leaks());
    assert_eq!(run.status.code(), Some(3), "stderr:\n{}", run.stderr);
    let run = launch(
        "counts",
        &["10", "10", "--hold-ms", "0"],
        &with(&["--error-exitcode", "42"]),
    );
    assert_eq!(run.status.code(), Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn errors_for_leak_kinds_rejects_an_unknown_kind() {
    let out = std::process::Command::new(util::leaktrace())
        .args(["--errors-for-leak-kinds", "lost", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "leaktrace: error: --errors-for-leak-kinds: unknown leak kind \"lost\": expected all, none, \
         or a list of direct (definite), indirect, possible, reachable\n"
    );
}
