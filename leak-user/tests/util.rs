//! Shared helpers: run leaktrace against fixture programs and read what both say.
//!
//! Every helper panics on failure (tests assert, they do not return errors). Tests
//! that load eBPF call [`require_root`] first: without root they fail loudly.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// Integration tests share the kernel's uprobes; one eBPF-heavy test at a time
/// keeps their timing (and the benchmarks' machine) calm.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The binary under test; `LEAKTRACE_BIN` runs the tests against another build
/// (e.g. an older one, to see a new test fail before its fix).
pub fn leaktrace() -> PathBuf {
    std::env::var_os("LEAKTRACE_BIN")
        .filter(|b| !b.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_leaktrace")))
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "this test loads eBPF programs and attaches uprobes, which needs root: \
             run the tests with `sudo -E cargo xtask test`"
        );
    }
}

/// A built fixture program.
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("LEAKTRACE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fixtures"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "fixture {} is not built: run `cargo xtask fixtures` (or `cargo xtask test`)",
        path.display()
    );
    path
}

/// The source line that carries `marker` in a fixture source.
pub fn source_line(file: &str, marker: &str) -> u32 {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let index = text
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{marker} not in {}", path.display()));
    index as u32 + 1
}

/// A fresh scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One line of a fixture's ground truth: `TAG KIND ADDR SIZE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truth {
    pub tag: String,
    pub kind: String,
    pub addr: u64,
    pub size: u64,
}

pub fn parse_truth(text: &str) -> Vec<Truth> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 || !f[2].starts_with("0x") {
                return None;
            }
            Some(Truth {
                tag: f[0].into(),
                kind: f[1].into(),
                addr: u64::from_str_radix(&f[2][2..], 16).ok()?,
                size: f[3].parse().ok()?,
            })
        })
        .collect()
}

pub fn read_json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("invalid JSON line {l:?}: {e}")))
        .collect()
}

