//! Reading target memory in large chunks.
//!
//! `process_vm_readv` is measurably faster than `pread` on `/proc/PID/mem` here
//! (`cargo xtask bench` prints both); a read that fails part-way (a page was unmapped
//! since we read the maps) returns what it got, and the caller treats the rest as gone.

use std::{fs::File, io, os::unix::fs::FileExt as _};

/// Something the scanner can read target memory from (a live process, or a test's
/// fake address space).
pub trait MemorySource {
    /// Reads up to `buf.len()` bytes at `addr`; returns how many were read before the
    /// first unreadable byte.
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize;
}

/// How to read a live process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMethod {
    ProcessVmReadv,
    ProcMem,
}

/// A live process's memory.
pub struct ProcessMemory {
    pid: libc::pid_t,
    method: ReadMethod,
    mem: Option<File>,
}

impl ProcessMemory {
    pub fn open(pid: u32, method: ReadMethod) -> io::Result<Self> {
        let mem = match method {
            ReadMethod::ProcMem => Some(File::open(format!("/proc/{pid}/mem"))?),
            ReadMethod::ProcessVmReadv => None,
        };
        Ok(Self {
            pid: pid as libc::pid_t,
            method,
            mem,
        })
    }

    fn readv_once(&self, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which we own mutably; the kernel validates
        // the remote range.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl MemorySource for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let at = addr + done as u64;
            let rest = &mut buf[done..];
            let got = match (self.method, &self.mem) {
                (ReadMethod::ProcMem, Some(mem)) => mem.read_at(rest, at),
                _ => self.readv_once(at, rest),
            };
            match got {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        done
    }
}

/// A fake address space made of byte vectors, for tests and benchmarks of the
/// scanner without a live target (the `test-support` feature).
#[cfg(any(test, feature = "test-support"))]
#[derive(Default)]
pub struct FakeMemory {
    regions: Vec<(u64, Vec<u8>)>,
}

#[cfg(any(test, feature = "test-support"))]
impl FakeMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `len` zero bytes at `addr`.
    pub fn map(&mut self, addr: u64, len: usize) {
        self.regions.push((addr, vec![0; len]));
        self.regions.sort_by_key(|r| r.0);
    }

    /// Writes a word; the address must be mapped.
    pub fn write_u64(&mut self, addr: u64, value: u64) {
        let (base, bytes) = self
            .regions
            .iter_mut()
            .find(|(b, v)| *b <= addr && addr + 8 <= *b + v.len() as u64)
            .expect("write inside a mapped region");
        let at = (addr - *base) as usize;
        bytes[at..at + 8].copy_from_slice(&value.to_ne_bytes());
    }
}

#[cfg(any(test, feature = "test-support"))]
impl MemorySource for FakeMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> usize {
        let mut done = 0;
        while done < buf.len() {
            let at = addr + done as u64;
            let Some((base, bytes)) = self
                .regions
                .iter()
                .find(|(b, v)| *b <= at && at < *b + v.len() as u64)
            else {
                break;
            };
            let from = (at - base) as usize;
            let n = (bytes.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[from..from + n]);
            done += n;
        }
        done
    }
}
