//! `--metrics`: a real Prometheus server (Debian's `prometheus`, which `cargo xtask
//! test` installs) scrapes leaktrace; what its HTTP API answers must be what
//! leaktrace's own NDJSON report says, the exposition must pass `promtool check
//! metrics`, and an exited process's series must go.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::util::{self, Fixture, Tracer, serial};

/// A program the test needs, with where it comes from.
fn program(name: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask test` installs it (Debian package prometheus)",
        path.display()
    );
    path
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP GET; the status line and the body.
fn get(port: u16, target: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server scraping one target every second, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Prometheus {
    fn start(target_port: u16) -> Self {
        let dir = util::scratch("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: leaktrace\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(program("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let p = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || !get(port, "/-/ready").0.contains("200")
        {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// An instant query: (labels, value) of each series.
    fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let (status, body) = get(
            self.port,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        );
        assert!(status.contains("200"), "{promql}: {status} {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{body}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect();
                (labels, r["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    }

    /// The value of a query that names one series (None: no series).
    fn value(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql);
        assert!(r.len() <= 1, "{promql}: {r:?}");
        r.first().map(|(_, v)| *v)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the NDJSON report says about `pid`'s leaks now: (objects, bytes) by kind,
/// leaks and possible leaks reported minus those retracted.
fn reported(records: &[Value], pid: u32) -> BTreeMap<String, (u64, u64)> {
    let mut live: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for r in records.iter().filter(|r| r["pid"] == pid) {
        match r["type"].as_str().unwrap() {
            "leak" | "possible_leak" => {
                live.insert(
                    r["address"].as_str().unwrap().to_owned(),
                    (
                        r["kind"].as_str().unwrap().to_owned(),
                        r["size"].as_u64().unwrap(),
                    ),
                );
            }
            "retraction" => {
                live.remove(r["address"].as_str().unwrap());
            }
            _ => {}
        }
    }
    let mut by_kind: BTreeMap<String, (u64, u64)> = ["direct", "indirect", "possible"]
        .iter()
        .map(|k| (k.to_string(), (0, 0)))
        .collect();
    for (kind, size) in live.values() {
        let e = by_kind.get_mut(kind).unwrap();
        e.0 += 1;
        e.1 += size;
    }
    by_kind
}

/// Scans of `pid` since its last leak, possible leak or retraction record.
fn quiet_scans(records: &[Value], pid: u32) -> usize {
    // Scans before the first leak (the fixture still making its leaks, or a
    // loaded machine slow to report them) do not count as settled.
    if !records
        .iter()
        .any(|r| r["pid"] == pid && r["type"] == "leak")
    {
        return 0;
    }
    records
        .iter()
        .rev()
        .filter(|r| r["pid"] == pid)
        .take_while(|r| {
            !matches!(
                r["type"].as_str(),
                Some("leak" | "possible_leak" | "retraction")
            )
        })
        .filter(|r| r["type"] == "scan")
        .count()
}

#[test]
fn prometheus_reads_back_what_the_report_says() {
    util::require_root();
    program("promtool");
    let _s = serial();
    let mut a = Fixture::start("scenarios", &[], &[]);
    let mut b = Fixture::start("scenarios", &[], &[]);
    let (pa, pb) = (a.pid(), b.pid());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let pb_arg = pb.to_string();
    let mut tracer = Tracer::attach(
        pa,
        &[
            "--pid",
            &pb_arg,
            "--metrics",
            &listen,
            "--interval",
            "300ms",
            "--min-age",
            "0s",
            "--show-possible",
        ],
    );
    let prometheus = Prometheus::start(port);
    a.go();
    b.go();
    a.wait_for("READY");
    b.wait_for("READY");
    // The verdicts settle: several scans of each with nothing new.
    tracer.wait_records(
        |r| quiet_scans(r, pa) >= 4 && quiet_scans(r, pb) >= 4,
        "the leaks to settle",
    );

    // The exposition is valid by Prometheus' own linter.
    let (status, exposition) = get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let mut promtool = Command::new(program("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty(),
        "promtool check metrics: {}{}\n{exposition}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    for line in [
        "# HELP leaktrace_leaked_bytes ",
        "# TYPE leaktrace_scan_duration_seconds histogram",
    ] {
        assert!(exposition.contains(line), "{line} in\n{exposition}");
    }

    // What Prometheus scraped is what the report says, for both processes.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mismatch = loop {
        let records = tracer.records();
        let mut diffs = Vec::new();
        let up = prometheus.value("up{job=\"leaktrace\"}");
        if up != Some(1.0) {
            diffs.push(format!("scrape health up = {up:?}"));
        }
        for pid in [pa, pb] {
            for (kind, (objects, bytes)) in reported(&records, pid) {
                assert!(kind != "direct" || objects > 0, "the fixture leaks");
                let sel = format!("{{pid=\"{pid}\",kind=\"{kind}\",comm=\"scenarios\"}}");
                let got = (
                    prometheus.value(&format!("leaktrace_leaked_objects{sel}")),
                    prometheus.value(&format!("leaktrace_leaked_bytes{sel}")),
                );
                if got != (Some(objects as f64), Some(bytes as f64)) {
                    diffs.push(format!(
                        "{pid} {kind}: report {objects}/{bytes}, prometheus {got:?}"
                    ));
                }
            }
            let last_scan = records
                .iter()
                .rev()
                .find(|r| r["type"] == "scan" && r["pid"] == pid)
                .unwrap();
            let sel = format!("{{pid=\"{pid}\"}}");
            let tracked = (
                prometheus.value(&format!("leaktrace_tracked_objects{sel}")),
                prometheus.value(&format!("leaktrace_tracked_bytes{sel}")),
            );
            let want = (
                last_scan["objects"].as_f64(),
                last_scan["object_bytes"].as_f64(),
            );
            if tracked != want {
                diffs.push(format!(
                    "{pid} tracked: report {want:?}, prometheus {tracked:?}"
                ));
            }
            let scans = records
                .iter()
                .filter(|r| r["type"] == "scan" && r["pid"] == pid)
                .count() as f64;
            let scraped = prometheus
                .value(&format!("leaktrace_scan_duration_seconds_count{sel}"))
                .unwrap_or(0.0);
            // Scans go on between the scrape and reading the report.
            if !(scraped >= 4.0 && scraped <= scans) {
                diffs.push(format!("{pid} scans: report {scans}, prometheus {scraped}"));
            }
        }
        let stats = records.iter().rev().find(|r| r["type"] == "stats").unwrap();
        for (reason, count) in stats["lost"].as_object().unwrap() {
            let got = prometheus.value(&format!(
                "leaktrace_lost_events_total{{reason=\"{reason}\"}}"
            ));
            if got != count.as_f64() {
                diffs.push(format!("lost {reason}: report {count}, prometheus {got:?}"));
            }
        }
        if diffs.is_empty() {
            break None;
        }
        if Instant::now() > deadline {
            break Some(diffs);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(mismatch, None, "prometheus disagrees with the report");

    // An exited process's series go, from the exposition and from Prometheus.
    let (status, _) = b.finish();
    assert!(status.success());
    tracer.wait_records(
        |r| {
            r.iter()
                .any(|x| x["type"] == "process_exit" && x["pid"] == pb)
        },
        "the exit of the second process",
    );
    let (_, exposition) = get(port, "/metrics");
    assert!(
        !exposition.contains(&format!("pid=\"{pb}\"")),
        "series of exited {pb} remain:\n{exposition}"
    );
    assert!(exposition.contains(&format!("pid=\"{pa}\"")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !prometheus
        .query(&format!("leaktrace_tracked_objects{{pid=\"{pb}\"}}"))
        .is_empty()
        || prometheus.value("leaktrace_targets") != Some(1.0)
    {
        assert!(Instant::now() < deadline, "prometheus still sees {pb}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let run = tracer.stop(&a.stdout.clone());
    let (status, _) = a.finish();
    assert!(status.success());
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
}

#[test]
fn metrics_flag_errors_are_one_line() {
    // A port in use is refused before anything is attached.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = Command::new(util::leaktrace())
        .args(["--metrics", &port.to_string(), "--", "/bin/true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.trim().lines().count() == 1 && err.contains("cannot listen on 127.0.0.1"),
        "{err}"
    );
    let out = Command::new(util::leaktrace())
        .args(["--metrics", "nowhere", "--pid", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("expected PORT, :PORT or ADDR:PORT"), "{err}");
}

#[test]
fn kernel_mode_shows_the_largest_call_sites_only() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("kernel-metrics");
    let out = dir.join("out.json");
    let port = free_port();
    let mut tracer = Command::new(util::leaktrace())
        .args(["--kernel", "--json", "--output"])
        .arg(&out)
        .args(["--metrics", &port.to_string(), "--metrics-sites", "5"])
        .args(["--interval", "500ms", "--duration"])
        .arg(format!("{}s", util::patience(90).as_secs()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    util::wait_for_records(
        &mut tracer,
        &out,
        |r| r.iter().any(|x| x["type"] == "start"),
        "start record",
    );
    // Kernel objects held through the run: a quiet system (a VM) can otherwise
    // have nothing outstanding when the metrics are read. A report's metrics are
    // set before its stats record is written.
    let _held: Vec<_> = (0..64).map(|_| std::io::pipe().unwrap()).collect();
    let records = util::wait_for_records(
        &mut tracer,
        &out,
        |r| {
            r.iter().any(|x| {
                x["type"] == "kernel_stats" && x["outstanding"].as_u64().is_some_and(|n| n >= 64)
            })
        },
        "a kernel report with the held pipes outstanding",
    );
    let (_, exposition) = get(port, "/metrics");
    let sites: Vec<&str> = exposition
        .lines()
        .filter(|l| l.starts_with("leaktrace_kernel_outstanding_objects{"))
        .collect();
    let last = |kind: &str| records.iter().rev().find(|x| x["type"] == kind);
    assert!(
        (1..=5).contains(&sites.len()),
        "{} sites:\n{exposition}\nlast call site: {:?}\nlast stats: {:?}",
        sites.len(),
        last("kernel_call_site"),
        last("kernel_stats"),
    );
    assert!(exposition.contains("# TYPE leaktrace_kernel_all_outstanding_bytes gauge"));
    let mut promtool = Command::new(program("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let lint = promtool.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty(),
        "{exposition}"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    assert_eq!(tracer.wait().unwrap().code(), Some(130));
}
