//! What user-mode records are stamped with, and where a drain reads the stamp
//! it starts at. The rings of all CPUs are merged by these stamps
//! (`session/merge.rs`); the eBPF side's `record::stamp` says why either kind
//! orders them.
//!
//! * **Counter** (`ORDER`, one u64 every CPU adds to): an atomic add and a read,
//!   which stay in this CPU's cache while one thread allocates and otherwise cost
//!   a move of the counter's cache line.
//! * **Clock** (`bpf_ktime_get_ns`): costs each CPU the same whatever the others
//!   do.
//!
//! Which is cheaper depends on the clock. On the AMD guests we measured, a clock
//! read cost the programs 44–80 ns, more than the counter at one thread and at
//! two. On an Intel guest whose clock source is the TSC, it cost 25 ns (its vDSO
//! read 18 ns), and with two threads allocating at once the counter's moving line
//! cost each record ~40–55 ns more than at one: there the clock wins. So the
//! daemon times the clock from user space (the vDSO reads the same clock
//! source) and takes it when a read costs at most [`CHEAP_CLOCK_NS`]; on a
//! machine of many CPUs always, as every record would wait for the counter's line.

use aya::maps::{Array, Map, MapData, MapError};
use leak_common::names;

use super::EbpfError;

/// Machines with at most this many possible CPUs may stamp from the counter (when
/// the clock is dear): up to here every CPU a thread runs on shares one
/// last-level cache on the hosts we know, so the counter's line moves cheaply;
/// beyond, unmeasured, the clock.
pub const COUNTER_MAX_CPUS: usize = 4;

/// How records are stamped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StampKind {
    Counter,
    Clock,
}

/// A clock read at most this long (from user space, [`crate::clock::read_cost_ns`])
/// costs a program less than the counter's line does once two CPUs allocate.
pub const CHEAP_CLOCK_NS: f64 = 30.0;

impl StampKind {
    /// What pays on a machine with `possible_cpus` CPUs whose clock costs
    /// `clock_read_ns` a read.
    pub fn choose(possible_cpus: usize, clock_read_ns: f64) -> Self {
        if possible_cpus > COUNTER_MAX_CPUS || clock_read_ns <= CHEAP_CLOCK_NS {
            StampKind::Clock
        } else {
            StampKind::Counter
        }
    }
}

/// Reads the stamp the programs are at: every record they stamp from now on gets
/// a higher one, and every record stamped at or below it was reserved before.
pub enum StampReader {
    Counter(Array<MapData, u64>),
    Clock,
}

impl StampReader {
    /// A reader for `kind`; `counter` is the object's `ORDER` map, which stays
    /// with it (programs loaded later refer to its descriptor): the reader opens
    /// a handle of its own.
    pub(super) fn new(kind: StampKind, counter: Option<&Map>) -> Result<Self, EbpfError> {
        let err = |e| EbpfError::Map(names::ORDER, e);
        if kind == StampKind::Clock {
            return Ok(StampReader::Clock);
        }
        let Some(Map::Array(data)) = counter else {
            return Err(err(MapError::InvalidName {
                name: names::ORDER.to_owned(),
            }));
        };
        let own = MapData::from_id(data.info().map_err(err)?.id()).map_err(err)?;
        Ok(StampReader::Counter(
            Array::try_from(Map::Array(own)).map_err(err)?,
        ))
    }

    /// The stamp the programs are at, then the time (CLOCK_MONOTONIC, ns), read
    /// in that order: every record stamped at or below the stamp was reserved
    /// before, and made before the time. With clock stamps one read is both.
    /// Reading the counter's only slot fails only if the map is gone; then every
    /// record in view counts as earlier (taken in stamp order).
    pub fn read(&self) -> (u64, u64) {
        match self {
            StampReader::Counter(map) => {
                let stamp = map.get(&0, 0).unwrap_or(u64::MAX);
                (stamp, crate::clock::now_ns())
            }
            StampReader::Clock => {
                let now = crate::clock::now_ns();
                (now, now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_when_cheap_or_on_big_machines_else_the_counter() {
        assert_eq!(StampKind::choose(2, 81.0), StampKind::Counter);
        assert_eq!(
            StampKind::choose(COUNTER_MAX_CPUS, 44.0),
            StampKind::Counter
        );
        assert_eq!(StampKind::choose(2, 18.5), StampKind::Clock);
        assert_eq!(StampKind::choose(2, CHEAP_CLOCK_NS), StampKind::Clock);
        assert_eq!(
            StampKind::choose(COUNTER_MAX_CPUS + 1, 81.0),
            StampKind::Clock
        );
        assert_eq!(StampKind::choose(256, 500.0), StampKind::Clock);
    }
}
