//! Arbitrary bytes into the metadata record decoders (every record kind, chosen by the
//! first byte): an error naming the reason, never a panic. Item metadata (with its data
//! tail) and saved conflicts that decode survive a round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let checked = knit::check_record(data);
    if let Ok(meta) = knit::ItemMeta::decode(data) {
        assert!(
            checked.is_ok(),
            "check_record disagrees with ItemMeta::decode"
        );
        assert_eq!(knit::ItemMeta::decode(&meta.encode()), Ok(meta));
    }
    if let Ok((meta, data)) = knit::ItemMeta::decode_with_data(data) {
        assert!(
            checked.is_ok(),
            "check_record disagrees with ItemMeta::decode_with_data"
        );
        let again = meta.encode_with_data(data);
        assert_eq!(knit::ItemMeta::decode_with_data(&again), Ok((meta, data)));
    }
    if let Ok(conflict) = knit::SavedConflict::decode(data) {
        assert!(
            checked.is_ok(),
            "check_record disagrees with SavedConflict::decode"
        );
        let again = knit::SavedConflict::decode(&conflict.encode())
            .expect("a decoded conflict re-encodes into bytes that decode");
        assert_eq!(again, conflict);
    }
});
