//! Processes whose files were deleted or replaced on disk since they mapped them
//! (the normal state after a package upgrade): their allocator is found and hooked
//! in the file they really map, and their leaks are symbolized from it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{
    scanning::{FAST, assert_matches_truth},
    util::{self, Fixture, Run, Tracer, serial},
};

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

/// A scratch directory with copies of the `scenarios` fixture (`app`) and of libc.
fn copies() -> PathBuf {
    let dir = util::scratch("deleted");
    std::fs::copy(util::fixture("scenarios"), dir.join("app")).unwrap();
    std::fs::copy(LIBC, dir.join("libc.so.6")).unwrap();
    dir
}

/// Starts the copied app on the copied libc, then lets `change` delete or replace
/// the copies, then traces it with `--pid` while it leaks.
fn attach_after(change: impl FnOnce(&Path)) -> (Run, PathBuf) {
    let dir = copies();
    let mut command = Command::new(dir.join("app"));
    command.arg("--wait-go").env("LD_LIBRARY_PATH", &dir);
    let mut fixture = Fixture::spawn(command);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fixture.pid())).unwrap();
    let libc = dir.join("libc.so.6");
    assert!(
        maps.contains(libc.to_str().unwrap()),
        "runs on the copied libc"
    );
    change(&dir);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fixture.pid())).unwrap();
    assert!(maps.contains(" (deleted)"), "{maps}");
    let mut tracer = Tracer::attach(fixture.pid(), FAST);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(4);
    let run = tracer.stop(&fixture.stdout.clone());
    let (status, _) = fixture.finish();
    assert!(status.success(), "the target kept running fine");
    (run, dir)
}

/// The hooks record names the copied libc, and leaks name their functions in the
/// copied app.
fn assert_hooked_and_symbolized(run: &Run, dir: &Path) {
    assert!(run.ended_well(), "{}; stderr:\n{}", run.status, run.stderr);
    let hooked: Vec<&Value> = run
        .of_type("hooks")
        .iter()
        .flat_map(|h| h["objects"].as_array().into_iter().flatten())
        .collect();
    let libc = dir.join("libc.so.6");
    assert!(
        hooked.iter().any(|o| o["object"] == libc.to_str().unwrap()),
        "the deleted libc is hooked: {hooked:?}"
    );
    assert_matches_truth(run);
    let app = dir.join("app");
    let leak = run
        .leaks()
        .into_values()
        .find(|r| r["kind"] == "direct" && r["stack"][0]["function"] == "make_node")
        .unwrap_or_else(|| panic!("no direct leak in make_node: {:?}", run.leaks()));
    assert_eq!(leak["stack"][0]["module"], app.to_str().unwrap(), "{leak}");
    assert!(leak["stack"][0]["line"].is_u64(), "{leak}");
}

#[test]
fn a_process_whose_libc_and_executable_were_deleted() {
    util::require_root();
    let _s = serial();
    let (run, dir) = attach_after(|dir| {
        std::fs::remove_file(dir.join("app")).unwrap();
        std::fs::remove_file(dir.join("libc.so.6")).unwrap();
    });
    assert_hooked_and_symbolized(&run, &dir);
}

#[test]
fn a_process_whose_libc_and_executable_were_replaced() {
    util::require_root();
    let _s = serial();
    // An upgrade renames new files over the old ones: the paths now name other
    // files (here: ones without malloc, and without make_node).
    let (run, dir) = attach_after(|dir| {
        for (new, old) in [("/bin/true", "app"), ("/bin/true", "libc.so.6")] {
            let tmp = dir.join("new");
            std::fs::copy(new, &tmp).unwrap();
            std::fs::rename(&tmp, dir.join(old)).unwrap();
        }
    });
    assert_hooked_and_symbolized(&run, &dir);
}

#[test]
fn a_launched_command_whose_files_are_deleted_while_it_runs() {
    util::require_root();
    let _s = serial();
    let dir = copies();
    let d = dir.display();
    // The command (sh, then the app it execs) deletes its files once the app has
    // mapped them (deleted any earlier, the loader would pick the system's libc).
    let script = format!(
        "export LD_LIBRARY_PATH={d}; \
         (while ! grep -q {d}/libc.so.6 /proc/$$/maps 2>/dev/null; do sleep 0.02; done; \
          rm {d}/app {d}/libc.so.6) & exec {d}/app --hold-ms {hold_ms}",
        // Long enough for scans, which come slower under emulation.
        hold_ms = 1500 * util::slowness(),
    );
    let run = util::launch_command("deleted", &["sh", "-c", &script], FAST, &[]);
    assert!(!dir.join("app").exists(), "the app was deleted");
    assert_hooked_and_symbolized(&run, &dir);
}
