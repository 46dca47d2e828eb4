//! The formats of other leak checkers, compared with the checkers themselves on
//! the same program (`fixtures/formats.c`): valgrind memcheck's XML (`--xml`),
//! element by element and through a valgrind-XML reader from PyPI (ValgrindCI,
//! installed by `cargo xtask test`), and LeakSanitizer's report (`--format lsan`)
//! against a `gcc -fsanitize=leak` build of the same source.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use crate::util::{self, launch, serial};

const FAST: &[&str] = &["--interval", "200ms", "--min-age", "200ms"];

/// An XML element: its name, text and children.
#[derive(Debug, Default)]
struct Node {
    name: String,
    text: String,
    children: Vec<Node>,
}

impl Node {
    fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> {
        self.children.iter().filter(move |c| c.name == name)
    }

    fn text_of(&self, name: &str) -> &str {
        self.child(name)
            .map_or_else(|| panic!("no <{name}> in <{}>", self.name), |c| &c.text)
    }

    fn names(&self) -> Vec<&str> {
        self.children.iter().map(|c| c.name.as_str()).collect()
    }
}

fn parse_xml(text: &str) -> Node {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack = vec![Node::default()];
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) => stack.push(Node {
                name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                ..Node::default()
            }),
            Event::Empty(e) => stack.last_mut().unwrap().children.push(Node {
                name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                ..Node::default()
            }),
            Event::Text(e) => stack
                .last_mut()
                .unwrap()
                .text
                .push_str(String::from_utf8_lossy(&e).trim()),
            Event::End(_) => {
                let done = stack.pop().unwrap();
                stack.last_mut().unwrap().children.push(done);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(stack.len(), 1, "unclosed elements");
    let mut root = stack.pop().unwrap();
    assert_eq!(root.children.len(), 1, "one document element");
    root.children.pop().unwrap()
}

/// Per (kind, function names of the program's own frames): (bytes, blocks).
type ByStack = BTreeMap<(String, Vec<String>), (u64, u64)>;

/// The errors of a memcheck XML document, by kind and user frames; checks each
/// error's structure on the way.
fn xml_errors(doc: &Node, program: &Path) -> ByStack {
    let mut by_stack = ByStack::new();
    for e in doc.all("error") {
        assert_eq!(e.names(), ["unique", "tid", "kind", "xwhat", "stack"]);
        let xwhat = e.child("xwhat").unwrap();
        assert_eq!(xwhat.names(), ["text", "leakedbytes", "leakedblocks"]);
        let stack = e.child("stack").unwrap();
        let mut user = Vec::new();
        for f in stack.all("frame") {
            let names = f.names();
            assert!(names.starts_with(&["ip", "obj"]), "frame {names:?}");
            for n in &names {
                assert!(["ip", "obj", "fn", "dir", "file", "line"].contains(n));
            }
            if Path::new(f.text_of("obj")) == program {
                user.push(f.text_of("fn").to_owned());
            }
        }
        let entry = by_stack
            .entry((e.text_of("kind").to_owned(), user))
            .or_default();
        entry.0 += xwhat.text_of("leakedbytes").parse::<u64>().unwrap();
        entry.1 += xwhat.text_of("leakedblocks").parse::<u64>().unwrap();
    }
    by_stack
}

