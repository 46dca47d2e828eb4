//! valgrind memcheck's XML output (`--xml FILE`, protocol version 4), so that the
//! tools that read valgrind's `--xml-file` (CI plugins, code checkers) read
//! leaktrace unchanged. The document has valgrind's elements in valgrind's order;
//! each loss record (leaks of one kind sharing a stack) is an `<error>` of kind
//! `Leak_DefinitelyLost`, `Leak_IndirectlyLost` or `Leak_PossiblyLost`, and, as in
//! valgrind, a definitely-lost record's bytes include the indirect leaks lost
//! through it. Stacks start at the allocation's caller (valgrind's start with its
//! own `malloc`) and end at `main`, as valgrind's do. Pure: the reporter hands the
//! leaks over at the end.

use std::{fmt::Write as _, time::Duration};

use super::{KindGroup, Leak, group_by_kind, records::SuppressedRule};
use crate::{symbolize::Frame, table::verdict::LeakKind};

/// What the document describes: one run, its first target, its leaks.
pub struct XmlRun<'a> {
    /// The target's pid and parent pid.
    pub pid: u32,
    pub ppid: u32,
    /// leaktrace's own command line (program first).
    pub tool_argv: &'a [String],
    /// The target's command line (program first).
    pub target_argv: &'a [String],
    /// How long the run lasted.
    pub elapsed: Duration,
    /// The leaks left at the end (direct, indirect and possible).
    pub leaks: &'a [Leak],
    /// Suppression rules that hid something.
    pub suppressed: &'a [SuppressedRule],
}

/// Escapes text for an XML element.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// valgrind's clock: `days:hours:minutes:seconds.millis ` (with its trailing space).
fn clock(d: Duration) -> String {
    let ms = d.as_millis();
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}:{:02}.{:03} ",
        s / 86400,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

fn kind_name(kind: LeakKind) -> &'static str {
    match kind {
        LeakKind::Direct => "Leak_DefinitelyLost",
        LeakKind::Indirect => "Leak_IndirectlyLost",
        LeakKind::Possible => "Leak_PossiblyLost",
    }
}

fn kind_words(kind: LeakKind) -> &'static str {
    match kind {
        LeakKind::Direct => "definitely lost",
        LeakKind::Indirect => "indirectly lost",
        LeakKind::Possible => "possibly lost",
    }
}

/// valgrind lists loss records smallest first; on equal sizes possible before
/// indirect before definite, then by block count.
fn valgrind_order(groups: &mut [KindGroup]) {
    let rank = |k: LeakKind| match k {
        LeakKind::Possible => 0,
        LeakKind::Indirect => 1,
        LeakKind::Direct => 2,
    };
    groups.sort_by_key(|g| (g.bytes + g.indirect_bytes, rank(g.kind), g.blocks));
}

fn frame(out: &mut String, f: &Frame) {
    out.push_str("    <frame>\n");
    let _ = writeln!(out, "      <ip>0x{:X}</ip>", f.address);
    if let Some(module) = &f.module {
        let _ = writeln!(out, "      <obj>{}</obj>", escape(module));
    }
    if let Some(function) = &f.function {
        let _ = writeln!(out, "      <fn>{}</fn>", escape(function));
    }
    // valgrind names a source file with its directory and line, or not at all.
    if let (Some(path), Some(line)) = (&f.file, f.line) {
        let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
        if !dir.is_empty() {
            let _ = writeln!(out, "      <dir>{}</dir>", escape(dir));
        }
        let _ = writeln!(out, "      <file>{}</file>", escape(file));
        let _ = writeln!(out, "      <line>{line}</line>");
    }
    out.push_str("    </frame>\n");
}

fn error(out: &mut String, unique: usize, total: usize, g: &KindGroup) {
    let amount = if g.indirect_bytes > 0 {
        format!(
            "{} ({} direct, {} indirect) bytes",
            g.bytes + g.indirect_bytes,
            g.bytes,
            g.indirect_bytes
        )
    } else {
        format!("{} bytes", g.bytes)
    };
    out.push_str("<error>\n");
    let _ = writeln!(out, "  <unique>{unique:#x}</unique>");
    out.push_str("  <tid>1</tid>\n");
    let _ = writeln!(out, "  <kind>{}</kind>", kind_name(g.kind));
    out.push_str("  <xwhat>\n");
    let _ = writeln!(
        out,
        "    <text>{amount} in {} blocks are {} in loss record {} of {total}</text>",
        g.blocks,
        kind_words(g.kind),
        unique + 1
    );
    let _ = writeln!(
        out,
        "    <leakedbytes>{}</leakedbytes>",
        g.bytes + g.indirect_bytes
    );
    let _ = writeln!(out, "    <leakedblocks>{}</leakedblocks>", g.blocks);
    out.push_str("  </xwhat>\n  <stack>\n");
    // valgrind stops at main (its --show-below-main=no).
    let below_main = g
        .stack
        .iter()
        .position(|f| f.function.as_deref() == Some("main"))
        .map_or(g.stack.len(), |i| i + 1);
    for f in &g.stack[..below_main] {
        frame(out, f);
    }
    out.push_str("  </stack>\n</error>\n\n");
}

fn argv(out: &mut String, tag: &str, args: &[String]) {
    let _ = writeln!(out, "  <{tag}>");
    if let Some((exe, rest)) = args.split_first() {
        let _ = writeln!(out, "    <exe>{}</exe>", escape(exe));
        for a in rest {
            let _ = writeln!(out, "    <arg>{}</arg>", escape(a));
        }
    }
    let _ = writeln!(out, "  </{tag}>");
}

