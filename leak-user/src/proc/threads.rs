//! The target's threads and where their stacks are in use.
//!
//! A thread blocked in a system call shows its stack pointer in
//! `/proc/PID/task/TID/syscall` without any ptrace; a running thread does not, and
//! then its whole stack mapping is scanned.

use std::io;

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

/// Stack pointers of the threads that are blocked right now.
pub fn blocked_stack_pointers(pid: u32) -> Vec<u64> {
    list(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|tid| {
            let line = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
            parse_syscall_sp(&line)
        })
        .collect()
}

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
    }
}
