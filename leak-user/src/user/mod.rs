//! User mode: attach to running processes (or launch a command), ingest their
//! allocator events, scan their memory every interval, report, and end cleanly.
//!
//! Launch mode holds the command at its exec stop until the probes are attached to
//! the new image, and at its exit stop until the final scan has read its memory;
//! then it passes the command's exit status through.

use std::{
    collections::{BTreeMap, HashSet},
    ffi::OsString,
    io::IsTerminal as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use leak_common::{Loss, StackMode};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval, sleep_until},
};

mod class_name;
mod heap_walk;
mod live;
pub mod reporter;

use self::{live::LiveScreen, reporter::Reporter};

/// How often daemon mode looks for new processes to trace.
const DISCOVER_PERIOD: Duration = Duration::from_millis(500);
use crate::{
    allocator::{HookPlan, WrapperObject, discover, resolve::LoaderEnv},
    clock,
    config::{Config, Mode, StackWalk},
    ebpf::{LoadOptions, Probes, Scope},
    events::Event,
    fleet::{self, Selector, discover::Discovery},
    proc::{self, maps::Mapping},
    ptrace::{ChildEvent, PtraceHandle, launch},
    report::{
        files::OutputFiles,
        profile_dir::ProfileDir,
        records::{EndReason, ProcessEvent, RunMode, Stats},
    },
    scan::{
        Workspace,
        scanner::{ScanError, ScanOptions, scan_process},
    },
    session::{
        self,
        figures::{self, lost_map},
        ingest::{self, EventSink},
        logging::spawn_logger,
        status::{Status, StatusLine},
    },
    table::{Notice, SharedTable, Table, verdict::VerdictBook},
    unwind::{self, Unwinder},
};

/// Applies ring-buffer events to the user-mode table.
struct UserSink(SharedTable);

impl EventSink for UserSink {
    fn apply(&mut self, events: &[Event]) -> bool {
        self.0.lock(|t| {
            for e in events {
                t.apply(e);
            }
            t.has_notices()
        })
    }
}

/// One traced process.
struct TracedProcess {
    /// Objects hooked for it (per-process scope).
    hooked: HashSet<PathBuf>,
    /// Its exec changed its image and it must be hooked again.
    rehook: bool,
    /// It was scanned at its exit stop: nothing more to scan.
    finished: bool,
    /// Allocation wrappers not mapped yet, whose hints are still to install.
    wrappers: Vec<WrapperObject>,
    /// Hints installed for it (runtime return address, offset).
    hints: Vec<(u64, u32)>,
}

impl TracedProcess {
    fn new() -> Self {
        Self {
            hooked: HashSet::new(),
            rehook: false,
            finished: false,
            wrappers: Vec::new(),
            hints: Vec::new(),
        }
    }
}

struct UserSession {
    config: Config,
    probes: Probes,
    table: SharedTable,
    ingest: ingest::IngestHandle,
    reporter: Reporter,
    ptrace: PtraceHandle,
    targets: BTreeMap<u32, TracedProcess>,
    /// Objects hooked for every process (with --follow-forks).
    hooked_everywhere: HashSet<PathBuf>,
    launched: Option<u32>,
    exit_status: Option<i32>,
    status: StatusLine,
    started: Instant,
    last_records: (Instant, u64),
    free_losses: u64,
    /// The scanner's buffers, lent to each scan.
    workspace: Option<Workspace>,
    /// The signal that ended the run: without a command's status to pass on, the
    /// exit status is 128 + it, as in shells.
    signal: Option<i32>,
    /// `--live`: the view on stdout (restored before the final report).
    live: Option<LiveScreen>,
    /// Daemon mode: which processes were tried, given up on, refused.
    discovery: Discovery,
    /// The CFI unwinder's tables (with `--stacks dwarf`/`auto` when it loaded).
    unwinder: Option<Unwinder>,
}

/// Checks the targets before anything is loaded, so that a typo costs nothing.
/// The loader environment of `pid` at its exec stop (ours if it cannot be read).
fn env_of(pid: u32) -> LoaderEnv {
    LoaderEnv::of_process(pid).unwrap_or_else(|err| {
        log::warn!("pid {pid}: cannot read its environment ({err}); assuming ours");
        LoaderEnv::from_current()
    })
}

fn check_targets(mode: &Mode) -> anyhow::Result<()> {
    match mode {
        Mode::Pids(pids) => {
            for &pid in pids {
                proc::check_traceable(pid)?;
            }
        }
        Mode::Launch(argv) => {
            launch::resolve_program(&argv[0])?;
        }
        Mode::Kernel | Mode::Daemon(_) => {}
    }
    Ok(())
}

