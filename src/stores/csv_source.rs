//! A folder of CSV files as a datasource: one entity per file `<entity>.csv`, whose header
//! row names the fields.
//!
//! Rules (the JSON Lines datasource shares them, and the table model below):
//! - Every field is `FieldType::Text` and nullable. An empty cell reads as `Value::Null`;
//!   `Null` and the empty text write an empty cell; any other value writes its text
//!   (`Value::to_text`), so `Int(36)` reads back as `Text("36")`.
//! - `upsert` sets the fields a row carries and leaves the others as they are (a new row
//!   gets `Null` in them); pass `Value::Null` to clear a field. Rows keep their order in
//!   the file and new rows are appended, so a rewrite changes only the lines it must.
//! - A row with a field that is not in the entity, or with a key field missing or null,
//!   is `Refused`; a `key` naming a field that is not in the entity fails the whole call
//!   with `NoSuchField`. A file without a header (empty) takes its fields from the first
//!   `upsert`, sorted by name: creating an entity is creating an empty file.
//! - A write rewrites the file atomically: `<entity>.csv.tmp` is written and fsynced, then
//!   renamed over the file and the folder is fsynced. A stray `.tmp` left by a crash is
//!   never read and the next write replaces it. A call that changes nothing writes nothing.
//! - A malformed file (a ragged row, bad UTF-8, a duplicate or empty header) is
//!   `BadRow` with the 1-based line number where the record starts.
//! - There is no locking: one writer at a time.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::datasource::{
    Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, Row, RowOutcome, Value,
};

/// A folder of CSV files; see the module documentation for the rules.
#[derive(Debug)]
pub struct CsvSource {
    name: String,
    dir: PathBuf,
}

impl CsvSource {
    /// Opens the folder `dir`, which must exist; files are read at each call.
    pub fn open(name: &str, dir: &Path) -> Result<Self, DatasourceError> {
        check_dir(name, dir)?;
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        })
    }

    fn load(&self, entity: &str) -> Result<(PathBuf, FileTable), DatasourceError> {
        let path = entity_path(&self.name, &self.dir, entity, "csv")?;
        let bytes = read_entity(&self.name, entity, &path)?;
        let table = parse_csv(&self.name, entity, &bytes)?;
        Ok((path, table))
    }

    fn save(&self, path: &Path, table: &FileTable) -> Result<(), DatasourceError> {
        let io = |e: &dyn std::fmt::Display| DatasourceError::Io {
            datasource: self.name.clone(),
            reason: format!("{}: {e}", path.display()),
        };
        let mut writer = csv::Writer::from_writer(Vec::new());
        if !table.fields.is_empty() {
            writer.write_record(&table.fields).map_err(|e| io(&e))?;
        }
        for row in &table.rows {
            let cells = table
                .fields
                .iter()
                .map(|f| row.get(f).map(Value::to_text).unwrap_or_default());
            writer.write_record(cells).map_err(|e| io(&e))?;
        }
        let bytes = writer.into_inner().map_err(|e| io(&e))?;
        write_atomically(&self.name, path, &bytes)
    }
}

/// What a value becomes in a CSV cell: text, with the empty text and `Null` alike, so
/// that comparing by key and checking for changes see what a later read will see.
fn csv_cell(value: &Value) -> Result<Value, String> {
    Ok(match value.to_text() {
        text if text.is_empty() => Value::Null,
        text => Value::Text(text),
    })
}

fn parse_csv(datasource: &str, entity: &str, bytes: &[u8]) -> Result<FileTable, DatasourceError> {
    let bad = |line: u64, reason: String| DatasourceError::BadRow {
        datasource: datasource.to_string(),
        entity: entity.to_string(),
        line,
        reason,
    };
    // Lengths and UTF-8 are checked here rather than by the reader, so that every
    // malformed record is reported the same way, with its line.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut table = FileTable::default();
    for (index, record) in reader.byte_records().enumerate() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, csv::Position::line);
            bad(line, e.to_string())
        })?;
        let line = record.position().map_or(0, csv::Position::line);
        let mut cells = Vec::with_capacity(record.len());
        for (column, cell) in record.iter().enumerate() {
            let text = std::str::from_utf8(cell)
                .map_err(|_| bad(line, format!("column {} is not valid UTF-8", column + 1)))?;
            cells.push(text.to_string());
        }
        if index == 0 {
            let mut seen = HashSet::new();
            for field in &cells {
                if field.is_empty() {
                    return Err(bad(line, "the header has an empty field name".into()));
                }
                if !seen.insert(field.as_str()) {
                    return Err(bad(line, format!("the header names {field:?} twice")));
                }
            }
            table.fields = cells;
            continue;
        }
        if cells.len() != table.fields.len() {
            return Err(bad(
                line,
                format!(
                    "the row has {} fields, the header {}",
                    cells.len(),
                    table.fields.len()
                ),
            ));
        }
        let row = table
            .fields
            .iter()
            .zip(cells)
            .map(|(field, cell)| {
                let value = if cell.is_empty() {
                    Value::Null
                } else {
                    Value::Text(cell)
                };
                (field.clone(), value)
            })
            .collect();
        table.rows.push(row);
    }
    Ok(table)
}

