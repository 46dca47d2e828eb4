//! Where an allocation comes from: its stack (an id in `STACKS`) and its call site
//! (the return address into the code that called the allocator, past any known
//! wrapper), worked out at the allocator's entry.
//!
//! With the CFI unwinder, most of an allocation's cost was the walk, and most
//! walks repeat one made just before on the same CPU: a loop, a request handler
//! allocating from the same place. A walk is a function of the probe's pc and sp
//! (and rbp, when a CFA was computed from the register), of the stack words it
//! reads, of the tables and module list of the process, and of the wrapper hints.
//! So each CPU remembers its last walks (`MEMOS`, a few ways picked by the return
//! address and sp) with the words they read. A call with the same registers whose
//! stack still holds every one of those words has the same stack and call site:
//! they are reused without a walk, counted as [`UnwindCount::Reused`]. The daemon
//! bumps `MEMO_EPOCH` whenever tables, module lists or hints change, which retires
//! every memo at once. A walk whose result depends on anything else (a read that
//! failed, a process whose tables are not loaded yet) is not remembered.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_probe_read_user, generated::bpf_loop},
    macros::map,
    maps::{Array, PerCpuArray},
};
use leak_common::{HINT_OPERATOR_NEW, HintKey, MAX_WRAPPER_DEPTH, UnwindCount, hint_filter_bit};

use crate::{
    maps::{HINT_FILTER, HINTS, STACKS},
    record::{USER_STACK, bump, capture_stack},
    unwind::{self, MEMO_WORDS, UNWIND_COUNTS},
};

/// Remembered walks per CPU: sets of `MEMO_WAYS` walks, the set picked by the
/// call site and sp. Several ways, because one leaf (an allocation wrapper) often
/// reaches malloc on one sp from several callers in turn.
const MEMO_SETS: u32 = 4;
const MEMO_WAYS: u32 = 4;

/// Bumped by the daemon when what a walk depends on changes (tables, a process's
/// module list, wrapper hints): memos of an older epoch are never used.
#[map]
pub static MEMO_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// One remembered walk: the registers it started from, the stack words it read
/// (offsets from `sp`) and what it found. Empty while `stack_id` is 0.
#[repr(C)]
pub struct Memo {
    epoch: u64,
    pc: u64,
    sp: u64,
    rbp: u64,
    stack_id: u64,
    caller: u64,
    tgid: u32,
    via_new: u32,
    /// 1 when the walk computed a CFA from the probe's rbp: it must match too.
    uses_rbp: u32,
    words: u32,
    offsets: [u32; MEMO_WORDS],
    values: [u64; MEMO_WORDS],
}

/// `MEMO_SETS * MEMO_WAYS` walks per CPU, set by set.
#[map]
static MEMOS: PerCpuArray<Memo> = PerCpuArray::with_max_entries(MEMO_SETS * MEMO_WAYS, 0);

/// The way of each set to fill next (round robin), per CPU.
#[map]
static MEMO_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(MEMO_SETS, 0);

/// An allocation's stack id (0: none) and call site.
pub struct Site {
    pub stack_id: u64,
    pub caller: u64,
    /// One of the wrappers followed was `operator new`.
    pub via_new: bool,
}

/// At the allocator's first instruction the return address is on top of the stack:
/// it is the allocating call site, which frame-pointer walks often miss. `read`
/// reads a stack word. Returns the call site and whether one of the wrappers
/// followed was `operator new` (see [`follow_wrappers`]).
#[inline(always)]
fn call_site(tgid: u32, sp: u64, mut read: impl FnMut(u64) -> Option<u64>) -> (u64, bool) {
    let caller = read(sp).unwrap_or(0);
    follow_wrappers(tgid, sp, caller, read)
}

/// When the call site `caller` (found in the stack slot `slot`) lies in an
/// allocation wrapper (operator new, strdup), the daemon has told us where that
/// wrapper's own return address is: follow it, a few wrappers deep.
#[inline(always)]
fn follow_wrappers(
    tgid: u32,
    mut slot: u64,
    mut caller: u64,
    mut read: impl FnMut(u64) -> Option<u64>,
) -> (u64, bool) {
    let mut via_new = false;
    for _ in 0..MAX_WRAPPER_DEPTH {
        let (word, bit) = hint_filter_bit(caller);
        if HINT_FILTER.get(word).is_none_or(|w| w & (1 << bit) == 0) {
            break;
        }
        let key = HintKey {
            tgid,
            _pad: 0,
            ret: caller,
        };
        let Some(offset) = HINTS.get_ptr(&key) else {
            break;
        };
        // SAFETY: a map value from get_ptr is valid and aligned during the run.
        let hint = unsafe { *offset };
        via_new |= hint & HINT_OPERATOR_NEW != 0;
        slot += u64::from(hint & !HINT_OPERATOR_NEW);
        match read(slot) {
            Some(up) => caller = up,
            None => break,
        }
    }
    (caller, via_new)
}

/// The call site of an allocation whose entry did not work it out, found as the
/// allocator returns: the probe's pc is then the return address (the kernel
/// puts it back before the programs run), so the call site costs no read of the
/// stack; the slots of wrappers above are read as the entry would have, from the
/// call's entry `sp` (their frames are still there). Returns what [`call_site`]
/// does.
#[inline(always)]
pub fn at_return(tgid: u32, sp: u64, return_address: u64) -> (u64, bool) {
    // SAFETY: the helper checks the user address and fails cleanly.
    let read = |addr: u64| unsafe { bpf_probe_read_user(addr as *const u64) }.ok();
    follow_wrappers(tgid, sp, return_address, read)
}

