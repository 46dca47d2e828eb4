//! The committed eBPF object: rebuilt from source, compared byte for byte, or
//! refreshed. The build trims paths, so the object does not depend on where the
//! checkout lives.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::util::{self, step};

const COMMITTED: &str = "leak-user/ebpf/leaktrace.bpf.o";

/// Builds the daemon with the eBPF object from source; returns the object's path.
fn build_from_source() -> anyhow::Result<PathBuf> {
    let out = util::output(
        Command::new(util::cargo_bin())
            .args(["build", "--package", "leaktrace", "--message-format=json"])
            .env("LEAKTRACE_EBPF", "source")
            .current_dir(util::root()),
    )?;
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_ours = msg["reason"] == "build-script-executed"
            && msg["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("leak-user"));
        if is_ours && let Some(dir) = msg["out_dir"].as_str() {
            return Ok(PathBuf::from(dir).join("leaktrace-ebpf"));
        }
    }
    bail!("cargo did not report leak-user's build script output directory")
}

pub fn run(check: bool, update: bool) -> anyhow::Result<()> {
    crate::setup::run()?;
    step("eBPF object from source");
    let built = build_from_source()?;
    let fresh =
        std::fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    let committed_path = util::root().join(COMMITTED);
    let committed = std::fs::read(&committed_path).unwrap_or_default();
    let same = fresh == committed;
    eprintln!(
        "xtask: eBPF object: {} bytes, committed copy {}",
        fresh.len(),
        if same { "identical" } else { "differs" }
    );
    if update && !same {
        std::fs::write(&committed_path, &fresh)
            .with_context(|| format!("cannot write {}", committed_path.display()))?;
        eprintln!("xtask: updated {COMMITTED}");
    } else if check && !same {
        bail!("{COMMITTED} is stale: run `cargo xtask ebpf --update` and commit it");
    }
    Ok(())
}
