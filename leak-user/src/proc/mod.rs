//! What `/proc` tells about a target: its mappings, its threads' stack pointers, its
//! memory. Parsing is pure and unit-tested; reading needs the target to exist.

pub mod maps;
pub mod mem;
pub mod threads;

use std::path::PathBuf;

/// `/proc/PID/root` + `path`: the file as the target sees it, also across mount
/// namespaces (containers).
pub fn path_in_root(pid: u32, path: &std::path::Path) -> PathBuf {
    let relative = path.strip_prefix("/").unwrap_or(path);
    PathBuf::from(format!("/proc/{pid}/root")).join(relative)
}

/// `/proc/PID/map_files/START-END`: the file behind a mapping, which opens (as
/// root) even when the file was deleted or replaced on disk since it was mapped,
/// and also across mount namespaces.
pub fn map_file(pid: u32, m: &maps::Mapping) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
}

/// A path that opens the file behind a file mapping of `pid`: its
/// `/proc/PID/map_files/` entry when that opens (the very file mapped, even if it
/// was deleted or replaced on disk since), else the mapped path through
/// `/proc/PID/root` (without CAP_SYS_ADMIN, map_files does not open).
pub fn mapped_file(pid: u32, m: &maps::Mapping) -> Option<PathBuf> {
    let by_mapping = map_file(pid, m);
    if std::fs::metadata(&by_mapping).is_ok() {
        return Some(by_mapping);
    }
    m.file().map(|path| path_in_root(pid, path))
}

/// A path that opens the executable `pid` runs (`exe` is what `/proc/PID/exe`
/// reads): through `/proc/PID/root` when the file is still there, else
/// `/proc/PID/exe` itself, which opens a deleted or replaced executable too.
pub fn executable(pid: u32, exe: &std::path::Path) -> PathBuf {
    let in_root = path_in_root(pid, exe);
    let deleted = exe.as_os_str().as_encoded_bytes().ends_with(b" (deleted)");
    if deleted || !in_root.exists() {
        PathBuf::from(format!("/proc/{pid}/exe"))
    } else {
        in_root
    }
}

/// Does the process exist (and is it not a zombie we can no longer read)?
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Why a pid cannot be traced in user mode, each with its own one-line reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Untraceable {
    #[error("no such process: {0} (`pgrep NAME` finds a pid by name)")]
    Gone(u32),
    #[error(
        "process {pid} ({comm}) has exited: it is a zombie waiting for its parent to reap it, \
         with no memory left to trace"
    )]
    Zombie { pid: u32, comm: String },
    #[error(
        "process {pid} ({comm}) is a kernel thread: it has no user-space allocator to trace \
         (`--kernel` traces the kernel's own allocations)"
    )]
    KernelThread { pid: u32, comm: String },
}

/// `PF_KTHREAD` in the flags of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Checks that `pid` is a live user-space process.
pub fn check_traceable(pid: u32) -> Result<(), Untraceable> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|_| Untraceable::Gone(pid))?;
    let (state, flags) = parse_stat(&stat).ok_or(Untraceable::Gone(pid))?;
    let comm = || comm(pid).unwrap_or_default();
    match state {
        "Z" | "X" | "x" => Err(Untraceable::Zombie { pid, comm: comm() }),
        _ if flags & PF_KTHREAD != 0 => Err(Untraceable::KernelThread { pid, comm: comm() }),
        _ => Ok(()),
    }
}

/// Whether `pid` has exited: gone, or a zombie with no thread left. (A process
/// whose main thread called `pthread_exit` shows a zombie main thread while the
/// others run.)
pub fn has_exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    match parse_stat(&stat) {
        Some(("Z" | "X" | "x", _)) => !threads::list(pid).is_ok_and(|tids| tids.len() > 1),
        Some(_) => false,
        None => true,
    }
}

/// The state letter and the flags of a `/proc/PID/stat` line.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?;
    // ppid, pgrp, session, tty_nr, tpgid, then flags.
    let flags = fields.nth(5)?.parse().ok()?;
    Some((state, flags))
}

/// Is the process alive with its address space still there (not exiting)? A
/// process past the point where its memory is torn down has an empty maps file.
pub fn has_memory(pid: u32) -> bool {
    is_alive(pid) && std::fs::read(format!("/proc/{pid}/maps")).is_ok_and(|maps| !maps.is_empty())
}

/// The parent of a process (`/proc/PID/stat`), if it still exists.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The command name of a process (`/proc/PID/comm`), if it still exists.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// The cgroup (v2) a process is in, or None in the root cgroup or when unknown.
pub fn cgroup(pid: u32) -> Option<String> {
    parse_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// The v2 path of a `/proc/PID/cgroup` text (its `0::PATH` line), unless it is
/// the root.
pub fn parse_cgroup(text: &str) -> Option<String> {
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    (!path.is_empty() && path != "/").then(|| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_path_unless_root() {
        assert_eq!(
            parse_cgroup("0::/system.slice/docker-abc.scope\n"),
            Some("/system.slice/docker-abc.scope".to_owned())
        );
        assert_eq!(parse_cgroup("0::/\n"), None);
        assert_eq!(parse_cgroup("12:memory:/x\n"), None);
        assert_eq!(
            parse_cgroup("1:name=systemd:/a\n0::/b\n"),
            Some("/b".to_owned())
        );
    }

    #[test]
    fn tells_kernel_threads_zombies_and_processes_apart() {
        assert_eq!(check_traceable(std::process::id()), Ok(()));
        assert_eq!(
            parent(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        assert!(matches!(
            check_traceable(2),
            Err(Untraceable::KernelThread { pid: 2, .. })
        ));
        assert_eq!(check_traceable(u32::MAX), Err(Untraceable::Gone(u32::MAX)));
        let zombie = "42 (a (b) c) Z 1 42 42 0 -1 4194564 0 0";
        assert_eq!(parse_stat(zombie), Some(("Z", 4194564)));
    }

    #[test]
    fn an_unreaped_child_has_exited() {
        assert!(!has_exited(std::process::id()));
        assert!(has_exited(u32::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !has_exited(child.id()) {
            assert!(std::time::Instant::now() < deadline, "`true` never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Still there, a zombie, until reaped.
        assert!(std::path::Path::new(&format!("/proc/{}", child.id())).exists());
        child.wait().unwrap();
    }
}
