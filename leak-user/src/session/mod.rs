//! What user mode ([`crate::user`]) and kernel mode ([`crate::kernel`]) share: the
//! ingest task that drains the ring buffer into a table, the status line and the
//! progress line, the eBPF log pump, the traced processes' names, and the event
//! figures of stats records.

pub mod figures;
pub mod ingest;
pub mod logging;
pub mod merge;
pub mod progress;
pub mod status;

use crate::report::records::Target;

/// A traced process as the start record names it (empty names if it is gone).
pub fn target(pid: u32) -> Target {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    Target {
        pid,
        comm: crate::proc::comm(pid).unwrap_or_default(),
        cmdline,
    }
}
