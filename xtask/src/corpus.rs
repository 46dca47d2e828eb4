//! `cargo xtask corpus`: leaktrace against real programs from Debian packages that
//! nobody on the team wrote, each with a different allocator or heap style, under a
//! bounded load on 127.0.0.1, in pid mode (attach, load, idle, SIGINT) and in launch
//! mode (`leaktrace -- CMD`), next to valgrind memcheck's verdict on the same workload.
//!
//! Every run leaves its files in `target/corpus/<program>-<mode>/` (the NDJSON, the
//! target's output, valgrind's log) and an `explain.txt`: before the target is
//! stopped, its memory is searched for every word that points into a block leaktrace
//! reported (leak or possible leak), and the offsets into the block and the mappings
//! that hold those words are summarised — the evidence for fixing the scanner.
//!
//! Not part of CI: a full run takes several minutes per program.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, Write as _},
    net::TcpStream,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::util::{self, step};

/// The programs of the corpus, in the order they run.
pub const PROGRAMS: &[&str] = &[
    "redis",
    "nginx",
    "sqlite3",
    "hunspell",
    "python3",
    "python3-malloc",
];

/// Leaktrace's options for every run: short scans so a run takes seconds.
const TRACE_OPTS: &[&str] = &["--interval", "1s", "--min-age", "2s"];

/// Ports on 127.0.0.1 (unusual ones, so a system service cannot collide).
const REDIS_PORT: u16 = 16379;
const NGINX_PORT: u16 = 18080;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Pid,
    Launch,
    Valgrind,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Pid => "pid",
            Mode::Launch => "launch",
            Mode::Valgrind => "valgrind",
        }
    }
}

/// How a program is driven.
enum Drive {
    /// A TCP server: ready when the port accepts, loaded by client commands, stopped
    /// by a signal.
    Server {
        port: u16,
        load: Vec<Vec<String>>,
        stop: i32,
    },
    /// A program reading its workload on stdin: done when `marker` appears on its
    /// stdout, stopped by closing stdin.
    Stdin {
        input: Vec<u8>,
        marker: &'static str,
    },
}

/// One program of the corpus, ready to run.
struct Program {
    name: &'static str,
    heap: &'static str,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    valgrind_args: Vec<String>,
    drive: Drive,
}

/// What one run measured.
#[derive(Default, Clone)]
struct Measure {
    direct: u64,
    indirect: u64,
    leak_bytes: u64,
    possible: u64,
    retractions: u64,
    retracted_freed: u64,
    retracted_reachable: u64,
    end_leaks: u64,
    lost: u64,
    note: String,
}

/// valgrind's leak summary.
#[derive(Default, Clone, Copy)]
struct Verdict {
    definite: (u64, u64),
    indirect: (u64, u64),
    possible: (u64, u64),
}

struct Ctx {
    leaktrace: PathBuf,
    out: PathBuf,
    quick: bool,
    explain: bool,
}

pub fn run(
    quick: bool,
    no_install: bool,
    no_valgrind: bool,
    only: &[String],
) -> anyhow::Result<()> {
    for p in only {
        if !PROGRAMS.contains(&p.as_str()) {
            bail!(
                "unknown program {p:?}; the corpus has {}",
                PROGRAMS.join(", ")
            );
        }
    }
    if !util::is_root() {
        bail!("the corpus loads eBPF programs and needs root: run `sudo -E cargo xtask corpus`");
    }
    if !no_install {
        install()?;
    }
    step("cargo build --release -p leaktrace");
    util::cargo(&["build", "--release", "-p", "leaktrace"], &[])?;
    let ctx = Ctx {
        leaktrace: util::root().join("target/release/leaktrace"),
        out: util::root().join("target/corpus"),
        quick,
        explain: true,
    };
    fs::create_dir_all(&ctx.out)?;
    let names: Vec<&str> = if only.is_empty() {
        PROGRAMS.to_vec()
    } else {
        PROGRAMS
            .iter()
            .copied()
            .filter(|p| only.iter().any(|o| o == p))
            .collect()
    };
    let mut rows = Vec::new();
    for name in names {
        let prog = program(name, &ctx)?;
        let mut verdict = (None, None);
        if !no_valgrind {
            step(&format!("{name}: valgrind"));
            match run_valgrind(&ctx, &prog) {
                Ok(v) => verdict = v,
                Err(err) => eprintln!("xtask: {name}: valgrind failed: {err:#}"),
            }
        }
        for mode in [Mode::Pid, Mode::Launch] {
            step(&format!("{name}: leaktrace, {} mode", mode.name()));
            let m = run_leaktrace(&ctx, &prog, mode).unwrap_or_else(|err| {
                eprintln!("xtask: {name} {}: {err:#}", mode.name());
                Measure {
                    note: format!("failed: {err}"),
                    ..Measure::default()
                }
            });
            rows.push((prog.name, prog.heap, mode, m, verdict));
        }
    }
    let table = table(&rows);
    println!("{table}");
    fs::write(ctx.out.join("table.md"), &table)?;
    eprintln!("xtask: table in {}", ctx.out.join("table.md").display());
    Ok(())
}

