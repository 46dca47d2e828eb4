//! The terminal side of the live view (`--live`; `report/live.rs` renders it):
//! the alternate screen, cleared and redrawn after every scan, or plain text
//! appended when stdout is not a terminal; keys read without Enter (canonical
//! mode and echo off, signals left on so that Ctrl-C still interrupts); the
//! terminal restored however the run ends (`Drop`).
//!
//! Plain ANSI escapes and termios through libc (already a dependency) rather than
//! crossterm: the view needs four escape sequences, one `tcsetattr` and the
//! window size, and leaktrace runs on Linux terminals only; a terminal library
//! would add a dependency tree for no behaviour we use.

use std::io::{IsTerminal as _, Write as _};

use tokio::sync::mpsc;

use crate::{
    config::LiveOutput,
    report::{
        Leak,
        live::{Header, LiveState, render},
    },
};

/// Enter the alternate screen and hide the cursor.
const ENTER: &str = "\x1b[?1049h\x1b[?25l";
/// Show the cursor and leave the alternate screen.
const LEAVE: &str = "\x1b[?25h\x1b[?1049l";
/// Cursor home, clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// The live view on stdout.
pub struct LiveScreen {
    output: LiveOutput,
    /// stdin's terminal settings before we changed them.
    saved: Option<libc::termios>,
    on_screen: bool,
    state: LiveState,
}

/// stdin's settings, after turning off canonical mode and echo (keys arrive one
/// at a time, unseen); None when stdin is not a terminal.
fn keys_without_enter() -> Option<libc::termios> {
    if !std::io::stdin().is_terminal() {
        return None;
    }
    // SAFETY: termios is plain data; tcgetattr fills it for fd 0, checked.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a termios for the duration of the call.
    if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
        return None;
    }
    let mut keys = saved;
    keys.c_lflag &= !(libc::ICANON | libc::ECHO);
    keys.c_cc[libc::VMIN] = 1;
    keys.c_cc[libc::VTIME] = 0;
    // SAFETY: as above.
    (unsafe { libc::tcsetattr(0, libc::TCSANOW, &keys) } == 0).then_some(saved)
}

/// Forwards the bytes typed on stdin until it closes (a thread: a read of a
/// terminal blocks, and the thread ends with the process).
fn read_keys(tx: mpsc::UnboundedSender<u8>) {
    let spawned = std::thread::Builder::new()
        .name("live-keys".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: reading into a buffer we own, of its length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                for &b in &buf[..n as usize] {
                    if tx.send(b).is_err() {
                        return;
                    }
                }
            }
        });
    if let Err(err) = spawned {
        log::warn!("cannot read keys for the live view ({err}): end it with Ctrl-C");
    }
}

/// The terminal's width and height (80 × 24 when stdout is not one).
fn size() -> (usize, usize) {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it, checked.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a winsize for the duration of the call.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (usize::from(ws.ws_col), usize::from(ws.ws_row))
    } else {
        (80, 24)
    }
}

impl LiveScreen {
    /// Starts the view. Keys typed on a terminal stdin arrive on the channel.
    pub fn start(output: LiveOutput) -> (Self, mpsc::UnboundedReceiver<u8>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let saved = keys_without_enter();
        if saved.is_some() {
            read_keys(tx);
        }
        let mut screen = Self {
            output,
            saved,
            on_screen: false,
            state: LiveState::default(),
        };
        if output == LiveOutput::Screen {
            screen.on_screen = true;
            screen.put(ENTER);
        }
        (screen, rx)
    }

    fn put(&self, s: &str) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(s.as_bytes()).and_then(|()| out.flush());
    }

    /// Draws the view of now: redrawn in place, or appended as text.
    pub fn draw(&mut self, header: &Header, leaks: &[Leak]) {
        match self.output {
            LiveOutput::Screen => {
                let (width, height) = size();
                let body = render(header, leaks, &mut self.state, width, height);
                // No newline after the last line: it would scroll the screen.
                self.put(&format!("{CLEAR}{}", body.trim_end_matches('\n')));
            }
            LiveOutput::Lines => {
                let body = render(header, leaks, &mut self.state, 100, usize::MAX);
                let at = header.elapsed.as_secs_f64();
                self.put(&format!(
                    "--- leaktrace live view at {at:.1} s ---\n{body}\n"
                ));
            }
        }
    }

    /// Gives the terminal back as it was: the normal screen, the cursor, stdin's
    /// settings. Idempotent.
    pub fn restore(&mut self) {
        if std::mem::take(&mut self.on_screen) {
            self.put(LEAVE);
        }
        if let Some(saved) = self.saved.take() {
            // SAFETY: restoring settings tcgetattr gave us, for fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
        }
    }
}

impl Drop for LiveScreen {
    fn drop(&mut self) {
        self.restore();
    }
}
