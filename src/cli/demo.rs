//! `knit demo`: the README's first command. Three replicas (laptop, phone, hub) share
//! a baseline, change things offline at the same time (one key on two replicas, one
//! delete), sync through the hub under last-writer-wins, and end up identical.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::sync::{summary, sync_open, Observer};
use super::{flush, in_dir, item_id, show_value, CliResult, Failure};
use crate::model::{ItemId, ReplicaId};
use crate::stores::Replica;

/// One named replica of the demo.
struct Node {
    name: &'static str,
    dir: PathBuf,
    replica: Replica,
}

impl Node {
    fn create(root: &Path, name: &'static str) -> Result<Self, Failure> {
        let dir = root.join(name);
        let replica = Replica::create(&dir).map_err(|e| in_dir(&dir, e))?;
        Ok(Self { name, dir, replica })
    }

    fn items(&self) -> Result<BTreeMap<ItemId, Vec<u8>>, Failure> {
        Ok(self
            .replica
            .items()
            .map_err(|e| in_dir(&self.dir, e))?
            .into_iter()
            .collect())
    }

    fn put(&mut self, out: &mut dyn Write, key: &str, value: &str) -> CliResult {
        let item = item_id(&self.dir, key)?;
        self.replica
            .put(&item, value.as_bytes())
            .map_err(|e| in_dir(&self.dir, e))?;
        writeln!(out, "   {:<7} put {key} = {value:?}", self.name)?;
        Ok(())
    }

    fn del(&mut self, out: &mut dyn Write, key: &str) -> CliResult {
        let item = item_id(&self.dir, key)?;
        self.replica
            .delete(&item)
            .map_err(|e| in_dir(&self.dir, e))?;
        writeln!(out, "   {:<7} del {key}", self.name)?;
        Ok(())
    }
}

pub(super) fn demo(dir: Option<PathBuf>, out: &mut dyn Write) -> CliResult {
    let root = dir.unwrap_or_else(|| {
        let id = ReplicaId::new_random().to_string();
        std::env::temp_dir().join(format!("knit-demo-{}", id.get(..8).unwrap_or(&id)))
    });
    std::fs::create_dir_all(&root).map_err(|e| in_dir(&root, e))?;
    let mut laptop = Node::create(&root, "laptop")?;
    let mut phone = Node::create(&root, "phone")?;
    let mut hub = Node::create(&root, "hub")?;
    writeln!(out, "knit demo: three replicas in {}", root.display())?;

    writeln!(out, "\n1. Each replica writes a few items.")?;
    laptop.put(out, "note/groceries", "milk, eggs")?;
    laptop.put(out, "settings/theme", "light")?;
    phone.put(out, "note/todo", "call the plumber")?;
    hub.put(out, "settings/language", "en")?;

    writeln!(out, "\n2. They sync through the hub to share a baseline.")?;
    sync_pair(out, &mut laptop, &mut hub)?;
    sync_pair(out, &mut phone, &mut hub)?;
    sync_pair(out, &mut laptop, &mut hub)?;

    writeln!(
        out,
        "\n3. Offline, laptop and phone change things at the same time."
    )?;
    laptop.put(out, "settings/theme", "dark")?;
    laptop.put(out, "note/ideas", "sync all the things")?;
    phone.put(out, "settings/theme", "solarized")?;
    phone.del(out, "note/groceries")?;

    writeln!(
        out,
        "\n4. They sync through the hub again (last writer wins)."
    )?;
    sync_pair(out, &mut laptop, &mut hub)?;
    sync_pair(out, &mut phone, &mut hub)?;
    sync_pair(out, &mut laptop, &mut hub)?;

    for node in [&mut laptop, &mut phone, &mut hub] {
        flush(&mut node.replica, &node.dir)?;
    }
    let held = [laptop.items()?, phone.items()?, hub.items()?];
    writeln!(out)?;
    if held.iter().all(|items| *items == held[0]) {
        writeln!(
            out,
            "converged: 3 replicas hold the same {} items",
            held[0].len()
        )?;
        for (key, value) in &held[0] {
            writeln!(out, "   {key} = {}", show_value(Some(value)))?;
        }
        writeln!(out, "\nLook around: knit ls {}", laptop.dir.display())?;
        Ok(())
    } else {
        for (node, items) in [&laptop, &phone, &hub].iter().zip(&held) {
            writeln!(out, "   {} holds {} items", node.name, items.len())?;
        }
        Err(Failure::Negative(format!(
            "{}: the demo replicas did not converge",
            root.display()
        )))
    }
}

/// Syncs `a` with `b` both ways and says what moved and what conflicted.
fn sync_pair(out: &mut dyn Write, a: &mut Node, b: &mut Node) -> CliResult {
    // The conflict callback names only the item: keep both sides' values to show them.
    let (before_a, before_b) = (a.items()?, b.items()?);
    let mut observer = Observer::new(a.replica.id(), false);
    let report = sync_open(&mut a.replica, &a.dir, &mut b.replica, &mut observer)?;
    writeln!(
        out,
        "   {:<6} <-> {:<6} {}",
        a.name,
        b.name,
        summary(&report)
    )?;
    let mut shown = BTreeSet::new();
    for (item, _, _) in &observer.conflicts {
        if !shown.insert(item.clone()) {
            continue;
        }
        let after = a.replica.get(item).map_err(|e| in_dir(&a.dir, e))?;
        let (was_a, was_b) = (before_a.get(item), before_b.get(item));
        let winner = if after.as_ref() == was_a {
            format!("{}'s", a.name)
        } else if after.as_ref() == was_b {
            format!("{}'s", b.name)
        } else {
            "a merged".to_string()
        };
        writeln!(
            out,
            "   conflict on {item}: {} had {}, {} had {} -> kept {winner} {}",
            a.name,
            show_value(was_a.map(Vec::as_slice)),
            b.name,
            show_value(was_b.map(Vec::as_slice)),
            show_value(after.as_deref()),
        )?;
    }
    Ok(())
}
