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

use aya::programs::{UProbe, uprobe::UProbeLinkId};

use super::Probes;

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
    // SAFETY: the child only makes async-signal-safe calls (close, read, _exit).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: closing descriptors of this child, reading into a valid byte, exiting.
        unsafe {
            // Whoever reads our output or waits for our pipes must see them close.
            for fd in [0, 1, 2, write_end] {
                libc::close(fd);
            }
            let mut byte = 0u8;
            // Returns (end of file) when the parent has exited.
            while libc::read(read_end, (&raw mut byte).cast(), 1) < 0 {}
            libc::_exit(0);
        }
    }
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
