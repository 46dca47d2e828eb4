//! Reports people can act on: leaks with symbolized stacks, grouped by allocation
//! stack, as text, NDJSON, pprof and flamegraph.
//!
//! The renderers are pure (they take [`Leak`]s and return text or bytes) and are
//! tested without root; the session decides when to call them.

pub mod exitcode;
pub mod files;
pub mod flamegraph;
pub mod fold;
pub mod json;
pub mod live;
pub mod lsan;
pub mod pprof;
pub mod profile_dir;
pub mod records;
pub mod suppress;
pub mod text;
pub mod unsymbolized;
pub mod xml;

use std::{collections::BTreeSet, sync::Arc};

use leak_common::AllocFn;
use serde::Serialize;

use crate::{symbolize::Frame, table::verdict::LeakKind};

/// The name users know an allocator function by.
pub fn allocator_name(f: AllocFn) -> &'static str {
    match f {
        AllocFn::Malloc => "malloc",
        AllocFn::Calloc => "calloc",
        AllocFn::Realloc => "realloc",
        AllocFn::Reallocarray => "reallocarray",
        AllocFn::PosixMemalign => "posix_memalign",
        AllocFn::AlignedAlloc => "aligned_alloc",
        AllocFn::Valloc => "valloc",
        AllocFn::Pvalloc => "pvalloc",
        AllocFn::OperatorNew => "operator new",
        AllocFn::OperatorNewAligned => "operator new(align_val_t)",
        AllocFn::Free => "free",
    }
}

/// One leaked (or possibly leaked) object, ready to report.
#[derive(Clone, Debug, Serialize)]
pub struct Leak {
    pub pid: u32,
    #[serde(serialize_with = "json::hex")]
    pub address: u64,
    pub size: u64,
    pub kind: LeakKind,
    pub age_ms: u64,
    pub tid: u32,
    pub allocator: &'static str,
    /// For indirect leaks: the direct leak through which this one is lost.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "json::hex_opt"
    )]
    pub root: Option<u64>,
    /// Allocated before leaktrace attached (found by the heap walk): no stack.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub before_attach: bool,
    /// The C++ class the block's vtable pointer names, when it has one.
    #[serde(rename = "class", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// `--show-contents`: the first bytes of the block, in hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contents: Option<String>,
    pub stack: Arc<Vec<Frame>>,
}

/// Leaks that share an allocation stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub stack: Arc<Vec<Frame>>,
    pub allocator: &'static str,
    pub objects: u64,
    pub bytes: u64,
    pub direct: (u64, u64),
    pub indirect: (u64, u64),
    pub possible: (u64, u64),
    pub min_size: u64,
    pub max_size: u64,
    pub oldest_ms: u64,
    pub pids: BTreeSet<u32>,
    /// Allocated before attaching (no stack): grouped by class and size.
    pub before_attach: bool,
    pub class_name: Option<String>,
    /// Wrapper functions folded off the top of these leaks' stacks.
    pub folded: BTreeSet<String>,
    /// Folding was asked for but the stack is nothing but wrappers: no caller
    /// outside them was captured.
    pub only_wrappers: bool,
}

/// What makes two stacks "the same" in a report: what the user would read.
type StackKey = Vec<(String, Option<String>)>;

fn stack_key(stack: &[Frame]) -> StackKey {
    stack.iter().map(|f| (f.label(), f.location())).collect()
}

/// Groups leaks by allocation stack, largest leaked bytes first.
pub fn group(leaks: &[Leak]) -> Vec<Group> {
    group_folding(leaks, None)
}

