//! Fuzzes the `/proc/PID/maps` parser: whatever text the kernel (or a corrupted
//! read) hands us must parse or fail cleanly, and a parsed mapping must be one the
//! scanner and the hint code can do arithmetic on (start <= end).

#![no_main]

use leaktrace::proc::maps;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mappings) = maps::parse(text) else {
        return;
    };
    assert_eq!(
        mappings.len(),
        text.lines().filter(|l| !l.is_empty()).count()
    );
    for m in &mappings {
        assert!(m.start <= m.end, "parsed an inverted range: {m}");
        assert_eq!(m.is_empty(), m.start == m.end);
        assert_eq!(m.contains(m.start), !m.is_empty());
        assert!(!m.contains(m.end));
        let _ = (m.file(), m.is_unscannable(), m.to_string());
    }
});
