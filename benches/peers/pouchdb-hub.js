// The initial sync of `cargo bench --bench hub` (issue 4), on PouchDB: a local PouchDB
// (LevelDB adapter) holding N docs of ~100 bytes replicates to an empty database of an
// express-pouchdb server on loopback. The server runs in a child process (LevelDB too),
// as knit's hub runs on threads of its own, so neither side shares one event loop.
// Only the replication call is timed. Prints one JSON object.
//   node pouchdb-hub.js [ITEMS]
'use strict';
const { fork } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const BATCH = 1000;

function leveldbPouch() {
  return require('pouchdb-core').plugin(require('pouchdb-adapter-leveldb'));
}

// The child: express-pouchdb over LevelDB databases in DIR, on 127.0.0.1, any port.
function serve(dir) {
  const PouchDB = leveldbPouch()
    .plugin(require('pouchdb-mapreduce'))
    .plugin(require('pouchdb-replication'))
    .defaults({ prefix: dir + path.sep });
  const app = require('express-pouchdb')(PouchDB, {
    mode: 'minimumForPouchDB',
    inMemoryConfig: true,
    logPath: path.join(dir, 'log.txt'),
  });
  const server = require('http').createServer(app);
  server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
  process.on('message', (m) => {
    if (m === 'stop') server.close(() => process.exit(0));
  });
}

const { values, key } = require('./workload');

function startServer(dir) {
  const child = fork(__filename, ['--serve', dir], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  return new Promise((resolve, reject) => {
    child.once('message', (m) => resolve({ child, port: m.port }));
    child.once('exit', (code) => reject(new Error('express-pouchdb exited with ' + code)));
  });
}

function stopServer(child) {
  return new Promise((resolve) => {
    child.once('exit', resolve);
    child.send('stop');
  });
}

async function main() {
  const N = parseInt(process.argv[2] || '10000', 10);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'knit-pouch-hub-'));
  fs.mkdirSync(path.join(dir, 'server'));
  const { child, port } = await startServer(path.join(dir, 'server'));
  try {
    const PouchDB = leveldbPouch()
      .plugin(require('pouchdb-adapter-http'))
      .plugin(require('pouchdb-replication'));
    const local = new PouchDB(path.join(dir, 'client'));
    const next = values(42);
    for (let i = 0; i < N; i += BATCH) {
      const docs = [];
      for (let j = i; j < Math.min(N, i + BATCH); j++) docs.push({ _id: key(j), v: next() });
      await local.bulkDocs(docs);
    }
    // The hub's database exists before the clock starts, as knit's hosted replica does.
    const remote = new PouchDB(`http://127.0.0.1:${port}/notes`);
    await remote.info();

    const started = process.hrtime.bigint();
    const result = await PouchDB.replicate(local, remote, { batch_size: BATCH });
    const ms = Number(process.hrtime.bigint() - started) / 1e6;

    const info = await remote.info();
    if (result.docs_written !== N || info.doc_count !== N) {
      throw new Error(`replicated ${result.docs_written} docs, the server holds ${info.doc_count}; expected ${N}`);
    }
    console.log(JSON.stringify({
      system: 'pouchdb-leveldb -> express-pouchdb',
      items: N,
      initial_ms: Math.round(ms * 10) / 10,
      initial_items_per_s: Math.round(N / (ms / 1000)),
      docs_written: result.docs_written,
    }));
    await local.close();
    await remote.close();
  } finally {
    await stopServer(child);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === '--serve') {
  serve(process.argv[3]);
} else {
  main().catch((e) => { console.error(e); process.exit(1); });
}
