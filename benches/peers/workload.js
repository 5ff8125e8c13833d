// The workload shared by pouchdb.js and pouchdb-hub.js, byte for byte the same as knit's
// benches: xorshift64* values of 100 letters, keys `item-00000000`...
'use strict';

function values(seed) {
  let s = BigInt.asUintN(64, BigInt(seed));
  return () => {
    let out = '';
    for (let i = 0; i < 100; i++) {
      s ^= s >> 12n; s ^= BigInt.asUintN(64, s << 25n); s ^= s >> 27n;
      const r = BigInt.asUintN(64, s * 0x2545F4914F6CDD1Dn) >> 59n;
      out += String.fromCharCode(97 + Number(r % 26n));
    }
    return out;
  };
}
const key = (i) => 'item-' + String(i).padStart(8, '0');

module.exports = { values, key };
