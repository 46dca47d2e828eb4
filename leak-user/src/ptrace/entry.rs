//! Holding a launched command at its entry point, once the loader has mapped its
//! libraries.
//!
//! Call sites inside allocation wrappers (operator new, strdup) can only be resolved
//! once the libraries holding them are mapped, and a short program allocates within
//! a millisecond of starting. So at the exec stop the session puts a uprobe, for this
//! process only, on the entry point (`AT_ENTRY`); its eBPF program sends the thread
//! [`ENTRY_HOLD_SIGNAL`], which stops a traced thread (a signal-delivery stop) before
//! the program proper runs. The worker recognises that stop, holds the command until
//! the hints are in, and suppresses the signal.
//!
//! Nothing here can harm the command if the tracer dies at any moment: its code is
//! never written (the uprobe is the kernel's, and goes with the tracer's perf
//! event), and the signal's default action is to ignore it, so a command left in
//! that stop runs on. (An int3 written into the code, as this module did before,
//! killed the command with SIGTRAP when the tracer died before taking it out.)

use std::{io, path::PathBuf};

pub use leak_common::ENTRY_HOLD_SIGNAL;

use super::sys::{self, pid_t};

/// `AT_ENTRY` in the auxiliary vector: the program's entry point.
const AT_ENTRY: u64 = 9;

/// Where a stopped command's entry point is, as a uprobe needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub addr: u64,
    /// The mapped file, through `/proc/PID/map_files/` (which still opens when the
    /// file was deleted or replaced on disk).
    pub file: PathBuf,
    pub file_offset: u64,
}

/// The entry point of the image `pid` runs, from its auxiliary vector.
pub fn entry_point(pid: pid_t) -> io::Result<u64> {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv"))?;
    auxv_entry(&auxv).ok_or_else(|| io::Error::other("no AT_ENTRY in the auxiliary vector"))
}

fn auxv_entry(auxv: &[u8]) -> Option<u64> {
    auxv.chunks_exact(16).find_map(|pair| {
        let key = u64::from_ne_bytes(pair[..8].try_into().ok()?);
        let value = u64::from_ne_bytes(pair[8..].try_into().ok()?);
        (key == AT_ENTRY).then_some(value)
    })
}

/// Finds `pid`'s entry point in the file that maps it (`pid` must be stopped).
pub fn locate(pid: u32) -> io::Result<EntryPoint> {
    let addr = entry_point(pid as pid_t)?;
    // Only ever probe code: a 32-bit image's auxiliary vector reads differently.
    let maps = crate::proc::maps::read(pid)?;
    let m = maps
        .iter()
        .find(|m| m.exec && m.contains(addr) && m.file().is_some())
        .ok_or_else(|| {
            io::Error::other(format!(
                "entry point {addr:#x} is not in a file's executable mapping"
            ))
        })?;
    Ok(EntryPoint {
        addr,
        file: crate::proc::map_file(pid, m),
        file_offset: addr - m.start + m.offset,
    })
}

/// For `pid` in a signal-delivery stop of `signal`: is it the entry hold's?
pub fn is_hold(pid: pid_t, signal: i32) -> bool {
    signal == ENTRY_HOLD_SIGNAL as i32 && sys::signal_code(pid).is_ok_and(|c| c == libc::SI_KERNEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_entry_in_an_auxiliary_vector() {
        let mut auxv = Vec::new();
        for (k, v) in [(6u64, 4096u64), (9, 0x5555_0000_1040), (0, 0)] {
            auxv.extend_from_slice(&k.to_ne_bytes());
            auxv.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(auxv_entry(&auxv), Some(0x5555_0000_1040));
        assert_eq!(auxv_entry(&auxv[..16]), None);
    }

    #[test]
    fn the_hold_signal_is_ignored_by_default() {
        // The whole point: if the tracer dies, the pending signal must not kill.
        assert_eq!(ENTRY_HOLD_SIGNAL as i32, libc::SIGURG);
    }
}
