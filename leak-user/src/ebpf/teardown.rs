//! Letting go of uprobes without making anyone wait.
//!
//! Closing one uprobe's perf event waits for the kernel to be sure no thread still
//! runs its program (grace periods: ~120 ms per probe on this kernel, one after
//! another, and closing them from many threads overlaps little). A libc hooked with
//! return probes has 17 of them: detaching a process that exited blocked the
//! session for 2 s, and leaktrace's own exit (which closes whatever is left) took
//! as long again. So a target's links are closed later on a background thread, and at the
//! end of a run a forked child inherits every descriptor and closes them after we
//! have exited: our exit only drops references, and whoever waits for us is not
//! kept waiting for the kernel's bookkeeping.
//!
//! That bookkeeping holds the kernel's trace-event mutex through its grace periods
//! (destroying a uprobe's or a tracepoint's perf event), and every start of
//! leaktrace needs that mutex too: to read tracepoint formats, to create each perf
//! event. Runs started one after the other (a leak check per test of a suite) met
//! their predecessors' releases and took 1–6 s to start instead of 0.2 s. So
//! starting runs hold [`StartupLock`] shared while they load and attach; before
//! each descriptor it closes, the released child waits until no start holds it
//! (taking it exclusively and letting go at once: holding it through the close
//! let the child win every race for it and starve the start), and the released
//! children of several runs take turns. A start thus waits for at most one close
//! in progress.

use std::{
    ffi::CString,
    fs::File,
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicI32, Ordering},
};

use aya::programs::{UProbe, uprobe::UProbeLinkId};

use super::Probes;

/// Where the locks live (`name`: startup, release): shared by every leaktrace on
/// the machine.
fn lock_path(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("leaktrace-{name}.lock"))
}

/// Opens (creating it, open to every user: a start with CAP_BPF may run as
/// anyone) a lock file.
fn open_lock(name: &str) -> Option<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(name))
        .ok()?;
    let _ = file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    Some(file)
}

/// Held (shared) from loading the programs to the end of the first attach; see
/// the module's header. Released when dropped. Without the lock file (a
/// read-only /run/lock and temp dir) starts just do not wait for anyone.
pub struct StartupLock {
    file: Option<File>,
}

/// The descriptor of the [`StartupLock`] this process holds, or -1: a released
/// child that inherits it (a run that ended before its first attach did) must
/// let it go before waiting for starts, or it would wait for itself.
static HELD_STARTUP_FD: AtomicI32 = AtomicI32::new(-1);

impl StartupLock {
    pub fn take() -> Self {
        let file = open_lock("startup").filter(|file| {
            // SAFETY: flock on a descriptor we own.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) == 0 }
        });
        if let Some(f) = &file {
            HELD_STARTUP_FD.store(f.as_raw_fd(), Ordering::Relaxed);
        }
        Self { file }
    }
}

impl Drop for StartupLock {
    fn drop(&mut self) {
        if self.file.is_some() {
            HELD_STARTUP_FD.store(-1, Ordering::Relaxed);
        }
    }
}

/// How long a target's links wait before they are closed.
const RELEASE_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// At most this many links are closed at the same time.
const PARALLEL: usize = 64;

/// Drops every item, each on its own thread, up to [`PARALLEL`] at a time.
fn drop_in_parallel<T: Send>(items: Vec<T>) {
    let mut items = items;
    while !items.is_empty() {
        let batch: Vec<T> = items.drain(..items.len().min(PARALLEL)).collect();
        std::thread::scope(|scope| {
            for item in batch {
                scope.spawn(move || drop(item));
            }
        });
    }
}

/// Hands every descriptor this process holds (BPF links, programs, maps) to a
/// forked child that keeps them until this process has exited, then exits and
/// lets the kernel release them. Call once, when nothing is left to do but exit.
/// Without fork, the release just happens at our exit, as before.
pub fn release_after_exit() {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let [read_end, write_end] = fds;
    // Everything the child needs is made before the fork: after it, in a copy of a
    // multi-threaded process, only async-signal-safe calls are allowed.
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2 && *fd != read_end && *fd != write_end)
                .collect()
        })
        .unwrap_or_default();
    // Opened by the child (its own lock, not one shared with this process).
    let startup = CString::new(lock_path("startup").into_os_string().into_encoded_bytes()).ok();
    let release = open_lock("release");
    let release_fd = release.as_ref().map_or(-1, |f| f.as_raw_fd());
    // SAFETY: the child only makes async-signal-safe calls (close, read, open,
    // flock, _exit) on memory allocated before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: closing descriptors of this child, reading into a valid byte,
        // opening a path from a valid C string, locking, exiting.
        unsafe {
            // Whoever reads our output or waits for our pipes must see them close.
            for fd in [0, 1, 2, write_end] {
                libc::close(fd);
            }
            let mut byte = 0u8;
            // Returns (end of file) when the parent has exited.
            while libc::read(read_end, (&raw mut byte).cast(), 1) < 0 {}
            // An inherited start's lock first: we are about to wait for starts.
            let inherited = HELD_STARTUP_FD.load(Ordering::Relaxed);
            if inherited >= 0 {
                libc::close(inherited);
            }
            let startup = startup.map_or(-1, |path| {
                libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC)
            });
            // One run's release at a time.
            if release_fd >= 0 {
                libc::flock(release_fd, libc::LOCK_EX);
            }
            // The last references: each close may wait out grace periods holding
            // the kernel's trace-event mutex. Newest first (links before the
            // programs and maps they hold), each once no start is under way.
            for &fd in open.iter().rev() {
                if fd == startup || fd == release_fd || fd == inherited {
                    continue;
                }
                if startup >= 0 && libc::flock(startup, libc::LOCK_EX) == 0 {
                    libc::flock(startup, libc::LOCK_UN);
                }
                libc::close(fd);
            }
            libc::_exit(0);
        }
    }
    drop(release);
    // SAFETY: closing our copy of the read end; the write end stays open until we
    // exit (and is closed on exec, should anything exec).
    unsafe { libc::close(read_end) };
    if pid < 0 {
        // SAFETY: the write end is ours and unused.
        unsafe { libc::close(write_end) };
    }
}

impl Probes {
    /// Detaches these uprobe links (taken out of `uprobe_links`), in parallel.
    pub(super) fn drop_uprobe_links(&mut self, links: Vec<(u32, &'static str, UProbeLinkId)>) {
        let mut owned = Vec::with_capacity(links.len());
        for (_, name, link) in links {
            if let Some(probe) = self
                .ebpf
                .program_mut(name)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
                && let Ok(link) = probe.take_link(link)
            {
                owned.push(link);
            }
        }
        if !owned.is_empty() {
            // Not at once: a target's exit is often the end of the run, and a close
            // in progress holds up our exit (a thread cannot die inside it). Links
            // of a gone process never fire; a run that ends within the delay hands
            // them to `release_after_exit` instead.
            std::thread::spawn(move || {
                std::thread::sleep(RELEASE_DELAY);
                drop_in_parallel(owned);
            });
        }
    }
}
