//! Replication-log superblock slots. Nothing may panic; a slot that decodes validates,
//! and its encoding decodes to the same superblock.
//!
//! Besides the raw input, the input is also tried sealed (magic, version 1 and a valid
//! crc) so that the field checks behind the crc are reached.

#![no_main]

use dmrep_formats::replog::{Superblock, FORMAT_VERSION, SB_MAGIC, SB_SLOT_SIZE};
use libfuzzer_sys::fuzz_target;

fn check(b: &[u8]) {
    if let Ok(sb) = Superblock::decode(b) {
        sb.validate().expect("a decoded superblock validates");
        let again = Superblock::decode(&sb.encode()).expect("an encoded superblock decodes");
        assert_eq!(again, sb);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut slot = vec![0u8; SB_SLOT_SIZE];
    let n = data.len().min(SB_SLOT_SIZE);
    slot[..n].copy_from_slice(&data[..n]);
    check(&slot);

    slot[0..8].copy_from_slice(&SB_MAGIC);
    slot[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    slot[12..16].fill(0);
    let crc = crc32c::crc32c(&slot);
    slot[12..16].copy_from_slice(&crc.to_le_bytes());
    check(&slot);
});
