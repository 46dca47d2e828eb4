//! Kernel plumbing: load the embedded eBPF object, attach its programs, and read its
//! maps (targets, loss counters, stacks).
//!
//! Everything attached lives as long as [`Probes`]: dropping it detaches every
//! probe and tracepoint (and if the tracer dies, the kernel closes the perf events
//! and removes the probes for us).

mod entry;
pub mod features;
pub mod teardown;
pub mod tracefs;

use std::{io, num::NonZeroU32, os::fd::AsRawFd as _, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray},
    programs::{
        ProgramError, RawTracePoint, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use leak_common::{
    AllocFn, FreeProbeCount, HintKey, Loss, MAX_MODULES, ModuleRange, ModuleSlot, STACK_DEPTH,
    Stack, StackMode, TargetFlags, TracepointLayout, UnwindRow, UnwindTable, hint_filter_bit,
    names,
};

use crate::allocator::HookPlan;

mod epoch;
mod order;
mod ring;
pub use epoch::MemoEpoch;
pub use order::{StampKind, StampReader};
pub use ring::{Head, RingReader};

/// The eBPF object built by `leak-user/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leaktrace-ebpf"));

/// Whether the embedded object was built from source or is the committed one.
pub const OBJECT_ORIGIN: &str = env!("LEAKTRACE_EBPF_ORIGIN");

/// Why the eBPF side could not be set up. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "leaktrace needs root (or CAP_BPF and CAP_PERFMON) to load eBPF programs; run it with sudo"
    )]
    NotPermitted,
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux); leaktrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error(
        "this kernel ({release}) lacks {missing}; leaktrace needs Linux {oldest} or later",
        oldest = features::OLDEST_KERNEL
    )]
    KernelTooOld { release: String, missing: String },
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsMissing),
    #[error("cannot load the eBPF programs: {0:#}")]
    Load(#[source] aya::EbpfError),
    #[error("cannot attach {what}: {source}")]
    Attach {
        what: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "cannot attach to {what}: another uprobe tool (BCC, bpftrace with USDT) uses this \
         function with a different reference counter; stop it and retry (dmesg says \
         \"ref_ctr_offset mismatch\")"
    )]
    RefCtrConflict { what: String },
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("cannot map the ring buffer into memory: {0}")]
    Ring(#[source] io::Error),
}

/// Sizes and switches fixed at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub ring_bytes: u32,
    pub stack_entries: u32,
    /// Kernel mode: stacks go to the kernel-stack map, else to the user-stack map.
    /// The other map gets one entry (its buckets are allocated up front).
    pub kernel_stacks: bool,
    pub follow_forks: bool,
    pub capture_stacks: bool,
    /// Kernel mode: keep one object in 2^sample_shift.
    pub sample_shift: u32,
    pub kernel_filter_pids: bool,
    pub kernel_filter_cgroups: bool,
    /// Kernel mode: a raw and a classic program share each free tracepoint.
    pub dual_free_probes: bool,
    /// How user stacks are walked.
    pub stack_mode: StackMode,
    /// Rows of the CFI unwinder's table array (with [`StackMode::Cfi`]).
    pub unwind_rows: u32,
    /// Processes whose code mappings the CFI unwinder can hold at once.
    pub unwind_processes: u32,
    /// With [`StackMode::Cfi`]: use frame pointers when the unwinder cannot load
    /// (else that is an error).
    pub unwind_fallback: bool,
    /// User mode: keep calls in flight in task-local storage when the kernel lets
    /// uprobe programs use it (the verifier decides at load), else in a hash map
    /// by thread id.
    pub task_calls: bool,
    /// The overhead benchmark's floor: the allocator probes return at once.
    pub empty_probes: bool,
    /// User mode: every allocator uprobe will be attached with
    /// [`Scope::Process`], so the programs trust the kernel's filter.
    pub scoped_probes: bool,
    /// What user-mode records are stamped with (kernel mode: the clock); `None`:
    /// as suits the machine's CPUs and clock ([`StampKind::choose`]).
    pub stamps: Option<StampKind>,
    /// User mode: a ring per CPU, `ring_bytes` shared out among them (see
    /// [`Probes::take_rings`]). Kernel mode writes the one shared ring.
    pub cpu_rings: bool,
}

/// The shared ring's size when every CPU has a ring of its own: nothing writes
/// it then but a CPU that has none, which cannot happen (all or nothing). A
/// full-sized one cost each start 9 ms here, and 80 ms while earlier runs'
/// maps were being freed (the kernel zeroes every page of a ring up front).
const SHARED_RING_MIN_BYTES: u32 = 256 << 10;

/// Which processes a uprobe fires for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Only this process (cheapest: other processes never trap).
    Process(u32),
    /// Every process using the file; the in-kernel target map filters (needed to
    /// follow forks: a child is traced from its first instruction).
    AllProcesses,
}

