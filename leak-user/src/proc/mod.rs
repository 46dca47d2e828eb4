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

/// The command name of a process (`/proc/PID/comm`), if it still exists.
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}
