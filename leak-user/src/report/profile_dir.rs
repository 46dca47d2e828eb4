//! `--pprof-dir DIR`: one pprof profile per interval, for an agent to ship to a
//! profile store, kept to the newest `--pprof-keep` files.
//!
//! Files are named `leaktrace-<unix ms, 13 digits>-<seq, 6 digits>.pb.gz`, so that
//! their names sort by time, also across restarts. Each is written under a
//! temporary name created exclusively (never through a symlink someone left) and
//! renamed into place, so a reader sees whole files only. Rotation deletes only
//! files of that name pattern.

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

const PREFIX: &str = "leaktrace-";
const SUFFIX: &str = ".pb.gz";

/// The profile directory and its rotation.
#[derive(Debug)]
pub struct ProfileDir {
    dir: PathBuf,
    keep: usize,
    seq: u64,
}

impl ProfileDir {
    /// Creates the directory if needed (one-line error otherwise).
    pub fn open(dir: &Path, keep: usize) -> io::Result<Self> {
        fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("--pprof-dir: cannot create {}: {e}", dir.display()),
            )
        })?;
        if !fs::metadata(dir)?.is_dir() {
            return Err(io::Error::other(format!(
                "--pprof-dir: {} is not a directory",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_owned(),
            keep: keep.max(1),
            seq: 0,
        })
    }

    /// The name of the file of `unix_ms`, the `seq`th of this run.
    pub fn file_name(unix_ms: u64, seq: u64) -> String {
        format!("{PREFIX}{unix_ms:013}-{seq:06}{SUFFIX}")
    }

    /// Writes one profile and deletes the oldest beyond `keep`. Returns its path.
    pub fn write(&mut self, bytes: &[u8], unix_ms: u64) -> io::Result<PathBuf> {
        self.seq += 1;
        let name = Self::file_name(unix_ms, self.seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot write {}: {e}", path.display()),
            ));
        }
        self.rotate()?;
        Ok(path)
    }

    /// Our profiles in the directory, oldest first.
    pub fn profiles(&self) -> io::Result<Vec<PathBuf>> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_ours(n))
            .collect();
        names.sort();
        Ok(names.into_iter().map(|n| self.dir.join(n)).collect())
    }

    fn rotate(&self) -> io::Result<()> {
        let profiles = self.profiles()?;
        let excess = profiles.len().saturating_sub(self.keep);
        for old in &profiles[..excess] {
            fs::remove_file(old)?;
        }
        Ok(())
    }
}

/// Is `name` one of our profile files (`leaktrace-` 13 digits `-` 6 digits
/// `.pb.gz`)?
fn is_ours(name: &str) -> bool {
    let Some(middle) = name
        .strip_prefix(PREFIX)
        .and_then(|n| n.strip_suffix(SUFFIX))
    else {
        return false;
    };
    let Some((ms, seq)) = middle.split_once('-') else {
        return false;
    };
    ms.len() == 13
        && seq.len() >= 6
        && ms.bytes().all(|b| b.is_ascii_digit())
        && seq.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("leaktrace-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn keeps_the_newest_and_touches_nothing_else() {
        let dir = scratch("profile-dir");
        let mut p = ProfileDir::open(&dir, 3).unwrap();
        fs::write(dir.join("notes.txt"), "mine").unwrap();
        fs::write(dir.join("leaktrace-x.pb.gz"), "not ours").unwrap();
        let mut written = Vec::new();
        for i in 0..5u64 {
            written.push(
                p.write(format!("profile {i}").as_bytes(), 1_700_000_000_000 + i)
                    .unwrap(),
            );
        }
        let left = p.profiles().unwrap();
        assert_eq!(left, written[2..]);
        assert_eq!(fs::read_to_string(&left[2]).unwrap(), "profile 4");
        assert!(dir.join("notes.txt").exists() && dir.join("leaktrace-x.pb.gz").exists());
        // No temporary file stays behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 5);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_sort_by_time() {
        assert_eq!(
            ProfileDir::file_name(1_700_000_000_123, 7),
            "leaktrace-1700000000123-000007.pb.gz"
        );
        assert!(is_ours("leaktrace-1700000000123-000007.pb.gz"));
        assert!(!is_ours("leaktrace-170000000012-000007.pb.gz"));
        assert!(!is_ours(".leaktrace-1700000000123-000007.pb.gz.tmp"));
    }

    #[test]
    fn a_file_in_the_way_is_a_clear_error() {
        let dir = scratch("profile-dir-file");
        fs::write(&dir, "a file").unwrap();
        let err = ProfileDir::open(&dir, 3).unwrap_err().to_string();
        assert!(err.starts_with("--pprof-dir:"), "{err}");
        fs::remove_file(&dir).unwrap();
    }
}
