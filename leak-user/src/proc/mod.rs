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

/// Is the process alive with its address space still there (not exiting)? A
/// process past the point where its memory is torn down has an empty maps file.
pub fn has_memory(pid: u32) -> bool {
    is_alive(pid) && std::fs::read(format!("/proc/{pid}/maps")).is_ok_and(|maps| !maps.is_empty())
}

/// The command name of a process (`/proc/PID/comm`), if it still exists.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}