/// The whole document.
pub fn render(run: &XmlRun) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?>\n\n<valgrindoutput>\n\n");
    out.push_str("<protocolversion>4</protocolversion>\n<protocoltool>memcheck</protocoltool>\n\n");
    out.push_str("<preamble>\n");
    let _ = writeln!(
        out,
        "  <line>leaktrace, a memory leak tracer for running processes</line>"
    );
    out.push_str("  <line>Leaks in valgrind memcheck's XML, protocol version 4</line>\n");
    let _ = writeln!(
        out,
        "  <line>Using leaktrace-{}</line>",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "  <line>Command: {}</line>",
        escape(&run.target_argv.join(" "))
    );
    out.push_str("</preamble>\n\n");
    let _ = write!(
        out,
        "<pid>{}</pid>\n<ppid>{}</ppid>\n<tool>memcheck</tool>\n\n",
        run.pid, run.ppid
    );
    out.push_str("<args>\n");
    argv(&mut out, "vargv", run.tool_argv);
    argv(&mut out, "argv", run.target_argv);
    out.push_str("</args>\n\n");
    let _ = write!(
        out,
        "<status>\n  <state>RUNNING</state>\n  <time>{}</time>\n</status>\n\n\n",
        clock(Duration::ZERO)
    );
    let _ = write!(
        out,
        "<status>\n  <state>FINISHED</state>\n  <time>{}</time>\n</status>\n\n",
        clock(run.elapsed)
    );
    let mut groups = group_by_kind(run.leaks);
    valgrind_order(&mut groups);
    for (i, g) in groups.iter().enumerate() {
        error(&mut out, i, groups.len(), g);
    }
    out.push_str("<errorcounts>\n</errorcounts>\n\n<suppcounts>\n");
    for s in run.suppressed {
        let _ = write!(
            out,
            "  <pair>\n    <count>{}</count>\n    <name>{}</name>\n  </pair>\n",
            s.objects,
            escape(&s.rule)
        );
    }
    out.push_str("</suppcounts>\n\n</valgrindoutput>\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    fn run_of(leaks: &[Leak]) -> String {
        render(&XmlRun {
            pid: 42,
            ppid: 1,
            tool_argv: &["/usr/bin/leaktrace".into(), "--xml".into(), "v.xml".into()],
            target_argv: &["./prog".into(), "a<b".into()],
            elapsed: Duration::from_millis(90_061_001),
            leaks,
            suppressed: &[SuppressedRule {
                rule: "^allocate_dtv$".into(),
                builtin: true,
                objects: 3,
                bytes: 864,
            }],
        })
    }

    #[test]
    fn loss_records_as_valgrind_writes_them() {
        let mut leaks = sample();
        leaks[1].root = Some(leaks[0].address);
        leaks[2].root = Some(leaks[0].address);
        let xml = run_of(&leaks);
        let first = xml.find("<error>").unwrap();
        let expected_first = "\
<error>
  <unique>0x0</unique>
  <tid>1</tid>
  <kind>Leak_DefinitelyLost</kind>
  <xwhat>
    <text>24 bytes in 1 blocks are definitely lost in loss record 1 of 3</text>
    <leakedbytes>24</leakedbytes>
    <leakedblocks>1</leakedblocks>
  </xwhat>
  <stack>
    <frame>
      <ip>0x1007</ip>
      <obj>/usr/bin/prog</obj>
      <fn>read_config</fn>
      <file>conf.c</file>
      <line>7</line>
    </frame>
";
        assert_eq!(&xml[first..first + expected_first.len()], expected_first);
        assert!(xml.contains(
            "<text>64 bytes in 2 blocks are indirectly lost in loss record 2 of 3</text>"
        ));
        assert!(xml.contains(
            "<text>96 (32 direct, 64 indirect) bytes in 1 blocks are definitely lost in loss record 3 of 3</text>\n    <leakedbytes>96</leakedbytes>"
        ));
        assert!(xml.starts_with("<?xml version=\"1.0\"?>\n\n<valgrindoutput>\n\n<protocolversion>4</protocolversion>\n<protocoltool>memcheck</protocoltool>\n"));
        assert!(xml.contains("<pid>42</pid>\n<ppid>1</ppid>\n<tool>memcheck</tool>"));
        assert!(xml.contains("<argv>\n    <exe>./prog</exe>\n    <arg>a&lt;b</arg>\n  </argv>"));
        assert!(xml.contains("<state>FINISHED</state>\n  <time>01:01:01:01.001 </time>"));
        assert!(xml.contains("<count>3</count>\n    <name>^allocate_dtv$</name>"));
        assert!(xml.ends_with("</suppcounts>\n\n</valgrindoutput>\n\n"));
    }

    #[test]
    fn stacks_end_at_main_as_valgrinds_do() {
        use crate::report::tests::{frame, leak};
        let stack = std::sync::Arc::new(vec![
            frame("make_node", "list.c", 42),
            frame("main", "list.c", 80),
            frame("__libc_start_call_main", "libc_start_call_main.h", 58),
        ]);
        let xml = run_of(&[leak(LeakKind::Direct, 8, &stack)]);
        assert!(xml.contains("<fn>main</fn>"), "{xml}");
        assert!(!xml.contains("__libc_start_call_main"), "{xml}");
    }

    #[test]
    fn a_clean_run_has_no_errors_and_names_are_escaped() {
        let xml = run_of(&[]);
        assert!(!xml.contains("<error>"));
        assert_eq!(
            escape("operator new<T>&'\""),
            "operator new&lt;T&gt;&amp;&apos;&quot;"
        );
        let dir = Frame {
            file: Some("/src/a b/x.c".into()),
            line: Some(3),
            ..Frame::default()
        };
        let mut out = String::new();
        frame(&mut out, &dir);
        assert!(out.contains("<dir>/src/a b</dir>\n      <file>x.c</file>\n      <line>3</line>"));
    }
}
