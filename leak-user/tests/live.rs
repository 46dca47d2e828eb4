//! The live view (`--live`) on a real terminal: tmux (installed by `cargo xtask
//! test`) runs leaktrace attached to a fixture that leaks ten blocks a second;
//! the test reads the screen with capture-pane, types with send-keys, and checks
//! that the view redraws in place, shows the growth, and that `q` and Ctrl-C end
//! the run the normal way (end record, status) with the terminal restored.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::util::{self, Fixture, serial};

/// A tmux server of our own (its own socket), killed at the end.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        Self {
            socket: format!("leaktrace-live-test-{}", std::process::id()),
        }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed by `cargo xtask test`");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `command` (a shell line) in a new 120 × 40 window, session `name`
    /// (a new one each time: killing the server's last session ends the server,
    /// and a new one started meanwhile can meet it exiting).
    fn start(&self, name: &str, command: &str) {
        self.tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "120",
            "-y",
            "40",
            command,
        ]);
    }

    fn screen(&self, name: &str) -> String {
        self.tmux(&["capture-pane", "-p", "-t", name])
    }

    fn keys(&self, name: &str, keys: &str) {
        self.tmux(&["send-keys", "-t", name, keys]);
    }

    /// Waits until the screen of `name` satisfies `done`; returns it.
    fn wait_for(&self, name: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + util::patience(60);
        loop {
            let screen = self.screen(name);
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// The objects column of the drip's row, if the view shows it.
fn drip_objects(screen: &str) -> Option<u64> {
    let row = screen.lines().find(|l| l.contains("drip_one <"))?;
    row.split_whitespace().next()?.parse().ok()
}

/// The scan number in the header.
fn scan_number(screen: &str) -> Option<u64> {
    let header = screen
        .lines()
        .find(|l| l.starts_with("leaktrace --live:"))?;
    let after = header.split(" scan ").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

/// One run of `leaktrace --live` in tmux: its files.
struct LiveRun {
    dir: PathBuf,
    session: &'static str,
}

impl LiveRun {
    fn start(tmux: &Tmux, session: &'static str, pid: u32) -> Self {
        let dir = util::scratch("live");
        let p = |name: &str| dir.join(name).display().to_string();
        // The shell records the terminal's settings before and after, and the
        // exit status; then keeps the window open for the last capture.
        let command = format!(
            "stty -g > {before}; {bin} --pid {pid} --live --interval 300ms --min-age 300ms \
             --json --output {out}; echo $? > {status}; stty -g > {after}; sleep 600",
            before = p("stty.before"),
            bin = util::leaktrace().display(),
            out = p("out.json"),
            status = p("status"),
            after = p("stty.after"),
        );
        tmux.start(session, &command);
        Self { dir, session }
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Waits for leaktrace to exit (and the shell to record the terminal's
    /// settings after it, the last thing it writes); returns its status.
    fn wait_exit(&self) -> i32 {
        let deadline = Instant::now() + util::patience(60);
        while self.file("status").trim().is_empty() || self.file("stty.after").is_empty() {
            assert!(Instant::now() < deadline, "leaktrace did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
        self.file("status").trim().parse().unwrap()
    }

    fn end_reason(&self) -> String {
        let records = util::read_json_lines(Path::new(&self.dir.join("out.json")));
        let end = records
            .iter()
            .rfind(|r| r["type"] == "end")
            .expect("an end record");
        end["reason"].as_str().unwrap().to_owned()
    }
}

#[test]
fn live_view_redraws_shows_growth_and_ends_cleanly_on_q_and_ctrl_c() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("formats", &["--drip", "100"], &[]);
    let tmux = Tmux::new();

    let run = LiveRun::start(&tmux, "q", fixture.pid());
    let s = run.session;
    tmux.wait_for(s, "the live view", |s| s.contains("leaktrace --live: pid"));
    fixture.go();
    let first = tmux.wait_for(s, "the dripping stack", |s| {
        drip_objects(s).is_some_and(|n| n >= 3)
    });
    let (objects, scan) = (drip_objects(&first).unwrap(), scan_number(&first).unwrap());
    let later = tmux.wait_for(s, "growth", |s| {
        drip_objects(s).is_some_and(|n| n > objects) && scan_number(s).is_some_and(|n| n > scan)
    });
    // Redrawn in place: one header, at the top, never scrolled.
    assert!(later.starts_with("leaktrace --live: pid"), "{later}");
    assert_eq!(later.matches("leaktrace --live:").count(), 1, "{later}");
    assert!(later.contains("leaked since attaching: "), "{later}");
    assert!(later.contains("objects/min"), "{later}");

    tmux.keys(s, "q");
    assert_eq!(run.wait_exit(), 0, "q ends the run like top");
    assert_eq!(run.end_reason(), "quit");
    assert_eq!(
        run.file("stty.before"),
        run.file("stty.after"),
        "terminal settings restored"
    );
    let after = tmux.screen(s);
    assert!(
        !after.contains("leaktrace --live:"),
        "the alternate screen is gone:\n{after}"
    );

    // Ctrl-C: the normal shutdown for a signal (130), terminal restored too.
    let run = LiveRun::start(&tmux, "ctrl-c", fixture.pid());
    let s = run.session;
    tmux.wait_for(s, "the live view again", |s| {
        scan_number(s).is_some_and(|n| n >= 2)
    });
    tmux.keys(s, "C-c");
    assert_eq!(run.wait_exit(), 130);
    assert_eq!(run.end_reason(), "signal");
    assert_eq!(run.file("stty.before"), run.file("stty.after"));
    assert!(!tmux.screen(s).contains("leaktrace --live:"));

    let (status, _) = fixture.finish();
    assert!(status.success(), "the fixture went on unharmed: {status}");
}

#[test]
fn live_view_appends_plain_text_when_stdout_is_not_a_terminal() {
    util::require_root();
    let _s = serial();
    let mut fixture = Fixture::start("formats", &["--drip", "100"], &[]);
    let pid = fixture.pid().to_string();
    let tracer = Command::new(util::leaktrace())
        .args([
            "--pid",
            &pid,
            "--live",
            "--interval",
            "300ms",
            "--min-age",
            "300ms",
        ])
        // Scans come slower under emulation: as many views take longer.
        .args(["--duration", &format!("{}s", 3 * util::slowness())])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    fixture.go();
    let out = tracer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains('\x1b'),
        "no escape sequences off a terminal"
    );
    let views = stdout.matches("--- leaktrace live view at ").count();
    assert!(views >= 4, "a view per scan, appended:\n{stdout}");
    let last = stdout.rsplit("--- leaktrace live view at ").next().unwrap();
    assert!(drip_objects(last).is_some_and(|n| n > 0), "{last}");
    assert!(
        stdout.contains("leaktrace summary: "),
        "the final report follows"
    );
    let (status, _) = fixture.finish();
    assert!(status.success());
}
