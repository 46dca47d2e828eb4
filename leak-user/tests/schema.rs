//! The NDJSON schema as README.md documents it, and a checker for records.

use std::{collections::BTreeMap, path::Path};

use serde_json::Value;

/// Record name -> (field -> documented type).
pub type Schema = BTreeMap<String, BTreeMap<String, String>>;

/// Field tables of README.md's "NDJSON records" section: name -> (field -> type).
pub fn documented_schema() -> Schema {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let section = readme
        .split("## NDJSON records")
        .nth(1)
        .expect("README.md has an NDJSON records section");
    let section = section.split("\n## ").next().unwrap();
    let mut schema = BTreeMap::new();
    let mut current: Vec<String> = Vec::new();
    for line in section.lines() {
        if let Some(heading) = line.strip_prefix("#### ") {
            current = heading
                .split(['`', ','])
                .map(str::trim)
                .filter(|s| !s.is_empty() && *s != "and")
                .map(str::to_owned)
                .collect();
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 4 && cells[1].starts_with('`') {
            let field = cells[1].trim_matches('`').to_owned();
            for name in &current {
                schema
                    .entry(name.clone())
                    .or_insert_with(BTreeMap::new)
                    .insert(field.clone(), cells[2].to_owned());
            }
        }
    }
    schema
}

fn check_value(schema: &Schema, ty: &str, v: &Value, at: &str) -> Vec<String> {
    let (ty, optional) = match ty.strip_suffix('?') {
        Some(t) => (t, true),
        None => (ty, false),
    };
    if v.is_null() {
        return if optional {
            vec![]
        } else {
            vec![format!("{at}: null for {ty}")]
        };
    }
    if let Some(inner) = ty.strip_prefix("array of ") {
        let Some(items) = v.as_array() else {
            return vec![format!("{at}: not an array")];
        };
        return items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| check_value(schema, inner, item, &format!("{at}[{i}]")))
            .collect();
    }
    let ok = match ty {
        "string" => v.is_string(),
        "hex" => v.as_str().is_some_and(|s| s.starts_with("0x")),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "map of integer" => v.as_object().is_some_and(|m| m.values().all(Value::is_u64)),
        name if schema.contains_key(name) => return check_object(schema, name, v, at),
        other => return vec![format!("{at}: undocumented type {other}")],
    };
    if ok {
        vec![]
    } else {
        vec![format!("{at}: {v} is not {ty}")]
    }
}

pub fn check_object(schema: &Schema, name: &str, v: &Value, at: &str) -> Vec<String> {
    let Some(fields) = schema.get(name) else {
        return vec![format!("{at}: record type {name:?} is not documented")];
    };
    let Some(object) = v.as_object() else {
        return vec![format!("{at}: not an object")];
    };
    let mut errors = Vec::new();
    for (field, value) in object {
        match fields.get(field) {
            Some(ty) => errors.extend(check_value(schema, ty, value, &format!("{at}.{field}"))),
            None => errors.push(format!("{at}.{field}: not documented for {name}")),
        }
    }
    for (field, ty) in fields {
        if !ty.ends_with('?') && !object.contains_key(field) {
            errors.push(format!("{at}: {name} lacks {field}"));
        }
    }
    errors
}

/// Every record checked against its documented type; the errors, one per line.
pub fn check_records(schema: &Schema, records: &[Value]) -> Vec<String> {
    records
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            let t = r["type"].as_str().unwrap_or("?");
            check_object(schema, t, r, &format!("line {} ({t})", i + 1))
        })
        .collect()
}
