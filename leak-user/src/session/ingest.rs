//! The ingest task: drains the ring buffer, decodes records outside the lock, and
//! applies them to the table in batches under it, in ring order.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{Notify, mpsc},
};

use crate::{
    ebpf::RingReader,
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

/// Starts the task.
pub fn spawn(ring: RingReader, sink: impl EventSink) -> std::io::Result<IngestHandle> {
    // SAFETY: the reader owns its map descriptor and keeps it open, unchanged,
    // for as long as it lives inside the AsyncFd.
    let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
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
    };
    tokio::spawn(task.run(ring, drain_rx));
    Ok(handle)
}

struct Task<S> {
    sink: S,
    counters: Arc<IngestCounters>,
    notices: Arc<Notify>,
    batch: Vec<Event>,
}

impl<S: EventSink> Task<S> {
    async fn run(
        mut self,
        mut ring: AsyncFd<RingReader>,
        mut drain_rx: mpsc::UnboundedReceiver<std::sync::mpsc::Sender<()>>,
    ) {
        // The programs wake us only when the ring fills up (a wakeup per record
        // would cost more than the record): drain it on a short period too.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let Ok(mut guard) = guard else { return };
                    // Clear first, then drain: the ring buffer only wakes a reader
                    // that has caught up, so a record committed after the drain
                    // wakes us again, and one committed during it is drained.
                    guard.clear_ready();
                    self.drain(guard.get_inner_mut());
                }
                _ = tick.tick() => self.drain(ring.get_mut()),
                ack = drain_rx.recv() => {
                    let Some(ack) = ack else { return };
                    self.drain(ring.get_mut());
                    let _ = ack.send(());
                }
            }
        }
    }

    fn drain(&mut self, ring: &mut RingReader) {
        let records = ring.drain(|bytes, received_ns| {
            match events::decode(bytes, received_ns) {
                Ok(event) => self.batch.push(event),
                Err(err) => {
                    self.counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                    log::debug!("undecodable record: {err}");
                }
            }
            if self.batch.len() >= BATCH {
                self.flush();
            }
        });
        self.counters
            .records
            .fetch_add(records as u64, Ordering::Relaxed);
        self.flush();
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if self.sink.apply(&self.batch) {
            self.notices.notify_one();
        }
        self.batch.clear();
    }
}
