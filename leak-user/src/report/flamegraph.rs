//! A flamegraph (SVG, rendered by inferno) of leaked bytes by allocation stack.

use inferno::flamegraph::{self, Options};

use super::{Leak, group};

/// Folded stacks, root first: `main;build_list;make_node;malloc 96`.
pub fn folded(leaks: &[Leak]) -> Vec<String> {
    group(leaks)
        .iter()
        .map(|g| {
            let mut frames: Vec<String> = g
                .stack
                .iter()
                .rev()
                .map(|f| f.label().replace([';', ' '], "_"))
                .collect();
            frames.push(format!("[{}]", g.allocator.replace(' ', "_")));
            format!("{} {}", frames.join(";"), g.bytes)
        })
        .collect()
}

/// Renders the SVG.
pub fn svg(leaks: &[Leak]) -> Result<Vec<u8>, String> {
    let lines = folded(leaks);
    let mut options = Options::default();
    options.title = "Leaked bytes by allocation stack".into();
    options.count_name = "bytes".into();
    let mut out = Vec::new();
    if lines.is_empty() {
        options.subtitle = Some("no leaks".into());
        flamegraph::from_lines(&mut options, ["no_leaks 1"].iter().copied(), &mut out)
    } else {
        flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut out)
    }
    .map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    #[test]
    fn folds_root_first() {
        let lines = folded(&sample());
        assert_eq!(lines[0], "main;make_node;[malloc] 96");
    }

    #[test]
    fn renders_an_svg_naming_the_function() {
        let svg = String::from_utf8(svg(&sample()).unwrap()).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("make_node"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
