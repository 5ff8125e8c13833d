#!/usr/bin/env bash
# Side-by-side benchmark: knit and PouchDB (LevelDB adapter) on the same workload, in
# one run on this machine. Installs PouchDB from npm into benches/peers/node_modules.
#   benches/peers/run.sh [ITEMS] [CHANGES]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
items="${1:-100000}"
changes="${2:-100}"
cd "$here"
[ -d node_modules/pouchdb-core ] || npm install --no-audit --no-fund --loglevel=error >&2
cd "$here/../.."
cargo build --release --bin knit >&2
echo "knit:"
./target/release/knit bench --items "$items" --changes "$changes" --json
echo "pouchdb:"
node "$here/pouchdb.js" "$items" "$changes"