/// Runs user mode until the targets are gone, a signal, or --duration.
pub async fn run(config: Config) -> anyhow::Result<i32> {
    check_targets(&config.mode)?;
    // Catch interrupts before anything is launched or attached, so that an early
    // Ctrl-C still ends the run through `finish` (and an `end` record).
    let signals = Signals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
    };
    let files = OutputFiles::open(
        config.output.path.as_deref(),
        config.output.pprof.as_deref(),
        config.output.flamegraph.as_deref(),
        config.output.xml.as_deref(),
    )?;
    let profile_dir = config
        .output
        .pprof_dir
        .as_deref()
        .map(|dir| ProfileDir::open(dir, config.output.pprof_keep))
        .transpose()?;
    let metrics =
        crate::metrics::server::start(config.output.metrics, config.output.metrics_sites).await?;
    let epoch = clock::now_ns();
    let mut probes = Probes::load(&LoadOptions {
        ring_bytes: config.ring_bytes,
        stack_entries: config.stack_entries,
        kernel_stacks: false,
        follow_forks: config.follow_forks,
        capture_stacks: config.stacks,
        sample_shift: 0,
        kernel_filter_pids: false,
        kernel_filter_cgroups: false,
        task_calls: true,
        empty_probes: config.empty_probes,
        // As `UserSession::scope` decides.
        scoped_probes: !config.follow_forks,
        dual_free_probes: false,
        stack_mode: match config.stack_walk {
            StackWalk::FramePointers => StackMode::FramePointers,
            StackWalk::Auto | StackWalk::Cfi => StackMode::Cfi,
        },
        unwind_rows: unwind::DEFAULT_ROWS,
        unwind_processes: unwind::PROCESS_SLOTS,
        unwind_fallback: config.stack_walk == StackWalk::Auto,
        stamps: config.record_order,
        cpu_rings: true,
    })?;
    probes.attach_process_tracepoints()?;
    let unwinder = if config.stacks && probes.stack_mode == StackMode::Cfi {
        Some(Unwinder::new(
            probes.take_unwind_maps()?,
            unwind::DEFAULT_ROWS,
            unwind::PROCESS_SLOTS,
        ))
    } else {
        None
    };
    if let Some(logger) = probes.take_logger() {
        spawn_logger(logger);
    }
    let readers = probes.take_readers()?;
    let rings = probes.take_rings()?;
    let stamps = probes.stamp_reader()?;
    let table = SharedTable::new(Table::new(epoch, VerdictBook::new(config.verdict)));
    let ingest = ingest::spawn(rings, stamps, UserSink(table.clone()))
        .context("cannot watch the ring buffers")?;
    let reporter = Reporter::new(&config, readers, files)
        .with_metrics(metrics)
        .with_profile_dir(profile_dir);
    let (child_tx, child_rx) = mpsc::unbounded_channel();
    let ptrace = PtraceHandle::spawn(child_tx);
    let status = StatusLine::new(config.output.status);
    let workspace = Workspace::with_threads(config.scan_threads);
    let mut session = UserSession {
        config,
        probes,
        table,
        ingest,
        reporter,
        ptrace,
        targets: BTreeMap::new(),
        hooked_everywhere: HashSet::new(),
        launched: None,
        exit_status: None,
        status,
        started: Instant::now(),
        last_records: (Instant::now(), 0),
        free_losses: 0,
        workspace: Some(workspace),
        signal: None,
        live: None,
        discovery: Discovery::default(),
        unwinder,
    };
    let mut signals = signals;
    if let Some(signal) = signals.pending() {
        // Interrupted while loading: launch nothing, attach nothing, as a shell
        // would report it.
        crate::ebpf::teardown::release_after_exit();
        return Ok(128 + signal);
    }
    if let Err(err) = session.attach_initial().await {
        if let Some(pid) = session.launched {
            // SAFETY: killing the command we started and could not trace.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        crate::ebpf::teardown::release_after_exit();
        return Err(err);
    }
    session.probes.started();
    session.reporter.begin();
    let keys = match session.config.output.live {
        Some(output) => {
            let (screen, keys) = LiveScreen::start(output);
            session.live = Some(screen);
            session.draw_live();
            keys
        }
        None => mpsc::unbounded_channel().1,
    };
    let code = session.main_loop(child_rx, signals, keys).await;
    // The report is out: do not make the caller wait while the kernel detaches.
    crate::ebpf::teardown::release_after_exit();
    code
}

