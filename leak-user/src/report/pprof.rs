//! Leaked objects and bytes by stack in pprof's protobuf format (gzipped), for
//! `go tool pprof`, Pyroscope and other pprof viewers. The message types are the
//! subset of profile.proto we fill, declared for prost.
//!
//! Each module is one mapping, with its build ID, at a base of its own
//! (`id << 40`) with file offset 0: a location's address is that base plus the
//! file offset of its call, so `address - memory_start + file_offset` is the file
//! offset a profile store symbolizes by build ID, whichever process (and load
//! address) the stack came from. Functions, files and lines are filled in too.

use std::{collections::HashMap, io::Write as _};

use flate2::{Compression, write::GzEncoder};
use prost::Message;

use super::{Leak, group};

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
}

/// Where a module's mapping starts (`id << MAPPING_SHIFT`) and how far it spans.
const MAPPING_SHIFT: u32 = 40;

/// What the two values of each sample are called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleNames {
    /// `leaked_objects` and `leaked_space` (`--pprof`, the end of a run).
    Leaked,
    /// `inuse_objects` and `inuse_space`: what profile stores take for a heap
    /// profile (`--pprof-dir`, leaked blocks outstanding at each interval).
    InUse,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self::default();
        s.get(""); // pprof requires string 0 to be empty
        s
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// Builds the profile: one sample per allocation stack, values (objects, bytes).
pub fn profile(leaks: &[Leak], time_nanos: i64) -> Profile {
    profile_with(leaks, time_nanos, SampleNames::Leaked, &HashMap::new())
}

/// [`profile`] with the sample names given and the modules' build IDs (by the
/// module name frames carry).
pub fn profile_with(
    leaks: &[Leak],
    time_nanos: i64,
    names: SampleNames,
    build_ids: &HashMap<String, String>,
) -> Profile {
    let (objects, space) = match names {
        SampleNames::Leaked => ("leaked_objects", "leaked_space"),
        SampleNames::InUse => ("inuse_objects", "inuse_space"),
    };
    let mut strings = Strings::new();
    let mut p = Profile {
        sample_type: vec![
            ValueType {
                r#type: strings.get(objects),
                unit: strings.get("count"),
            },
            ValueType {
                r#type: strings.get(space),
                unit: strings.get("bytes"),
            },
        ],
        time_nanos,
        default_sample_type: strings.get(space),
        ..Profile::default()
    };
    let mut functions: HashMap<(String, String), u64> = HashMap::new();
    let mut mappings: HashMap<String, u64> = HashMap::new();
    let mut locations: HashMap<(u64, u64, i64), u64> = HashMap::new();
    for g in group(leaks) {
        let mut ids = Vec::new();
        for f in g.stack.iter() {
            let name = f.label();
            let file = f.file.clone().unwrap_or_default();
            let next_function = functions.len() as u64 + 1;
            let function_id = *functions
                .entry((name.clone(), file.clone()))
                .or_insert_with(|| {
                    p.function.push(Function {
                        id: next_function,
                        name: strings.get(&name),
                        system_name: strings.get(&name),
                        filename: strings.get(&file),
                    });
                    next_function
                });
            // A frame in a known module sits at its mapping's base plus its file
            // offset; one outside any (no module) keeps its runtime address.
            let (mapping_id, address) = match (&f.module, f.offset) {
                (Some(module), Some(offset)) => {
                    let next_mapping = mappings.len() as u64 + 1;
                    let id = *mappings.entry(module.clone()).or_insert_with(|| {
                        let build_id = build_ids.get(module).map_or("", String::as_str);
                        p.mapping.push(Mapping {
                            id: next_mapping,
                            memory_start: next_mapping << MAPPING_SHIFT,
                            memory_limit: (next_mapping + 1) << MAPPING_SHIFT,
                            file_offset: 0,
                            filename: strings.get(module),
                            build_id: strings.get(build_id),
                            has_functions: true,
                            has_filenames: true,
                            has_line_numbers: true,
                        });
                        next_mapping
                    });
                    (id, (id << MAPPING_SHIFT) + offset)
                }
                _ => (0, f.address),
            };
            let line = f.line.map_or(0, i64::from);
            let next_location = locations.len() as u64 + 1;
            let location_id = *locations
                .entry((function_id, address, line))
                .or_insert_with(|| {
                    p.location.push(Location {
                        id: next_location,
                        mapping_id,
                        address,
                        line: vec![Line { function_id, line }],
                    });
                    next_location
                });
            ids.push(location_id);
        }
        p.sample.push(Sample {
            location_id: ids,
            value: vec![g.objects as i64, g.bytes as i64],
        });
    }
    p.string_table = strings.table;
    p
}

/// The gzipped protobuf bytes of a profile.
pub fn encode(profile: &Profile) -> std::io::Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&profile.encode_to_vec())?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::report::{tests::sample, totals};

    #[test]
    fn decodes_back_with_the_leak_totals() {
        let leaks = sample();
        let bytes = encode(&profile(&leaks, 1)).unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut raw)
            .unwrap();
        let p = Profile::decode(&raw[..]).unwrap();
        let objects: i64 = p.sample.iter().map(|s| s.value[0]).sum();
        let space: i64 = p.sample.iter().map(|s| s.value[1]).sum();
        let t = totals(&leaks);
        assert_eq!((objects as u64, space as u64), (t.objects, t.bytes));
        assert_eq!(p.string_table[0], "");
        let leaf = p.sample[0].location_id[0];
        let location = p.location.iter().find(|l| l.id == leaf).unwrap();
        let function = p
            .function
            .iter()
            .find(|f| f.id == location.line[0].function_id)
            .unwrap();
        assert_eq!(p.string_table[function.name as usize], "make_node");
    }

    #[test]
    fn modules_are_mappings_with_build_ids_at_their_file_offsets() {
        let mut leaks = sample();
        for leak in &mut leaks {
            let mut stack = (*leak.stack).clone();
            for (i, f) in stack.iter_mut().enumerate() {
                f.module = Some("/usr/bin/app".into());
                f.offset = Some(0x1000 + i as u64);
            }
            leak.stack = std::sync::Arc::new(stack);
        }
        let ids = HashMap::from([("/usr/bin/app".to_owned(), "abcd01".to_owned())]);
        let p = profile_with(&leaks, 1, SampleNames::InUse, &ids);
        assert_eq!(p.mapping.len(), 1);
        let m = &p.mapping[0];
        assert_eq!(p.string_table[m.build_id as usize], "abcd01");
        assert_eq!(p.string_table[m.filename as usize], "/usr/bin/app");
        assert!(m.has_functions && m.has_line_numbers);
        for l in &p.location {
            assert_eq!(l.mapping_id, m.id);
            let file_offset = l.address - m.memory_start + m.file_offset;
            assert!((0x1000..0x1002).contains(&file_offset), "{file_offset:#x}");
            assert!(l.address < m.memory_limit);
        }
        let names: Vec<&str> = p
            .sample_type
            .iter()
            .map(|t| p.string_table[t.r#type as usize].as_str())
            .collect();
        assert_eq!(names, ["inuse_objects", "inuse_space"]);
    }
}
