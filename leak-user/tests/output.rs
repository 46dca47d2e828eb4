//! Where the report goes: a lost report is a failed run with one message; files are
//! opened before anything is attached and emptied only once the run starts; under
//! sudo they belong to the invoking user and no planted symlink is followed.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use crate::util::{self, Fixture, Tracer, serial};

/// `leaktrace ARGS` with stdin closed and stdout to `stdout`.
fn run(args: &[&str], stdout: Stdio, env: &[(&str, &str)]) -> Output {
    Command::new(util::leaktrace())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit status 1 and exactly one line on stderr, the error, mentioning `contains`.
fn assert_failed_once(out: &Output, contains: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("leaktrace: error: "), "{err}");
    assert!(err.contains(contains), "{err} should mention {contains:?}");
}

/// A tmpfs of 64 KiB, filled up, unmounted on drop.
struct FullDisk(PathBuf);

impl FullDisk {
    fn new() -> Self {
        let dir = util::scratch("full-disk");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs on {}", dir.display());
        let filled = std::io::Write::write_all(
            &mut File::create(dir.join("fill")).unwrap(),
            &vec![0u8; 1 << 20],
        );
        assert_eq!(
            filled.unwrap_err().raw_os_error(),
            Some(libc::ENOSPC),
            "the tmpfs is full"
        );
        Self(dir)
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_run_with_one_message() {
    util::require_root();
    let _s = serial();
    let disk = FullDisk::new();
    let out_path = disk.0.join("report.txt");
    let out_arg = out_path.to_str().unwrap();
    for json in [false, true] {
        let mut args = vec!["--output", out_arg];
        if json {
            args.push("--json");
        }
        args.extend(["--", "/bin/true"]);
        let out = run(&args, Stdio::null(), &[]);
        assert_failed_once(&out, "No space left on device");
        assert!(stderr(&out).contains(&format!("cannot write the report to {out_arg}")));
    }
}

#[test]
fn dev_full_and_eio_fail_the_run_with_one_message() {
    util::require_root();
    let _s = serial();
    // Text on stdout, NDJSON to a file, and a file that fails every write (EIO).
    let out = run(
        &["--", "/bin/true"],
        Stdio::from(File::create("/dev/full").unwrap()),
        &[],
    );
    assert_failed_once(
        &out,
        "cannot write the report to stdout: No space left on device",
    );
    let out = run(
        &["--json", "--output", "/dev/full", "--", "/bin/true"],
        Stdio::null(),
        &[],
    );
    assert_failed_once(&out, "cannot write the report to /dev/full");
    let out = run(
        &["--output", "/proc/version", "--", "/bin/true"],
        Stdio::null(),
        &[],
    );
    assert_failed_once(&out, "cannot write the report to /proc/version");
}

#[test]
fn a_closed_pipe_is_a_quiet_normal_end() {
    util::require_root();
    let _s = serial();
    let mut child = Command::new(util::leaktrace())
        .args(["--", "/bin/true"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `| head` that already left
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
}

#[test]
fn profile_paths_are_checked_before_the_command_runs() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("late-check");
    let marker = dir.join("ran");
    for flag in ["--pprof", "--flamegraph", "--output"] {
        let out = run(
            &[
                flag,
                "/no/such/dir/file",
                "--",
                "/bin/touch",
                marker.to_str().unwrap(),
            ],
            Stdio::null(),
            &[],
        );
        assert_failed_once(&out, "cannot write /no/such/dir/file: No such file");
        assert!(!marker.exists(), "{flag}: the command must not have run");
    }
}

#[test]
fn a_failed_attach_leaves_the_previous_report() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("prev");
    let prev = dir.join("prev.txt");
    std::fs::write(&prev, "the previous report\n").unwrap();
    // pid 2 is kthreadd: a kernel thread has no allocator to hook.
    let out = run(
        &["--pid", "2", "--output", prev.to_str().unwrap()],
        Stdio::null(),
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&prev).unwrap(),
        "the previous report\n"
    );
}

/// The environment sudo gives a command run by uid/gid 4242 (no such account).
const SUDO_ENV: [(&str, &str); 3] = [
    ("SUDO_UID", "4242"),
    ("SUDO_GID", "4242"),
    ("SUDO_USER", "leaktrace-test-nobody"),
];

/// A directory owned by the sudo user, as their home would be.
fn users_dir() -> PathBuf {
    let dir = util::scratch("sudo");
    std::os::unix::fs::chown(&dir, Some(4242), Some(4242)).unwrap();
    dir
}

fn owner(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

#[test]
fn under_sudo_files_belong_to_the_invoking_user() {
    util::require_root();
    let _s = serial();
    let dir = users_dir();
    let files = ["report.json", "p.pb.gz", "f.svg"].map(|f| dir.join(f));
    let [report, pprof, svg] = files.each_ref().map(|p| p.to_str().unwrap());
    let out = run(
        &[
            "--json",
            "--output",
            report,
            "--pprof",
            pprof,
            "--flamegraph",
            svg,
            "--",
            "/bin/true",
        ],
        Stdio::null(),
        &SUDO_ENV,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for f in &files {
        assert_eq!(owner(f), (4242, 4242), "{}", f.display());
        assert!(std::fs::metadata(f).unwrap().len() > 0, "{}", f.display());
    }
    assert!(
        std::fs::read_to_string(&files[0])
            .unwrap()
            .contains("\"type\":\"end\"")
    );
}

#[test]
fn under_sudo_a_planted_symlink_is_not_followed() {
    util::require_root();
    let _s = serial();
    let dir = users_dir();
    let root_dir = util::scratch("root-only");
    let secret = root_dir.join("secret");
    std::fs::write(&secret, "root's file\n").unwrap();
    for flag in ["--output", "--pprof", "--flamegraph"] {
        let link = dir.join(format!("link{flag}"));
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let out = run(
            &[flag, link.to_str().unwrap(), "--", "/bin/true"],
            Stdio::null(),
            &SUDO_ENV,
        );
        assert_failed_once(&out, "is a symbolic link");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root's file\n");
        assert_eq!(owner(&secret), (0, 0));
    }
    // A root-owned file in the user's directory: they could not overwrite it.
    let roots = dir.join("roots.txt");
    std::fs::write(&roots, "root's\n").unwrap();
    let out = run(
        &["--output", roots.to_str().unwrap(), "--", "/bin/true"],
        Stdio::null(),
        &SUDO_ENV,
    );
    assert_failed_once(&out, "Permission denied");
    assert_eq!(std::fs::read_to_string(&roots).unwrap(), "root's\n");
}

#[test]
fn signals_end_the_run_with_128_plus_the_signal() {
    util::require_root();
    let _s = serial();
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut fixture = Fixture::start("scenarios", &[], &[]);
        let mut tracer = Tracer::attach(fixture.pid(), &["--interval", "200ms"]);
        tracer.wait_scans(1);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(tracer.child.id() as i32, signal) };
        let status = tracer.child.wait().unwrap();
        fixture.go();
        fixture.finish();
        assert_eq!(status.code(), Some(code), "signal {signal}");
        let records = tracer.records();
        let end = records
            .iter()
            .rfind(|r| r["type"] == "end")
            .expect("an end");
        assert_eq!(end["reason"], "signal");
    }
}

#[test]
fn leak_contents_only_when_asked() {
    util::require_root();
    let _s = serial();
    let fast = ["--interval", "100ms", "--min-age", "100ms"];
    let run = util::launch("scenarios", &["--hold-ms", "800"], &fast);
    assert!(run.ended_well(), "{}", run.stderr);
    let leaks = run.of_type("leak");
    assert!(!leaks.is_empty());
    assert!(
        leaks.iter().all(|l| l.get("contents").is_none()),
        "private by default"
    );
    let mut args = fast.to_vec();
    args.push("--show-contents");
    let run = util::launch("scenarios", &["--hold-ms", "800"], &args);
    assert!(run.ended_well(), "{}", run.stderr);
    let leaks = run.of_type("leak");
    assert!(!leaks.is_empty());
    for l in leaks {
        let hex = l["contents"].as_str().expect("a contents field");
        let size = l["size"].as_u64().unwrap().min(32);
        assert_eq!(hex.len() as u64, 2 * size, "{l}");
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{l}");
    }
}