impl Datasource for CsvSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn entities(&mut self) -> Result<Vec<String>, DatasourceError> {
        list_entities(&self.name, &self.dir, "csv")
    }

    fn describe(&mut self, entity: &str) -> Result<EntityInfo, DatasourceError> {
        let (_, table) = self.load(entity)?;
        let fields = table
            .fields
            .iter()
            .map(|name| FieldInfo {
                name: name.clone(),
                field_type: FieldType::Text,
                nullable: true,
            })
            .collect();
        Ok(EntityInfo {
            name: entity.to_string(),
            fields,
        })
    }

    fn scan(
        &mut self,
        entity: &str,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let (_, table) = self.load(entity)?;
        table.rows.into_iter().try_for_each(visit)
    }

    fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        let (path, mut table) = self.load(entity)?;
        table.check_key(&self.name, entity, key)?;
        let (outcomes, changed) = table.upsert(entity, key, rows, &csv_cell);
        if changed {
            self.save(&path, &table)?;
        }
        Ok(outcomes)
    }

    fn delete(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        let (path, mut table) = self.load(entity)?;
        table.check_key(&self.name, entity, key)?;
        let (outcomes, changed) = table.delete(key, keys, &csv_cell);
        if changed {
            self.save(&path, &table)?;
        }
        Ok(outcomes)
    }
}

// ---------------------------------------------------------------------------------------
// Shared by the file datasources (CSV and JSON Lines): naming, atomic rewrite, and the
// in-memory table that upserts and deletes by key.
// ---------------------------------------------------------------------------------------

pub(crate) fn check_dir(datasource: &str, dir: &Path) -> Result<(), DatasourceError> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(DatasourceError::Unavailable {
            datasource: datasource.to_string(),
            reason: format!("{} is not a folder", dir.display()),
        })
    }
}

/// An entity name is a plain file stem: never a path, never hidden, so a configured name
/// cannot reach outside the folder.
fn is_entity_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.ends_with(".tmp")
}

