//! The `disk` dirty log's on-disk layout: one header block, then the region bitmap in
//! checksummed blocks.
//!
//! Pure encode/decode, no I/O. The log itself (opening, formatting, in-memory changes
//! and flushes) lives in `dmrep-targets`' `replicator::dirty::disk`.
//!
//! A dirty log occupies a file or device of its own, from offset 0; all integers are
//! little-endian. Bit `r` of the bitmap is region `r` (`region_bytes` bytes of the RD
//! starting at `r * region_bytes`); a set bit means the RD may lack that region.
//!
//! ```text
//! | header (4 KiB) | bitmap block 0 (4 KiB) | bitmap block 1 (4 KiB) | ... | block n-1 |
//! 0                4096                     8192                                 4096 * (1 + n)
//! bitmap block i:  | bits of regions i*32704 .. (i+1)*32704 (4088 bytes) | index | crc |
//! ```
//!
//! What each part means on open:
//! - Header without the magic: the log was never formatted (a new, zeroed file, or a
//!   device that held something else); the opener formats it.
//! - Header with the magic that does not decode (crc mismatch, unknown version or flags,
//!   fields that contradict each other): an error naming what is wrong. Guessing would
//!   either forget dirty regions (data the RD lacks, never copied) or copy everything;
//!   the operator decides.
//! - Bitmap block that does not decode (a torn write, a block at the wrong place): its
//!   regions all count as dirty. Safe: a crash can only cause extra resync, never a
//!   missed region.
//!
//! Formatting order, so that a crash never leaves a header with the magic that does not
//! decode: the bitmap blocks, sync; the header with its magic zeroed, sync; then the
//! header's first sector (512 bytes, written atomically) with the magic, sync. After a
//! crash the header either has no magic (formatted again) or is whole. The header is
//! never rewritten after that; flushes rewrite bitmap blocks only.
//!
//! Format versions (one line per version, what changed):
//! - 1: first version (the layout `dirty/disk.rs` wrote before it moved here).

use crate::le::*;

/// On-disk format version written by this build. Any other version is refused: a newer
/// layout may mean something this build does not know, and 0 was never written.
pub const FORMAT_VERSION: u32 = 1;

/// Header magic: names the file as a dmrep dirty log, so that an unformatted file (no
/// magic) is told from a damaged log (magic, but the header does not check).
pub const MAGIC: [u8; 8] = *b"DMREPDRT";

/// Bytes per header and per bitmap block: one 4 KiB page, the atomic write unit of most
/// devices, so a flush rewrites whole pages and never shares one between two blocks.
pub const BLOCK_SIZE: usize = 4096;

/// Bytes of bits in one bitmap block: the block less its 4-byte index and 4-byte crc.
pub const BITMAP_BYTES_PER_BLOCK: usize = BLOCK_SIZE - 8;

/// Bitmap words (u64) per block: 4088 bytes are exactly 511 words, so words never
/// straddle blocks and a block maps to a contiguous slice of an in-memory bitmap.
pub const WORDS_PER_BLOCK: usize = BITMAP_BYTES_PER_BLOCK / 8;

/// Regions per bitmap block (32704): every bit of the 4088 bytes is a region. Stored in
/// the header so that a layout with another block size is refused, not misread.
pub const BITS_PER_BLOCK: u64 = BITMAP_BYTES_PER_BLOCK as u64 * 8;

/// Smallest region: one 512-byte sector, the smallest unit a write can touch. (The
/// table asks for more, 4 KiB; the format only needs regions to be sectors.)
pub const MIN_REGION_BYTES: u64 = 512;

/// Offset of the header's crc: its last 4 bytes, so the crc covers bytes `0..4092`.
const HEADER_CRC_OFF: usize = BLOCK_SIZE - 4;
/// Offset of a bitmap block's index.
const BLOCK_INDEX_OFF: usize = BITMAP_BYTES_PER_BLOCK;
/// Offset of a bitmap block's crc: its last 4 bytes, covering bytes `0..4092`.
const BLOCK_CRC_OFF: usize = BLOCK_SIZE - 4;
/// First reserved byte of the header (reserved up to the crc).
const HEADER_RESERVED_OFF: usize = 40;