/// SIGINT and SIGTERM, caught from the start of the run.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// The signal that arrived already, if any (without waiting).
    fn pending(&mut self) -> Option<i32> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if self.interrupt.poll_recv(&mut cx).is_ready() {
            return Some(libc::SIGINT);
        }
        self.terminate
            .poll_recv(&mut cx)
            .is_ready()
            .then_some(libc::SIGTERM)
    }
}

impl UserSession {
    /// Daemon mode's choice of processes, if this is daemon mode.
    fn selector(&self) -> Option<&Selector> {
        match &self.config.mode {
            Mode::Daemon(s) => Some(s),
            _ => None,
        }
    }

    fn scope(&self, pid: u32) -> Scope {
        // --all hooks each library once for every process (the kernel filters by
        // target); --comm and --cgroup hook each target alone, at no cost to others.
        if self.config.follow_forks || self.selector().is_some_and(|s| s.all) {
            Scope::AllProcesses
        } else {
            Scope::Process(pid)
        }
    }

    /// Attaches what `plan` has that is not attached yet for `pid`.
    fn attach(&mut self, pid: u32, plan: HookPlan) -> anyhow::Result<()> {
        if let Some(t) = self.targets.get_mut(&pid) {
            for w in &plan.wrappers {
                if !t.wrappers.iter().any(|x| x.file_id == w.file_id) {
                    t.wrappers.push(w.clone());
                }
            }
        }
        self.install_hints(pid);
        let scope = self.scope(pid);
        let already = match scope {
            Scope::AllProcesses => &mut self.hooked_everywhere,
            Scope::Process(_) => &mut self.targets.get_mut(&pid).expect("a target").hooked,
        };
        let fresh = HookPlan {
            objects: plan
                .objects
                .into_iter()
                .filter(|o| already.insert(o.path.clone()))
                .collect(),
            wrappers: Vec::new(),
        };
        if fresh.objects.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        self.probes.attach_hooks(&fresh, scope)?;
        log::debug!("pid {pid}: probes attached in {:?}", started.elapsed());
        let shown_pid = if scope == Scope::AllProcesses { 0 } else { pid };
        self.reporter.hooks(shown_pid, &fresh);
        Ok(())
    }

    fn add_target(&mut self, pid: u32, attached_late: bool) -> anyhow::Result<()> {
        self.targets.insert(pid, TracedProcess::new());
        self.table.lock(|t| t.add_process(pid, attached_late));
        self.probes.add_target(pid)?;
        Ok(())
    }

    async fn attach_initial(&mut self) -> anyhow::Result<()> {
        let mode = self.config.mode.clone();
        match &mode {
            Mode::Pids(pids) => {
                let infos: Vec<_> = pids.iter().map(|&p| session::target(p)).collect();
                self.reporter.start(RunMode::Pid, &infos, &self.config);
                for &pid in pids {
                    if let Err(err) = self.attach_pid(pid) {
                        // Gone meanwhile: its end is part of the run, which ends
                        // (with an end record) once no target is left.
                        if proc::check_traceable(pid).is_ok() {
                            return Err(err);
                        }
                        log::warn!("process {pid} exited while leaktrace attached to it");
                        if self.targets.contains_key(&pid) {
                            self.end_target(pid, None);
                        } else {
                            self.reporter.process(ProcessEvent::Exit, pid, None, None);
                        }
                        continue;
                    }
                    if self.config.heap_walk {
                        let record = heap_walk::walk(
                            &self.config,
                            &self.table,
                            &self.ingest,
                            &self.ptrace,
                            pid,
                        )
                        .await;
                        self.reporter.heap_walk(&record);
                    }
                }
            }
            Mode::Launch(argv) => {
                let pid = self.launch(argv).await?;
                let infos = [session::target(pid)];
                self.reporter.start(RunMode::Launch, &infos, &self.config);
                self.hook_new_image(pid)?;
                self.resume_exec(pid);
            }
            Mode::Daemon(_) => {
                self.reporter.start(RunMode::Daemon, &[], &self.config);
                self.discover().await;
            }
            Mode::Kernel => unreachable!("kernel mode has its own session"),
        }
        Ok(())
    }

    fn attach_pid(&mut self, pid: u32) -> anyhow::Result<()> {
        proc::check_traceable(pid)?;
        let maps =
            proc::maps::read(pid).with_context(|| format!("cannot read /proc/{pid}/maps"))?;
        let plan = discover::for_process(pid, &maps);
        if plan.is_empty() {
            bail!(
                "process {pid} ({}) maps no object that defines malloc and free (a stripped static \
                 binary?); there is nothing to hook",
                proc::comm(pid).unwrap_or_default()
            );
        }
        self.attach_plan(pid, &maps, plan)
    }