/// The complete lines a running leaktrace has written to `path` so far.
pub fn complete_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// How many times slower than natively everything runs here:
/// `LEAKTRACE_TEST_PATIENCE` (the VM suite runs under emulation), else 1.
pub fn slowness() -> u32 {
    std::env::var("LEAKTRACE_TEST_PATIENCE")
        .ok()
        .and_then(|f| f.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// A time limit of `secs` seconds, stretched [`slowness`] times.
pub fn patience(secs: u64) -> Duration {
    Duration::from_secs(secs * u64::from(slowness()))
}

/// Waits until `done` holds for the records leaktrace (`child`) has written to
/// `out`; fails if it exits first or after a minute. Returns those records.
pub fn wait_for_records(
    child: &mut Child,
    out: &Path,
    done: impl Fn(&[Value]) -> bool,
    what: &str,
) -> Vec<Value> {
    let deadline = Instant::now() + patience(60);
    loop {
        let records = complete_records(out);
        if done(&records) {
            return records;
        }
        if let Some(status) = child.try_wait().unwrap() {
            // It may have written them and exited since they were read.
            let records = complete_records(out);
            if done(&records) {
                return records;
            }
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
            panic!("leaktrace exited ({status}) before {what}: {err}");
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn hex(v: &Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a hex string: {v}"));
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// What a run produced.
pub struct Run {
    pub records: Vec<Value>,
    pub truth: Vec<Truth>,
    /// --dump-objects: live objects at the final scan.
    pub objects: Vec<Value>,
    pub status: ExitStatus,
    pub stderr: String,
    pub fixture_stdout: String,
    /// Ended by our SIGINT (its exit status is then 130, as in shells).
    pub interrupted: bool,
}

impl Run {
    pub fn of_type(&self, t: &str) -> Vec<&Value> {
        self.records.iter().filter(|r| r["type"] == t).collect()
    }

    pub fn end(&self) -> &Value {
        self.records
            .iter()
            .rfind(|r| r["type"] == "end")
            .unwrap_or_else(|| panic!("no end record; stderr:\n{}", self.stderr))
    }

    /// Reported leaks and possible leaks: address -> record.
    pub fn leaks(&self) -> BTreeMap<u64, &Value> {
        self.records
            .iter()
            .filter(|r| r["type"] == "leak" || r["type"] == "possible_leak")
            .map(|r| (hex(&r["address"]), r))
            .collect()
    }

    /// Live objects at the end: address -> size.
    pub fn live(&self) -> BTreeMap<u64, u64> {
        self.objects
            .iter()
            .map(|o| (hex(&o["address"]), o["size"].as_u64().unwrap()))
            .collect()
    }

    /// Exit status 0, or 130 if our SIGINT ended the run (a run that ended on its
    /// own before the signal exits 0).
    pub fn ended_well(&self) -> bool {
        let by_signal = self
            .records
            .iter()
            .rfind(|r| r["type"] == "end")
            .is_none_or(|end| end["reason"] == "signal");
        let expected = if self.interrupted && by_signal {
            130
        } else {
            0
        };
        self.status.code() == Some(expected)
    }

    pub fn lost_total(&self) -> u64 {
        self.end()["lost_total"].as_u64().unwrap()
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not finish within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `leaktrace ARGS -- FIXTURE FIXTURE_ARGS` (launch mode).
pub fn launch(fixture_name: &str, fixture_args: &[&str], args: &[&str]) -> Run {
    launch_with_env(fixture_name, fixture_args, args, &[])
}

pub fn launch_with_env(
    fixture_name: &str,
    fixture_args: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let program = fixture(fixture_name);
    let fixture_args = stretch_holds(fixture_args);
    let mut argv = vec![program.to_str().unwrap()];
    argv.extend(fixture_args.iter().map(String::as_str));
    launch_command(fixture_name, &argv, args, env)
}

/// Fixture arguments with each `--hold-ms N` stretched [`slowness`] times: a
/// fixture holds so that the tracer scans it meanwhile, and scans come slower
/// where everything runs slower.
fn stretch_holds(args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(args.len());
    for arg in args {
        let held = out.last().is_some_and(|a| a == "--hold-ms");
        match arg.parse::<u32>() {
            Ok(ms) if held => out.push((ms * slowness()).to_string()),
            _ => out.push((*arg).to_owned()),
        }
    }
    out
}

/// Runs `leaktrace ARGS -- ARGV` (ARGV ends up running a fixture), with `env`
/// added to leaktrace's environment.
pub fn launch_command(name: &str, argv: &[&str], args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = scratch(name);
    let out = dir.join("out.json");
    let dump = dir.join("objects.json");
    let mut cmd = Command::new(leaktrace());
    cmd.arg("--json")
        .arg("--output")
        .arg(&out)
        .arg("--dump-objects")
        .arg(&dump)
        .args(args)
        .arg("--")
        .args(argv)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out_reader =
        std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err_reader =
        std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait_timeout(&mut child, patience(120));
    let fixture_stdout = out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    Run {
        records: read_json_lines(&out),
        truth: parse_truth(&fixture_stdout),
        objects: read_json_lines(&dump),
        status,
        stderr,
        fixture_stdout,
        interrupted: false,
    }
}

/// A fixture started with --wait-go, its stdout lines arriving on a channel.
pub struct Fixture {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub stdout: String,
}

impl Fixture {
    pub fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(fixture(name));
        command
            .arg("--wait-go")
            .args(args)
            .envs(env.iter().copied());
        Self::spawn(command)
    }

    /// Runs `command`, which must end up running a fixture with `--wait-go` in
    /// its own process (`exec`).
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut f = Self {
            child,
            lines,
            stdout: String::new(),
        };
        f.wait_for("WAITING");
        f
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads lines until one starts with `prefix`; returns it.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + patience(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!("fixture did not print {prefix}; printed:\n{}", self.stdout)
            });
            self.stdout.push_str(&line);
            self.stdout.push('\n');
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    pub fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes its stdin (it exits) and waits.
    pub fn finish(mut self) -> (ExitStatus, String) {
        drop(self.child.stdin.take());
        let status = wait_timeout(&mut self.child, patience(30));
        while let Ok(line) = self.lines.try_recv() {
            self.stdout.push_str(&line);
            self.stdout.push('\n');
        }
        (status, self.stdout)
    }
}

/// A leaktrace attached to a running process.
pub struct Tracer {
    pub child: Child,
    pub out: PathBuf,
    pub dump: PathBuf,
}

impl Tracer {
    pub fn attach(pid: u32, args: &[&str]) -> Self {
        let dir = scratch("attach");
        let out = dir.join("out.json");
        let dump = dir.join("objects.json");
        let child = Command::new(leaktrace())
            .arg("--json")
            .arg("--output")
            .arg(&out)
            .arg("--dump-objects")
            .arg(&dump)
            .arg("--pid")
            .arg(pid.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut t = Self { child, out, dump };
        t.wait_records(
            |r| r.iter().any(|x| x["type"] == "hooks"),
            "the probes to be attached",
        );
        t
    }

    pub fn records(&self) -> Vec<Value> {
        read_json_lines(&self.out)
    }

    /// Waits until `done` holds for the records written so far.
    pub fn wait_records(&mut self, done: impl Fn(&[Value]) -> bool, what: &str) {
        wait_for_records(&mut self.child, &self.out, done, what);
    }

    /// Waits for `n` more scan records of `pid` than there are now.
    pub fn wait_scans(&mut self, n: usize) {
        let now = self
            .records()
            .iter()
            .filter(|r| r["type"] == "scan")
            .count();
        self.wait_records(
            |r| r.iter().filter(|x| x["type"] == "scan").count() >= now + n,
            "more scans",
        );
    }

    /// Sends SIGINT and collects the run.
    pub fn stop(mut self, fixture_stdout: &str) -> Run {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = wait_timeout(&mut self.child, patience(60));
        let mut stderr = String::new();
        let _ = std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut stderr);
        Run {
            records: read_json_lines(&self.out),
            truth: parse_truth(fixture_stdout),
            objects: read_json_lines(&self.dump),
            status,
            stderr,
            fixture_stdout: fixture_stdout.to_owned(),
            interrupted: true,
        }
    }
}

/// The frames of `record`'s stack from the first one in a module whose path ends
/// with `module` (the fixture's own code) on. Only an allocation wrapper
/// (`operator new`, `strdup`) may come before it: an unwound stack (`--stacks
/// auto`) starts in the wrapper, a frame like any other. Empty when no frame is
/// the fixture's.
pub fn frames_from_module<'a>(record: &'a Value, module: &str) -> &'a [Value] {
    let stack = record["stack"].as_array().map_or(&[][..], Vec::as_slice);
    let own = stack
        .iter()
        .position(|f| f["module"].as_str().is_some_and(|m| m.ends_with(module)))
        .unwrap_or(stack.len());
    assert!(
        stack[..own].iter().all(|f| f["function"]
            .as_str()
            .is_some_and(|n| n.starts_with("operator new") || n.contains("strdup"))),
        "only the wrapper may come before the fixture's frames: {record}"
    );
    &stack[own..]
}