/// Number of bitmap blocks for `regions` regions.
pub const fn blocks_for(regions: u64) -> u64 {
    regions.div_ceil(BITS_PER_BLOCK)
}

/// Bytes a dirty log of `regions` regions needs: the header and the bitmap blocks.
pub const fn bytes_needed(regions: u64) -> u64 {
    (1 + blocks_for(regions)) * BLOCK_SIZE as u64
}

/// Offset of bitmap block `index` in the log.
pub const fn block_offset(index: u64) -> u64 {
    (1 + index) * BLOCK_SIZE as u64
}

/// Why a header or a bitmap block does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} is {len} bytes, expected {BLOCK_SIZE}")]
    Size { what: &'static str, len: usize },
    #[error("format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("unknown header flags {0:#010x}")]
    Flags(u32),
    #[error("region size {0} bytes (must be a power of two of at least {MIN_REGION_BYTES})")]
    RegionBytes(u64),
    #[error("{found} bits per bitmap block (version {FORMAT_VERSION} uses {BITS_PER_BLOCK})")]
    BitsPerBlock { found: u64 },
    #[error("{regions} regions of {region_bytes} bytes do not fit a 64-bit device")]
    Regions { regions: u64, region_bytes: u64 },
    #[error("reserved header byte {offset} is {value:#04x}, not zero")]
    Reserved { offset: usize, value: u8 },
    #[error("bitmap block {index}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BlockCrc { index: u32, stored: u32, computed: u32 },
    #[error("bitmap block {expected} holds the index of block {found} (written at the wrong place)")]
    BlockIndex { expected: u32, found: u32 },
}

/// The header: the geometry the bitmap was written for.
///
/// Byte layout (4096 bytes at offset 0, little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 8 | magic `"DMREPDRT"` | tells a formatted log from an unformatted file; only its absence means "format me" |
/// | 8 | 4 | version u32 (= 1) | a layout this build does not know is refused, not misread |
/// | 12 | 4 | flags u32 (= 0) | room for later options; bits this version does not know are refused |
/// | 16 | 8 | region_bytes | must match the table: the same bitmap read with another region size would point at other bytes |
/// | 24 | 8 | regions | must match the device size, for the same reason |
/// | 32 | 8 | bits_per_block (= 32704) | the bitmap block geometry, so another one is refused rather than misread |
/// | 40 | 4052 | reserved, zero | |
/// | 4092 | 4 | crc32c | over bytes 0..4092: a torn or damaged header is detected, never trusted |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes per region: a power of two, at least [`MIN_REGION_BYTES`].
    pub region_bytes: u64,
    /// Regions covered: the device size divided by `region_bytes`, rounded up.
    pub regions: u64,
    /// Always [`BITS_PER_BLOCK`] in version 1.
    pub bits_per_block: u64,
}

impl Header {
    /// The header of a version-1 log.
    pub const fn new(region_bytes: u64, regions: u64) -> Self {
        Header { region_bytes, regions, bits_per_block: BITS_PER_BLOCK }
    }

    /// Number of bitmap blocks after the header.
    pub const fn blocks(&self) -> u64 {
        blocks_for(self.regions)
    }

