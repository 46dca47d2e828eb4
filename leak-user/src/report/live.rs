//! The live view (`--live`) for a person watching a server, like `top`: after
//! every scan, the leaking stacks with their growth since attaching (objects and
//! bytes, and per minute) and since the previous view. Pure: it renders lines
//! for a given width and height; `user/live.rs` owns the terminal.

use std::{collections::HashMap, fmt::Write as _, time::Duration};

use super::{Leak, group, text::bytes};
use crate::table::verdict::LeakKind;

/// What one view shows besides the leaks.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// The targets, as `pid 1234 (server)`.
    pub targets: String,
    /// Since attaching.
    pub elapsed: Duration,
    pub scans: u64,
    pub interval: Duration,
    /// Tracked (live) objects and their bytes.
    pub tracked: (u64, u64),
    pub events_per_sec: f64,
    pub lost: u64,
}

/// Remembers each stack's count at the previous view, for the `new` column.
#[derive(Debug, Default)]
pub struct LiveState {
    previous: HashMap<String, u64>,
}

/// `h m s` for the header.
fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s / 60 % 60),
    }
}

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The view for a terminal of `width` × `height` (at most `height` lines, none
/// wider than `width`). `leaks` are the confirmed leaks standing now.
pub fn render(
    header: &Header,
    leaks: &[Leak],
    state: &mut LiveState,
    width: usize,
    height: usize,
) -> String {
    let (before, since): (Vec<Leak>, Vec<Leak>) = leaks
        .iter()
        .filter(|l| l.kind != LeakKind::Possible)
        .cloned()
        .partition(|l| l.before_attach);
    let minutes = (header.elapsed.as_secs_f64() / 60.0).max(1.0 / 60.0);
    let objects = since.len() as u64;
    let leaked: u64 = since.iter().map(|l| l.size).sum();
    let mut lines = vec![
        format!(
            "leaktrace --live: {}   up {}   scan {} every {}",
            header.targets,
            uptime(header.elapsed),
            header.scans,
            super::text::age(header.interval.as_millis() as u64)
        ),
        format!(
            "tracked: {} objects ({})   events {:.0}/s   lost {}",
            header.tracked.0,
            bytes(header.tracked.1),
            header.events_per_sec,
            header.lost
        ),
        format!(
            "leaked since attaching: {objects} objects ({}), {:.1} objects/min ({}/min)",
            bytes(leaked),
            objects as f64 / minutes,
            bytes((leaked as f64 / minutes) as u64)
        ),
    ];
    if !before.is_empty() {
        let b: u64 = before.iter().map(|l| l.size).sum();
        lines.push(format!(
            "leaked before attaching (heap walk): {} objects ({})",
            before.len(),
            bytes(b)
        ));
    }
    lines.push("q quits".to_owned());
    lines.push(String::new());
    lines.push(format!(
        "{:>8} {:>10} {:>6} {:>9} {:>10}  stack (allocating function first)",
        "objects", "bytes", "new", "objs/min", "bytes/min"
    ));
    let mut current = HashMap::new();
    let groups = group(&since);
    let room = height.saturating_sub(lines.len());
    let shown = if groups.len() > room {
        room.saturating_sub(1)
    } else {
        groups.len()
    };
    for (i, g) in groups.iter().enumerate() {
        let names: Vec<String> = g.stack.iter().map(|f| f.label()).collect();
        let key = if names.is_empty() {
            format!("({})", g.allocator)
        } else {
            names.join(" < ")
        };
        let new = g
            .objects
            .saturating_sub(state.previous.get(&key).copied().unwrap_or(0));
        current.insert(key.clone(), g.objects);
        if i < shown {
            lines.push(format!(
                "{:>8} {:>10} {:>6} {:>9.1} {:>10}  {key}",
                g.objects,
                bytes(g.bytes),
                format!("+{new}"),
                g.objects as f64 / minutes,
                bytes((g.bytes as f64 / minutes) as u64),
            ));
        }
    }
    if groups.len() > shown && room > 0 {
        lines.push(format!("… and {} more stacks", groups.len() - shown));
    }
    if groups.is_empty() {
        lines.push("(no leaks found yet)".to_owned());
    }
    state.previous = current;
    let mut out = String::new();
    for line in lines.iter().take(height.max(1)) {
        let _ = writeln!(out, "{}", cut(line, width.max(20)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    fn header(secs: u64) -> Header {
        Header {
            targets: "pid 42 (prog)".into(),
            elapsed: Duration::from_secs(secs),
            scans: 7,
            interval: Duration::from_secs(5),
            tracked: (1000, 64 * 1024),
            events_per_sec: 1234.4,
            lost: 0,
        }
    }

    #[test]
    fn shows_growth_since_attaching_and_since_the_last_view() {
        let mut state = LiveState::default();
        let leaks = sample();
        let first = render(&header(120), &leaks[..2], &mut state, 100, 30);
        let expected = "\
leaktrace --live: pid 42 (prog)   up 2m 00s   scan 7 every 5.0 s
tracked: 1000 objects (64.0 KiB)   events 1234/s   lost 0
leaked since attaching: 2 objects (64 B), 1.0 objects/min (32 B/min)
q quits

 objects      bytes    new  objs/min  bytes/min  stack (allocating function first)
       2       64 B     +2       1.0       32 B  make_node < main
";
        assert_eq!(first, expected);
        let second = render(&header(180), &leaks, &mut state, 100, 30);
        assert!(
            second.contains("       3       96 B     +1       1.0       32 B  make_node < main\n"),
            "{second}"
        );
        assert!(
            second
                .contains("       1       24 B     +1       0.3        8 B  read_config < main\n"),
            "{second}"
        );
        let again = render(&header(190), &leaks, &mut state, 100, 30);
        assert!(again.contains(" +0 "), "{again}");
    }

    #[test]
    fn fits_the_terminal() {
        let mut state = LiveState::default();
        let narrow = render(&header(5), &sample(), &mut state, 40, 7);
        assert_eq!(narrow.lines().count(), 7);
        assert!(narrow.lines().all(|l| l.chars().count() <= 40), "{narrow}");
        assert!(narrow.contains("… and 2 more stacks"), "{narrow}");
        let empty = render(&header(5), &[], &mut state, 80, 24);
        assert!(empty.contains("(no leaks found yet)"));
    }
}
