//! Reports: symbolized stacks, the NDJSON schema documented in README.md, pprof,
//! flamegraph, suppressions and the text report.

use std::io::Read as _;

use leaktrace::report::pprof::Profile;
use prost::Message as _;

use crate::{
    schema::{check_object, documented_schema},
    util::{self, Fixture, Tracer, launch, serial},
};

const FAST: &[&str] = &["--interval", "200ms", "--min-age", "200ms"];

#[test]
fn leak_stacks_name_the_allocating_function_file_and_line() {
    util::require_root();
    let _s = serial();
    let run = launch("scenarios", &["--hold-ms", "800"], FAST);
    let line = util::source_line("scenarios.c", "ALLOC:make_node");
    let head = run
        .leaks()
        .into_values()
        .find(|r| r["kind"] == "direct" && r["stack"][0]["function"] == "make_node")
        .unwrap_or_else(|| panic!("no direct leak from make_node; records:\n{:?}", run.records));
    let frame = &head["stack"][0];
    assert!(
        frame["file"].as_str().unwrap().ends_with("scenarios.c"),
        "{frame}"
    );
    assert_eq!(frame["line"], line, "{frame}");
    assert!(
        frame["module"].as_str().unwrap().ends_with("scenarios"),
        "{frame}"
    );
    assert_eq!(head["allocator"], "malloc");

    let run = launch("cxx", &["--hold-ms", "500"], FAST);
    let line = util::source_line("cxx.cc", "ALLOC:make_node");
    let leaks = run.leaks();
    let by_function = |function: &str| {
        leaks
            .values()
            .filter(|r| r["kind"] == "direct")
            .map(|r| util::frames_from_module(r, "/cxx"))
            .find(|s| s.first().is_some_and(|f| f["function"] == function))
            .unwrap_or_else(|| panic!("no direct leak from {function}: {leaks:?}"))
    };
    let stack = by_function("make_node(Node*)");
    assert_eq!(stack[0]["line"], line);
    // Inlined: each frame at its own line, as addr2line -i says.
    let leak = by_function("make_inlined");
    let (inner, outer) = (&leak[0], &leak[1]);
    assert_eq!(inner["inlined"], true, "{leak:?}");
    assert_eq!(
        inner["line"],
        util::source_line("cxx.cc", "ALLOC:make_inlined"),
        "{leak:?}"
    );
    assert_eq!(outer["function"], "leak_through_an_inlined_helper()");
    assert_eq!(
        outer["line"],
        util::source_line("cxx.cc", "CALL:make_inlined"),
        "{leak:?}"
    );
}

/// The record types of the code (one enum, one home) are the ones README.md
/// documents; the tests below hold every written record to those tables.
#[test]
fn the_readme_documents_every_record_type() {
    let schema = documented_schema();
    let missing: Vec<&str> = leaktrace::report::records::Record::TYPES
        .into_iter()
        .filter(|t| !schema.contains_key(*t))
        .collect();
    assert!(missing.is_empty(), "README.md lacks {missing:?}");
}

#[test]
fn every_ndjson_line_follows_the_documented_schema() {
    util::require_root();
    let schema = documented_schema();
    assert!(
        schema.len() >= 10,
        "the README documents the records: {:?}",
        schema.keys()
    );
    let _s = serial();
    let mut launch_args = FAST.to_vec();
    launch_args.extend(["--show-possible", "--show-contents"]);
    let mut runs = vec![launch("scenarios", &["--hold-ms", "800"], &launch_args)];
    // pid mode with stop-the-world adds pauses and the signal ending.
    let mut fixture = Fixture::start("scenarios", &[], &[]);
    let mut args = FAST.to_vec();
    args.push("--stop-the-world");
    let mut tracer = Tracer::attach(fixture.pid(), &args);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(3);
    runs.push(tracer.stop(&fixture.stdout.clone()));
    fixture.finish();
    let mut seen = std::collections::BTreeSet::new();
    let mut errors = Vec::new();
    for run in &runs {
        assert_eq!(
            run.records[0]["type"], "start",
            "the first record carries the schema"
        );
        assert_eq!(
            run.records[0]["schema"],
            leaktrace::report::records::SCHEMA_VERSION
        );
        for (i, r) in run.records.iter().enumerate() {
            let t = r["type"].as_str().unwrap_or("?").to_owned();
            errors.extend(check_object(
                &schema,
                &t,
                r,
                &format!("line {} ({t})", i + 1),
            ));
            seen.insert(t);
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // One target: its exit totals are the run's, possible leaks outside both.
    let launched = &runs[0];
    assert_eq!(
        launched.of_type("process_exit")[0]["leaks"],
        launched.end()["leaks"]
    );
    for t in [
        "hooks",
        "start",
        "leak",
        "possible_leak",
        "possible_leak_group",
        "scan",
        "stats",
        "process",
        "process_exit",
        "end",
    ] {
        assert!(
            seen.contains(t),
            "no {t} record was checked (seen: {seen:?})"
        );
    }
}

#[test]
fn pprof_and_flamegraph_files() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("files");
    let pprof = dir.join("leaks.pb.gz");
    let svg = dir.join("leaks.svg");
    let mut args = FAST.to_vec();
    args.extend([
        "--pprof",
        pprof.to_str().unwrap(),
        "--flamegraph",
        svg.to_str().unwrap(),
    ]);
    let run = launch("scenarios", &["--hold-ms", "800"], &args);
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&pprof).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    let profile = Profile::decode(&raw[..]).expect("a pprof profile");
    let objects: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
    let bytes: i64 = profile.sample.iter().map(|s| s.value[1]).sum();
    let totals = &run.end()["leaks"];
    assert_eq!(objects as u64, totals["objects"].as_u64().unwrap());
    assert_eq!(bytes as u64, totals["bytes"].as_u64().unwrap());
    assert!(profile.string_table.iter().any(|s| s == "make_node"));

    let text = std::fs::read_to_string(&svg).unwrap();
    let mut reader = quick_xml::Reader::from_str(&text);
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("the SVG is not well-formed XML: {e}"),
        }
    }
    assert!(text.contains("make_node"));
}