    /// Checks the invariants between fields; [`Header::decode`] refuses a header that
    /// breaks them, so a writer checks before formatting.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.region_bytes < MIN_REGION_BYTES || !self.region_bytes.is_power_of_two() {
            return Err(DecodeError::RegionBytes(self.region_bytes));
        }
        if self.bits_per_block != BITS_PER_BLOCK {
            return Err(DecodeError::BitsPerBlock { found: self.bits_per_block });
        }
        // The last region must start on a 64-bit device, and block indexes are u32.
        let last_start = self.regions.saturating_sub(1).checked_mul(self.region_bytes);
        if last_start.is_none() || self.blocks() > u32::MAX as u64 {
            return Err(DecodeError::Regions { regions: self.regions, region_bytes: self.region_bytes });
        }
        Ok(())
    }

    /// Encodes into one 4096-byte block, crc included.
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, 0);
        put_u64(&mut b, 16, self.region_bytes);
        put_u64(&mut b, 24, self.regions);
        put_u64(&mut b, 32, self.bits_per_block);
        let crc = crc32c::crc32c(&b[..HEADER_CRC_OFF]);
        put_u32(&mut b, HEADER_CRC_OFF, crc);
        b
    }

    /// Decodes and validates a header block. `Ok(None)`: no magic, the log was never
    /// formatted. Any header that has the magic either decodes whole or is an error.
    pub fn decode(b: &[u8]) -> Result<Option<Header>, DecodeError> {
        if b.len() != BLOCK_SIZE {
            return Err(DecodeError::Size { what: "header", len: b.len() });
        }
        if b[0..8] != MAGIC {
            return Ok(None);
        }
        // Version before crc: another layout may checksum differently, and "version"
        // is the message the user needs either way.
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(DecodeError::Version { found: version });
        }
        let stored = get_u32(b, HEADER_CRC_OFF);
        let computed = crc32c::crc32c(&b[..HEADER_CRC_OFF]);
        if stored != computed {
            return Err(DecodeError::HeaderCrc { stored, computed });
        }
        let flags = get_u32(b, 12);
        if flags != 0 {
            return Err(DecodeError::Flags(flags));
        }
        if let Some(offset) = (HEADER_RESERVED_OFF..HEADER_CRC_OFF).find(|&i| b[i] != 0) {
            return Err(DecodeError::Reserved { offset, value: b[offset] });
        }
        let h = Header { region_bytes: get_u64(b, 16), regions: get_u64(b, 24), bits_per_block: get_u64(b, 32) };
        h.validate()?;
        Ok(Some(h))
    }
}

/// Encodes bitmap block `index` from its words (bit `k` of word `w` is region
/// `index * 32704 + 64 * w + k`). Fewer than [`WORDS_PER_BLOCK`] words are padded
/// with zeros (the last block of a log).
///
/// Byte layout (4096 bytes at offset `4096 * (1 + index)`, little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4088 | 511 u64 words of bits | the regions of this block, LSB first |
/// | 4088 | 4 | index u32 | a block written at the wrong place is caught, not read as another block's regions |
/// | 4092 | 4 | crc32c | over bytes 0..4092: a torn block is detected and read as all dirty |
///
/// # Panics
/// If `words` has more than [`WORDS_PER_BLOCK`] words (a caller bug).
pub fn encode_block(index: u32, words: &[u64]) -> [u8; BLOCK_SIZE] {
    assert!(words.len() <= WORDS_PER_BLOCK, "{} words for one bitmap block", words.len());
    let mut b = [0u8; BLOCK_SIZE];
    for (i, w) in words.iter().enumerate() {
        put_u64(&mut b, 8 * i, *w);
    }
    put_u32(&mut b, BLOCK_INDEX_OFF, index);
    let crc = crc32c::crc32c(&b[..BLOCK_CRC_OFF]);
    put_u32(&mut b, BLOCK_CRC_OFF, crc);
    b
}

