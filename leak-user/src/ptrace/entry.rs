//! Holding a launched command at its entry point, once the loader has mapped its
//! libraries.
//!
//! Call sites inside allocation wrappers (operator new, strdup) can only be resolved
//! once the libraries holding them are mapped, and a short program allocates within
//! a millisecond of starting. So at the exec stop a one-byte breakpoint (int3) goes
//! on the entry point (`AT_ENTRY`); when the command stops there the byte goes back
//! and the instruction pointer is rewound before it runs on. If the tracer lets go
//! of the command before it got there, the byte goes back too.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt as _,
};

use super::sys::{self, pid_t};

/// `AT_ENTRY` in the auxiliary vector: the program's entry point.
const AT_ENTRY: u64 = 9;
const INT3: u8 = 0xcc;

/// A breakpoint at a stopped command's entry point.
#[derive(Debug)]
pub struct EntryBreak {
    pub addr: u64,
    /// The instruction byte the breakpoint replaced.
    byte: u8,
}

fn memory(pid: pid_t) -> io::Result<File> {
    // A tracer may write even read-only text through /proc/PID/mem.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
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

impl EntryBreak {
    /// Puts the breakpoint on `pid`'s entry point (`pid` must be stopped).
    pub fn arm(pid: pid_t) -> io::Result<Self> {
        let addr = entry_point(pid)?;
        // Only ever patch code: a 32-bit image's auxiliary vector reads differently.
        let maps = crate::proc::maps::read(pid as u32)?;
        if !maps.iter().any(|m| m.exec && m.contains(addr)) {
            return Err(io::Error::other(format!(
                "entry point {addr:#x} is not in executable memory"
            )));
        }
        let mem = memory(pid)?;
        let mut byte = [0u8];
        mem.read_exact_at(&mut byte, addr)?;
        mem.write_all_at(&[INT3], addr)?;
        Ok(Self {
            addr,
            byte: byte[0],
        })
    }

    /// Puts the original byte back (`pid` must be stopped).
    pub fn disarm(&self, pid: pid_t) -> io::Result<()> {
        memory(pid)?.write_all_at(&[self.byte], self.addr)
    }

    /// For `pid` stopped by a SIGTRAP: whether this breakpoint stopped it. If so,
    /// the breakpoint is undone and `pid` will run the entry's real instruction.
    pub fn hit(&self, pid: pid_t) -> io::Result<bool> {
        let mut regs = sys::get_regs(pid)?;
        if regs.rip != self.addr + 1 {
            return Ok(false);
        }
        self.disarm(pid)?;
        regs.rip = self.addr;
        sys::set_regs(pid, &regs)?;
        Ok(true)
    }
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
}