#[test]
fn suppressions_hide_and_count() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("suppress");
    let file = dir.join("supp.txt");
    std::fs::write(&file, "# the list and the cycle\nleak:make_node\n").unwrap();
    let mut args = FAST.to_vec();
    args.extend(["--suppressions", file.to_str().unwrap()]);
    let run = launch("scenarios", &["--hold-ms", "800"], &args);
    for r in run.leaks().values() {
        assert!(
            !r["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"] == "make_node"),
            "suppressed leak reported: {r}"
        );
    }
    let rule = run.end()["suppressed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["rule"] == "make_node")
        .cloned()
        .expect("the rule is listed with what it hid");
    assert_eq!(rule["objects"], 12, "10 list nodes and 2 cycle nodes");
}

#[test]
fn text_report_groups_by_stack() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("text");
    let report = dir.join("report.txt");
    let status = std::process::Command::new(util::leaktrace())
        .args(FAST)
        .arg("--output")
        .arg(&report)
        .arg("--")
        .arg(util::fixture("scenarios"))
        .args(["--hold-ms", "800"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&report).unwrap();
    let summary = text
        .split("leaktrace summary")
        .nth(1)
        .expect("a final summary");
    let line = util::source_line("scenarios.c", "ALLOC:make_node");
    assert!(
        summary.contains(&format!("make_node (scenarios.c:{line})")),
        "{summary}"
    );
    assert!(summary.contains("1 direct"), "{summary}");
    assert!(
        summary.lines().all(|l| l.chars().count() <= 80),
        "fits 80 columns:\n{summary}"
    );
}

/// The `wrappers` fixture's text summary, with `args` added.
fn wrappers_summary(args: &[&str]) -> String {
    let dir = util::scratch("fold");
    let report = dir.join("report.txt");
    let status = std::process::Command::new(util::leaktrace())
        .args(FAST)
        .args(args)
        .arg("--output")
        .arg(&report)
        .arg("--")
        .arg(util::fixture("wrappers"))
        .args(["--hold-ms", "800"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&report).unwrap();
    text.split("leaktrace summary")
        .nth(1)
        .expect("a final summary")
        .to_owned()
}

#[test]
fn text_report_folds_allocation_wrappers_when_asked() {
    util::require_root();
    let _s = serial();
    let caller = format!(
        "make_record (wrappers.c:{})",
        util::source_line("wrappers.c", "ALLOC:make_record")
    );
    // Without folding a wrapper is just a frame: the big and small blocks of one
    // caller are two stacks, each starting in a wrapper.
    let plain = wrappers_summary(&[]);
    assert!(plain.contains("5 direct, 0 indirect, 2 stacks"), "{plain}");
    let heads: Vec<&str> = plain
        .split("\n#")
        .skip(1)
        .filter_map(|g| g.lines().nth(2).map(str::trim))
        .collect();
    assert_eq!(heads.len(), 2, "{plain}");
    assert!(heads.iter().all(|h| h.starts_with("xmalloc")), "{heads:?}");
    // Folded (the built-in list has xmalloc; xmalloc_big is the user's), they
    // are one group headed by the caller, the wrappers named above it.
    let folded = wrappers_summary(&["--fold-wrappers", "--fold-wrapper", "xmalloc_big"]);
    assert!(
        folded.contains("5 direct, 0 indirect, 1 stack\n"),
        "{folded}"
    );
    let group: Vec<&str> = folded.split("\n#1 ").nth(1).unwrap().lines().collect();
    assert!(group[0].starts_with("504 B in 5 objects"), "{folded}");
    assert_eq!(
        group[2].trim(),
        "through xmalloc, xmalloc_big (folded)",
        "{folded}"
    );
    assert_eq!(group[3].trim(), caller, "{folded}");
    // --fold-wrapper alone turns folding on, with the built-in list too.
    let only_user = wrappers_summary(&["--fold-wrapper", "xmalloc_big"]);
    assert!(only_user.contains("1 stack\n"), "{only_user}");
}
