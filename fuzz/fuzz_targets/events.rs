//! Fuzzes the ring-buffer record decoder: a short, truncated or garbage record must
//! be a counted `DecodeError`, never a panic, and a decoded one must have been long
//! enough for its layout.

#![no_main]

use leak_common::{FreeRecord, KernelRecord, RecordKind, UserRecord};
use leaktrace::events::{self, DecodeError, Event};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match events::decode(data, 1) {
        Ok(Event::KernelAlloc(k)) => {
            assert!(data.len() >= size_of::<KernelRecord>());
            assert!(!k.cache.contains('\0') && !k.comm.contains('\0'));
        }
        // A free's record is a compact one of its own.
        Ok(Event::Free { .. }) => assert!(data.len() >= size_of::<FreeRecord>()),
        Ok(_) => assert!(data.len() >= size_of::<UserRecord>()),
        Err(DecodeError::TooShort { kind, len }) => {
            assert_eq!(len, data.len());
            assert_eq!(kind.is_none(), data.len() < 4);
        }
        Err(DecodeError::UnknownKind(tag)) => assert!(RecordKind::try_from(tag).is_err()),
        Err(DecodeError::UnknownFunction(_)) => {}
    }
});
