//! The entry-point hold of a launched command: a uprobe on its entry point, for
//! that process only, whose program sends it [`leak_common::ENTRY_HOLD_SIGNAL`]
//! (see `leak-ebpf/src/probes/entry.rs`). It replaces a breakpoint written into the
//! command's code, which killed the command with SIGTRAP when the tracer died
//! before taking it out; a uprobe goes away with the tracer.

use std::{num::NonZeroU32, path::Path};

use aya::programs::{
    UProbe,
    uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
};

use super::{EbpfError, Probes};

const PROGRAM: &str = "entry_hold";

impl Probes {
    /// Holds `pid` when it reaches `file_offset` of `file` (its entry point).
    pub fn attach_entry_hold(
        &mut self,
        pid: u32,
        file: &Path,
        file_offset: u64,
    ) -> Result<(), EbpfError> {
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pids are not 0"));
        let probe: &mut UProbe = self.program(PROGRAM)?;
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(file_offset),
            cookie: None,
        };
        let link = probe
            .attach(point, file, scope)
            .map_err(|source| EbpfError::Attach {
                what: format!("the entry point of process {pid}"),
                source,
            })?;
        self.uprobe_links.push((pid, PROGRAM, link));
        Ok(())
    }

    /// Removes `pid`'s entry hold (it got there, or it is gone).
    pub fn detach_entry_hold(&mut self, pid: u32) {
        let links: Vec<_> = self
            .uprobe_links
            .extract_if(.., |(p, name, _)| *p == pid && *name == PROGRAM)
            .collect();
        self.drop_uprobe_links(links);
    }
}
