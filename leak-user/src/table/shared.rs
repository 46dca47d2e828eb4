//! The one lock around a table (the user-mode object table, or the kernel-mode
//! one), with hold-time accounting.
//!
//! Every holder goes through [`SharedTable::with`], which measures how long the
//! lock was held; the longest hold is reported (a long hold stalls ingestion and
//! can overflow the ring buffer).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::Table;

/// `Arc<Mutex<T>>` plus the longest time anyone held it.
pub struct Shared<T> {
    inner: Arc<Inner<T>>,
}

/// The user-mode table behind its lock.
pub type SharedTable = Shared<Table>;

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T> {
    table: Mutex<T>,
    longest_hold_ns: AtomicU64,
}

impl<T> Shared<T> {
    pub fn new(table: T) -> Self {
        Self {
            inner: Arc::new(Inner {
                table: Mutex::new(table),
                longest_hold_ns: AtomicU64::new(0),
            }),
        }
    }

    /// Runs `f` under the lock; returns its result and how long the lock was held.
    #[track_caller]
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> (R, Duration) {
        // A panic while holding the lock leaves the table as it was at that point;
        // keep going rather than poisoning every later report.
        let mut guard = self
            .inner
            .table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let start = Instant::now();
        let result = f(&mut guard);
        let held = start.elapsed();
        drop(guard);
        if held > Duration::from_millis(10) {
            log::debug!(
                "table lock held {held:?} at {}",
                std::panic::Location::caller()
            );
        }
        self.inner
            .longest_hold_ns
            .fetch_max(held.as_nanos() as u64, Ordering::Relaxed);
        (result, held)
    }

    /// Runs `f` under the lock, ignoring the hold time.
    #[track_caller]
    pub fn lock<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.with(f).0
    }

    /// The longest hold since the last call (and resets it).
    pub fn take_longest_hold(&self) -> Duration {
        Duration::from_nanos(self.inner.longest_hold_ns.swap(0, Ordering::Relaxed))
    }
}
