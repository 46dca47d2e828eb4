//! Fuzzes the probe-site choice on raw machine code at any address: the site must
//! lie inside the bytes it was given, whatever they decode to.

#![no_main]

use leaktrace::allocator::{placement, wrappers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, code)) = data.split_first_chunk::<9>() else {
        return;
    };
    let (addr, flags) = head.split_at(8);
    let vaddr = u64::from_le_bytes(addr.try_into().expect("8 bytes"));
    let site = placement::place(code, vaddr, flags[0] & 1 != 0);
    assert!(site.offset == 0 || site.offset < code.len() as u64);
    let calls = wrappers::call_sites(code, vaddr);
    assert!(calls.len() <= code.len());
});
