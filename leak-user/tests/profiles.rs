//! `--pprof-dir`: a profile per interval, rotated, that `go tool pprof` (Debian's
//! golang-go, which `cargo xtask test` installs) opens with mappings and build IDs
//! and whose last one holds the leaks of the final report.

use std::{path::Path, process::Command};

use crate::util::{self, serial};

/// `go tool pprof ARGS FILE`'s output.
fn pprof(args: &[&str], file: &Path) -> String {
    assert!(
        Path::new("/usr/bin/go").exists(),
        "go is missing: `cargo xtask test` installs it (Debian package golang-go)"
    );
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go tool pprof: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The GNU build ID of an ELF file, as readelf prints it.
fn readelf_build_id(file: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-n")
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("the fixture has a build ID")
        .to_owned()
}

#[test]
fn a_profile_per_interval_rotated_and_readable_by_go_pprof() {
    util::require_root();
    let _s = serial();
    let dir = util::scratch("pprof-dir");
    let profiles = dir.join("profiles");
    let profiles_arg = profiles.display().to_string();
    let run = util::launch(
        "scenarios",
        &["--hold-ms", "3000"],
        &[
            "--interval",
            "300ms",
            "--min-age",
            "0s",
            "--pprof-dir",
            &profiles_arg,
            "--pprof-keep",
            "3",
        ],
    );
    assert!(run.ended_well(), "stderr:\n{}", run.stderr);
    let mut files: Vec<_> = std::fs::read_dir(&profiles)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let scans = run.of_type("scan").len();
    assert!(
        scans > 3,
        "{scans} scans: more intervals than profiles kept"
    );
    assert_eq!(files.len(), 3, "rotated to --pprof-keep: {files:?}");

    // The last profile is the final report's leaks, with the executable's mapping
    // and build ID.
    let last = files.last().unwrap();
    let raw = pprof(&["-raw"], last);
    let fixture = util::fixture("scenarios").canonicalize().unwrap();
    let build_id = readelf_build_id(&fixture);
    let mapping = raw
        .lines()
        .skip_while(|l| !l.starts_with("Mappings"))
        .find(|l| l.contains(&*fixture.to_string_lossy()))
        .unwrap_or_else(|| panic!("no mapping of the fixture:\n{raw}"));
    assert!(mapping.contains(&build_id), "{mapping} lacks {build_id}");
    assert!(
        raw.contains("inuse_objects/count inuse_space/bytes"),
        "{raw}"
    );
    let (mut objects, mut bytes) = (0u64, 0u64);
    for line in raw
        .lines()
        .skip_while(|l| !l.starts_with("Samples"))
        .skip(2)
        .take_while(|l| !l.starts_with("Locations"))
    {
        let mut v = line.split_whitespace();
        objects += v.next().unwrap().parse::<u64>().unwrap();
        bytes += v
            .next()
            .unwrap()
            .trim_end_matches(':')
            .parse::<u64>()
            .unwrap();
    }
    let leaks = &run.end()["leaks"];
    assert_eq!(
        (objects, bytes),
        (
            leaks["objects"].as_u64().unwrap(),
            leaks["bytes"].as_u64().unwrap()
        ),
        "{raw}"
    );
    // -top names the functions that leaked.
    let top = pprof(&["-top", "-sample_index=inuse_space"], last);
    assert!(top.contains("big_blocks"), "{top}");
}
