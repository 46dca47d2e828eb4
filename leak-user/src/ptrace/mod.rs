//! Everything that needs ptrace, on one dedicated thread.
//!
//! Linux ties a ptrace relationship to the tracer *thread*: every request must come
//! from the thread that attached. So one worker thread owns the launched command and,
//! with `--follow-forks`, every process it forks (exec, entry and exit stops), and
//! performs every stop-the-world freeze and thaw; the rest of the daemon talks to it
//! through [`PtraceHandle`].
//!
//! The worker never leaves a thread stopped: a freeze that fails resumes what it had
//! stopped, and when the worker ends it detaches from every process it traces (if the
//! tracer dies instead, the kernel detaches for us).

mod entry;
pub mod freeze;
pub mod launch;
mod sys;

use std::{
    collections::BTreeMap,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc::UnboundedSender, oneshot};

pub use self::{
    entry::{EntryPoint, locate as locate_entry},
    freeze::{FreezeError, Frozen},
    launch::{LaunchError, LaunchSpec},
};
use self::{
    freeze::{Ours, StopKind},
    launch::GatedChild,
    sys::{Wait, pid_t},
};

/// What happened to the launched command (or a process it forked, when followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildEvent {
    /// It called execve and is held stopped until [`PtraceHandle::resume`].
    Exec { pid: u32 },
    /// It reached its entry point (the loader has mapped its libraries) and is held
    /// stopped until [`PtraceHandle::resume`].
    Entry { pid: u32 },
    /// It is exiting and is held stopped (memory intact) until resumed.
    Exiting { pid: u32 },
    /// It is gone; `status` is its exit code, or 128 + the signal that killed it.
    Exited { pid: u32, status: i32 },
}

enum Request {
    Launch {
        spec: LaunchSpec,
        reply: oneshot::Sender<Result<u32, LaunchError>>,
    },
    /// Open the gate and wait for the first exec stop.
    Start {
        reply: oneshot::Sender<Result<(), LaunchError>>,
    },
    Resume {
        pid: u32,
        /// An entry hold was armed for it (at an exec stop): expect that stop.
        to_entry: bool,
    },
    Freeze {
        pid: u32,
        reply: oneshot::Sender<Result<Frozen, FreezeError>>,
    },
    Thaw {
        frozen: Frozen,
        reply: oneshot::Sender<Duration>,
    },
}

/// Talks to the ptrace worker thread.
#[derive(Clone)]
pub struct PtraceHandle {
    tx: mpsc::Sender<Request>,
}

impl PtraceHandle {
    /// Starts the worker. Events of a launched command go to `events`.
    pub fn spawn(events: UnboundedSender<ChildEvent>) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("leaktrace-ptrace".into())
            .spawn(move || Worker::new(events).run(rx))
            .expect("spawn the ptrace worker thread");
        Self { tx }
    }

    /// Forks the command, held before execve. Returns its pid.
    pub async fn launch(&self, spec: LaunchSpec) -> Result<u32, LaunchError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Launch { spec, reply })
            .map_err(|_| LaunchError::WorkerGone)?;
        rx.await.map_err(|_| LaunchError::WorkerGone)?
    }

    /// Lets the launched command exec; returns once it is held at its exec stop.
    pub async fn start(&self) -> Result<(), LaunchError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Start { reply })
            .map_err(|_| LaunchError::WorkerGone)?;
        rx.await.map_err(|_| LaunchError::WorkerGone)?
    }

    /// Lets `pid` continue after an exec, entry or exit stop.
    pub fn resume(&self, pid: u32) {
        let _ = self.tx.send(Request::Resume {
            pid,
            to_entry: false,
        });
    }

    /// Lets `pid` continue from its exec stop to its entry point, where the entry
    /// hold the session attached stops it again ([`ChildEvent::Entry`]).
    pub fn resume_to_entry(&self, pid: u32) {
        let _ = self.tx.send(Request::Resume {
            pid,
            to_entry: true,
        });
    }

    /// Stops every thread of `pid` (blocking; call from a blocking thread).
    pub fn freeze(&self, pid: u32) -> Result<Frozen, FreezeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Freeze { pid, reply })
            .map_err(|_| FreezeError::WorkerGone)?;
        rx.blocking_recv().map_err(|_| FreezeError::WorkerGone)?
    }

    /// Resumes a frozen process; returns how long it was stopped (blocking).
    pub fn thaw(&self, frozen: Frozen) -> Duration {
        let since = frozen.since;
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Request::Thaw { frozen, reply }).is_err() {
            return since.elapsed();
        }
        rx.blocking_recv().unwrap_or_else(|_| since.elapsed())
    }
}

