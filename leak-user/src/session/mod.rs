//! The daemon: wires the eBPF side, the ingest task, the table, the scanner and the
//! reporter together, in user mode ([`user`]) or kernel mode ([`crate::kernel`]).

pub mod ingest;
pub mod reporter;
pub mod status;
pub mod user;

use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

use crate::{events::Event, table::SharedTable};

/// Applies ring-buffer events to the user-mode table.
pub struct UserSink(pub SharedTable);

impl ingest::EventSink for UserSink {
    fn apply(&mut self, events: &[Event]) -> bool {
        self.0.lock(|t| {
            for e in events {
                t.apply(e);
            }
            t.has_notices()
        })
    }
}

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
