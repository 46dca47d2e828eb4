//! Stripped executables whose debug info lives apart, as distributions ship them:
//! next to the binary or in `.debug/` through `.gnu_debuglink`, or under a debug
//! root by build id (Debian's `-dbgsym` layout). Leaks must name their functions
//! and lines from there, and frames without names must say why.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{
    scanning::FAST,
    schema::{check_records, documented_schema},
    util::{self, Fixture, Run, Tracer, serial},
};

fn sh(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap();
    assert!(status.success(), "{program} {args:?}");
}

/// A scratch copy of `scenarios` as `app`, stripped, its DWARF and symbols in
/// `app.debug` beside it; with `link`, the app names it in `.gnu_debuglink`.
fn split(link: bool) -> PathBuf {
    split_into(util::scratch("debuginfo"), "scenarios", link)
}

/// `split` of the fixture `name`, in `dir`.
fn split_into(dir: PathBuf, name: &str, link: bool) -> PathBuf {
    let app = dir.join("app");
    std::fs::copy(util::fixture(name), &app).unwrap();
    let (app_s, debug_s) = (app.to_str().unwrap(), dir.join("app.debug"));
    let debug_s = debug_s.to_str().unwrap();
    sh("objcopy", &["--only-keep-debug", app_s, debug_s]);
    sh("strip", &["--strip-all", app_s]);
    if link {
        let arg = format!("--add-gnu-debuglink={debug_s}");
        sh("objcopy", &[&arg, app_s]);
    }
    dir
}

/// The hex build id `readelf -n` prints for `file`.
fn build_id(file: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("the fixture has a build id")
        .to_owned()
}

fn run_app(dir: &Path, args: &[&str]) -> Run {
    run_app_env(dir, args, &[])
}

fn run_app_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let app = dir.join("app");
    let mut all = FAST.to_vec();
    all.extend_from_slice(args);
    let run = util::launch_command(
        "debuginfo",
        &[app.to_str().unwrap(), "--hold-ms", "600"],
        &all,
        env,
    );
    assert!(run.ended_well(), "{}; stderr:\n{}", run.status, run.stderr);
    run
}

/// The app's frames of every leak.
fn app_frames<'a>(run: &'a Run, dir: &Path) -> Vec<&'a Value> {
    let app = dir.join("app");
    let frames: Vec<&Value> = run
        .leaks()
        .into_values()
        .flat_map(|l| l["stack"].as_array().into_iter().flatten())
        .filter(|f| f["module"] == app.to_str().unwrap())
        .collect();
    assert!(!frames.is_empty(), "no frame in the app: {:?}", run.leaks());
    frames
}

/// `make_node`'s leak names it, with the line of its malloc.
fn assert_symbolized(run: &Run, dir: &Path) {
    let line = util::source_line("scenarios.c", "ALLOC:make_node");
    let leak = run
        .leaks()
        .into_values()
        .find(|r| r["stack"][0]["function"] == "make_node")
        .unwrap_or_else(|| panic!("no leak in make_node: {:?}", run.leaks()));
    assert_eq!(leak["stack"][0]["line"], line, "{leak}");
    for f in app_frames(run, dir) {
        assert!(
            f["function"].is_string() && f.get("reason").is_none(),
            "{f}"
        );
    }
}

#[test]
fn a_debug_link_beside_the_binary() {
    util::require_root();
    let _s = serial();
    let dir = split(true);
    assert_symbolized(&run_app(&dir, &[]), &dir);
}

#[test]
fn a_debug_link_in_the_debug_subdirectory() {
    util::require_root();
    let _s = serial();
    let dir = split(true);
    std::fs::create_dir(dir.join(".debug")).unwrap();
    std::fs::rename(dir.join("app.debug"), dir.join(".debug/app.debug")).unwrap();
    assert_symbolized(&run_app(&dir, &[]), &dir);
}

#[test]
fn a_build_id_path_under_a_debug_root() {
    util::require_root();
    let _s = serial();
    let dir = split(false);
    let id = build_id(&dir.join("app"));
    let root = dir.join("root");
    let sub = root.join(".build-id").join(&id[..2]);
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::rename(
        dir.join("app.debug"),
        sub.join(format!("{}.debug", &id[2..])),
    )
    .unwrap();
    assert_symbolized(
        &run_app(&dir, &["--debug-dir", root.to_str().unwrap()]),
        &dir,
    );
}

