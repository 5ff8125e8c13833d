// The workload of `knit bench`, on PouchDB with the LevelDB adapter:
// load N docs of ~100 bytes into A, replicate A→B, update K docs in A, replicate,
// replicate again (nothing to do). Prints one JSON object.
'use strict';
const PouchDB = require('pouchdb-core')
  .plugin(require('pouchdb-adapter-leveldb'))
  .plugin(require('pouchdb-replication'));
const fs = require('fs');
const os = require('os');
const path = require('path');

const N = parseInt(process.argv[2] || '100000', 10);
const K = parseInt(process.argv[3] || '100', 10);
const BATCH = 1000;

const { values, key } = require('./workload');

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'knit-pouch-'));
  const a = new PouchDB(path.join(dir, 'a'));
  const b = new PouchDB(path.join(dir, 'b'));
  const next = values(42);
  let t = Date.now();
  for (let i = 0; i < N; i += BATCH) {
    const docs = [];
    for (let j = i; j < Math.min(N, i + BATCH); j++) docs.push({ _id: key(j), v: next() });
    await a.bulkDocs(docs);
  }
  const loadMs = Date.now() - t;

  t = Date.now();
  const first = await PouchDB.replicate(a, b, { batch_size: BATCH });
  const initialMs = Date.now() - t;

  const upd = values(0xDEADBEEF);
  const step = Math.max(1, Math.floor(N / K));
  const changed = [];
  for (let c = 0; c < K; c++) {
    const doc = await a.get(key((c * step) % N));
    doc.v = upd();
    changed.push(doc);
  }
  await a.bulkDocs(changed);
  t = Date.now();
  const inc = await PouchDB.replicate(a, b, { batch_size: BATCH });
  const incrementalMs = Date.now() - t;

  t = Date.now();
  const noop = await PouchDB.replicate(a, b, { batch_size: BATCH });
  const noopMs = Date.now() - t;

  console.log(JSON.stringify({
    system: 'pouchdb-leveldb', items: N, changes: K,
    load_ms: loadMs,
    initial_ms: initialMs, initial_items_per_s: Math.round(N / (initialMs / 1000)),
    initial_docs_written: first.docs_written,
    incremental_ms: incrementalMs, incremental_docs_written: inc.docs_written,
    noop_ms: noopMs, noop_docs_written: noop.docs_written,
  }));
  await a.close(); await b.close();
  fs.rmSync(dir, { recursive: true, force: true });
}
main().catch((e) => { console.error(e); process.exit(1); });
