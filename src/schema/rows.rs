//! Bringing a table replica's datasource to what its units say: reading rows out of the
//! metadata store, and writing them into the datasource.
//!
//! Invariants:
//! - The two steps are apart on purpose. Reading needs the metadata store, writing
//!   needs the datasource, and nothing else is shared: a session reads each batch's
//!   rows right after the batch commits and hands them to a writer thread, which writes
//!   them while the session goes on with the next batch (see
//!   [`super::TableReplica::send_to`]).
//! - A row is read only after the commit that changed it, and its pending mark is
//!   cleared only after the datasource took the write. A row the datasource refused
//!   stays marked and is tried again at the next apply.
//! - A row that is not live in the units is deleted from the datasource (or marked
//!   deleted, with a tombstone column); one whose units do not make a row (a failed
//!   inverse transformation) is refused by key, and the datasource is not touched.

use std::collections::{BTreeMap, BTreeSet};

use crate::metadata::MetadataStore;
use crate::stores::{Datasource, FieldType, Row, RowOutcome, StoreError, Value};

use super::projection::WritePlan;
use super::table::{decode_snapshot, decode_value, key_of_prefix, row_prefix, unit_id};
use super::watermark::utc_now_text;
use super::{Projection, SchemaError};

/// What writing synced rows into the datasource did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyReport {
    pub upserted: u64,
    pub deleted: u64,
    /// Rows the datasource refused, by key, with its message. They stay pending and are
    /// tried again at the next apply.
    pub refused: Vec<(Vec<String>, String)>,
}

impl ApplyReport {
    pub(crate) fn absorb(&mut self, other: ApplyReport) {
        self.upserted += other.upserted;
        self.deleted += other.deleted;
        self.refused.extend(other.refused);
    }
}

/// A tombstone column: the value that marks a row deleted and the one that clears it.
#[derive(Clone, Debug)]
pub(crate) struct SoftDelete {
    pub(crate) field: String,
    pub(crate) field_type: FieldType,
}

impl SoftDelete {
    fn deleted_value(&self) -> Value {
        match self.field_type {
            FieldType::Bool => Value::Bool(true),
            FieldType::Int => Value::Int(1),
            FieldType::Float => Value::Float(1.0),
            FieldType::Text => Value::Text(utc_now_text()),
        }
    }

    fn live_value(&self) -> Value {
        match self.field_type {
            FieldType::Bool => Value::Bool(false),
            FieldType::Int => Value::Int(0),
            FieldType::Float => Value::Float(0.0),
            FieldType::Text => Value::Null,
        }
    }
}

/// A row's values as the replica holds them (see [`RowShape::stored_row`]).
pub(crate) struct StoredRow {
    pub(crate) live: bool,
    /// Live, in the version it arrived in, with no field unit: a row this replica
    /// got once and nothing since, which its datasource most likely does not hold.
    pub(crate) fresh: bool,
    /// Unit name → value; empty for a row that is not live.
    pub(crate) values: BTreeMap<String, Value>,
}

/// How one side's rows look: its entity, key fields, units and tombstone column.
#[derive(Debug)]
pub(crate) struct RowShape {
    pub(crate) entity: String,
    /// This store's key fields, in the schema's key order.
    pub(crate) key: Vec<String>,
    pub(crate) projection: Projection,
    /// The projection's way from units to fields, worked out once.
    plan: WritePlan,
    /// The projection's unit names in id order, the order lookups are cheapest in.
    pub(crate) unit_names: Vec<String>,
    pub(crate) soft_delete: Option<SoftDelete>,
}

/// Rows read out of the metadata store, ready to be written.
#[derive(Debug, Default)]
pub(crate) struct RowWrites {
    /// By row prefix: the whole row (key fields included), and whether it is fresh
    /// (see [`StoredRow::fresh`]).
    upserts: Vec<(Vec<u8>, Row, bool)>,
    /// By row prefix: the key fields.
    deletes: Vec<(Vec<u8>, Row)>,
    /// Rows whose units make no row here: prefix, key as text, why.
    refused: Vec<(Vec<u8>, Vec<String>, String)>,
}

