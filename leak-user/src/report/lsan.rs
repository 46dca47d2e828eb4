//! LeakSanitizer's text report (`--format lsan`), for people and scripts used to
//! it: per process, `Direct leak of N byte(s) in M object(s) allocated from:` with
//! numbered frames, direct leaks first, each kind largest first, then the
//! suppressions used and `SUMMARY: LeakSanitizer: ...`. LeakSanitizer has no
//! possible leaks (it counts interior pointers as pointers), so they are left out.
//! Frames start at the allocation's caller (LeakSanitizer's `#0` is its own
//! `malloc`). Pure: the reporter hands the leaks over at the end.

use std::fmt::Write as _;

use super::{Leak, group_by_kind, records::SuppressedRule};
use crate::{symbolize::Frame, table::verdict::LeakKind};

/// `    #N 0xADDR in FUNC FILE:LINE`, or the module and offset where unknown.
fn frame(out: &mut String, n: usize, f: &Frame) {
    let _ = write!(out, "    #{n} {:#x}", f.address);
    if let Some(function) = &f.function {
        let _ = write!(out, " in {function}");
    }
    match (&f.file, f.line, &f.module, f.offset) {
        (Some(file), Some(line), _, _) => {
            let _ = write!(out, " {file}:{line}");
        }
        (Some(file), None, _, _) => {
            let _ = write!(out, " {file}");
        }
        (None, _, Some(module), Some(offset)) => {
            let _ = write!(out, " ({module}+{offset:#x})");
        }
        _ => {}
    }
    out.push('\n');
}

/// The report of one run: a block per process that leaked; empty without leaks,
/// as LeakSanitizer prints nothing then.
pub fn render(leaks: &[Leak], suppressed: &[SuppressedRule]) -> String {
    let mut out = String::new();
    let mut pids: Vec<u32> = leaks
        .iter()
        .filter(|l| l.kind != LeakKind::Possible)
        .map(|l| l.pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    for (i, &pid) in pids.iter().enumerate() {
        let mine: Vec<Leak> = leaks
            .iter()
            .filter(|l| l.pid == pid && l.kind != LeakKind::Possible)
            .cloned()
            .collect();
        let mut groups = group_by_kind(&mine);
        groups.sort_by_key(|g| (g.kind != LeakKind::Direct, std::cmp::Reverse(g.bytes)));
        out.push_str("\n=================================================================\n");
        let _ = writeln!(
            out,
            "=={pid}==ERROR: LeakSanitizer: detected memory leaks\n"
        );
        for g in &groups {
            let kind = if g.kind == LeakKind::Direct {
                "Direct"
            } else {
                "Indirect"
            };
            let _ = writeln!(
                out,
                "{kind} leak of {} byte(s) in {} object(s) allocated from:",
                g.bytes, g.blocks
            );
            if g.stack.is_empty() {
                // A block found by the heap walk: allocated before leaktrace came.
                out.push_str("    #0 0x0 (allocated before leaktrace attached)\n");
            }
            for (n, f) in g.stack.iter().enumerate() {
                frame(&mut out, n, f);
            }
            out.push('\n');
        }
        let used: Vec<&SuppressedRule> = suppressed.iter().filter(|s| s.objects > 0).collect();
        if i + 1 == pids.len() && !used.is_empty() {
            out.push_str("-----------------------------------------------------\n");
            out.push_str("Suppressions used:\n  count      bytes template\n");
            for s in used {
                let _ = writeln!(out, "{:>7} {:>10} {}", s.objects, s.bytes, s.rule);
            }
            out.push_str("-----------------------------------------------------\n\n");
        }
        let bytes: u64 = mine.iter().map(|l| l.size).sum();
        let _ = writeln!(
            out,
            "SUMMARY: LeakSanitizer: {bytes} byte(s) leaked in {} allocation(s).",
            mine.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::report::tests::{leak, sample};

    #[test]
    fn reads_like_leaksanitizer() {
        let mut leaks = sample();
        leaks.push(leak(LeakKind::Possible, 64, &Arc::new(Vec::new())));
        let text = render(&leaks, &[]);
        let expected = "
=================================================================
==42==ERROR: LeakSanitizer: detected memory leaks

Direct leak of 32 byte(s) in 1 object(s) allocated from:
    #0 0x102a in make_node list.c:42
    #1 0x1050 in main list.c:80

Direct leak of 24 byte(s) in 1 object(s) allocated from:
    #0 0x1007 in read_config conf.c:7
    #1 0x1051 in main list.c:81

Indirect leak of 64 byte(s) in 2 object(s) allocated from:
    #0 0x102a in make_node list.c:42
    #1 0x1050 in main list.c:80

SUMMARY: LeakSanitizer: 120 byte(s) leaked in 4 allocation(s).
";
        assert_eq!(text, expected);
    }

    #[test]
    fn nothing_without_leaks_and_suppressions_before_the_summary() {
        assert_eq!(render(&[], &[]), "");
        let rule = SuppressedRule {
            rule: "^allocate_dtv$".into(),
            builtin: true,
            objects: 3,
            bytes: 864,
        };
        let text = render(&sample(), &[rule]);
        assert!(text.contains(
            "Suppressions used:\n  count      bytes template\n      3        864 ^allocate_dtv$\n"
        ));
        let unknown = Frame {
            address: 0x55d0,
            module: Some("/usr/lib/libx.so".into()),
            offset: Some(0x1234),
            ..Frame::default()
        };
        let mut out = String::new();
        frame(&mut out, 3, &unknown);
        assert_eq!(out, "    #3 0x55d0 (/usr/lib/libx.so+0x1234)\n");
    }
}
