//! The NDJSON stream: one JSON object per line, each with a `"type"`; the first
//! record carries the schema version. The records themselves are in
//! [`super::records`]. Every record is written with one write of a whole line, so a
//! consumer never sees half a line, even when we are interrupted. The schema is
//! documented in README.md and checked by a test.

use std::io::{self, Write};

use serde::{Serialize, Serializer};

use super::files::ReportFile;

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

/// Where a report goes: the NDJSON stream or text, on stdout or `--output FILE`.
///
/// Until [`Output::start`] (the run really started) what is written is held in
/// memory and the file keeps its old contents. The first write error is kept,
/// nothing more is written, and [`Output::take_error`] hands it over once at the
/// end: a lost report must fail the run. A closed pipe (`| head`) only ends it.
pub struct Output {
    json: bool,
    dest: Box<dyn Write + Send>,
    file: Option<ReportFile>,
    name: String,
    /// Written before the start.
    held: Option<Vec<u8>>,
    broken: bool,
    error: Option<io::Error>,
}

impl Output {
    /// The report goes to `file` (None: stdout), NDJSON if `json`, else text.
    pub fn new(json: bool, file: Option<ReportFile>) -> Self {
        let name = file
            .as_ref()
            .map_or_else(|| "stdout".to_owned(), |f| f.path().display().to_string());
        Self {
            json,
            dest: Box::new(io::stdout()),
            file,
            name,
            held: Some(Vec::new()),
            broken: false,
            error: None,
        }
    }

    /// Writes to `dest` instead (tests).
    pub fn to_writer(json: bool, dest: Box<dyn Write + Send>) -> Self {
        Self {
            dest,
            ..Self::new(json, None)
        }
    }

    /// The run started: empties the file and writes what was held.
    pub fn start(&mut self) {
        if let Some(f) = &mut self.file
            && let Err(err) = f.start()
        {
            self.fail(err);
        }
        if let Some(held) = self.held.take() {
            self.put(&held);
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// True once the reader went away (`| head`) or a write failed.
    pub fn is_closed(&self) -> bool {
        self.broken || self.error.is_some()
    }

    /// The first write error, as a message naming the destination.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take().map(|e| {
            let what = if self.file.is_some() {
                "choose another --output"
            } else {
                "redirect it elsewhere or use --output FILE"
            };
            io::Error::new(
                e.kind(),
                format!("cannot write the report to {}: {e}; {what}", self.name),
            )
        })
    }

    fn fail(&mut self, err: io::Error) {
        if err.kind() == io::ErrorKind::BrokenPipe {
            self.broken = true;
        } else if self.error.is_none() {
            self.error = Some(err);
        }
    }

    /// Writes whole lines (or holds them until the start).
    fn put(&mut self, bytes: &[u8]) {
        if self.is_closed() {
            return;
        }
        if let Some(held) = &mut self.held {
            held.extend_from_slice(bytes);
            return;
        }
        let dest: &mut dyn Write = match &mut self.file {
            Some(f) => f,
            None => &mut self.dest,
        };
        if let Err(err) = dest.write_all(bytes).and_then(|()| dest.flush()) {
            self.fail(err);
        }
    }

    /// Writes a record (NDJSON only).
    pub fn json<T: Serialize>(&mut self, record: &T) {
        if !self.json {
            return;
        }
        match serde_json::to_vec(record) {
            Ok(mut line) => {
                line.push(b'\n');
                self.put(&line);
            }
            Err(err) => log::error!("cannot encode a record: {err}"),
        }
    }

    /// Writes report text (text only).
    pub fn text(&mut self, s: &str) {
        if !self.json {
            self.put(s.as_bytes());
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

    /// Fails every write with `kind`, counting the attempts.
    #[derive(Clone, Default)]
    struct Failing(Arc<Mutex<u32>>, Option<io::ErrorKind>);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            *self.0.lock().unwrap() += 1;
            Err(io::Error::from(
                self.1.unwrap_or(io::ErrorKind::StorageFull),
            ))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[derive(Serialize)]
    struct R {
        r#type: &'static str,
        #[serde(serialize_with = "hex")]
        address: u64,
    }

    #[test]
    fn one_line_per_record_with_hex_addresses_after_the_start() {
        let buf = Shared::default();
        let mut w = Output::to_writer(true, Box::new(buf.clone()));
        w.json(&R {
            r#type: "leak",
            address: 0x55d0_c0a4_b2a0,
        });
        assert!(buf.0.lock().unwrap().is_empty(), "held until the start");
        w.start();
        w.json(&R {
            r#type: "end",
            address: 1,
        });
        w.text("not in a JSON stream");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "{\"type\":\"leak\",\"address\":\"0x55d0c0a4b2a0\"}\n{\"type\":\"end\",\"address\":\"0x1\"}\n"
        );
    }

    #[test]
    fn the_first_write_error_is_kept_and_writing_stops() {
        let dest = Failing::default();
        let mut w = Output::to_writer(false, Box::new(dest.clone()));
        w.start();
        for _ in 0..5 {
            w.text("line\n");
        }
        assert_eq!(*dest.0.lock().unwrap(), 1, "one attempt, then nothing");
        assert!(w.is_closed());
        let err = w.take_error().expect("the error is kept");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(
            err.to_string()
                .starts_with("cannot write the report to stdout: ")
        );
        assert!(w.take_error().is_none(), "reported once");
    }

    #[test]
    fn a_closed_pipe_ends_quietly() {
        let dest = Failing(Arc::default(), Some(io::ErrorKind::BrokenPipe));
        let mut w = Output::to_writer(true, Box::new(dest));
        w.start();
        w.json(&R {
            r#type: "end",
            address: 1,
        });
        assert!(w.is_closed());
        assert!(w.take_error().is_none());
    }
}
