//! The target's threads and where their stacks are in use.
//!
//! A thread blocked in a system call shows its stack pointer in
//! `/proc/PID/task/TID/syscall` without any ptrace; a running thread does not, and
//! then its whole stack mapping is scanned.
//!
//! glibc keeps the stacks of exited threads mapped, for reuse: their memory holds
//! stale copies of whatever the dead threads had in hand, which would keep their
//! leaks "reachable". Such a stack is known by its shape — an anonymous mapping
//! right above a guard page, with glibc's thread control block (whose `tcb` and
//! `self` fields point at itself) at its top — and by no live thread running on
//! it. That is only certain when every thread's stack pointer is known. The
//! control block itself stays a root: glibc keeps it, and what it points to (the
//! thread's TLS vector), for the next thread that gets the stack.

use std::{io, ops::Range};

use super::{
    maps::{Backing, Mapping},
    mem::MemorySource,
};

/// Thread ids of a process.
pub fn list(pid: u32) -> io::Result<Vec<u32>> {
    let mut tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// The stack pointer in a `/proc/PID/task/TID/syscall` line, when the thread is
/// blocked: "nr a1 a2 a3 a4 a5 a6 sp pc", or "-1 sp pc" when blocked outside a
/// syscall. "running" has none.
pub fn parse_syscall_sp(line: &str) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 3 {
        return None;
    }
    let sp = fields[fields.len() - 2];
    u64::from_str_radix(sp.strip_prefix("0x").unwrap_or(sp), 16).ok()
}

/// Whether a `/proc/PID/task/TID/syscall` line shows the thread in `exit_group`.
pub fn in_exit_group(line: &str) -> bool {
    line.split_whitespace().next() == Some(EXIT_GROUP)
}

/// `exit_group`'s number on x86-64, as the syscall file prints it.
const EXIT_GROUP: &str = "231";

/// Each thread's `/proc/PID/task/TID/syscall` line (`None` where it could not be
/// read: the thread is gone).
fn syscall_lines(pid: u32) -> Vec<Option<String>> {
    list(pid)
        .unwrap_or_default()
        .iter()
        .map(|tid| std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok())
        .collect()
}

/// Whether one of the threads of `pid` is in `exit_group`: the process is
/// exiting (see [`blocked_stack_pointers`]).
pub fn exiting(pid: u32) -> bool {
    syscall_lines(pid)
        .iter()
        .flatten()
        .any(|l| in_exit_group(l))
}

/// Stack pointers of the threads that are blocked right now, and whether they
/// place every live thread. Not while a thread is in `exit_group`: the process is
/// exiting, its other threads are killed (gone from the list, their stacks still
/// mapped and live until the exit; launch mode holds the process there, at its
/// exit stop, for the last scan).
pub fn blocked_stack_pointers(pid: u32) -> (Vec<u64>, bool) {
    let lines = syscall_lines(pid);
    let sps: Vec<u64> = lines
        .iter()
        .flatten()
        .filter_map(|l| parse_syscall_sp(l))
        .collect();
    let exiting = lines.iter().flatten().any(|l| in_exit_group(l));
    let all = !lines.is_empty() && sps.len() == lines.len() && !exiting;
    (sps, all)
}

/// Bytes at the top of a thread stack searched for glibc's thread control block.
const TCB_SEARCH: u64 = 8 << 10;

/// The cached stacks of exited threads — thread stacks (see the module header) on
/// which none of `stack_pointers`, every live thread's, lies — up to their
/// thread control blocks.
pub fn idle_thread_stacks(
    maps: &[Mapping],
    stack_pointers: &[u64],
    memory: &dyn MemorySource,
) -> Vec<Range<u64>> {
    let mut idle = Vec::new();
    for pair in maps.windows(2) {
        let (guard, m) = (&pair[0], &pair[1]);
        let shaped = guard.end == m.start
            && !guard.read
            && !guard.write
            && m.read
            && m.write
            && !m.shared
            && m.backing == Backing::Anonymous
            && m.len() > TCB_SEARCH;
        if shaped
            && !stack_pointers.iter().any(|&sp| m.contains(sp))
            && let Some(tcb) = find_tcb(m, guard.start..guard.end, memory)
        {
            idle.push(m.start..tcb);
        }
    }
    idle
}