fn install() -> anyhow::Result<()> {
    let needed = [
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
        ("nginx", "nginx"),
        ("ab", "apache2-utils"),
        ("curl", "curl"),
        ("sqlite3", "sqlite3"),
        ("hunspell", "hunspell"),
        ("valgrind", "valgrind"),
        ("python3", "python3"),
    ];
    let mut missing: Vec<&str> = needed
        .iter()
        .filter(|(bin, _)| which::which(bin).is_err())
        .map(|(_, pkg)| *pkg)
        .collect();
    if !Path::new("/usr/share/hunspell/en_US.dic").exists() {
        missing.push("hunspell-en-us");
    }
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("apt-get install {}", missing.join(" ")));
    // Packaged services must not start on their default ports (policy-rc.d in
    // containers prevents it; elsewhere they are harmless: the corpus uses its own).
    util::run(Command::new("apt-get").args(["update", "-qq"]))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Finds the program's binary in the Debian path (not in a user's pyenv or venv).
fn debian_bin(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    name.to_string()
}

fn program(name: &str, ctx: &Ctx) -> anyhow::Result<Program> {
    let dir = ctx.out.join(name);
    fs::create_dir_all(&dir)?;
    let d = dir.display().to_string();
    let n = |full: u32, quick: u32| if ctx.quick { quick } else { full };
    Ok(match name {
        "redis" => {
            let port = REDIS_PORT.to_string();
            let count = n(20000, 4000).to_string();
            let bench = |tests: &str, clients: &str| {
                let mut v = s(&["redis-benchmark", "-h", "127.0.0.1", "-p", &port, "-q"]);
                v.extend(s(&[
                    "-n", &count, "-c", clients, "-r", "10000", "-t", tests,
                ]));
                v
            };
            Program {
                name: "redis",
                heap: "jemalloc (Debian's libjemalloc2)",
                cmd: s(&[
                    &debian_bin("redis-server"),
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    &d,
                ]),
                env: vec![],
                valgrind_args: s(&["--soname-synonyms=somalloc=*jemalloc*"]),
                drive: Drive::Server {
                    port: REDIS_PORT,
                    load: vec![
                        bench("set,get,incr,lpush,rpush,sadd,hset,zadd", "8"),
                        bench("lrange_100,lpop,spop", "4"),
                        s(&["redis-cli", "-p", &port, "del", "mylist"]),
                    ],
                    stop: libc::SIGTERM,
                },
            }
        }
        "nginx" => {
            let www = dir.join("www");
            fs::create_dir_all(www.join("sub"))?;
            fs::write(
                www.join("index.html"),
                "<html><body>corpus</body></html>\n".repeat(200),
            )?;
            fs::write(www.join("sub/a.txt"), "a".repeat(100_000))?;
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log;\n\
                 pid {d}/nginx.pid;\nevents {{ worker_connections 256; }}\nhttp {{\n  \
                 access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  gzip on;\n  \
                 gzip_types text/plain;\n  server {{\n    listen 127.0.0.1:{NGINX_PORT};\n    \
                 root {www};\n    location /echo {{ return 200 \"echo $uri $arg_x\\n\"; }}\n    \
                 location /sub/ {{ autoindex on; }}\n  }}\n}}\n",
                www = www.display()
            );
            let conf_path = dir.join("nginx.conf");
            fs::write(&conf_path, conf)?;
            let url = |p: &str| format!("http://127.0.0.1:{NGINX_PORT}{p}");
            let ab = |count: u32, path: &str, extra: &[&str]| {
                let mut v = s(&["ab", "-q", "-n", &count.to_string(), "-c", "8"]);
                v.extend(s(extra));
                v.push(url(path));
                v
            };
            Program {
                name: "nginx",
                heap: "glibc malloc + nginx pools",
                cmd: s(&[
                    &debian_bin("nginx"),
                    "-c",
                    &conf_path.display().to_string(),
                    "-p",
                    &d,
                    "-e",
                    &format!("{d}/error.log"),
                ]),
                env: vec![],
                valgrind_args: vec![],
                drive: Drive::Server {
                    port: NGINX_PORT,
                    load: vec![
                        ab(n(4000, 1000), "/index.html", &["-k"]),
                        ab(n(2000, 500), "/echo?x=1", &[]),
                        ab(n(1000, 300), "/missing", &[]),
                        ab(n(1000, 300), "/sub/a.txt", &["-H", "Accept-Encoding: gzip"]),
                        ab(n(500, 100), "/sub/", &[]),
                    ],
                    stop: libc::SIGQUIT,
                },
            }
        }
        "sqlite3" => {
            let db = dir.join("corpus.db");
            for suffix in ["", "-wal", "-shm"] {
                let _ = fs::remove_file(format!("{}{suffix}", db.display()));
            }
            let sql = fs::read_to_string(util::root().join("fixtures/corpus/sqlite.sql"))?;
            let sql = sql.replace("@ROWS@", &n(20000, 5000).to_string());
            Program {
                name: "sqlite3",
                heap: "sqlite's size-prefixed allocator on glibc (block+8)",
                cmd: s(&[&debian_bin("sqlite3"), &db.display().to_string()]),
                env: vec![],
                valgrind_args: vec![],
                drive: Drive::Stdin {
                    input: sql.into_bytes(),
                    marker: "corpus-done",
                },
            }
        }
        "hunspell" => {
            let dic = fs::read_to_string("/usr/share/hunspell/en_US.dic")
                .context("hunspell-en-us is not installed")?;
            let mut text = String::new();
            let words: Vec<&str> = dic
                .lines()
                .skip(1)
                .filter_map(|l| l.split('/').next())
                .filter(|w| w.len() > 3 && w.chars().all(|c| c.is_ascii_lowercase()))
                .step_by(37)
                .take(n(3000, 800) as usize)
                .collect();
            for (i, line) in words.chunks(10).enumerate() {
                text.push('^');
                for (j, w) in line.iter().enumerate() {
                    if (i + j) % 6 == 0 {
                        // A misspelling: hunspell then computes suggestions.
                        let mut b = w.as_bytes().to_vec();
                        b.swap(1, 2);
                        text.push_str(&String::from_utf8_lossy(&b));
                    } else {
                        text.push_str(w);
                    }
                    text.push(' ');
                }
                text.push('\n');
            }
            text.push_str("^zzcorpusdonezz\n");
            Program {
                name: "hunspell",
                heap: "C++ (std::string, std::vector) on glibc",
                cmd: s(&[&debian_bin("hunspell"), "-d", "en_US", "-a"]),
                env: vec![],
                valgrind_args: vec![],
                drive: Drive::Stdin {
                    input: text.into_bytes(),
                    marker: "zzcorpusdonezz",
                },
            }
        }
        "python3" | "python3-malloc" => {
            let script = util::root().join("fixtures/corpus/workload.py");
            let every_object = name == "python3-malloc";
            Program {
                name: if every_object {
                    "python3-malloc"
                } else {
                    "python3"
                },
                heap: if every_object {
                    "CPython 3.11, PYTHONMALLOC=malloc (every object a glibc block)"
                } else {
                    "CPython 3.11 (pymalloc arenas + glibc)"
                },
                cmd: s(&[
                    &debian_bin("python3"),
                    &script.display().to_string(),
                    &n(40000, 10000).to_string(),
                ]),
                env: if every_object {
                    vec![("PYTHONMALLOC".into(), "malloc".into())]
                } else {
                    vec![]
                },
                valgrind_args: vec![],
                drive: Drive::Stdin {
                    input: b"go\n".to_vec(),
                    marker: "corpus-done",
                },
            }
        }
        _ => bail!("unknown program {name}"),
    })
}

/// The run's directory, emptied.
fn run_dir(ctx: &Ctx, prog: &Program, mode: Mode) -> anyhow::Result<PathBuf> {
    let dir = ctx.out.join(format!("{}-{}", prog.name, mode.name()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn spawn(
    argv: &[String],
    env: &[(String, String)],
    dir: &Path,
    piped: bool,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if piped { Stdio::piped() } else { Stdio::null() })
        .stdout(fs::File::create(dir.join("stdout.txt"))?)
        .stderr(fs::File::create(dir.join("stderr.txt"))?);
    cmd.spawn()
        .with_context(|| format!("cannot start {argv:?}"))
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

fn file_contains(path: &Path, needle: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling a process this task started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits for a child, killing it after `timeout`.
fn reap(child: &mut Child, timeout: Duration, what: &str) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if start.elapsed() > timeout {
            eprintln!("xtask: {what} did not exit within {timeout:?}: killing it");
            let _ = child.kill();
            return child.wait().ok();
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Sends the workload: a server's client commands, or a stdin program's input (in a
/// thread, so a full pipe cannot block us). Returns the stdin to keep open.
fn load(
    prog: &Program,
    stdin: Option<ChildStdin>,
    dir: &Path,
    stdout: &Path,
) -> anyhow::Result<Option<ChildStdin>> {
    match &prog.drive {
        Drive::Server { load, .. } => {
            let log = fs::File::create(dir.join("load.txt"))?;
            for argv in load {
                let status = Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log.try_clone()?)
                    .status()
                    .with_context(|| format!("cannot run {argv:?}"))?;
                if !status.success() {
                    bail!("load {argv:?} failed: {status}");
                }
            }
            Ok(stdin)
        }
        Drive::Stdin { input, marker } => {
            let mut stdin = stdin.context("no stdin")?;
            let input = input.clone();
            let writer = thread::spawn(move || {
                let r = stdin.write_all(&input).and_then(|()| stdin.flush());
                (stdin, r)
            });
            wait_until(
                &format!("{marker} on stdout"),
                Duration::from_secs(300),
                || file_contains(stdout, marker),
            )?;
            let (stdin, r) = writer.join().expect("writer thread");
            r.context("writing the workload")?;
            Ok(Some(stdin))
        }
    }
}

fn idle_secs(ctx: &Ctx) -> u64 {
    if ctx.quick { 6 } else { 10 }
}

/// Runs the program under valgrind memcheck with the same workload.
fn run_valgrind(ctx: &Ctx, prog: &Program) -> anyhow::Result<(Option<Verdict>, Option<Verdict>)> {
    let dir = run_dir(ctx, prog, Mode::Valgrind)?;
    let log = dir.join("valgrind.log");
    let mut argv = s(&[
        "valgrind",
        "--leak-check=full",
        "--show-leak-kinds=definite,indirect,possible",
        "--errors-for-leak-kinds=none",
        "--num-callers=30",
    ]);
    argv.push(format!("--log-file={}", log.display()));
    argv.extend(prog.valgrind_args.iter().cloned());
    argv.extend(prog.cmd.iter().cloned());
    let stdin_mode = matches!(prog.drive, Drive::Stdin { .. });
    let mut child = spawn(&argv, &prog.env, &dir, stdin_mode)?;
    let stdin = child.stdin.take();
    let result = (|| {
        if let Drive::Server { port, .. } = &prog.drive {
            wait_until("the server's port", Duration::from_secs(120), || {
                port_open(*port)
            })?;
        }
        load(prog, stdin, &dir, &dir.join("stdout.txt"))
    })();
    let stdin = match result {
        Ok(stdin) => stdin,
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
    };
    // The same moment as leaktrace's verdict: loaded, then idle.
    thread::sleep(Duration::from_secs(idle_secs(ctx)));
    let idle = Command::new("vgdb")
        .args([
            format!("--pid={}", child.id()).as_str(),
            "leak_check",
            "full",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let idle = match idle {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            fs::write(dir.join("vgdb-idle.txt"), &text)?;
            parse_valgrind(&text)
        }
        Err(err) => {
            eprintln!("xtask: vgdb: {err}");
            None
        }
    };
    stop_target(prog, &mut child, stdin);
    let text = fs::read_to_string(&log).context("valgrind wrote no log")?;
    let exit = parse_valgrind(&text);
    if exit.is_none() {
        eprintln!("xtask: no leak summary at exit in {}", log.display());
    }
    Ok((idle, exit))
}

/// Stops a target: a server by its signal, a stdin program by closing its stdin;
/// then waits for it.
fn stop_target(prog: &Program, child: &mut Child, stdin: Option<ChildStdin>) {
    drop(stdin);
    if let (Ok(None), Drive::Server { stop, .. }) = (child.try_wait(), &prog.drive) {
        signal(child.id(), *stop);
    }
    reap(child, Duration::from_secs(120), prog.name);
}

/// Reads valgrind's LEAK SUMMARY: "definitely lost: 1,234 bytes in 5 blocks" at exit,
/// "possibly lost: 528 (+528) bytes in 1 (+1) blocks" from a `leak_check` monitor
/// command.
fn parse_valgrind(text: &str) -> Option<Verdict> {
    let mut v = Verdict::default();
    let mut seen = false;
    let num = |t: &str| t.replace(',', "").parse::<u64>().ok();
    for line in text.lines() {
        if line.contains("All heap blocks were freed") {
            seen = true;
        }
        for (label, slot) in [
            ("definitely lost:", &mut v.definite),
            ("indirectly lost:", &mut v.indirect),
            ("possibly lost:", &mut v.possible),
        ] {
            if let Some(rest) = line.split(label).nth(1) {
                let w: Vec<&str> = rest.split_whitespace().collect();
                let bytes = w.first().and_then(|t| num(t));
                let blocks = w
                    .iter()
                    .position(|t| *t == "in")
                    .and_then(|i| w.get(i + 1))
                    .and_then(|t| num(t));
                if let (Some(bytes), Some(blocks)) = (bytes, blocks) {
                    *slot = (blocks, bytes);
                    seen = true;
                }
            }
        }
    }
    seen.then_some(v)
}

/// Runs leaktrace against the program in one mode and measures its records.
fn run_leaktrace(ctx: &Ctx, prog: &Program, mode: Mode) -> anyhow::Result<Measure> {
    let dir = run_dir(ctx, prog, mode)?;
    let ndjson = dir.join("leaktrace.ndjson");
    let mut trace_argv = vec![ctx.leaktrace.display().to_string(), "--json".into()];
    trace_argv.extend(s(&["--output", &ndjson.display().to_string()]));
    trace_argv.extend(s(TRACE_OPTS));
    let stdin_mode = matches!(prog.drive, Drive::Stdin { .. });
    let trace_log = |name: &str| fs::File::create(dir.join(name));
    let (mut target, mut tracer, pid, stdin) = match mode {
        Mode::Pid => {
            let mut target = spawn(&prog.cmd, &prog.env, &dir, stdin_mode)?;
            let pid = target.id();
            if let Drive::Server { port, .. } = &prog.drive {
                wait_until("the server's port", Duration::from_secs(60), || {
                    port_open(*port)
                })?;
            } else {
                thread::sleep(Duration::from_millis(500));
            }
            trace_argv.extend(s(&["--pid", &pid.to_string()]));
            let tracer = Command::new(&trace_argv[0])
                .args(&trace_argv[1..])
                .stdin(Stdio::null())
                .stdout(trace_log("leaktrace.stdout")?)
                .stderr(trace_log("leaktrace.stderr")?)
                .spawn()?;
            let stdin = target.stdin.take();
            (Some(target), tracer, pid, stdin)
        }
        Mode::Launch => {
            trace_argv.push("--".into());
            trace_argv.extend(prog.cmd.iter().cloned());
            let mut tracer = Command::new(&trace_argv[0]);
            tracer
                .args(&trace_argv[1..])
                .envs(prog.env.iter().map(|(k, v)| (k, v)))
                .stdin(if stdin_mode {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(fs::File::create(dir.join("stdout.txt"))?)
                .stderr(trace_log("leaktrace.stderr")?);
            let mut tracer = tracer.spawn()?;
            let stdin = tracer.stdin.take();
            let mut pid = 0;
            wait_until("the start record", Duration::from_secs(60), || {
                pid = first_target(&ndjson).unwrap_or(0);
                pid != 0
            })?;
            if let Drive::Server { port, .. } = &prog.drive {
                wait_until("the server's port", Duration::from_secs(60), || {
                    port_open(*port)
                })?;
            }
            (None, tracer, pid, stdin)
        }
        Mode::Valgrind => unreachable!(),
    };
    let result = (|| -> anyhow::Result<Option<ChildStdin>> {
        // Attached: the first scan record says the probes and the first scan are done.
        wait_until("the first scan", Duration::from_secs(120), || {
            file_contains(&ndjson, "\"type\":\"scan\"")
        })?;
        let stdin = load(prog, stdin, &dir, &dir.join("stdout.txt"))?;
        thread::sleep(Duration::from_secs(idle_secs(ctx)));
        if ctx.explain {
            match explain(pid, &ndjson) {
                Ok(text) => fs::write(dir.join("explain.txt"), text)?,
                Err(err) => eprintln!("xtask: explain {}: {err:#}", prog.name),
            }
        }
        Ok(stdin)
    })();
    let stdin = match result {
        Ok(stdin) => stdin,
        Err(err) => {
            signal(tracer.id(), libc::SIGINT);
            reap(&mut tracer, Duration::from_secs(60), "leaktrace");
            if let Some(t) = target.as_mut() {
                let _ = t.kill();
                let _ = t.wait();
            }
            return Err(err);
        }
    };
    match mode {
        Mode::Pid => {
            signal(tracer.id(), libc::SIGINT);
            reap(&mut tracer, Duration::from_secs(120), "leaktrace");
            if let Some(t) = target.as_mut() {
                stop_target(prog, t, stdin);
            }
        }
        _ => {
            if stdin_mode {
                drop(stdin);
            } else {
                signal(tracer.id(), libc::SIGINT);
            }
            reap(&mut tracer, Duration::from_secs(180), "leaktrace");
        }
    }
    measure(&ndjson)
}

fn records(path: &Path) -> Vec<Value> {
    let Ok(f) = fs::File::open(path) else {
        return vec![];
    };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

fn first_target(ndjson: &Path) -> Option<u32> {
    let text = fs::read_to_string(ndjson).ok()?;
    let line = text.lines().find(|l| l.contains("\"type\":\"start\""))?;
    let v: Value = serde_json::from_str(line).ok()?;
    v["targets"][0]["pid"].as_u64().map(|p| p as u32)
}

fn measure(ndjson: &Path) -> anyhow::Result<Measure> {
    let mut m = Measure::default();
    let mut ended = false;
    for r in records(ndjson) {
        match r["type"].as_str() {
            Some("leak") => {
                m.leak_bytes += r["size"].as_u64().unwrap_or(0);
                if r["kind"] == "indirect" {
                    m.indirect += 1;
                } else {
                    m.direct += 1;
                }
            }
            Some("possible_leak") => m.possible += 1,
            Some("retraction") => {
                m.retractions += 1;
                if r["reason"] == "freed" {
                    m.retracted_freed += 1;
                } else {
                    m.retracted_reachable += 1;
                }
            }
            Some("end") => {
                ended = true;
                m.end_leaks = r["leaks"]["objects"].as_u64().unwrap_or(0);
                // Possible leaks are summed by stack unless --show-possible: the
                // end record counts those still standing.
                m.possible = m.possible.max(r["possible_leaks"].as_u64().unwrap_or(0));
                m.lost = r["lost_total"].as_u64().unwrap_or(0);
                let reason = r["reason"].as_str().unwrap_or("?");
                m.note = format!("end: {reason}");
            }
            _ => {}
        }
    }
    if !ended {
        m.note = "no end record".into();
    }
    Ok(m)
}

type Row<'a> = (
    &'a str,
    &'a str,
    Mode,
    Measure,
    (Option<Verdict>, Option<Verdict>),
);

fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str(
        "| program | heap | mode | leak records (direct / indirect, bytes) | possible leaks (at the end) \
         | retractions (freed / reachable) | leaks at end | valgrind, loaded and idle: definitely \
         / indirectly / possibly lost blocks | valgrind at exit | notes |\n",
    );
    t.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let vg = |v: &Option<Verdict>| match v {
        Some(v) => format!(
            "{} / {} / {} ({} B possibly)",
            v.definite.0, v.indirect.0, v.possible.0, v.possible.1
        ),
        None => "—".into(),
    };
    for (name, heap, mode, m, (idle, exit)) in rows {
        let mut note = m.note.clone();
        if m.lost > 0 {
            let _ = write!(note, ", {} events lost", m.lost);
        }
        let _ = writeln!(
            t,
            "| {name} | {heap} | {} | {} / {} ({} B) | {} | {} ({} / {}) | {} | {} | {} | {note} |",
            mode.name(),
            m.direct,
            m.indirect,
            m.leak_bytes,
            m.possible,
            m.retractions,
            m.retracted_freed,
            m.retracted_reachable,
            m.end_leaks,
            vg(idle),
            vg(exit),
        );
    }
    t
}

// ---------------------------------------------------------------------------------
// Explaining: who points into the reported blocks.

/// A block leaktrace reported and did not retract.
struct Reported {
    start: u64,
    size: u64,
    kind: String,
    allocator: String,
    caller: String,
}

struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    name: String,
}

fn maps(pid: u32) -> anyhow::Result<Vec<Mapping>> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = f.nth(3).map(str::to_string).unwrap_or_default();
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        out.push(Mapping {
            start: u64::from_str_radix(a, 16)?,
            end: u64::from_str_radix(b, 16)?,
            perms: perms.to_string(),
            name,
        });
    }
    Ok(out)
}

/// The first frame outside the C library and libstdc++, as "function (module)" or
/// "module+offset" when the module has no symbols.
fn caller(stack: &Value) -> String {
    let frames = stack.as_array().cloned().unwrap_or_default();
    let label = |f: &Value| {
        let module = f["module"].as_str().unwrap_or("?");
        let module = module.rsplit('/').next().unwrap_or(module).to_string();
        match f["function"].as_str() {
            Some(func) => format!("{func} ({module})"),
            None => format!("{module}+{}", f["offset"].as_str().unwrap_or("?")),
        }
    };
    let outside: Vec<String> = frames
        .iter()
        .filter(|f| {
            let m = f["module"].as_str().unwrap_or("");
            !m.contains("libc.so") && !m.contains("libstdc++") && !m.contains("jemalloc")
        })
        .take(2)
        .map(label)
        .collect();
    if outside.is_empty() {
        frames.first().map(label).unwrap_or_else(|| "?".into())
    } else {
        outside.join(" < ")
    }
}

fn reported(ndjson: &Path) -> Vec<Reported> {
    let mut by_addr: BTreeMap<u64, Reported> = BTreeMap::new();
    for r in records(ndjson) {
        let addr = r["address"]
            .as_str()
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
        let Some(addr) = addr else { continue };
        match r["type"].as_str() {
            Some("leak" | "possible_leak") => {
                by_addr.insert(
                    addr,
                    Reported {
                        start: addr,
                        size: r["size"].as_u64().unwrap_or(0),
                        kind: r["kind"].as_str().unwrap_or("?").to_string(),
                        allocator: r["allocator"].as_str().unwrap_or("?").to_string(),
                        caller: caller(&r["stack"]),
                    },
                );
            }
            Some("retraction") => {
                by_addr.remove(&addr);
            }
            _ => {}
        }
    }
    by_addr.into_values().collect()
}

/// One word of the target that points into a reported block.
struct Ref {
    block: usize,
    offset: u64,
    at: u64,
    mapping: usize,
    /// The word lies inside a reported block (this one or another).
    in_reported: Option<usize>,
}

/// Searches the live target's memory for words pointing into the reported blocks
/// and summarises where they are.
fn explain(pid: u32, ndjson: &Path) -> anyhow::Result<String> {
    let blocks = reported(ndjson);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pid {pid}: {} reported blocks not retracted",
        blocks.len()
    );
    if blocks.is_empty() {
        return Ok(out);
    }
    let maps = maps(pid)?;
    let mem = fs::File::open(format!("/proc/{pid}/mem"))?;
    let lo = blocks[0].start;
    let hi = blocks
        .iter()
        .map(|b| b.start + b.size.max(1))
        .max()
        .unwrap_or(lo);
    let find = |w: u64| -> Option<usize> {
        if w < lo || w >= hi {
            return None;
        }
        let i = blocks.partition_point(|b| b.start <= w).checked_sub(1)?;
        (w < blocks[i].start + blocks[i].size.max(1)).then_some(i)
    };
    let mut refs = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut scanned = 0u64;
    for (mi, m) in maps.iter().enumerate() {
        // Code and the kernel's pages cannot hold heap pointers worth explaining.
        if !m.perms.starts_with('r') || m.perms.as_bytes()[2] == b'x' || m.name.starts_with("[v") {
            continue;
        }
        let mut addr = m.start;
        while addr < m.end {
            let len = ((m.end - addr) as usize).min(buf.len());
            let Ok(n) = mem.read_at(&mut buf[..len], addr) else {
                break;
            };
            if n == 0 {
                break;
            }
            scanned += n as u64;
            for (k, chunk) in buf[..n].chunks_exact(8).enumerate() {
                let w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
                if let Some(b) = find(w) {
                    let at = addr + 8 * k as u64;
                    refs.push(Ref {
                        block: b,
                        offset: w - blocks[b].start,
                        at,
                        mapping: mi,
                        in_reported: find(at),
                    });
                }
            }
            addr += n as u64;
        }
    }
    let _ = writeln!(
        out,
        "read {} MiB of readable non-code mappings\n",
        scanned >> 20
    );
    // Per block: references from outside itself.
    let mut per_block: Vec<Vec<&Ref>> = vec![vec![]; blocks.len()];
    for r in &refs {
        if r.in_reported != Some(r.block) {
            per_block[r.block].push(r);
        }
    }
    // glibc's main heap, walked chunk by chunk: is a referring word in a block in
    // use, a free chunk, or a chunk in a tcache bin (stale contents)?
    let chunks = maps
        .iter()
        .find(|m| m.name == "[heap]")
        .map(|m| heap_chunks(&mem, m))
        .unwrap_or_default();
    let chunk_state = |at: u64| -> &'static str {
        let i = chunks.partition_point(|c| c.0 <= at);
        match i.checked_sub(1).map(|i| (i, chunks[i])) {
            // A chunk's first word (prev_size) is the previous chunk's last word.
            Some((i, (c, _, _))) if at < c + 8 => {
                i.checked_sub(1).map_or("chunk header", |p| chunks[p].2)
            }
            Some((_, (c, size, state))) if at < c + size => {
                if at < c + 16 {
                    "chunk header"
                } else {
                    state
                }
            }
            _ => "outside the chunk walk",
        }
    };
    let map_label = |r: &Ref| {
        let m = &maps[r.mapping];
        let name = if m.name.is_empty() { "[anon]" } else { &m.name };
        if m.name == "[heap]" && !chunks.is_empty() {
            format!("{name} {} ({})", m.perms, chunk_state(r.at))
        } else {
            format!("{name} {}", m.perms)
        }
    };
    let offset_class = |o: u64| match o {
        0..=4096 => format!("+{o}"),
        _ => ">+4096".to_string(),
    };
    for kind in ["direct", "indirect", "possible"] {
        let idx: Vec<usize> = (0..blocks.len())
            .filter(|&i| blocks[i].kind == kind)
            .collect();
        if idx.is_empty() {
            continue;
        }
        let bytes: u64 = idx.iter().map(|&i| blocks[i].size).sum();
        let _ = writeln!(out, "== {kind}: {} blocks, {bytes} bytes", idx.len());
        // Where the chains enter: references from memory that is not a reported
        // block. Only interior ones: the block is where a chain of possible leaks
        // starts. One at +0: the scanner did not count that word (or it is stale).
        // None: the block is held only by other reported blocks.
        let mut entries: HashMap<String, (u64, u64)> = HashMap::new();
        for &i in &idx {
            let b = &blocks[i];
            // Words in free or tcache chunks are stale: not references.
            let ext: Vec<&&Ref> = per_block[i]
                .iter()
                .filter(|r| r.in_reported.is_none())
                .filter(|r| {
                    maps[r.mapping].name != "[heap]"
                        || !matches!(
                            chunk_state(r.at),
                            "free chunk" | "free chunk (top)" | "tcache chunk"
                        )
                })
                .collect();
            let key = if ext.is_empty() {
                "held only by other reported blocks (and stale words in free chunks)".to_string()
            } else if let Some(r) = ext.iter().find(|r| r.offset == 0) {
                format!(
                    "a +0 reference from {} (size {}, {})",
                    map_label(r),
                    b.size,
                    b.caller
                )
            } else {
                let mut offs: Vec<u64> = ext.iter().map(|r| r.offset).collect();
                offs.sort_unstable();
                offs.dedup();
                offs.truncate(3);
                let offs: Vec<String> = offs.into_iter().map(offset_class).collect();
                format!(
                    "entry by interior pointer only: {} {} B, at {{{}}} from {}, {}",
                    b.allocator,
                    b.size,
                    offs.join(","),
                    map_label(ext[0]),
                    b.caller
                )
            };
            let e = entries.entry(key).or_default();
            e.0 += 1;
            e.1 += b.size;
        }
        let mut v: Vec<_> = entries.iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1.0));
        let _ = writeln!(
            out,
            "  how the chains enter (references from live memory outside reported blocks):"
        );
        for (k, (n, bytes)) in v.into_iter().take(25) {
            let _ = writeln!(out, "    {n:>7} blocks {bytes:>10} B  {k}");
        }
        // Referrer summary: (smallest offset of an outside reference, where it is).
        let mut classes: HashMap<String, (u64, u64)> = HashMap::new();
        let mut by_alloc: HashMap<String, (u64, u64)> = HashMap::new();
        let mut by_caller: HashMap<String, (u64, u64)> = HashMap::new();
        let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
        let mut size_offset: HashMap<String, (u64, u64)> = HashMap::new();
        for &i in &idx {
            let b = &blocks[i];
            let rs = &per_block[i];
            let class = if rs.is_empty() {
                "no reference from outside the block".to_string()
            } else {
                let min = rs.iter().map(|r| r.offset).min().unwrap_or(0);
                let mut wheres: Vec<String> = rs
                    .iter()
                    .map(|r| match r.in_reported {
                        Some(o) => format!("inside a reported {} block", blocks[o].kind),
                        None => map_label(r),
                    })
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                wheres.sort();
                wheres.truncate(3);
                let offs: HashSet<String> = rs.iter().map(|r| offset_class(r.offset)).collect();
                let mut offs: Vec<String> = offs.into_iter().collect();
                offs.sort();
                offs.truncate(4);
                format!(
                    "smallest offset {}, offsets {{{}}}, {} refs, in: {}",
                    offset_class(min),
                    offs.join(","),
                    if rs.len() > 3 {
                        "4+".to_string()
                    } else {
                        rs.len().to_string()
                    },
                    wheres.join("; ")
                )
            };
            for (map, key) in [
                (&mut classes, class),
                (&mut by_alloc, b.allocator.clone()),
                (&mut by_caller, b.caller.clone()),
            ] {
                let e = map.entry(key).or_default();
                e.0 += 1;
                e.1 += b.size;
            }
            let min = rs.iter().map(|r| r.offset).min();
            let key = format!(
                "size {} <- smallest offset {}",
                b.size,
                min.map(offset_class).unwrap_or_else(|| "none".into())
            );
            let e = size_offset.entry(key).or_default();
            e.0 += 1;
            e.1 += b.size;
            let bucket = b.size.next_power_of_two();
            *sizes.entry(bucket).or_default() += 1;
        }
        for (title, map) in [
            ("where the references are", &classes),
            ("allocator", &by_alloc),
            (
                "caller (first two frames outside libc, libstdc++, jemalloc)",
                &by_caller,
            ),
            ("size and smallest outside offset", &size_offset),
        ] {
            let _ = writeln!(out, "  {title}:");
            let mut v: Vec<_> = map.iter().collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1.0));
            for (k, (n, bytes)) in v.into_iter().take(15) {
                let _ = writeln!(out, "    {n:>7} blocks {bytes:>10} B  {k}");
            }
        }
        let _ = writeln!(
            out,
            "  sizes (<= power of two): {}",
            sizes
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        // A few examples in full.
        let _ = writeln!(out, "  examples:");
        for &i in idx.iter().take(8) {
            let b = &blocks[i];
            let _ = writeln!(
                out,
                "    {:#x} size {} {} from {}",
                b.start, b.size, b.allocator, b.caller
            );
            for r in per_block[i].iter().take(4) {
                let m = &maps[r.mapping];
                let _ = writeln!(
                    out,
                    "      word at {:#x} (+{:#x} in {}) -> block+{}{}",
                    r.at,
                    r.at - m.start,
                    map_label(r),
                    r.offset,
                    r.in_reported
                        .map(|o| format!(
                            " [inside reported {} block {:#x}]",
                            blocks[o].kind, blocks[o].start
                        ))
                        .unwrap_or_default()
                );
            }
        }
        let _ = writeln!(out);
    }
    Ok(out)
}

/// Walks glibc's main heap from its start: (chunk address, chunk size, state). A
/// chunk is in use when the next chunk's PREV_INUSE bit is set; in use but holding
/// the tcache key (the per-thread cache's address) in its second word, it sits in a
/// tcache bin; fastbin chunks look in use.
fn heap_chunks(mem: &fs::File, heap: &Mapping) -> Vec<(u64, u64, &'static str)> {
    let len = (heap.end - heap.start) as usize;
    let mut buf = vec![0u8; len];
    let Ok(n) = mem.read_at(&mut buf, heap.start) else {
        return vec![];
    };
    let word = |off: u64| -> Option<u64> {
        let o = off as usize;
        buf.get(o..o + 8)
            .filter(|_| o + 8 <= n)
            .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    };
    let mut raw = Vec::new();
    let mut c = 0u64;
    while let Some(size_word) = word(c + 8) {
        let size = size_word & !7;
        if size < 32 || c + size > n as u64 {
            // The top chunk (or a walk gone wrong): free space to the end.
            raw.push((c, n as u64 - c, false));
            break;
        }
        raw.push((c, size, true));
        c += size;
    }
    // glibc 2.34+ keys tcache entries with one random word: the most frequent word
    // above the user address space in the second word of chunks.
    let mut keys: HashMap<u64, usize> = HashMap::new();
    for &(c, _, _) in &raw {
        if let Some(w) = word(c + 24).filter(|w| *w >> 48 != 0) {
            *keys.entry(w).or_default() += 1;
        }
    }
    let tcache_key = keys
        .into_iter()
        .filter(|e| e.1 >= 2)
        .max_by_key(|e| e.1)
        .map(|e| e.0);
    let mut out = Vec::with_capacity(raw.len());
    for (i, &(c, size, _)) in raw.iter().enumerate() {
        let state = match raw.get(i + 1) {
            None => "free chunk (top)",
            Some(&(next, _, _)) => {
                let in_use = word(next + 8).is_some_and(|w| w & 1 == 1);
                if !in_use {
                    "free chunk"
                } else if tcache_key.is_some() && word(c + 24) == tcache_key {
                    "tcache chunk"
                } else {
                    "in-use chunk"
                }
            }
        };
        out.push((heap.start + c, size, state));
    }
    out
}
