//! A sled database folder as a datasource, for people who keep their rows in knit's
//! embedded store rather than in files or a SQL server.
//!
//! Layout (format 1; every record starts with its format byte, so a later layout can be
//! told apart instead of misread):
//! - Tree `schema` holds one declaration per entity: key = the entity's name (UTF-8),
//!   value = format byte `1`, then in bincode 2's standard encoding (through serde) the
//!   fields in order, each `(name, type, nullable)` with the type as a variant index
//!   (bool 0, int 1, float 2, text 3), then the key fields' names.
//! - Tree `entity:<name>` holds the entity's rows. A row's key is its key values in the
//!   declared key order, each encoded so that byte order is value order: an int as its 8
//!   big-endian bytes with the sign bit flipped; a float as its 8 big-endian IEEE bytes,
//!   all flipped when negative and only the sign bit flipped otherwise (-0.0 counts as
//!   0.0); a bool as one byte 0 or 1; a text as its UTF-8 bytes with each 0x00 written
//!   0x00 0xFF, then 0x00 0x00 to end it. The value is format byte `1`, then the row in
//!   bincode as a list of `(field, value)` pairs, the value a variant index (null 0, bool
//!   1, int 2, float 3, text 4) and its payload. knit writes every declared field; a
//!   record written by another tool may leave out nullable fields, which read as null.
//! - Rows are bincode rather than JSON because bincode keeps every `f64` exactly (NaN and
//!   the infinities included, which JSON cannot hold), keeps an int apart from a float
//!   without guessing from the digits, and its decoder is bounded (`ROW_BYTES_MAX`), as
//!   every other sled record of knit is. The cost is that other tools need the layout
//!   above to read the rows.
//!
//! Rules:
//! - `open` never creates a database (a missing folder is `Unavailable`, so a mistyped
//!   path cannot look like an empty source) and creates no tree until an entity is
//!   declared; `create` makes a new one. sled lets one handle at a time hold a folder:
//!   while another process or handle has it, opening fails with `Unavailable` after a
//!   short wait.
//! - An entity is a declaration in `schema`; other trees, an `entity:` tree without a
//!   declaration included, are not entities. `create_entity` declares one; declaring the
//!   same fields and key again is a no-op, other ones are `Unsupported`, as are a key
//!   field declared nullable, a field declared twice and an empty key; a key field that
//!   is not among the fields is `NoSuchField`. `describe` is the declaration, exactly.
//! - A value fits a field as in a schema's validation: a value of the field's type, an
//!   int into a float field when the float holds it exactly, or any value into a text
//!   field, which stores its text (`Value::to_text`), as a CSV cell would. Anything else
//!   (the text "x", or even "36", into an int field; a float into an int field) is
//!   `Refused`: a silent conversion here would hide a mapping that lacks a transform.
//! - `upsert` and `delete` take the entity's declared key fields (in any order); another
//!   set of fields is `Unsupported`, and a field that is not declared is `NoSuchField`.
//!   A row with an undeclared field, a key field missing or null (or a NaN), a value
//!   that does not fit, or that would leave a NOT NULL field null is `Refused`; the other
//!   rows go on. `upsert` sets the fields a row carries and keeps the others (a new row
//!   gets null in them). Each call writes its rows in one sled batch, which lands whole
//!   or not at all, and flushes before it returns. A delete's fields outside the key are
//!   ignored, and an absent key is no error.
//! - `scan` visits rows in key order. A row whose value does not decode, holds a field
//!   that is not declared or a value of another type, leaves a NOT NULL field null, or
//!   is stored under a key that its key fields do not encode to, is `BadRow`, whose
//!   "line" is its 1-based position in scan order; `upsert` and `read_keys` report a
//!   damaged row they meet the same way. `read_keys` looks keys up instead of scanning.
//! - There is no change tracking (the trait's defaults): use a Full sync.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::metadata::sled_folder::{self, OpenError};

use super::datasource::{
    Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, Row, RowOutcome, Value,
};

