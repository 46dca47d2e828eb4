//! Whole stacks on code built without frame pointers: the `unwind` fixture (-O2,
//! CFI only, like a distribution's packages) leaks through its own call chains,
//! a qsort comparator, libc wrappers and a thread; with the CFI unwinder every
//! leak's stack lists every caller up to `main` (or the thread's start), in order,
//! as gdb's `bt` shows them.

use serde_json::Value;

use crate::util::{self, launch, serial};

const FAST: &[&str] = &["--interval", "200ms", "--min-age", "200ms"];

/// The function names of a leak's stack, innermost first ("?" when unknown).
fn functions(leak: &Value) -> Vec<String> {
    leak["stack"]
        .as_array()
        .unwrap_or_else(|| panic!("no stack: {leak}"))
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The fixture's own frames (its module) up to `main`, in order (its `_start`,
/// below main, is checked by [`after_main_is_start_up`]).
fn own_functions(leak: &Value) -> Vec<String> {
    leak["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["module"].as_str().is_some_and(|m| m.ends_with("/unwind")))
        .map(|f| f["function"].as_str().unwrap_or("?").to_owned())
        .filter(|name| name != "_start")
        .collect()
}

/// Frames after `main`: only libc's start-up code may follow it.
fn after_main_is_start_up(names: &[String]) -> bool {
    let Some(at) = names.iter().position(|n| n == "main") else {
        return false;
    };
    names[at + 1..]
        .iter()
        .all(|n| n.contains("libc_start") || n == "_start")
}

fn leak_of<'a>(run: &'a util::Run, kind: &str) -> &'a Value {
    let truth = util::parse_truth(&run.fixture_stdout);
    let t = truth.iter().find(|t| t.kind == kind).unwrap_or_else(|| {
        panic!(
            "the fixture printed no {kind} leak:\n{}\nleaktrace said:\n{}",
            run.fixture_stdout, run.stderr
        )
    });
    let leaks = run.leaks();
    leaks.get(&t.addr).copied().unwrap_or_else(|| {
        panic!(
            "{kind} leak at {:#x} not reported; records:\n{:?}",
            t.addr, run.records
        )
    })
}

#[test]
fn cfi_stacks_list_every_caller_up_to_main() {
    util::require_root();
    let _s = serial();
    let mut args = FAST.to_vec();
    args.extend(["--stacks", "dwarf"]);
    let run = launch("unwind", &["--hold-ms", "800"], &args);

    // Five of its own functions, no frame pointer among them.
    let chain = leak_of(&run, "chain");
    assert_eq!(
        own_functions(chain),
        ["chain5", "chain4", "chain3", "chain2", "chain1", "main"],
        "{chain}"
    );
    assert!(after_main_is_start_up(&functions(chain)), "{chain}");

    // Through libc's qsort (its internals have no frame pointers).
    let sorted = leak_of(&run, "qsort");
    let names = functions(sorted);
    assert_eq!(
        own_functions(sorted),
        ["compare_and_leak", "sort_and_leak", "main"],
        "{sorted}"
    );
    let (cmp, sort) = (
        names.iter().position(|n| n == "compare_and_leak").unwrap(),
        names.iter().position(|n| n == "sort_and_leak").unwrap(),
    );
    assert_eq!(cmp, 0, "{names:?}");
    assert!(
        names[cmp + 1..sort].iter().any(|n| n.contains("qsort")),
        "no qsort frame between the comparator and its caller: {names:?}"
    );
    assert!(after_main_is_start_up(&names), "{names:?}");

    // libc wrappers: strdup and asprintf are frames like any other.
    let dup = leak_of(&run, "strdup");
    let names = functions(dup);
    assert!(names[0].contains("strdup"), "{names:?}");
    assert_eq!(
        own_functions(dup),
        ["dup_inner", "dup_outer", "main"],
        "{dup}"
    );
    assert!(after_main_is_start_up(&names), "{names:?}");

    let formatted = leak_of(&run, "asprintf");
    let names = functions(formatted);
    let outer = names.iter().position(|n| n == "format_outer").unwrap();
    assert!(
        names[..outer].iter().any(|n| n.contains("asprintf")),
        "{names:?}"
    );
    assert_eq!(
        own_functions(formatted),
        ["format_outer", "main"],
        "{names:?}"
    );
    assert!(after_main_is_start_up(&names), "{names:?}");

    // A thread: up to its start routine and libc's start_thread.
    let thread = leak_of(&run, "thread");
    let names = functions(thread);
    assert_eq!(
        own_functions(thread),
        ["thread_leak", "thread_body"],
        "{names:?}"
    );
    assert_eq!(names[..2], ["thread_leak", "thread_body"], "{names:?}");
    assert!(names[2].contains("start_thread"), "{names:?}");

    // The walks are counted; these ended where the CFI says the stack ends.
    let unwind = &run.end()["unwind"];
    assert!(unwind["complete"].as_u64().unwrap() >= 5, "{unwind}");
    assert!(unwind["table_bytes"].as_u64().unwrap() > 0, "{unwind}");
    let modules = unwind["modules"].as_array().unwrap();
    assert!(
        modules
            .iter()
            .any(|m| m["path"].as_str().unwrap().contains("libc.so")),
        "{unwind}"
    );
}

