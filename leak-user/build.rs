//! Puts the eBPF object at `$OUT_DIR/leaktrace-ebpf`, where `src/ebpf/mod.rs` embeds it.
//!
//! Two sources, chosen by `LEAKTRACE_EBPF`:
//!
//! * `source`: build `leak-ebpf` with aya-build (nightly Rust with `rust-src`, and
//!   `bpf-linker` on PATH; `cargo xtask setup` installs both). Paths are trimmed so
//!   that the object is byte-for-byte the same wherever the checkout lives.
//! * `prebuilt`: use the object committed at `leak-user/ebpf/leaktrace.bpf.o`, so that
//!   `cargo install` works with stable Rust alone.
//! * unset (`auto`): `source` when that toolchain is present, else `prebuilt`, saying so.
//!
//! `cargo xtask ebpf --check` rebuilds from source and fails if the committed object
//! is stale; `cargo xtask ebpf --update` refreshes it.

use std::{env, fs, path::PathBuf, process::Command};

const COMMITTED: &str = "ebpf/leaktrace.bpf.o";
/// aya-build names its output after the eBPF crate's binary target.
const OBJECT_NAME: &str = "leaktrace-ebpf";

fn main() {
    println!("cargo:rerun-if-env-changed=LEAKTRACE_EBPF");
    println!("cargo:rerun-if-changed={COMMITTED}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let mode = env::var("LEAKTRACE_EBPF").unwrap_or_else(|_| "auto".to_owned());
    let origin = match mode.as_str() {
        "source" => {
            build_from_source(&manifest_dir);
            "source"
        }
        "prebuilt" => {
            use_committed(&manifest_dir, &out_dir);
            "prebuilt"
        }
        "auto" => match missing_toolchain() {
            None => {
                build_from_source(&manifest_dir);
                "source"
            }
            Some(missing) => {
                println!(
                    "cargo:warning=leaktrace: {missing}; using the committed eBPF object {COMMITTED} \
                     (run `cargo xtask setup` to build it from source)"
                );
                use_committed(&manifest_dir, &out_dir);
                "prebuilt"
            }
        },
        other => panic!("LEAKTRACE_EBPF={other}: expected `source`, `prebuilt` or unset"),
    };
    println!("cargo:rustc-env=LEAKTRACE_EBPF_ORIGIN={origin}");
}

fn use_committed(manifest_dir: &std::path::Path, out_dir: &std::path::Path) {
    let src = manifest_dir.join(COMMITTED);
    let dst = out_dir.join(OBJECT_NAME);
    fs::copy(&src, &dst).unwrap_or_else(|err| {
        panic!(
            "cannot copy the committed eBPF object {}: {err}; build it with `cargo xtask ebpf --update`",
            src.display()
        )
    });
}

/// What is missing to build the eBPF object from source, if anything.
fn missing_toolchain() -> Option<String> {
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not on PATH".to_owned());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success());
    let Some(sysroot) = sysroot else {
        return Some("no nightly Rust toolchain".to_owned());
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Some("the nightly toolchain has no rust-src component".to_owned());
    }
    None
}

fn build_from_source(manifest_dir: &std::path::Path) {
    let ebpf_dir = manifest_dir.join("../leak-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("checkout path is UTF-8");
    // Reproducible objects: strip the checkout and registry paths from debug info
    // and BTF line info (nightly cargo's trim-paths; aya-build owns RUSTFLAGS).
    // SAFETY: build scripts are single-threaded.
    unsafe {
        env::set_var("CARGO_UNSTABLE_TRIM_PATHS", "true");
        env::set_var("CARGO_PROFILE_RELEASE_TRIM_PATHS", "all");
    }
    let package = aya_build::Package {
        name: "leak-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    if let Err(err) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!(
            "building the eBPF programs failed: {err:#}\n\
             run `cargo xtask setup`, or build with LEAKTRACE_EBPF=prebuilt to use the committed object"
        );
    }
}