/// The loaded object, its attachments and its maps.
pub struct Probes {
    ebpf: Ebpf,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub tracefs: PathBuf,
    /// How user stacks are walked (frame pointers when the unwinder could not load).
    pub stack_mode: StackMode,
    pub layout: TracepointLayout,
    /// Uprobe links per target (or 0 for all-process links).
    uprobe_links: Vec<(u32, &'static str, UProbeLinkId)>,
    loaded: Vec<&'static str>,
    memo_epoch: MemoEpoch,
    stamps: StampKind,
    /// Held until the first attach is done (`started`): see `teardown.rs`.
    startup: Option<teardown::StartupLock>,
    /// Each CPU's ring (by CPU number), made before the object so that the shared
    /// ring could be small; put in `CPU_RINGS` by [`Self::take_rings`].
    cpu_rings: Vec<(u32, RingReader)>,
}

fn check_environment() -> Result<(), EbpfError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && !has_bpf_capabilities() {
        return Err(EbpfError::NotPermitted);
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(EbpfError::NoBtf);
    }
    let missing = features::Offered::detect().missing();
    if !missing.is_empty() {
        return Err(EbpfError::KernelTooOld {
            release: features::release(),
            missing: missing.join(", "),
        });
    }
    Ok(())
}

/// CAP_BPF (39) and CAP_PERFMON (38) in the effective set.
fn has_bpf_capabilities() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 38) != 0 && caps & (1 << 39) != 0)
}

/// Entries of the user and kernel stack maps: only the mode's own map is sized
/// as asked, and none without stacks.
fn stack_map_sizes(options: &LoadOptions) -> (u32, u32) {
    match (options.capture_stacks, options.kernel_stacks) {
        (false, _) => (1, 1),
        (true, false) => (options.stack_entries, 1),
        (true, true) => (1, options.stack_entries),
    }
}

fn is_permission(err: &aya::EbpfError) -> bool {
    let text = format!("{err:?}");
    text.contains("PermissionDenied") || text.contains("Operation not permitted")
}

