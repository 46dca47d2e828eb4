//! What user-mode records are stamped with, and where a drain reads the stamp
//! it starts at. The rings of all CPUs are merged by these stamps
//! (`session/merge.rs`); the eBPF side's `record::stamp` says why either kind
//! orders them.
//!
//! * **Counter** (`ORDER`, one u64 every CPU adds to): an atomic add and a read,
//!   which stay in this CPU's cache while one thread allocates and otherwise cost
//!   a move of the counter's cache line. On the 2-CPU guests we measure on, that
//!   is cheaper than a clock read (`bpf_ktime_get_ns`, 44–80 ns there), at one
//!   thread and at two.
//! * **Clock**: on a machine of many CPUs every record would wait for that line,
//!   and a clock read costs each CPU the same whatever the others do.

use aya::maps::{Array, Map, MapData, MapError};
use leak_common::names;

use super::EbpfError;

/// Machines with at most this many possible CPUs stamp from the counter: up to
/// here every CPU a thread runs on shares one last-level cache on the hosts we
/// know, so the counter's line moves cheaply; beyond, unmeasured, the clock.
pub const COUNTER_MAX_CPUS: usize = 4;

/// How records are stamped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StampKind {
    Counter,
    Clock,
}

impl StampKind {
    /// What pays on a machine with `possible_cpus` CPUs.
    pub fn for_cpus(possible_cpus: usize) -> Self {
        if possible_cpus <= COUNTER_MAX_CPUS {
            StampKind::Counter
        } else {
            StampKind::Clock
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

    /// The current stamp. Reading an array's only slot fails only if the map is
    /// gone; then every record in view counts as earlier (taken in stamp order).
    pub fn now(&self) -> u64 {
        match self {
            StampReader::Counter(map) => map.get(&0, 0).unwrap_or(u64::MAX),
            StampReader::Clock => crate::clock::now_ns(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_machines_stamp_from_the_counter_big_ones_with_the_clock() {
        assert_eq!(StampKind::for_cpus(1), StampKind::Counter);
        assert_eq!(StampKind::for_cpus(COUNTER_MAX_CPUS), StampKind::Counter);
        assert_eq!(StampKind::for_cpus(COUNTER_MAX_CPUS + 1), StampKind::Clock);
        assert_eq!(StampKind::for_cpus(256), StampKind::Clock);
    }
}
