//! Micro-benchmarks of the hot pure functions: knowledge lookups and algebra, and the
//! batch codec. `cargo bench --bench knowledge`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use knit::{
    decode_batch, encode_batch, BatchMode, ChangeBatch, ChangeGroup, ChangeKind, ClockVector, Hlc,
    IdRange, ItemChange, ItemId, Knowledge, ReplicaId, Version,
};

fn item(i: usize) -> ItemId {
    ItemId::new(format!("item-{i:08}").as_bytes()).expect("short id")
}

/// Knowledge over `replicas` replicas with `exceptions` single-item exceptions, as an
/// interrupted or partly failed sync leaves behind.
fn knowledge(replicas: u128, exceptions: usize) -> Knowledge {
    let base = ClockVector::from_pairs((1..=replicas).map(|r| (ReplicaId::from_u128(r), 1000)));
    let low = ClockVector::from_pairs((1..=replicas).map(|r| (ReplicaId::from_u128(r), 500)));
    let ranges = (0..exceptions)
        .map(|i| (IdRange::single(&item(i * 10)), low.clone()))
        .collect();
    Knowledge::from_parts(base, ranges).expect("sorted, disjoint")
}

fn bench_knowledge(c: &mut Criterion) {
    let mut group = c.benchmark_group("knowledge");
    for exceptions in [0usize, 100, 10_000] {
        let k = knowledge(8, exceptions);
        let probe = item(exceptions * 5 + 3);
        let version = Version::new(ReplicaId::from_u128(3), 700);
        group.bench_with_input(BenchmarkId::new("contains", exceptions), &k, |b, k| {
            b.iter(|| black_box(k).contains(black_box(&probe), version))
        });
        let other = knowledge(8, exceptions / 2);
        group.bench_with_input(BenchmarkId::new("combine", exceptions), &k, |b, k| {
            b.iter(|| black_box(k).combine(black_box(&other)))
        });
        group.bench_with_input(
            BenchmarkId::new("contains_knowledge", exceptions),
            &k,
            |b, k| b.iter(|| black_box(k).contains_knowledge(black_box(&other))),
        );
    }
    group.finish();
}

fn batch(changes: usize) -> ChangeBatch {
    let source = ReplicaId::from_u128(1);
    let made_with = Knowledge::from_vector(ClockVector::from_pairs([(source, changes as u64)]));
    let changes = (0..changes)
        .map(|i| {
            let v = Version::new(source, i as u64 + 1);
            ItemChange {
                item: item(i),
                kind: ChangeKind::Update,
                creation: v,
                version: v,
                timestamp: Hlc(i as u64),
                data: Some(vec![b'x'; 100]),
            }
        })
        .collect();
    let group = ChangeGroup::new(IdRange::all(), changes, Vec::new()).expect("sorted");
    ChangeBatch::new(
        source,
        made_with,
        vec![group],
        Vec::new(),
        BatchMode::Normal,
        true,
    )
    .expect("valid batch")
}

fn bench_codec(c: &mut Criterion) {
    let b1000 = batch(1000);
    let bytes = encode_batch(&b1000);
    c.bench_function("batch/encode_1000", |b| {
        b.iter(|| encode_batch(black_box(&b1000)))
    });
    c.bench_function("batch/decode_1000", |b| {
        b.iter(|| decode_batch(black_box(&bytes)).expect("valid"))
    });
}

criterion_group!(benches, bench_knowledge, bench_codec);
criterion_main!(benches);