impl Probes {
    /// Loads the object with its maps sized and globals set. Two choices are left
    /// to the verifier, which decides when the allocator entry program loads: the
    /// CFI unwinder (`bpf_loop`, Linux 5.17) and task-local storage for calls in
    /// flight. Each is tried first; where the kernel refuses it, the object is
    /// loaded again without (frame pointers with `unwind_fallback`, else an
    /// error; a hash map by thread id), each with a one-line notice.
    /// `stack_mode` says which walk runs.
    pub fn load(options: &LoadOptions) -> Result<Self, EbpfError> {
        check_environment()?;
        let startup = teardown::StartupLock::take();
        let tracefs = tracefs::ensure_mounted()?;
        let mut cpu_rings = if options.cpu_rings {
            make_cpu_rings(options.ring_bytes).unwrap_or_else(|err| {
                log::warn!("one ring buffer for all CPUs (a ring per CPU failed: {err})");
                Vec::new()
            })
        } else {
            Vec::new()
        };
        let shared_ring_bytes = if cpu_rings.is_empty() {
            options.ring_bytes
        } else {
            SHARED_RING_MIN_BYTES
        };
        let layout = tracefs::layout(&tracefs);
        let cfi = options.stack_mode == StackMode::Cfi
            && options.capture_stacks
            && !options.kernel_stacks;
        let mut modes = vec![options.stack_mode];
        if cfi && options.unwind_fallback {
            modes.push(StackMode::FramePointers);
        }
        let storages: &[bool] = if options.task_calls {
            &[true, false]
        } else {
            &[false]
        };
        let mut last_err = None;
        let mut cfi_err = None;
        for &stack_mode in &modes {
            // Why task storage was refused with this walk.
            let mut task_err = None;
            for &task_calls in storages {
                let attempt = LoadOptions {
                    stack_mode,
                    ..options.clone()
                };
                match Self::load_with(&attempt, &tracefs, layout, task_calls, shared_ring_bytes) {
                    Ok(mut probes) => {
                        probes.startup = Some(startup);
                        probes.cpu_rings = std::mem::take(&mut cpu_rings);
                        if let Some(err) = cfi_err.filter(|_| stack_mode != options.stack_mode) {
                            log::warn!(
                                "the CFI unwinder cannot load here ({err}); stacks use frame \
                                 pointers"
                            );
                        }
                        if let Some(err) = task_err.filter(|_| !task_calls) {
                            log::warn!(
                                "calls in flight kept in a hash map by thread id (slower): this \
                                 kernel does not let uprobe programs use task-local storage \
                                 ({err})"
                            );
                        }
                        return Ok(probes);
                    }
                    Err(EbpfError::NotPermitted) => return Err(EbpfError::NotPermitted),
                    Err(err) => {
                        let text = err.to_string();
                        if task_calls {
                            task_err.get_or_insert(text.clone());
                        }
                        if stack_mode == StackMode::Cfi && cfi {
                            cfi_err.get_or_insert(text);
                        }
                        last_err = Some(err);
                    }
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn load_with(
        options: &LoadOptions,
        tracefs: &std::path::Path,
        layout: TracepointLayout,
        task_calls: bool,
        shared_ring_bytes: u32,
    ) -> Result<Self, EbpfError> {
        let flag = |b: bool| u32::from(b);
        let follow = flag(options.follow_forks);
        let stacks = flag(options.capture_stacks);
        // Each CPU wakes the reader after writing its share of an eighth of the ring.
        let cpus = aya::util::online_cpus().map_or(1, |c| c.len().max(1)) as u64;
        // CPU_RINGS is indexed by CPU number: room for every CPU that may run
        // (possible CPUs are numbered from 0 without gaps).
        let cpu_slots = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
        let wakeup = (u64::from(shared_ring_bytes / 8) / cpus).max(64 << 10);
        let filter_pids = flag(options.kernel_filter_pids);
        let filter_cgroups = flag(options.kernel_filter_cgroups);
        let dual_frees = flag(options.dual_free_probes);
        let task_calls_flag = flag(task_calls);
        let empty = flag(options.empty_probes);
        let scoped = flag(options.scoped_probes);
        let stamps = options.stamps.unwrap_or_else(|| {
            let clock_ns = crate::clock::read_cost_ns();
            let kind = StampKind::choose(cpu_slots as usize, clock_ns);
            log::debug!(
                "a clock read costs {clock_ns:.1} ns here: records stamped by the {kind:?}"
            );
            kind
        });
        let by_counter = flag(stamps == StampKind::Counter);
        let (user_stacks, kernel_stacks) = stack_map_sizes(options);
        let stack_mode = if options.capture_stacks && !options.kernel_stacks {
            options.stack_mode
        } else {
            StackMode::FramePointers
        };
        let cfi = stack_mode == StackMode::Cfi;
        let mode_tag = stack_mode as u32;
        let unwind_rows = if cfi { options.unwind_rows.max(1) } else { 1 };
        let unwind_index = if cfi {
            crate::unwind::tables::index_capacity(unwind_rows)
        } else {
            1
        };
        let unwind_modules = if cfi { 4096 } else { 1 };
        let unwind_ranges = if cfi {
            options.unwind_processes.max(1) * MAX_MODULES as u32
        } else {
            MAX_MODULES as u32
        };
        let mut ebpf = EbpfLoader::new()
            // TASK_CALLS: aya has no type for task storage, and we never read it.
            .allow_unsupported_maps()
            .map_max_entries(names::EVENTS, shared_ring_bytes)
            // With task storage the hash map by thread id is never used: one entry
            // instead of 65,536 preallocated (24 ms of a start while earlier
            // runs' maps were being freed).
            .map_max_entries(names::CALLS, if task_calls { 1 } else { 1 << 16 })
            .map_max_entries(names::CPU_RINGS, cpu_slots)
            .map_max_entries(names::STACKS, user_stacks)
            .map_max_entries(names::KSTACKS, kernel_stacks)
            .map_max_entries(names::UNWIND_ROWS, unwind_rows)
            .map_max_entries(names::UNWIND_INDEX, unwind_index)
            .map_max_entries(names::UNWIND_MODULES, unwind_modules)
            .map_max_entries(names::UNWIND_RANGES, unwind_ranges)
            .override_global(names::STACK_MODE, &mode_tag, true)
            .override_global(names::FOLLOW_FORKS, &follow, true)
            .override_global(names::CAPTURE_STACKS, &stacks, true)
            .override_global(names::WAKEUP_BYTES, &wakeup, true)
            .override_global(names::SAMPLE_SHIFT, &options.sample_shift, true)
            .override_global(names::KERNEL_FILTER_PIDS, &filter_pids, true)
            .override_global(names::KERNEL_FILTER_CGROUPS, &filter_cgroups, true)
            .override_global(names::DUAL_FREE_PROBES, &dual_frees, true)
            .override_global(names::TP_LAYOUT, &layout, true)
            .override_global(names::USE_TASK_CALLS, &task_calls_flag, true)
            .override_global(names::EMPTY_PROBES, &empty, true)
            .override_global(names::SCOPED_PROBES, &scoped, true)
            .override_global(names::ORDER_BY_COUNTER, &by_counter, true)
            .load(OBJECT)
            .map_err(|e| {
                if is_permission(&e) {
                    EbpfError::NotPermitted
                } else {
                    EbpfError::Load(e)
                }
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(err) => {
                log::debug!("eBPF logging unavailable: {err}");
                None
            }
        };
        let epoch = ebpf
            .take_map(names::MEMO_EPOCH)
            .expect("the object defines MEMO_EPOCH");
        let mut probes = Self {
            memo_epoch: MemoEpoch::new(epoch)?,
            stamps,
            startup: None,
            cpu_rings: Vec::new(),
            ebpf,
            _logger: logger,
            tracefs: tracefs.to_owned(),
            layout,
            stack_mode,
            uprobe_links: Vec::new(),
            loaded: Vec::new(),
        };
        if task_calls || cfi {
            // The verifier decides here whether the helper (task storage, bpf_loop)
            // is allowed.
            probes.program::<UProbe>("alloc_enter")?;
        }
        Ok(probes)
    }

    /// The first attach is done: other runs' releases may go on (`teardown.rs`).
    pub fn started(&mut self) {
        self.startup = None;
    }

    /// The aya-log reader, to poll so that eBPF log lines reach the terminal.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self._logger.take()
    }

    fn program<T>(&mut self, name: &'static str) -> Result<&mut T, EbpfError>
    where
        for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
        T: Loadable,
    {
        let attach_err = |source| EbpfError::Attach {
            what: format!("program {name}"),
            source,
        };
        let program: &mut T = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| attach_err(ProgramError::NotLoaded))?
            .try_into()
            .map_err(attach_err)?;
        if !self.loaded.contains(&name) {
            program.load_program().map_err(attach_err)?;
            self.loaded.push(name);
        }
        Ok(program)
    }

    /// Attaches the process-lifecycle and allocator-mapping tracepoints.
    pub fn attach_process_tracepoints(&mut self) -> Result<(), EbpfError> {
        for (program, category, event) in [
            ("task_newtask", "task", "task_newtask"),
            ("sched_process_exit", "sched", "sched_process_exit"),
            ("sched_process_exec", "sched", "sched_process_exec"),
            ("sys_enter_mmap", "syscalls", "sys_enter_mmap"),
            ("sys_exit_mmap", "syscalls", "sys_exit_mmap"),
            ("sys_enter_munmap", "syscalls", "sys_enter_munmap"),
            ("sys_enter_mremap", "syscalls", "sys_enter_mremap"),
            ("sys_exit_mremap", "syscalls", "sys_exit_mremap"),
            ("sys_exit_brk", "syscalls", "sys_exit_brk"),
        ] {
            self.attach_tracepoint(program, category, event)?;
        }
        Ok(())
    }

    pub fn attach_tracepoint(
        &mut self,
        program: &'static str,
        category: &str,
        event: &str,
    ) -> Result<(), EbpfError> {
        let tp: &mut TracePoint = self.program(program)?;
        tp.attach(category, event)
            .map_err(|source| EbpfError::Attach {
                what: format!("tracepoint {category}:{event}"),
                source,
            })?;
        Ok(())
    }

    pub fn attach_raw_tracepoint(
        &mut self,
        program: &'static str,
        event: &str,
    ) -> Result<(), EbpfError> {
        let tp: &mut RawTracePoint = self.program(program)?;
        tp.attach(event).map_err(|source| EbpfError::Attach {
            what: format!("raw tracepoint {event}"),
            source,
        })?;
        Ok(())
    }

    /// Attaches every function of `plan`.
    pub fn attach_hooks(&mut self, plan: &HookPlan, scope: Scope) -> Result<(), EbpfError> {
        let (pid, aya_scope) = match scope {
            Scope::Process(pid) => (
                pid,
                UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pids are not 0")),
            ),
            Scope::AllProcesses => (0, UProbeScope::AllProcesses),
        };
        // Frees first, then allocation returns, then realloc's entries (they
        // release the old block), then the other allocation entries: a block
        // recorded while the probes go in is always seen released if it is (a
        // malloc probe placed before the free probe would record blocks whose
        // frees are missed: stale objects, false leaks).
        let mut probes: Vec<_> = plan
            .objects
            .iter()
            .flat_map(|o| o.functions.iter().map(move |f| (o, f)))
            .flat_map(|(o, f)| {
                let moves = matches!(f.func, AllocFn::Realloc | AllocFn::Reallocarray);
                match f.return_probe {
                    false => vec![(0, "free_enter", o, f)],
                    true => vec![
                        (1, "alloc_return", o, f),
                        (if moves { 2 } else { 3 }, "alloc_enter", o, f),
                    ],
                }
            })
            .collect();
        probes.sort_by_key(|&(phase, ..)| phase);
        for (_, name, object, f) in probes {
            let what = || format!("{} in {}", f.names, object.path.display());
            let probe: &mut UProbe = self.program(name)?;
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::AbsoluteOffset(f.file_offset),
                cookie: Some(f.func as u64),
            };
            let link = probe
                .attach(point, &object.attach_path, aya_scope)
                .map_err(|source| {
                    if matches!(&source, ProgramError::UProbeError(_))
                        && format!("{source:?}").contains("InvalidInput")
                    {
                        EbpfError::RefCtrConflict { what: what() }
                    } else {
                        EbpfError::Attach {
                            what: what(),
                            source,
                        }
                    }
                })?;
            self.uprobe_links.push((pid, name, link));
        }
        Ok(())
    }

    /// Detaches the per-process probes of `pid` (it exited).
    pub fn detach_process(&mut self, pid: u32) {
        let links: Vec<_> = self
            .uprobe_links
            .extract_if(.., |(p, _, _)| *p == pid)
            .collect();
        self.drop_uprobe_links(links);
    }

    fn targets(&mut self) -> Result<HashMap<&mut MapData, u32, TargetFlags>, EbpfError> {
        let map = self
            .ebpf
            .map_mut(names::TARGETS)
            .expect("the object defines TARGETS");
        HashMap::try_from(map).map_err(|e| EbpfError::Map(names::TARGETS, e))
    }

    /// Makes `pid` a target: its allocator calls are recorded from now on.
    pub fn add_target(&mut self, pid: u32) -> Result<(), EbpfError> {
        self.targets()?
            .insert(pid, TargetFlags { traced: 1 }, 0)
            .map_err(|e| EbpfError::Map(names::TARGETS, e))
    }

    pub fn remove_target(&mut self, pid: u32) {
        if let Ok(mut t) = self.targets() {
            let _ = t.remove(&pid);
        }
    }

    /// Tells the programs where, above a call site in an allocation wrapper of `pid`,
    /// the wrapper's own return address is ([`HintKey`]).
    pub fn add_hints(&mut self, pid: u32, hints: &[(u64, u32)]) -> Result<(), EbpfError> {
        self.set_hint_filter_bits(hints)?;
        let map = self
            .ebpf
            .map_mut(names::HINTS)
            .expect("the object defines HINTS");
        let mut map: HashMap<&mut MapData, HintKey, u32> =
            HashMap::try_from(map).map_err(|e| EbpfError::Map(names::HINTS, e))?;
        for &(ret, offset) in hints {
            let key = HintKey {
                tgid: pid,
                _pad: 0,
                ret,
            };
            map.insert(key, offset, 0)
                .map_err(|e| EbpfError::Map(names::HINTS, e))?;
        }
        self.memo_epoch.bump();
        Ok(())
    }

    /// Sets the filter bits of `hints`' return addresses (before the hints go in:
    /// a probe that sees a bit clear never looks the address up). Bits are never
    /// cleared: a stale one costs a lookup, no more.
    fn set_hint_filter_bits(&mut self, hints: &[(u64, u32)]) -> Result<(), EbpfError> {
        let map = self
            .ebpf
            .map_mut(names::HINT_FILTER)
            .expect("the object defines HINT_FILTER");
        let mut filter: Array<&mut MapData, u64> =
            Array::try_from(map).map_err(|e| EbpfError::Map(names::HINT_FILTER, e))?;
        let mut words: std::collections::BTreeMap<u32, u64> = Default::default();
        for &(ret, _) in hints {
            let (word, bit) = hint_filter_bit(ret);
            *words.entry(word).or_default() |= 1 << bit;
        }
        for (word, bits) in words {
            let old = filter
                .get(&word, 0)
                .map_err(|e| EbpfError::Map(names::HINT_FILTER, e))?;
            if old | bits != old {
                filter
                    .set(word, old | bits, 0)
                    .map_err(|e| EbpfError::Map(names::HINT_FILTER, e))?;
            }
        }
        Ok(())
    }

    pub fn remove_hints(&mut self, pid: u32, hints: &[(u64, u32)]) {
        let Some(map) = self.ebpf.map_mut(names::HINTS) else {
            return;
        };
        let Ok(mut map) = HashMap::<&mut MapData, HintKey, u32>::try_from(map) else {
            return;
        };
        for &(ret, _) in hints {
            let _ = map.remove(&HintKey {
                tgid: pid,
                _pad: 0,
                ret,
            });
        }
        self.memo_epoch.bump();
    }

    /// Kernel mode `--cgroup`: trace these cgroup ids.
    pub fn add_cgroups(&mut self, ids: &[u64]) -> Result<(), EbpfError> {
        let map = self
            .ebpf
            .map_mut(names::CGROUPS)
            .expect("the object defines CGROUPS");
        let mut cgroups: HashMap<&mut MapData, u64, u32> =
            HashMap::try_from(map).map_err(|e| EbpfError::Map(names::CGROUPS, e))?;
        for id in ids {
            cgroups
                .insert(*id, 1, 0)
                .map_err(|e| EbpfError::Map(names::CGROUPS, e))?;
        }
        Ok(())
    }

    /// The ring buffers, to be read by the ingest task: `EVENTS` first, then, when
    /// loaded with `cpu_rings` (user mode), a ring for every CPU that may ever run
    /// (`per_cpu_ring_bytes`), put where that CPU's programs find it.
    ///
    /// All or nothing: the merge relies on each ring having one writer, so if a
    /// single CPU cannot have its ring, no CPU gets one and all write `EVENTS`
    /// (in ring order, merged by nothing), as in kernel mode. The rings were made
    /// before the object was loaded (a failure there loaded a full-sized
    /// `EVENTS`); putting them in place cannot fall back, `EVENTS` being small.
    pub fn take_rings(&mut self) -> Result<Vec<RingReader>, EbpfError> {
        let map = self
            .ebpf
            .take_map(names::EVENTS)
            .expect("the object defines EVENTS");
        let Map::RingBuf(data) = map else {
            return Err(EbpfError::Ring(io::Error::other(
                "EVENTS is not a ring buffer in this eBPF object",
            )));
        };
        let mut rings = vec![RingReader::new(data).map_err(EbpfError::Ring)?];
        let own = std::mem::take(&mut self.cpu_rings);
        if own.is_empty() {
            return Ok(rings);
        }
        // Borrowed, not taken: programs loaded later refer to the map's descriptor.
        let map = self
            .ebpf
            .map_mut(names::CPU_RINGS)
            .expect("the object defines CPU_RINGS");
        install_cpu_rings(map, &own).map_err(EbpfError::Ring)?;
        rings.extend(own.into_iter().map(|(_, r)| r));
        Ok(rings)
    }

    /// Where the ingest task reads the stamp the programs are at.
    pub fn stamp_reader(&self) -> Result<StampReader, EbpfError> {
        StampReader::new(self.stamps, self.ebpf.map(names::ORDER))
    }

    /// A reader for the loss counters and stack maps, independent of `self`.
    pub fn take_readers(&mut self) -> Result<MapReaders, EbpfError> {
        let losses = self
            .ebpf
            .take_map(names::LOSSES)
            .expect("the object defines LOSSES");
        let stacks = self
            .ebpf
            .take_map(names::STACKS)
            .expect("the object defines STACKS");
        let kstacks = self
            .ebpf
            .take_map(names::KSTACKS)
            .expect("the object defines KSTACKS");
        let free_probes = self
            .ebpf
            .take_map(names::FREE_PROBES)
            .expect("the object defines FREE_PROBES");
        Ok(MapReaders {
            losses: PerCpuArray::try_from(losses).map_err(|e| EbpfError::Map(names::LOSSES, e))?,
            free_probes: PerCpuArray::try_from(free_probes)
                .map_err(|e| EbpfError::Map(names::FREE_PROBES, e))?,
            stacks: HashMap::try_from(stacks).map_err(|e| EbpfError::Map(names::STACKS, e))?,
            kstacks: HashMap::try_from(kstacks).map_err(|e| EbpfError::Map(names::KSTACKS, e))?,
        })
    }

    /// The CFI unwinder's maps, for the daemon to fill.
    pub fn take_unwind_maps(&mut self) -> Result<UnwindMaps, EbpfError> {
        let mut take = |name: &'static str| {
            self.ebpf.take_map(name).ok_or(EbpfError::Map(
                name,
                aya::maps::MapError::InvalidName {
                    name: name.to_owned(),
                },
            ))
        };
        let rows = take(names::UNWIND_ROWS)?;
        let tables = take(names::UNWIND_TABLES)?;
        let index = take(names::UNWIND_INDEX)?;
        let modules = take(names::UNWIND_MODULES)?;
        let ranges = take(names::UNWIND_RANGES)?;
        let counts = take(names::UNWIND_COUNTS)?;
        Ok(UnwindMaps {
            rows: Array::try_from(rows).map_err(|e| EbpfError::Map(names::UNWIND_ROWS, e))?,
            tables: Array::try_from(tables).map_err(|e| EbpfError::Map(names::UNWIND_TABLES, e))?,
            index: Array::try_from(index).map_err(|e| EbpfError::Map(names::UNWIND_INDEX, e))?,
            modules: HashMap::try_from(modules)
                .map_err(|e| EbpfError::Map(names::UNWIND_MODULES, e))?,
            ranges: Array::try_from(ranges).map_err(|e| EbpfError::Map(names::UNWIND_RANGES, e))?,
            counts: PerCpuArray::try_from(counts)
                .map_err(|e| EbpfError::Map(names::UNWIND_COUNTS, e))?,
            epoch: self.memo_epoch.duplicate()?,
        })
    }

    /// Run counts of the programs (only counted while kernel.bpf_stats_enabled=1).
    pub fn run_counts(&self) -> Vec<(String, u64)> {
        self.program_info(RUN_CNT_OFFSET).collect()
    }

    /// How many times the kernel skipped each attached program because another BPF
    /// program was running on the same CPU.
    pub fn recursion_misses(&self) -> Vec<(String, u64)> {
        self.program_info(RECURSION_MISSES_OFFSET)
            .filter(|(_, misses)| *misses > 0)
            .collect()
    }

    /// One u64 field of every loaded program's `struct bpf_prog_info`, by name.
    fn program_info(&self, offset: usize) -> impl Iterator<Item = (String, u64)> + '_ {
        self.ebpf.programs().filter_map(move |(name, program)| {
            let fd = program.fd().ok()?;
            let value = prog_info_u64(fd.as_fd().as_raw_fd(), offset).ok()?;
            Some((name.to_owned(), value))
        })
    }
}

use std::os::fd::AsFd as _;

/// Programs that can be loaded on first use.
pub trait Loadable {
    fn load_program(&mut self) -> Result<(), ProgramError>;
}

impl Loadable for UProbe {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for TracePoint {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for RawTracePoint {
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

/// Offsets in `struct bpf_prog_info`: `run_cnt` (5.1+) and `recursion_misses`
/// (5.12+).
const RUN_CNT_OFFSET: usize = 200;
const RECURSION_MISSES_OFFSET: usize = 208;

/// A u64 field of `struct bpf_prog_info`, read with BPF_OBJ_GET_INFO_BY_FD: aya's
/// ProgramInfo does not expose `recursion_misses` or the run counters.
fn prog_info_u64(fd: i32, offset: usize) -> io::Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C, align(8))]
    struct Info([u8; 256]);
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info([0; 256]);
    let attr = Attr {
        bpf_fd: fd as u32,
        info_len: 256,
        info: info.0.as_mut_ptr() as u64,
    };
    // SAFETY: `attr` points to a buffer of `info_len` bytes that outlives the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &attr) }?;
    let bytes = &info.0[offset..offset + 8];
    Ok(u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
}

/// The size of a CPU's ring when `total` bytes are shared out among the `online`
/// CPUs: a power of two, at least 4 MiB (a busy thread writes ~85 MB/s of records
/// here, and the daemon drains every 10 ms). A CPU offline at start gets 1 MiB.
fn per_cpu_ring_bytes(total: u32, online: usize, is_online: bool) -> u32 {
    if !is_online {
        return 1 << 20;
    }
    let share = (total / online.max(1) as u32).max(4 << 20);
    if share.is_power_of_two() {
        share
    } else {
        share.next_power_of_two() / 2
    }
}

/// Makes a ring for every possible CPU, `total` bytes shared out among the
/// online ones.
fn make_cpu_rings(total: u32) -> io::Result<Vec<(u32, RingReader)>> {
    let possible = aya::util::nr_cpus().map_err(|(_, e)| e)? as u32;
    let online = aya::util::online_cpus().map_err(|(_, e)| e)?;
    (0..possible)
        .map(|cpu| {
            let bytes = per_cpu_ring_bytes(total, online.len(), online.contains(&cpu));
            Ok((
                cpu,
                RingReader::new(ring::create(bytes, &format!("RING_CPU{cpu}"))?)?,
            ))
        })
        .collect()
}

/// Puts each CPU's ring in `CPU_RINGS`; on any failure takes back the ones put in.
fn install_cpu_rings(map: &mut Map, rings: &[(u32, RingReader)]) -> io::Result<()> {
    let Map::ArrayOfMaps(data) = &*map else {
        return Err(io::Error::other("CPU_RINGS is not an array of maps"));
    };
    let slots_fd = data.fd().as_fd().as_raw_fd();
    let mut slots: ArrayOfMaps<&mut MapData, MapData> = map.try_into().map_err(io::Error::other)?;
    for (k, (cpu, reader)) in rings.iter().enumerate() {
        if let Err(err) = slots.set(*cpu, reader.map(), 0) {
            for (cpu, _) in &rings[..k] {
                let _ = clear_slot(slots_fd, *cpu);
            }
            return Err(io::Error::other(format!(
                "cannot put CPU {cpu}'s ring buffer in place: {err}"
            )));
        }
    }
    Ok(())
}

/// Empties slot `index` of an array of maps.
fn clear_slot(slots: std::os::fd::RawFd, index: u32) -> io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: slots as u32,
        _pad: 0,
        key: (&raw const index) as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: `attr` and the key it points to outlive the call.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &attr) }.map(drop)
}