#[test]
fn frame_pointer_stacks_of_the_same_fixture_are_short() {
    // The other side of the test above: without CFI the chain is lost, so the
    // fixture really needs the unwinder.
    util::require_root();
    let _s = serial();
    let mut args = FAST.to_vec();
    args.extend(["--stacks", "fp"]);
    let run = launch("unwind", &["--hold-ms", "800"], &args);
    let chain = leak_of(&run, "chain");
    let own = own_functions(chain);
    assert!(
        own.len() < 6,
        "frame pointers found the whole chain: {own:?}"
    );
    assert!(run.end().get("unwind").is_none(), "{}", run.end());
}

#[test]
fn caller_mode_records_the_call_site_only() {
    util::require_root();
    let _s = serial();
    let mut args = FAST.to_vec();
    args.extend(["--stacks", "caller"]);
    let run = launch("unwind", &["--hold-ms", "800"], &args);
    let chain = leak_of(&run, "chain");
    assert_eq!(functions(chain), ["chain5"], "{chain}");
}

#[test]
fn deep_stacks_are_whole_across_stack_reads() {
    // 32 frames take more of the stack than the unwinder reads at once (512
    // bytes a read): every frame must still be found, in code without frame
    // pointers (rsp-based rows) and with them (rbp saved in every frame).
    util::require_root();
    let _s = serial();
    for fixture in ["unwind-loop", "unwind-loop-fp"] {
        let mut args = FAST.to_vec();
        args.extend(["--stacks", "dwarf"]);
        let run = launch(fixture, &["1000", "32", "--leak-one"], &args);
        let leaks = run.leaks();
        let leak = leaks
            .values()
            .find(|l| l["size"] == 24)
            .unwrap_or_else(|| panic!("{fixture}: no 24-byte leak; records:\n{:?}", run.records));
        let names = functions(leak);
        let descend = names.iter().filter(|n| *n == "descend").count();
        assert_eq!(names[0], "churn", "{fixture}: {names:?}");
        assert_eq!(descend, 26, "{fixture}: {names:?}");
        assert!(names[1..=26].iter().all(|n| n == "descend"), "{names:?}");
        assert_eq!(names[27], "main", "{fixture}: {names:?}");
        assert!(after_main_is_start_up(&names), "{fixture}: {names:?}");
        assert_eq!(
            names.last().map(String::as_str),
            Some("_start"),
            "{names:?}"
        );
    }
}

#[test]
fn a_walk_is_reused_only_while_the_stack_holds_what_it_read() {
    // The twins reach malloc on one stack pointer with one return address, from
    // two callers: in runs of 32, then in turn. The probe may reuse a walk (it
    // must, or the default mode costs a walk per call), but each twin's leak
    // keeps its own caller.
    util::require_root();
    let _s = serial();
    let mut args = FAST.to_vec();
    args.extend(["--stacks", "dwarf"]);
    let run = launch("unwind", &["--hold-ms", "800"], &args);
    for twin in ["twin_a", "twin_b"] {
        let leak = leak_of(&run, twin);
        let own = own_functions(leak);
        assert_eq!(own[..2], ["twin_leaf", twin], "{leak}");
        assert_eq!(own.last().map(String::as_str), Some("main"), "{leak}");
        assert!(after_main_is_start_up(&functions(leak)), "{leak}");
    }
    let unwind = &run.end()["unwind"];
    // Of the 128 twin calls, all but the first of each twin repeat a walk
    // (two ways of one memo set hold both).
    let reused = unwind["reused"].as_u64().unwrap();
    assert!(reused >= 100, "{unwind}");
}
