//! A datasource entity as a replica of the engine, with fields as change units.
//!
//! Each row becomes items of its own: a row-existence unit and one unit per field, under
//! ids `row prefix ‖ unit name` (the existence unit's name is empty, so it sorts first
//! and a row's units are adjacent). Two replicas that edit different fields of a row
//! concurrently therefore change different items and merge without a conflict; the same
//! field edited on both sides is one conflict, on that field (scenario 19). The engine
//! is unchanged: knowledge, batching, policies and recovery apply to units as to items.
//!
//! Invariants:
//! - The metadata store is the truth for what the replica holds; the datasource is
//!   brought to it. Every commit that changes a unit from a sync also writes a
//!   pending-apply marker for its row, in the same atomic commit; the row is then
//!   written to the datasource (idempotently, by key) and the marker removed. A crash
//!   in between leaves the marker, and the next open replays the write, so a half-done
//!   apply never shows up as a local change.
//! - Change detection compares the datasource with the units' data: a difference is a
//!   new local version; a row that vanished becomes tombstones for all its units.
//!   Values equal as text (`36` in a CSV file, `36` in an INTEGER column) are equal.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::metadata::{Commit, MetadataStore};
use crate::model::ItemId;
use crate::stores::{Datasource, Replica, Row, RowOutcome, SledItems, StoreError, Value};
use crate::sync::{
    ItemStore, NoObserver, SessionOptions, SessionStats, SyncObserver, SyncReport, SystemClock,
};

use super::{Projection, SchemaError};

/// A row that could not be read as units: its key, the field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowFailure {
    pub key: Vec<String>,
    pub field: String,
    pub reason: String,
}

/// What a change detection found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetectReport {
    pub rows_read: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Rows the filters leave out (they count as absent: their units are deleted).
    pub filtered: u64,
    /// Rows that could not be read as units; their units are left as they were, so
    /// they are not deleted elsewhere, and the next detection tries them again.
    pub failed: Vec<RowFailure>,
}

/// A detection's findings before they are committed.
pub struct Detection {
    pub report: DetectReport,
    changes: Vec<(ItemId, Option<Vec<u8>>)>,
}

/// What writing synced rows into the datasource did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyReport {
    pub upserted: u64,
    pub deleted: u64,
    /// Rows the datasource refused, by key, with its message. They stay pending and are
    /// tried again at the next apply.
    pub refused: Vec<(Vec<String>, String)>,
}

// ---- ids and values -------------------------------------------------------------------

/// Escapes a key part so that `00 01` can separate parts and `00 00` end the key,
/// keeping byte order: `00` becomes `00 FF`.
fn push_escaped(out: &mut Vec<u8>, part: &[u8]) {
    for &b in part {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
}

/// The id prefix shared by every unit of the row with these key values.
pub(crate) fn row_prefix(key: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in key {
        push_escaped(&mut out, part.to_text().as_bytes());
        out.extend_from_slice(&[0, 1]);
    }
    out.extend_from_slice(&[0, 0]);
    out
}

/// The key values (as text) of a row prefix.
fn key_of_prefix(prefix: &[u8]) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut i = 0;
    while i < prefix.len() {
        match (prefix[i], prefix.get(i + 1)) {
            (0, Some(0xFF)) => {
                part.push(0);
                i += 2;
            }
            (0, Some(1)) => {
                parts.push(String::from_utf8_lossy(&part).into_owned());
                part.clear();
                i += 2;
            }
            (0, _) => break,
            (b, _) => {
                part.push(b);
                i += 1;
            }
        }
    }
    parts
}

/// Splits a unit id into its row prefix and unit name.
fn split_unit(id: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut i = 0;
    while i + 1 < id.len() {
        match (id[i], id[i + 1]) {
            (0, 0) => return Some((&id[..i + 2], &id[i + 2..])),
            (0, _) => i += 2,
            _ => i += 1,
        }
    }
    None
}

