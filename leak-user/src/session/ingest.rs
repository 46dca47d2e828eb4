//! The ingest task: drains the ring buffers, decodes records outside the lock, and
//! applies them to the table in batches under it, in order: stamp order over the
//! rings (`merge.rs`), which is ring order when there is one.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{Notify, mpsc},
};

use leak_common::UserRecord;

use super::merge::{Next, merge};
use crate::{
    ebpf::{Head, RingReader, StampReader},
    events::{self, Event},
};

/// Most records applied under one lock hold.
const BATCH: usize = 4096;

/// Where decoded events go (the user table, or the kernel table).
pub trait EventSink: Send + 'static {
    /// Applies a batch, in order; returns true when the session should look at the
    /// table's notices (a process exited, a leak was retracted, …).
    fn apply(&mut self, events: &[Event]) -> bool;
}

/// Figures the ingest task keeps for the status line and stats records.
#[derive(Default)]
pub struct IngestCounters {
    pub records: AtomicU64,
    pub decode_errors: AtomicU64,
}

/// Talks to the ingest task.
#[derive(Clone)]
pub struct IngestHandle {
    drain_tx: mpsc::UnboundedSender<std::sync::mpsc::Sender<()>>,
    pub counters: Arc<IngestCounters>,
    /// Signalled when the sink asked for attention.
    pub notices: Arc<Notify>,
}

impl IngestHandle {
    /// Blocks until every record produced so far has been applied (call from a
    /// blocking thread, e.g. after freezing a target).
    pub fn drain_blocking(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.drain_tx.send(tx).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Async version of [`Self::drain_blocking`].
    pub async fn drain(&self) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.drain_blocking()).await;
    }
}

/// Starts the task. `rings[0]` is the shared ring, which can wake the task; the
/// others (one per CPU) are drained on the task's period. `stamps` reads the
/// stamp the programs are at.
pub fn spawn(
    rings: Vec<RingReader>,
    stamps: StampReader,
    sink: impl EventSink,
) -> std::io::Result<IngestHandle> {
    let mut rings = rings.into_iter();
    let shared = rings
        .next()
        .ok_or_else(|| std::io::Error::other("no ring buffer to read"))?;
    let own: Vec<RingReader> = rings.collect();
    // SAFETY: the reader owns its map descriptor and keeps it open, unchanged,
    // for as long as it lives inside the AsyncFd.
    let shared = unsafe { AsyncFd::register_with_interest(shared, Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (drain_tx, drain_rx) = mpsc::unbounded_channel();
    let handle = IngestHandle {
        drain_tx,
        counters: Arc::default(),
        notices: Arc::default(),
    };
    let task = Task {
        sink,
        counters: handle.counters.clone(),
        notices: handle.notices.clone(),
        batch: Vec::with_capacity(BATCH),
        last: vec![0; 1 + own.len()],
        own,
        stamps,
    };
    tokio::spawn(task.run(shared, drain_rx));
    Ok(handle)
}

struct Task<S> {
    sink: S,
    counters: Arc<IngestCounters>,
    notices: Arc<Notify>,
    batch: Vec<Event>,
    /// The rings of the CPUs (none in kernel mode, or where the kernel could not
    /// make them).
    own: Vec<RingReader>,
    /// The stamp of the last record taken from each ring (see `merge`).
    last: Vec<u64>,
    stamps: StampReader,
}

/// Drains a barrier retries while a ring stops at a record being written (it is
/// committed within microseconds).
const BARRIER_TRIES: usize = 10_000;

/// A record's stamp: every record type keeps it where a `UserRecord` does
/// (leak-common checks).
fn record_stamp(bytes: &[u8]) -> u64 {
    const AT: usize = std::mem::offset_of!(UserRecord, stamp);
    bytes
        .get(AT..AT + 8)
        .map_or(0, |b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
}

impl<S: EventSink> Task<S> {
    async fn run(
        mut self,
        mut shared: AsyncFd<RingReader>,
        mut drain_rx: mpsc::UnboundedReceiver<std::sync::mpsc::Sender<()>>,
    ) {
        // The programs wake us only when the shared ring fills up (a wakeup per
        // record would cost more than the record), and never from a CPU's own
        // ring: drain on a short period too.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
        loop {
            tokio::select! {
                guard = shared.readable_mut() => {
                    let Ok(mut guard) = guard else { return };
                    // Clear first, then drain: the ring buffer only wakes a reader
                    // that has caught up, so a record committed after the drain
                    // wakes us again, and one committed during it is drained.
                    guard.clear_ready();
                    self.drain(guard.get_inner_mut());
                }
                _ = tick.tick() => {
                    self.drain(shared.get_mut());
                }
                ack = drain_rx.recv() => {
                    let Some(ack) = ack else { return };
                    // Everything stamped before this drain started is applied
                    // once no ring stops at a record being written.
                    for _ in 0..BARRIER_TRIES {
                        if !self.drain(shared.get_mut()) {
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    let _ = ack.send(());
                }
            }
        }
    }

    /// Drains every ring and applies what can be applied in order (with one ring,
    /// all it holds); true when a ring stopped at a record still being written.
    fn drain(&mut self, shared: &mut RingReader) -> bool {
        // The stamp and the clock before the rings: every record stamped at or
        // below `start` was reserved before the rings are looked at, and made
        // before `received`.
        let (start, received) = self.stamps.read();
        let mut rings: Vec<&mut RingReader> =
            std::iter::once(shared).chain(self.own.iter_mut()).collect();
        let (sink, batch, notices, counters) = (
            &mut self.sink,
            &mut self.batch,
            &self.notices,
            &self.counters,
        );
        let mut records = 0u64;
        let next = |ring: &mut &mut RingReader| match ring.head() {
            Head::Record(bytes) => Next::Stamp(record_stamp(bytes)),
            Head::End => Next::End,
            Head::Busy => Next::Busy,
        };
        let take = |ring: &mut &mut RingReader| {
            if let Head::Record(bytes) = ring.head() {
                records += 1;
                if let Some(event) = decode(counters, bytes, received) {
                    batch.push(event);
                    if batch.len() >= BATCH {
                        flush(sink, batch, notices);
                    }
                }
            }
            ring.advance();
        };
        let stalled = merge(&mut rings, &mut self.last, start, next, take);
        for ring in rings {
            ring.finish();
        }
        self.counters.records.fetch_add(records, Ordering::Relaxed);
        flush(&mut self.sink, &mut self.batch, &self.notices);
        stalled
    }
}

/// One record, or None (counted) when it cannot be decoded.
fn decode(counters: &IngestCounters, bytes: &[u8], received_ns: u64) -> Option<Event> {
    match events::decode(bytes, received_ns) {
        Ok(event) => Some(event),
        Err(err) => {
            counters.decode_errors.fetch_add(1, Ordering::Relaxed);
            log::debug!("undecodable record: {err}");
            None
        }
    }
}

/// Applies `batch` to `sink` under its lock, and wakes the session when the sink
/// asks.
fn flush<S: EventSink>(sink: &mut S, batch: &mut Vec<Event>, notices: &Notify) {
    if batch.is_empty() {
        return;
    }
    if sink.apply(batch) {
        notices.notify_one();
    }
    batch.clear();
}
