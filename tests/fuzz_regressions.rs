//! Replays every input kept under `tests/fuzz_regressions/<target>/` through the decoder
//! its fuzz target (`fuzz/fuzz_targets/<target>.rs`) drives, with the same checks: no
//! panic, and whatever decodes survives a round trip through its encoder unchanged.
//!
//! Every input that ever crashed a fuzz target is copied here, so a normal `cargo test`
//! keeps the bug fixed without a nightly toolchain or libFuzzer. The folders also hold a
//! few hand-made hostile inputs (length prefixes claiming 2^60 elements, overlapping
//! ranges, over-long ids, a wrong format version, ...), so the test never replays
//! nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use knit::{
    check_record, decode_batch, decode_knowledge, encode_batch, encode_knowledge, ItemMeta,
    SavedConflict,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The body of `fuzz_targets/batch.rs`.
fn batch(data: &[u8]) {
    if let Ok(batch) = decode_batch(data) {
        let again = decode_batch(&encode_batch(&batch))
            .expect("a decoded batch re-encodes into bytes that decode");
        assert_eq!(again, batch, "decode(encode(batch)) differs from batch");
    }
}

/// The body of `fuzz_targets/knowledge.rs`.
fn knowledge(data: &[u8]) {
    if let Ok(knowledge) = decode_knowledge(data) {
        assert!(
            knowledge.is_well_formed(),
            "decoded knowledge is not canonical"
        );
        let again = decode_knowledge(&encode_knowledge(&knowledge))
            .expect("decoded knowledge re-encodes into bytes that decode");
        assert_eq!(
            again, knowledge,
            "decode(encode(knowledge)) differs from knowledge"
        );
    }
}

/// The body of `fuzz_targets/records.rs`.
fn records(data: &[u8]) {
    let checked = check_record(data);
    if let Ok(meta) = ItemMeta::decode(data) {
        assert!(
            checked.is_ok(),
            "check_record disagrees with ItemMeta::decode"
        );
        assert_eq!(ItemMeta::decode(&meta.encode()), Ok(meta));
    }
    if let Ok((meta, data)) = ItemMeta::decode_with_data(data) {
        assert!(
            checked.is_ok(),
            "check_record disagrees with ItemMeta::decode_with_data"
        );
        let again = meta.encode_with_data(data);
        assert_eq!(ItemMeta::decode_with_data(&again), Ok((meta, data)));
    }
    if let Ok(conflict) = SavedConflict::decode(data) {
        assert!(
            checked.is_ok(),
            "check_record disagrees with SavedConflict::decode"
        );
        let again = SavedConflict::decode(&conflict.encode())
            .expect("a decoded conflict re-encodes into bytes that decode");
        assert_eq!(again, conflict);
    }
}

fn inputs(target: &str) -> Result<Vec<PathBuf>, std::io::Error> {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder)? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Runs `check` on every input of `target`, and names every input that panicked.
fn replay(target: &str, check: fn(&[u8])) -> TestResult {
    let files = inputs(target)?;
    assert!(!files.is_empty(), "no inputs for {target}");
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path)?;
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: inputs that still fail: {failed:#?}"
    );
    Ok(())
}

#[test]
fn batch_inputs_replay_cleanly() -> TestResult {
    replay("batch", batch)
}

#[test]
fn knowledge_inputs_replay_cleanly() -> TestResult {
    replay("knowledge", knowledge)
}

#[test]
fn record_inputs_replay_cleanly() -> TestResult {
    replay("records", records)
}
