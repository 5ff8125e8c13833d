//! A datasource entity as a replica of the engine, with fields as change units.
//!
//! A row is items of its own, under ids `row prefix ‖ unit name`: a row-existence unit
//! (the empty name, so it sorts first and a row's units are adjacent) and a unit per
//! field that changed since the row arrived. The existence unit's data is the row as it
//! arrived: every unit's value, a snapshot. A field's value is its own unit's while
//! that unit is live, the snapshot's otherwise. So a row costs one item until its
//! fields are edited (an initial load moves one item per row, not one per field), and
//! two replicas that edit different fields of a row concurrently still change
//! different items and merge without a conflict; the same field edited on both sides is
//! one conflict, on that field (scenario 19). The engine is unchanged: knowledge,
//! batching, policies and recovery apply to units as to items.
//!
//! Invariants:
//! - The metadata store is the truth for what the replica holds; the datasource is
//!   brought to it. Every commit that changes a unit from a sync also marks its row
//!   pending, in the same atomic commit; the row is then written to the datasource
//!   (idempotently, by key) and the mark cleared. A crash in between leaves the mark,
//!   and the next open replays the write, so a half-done apply never shows up as a
//!   local change.
//! - Change detection compares the datasource with the row's values (snapshot, then
//!   live field units): a field that differs gets a new version of its own unit; a row
//!   that vanished becomes tombstones for all its live units; a row that comes back
//!   after a delete gets a new snapshot and a new version of every field unit, so
//!   that a concurrent edit of any of its fields meets it as a conflict.
//!   Values equal as text (`36` in a CSV file, `36` in an INTEGER column) are equal.
//! - An existence unit with empty data (stores written before snapshots) has every
//!   field in units of its own.
//! - A detection's anchor moves in its last commit, never before its versions: a
//!   detection cut short (a crash, a read that broke off, a run that refused it) leaves
//!   versions behind the anchor, and the next detection reads those rows again and
//!   finds them unchanged. Rows a first load committed that way are counted in the
//!   replica (`UNREPORTED_RECORD`) until a committed detection reports them inserted.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::metadata::{Commit, MetadataStore};
use crate::model::ItemId;
use crate::stores::{Datasource, DatasourceError, Replica, Row, SledItems, StoreError, Value};
use crate::sync::{
    ItemStore, NoObserver, SessionOptions, SessionStats, SyncObserver, SyncReport, SystemClock,
};

use super::rows::{ApplyReport, RowShape, SoftDelete, StoredRows, Written};
use super::watermark::{lower_bound, Anchor};
use super::{Projection, SchemaError};

/// The owner record that holds this side's Incremental anchor.
const ANCHOR_RECORD: &[u8] = b"detect-anchor";
/// The owner record that lists the keys of rows the last detection could not read
/// (a failed conversion, say): the next Incremental detection reads them again, so the
/// anchor moving past them loses nothing.
const RETRY_RECORD: &[u8] = b"detect-retry";
/// The owner record that counts rows a first load committed as it read them (see
/// `detect_changes_committing`) whose detection was never committed: the run stopped.
/// The next detection finds those rows unchanged, and reports them as inserted from
/// this count instead, so that no run's report loses them.
const UNREPORTED_RECORD: &[u8] = b"detect-unreported";

fn encode_count(count: u64) -> [u8; 8] {
    count.to_le_bytes()
}

/// How a detection finds what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetectMode {
    /// Read every row; rows that vanished become tombstones.
    Full,
    /// Read only rows changed since the stored anchor, reaching `lookback` further
    /// back (see [`crate::schema::SyncSchema::lookback`]). The first Incremental
    /// detection of a side has no anchor and reads everything.
    Incremental { lookback: u64 },
}

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
    changes: Vec<Change>,
    /// The anchor to store with the changes (`None`: keep the stored one).
    anchor: Option<Anchor>,
    /// The keys of rows to read again next time, replacing the stored list.
    retry: Vec<Vec<Value>>,
    /// Rows an earlier, uncommitted detection committed and never reported (they are
    /// in `report.inserted`), or this one committed as it read: `commit_changes`
    /// clears the count.
    unreported: u64,
    /// The anchor the detection started from, for the run's report.
    pub anchor_before: Option<String>,
    /// The anchor after commit (the stored one when this detection sets none).
    pub anchor_after: Option<String>,
}

impl Detection {
    /// The value each changed unit will have (`None`: deleted), by item.
    pub fn changed_units(&self) -> impl Iterator<Item = (&ItemId, Option<&[u8]>)> {
        self.changes.iter().map(|(id, data)| (id, data.as_deref()))
    }
}

/// A unit's new value (`None`: deleted), as a detection finds it.
type Change = (ItemId, Option<Vec<u8>>);

/// Most local versions one commit of a detection writes.
const COMMIT_CHUNK: usize = 10_000;

/// Rows a detection reads per chunk, and chunks read ahead of the comparing, at most.
const SCAN_CHUNK: usize = 1000;
const SCAN_QUEUE: usize = 4;

/// Rows between two progress calls of a detection.
const READ_PROGRESS_EVERY: u64 = 1000;

