//! Where a thread's allocator call in flight is kept between its entry and return
//! probes. Every allocation looks it up twice and writes it twice, so its cost is
//! paid on every pair: a hash map keyed by tid (`CALLS`) costs a bucket
//! lock and an element allocation per call; task-local storage (`TASK_CALLS`, one
//! slot hanging off the thread's `task_struct`, freed with the thread) costs a
//! pointer chase. Not every kernel lets uprobe programs use task storage; the
//! daemon sets `USE_TASK_CALLS` when the verifier accepts it, else the hash map is used.
//! The verifier never visits the branch a frozen global rules out, so the same
//! program loads on either kernel.
//!
//! In task storage a slot with `sp == 0` is empty (no user stack pointer is 0).

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type},
    helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get},
    macros::btf_map,
};
use leak_common::PendingCall;

use crate::{
    maps::{CALLS, use_task_calls},
    record::current_ids,
};

/// A task-local storage map definition (BTF-defined: the kernel requires BTF for
/// local storage). aya-ebpf 0.2.1 has no such map type; the field names and
/// pointer-to-array encodings are the `.maps` convention loaders read.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The running thread's slot, created (zeroed) when `create` and missing.
    #[inline(always)]
    fn current(&self, create: bool) -> Option<*mut T> {
        let flags = if create {
            u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        // SAFETY: the map pointer is this map's; the task is the current one (a
        // trusted BTF pointer); a null initial value means zero-filled.
        let ptr = unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                bpf_get_current_task_btf(),
                core::ptr::null_mut(),
                flags,
            )
        };
        (!ptr.is_null()).then_some(ptr.cast())
    }
}

/// The allocator call in flight per thread, in task-local storage.
#[btf_map]
pub static TASK_CALLS: TaskStorage<PendingCall> = TaskStorage::new();

/// The entry stack pointer of the thread's call in flight, if any.
#[inline(always)]
pub fn outer_sp(tid: u32) -> Option<u64> {
    if use_task_calls() {
        let slot = TASK_CALLS.current(false)?;
        // SAFETY: a local-storage value is valid and aligned during the run.
        let sp = unsafe { (*slot).sp };
        (sp != 0).then_some(sp)
    } else {
        // SAFETY: a map value from get_ptr is valid and aligned during the run.
        CALLS.get_ptr(&tid).map(|c| unsafe { (*c).sp })
    }
}

/// Where an entry probe reads the thread's call in flight and writes its own: one
/// lookup for both (in task storage, the slot is made on the thread's first call).
pub enum Entry {
    Task(Option<*mut PendingCall>),
    Hash(u32),
}

impl Entry {
    #[inline(always)]
    pub fn of(tid: u32) -> Self {
        if use_task_calls() {
            Entry::Task(TASK_CALLS.current(true))
        } else {
            Entry::Hash(tid)
        }
    }

    /// The entry stack pointer of the call in flight, if any.
    #[inline(always)]
    pub fn outer_sp(&self) -> Option<u64> {
        match *self {
            // SAFETY: a local-storage value is valid and aligned during the run.
            Entry::Task(slot) => Some(unsafe { (*slot?).sp }).filter(|sp| *sp != 0),
            Entry::Hash(tid) => outer_sp(tid),
        }
    }

    /// Remembers `call` as the thread's call in flight. Err when there is no room.
    #[inline(always)]
    pub fn begin(&self, call: &PendingCall) -> Result<(), ()> {
        match *self {
            Entry::Task(slot) => {
                // SAFETY: a local-storage value is valid, aligned and ours during the run.
                unsafe { *slot.ok_or(())? = *call };
                Ok(())
            }
            Entry::Hash(tid) => CALLS.insert(&tid, call, 0).map_err(|_| ()),
        }
    }
}

/// The thread's call in flight, if `done` says this return completes it; it is
/// then forgotten.
#[inline(always)]
pub fn finish(done: impl Fn(&PendingCall) -> bool) -> Option<PendingCall> {
    if use_task_calls() {
        let slot = TASK_CALLS.current(false)?;
        // SAFETY: a local-storage value is valid, aligned and ours during the run.
        let call = unsafe { *slot };
        if call.sp == 0 || !done(&call) {
            return None;
        }
        // SAFETY: as above.
        unsafe { (*slot).sp = 0 };
        Some(call)
    } else {
        let (_, tid) = current_ids();
        // SAFETY: a map value from get_ptr is valid and aligned during the run.
        let call = unsafe { *CALLS.get_ptr(&tid)? };
        if !done(&call) {
            return None;
        }
        let _ = CALLS.remove(&tid);
        Some(call)
    }
}

/// The thread exits: forget its call (task storage goes with the task itself).
#[inline(always)]
pub fn forget(tid: u32) {
    if !use_task_calls() {
        let _ = CALLS.remove(&tid);
    }
}
