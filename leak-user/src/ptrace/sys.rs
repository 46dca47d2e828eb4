//! Thin, checked wrappers over the ptrace and wait system calls this crate uses.

use std::io;

pub use libc::pid_t;

/// `status >> 16` of a ptrace event stop.
pub const EVENT_EXEC: i32 = libc::PTRACE_EVENT_EXEC;
pub const EVENT_EXIT: i32 = libc::PTRACE_EVENT_EXIT;
pub const EVENT_STOP: i32 = libc::PTRACE_EVENT_STOP;
pub const EVENT_FORK: i32 = libc::PTRACE_EVENT_FORK;
pub const EVENT_VFORK: i32 = libc::PTRACE_EVENT_VFORK;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn request(req: libc::c_uint, tid: pid_t, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every request used here takes integers (or a pointer we own, for
    // GETREGS and GETSIGINFO) as addr/data.
    check(unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    })
}

pub fn seize(tid: pid_t, options: libc::c_int) -> io::Result<()> {
    request(libc::PTRACE_SEIZE, tid, 0, options as usize).map(drop)
}

pub fn interrupt(tid: pid_t) -> io::Result<()> {
    request(libc::PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}

pub fn cont(tid: pid_t, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_CONT, tid, 0, signal as usize).map(drop)
}

pub fn listen(tid: pid_t) -> io::Result<()> {
    request(libc::PTRACE_LISTEN, tid, 0, 0).map(drop)
}

pub fn detach(tid: pid_t, signal: i32) -> io::Result<()> {
    request(libc::PTRACE_DETACH, tid, 0, signal as usize).map(drop)
}

/// The message of the last ptrace event stop (for a fork: the new pid).
pub fn event_message(tid: pid_t) -> io::Result<u64> {
    let mut message: libc::c_ulong = 0;
    request(libc::PTRACE_GETEVENTMSG, tid, 0, &raw mut message as usize)?;
    Ok(message as u64)
}

/// The `si_code` of the signal a thread is stopped for (a signal-delivery stop).
pub fn signal_code(tid: pid_t) -> io::Result<i32> {
    // SAFETY: siginfo_t is plain data; zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    request(libc::PTRACE_GETSIGINFO, tid, 0, &raw mut info as usize)?;
    Ok(info.si_code)
}

pub fn get_regs(tid: pid_t) -> io::Result<libc::user_regs_struct> {
    // SAFETY: user_regs_struct is plain integers; zero is a valid value.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    request(libc::PTRACE_GETREGS, tid, 0, &raw mut regs as usize)?;
    Ok(regs)
}

/// What `waitpid` said about a thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Nothing to report yet (WNOHANG).
    Nothing,
    /// Stopped: the signal and the ptrace event (0 for a signal-delivery stop).
    Stopped { signal: i32, event: i32 },
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

pub fn wait(tid: pid_t, block: bool) -> io::Result<Wait> {
    let mut status = 0;
    let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
    // SAFETY: `status` is a valid out-pointer.
    let ret = unsafe { libc::waitpid(tid, &mut status, flags) };
    if ret == -1 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(Wait::Nothing);
        }
        return Err(err);
    }
    if ret == 0 {
        return Ok(Wait::Nothing);
    }
    Ok(if libc::WIFSTOPPED(status) {
        Wait::Stopped {
            signal: libc::WSTOPSIG(status),
            event: status >> 16,
        }
    } else if libc::WIFEXITED(status) {
        Wait::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Wait::Signaled(libc::WTERMSIG(status))
    } else {
        Wait::Nothing
    })
}

/// Signals that put a thread into group-stop.
pub fn is_stop_signal(signal: i32) -> bool {
    matches!(
        signal,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}
