//! The fixture programs: small C/C++ programs with known allocation patterns that
//! print their own ground truth. Built with the system compiler the way users build
//! theirs (-O2, no frame pointers), with debug info for file:line checks.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::util::{self, step};

/// (output name, source, extra flags)
const FIXTURES: &[(&str, &str, &[&str])] = &[
    ("counts", "counts.c", &[]),
    ("family", "family.c", &[]),
    ("family-static", "family.c", &["-static"]),
    ("churn", "churn.c", &[]),
    ("scenarios", "scenarios.c", &[]),
    ("cxx", "cxx.cc", &[]),
    ("hog", "hog.c", &[]),
    ("malloc-loop", "malloc_loop.c", &[]),
    ("kobjects", "kobjects.c", &[]),
    ("forks", "forks.c", &[]),
    ("lifetimes", "lifetimes.c", &[]),
    ("before-attach", "before_attach.c", &[]),
    ("before-attach-classes", "before_attach_classes.cc", &["-s"]),
    (
        "heuristics",
        "heuristics.cc",
        &["-D_GLIBCXX_USE_CXX11_ABI=0"],
    ),
    ("reaper", "reaper.c", &[]),
    ("soak", "soak.c", &["-fno-omit-frame-pointer"]),
    // The same leaks for leaktrace, valgrind and LeakSanitizer (--xml, --format lsan).
    ("formats", "formats.c", &["-fno-omit-frame-pointer"]),
    (
        "formats-lsan",
        "formats.c",
        &["-fno-omit-frame-pointer", "-fsanitize=leak"],
    ),
    ("wrappers", "wrappers.c", &["-fno-omit-frame-pointer"]),
    ("unwind-loop", "unwind_loop.c", &["-fomit-frame-pointer"]),
    (
        "unwind-loop-fp",
        "unwind_loop.c",
        &["-fno-omit-frame-pointer"],
    ),
    // As distributions build: CFI only (gcc's defaults, spelled out).
    (
        "unwind",
        "unwind.c",
        &["-fomit-frame-pointer", "-fasynchronous-unwind-tables"],
    ),
];

pub fn dir() -> PathBuf {
    util::root().join("target/fixtures")
}

fn modified(p: &std::path::Path) -> Option<std::time::SystemTime> {
    p.metadata().and_then(|m| m.modified()).ok()
}

/// Builds the fixtures that are missing or older than their sources.
pub fn build() -> anyhow::Result<PathBuf> {
    step("fixtures");
    let src_dir = util::root().join("fixtures");
    let out_dir = dir();
    std::fs::create_dir_all(&out_dir)?;
    let header = modified(&src_dir.join("fixture.h"));
    for (name, source, flags) in FIXTURES {
        let src = src_dir.join(source);
        let out = out_dir.join(name);
        let newest_input = modified(&src).max(header);
        if modified(&out).is_some_and(|built| Some(built) >= newest_input) {
            continue;
        }
        let compiler = if source.ends_with(".cc") {
            "g++"
        } else {
            "gcc"
        };
        eprintln!("xtask: {compiler} {source} -> {}", out.display());
        util::run(
            Command::new(compiler)
                .args(["-g", "-O2", "-pthread", "-Wall"])
                .args(*flags)
                .arg("-o")
                .arg(&out)
                .arg(&src),
        )
        .with_context(|| format!("cannot build fixture {name} (is {compiler} installed?)"))?;
    }
    Ok(out_dir)
}
