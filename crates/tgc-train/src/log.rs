//! JSONL metrics log: one JSON object per line, flushed after every line so that a
//! killed run keeps everything it logged.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// Appends JSON objects, one per line, to a file.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|e| Error::io("creating", &path, e))?;
        Ok(Self { file, path })
    }

    /// Opens `path` for appending, creating it if needed (for a resumed run).
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("opening", &path, e))?;
        Ok(Self { file, path })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` (which must serialise to a JSON object) as one line and flushes.
    /// Non-finite floats serialise as `null` (JSON has no NaN).
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let value = serde_json::to_value(record).map_err(|e| Error::Json {
            context: format!("record for {}", self.path.display()),
            source: e,
        })?;
        if !value.is_object() {
            return Err(Error::InvalidArgument(format!(
                "metrics record for {} must be a JSON object, got {value}",
                self.path.display()
            )));
        }
        // One write call per line: a line is never interleaved or half-buffered.
        let mut line = value.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io("writing", &self.path, e))
    }
}

/// Reads a JSONL file back: one value per non-empty line. A malformed line is an error
/// naming the file and line number, except a final line without a newline (a write cut
/// off by a kill), which is skipped.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<serde_json::Value>> {
    let path = path.as_ref();
    let f = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut reader = BufReader::new(f);
    let mut out = Vec::new();
    let mut line = String::new();
    let mut lineno = 0;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let complete = line.ends_with('\n');
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str(text) {
            Ok(v) => out.push(v),
            Err(_) if !complete => break,
            Err(e) => {
                return Err(Error::Json {
                    context: format!("{} line {lineno}", path.display()),
                    source: e,
                })
            }
        }
    }
    Ok(out)
}
