//! tracefs: where tracepoint programs attach, and where the kernel describes each
//! tracepoint's record layout (`events/<category>/<name>/format`). Field offsets
//! change between kernel versions, so they are read here at start-up and handed to
//! the eBPF programs ([`TracepointLayout`]).

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use leak_common::TracepointLayout;

const CANDIDATES: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// tracefs is not available.
#[derive(Debug, thiserror::Error)]
#[error(
    "tracefs is not mounted and could not be mounted at /sys/kernel/tracing ({0}); \
     mount it with `mount -t tracefs tracefs /sys/kernel/tracing`"
)]
pub struct TracefsMissing(#[source] io::Error);

/// Finds tracefs, mounting it at /sys/kernel/tracing when it is missing (root only).
pub fn ensure_mounted() -> Result<PathBuf, TracefsMissing> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    let target = CString::new(CANDIDATES[0]).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no mount data.
    let ret = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(TracefsMissing(io::Error::last_os_error()));
    }
    Ok(PathBuf::from(CANDIDATES[0]))
}

/// Field name -> byte offset, from the text of a `format` file.
pub fn parse_format(text: &str) -> HashMap<String, u32> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut decl = "";
        let mut offset = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            } else if decl.is_empty() {
                decl = part;
            }
        }
        // "unsigned long call_site", "char comm[16]", "__data_loc char[] name"
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        if let Some(offset) = offset
            && !name.is_empty()
        {
            fields.insert(name.to_owned(), offset);
        }
    }
    fields
}

fn fields(tracefs: &Path, event: &str) -> HashMap<String, u32> {
    std::fs::read_to_string(tracefs.join("events").join(event).join("format"))
        .map(|t| parse_format(&t))
        .unwrap_or_default()
}

/// Reads every offset the programs need; fields this kernel lacks stay absent.
pub fn layout(tracefs: &Path) -> TracepointLayout {
    let mut l = TracepointLayout::absent();
    let get = |f: &HashMap<String, u32>, name: &str| {
        f.get(name).copied().unwrap_or(TracepointLayout::ABSENT)
    };
    let f = fields(tracefs, "task/task_newtask");
    l.newtask_pid = get(&f, "pid");
    l.newtask_clone_flags = get(&f, "clone_flags");
    let f = fields(tracefs, "sched/sched_process_exit");
    l.exit_group_dead = get(&f, "group_dead");
    let f = fields(tracefs, "kmem/kmalloc");
    l.kmalloc_call_site = get(&f, "call_site");
    l.kmalloc_ptr = get(&f, "ptr");
    l.kmalloc_bytes_req = get(&f, "bytes_req");
    l.kmalloc_bytes_alloc = get(&f, "bytes_alloc");
    let f = fields(tracefs, "kmem/kfree");
    l.kfree_call_site = get(&f, "call_site");
    l.kfree_ptr = get(&f, "ptr");
    let f = fields(tracefs, "kmem/kmem_cache_alloc");
    l.cache_alloc_call_site = get(&f, "call_site");
    l.cache_alloc_ptr = get(&f, "ptr");
    l.cache_alloc_bytes_req = get(&f, "bytes_req");
    l.cache_alloc_bytes_alloc = get(&f, "bytes_alloc");
    l.cache_alloc_name = get(&f, "name");
    let f = fields(tracefs, "kmem/kmem_cache_free");
    l.cache_free_call_site = get(&f, "call_site");
    l.cache_free_ptr = get(&f, "ptr");
    l.cache_free_name = get(&f, "name");
    let f = fields(tracefs, "kmem/mm_page_alloc");
    l.page_alloc_pfn = get(&f, "pfn");
    l.page_alloc_order = get(&f, "order");
    let f = fields(tracefs, "kmem/mm_page_free");
    l.page_free_pfn = get(&f, "pfn");
    l.page_free_order = get(&f, "order");
    l
}

/// The fields of a format file, in declaration order (to check raw tracepoint
/// argument positions against the record layout).
pub fn field_order(tracefs: &Path, event: &str) -> Vec<String> {
    let mut f: Vec<(String, u32)> = fields(tracefs, event).into_iter().collect();
    f.sort_by_key(|(_, o)| *o);
    f.into_iter()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with("common_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KMEM_CACHE_ALLOC: &str = "name: kmem_cache_alloc
ID: 659
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long call_site;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * ptr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] name;\toffset:24;\tsize:4;\tsigned:0;
\tfield:size_t bytes_req;\toffset:32;\tsize:8;\tsigned:0;
\tfield:char comm[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:bool accounted;\toffset:60;\tsize:1;\tsigned:0;
";

    #[test]
    fn parses_field_offsets() {
        let f = parse_format(KMEM_CACHE_ALLOC);
        assert_eq!(f["call_site"], 8);
        assert_eq!(f["ptr"], 16);
        assert_eq!(f["name"], 24);
        assert_eq!(f["bytes_req"], 32);
        assert_eq!(f["comm"], 40);
        assert_eq!(f["accounted"], 60);
        assert_eq!(f["common_pid"], 4);
    }
}