/// What the rows read so far by a detection have turned into.
struct Findings<'a> {
    /// Hears the count of rows read, every `READ_PROGRESS_EVERY` rows.
    observe: &'a mut dyn FnMut(u64),
    report: DetectReport,
    changes: Vec<Change>,
    /// Row prefixes already settled (read, found absent, or pending): the Full sweep
    /// leaves them alone.
    settled: HashSet<Vec<u8>>,
    /// Rows whose write into the datasource is still pending: the datasource does
    /// not show their units yet, so reading them now would mistake that for a change.
    pending: BTreeSet<Vec<u8>>,
    /// Keys of rows that could not be read as units, to read again next time.
    retry: Vec<Vec<Value>>,
    /// Rows committed and not yet reported by a committed detection (see
    /// `UNREPORTED_RECORD`): an earlier detection's, and this one's first load.
    unreported: u64,
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
pub(crate) fn key_of_prefix(prefix: &[u8]) -> Vec<String> {
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
pub(crate) fn split_unit(id: &[u8]) -> Option<(&[u8], &[u8])> {
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

pub(super) fn unit_id(prefix: &[u8], unit: &str) -> Result<ItemId, SchemaError> {
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
    let mut out = Vec::with_capacity(encoded_len(value));
    encode_value_into(value, &mut out);
    out
}

fn encoded_len(value: &Value) -> usize {
    match value {
        Value::Null => 1,
        Value::Bool(_) => 2,
        Value::Int(_) | Value::Float(_) => 9,
        Value::Text(s) => 1 + s.len(),
    }
}

fn encode_value_into(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(TAG_NULL),
        Value::Bool(b) => out.extend_from_slice(&[TAG_BOOL, u8::from(*b)]),
        Value::Int(i) => {
            out.push(TAG_INT);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(TAG_FLOAT);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Text(s) => {
            out.push(TAG_TEXT);
            out.extend_from_slice(s.as_bytes());
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

/// The first bytes of an existence unit's snapshot: `S`, then the snapshot format.
const SNAPSHOT_HEAD: [u8; 2] = [b'S', 1];

/// A row's units as an existence unit's data: [`SNAPSHOT_HEAD`], then per unit its
/// name and its value (as [`encode_value`]), each behind a u32 LE length.
fn encode_snapshot(units: &[(String, Value)]) -> Vec<u8> {
    let len: usize = units
        .iter()
        .map(|(name, value)| 8 + name.len() + encoded_len(value))
        .sum();
    let mut out = Vec::with_capacity(SNAPSHOT_HEAD.len() + len);
    out.extend_from_slice(&SNAPSHOT_HEAD);
    for (name, value) in units {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(encoded_len(value) as u32).to_le_bytes());
        encode_value_into(value, &mut out);
    }
    out
}

/// The units of a snapshot, into `out`. Empty data (a store written before snapshots)
/// holds none.
pub(super) fn decode_snapshot(
    bytes: &[u8],
    out: &mut BTreeMap<String, Value>,
) -> Result<(), String> {
    if bytes.is_empty() {
        return Ok(());
    }
    let mut rest = bytes
        .strip_prefix(&SNAPSHOT_HEAD[..])
        .ok_or("the row snapshot has an unknown head")?;
    while !rest.is_empty() {
        let name = std::str::from_utf8(snapshot_part(&mut rest)?)
            .map_err(|_| "a unit name in the row snapshot is not UTF-8")?;
        let value = decode_value(snapshot_part(&mut rest)?)?;
        out.insert(name.to_string(), value);
    }
    Ok(())
}

/// The next length-prefixed part of a snapshot.
fn snapshot_part<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let (len, tail) = rest.split_at_checked(4).ok_or("truncated row snapshot")?;
    let len = u32::from_le_bytes(len.try_into().map_err(|_| "truncated row snapshot")?);
    let (part, tail) = tail
        .split_at_checked(len as usize)
        .ok_or("truncated row snapshot")?;
    *rest = tail;
    Ok(part)
}

/// A list of keys (each a list of values) as bytes: counts and lengths as u32 LE.
fn encode_keys(keys: &[Vec<Value>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for key in keys {
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        for value in key {
            let bytes = encode_value(value);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
    }
    out
}

fn decode_keys(bytes: &[u8]) -> Result<Vec<Vec<Value>>, String> {
    let mut at = 0usize;
    let next_u32 = |at: &mut usize| -> Result<usize, String> {
        let end = at.checked_add(4).filter(|e| *e <= bytes.len());
        let end = end.ok_or("truncated")?;
        let n = u32::from_le_bytes(bytes[*at..end].try_into().map_err(|_| "truncated")?);
        *at = end;
        Ok(n as usize)
    };
    let count = next_u32(&mut at)?;
    // Each key takes at least 4 bytes: a count that claims more is damage.
    if count > bytes.len() / 4 {
        return Err("count larger than the record".into());
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        let parts = next_u32(&mut at)?;
        if parts > bytes.len() / 4 {
            return Err("count larger than the record".into());
        }
        let mut key = Vec::with_capacity(parts);
        for _ in 0..parts {
            let len = next_u32(&mut at)?;
            let end = at
                .checked_add(len)
                .filter(|e| *e <= bytes.len())
                .ok_or("truncated")?;
            key.push(decode_value(&bytes[at..end])?);
            at = end;
        }
        keys.push(key);
    }
    if at != bytes.len() {
        return Err("trailing bytes".into());
    }
    Ok(keys)
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
    shape: Arc<RowShape>,
    writer: RowWriter,
    recording: Arc<AtomicBool>,
    staged: Arc<std::sync::Mutex<StagedRows>>,
}

impl ItemStore for RowUnits {
    fn data_in_record(&self) -> bool {
        self.inner.data_in_record()
    }

    fn read(&self, metadata: &MetadataStore, item: &ItemId) -> Result<Option<Vec<u8>>, String> {
        self.inner.read(metadata, item)
    }

    /// A batch keeps a row's units together, and its size counts rows.
    fn batch_group<'a>(&self, item: &'a [u8]) -> &'a [u8] {
        split_unit(item).map_or(item, |(prefix, _)| prefix)
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
            // Units arrive in id order, so a row's units are adjacent: its marker is
            // written with its first unit (markers stay until the session is over, and
            // a commit that fails ends the session).
            let first_unit = self.staged.lock().map_or(true, |mut staged| {
                let first = staged.last != prefix;
                if first {
                    staged.last = prefix.to_vec();
                    staged.count += 1;
                    if staged.forward {
                        staged.unsent.push(prefix.to_vec());
                    }
                }
                first
            });
            if first_unit {
                commit.mark_pending(prefix);
            }
        }
        Ok(())
    }

    /// Hands the rows of the batch just committed to the session's writer, if it has
    /// one. A row that cannot be read here stays pending: the apply after the session
    /// reads it again and reports why.
    fn committed(&mut self, metadata: &MetadataStore) {
        let unsent = match self.staged.lock() {
            Ok(mut staged) => std::mem::take(&mut staged.unsent),
            Err(_) => return,
        };
        if unsent.is_empty() {
            return;
        }
        let Ok(link) = self.writer.lock() else {
            return;
        };
        if let (Some(sender), Ok(stored)) = (&link.rows, self.shape.read_stored(metadata, &unsent))
        {
            // A writer that stopped (its datasource failed) leaves the rows pending.
            let _ = sender.send(stored);
        }
    }
}

/// A session's link to its writer thread (see `send_to`): the rows of each batch, as
/// stored, go out to be made into datasource rows and written.
#[derive(Default)]
struct WriterLink {
    rows: Option<std::sync::mpsc::SyncSender<StoredRows>>,
}

/// Where a session's rows go to be written while it runs: empty outside `send_to`.
type RowWriter = Arc<std::sync::Mutex<WriterLink>>;

/// Batches of rows read and not yet written, at most: a session that runs ahead of its
/// writer waits for it rather than holding the whole sync in memory.
const WRITER_QUEUE: usize = 4;

/// Rows the writer gathers from the queue into one datasource call, at most (give or
/// take a batch).
const WRITE_ROWS_AT_ONCE: usize = 10_000;

/// What change detection reads a row against: the replica's units and the side's
/// shape. Apart from the datasource, so that rows are compared as the datasource
/// hands them over instead of after all of them were read into memory.
struct RowReader<'a> {
    /// `None`: the replica held nothing when the detection began, so every row is new
    /// and nothing needs to be looked up (its units are being committed meanwhile).
    replica: Option<&'a Replica>,
    shape: &'a RowShape,
}

impl RowReader<'_> {
    /// Compares one row read from the datasource with its units.
    fn consider_row(&self, row: &Row, found: &mut Findings<'_>) -> Result<(), SchemaError> {
        found.report.rows_read += 1;
        if found.report.rows_read % READ_PROGRESS_EVERY == 0 {
            (found.observe)(found.report.rows_read);
        }
        let key_values: Vec<Value> = self
            .shape
            .key
            .iter()
            .map(|k| row.get(k).cloned().unwrap_or(Value::Null))
            .collect();
        let key_text = || {
            key_values
                .iter()
                .map(Value::to_text)
                .collect::<Vec<String>>()
        };
        if let Some(missing) = self
            .shape
            .key
            .iter()
            .zip(&key_values)
            .find(|(_, v)| v.is_null())
        {
            found.report.failed.push(RowFailure {
                key: key_text(),
                field: missing.0.clone(),
                reason: "a key field is empty".into(),
            });
            return Ok(());
        }
        let prefix = row_prefix(&key_values);
        if found.pending.contains(&prefix) || !found.settled.insert(prefix.clone()) {
            return Ok(());
        }
        let soft_deleted = self
            .shape
            .soft_delete
            .as_ref()
            .and_then(|s| row.get(&s.field))
            .is_some_and(marks_deleted);
        if soft_deleted || !self.shape.projection.matches(row) {
            // Absent as far as sync goes.
            if !soft_deleted {
                found.report.filtered += 1;
            }
            return self.remove_row(&prefix, found);
        }
        let units = match self.shape.projection.read(row) {
            Ok(units) => units,
            Err(e) => {
                found.report.failed.push(RowFailure {
                    key: key_text(),
                    field: e.field,
                    reason: e.reason,
                });
                found.retry.push(key_values);
                return Ok(());
            }
        };
        let exists = unit_id(&prefix, "")?;
        let stored = match self.replica {
            Some(replica) => self.shape.stored_row(replica.metadata(), &prefix)?,
            None => None,
        };
        match stored {
            None => {
                // The row is new here: one item, its snapshot, carries every field.
                found.changes.push((exists, Some(encode_snapshot(&units))));
                found.report.inserted += 1;
            }
            Some(stored) if !stored.live => {
                // Back after a delete: a new snapshot, and a new version of every field
                // unit, so that a concurrent edit of a field elsewhere is a conflict
                // and not silently laid over the new row.
                found.changes.push((exists, Some(encode_snapshot(&units))));
                for (unit, value) in units {
                    found
                        .changes
                        .push((unit_id(&prefix, &unit)?, Some(encode_value(&value))));
                }
                found.report.inserted += 1;
            }
            Some(stored) => {
                let mut changed = false;
                for (unit, value) in units {
                    if stored
                        .values
                        .get(&unit)
                        .is_none_or(|s| !same_value(s, &value))
                    {
                        found
                            .changes
                            .push((unit_id(&prefix, &unit)?, Some(encode_value(&value))));
                        changed = true;
                    }
                }
                if changed {
                    found.report.updated += 1;
                }
            }
        }
        Ok(())
    }

    /// Tombstones for every live unit of a row that is absent (gone, filtered out or
    /// marked deleted).
    fn remove_row(&self, prefix: &[u8], found: &mut Findings<'_>) -> Result<(), SchemaError> {
        found.settled.insert(prefix.to_vec());
        let Some(replica) = self.replica else {
            return Ok(());
        };
        for entry in replica.metadata().items_from(prefix) {
            let (id, meta) = entry.map_err(StoreError::from)?;
            let Some((of, unit)) = split_unit(id.as_bytes()) else {
                break;
            };
            if of != prefix {
                break;
            }
            if meta.deleted {
                continue;
            }
            if unit.is_empty() {
                found.report.deleted += 1;
            }
            found.changes.push((id, None));
        }
        Ok(())
    }
}

