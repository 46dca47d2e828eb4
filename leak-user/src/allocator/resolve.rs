//! Predicting which shared objects a command will load, the way the dynamic loader
//! will: LD_PRELOAD and /etc/ld.so.preload first, then the executable's DT_NEEDED
//! closure searched through DT_RPATH, LD_LIBRARY_PATH, DT_RUNPATH, ld.so.cache and
//! the default directories.
//!
//! Launch mode needs this to hook the allocator at the exec stop, before the loader
//! has mapped anything but the executable.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
};

use super::elf::ElfFile;

const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];
/// Enough for any real program; bounds the work on a pathological dependency graph.
const MAX_OBJECTS: usize = 1000;

/// The environment the command will run with.
#[derive(Clone, Debug, Default)]
pub struct LoaderEnv {
    pub ld_preload: Vec<String>,
    pub ld_library_path: Vec<String>,
    /// Entries of /etc/ld.so.preload.
    pub global_preload: Vec<String>,
    pub cache: HashMap<String, String>,
}

impl LoaderEnv {
    /// The environment this process would pass to a child.
    pub fn from_current() -> Self {
        Self::from_vars(
            std::env::var("LD_PRELOAD").ok(),
            std::env::var("LD_LIBRARY_PATH").ok(),
        )
    }

    /// The environment process `pid` runs with (at an exec stop: the new image's,
    /// which may differ from ours, e.g. `env LD_PRELOAD=... cmd`).
    pub fn of_process(pid: u32) -> std::io::Result<Self> {
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        let var = |name: &str| {
            environ.split(|&b| b == 0).find_map(|entry| {
                let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
                Some(String::from_utf8_lossy(value).into_owned())
            })
        };
        Ok(Self::from_vars(var("LD_PRELOAD"), var("LD_LIBRARY_PATH")))
    }

    fn from_vars(preload: Option<String>, library_path: Option<String>) -> Self {
        let split = |v: Option<String>, seps: &[char]| -> Vec<String> {
            v.map(|v| {
                v.split(seps)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
        };
        Self {
            ld_preload: split(preload, &[' ', ':']),
            ld_library_path: split(library_path, &[':', ';']),
            global_preload: split(
                std::fs::read_to_string("/etc/ld.so.preload").ok(),
                &[' ', ':', '\n', '\t'],
            ),
            cache: std::fs::read("/etc/ld.so.cache")
                .map(|d| super::ldcache::parse(&d))
                .unwrap_or_default(),
        }
    }
}

fn expand_origin(dir: &str, object: &Path) -> PathBuf {
    let origin = object.parent().unwrap_or(Path::new("/"));
    let origin = origin.to_string_lossy();
    PathBuf::from(
        dir.replace("${ORIGIN}", &origin)
            .replace("$ORIGIN", &origin),
    )
}

/// Finds a library named in DT_NEEDED (or LD_PRELOAD) of `by`.
fn find(name: &str, by: Option<&ElfFile>, env: &LoaderEnv) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.exists().then_some(p);
    }
    let try_dirs =
        |dirs: &mut dyn Iterator<Item = PathBuf>| dirs.map(|d| d.join(name)).find(|p| p.is_file());
    if let Some(by) = by
        && by.runpath.is_empty()
        && let Some(p) = try_dirs(&mut by.rpath.iter().map(|d| expand_origin(d, &by.path)))
    {
        return Some(p);
    }
    if let Some(p) = try_dirs(&mut env.ld_library_path.iter().map(PathBuf::from)) {
        return Some(p);
    }
    if let Some(by) = by
        && let Some(p) = try_dirs(&mut by.runpath.iter().map(|d| expand_origin(d, &by.path)))
    {
        return Some(p);
    }
    if let Some(p) = env
        .cache
        .get(name)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    {
        return Some(p);
    }
    try_dirs(&mut DEFAULT_DIRS.iter().map(PathBuf::from))
}

/// Every object `exe` will load, in load order (preloads, the executable, its
/// dependencies breadth-first), each parsed with symbols filtered by `wanted`.
pub fn load_order(exe: &Path, env: &LoaderEnv, wanted: &dyn Fn(&str) -> bool) -> Vec<ElfFile> {
    let mut out: Vec<ElfFile> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut queue: VecDeque<(String, Option<usize>)> = VecDeque::new();
    for p in env.global_preload.iter().chain(&env.ld_preload) {
        queue.push_back((p.clone(), None));
    }
    let Ok(main) = ElfFile::open(exe, wanted) else {
        return out;
    };
    let statically_linked = !main.has_interp;
    seen.insert(exe.to_owned());
    let main_index = out.len();
    out.push(main);
    if statically_linked {
        return out; // no loader, no preloads, no dependencies
    }
    for name in out[main_index].needed.clone() {
        queue.push_back((name, Some(main_index)));
    }
    while let Some((name, by)) = queue.pop_front() {
        if out.len() >= MAX_OBJECTS {
            break;
        }
        let Some(path) = find(&name, by.map(|i| &out[i]), env) else {
            continue;
        };
        let canonical = path.canonicalize().unwrap_or(path.clone());
        if !seen.insert(canonical) {
            continue;
        }
        let Ok(elf) = ElfFile::open(&path, wanted) else {
            continue;
        };
        let index = out.len();
        for dep in elf.needed.clone() {
            queue.push_back((dep, Some(index)));
        }
        out.push(elf);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_loads_libc() {
        let env = LoaderEnv::from_current();
        let exe = Path::new("/bin/ls");
        let objects = load_order(exe, &env, &|n| n == "malloc");
        assert_eq!(objects[0].path, exe);
        assert!(
            objects.iter().any(|o| o.symbol("malloc").is_some()),
            "some object of /bin/ls defines malloc: {:?}",
            objects.iter().map(|o| &o.path).collect::<Vec<_>>()
        );
    }

    #[test]
    fn origin_is_the_objects_directory() {
        assert_eq!(
            expand_origin("$ORIGIN/../lib", Path::new("/opt/app/bin/app")),
            PathBuf::from("/opt/app/bin/../lib")
        );
    }
}