/// Decodes bitmap block `index` (the block found at its place): checks the crc, then
/// that the block says it is block `index`. On error the caller counts every region of
/// the block as dirty.
pub fn decode_block(b: &[u8], index: u32) -> Result<[u64; WORDS_PER_BLOCK], DecodeError> {
    if b.len() != BLOCK_SIZE {
        return Err(DecodeError::Size { what: "bitmap block", len: b.len() });
    }
    let stored = get_u32(b, BLOCK_CRC_OFF);
    let computed = crc32c::crc32c(&b[..BLOCK_CRC_OFF]);
    if stored != computed {
        return Err(DecodeError::BlockCrc { index, stored, computed });
    }
    let found = get_u32(b, BLOCK_INDEX_OFF);
    if found != index {
        return Err(DecodeError::BlockIndex { expected: index, found });
    }
    let mut words = [0u64; WORDS_PER_BLOCK];
    for (i, w) in words.iter_mut().enumerate() {
        *w = get_u64(b, 8 * i);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header::new(64 << 10, 40_000)
    }

    /// A valid header with `f` applied to its bytes and the crc made right again.
    fn resealed(f: impl FnOnce(&mut [u8; BLOCK_SIZE])) -> [u8; BLOCK_SIZE] {
        let mut b = sample().encode();
        f(&mut b);
        let crc = crc32c::crc32c(&b[..HEADER_CRC_OFF]);
        put_u32(&mut b, HEADER_CRC_OFF, crc);
        b
    }

    #[test]
    fn header_layout_and_roundtrip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(&b[0..8], b"DMREPDRT");
        assert_eq!(get_u32(&b, 8), 1);
        assert_eq!(get_u32(&b, 12), 0);
        assert_eq!(get_u64(&b, 16), 64 << 10);
        assert_eq!(get_u64(&b, 24), 40_000);
        assert_eq!(get_u64(&b, 32), 32_704);
        assert_eq!(get_u32(&b, 4092), crc32c::crc32c(&b[..4092]));
        assert_eq!(Header::decode(&b), Ok(Some(h)));
        assert_eq!(h.blocks(), 2);
        assert_eq!(bytes_needed(40_000), 3 * 4096);
        assert_eq!(block_offset(1), 8192);
    }

    #[test]
    fn no_magic_is_unformatted_not_an_error() {
        assert_eq!(Header::decode(&[0u8; BLOCK_SIZE]), Ok(None));
        // Whatever the rest holds: without the magic nothing else is looked at.
        let mut b = sample().encode();
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Ok(None));
    }

    #[test]
    fn header_size_is_checked() {
        assert_eq!(Header::decode(&[0u8; 512]), Err(DecodeError::Size { what: "header", len: 512 }));
    }

    #[test]
    fn header_crc_mismatch_is_an_error() {
        for at in [9, 16, 30, 100, 4091, 4093] {
            let mut b = sample().encode();
            b[at] ^= 1;
            let e = Header::decode(&b).unwrap_err();
            assert!(matches!(e, DecodeError::HeaderCrc { .. } | DecodeError::Version { .. }), "flip at {at}: {e}");
        }
        let mut b = sample().encode();
        b[200] = 7;
        assert!(matches!(Header::decode(&b), Err(DecodeError::HeaderCrc { .. })));
    }

    #[test]
    fn unknown_versions_are_errors() {
        for v in [0, 2, u32::MAX] {
            let b = resealed(|b| put_u32(b, 8, v));
            assert_eq!(Header::decode(&b), Err(DecodeError::Version { found: v }));
        }
        // The version is checked before the crc: a newer layout may checksum otherwise.
        let mut b = sample().encode();
        put_u32(&mut b, 8, 2);
        assert_eq!(Header::decode(&b), Err(DecodeError::Version { found: 2 }));
    }

    #[test]
    fn unknown_flags_are_errors() {
        let b = resealed(|b| put_u32(b, 12, 4));
        assert_eq!(Header::decode(&b), Err(DecodeError::Flags(4)));
    }

    #[test]
    fn reserved_bytes_must_be_zero() {
        let b = resealed(|b| b[1000] = 0x5a);
        assert_eq!(Header::decode(&b), Err(DecodeError::Reserved { offset: 1000, value: 0x5a }));
    }

    #[test]
    fn inconsistent_fields_are_errors() {
        for rb in [0, 256, 4097, 3 << 12] {
            let b = resealed(|b| put_u64(b, 16, rb));
            assert_eq!(Header::decode(&b), Err(DecodeError::RegionBytes(rb)), "region bytes {rb}");
        }
        let b = resealed(|b| put_u64(b, 32, 4096 * 8));
        assert_eq!(Header::decode(&b), Err(DecodeError::BitsPerBlock { found: 32_768 }));
        let b = resealed(|b| put_u64(b, 24, u64::MAX));
        assert_eq!(Header::decode(&b), Err(DecodeError::Regions { regions: u64::MAX, region_bytes: 64 << 10 }));
        // Zero regions (an empty device) is consistent: no bitmap blocks.
        let h = Header::new(4096, 0);
        assert_eq!(Header::decode(&h.encode()), Ok(Some(h)));
        assert_eq!(h.blocks(), 0);
    }

    #[test]
    fn block_layout_and_roundtrip() {
        let b = encode_block(3, &[1, 0, u64::MAX]);
        assert_eq!(get_u64(&b, 0), 1);
        assert_eq!(get_u64(&b, 16), u64::MAX);
        assert!(b[24..4088].iter().all(|&x| x == 0));
        assert_eq!(get_u32(&b, 4088), 3);
        assert_eq!(get_u32(&b, 4092), crc32c::crc32c(&b[..4092]));
        let words = decode_block(&b, 3).unwrap();
        assert_eq!(&words[..3], &[1, 0, u64::MAX]);
        assert!(words[3..].iter().all(|&w| w == 0));
    }

    #[test]
    fn block_errors() {
        let b = encode_block(3, &[5; WORDS_PER_BLOCK]);
        assert_eq!(decode_block(&b, 4), Err(DecodeError::BlockIndex { expected: 4, found: 3 }));
        let mut torn = b;
        torn[2048..].fill(0);
        assert!(matches!(decode_block(&torn, 3), Err(DecodeError::BlockCrc { index: 3, .. })));
        assert!(matches!(decode_block(&[0u8; BLOCK_SIZE], 0), Err(DecodeError::BlockCrc { .. })));
        assert_eq!(decode_block(&b[..4000], 3), Err(DecodeError::Size { what: "bitmap block", len: 4000 }));
    }

    #[test]
    #[should_panic(expected = "words for one bitmap block")]
    fn too_many_words_panic() {
        encode_block(0, &[0; WORDS_PER_BLOCK + 1]);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let b = resealed(|b| put_u32(b, 8, 2));
        assert_eq!(
            Header::decode(&b).unwrap_err().to_string(),
            "format version 2 is not supported (this build reads version 1)"
        );
        assert_eq!(
            DecodeError::RegionBytes(3).to_string(),
            "region size 3 bytes (must be a power of two of at least 512)"
        );
    }

    proptest! {
        #[test]
        fn header_roundtrip(shift in 9u32..48, r in any::<u64>()) {
            // Any count whose last region starts on a 64-bit device and whose block
            // indexes fit a u32.
            let regions = (r >> shift) % (1 << 46);
            let h = Header::new(1 << shift, regions);
            prop_assert!(h.validate().is_ok());
            prop_assert_eq!(Header::decode(&h.encode()), Ok(Some(h)));
        }

        #[test]
        fn block_roundtrip(index in any::<u32>(), words in proptest::collection::vec(any::<u64>(), 0..=WORDS_PER_BLOCK)) {
            let b = encode_block(index, &words);
            let back = decode_block(&b, index).unwrap();
            prop_assert_eq!(&back[..words.len()], &words[..]);
            prop_assert!(back[words.len()..].iter().all(|&w| w == 0));
        }

        #[test]
        fn what_decodes_reencodes_to_the_same_bytes(b in proptest::collection::vec(any::<u8>(), BLOCK_SIZE),
                                                     regions in any::<u64>(), rb in any::<u64>()) {
            // Arbitrary bytes with the magic, and arbitrary fields sealed with a valid crc.
            let mut raw = b.clone();
            raw[0..8].copy_from_slice(&MAGIC);
            if let Ok(Some(h)) = Header::decode(&raw) {
                prop_assert_eq!(&h.encode()[..], &raw[..]);
            }
            let h = Header::new(rb, regions);
            match Header::decode(&h.encode()) {
                Ok(Some(back)) => prop_assert_eq!(back, h),
                Ok(None) => prop_assert!(false, "a header with the magic read as unformatted"),
                Err(e) => prop_assert_eq!(h.validate(), Err(e)),
            }
            if let Ok(words) = decode_block(&b, 0) {
                prop_assert_eq!(&encode_block(0, &words)[..], &b[..]);
            }
        }
    }
}
