//! Launch mode: start a command so that the tracer is attached before its first
//! allocation (and, following forks, before its children's).
//!
//! We fork; the child waits on a pipe (the gate) while the parent seizes it with
//! ptrace (exec and exit stops on) and makes it a target; then the gate opens and the
//! child drops root (to the user who ran sudo) and calls execve. The exec stop lets
//! the daemon attach the probes to the new image before it runs a single
//! instruction; the exit stop lets it scan the memory one last time before the
//! process is torn down. Between fork and execve the child only makes
//! async-signal-safe calls.

use std::{
    ffi::{CString, OsString},
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use super::sys;

/// What to run, and as whom.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The program, resolved through PATH.
    pub program: PathBuf,
    /// argv, including `argv[0]`.
    pub args: Vec<OsString>,
    /// Run as this (uid, gid, supplementary groups) instead of as ourselves.
    pub run_as: Option<Credentials>,
    /// Trace the processes it forks too (with their own exec, entry and exit stops).
    pub follow_forks: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Why a command could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("command not found: {0} (not a path, and not in PATH)")]
    NotFound(String),
    #[error("cannot start {program}: {source}")]
    Exec {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what}: {source}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the ptrace worker has stopped")]
    WorkerGone,
}

/// Finds `name` like execvp would.
pub fn resolve_program(name: &OsString) -> Result<PathBuf, LaunchError> {
    let path = Path::new(name);
    if name.as_bytes().contains(&b'/') {
        return Ok(path.to_path_buf());
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(path))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| LaunchError::NotFound(name.to_string_lossy().into_owned()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The user who ran us through sudo, with their groups.
pub fn sudo_user() -> Option<Credentials> {
    let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid: u32 = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || uid == 0 {
        return None;
    }
    let name = std::env::var("SUDO_USER")
        .ok()
        .and_then(|u| CString::new(u).ok());
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut count = groups.len() as libc::c_int;
    let listed = name.as_ref().is_some_and(|name| {
        // SAFETY: buffers are sized by `count`, which getgrouplist updates.
        unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) >= 0 }
    });
    groups.truncate(if listed { count as usize } else { 0 });
    Some(Credentials { uid, gid, groups })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A forked child waiting at the gate, already seized by this thread.
pub struct GatedChild {
    pub pid: u32,
    pub program: PathBuf,
    gate: Option<OwnedFd>,
    errors: OwnedFd,
}

impl GatedChild {
    /// Lets the child call execve.
    pub fn open_gate(&mut self) {
        if let Some(gate) = self.gate.take() {
            // SAFETY: writing one byte from a valid buffer to a descriptor we own.
            unsafe { libc::write(gate.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    }

    /// The errno the child reported if execve failed.
    pub fn exec_error(&self) -> Option<io::Error> {
        let mut buf = [0u8; 4];
        // SAFETY: reading into a valid 4-byte buffer from a descriptor we own.
        let n = unsafe { libc::read(self.errors.as_raw_fd(), buf.as_mut_ptr().cast(), 4) };
        (n == 4).then(|| io::Error::from_raw_os_error(i32::from_ne_bytes(buf)))
    }
}

/// Forks the child, which waits at the gate; seizes it with exec and exit stops.
pub fn fork_gated(spec: &LaunchSpec) -> Result<GatedChild, LaunchError> {
    let sys_err = |what| move |source| LaunchError::Sys { what, source };
    let program = CString::new(spec.program.as_os_str().as_bytes())
        .map_err(|_| LaunchError::NotFound(spec.program.display().to_string()))?;
    let args: Vec<CString> = spec
        .args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| LaunchError::NotFound("an argument with a NUL byte".into()))?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let creds = spec.run_as.clone();
    let groups: Vec<libc::gid_t> = creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();

    let (gate_r, gate_w) = pipe().map_err(sys_err("create a pipe"))?;
    let (err_r, err_w) = pipe().map_err(sys_err("create a pipe"))?;
    // SAFETY: the child only makes async-signal-safe calls (read, setgroups, setgid,
    // setuid, sigprocmask, execve, write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(LaunchError::Sys {
            what: "fork",
            source: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // Child.
        unsafe {
            let mut byte = 0u8;
            if libc::read(gate_r.as_raw_fd(), (&raw mut byte).cast(), 1) != 1 {
                libc::_exit(127);
            }
            let fail = |err_fd: i32| {
                let errno = *libc::__errno_location();
                libc::write(err_fd, (&raw const errno).cast(), 4);
                libc::_exit(127);
            };
            if let Some(c) = &creds
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(c.gid) != 0
                    || libc::setuid(c.uid) != 0)
            {
                fail(err_w.as_raw_fd());
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail(err_w.as_raw_fd());
        }
        unreachable!("the child execs or exits");
    }
    drop(gate_r);
    drop(err_w);
    let mut options = libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_TRACEEXIT;
    if spec.follow_forks {
        options |= libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACEVFORK;
    }
    if let Err(source) = sys::seize(pid, options) {
        // SAFETY: killing the child we just forked.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = sys::wait(pid, true);
        return Err(LaunchError::Sys {
            what: "trace the command (PTRACE_SEIZE)",
            source,
        });
    }
    Ok(GatedChild {
        pid: pid as u32,
        program: spec.program.clone(),
        gate: Some(gate_w),
        errors: err_r,
    })
}