fn unit_id(prefix: &[u8], unit: &str) -> Result<ItemId, SchemaError> {
    let mut id = prefix.to_vec();
    id.extend_from_slice(unit.as_bytes());
    ItemId::new(&id).map_err(|e| SchemaError::Table {
        reason: format!("row key too long for an item id: {e}"),
    })
}

const TAG_NULL: u8 = 0;
const TAG_BOOL: u8 = 1;
const TAG_INT: u8 = 2;
const TAG_FLOAT: u8 = 3;
const TAG_TEXT: u8 = 4;

/// A field value as a unit's data: a tag byte, then the value.
pub(crate) fn encode_value(value: &Value) -> Vec<u8> {
    match value {
        Value::Null => vec![TAG_NULL],
        Value::Bool(b) => vec![TAG_BOOL, u8::from(*b)],
        Value::Int(i) => {
            let mut out = vec![TAG_INT];
            out.extend_from_slice(&i.to_le_bytes());
            out
        }
        Value::Float(f) => {
            let mut out = vec![TAG_FLOAT];
            out.extend_from_slice(&f.to_bits().to_le_bytes());
            out
        }
        Value::Text(s) => {
            let mut out = vec![TAG_TEXT];
            out.extend_from_slice(s.as_bytes());
            out
        }
    }
}

pub(crate) fn decode_value(bytes: &[u8]) -> Result<Value, String> {
    let eight = |rest: &[u8]| -> Result<[u8; 8], String> {
        rest.try_into()
            .map_err(|_| "a number unit is not 8 bytes".to_string())
    };
    match bytes.split_first() {
        Some((&TAG_NULL, [])) => Ok(Value::Null),
        Some((&TAG_BOOL, [b])) => Ok(Value::Bool(*b != 0)),
        Some((&TAG_INT, rest)) => Ok(Value::Int(i64::from_le_bytes(eight(rest)?))),
        Some((&TAG_FLOAT, rest)) => Ok(Value::Float(f64::from_bits(u64::from_le_bytes(eight(
            rest,
        )?)))),
        Some((&TAG_TEXT, rest)) => String::from_utf8(rest.to_vec())
            .map(Value::Text)
            .map_err(|_| "a text unit is not UTF-8".to_string()),
        _ => Err("not a field value".to_string()),
    }
}

/// Values a store would write and read back alike are not a change.
fn same_value(a: &Value, b: &Value) -> bool {
    a == b || a.to_text() == b.to_text()
}

// ---- the item store -------------------------------------------------------------------

/// The built-in store (unit data in the item record) that, while a sync runs, also
/// marks every row whose units it writes as pending for the datasource.
struct RowUnits {
    inner: SledItems,
    recording: Arc<AtomicBool>,
}

impl ItemStore for RowUnits {
    fn data_in_record(&self) -> bool {
        self.inner.data_in_record()
    }

    fn read(&self, metadata: &MetadataStore, item: &ItemId) -> Result<Option<Vec<u8>>, String> {
        self.inner.read(metadata, item)
    }

    fn stage(
        &mut self,
        commit: &mut Commit,
        item: &ItemId,
        data: Option<&[u8]>,
    ) -> Result<(), String> {
        self.inner.stage(commit, item, data)?;
        if self.recording.load(Ordering::SeqCst) {
            let (prefix, _) = split_unit(item.as_bytes())
                .ok_or_else(|| format!("item {item} is not a row unit"))?;
            commit.mark_pending(prefix);
        }
        Ok(())
    }
}

// ---- the table replica ----------------------------------------------------------------

/// One entity of one datasource, kept as a replica whose metadata lives in its own
/// folder.
pub struct TableReplica {
    replica: Replica,
    datasource: Box<dyn Datasource>,
    entity: String,
    /// This store's key fields, in the schema's key order.
    key: Vec<String>,
    projection: Projection,
    recording: Arc<AtomicBool>,
}

