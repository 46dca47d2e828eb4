//! `MEMO_EPOCH`: the allocation probe reuses a walk it remembered only in the
//! epoch the walk was made in (see the eBPF `site.rs`). Whatever a walk reads
//! besides the stack — a process's module list, wrapper hints — is changed by
//! the daemon first and the epoch bumped after, so no probe reuses a walk made
//! with what was there before. A new unwind table needs no bump of its own: it
//! gets a fresh id (tables are never rewritten), and walks reach it only through
//! a module list, whose update bumps the epoch.

use aya::maps::{Array, Map, MapData};
use leak_common::names;

use super::EbpfError;

/// A handle on `MEMO_EPOCH`. The hints and the unwinder's maps each hold one.
pub struct MemoEpoch {
    id: u32,
    map: Array<MapData, u64>,
}

impl MemoEpoch {
    pub(super) fn new(map: Map) -> Result<Self, EbpfError> {
        let err = |e| EbpfError::Map(names::MEMO_EPOCH, e);
        let id = match &map {
            Map::Array(data) => data.info().map_err(err)?.id(),
            _ => 0,
        };
        Ok(Self {
            id,
            map: Array::try_from(map).map_err(err)?,
        })
    }

    /// Another handle on the same map.
    pub(super) fn duplicate(&self) -> Result<Self, EbpfError> {
        let data = MapData::from_id(self.id).map_err(|e| EbpfError::Map(names::MEMO_EPOCH, e))?;
        Self::new(Map::Array(data))
    }

    /// Retires every remembered walk.
    pub fn bump(&mut self) {
        let next = self.map.get(&0, 0).unwrap_or(0).wrapping_add(1);
        if let Err(err) = self.map.set(0, next, 0) {
            log::warn!(
                "cannot retire the remembered stack walks ({err}): \
                 some stacks may show an earlier call path"
            );
        }
    }
}