pub(crate) fn list_entities(
    datasource: &str,
    dir: &Path,
    extension: &str,
) -> Result<Vec<String>, DatasourceError> {
    let unavailable = |e: std::io::Error| DatasourceError::Unavailable {
        datasource: datasource.to_string(),
        reason: format!("{}: {e}", dir.display()),
    };
    let suffix = format!(".{extension}");
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(unavailable)? {
        let entry = entry.map_err(unavailable)?;
        if !entry.file_type().map_err(unavailable)?.is_file() {
            continue;
        }
        // Names that are not UTF-8 cannot be entity names; `<entity>.csv.tmp` does not
        // end in `.csv`, so a leftover temp file is never an entity.
        let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(stem) = file_name.strip_suffix(&suffix) {
            if is_entity_name(stem) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

pub(crate) fn entity_path(
    datasource: &str,
    dir: &Path,
    entity: &str,
    extension: &str,
) -> Result<PathBuf, DatasourceError> {
    let path = dir.join(format!("{entity}.{extension}"));
    if is_entity_name(entity) && path.is_file() {
        Ok(path)
    } else {
        Err(no_such_entity(datasource, entity))
    }
}

fn no_such_entity(datasource: &str, entity: &str) -> DatasourceError {
    DatasourceError::NoSuchEntity {
        datasource: datasource.to_string(),
        entity: entity.to_string(),
    }
}

pub(crate) fn read_entity(
    datasource: &str,
    entity: &str,
    path: &Path,
) -> Result<Vec<u8>, DatasourceError> {
    fs::read(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => no_such_entity(datasource, entity),
        _ => DatasourceError::Io {
            datasource: datasource.to_string(),
            reason: format!("{}: {e}", path.display()),
        },
    })
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file:
/// write `<path>.tmp`, fsync it, rename it over `path`, fsync the folder.
pub(crate) fn write_atomically(
    datasource: &str,
    path: &Path,
    bytes: &[u8],
) -> Result<(), DatasourceError> {
    let io = |e: std::io::Error| DatasourceError::Io {
        datasource: datasource.to_string(),
        reason: format!("{}: {e}", path.display()),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)?;
    // The rename is durable only once the folder is; opening a folder works on Unix only.
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// An entity read whole into memory: its fields in file order, and its rows in file
/// order, each with every field.
#[derive(Debug, Default)]
pub(crate) struct FileTable {
    pub(crate) fields: Vec<String>,
    pub(crate) rows: Vec<Row>,
}

/// How a file store turns a value into what it will read back, or refuses it.
pub(crate) type Normalise = dyn Fn(&Value) -> Result<Value, String>;

/// A key's values as a map key: `Value` holds floats, so it is not `Hash`; its debug form
/// tells `Int(1)`, `Float(1.0)` and `Text("1")` apart, as equality does.
fn key_repr(values: &[&Value]) -> Vec<String> {
    values.iter().map(|v| format!("{v:?}")).collect()
}

impl FileTable {
    /// The whole call fails when `key` names a field the entity does not have (an entity
    /// without fields yet takes them from its first upsert).
    pub(crate) fn check_key(
        &self,
        datasource: &str,
        entity: &str,
        key: &[String],
    ) -> Result<(), DatasourceError> {
        if self.fields.is_empty() {
            return Ok(());
        }
        match key.iter().find(|k| !self.fields.contains(k)) {
            Some(field) => Err(DatasourceError::NoSuchField {
                datasource: datasource.to_string(),
                entity: entity.to_string(),
                field: field.clone(),
            }),
            None => Ok(()),
        }
    }

    fn index(&self, key: &[String]) -> HashMap<Vec<String>, Vec<usize>> {
        let mut index: HashMap<Vec<String>, Vec<usize>> = HashMap::new();
        for (position, row) in self.rows.iter().enumerate() {
            let values: Vec<&Value> = key
                .iter()
                .map(|k| row.get(k).unwrap_or(&Value::Null))
                .collect();
            index.entry(key_repr(&values)).or_default().push(position);
        }
        index
    }

    /// The row normalised, with its key, or why it is refused.
    fn accept(
        &self,
        entity: &str,
        key: &[String],
        row: &Row,
        normalise: &Normalise,
        check_fields: bool,
    ) -> Result<(Row, Vec<String>), String> {
        if key.is_empty() {
            return Err("no key fields were given".into());
        }
        let mut normalised = Row::new();
        for (field, value) in row {
            if check_fields && !self.fields.contains(field) {
                return Err(format!("field {field:?} is not in entity {entity:?}"));
            }
            let value = normalise(value).map_err(|reason| format!("field {field:?}: {reason}"))?;
            normalised.insert(field.clone(), value);
        }
        let mut values = Vec::with_capacity(key.len());
        for field in key {
            match normalised.get(field) {
                Some(value) if !value.is_null() => values.push(value),
                _ => return Err(format!("key field {field:?} is missing or null")),
            }
        }
        let repr = key_repr(&values);
        Ok((normalised, repr))
    }

    /// Upserts `rows` by `key`; returns the outcomes and whether any row changed.
    pub(crate) fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
        normalise: &Normalise,
    ) -> (Vec<RowOutcome>, bool) {
        if self.fields.is_empty() && !rows.is_empty() {
            let union: BTreeSet<&String> = rows.iter().flat_map(|r| r.keys()).collect();
            self.fields = union.into_iter().cloned().collect();
        }
        let mut index = self.index(key);
        let mut changed = false;
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in rows {
            let (row, repr) = match self.accept(entity, key, row, normalise, true) {
                Ok(accepted) => accepted,
                Err(reason) => {
                    outcomes.push(RowOutcome::Refused { reason });
                    continue;
                }
            };
            if let Some(positions) = index.get(&repr) {
                for &position in positions {
                    for (field, value) in &row {
                        let slot = self.rows[position]
                            .entry(field.clone())
                            .or_insert(Value::Null);
                        if slot != value {
                            *slot = value.clone();
                            changed = true;
                        }
                    }
                }
            } else {
                let mut new_row: Row = self
                    .fields
                    .iter()
                    .map(|f| (f.clone(), Value::Null))
                    .collect();
                new_row.extend(row);
                index.insert(repr, vec![self.rows.len()]);
                self.rows.push(new_row);
                changed = true;
            }
            outcomes.push(RowOutcome::Written);
        }
        (outcomes, changed)
    }

    /// Deletes the rows with these keys (fields other than the key's are ignored);
    /// returns the outcomes and whether any row went.
    pub(crate) fn delete(
        &mut self,
        key: &[String],
        keys: &[Row],
        normalise: &Normalise,
    ) -> (Vec<RowOutcome>, bool) {
        let mut doomed = HashSet::new();
        let mut outcomes = Vec::with_capacity(keys.len());
        for row in keys {
            let key_only: Row = row
                .iter()
                .filter(|(field, _)| key.contains(field))
                .map(|(f, v)| (f.clone(), v.clone()))
                .collect();
            match self.accept("", key, &key_only, normalise, false) {
                Ok((_, repr)) => {
                    doomed.insert(repr);
                    outcomes.push(RowOutcome::Written);
                }
                Err(reason) => outcomes.push(RowOutcome::Refused { reason }),
            }
        }
        let before = self.rows.len();
        self.rows.retain(|row| {
            let values: Vec<&Value> = key
                .iter()
                .map(|k| row.get(k).unwrap_or(&Value::Null))
                .collect();
            !doomed.contains(&key_repr(&values))
        });
        (outcomes, self.rows.len() != before)
    }
}