/// Groups leaks by allocation stack, with `fold`'s wrappers dropped from the top
/// of each stack (a group's stack starts at the first frame outside them).
pub fn group_folding(leaks: &[Leak], fold: Option<&fold::WrapperFold>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: std::collections::HashMap<(StackKey, &str), usize> =
        std::collections::HashMap::new();
    for leak in leaks {
        let (folded, stack) = match fold {
            Some(fold) => fold.split(&leak.stack),
            None => (&[][..], &leak.stack[..]),
        };
        // Blocks from before attaching have no stack: group them by the class
        // their vtable names, and by size.
        let mut key = (stack_key(stack), leak.allocator);
        if leak.before_attach {
            let what = match &leak.class_name {
                Some(class) => format!("{class}, "),
                None => String::new(),
            };
            key.0 = vec![(
                format!("allocated before attaching: {what}{} bytes", leak.size),
                None,
            )];
        }
        let i = *index.entry(key).or_insert_with(|| {
            groups.push(Group {
                stack: if folded.is_empty() {
                    leak.stack.clone()
                } else {
                    Arc::new(stack.to_vec())
                },
                allocator: leak.allocator,
                objects: 0,
                bytes: 0,
                direct: (0, 0),
                indirect: (0, 0),
                possible: (0, 0),
                min_size: u64::MAX,
                max_size: 0,
                oldest_ms: 0,
                pids: BTreeSet::new(),
                before_attach: leak.before_attach,
                class_name: leak.class_name.clone(),
                folded: BTreeSet::new(),
                only_wrappers: fold.is_some_and(|f| f.only_wrappers(stack)),
            });
            groups.len() - 1
        });
        let g = &mut groups[i];
        g.folded
            .extend(folded.iter().filter_map(|f| f.function.clone()));
        g.objects += 1;
        g.bytes += leak.size;
        let bucket = match leak.kind {
            LeakKind::Direct => &mut g.direct,
            LeakKind::Indirect => &mut g.indirect,
            LeakKind::Possible => &mut g.possible,
        };
        bucket.0 += 1;
        bucket.1 += leak.size;
        g.min_size = g.min_size.min(leak.size);
        g.max_size = g.max_size.max(leak.size);
        g.oldest_ms = g.oldest_ms.max(leak.age_ms);
        g.pids.insert(leak.pid);
        if g.class_name != leak.class_name {
            g.class_name = None; // a stack that made objects of several classes
        }
    }
    groups.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(b.objects.cmp(&a.objects)));
    groups
}

/// Leaks of one kind that share an allocation stack: valgrind's loss record,
/// LeakSanitizer's "Direct leak of N byte(s) in M object(s)".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindGroup {
    pub kind: LeakKind,
    pub pid: u32,
    pub stack: Arc<Vec<Frame>>,
    pub blocks: u64,
    pub bytes: u64,
    /// Direct groups: the bytes of the indirect leaks lost through its blocks.
    pub indirect_bytes: u64,
}

/// Groups leaks by process, kind and allocation stack, in the order first met.
/// Blocks from before attaching (no stack) are grouped by size, as in [`group`].
pub fn group_by_kind(leaks: &[Leak]) -> Vec<KindGroup> {
    type Key = (u32, LeakKind, StackKey);
    let mut groups: Vec<KindGroup> = Vec::new();
    let mut index: std::collections::HashMap<Key, usize> = std::collections::HashMap::new();
    let mut direct_of: std::collections::HashMap<(u32, u64), usize> =
        std::collections::HashMap::new();
    for leak in leaks {
        let stack = if leak.before_attach {
            vec![(format!("before attaching, {} bytes", leak.size), None)]
        } else {
            stack_key(&leak.stack)
        };
        let i = *index
            .entry((leak.pid, leak.kind, stack))
            .or_insert_with(|| {
                groups.push(KindGroup {
                    kind: leak.kind,
                    pid: leak.pid,
                    stack: leak.stack.clone(),
                    blocks: 0,
                    bytes: 0,
                    indirect_bytes: 0,
                });
                groups.len() - 1
            });
        groups[i].blocks += 1;
        groups[i].bytes += leak.size;
        if leak.kind == LeakKind::Direct {
            direct_of.insert((leak.pid, leak.address), i);
        }
    }
    for leak in leaks.iter().filter(|l| l.kind == LeakKind::Indirect) {
        if let Some(&i) = leak.root.and_then(|r| direct_of.get(&(leak.pid, r))) {
            groups[i].indirect_bytes += leak.size;
        }
    }
    groups
}

/// Totals over a set of leaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub objects: u64,
    pub bytes: u64,
    pub direct: u64,
    pub direct_bytes: u64,
    pub indirect: u64,
    pub indirect_bytes: u64,
}

