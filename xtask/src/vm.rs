//! `cargo xtask vm-test`: the integration suite on the kernels users run, not only
//! on the host's.
//!
//! Uprobe behaviour, BPF helpers and tracepoint layouts change between kernels, so
//! each kernel named here is fetched from Debian's package registry (`apt-get
//! download`, unpacked with `dpkg-deb -x` under `target/vm/`) and booted under
//! `qemu-system-x86_64 -accel tcg` (KVM guests hang on this machine kind). The
//! guest's root is the host's own root, read-only over 9p, so the test binary,
//! `leaktrace`, the fixtures, their sources and the tools the tests run (valgrind,
//! setpriv, unshare, sh) are at the very paths the test binary was compiled with. A
//! small initramfs (busybox-static and the kernel's own virtio/9p modules) mounts
//! it, puts tmpfs where the tests write, mounts proc, sys, tracefs, debugfs and
//! bpffs, and runs the test binary as root; the serial console carries its output
//! and a marker line with its exit code, then the guest powers off.
//!
//! A guest runs on one host thread (see `run_vm`), so the suite is dealt out to
//! several guests side by side, one per host CPU by default: the tests are listed
//! on the host, dealt in turn, and each guest runs its share by exact name.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    fixtures, setup,
    util::{self, step},
};

/// The line the guest prints when the test binary has exited.
const EXIT_MARKER: &str = "xtask-vm: exit=";

/// The modules the guest needs to mount its root (with their dependencies), when
/// the kernel does not have them built in.
const ROOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// What `cargo xtask vm-test` was asked to do.
pub struct Options {
    /// Kernel specs: `host`, a version prefix (`6.1`), or a package name.
    pub kernels: Vec<String>,
    /// Run only tests whose name contains one of these.
    pub filters: Vec<String>,
    /// Skip tests whose name contains one of these.
    pub skips: Vec<String>,
    /// Per-guest limit, boot included.
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Guests per kernel, each running a share of the tests.
    pub shards: u32,
}

/// Where a suite runs.
enum Target {
    /// Natively, on the host's kernel.
    Host,
    /// In qemu, on a kernel from this Debian package.
    Debian(String),
}

/// One suite's result.
struct Outcome {
    kernel: String,
    summary: Option<Summary>,
    failed_tests: Vec<String>,
    exit: Option<i32>,
    timed_out: bool,
    wall: Duration,
    logs: Vec<PathBuf>,
}

impl Outcome {
    fn ok(&self) -> bool {
        !self.timed_out && self.exit == Some(0) && self.summary.as_ref().is_some_and(|s| s.ok)
    }

    /// One kernel's outcome from its shards': counts add up, the wall time is the
    /// longest shard's, the exit status the first failing one's. `total` is the
    /// number of tests in the whole suite (for the filtered-out count).
    fn merge(kernel: &str, shards: Vec<Outcome>, total: u32) -> Outcome {
        let mut merged = Outcome {
            kernel: kernel.to_owned(),
            summary: None,
            failed_tests: Vec::new(),
            exit: Some(0),
            timed_out: false,
            wall: Duration::ZERO,
            logs: Vec::new(),
        };
        let mut sum = Summary {
            ok: true,
            passed: 0,
            failed: 0,
            ignored: 0,
            filtered_out: 0,
        };
        for shard in shards {
            match &shard.summary {
                Some(s) => {
                    sum.ok &= s.ok;
                    sum.passed += s.passed;
                    sum.failed += s.failed;
                    sum.ignored += s.ignored;
                }
                // A guest that never summed up fails its kernel.
                None => sum.ok = false,
            }
            if merged.exit == Some(0) {
                merged.exit = shard.exit;
            }
            merged.timed_out |= shard.timed_out;
            merged.wall = merged.wall.max(shard.wall);
            merged.failed_tests.extend(shard.failed_tests);
            merged.logs.extend(shard.logs);
        }
        sum.filtered_out = total.saturating_sub(sum.passed + sum.failed + sum.ignored);
        merged.summary = Some(sum);
        merged
    }
}