impl TableReplica {
    /// Opens (or creates) the replica of `entity` whose metadata lives in `state_dir`,
    /// reading and writing rows through `projection`, and finishes any apply a crash
    /// interrupted.
    pub fn open(
        state_dir: &Path,
        datasource: Box<dyn Datasource>,
        entity: &str,
        key: &[String],
        projection: Projection,
    ) -> Result<Self, SchemaError> {
        let metadata = match MetadataStore::open(state_dir) {
            Ok(m) => m,
            Err(crate::metadata::MetadataError::NotAReplica { .. }) => {
                MetadataStore::create(state_dir).map_err(StoreError::from)?
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        let recording = Arc::new(AtomicBool::new(false));
        let units = RowUnits {
            inner: SledItems,
            recording: Arc::clone(&recording),
        };
        let replica = Replica::with_parts(metadata, Box::new(units), Arc::new(SystemClock));
        let mut table = Self {
            replica,
            datasource,
            entity: entity.to_string(),
            key: key.to_vec(),
            projection,
            recording,
        };
        table.apply_pending()?;
        Ok(table)
    }

    pub fn replica(&mut self) -> &mut Replica {
        &mut self.replica
    }

    /// Full change detection: reads every row and turns what differs from the units
    /// into local versions; rows that vanished become tombstones.
    pub fn detect_full(&mut self) -> Result<DetectReport, SchemaError> {
        let detection = self.scan_changes()?;
        self.commit_changes(detection)
    }

    /// The first half of a detection: what changed, committed to nothing yet, so a
    /// caller can refuse it (a mass delete from a source that read back empty).
    pub fn scan_changes(&mut self) -> Result<Detection, SchemaError> {
        let mut report = DetectReport::default();
        let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut changes: Vec<(ItemId, Option<Vec<u8>>)> = Vec::new();
        let metadata = self.replica.metadata();
        let mut rows: Vec<Row> = Vec::new();
        self.datasource
            .scan(&self.entity, &mut |row| {
                rows.push(row);
                Ok(())
            })
            .map_err(SchemaError::from)?;
        for row in rows {
            report.rows_read += 1;
            let key_values: Vec<Value> = self
                .key
                .iter()
                .map(|k| row.get(k).cloned().unwrap_or(Value::Null))
                .collect();
            let key_text: Vec<String> = key_values.iter().map(Value::to_text).collect();
            if let Some(missing) = self.key.iter().zip(&key_values).find(|(_, v)| v.is_null()) {
                report.failed.push(RowFailure {
                    key: key_text,
                    field: missing.0.clone(),
                    reason: "a key field is empty".into(),
                });
                continue;
            }
            let prefix = row_prefix(&key_values);
            if !self.projection.matches(&row) {
                // Absent as far as sync goes: its units, if any, are deleted below.
                report.filtered += 1;
                continue;
            }
            seen.insert(prefix.clone());
            let units = match self.projection.read(&row) {
                Ok(units) => units,
                Err(e) => {
                    report.failed.push(RowFailure {
                        key: key_text,
                        field: e.field,
                        reason: e.reason,
                    });
                    continue;
                }
            };
            let exists = unit_id(&prefix, "")?;
            let is_new = metadata
                .item(&exists)
                .map_err(StoreError::from)?
                .is_none_or(|m| m.deleted);
            if is_new {
                changes.push((exists, Some(Vec::new())));
            }
            let mut changed = false;
            for (unit, value) in units {
                let id = unit_id(&prefix, &unit)?;
                let stored = metadata
                    .item_record(&id)
                    .map_err(StoreError::from)?
                    .filter(|(m, _)| !m.deleted)
                    .and_then(|(_, data)| data)
                    .map(|d| decode_value(&d))
                    .transpose()
                    .map_err(|reason| SchemaError::Table { reason })?;
                if stored.as_ref().is_none_or(|s| !same_value(s, &value)) {
                    changes.push((id, Some(encode_value(&value))));
                    changed = true;
                }
            }
            if is_new {
                report.inserted += 1;
            } else if changed {
                report.updated += 1;
            }
        }
        // Rows the replica holds that the datasource no longer has.
        for entry in metadata.items_from(b"") {
            let (id, meta) = entry.map_err(StoreError::from)?;
            let Some((prefix, unit)) = split_unit(id.as_bytes()) else {
                continue;
            };
            if meta.deleted || seen.contains(prefix) {
                continue;
            }
            if unit.is_empty() {
                report.deleted += 1;
            }
            changes.push((id, None));
        }
        Ok(Detection { report, changes })
    }

    /// The second half: the changes become local versions, in one commit.
    pub fn commit_changes(&mut self, detection: Detection) -> Result<DetectReport, SchemaError> {
        self.replica
            .apply_local(&detection.changes)
            .map_err(SchemaError::from)?;
        self.replica.flush().map_err(SchemaError::from)?;
        Ok(detection.report)
    }

    /// How many rows the replica holds (live row-existence units).
    pub fn row_count(&self) -> Result<u64, SchemaError> {
        let mut rows = 0;
        for entry in self.replica.metadata().items_from(b"") {
            let (id, meta) = entry.map_err(StoreError::from)?;
            if !meta.deleted && split_unit(id.as_bytes()).is_some_and(|(_, unit)| unit.is_empty()) {
                rows += 1;
            }
        }
        Ok(rows)
    }

    /// Syncs with another table replica (whose datasource may be of another kind), then
    /// writes the rows each side received into its datasource. Returns the sync's report,
    /// then this side's apply report, then the other side's.
    pub fn sync_with(
        &mut self,
        other: &mut TableReplica,
        options: &SessionOptions,
        observer: &mut dyn SyncObserver,
    ) -> Result<(SyncReport, ApplyReport, ApplyReport), SchemaError> {
        self.recording.store(true, Ordering::SeqCst);
        other.recording.store(true, Ordering::SeqCst);
        let report = self
            .replica
            .sync_with(&mut other.replica, options, observer);
        self.recording.store(false, Ordering::SeqCst);
        other.recording.store(false, Ordering::SeqCst);
        // Whatever the sync did commit is applied, even if it stopped early.
        let mine = self.apply_pending()?;
        let theirs = other.apply_pending()?;
        Ok((report?, mine, theirs))
    }

    /// One session from this replica to `other` (the options' direction is ignored),
    /// then the rows `other` received are written into its datasource.
    pub fn send_to(
        &mut self,
        other: &mut TableReplica,
        options: &SessionOptions,
        observer: &mut dyn SyncObserver,
    ) -> Result<(SessionStats, ApplyReport), SchemaError> {
        other.recording.store(true, Ordering::SeqCst);
        let stats = crate::sync::run_session(
            &mut self.replica,
            &mut other.replica,
            options,
            observer,
            &SystemClock,
        );
        other.recording.store(false, Ordering::SeqCst);
        // Whatever the session did commit is applied, even if it stopped early.
        let applied = other.apply_pending()?;
        Ok((stats?, applied))
    }

    /// A sync with the defaults and no observer.
    pub fn sync(&mut self, other: &mut TableReplica) -> Result<SyncReport, SchemaError> {
        Ok(self
            .sync_with(other, &SessionOptions::default(), &mut NoObserver)?
            .0)
    }

    /// Writes every row marked pending into the datasource, from the units, and clears
    /// the markers of the rows that were written.
    pub fn apply_pending(&mut self) -> Result<ApplyReport, SchemaError> {
        let pending = self
            .replica
            .metadata()
            .pending()
            .map_err(StoreError::from)?;
        let mut report = ApplyReport::default();
        if pending.is_empty() {
            return Ok(report);
        }
        let mut upserts: Vec<(Vec<u8>, Row)> = Vec::new();
        let mut deletes: Vec<(Vec<u8>, Row)> = Vec::new();
        for prefix in &pending {
            let key_text = key_of_prefix(prefix);
            let mut key_row: Row = self
                .key
                .iter()
                .cloned()
                .zip(key_text.into_iter().map(Value::Text))
                .collect();
            let exists = unit_id(prefix, "")?;
            let live = self
                .replica
                .metadata()
                .item(&exists)
                .map_err(StoreError::from)?
                .is_some_and(|m| !m.deleted);
            if !live {
                deletes.push((prefix.clone(), key_row));
                continue;
            }
            let mut units: BTreeMap<String, Value> = BTreeMap::new();
            for rule in &self.projection.units {
                let id = unit_id(prefix, &rule.unit)?;
                let data = self
                    .replica
                    .metadata()
                    .data(&id)
                    .map_err(StoreError::from)?;
                if let Some(data) = data {
                    let value =
                        decode_value(&data).map_err(|reason| SchemaError::Table { reason })?;
                    units.insert(rule.unit.clone(), value);
                }
            }
            match self.projection.write(&units) {
                Ok(row) => {
                    // Typed values from the units win over the prefix's key text.
                    key_row.extend(row);
                    upserts.push((prefix.clone(), key_row));
                }
                Err(e) => report.refused.push((
                    self.key_text(&key_row),
                    format!("field {}: {}", e.field, e.reason),
                )),
            }
        }
        let mut done: Vec<Vec<u8>> = Vec::new();
        let outcomes = self
            .datasource
            .upsert(
                &self.entity,
                &self.key,
                &upserts.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            )
            .map_err(SchemaError::from)?;
        for ((prefix, row), outcome) in upserts.into_iter().zip(outcomes) {
            match outcome {
                RowOutcome::Written => {
                    report.upserted += 1;
                    done.push(prefix);
                }
                RowOutcome::Refused { reason } => {
                    report.refused.push((self.key_text(&row), reason));
                }
            }
        }
        let outcomes = self
            .datasource
            .delete(
                &self.entity,
                &self.key,
                &deletes.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            )
            .map_err(SchemaError::from)?;
        for ((prefix, row), outcome) in deletes.into_iter().zip(outcomes) {
            match outcome {
                RowOutcome::Written => {
                    report.deleted += 1;
                    done.push(prefix);
                }
                RowOutcome::Refused { reason } => {
                    report.refused.push((self.key_text(&row), reason));
                }
            }
        }
        self.replica
            .clear_pending(&done)
            .map_err(SchemaError::from)?;
        self.replica.flush().map_err(SchemaError::from)?;
        Ok(report)
    }

    fn key_text(&self, row: &Row) -> Vec<String> {
        self.key
            .iter()
            .map(|k| row.get(k).map(Value::to_text).unwrap_or_default())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_prefixes_keep_parts_apart_and_round_trip() {
        let a = row_prefix(&[Value::Text("a\0b".into()), Value::Int(7)]);
        assert_eq!(key_of_prefix(&a), ["a\0b", "7"]);
        let id = [a.clone(), b"name".to_vec()].concat();
        let (prefix, unit) = split_unit(&id).expect("unit");
        assert_eq!((prefix, unit), (a.as_slice(), &b"name"[..]));
        // ("a", "bc") and ("ab", "c") must not share a prefix.
        let x = row_prefix(&[Value::Text("a".into()), Value::Text("bc".into())]);
        let y = row_prefix(&[Value::Text("ab".into()), Value::Text("c".into())]);
        assert_ne!(x, y);
    }

    #[test]
    fn values_round_trip_through_unit_data() {
        for v in [
            Value::Null,
            Value::Bool(true),
            Value::Int(-36),
            Value::Float(2.5),
            Value::Text("Ada Lovelace".into()),
        ] {
            assert_eq!(decode_value(&encode_value(&v)), Ok(v));
        }
        assert!(decode_value(&[TAG_INT, 1, 2]).is_err());
        assert!(decode_value(&[]).is_err());
    }
}