/// A row's records as read, not decoded yet: byte ranges in [`StoredRows::bytes`].
#[derive(Debug)]
enum RawRow {
    /// Deleted (`held`), or nothing of it held.
    Gone { held: bool },
    Live {
        fresh: bool,
        snapshot: std::ops::Range<usize>,
        /// Live field units of the projection: name and value bytes.
        fields: Vec<(String, std::ops::Range<usize>)>,
    },
}

/// Rows read out of the metadata store, by prefix, with their bytes in one buffer: a
/// batch's rows cross to the writer thread as a few allocations, and the rows made of
/// them are allocated and freed there. (glibc frees a block another thread allocated
/// under that thread's arena lock: rows read on one thread and freed on the other
/// cost the writer a third of its time, most of it waiting for that lock.)
#[derive(Debug, Default)]
pub(crate) struct StoredRows {
    bytes: Vec<u8>,
    rows: Vec<(Vec<u8>, RawRow)>,
}

impl StoredRows {
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Adds the rows of a later read (of other rows: a session reads each row once).
    pub(crate) fn append(&mut self, later: StoredRows) {
        let base = self.bytes.len();
        let shift = |r: std::ops::Range<usize>| r.start + base..r.end + base;
        self.bytes.extend_from_slice(&later.bytes);
        for (prefix, raw) in later.rows {
            let raw = match raw {
                RawRow::Live {
                    fresh,
                    snapshot,
                    fields,
                } => RawRow::Live {
                    fresh,
                    snapshot: shift(snapshot),
                    fields: fields.into_iter().map(|(u, r)| (u, shift(r))).collect(),
                },
                gone => gone,
            };
            self.rows.push((prefix, raw));
        }
    }
}

/// What writing rows did, with the prefixes whose marks may go and those that stay.
#[derive(Debug, Default)]
pub(crate) struct Written {
    pub(crate) report: ApplyReport,
    pub(crate) done: Vec<Vec<u8>>,
    pub(crate) refused: Vec<Vec<u8>>,
}

impl Written {
    pub(crate) fn absorb(&mut self, other: Written) {
        self.report.absorb(other.report);
        self.done.extend(other.done);
        self.refused.extend(other.refused);
    }
}

impl RowShape {
    pub(crate) fn new(
        entity: &str,
        key: &[String],
        projection: Projection,
        soft_delete: Option<SoftDelete>,
    ) -> Self {
        let mut unit_names: Vec<String> = projection.units.iter().map(|u| u.unit.clone()).collect();
        unit_names.sort();
        unit_names.dedup();
        Self {
            entity: entity.to_string(),
            key: key.to_vec(),
            plan: projection.write_plan(),
            projection,
            unit_names,
            soft_delete,
        }
    }

    /// The row with this prefix as `metadata` holds it: `None` when it holds nothing
    /// of it; for a live row, each field's value (its unit's while live, else the
    /// snapshot's).
    pub(crate) fn stored_row(
        &self,
        metadata: &MetadataStore,
        prefix: &[u8],
    ) -> Result<Option<StoredRow>, SchemaError> {
        let mut bytes = Vec::new();
        let raw = self.read_raw(metadata, prefix, &mut bytes)?;
        self.decode_raw(prefix, &raw, &bytes)
    }

    /// A row's records, their bytes appended to `bytes`. One read of the store: the
    /// row's units follow its existence unit in id order.
    fn read_raw(
        &self,
        metadata: &MetadataStore,
        prefix: &[u8],
        bytes: &mut Vec<u8>,
    ) -> Result<RawRow, SchemaError> {
        let mut keep = |data: &[u8]| {
            let at = bytes.len();
            bytes.extend_from_slice(data);
            at..bytes.len()
        };
        let exists = unit_id(prefix, "")?;
        let records = metadata
            .records_with_prefix(&exists)
            .map_err(StoreError::from)?;
        let mut records = records.into_iter();
        let Some((meta, data)) = records
            .next()
            .and_then(|(id, record)| (id == exists).then_some(record))
        else {
            return Ok(RawRow::Gone { held: false });
        };
        if meta.deleted {
            return Ok(RawRow::Gone { held: true });
        }
        let mut fresh = meta.creation == meta.version;
        let snapshot = keep(data.as_deref().unwrap_or_default());
        let mut fields = Vec::new();
        for (id, (meta, data)) in records {
            fresh = false;
            let Ok(unit) = std::str::from_utf8(&id.as_bytes()[prefix.len()..]) else {
                continue;
            };
            if self
                .unit_names
                .binary_search_by(|u| u.as_str().cmp(unit))
                .is_err()
            {
                continue;
            }
            if let (false, Some(data)) = (meta.deleted, data) {
                fields.push((unit.to_string(), keep(&data)));
            }
        }
        Ok(RawRow::Live {
            fresh,
            snapshot,
            fields,
        })
    }

