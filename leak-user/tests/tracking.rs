//! The object table against the fixtures' truth: every function of the malloc
//! family, static and dynamic binaries, jemalloc, C++, threads, pid and launch mode.

use std::collections::BTreeMap;

use crate::util::{self, Fixture, Run, Tracer, launch, launch_with_env, serial};

const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

fn truth_live(run: &Run) -> BTreeMap<u64, u64> {
    run.truth
        .iter()
        .filter(|t| t.tag == "LIVE")
        .map(|t| (t.addr, t.size))
        .collect()
}

/// The table must hold every block the fixture says is live, with its size, and
/// nothing else made after the fixture's MARK block (what comes before it is the C
/// runtime's start-up: locale, libstdc++'s exception pool, a static binary's TLS).
fn assert_table_matches(run: &Run) {
    assert!(
        !run.objects.is_empty(),
        "no objects dumped; stderr:\n{}",
        run.stderr
    );
    let truth = truth_live(run);
    let table = run.live();
    let missing: Vec<_> = truth
        .iter()
        .filter(|(a, s)| table.get(a) != Some(s))
        .map(|(a, s)| format!("{a:#x} ({s} bytes, table says {:?})", table.get(a)))
        .collect();
    let mark = run.truth.iter().find(|t| t.tag == "MARK").map(|t| t.addr);
    let mark_serial = run
        .objects
        .iter()
        .find(|o| Some(util::hex(&o["address"])) == mark)
        .map_or(0, |o| o["serial"].as_u64().unwrap());
    let extra: Vec<_> = run
        .objects
        .iter()
        .filter(|o| !truth.contains_key(&util::hex(&o["address"])))
        .filter(|o| o["serial"].as_u64().unwrap() > mark_serial)
        .collect();
    assert!(
        missing.is_empty(),
        "blocks missing from the table: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "objects the fixture does not hold: {extra:?}"
    );
}

#[test]
fn counts_exactly_the_allocations_made_after_attaching() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("counts", &["5000", "2000"], &[]);
    let mut tracer = Tracer::attach(fixture.pid(), &["--interval", "200ms"]);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(1);
    let run = tracer.stop(&fixture.stdout.clone());
    fixture.finish();
    let end = run.end();
    let counters = &end["counters"];
    assert_eq!(counters["allocs"], 5000, "end record: {end}");
    assert_eq!(counters["frees"], 2000, "end record: {end}");
    assert_eq!(run.lost_total(), 0);
    assert_eq!(end["objects"], 3000);
    assert_eq!(run.objects.len(), 3000);
    assert_eq!(end["decode_errors"], 0);
}

