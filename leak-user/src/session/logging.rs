//! The eBPF programs' log lines (aya-log) reach stderr through the daemon's logger.

use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

/// Polls the eBPF log ring so that log lines of the programs reach stderr.
pub fn spawn_logger(logger: EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring-buffer descriptor for its whole life.
        let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) })
        else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.clear_ready();
            guard.get_inner_mut().flush();
        }
    });
}
