//! Arbitrary bytes into the change-batch decoder: it must return an error or a valid
//! batch, never panic or allocate by a length it read. A batch that decodes must
//! survive a round trip through the encoder unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = knit::decode_batch(data) {
        let again = knit::decode_batch(&knit::encode_batch(&batch))
            .expect("a decoded batch re-encodes into bytes that decode");
        assert_eq!(again, batch, "decode(encode(batch)) differs from batch");
    }
});
