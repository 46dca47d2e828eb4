//! Leaks made before attaching: the heap walk at attach time (pid mode) finds the
//! blocks a process already holds, so the first scans report the leaks it made
//! before the tracer came, and nothing it still references.

use crate::util::{self, Fixture, Tracer, serial};

const FAST: &[&str] = &["--interval", "300ms", "--min-age", "0s"];

fn check_walked_leaks(extra_args: &[&str]) {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("before-attach", &[], &[]);
    let mut args = FAST.to_vec();
    args.extend_from_slice(extra_args);
    let mut tracer = Tracer::attach(fixture.pid(), &args);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(3);
    let run = tracer.stop(&fixture.stdout.clone());
    fixture.finish();
    let walk = run.of_type("heap_walk");
    assert_eq!(walk.len(), 1, "one heap walk: {walk:?}");
    assert!(walk[0].get("error").is_none(), "{}", walk[0]);
    let leaks = run.leaks();
    let mut errors = Vec::new();
    let mut cycle_direct = 0;
    for t in &run.truth {
        let got = leaks.get(&t.addr);
        let kind = got.map(|r| r["kind"].as_str().unwrap());
        let ok = match (t.tag.as_str(), t.kind.as_str()) {
            ("LEAK", "cycle") => {
                cycle_direct += usize::from(kind == Some("direct"));
                matches!(kind, Some("direct" | "indirect"))
            }
            ("LEAK", k) => kind == Some(k),
            ("KEEP", _) => kind.is_none(),
            _ => true,
        };
        if !ok {
            errors.push(format!(
                "{} {} {:#x}: reported {kind:?}",
                t.tag, t.kind, t.addr
            ));
        }
        if let Some(r) = got {
            assert_eq!(r["before_attach"], true, "{r}");
            assert!(r["stack"].as_array().unwrap().is_empty(), "{r}");
            assert!(r["size"].as_u64().unwrap() >= t.size, "{r}");
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert_eq!(cycle_direct, 1, "a leaked cycle has one direct leak");
    let fixture_leaks = run.truth.iter().filter(|t| t.tag == "LEAK").count();
    assert_eq!(
        leaks.len(),
        fixture_leaks,
        "only the fixture's leaks: {leaks:?}"
    );
    assert_eq!(run.end()["retractions"], 0);
}

/// Main arena, a thread arena over two heaps, a list, a cycle, a big mmapped block; a cache
/// still referenced from a global is kept.
#[test]
fn leaks_made_before_attaching_are_found() {
    check_walked_leaks(&[]);
}

/// The same with the target frozen for the walk.
#[test]
fn leaks_made_before_attaching_are_found_with_the_world_stopped() {
    check_walked_leaks(&["--stop-the-world"]);
}

/// Four threads churn while the heap is walked: every block live at the end is in
/// the table (with its size, or the usable size glibc gave it when the walk found
/// it: up to 46 bytes more, as realloc may shrink a block in place), and the table
/// holds no block the program freed.
#[test]
fn a_walk_during_churn_keeps_the_table_true() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("churn", &["400000", "--early"], &[]);
    let mut tracer = Tracer::attach(fixture.pid(), &["--interval", "500ms"]);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(1);
    let run = tracer.stop(&fixture.stdout.clone());
    fixture.finish();
    assert_eq!(run.lost_total(), 0, "no event lost");
    assert!(run.of_type("heap_walk")[0]["blocks"].as_u64().unwrap() > 0);
    let table = run.live();
    let mut errors = Vec::new();
    for t in run.truth.iter().filter(|t| t.tag == "LIVE") {
        match table.get(&t.addr) {
            Some(&size) if size == t.size || (size > t.size && size <= t.size + 46) => {}
            other => errors.push(format!(
                "{:#x} ({} bytes): table has {other:?}",
                t.addr, t.size
            )),
        }
    }
    assert!(
        errors.is_empty(),
        "{} blocks wrong:\n{}",
        errors.len(),
        errors.join("\n")
    );
    // Besides the windows: the C runtime's own few blocks (thread descriptors,
    // stdio), never a freed block.
    let live: std::collections::BTreeSet<u64> = run.truth.iter().map(|t| t.addr).collect();
    let extra: Vec<_> = table.keys().filter(|a| !live.contains(a)).collect();
    assert!(
        extra.len() <= 12,
        "{} blocks the program does not hold: {extra:x?}",
        extra.len()
    );
}

/// Objects leaked before attaching have no stack; a polymorphic C++ object's
/// vtable still names its class, in a stripped binary too.
#[test]
fn a_vtable_names_the_class_of_a_block_from_before_attaching() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("before-attach-classes", &[], &[]);
    let mut tracer = Tracer::attach(fixture.pid(), FAST);
    fixture.go();
    fixture.wait_for("READY");
    tracer.wait_scans(3);
    let run = tracer.stop(&fixture.stdout.clone());
    fixture.finish();
    let leaks = run.leaks();
    let mut classes = std::collections::BTreeMap::new();
    for t in run.truth.iter().filter(|t| t.tag == "LEAK") {
        let leak = leaks
            .get(&t.addr)
            .unwrap_or_else(|| panic!("{:#x} not reported", t.addr));
        assert_eq!(leak["before_attach"], true, "{leak}");
        let class = leak["class"].as_str().unwrap_or("-").to_owned();
        *classes.entry(class).or_insert(0) += 1;
    }
    let expected: std::collections::BTreeMap<String, i32> = [
        ("app::Session".to_owned(), 3),
        ("(anonymous namespace)::Node".to_owned(), 2),
        ("-".to_owned(), 1),
    ]
    .into();
    assert_eq!(classes, expected);
}

/// Four threads churn from before the attach, so their tcaches are full of freed
/// chunks that look in use, while the main thread's tcache is empty (it never
/// frees): the walk must find the other threads' tcaches itself, or each of
/// those chunks is a false leak.
#[test]
fn chunks_in_other_threads_tcaches_are_not_leaks() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("soak", &["4", "200"], &[]);
    let mut tracer = Tracer::attach(fixture.pid(), FAST);
    fixture.go();
    fixture.wait_for("DONE");
    tracer.wait_scans(2);
    let run = tracer.stop(&fixture.stdout.clone());
    fixture.finish();
    let walk = &run.of_type("heap_walk")[0];
    assert!(walk.get("error").is_none(), "{walk}");
    assert!(walk["cached_free"].as_u64().unwrap() > 100, "{walk}");
    let truth: std::collections::BTreeSet<u64> = run
        .truth
        .iter()
        .filter(|t| t.tag == "LEAK")
        .map(|t| t.addr)
        .collect();
    let false_leaks: Vec<_> = run
        .leaks()
        .into_iter()
        .filter(|(a, _)| !truth.contains(a))
        .map(|(_, r)| r.clone())
        .collect();
    assert!(false_leaks.is_empty(), "false leaks: {false_leaks:?}");
    assert_eq!(run.end()["retractions"], 0);
}
