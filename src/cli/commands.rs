//! The one-replica commands: init, put, get, del, ls, status, conflicts, resolve, gc,
//! rekey.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use super::{flush, in_dir, item_id, open, show_value, CliResult, Failure};
use crate::model::Knowledge;
use crate::stores::{Replica, Take};

pub(super) fn init(dir: &Path, out: &mut dyn Write) -> CliResult {
    let mut replica = Replica::create(dir).map_err(|e| in_dir(dir, e))?;
    flush(&mut replica, dir)?;
    writeln!(out, "{}", replica.id())?;
    Ok(())
}

pub(super) fn put(dir: &Path, key: &str, value: &str) -> CliResult {
    let mut replica = open(dir)?;
    let item = item_id(dir, key)?;
    replica
        .put(&item, value.as_bytes())
        .map_err(|e| in_dir(dir, e))?;
    flush(&mut replica, dir)
}

pub(super) fn get(dir: &Path, key: &str, out: &mut dyn Write) -> CliResult {
    let replica = open(dir)?;
    let item = item_id(dir, key)?;
    match replica.get(&item).map_err(|e| in_dir(dir, e))? {
        Some(value) => {
            out.write_all(&value)?;
            out.write_all(b"\n")?;
            Ok(())
        }
        None => Err(Failure::Negative(format!(
            "{}: no item {key:?}",
            dir.display()
        ))),
    }
}

pub(super) fn del(dir: &Path, key: &str) -> CliResult {
    let mut replica = open(dir)?;
    let item = item_id(dir, key)?;
    let deleted = replica.delete(&item).map_err(|e| in_dir(dir, e))?;
    flush(&mut replica, dir)?;
    match deleted {
        Some(_) => Ok(()),
        None => Err(Failure::Negative(format!(
            "{}: no item {key:?}",
            dir.display()
        ))),
    }
}

pub(super) fn ls(dir: &Path, out: &mut dyn Write) -> CliResult {
    let replica = open(dir)?;
    // `items()` is in id order, which is byte order: the keys come out sorted.
    for (key, value) in replica.items().map_err(|e| in_dir(dir, e))? {
        write!(out, "{key}\t")?;
        out.write_all(&value)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

pub(super) fn status(dir: &Path, json: bool, out: &mut dyn Write) -> CliResult {
    let replica = open(dir)?;
    let status = replica.status().map_err(|e| in_dir(dir, e))?;
    let s = &status.summary;
    if json {
        let value = json!({
            "id": status.id.to_string(),
            "path": dir.display().to_string(),
            "tick": status.tick,
            "live_items": s.live_items,
            "tombstones": s.tombstones,
            "saved_conflicts": s.saved_conflicts,
            "metadata_bytes": s.metadata_bytes,
            "data_bytes": s.data_bytes,
            "knowledge": knowledge_json(&status.knowledge),
            "forgotten": knowledge_json(&status.forgotten),
        });
        writeln!(out, "{value}")?;
        return Ok(());
    }
    writeln!(out, "id          {}", status.id)?;
    writeln!(out, "folder      {}", dir.display())?;
    writeln!(out, "tick        {}", status.tick)?;
    writeln!(out, "live items  {}", s.live_items)?;
    writeln!(out, "tombstones  {}", s.tombstones)?;
    writeln!(out, "conflicts   {} saved", s.saved_conflicts)?;
    writeln!(
        out,
        "bytes       {} metadata, {} data",
        s.metadata_bytes, s.data_bytes
    )?;
    write_knowledge(out, "knowledge", &status.knowledge)?;
    write_knowledge(out, "forgotten", &status.forgotten)?;
    Ok(())
}

/// Per replica the lowest and highest tick known for any item, and how many item
/// ranges carry a vector of their own (exceptions).
fn knowledge_json(k: &Knowledge) -> serde_json::Value {
    let replicas: Vec<_> = k
        .replicas()
        .into_iter()
        .map(|r| {
            json!({
                "id": r.to_string(),
                "min_tick": k.min_tick(r),
                "max_tick": k.max_tick(r),
            })
        })
        .collect();
    json!({ "replicas": replicas, "exceptions": k.exception_count() })
}

fn write_knowledge(out: &mut dyn Write, name: &str, k: &Knowledge) -> CliResult {
    let replicas = k.replicas();
    if replicas.is_empty() {
        writeln!(out, "{name:<11} none")?;
        return Ok(());
    }
    writeln!(
        out,
        "{name:<11} {} replica(s), {} range exception(s)",
        replicas.len(),
        k.exception_count()
    )?;
    for r in replicas {
        let (low, high) = (k.min_tick(r), k.max_tick(r));
        if low == high {
            writeln!(out, "  {r}  tick {high}")?;
        } else {
            writeln!(out, "  {r}  ticks {low}..{high} (by item range)")?;
        }
    }
    Ok(())
}

pub(super) fn conflicts(dir: &Path, out: &mut dyn Write) -> CliResult {
    let replica = open(dir)?;
    for saved in replica.saved_conflicts().map_err(|e| in_dir(dir, e))? {
        let item = &saved.remote.item;
        let local = replica.get(item).map_err(|e| in_dir(dir, e))?;
        writeln!(
            out,
            "{item}\tlocal: {}\tremote: {} (from {})",
            show_value(local.as_deref()),
            show_value(saved.remote.data.as_deref()),
            saved.source
        )?;
    }
    Ok(())
}

pub(super) fn resolve(dir: &Path, key: &str, take: Take) -> CliResult {
    let mut replica = open(dir)?;
    let item = item_id(dir, key)?;
    replica
        .resolve_conflict(&item, take)
        .map_err(|e| in_dir(dir, e))?;
    flush(&mut replica, dir)
}

pub(super) fn gc(dir: &Path, older_than_ms: u64, out: &mut dyn Write) -> CliResult {
    let mut replica = open(dir)?;
    let report = replica
        .collect_garbage(older_than_ms)
        .map_err(|e| in_dir(dir, e))?;
    flush(&mut replica, dir)?;
    let n = report.tombstones_removed;
    writeln!(
        out,
        "removed {n} tombstone{}",
        if n == 1 { "" } else { "s" }
    )?;
    Ok(())
}

pub(super) fn rekey(dir: &Path, out: &mut dyn Write) -> CliResult {
    let mut replica = open(dir)?;
    let new = replica.rekey().map_err(|e| in_dir(dir, e))?;
    flush(&mut replica, dir)?;
    writeln!(out, "{new}")?;
    Ok(())
}
