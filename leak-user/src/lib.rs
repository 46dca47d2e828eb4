//! leaktrace: find real memory leaks in running processes with eBPF.
//!
//! The daemon's pure parts (event decoding, the object table, the mark and sweep,
//! report rendering) take plain data and are unit-tested without root; the kernel
//! plumbing (loading and attaching eBPF, ptrace, /proc) is kept apart. See
//! ARCHITECTURE.md for the data flow and the lock.

pub mod allocator;
pub mod cli;
pub mod clock;
pub mod config;
pub mod ebpf;
pub mod events;
pub mod fleet;
pub mod kernel;
pub mod metrics;
pub mod proc;
pub mod ptrace;
pub mod report;
pub mod scan;
pub mod session;
pub mod symbolize;
pub mod table;
pub mod unwind;
pub mod user;