/// The stack by frame pointers (`bpf_get_stack`), or none; the call site is left
/// to the return ([`at_return`]).
#[inline(always)]
pub fn by_frame_pointers<C: EbpfContext>(ctx: &C, stack: bool) -> Site {
    let stack_id = if stack {
        capture_stack(ctx, &STACKS, USER_STACK)
    } else {
        0
    };
    Site {
        stack_id,
        caller: 0,
        via_new: false,
    }
}

/// The site by the CFI unwinder, reused from a memo when the stack allows.
#[inline(always)]
pub fn by_cfi(regs: &pt_regs, tgid: u32) -> Site {
    let sp = regs.rsp;
    let Some(sc) = unwind::begin(sp) else {
        return Site {
            stack_id: 0,
            caller: 0,
            via_new: false,
        };
    };
    // The stack words the call site and the walk read are remembered as they go.
    let read = |addr: u64| {
        if !unwind::fill(sc, addr, addr.wrapping_add(8)) {
            unwind::unrememberable(sc);
            return None;
        }
        let value = unwind::word(sc, addr)?;
        unwind::remember(sc, addr, value);
        Some(value)
    };
    let (caller, via_new) = call_site(tgid, sp, read);
    let epoch = MEMO_EPOCH.get(0).copied().unwrap_or(0);
    let set = ((caller ^ (sp >> 4)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62) as u32 % MEMO_SETS;
    for way in 0..MEMO_WAYS {
        let Some(m) = MEMOS.get(set * MEMO_WAYS + way) else {
            break;
        };
        if m.stack_id != 0
            && m.epoch == epoch
            && m.tgid == tgid
            && m.pc == regs.rip
            && m.sp == sp
            && (m.uses_rbp == 0 || m.rbp == regs.rbp)
            && still_holds(set * MEMO_WAYS + way, m.words)
        {
            bump(&UNWIND_COUNTS, UnwindCount::Reused as u32);
            return Site {
                stack_id: m.stack_id,
                caller: m.caller,
                via_new: m.via_new != 0,
            };
        }
    }
    let stack_id = unwind::capture(regs, tgid, sc);
    // SAFETY: this CPU's scratch value, valid and aligned during the run.
    let s = unsafe { &*sc };
    if stack_id != 0 && s.read_count as usize <= MEMO_WORDS {
        if let (Some(next), Some(m)) = (MEMO_NEXT.get_ptr_mut(set), victim(set)) {
            // SAFETY: this CPU's values, valid and aligned during the run.
            let m = unsafe { &mut *m };
            unsafe { *next = (*next).wrapping_add(1) };
            m.stack_id = 0; // no half-written memo is ever valid (one CPU, no nesting)
            m.epoch = epoch;
            m.pc = regs.rip;
            m.sp = sp;
            m.rbp = regs.rbp;
            m.caller = caller;
            m.tgid = tgid;
            m.via_new = u32::from(via_new);
            m.uses_rbp = s.uses_rbp;
            m.words = s.read_count as u32;
            copy_words(&s.read_offsets, &mut m.offsets);
            copy_words(&s.read_values, &mut m.values);
            m.stack_id = stack_id;
        }
    }
    Site {
        stack_id,
        caller,
        via_new,
    }
}

/// Copies `from` into `to` element by element. A plain array assignment becomes a
/// call to a memmove that copies a byte at a time (thousands of instructions for a
/// memo); volatile stores keep LLVM from turning the loop back into one.
#[inline(always)]
fn copy_words<T: Copy>(from: &[T; MEMO_WORDS], to: &mut [T; MEMO_WORDS]) {
    for i in 0..MEMO_WORDS {
        // SAFETY: both indexes are in bounds of arrays we hold references to.
        unsafe { core::ptr::write_volatile(&raw mut to[i], from[i]) };
    }
}

/// The memo of `set` to fill next.
#[inline(always)]
fn victim(set: u32) -> Option<*mut Memo> {
    let way = *MEMO_NEXT.get(set)? % MEMO_WAYS;
    MEMOS.get_ptr_mut(set * MEMO_WAYS + way)
}

/// What [`check_word`] works on.
#[repr(C)]
struct Check {
    memo: u32,
    words: u32,
    /// 1 until a word differs or cannot be read.
    holds: u32,
    _pad: u32,
}

/// Does the stack still hold the `words` words memo number `memo` read? One
/// word per `bpf_loop` step: the verifier checks the step once, however many
/// words and ways there are.
#[inline(always)]
fn still_holds(memo: u32, words: u32) -> bool {
    if words as usize > MEMO_WORDS {
        return false;
    }
    let mut check = Check {
        memo,
        words,
        holds: 1,
        _pad: 0,
    };
    // SAFETY: the callback is a BPF function taking (index, ctx); ctx is our own
    // stack variable, alive for the whole call.
    unsafe { bpf_loop(words, check_word as *mut c_void, (&raw mut check).cast(), 0) };
    check.holds != 0
}

/// One word of [`still_holds`]. Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn check_word(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the pointer `still_holds` gave it.
    let check = unsafe { &mut *ctx.cast::<Check>() };
    let holds = || -> Option<bool> {
        let i = index as usize;
        if i >= MEMO_WORDS {
            return None;
        }
        let m = MEMOS.get(check.memo)?;
        let sc = unwind::scratch()?;
        let addr = m.sp.wrapping_add(u64::from(m.offsets[i]));
        Some(unwind::fill(sc, addr, addr.wrapping_add(8)) && unwind::word(sc, addr)? == m.values[i])
    };
    if holds() == Some(true) {
        0
    } else {
        check.holds = 0;
        1
    }
}
