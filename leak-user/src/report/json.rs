//! The NDJSON stream: one JSON object per line, each with a `"type"`; the first
//! record carries the schema version. The records themselves are in
//! [`super::records`]. Every record is written with one write of a whole line, so a
//! consumer never sees half a line, even when we are interrupted. The schema is
//! documented in README.md and checked by a test.

use std::io::{self, Write};

use serde::{Serialize, Serializer};

use crate::config::OutputConfig;

/// Addresses as `"0x…"` strings (JSON numbers lose precision above 2^53).
pub fn hex<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

pub fn hex_opt<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => hex(v, s),
        None => s.serialize_none(),
    }
}

/// Writes records as lines. A closed pipe (`| head`) ends the stream quietly.
pub struct NdjsonWriter {
    out: Box<dyn Write + Send>,
    broken: bool,
}

impl NdjsonWriter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, broken: false }
    }

    /// True once the reader went away.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    pub fn write<T: Serialize + ?Sized>(&mut self, record: &T) -> io::Result<()> {
        if self.broken {
            return Ok(());
        }
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        let result = self.out.write_all(&line).and_then(|()| self.out.flush());
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.broken = true;
                Ok(())
            }
            other => other,
        }
    }
}

/// Where a report goes: the NDJSON stream or text, on stdout or `--output FILE`.
pub enum Output {
    Json(NdjsonWriter),
    Text(Box<dyn Write + Send>),
}

impl Output {
    pub fn open(config: &OutputConfig) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match &config.path {
            Some(path) => Box::new(std::fs::File::create(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
            })?),
            None => Box::new(io::stdout()),
        };
        Ok(if config.json {
            Self::Json(NdjsonWriter::new(out))
        } else {
            Self::Text(out)
        })
    }

    pub fn is_json(&self) -> bool {
        matches!(self, Self::Json(_))
    }

    /// True once the NDJSON reader went away (`| head`).
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Json(w) if w.is_broken())
    }

    /// Writes a record (NDJSON only).
    pub fn json<T: Serialize>(&mut self, record: &T) {
        if let Self::Json(w) = self
            && let Err(err) = w.write(record)
        {
            log::error!("cannot write the JSON stream: {err}");
        }
    }

    /// Writes report text (text only).
    pub fn text(&mut self, s: &str) {
        if let Self::Text(w) = self {
            let _ = w.write_all(s.as_bytes());
            let _ = w.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_line_per_record_with_hex_addresses() {
        #[derive(Serialize)]
        struct R {
            r#type: &'static str,
            #[serde(serialize_with = "hex")]
            address: u64,
        }
        let buf = Shared::default();
        let mut w = NdjsonWriter::new(Box::new(buf.clone()));
        w.write(&R {
            r#type: "leak",
            address: 0x55d0_c0a4_b2a0,
        })
        .unwrap();
        w.write(&R {
            r#type: "end",
            address: 1,
        })
        .unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "{\"type\":\"leak\",\"address\":\"0x55d0c0a4b2a0\"}\n{\"type\":\"end\",\"address\":\"0x1\"}\n"
        );
    }
}
