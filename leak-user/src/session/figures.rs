//! The event figures every stats and end record carries, in both modes: how many
//! records came through the ring, how many were lost and why, how long the table
//! lock was held at most.

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Instant};

use leak_common::Loss;

use super::ingest::IngestCounters;
use crate::{ebpf::LossCounts, report::records::EventFigures};

/// The event figures now. `longest_lock_hold_us` is the table's, taken by the
/// caller.
pub fn event_figures(
    started: Instant,
    ingest: &IngestCounters,
    losses: &LossCounts,
    recursion_misses: BTreeMap<String, u64>,
    longest_lock_hold_us: u64,
) -> EventFigures {
    let elapsed = started.elapsed();
    let records = ingest.records.load(Ordering::Relaxed);
    let (lost, lost_total) = lost_map(losses);
    EventFigures {
        elapsed_ms: elapsed.as_millis() as u64,
        records,
        records_per_sec: records as f64 / elapsed.as_secs_f64().max(1e-3),
        lost,
        lost_total,
        decode_errors: ingest.decode_errors.load(Ordering::Relaxed),
        longest_lock_hold_us,
        recursion_misses,
    }
}

/// Losses by name, and the number of events lost.
pub fn lost_map(losses: &LossCounts) -> (BTreeMap<&'static str, u64>, u64) {
    let map = Loss::ALL
        .iter()
        .map(|l| (l.name(), losses[*l as usize]))
        .collect();
    // Failed stack captures lose no event; everything else does.
    let total = Loss::ALL
        .iter()
        .filter(|l| {
            !matches!(
                l,
                Loss::StackCaptureFailed | Loss::StackMapFull | Loss::StaleCall
            )
        })
        .map(|l| losses[*l as usize])
        .sum();
    (map, total)
}
