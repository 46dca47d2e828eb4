//! How many frames of the reported leaks have no function name, and why: a user
//! whose stacks show `app+0x1a6d` should learn that a debug package or
//! `--debug-dir` would name them, or that the file was gone.

use std::collections::{BTreeMap, BTreeSet};

use super::Leak;
use crate::symbolize::NoSymbols;

/// Distinct frames (by process and address) without a name, per reason.
pub fn count(leaks: &[Leak]) -> BTreeMap<&'static str, u64> {
    let frames: BTreeSet<(u32, u64, NoSymbols)> = leaks
        .iter()
        .flat_map(|l| {
            l.stack
                .iter()
                .filter_map(move |f| Some((l.pid, f.address, f.reason?)))
        })
        .collect();
    let mut counts = BTreeMap::new();
    for (_, _, reason) in frames {
        *counts.entry(reason.name()).or_insert(0) += 1;
    }
    counts
}

/// The text report's line, when some frames have no name.
pub fn summary_line(counts: &BTreeMap<&'static str, u64>) -> Option<String> {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return None;
    }
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let mut line = format!("frames without symbols: {total} ({})", parts.join(", "));
    if counts.contains_key(NoSymbols::NoDebugInfo.name()) {
        line.push_str("; install debug packages or see --debug-dir");
    }
    line.push('\n');
    Some(line)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        report::tests::{frame, leak},
        symbolize::Frame,
        table::verdict::LeakKind,
    };

    fn bare(address: u64, reason: NoSymbols) -> Frame {
        Frame {
            address,
            reason: Some(reason),
            ..Frame::default()
        }
    }

    #[test]
    fn counts_each_frame_once_by_reason() {
        let a = Arc::new(vec![
            bare(0x10, NoSymbols::NoDebugInfo),
            bare(0x20, NoSymbols::Unreadable),
            frame("main", "m.c", 3),
        ]);
        let b = Arc::new(vec![
            bare(0x10, NoSymbols::NoDebugInfo),
            bare(0x30, NoSymbols::NoDebugInfo),
        ]);
        let leaks = [
            leak(LeakKind::Direct, 8, &a),
            leak(LeakKind::Direct, 8, &a),
            leak(LeakKind::Indirect, 8, &b),
        ];
        let counts = count(&leaks);
        assert_eq!(
            counts,
            BTreeMap::from([("no_debug_info", 2), ("unreadable", 1)])
        );
        assert_eq!(
            summary_line(&counts).unwrap(),
            "frames without symbols: 3 (no_debug_info 2, unreadable 1); \
             install debug packages or see --debug-dir\n"
        );
    }

    #[test]
    fn says_nothing_when_every_frame_has_a_name() {
        let a = Arc::new(vec![frame("main", "m.c", 3)]);
        let counts = count(&[leak(LeakKind::Direct, 8, &a)]);
        assert!(counts.is_empty());
        assert_eq!(summary_line(&counts), None);
    }
}
