//! The live status line on stderr (only when stderr is a terminal).

use std::io::Write as _;

use crate::report::text::bytes;

/// What the status line shows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Status {
    pub objects: u64,
    pub bytes: u64,
    pub allocs: u64,
    pub frees: u64,
    pub events_per_sec: f64,
    pub lost: u64,
    pub leaks: u64,
    pub leaked_bytes: u64,
}

/// Draws and clears the line.
pub struct StatusLine {
    enabled: bool,
    shown: bool,
}

impl StatusLine {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            shown: false,
        }
    }

    pub fn render(s: &Status) -> String {
        format!(
            "leaktrace: {} objects ({}) | {} allocs {} frees | {:.0} events/s | lost {} | leaks {} ({})",
            s.objects,
            bytes(s.bytes),
            s.allocs,
            s.frees,
            s.events_per_sec,
            s.lost,
            s.leaks,
            bytes(s.leaked_bytes)
        )
    }

    pub fn show(&mut self, s: &Status) {
        if !self.enabled {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", Self::render(s));
        let _ = err.flush();
        self.shown = true;
    }

    /// Clears the line before anything else is printed.
    pub fn clear(&mut self) {
        if self.shown {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.shown = false;
        }
    }
}
