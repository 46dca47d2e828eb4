//! `/etc/ld.so.cache`: where the dynamic loader finds a library by soname.
//!
//! Launch mode must hook the allocator before the command's loader has mapped it,
//! so it predicts the loader's choices: this cache is one of its sources. Only the
//! "new" format (glibc 2.32+ writes nothing else) is read; an old-format prefix is
//! skipped.

use std::collections::HashMap;

const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
const NEW_MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
const NEW_HEADER: usize = 48;
const NEW_ENTRY: usize = 24;
const OLD_HEADER: usize = 16;
const OLD_ENTRY: usize = 12;
/// `flags` of an entry: ELF, libc6, x86-64.
const FLAG_ELF_LIBC6: i32 = 0x0003;
const FLAG_X8664_LIB64: i32 = 0x0300;

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn c_str_at(data: &[u8], at: usize) -> Option<String> {
    let rest = data.get(at..)?;
    let end = rest.iter().position(|b| *b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Parses the cache: soname -> path, x86-64 entries only, first one wins (the
/// cache lists preferred entries first).
pub fn parse(data: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut base = 0;
    if data.starts_with(OLD_MAGIC) {
        let Some(n) = u32_at(data, 12) else {
            return out;
        };
        base = (OLD_HEADER + n as usize * OLD_ENTRY).next_multiple_of(8);
    }
    let Some(cache) = data.get(base..) else {
        return out;
    };
    if !cache.starts_with(NEW_MAGIC) {
        return out;
    }
    let Some(nlibs) = u32_at(cache, 20) else {
        return out;
    };
    for i in 0..nlibs as usize {
        let at = NEW_HEADER + i * NEW_ENTRY;
        let (Some(flags), Some(key), Some(value)) = (
            u32_at(cache, at),
            u32_at(cache, at + 4),
            u32_at(cache, at + 8),
        ) else {
            break;
        };
        let flags = flags as i32;
        if flags & 0xff != FLAG_ELF_LIBC6 || flags & 0xff00 != FLAG_X8664_LIB64 {
            continue;
        }
        if let (Some(k), Some(v)) = (
            c_str_at(cache, key as usize),
            c_str_at(cache, value as usize),
        ) {
            out.entry(k).or_insert(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(flags: i32, key: u32, value: u32) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&key.to_le_bytes());
        e.extend_from_slice(&value.to_le_bytes());
        e.extend_from_slice(&[0; 12]);
        e
    }

    #[test]
    fn parses_a_synthetic_cache() {
        let mut data = NEW_MAGIC.to_vec();
        data.extend_from_slice(&2u32.to_le_bytes()); // nlibs
        data.extend_from_slice(&0u32.to_le_bytes()); // len_strings
        data.resize(NEW_HEADER, 0);
        let strings = NEW_HEADER as u32 + 2 * NEW_ENTRY as u32;
        data.extend(entry(0x0303, strings, strings + 10));
        data.extend(entry(0x0003, strings, strings + 10)); // 32-bit: skipped
        data.extend_from_slice(b"libc.so.6\0/lib/libc.so.6\0");
        let cache = parse(&data);
        assert_eq!(
            cache.get("libc.so.6").map(String::as_str),
            Some("/lib/libc.so.6")
        );
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn reads_the_machine_cache() {
        let data = std::fs::read("/etc/ld.so.cache").expect("this test needs /etc/ld.so.cache");
        let cache = parse(&data);
        assert!(
            cache.contains_key("libc.so.6"),
            "libc.so.6 is in every glibc cache"
        );
    }
}