#[test]
fn every_malloc_family_function_in_a_dynamic_binary() {
    util::require_root();
    let _s = serial();
    let run = launch("family", &["--hold-ms", "300"], &["--interval", "100ms"]);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_table_matches(&run);
    let hooks = run.of_type("hooks");
    let libc = hooks[0]["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["object"].as_str().unwrap().contains("libc.so"))
        .expect("libc is hooked");
    let names: Vec<&str> = libc["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap())
        .collect();
    for f in [
        "malloc",
        "calloc",
        "realloc",
        "reallocarray",
        "posix_memalign",
        "valloc",
        "pvalloc",
    ] {
        assert!(names.contains(&f), "{f} not hooked: {names:?}");
    }
    assert!(
        names.contains(&"aligned_alloc/memalign"),
        "aliases hooked once: {names:?}"
    );
}

#[test]
fn every_malloc_family_function_in_a_static_binary() {
    util::require_root();
    let _s = serial();
    let run = launch(
        "family-static",
        &["--hold-ms", "300"],
        &["--interval", "100ms"],
    );
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_table_matches(&run);
    let object = run.of_type("hooks")[0]["objects"][0]["object"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        object.ends_with("family-static"),
        "hooked the executable itself: {object}"
    );
}

#[test]
fn jemalloc_preloaded() {
    util::require_root();
    assert!(
        std::path::Path::new(JEMALLOC).exists(),
        "this test needs Debian's libjemalloc2 ({JEMALLOC}): `cargo xtask test` installs it"
    );
    let _s = serial();
    let run = launch_with_env(
        "family",
        &["--hold-ms", "300", "--no-pvalloc"],
        &["--interval", "100ms"],
        &[("LD_PRELOAD", JEMALLOC)],
    );
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    let hooked: Vec<&str> = run
        .of_type("hooks")
        .iter()
        .flat_map(|h| h["objects"].as_array().unwrap())
        .map(|o| o["object"].as_str().unwrap())
        .collect();
    assert!(
        hooked.iter().any(|o| o.contains("jemalloc")),
        "jemalloc hooked: {hooked:?}"
    );
    assert_table_matches(&run);

    // Preloaded by the command itself (`env LD_PRELOAD=... fixture`): the
    // environment that counts is the new image's, not ours.
    let fixture = util::fixture("family");
    let preload = format!("LD_PRELOAD={JEMALLOC}");
    let argv = [
        "/usr/bin/env",
        &preload,
        fixture.to_str().unwrap(),
        "--hold-ms",
        "300",
        "--no-pvalloc",
    ];
    let run = util::launch_command("family-env", &argv, &["--interval", "100ms"], &[]);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert!(
        run.of_type("hooks")
            .iter()
            .flat_map(|h| h["objects"].as_array().unwrap())
            .any(|o| o["object"].as_str().unwrap().contains("jemalloc")),
        "jemalloc hooked at the second exec"
    );
    assert_table_matches(&run);
}

#[test]
fn cxx_operator_new_and_delete() {
    cxx_through_wrappers(&[]);
}

/// Without a stack walk the call site is found at the allocator's return, from
/// the address it returns to: the same sites and allocators as with one.
#[test]
fn cxx_operator_new_and_delete_call_sites_only() {
    cxx_through_wrappers(&["--stacks", "caller"]);
}

/// The cxx fixture traced with `extra` options: its table, its leaks, each named
/// by the allocator its program called and by its call site past the wrappers.
fn cxx_through_wrappers(extra: &[&str]) {
    util::require_root();
    let _s = serial();
    let args = [&["--interval", "100ms", "--min-age", "100ms"], extra].concat();
    let run = launch("cxx", &["--hold-ms", "500"], &args);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert_table_matches(&run);
    let leaks = run.leaks();
    let mut callers = Vec::new();
    for leak in run.truth.iter().filter(|t| t.tag == "LEAK") {
        let record = leaks
            .get(&leak.addr)
            .unwrap_or_else(|| panic!("leak {:#x} not reported: {leaks:?}", leak.addr));
        assert_eq!(record["kind"], "direct");
        // Seen through to malloc, and named by the wrapper that called it: a
        // block of operator new's is one (valgrind's heuristics need that).
        let expected = if leak.size == 6 {
            "malloc"
        } else {
            "operator new"
        };
        assert_eq!(
            record["allocator"], expected,
            "strdup's block is malloc's, the others operator new's: {record}"
        );
        let own = util::frames_from_module(record, "/cxx");
        let caller = own
            .first()
            .unwrap_or_else(|| panic!("no frame of the fixture's own: {record}"));
        callers.push(caller["function"].as_str().unwrap().to_owned());
    }
    // The first two are made before main does anything else: the wrappers' call
    // sites are known from the entry point on.
    assert_eq!(
        callers[..3],
        [
            "leak_first_thing()",
            "leak_first_thing()",
            "make_node(Node*)"
        ],
        "{callers:?}"
    );
}

#[test]
fn four_threads_of_churn_with_racing_reallocs() {
    churn_with_racing_reallocs(&[]);
}

/// Records of CPUs merged by the counter's stamps, whatever `auto` picks here.
#[test]
fn four_threads_of_churn_stamped_by_the_counter() {
    churn_with_racing_reallocs(&["--record-order", "counter"]);
}

/// Records of CPUs merged by the clock's stamps, whatever `auto` picks here.
#[test]
fn four_threads_of_churn_stamped_by_the_clock() {
    churn_with_racing_reallocs(&["--record-order", "clock"]);
}

/// Four threads of churn traced with `extra` options: the table equals the truth.
fn churn_with_racing_reallocs(extra: &[&str]) {
    util::require_root();
    let _s = serial();
    // Threads are created before "go": the table must then equal the truth exactly
    // (without the heap walk, which adopts the runtime's blocks from before).
    let mut fixture = Fixture::start("churn", &["200000"], &[]);
    // A ring big enough for the whole run: under emulation (the VM suite) the
    // reader runs far slower than four allocating threads.
    let args = [
        &[
            "--interval",
            "500ms",
            "--no-heap-walk",
            "--ring-buffer",
            "256",
        ],
        extra,
    ]
    .concat();
    let mut tracer = Tracer::attach(fixture.pid(), &args);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(1);
    let run = tracer.stop(&fixture.stdout.clone());
    fixture.finish();
    let lost = run.lost_total();
    let counters = &run.end()["counters"];
    eprintln!(
        "churn: {} allocs, {} frees, {} reallocs, {lost} lost events",
        counters["allocs"], counters["frees"], counters["reallocs"]
    );
    assert!(counters["reallocs"].as_u64().unwrap() > 100_000);
    if lost == 0 {
        assert_table_matches(&run);
        assert_eq!(counters["overlap_retired"], 0);
    } else {
        // Lost events are reported, and the table can be off by at most that many.
        let truth = truth_live(&run);
        let table = run.live();
        let differ = truth
            .iter()
            .filter(|(a, s)| table.get(a) != Some(s))
            .count()
            + table.keys().filter(|a| !truth.contains_key(a)).count();
        assert!(
            differ as u64 <= lost,
            "{differ} differences with {lost} lost events"
        );
    }
}

#[test]
fn launch_passes_arguments_and_exit_status() {
    util::require_root();
    let _s = serial();
    let run = launch(
        "counts",
        &["10", "4", "--hold-ms", "0"],
        &["--interval", "1s"],
    );
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert!(run.fixture_stdout.contains("DONE 10 4"));
    assert_eq!(run.end()["counters"]["allocs"], 10);
    let run = util::launch("family", &["--hold-ms", "0", "--exit-code", "7"], &[]);
    assert_eq!(run.status.code(), Some(7), "stderr:\n{}", run.stderr);
    assert_eq!(run.end()["exit_status"], 7);
}

#[test]
fn a_target_that_exits_mid_trace_ends_the_trace() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("counts", &["100", "10"], &[]);
    let mut tracer = Tracer::attach(fixture.pid(), &["--interval", "200ms"]);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(1);
    let pid = fixture.pid();
    fixture.finish();
    tracer.wait_records(|r| r.iter().any(|x| x["type"] == "end"), "the end record");
    let run = tracer.stop("");
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    let exit = run.of_type("process_exit");
    assert_eq!(exit.len(), 1);
    assert_eq!(exit[0]["pid"], pid);
    assert_eq!(run.end()["reason"], "targets_exited");
}

#[test]
fn follow_forks_traces_a_child_from_its_first_instruction() {
    util::require_root();
    let _s = serial();
    let args = ["1000", "10", "--hold-ms", "1500"];
    let fast = ["--interval", "100ms", "--min-age", "0s"];
    // No periodic scan during the child's life: its leaks can only come from the
    // scan at its exit stop (followed children are held there, like the command).
    let with_flag = ["--interval", "60s", "--min-age", "0s", "--follow-forks"];
    let run = launch("forks", &args, &with_flag);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    let child: u64 = run
        .fixture_stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHILD ")?.trim().parse().ok())
        .expect("the fixture names its child");
    let parent = run.of_type("start")[0]["targets"][0]["pid"]
        .as_u64()
        .unwrap();
    let fork = run
        .of_type("process")
        .into_iter()
        .find(|r| r["event"] == "fork")
        .unwrap_or_else(|| panic!("no fork record; stderr:\n{}", run.stderr));
    assert_eq!(fork["pid"], child);
    assert_eq!(fork["parent"], parent);
    let truth: BTreeMap<u64, u64> = run
        .truth
        .iter()
        .filter(|t| t.tag == "LEAK")
        .map(|t| (t.addr, t.size))
        .collect();
    assert_eq!(truth.len(), 10);
    let leaks: BTreeMap<u64, u64> = run
        .leaks()
        .into_iter()
        .map(|(addr, r)| {
            assert_eq!(r["pid"], child, "only the child leaks: {r}");
            assert_eq!(r["kind"], "direct");
            (addr, r["size"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(leaks, truth, "the child's leaks, exactly");
    assert!(run.end()["counters"]["allocs"].as_u64().unwrap() >= 1001);
    assert_eq!(run.lost_total(), 0);

    // Without the flag the child is not traced at all.
    let run = launch("forks", &args, &fast);
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    assert!(run.of_type("process").iter().all(|r| r["event"] != "fork"));
    assert!(run.leaks().is_empty(), "{:?}", run.leaks());
    assert_eq!(run.end()["counters"]["allocs"], 1, "the parent's one block");
}

#[test]
fn under_sudo_the_command_runs_as_the_invoking_user() {
    util::require_root();
    let _s = serial();
    let out = std::process::Command::new(util::leaktrace())
        .args(["--interval", "1s", "--", "/bin/sh", "-c", "id -u; id -g"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65533")
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr:\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.trim() == "65534"),
        "id printed its uid: {stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.trim() == "65533"),
        "id printed its gid: {stdout}"
    );
}
