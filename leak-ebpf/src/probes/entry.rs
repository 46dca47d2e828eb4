//! Holding a launched command at its entry point without changing its code.
//!
//! The daemon attaches this uprobe, for one process only, at the file offset of the
//! command's entry point (`AT_ENTRY`) while the command is held at its exec stop.
//! When the loader jumps there, the probe sends the thread
//! [`leak_common::ENTRY_HOLD_SIGNAL`]; the tracer sees it as a signal-delivery stop,
//! installs the wrapper hints (every library is mapped by then) and suppresses it.
//! Nothing of this outlives the tracer: the uprobe goes with its perf event, and the
//! signal's default action is to ignore it.

use aya_ebpf::{
    helpers::generated::bpf_send_signal_thread, macros::uprobe, programs::ProbeContext,
};
use leak_common::ENTRY_HOLD_SIGNAL;

#[uprobe]
pub fn entry_hold(_ctx: ProbeContext) -> u32 {
    // SAFETY: the helper only queues a signal for the current thread.
    unsafe { bpf_send_signal_thread(ENTRY_HOLD_SIGNAL) };
    0
}
