//! `/proc/PID/maps`: the target's mappings, classified by what they are.

use std::{fmt, io, path::PathBuf};

/// What backs a mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    Anonymous,
    /// A file; the path is as the target sees it.
    File(PathBuf),
    /// The main heap (`[heap]`).
    Heap,
    /// The main thread's stack (`[stack]`).
    Stack,
    /// Kernel-provided pages that must not be read (`[vvar]`, `[vsyscall]`, …).
    Special(String),
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// Device (as `makedev(major, minor)`) and inode of a file mapping.
    pub dev: u64,
    pub inode: u64,
    pub backing: Backing,
}

impl Mapping {
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// A file we can open, when the mapping is backed by one.
    pub fn file(&self) -> Option<&std::path::Path> {
        match &self.backing {
            Backing::File(p) => Some(p),
            _ => None,
        }
    }

    /// Device memory and kernel pages: reading them is pointless or harmful.
    pub fn is_unscannable(&self) -> bool {
        match &self.backing {
            Backing::Special(_) => true,
            Backing::File(p) => p.starts_with("/dev/") && !p.starts_with("/dev/zero"),
            _ => false,
        }
    }
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match &self.backing {
            Backing::Anonymous => String::new(),
            Backing::File(p) => p.display().to_string(),
            Backing::Heap => "[heap]".into(),
            Backing::Stack => "[stack]".into(),
            Backing::Special(s) => s.clone(),
        };
        write!(f, "{:#x}-{:#x} {}", self.start, self.end, name)
    }
}

/// A line of maps that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("unexpected line in /proc/PID/maps: {0:?}")]
pub struct ParseError(pub String);

fn parse_line(line: &str) -> Result<Mapping, ParseError> {
    let bad = || ParseError(line.to_owned());
    let mut fields = line.splitn(6, ' ');
    let range = fields.next().ok_or_else(bad)?;
    let perms = fields.next().ok_or_else(bad)?.as_bytes();
    let offset = fields.next().ok_or_else(bad)?;
    let dev = fields.next().ok_or_else(bad)?;
    let inode = fields.next().ok_or_else(bad)?;
    let path = fields.next().unwrap_or("").trim_start();
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let hex = |s: &str| u64::from_str_radix(s, 16).map_err(|_| bad());
    if perms.len() < 4 {
        return Err(bad());
    }
    let (major, minor) = dev.split_once(':').ok_or_else(bad)?;
    let dev = libc::makedev(
        u32::from_str_radix(major, 16).map_err(|_| bad())?,
        u32::from_str_radix(minor, 16).map_err(|_| bad())?,
    );
    let backing = match path {
        "" => Backing::Anonymous,
        "[heap]" => Backing::Heap,
        "[stack]" => Backing::Stack,
        p if p.starts_with('[') => Backing::Special(p.to_owned()),
        // Deleted files and memfds are still mappings of a file, but not openable
        // by name; anonymous shared memory shows as /dev/zero or /SYSV…
        p => Backing::File(PathBuf::from(p.strip_suffix(" (deleted)").unwrap_or(p))),
    };
    let (start, end) = (hex(start)?, hex(end)?);
    // The kernel never writes an inverted range; a corrupted one would make every
    // `len()` and offset computation on the mapping underflow.
    if end < start {
        return Err(bad());
    }
    Ok(Mapping {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: hex(offset)?,
        dev,
        inode: inode.parse().map_err(|_| bad())?,
        backing,
    })
}

/// Parses the text of `/proc/PID/maps`.
pub fn parse(text: &str) -> Result<Vec<Mapping>, ParseError> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(parse_line)
        .collect()
}

/// Reads and parses `/proc/PID/maps`.
pub fn read(pid: u32) -> io::Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    parse(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a4b000-55d0c0a4c000 r--p 00000000 fe:01 1234                       /usr/bin/prog
55d0c0a4e000-55d0c0a4f000 rw-p 00003000 fe:01 1234                       /usr/bin/prog
55d0c1a00000-55d0c1a21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f0000200000-7f0000201000 rw-s 00000000 00:05 77                         /dev/zero (deleted)
7f0000300000-7f0000301000 rw-s 00000000 00:05 78                         /dev/dri/card0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_every_kind_of_line() {
        let maps = parse(SAMPLE).unwrap();
        assert_eq!(maps.len(), 9);
        assert_eq!(maps[0].file(), Some(std::path::Path::new("/usr/bin/prog")));
        assert!(!maps[0].write && maps[1].write);
        assert_eq!(maps[1].offset, 0x3000);
        assert_eq!((maps[1].dev, maps[1].inode), (libc::makedev(0xfe, 1), 1234));
        assert_eq!(maps[2].backing, Backing::Heap);
        assert_eq!(maps[3].backing, Backing::Anonymous);
        assert_eq!(maps[4].file(), Some(std::path::Path::new("/dev/zero")));
        assert!(maps[4].shared && !maps[4].is_unscannable());
        assert!(maps[5].is_unscannable());
        assert_eq!(maps[6].backing, Backing::Stack);
        assert!(maps[7].is_unscannable() && maps[8].is_unscannable());
        assert_eq!(maps[8].start, 0xffff_ffff_ff60_0000);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("not a maps line").is_err());
    }

    #[test]
    fn rejects_inverted_ranges() {
        // Found by the `maps` fuzz target: a mapping whose end is below its start
        // parsed, and its len() underflowed.
        let line = "56f4da033000-55f4da04d000 r--p 00000000 fe:01 1234 /bin/x";
        assert!(parse(line).is_err());
        let empty = parse("1000-1000 r--p 00000000 00:00 0").unwrap();
        assert_eq!(empty[0].len(), 0);
    }
}