    /// Makes `pid` a target and attaches what `plan` needs for it.
    fn attach_plan(&mut self, pid: u32, maps: &[Mapping], plan: HookPlan) -> anyhow::Result<()> {
        self.add_target(pid, true)?;
        self.attach(pid, plan)?;
        self.reporter.remember_maps(pid, maps);
        self.refresh_unwind(pid, Some(maps));
        Ok(())
    }

    /// Daemon mode: attaches to the processes that match and started since the
    /// last poll (up to --max-targets), as `--pid` would, heap walk included.
    async fn discover(&mut self) {
        let Some(selector) = self.selector().cloned() else {
            return;
        };
        let listed = fleet::discover::list();
        let targets = &self.targets;
        let refused_before = self.discovery.refused_total;
        let pids = self.discovery.pick(
            &selector,
            &listed,
            &|p| targets.contains_key(&p),
            targets.len(),
            std::process::id(),
        );
        if self.discovery.refused_total > refused_before {
            // Once loudly; after that the counter (metrics) tells.
            let level = if refused_before == 0 {
                log::Level::Warn
            } else {
                log::Level::Debug
            };
            log::log!(
                level,
                "--max-targets {} reached: {} matching processes wait untraced ({} refused so far)",
                selector.max_targets,
                self.discovery.refused_now(),
                self.discovery.refused_total
            );
            self.reporter.refused(self.discovery.refused_total);
        }
        for pid in pids {
            if proc::check_traceable(pid).is_err() {
                self.discovery.give_up(pid); // a kernel thread, a zombie, gone
                continue;
            }
            let Ok(maps) = proc::maps::read(pid) else {
                self.discovery.give_up(pid);
                continue;
            };
            let plan = discover::for_process(pid, &maps);
            if plan.is_empty() {
                // Still in the loader, or nothing to hook: look again later.
                if self.discovery.failed(pid) {
                    log::info!(
                        "pid {pid} ({}): no allocator to hook after {} looks; left untraced",
                        proc::comm(pid).unwrap_or_default(),
                        fleet::discover::MAX_TRIES
                    );
                }
                continue;
            }
            if let Err(err) = self.attach_plan(pid, &maps, plan) {
                // Undo what was attached, and try again at the next poll.
                log::warn!("pid {pid}: cannot trace it (yet): {err:#}");
                self.discovery.failed(pid);
                if let Some(target) = self.targets.remove(&pid) {
                    self.probes.remove_hints(pid, &target.hints);
                    self.probes.detach_process(pid);
                    self.probes.remove_target(pid);
                    self.table.lock(|t| t.remove_process(pid));
                }
                continue;
            }
            self.reporter.process(ProcessEvent::Attach, pid, None, None);
            if self.config.heap_walk {
                let record =
                    heap_walk::walk(&self.config, &self.table, &self.ingest, &self.ptrace, pid)
                        .await;
                self.reporter.heap_walk(&record);
            }
        }
    }

    /// Gives the unwinder `pid`'s code mappings (read now unless given).
    fn refresh_unwind(&mut self, pid: u32, maps: Option<&[Mapping]>) {
        let Some(unwinder) = self.unwinder.as_mut() else {
            return;
        };
        match maps {
            Some(maps) => unwinder.refresh(pid, maps),
            None => {
                if let Ok(maps) = proc::maps::read(pid) {
                    unwinder.refresh(pid, &maps);
                }
            }
        }
    }

    /// Starts the command; it is held at its exec stop until resumed.
    async fn launch(&mut self, argv: &[OsString]) -> anyhow::Result<u32> {
        let program = launch::resolve_program(&argv[0])?;
        let spec = launch::LaunchSpec {
            program,
            args: argv.to_vec(),
            run_as: launch::sudo_user(),
            follow_forks: self.config.follow_forks,
        };
        let pid = self.ptrace.launch(spec).await?;
        self.launched = Some(pid);
        self.add_target(pid, false)?;
        self.ptrace.start().await?;
        Ok(pid)
    }

