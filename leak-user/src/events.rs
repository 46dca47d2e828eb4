//! Ring-buffer records → typed events.
//!
//! The eBPF side writes raw `#[repr(C)]` records ([`leak_common`]); this module is
//! the only place that looks at their bytes. A record that is too short or carries
//! an unknown tag is an error the caller counts, never a panic.

use leak_common::{AllocFn, FreeRecord, KernelRecord, RecordKind, UnknownTag, UserRecord};

/// A decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new block from an allocating call.
    Alloc(Alloc),
    /// A block handed back (`free`, `operator delete`).
    Free { tgid: u32, tid: u32, addr: u64 },
    /// `realloc(old, …)` was entered: `old` may be released from here on.
    ReallocDetach { tgid: u32, tid: u32, old: u64 },
    /// `realloc(old, size)` returned `alloc.addr` (0: failed, or freed when size is 0).
    Realloc { alloc: Alloc, old: u64 },
    /// The allocator mapped `[addr, addr+len)` for itself.
    AllocatorMap { tgid: u32, addr: u64, len: u64 },
    /// `[addr, addr+len)` was unmapped.
    Unmap { tgid: u32, addr: u64, len: u64 },
    /// The program break moved to `brk`.
    Brk {
        tgid: u32,
        brk: u64,
        by_allocator: bool,
    },
    /// A traced process forked `child` (with `--follow-forks`).
    Fork { parent: u32, child: u32 },
    /// A traced process ended.
    Exit { tgid: u32 },
    /// A traced process called execve: its old heap is gone.
    Exec { tgid: u32 },
    /// A kernel slab (or page) allocation.
    KernelAlloc(KernelAlloc),
    /// A kernel slab (or page) free.
    KernelFree { ptr: u64, page: bool },
}

/// One allocation, as the probes saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alloc {
    pub tgid: u32,
    pub tid: u32,
    pub func: AllocFn,
    pub ts_ns: u64,
    pub addr: u64,
    pub size: u64,
    /// Key into the kernel's stack map; 0 when none was captured.
    pub stack_id: u64,
    /// The allocating call site (return address of the allocator call).
    pub caller: u64,
}

/// One kernel allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelAlloc {
    pub tgid: u32,
    pub tid: u32,
    pub in_irq: bool,
    pub page: bool,
    pub ts_ns: u64,
    pub ptr: u64,
    pub call_site: u64,
    pub bytes_req: u64,
    pub bytes_alloc: u64,
    pub stack_id: u64,
    pub cgroup_id: u64,
    /// Slab cache name; empty for kmalloc and pages.
    pub cache: String,
    pub comm: String,
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is shorter than its kind's layout.
    #[error("{kind:?} record of {len} bytes is too short")]
    TooShort {
        kind: Option<RecordKind>,
        len: usize,
    },
    /// The record's tag is not one this version knows.
    #[error("unknown record tag {0}")]
    UnknownKind(u32),
    /// An allocation record names an unknown allocator function.
    #[error("unknown allocator function {0}")]
    UnknownFunction(u32),
}

impl From<UnknownTag> for DecodeError {
    fn from(UnknownTag(tag): UnknownTag) -> Self {
        DecodeError::UnknownKind(tag)
    }
}

/// Reads a `T` from the start of `bytes`, if there are enough of them.
fn read_record<T: Copy>(bytes: &[u8], kind: RecordKind) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::TooShort {
            kind: Some(kind),
            len: bytes.len(),
        });
    }
    // SAFETY: the length was checked, T is a plain #[repr(C)] integer struct for which
    // every bit pattern is valid, and read_unaligned has no alignment requirement.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// An allocation is dated when the daemon reads it (`received_ns`), usually
/// within one drain period (10 ms) of the call: its record's stamp orders records
/// and need not be a time (`UserRecord::stamp`). Objects only look younger.
fn alloc_of(r: &UserRecord, received_ns: u64) -> Result<Alloc, DecodeError> {
    Ok(Alloc {
        tgid: r.tgid,
        tid: r.tid,
        func: AllocFn::try_from(r.func).map_err(|UnknownTag(f)| DecodeError::UnknownFunction(f))?,
        ts_ns: received_ns,
        addr: r.addr,
        size: r.size,
        stack_id: r.stack_id,
        caller: r.caller,
    })
}

