//! Fuzzes the suppressions parser and its glob matcher. The matcher is checked
//! against a slow, obviously correct reference (recursive backtracking over
//! characters): a suppression that hides the wrong leaks is as bad as a crash.

#![no_main]

use leaktrace::{
    report::suppress::{self, Suppressions},
    symbolize::Frame,
};
use libfuzzer_sys::fuzz_target;

/// `*` matches any run of characters; everything else matches itself. Dynamic
/// programming over (pattern, text) prefixes: slow but plainly right, and
/// polynomial, so a pattern full of stars cannot hang the fuzzer.
fn glob(p: &[char], t: &[char]) -> bool {
    // row[j]: does the pattern so far match t[..j]?
    let mut row = vec![false; t.len() + 1];
    row[0] = true;
    for &c in p {
        let mut next = vec![false; t.len() + 1];
        for j in 0..=t.len() {
            next[j] = if c == '*' {
                row[j] || (j > 0 && next[j - 1])
            } else {
                j > 0 && row[j - 1] && t[j - 1] == c
            };
        }
        row = next;
    }
    row[t.len()]
}

/// LSan's reading of a pattern: substring match unless anchored by `^` / `$`.
fn reference(pattern: &str, text: &str) -> bool {
    let (start, p) = match pattern.strip_prefix('^') {
        Some(p) => (true, p),
        None => (false, pattern),
    };
    let (end, p) = match p.strip_suffix('$') {
        Some(p) => (true, p),
        None => (false, p),
    };
    let mut full: Vec<char> = Vec::new();
    if !start {
        full.push('*');
    }
    full.extend(p.chars());
    if !end {
        full.push('*');
    }
    glob(&full, &text.chars().collect::<Vec<_>>())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // First line: a pattern and a text to match (separated by a tab); the whole
    // input: a suppressions file.
    if let Some((pattern, subject)) = text.lines().next().and_then(|l| l.split_once('\t'))
        && pattern.len() <= 64
        && subject.len() <= 256
    {
        assert_eq!(
            suppress::matches(pattern, subject),
            reference(pattern, subject),
            "pattern {pattern:?} on {subject:?}"
        );
    }
    let mut rules = Suppressions::default();
    if rules.parse("fuzz", text).is_ok() {
        for rule in &rules.rules {
            assert!(!rule.pattern.is_empty() && !rule.pattern.contains('#'));
        }
        let frame = Frame {
            function: Some(text.chars().rev().take(40).collect()),
            ..Frame::default()
        };
        if let Some(i) = rules.find(std::slice::from_ref(&frame)) {
            rules.count(i, 8);
        }
    }
});
