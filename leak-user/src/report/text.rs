//! The human report: leaks grouped by allocation stack, largest first, readable in
//! an 80-column terminal; colour only when asked (on a terminal by default).

use std::fmt::Write as _;

use super::{Group, Leak, fold::WrapperFold, group_folding, totals};

/// Report width.
const WIDTH: usize = 80;

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

pub fn age(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 120_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{:.1} min", ms as f64 / 60_000.0)
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn render_group(out: &mut String, n: usize, g: &Group, style: &Style, multi_pid: bool) {
    let sizes = if g.min_size == g.max_size {
        bytes(g.min_size)
    } else {
        format!("{}–{}", bytes(g.min_size), bytes(g.max_size))
    };
    let mut parts = Vec::new();
    if g.direct.0 > 0 {
        parts.push(style.paint(
            "1;31",
            &format!("{} direct ({})", g.direct.0, bytes(g.direct.1)),
        ));
    }
    if g.indirect.0 > 0 {
        parts.push(format!(
            "{} indirect ({})",
            g.indirect.0,
            bytes(g.indirect.1)
        ));
    }
    if g.possible.0 > 0 {
        parts.push(format!(
            "{} possible ({})",
            g.possible.0,
            bytes(g.possible.1)
        ));
    }
    let _ = writeln!(
        out,
        "{} {} in {}: {}",
        style.paint("1", &format!("#{n}")),
        style.paint("1", &bytes(g.bytes)),
        plural(g.objects, "object", "objects"),
        parts.join(", ")
    );
    let pids = if multi_pid {
        format!(
            "; pid {}",
            g.pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "   size {sizes}; oldest {}{pids}; by {}",
        age(g.oldest_ms),
        g.allocator
    );
    if let Some(class) = &g.class_name {
        let _ = writeln!(out, "   class {class} (its vtable)");
    }
    if !g.folded.is_empty() {
        let names: Vec<&str> = g.folded.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "   through {} (folded)",
            truncate(&names.join(", "), WIDTH - 21)
        );
    }
    if g.stack.is_empty() && g.before_attach {
        let _ = writeln!(out, "     (no stack: allocated before attaching)");
    } else if g.stack.is_empty() {
        let _ = writeln!(out, "     (no stack)");
    }
    for frame in g.stack.iter() {
        let location = frame
            .location()
            .map(|l| format!(" ({l})"))
            .unwrap_or_default();
        let room = WIDTH.saturating_sub(7 + location.chars().count()).max(20);
        let inlined = match frame.reason {
            _ if frame.inlined => " [inlined]".to_owned(),
            Some(why) => format!(" [{}]", why.name().replace('_', " ")),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "     {}{}{inlined}",
            style.paint("36", &truncate(&frame.label(), room)),
            location
        );
    }
    if g.only_wrappers {
        let _ = writeln!(out, "     (no caller outside the wrappers was captured)");
    }
    out.push('\n');
}

/// Renders a report of `leaks`; `title` heads it.
/// `fold`: `--fold-wrappers`, group by the first frame outside the wrappers.
pub fn render(
    title: &str,
    leaks: &[Leak],
    top: usize,
    color: bool,
    fold: Option<&WrapperFold>,
) -> String {
    let style = Style { color };
    let mut out = String::new();
    let (sure, possible): (Vec<&Leak>, Vec<&Leak>) = leaks
        .iter()
        .partition(|l| l.kind != crate::table::verdict::LeakKind::Possible);
    let t = totals(sure.iter().copied());
    let sure: Vec<Leak> = sure.into_iter().cloned().collect();
    let groups = group_folding(&sure, fold);
    let multi_pid = groups
        .iter()
        .flat_map(|g| g.pids.iter())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    let _ = writeln!(
        out,
        "{}",
        style.paint(
            "1",
            &format!(
                "{title}: {} leaked ({}), {} direct, {} indirect, {}",
                plural(t.objects, "object", "objects"),
                bytes(t.bytes),
                t.direct,
                t.indirect,
                plural(groups.len() as u64, "stack", "stacks"),
            )
        )
    );
    out.push('\n');
    for (i, g) in groups.iter().take(top).enumerate() {
        render_group(&mut out, i + 1, g, &style, multi_pid);
    }
    if groups.len() > top {
        let rest: u64 = groups[top..].iter().map(|g| g.bytes).sum();
        let more = groups.len() - top;
        let _ = writeln!(
            out,
            "… and {more} more {} ({}); use --top to see them\n",
            if more == 1 { "stack" } else { "stacks" },
            bytes(rest)
        );
    }
    if !possible.is_empty() {
        let p: Vec<Leak> = possible.into_iter().cloned().collect();
        let bytes_possible: u64 = p.iter().map(|l| l.size).sum();
        let _ = writeln!(
            out,
            "possibly leaked: {} ({}), reachable only through pointers into\ntheir middle; not counted above (--show-possible lists them)",
            plural(p.len() as u64, "object", "objects"),
            bytes(bytes_possible)
        );
        out.push('\n');
    }
    out
}

/// The possible leaks, grouped (for --show-possible).
pub fn render_possible(
    leaks: &[Leak],
    top: usize,
    color: bool,
    fold: Option<&WrapperFold>,
) -> String {
    let possible: Vec<Leak> = leaks
        .iter()
        .filter(|l| l.kind == crate::table::verdict::LeakKind::Possible)
        .cloned()
        .collect();
    if possible.is_empty() {
        return String::new();
    }
    let style = Style { color };
    let mut out = format!("{}\n\n", style.paint("1", "possibly leaked, by stack:"));
    for (i, g) in group_folding(&possible, fold).iter().take(top).enumerate() {
        render_group(&mut out, i + 1, g, &style, false);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    #[test]
    fn renders_groups_largest_first_within_80_columns() {
        let text = render("pid 42 (prog)", &sample(), 10, false, None);
        let expected = "\
pid 42 (prog): 4 objects leaked (120 B), 2 direct, 2 indirect, 2 stacks

#1 96 B in 3 objects: 1 direct (32 B), 2 indirect (64 B)
   size 32 B; oldest 6.1 s; by malloc
     make_node (list.c:42)
     main (list.c:80)

#2 24 B in 1 object: 1 direct (24 B)
   size 24 B; oldest 6.1 s; by malloc
     read_config (conf.c:7)
     main (list.c:81)

";
        assert_eq!(text, expected);
        assert!(text.lines().all(|l| l.chars().count() <= 80));
    }

    #[test]
    fn says_why_a_stack_is_missing_or_stops_in_a_wrapper() {
        use std::sync::Arc;

        use crate::{
            report::tests::{frame, leak},
            table::verdict::LeakKind,
        };
        // Built without frame pointers, Redis's stacks stop in its wrapper.
        let wrapper_only = Arc::new(vec![frame("zmalloc_usable", "zmalloc.c", 3)]);
        let mut early = leak(LeakKind::Direct, 24, &Arc::new(Vec::new()));
        early.before_attach = true;
        let leaks = [leak(LeakKind::Direct, 58, &wrapper_only), early];
        let fold = WrapperFold::new(&[]);
        let text = render("x", &leaks, 10, false, Some(&fold));
        let expected = "\
x: 2 objects leaked (82 B), 2 direct, 0 indirect, 2 stacks

#1 58 B in 1 object: 1 direct (58 B)
   size 58 B; oldest 6.1 s; by malloc
     zmalloc_usable (zmalloc.c:3)
     (no caller outside the wrappers was captured)

#2 24 B in 1 object: 1 direct (24 B)
   size 24 B; oldest 6.1 s; by malloc
     (no stack: allocated before attaching)

";
        assert_eq!(text, expected);
        // Without folding, a wrapper is just a frame.
        let plain = render("x", &leaks, 10, false, None);
        assert!(!plain.contains("no caller outside"), "{plain}");
    }

    #[test]
    fn top_limits_the_groups() {
        let text = render("x", &sample(), 1, false, None);
        assert!(text.contains("… and 1 more stack (24 B)"));
    }

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(bytes(100), "100 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(age(6100), "6.1 s");
        assert_eq!(age(150_000), "2.5 min");
    }
}
