//! What tracing costs a program, measured against the floor: the traps themselves.
//! Every figure is taken side by side in one sitting, configurations interleaved
//! round by round (this machine is shared and its speed drifts), and printed as a
//! median with its min and max.
//!
//! * the malloc/free loop (random sizes 16 B–4 KiB, a small live set, built without
//!   frame pointers), on 1 and 2 threads: untraced; the floor (leaktrace attached the
//!   same way with programs that return at once, `--empty-probes`; and tracefs
//!   uprobe events on the same sites, no BPF at all); leaktrace with
//!   and without stacks. The figure that matters is the *added* cost per pair,
//!   leaktrace's against the floor's;
//! * each program's own run time per event (kernel.bpf_stats_enabled, switched on
//!   for one extra run only: it adds its own cost; what each kind of helper call
//!   costs on this machine is `--only helpers`, [`crate::helper_costs`]);
//! * two servers from Debian packages under a bounded 127.0.0.1 load: redis
//!   (jemalloc) with redis-benchmark, nginx (glibc) with ab; requests/s untraced,
//!   floor and traced;
//! * fixed costs: `leaktrace -- /bin/true` against valgrind on the same command.

use std::{
    io::{BufRead as _, BufReader, Lines, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::util::step;

/// The allocator programs whose run time is reported.
const PROGRAMS: [&str; 3] = ["alloc_enter", "alloc_return", "free_enter"];

/// Median, min and max.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Self {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    pub(crate) fn show(self, unit: &str) -> String {
        format!(
            "{:>9.0} {unit} [{:.0}–{:.0}]",
            self.median, self.min, self.max
        )
    }
}

/// How a run is traced.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Setup {
    Untraced,
    /// leaktrace with `--empty-probes`: the same probes, programs that do nothing.
    Floor,
    /// tracefs uprobe events on the same sites (system-wide, a filter that never
    /// matches): the floor without any BPF.
    TracefsFloor,
    Leaktrace(&'static [&'static str]),
}

impl Setup {
    fn name(self) -> String {
        match self {
            Setup::Untraced => "untraced".into(),
            Setup::Floor => "floor (empty programs)".into(),
            Setup::TracefsFloor => "floor (tracefs events)".into(),
            Setup::Leaktrace([]) => "leaktrace".into(),
            Setup::Leaktrace(args) => format!("leaktrace {}", args.join(" ")),
        }
    }

    fn args(self) -> Vec<&'static str> {
        match self {
            Setup::Untraced | Setup::TracefsFloor => Vec::new(),
            Setup::Floor => vec!["--empty-probes", "--no-stacks"],
            Setup::Leaktrace(args) => args.to_vec(),
        }
    }
}

/// leaktrace attached to a pid, writing NDJSON to a file.
struct Tracer {
    child: Child,
    out: PathBuf,
}