/// Why a traced process is stopped, when we hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Exec,
    Entry,
    Exit,
}

/// A process the worker traces: the launched command, or one it forked.
#[derive(Default)]
struct Child {
    held: Option<Held>,
    /// Between an exec stop with an entry hold and the hold's stop.
    to_entry: bool,
    /// Auto-attached at a fork and not yet past its first stop.
    fresh: bool,
}

struct Worker {
    events: UnboundedSender<ChildEvent>,
    /// The launched command before its first exec (its gate and exec errors).
    gated: Option<GatedChild>,
    children: BTreeMap<u32, Child>,
}

impl Worker {
    fn new(events: UnboundedSender<ChildEvent>) -> Self {
        Self {
            events,
            gated: None,
            children: BTreeMap::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(request) => self.handle(request),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.poll_children();
        }
        self.detach_all();
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Launch { spec, reply } => {
                let result = launch::fork_gated(&spec).map(|gated| {
                    let pid = gated.pid;
                    self.gated = Some(gated);
                    self.children.insert(pid, Child::default());
                    pid
                });
                let _ = reply.send(result);
            }
            Request::Start { reply } => {
                let _ = reply.send(self.start());
            }
            Request::Resume { pid, to_entry } => {
                if let Some(child) = self.children.get_mut(&pid)
                    && child.held.take().is_some()
                {
                    child.to_entry = to_entry;
                    let _ = sys::cont(pid as pid_t, 0);
                }
            }
            Request::Freeze { pid, reply } => {
                self.poll_children();
                let child = self.children.get(&pid);
                if child.is_some_and(|c| c.to_entry && c.held.is_none()) {
                    // Stopping it now could swallow the entry hold's stop.
                    let _ = reply.send(Err(FreezeError::Starting(pid)));
                    return;
                }
                let ours = child.map(|c| Ours {
                    tid: pid,
                    held: c.held.is_some(),
                });
                let _ = reply.send(freeze::freeze(pid, ours));
            }
            Request::Thaw { frozen, reply } => {
                freeze::resume(&frozen.stopped);
                let paused = frozen.since.elapsed();
                // A traced process may have reached its exit while frozen: hold it.
                for t in &frozen.stopped {
                    if !t.seized_here
                        && t.stop == StopKind::Exiting
                        && let Some(child) = self.children.get_mut(&t.tid)
                    {
                        child.held = Some(Held::Exit);
                        let _ = self.events.send(ChildEvent::Exiting { pid: t.tid });
                    }
                }
                let _ = reply.send(paused);
            }
        }
    }

    fn start(&mut self) -> Result<(), LaunchError> {
        let gated = self.gated.as_mut().ok_or(LaunchError::WorkerGone)?;
        gated.open_gate();
        let pid = gated.pid;
        loop {
            match sys::wait(pid as pid_t, true) {
                Ok(Wait::Stopped {
                    event: sys::EVENT_EXEC,
                    ..
                }) => {
                    let child = self.children.entry(pid).or_default();
                    child.held = Some(Held::Exec);
                    return Ok(());
                }
                Ok(Wait::Stopped { signal, event: 0 }) => {
                    let _ = sys::cont(pid as pid_t, signal);
                }
                Ok(Wait::Stopped { .. }) | Ok(Wait::Nothing) => {
                    let _ = sys::cont(pid as pid_t, 0);
                }
                Ok(Wait::Exited(_) | Wait::Signaled(_)) | Err(_) => {
                    let program = gated.program.display().to_string();
                    let source = gated
                        .exec_error()
                        .unwrap_or_else(|| std::io::Error::other("it exited before execve"));
                    self.gated = None;
                    self.children.remove(&pid);
                    return Err(LaunchError::Exec { program, source });
                }
            }
        }
    }

    /// Handles whatever happened to the traced processes since the last look.
    fn poll_children(&mut self) {
        let pids: Vec<u32> = self.children.keys().copied().collect();
        for pid in pids {
            self.poll_child(pid);
        }
    }

    fn poll_child(&mut self, pid: u32) {
        loop {
            let Some(child) = self.children.get_mut(&pid) else {
                return;
            };
            if child.held.is_some() {
                return;
            }
            let waited = sys::wait(pid as pid_t, false);
            if !matches!(waited, Ok(Wait::Nothing)) {
                log::debug!("traced process {pid}: {waited:?}");
            }
            let hold = |child: &mut Child, held: Held, event: ChildEvent| {
                child.held = Some(held);
                let _ = self.events.send(event);
            };
            match waited {
                Ok(Wait::Nothing) => return,
                Ok(Wait::Stopped { signal, event }) => match event {
                    sys::EVENT_EXEC => {
                        child.to_entry = false;
                        return hold(child, Held::Exec, ChildEvent::Exec { pid });
                    }
                    sys::EVENT_EXIT => {
                        return hold(child, Held::Exit, ChildEvent::Exiting { pid });
                    }
                    sys::EVENT_FORK | sys::EVENT_VFORK => {
                        // The new process is traced already; it starts stopped.
                        if let Ok(new) = sys::event_message(pid as pid_t) {
                            let fresh = Child {
                                fresh: true,
                                ..Child::default()
                            };
                            self.children.insert(new as u32, fresh);
                        }
                        let _ = sys::cont(pid as pid_t, 0);
                    }
                    sys::EVENT_STOP if child.fresh => {
                        child.fresh = false;
                        let _ = sys::cont(pid as pid_t, 0);
                    }
                    sys::EVENT_STOP if sys::is_stop_signal(signal) => {
                        // Group-stop (Ctrl-Z): stay stopped, but let SIGCONT through.
                        let _ = sys::listen(pid as pid_t);
                    }
                    0 if child.to_entry && entry::is_hold(pid as pid_t, signal) => {
                        // Held; the signal is suppressed when it is resumed.
                        child.to_entry = false;
                        return hold(child, Held::Entry, ChildEvent::Entry { pid });
                    }
                    0 => {
                        let _ = sys::cont(pid as pid_t, signal);
                    }
                    _ => {
                        let _ = sys::cont(pid as pid_t, 0);
                    }
                },
                Ok(Wait::Exited(code)) => return self.child_gone(pid, code),
                Ok(Wait::Signaled(signal)) => return self.child_gone(pid, 128 + signal),
                Err(_) => return self.child_gone(pid, -1),
            }
        }
    }

    fn child_gone(&mut self, pid: u32, status: i32) {
        self.children.remove(&pid);
        if self.gated.as_ref().is_some_and(|g| g.pid == pid) {
            self.gated = None;
        }
        let _ = self.events.send(ChildEvent::Exited { pid, status });
    }

    /// Leaves every traced process running on its own (without our breakpoints).
    fn detach_all(&mut self) {
        for (pid, child) in std::mem::take(&mut self.children) {
            detach(pid as pid_t, &child);
        }
    }
}

/// Detaches from one traced process, suppressing the entry hold's signal.
fn detach(pid: pid_t, child: &Child) {
    let release = |pending: i32| {
        let ours = child.to_entry && entry::is_hold(pid, pending);
        let _ = sys::detach(pid, if ours { 0 } else { pending });
    };
    if child.held.is_some() {
        return release(0);
    }
    // A running tracee must be stopped before it can be detached.
    if sys::interrupt(pid).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match sys::wait(pid, false) {
            Ok(Wait::Stopped { signal, event }) => {
                return release(if event == 0 { signal } else { 0 });
            }
            Ok(Wait::Nothing) => thread::sleep(Duration::from_millis(1)),
            _ => return,
        }
    }
}
