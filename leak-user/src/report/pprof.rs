//! Leaked objects and bytes by stack in pprof's protobuf format (gzipped), for
//! `go tool pprof`, Pyroscope and other pprof viewers. The message types are the
//! subset of profile.proto we fill, declared for prost.

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
    #[prost(int64, tag = "5")]
    pub filename: i64,
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
    let mut strings = Strings::new();
    let mut p = Profile {
        sample_type: vec![
            ValueType {
                r#type: strings.get("leaked_objects"),
                unit: strings.get("count"),
            },
            ValueType {
                r#type: strings.get("leaked_space"),
                unit: strings.get("bytes"),
            },
        ],
        time_nanos,
        default_sample_type: strings.get("leaked_space"),
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
            let module = f.module.clone().unwrap_or_default();
            let next_mapping = mappings.len() as u64 + 1;
            let mapping_id = *mappings.entry(module.clone()).or_insert_with(|| {
                p.mapping.push(Mapping {
                    id: next_mapping,
                    filename: strings.get(&module),
                });
                next_mapping
            });
            let line = f.line.map_or(0, i64::from);
            let next_location = locations.len() as u64 + 1;
            let location_id = *locations
                .entry((function_id, f.address, line))
                .or_insert_with(|| {
                    p.location.push(Location {
                        id: next_location,
                        mapping_id,
                        address: f.address,
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
}
