//! Run history: one record per run of a schema, kept apart from the schema file.
//!
//! Each schema's history is a JSON Lines file, `<state dir>/<schema id>/history.jsonl`,
//! oldest first. A schema's runs never overlap (its metadata stores are locked for the
//! run), so one writer appends at a time.
//!
//! Invariants:
//! - Every run leaves a record, whatever its end: `begin` writes a marker file once the
//!   run holds its schema's locks and before it changes anything; `finish` appends the
//!   record and removes the marker. A marker found by the next `begin` is a run the
//!   process did not finish (killed, power cut): it becomes a record with status
//!   `interrupted`. A listing shows a marker as `running` and changes nothing, since
//!   the run may be going on in another process.
//! - History is bounded: once a file holds more than `retention` records it is
//!   rewritten (temp file, fsync, rename) with the newest `retention`.
//! - A damaged line is an error naming the file and line, never skipped silently.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SchemaError;

/// Records kept per schema when nobody says otherwise.
pub const DEFAULT_RETENTION: usize = 100;

const HISTORY_FILE: &str = "history.jsonl";
const MARKER_FILE: &str = "running.json";

/// One run, as the history keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub schema: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started: String,
    pub ended: String,
    pub duration_ms: u64,
    /// `success`, `partial`, `failed`, `cancelled` or `interrupted`.
    pub status: String,
    pub message: String,
    pub rows_read: u64,
    pub sent: u64,
    pub applied: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    pub skipped: u64,
    pub failed: u64,
    pub conflicts: u64,
    pub watermark_before: Option<String>,
    pub watermark_after: Option<String>,
    /// The failed rows: key, field and reason, one line each.
    pub errors: Vec<String>,
}

/// The marker of a run in progress.
#[derive(Serialize, Deserialize)]
struct Marker {
    schema: String,
    started: String,
    started_ms: u64,
}

/// The history of the schemas under one state folder.
#[derive(Clone, Debug)]
pub struct History {
    root: PathBuf,
    retention: usize,
}

impl History {
    pub fn new(state_dir: &Path, retention: usize) -> History {
        History {
            root: state_dir.to_path_buf(),
            retention: retention.max(1),
        }
    }

    fn folder(&self, schema: &str) -> PathBuf {
        self.root.join(schema)
    }

    /// Marks a run of `schema` as started (after recording any run a crash cut short).
    pub fn begin(&self, schema: &str, started: &str, started_ms: u64) -> Result<(), SchemaError> {
        self.recover(schema)?;
        let folder = self.folder(schema);
        fs::create_dir_all(&folder).map_err(|e| io(&folder, e))?;
        let marker = Marker {
            schema: schema.to_string(),
            started: started.to_string(),
            started_ms,
        };
        let text = serde_json::to_string(&marker).map_err(|e| io(&folder, e))?;
        write_atomically(&folder.join(MARKER_FILE), text.as_bytes())
    }

