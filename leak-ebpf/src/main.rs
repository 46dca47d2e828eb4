//! leaktrace's eBPF programs.
//!
//! Every program writes fixed-layout records ([`leak_common`]) into its CPU's ring
//! buffer (user mode) or the one ring of kernel mode. A user-mode record carries a
//! stamp taken after its room was reserved (`record::stamp`): a block's address can
//! only be handed out again after the record of its release was stamped, so the
//! daemon can replay the rings in order of stamps and never confuse two lives of
//! one address.
//!
//! * `probes::alloc`   — entry of every allocating function (malloc … operator new)
//! * `probes::ret`     — their returns, where the new block's address is known
//! * `probes::free`    — free / operator delete
//! * `probes::entry`   — holds a launched command at its entry point (a signal, not a breakpoint)
//! * `probes::process` — fork, exec, exit of traced processes
//! * `probes::mapping` — mmap/mremap/munmap/brk, to know which memory the allocator owns
//! * `probes::kmem`    — kernel slab mode (kmalloc, kmem_cache_alloc and their frees)
//! * `unwind`          — user stacks walked with the daemon's CFI tables (no frame pointers needed)
//! * `site`            — an allocation's stack and call site; a walk is reused while the stack
//!   still holds every word it read
//! * `calls`           — each thread's allocator call between entry and return
//!   (task-local storage, or a hash map by tid where the kernel refuses it)
//!
//! Whatever cannot be recorded is counted in `LOSSES` ([`leak_common::Loss`]), never
//! dropped silently. On the host this crate compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `atomic_xadd`: the BPF target has no compare-and-swap, so `core`'s atomics
// offer no fetch_add; the intrinsic with its result unused is the BPF atomic add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod calls;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod probes;
#[cfg(target_arch = "bpf")]
mod record;
#[cfg(target_arch = "bpf")]
mod site;
#[cfg(target_arch = "bpf")]
mod unwind;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is never
    // called; it exists because no_std requires it.
    loop {}
}

/// bpf_probe_read_user, ring buffers and stack capture need a GPL-compatible license.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
