//! Reads a ring buffer in place: [`RingReader::head`] shows the next committed
//! record without taking it (the merge of several rings compares their heads),
//! [`RingReader::advance`] takes it.
//!
//! Every reservation a probe makes reads the ring's consumer position, to see whether
//! the record fits. aya's `RingBuf` publishes that position after every record it
//! reads, so while the daemon drains, each publish moves the position's cache line
//! to the daemon's CPU and the next probe on another CPU misses on it. This reader
//! publishes the position once per [`RELEASE_BYTES`] of records and at the end of a
//! drain ([`RingReader::finish`]), and reads the producer position only when it has caught up with the last
//! value it read. The ring is 16 MiB by default; holding back 256 KiB of read
//! records costs the probes nothing but that much room.
//!
//! Layout (the kernel's `kernel/bpf/ringbuf.c`): one page holding the consumer
//! position, mapped read-write; then one page holding the producer position and
//! the data pages twice over, mapped read-only, so a record that wraps around the
//! end reads as one slice. Each record starts with an 8-byte header: its length in
//! the low 30 bits, a busy bit while it is being written, a discard bit when its
//! writer dropped it.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use aya::maps::MapData;

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: usize = 8;

/// Read records are handed back to the producers in steps of this many bytes.
pub const RELEASE_BYTES: usize = 256 << 10;

/// One `mmap` of the ring's file descriptor, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: i32, offset: usize) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: a fresh shared mapping of the map's descriptor; the kernel checks
        // the length, protection and offset against the ring's layout.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned 0"))?;
        Ok(Self { ptr, len })
    }

    /// The position word at the start of the mapping.
    fn position(&self) -> &AtomicUsize {
        // SAFETY: the mapping is at least a page, page-aligned, and the kernel keeps
        // an unsigned long there for as long as it is mapped.
        unsafe { self.ptr.cast::<AtomicUsize>().as_ref() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` and nothing borrows it past `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mappings are plain shared memory; the reader is the ring's only
// consumer and is used from one thread at a time.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

/// A new ring-buffer map of `bytes` (a power of two, a multiple of the page size),
/// named `name`, for a CPU of its own.
pub fn create(bytes: u32, name: &str) -> io::Result<MapData> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    // The head of `union bpf_attr` for BPF_MAP_CREATE; the kernel wants the rest
    // of what we pass zeroed.
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        rest: [u8; 60],
    }
    let mut map_name = [0u8; 16];
    for (to, from) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *to = from;
    }
    let attr = Attr {
        map_type: BPF_MAP_TYPE_RINGBUF,
        key_size: 0,
        value_size: 0,
        max_entries: bytes,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
        rest: [0; 60],
    };
    // SAFETY: `attr` is a valid, fully initialised BPF_MAP_CREATE argument that
    // outlives the call.
    let fd = unsafe { super::bpf(BPF_MAP_CREATE, &attr) }?;
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    MapData::from_fd(fd).map_err(io::Error::other)
}

/// What a ring holds next.
pub enum Head<'a> {
    /// A committed record.
    Record(&'a [u8]),
    /// Nothing: every record written before the producer position was read is taken.
    End,
    /// A record still being written (or a header no kernel writes).
    Busy,
}

/// The room a record of `len` bytes takes in the ring: its header, padded to 8 bytes.
fn record_bytes(len: usize) -> usize {
    (HEADER_BYTES + len).next_multiple_of(8)
}

/// The consumer side of one `BPF_MAP_TYPE_RINGBUF` map.
pub struct RingReader {
    consumer: Mapping,
    producer: Mapping,
    /// Offset of the data pages in `producer`.
    data_offset: usize,
    mask: usize,
    /// Where reading goes on.
    pos: usize,
    /// The consumer position the producers last saw.
    published: usize,
    /// The producer position last read.
    producer_pos: usize,
    /// The length of the committed record at `pos` that [`Self::head`] found and
    /// [`Self::advance`] has not taken yet (the merge looks at a head twice).
    found: Option<usize>,
    /// Keeps the descriptor open; declared last so it is closed after the unmaps.
    map: MapData,
}

impl RingReader {
    pub fn new(map: MapData) -> io::Result<Self> {
        let size = map.info().map_err(io::Error::other)?.max_entries() as usize;
        if !size.is_power_of_two() {
            return Err(io::Error::other(format!(
                "the ring buffer's size {size} is not a power of two"
            )));
        }
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(io::Error::other)?;
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let pos = consumer.position().load(Ordering::Acquire);
        let producer_pos = producer.position().load(Ordering::Acquire);
        Ok(Self {
            consumer,
            producer,
            data_offset: page,
            mask: size - 1,
            pos,
            published: pos,
            producer_pos,
            found: None,
            map,
        })
    }

    /// The next committed record, not taken yet (discarded records are skipped),
    /// or why there is none.
    pub fn head(&mut self) -> Head<'_> {
        let len = match self.found {
            Some(len) => len,
            None => match self.find() {
                Ok(len) => *self.found.insert(len),
                Err(none) => return none,
            },
        };
        let offset = self.data_offset + (self.pos & self.mask) + HEADER_BYTES;
        // SAFETY: `find` checked that the record lies within the double mapping
        // (it is shorter than the ring) and that the producer finished writing it
        // (busy bit clear, read with Acquire).
        Head::Record(unsafe {
            std::slice::from_raw_parts(self.producer.ptr.add(offset).as_ptr(), len)
        })
    }

    /// Moves `pos` past discarded records to the next committed one and returns
    /// its length; or stops at the producer position ([`Head::End`]) or at a
    /// record still being written ([`Head::Busy`]).
    fn find(&mut self) -> Result<usize, Head<'static>> {
        loop {
            if self.pos == self.producer_pos {
                self.producer_pos = self.producer.position().load(Ordering::Acquire);
                if self.pos == self.producer_pos {
                    return Err(Head::End);
                }
            }
            let offset = self.data_offset + (self.pos & self.mask);
            // SAFETY: `offset` is inside the first copy of the data pages; the header
            // is 8-byte aligned (records are rounded up to 8 bytes).
            let header = unsafe {
                self.producer
                    .ptr
                    .add(offset)
                    .cast::<AtomicU32>()
                    .as_ref()
                    .load(Ordering::Acquire)
            };
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if header & BUSY_BIT != 0 || len > self.mask {
                // Being written, or not a header the kernel writes: stop rather
                // than read past the ring.
                return Err(Head::Busy);
            }
            if header & DISCARD_BIT == 0 {
                return Ok(len);
            }
            self.pos += record_bytes(len);
        }
    }

    /// Takes the record [`Self::head`] showed.
    pub fn advance(&mut self) {
        if let Some(len) = self.found.take() {
            self.pos += record_bytes(len);
        }
        if self.pos.wrapping_sub(self.published) >= RELEASE_BYTES {
            self.publish();
        }
    }

    /// Hands back the space of every record taken (the end of a drain).
    pub fn finish(&mut self) {
        self.publish();
    }

    /// The ring's map.
    pub fn map(&self) -> &MapData {
        &self.map
    }

    fn publish(&mut self) {
        if self.published != self.pos {
            // Release: the producers may reuse the space only after we read it.
            self.consumer.position().store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }
}

impl AsFd for RingReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.map.fd().as_fd()
    }
}

impl AsRawFd for RingReader {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