/// Leak totals of `leaks`; possible leaks are never part of them.
pub fn totals<'a>(leaks: impl IntoIterator<Item = &'a Leak>) -> Totals {
    let mut t = Totals::default();
    for l in leaks {
        if l.kind == LeakKind::Possible {
            continue;
        }
        t.objects += 1;
        t.bytes += l.size;
        match l.kind {
            LeakKind::Direct => {
                t.direct += 1;
                t.direct_bytes += l.size;
            }
            LeakKind::Indirect => {
                t.indirect += 1;
                t.indirect_bytes += l.size;
            }
            LeakKind::Possible => {}
        }
    }
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn frame(function: &str, file: &str, line: u32) -> Frame {
        Frame {
            address: 0x1000 + line as u64,
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(line),
            module: Some("/usr/bin/prog".into()),
            offset: Some(line as u64),
            inlined: false,
            reason: None,
        }
    }

    pub fn leak(kind: LeakKind, size: u64, stack: &Arc<Vec<Frame>>) -> Leak {
        Leak {
            pid: 42,
            address: 0x5555_0000 + size,
            size,
            kind,
            age_ms: 6100,
            tid: 42,
            allocator: "malloc",
            root: None,
            before_attach: false,
            class_name: None,
            contents: None,
            stack: stack.clone(),
        }
    }

    #[test]
    fn blocks_from_before_attaching_group_by_class_and_size() {
        let none = Arc::new(Vec::new());
        let old = |size, class: Option<&str>| Leak {
            before_attach: true,
            class_name: class.map(str::to_owned),
            ..leak(LeakKind::Direct, size, &none)
        };
        let leaks = vec![
            old(48, Some("app::Session")),
            old(48, Some("app::Session")),
            old(48, None),
            old(64, Some("app::Session")),
        ];
        let groups: Vec<_> = group(&leaks)
            .iter()
            .map(|g| (g.class_name.clone(), g.min_size, g.objects))
            .collect();
        assert_eq!(
            groups,
            vec![
                (Some("app::Session".to_owned()), 48, 2),
                (Some("app::Session".to_owned()), 64, 1),
                (None, 48, 1),
            ]
        );
        let text = text::render("t", &leaks, 10, false, None);
        assert!(text.contains("class app::Session (its vtable)"), "{text}");
        assert!(
            text.contains("(no stack: allocated before attaching)"),
            "{text}"
        );
    }

    pub fn sample() -> Vec<Leak> {
        let list = Arc::new(vec![
            frame("make_node", "list.c", 42),
            frame("main", "list.c", 80),
        ]);
        let other = Arc::new(vec![
            frame("read_config", "conf.c", 7),
            frame("main", "list.c", 81),
        ]);
        vec![
            leak(LeakKind::Direct, 32, &list),
            leak(LeakKind::Indirect, 32, &list),
            leak(LeakKind::Indirect, 32, &list),
            leak(LeakKind::Direct, 24, &other),
        ]
    }

    #[test]
    fn groups_by_kind_with_the_indirect_bytes_of_direct_leaks() {
        let mut leaks = sample();
        leaks[1].root = Some(leaks[0].address);
        leaks[2].root = Some(leaks[0].address);
        leaks[2].address += 1000;
        let groups = group_by_kind(&leaks);
        let summary: Vec<_> = groups
            .iter()
            .map(|g| (g.kind, g.blocks, g.bytes, g.indirect_bytes))
            .collect();
        assert_eq!(
            summary,
            [
                (LeakKind::Direct, 1, 32, 64),
                (LeakKind::Indirect, 2, 64, 0),
                (LeakKind::Direct, 1, 24, 0),
            ]
        );
    }

    #[test]
    fn folding_groups_by_the_first_frame_outside_the_wrappers() {
        let small = Arc::new(vec![frame("xmalloc", "x.c", 5), frame("caller", "c.c", 9)]);
        let big = Arc::new(vec![
            frame("xmalloc_big", "x.c", 2),
            frame("xmalloc", "x.c", 6),
            frame("caller", "c.c", 9),
        ]);
        let leaks = [
            leak(LeakKind::Direct, 16, &small),
            leak(LeakKind::Direct, 128, &big),
        ];
        assert_eq!(group(&leaks).len(), 2);
        let fold = fold::WrapperFold::new(&["xmalloc_big".to_owned()]);
        let groups = group_folding(&leaks, Some(&fold));
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].direct, (2, 144));
        assert_eq!(groups[0].stack[0].function.as_deref(), Some("caller"));
        let folded: Vec<&str> = groups[0].folded.iter().map(String::as_str).collect();
        assert_eq!(folded, ["xmalloc", "xmalloc_big"]);
    }

    #[test]
    fn groups_by_stack_largest_first() {
        let groups = group(&sample());
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].bytes, 96);
        assert_eq!(groups[0].direct, (1, 32));
        assert_eq!(groups[0].indirect, (2, 64));
        assert_eq!(groups[1].objects, 1);
        assert_eq!(totals(&sample()).objects, 4);
        assert_eq!(totals(&sample()).direct_bytes, 56);
        let mut with_possible = sample();
        with_possible.push(leak(LeakKind::Possible, 64, &Arc::new(Vec::new())));
        assert_eq!(
            totals(&with_possible),
            totals(&sample()),
            "possible leaks apart"
        );
    }
}