/// The `bpf(2)` system call with command `cmd`; its non-negative result.
///
/// # Safety
///
/// `attr` must be the `union bpf_attr` layout `cmd` reads, and every pointer in
/// it valid for what the kernel does with it during the call.
pub(crate) unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`; its size is passed with it.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_ref(attr), size_of::<A>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The CFI unwinder's maps: rows and tables shared by every process, each
/// process's code mappings, and the walks' counters.
pub struct UnwindMaps {
    rows: Array<MapData, UnwindRow>,
    tables: Array<MapData, UnwindTable>,
    index: Array<MapData, u32>,
    modules: HashMap<MapData, u32, ModuleSlot>,
    ranges: Array<MapData, ModuleRange>,
    counts: PerCpuArray<MapData, u64>,
    epoch: MemoEpoch,
}

impl UnwindMaps {
    /// Writes a table's rows and index entries, then the table itself (the eBPF
    /// side only finds them through the table, so it never sees half of them).
    pub fn write_table(
        &mut self,
        id: u32,
        table: UnwindTable,
        rows: &[UnwindRow],
        index: &[u32],
    ) -> Result<(), EbpfError> {
        for (i, row) in rows.iter().enumerate() {
            self.rows
                .set(table.first + i as u32, row, 0)
                .map_err(|e| EbpfError::Map(names::UNWIND_ROWS, e))?;
        }
        for (i, entry) in index.iter().enumerate() {
            self.index
                .set(table.index + i as u32, entry, 0)
                .map_err(|e| EbpfError::Map(names::UNWIND_INDEX, e))?;
        }
        self.tables
            .set(id, table, 0)
            .map_err(|e| EbpfError::Map(names::UNWIND_TABLES, e))
    }

    /// Replaces the code mappings of `tgid`, kept in process slot `slot` (the
    /// caller hands out slots; at most [`MAX_MODULES`] ranges).
    pub fn set_modules(
        &mut self,
        tgid: u32,
        slot: u32,
        ranges: &[ModuleRange],
    ) -> Result<(), EbpfError> {
        let first = slot * MAX_MODULES as u32;
        let ranges = &ranges[..ranges.len().min(MAX_MODULES)];
        for (i, range) in ranges.iter().enumerate() {
            self.ranges
                .set(first + i as u32, range, 0)
                .map_err(|e| EbpfError::Map(names::UNWIND_RANGES, e))?;
        }
        let value = ModuleSlot {
            first,
            count: ranges.len() as u32,
        };
        self.modules
            .insert(tgid, value, 0)
            .map_err(|e| EbpfError::Map(names::UNWIND_MODULES, e))?;
        self.epoch.bump();
        Ok(())
    }

    pub fn remove_modules(&mut self, tgid: u32) {
        let _ = self.modules.remove(&tgid);
        self.epoch.bump();
    }

    /// The walks' counters summed over CPUs, by [`leak_common::UnwindCount`].
    pub fn counts(&self) -> [u64; leak_common::UnwindCount::COUNT as usize] {
        sum_per_cpu(&self.counts)
    }
}

/// The maps the daemon reads while it runs.
pub struct MapReaders {
    losses: PerCpuArray<MapData, u64>,
    free_probes: PerCpuArray<MapData, u64>,
    stacks: HashMap<MapData, u64, Stack>,
    kstacks: HashMap<MapData, u64, Stack>,
}

/// Every counter of a per-CPU array, summed over CPUs.
fn sum_per_cpu<const N: usize>(counters: &PerCpuArray<MapData, u64>) -> [u64; N] {
    let mut out = [0; N];
    for (i, slot) in out.iter_mut().enumerate() {
        if let Ok(values) = counters.get(&(i as u32), 0) {
            *slot = values.iter().sum();
        }
    }
    out
}

/// Loss counters summed over CPUs, indexed by [`Loss`].
pub type LossCounts = [u64; Loss::COUNT as usize];

impl MapReaders {
    pub fn losses(&self) -> LossCounts {
        sum_per_cpu(&self.losses)
    }

    /// Kernel mode: how the two free probes shared the frees, by [`FreeProbeCount`].
    pub fn free_probe_counts(&self) -> [u64; FreeProbeCount::COUNT as usize] {
        sum_per_cpu(&self.free_probes)
    }

    /// The frames of a user (or kernel) stack, innermost first.
    pub fn stack(&self, id: u64, kernel: bool) -> Option<Vec<u64>> {
        if id == 0 {
            return None;
        }
        let map = if kernel { &self.kstacks } else { &self.stacks };
        let stack = map.get(&id, 0).ok()?;
        Some(
            stack.frames[..STACK_DEPTH]
                .iter()
                .copied()
                .take_while(|f| *f != 0)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::per_cpu_ring_bytes;

    #[test]
    fn each_online_cpu_gets_a_power_of_two_share_of_at_least_4_mib() {
        assert_eq!(per_cpu_ring_bytes(32 << 20, 2, true), 16 << 20);
        assert_eq!(per_cpu_ring_bytes(32 << 20, 3, true), 8 << 20);
        assert_eq!(per_cpu_ring_bytes(32 << 20, 64, true), 4 << 20);
        assert_eq!(per_cpu_ring_bytes(32 << 20, 2, false), 1 << 20);
    }
}