    /// The values of a row read by [`RowShape::read_raw`].
    fn decode_raw(
        &self,
        prefix: &[u8],
        raw: &RawRow,
        bytes: &[u8],
    ) -> Result<Option<StoredRow>, SchemaError> {
        let damaged = |unit: &str, reason: String| SchemaError::Table {
            reason: format!(
                "entity {}, row {:?}{}: {reason}",
                self.entity,
                key_of_prefix(prefix),
                if unit.is_empty() {
                    String::new()
                } else {
                    format!(", field {unit}")
                }
            ),
        };
        let mut values = BTreeMap::new();
        let (fresh, snapshot, fields) = match raw {
            RawRow::Gone { held: false } => return Ok(None),
            RawRow::Gone { held: true } => {
                return Ok(Some(StoredRow {
                    live: false,
                    fresh: false,
                    values,
                }))
            }
            RawRow::Live {
                fresh,
                snapshot,
                fields,
            } => (*fresh, snapshot, fields),
        };
        decode_snapshot(&bytes[snapshot.clone()], &mut values)
            .map_err(|reason| damaged("", reason))?;
        for (unit, at) in fields {
            let value = decode_value(&bytes[at.clone()]).map_err(|r| damaged(unit, r))?;
            values.insert(unit.clone(), value);
        }
        Ok(Some(StoredRow {
            live: true,
            fresh,
            values,
        }))
    }

    /// These rows' records as `metadata` holds them, to be made into writes by
    /// [`RowShape::build_rows`], on another thread if need be.
    pub(crate) fn read_stored(
        &self,
        metadata: &MetadataStore,
        prefixes: &[Vec<u8>],
    ) -> Result<StoredRows, SchemaError> {
        let mut stored = StoredRows::default();
        for prefix in prefixes {
            let raw = self.read_raw(metadata, prefix, &mut stored.bytes)?;
            stored.rows.push((prefix.clone(), raw));
        }
        Ok(stored)
    }

    /// The writes that bring the datasource to what `metadata` holds for these rows.
    pub(crate) fn read_rows(
        &self,
        metadata: &MetadataStore,
        prefixes: &[Vec<u8>],
    ) -> Result<RowWrites, SchemaError> {
        self.build_rows(self.read_stored(metadata, prefixes)?)
    }

    /// The writes that bring the datasource to these stored rows.
    pub(crate) fn build_rows(&self, stored: StoredRows) -> Result<RowWrites, SchemaError> {
        let mut writes = RowWrites::default();
        for (prefix, raw) in stored.rows {
            // The key as the prefix holds it (text): what a delete goes by, and what a
            // row falls back on where no unit gives a key field its typed value.
            let key_row = || -> Row {
                self.key
                    .iter()
                    .cloned()
                    .zip(key_of_prefix(&prefix).into_iter().map(Value::Text))
                    .collect()
            };
            let (units, fresh) = match self.decode_raw(&prefix, &raw, &stored.bytes)? {
                Some(row) if row.live => (row.values, row.fresh),
                _ => {
                    let key = key_row();
                    writes.deletes.push((prefix, key));
                    continue;
                }
            };
            match self.plan.write(units) {
                Ok(mut row) => {
                    if self.key.iter().any(|k| !row.contains_key(k)) {
                        for (field, value) in key_row() {
                            row.entry(field).or_insert(value);
                        }
                    }
                    // A row that arrives revives one this side marked deleted.
                    if let Some(soft) = &self.soft_delete {
                        row.entry(soft.field.clone())
                            .or_insert_with(|| soft.live_value());
                    }
                    writes.upserts.push((prefix, row, fresh));
                }
                Err(e) => {
                    let key = key_of_prefix(&prefix);
                    writes
                        .refused
                        .push((prefix, key, format!("field {}: {}", e.field, e.reason)))
                }
            }
        }
        Ok(writes)
    }