/// The committing thread of a first load (see `TableReplica::read_all`): commits each
/// batch of changes it receives, counting the rows among them in `UNREPORTED_RECORD`
/// (in the same commit) until `commit_changes` reports them. Returns the count.
fn commit_first_load(
    replica: &mut Replica,
    batches: std::sync::mpsc::Receiver<Vec<Change>>,
    mut unreported: u64,
) -> Result<u64, StoreError> {
    for changes in batches {
        unreported += changes
            .iter()
            .filter(|(id, value)| {
                value.is_some() && split_unit(id.as_bytes()).is_some_and(|(_, u)| u.is_empty())
            })
            .count() as u64;
        let count = encode_count(unreported);
        replica.apply_local_with_records(&changes, &[(UNREPORTED_RECORD, count.as_slice())])?;
    }
    Ok(unreported)
}

// ---- the table replica ----------------------------------------------------------------

/// One entity of one datasource, kept as a replica whose metadata lives in its own
/// folder.
pub struct TableReplica {
    replica: Replica,
    datasource: Box<dyn Datasource>,
    shape: Arc<RowShape>,
    recording: Arc<AtomicBool>,
    /// Row prefixes staged by the current session, in order (for progress).
    staged: Arc<std::sync::Mutex<StagedRows>>,
    modified_at: Option<String>,
    /// While a session runs: where its batches' rows go to be written (see `send_to`).
    writer: RowWriter,
    /// What the apply at open (the retry of pending rows) did.
    recovered: ApplyReport,
}