/// The tree of entity declarations.
const SCHEMA_TREE: &str = "schema";
/// The prefix of an entity's tree name.
const ENTITY_TREE_PREFIX: &str = "entity:";
/// The format byte that starts every declaration and row record.
const RECORD_FORMAT: u8 = 1;
/// The largest row record, as large as an item's data may be, since a row travels as one.
const ROW_BYTES_MAX: usize = crate::model::MAX_ITEM_DATA_LEN;
/// The largest declaration record; a declaration is a list of names, far below this.
const DECLARATION_BYTES_MAX: usize = 1 << 20;

/// A sled database folder; see the module documentation for the layout and the rules.
#[derive(Debug)]
pub struct SledSource {
    name: String,
    db: sled::Db,
}

/// A field value as a row record stores it; the variant order is the format.
#[derive(Debug, Serialize, Deserialize)]
enum StoredValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// A field type as a declaration stores it; the variant order is the format.
#[derive(Debug, Serialize, Deserialize)]
enum StoredType {
    Bool,
    Int,
    Float,
    Text,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredField {
    name: String,
    field_type: StoredType,
    nullable: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredDeclaration {
    fields: Vec<StoredField>,
    key: Vec<String>,
}

/// An entity's declaration, read from the `schema` tree.
#[derive(Debug, PartialEq)]
struct Declaration {
    entity: String,
    fields: Vec<FieldInfo>,
    /// The key fields in the order their values make a row's sled key.
    key: Vec<String>,
}

impl SledSource {
    /// Opens the existing sled database in the folder `path`.
    pub fn open(name: &str, path: &Path) -> Result<Self, DatasourceError> {
        if !sled_folder::files_present(path) {
            return Err(DatasourceError::Unavailable {
                datasource: name.to_string(),
                reason: format!(
                    "{}: no sled database there (open never creates one)",
                    path.display()
                ),
            });
        }
        Self::open_folder(name, path)
    }

    /// Creates a new sled database in the folder `path` (made if missing). A folder that
    /// already holds one is `Unavailable`: creating never quietly opens existing rows.
    pub fn create(name: &str, path: &Path) -> Result<Self, DatasourceError> {
        if sled_folder::files_present(path) {
            return Err(DatasourceError::Unavailable {
                datasource: name.to_string(),
                reason: format!(
                    "{}: already holds a sled database; open it instead",
                    path.display()
                ),
            });
        }
        Self::open_folder(name, path)
    }

    fn open_folder(name: &str, path: &Path) -> Result<Self, DatasourceError> {
        let unavailable = |reason: String| DatasourceError::Unavailable {
            datasource: name.to_string(),
            reason: format!("{}: {reason}", path.display()),
        };
        match sled_folder::open(path) {
            Ok(db) => Ok(Self {
                name: name.to_string(),
                db,
            }),
            Err(OpenError::InUse) => Err(unavailable(
                "in use by another process or handle (sled lets one open it at a time)".into(),
            )),
            Err(OpenError::Damaged(reason)) => Err(unavailable(reason)),
            Err(OpenError::Other(e)) => Err(unavailable(e.to_string())),
        }
    }

    /// Declares `entity` with its fields, in order, and its key fields, whose values
    /// identify a row. Declaring the same again is a no-op.
    pub fn create_entity(
        &mut self,
        entity: &str,
        fields: &[FieldInfo],
        key: &[String],
    ) -> Result<(), DatasourceError> {
        let unsupported = |what: String| DatasourceError::Unsupported {
            datasource: self.name.clone(),
            entity: entity.to_string(),
            what,
        };
        if entity.is_empty() {
            return Err(unsupported("entity with an empty name".into()));
        }
        if key.is_empty() {
            return Err(unsupported("entity without key fields".into()));
        }
        let mut seen = BTreeSet::new();
        if let Some(twice) = fields.iter().find(|f| !seen.insert(f.name.as_str())) {
            return Err(unsupported(format!(
                "declaration with the field {:?} twice",
                twice.name
            )));
        }
        let mut key_seen = BTreeSet::new();
        for field in key {
            let Some(info) = fields.iter().find(|f| &f.name == field) else {
                return Err(DatasourceError::NoSuchField {
                    datasource: self.name.clone(),
                    entity: entity.to_string(),
                    field: field.clone(),
                });
            };
            if info.nullable {
                return Err(unsupported(format!(
                    "declaration with a nullable key field {field:?}"
                )));
            }
            if !key_seen.insert(field.as_str()) {
                return Err(unsupported(format!(
                    "declaration with the key field {field:?} twice"
                )));
            }
        }
        let declaration = Declaration {
            entity: entity.to_string(),
            fields: fields.to_vec(),
            key: key.to_vec(),
        };
        if let Some(existing) = self.declaration(entity)? {
            if existing == declaration {
                return Ok(());
            }
            return Err(unsupported(
                "second declaration with other fields or key (the first one stands)".into(),
            ));
        }
        let record = declaration.encode().map_err(|e| self.io(entity, e))?;
        let schema = self
            .db
            .open_tree(SCHEMA_TREE)
            .map_err(|e| self.io(entity, e))?;
        schema
            .insert(entity.as_bytes(), record)
            .map_err(|e| self.io(entity, e))?;
        self.db
            .open_tree(entity_tree_name(entity))
            .map_err(|e| self.io(entity, e))?;
        self.db.flush().map_err(|e| self.io(entity, e))?;
        Ok(())
    }

    fn io(&self, entity: &str, e: impl std::fmt::Display) -> DatasourceError {
        DatasourceError::Io {
            datasource: self.name.clone(),
            reason: format!("entity {entity}: {e}"),
        }
    }

    /// A tree that already exists; `Db::open_tree` would create a missing one, and
    /// reading must not change the folder.
    fn existing_tree(&self, name: &str) -> Result<Option<sled::Tree>, sled::Error> {
        if self.db.tree_names().iter().any(|n| n == name.as_bytes()) {
            self.db.open_tree(name).map(Some)
        } else {
            Ok(None)
        }
    }

    fn declaration(&self, entity: &str) -> Result<Option<Declaration>, DatasourceError> {
        let Some(schema) = self
            .existing_tree(SCHEMA_TREE)
            .map_err(|e| self.io(entity, e))?
        else {
            return Ok(None);
        };
        let Some(bytes) = schema
            .get(entity.as_bytes())
            .map_err(|e| self.io(entity, e))?
        else {
            return Ok(None);
        };
        Declaration::decode(entity, &bytes)
            .map(Some)
            .map_err(|reason| self.io(entity, format!("damaged declaration: {reason}")))
    }

    /// The declaration and the rows' tree of an entity that must exist.
    fn entity(&self, entity: &str) -> Result<(Declaration, sled::Tree), DatasourceError> {
        let declaration =
            self.declaration(entity)?
                .ok_or_else(|| DatasourceError::NoSuchEntity {
                    datasource: self.name.clone(),
                    entity: entity.to_string(),
                })?;
        let tree = self
            .db
            .open_tree(entity_tree_name(entity))
            .map_err(|e| self.io(entity, e))?;
        Ok((declaration, tree))
    }

    /// `BadRow` for the row stored under `key`, at its position in scan order.
    fn bad_row_at(
        &self,
        entity: &str,
        tree: &sled::Tree,
        key: &[u8],
        reason: String,
    ) -> DatasourceError {
        let before = tree.range(..key).count();
        DatasourceError::BadRow {
            datasource: self.name.clone(),
            entity: entity.to_string(),
            line: position(before),
            reason,
        }
    }

    /// The row stored under `key`, if any, checked against the declaration.
    fn stored_row(
        &self,
        declaration: &Declaration,
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<Row>, DatasourceError> {
        let Some(bytes) = tree.get(key).map_err(|e| self.io(&declaration.entity, e))? else {
            return Ok(None);
        };
        declaration
            .decode_row(key, &bytes)
            .map(Some)
            .map_err(|reason| self.bad_row_at(&declaration.entity, tree, key, reason))
    }

    /// Writes a batch of the entity's tree, then flushes: a call returns only once its
    /// rows are on disk.
    fn commit(
        &self,
        entity: &str,
        tree: &sled::Tree,
        batch: sled::Batch,
    ) -> Result<(), DatasourceError> {
        tree.apply_batch(batch).map_err(|e| self.io(entity, e))?;
        self.db.flush().map_err(|e| self.io(entity, e))?;
        Ok(())
    }
}

fn entity_tree_name(entity: &str) -> String {
    format!("{ENTITY_TREE_PREFIX}{entity}")
}

/// The 1-based position of a row that follows `before` others.
fn position(before: usize) -> u64 {
    u64::try_from(before).map_or(u64::MAX, |n| n.saturating_add(1))
}

fn bincode_limit<const N: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<N>()
}

/// A record: the format byte, then the bincode body. Plain data always encodes, so a
/// failure (a bug in a stored type) becomes a reason rather than a panic.
fn encode_record<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(body.len() + 1);
    out.push(RECORD_FORMAT);
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode_record<T: serde::de::DeserializeOwned, const N: usize>(
    bytes: &[u8],
) -> Result<T, String> {
    let body = match bytes {
        [RECORD_FORMAT, body @ ..] => body,
        [format, ..] => {
            return Err(format!(
                "record format {format}; this build reads format {RECORD_FORMAT}"
            ))
        }
        [] => return Err("empty record".into()),
    };
    let (value, used): (T, usize) = bincode::serde::decode_from_slice(body, bincode_limit::<N>())
        .map_err(|e| format!("the record does not decode: {e}"))?;
    if used != body.len() {
        return Err(format!("{} trailing bytes", body.len() - used));
    }
    Ok(value)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Text(_) => "text",
    }
}

fn has_type(value: &Value, field_type: FieldType) -> bool {
    matches!(
        (value, field_type),
        (Value::Bool(_), FieldType::Bool)
            | (Value::Int(_), FieldType::Int)
            | (Value::Float(_), FieldType::Float)
            | (Value::Text(_), FieldType::Text)
    )
}

/// `value` as `field` stores it, or why it does not fit (see the module rules).
fn fit(field: &FieldInfo, value: &Value) -> Result<Value, String> {
    match (value, field.field_type) {
        (Value::Null, _) => Ok(Value::Null),
        (value, field_type) if has_type(value, field_type) => Ok(value.clone()),
        (value, FieldType::Text) => Ok(Value::Text(value.to_text())),
        (Value::Int(i), FieldType::Float) => {
            // The cast may round; the round trip through i128 (wide enough for both
            // i64 and a float of that magnitude) tells whether it did.
            let float = *i as f64;
            if float as i128 == i128::from(*i) {
                Ok(Value::Float(float))
            } else {
                Err(format!(
                    "field {:?}: the int {i} has no exact float",
                    field.name
                ))
            }
        }
        (value, field_type) => Err(format!(
            "field {:?}: the {} {value} does not fit its declared type {field_type}",
            field.name,
            type_name(value)
        )),
    }
}

/// Appends `value` (already of its field's type) so that byte order is value order.
fn push_key_value(out: &mut Vec<u8>, field: &str, value: &Value) -> Result<(), String> {
    match value {
        Value::Null => return Err(format!("key field {field:?} is missing or null")),
        Value::Bool(b) => out.push(u8::from(*b)),
        Value::Int(i) => {
            let mut bytes = i.to_be_bytes();
            bytes[0] ^= 0x80;
            out.extend_from_slice(&bytes);
        }
        Value::Float(f) => {
            if f.is_nan() {
                return Err(format!(
                    "key field {field:?} is NaN, which no key can match"
                ));
            }
            // -0.0 equals 0.0, so both must make the same key.
            let f = if *f == 0.0 { 0.0f64 } else { *f };
            let bits = f.to_bits();
            let ordered = if bits >> 63 == 1 {
                !bits
            } else {
                bits | (1 << 63)
            };
            out.extend_from_slice(&ordered.to_be_bytes());
        }
        Value::Text(s) => {
            for &b in s.as_bytes() {
                out.push(b);
                if b == 0 {
                    out.push(0xFF);
                }
            }
            out.extend_from_slice(&[0, 0]);
        }
    }
    Ok(())
}

impl Declaration {
    fn encode(&self) -> Result<Vec<u8>, String> {
        let stored = StoredDeclaration {
            fields: self
                .fields
                .iter()
                .map(|f| StoredField {
                    name: f.name.clone(),
                    field_type: match f.field_type {
                        FieldType::Bool => StoredType::Bool,
                        FieldType::Int => StoredType::Int,
                        FieldType::Float => StoredType::Float,
                        FieldType::Text => StoredType::Text,
                    },
                    nullable: f.nullable,
                })
                .collect(),
            key: self.key.clone(),
        };
        encode_record(&stored)
    }