/// Deals `tests` out to `hands` shares in turn (neighbours in the list, often
/// alike in cost, land in different shares); empty shares are dropped.
fn deal(tests: &[String], hands: usize) -> Vec<Vec<String>> {
    let hands = hands.max(1);
    let mut shares = vec![Vec::new(); hands];
    for (i, test) in tests.iter().enumerate() {
        shares[i % hands].push(test.clone());
    }
    shares.retain(|s| !s.is_empty());
    shares
}

/// libtest's `test result:` line.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    ok: bool,
    passed: u32,
    failed: u32,
    ignored: u32,
    filtered_out: u32,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let specs: Vec<String> = if options.kernels.is_empty() {
        vec!["6.1".into(), "newest".into()]
    } else {
        options.kernels.clone()
    };
    let mut targets = Vec::new();
    for spec in &specs {
        let target = resolve(spec)?;
        if let Target::Debian(p) = &target
            && targets
                .iter()
                .any(|t| matches!(t, Target::Debian(q) if q == p))
        {
            continue;
        }
        targets.push(target);
    }
    if targets.iter().any(|t| matches!(t, Target::Debian(_))) {
        setup::ensure_packages(&[
            ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
            ("busybox-static", "/bin/busybox"),
            ("xz-utils", "/usr/bin/xz"),
            ("zstd", "/usr/bin/zstd"),
        ])?;
        ensure_static(Path::new("/bin/busybox"))?;
    }
    setup::test_packages()?;
    fixtures::build()?;
    let test_binary = build_test_binary()?;
    // The tests make their scratch directories here (CARGO_TARGET_TMPDIR); the
    // guest mounts a tmpfs on it, which needs the directory to exist.
    let target_tmp = util::root().join("target/tmp");
    std::fs::create_dir_all(&target_tmp)?;
    let suite = Suite {
        test_binary,
        target_tmp,
        options,
    };
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = match target {
            Target::Host => suite.run_host()?,
            Target::Debian(package) => {
                let kernel = Kernel::fetch(package)?;
                suite.run_vm_sharded(&kernel)?
            }
        };
        outcomes.push(outcome);
    }
    print_results(&outcomes);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.kernel.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the integration suite failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Turns a command-line kernel spec into a target.
fn resolve(spec: &str) -> anyhow::Result<Target> {
    if spec == "host" {
        return Ok(Target::Host);
    }
    if spec.starts_with("linux-image-") {
        return Ok(Target::Debian(spec.to_owned()));
    }
    // Package lists on a fresh machine can be stale: they name kernels the
    // mirror no longer has. Refresh them once when the newest match cannot be had.
    let newest = newest_kernel(spec)?;
    if has_candidate(&newest) {
        return Ok(Target::Debian(newest));
    }
    step(&format!("{newest} cannot be downloaded: apt-get update"));
    util::run(Command::new("apt-get").args(["update", "-qq"]))?;
    let newest = newest_kernel(spec)?;
    if !has_candidate(&newest) {
        bail!("apt has no downloadable version of {newest}; name another kernel package");
    }
    Ok(Target::Debian(newest))
}

/// Does apt have a version of `package` it could download?
fn has_candidate(package: &str) -> bool {
    util::output(Command::new("apt-cache").args(["policy", package])).is_ok_and(|policy| {
        policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .is_some_and(|c| c.trim() != "(none)")
    })
}

/// The newest plain amd64 kernel package apt knows that matches `spec`.
fn newest_kernel(spec: &str) -> anyhow::Result<String> {
    let names = util::output(Command::new("apt-cache").args(["pkgnames", "linux-image-"]))
        .context("cannot list Debian's kernel packages (is this Debian, with apt?)")?;
    let mut candidates: Vec<(&str, &str)> = names
        .lines()
        .filter_map(|name| Some((name, kernel_version(name)?)))
        .filter(|(_, version)| {
            spec == "newest"
                || version
                    .strip_prefix(spec)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '-', '+', '~']))
        })
        .collect();
    candidates.sort_by_key(|(_, version)| version_key(version));
    let Some((name, _)) = candidates.last() else {
        bail!(
            "apt knows no kernel package matching {spec:?} \
             (linux-image-{spec}*-amd64-unsigned); run `apt-get update`, or name a package"
        );
    };
    Ok((*name).to_owned())
}

