//! A progress line on stderr for long work (the heap walk, a big scan,
//! symbolizing thousands of stacks), so that a person at a terminal sees that
//! leaktrace is busy and how far along it is. Only when stderr is a terminal (the
//! status line's condition: not `--quiet`, not under the live view); drawn only
//! once the work has taken half a second, at most ten times a second, and erased
//! when the work is done.

use std::{
    future::Future,
    io::Write as _,
    time::{Duration, Instant},
};

/// Work shorter than this shows nothing.
const QUIET_FOR: Duration = Duration::from_millis(500);
/// The line is redrawn at most this often.
const REDRAW: Duration = Duration::from_millis(100);

/// The text of the line: what, how far (when counted), for how long.
pub fn line(what: &str, done: Option<(u64, u64)>, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    match done {
        Some((done, total)) if total > 0 => format!(
            "leaktrace: {what}: {done}/{total} ({}%), {secs:.1} s",
            done.min(total) * 100 / total
        ),
        _ => format!("leaktrace: {what}… {secs:.1} s"),
    }
}

/// One piece of long work; the line is erased when it is dropped.
pub struct Progress {
    enabled: bool,
    what: String,
    started: Instant,
    drawn: Option<Instant>,
}

impl Progress {
    pub fn new(enabled: bool, what: impl Into<String>) -> Self {
        Self {
            enabled,
            what: what.into(),
            started: Instant::now(),
            drawn: None,
        }
    }

    /// Says how far the work is (`done` of `total`; None: not counted).
    pub fn update(&mut self, done: Option<(u64, u64)>) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if now - self.started < QUIET_FOR || self.drawn.is_some_and(|t| now - t < REDRAW) {
            return;
        }
        self.drawn = Some(now);
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{}",
            line(&self.what, done, now - self.started)
        );
        let _ = err.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// Awaits `work`, with an uncounted progress line while it lasts.
pub async fn while_running<T>(enabled: bool, what: String, work: impl Future<Output = T>) -> T {
    let mut progress = Progress::new(enabled, what);
    let mut tick = tokio::time::interval(REDRAW);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick(), if enabled => progress.update(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_how_far_and_how_long() {
        let t = Duration::from_millis(2345);
        assert_eq!(
            line("symbolizing 4000 leaks", Some((1000, 4000)), t),
            "leaktrace: symbolizing 4000 leaks: 1000/4000 (25%), 2.3 s"
        );
        assert_eq!(
            line("pid 7: walking the heap", None, t),
            "leaktrace: pid 7: walking the heap… 2.3 s"
        );
        assert_eq!(line("x", Some((0, 0)), t), "leaktrace: x… 2.3 s");
    }

    #[test]
    fn short_work_draws_nothing() {
        let mut p = Progress::new(true, "quick");
        p.update(Some((1, 2)));
        assert!(p.drawn.is_none(), "nothing before half a second");
        p.started -= QUIET_FOR;
        p.update(Some((1, 2)));
        assert!(p.drawn.is_some());
        let mut off = Progress::new(false, "off");
        off.started -= QUIET_FOR;
        off.update(None);
        assert!(off.drawn.is_none());
    }
}
