//! The event figures every stats and end record carries, in both modes: how many
//! records came through the ring, how many were lost and why, how long the table
//! lock was held at most; and the CFI unwinder's tables and walks.

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Instant};

use leak_common::{Loss, UnwindCount};

use super::ingest::IngestCounters;
use crate::{
    ebpf::LossCounts,
    report::records::{EventFigures, UnwindModule, UnwindStats},
    unwind::UnwindFigures,
};

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

/// The CFI unwinder's figures as the `stats` record shows them.
pub fn unwind_stats(f: &UnwindFigures) -> UnwindStats {
    let count = |c: UnwindCount| f.counts[c as usize];
    let stopped = [
        ("no_module", UnwindCount::NoModule),
        ("no_rule", UnwindCount::NoRule),
        ("read_failed", UnwindCount::ReadFailed),
        ("no_tables_yet", UnwindCount::NoProcess),
    ]
    .into_iter()
    .map(|(name, c)| (name, count(c)))
    .collect();
    UnwindStats {
        table_bytes: f.table_bytes,
        table_capacity_bytes: f.capacity_bytes,
        modules: f
            .modules
            .iter()
            .map(|m| UnwindModule {
                path: m.path.display().to_string(),
                rows: m.rows,
                bytes: m.bytes,
                index_bytes: m.index_bytes,
            })
            .collect(),
        modules_without_table: f.modules_without_table,
        stacks: count(UnwindCount::Stacks),
        reused: count(UnwindCount::Reused),
        frames: count(UnwindCount::Frames),
        complete: count(UnwindCount::Complete),
        truncated: count(UnwindCount::Truncated),
        stopped,
    }
}

#[cfg(test)]
mod unwind_tests {
    use std::path::PathBuf;

    use super::*;
    use crate::unwind::ModuleFigure;

    #[test]
    fn unwind_stats_name_every_stop_reason() {
        let mut counts = [0; UnwindCount::COUNT as usize];
        counts[UnwindCount::Stacks as usize] = 10;
        counts[UnwindCount::Complete as usize] = 7;
        counts[UnwindCount::NoModule as usize] = 2;
        counts[UnwindCount::NoRule as usize] = 1;
        let stats = unwind_stats(&UnwindFigures {
            modules: vec![ModuleFigure {
                path: PathBuf::from("/lib/libc.so.6"),
                rows: 3,
                bytes: 32,
                index_bytes: 8,
            }],
            table_bytes: 32,
            capacity_bytes: 800,
            modules_without_table: 1,
            counts,
        });
        assert_eq!((stats.stacks, stats.complete), (10, 7));
        assert_eq!(stats.stopped["no_module"], 2);
        assert_eq!(stats.stopped["no_rule"], 1);
        assert_eq!(stats.stopped.values().sum::<u64>(), 3);
        assert_eq!(stats.modules[0].path, "/lib/libc.so.6");
    }
}
