//! What user mode ([`crate::user`]) and kernel mode ([`crate::kernel`]) share: the
//! ingest task that drains the ring buffer into a table, the status line, the eBPF
//! log pump, how a run ends, the traced processes' names, and the event figures of
//! stats records.

pub mod figures;
pub mod ingest;
pub mod logging;
pub mod status;

use serde::Serialize;

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Every target exited.
    TargetsExited,
    /// SIGINT or SIGTERM.
    Signal,
    /// --duration elapsed.
    Duration,
    /// The output reader went away.
    OutputClosed,
}

/// A traced process, for the start record.
#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    pub pid: u32,
    pub comm: String,
    pub cmdline: Vec<String>,
}

impl TargetInfo {
    pub fn of(pid: u32) -> Self {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            pid,
            comm: crate::proc::comm(pid).unwrap_or_default(),
            cmdline,
        }
    }
}