impl Tracer {
    fn attach(leaktrace: &Path, pid: u32, args: &[&str]) -> anyhow::Result<Self> {
        let out = PathBuf::from(format!("/tmp/leaktrace-overhead-{pid}.json"));
        let _ = std::fs::remove_file(&out);
        let child = Command::new(leaktrace)
            .args(["--json", "--interval", "600s", "--output"])
            .arg(&out)
            .args(["--pid", &pid.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let mut t = Self { child, out };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !t.records().iter().any(|r| r["type"] == "hooks") {
            if let Some(status) = t.child.try_wait()? {
                bail!("leaktrace exited early: {status}");
            }
            if Instant::now() > deadline {
                bail!("leaktrace did not attach within 2 minutes");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t)
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Ends the run; the end record. Returns once the probes are gone too: the
    /// kernel takes ~120 ms per uprobe to let go of them after leaktrace exits, and
    /// a server measured meanwhile would still trap.
    fn stop(mut self) -> anyhow::Result<Value> {
        let programs = program_ids(self.child.id());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let end = self.records().into_iter().rfind(|r| r["type"] == "end");
        let _ = std::fs::remove_file(&self.out);
        wait_released(&programs);
        end.context("leaktrace wrote no end record")
    }
}

/// Traces `pid` the way `setup` says; None when leaktrace does not run.
fn trace(leaktrace: &Path, pid: u32, setup: Setup) -> anyhow::Result<Option<Tracer>> {
    match setup {
        Setup::Untraced | Setup::TracefsFloor => Ok(None),
        _ => Tracer::attach(leaktrace, pid, &setup.args()).map(Some),
    }
}

/// tracefs uprobe events on the sites of a `hooks` record, enabled while this lives.
struct TracefsEvents {
    root: PathBuf,
    names: Vec<String>,
}

const TRACEFS_GROUP: &str = "leaktrace_floor";

impl TracefsEvents {
    fn create(hooks: &Value) -> anyhow::Result<Self> {
        let root = PathBuf::from("/sys/kernel/tracing");
        let mut events = Self {
            root,
            names: Vec::new(),
        };
        let mut specs = Vec::new();
        for object in hooks["objects"].as_array().into_iter().flatten() {
            let path = object["object"].as_str().context("hooks: object")?;
            for f in object["functions"].as_array().into_iter().flatten() {
                let offset = f["file_offset"].as_str().context("hooks: file_offset")?;
                let n = specs.len();
                specs.push(format!("p:{TRACEFS_GROUP}/e{n} {path}:{offset}"));
                if f["return_probe"] == true {
                    specs.push(format!("r:{TRACEFS_GROUP}/r{n} {path}:{offset}"));
                }
            }
        }
        for spec in specs {
            let name = spec.split_whitespace().next().expect("spec")[2..].to_owned();
            append(&events.root.join("uprobe_events"), &spec)
                .with_context(|| format!("cannot add uprobe event {spec}"))?;
            let dir = events.root.join("events").join(&name);
            events.names.push(name);
            // Never true: the trap is taken, nothing is recorded.
            std::fs::write(dir.join("filter"), "common_pid == 1")?;
            std::fs::write(dir.join("enable"), "1")?;
        }
        Ok(events)
    }
}

impl Drop for TracefsEvents {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = std::fs::write(self.root.join("events").join(name).join("enable"), "0");
        }
        for name in &self.names {
            let _ = append(&self.root.join("uprobe_events"), &format!("-:{name}"));
        }
    }
}

fn append(path: &Path, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

/// The malloc/free loop fixture (`malloc-loop --wait-go PAIRS THREADS`), started
/// and waiting for its go; it holds after READY until dropped.
pub struct MallocLoop {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    stdin: Option<ChildStdin>,
}

impl MallocLoop {
    /// Starts `loop_bin` for `pairs` pairs on each of `threads` threads; returns
    /// once it waits.
    pub fn start(loop_bin: &Path, pairs: u64, threads: u32) -> anyhow::Result<Self> {
        let mut child = Command::new(loop_bin)
            .args(["--wait-go", &pairs.to_string(), &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", loop_bin.display()))?;
        let lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let stdin = child.stdin.take();
        let mut target = Self {
            child,
            lines,
            stdin,
        };
        target.wait_for("WAITING")?;
        Ok(target)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the loop run.
    pub fn go(&mut self) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("the loop was let go already")?;
        stdin.write_all(b"go\n")?;
        Ok(())
    }

    /// The next line the loop prints that starts with `prefix`.
    pub fn wait_for(&mut self, prefix: &str) -> anyhow::Result<String> {
        for line in self.lines.by_ref() {
            let line = line?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
        bail!("the loop ended before printing {prefix}")
    }
}

impl Drop for MallocLoop {
    /// Ends its hold (or lets it run, if it never got its go) and reaps it.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// One run of the loop fixture: ns per pair, the programs' own time (with
/// `stats`), and the `hooks` record leaktrace wrote (the sites, for the tracefs
/// floor, which needs `hooks`).
struct LoopRun {
    ns: f64,
    per_program: Option<[f64; 3]>,
    hooks: Option<Value>,
}

fn loop_once(
    leaktrace: &Path,
    loop_bin: &Path,
    pairs: u64,
    threads: u32,
    setup: Setup,
    stats: bool,
    hooks: Option<&Value>,
) -> anyhow::Result<LoopRun> {
    let mut target = MallocLoop::start(loop_bin, pairs, threads)?;
    let tracer = trace(leaktrace, target.pid(), setup)?;
    let _events = match (setup, hooks) {
        (Setup::TracefsFloor, Some(h)) => Some(TracefsEvents::create(h)?),
        (Setup::TracefsFloor, None) => bail!("the tracefs floor needs the sites first"),
        _ => None,
    };
    let hooks_seen = tracer
        .as_ref()
        .and_then(|t| t.records().into_iter().find(|r| r["type"] == "hooks"));
    target.go()?;
    let line = target.wait_for("NS_PER_PAIR")?;
    target.wait_for("READY")?;
    let per_program = stats.then(|| program_ns(tracer.as_ref().map(|t| t.child.id())));
    drop(target);
    if let Some(t) = tracer {
        let end = t.stop()?;
        let seen = end["counters"]["allocs"].as_u64().unwrap_or(0);
        let wanted = pairs * u64::from(threads);
        if setup != Setup::Floor && seen < wanted {
            bail!(
                "{}: saw {seen} of {wanted} allocations ({} events lost)",
                setup.name(),
                end["lost_total"]
            );
        }
    }
    let ns = line
        .strip_prefix("NS_PER_PAIR ")
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("unexpected line {line:?}"))?;
    Ok(LoopRun {
        ns,
        per_program: per_program.flatten(),
        hooks: hooks_seen,
    })
}

/// The ids of the BPF programs process `pid` holds (from its descriptors' fdinfo).
pub fn program_ids(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    fds.filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}

/// Waits (up to 30 s) until none of the programs `ids` exists any more.
fn wait_released(ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let exists = |id: &u64| {
        Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    while ids.iter().any(exists) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (run_time_ns, run_cnt) summed over the BPF programs named `name` (any name
/// with None) that process `pid` holds: its descriptors, so that other tracers on
/// the machine do not count.
pub fn program_stats(pid: u32, name: Option<&str>) -> anyhow::Result<(u64, u64)> {
    let ids = program_ids(pid);
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("cannot run bpftool")?;
    let progs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(progs
        .iter()
        .filter(|p| name.is_none_or(|n| p["name"] == n))
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .fold((0, 0), |(ns, cnt), p| {
            (
                ns + p["run_time_ns"].as_u64().unwrap_or(0),
                cnt + p["run_cnt"].as_u64().unwrap_or(0),
            )
        }))
}

/// Run time per run (ns) of each of [`PROGRAMS`] held by process `owner`, from
/// bpf_stats.
fn program_ns(owner: Option<u32>) -> Option<[f64; 3]> {
    let owner = owner?;
    let mut ns = [f64::NAN; 3];
    for (slot, name) in ns.iter_mut().zip(PROGRAMS) {
        let (time, count) = program_stats(owner, Some(name)).ok()?;
        if count > 0 {
            *slot = time as f64 / count as f64;
        }
    }
    Some(ns)
}

/// kernel.bpf_stats_enabled on for as long as this lives.
pub(crate) struct BpfStats;

impl BpfStats {
    pub(crate) fn on() -> Self {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
        Self
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    }
}

/// What the loop's traced setups are measured against: untraced and the floors.
const BASELINES: [Setup; 3] = [Setup::Untraced, Setup::Floor, Setup::TracefsFloor];

/// The traced setups, whose programs' own time is shown too: defaults, records
/// stamped with the counter and with the clock (the default picks one by the
/// clock's cost here), no stacks.
const TRACED: [Setup; 4] = [
    Setup::Leaktrace(&[]),
    Setup::Leaktrace(&["--record-order", "counter"]),
    Setup::Leaktrace(&["--record-order", "clock"]),
    Setup::Leaktrace(&["--no-stacks"]),
];

/// One row of the loop's figures: its label, the leaktrace binary and the setup.
type Row<'a> = (String, &'a Path, Setup);

/// `setups` with `leaktrace`, and with `against` (another build, for before and
/// after figures in one run) its defaults as one more row.
fn rows<'a>(
    setups: impl IntoIterator<Item = Setup>,
    leaktrace: &'a Path,
    against: Option<&'a Path>,
) -> Vec<Row<'a>> {
    let mut rows: Vec<Row> = setups
        .into_iter()
        .map(|s| (s.name(), leaktrace, s))
        .collect();
    if let Some(other) = against {
        rows.push(("against: leaktrace".into(), other, Setup::Leaktrace(&[])));
    }
    rows
}

/// The malloc/free loop on `threads` threads, `rounds` interleaved rounds.
fn loop_figures(
    leaktrace: &Path,
    against: Option<&Path>,
    fixtures: &Path,
    pairs: u64,
    threads: u32,
    rounds: usize,
) -> anyhow::Result<()> {
    step(&format!(
        "overhead: malloc/free loop, {threads} thread(s) × {pairs} pairs, {rounds} rounds"
    ));
    let loop_bin = fixtures.join("malloc-loop");
    let loop_rows = rows(BASELINES.into_iter().chain(TRACED), leaktrace, against);
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); loop_rows.len()];
    let mut hooks: Option<Value> = None;
    for _ in 0..rounds {
        for (i, (_, binary, setup)) in loop_rows.iter().enumerate() {
            let run = loop_once(
                binary,
                &loop_bin,
                pairs,
                threads,
                *setup,
                false,
                hooks.as_ref(),
            )?;
            ns[i].push(run.ns);
            if *setup == Setup::Floor {
                hooks = hooks.or(run.hooks);
            }
        }
    }
    let spreads: Vec<Spread> = ns.iter().map(|v| Spread::of(v)).collect();
    let untraced = spreads[0].median;
    let floor_added = spreads[1].median - untraced;
    println!(
        "  {threads} thread(s): ns per malloc/free pair, median [min–max] of {rounds}; added = \
         minus untraced"
    );
    for ((label, _, setup), s) in loop_rows.iter().zip(&spreads) {
        let added = s.median - untraced;
        let vs_floor = match setup {
            Setup::Leaktrace(_) => format!("{:>6.2}x the floor's added cost", added / floor_added),
            _ => String::new(),
        };
        println!(
            "  {label:<26} {}  added {:>7.0} ns  {vs_floor}",
            s.show("ns"),
            added
        );
    }
    // Interleaved runs of each traced setup with bpf_stats on, for the programs'
    // own time (medians: one run moves by a third on a busy host).
    let _stats = BpfStats::on();
    let stats_rows = rows(TRACED, leaktrace, against);
    let mut per_program: Vec<Vec<[f64; 3]>> = vec![Vec::new(); stats_rows.len()];
    for _ in 0..rounds {
        for (i, (_, binary, setup)) in stats_rows.iter().enumerate() {
            let run = loop_once(binary, &loop_bin, pairs, threads, *setup, true, None)?;
            per_program[i].extend(run.per_program);
        }
    }
    for ((label, _, _), runs) in stats_rows.iter().zip(&per_program) {
        if runs.is_empty() {
            println!("  (bpftool not installed: apt-get install bpftool for bpf_stats)");
            break;
        }
        let median = |k: usize| Spread::of(&runs.iter().map(|p| p[k]).collect::<Vec<_>>());
        let pair = Spread::of(&runs.iter().map(|p| p.iter().sum()).collect::<Vec<_>>());
        println!(
            "  {label:<26} programs' own time: alloc_enter {:.0} + alloc_return {:.0} + \
             free_enter {:.0}; a pair {} (medians of {})",
            median(0).median,
            median(1).median,
            median(2).median,
            pair.show("ns"),
            runs.len()
        );
    }
    Ok(())
}

/// A server from a Debian package on 127.0.0.1, and how to load it.
struct Server {
    name: &'static str,
    child: Child,
    load: Vec<String>,
    /// Requests per second from the load tool's output.
    parse: fn(&str) -> Option<f64>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// redis-benchmark -q: "SET: 41322.31 requests per second, p50=…"; the mean.
fn redis_rps(out: &str) -> Option<f64> {
    let v: Vec<f64> = out
        .split(['\n', '\r'])
        .filter_map(|l| {
            l.split_once(": ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// ab: "Requests per second:    1234.56 [#/sec] (mean)".
fn ab_rps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix("Requests per second:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
}

fn redis(requests: u32) -> anyhow::Result<Server> {
    const PORT: u16 = 16479;
    let dir = PathBuf::from("/tmp/leaktrace-overhead-redis");
    std::fs::create_dir_all(&dir)?;
    let child = Command::new("/usr/bin/redis-server")
        .args([
            "--port",
            &PORT.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start redis-server (apt-get install redis-server redis-tools)")?;
    let load = [
        "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        &PORT.to_string(),
        "-q",
        "-c",
        "8",
        "-r",
        "10000",
        "-t",
        "set,get,lpush,lpop",
        "-n",
        &requests.to_string(),
    ];
    let server = Server {
        name: "redis (jemalloc), redis-benchmark -c 8",
        child,
        load: load.iter().map(|s| s.to_string()).collect(),
        parse: redis_rps,
    };
    wait_port(PORT)?;
    Ok(server)
}

fn nginx(requests: u32) -> anyhow::Result<Server> {
    const PORT: u16 = 18180;
    let dir = PathBuf::from("/tmp/leaktrace-overhead-nginx");
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(
        dir.join("www/index.html"),
        "<html><body>overhead</body></html>\n".repeat(100),
    )?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {d}/error.log;\n\
         pid {d}/nginx.pid;\nevents {{ worker_connections 256; }}\nhttp {{\n  \
         access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
         scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{PORT};\n    \
         root {d}/www;\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start nginx (apt-get install nginx apache2-utils)")?;
    let server = Server {
        name: "nginx (glibc), ab -c 8",
        child,
        load: [
            "ab",
            "-q",
            "-c",
            "8",
            "-n",
            &requests.to_string(),
            &format!("http://127.0.0.1:{PORT}/"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        parse: ab_rps,
    };
    wait_port(PORT)?;
    Ok(server)
}

/// Requests per second of one bounded load.
fn drive(server: &Server) -> anyhow::Result<f64> {
    let out = Command::new(&server.load[0])
        .args(&server.load[1..])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", server.load[0]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    (server.parse)(&text).with_context(|| format!("no requests/s in {text:?}"))
}

const SERVER_SETUPS: [Setup; 3] = [Setup::Untraced, Setup::Floor, Setup::Leaktrace(&[])];

fn server_figures(leaktrace: &Path, server: &Server, rounds: usize) -> anyhow::Result<()> {
    step(&format!("overhead: {}, {rounds} rounds", server.name));
    drive(server)?; // warm up
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); SERVER_SETUPS.len()];
    for _ in 0..rounds {
        for (i, setup) in SERVER_SETUPS.iter().enumerate() {
            let tracer = trace(leaktrace, server.child.id(), *setup)?;
            rps[i].push(drive(server)?);
            if let Some(t) = tracer {
                t.stop()?;
            }
        }
    }
    let spreads: Vec<Spread> = rps.iter().map(|v| Spread::of(v)).collect();
    let untraced = spreads[0].median;
    let floor_slowdown = untraced / spreads[1].median;
    println!(
        "  {}: requests/s, median [min–max] of {rounds}",
        server.name
    );
    for (setup, s) in SERVER_SETUPS.iter().zip(&spreads) {
        let slowdown = untraced / s.median;
        let vs_floor = match setup {
            Setup::Leaktrace(_) => format!("{:>6.2}x the floor's", slowdown / floor_slowdown),
            _ => String::new(),
        };
        println!(
            "  {:<26} {}  {:>5.2}x slower  {vs_floor}",
            setup.name(),
            s.show("req/s"),
            slowdown
        );
    }
    Ok(())
}

/// Wall time of `leaktrace -- /bin/true` against valgrind's, interleaved.
fn startup(leaktrace: &Path, rounds: usize) -> anyhow::Result<()> {
    step(&format!("fixed costs: `-- /bin/true`, {rounds} rounds"));
    let time = |cmd: &mut Command| -> anyhow::Result<f64> {
        let start = Instant::now();
        let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
        if !status.success() {
            bail!("{cmd:?} failed: {status}");
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let valgrind = which::which("valgrind").ok();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        ours.push(time(Command::new(leaktrace).args(["--", "/bin/true"]))?);
        if let Some(v) = &valgrind {
            theirs.push(time(Command::new(v).args([
                "-q",
                "--leak-check=full",
                "/bin/true",
            ]))?);
        }
    }
    println!(
        "  {:<26} {}",
        "leaktrace -- /bin/true",
        Spread::of(&ours).show("ms")
    );
    if valgrind.is_some() {
        println!(
            "  {:<26} {}",
            "valgrind --leak-check=full",
            Spread::of(&theirs).show("ms")
        );
    } else {
        println!("  (valgrind not installed: apt-get install valgrind to compare)");
    }
    Ok(())
}

/// Debian packages of the server figures: (package, a file it installs).
const SERVER_PACKAGES: [(&str, &str); 4] = [
    ("redis-server", "/usr/bin/redis-server"),
    ("redis-tools", "/usr/bin/redis-benchmark"),
    ("nginx", "/usr/sbin/nginx"),
    ("apache2-utils", "/usr/bin/ab"),
];

/// Every overhead figure; `quick` runs fewer pairs, requests and rounds.
pub fn run(
    leaktrace: &Path,
    against: Option<&Path>,
    fixtures: &Path,
    quick: bool,
) -> anyhow::Result<()> {
    let (pairs, rounds, requests) = if quick {
        (100_000, 3, 5_000)
    } else {
        (500_000, 5, 20_000)
    };
    for threads in [1, 2] {
        loop_figures(leaktrace, against, fixtures, pairs, threads, rounds)?;
    }
    // The two servers and their load tools, from Debian (a fresh machine has none).
    if let Err(err) = crate::setup::ensure_packages(&SERVER_PACKAGES) {
        println!("  (cannot install the servers: {err:#})");
    }
    for make in [redis as fn(u32) -> anyhow::Result<Server>, nginx] {
        match make(requests) {
            Ok(server) => server_figures(leaktrace, &server, rounds)?,
            Err(err) => println!("  (skipped: {err:#})"),
        }
    }
    startup(leaktrace, if quick { 5 } else { 10 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert_eq!(Spread::of(&[4.0, 2.0]).median, 3.0);
    }

    #[test]
    fn load_tools_are_parsed() {
        let redis = "SET: 40000.00 requests per second, p50=0.1 msec\r\nGET: 20000.00 requests per second, p50=0.1 msec\n";
        assert_eq!(redis_rps(redis), Some(30000.0));
        let ab = "Complete requests:      500\nRequests per second:    1234.56 [#/sec] (mean)\n";
        assert_eq!(ab_rps(ab), Some(1234.56));
        assert_eq!(ab_rps("nothing"), None);
    }
}