    /// Hooks the allocator of the image `pid` just exec'd (held at its exec stop).
    fn hook_new_image(&mut self, pid: u32) -> anyhow::Result<()> {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("cannot read /proc/{pid}/exe"))?;
        let plan = discover::for_command(&proc::executable(pid, &exe), &env_of(pid));
        if plan.is_empty() {
            log::warn!(
                "{}: no object defines malloc and free (a stripped static binary?); nothing is traced",
                exe.display()
            );
        }
        self.attach(pid, plan)
    }

    /// Lets `pid` run on from its exec stop, held again at its entry point (see
    /// `ptrace/entry.rs`) when its wrappers' hints must wait for its libraries.
    fn resume_exec(&mut self, pid: u32) {
        // Wrappers' hints and the unwinder's tables both need the libraries mapped.
        let wanted = self
            .targets
            .get(&pid)
            .is_some_and(|t| !t.wrappers.is_empty() || self.unwinder.is_some());
        let held = wanted
            && crate::ptrace::locate_entry(pid)
                .map_err(anyhow::Error::from)
                .and_then(|e| Ok(self.probes.attach_entry_hold(pid, &e.file, e.file_offset)?))
                .inspect_err(|err| {
                    log::warn!(
                        "pid {pid}: cannot hold it at its entry point ({err:#}); wrappers' \
                         callers may be missed at start"
                    )
                })
                .is_ok();
        if held {
            self.ptrace.resume_to_entry(pid);
        } else {
            self.ptrace.resume(pid);
        }
    }

    async fn main_loop(
        &mut self,
        mut child_rx: mpsc::UnboundedReceiver<ChildEvent>,
        signals: Signals,
        mut keys: mpsc::UnboundedReceiver<u8>,
    ) -> anyhow::Result<i32> {
        let mut scan_tick = interval(self.config.interval);
        scan_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        scan_tick.tick().await;
        let mut status_tick = interval(Duration::from_millis(250));
        // Wrapper hints must be in place soon after a library is mapped.
        let mut hint_tick = interval(Duration::from_millis(20));
        // Daemon mode looks for new processes this often.
        let mut discover_tick = interval(DISCOVER_PERIOD);
        let daemon = self.selector().is_some();
        let deadline = self
            .config
            .duration
            .map(|d| tokio::time::Instant::now() + d);
        let Signals {
            interrupt: mut sigint,
            terminate: mut sigterm,
        } = signals;
        let mut stopping: Option<tokio::time::Instant> = None;
        let notices = self.ingest.notices.clone();
        let mut keys_open = self.live.is_some();
        let reason = loop {
            let stop_at = stopping.or(deadline);
            tokio::select! {
                _ = scan_tick.tick() => {
                    let round = Instant::now();
                    self.scan_all().await;
                    let busy = round.elapsed();
                    if let Some(wait) = self.config.limits.scan_wait(busy, self.config.interval) {
                        log::info!(
                            "scans took {busy:?}: the next round waits {wait:?} (--scan-cpu {})",
                            self.config.limits.scan_cpu_percent
                        );
                        scan_tick.reset_after(wait.saturating_sub(busy));
                        self.reporter.throttled();
                    }
                    let stats = self.stats();
                    self.reporter.stats(&stats);
                    self.draw_live();
                    self.reporter.interval_profile();
                }
                key = keys.recv(), if keys_open => match key {
                    Some(b'q' | b'Q') => break EndReason::Quit,
                    Some(_) => {}
                    None => keys_open = false,
                },
                _ = status_tick.tick() => {
                    self.end_unseen_exits().await;
                    self.keep_to_object_cap();
                    self.poll_losses();
                    self.rehook();
                    // Libraries dlopen'ed since the last look get their tables.
                    for pid in self.live_targets() {
                        self.refresh_unwind(pid, None);
                    }
                    self.show_status();
                }
                _ = hint_tick.tick(), if self.pending_hints() => {
                    for pid in self.live_targets() {
                        self.install_hints(pid);
                    }
                }
                _ = discover_tick.tick(), if daemon => self.discover().await,
                _ = notices.notified() => self.handle_notices(),
                Some(event) = child_rx.recv() => self.child_event(event).await,
                _ = sigint.recv() => {
                    self.signal = Some(libc::SIGINT);
                    if stopping.is_some() || !self.wait_for_child(libc::SIGINT) {
                        break EndReason::Signal;
                    }
                    stopping = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                }
                _ = sigterm.recv() => {
                    self.signal = Some(libc::SIGTERM);
                    if stopping.is_some() || !self.wait_for_child(libc::SIGTERM) {
                        break EndReason::Signal;
                    }
                    stopping = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                }
                _ = async { sleep_until(stop_at.expect("guarded")).await }, if stop_at.is_some() => {
                    break if stopping.is_some() { EndReason::Signal } else { EndReason::Duration };
                }
            }
            if self.targets.is_empty() && (!daemon || stopping.is_some()) {
                break if stopping.is_some() {
                    EndReason::Signal
                } else {
                    EndReason::TargetsExited
                };
            }
            if self.reporter.output_closed() {
                break EndReason::OutputClosed;
            }
        };
        self.finish(reason).await
    }

    /// On a signal in launch mode, lets the command end first (its exit stop gives
    /// the final scan). Returns false when there is no command to wait for.
    fn wait_for_child(&mut self, signal: i32) -> bool {
        let Some(pid) = self.launched.filter(|p| self.targets.contains_key(p)) else {
            return false;
        };
        // Ctrl-C in a terminal reaches the command too (same process group); a
        // signal sent to us alone is passed on.
        if signal == libc::SIGTERM || !std::io::stdin().is_terminal() {
            // SAFETY: signalling the command we launched.
            unsafe { libc::kill(pid as i32, signal) };
        }
        true
    }

    async fn child_event(&mut self, event: ChildEvent) {
        match event {
            ChildEvent::Exec { pid } => {
                self.ingest.drain().await;
                self.handle_notices();
                if let Err(err) = self.hook_new_image(pid) {
                    log::warn!("pid {pid}: cannot hook the new image: {err:#}");
                }
                self.resume_exec(pid);
            }
            ChildEvent::Entry { pid } => {
                // Every library is mapped: the wrappers' call sites can be resolved
                // before the program's first instruction.
                self.probes.detach_entry_hold(pid);
                self.install_hints(pid);
                self.refresh_unwind(pid, None);
                self.ptrace.resume(pid);
            }
            ChildEvent::Exiting { pid } => {
                // Every record up to the exit is in the ring: apply it, then scan
                // the memory one last time before the kernel tears it down.
                self.ingest.drain().await;
                self.handle_notices();
                self.scan_one(pid, true).await;
                self.dump_objects(pid);
                if let Some(t) = self.targets.get_mut(&pid) {
                    t.finished = true;
                }
                self.ptrace.resume(pid);
            }
            ChildEvent::Exited { pid, status } => {
                if Some(pid) == self.launched {
                    self.exit_status = Some(status);
                }
                self.ingest.drain().await;
                self.handle_notices();
                self.end_target(pid, Some(status));
            }
        }
    }

    /// Ends the targets that exited without their exit record: gone before they
    /// were in the probes' target set (between the checks of an attach and the
    /// probes), or the record lost to a full ring. What the ring still holds is
    /// applied first. (The launched command's end comes from ptrace.)
    async fn end_unseen_exits(&mut self) {
        let exited: Vec<u32> = self
            .targets
            .keys()
            .copied()
            .filter(|&pid| Some(pid) != self.launched && proc::has_exited(pid))
            .collect();
        if exited.is_empty() {
            return;
        }
        self.ingest.drain().await;
        self.handle_notices();
        for pid in exited {
            if self.targets.contains_key(&pid) {
                log::debug!("process {pid} exited unseen by the probes: ended from /proc");
                self.end_target(pid, None);
            }
        }
    }

    /// `--max-objects`: while the table holds more, lets go of the target with
    /// the most objects (its leaks stay in the report).
    fn keep_to_object_cap(&mut self) {
        loop {
            let mut per_process = self.table.lock(|t| t.objects_per_process());
            let total: u64 = per_process.iter().map(|(_, n)| n).sum();
            // The launched command stays: the run is about it, and its exit is
            // held for the final scan. Others go first.
            let launched = per_process
                .iter()
                .position(|(p, _)| Some(*p) == self.launched);
            let launched_objects = launched.map_or(0, |i| per_process.swap_remove(i).1);
            let Some(pid) = self.config.limits.over_cap(&per_process, launched_objects) else {
                return;
            };
            log::warn!(
                "the table holds {total} objects, over --max-objects {}: letting go of pid {pid}, \
                 the target with the most",
                self.config.limits.max_objects.unwrap_or_default()
            );
            self.reporter.dropped();
            // Not picked up again by daemon mode while it lives.
            self.discovery.give_up(pid);
            self.end_target(pid, None);
        }
    }

    /// Installs the hints of `pid`'s wrappers that are mapped by now.
    fn install_hints(&mut self, pid: u32) {
        if self.targets.get(&pid).is_none_or(|t| t.wrappers.is_empty()) {
            return;
        }
        let Ok(maps) = proc::maps::read(pid) else {
            return;
        };
        let t = self.targets.get_mut(&pid).expect("checked above");
        let mut fresh = Vec::new();
        t.wrappers.retain(|w| {
            let hints = w.runtime_hints(&maps);
            let mapped = !hints.is_empty();
            fresh.extend(hints);
            !mapped
        });
        if fresh.is_empty() {
            return;
        }
        t.hints.extend_from_slice(&fresh);
        if let Err(err) = self.probes.add_hints(pid, &fresh) {
            log::warn!("pid {pid}: cannot install wrapper hints: {err}");
        }
    }

    fn pending_hints(&self) -> bool {
        self.targets.values().any(|t| !t.wrappers.is_empty())
    }

    fn end_target(&mut self, pid: u32, status: Option<i32>) {
        let Some(target) = self.targets.remove(&pid) else {
            return;
        };
        self.probes.remove_hints(pid, &target.hints);
        if let Some(u) = self.unwinder.as_mut() {
            u.forget(pid);
        }
        self.reporter.process(ProcessEvent::Exit, pid, None, status);
        self.probes.detach_process(pid);
        self.probes.remove_target(pid);
        self.table.lock(|t| t.remove_process(pid));
    }

    fn handle_notices(&mut self) {
        let notices = self.table.lock(Table::take_notices);
        for notice in notices {
            match notice {
                Notice::Retraction(r) => self.reporter.retraction(&r),
                Notice::ProcessForked { parent, child } => {
                    // The child has its parent's address space, so its hints too.
                    let mut target = TracedProcess::new();
                    if let Some(p) = self.targets.get(&parent) {
                        target.wrappers = p.wrappers.clone();
                        target.hints = p.hints.clone();
                    }
                    if let Err(err) = self.probes.add_hints(child, &target.hints) {
                        log::warn!("pid {child}: {err}");
                    }
                    self.targets.insert(child, target);
                    self.refresh_unwind(child, None);
                    self.reporter
                        .process(ProcessEvent::Fork, child, Some(parent), None);
                }
                Notice::ProcessExited { pid } => {
                    // The launched command's end comes with its status from ptrace.
                    if Some(pid) != self.launched {
                        self.end_target(pid, None);
                    }
                }
                Notice::ProcessExeced { pid } => {
                    self.reporter.process(ProcessEvent::Exec, pid, None, None);
                    if Some(pid) != self.launched
                        && let Some(t) = self.targets.get_mut(&pid)
                    {
                        t.rehook = true;
                    }
                }
            }
        }
    }

    /// Hooks processes that exec'd without us holding them (best effort: the loader
    /// may already have run code by now).
    fn rehook(&mut self) {
        let pids: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, t)| t.rehook)
            .map(|(&p, _)| p)
            .collect();
        for pid in pids {
            let Ok(maps) = proc::maps::read(pid) else {
                continue;
            };
            let plan = discover::for_process(pid, &maps);
            if plan.is_empty() {
                continue; // not loaded yet; try again next tick
            }
            if let Some(t) = self.targets.get_mut(&pid) {
                t.rehook = false;
            }
            if let Err(err) = self.attach(pid, plan) {
                log::warn!("pid {pid}: cannot hook the new image: {err:#}");
            }
            self.reporter.remember_maps(pid, &maps);
            self.refresh_unwind(pid, Some(&maps));
        }
    }

    fn live_targets(&self) -> Vec<u32> {
        self.targets
            .iter()
            .filter(|(_, t)| !t.finished)
            .map(|(&p, _)| p)
            .collect()
    }

    async fn scan_all(&mut self) {
        let pids = self.live_targets();
        for pid in pids {
            self.scan_one(pid, false).await;
        }
    }

    async fn scan_one(&mut self, pid: u32, at_exit: bool) {
        let table = self.table.clone();
        let ingest = self.ingest.clone();
        let ptrace = self.ptrace.clone();
        let options = ScanOptions {
            read_method: self.config.read_method,
            stop_the_world: self.config.stop_the_world && !at_exit,
            at_exit,
            heuristics: self.config.heuristics,
        };
        let mut workspace = self.workspace.take().unwrap_or_default();
        let scan = tokio::task::spawn_blocking(move || {
            let drain = || ingest.drain_blocking();
            let result = scan_process(&table, &mut workspace, pid, options, Some(&ptrace), &drain);
            (result, workspace)
        });
        let what = format!("pid {pid}: scanning its memory");
        let result = session::progress::while_running(self.config.output.status, what, scan)
            .await
            .map(|(result, workspace)| {
                self.workspace = Some(workspace);
                result
            });
        self.status.clear();
        match result {
            Ok(Ok(scan)) => {
                self.reporter.remember_maps(pid, &scan.maps);
                self.refresh_unwind(pid, Some(&scan.maps));
                self.reporter.scan(&scan);
            }
            Ok(Err(ScanError::Gone(_))) => {}
            Ok(Err(err)) => log::warn!("pid {pid}: {err}"),
            Err(err) => log::error!("pid {pid}: the scan failed: {err}"),
        }
    }

    /// Reads the loss counters; a lost free makes every object alive then unconfirmable.
    fn poll_losses(&mut self) {
        let losses = self.reporter.readers().losses();
        let free_losses = losses[Loss::RingFullFree as usize];
        if free_losses > self.free_losses {
            self.free_losses = free_losses;
            self.table.lock(|t| t.note_free_loss(clock::now_ns()));
        }
    }

    fn stats(&mut self) -> Stats {
        let (objects, bytes, counters) = self.table.lock(|t| {
            let (n, b) = t.totals();
            (n, b, t.counters)
        });
        Stats {
            events: figures::event_figures(
                self.started,
                &self.ingest.counters,
                &self.reporter.readers().losses(),
                self.probes.recursion_misses().into_iter().collect(),
                self.table.take_longest_hold().as_micros() as u64,
            ),
            objects,
            bytes,
            counters,
            unwind: self
                .unwinder
                .as_ref()
                .map(|u| figures::unwind_stats(&u.figures())),
        }
    }

    fn show_status(&mut self) {
        if !self.config.output.status {
            return;
        }
        let (objects, bytes, counters) = self.table.lock(|t| {
            let (n, b) = t.totals();
            (n, b, t.counters)
        });
        let records = self
            .ingest
            .counters
            .records
            .load(std::sync::atomic::Ordering::Relaxed);
        let (then, before) = self.last_records;
        let rate = (records - before) as f64 / then.elapsed().as_secs_f64().max(1e-3);
        self.last_records = (Instant::now(), records);
        let leaks = self.reporter.leak_totals();
        let (_, lost) = lost_map(&self.reporter.readers().losses());
        self.status.show(&Status {
            objects,
            bytes,
            allocs: counters.allocs,
            frees: counters.frees,
            events_per_sec: rate,
            lost,
            leaks: leaks.objects,
            leaked_bytes: leaks.bytes,
        });
    }

    /// `--dump-objects`: appends `pid`'s live objects as NDJSON lines.
    fn dump_objects(&self, pid: u32) {
        let Some(path) = &self.config.dump_objects else {
            return;
        };
        let lines = self.table.lock(|t| {
            let mut lines = String::new();
            for (addr, o) in t.process(pid).map(|p| p.objects.iter()).into_iter().flatten() {
                let func = t.sites.get(o.site).map_or("?", |s| crate::report::allocator_name(s.func));
                lines.push_str(&format!(
                    "{{\"pid\":{pid},\"address\":\"{addr:#x}\",\"size\":{},\"allocator\":\"{func}\",\"serial\":{}}}\n",
                    o.size(), o.serial
                ));
            }
            lines
        });
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, lines.as_bytes()));
        if let Err(err) = written {
            log::error!("cannot write {}: {err}", path.display());
        }
    }

    /// `--live`: redraws the view with the leaks standing now.
    fn draw_live(&mut self) {
        if self.live.is_none() {
            return;
        }
        let tracked = self.table.lock(|t| t.totals());
        let records = self
            .ingest
            .counters
            .records
            .load(std::sync::atomic::Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        let targets: Vec<String> = self
            .targets
            .keys()
            .map(|&pid| self.reporter.process_name(pid))
            .collect();
        let header = crate::report::live::Header {
            targets: targets.join(", "),
            elapsed,
            scans: self.reporter.scan_count(),
            interval: self.config.interval,
            tracked,
            events_per_sec: records as f64 / elapsed.as_secs_f64().max(1e-3),
            lost: lost_map(&self.reporter.readers().losses()).1,
        };
        let leaks = self.reporter.standing();
        if let Some(live) = &mut self.live {
            live.draw(&header, &leaks);
        }
    }

    async fn finish(&mut self, reason: EndReason) -> anyhow::Result<i32> {
        // The terminal goes back to the user before the final report.
        if let Some(mut live) = self.live.take() {
            live.restore();
        }
        self.status.clear();
        self.ingest.drain().await;
        self.handle_notices();
        // A last scan of what still runs (the launched command had its own at exit).
        if reason != EndReason::OutputClosed {
            for pid in self.live_targets() {
                self.scan_one(pid, false).await;
                self.dump_objects(pid);
            }
        }
        self.poll_losses();
        log::debug!(
            "program run counts (with kernel.bpf_stats_enabled=1): {:?}",
            self.probes.run_counts()
        );
        let stats = self.stats();
        self.reporter.stats(&stats);
        self.reporter.interval_profile();
        let written = self.reporter.end(reason, self.exit_status, &stats);
        for pid in self.targets.keys().copied().collect::<Vec<_>>() {
            self.probes.remove_target(pid);
        }
        written?;
        let leaked = self
            .config
            .error_exit
            .and_then(|gate| self.reporter.error_exit(&gate));
        Ok(match (leaked, self.launched, self.exit_status) {
            (Some(code), _, _) => code,
            (None, Some(_), Some(status)) => status,
            _ => self.signal.map_or(0, |s| 128 + s),
        })
    }
}
