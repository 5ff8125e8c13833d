//! A folder of JSON Lines files as a datasource: one entity per file `<entity>.jsonl`,
//! one JSON object per line.
//!
//! Rules (the rest — upsert by key, refusals, atomic rewrite, row order, stray `.tmp`
//! files — are the CSV datasource's, see `csv_source`):
//! - Values are JSON's: `null`, booleans, integers (`i64`), other numbers (`f64`) and
//!   strings. A nested array or object, or an integer beyond `i64`, makes the file
//!   malformed: `BadRow` naming the line and the field. Blank lines are skipped; line
//!   numbers count them.
//! - An entity's fields are the union of its lines' fields, sorted by name (serde_json
//!   does not keep the order of a line's fields). A line without a field reads it as
//!   `Null`.
//! - `describe` infers a field's type from its non-null values: one type is that type,
//!   integers mixed with floats are `Float`, any other mix (or no value at all) is
//!   `Text`. Every field is nullable, since a JSON Lines file enforces nothing.
//! - A write writes every field of every row, `null` included, so a field does not
//!   vanish from the entity when its last value is cleared. A float that JSON cannot hold
//!   (NaN, infinity) is refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::csv_source::{
    check_dir, entity_path, list_entities, read_entity, write_atomically, FileTable,
};
use super::datasource::{
    Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, Row, RowOutcome, Value,
};

/// A folder of JSON Lines files; see the module documentation for the rules.
#[derive(Debug)]
pub struct JsonlSource {
    name: String,
    dir: PathBuf,
}

impl JsonlSource {
    /// Opens the folder `dir`, which must exist; files are read at each call.
    pub fn open(name: &str, dir: &Path) -> Result<Self, DatasourceError> {
        check_dir(name, dir)?;
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        })
    }

    fn load(&self, entity: &str) -> Result<(PathBuf, FileTable), DatasourceError> {
        let path = entity_path(&self.name, &self.dir, entity, "jsonl")?;
        let bytes = read_entity(&self.name, entity, &path)?;
        let table = parse_jsonl(&self.name, entity, &bytes)?;
        Ok((path, table))
    }

    fn save(&self, path: &Path, table: &FileTable) -> Result<(), DatasourceError> {
        let mut bytes = Vec::new();
        for row in &table.rows {
            let object: serde_json::Map<String, Json> = table
                .fields
                .iter()
                .map(|f| (f.clone(), to_json(row.get(f).unwrap_or(&Value::Null))))
                .collect();
            serde_json::to_writer(&mut bytes, &object).map_err(|e| DatasourceError::Io {
                datasource: self.name.clone(),
                reason: format!("{}: {e}", path.display()),
            })?;
            bytes.push(b'\n');
        }
        write_atomically(&self.name, path, &bytes)
    }
}

fn to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        // Non-finite floats were refused by `json_value` before reaching a table.
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(s) => Json::String(s.clone()),
    }
}

/// What JSON can hold of a value written to a file.
fn json_value(value: &Value) -> Result<Value, String> {
    match value {
        Value::Float(f) if !f.is_finite() => Err(format!("JSON cannot hold the number {f}")),
        other => Ok(other.clone()),
    }
}

fn parse_jsonl(datasource: &str, entity: &str, bytes: &[u8]) -> Result<FileTable, DatasourceError> {
    let bad = |line: usize, reason: String| DatasourceError::BadRow {
        datasource: datasource.to_string(),
        entity: entity.to_string(),
        line: u64::try_from(line).unwrap_or(u64::MAX),
        reason,
    };
    let mut rows = Vec::new();
    let mut fields = BTreeSet::new();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed: Json = serde_json::from_slice(line).map_err(|e| {
            // serde_json's message ends with "at line 1 column N", which would contradict
            // the file's line number.
            let message = e.to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(m, _)| m);
            bad(
                number,
                format!("invalid JSON at column {}: {message}", e.column()),
            )
        })?;
        let Json::Object(object) = parsed else {
            return Err(bad(number, "a line must be a JSON object".into()));
        };
        let mut row = Row::new();
        for (field, json) in object {
            let value = match json {
                Json::Null => Value::Null,
                Json::Bool(b) => Value::Bool(b),
                Json::String(s) => Value::Text(s),
                Json::Number(n) => match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => Value::Int(i),
                    _ if n.is_u64() => {
                        return Err(bad(
                            number,
                            format!("field {field:?}: integer {n} does not fit in i64"),
                        ))
                    }
                    (None, Some(f)) => Value::Float(f),
                    (None, None) => {
                        return Err(bad(number, format!("field {field:?}: number {n}")))
                    }
                },
                Json::Array(_) | Json::Object(_) => {
                    return Err(bad(
                        number,
                        format!("field {field:?}: nested arrays and objects are not supported"),
                    ))
                }
            };
            fields.insert(field.clone());
            row.insert(field, value);
        }
        rows.push(row);
    }
    for row in &mut rows {
        for field in &fields {
            row.entry(field.clone()).or_insert(Value::Null);
        }
    }
    Ok(FileTable {
        fields: fields.into_iter().collect(),
        rows,
    })
}

fn value_type(value: &Value) -> Option<FieldType> {
    match value {
        Value::Null => None,
        Value::Bool(_) => Some(FieldType::Bool),
        Value::Int(_) => Some(FieldType::Int),
        Value::Float(_) => Some(FieldType::Float),
        Value::Text(_) => Some(FieldType::Text),
    }
}

/// The type of a field holding values of both types.
fn widen(a: FieldType, b: FieldType) -> FieldType {
    match (a, b) {
        (a, b) if a == b => a,
        (FieldType::Int, FieldType::Float) | (FieldType::Float, FieldType::Int) => FieldType::Float,
        _ => FieldType::Text,
    }
}

impl Datasource for JsonlSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn entities(&mut self) -> Result<Vec<String>, DatasourceError> {
        list_entities(&self.name, &self.dir, "jsonl")
    }

    fn describe(&mut self, entity: &str) -> Result<EntityInfo, DatasourceError> {
        let (_, table) = self.load(entity)?;
        let fields = table
            .fields
            .iter()
            .map(|name| {
                let field_type = table
                    .rows
                    .iter()
                    .filter_map(|row| row.get(name).and_then(value_type))
                    .reduce(widen)
                    .unwrap_or(FieldType::Text);
                FieldInfo {
                    name: name.clone(),
                    field_type,
                    nullable: true,
                }
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
        let (outcomes, changed) = table.upsert(entity, key, rows, &json_value);
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
        let (outcomes, changed) = table.delete(key, keys, &json_value);
        if changed {
            self.save(&path, &table)?;
        }
        Ok(outcomes)
    }
}