fn run_valgrind(program: &Path, xml: &Path) {
    let status = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect,possible",
            "--xml=yes",
        ])
        .arg(format!("--xml-file={}", xml.display()))
        .arg(program)
        .args(["--hold-ms", "0"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("valgrind is installed by `cargo xtask test`");
    assert!(status.success(), "valgrind: {status}");
}

/// The Python with the valgrind-XML reader (`cargo xtask test` makes it).
fn python() -> PathBuf {
    let python = std::env::var_os("LEAKTRACE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python3")
        });
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask test` installs ValgrindCI from PyPI there",
        python.display()
    );
    python
}

/// What ValgrindCI's parser makes of a file: error count, kinds, and per kind and
/// user frames the number of errors.
fn read_with_valgrindci(xml: &Path, program: &Path) -> String {
    let script = r#"
import json, sys
from ValgrindCI.parse import ValgrindData
data = ValgrindData()
data.parse(sys.argv[1])
stacks = {}
for e in data.errors:
    key = e.kind + " " + "/".join(f.func for f in e.stack if f.obj == sys.argv[2])
    stacks[key] = stacks.get(key, 0) + 1
print(json.dumps({"errors": data.get_num_errors(),
                  "kinds": sorted(data.list_error_kinds()),
                  "stacks": stacks}, sort_keys=True))
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(xml)
        .arg(program)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ValgrindCI failed on {}: {}",
        xml.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn xml_matches_valgrinds_own_on_the_same_program() {
    util::require_root();
    let _s = serial();
    // valgrind and leaktrace name the object by its real path.
    let program = util::fixture("formats").canonicalize().unwrap();
    let dir = util::scratch("xml");
    let theirs = dir.join("valgrind.xml");
    run_valgrind(&program, &theirs);
    let ours = dir.join("leaktrace.xml");
    let mut args = FAST.to_vec();
    let ours_arg = ours.to_str().unwrap().to_owned();
    args.extend(["--xml", &ours_arg]);
    let run = launch("formats", &["--hold-ms", "0"], &args);
    assert!(run.status.success(), "stderr:\n{}", run.stderr);

    let theirs_doc = parse_xml(&std::fs::read_to_string(&theirs).unwrap());
    let ours_doc = parse_xml(&std::fs::read_to_string(&ours).unwrap());
    // The same document structure, element by element.
    assert_eq!(ours_doc.name, "valgrindoutput");
    assert_eq!(ours_doc.names(), theirs_doc.names());
    for name in ["protocolversion", "protocoltool", "tool"] {
        assert_eq!(ours_doc.text_of(name), theirs_doc.text_of(name), "{name}");
    }
    for name in ["preamble", "args", "status"] {
        let (o, t) = (
            ours_doc.child(name).unwrap(),
            theirs_doc.child(name).unwrap(),
        );
        assert_eq!(o.names(), t.names(), "<{name}>");
    }
    let launched = &run.of_type("start")[0]["targets"][0]["pid"];
    assert_eq!(ours_doc.text_of("pid"), launched.to_string());

    // The same kinds, bytes and blocks, by the names of the program's frames.
    let ours_errors = xml_errors(&ours_doc, &program);
    let theirs_errors = xml_errors(&theirs_doc, &program);
    assert_eq!(ours_errors, theirs_errors);
    assert_eq!(ours_errors.len(), 8, "{ours_errors:?}");
    for (kind, frames) in ours_errors.keys() {
        assert_eq!(
            frames.last().map(String::as_str),
            Some("main"),
            "{kind}: {frames:?}"
        );
    }
    let kinds: Vec<&str> = ours_errors.keys().map(|(k, _)| k.as_str()).collect();
    for kind in [
        "Leak_DefinitelyLost",
        "Leak_IndirectlyLost",
        "Leak_PossiblyLost",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing: {ours_errors:?}");
    }

    // A consumer of valgrind's XML reads both alike.
    let theirs_read = read_with_valgrindci(&theirs, &program);
    let ours_read = read_with_valgrindci(&ours, &program);
    assert_eq!(ours_read, theirs_read);
    assert!(ours_read.contains("\"errors\": 8"), "{ours_read}");
    assert!(
        ours_read.contains("\"Leak_IndirectlyLost make_node/dropped_list/main\": 1"),
        "{ours_read}"
    );
}

/// LeakSanitizer's report: per (kind, functions of the program's frames), bytes
/// and objects; and the summary's bytes and allocations.
fn lsan_leaks(report: &str, source: &str) -> (ByStack, (u64, u64)) {
    let mut by_stack = ByStack::new();
    let mut summary = None;
    let mut current: Option<(String, u64, u64, Vec<String>)> = None;
    let mut flush = |c: &mut Option<(String, u64, u64, Vec<String>)>| {
        if let Some((kind, bytes, objects, frames)) = c.take() {
            let e = by_stack.entry((kind, frames)).or_default();
            e.0 += bytes;
            e.1 += objects;
        }
    };
    for line in report.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [
            "Direct" | "Indirect",
            "leak",
            "of",
            bytes,
            "byte(s)",
            "in",
            objects,
            ..,
        ] = words[..]
        {
            flush(&mut current);
            current = Some((
                words[0].to_owned(),
                bytes.parse().unwrap(),
                objects.parse().unwrap(),
                Vec::new(),
            ));
        } else if let [n, _, "in", function, location] = words[..]
            && n.starts_with('#')
            && location.contains(source)
        {
            current
                .as_mut()
                .expect("a frame in a leak")
                .3
                .push(function.to_owned());
        } else if line.starts_with("SUMMARY: LeakSanitizer: ") {
            flush(&mut current);
            summary = Some((words[2].parse().unwrap(), words[6].parse().unwrap()));
        }
    }
    flush(&mut current);
    (by_stack, summary.expect("a SUMMARY line"))
}

#[test]
fn lsan_format_matches_leaksanitizers_report_on_the_same_source() {
    util::require_root();
    let _s = serial();
    let lsan = Command::new(util::fixture("formats-lsan"))
        .args(["--hold-ms", "0", "--no-cycle"])
        .output()
        .unwrap();
    assert_eq!(lsan.status.code(), Some(23), "LeakSanitizer's exit status");
    let theirs = String::from_utf8(lsan.stderr).unwrap();

    let dir = util::scratch("lsan");
    let ours_path = dir.join("report.txt");
    let out = Command::new(util::leaktrace())
        .args(FAST)
        .args(["--format", "lsan", "--output"])
        .arg(&ours_path)
        .arg("--")
        .arg(util::fixture("formats"))
        .args(["--hold-ms", "0", "--no-cycle"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr:\n{stderr}");
    let ours = std::fs::read_to_string(&ours_path).unwrap();
    assert!(
        ours.contains("ERROR: LeakSanitizer: detected memory leaks\n\nDirect leak of "),
        "{ours}"
    );

    let (ours_leaks, ours_summary) = lsan_leaks(&ours, "fixtures/formats.c");
    let (theirs_leaks, theirs_summary) = lsan_leaks(&theirs, "fixtures/formats.c");
    assert_eq!(ours_leaks, theirs_leaks, "ours:\n{ours}\ntheirs:\n{theirs}");
    assert_eq!(ours_leaks.len(), 5, "{ours_leaks:?}");
    for (kind, frames) in ours_leaks.keys() {
        assert_eq!(
            frames.last().map(String::as_str),
            Some("main"),
            "{kind}: {frames:?}"
        );
    }
    assert_eq!(ours_summary, theirs_summary);
    assert_eq!(ours_summary, (984, 15), "the fixture's truth");
}
