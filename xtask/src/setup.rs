//! Making the eBPF toolchain available: the nightly's `rust-src`, and a
//! `bpf-linker` linked against the nightly's own LLVM (its default features want a
//! system LLVM that Debian does not ship). Idempotent; says what it does; fails with
//! one line saying what is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{self, output, step};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// The nightly toolchain's sysroot.
fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("rustup is not on PATH; install Rust with rustup (https://rustup.rs)")?;
    if !out.status.success() {
        bail!("no nightly toolchain: install it with `rustup toolchain install nightly`");
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The nightly's libLLVM file name and LLVM major version.
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<(PathBuf, u32)> {
    let lib = sysroot.join("lib");
    for entry in
        std::fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // libLLVM.so.22.1-rust-1.97.0-nightly
        if let Some(rest) = name.strip_prefix("libLLVM.so.")
            && let Some(major) = rest.split('.').next().and_then(|m| m.parse().ok())
        {
            return Ok((lib.join(&name), major));
        }
    }
    bail!(
        "the nightly toolchain at {} ships no libLLVM.so",
        sysroot.display()
    )
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// The libLLVM soname an installed bpf-linker needs, if it is dynamically linked.
fn linker_llvm_soname(linker: &Path) -> Option<String> {
    let text = output(Command::new("ldd").arg(linker)).ok()?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("libLLVM"))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned)
}

pub fn run() -> anyhow::Result<()> {
    step("setup: eBPF toolchain");
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("xtask: nightly rust-src: present");
    } else {
        eprintln!("xtask: installing rust-src for the nightly toolchain");
        util::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("cannot install rust-src (no network to static.rust-lang.org?)")?;
    }
    let (libllvm, major) = nightly_llvm(&sysroot)?;
    let soname = libllvm
        .file_name()
        .expect("a file")
        .to_string_lossy()
        .into_owned();
    if let Ok(linker) = which::which("bpf-linker")
        && linker_llvm_soname(&linker).as_deref() == Some(soname.as_str())
    {
        eprintln!(
            "xtask: bpf-linker: {} (LLVM {major}, the nightly's)",
            linker.display()
        );
        return Ok(());
    }
    // A folder with libLLVM.so (and the soname) pointing at the nightly's library,
    // for bpf-linker's build script and, through its RUNPATH, at run time.
    let prefix = cargo_home().join("leaktrace-llvm").join(&soname);
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} at {} (about a minute)",
        prefix.display()
    );
    util::run(
        Command::new(util::cargo_bin())
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("cannot build bpf-linker (no network to crates.io?)")?;
    let linker = which::which("bpf-linker")
        .context("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH")?;
    eprintln!("xtask: bpf-linker: {}", linker.display());
    Ok(())
}

/// The PyPI package the XML test reads valgrind's and leaktrace's XML with, and
/// its version (a real consumer of memcheck XML).
const VALGRIND_XML_READER: &str = "ValgrindCI==0.3.0";

/// Debian packages the integration tests use, installed when missing (as root):
/// jemalloc, valgrind (the XML comparison), tmux (the live view), python3's venv,
/// prometheus, golang-go (`go tool pprof`) and bpftool for the fleet tests;
/// then the PyPI valgrind-XML reader in its own environment (`target/pyenv`).
pub fn test_packages() -> anyhow::Result<()> {
    step("setup: test packages");
    ensure_packages(&[
        ("libjemalloc2", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
        ("valgrind", "/usr/bin/valgrind"),
        ("tmux", "/usr/bin/tmux"),
    ])?;
    // Recommends would add services (prometheus-node-exporter) and CI time that
    // no test uses.
    install_missing(
        &[
            // A real Prometheus server and promtool for the --metrics test.
            ("prometheus", "/usr/bin/promtool"),
            // `go tool pprof` reads the --pprof-dir profiles back.
            ("golang-go", "/usr/bin/go"),
            // The service test checks that no program or link is left.
            ("bpftool", "/usr/sbin/bpftool"),
        ],
        false,
    )?;
    python_reader()
}

/// What the integration tests are told in their environment, natively and in a
/// VM: where the fixtures are built, and the Python with the valgrind-XML reader.
pub fn test_env() -> [(&'static str, String); 2] {
    [
        (
            "LEAKTRACE_FIXTURES",
            crate::fixtures::dir().display().to_string(),
        ),
        ("LEAKTRACE_PYTHON", python().display().to_string()),
    ]
}

/// The Python interpreter of the environment that holds the valgrind-XML reader.
pub fn python() -> PathBuf {
    util::root().join("target/pyenv/bin/python3")
}

/// Creates `target/pyenv` (python3 -m venv) and installs the valgrind-XML reader
/// from PyPI into it, when it is not there yet.
fn python_reader() -> anyhow::Result<()> {
    let python = python();
    let present = python.exists()
        && Command::new(&python)
            .args(["-c", "import ValgrindCI.parse"])
            .output()
            .is_ok_and(|o| o.status.success());
    if present {
        eprintln!("xtask: {VALGRIND_XML_READER} present in target/pyenv");
        return Ok(());
    }
    let env = util::root().join("target/pyenv");
    let venv = || util::run(Command::new("python3").arg("-m").arg("venv").arg(&env));
    if venv().is_err() {
        // Debian's python3 makes environments only with python3-venv.
        ensure_packages(&[("python3-venv", "/usr/share/doc/python3-venv/copyright")])?;
        venv().context("cannot create a Python environment (python3 -m venv)")?;
    }
    util::run(Command::new(&python).args(["-m", "pip", "install", "--quiet", VALGRIND_XML_READER]))
        .with_context(|| format!("cannot install {VALGRIND_XML_READER} from PyPI"))?;
    Ok(())
}

/// Installs the Debian packages (name, a file it provides) whose file is missing
/// (as root).
pub fn ensure_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    install_missing(wanted, true)
}

/// [`ensure_packages`], with or without the packages' recommends.
fn install_missing(wanted: &[(&str, &str)], recommends: bool) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = wanted.iter().map(|(pkg, _)| *pkg).collect();
        eprintln!("xtask: packages present: {}", names.join(" "));
        return Ok(());
    }
    if !util::is_root() {
        bail!(
            "this needs {} (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    util::run(Command::new("apt-get").args(["update", "-qq"]))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args((!recommends).then_some("--no-install-recommends"))
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("cannot install {}", missing.join(" ")))?;
    Ok(())
}
