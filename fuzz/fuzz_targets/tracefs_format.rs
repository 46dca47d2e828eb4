//! Fuzzes the tracefs `format` parser: the offsets it returns go to the eBPF
//! programs, so any text must give a clean (possibly empty) field map, never a panic.

#![no_main]

use leaktrace::ebpf::tracefs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fields = tracefs::parse_format(text);
    for name in fields.keys() {
        assert!(!name.is_empty());
        assert!(
            !name.contains(|c: char| c.is_whitespace() || c == '*' || c == '['),
            "field name {name:?} still carries its declaration"
        );
        assert!(text.contains(name.as_str()));
    }
});