/// glibc's thread control block near the top of `m`: an address whose first word
/// (`tcb`) and third word (`self`) hold the address itself, followed within
/// [`PTHREAD_SPAN`] bytes by the thread's `stackblock`, the start of the block
/// its stack was mapped in: in the guard page(s) below `m` (the guard mapping
/// may have merged with protected memory below it). The top [`TCB_SEARCH`]
/// bytes first; then, downwards a window at a time, the rest of the first
/// [`TCB_SEARCH_MAX`] bytes: where the kernel merged the stack with anonymous
/// memory mapped right above it (a big malloc block, the main thread's own
/// control block; kernels before 6.7 do not space large anonymous mappings
/// apart), the block ends below the mapping's end, and the main thread's control
/// block (no `stackblock`) may be the first self-pointer seen.
fn find_tcb(m: &Mapping, guard: Range<u64>, memory: &dyn MemorySource) -> Option<u64> {
    let lowest = m.start.max(m.end.saturating_sub(TCB_SEARCH_MAX));
    let mut hi = m.end;
    let mut window = TCB_SEARCH;
    while hi > lowest {
        // Windows overlap by a control block's span, so none is cut in two.
        let from = hi.saturating_sub(window).max(lowest);
        let to = (hi + PTHREAD_SPAN).min(m.end);
        let mut buf = vec![0u8; (to - from) as usize];
        if memory.read(from, &mut buf) != buf.len() {
            return None;
        }
        let word = |i: usize| u64::from_ne_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
        let words = buf.len() / 8;
        let found = (0..words.saturating_sub(2))
            .rev()
            .map(|w| w * 8)
            .find(|&i| {
                let at = from + i as u64;
                word(i) == at
                    && word(i + 16) == at
                    && (i + 24..(i + PTHREAD_SPAN as usize).min(words * 8))
                        .step_by(8)
                        .any(|j| guard.contains(&word(j)))
            });
        if let Some(i) = found {
            return Some(from + i as u64);
        }
        hi = from;
        window = TCB_WINDOW;
    }
    None
}

/// Bytes of `struct pthread` searched for its `stackblock` after its start.
const PTHREAD_SPAN: u64 = 4 << 10;

/// How far below a guarded mapping's end its thread control block is looked for
/// (a thread stack with its TLS; glibc's default is RLIMIT_STACK, 8 MiB).
const TCB_SEARCH_MAX: u64 = 64 << 20;

/// The window of that search past the top [`TCB_SEARCH`] bytes.
const TCB_WINDOW: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_stack_pointer_of_blocked_threads() {
        assert_eq!(
            parse_syscall_sp("202 0x7f1 0x80 0x0 0x0 0x0 0x0 0x7ffc3a9e1b48 0x7f0c1d2e3f4a\n"),
            Some(0x7ffc_3a9e_1b48)
        );
        assert_eq!(
            parse_syscall_sp("-1 0x7ffc3a9e1b48 0x7f0c1d2e3f4a"),
            Some(0x7ffc_3a9e_1b48)
        );
        assert_eq!(parse_syscall_sp("running\n"), None);
        let exiting = "231 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffc3a9e1b48 0x7f0c1d2e3f4a\n";
        assert!(in_exit_group(exiting));
        assert!(!in_exit_group(
            "0 0x3 0x7f1 0x1 0x0 0x0 0x0 0x7ffc3a9e1b48 0x7f0c1d2e3f4a"
        ));
        assert!(!in_exit_group("2310 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffc 0x7f0c"));
        assert!(!in_exit_group("running"));
    }

    fn map(start: u64, len: u64, rw: bool) -> Mapping {
        Mapping {
            start,
            end: start + len,
            read: rw,
            write: rw,
            exec: false,
            shared: false,
            offset: 0,
            dev: 0,
            inode: 0,
            backing: Backing::Anonymous,
        }
    }

    #[test]
    fn a_cached_stack_with_no_thread_on_it_is_idle() {
        use crate::proc::mem::FakeMemory;
        const LEN: u64 = 64 << 10;
        let (guard_a, a, guard_b, b, c) = (
            0x1000_0000,
            0x1000_1000,
            0x2000_0000,
            0x2000_1000,
            0x3000_0000,
        );
        let maps = vec![
            map(guard_a, 0x1000, false),
            map(a, LEN, true),
            map(guard_b, 0x1000, false),
            map(b, LEN, true),
            map(c, LEN, true), // no guard below: not a thread stack
        ];
        let mut memory = FakeMemory::new();
        for m in &maps[1..] {
            memory.map(m.start, LEN as usize);
            // A thread control block near the top of each.
            let tcb = m.end - 0x900;
            memory.write_u64(tcb, tcb);
            memory.write_u64(tcb + 16, tcb);
            memory.write_u64(tcb + 0x6a0, m.start - 0x1000); // stackblock
        }
        // A live thread runs on `a`.
        let idle = idle_thread_stacks(&maps, &[a + 0x800], &memory);
        assert_eq!(idle, vec![b..b + LEN - 0x900]);
        // A stack the kernel merged with a block mapped right above it: the
        // control block is below the mapping's top.
        let merged = map(b, LEN + (3 << 20), true);
        let mut memory = FakeMemory::new();
        memory.map(b, (LEN + (3 << 20)) as usize);
        let tcb = b + LEN - 0x900;
        memory.write_u64(tcb, tcb);
        memory.write_u64(tcb + 16, tcb);
        memory.write_u64(tcb + 0x6a0, guard_b);
        // The main thread's control block at the top: no stackblock.
        let main_tcb = b + LEN + (3 << 20) - 0x800;
        memory.write_u64(main_tcb, main_tcb);
        memory.write_u64(main_tcb + 16, main_tcb);
        let pair = [maps[2].clone(), merged];
        assert_eq!(idle_thread_stacks(&pair, &[], &memory), vec![b..tcb]);
        // Without a control block, `b` is some other guarded mapping (a coroutine's).
        let mut plain = FakeMemory::new();
        plain.map(b, LEN as usize);
        assert!(idle_thread_stacks(&maps[2..4], &[], &plain).is_empty());
    }
}
