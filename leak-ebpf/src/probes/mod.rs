//! One file per hook family. Each probe is a thin `#[uprobe]`/`#[tracepoint]`
//! function that calls a `try_*` body; the body returns early when the running
//! process is not traced.

pub mod alloc;
pub mod entry;
pub mod free;
pub mod kmem;
pub mod mapping;
pub mod process;
pub mod ret;

/// x86-64 registers of a uprobe context.
#[cfg(bpf_target_arch = "x86_64")]
pub mod regs {
    use aya_ebpf::bindings::pt_regs;

    #[inline(always)]
    pub fn sp(r: &pt_regs) -> u64 {
        r.rsp
    }
    #[inline(always)]
    pub fn arg(r: &pt_regs, n: usize) -> u64 {
        match n {
            0 => r.rdi,
            1 => r.rsi,
            _ => r.rdx,
        }
    }
    #[inline(always)]
    pub fn ret(r: &pt_regs) -> u64 {
        r.rax
    }
    /// The pc: in a return probe, the address the function returns to.
    #[inline(always)]
    pub fn ip(r: &pt_regs) -> u64 {
        r.rip
    }
}

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!(
    "leaktrace's uprobes read x86-64 registers; other architectures are not supported yet"
);