/// The version in a plain amd64 kernel package's name (`linux-image-6.1.0-57-amd64-unsigned`
/// → `6.1.0-57`); None for other flavours (cloud, rt) and meta-packages.
fn kernel_version(package: &str) -> Option<&str> {
    let version = package
        .strip_prefix("linux-image-")?
        .strip_suffix("-amd64-unsigned")?;
    let plain = version.starts_with(|c: char| c.is_ascii_digit())
        && !version.contains("-cloud")
        && !version.contains("-rt");
    plain.then_some(version)
}

/// Numbers in a version string, for ordering (`6.12.118+deb12` → [6, 12, 118, 12]).
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Fails unless `path` is a static ELF executable (no program interpreter): the
/// initramfs holds no shared libraries.
fn ensure_static(path: &Path) -> anyhow::Result<()> {
    let elf = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let headers = (|| {
        if elf.get(..5)? != b"\x7fELF\x02" {
            return None;
        }
        let phoff = usize::try_from(u64_at(0x20)?).ok()?;
        let phentsize = usize::from(u16_at(0x36)?);
        let phnum = usize::from(u16_at(0x38)?);
        Some((0..phnum).map(move |i| phoff + i * phentsize))
    })()
    .with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
    const PT_INTERP: u32 = 3;
    let dynamic = headers
        .filter_map(|o| elf.get(o..o + 4))
        .any(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) == PT_INTERP);
    if dynamic {
        bail!(
            "{} is dynamically linked; the VM's initramfs needs busybox-static \
             (apt-get install busybox-static)",
            path.display()
        );
    }
    Ok(())
}