/// Decodes one ring-buffer record, read at `received_ns` (CLOCK_MONOTONIC).
pub fn decode(bytes: &[u8], received_ns: u64) -> Result<Event, DecodeError> {
    let Some(tag) = bytes.get(..4) else {
        return Err(DecodeError::TooShort {
            kind: None,
            len: bytes.len(),
        });
    };
    let kind = RecordKind::try_from(u32::from_ne_bytes([tag[0], tag[1], tag[2], tag[3]]))?;
    if matches!(kind, RecordKind::KernelAlloc | RecordKind::PageAlloc) {
        let r: KernelRecord = read_record(bytes, kind)?;
        return Ok(Event::KernelAlloc(KernelAlloc {
            tgid: r.tgid,
            tid: r.tid,
            in_irq: r.in_irq != 0,
            page: kind == RecordKind::PageAlloc,
            ts_ns: r.ts_ns,
            ptr: r.ptr,
            call_site: r.call_site,
            bytes_req: r.bytes_req,
            bytes_alloc: r.bytes_alloc,
            stack_id: r.stack_id,
            cgroup_id: r.cgroup_id,
            cache: c_string(&r.cache),
            comm: c_string(&r.comm),
        }));
    }
    if kind == RecordKind::Free {
        let r: FreeRecord = read_record(bytes, kind)?;
        return Ok(Event::Free {
            tgid: r.tgid,
            tid: r.tid,
            addr: r.addr,
        });
    }
    let r: UserRecord = read_record(bytes, kind)?;
    Ok(match kind {
        RecordKind::Alloc => Event::Alloc(alloc_of(&r, received_ns)?),
        RecordKind::ReallocDetach => Event::ReallocDetach {
            tgid: r.tgid,
            tid: r.tid,
            old: r.old_addr,
        },
        RecordKind::Realloc => Event::Realloc {
            alloc: alloc_of(&r, received_ns)?,
            old: r.old_addr,
        },
        RecordKind::AllocatorMap => Event::AllocatorMap {
            tgid: r.tgid,
            addr: r.addr,
            len: r.size,
        },
        RecordKind::Unmap => Event::Unmap {
            tgid: r.tgid,
            addr: r.addr,
            len: r.size,
        },
        RecordKind::Brk => Event::Brk {
            tgid: r.tgid,
            brk: r.addr,
            by_allocator: r.func != 0,
        },
        RecordKind::Fork => Event::Fork {
            parent: r.tgid,
            child: r.addr as u32,
        },
        RecordKind::Exit => Event::Exit { tgid: r.tgid },
        RecordKind::Exec => Event::Exec { tgid: r.tgid },
        RecordKind::KernelFree | RecordKind::PageFree => Event::KernelFree {
            ptr: r.addr,
            page: kind == RecordKind::PageFree,
        },
        RecordKind::Free | RecordKind::KernelAlloc | RecordKind::PageAlloc => {
            unreachable!("handled above")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain #[repr(C)] value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn user(kind: RecordKind) -> UserRecord {
        UserRecord {
            kind: kind as u32,
            tgid: 10,
            tid: 11,
            func: AllocFn::Calloc as u32,
            stamp: 5,
            addr: 0x1000,
            size: 64,
            old_addr: 0x2000,
            stack_id: 7,
            caller: 0x4000,
        }
    }

    #[test]
    fn an_allocation_is_dated_when_it_is_read_not_by_its_stamp() {
        for stamp in [0, 5, u64::MAX] {
            let mut r = user(RecordKind::Alloc);
            r.stamp = stamp;
            let Event::Alloc(a) = decode(&bytes_of(&r), 7).unwrap() else {
                panic!("not an allocation");
            };
            assert_eq!(a.ts_ns, 7, "stamp {stamp}");
        }
    }

    #[test]
    fn decodes_frees_from_their_compact_record() {
        let free = FreeRecord {
            kind: RecordKind::Free as u32,
            tgid: 10,
            tid: 11,
            _pad: 0,
            stamp: 5,
            addr: 0x1000,
        };
        assert_eq!(
            decode(&bytes_of(&free), 7),
            Ok(Event::Free {
                tgid: 10,
                tid: 11,
                addr: 0x1000
            })
        );
    }

    #[test]
    fn decodes_allocations() {
        let event = decode(&bytes_of(&user(RecordKind::Alloc)), 7).unwrap();
        assert_eq!(
            event,
            Event::Alloc(Alloc {
                tgid: 10,
                tid: 11,
                func: AllocFn::Calloc,
                ts_ns: 7,
                addr: 0x1000,
                size: 64,
                stack_id: 7,
                caller: 0x4000
            })
        );
        let Event::Realloc { alloc, old } =
            decode(&bytes_of(&user(RecordKind::Realloc)), 7).unwrap()
        else {
            panic!("not a realloc");
        };
        assert_eq!((alloc.addr, old), (0x1000, 0x2000));
    }

    #[test]
    fn decodes_process_and_mapping_records() {
        assert_eq!(
            decode(&bytes_of(&user(RecordKind::Fork)), 7).unwrap(),
            Event::Fork {
                parent: 10,
                child: 0x1000
            }
        );
        let mut brk = user(RecordKind::Brk);
        brk.func = 1;
        assert_eq!(
            decode(&bytes_of(&brk), 7).unwrap(),
            Event::Brk {
                tgid: 10,
                brk: 0x1000,
                by_allocator: true
            }
        );
    }

    #[test]
    fn decodes_kernel_records() {
        let mut cache = [0u8; 32];
        cache[..9].copy_from_slice(b"kmalloc-8");
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        let record = KernelRecord {
            kind: RecordKind::KernelAlloc as u32,
            tgid: 1,
            tid: 2,
            in_irq: 1,
            ts_ns: 3,
            ptr: 0xffff_8880_0000_1000,
            call_site: 0xffff_ffff_8100_0000,
            bytes_req: 5,
            bytes_alloc: 8,
            stack_id: 9,
            cgroup_id: 10,
            cache,
            comm,
        };
        let Event::KernelAlloc(k) = decode(&bytes_of(&record), 7).unwrap() else {
            panic!("not a kernel allocation");
        };
        assert_eq!(
            (k.cache.as_str(), k.comm.as_str(), k.in_irq),
            ("kmalloc-8", "bash", true)
        );
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(
            decode(&[1, 0], 7),
            Err(DecodeError::TooShort { kind: None, len: 2 })
        );
        assert_eq!(decode(&[99, 0, 0, 0], 7), Err(DecodeError::UnknownKind(99)));
        let short = &bytes_of(&user(RecordKind::Free))[..20];
        assert!(matches!(
            decode(short, 7),
            Err(DecodeError::TooShort { .. })
        ));
        let mut bad = user(RecordKind::Alloc);
        bad.func = 77;
        assert_eq!(
            decode(&bytes_of(&bad), 7),
            Err(DecodeError::UnknownFunction(77))
        );
    }
}
