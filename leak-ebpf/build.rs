//! Declares the `bpf_target_arch` cfg, and rebuilds the eBPF object when the
//! bpf-linker binary changes (cargo cannot know the link step depends on it).
fn main() {
    if let Err(err) = aya_build::emit_bpf_target_arch_cfg() {
        panic!("cannot determine the BPF target architecture: {err:#}");
    }
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