    /// Writes rows into the datasource; an error is one the datasource as a whole
    /// returned (a lost connection, say), and leaves every row of `writes` pending.
    pub(crate) fn write_rows(
        &self,
        datasource: &mut dyn Datasource,
        writes: RowWrites,
    ) -> Result<Written, SchemaError> {
        let mut written = Written::default();
        for (prefix, key, reason) in writes.refused {
            written.report.refused.push((key, reason));
            written.refused.push(prefix);
        }
        let (fresh, known): (Vec<_>, Vec<_>) = writes.upserts.into_iter().partition(|u| u.2);
        for (rows, new) in [(fresh, true), (known, false)] {
            if rows.is_empty() {
                continue;
            }
            let (prefixes, rows): (Vec<Vec<u8>>, Vec<Row>) =
                rows.into_iter().map(|(p, r, _)| (p, r)).unzip();
            let outcomes = if new {
                datasource.upsert_new(&self.entity, &self.key, &rows)
            } else {
                datasource.upsert(&self.entity, &self.key, &rows)
            }
            .map_err(SchemaError::from)?;
            for ((prefix, row), outcome) in prefixes.into_iter().zip(rows).zip(outcomes) {
                self.settle(&mut written, prefix, &row, outcome, false);
            }
        }
        // No call without rows: a call costs what the store charges for one (a CSV file
        // read whole, a PostgreSQL catalog query and a transaction), and the writer
        // thread calls once per gathered batch.
        if writes.deletes.is_empty() {
            return Ok(written);
        }
        let (prefixes, keys): (Vec<Vec<u8>>, Vec<Row>) = writes.deletes.into_iter().unzip();
        let outcomes = match &self.soft_delete {
            None => datasource
                .delete(&self.entity, &self.key, &keys)
                .map_err(SchemaError::from)?,
            Some(soft) => self.mark_deleted(datasource, soft, &prefixes, &keys)?,
        };
        for ((prefix, key), outcome) in prefixes.into_iter().zip(keys).zip(outcomes) {
            self.settle(&mut written, prefix, &key, outcome, true);
        }
        Ok(written)
    }

    fn settle(
        &self,
        written: &mut Written,
        prefix: Vec<u8>,
        row: &Row,
        outcome: RowOutcome,
        delete: bool,
    ) {
        match outcome {
            RowOutcome::Written => {
                if delete {
                    written.report.deleted += 1;
                } else {
                    written.report.upserted += 1;
                }
                written.done.push(prefix);
            }
            RowOutcome::Refused { reason } => {
                written.report.refused.push((self.key_text(row), reason));
                written.refused.push(prefix);
            }
        }
    }

    /// Sets the tombstone column of the rows that exist; one that does not is already
    /// absent (an upsert would create a stub row holding only its key).
    fn mark_deleted(
        &self,
        datasource: &mut dyn Datasource,
        soft: &SoftDelete,
        prefixes: &[Vec<u8>],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, SchemaError> {
        let mut present: BTreeSet<Vec<u8>> = BTreeSet::new();
        datasource.read_keys(&self.entity, &self.key, keys, &mut |row| {
            let values: Vec<Value> = self
                .key
                .iter()
                .map(|k| row.get(k).cloned().unwrap_or(Value::Null))
                .collect();
            present.insert(row_prefix(&values));
            Ok(())
        })?;
        let marked: Vec<Row> = prefixes
            .iter()
            .zip(keys)
            .filter(|(prefix, _)| present.contains(*prefix))
            .map(|(_, key)| {
                let mut row = key.clone();
                row.insert(soft.field.clone(), soft.deleted_value());
                row
            })
            .collect();
        let mut outcomes = datasource
            .upsert(&self.entity, &self.key, &marked)
            .map_err(SchemaError::from)?
            .into_iter();
        Ok(prefixes
            .iter()
            .map(|prefix| {
                if present.contains(prefix) {
                    outcomes.next().unwrap_or(RowOutcome::Written)
                } else {
                    RowOutcome::Written
                }
            })
            .collect())
    }

    pub(crate) fn key_text(&self, row: &Row) -> Vec<String> {
        self.key
            .iter()
            .map(|k| row.get(k).map(Value::to_text).unwrap_or_default())
            .collect()
    }
}