    fn decode(entity: &str, bytes: &[u8]) -> Result<Self, String> {
        let stored: StoredDeclaration = decode_record::<_, DECLARATION_BYTES_MAX>(bytes)?;
        let fields: Vec<FieldInfo> = stored
            .fields
            .into_iter()
            .map(|f| FieldInfo {
                name: f.name,
                field_type: match f.field_type {
                    StoredType::Bool => FieldType::Bool,
                    StoredType::Int => FieldType::Int,
                    StoredType::Float => FieldType::Float,
                    StoredType::Text => FieldType::Text,
                },
                nullable: f.nullable,
            })
            .collect();
        if stored.key.is_empty() {
            return Err("no key fields".into());
        }
        if let Some(field) = stored
            .key
            .iter()
            .find(|k| !fields.iter().any(|f| &f.name == *k && !f.nullable))
        {
            return Err(format!(
                "key field {field:?} is not a declared NOT NULL field"
            ));
        }
        Ok(Self {
            entity: entity.to_string(),
            fields,
            key: stored.key,
        })
    }

    fn info(&self) -> EntityInfo {
        EntityInfo {
            name: self.entity.clone(),
            fields: self.fields.clone(),
        }
    }

    fn field(&self, name: &str) -> Option<&FieldInfo> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Checks a call's `key` against the declaration: every field declared, and the set
    /// the declared key, since rows are found by their key's encoding.
    fn check_key(&self, datasource: &str, key: &[String]) -> Result<(), DatasourceError> {
        if let Some(field) = key.iter().find(|k| self.field(k).is_none()) {
            return Err(DatasourceError::NoSuchField {
                datasource: datasource.to_string(),
                entity: self.entity.clone(),
                field: field.clone(),
            });
        }
        let given: BTreeSet<&String> = key.iter().collect();
        let declared: BTreeSet<&String> = self.key.iter().collect();
        if given != declared || key.len() != self.key.len() {
            return Err(DatasourceError::Unsupported {
                datasource: datasource.to_string(),
                entity: self.entity.clone(),
                what: format!(
                    "upsert, delete or read by ({}): the entity is keyed by ({})",
                    key.join(", "),
                    self.key.join(", ")
                ),
            });
        }
        Ok(())
    }

