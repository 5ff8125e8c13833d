//! Arbitrary bytes into the knowledge decoder: an error or canonical knowledge, never a
//! panic. Knowledge that decodes is well formed and survives a round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(knowledge) = knit::decode_knowledge(data) {
        assert!(
            knowledge.is_well_formed(),
            "decoded knowledge is not canonical"
        );
        let again = knit::decode_knowledge(&knit::encode_knowledge(&knowledge))
            .expect("decoded knowledge re-encodes into bytes that decode");
        assert_eq!(
            again, knowledge,
            "decode(encode(knowledge)) differs from knowledge"
        );
    }
});
