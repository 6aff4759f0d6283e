//! Replication-log entry headers. Nothing may panic; a header that decodes re-encodes
//! to a header that decodes to the same value.
//!
//! Besides the raw input, the input is also tried sealed (magic, version 1 and a valid
//! crc) so that the kind, flag and length checks behind the crc are reached.

#![no_main]

use dmrep_formats::replog::{EntryHeader, ENTRY_HEADER_SIZE, ENTRY_MAGIC, ENTRY_VERSION};
use libfuzzer_sys::fuzz_target;

fn check(b: &[u8; ENTRY_HEADER_SIZE]) {
    if let Ok(h) = EntryHeader::decode(b) {
        let _ = (h.record_len(), h.data_len(), h.epoch_end());
        let again = EntryHeader::decode(&h.encode()).expect("an encoded header decodes");
        assert_eq!(again, h);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; ENTRY_HEADER_SIZE];
    let n = data.len().min(ENTRY_HEADER_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    check(&b);

    b[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&ENTRY_VERSION.to_le_bytes());
    b[8..12].fill(0);
    let crc = crc32c::crc32c(&b);
    b[8..12].copy_from_slice(&crc.to_le_bytes());
    check(&b);
});