    /// The row's fields fitted to their declared types, or why the row is refused.
    fn fit_row(&self, row: &Row) -> Result<Row, String> {
        row.iter()
            .map(|(name, value)| match self.field(name) {
                Some(field) => Ok((name.clone(), fit(field, value)?)),
                None => Err(format!(
                    "field {name:?} is not declared in entity {:?}",
                    self.entity
                )),
            })
            .collect()
    }

    /// The sled key of a row whose values are fitted to their fields.
    fn row_key(&self, row: &Row) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for field in &self.key {
            push_key_value(&mut out, field, row.get(field).unwrap_or(&Value::Null))?;
        }
        Ok(out)
    }

    /// The sled key for the key fields of `row` (other fields are ignored).
    fn key_of(&self, row: &Row) -> Result<Vec<u8>, String> {
        let key_only: Row = row
            .iter()
            .filter(|(name, _)| self.key.contains(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        self.row_key(&self.fit_row(&key_only)?)
    }

    fn check_not_null(&self, row: &Row) -> Result<(), String> {
        match self
            .fields
            .iter()
            .find(|f| !f.nullable && row.get(&f.name).is_none_or(Value::is_null))
        {
            Some(field) => Err(format!("field {:?} is NOT NULL but left null", field.name)),
            None => Ok(()),
        }
    }

    fn encode_row(&self, row: &Row) -> Result<Vec<u8>, String> {
        // Declaration order, every field, so the record reads the same by eye and by tool.
        let stored: Vec<(&str, StoredValue)> = self
            .fields
            .iter()
            .map(|f| {
                let value = match row.get(&f.name).unwrap_or(&Value::Null) {
                    Value::Null => StoredValue::Null,
                    Value::Bool(b) => StoredValue::Bool(*b),
                    Value::Int(i) => StoredValue::Int(*i),
                    Value::Float(x) => StoredValue::Float(*x),
                    Value::Text(s) => StoredValue::Text(s.clone()),
                };
                (f.name.as_str(), value)
            })
            .collect();
        let bytes = encode_record(&stored)?;
        if bytes.len() > ROW_BYTES_MAX {
            return Err(format!(
                "the row takes {} bytes; the limit is {ROW_BYTES_MAX}",
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// Decodes the row stored under `key` and checks it against the declaration.
    fn decode_row(&self, key: &[u8], bytes: &[u8]) -> Result<Row, String> {
        let stored: Vec<(String, StoredValue)> = decode_record::<_, ROW_BYTES_MAX>(bytes)?;
        let mut row = Row::new();
        for (name, value) in stored {
            let Some(field) = self.field(&name) else {
                return Err(format!("field {name:?} is not declared"));
            };
            let value = match value {
                StoredValue::Null => Value::Null,
                StoredValue::Bool(b) => Value::Bool(b),
                StoredValue::Int(i) => Value::Int(i),
                StoredValue::Float(x) => Value::Float(x),
                StoredValue::Text(s) => Value::Text(s),
            };
            if !value.is_null() && !has_type(&value, field.field_type) {
                return Err(format!(
                    "field {name:?} holds a value of type {}, but is declared {}",
                    type_name(&value),
                    field.field_type
                ));
            }
            if row.insert(name.clone(), value).is_some() {
                return Err(format!("field {name:?} is stored twice"));
            }
        }
        for field in &self.fields {
            row.entry(field.name.clone()).or_insert(Value::Null);
        }
        self.check_not_null(&row)?;
        if self.row_key(&row)? != key {
            return Err("stored under a key that its key fields do not encode to".into());
        }
        Ok(row)
    }
}

impl Datasource for SledSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn entities(&mut self) -> Result<Vec<String>, DatasourceError> {
        let Some(schema) = self
            .existing_tree(SCHEMA_TREE)
            .map_err(|e| self.io("*", e))?
        else {
            return Ok(Vec::new());
        };
        // sled keeps keys in byte order, which for UTF-8 names is their sorted order.
        schema
            .iter()
            .keys()
            .map(|name| {
                let name = name.map_err(|e| self.io("*", e))?;
                String::from_utf8(name.to_vec())
                    .map_err(|_| self.io("*", "damaged declaration: a name that is not UTF-8"))
            })
            .collect()
    }

    fn describe(&mut self, entity: &str) -> Result<EntityInfo, DatasourceError> {
        let (declaration, _) = self.entity(entity)?;
        Ok(declaration.info())
    }

    fn scan(
        &mut self,
        entity: &str,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let (declaration, tree) = self.entity(entity)?;
        for (before, entry) in tree.iter().enumerate() {
            let (key, bytes) = entry.map_err(|e| self.io(entity, e))?;
            let row =
                declaration
                    .decode_row(&key, &bytes)
                    .map_err(|reason| DatasourceError::BadRow {
                        datasource: self.name.clone(),
                        entity: entity.to_string(),
                        line: position(before),
                        reason,
                    })?;
            visit(row)?;
        }
        Ok(())
    }

    fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        let (declaration, tree) = self.entity(entity)?;
        declaration.check_key(&self.name, key)?;
        // Rows written earlier in this call, by sled key: a later row of the same key
        // merges into them, not into what the tree held before the call.
        let mut staged: BTreeMap<Vec<u8>, (Row, Vec<u8>)> = BTreeMap::new();
        let mut outcomes = Vec::with_capacity(rows.len());
        for row in rows {
            let prepared = match declaration
                .fit_row(row)
                .and_then(|fitted| Ok((declaration.row_key(&fitted)?, fitted)))
            {
                Ok(prepared) => prepared,
                Err(reason) => {
                    outcomes.push(RowOutcome::Refused { reason });
                    continue;
                }
            };
            let (row_key, fitted) = prepared;
            let current = match staged.get(&row_key) {
                Some((row, _)) => Some(row.clone()),
                None => self.stored_row(&declaration, &tree, &row_key)?,
            };
            let mut merged = current.unwrap_or_else(|| {
                declaration
                    .fields
                    .iter()
                    .map(|f| (f.name.clone(), Value::Null))
                    .collect()
            });
            merged.extend(fitted);
            match declaration
                .check_not_null(&merged)
                .and_then(|()| declaration.encode_row(&merged))
            {
                Ok(bytes) => {
                    staged.insert(row_key, (merged, bytes));
                    outcomes.push(RowOutcome::Written);
                }
                Err(reason) => outcomes.push(RowOutcome::Refused { reason }),
            }
        }
        if !staged.is_empty() {
            let mut batch = sled::Batch::default();
            for (row_key, (_, bytes)) in staged {
                batch.insert(row_key, bytes);
            }
            self.commit(entity, &tree, batch)?;
        }
        Ok(outcomes)
    }

    fn delete(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        let (declaration, tree) = self.entity(entity)?;
        declaration.check_key(&self.name, key)?;
        let mut batch = sled::Batch::default();
        let mut any = false;
        let outcomes = keys
            .iter()
            .map(|row| match declaration.key_of(row) {
                Ok(row_key) => {
                    batch.remove(row_key);
                    any = true;
                    RowOutcome::Written
                }
                Err(reason) => RowOutcome::Refused { reason },
            })
            .collect();
        if any {
            self.commit(entity, &tree, batch)?;
        }
        Ok(outcomes)
    }

    /// Looks each key up instead of scanning; rows come once each, in scan order.
    fn read_keys(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let (declaration, tree) = self.entity(entity)?;
        declaration.check_key(&self.name, key)?;
        // A key that cannot be encoded (missing, null, of another type) matches no row.
        let wanted: BTreeSet<Vec<u8>> = keys
            .iter()
            .filter_map(|row| declaration.key_of(row).ok())
            .collect();
        for row_key in wanted {
            if let Some(row) = self.stored_row(&declaration, &tree, &row_key)? {
                visit(row)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(values: &[Value]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for value in values {
            push_key_value(&mut out, "k", value)?;
        }
        Ok(out)
    }

    proptest! {
        // Scan order is key order only if the encoding keeps the values' order, field
        // by field, whatever follows a text (a prefix, a NUL).
        #[test]
        fn key_bytes_keep_the_order_of_int_then_text(
            a in any::<i64>(), s in "[a\\x00b]{0,4}", b in any::<i64>(), t in "[a\\x00b]{0,4}",
        ) {
            let left = key(&[Value::Int(a), Value::Text(s.clone()), Value::Int(1)]);
            let right = key(&[Value::Int(b), Value::Text(t.clone()), Value::Int(0)]);
            let (left, right) = (left.map_err(TestCaseError::fail)?, right.map_err(TestCaseError::fail)?);
            let expected = (a, s.as_bytes(), 1).cmp(&(b, t.as_bytes(), 0));
            prop_assert_eq!(left.cmp(&right), expected);
        }

        #[test]
        fn key_bytes_keep_the_order_of_floats(a in any::<f64>(), b in any::<f64>()) {
            prop_assume!(!a.is_nan() && !b.is_nan());
            let left = key(&[Value::Float(a)]).map_err(TestCaseError::fail)?;
            let right = key(&[Value::Float(b)]).map_err(TestCaseError::fail)?;
            prop_assert_eq!(Some(left.cmp(&right)), a.partial_cmp(&b));
        }
    }

    #[test]
    fn a_nan_or_null_key_value_is_refused() {
        assert!(key(&[Value::Float(f64::NAN)]).is_err());
        assert!(key(&[Value::Null]).is_err());
        assert_eq!(key(&[Value::Float(-0.0)]), key(&[Value::Float(0.0)]));
    }
}