    /// Appends the record of the run `begin` started and clears its marker.
    pub fn finish(&self, record: &RunRecord) -> Result<(), SchemaError> {
        self.append(record)?;
        let marker = self.folder(&record.schema).join(MARKER_FILE);
        match fs::remove_file(&marker) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&marker, e)),
        }
    }

    /// Turns a marker left by a run that never finished into an `interrupted` record.
    pub fn recover(&self, schema: &str) -> Result<(), SchemaError> {
        let path = self.folder(schema).join(MARKER_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path, e)),
        };
        let marker: Marker = serde_json::from_str(&text).map_err(|e| SchemaError::Io {
            file: path.display().to_string(),
            reason: format!("not a run marker: {e}"),
        })?;
        self.append(&RunRecord {
            schema: marker.schema,
            started: marker.started.clone(),
            ended: marker.started,
            duration_ms: 0,
            status: "interrupted".into(),
            message: "the process stopped during the run; the next run finished its work".into(),
            ..RunRecord::empty()
        })?;
        fs::remove_file(&path).map_err(|e| io(&path, e))
    }

    fn append(&self, record: &RunRecord) -> Result<(), SchemaError> {
        let folder = self.folder(&record.schema);
        fs::create_dir_all(&folder).map_err(|e| io(&folder, e))?;
        let path = folder.join(HISTORY_FILE);
        let mut line = serde_json::to_string(record).map_err(|e| io(&path, e))?;
        line.push('\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        file.write_all(line.as_bytes()).map_err(|e| io(&path, e))?;
        file.sync_all().map_err(|e| io(&path, e))?;
        drop(file);
        let records = read_file(&path)?;
        if records.len() > self.retention {
            let keep = &records[records.len() - self.retention..];
            let mut text = String::new();
            for r in keep {
                text.push_str(&serde_json::to_string(r).map_err(|e| io(&path, e))?);
                text.push('\n');
            }
            write_atomically(&path, text.as_bytes())?;
        }
        Ok(())
    }

    /// The records of `schema`, oldest first, then the run in progress (or cut short)
    /// if there is one, with status `running`.
    pub fn list(&self, schema: &str) -> Result<Vec<RunRecord>, SchemaError> {
        let path = self.folder(schema).join(HISTORY_FILE);
        let mut records = if path.exists() {
            read_file(&path)?
        } else {
            Vec::new()
        };
        let marker_path = self.folder(schema).join(MARKER_FILE);
        if let Ok(text) = fs::read_to_string(&marker_path) {
            if let Ok(marker) = serde_json::from_str::<Marker>(&text) {
                records.push(RunRecord {
                    schema: marker.schema,
                    started: marker.started,
                    status: "running".into(),
                    message: "running, or stopped without finishing (the next run of \
                              this schema records it as interrupted)"
                        .into(),
                    ..RunRecord::empty()
                });
            }
        }
        Ok(records)
    }

    /// The schemas with a history under this folder, sorted.
    pub fn schemas(&self) -> Result<Vec<String>, SchemaError> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&self.root, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io(&self.root, e))?;
            let folder = entry.path();
            if folder.join(HISTORY_FILE).exists() || folder.join(MARKER_FILE).exists() {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }
}

impl RunRecord {
    fn empty() -> RunRecord {
        RunRecord {
            schema: String::new(),
            started: String::new(),
            ended: String::new(),
            duration_ms: 0,
            status: String::new(),
            message: String::new(),
            rows_read: 0,
            sent: 0,
            applied: 0,
            inserted: 0,
            updated: 0,
            deleted: 0,
            skipped: 0,
            failed: 0,
            conflicts: 0,
            watermark_before: None,
            watermark_after: None,
            errors: Vec::new(),
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<RunRecord>, SchemaError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|e| SchemaError::Syntax {
                file: path.display().to_string(),
                line: i + 1,
                column: e.column(),
                message: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SchemaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    file.write_all(bytes).map_err(|e| io(&tmp, e))?;
    file.sync_all().map_err(|e| io(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn io(path: &Path, e: impl std::fmt::Display) -> SchemaError {
    SchemaError::Io {
        file: path.display().to_string(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(schema: &str, n: u64) -> RunRecord {
        RunRecord {
            schema: schema.into(),
            status: "success".into(),
            inserted: n,
            ..RunRecord::empty()
        }
    }

    #[test]
    fn history_is_bounded_and_a_marker_becomes_an_interrupted_run(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let history = History::new(dir.path(), 3);
        for n in 0..5 {
            history.begin("s", "2026-01-01T00:00:00Z", 0)?;
            history.finish(&record("s", n))?;
        }
        let kept: Vec<u64> = history.list("s")?.iter().map(|r| r.inserted).collect();
        assert_eq!(kept, [2, 3, 4]);
        // A run that never finished: listed as running, recorded as interrupted by
        // the next run's start.
        history.begin("s", "2026-01-02T00:00:00Z", 0)?;
        let listed = history.list("s")?;
        assert_eq!(listed.last().map(|r| r.status.as_str()), Some("running"));
        assert_eq!(listed.len(), 4);
        history.begin("s", "2026-01-03T00:00:00Z", 0)?;
        history.finish(&record("s", 9))?;
        let statuses: Vec<String> = history.list("s")?.into_iter().map(|r| r.status).collect();
        assert_eq!(statuses, ["success", "interrupted", "success"]);
        Ok(())
    }

    #[test]
    fn a_damaged_line_names_file_and_line() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let history = History::new(dir.path(), 3);
        history.finish(&record("s", 1))?;
        let path = dir.path().join("s").join(HISTORY_FILE);
        let mut text = fs::read_to_string(&path)?;
        text.push_str("{not json\n");
        fs::write(&path, text)?;
        match history.list("s") {
            Err(SchemaError::Syntax { file, line, .. }) => {
                assert!(file.ends_with(HISTORY_FILE));
                assert_eq!(line, 2);
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        Ok(())
    }
}
