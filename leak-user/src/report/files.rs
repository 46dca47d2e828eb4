//! The files leaktrace writes for its user: the report (`--output`), the pprof
//! profile, the flamegraph and valgrind's XML (`--xml`). leaktrace runs as root, usually through sudo, and
//! writes into directories its user owns, so each file is
//!
//! * opened before anything is attached: a bad path costs nothing and no profile is
//!   lost after a long trace;
//! * emptied only when the run really starts ([`ReportFile::start`]): a run that
//!   fails to attach leaves the previous report as it was;
//! * opened with the rights of the user who ran sudo (`SUDO_UID`, `SUDO_GID` and
//!   their groups), so it is theirs and overwrites only what they could;
//! * never reached through a symbolic link, unless the link sits in a directory
//!   that only root can change (`/dev/stdout`, `/proc/self/fd/1`).

use std::{
    fs::File,
    io::{self, Seek as _, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::ptrace::launch::Credentials;

/// A file that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The last component is a symbolic link in a directory other users can change.
    #[error(
        "{0} is a symbolic link in a directory that other users can write; leaktrace does not \
         follow it: name the file itself"
    )]
    Symlink(PathBuf),
    /// The file cannot be opened for writing (the error is in the message, once).
    #[error("cannot write {path}: {error}; choose another path")]
    Open { path: PathBuf, error: io::Error },
}

/// An output file, opened for writing but not emptied yet.
#[derive(Debug)]
pub struct ReportFile {
    file: File,
    path: PathBuf,
    /// A regular file (emptied at start); a pipe or a device is written as it is.
    regular: bool,
}

impl ReportFile {
    /// Opens `path` for writing, as the invoking user under sudo, without emptying it.
    pub fn open(path: &Path) -> Result<Self, FileError> {
        Self::open_as(path, crate::ptrace::launch::sudo_user())
    }

    /// Opens `path` for writing with the rights of `user` (None: our own).
    pub fn open_as(path: &Path, user: Option<Credentials>) -> Result<Self, FileError> {
        let open_error = |error: io::Error| FileError::Open {
            path: path.to_owned(),
            error,
        };
        let owned = path.to_owned();
        let file = std::thread::scope(|s| {
            // A thread of its own: its credentials change, and die with it.
            s.spawn(|| open_with_rights(&owned, user.as_ref()))
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the opening thread panicked")))
        });
        let file = match file {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) && is_link(path) => {
                return Err(FileError::Symlink(path.to_owned()));
            }
            Err(e) => return Err(open_error(e)),
        };
        let regular = file.metadata().map_err(open_error)?.file_type().is_file();
        Ok(Self {
            file,
            path: path.to_owned(),
            regular,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run starts: empties a regular file.
    pub fn start(&mut self) -> io::Result<()> {
        if self.regular {
            self.file.set_len(0)?;
            self.file.rewind()?;
        }
        Ok(())
    }

    /// Replaces the contents with `bytes` (the pprof and flamegraph files).
    pub fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.start()?;
        self.file.write_all(bytes)?;
        self.file.flush()
    }
}

impl io::Write for ReportFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn is_link(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// True if only root can change `dir` (so a link in it was put there by root).
fn only_root_writes(dir: &Path) -> bool {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::metadata(dir).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
}

/// Opens without following a final symbolic link, except in a root-only directory.
fn open_with_rights(path: &Path, user: Option<&Credentials>) -> io::Result<File> {
    if let Some(user) = user {
        become_user(user)?;
    }
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o644)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_NOFOLLOW | libc::O_CLOEXEC) {
        Err(e)
            if e.raw_os_error() == Some(libc::ELOOP)
                && only_root_writes(path.parent().unwrap_or(Path::new("."))) =>
        {
            open(libc::O_CLOEXEC)
        }
        other => other,
    }
}

/// Gives the calling thread (only) the filesystem rights of `user`: its groups,
/// fsgid and fsuid. Changing the fsuid away from 0 also drops the capabilities that
/// bypass file permissions. Raw system calls: the libc wrappers change every thread.
fn become_user(user: &Credentials) -> io::Result<()> {
    // SAFETY: setgroups reads `groups.len()` gids from a valid slice; it affects
    // only this thread because it is the raw system call.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, user.groups.len(), user.groups.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setfsgid/setfsuid take plain ids and change only this thread's
    // credentials (raw system calls).
    unsafe {
        libc::syscall(libc::SYS_setfsgid, user.gid);
        libc::syscall(libc::SYS_setfsuid, user.uid);
    }
    // setfsuid reports no errors: read the ids back (an invalid id returns the
    // current one unchanged).
    // SAFETY: as above; -1 is never a valid id, so these only query.
    let (fsuid, fsgid) = unsafe {
        (
            libc::syscall(libc::SYS_setfsuid, u32::MAX),
            libc::syscall(libc::SYS_setfsgid, u32::MAX),
        )
    };
    if fsuid != i64::from(user.uid) || fsgid != i64::from(user.gid) {
        return Err(io::Error::other(format!(
            "cannot take the rights of uid {} gid {}",
            user.uid, user.gid
        )));
    }
    Ok(())
}

/// The files of one run, opened before anything is attached.
#[derive(Debug)]
pub struct OutputFiles {
    /// `--output` (None: stdout).
    pub report: Option<ReportFile>,
    pub pprof: Option<ReportFile>,
    pub flamegraph: Option<ReportFile>,
    /// `--xml`: valgrind memcheck's XML.
    pub xml: Option<ReportFile>,
}

impl OutputFiles {
    /// Opens the report (`--output`; None: stdout), the pprof profile, the
    /// flamegraph and the XML file that were asked for.
    pub fn open(
        report: Option<&Path>,
        pprof: Option<&Path>,
        flamegraph: Option<&Path>,
        xml: Option<&Path>,
    ) -> Result<Self, FileError> {
        let open = |p: Option<&Path>| p.map(ReportFile::open).transpose();
        Ok(Self {
            report: open(report)?,
            pprof: open(pprof)?,
            flamegraph: open(flamegraph)?,
            xml: open(xml)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("leaktrace-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn emptied_only_at_start() {
        let dir = scratch("start");
        let path = dir.join("report.txt");
        std::fs::write(&path, "previous report\n").unwrap();
        let mut f = ReportFile::open_as(&path, None).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"previous report\n");
        f.start().unwrap();
        f.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
        f.replace(b"x").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn links_in_shared_directories_are_not_followed() {
        let dir = scratch("link");
        let target = dir.join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.join("link.txt");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        // A directory anyone can write (like /tmp): the link could be anyone's.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let err = ReportFile::open_as(&link, None).unwrap_err();
        assert!(matches!(err, FileError::Symlink(_)), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        // /dev/stdout is a link that root made: it is followed.
        assert!(ReportFile::open_as(Path::new("/dev/stdout"), None).is_ok());
    }
}