/// Whether a tombstone column's value marks its row deleted.
fn marks_deleted(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Int(i) => *i != 0,
        Value::Float(x) => *x != 0.0,
        Value::Text(t) => {
            let t = t.trim().to_ascii_lowercase();
            !matches!(t.as_str(), "" | "0" | "false" | "f" | "no" | "n")
        }
    }
}

/// A row as one side holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowState {
    pub(crate) live: bool,
    pub(crate) latest: crate::model::Hlc,
}

/// Reads the staged-row count of a table replica while a session holds it.
pub(crate) struct StagedCounter(Arc<std::sync::Mutex<StagedRows>>);

impl StagedCounter {
    pub(crate) fn count(&self) -> u64 {
        self.0.lock().map_or(0, |s| s.count)
    }
}

/// The distinct rows a session has staged so far.
#[derive(Debug, Default)]
pub(crate) struct StagedRows {
    last: Vec<u8>,
    pub(crate) count: u64,
    /// Whether rows are handed to a writer as their batches commit (`send_to`).
    forward: bool,
    /// Rows staged since the last commit, not yet handed to the writer.
    unsent: Vec<Vec<u8>>,
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
        Self::open_with(state_dir, datasource, entity, key, projection, None, None)
    }

    /// `open`, with the side's modified-at column (for Incremental reads) and tombstone
    /// column (a row whose value there marks it deleted counts as absent, and a delete
    /// synced into this side sets it instead of removing the row).
    pub fn open_with(
        state_dir: &Path,
        mut datasource: Box<dyn Datasource>,
        entity: &str,
        key: &[String],
        projection: Projection,
        modified_at: Option<String>,
        deleted_field: Option<String>,
    ) -> Result<Self, SchemaError> {
        let soft_delete = match deleted_field {
            None => None,
            Some(field) => {
                let info = datasource.describe(entity)?;
                let field_type =
                    info.field(&field)
                        .map(|f| f.field_type)
                        .ok_or_else(|| SchemaError::Table {
                            reason: format!(
                                "datasource {}, entity {entity}: the tombstone field {field:?} \
                             does not exist",
                                datasource.name()
                            ),
                        })?;
                Some(SoftDelete { field, field_type })
            }
        };
        let metadata = match MetadataStore::open(state_dir) {
            Ok(m) => m,
            Err(crate::metadata::MetadataError::NotAReplica { .. }) => {
                MetadataStore::create(state_dir).map_err(StoreError::from)?
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        let recording = Arc::new(AtomicBool::new(false));
        let staged = Arc::new(std::sync::Mutex::new(StagedRows::default()));
        let shape = Arc::new(RowShape::new(entity, key, projection, soft_delete));
        let writer = RowWriter::default();
        let units = RowUnits {
            inner: SledItems,
            shape: Arc::clone(&shape),
            writer: Arc::clone(&writer),
            recording: Arc::clone(&recording),
            staged: Arc::clone(&staged),
        };
        let replica = Replica::with_parts(metadata, Box::new(units), Arc::new(SystemClock));
        let mut table = Self {
            replica,
            datasource,
            shape,
            recording,
            staged,
            modified_at,
            writer,
            recovered: ApplyReport::default(),
        };
        table.recovered = table.apply_pending()?;
        Ok(table)
    }

    pub fn replica(&mut self) -> &mut Replica {
        &mut self.replica
    }

    fn row_reader(&self) -> RowReader<'_> {
        RowReader {
            replica: Some(&self.replica),
            shape: &self.shape,
        }
    }

    /// Moves this side's clock past `other`'s, so that what this side detects next is
    /// later, for last-writer-wins, than anything `other` has detected.
    pub(crate) fn follow_clock_of(&mut self, other: &TableReplica) -> Result<(), SchemaError> {
        let seen = other.replica.metadata().last_hlc();
        self.replica.observe_clock(seen).map_err(SchemaError::from)
    }

    /// The datasource's name, as the configuration calls it.
    pub fn datasource_name(&self) -> &str {
        self.datasource.name()
    }

    /// What the apply at open (rows left pending by an earlier run) did.
    pub fn recovered(&self) -> &ApplyReport {
        &self.recovered
    }

    /// Whether this side's store can install triggers for Incremental reads.
    pub fn supports_tracking(&self) -> bool {
        self.datasource.supports_tracking()
    }

    pub(crate) fn reset_staged_rows(&self) {
        if let Ok(mut s) = self.staged.lock() {
            *s = StagedRows::default();
        }
    }

    /// A handle on the count of rows staged by the current session, readable while
    /// the session holds the replica.
    pub(crate) fn staged_counter(&self) -> StagedCounter {
        StagedCounter(Arc::clone(&self.staged))
    }

    /// The units this side holds in versions `other` does not know: what a session
    /// from this side to `other` would send. Costs what changed, not what is stored.
    pub fn changes_unknown_to(&self, other: &TableReplica) -> Result<Vec<ItemId>, SchemaError> {
        let known = other.replica.metadata().knowledge();
        Ok(self
            .replica
            .metadata()
            .changes_unknown_to(&known)
            .map_err(StoreError::from)?)
    }

    /// The current value of each unit (`None`: deleted or absent).
    pub(crate) fn unit_values(
        &self,
        items: &[ItemId],
    ) -> Result<std::collections::HashMap<ItemId, Option<Value>>, SchemaError> {
        let mut out = std::collections::HashMap::with_capacity(items.len());
        for item in items {
            // A row-existence unit holds no value.
            if split_unit(item.as_bytes()).is_none_or(|(_, unit)| unit.is_empty()) {
                continue;
            }
            let value = self
                .replica
                .metadata()
                .item_record(item)
                .map_err(StoreError::from)?
                .filter(|(m, _)| !m.deleted)
                .and_then(|(_, data)| data)
                .map(|d| decode_value(&d))
                .transpose()
                .map_err(|reason| SchemaError::Table { reason })?;
            out.insert(item.clone(), value);
        }
        Ok(out)
    }

    /// Whether the row is live here and when any of its units last changed; `None`
    /// when this side holds nothing of it.
    pub(crate) fn row_state(&self, prefix: &[u8]) -> Result<Option<RowState>, SchemaError> {
        let mut state: Option<RowState> = None;
        for entry in self.replica.metadata().items_from(prefix) {
            let (id, meta) = entry.map_err(StoreError::from)?;
            match split_unit(id.as_bytes()) {
                Some((of, unit)) if of == prefix => {
                    let s = state.get_or_insert(RowState {
                        live: false,
                        latest: meta.timestamp,
                    });
                    s.latest = s.latest.max(meta.timestamp);
                    if unit.is_empty() {
                        s.live = !meta.deleted;
                    }
                }
                _ => break,
            }
        }
        Ok(state)
    }

    /// Gives every live unit of a row a fresh local version with its current value, so
    /// that the whole row is newer than, and concurrent with, whatever the other side
    /// did to it.
    pub(crate) fn restamp_row(&mut self, prefix: &[u8]) -> Result<(), SchemaError> {
        let mut changes = Vec::new();
        for entry in self.replica.metadata().items_from(prefix) {
            let (id, meta) = entry.map_err(StoreError::from)?;
            match split_unit(id.as_bytes()) {
                Some((of, _)) if of == prefix => {
                    if !meta.deleted {
                        let data = self
                            .replica
                            .metadata()
                            .data(&id)
                            .map_err(StoreError::from)?
                            .unwrap_or_default();
                        changes.push((id, Some(data)));
                    }
                }
                _ => break,
            }
        }
        self.replica
            .apply_local(&changes)
            .map_err(SchemaError::from)?;
        Ok(())
    }

    /// Full change detection: reads every row and turns what differs from the units
    /// into local versions; rows that vanished become tombstones.
    pub fn detect_full(&mut self) -> Result<DetectReport, SchemaError> {
        let detection = self.detect(DetectMode::Full, &mut |_| {}, true)?;
        self.commit_changes(detection)
    }

    /// The first half of a Full detection: what changed, committed to nothing yet, so
    /// a caller can refuse it (a mass delete from a source that read back empty).
    pub fn scan_changes(&mut self) -> Result<Detection, SchemaError> {
        self.detect_changes(DetectMode::Full)
    }

    /// The first half of a detection in `mode`.
    pub fn detect_changes(&mut self, mode: DetectMode) -> Result<Detection, SchemaError> {
        self.detect_changes_observed(mode, &mut |_| {})
    }

    /// `detect_changes`, telling `observe` how many rows it has read every thousand
    /// rows, so that a long read shows progress.
    pub fn detect_changes_observed(
        &mut self,
        mode: DetectMode,
        observe: &mut dyn FnMut(u64),
    ) -> Result<Detection, SchemaError> {
        self.detect(mode, observe, false)
    }

    /// `detect_changes_observed`, except that a replica that holds nothing yet (a first
    /// load, read whole) commits its new rows while it reads them, on a thread of its
    /// own: the returned detection then holds only the anchor and the retry list, for
    /// `commit_changes`. The versions are in before the caller can refuse the
    /// detection; what stays out until `commit_changes` is the anchor, so a caller that
    /// never commits leaves them as a crash between two commits would: the next
    /// detection reads those rows again and finds them unchanged.
    pub fn detect_changes_committing(
        &mut self,
        mode: DetectMode,
        observe: &mut dyn FnMut(u64),
    ) -> Result<Detection, SchemaError> {
        self.detect(mode, observe, true)
    }

    fn detect(
        &mut self,
        mode: DetectMode,
        observe: &mut dyn FnMut(u64),
        commit_new: bool,
    ) -> Result<Detection, SchemaError> {
        let pending: BTreeSet<Vec<u8>> = self
            .replica
            .metadata()
            .pending()
            .map_err(StoreError::from)?
            .into_iter()
            .collect();
        let mut found = Findings {
            observe,
            report: DetectReport::default(),
            changes: Vec::new(),
            settled: pending.iter().cloned().collect(),
            pending,
            retry: Vec::new(),
            unreported: self.stored_unreported()?,
        };
        // Rows a stopped run committed are inserted as far as this run's report goes.
        found.report.inserted += found.unreported;
        let stored = self.stored_anchor()?;
        let anchor_before = stored.as_ref().map(ToString::to_string);
        let anchor = match (mode, stored) {
            (DetectMode::Full, _) => {
                // A Full read sees every modified-at value: it leaves the watermark
                // where the next Incremental read should start.
                let watch = self.modified_at.is_some();
                self.read_all(&mut found, watch, commit_new)?
                    .map(Anchor::ModifiedAt)
            }
            (DetectMode::Incremental { .. }, None) => {
                // No anchor yet: read everything, taking the anchor first so that what
                // changes during the read is read again next time.
                let tracking = match self.modified_at {
                    None => {
                        self.datasource
                            .install_tracking(&self.shape.entity, &self.shape.key)?;
                        Some(self.datasource.tracking_anchor(&self.shape.entity)?)
                    }
                    Some(_) => None,
                };
                let highest = self.read_all(&mut found, true, commit_new)?;
                match tracking {
                    Some(t) => Some(Anchor::Tracking(t)),
                    None => highest.map(Anchor::ModifiedAt),
                }
            }
            (DetectMode::Incremental { lookback }, Some(Anchor::Tracking(since))) => {
                let mut keys: Vec<Row> = Vec::new();
                let mut wanted: BTreeSet<Vec<u8>> = BTreeSet::new();
                for values in self.stored_retry()? {
                    if wanted.insert(row_prefix(&values)) {
                        keys.push(self.shape.key.iter().cloned().zip(values).collect());
                    }
                }
                let key = self.shape.key.clone();
                let next = self.datasource.tracked_changes(
                    &self.shape.entity,
                    &key,
                    since,
                    i64::try_from(lookback.saturating_mul(1000)).unwrap_or(i64::MAX),
                    &mut |row| {
                        let values: Vec<Value> = key
                            .iter()
                            .map(|k| row.get(k).cloned().unwrap_or(Value::Null))
                            .collect();
                        if wanted.insert(row_prefix(&values)) {
                            keys.push(row);
                        }
                        Ok(())
                    },
                )?;
                let mut rows = Vec::new();
                self.datasource.read_keys(
                    &self.shape.entity,
                    &self.shape.key,
                    &keys,
                    &mut |row| {
                        rows.push(row);
                        Ok(())
                    },
                )?;
                for row in rows {
                    self.row_reader().consider_row(&row, &mut found)?;
                }
                // A tracked key whose row is gone was deleted.
                for prefix in wanted {
                    if !found.settled.contains(&prefix) {
                        self.row_reader().remove_row(&prefix, &mut found)?;
                    }
                }
                Some(Anchor::Tracking(next))
            }
            (DetectMode::Incremental { lookback }, Some(Anchor::ModifiedAt(watermark))) => {
                let column = self.modified_at.clone().ok_or_else(|| SchemaError::Table {
                    reason: format!(
                        "entity {}: the stored anchor is a modified-at watermark but the \
                         schema names no modified_at column; run Full once",
                        self.shape.entity
                    ),
                })?;
                let lower = lower_bound(&watermark, lookback);
                let mut rows = Vec::new();
                self.datasource
                    .scan_since(&self.shape.entity, &column, &lower, &mut |row| {
                        rows.push(row);
                        Ok(())
                    })?;
                // Rows that failed last time, wherever their modified-at value is now.
                let retry: Vec<Row> = self
                    .stored_retry()?
                    .into_iter()
                    .map(|values| self.shape.key.iter().cloned().zip(values).collect())
                    .collect();
                if !retry.is_empty() {
                    self.datasource.read_keys(
                        &self.shape.entity,
                        &self.shape.key,
                        &retry,
                        &mut |row| {
                            rows.push(row);
                            Ok(())
                        },
                    )?;
                }
                let mut highest = Some(watermark);
                for row in rows {
                    if let Some(v) = row.get(&column) {
                        highest = Anchor::max_value(highest, v);
                    }
                    self.row_reader().consider_row(&row, &mut found)?;
                }
                highest.map(Anchor::ModifiedAt)
            }
        };
        let anchor_after = anchor
            .as_ref()
            .map(ToString::to_string)
            .or_else(|| anchor_before.clone());
        Ok(Detection {
            report: found.report,
            changes: found.changes,
            retry: found.retry,
            unreported: found.unreported,
            anchor,
            anchor_before,
            anchor_after,
        })
    }

    fn stored_unreported(&self) -> Result<u64, SchemaError> {
        let bytes = self
            .replica
            .metadata()
            .owner_record(UNREPORTED_RECORD)
            .map_err(StoreError::from)?;
        match bytes {
            None => Ok(0),
            Some(b) => <[u8; 8]>::try_from(b.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| SchemaError::Table {
                    reason: format!(
                        "entity {}: the count of unreported rows is {} bytes long, not 8",
                        self.shape.entity,
                        b.len()
                    ),
                }),
        }
    }

    fn stored_retry(&self) -> Result<Vec<Vec<Value>>, SchemaError> {
        let bytes = self
            .replica
            .metadata()
            .owner_record(RETRY_RECORD)
            .map_err(StoreError::from)?;
        match bytes {
            None => Ok(Vec::new()),
            Some(b) => decode_keys(&b).map_err(|reason| SchemaError::Table {
                reason: format!("entity {}: the retry list: {reason}", self.shape.entity),
            }),
        }
    }

    fn stored_anchor(&self) -> Result<Option<Anchor>, SchemaError> {
        let bytes = self
            .replica
            .metadata()
            .owner_record(ANCHOR_RECORD)
            .map_err(StoreError::from)?;
        bytes
            .map(|b| Anchor::decode(&b))
            .transpose()
            .map_err(|reason| SchemaError::Table {
                reason: format!("entity {}: {reason}", self.shape.entity),
            })
    }

    /// Reads every row; rows the replica holds that were not read become tombstones.
    /// Returns the highest modified-at value read when `watch` is set.
    ///
    /// With `commit_new`, a replica that holds nothing yet (a first load) has its rows'
    /// units committed as they are compared, on a thread of their own, and `found`
    /// keeps none of them: there is nothing to look up while comparing, so the commit
    /// (most of a first detection's time) overlaps the reading instead of following it.
    fn read_all(
        &mut self,
        found: &mut Findings<'_>,
        watch: bool,
        commit_new: bool,
    ) -> Result<Option<Value>, SchemaError> {
        let first_load = commit_new
            && found.pending.is_empty()
            && self.replica.metadata().items_from(b"").next().is_none();
        let (held, loading) = if first_load {
            (None, Some(&mut self.replica))
        } else {
            (Some(&self.replica), None)
        };
        let reader = RowReader {
            replica: held,
            shape: &self.shape,
        };
        let modified_at = self.modified_at.as_ref();
        let mut highest = None;
        // The datasource is read on a thread of its own, in chunks, while this one
        // compares; each chunk goes back to be freed where it was allocated (glibc frees
        // another thread's blocks under that thread's arena lock).
        let (chunks, read) = std::sync::mpsc::sync_channel::<Vec<Row>>(SCAN_QUEUE);
        let (give_back, given_back) = std::sync::mpsc::channel::<Vec<Row>>();
        // A first load's changes, a commit's worth at a time, to the committing thread.
        let (to_commit, committing) = std::sync::mpsc::sync_channel::<Vec<Change>>(1);
        let entity = &self.shape.entity;
        let name = self.datasource.name().to_string();
        let scan_name = name.clone();
        let datasource = &mut self.datasource;
        let (compared, scanned, committed) = std::thread::scope(|scope| {
            let scan = move || {
                let mut chunk = Vec::with_capacity(SCAN_CHUNK);
                let stopped = || DatasourceError::Unavailable {
                    datasource: scan_name.clone(),
                    reason: "change detection stopped reading".into(),
                };
                let scanned = datasource.scan(entity, &mut |row| {
                    chunk.push(row);
                    if chunk.len() == SCAN_CHUNK {
                        while let Ok(done) = given_back.try_recv() {
                            drop(done);
                        }
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(SCAN_CHUNK));
                        chunks.send(full).map_err(|_| stopped())?;
                    }
                    Ok(())
                });
                if scanned.is_ok() && !chunk.is_empty() {
                    let _ = chunks.send(chunk);
                }
                drop(chunks);
                for done in given_back {
                    drop(done);
                }
                scanned
            };
            // A named thread shows up as such in a debugger or a panic message.
            let scanner = std::thread::Builder::new()
                .name("knit-detect-read".into())
                .spawn_scoped(scope, scan);
            let unreported = found.unreported;
            let committer = loading.map(|replica| {
                std::thread::Builder::new()
                    .name("knit-detect-commit".into())
                    .spawn_scoped(scope, move || {
                        commit_first_load(replica, committing, unreported)
                    })
            });
            let to_commit = committer.is_some().then_some(to_commit);
            // Hands what was found so far to the committer, once there is a commit's
            // worth (or, at the end, whatever is left). `false`: the committer stopped.
            let hand_over = |found: &mut Findings<'_>, at_least: usize| match &to_commit {
                Some(to) if found.changes.len() >= at_least.max(1) => {
                    to.send(std::mem::take(&mut found.changes)).is_ok()
                }
                _ => true,
            };
            let committer_stopped = || SchemaError::Table {
                reason: format!("entity {entity}: the commit of its first rows stopped"),
            };
            let mut compare = || -> Result<(), SchemaError> {
                for chunk in &read {
                    for row in &chunk {
                        if watch {
                            if let Some(v) = modified_at.and_then(|c| row.get(c)) {
                                highest = Anchor::max_value(highest.take(), v);
                            }
                        }
                        reader.consider_row(row, found)?;
                    }
                    let _ = give_back.send(chunk);
                    if !hand_over(found, COMMIT_CHUNK) {
                        return Err(committer_stopped());
                    }
                }
                Ok(())
            };
            // A row that cannot be compared stops the read (the queue closes): its
            // error is the one returned.
            let mut compared = compare();
            drop(read);
            drop(give_back);
            let scanned = match scanner.map(|thread| thread.join()) {
                Ok(Ok(scanned)) => scanned,
                Ok(Err(_)) => Err(DatasourceError::Unavailable {
                    datasource: name,
                    reason: "the thread reading it for change detection panicked".into(),
                }),
                Err(e) => Err(DatasourceError::Unavailable {
                    datasource: name,
                    reason: format!("no thread to read it for change detection: {e}"),
                }),
            };
            // The rest is committed only after a whole read: a read that failed leaves
            // what it committed behind the anchor, as a crash between commits does.
            if compared.is_ok() && scanned.is_ok() && !hand_over(found, 0) {
                compared = Err(committer_stopped());
            }
            drop(to_commit);
            let committed = match committer.map(|spawned| spawned.map(|thread| thread.join())) {
                None => Ok(found.unreported),
                Some(Ok(Ok(Ok(unreported)))) => Ok(unreported),
                Some(Ok(Ok(Err(e)))) => Err(SchemaError::from(e)),
                Some(Ok(Err(_))) => Err(SchemaError::Table {
                    reason: format!(
                        "entity {entity}: the thread committing its first rows panicked"
                    ),
                }),
                Some(Err(e)) => Err(SchemaError::Table {
                    reason: format!("entity {entity}: no thread to commit its first rows: {e}"),
                }),
            };
            (compared, scanned, committed)
        });
        // The committer's own error explains a comparison it stopped.
        found.unreported = committed?;
        compared?;
        scanned.map_err(SchemaError::from)?;
        if first_load {
            // The replica held nothing, so nothing it holds can be missing.
            return Ok(highest);
        }
        // Rows the replica holds that the datasource no longer has.
        let metadata = self.replica.metadata();
        for entry in metadata.items_from(b"") {
            let (id, meta) = entry.map_err(StoreError::from)?;
            let Some((prefix, unit)) = split_unit(id.as_bytes()) else {
                continue;
            };
            if meta.deleted || found.settled.contains(prefix) {
                continue;
            }
            if unit.is_empty() {
                found.report.deleted += 1;
            }
            found.changes.push((id, None));
        }
        Ok(highest)
    }

    /// The second half: the changes become local versions, with the new anchor, in one
    /// commit.
    pub fn commit_changes(&mut self, detection: Detection) -> Result<DetectReport, SchemaError> {
        let anchor = detection.anchor.as_ref().map(Anchor::encode);
        let retry = encode_keys(&detection.retry);
        let mut records: Vec<(&[u8], &[u8])> = vec![(RETRY_RECORD, &retry)];
        if let Some(anchor) = &anchor {
            records.push((ANCHOR_RECORD, anchor));
        }
        // This detection's report counts them: no later one should.
        let none = encode_count(0);
        if detection.unreported > 0 {
            records.push((UNREPORTED_RECORD, &none));
        }
        // Commits of bounded size: sled writes one huge batch more slowly than several
        // smaller ones, and then reads it back slowly once (an initial load of 600,000
        // units took twice as long end to end). Only the last commit moves the anchor,
        // so a crash in between leaves the anchor behind the versions, and the next
        // detection reads those rows again and finds them unchanged.
        let mut chunks = detection.changes.chunks(COMMIT_CHUNK).peekable();
        if chunks.peek().is_none() {
            self.replica
                .apply_local_with_records(&[], &records)
                .map_err(SchemaError::from)?;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.replica
                .apply_local_with_records(chunk, if last { &records } else { &[] })
                .map_err(SchemaError::from)?;
        }
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
        self.reset_staged_rows();
        other.reset_staged_rows();
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
        // A new session marks every row it touches afresh: the last one's marks were
        // cleared when its rows were written.
        other.reset_staged_rows();
        if let Ok(mut staged) = other.staged.lock() {
            staged.forward = true;
        }
        other.recording.store(true, Ordering::SeqCst);
        // Each batch's rows are read right after the batch commits (RowUnits::committed)
        // and written by a thread of their own, while the session goes on: the
        // datasource's time overlaps the session's instead of following it.
        let (sender, receiver) = std::sync::mpsc::sync_channel::<StoredRows>(WRITER_QUEUE);
        if let Ok(mut link) = other.writer.lock() {
            *link = WriterLink { rows: Some(sender) };
        }
        let shape = Arc::clone(&other.shape);
        let name = other.datasource.name().to_string();
        let datasource = &mut other.datasource;
        let (stats, (mut written, failed)) = std::thread::scope(|scope| {
            let write = move || {
                let mut written = Written::default();
                while let Ok(mut writes) = receiver.recv() {
                    // Batches that queued up while the last write ran go as one write:
                    // a datasource call costs round trips whatever its size.
                    while writes.len() < WRITE_ROWS_AT_ONCE {
                        match receiver.try_recv() {
                            Ok(more) => writes.append(more),
                            Err(_) => break,
                        }
                    }
                    let done = shape
                        .build_rows(writes)
                        .and_then(|writes| shape.write_rows(&mut **datasource, writes));
                    match done {
                        Ok(w) => written.absorb(w),
                        // What is not written stays pending.
                        Err(e) => return (written, Some(e)),
                    }
                }
                (written, None)
            };
            // Without a writer thread the session's sends fail and every row stays
            // pending: the apply after the session writes them all, only later.
            let worker = std::thread::Builder::new()
                .name("knit-row-writer".into())
                .spawn_scoped(scope, write)
                .ok();
            let stats = crate::sync::run_session(
                &mut self.replica,
                &mut other.replica,
                options,
                observer,
                &SystemClock,
            );
            // Closing the queue ends the writer once it has written what it holds.
            let link = other
                .writer
                .lock()
                .map(|mut link| std::mem::take(&mut *link));
            drop(link);
            let written = match worker.map(|thread| thread.join()) {
                None => (Written::default(), None),
                Some(Ok(written)) => written,
                Some(Err(_)) => {
                    let reason =
                        format!("datasource {name}: the thread writing rows into it panicked");
                    (Written::default(), Some(SchemaError::Table { reason }))
                }
            };
            (stats, written)
        });
        other.recording.store(false, Ordering::SeqCst);
        other.reset_staged_rows();
        other
            .replica
            .clear_pending(&written.done)
            .map_err(SchemaError::from)?;
        other.replica.flush().map_err(SchemaError::from)?;
        if let Some(e) = failed {
            return Err(e);
        }
        // Whatever the session committed and the writer did not get (a row it could
        // not read) is applied now; rows the datasource refused wait for next time.
        written.refused.sort();
        let rest = other.apply_pending_except(&written.refused)?;
        written.report.absorb(rest);
        Ok((stats?, written.report))
    }

    /// A sync with the defaults and no observer.
    pub fn sync(&mut self, other: &mut TableReplica) -> Result<SyncReport, SchemaError> {
        Ok(self
            .sync_with(other, &SessionOptions::default(), &mut NoObserver)?
            .0)
    }

    /// Writes every row marked pending into the datasource, from the units, and clears
    /// the marks of the rows that were written.
    pub fn apply_pending(&mut self) -> Result<ApplyReport, SchemaError> {
        self.apply_pending_except(&[])
    }

    /// `apply_pending`, leaving alone the rows in `skip` (sorted): rows refused earlier
    /// in the same session, which are tried again next time, not twice now.
    fn apply_pending_except(&mut self, skip: &[Vec<u8>]) -> Result<ApplyReport, SchemaError> {
        let mut pending = self
            .replica
            .metadata()
            .pending()
            .map_err(StoreError::from)?;
        pending.retain(|p| skip.binary_search(p).is_err());
        if pending.is_empty() {
            return Ok(ApplyReport::default());
        }
        let writes = self.shape.read_rows(self.replica.metadata(), &pending)?;
        let written = self.shape.write_rows(&mut *self.datasource, writes)?;
        self.replica
            .clear_pending(&written.done)
            .map_err(SchemaError::from)?;
        self.replica.flush().map_err(SchemaError::from)?;
        Ok(written.report)
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
    fn retry_keys_round_trip_and_damage_is_an_error() {
        let keys = vec![
            vec![Value::Int(3)],
            vec![Value::Text("a".into()), Value::Null],
        ];
        assert_eq!(decode_keys(&encode_keys(&keys)), Ok(keys.clone()));
        assert_eq!(decode_keys(&encode_keys(&[])), Ok(Vec::new()));
        let bytes = encode_keys(&keys);
        for cut in 0..bytes.len() {
            assert!(decode_keys(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_keys(&[0xFF, 0xFF, 0xFF, 0x7F]).is_err());
    }

    #[test]
    fn snapshots_round_trip_and_a_cut_inside_a_part_is_an_error() {
        let units: Vec<(String, Value)> = vec![
            ("id".into(), Value::Int(7)),
            ("name".into(), Value::Text("Ada".into())),
            ("phone".into(), Value::Null),
        ];
        let bytes = encode_snapshot(&units);
        let mut read = BTreeMap::new();
        assert_eq!(decode_snapshot(&bytes, &mut read), Ok(()));
        assert_eq!(read, units.iter().cloned().collect());
        // A cut between two units is a shorter snapshot; anywhere else, damage.
        let boundaries: Vec<usize> = (0..=units.len())
            .map(|n| encode_snapshot(&units[..n]).len())
            .collect();
        for cut in 1..bytes.len() {
            let result = decode_snapshot(&bytes[..cut], &mut BTreeMap::new());
            assert_eq!(result.is_ok(), boundaries.contains(&cut), "cut at {cut}");
        }
        // Empty data: a row written before snapshots, every field in a unit of its own.
        assert_eq!(decode_snapshot(&[], &mut BTreeMap::new()), Ok(()));
        assert!(decode_snapshot(b"X\x01", &mut BTreeMap::new()).is_err());
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