#[test]
fn frames_without_debug_info_say_why() {
    util::require_root();
    let _s = serial();
    let dir = split(true);
    // The link's CRC no longer matches: that file must not be used.
    let debug = dir.join("app.debug");
    let mut bytes = std::fs::read(&debug).unwrap();
    bytes.push(0);
    std::fs::write(&debug, bytes).unwrap();
    let run = run_app(&dir, &[]);
    for f in app_frames(&run, &dir) {
        assert_eq!(f["reason"], "debug_info_mismatch", "{f}");
        assert!(f.get("function").is_none(), "{f}");
    }
    std::fs::remove_file(&debug).unwrap();
    let run = run_app(&dir, &[]);
    let frames = app_frames(&run, &dir);
    for f in &frames {
        assert_eq!(f["reason"], "no_debug_info", "{f}");
    }
    // The end record counts each distinct frame once.
    let distinct: std::collections::BTreeSet<&str> = frames
        .iter()
        .filter_map(|f| f["address"].as_str())
        .collect();
    let counted = &run.end()["unsymbolized_frames"]["no_debug_info"];
    assert_eq!(
        counted.as_u64(),
        Some(distinct.len() as u64),
        "{}",
        run.end()
    );
    let errors = check_records(&documented_schema(), &run.records);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// `python3 -m http.server` on 127.0.0.1 serving `root`, killed when dropped.
struct Server {
    child: std::process::Child,
    url: String,
}

impl Server {
    fn start(root: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .current_dir(root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Self {
                    child,
                    url: format!("http://127.0.0.1:{port}"),
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the http server did not start");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn debug_info_from_a_debuginfod_server() {
    util::require_root();
    let _s = serial();
    let dir = split(false);
    let id = build_id(&dir.join("app"));
    // The debuginfod URL layout: /buildid/HEX/debuginfo.
    let served = dir.join("srv/buildid").join(&id);
    std::fs::create_dir_all(&served).unwrap();
    std::fs::rename(dir.join("app.debug"), served.join("debuginfo")).unwrap();
    let server = Server::start(&dir.join("srv"));
    let cache = dir.join("cache");
    let url = server.url.clone();
    let env = [
        ("DEBUGINFOD_URLS", url.as_str()),
        ("XDG_CACHE_HOME", cache.to_str().unwrap()),
    ];
    assert_symbolized(&run_app_env(&dir, &[], &env), &dir);
    let cached = cache
        .join("leaktrace/debuginfod")
        .join(&id)
        .join("debuginfo");
    assert!(cached.exists(), "cached at {}", cached.display());
    // From the cache, without the server.
    drop(server);
    assert_symbolized(&run_app_env(&dir, &[], &env), &dir);
    // No cache and no server: one line says so, and the frames why.
    std::fs::remove_dir_all(&cache).unwrap();
    let run = run_app_env(&dir, &[], &env);
    let said: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("debuginfod server"))
        .collect();
    assert_eq!(said.len(), 1, "{}", run.stderr);
    assert!(said[0].contains("failed"), "{}", said[0]);
    for f in app_frames(&run, &dir) {
        assert_eq!(f["reason"], "debuginfod_failed", "{f}");
    }
}

/// Starts the split `scenarios` app, then upgrades it as a package manager
/// would: another program and its debug file renamed over `app` and
/// `app.debug`; with `keep_old`, the old debug file stays installed by build id
/// under a debug root. Then traces it with `--pid` while it leaks.
fn upgraded_while_running(keep_old: bool) -> (Run, PathBuf) {
    let dir = split(true);
    let root = dir.join("root");
    if keep_old {
        let id = build_id(&dir.join("app"));
        let sub = root.join(".build-id").join(&id[..2]);
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::copy(
            dir.join("app.debug"),
            sub.join(format!("{}.debug", &id[2..])),
        )
        .unwrap();
    } else {
        std::fs::create_dir_all(&root).unwrap();
    }
    let mut command = Command::new(dir.join("app"));
    command.arg("--wait-go");
    let mut fixture = Fixture::spawn(command);
    let new = split_into(util::scratch("debuginfo-new"), "wrappers", true);
    std::fs::rename(new.join("app.debug"), dir.join("app.debug")).unwrap();
    std::fs::rename(new.join("app"), dir.join("app")).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fixture.pid())).unwrap();
    assert!(maps.contains(" (deleted)"), "{maps}");
    let mut args = FAST.to_vec();
    args.extend(["--debug-dir", root.to_str().unwrap()]);
    let mut tracer = Tracer::attach(fixture.pid(), &args);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(4);
    let run = tracer.stop(&fixture.stdout.clone());
    let (status, _) = fixture.finish();
    assert!(status.success(), "the target kept running fine");
    assert!(run.ended_well(), "{}; stderr:\n{}", run.status, run.stderr);
    (run, dir)
}

#[test]
fn an_upgraded_binary_is_not_named_from_the_new_debug_file() {
    util::require_root();
    let _s = serial();
    let (run, dir) = upgraded_while_running(false);
    for f in app_frames(&run, &dir) {
        assert_eq!(f["reason"], "debug_info_mismatch", "{f}");
        assert!(f.get("function").is_none(), "{f}");
    }
}

#[test]
fn an_upgraded_binary_is_named_from_its_own_debug_file_by_build_id() {
    util::require_root();
    let _s = serial();
    let (run, dir) = upgraded_while_running(true);
    assert_symbolized(&run, &dir);
}
