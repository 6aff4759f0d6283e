//! The `disk` dirty log's header and bitmap blocks. Nothing may panic; a header that
//! decodes validates and re-encodes to the same bytes; a block-sized header with the
//! magic is either a header or an error, never "unformatted"; a block that decodes
//! re-encodes to the same bytes.
//!
//! Besides the raw input, the input is also tried sealed (magic, version and crc made
//! right, optionally the reserved bytes zeroed) so that the field checks behind the crc
//! are reached.

#![no_main]

use dmrep_formats::dirtylog::{decode_block, encode_block, Header, BLOCK_SIZE, FORMAT_VERSION, MAGIC};
use libfuzzer_sys::fuzz_target;

fn check_header(b: &[u8]) {
    match Header::decode(b) {
        Ok(Some(h)) => {
            h.validate().expect("a decoded header validates");
            assert_eq!(h.encode()[..], b[..], "a decoded header re-encodes to the same bytes");
        }
        Ok(None) => assert_ne!(b[..MAGIC.len()], MAGIC, "a header with the magic read as unformatted"),
        Err(_) => {}
    }
}

fn seal_crc(b: &mut [u8; BLOCK_SIZE]) {
    let crc = crc32c::crc32c(&b[..BLOCK_SIZE - 4]);
    b[BLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    check_header(data);

    let mut b = [0u8; BLOCK_SIZE];
    let n = data.len().min(BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    check_header(&b);

    // Sealed: magic, (usually) version 1, (sometimes) zero reserved bytes, a valid crc.
    let mut h = b;
    h[..MAGIC.len()].copy_from_slice(&MAGIC);
    if flags & 1 == 0 {
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    }
    if flags & 2 == 0 {
        h[40..BLOCK_SIZE - 4].fill(0);
    }
    seal_crc(&mut h);
    check_header(&h);
    assert!(Header::decode(&h) != Ok(None), "a sealed header read as unformatted");

    // Bitmap blocks, found at the place of block `index`.
    let index = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let _ = decode_block(data, index);
    if let Ok(words) = decode_block(&b, index) {
        assert_eq!(encode_block(index, &words)[..], b[..]);
    }
    // Sealed: its own index (or another) and a valid crc.
    let mut blk = b;
    let claimed = if flags & 4 == 0 { index } else { index.wrapping_add(1) };
    blk[BLOCK_SIZE - 8..BLOCK_SIZE - 4].copy_from_slice(&claimed.to_le_bytes());
    seal_crc(&mut blk);
    match decode_block(&blk, index) {
        Ok(words) => {
            assert_eq!(claimed, index);
            assert_eq!(encode_block(index, &words)[..], blk[..]);
        }
        Err(e) => assert_ne!(claimed, index, "a sealed block at its place did not decode: {e}"),
    }
});