/// Builds the integration test binary and returns its path.
fn build_test_binary() -> anyhow::Result<PathBuf> {
    step("build the integration test binary");
    let out = util::output(
        Command::new(util::cargo_bin())
            .args([
                "test",
                "--package",
                "leaktrace",
                "--test",
                "tests",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(util::root()),
    )?;
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "tests")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no `tests` executable")
}

/// A Debian kernel package, unpacked.
struct Kernel {
    /// Its release (`uname -r`), e.g. `6.1.0-57-amd64`.
    release: String,
    vmlinuz: PathBuf,
    /// `lib/modules/RELEASE`.
    modules: PathBuf,
}

impl Kernel {
    /// Downloads and unpacks `package` under `target/vm/kernels` unless it is there.
    fn fetch(package: &str) -> anyhow::Result<Self> {
        let dir = util::root().join("target/vm/kernels").join(package);
        let done = dir.join(".unpacked");
        if !done.exists() {
            step(&format!("download {package}"));
            let downloads = util::root().join("target/vm/downloads");
            let _ = std::fs::remove_dir_all(&downloads);
            std::fs::create_dir_all(&downloads)?;
            util::run(
                Command::new("apt-get")
                    .args(["download", "-q", package])
                    .current_dir(&downloads),
            )
            .with_context(|| format!("cannot download {package} (try `apt-get update`)"))?;
            let deb = std::fs::read_dir(&downloads)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .context("apt-get download left no .deb")?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
            std::fs::remove_dir_all(&downloads)?;
            std::fs::write(&done, "")?;
        }
        let vmlinuz = std::fs::read_dir(dir.join("boot"))
            .with_context(|| format!("{package} has no boot/"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
        let release = vmlinuz
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .context("odd vmlinuz name")?
            .to_owned();
        let modules = dir.join("lib/modules").join(&release);
        Ok(Self {
            release,
            vmlinuz,
            modules,
        })
    }

    /// The module files to load, dependencies first, for `wanted` and what it
    /// depends on; modules the kernel has built in are left out.
    fn module_closure(&self, wanted: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
        let mut files = HashMap::new();
        index_modules(&self.modules.join("kernel"), &mut files)?;
        let builtin: BTreeSet<String> =
            std::fs::read_to_string(self.modules.join("modules.builtin"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.rsplit('/').next())
                .map(module_name)
                .collect();
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            self.visit(name, &files, &builtin, &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        files: &HashMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let name = module_name(name);
        if !seen.insert(name.clone()) || builtin.contains(&name) {
            return Ok(());
        }
        let Some(file) = files.get(&name) else {
            bail!(
                "kernel {} has neither a module nor a built-in {name}",
                self.release
            );
        };
        for dep in module_depends(&read_module(file)?) {
            self.visit(&dep, files, builtin, seen, order)?;
        }
        order.push(file.clone());
        Ok(())
    }
}

/// A module's canonical name: file name without `.ko*`, dashes as underscores.
fn module_name(file: &str) -> String {
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn index_modules(dir: &Path, out: &mut HashMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, out)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
            && name.contains(".ko")
        {
            out.insert(module_name(name), path);
        }
    }
    Ok(())
}

/// A module file's bytes, decompressed (Debian compresses them with xz since 6.5).
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else {
        return std::fs::read(path).with_context(|| format!("cannot read {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {tool} (apt-get install xz-utils zstd)"))?;
    if !out.status.success() {
        bail!("{tool} -dc {name} failed: {}", out.status);
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn module_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect()
}

/// An initramfs in the kernel's `newc` cpio format.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data, (0, 0));
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, &[], (major, minor));
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], (major, minor): (u32, u32)) {
        self.inode += 1;
        let size = u32::try_from(data.len()).expect("initramfs entries are under 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        let fields = [
            self.inode, mode, 0, 0, 1, 0, size, 0, 0, major, minor, name_size, 0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for f in fields {
            self.bytes.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.bytes
    }
}

/// Quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The integration suite and how to run it.
struct Suite<'a> {
    test_binary: PathBuf,
    target_tmp: PathBuf,
    options: &'a Options,
}

impl Suite<'_> {
    /// The test binary's arguments: filters, skips, two threads like `cargo xtask test`.
    fn test_args(&self) -> Vec<String> {
        let mut args = vec!["--test-threads=2".to_owned()];
        args.extend(self.selection());
        args
    }

    /// The filters and skips, as libtest takes them.
    fn selection(&self) -> Vec<String> {
        let mut args = Vec::new();
        for skip in &self.options.skips {
            args.extend(["--skip".to_owned(), skip.clone()]);
        }
        args.extend(self.options.filters.iter().cloned());
        args
    }

    /// The names of the tests that `selection` (filters and skips, as libtest
    /// takes them) selects, listed on the host.
    fn list(&self, selection: &[String]) -> anyhow::Result<Vec<String>> {
        let mut cmd = Command::new(&self.test_binary);
        cmd.args(["--list", "--format", "terse"])
            .args(selection)
            .current_dir(self.test_dir());
        Ok(util::output(&mut cmd)?
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_owned)
            .collect())
    }

    /// The directory cargo runs the tests in (the package's).
    fn test_dir(&self) -> PathBuf {
        util::root().join("leak-user")
    }

    fn log_path(&self, kernel: &str) -> anyhow::Result<PathBuf> {
        let dir = util::root().join("target/vm/logs");
        std::fs::create_dir_all(&dir)?;
        Ok(dir.join(format!("{kernel}.log")))
    }

    fn run_host(&self) -> anyhow::Result<Outcome> {
        let release = util::output(Command::new("uname").arg("-r"))?
            .trim()
            .to_owned();
        let kernel = format!("{release} (host)");
        step(&format!("integration tests on the host's kernel {release}"));
        if !util::is_root() {
            bail!("the integration tests load eBPF programs and need root");
        }
        let mut cmd = Command::new(&self.test_binary);
        cmd.args(self.test_args())
            .current_dir(self.test_dir())
            .envs(setup::test_env());
        let log = self.log_path("host")?;
        run_logged(cmd, &kernel, &log, self.options.timeout)
    }

    /// The selected tests on `kernel`, dealt out to `--shards` guests run side by side.
    fn run_vm_sharded(&self, kernel: &Kernel) -> anyhow::Result<Outcome> {
        let tests = self.list(&self.selection())?;
        if tests.is_empty() {
            bail!("no integration test matches the filters and skips");
        }
        let total = u32::try_from(self.list(&[])?.len())?;
        let shares = deal(&tests, self.options.shards as usize);
        step(&format!(
            "integration tests in qemu on {}: {} tests in {} guests side by side",
            kernel.release,
            tests.len(),
            shares.len()
        ));
        let outcomes = std::thread::scope(|scope| {
            let runs: Vec<_> = shares
                .iter()
                .enumerate()
                .map(|(i, share)| {
                    let name = if shares.len() == 1 {
                        kernel.release.clone()
                    } else {
                        format!("{}#{}", kernel.release, i + 1)
                    };
                    scope.spawn(move || self.run_vm(kernel, &name, share))
                })
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("a guest's runner panicked"))
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        Ok(Outcome::merge(&kernel.release, outcomes, total))
    }

    /// One guest on `kernel`, named `name` in its output and log, running `tests`.
    fn run_vm(&self, kernel: &Kernel, name: &str, tests: &[String]) -> anyhow::Result<Outcome> {
        let initramfs = util::root()
            .join("target/vm")
            .join(format!("initramfs-{name}.cpio"));
        std::fs::write(&initramfs, self.initramfs(kernel, tests)?)?;
        let mut cmd = Command::new("qemu-system-x86_64");
        // One host thread runs all the guest's CPUs: with multi-threaded TCG, the
        // kernel's live code patching (text_poke_bp: int3 on every CPU, as perf
        // events come and go) raced here — an int3 Oops in __schedule on 6.12,
        // both CPUs soft-locked on 6.1.
        cmd.args(["-accel", "tcg,thread=single", "-cpu", "max"])
            .args(["-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-serial", "stdio"])
            .args(["-m", &self.options.memory_mib.to_string()])
            .args(["-smp", &self.options.cpus.to_string()])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .args([
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ]);
        let log = self.log_path(name)?;
        run_logged(cmd, name, &log, self.options.timeout)
    }

    /// busybox as init, the root's modules, and the script that runs the suite.
    fn initramfs(&self, kernel: &Kernel, tests: &[String]) -> anyhow::Result<Vec<u8>> {
        let mut cpio = Cpio::default();
        for dir in ["bin", "dev", "proc", "sys", "modules", "newroot"] {
            cpio.dir(dir);
        }
        cpio.char_device("dev/console", 5, 1);
        cpio.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox")?);
        for (i, module) in kernel.module_closure(ROOT_MODULES)?.iter().enumerate() {
            let name = module_name(&module.file_name().unwrap_or_default().to_string_lossy());
            cpio.file(
                &format!("modules/{i:02}-{name}.ko"),
                0o644,
                &read_module(module)?,
            );
        }
        cpio.file("init", 0o755, self.init_script(tests).as_bytes());
        Ok(cpio.finish())
    }

    /// The guest's init: mounts, then the test binary on `tests` by exact name.
    fn init_script(&self, tests: &[String]) -> String {
        let path = |p: &Path| quote(&p.display().to_string());
        // HOME is a scratch directory, not a tmpfs over /root: the host's /root
        // holds things the tests use (pyenv's interpreter that target/pyenv's
        // python links to).
        let mut command = format!(
            "cd {} && mkdir -p /tmp/home && exec env -i \
             PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
             HOME=/tmp/home RUST_BACKTRACE=1 LEAKTRACE_TEST_PATIENCE={PATIENCE}",
            path(&self.test_dir()),
        );
        for (key, value) in setup::test_env() {
            command.push_str(&format!(" {key}={}", quote(&value)));
        }
        command.push(' ');
        command.push_str(&path(&self.test_binary));
        command.push_str(" --test-threads=2 --exact");
        for test in tests {
            command.push(' ');
            command.push_str(&quote(test));
        }
        let writable = ["/tmp", "/run", "/var/tmp", "/dev/shm"]
            .map(str::to_owned)
            .into_iter()
            .chain([self.target_tmp.display().to_string()])
            .map(|d| quote(&d))
            .collect::<Vec<_>>()
            .join(" ");
        format!(
            r#"#!/bin/busybox sh
B=/bin/busybox
R=/newroot
fail() {{ echo "xtask-vm: $*"; echo "{EXIT_MARKER}125"; $B poweroff -f; }}
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in /modules/*.ko; do $B insmod "$m" || fail "cannot load $m"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 host $R \
    || fail "cannot mount the host's root over 9p"
$B mount -t proc proc $R/proc
$B mount -t sysfs sysfs $R/sys
$B mount -t devtmpfs devtmpfs $R/dev
$B mkdir -p $R/dev/pts $R/dev/shm
$B mount -t devpts devpts $R/dev/pts
$B mount -t tracefs tracefs $R/sys/kernel/tracing || fail "no tracefs"
$B mount -t debugfs debugfs $R/sys/kernel/debug
$B mount -t bpf bpf $R/sys/fs/bpf
$B mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || echo "xtask-vm: no cgroup2"
# Servers the tests start (Prometheus, debuginfod, leaktrace --metrics) listen
# on 127.0.0.1.
$B ip link set lo up || $B ifconfig lo 127.0.0.1 up || fail "cannot bring up the loopback interface"
for d in {writable}; do $B mount -t tmpfs tmpfs "$R$d" || fail "cannot mount a tmpfs on $d"; done
echo "xtask-vm: kernel $($B uname -r), running the integration tests"
# The host's root becomes the guest's (a chroot would not do: paths in
# /proc/PID/maps of a process in another mount namespace would carry /newroot).
$B umount /proc /sys /dev
exec $B switch_root $R /bin/busybox sh -c {pid1}
"#,
            pid1 = quote(&format!(
                "/bin/sh -c {}; echo \"{EXIT_MARKER}$?\"; /bin/busybox poweroff -f",
                quote(&command)
            )),
        )
    }
}

/// How many times longer the tests wait for things, and their fixtures live,
/// under emulation: single-threaded TCG runs the guest's two CPUs on one host
/// thread, about ten times slower than natively here.
const PATIENCE: u32 = 10;

/// Runs `cmd`, echoing its output with a `[kernel]` prefix and keeping it in
/// `log`; kills it after `timeout`.
fn run_logged(
    mut cmd: Command,
    kernel: &str,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut file = std::fs::File::create(log)?;
    let deadline = started + timeout;
    let mut outcome = Outcome {
        kernel: kernel.to_owned(),
        summary: None,
        failed_tests: Vec::new(),
        exit: None,
        timed_out: false,
        wall: Duration::ZERO,
        logs: vec![log.to_owned()],
    };
    let short = kernel.split(' ').next().unwrap_or(kernel);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                writeln!(file, "{line}")?;
                println!("[{short}] {line}");
                outcome.read(&line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.timed_out = true;
                eprintln!("xtask: {kernel}: no result within {timeout:?}; stopping it");
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait()?;
    if outcome.exit.is_none() && !outcome.timed_out {
        // Natively there is no marker: the test binary's own status counts.
        outcome.exit = status.code();
    }
    outcome.wall = started.elapsed();
    Ok(outcome)
}

impl Outcome {
    /// Takes what a line of test output says.
    fn read(&mut self, line: &str) {
        if let Some(code) = line.trim().strip_prefix(EXIT_MARKER) {
            self.exit = code.trim().parse().ok();
        } else if let Some(summary) = parse_summary(line) {
            self.summary = Some(summary);
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            self.failed_tests.push(name.to_owned());
        }
    }
}

/// Parses `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; …`.
fn parse_summary(line: &str) -> Option<Summary> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (verdict, counts) = rest.split_once(". ")?;
    let count = |label: &str| {
        counts
            .split(';')
            .find_map(|part| part.trim().strip_suffix(label)?.trim().parse().ok())
    };
    Some(Summary {
        ok: verdict == "ok",
        passed: count(" passed")?,
        failed: count(" failed")?,
        ignored: count(" ignored")?,
        filtered_out: count(" filtered out").unwrap_or(0),
    })
}

fn print_results(outcomes: &[Outcome]) {
    step("vm-test results");
    println!(
        "{:<28} {:<9} {:>6} {:>6} {:>7} {:>9}",
        "kernel", "result", "passed", "failed", "ignored", "wall"
    );
    for o in outcomes {
        let result = if o.timed_out {
            "TIMEOUT"
        } else if o.ok() {
            "ok"
        } else {
            "FAILED"
        };
        let wall = format!("{}m{:02}s", o.wall.as_secs() / 60, o.wall.as_secs() % 60);
        let (passed, failed, ignored) =
            o.summary
                .as_ref()
                .map_or(("-".into(), "-".into(), "-".into()), |s| {
                    (
                        s.passed.to_string(),
                        s.failed.to_string(),
                        (s.ignored + s.filtered_out).to_string(),
                    )
                });
        println!(
            "{:<28} {result:<9} {passed:>6} {failed:>6} {ignored:>7} {wall:>9}",
            o.kernel
        );
        for name in &o.failed_tests {
            println!("    failed: {name}");
        }
        if o.summary.is_none() {
            println!("    no test summary; exit {:?}", o.exit);
        }
        for log in &o.logs {
            println!("    log: {}", log.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_parsed() {
        let line = "test result: FAILED. 20 passed; 2 failed; 1 ignored; 0 measured; \
                    3 filtered out; finished in 81.20s";
        assert_eq!(
            parse_summary(line),
            Some(Summary {
                ok: false,
                passed: 20,
                failed: 2,
                ignored: 1,
                filtered_out: 3
            })
        );
        assert_eq!(parse_summary("running 24 tests"), None);
    }

    #[test]
    fn tests_are_dealt_out_in_turn() {
        let tests: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        assert_eq!(
            deal(&tests, 2),
            [vec!["a", "c", "e"], vec!["b", "d"]]
                .map(|h| h.into_iter().map(String::from).collect::<Vec<_>>())
        );
        assert_eq!(deal(&tests, 8).len(), 5, "no empty guests");
        assert_eq!(deal(&tests, 0), std::slice::from_ref(&tests));
    }

    #[test]
    fn shard_outcomes_add_up() {
        let shard = |passed, failed, exit, secs, failing: &[&str]| Outcome {
            kernel: "k".into(),
            summary: Some(Summary {
                ok: failed == 0,
                passed,
                failed,
                ignored: 0,
                filtered_out: 50,
            }),
            failed_tests: failing.iter().map(|s| s.to_string()).collect(),
            exit: Some(exit),
            timed_out: false,
            wall: Duration::from_secs(secs),
            logs: vec![PathBuf::from(format!("k#{secs}.log"))],
        };
        let ok = Outcome::merge(
            "k",
            vec![shard(3, 0, 0, 10, &[]), shard(2, 0, 0, 20, &[])],
            9,
        );
        assert!(ok.ok());
        assert_eq!(ok.wall, Duration::from_secs(20));
        let sum = ok.summary.as_ref().unwrap();
        assert_eq!((sum.passed, sum.failed, sum.filtered_out), (5, 0, 4));
        assert_eq!(ok.logs.len(), 2);
        let bad = Outcome::merge(
            "k",
            vec![shard(3, 0, 0, 10, &[]), shard(1, 1, 101, 5, &["t"])],
            5,
        );
        assert!(!bad.ok());
        assert_eq!(bad.exit, Some(101));
        assert_eq!(bad.failed_tests, ["t"]);
        let mut lost = shard(0, 0, 0, 1, &[]);
        lost.summary = None;
        assert!(
            !Outcome::merge("k", vec![shard(1, 0, 0, 1, &[]), lost], 2).ok(),
            "a guest without a summary fails the kernel"
        );
    }

    #[test]
    fn kernel_packages_are_recognised_and_ordered() {
        assert_eq!(
            kernel_version("linux-image-6.1.0-57-amd64-unsigned"),
            Some("6.1.0-57")
        );
        assert_eq!(
            kernel_version("linux-image-6.12.118+deb12-amd64-unsigned"),
            Some("6.12.118+deb12")
        );
        assert_eq!(
            kernel_version("linux-image-6.1.0-57-cloud-amd64-unsigned"),
            None
        );
        assert_eq!(
            kernel_version("linux-image-6.1.0-57-rt-amd64-unsigned"),
            None
        );
        assert_eq!(kernel_version("linux-image-amd64"), None);
        assert!(version_key("6.1.0-57") > version_key("6.1.0-9"));
        assert!(version_key("6.12.118+deb12") > version_key("6.1.0-57"));
    }

    #[test]
    fn module_names_and_depends() {
        assert_eq!(module_name("9pnet_virtio.ko.xz"), "9pnet_virtio");
        assert_eq!(module_name("virtio-rng.ko"), "virtio_rng");
        let modinfo = b"\x7fELF...\0license=GPL\0depends=9pnet,netfs\0intree=Y\0";
        assert_eq!(module_depends(modinfo), ["9pnet", "netfs"]);
        assert!(module_depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!x");
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        // Header (110) + "init\0" padded to 116, data 3 padded to 4.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..119], b"#!x");
    }
}
