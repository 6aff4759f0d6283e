//! The persistent snapshot exception store ("COW store"): on-disk layout.
//!
//! A `snapshot <origin> <COW> P <chunk>` keeps, on its COW device, the chunks of the
//! origin that were overwritten since the snapshot was taken ("exceptions"), and the map
//! saying which origin chunk each COW chunk holds. The store itself (allocation, group
//! commit, copy-out) lives in `dmrep-targets`' `snapshot::store`; this module is the
//! layout and the recovery scan, without I/O.
//!
//! The COW device is cut into chunks of the snapshot's chunk size (`chunk_bytes`, a
//! power of two of at least one sector); all integers are little-endian:
//!
//! ```text
//! chunk 0            | header (first 512 bytes; the rest of the chunk unused)
//! chunk 1            | metadata chunk of area 0: chunk_bytes/512 metadata blocks
//! chunks 2..2+E      | data chunks of area 0 (E = entries per area)
//! chunk 2+E          | metadata chunk of area 1
//! ...
//! metadata block (512 bytes): | magic | count | epoch | generation | index | 29 entries | crc |
//! ```
//!
//! Exceptions are allocated in order: exception `n` is entry `n % E` of area `n / E`,
//! its data is the `(n % E)`-th data chunk of that area, and its entry is in metadata
//! block `n / 29` (blocks numbered across areas). A metadata block is 512 bytes, the
//! unit a device writes atomically: rewriting the last, partly filled block with more
//! entries leaves, after a crash, the old or the new version, never a torn mix.
//!
//! What each part means on open:
//! - Header without the magic: never formatted (a zeroed device); the store formats it.
//!   To start a fresh snapshot on a device that held one, zero its first sector.
//! - Header with the magic that does not decode: an error naming what is wrong (the
//!   operator decides; guessing could serve a snapshot with the wrong chunks).
//! - State `invalid`: the snapshot filled its device (or its device failed); it stays
//!   invalid, its exceptions are not read.
//! - Metadata blocks are read in order ([`scan`]); the map is the entries of every
//!   block up to the first one that is not whole (fewer than 29 entries), does not
//!   decode (crc, magic, index), belongs to another format of the device (epoch), or
//!   is stale: written by an earlier open (generation) than the block before it. The
//!   blocks after it were written by a commit that never completed.
//!
//! Why the generation: every open of the store writes the header with generation + 1
//! (synced) before it writes any metadata block, and every block carries the generation
//! it was written in. A commit that wrote blocks `i` and `i+1` may leave, after a
//! crash, only block `i+1` durable; the scan stops at the partial block `i`, and the
//! next open rewrites `i` and later `i+1`. If it crashes between the two, the old block
//! `i+1` follows a full block `i` of a newer generation and is recognised as stale
//! rather than read as exceptions whose data chunks were since reused.
//!
//! Crash-safety order (kept by the store):
//! 1. the data chunk of an exception is written and synced before any metadata block
//!    naming it is written;
//! 2. the metadata block is synced before the origin write that needed the exception
//!    proceeds, and before a snapshot write that allocated it is acknowledged;
//! 3. entries are committed in allocation order (a block never names exception `n+1`
//!    while exception `n`'s data is not durable);
//! 4. the header is rewritten only as one 512-byte sector (open: generation; a full
//!    device: state `invalid`), synced before the store goes on.
//!
//! Format versions (one line per version, what changed):
//! - 1: first version.

use crate::le::*;

/// On-disk format version written by this build. Any other version is refused: a newer
/// layout may mean something this build does not know, and 0 was never written.
pub const FORMAT_VERSION: u32 = 1;

/// Header magic: names the device as a dmrep COW store, so that an unformatted device
/// (no magic) is told from a damaged store (magic, but the header does not check).
pub const MAGIC: [u8; 8] = *b"DMREPCOW";

/// Magic of a metadata block: a cheap first check before the crc (data written where a
/// metadata block should be rarely starts with it).
pub const BLOCK_MAGIC: [u8; 4] = *b"CoWm";

/// Bytes of the header and of one metadata block: one sector, the unit a device writes
/// atomically, so a rewrite is either old or new after a power cut, never torn.
pub const SECTOR: usize = 512;

/// Exceptions per metadata block: (512 - 32 bytes of block header - 16 bytes of
/// reserved tail with the crc) / 16 bytes per entry = 29.
pub const ENTRIES_PER_BLOCK: usize = 29;

/// Smallest chunk: one sector (the kernel's minimum too).
pub const MIN_CHUNK_BYTES: u64 = 512;

/// Largest chunk: 1 MiB. Each copy-out holds one chunk in memory; LVM's largest
/// snapshot chunk is 512 KiB, so 1 MiB leaves room and bounds memory per write.
pub const MAX_CHUNK_BYTES: u64 = 1 << 20;

/// Offset of the crc in the header and in a metadata block: the last 4 bytes.
const CRC_OFF: usize = SECTOR - 4;
/// First reserved byte of the header (zero up to the crc).
const HEADER_RESERVED_OFF: usize = 48;
/// Offset of the first entry of a metadata block.
const ENTRIES_OFF: usize = 32;

/// Why a header or a metadata block does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} is {len} bytes, expected {SECTOR}")]
    Size { what: &'static str, len: usize },
    #[error("format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("unknown snapshot state {0}")]
    State(u32),
    #[error("chunk size {0} bytes (must be a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES})")]
    ChunkBytes(u64),
    #[error("header generation 0 (generations start at 1)")]
    Generation,
    #[error("reserved byte {offset} is {value:#04x}, not zero")]
    Reserved { offset: usize, value: u8 },
    #[error("metadata block {index}: no block magic")]
    BlockMagic { index: u64 },
    #[error("metadata block {index}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BlockCrc { index: u64, stored: u32, computed: u32 },
    #[error("metadata block {expected} holds the index of block {found} (written at the wrong place)")]
    BlockIndex { expected: u64, found: u64 },
    #[error("metadata block {index}: {count} entries (at most {ENTRIES_PER_BLOCK})")]
    BlockCount { index: u64, count: u16 },
}

/// The snapshot's state, kept in the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// In use: the metadata blocks hold its exceptions.
    Valid,
    /// Filled up (or its device failed): its contents are lost, reads and writes fail.
    Invalid,
}

impl State {
    fn code(self) -> u32 {
        match self {
            State::Valid => 0,
            State::Invalid => 1,
        }
    }

    fn from_code(c: u32) -> Result<State, DecodeError> {
        match c {
            0 => Ok(State::Valid),
            1 => Ok(State::Invalid),
            _ => Err(DecodeError::State(c)),
        }
    }
}

/// Checks a chunk size.
pub fn check_chunk_bytes(chunk_bytes: u64) -> Result<(), DecodeError> {
    if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes) || !chunk_bytes.is_power_of_two() {
        return Err(DecodeError::ChunkBytes(chunk_bytes));
    }
    Ok(())
}

/// The header, in the first sector of chunk 0.
///
/// Byte layout (512 bytes at offset 0, little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 8 | magic `"DMREPCOW"` | tells a formatted store from an unformatted device; only its absence means "format me" |
/// | 8 | 4 | version u32 (= 1) | a layout this build does not know is refused, not misread |
/// | 12 | 4 | state u32 (0 valid, 1 invalid) | a snapshot that filled up stays invalid over restarts |
/// | 16 | 8 | chunk_bytes | the layout depends on it; a table with another chunk size is refused |
/// | 24 | 8 | epoch | random per format: metadata blocks of an earlier format of the device are not read as this one's |
/// | 32 | 8 | generation | grows at every open; stale metadata blocks are told from current ones (see the module doc) |
/// | 40 | 8 | origin_bytes | the origin's size when formatted (informational, shown by status) |
/// | 48 | 460 | reserved, zero | |
/// | 508 | 4 | crc32c | over bytes 0..508: a damaged header is detected, never trusted |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub state: State,
    pub chunk_bytes: u64,
    pub epoch: u64,
    /// At least 1.
    pub generation: u64,
    pub origin_bytes: u64,
}

impl Header {
    /// Encodes into one 512-byte sector, crc included.
    pub fn encode(&self) -> [u8; SECTOR] {
        let mut b = [0u8; SECTOR];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, self.state.code());
        put_u64(&mut b, 16, self.chunk_bytes);
        put_u64(&mut b, 24, self.epoch);
        put_u64(&mut b, 32, self.generation);
        put_u64(&mut b, 40, self.origin_bytes);
        let crc = crc32c::crc32c(&b[..CRC_OFF]);
        put_u32(&mut b, CRC_OFF, crc);
        b
    }

    /// Decodes and validates a header sector. `Ok(None)`: no magic, never formatted.
    /// Any header that has the magic either decodes whole or is an error.
    pub fn decode(b: &[u8]) -> Result<Option<Header>, DecodeError> {
        if b.len() != SECTOR {
            return Err(DecodeError::Size { what: "header", len: b.len() });
        }
        if b[0..8] != MAGIC {
            return Ok(None);
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(DecodeError::Version { found: version });
        }
        let stored = get_u32(b, CRC_OFF);
        let computed = crc32c::crc32c(&b[..CRC_OFF]);
        if stored != computed {
            return Err(DecodeError::HeaderCrc { stored, computed });
        }
        if let Some(offset) = (HEADER_RESERVED_OFF..CRC_OFF).find(|&i| b[i] != 0) {
            return Err(DecodeError::Reserved { offset, value: b[offset] });
        }
        let h = Header {
            state: State::from_code(get_u32(b, 12))?,
            chunk_bytes: get_u64(b, 16),
            epoch: get_u64(b, 24),
            generation: get_u64(b, 32),
            origin_bytes: get_u64(b, 40),
        };
        check_chunk_bytes(h.chunk_bytes)?;
        if h.generation == 0 {
            return Err(DecodeError::Generation);
        }
        Ok(Some(h))
    }
}

/// One exception: origin chunk `old_chunk` is kept in COW chunk `new_chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Exception {
    pub old_chunk: u64,
    pub new_chunk: u64,
}

/// A metadata block's identity: where it is, which format and open wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockId {
    /// The block's number in metadata order (0, 1, ...; across areas).
    pub index: u64,
    /// The header's epoch.
    pub epoch: u64,
    /// The header's generation when the block was written.
    pub generation: u64,
}

/// Encodes metadata block `id` with `entries` (at most [`ENTRIES_PER_BLOCK`]).
///
/// Byte layout (512 bytes at [`Layout::block_offset`], little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4 | magic `"CoWm"` | a cheap first check: data in a metadata block's place is not read as entries |
/// | 4 | 2 | count u16 (0..=29) | entries in use; a block with fewer than 29 is the last one |
/// | 6 | 2 | reserved, zero | |
/// | 8 | 8 | epoch | must equal the header's: a block of an earlier format of the device is not this store's |
/// | 16 | 8 | generation | the open that wrote it; never lower than the block before it (stale blocks, see the module doc) |
/// | 24 | 8 | index | a block written at the wrong place is caught |
/// | 32 | 464 | 29 entries: old_chunk u64, new_chunk u64 | the map; unused entries zero |
/// | 496 | 12 | reserved, zero | |
/// | 508 | 4 | crc32c | over bytes 0..508: a damaged block ends the scan |
///
/// # Panics
/// If `entries` has more than [`ENTRIES_PER_BLOCK`] entries (a caller bug).
pub fn encode_block(id: BlockId, entries: &[Exception]) -> [u8; SECTOR] {
    assert!(entries.len() <= ENTRIES_PER_BLOCK, "{} entries for one metadata block", entries.len());
    let mut b = [0u8; SECTOR];
    b[0..4].copy_from_slice(&BLOCK_MAGIC);
    put_u16(&mut b, 4, entries.len() as u16);
    put_u64(&mut b, 8, id.epoch);
    put_u64(&mut b, 16, id.generation);
    put_u64(&mut b, 24, id.index);
    for (i, e) in entries.iter().enumerate() {
        put_u64(&mut b, ENTRIES_OFF + 16 * i, e.old_chunk);
        put_u64(&mut b, ENTRIES_OFF + 16 * i + 8, e.new_chunk);
    }
    let crc = crc32c::crc32c(&b[..CRC_OFF]);
    put_u32(&mut b, CRC_OFF, crc);
    b
}

/// Decodes the metadata block found at the place of block `index`: its identity and
/// entries. The caller checks epoch and generation (see [`scan`]).
pub fn decode_block(b: &[u8], index: u64) -> Result<(BlockId, Vec<Exception>), DecodeError> {
    if b.len() != SECTOR {
        return Err(DecodeError::Size { what: "metadata block", len: b.len() });
    }
    if b[0..4] != BLOCK_MAGIC {
        return Err(DecodeError::BlockMagic { index });
    }
    let stored = get_u32(b, CRC_OFF);
    let computed = crc32c::crc32c(&b[..CRC_OFF]);
    if stored != computed {
        return Err(DecodeError::BlockCrc { index, stored, computed });
    }
    let found = get_u64(b, 24);
    if found != index {
        return Err(DecodeError::BlockIndex { expected: index, found });
    }
    let count = get_u16(b, 4);
    if count as usize > ENTRIES_PER_BLOCK {
        return Err(DecodeError::BlockCount { index, count });
    }
    let reserved = (6..8).chain(ENTRIES_OFF + 16 * count as usize..CRC_OFF);
    if let Some(offset) = reserved.into_iter().find(|&i| b[i] != 0) {
        return Err(DecodeError::Reserved { offset, value: b[offset] });
    }
    let id = BlockId { index, epoch: get_u64(b, 8), generation: get_u64(b, 16) };
    let entries = (0..count as usize)
        .map(|i| Exception {
            old_chunk: get_u64(b, ENTRIES_OFF + 16 * i),
            new_chunk: get_u64(b, ENTRIES_OFF + 16 * i + 8),
        })
        .collect();
    Ok((id, entries))
}

/// Where things are on a COW device of a given chunk size (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub chunk_bytes: u64,
}

impl Layout {
    /// The layout for `chunk_bytes` (checked: [`check_chunk_bytes`]).
    pub fn new(chunk_bytes: u64) -> Result<Layout, DecodeError> {
        check_chunk_bytes(chunk_bytes)?;
        Ok(Layout { chunk_bytes })
    }

    /// Metadata blocks in one metadata chunk.
    pub fn blocks_per_area(&self) -> u64 {
        self.chunk_bytes / SECTOR as u64
    }

    /// Exceptions per area (E): the entries of one metadata chunk.
    pub fn entries_per_area(&self) -> u64 {
        self.blocks_per_area() * ENTRIES_PER_BLOCK as u64
    }

    /// Chunks per area: its metadata chunk and its E data chunks.
    fn chunks_per_area(&self) -> u64 {
        1 + self.entries_per_area()
    }

    /// The COW chunk that holds exception `n`'s data.
    pub fn data_chunk(&self, n: u64) -> u64 {
        let (area, slot) = (n / self.entries_per_area(), n % self.entries_per_area());
        1 + area * self.chunks_per_area() + 1 + slot
    }

    /// The metadata block that holds exception `n`'s entry.
    pub fn block_of(n: u64) -> u64 {
        n / ENTRIES_PER_BLOCK as u64
    }

    /// Byte offset of metadata block `index` on the device.
    pub fn block_offset(&self, index: u64) -> u64 {
        let (area, within) = (index / self.blocks_per_area(), index % self.blocks_per_area());
        (1 + area * self.chunks_per_area()) * self.chunk_bytes + within * SECTOR as u64
    }

    /// How many exceptions a device of `device_bytes` holds: every exception's data
    /// chunk and its area's metadata chunk must fit.
    pub fn capacity(&self, device_bytes: u64) -> u64 {
        let chunks = device_bytes / self.chunk_bytes;
        // Chunk 0 is the header; then whole areas, then a last partial one.
        let Some(rest) = chunks.checked_sub(1) else { return 0 };
        let (areas, tail) = (rest / self.chunks_per_area(), rest % self.chunks_per_area());
        areas * self.entries_per_area() + tail.saturating_sub(1)
    }

    /// Chunks in use with `n` exceptions: the header, the metadata chunks of the areas
    /// begun, and the data chunks. 1 with none (the header).
    pub fn chunks_used(&self, n: u64) -> u64 {
        if n == 0 {
            return 1;
        }
        self.data_chunk(n - 1) + 1
    }

    /// Of [`chunks_used`](Self::chunks_used), the chunks holding metadata (header included).
    pub fn metadata_chunks(&self, n: u64) -> u64 {
        1 + n.div_ceil(self.entries_per_area())
    }
}

/// Why [`scan`] stopped where it did (for logs and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// A block with fewer than 29 entries: the last one (the normal end).
    Partial { index: u64 },
    /// A block that does not decode (never written, torn, damaged).
    Undecodable { index: u64, error: DecodeError },
    /// A block of another format of the device.
    OtherEpoch { index: u64 },
    /// A block older than the block before it (a commit that never completed).
    Stale { index: u64 },
    /// An entry naming a COW chunk other than its place says (damage or a bug).
    BadEntry { index: u64 },
    /// The device holds no more blocks.
    DeviceEnd,
}

/// The map read back by [`scan`]: the exceptions in allocation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub exceptions: Vec<Exception>,
    /// Highest generation of the blocks read (0 if none).
    pub generation: u64,
    pub end: ScanEnd,
}

/// Reads the map of a store whose header is `header`: metadata blocks in order, while
/// `read_block(offset)` returns them (an I/O error is returned as is), up to the end
/// the module doc describes. `capacity`: [`Layout::capacity`] of the device.
pub fn scan<E>(
    header: &Header,
    capacity: u64,
    mut read_block: impl FnMut(u64) -> Result<[u8; SECTOR], E>,
) -> Result<Scanned, E> {
    let layout = Layout { chunk_bytes: header.chunk_bytes };
    let mut exceptions = Vec::new();
    let mut generation = 0u64;
    let mut index = 0u64;
    let end = loop {
        if index * ENTRIES_PER_BLOCK as u64 >= capacity {
            break ScanEnd::DeviceEnd;
        }
        let b = read_block(layout.block_offset(index))?;
        let (id, entries) = match decode_block(&b, index) {
            Ok(x) => x,
            Err(error) => break ScanEnd::Undecodable { index, error },
        };
        if id.epoch != header.epoch {
            break ScanEnd::OtherEpoch { index };
        }
        if id.generation < generation || id.generation > header.generation {
            break ScanEnd::Stale { index };
        }
        let first = index * ENTRIES_PER_BLOCK as u64;
        let fits = entries
            .iter()
            .enumerate()
            .all(|(i, e)| first + (i as u64) < capacity && e.new_chunk == layout.data_chunk(first + i as u64));
        if !fits {
            break ScanEnd::BadEntry { index };
        }
        generation = id.generation;
        let full = entries.len() == ENTRIES_PER_BLOCK;
        exceptions.extend(entries);
        if !full {
            break ScanEnd::Partial { index };
        }
        index += 1;
    };
    Ok(Scanned { exceptions, generation, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header { state: State::Valid, chunk_bytes: 4096, epoch: 0xfeed, generation: 3, origin_bytes: 1 << 20 }
    }

    #[test]
    fn header_roundtrip_and_damage() {
        let h = header();
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), Some(h));
        let inv = Header { state: State::Invalid, ..h };
        assert_eq!(Header::decode(&inv.encode()).unwrap(), Some(inv));
        assert_eq!(Header::decode(&[0u8; SECTOR]).unwrap(), None, "no magic: unformatted");
        for at in [9usize, 13, 20, 30, 100, 508] {
            let mut d = b;
            d[at] ^= 0x10;
            assert!(Header::decode(&d).is_err(), "byte {at} damaged");
        }
        let bad = Header { chunk_bytes: 3000, ..h };
        assert_eq!(Header::decode(&bad.encode()), Err(DecodeError::ChunkBytes(3000)));
        let mut v2 = b;
        put_u32(&mut v2, 8, 2);
        assert_eq!(Header::decode(&v2), Err(DecodeError::Version { found: 2 }));
        assert!(Header::decode(&b[..100]).is_err());
    }

    #[test]
    fn block_damage_and_misplacement_are_detected() {
        let id = BlockId { index: 7, epoch: 1, generation: 2 };
        let e = [Exception { old_chunk: 5, new_chunk: 9 }];
        let b = encode_block(id, &e);
        assert_eq!(decode_block(&b, 7).unwrap(), (id, e.to_vec()));
        assert!(matches!(decode_block(&b, 8), Err(DecodeError::BlockIndex { expected: 8, found: 7 })));
        let mut d = b;
        d[40] ^= 1;
        assert!(matches!(decode_block(&d, 7), Err(DecodeError::BlockCrc { .. })));
        assert!(matches!(decode_block(&[0u8; SECTOR], 0), Err(DecodeError::BlockMagic { .. })));
    }

    #[test]
    fn layout_places_areas_and_blocks() {
        let l = Layout::new(4096).unwrap();
        assert_eq!(l.blocks_per_area(), 8);
        assert_eq!(l.entries_per_area(), 232);
        assert_eq!(l.data_chunk(0), 2);
        assert_eq!(l.data_chunk(231), 233);
        assert_eq!(l.data_chunk(232), 235, "area 1's metadata chunk is 234");
        assert_eq!(l.block_offset(0), 4096);
        assert_eq!(l.block_offset(7), 4096 + 7 * 512);
        assert_eq!(l.block_offset(8), 234 * 4096);
        assert_eq!(l.capacity(0), 0);
        assert_eq!(l.capacity(2 * 4096), 0, "header and a metadata chunk, no data");
        assert_eq!(l.capacity(3 * 4096), 1);
        assert_eq!(l.capacity(234 * 4096), 232);
        assert_eq!(l.capacity(235 * 4096), 232, "area 1's metadata chunk alone holds nothing");
        assert_eq!(l.capacity(236 * 4096), 233);
        assert_eq!(l.chunks_used(0), 1);
        assert_eq!(l.chunks_used(1), 3);
        assert_eq!(l.metadata_chunks(233), 3);
        assert!(Layout::new(256).is_err() && Layout::new(2 << 20).is_err());
    }

    /// Writes blocks for `n` exceptions of `gen` into a map of block offsets.
    fn write_blocks(
        img: &mut std::collections::HashMap<u64, [u8; SECTOR]>,
        h: &Header,
        all: &[Exception],
        from: usize,
        gen: u64,
    ) {
        let l = Layout { chunk_bytes: h.chunk_bytes };
        let (first, last) = (from / ENTRIES_PER_BLOCK, (all.len().max(1) - 1) / ENTRIES_PER_BLOCK);
        for blk in first..=last {
            let a = blk * ENTRIES_PER_BLOCK;
            let b = ((blk + 1) * ENTRIES_PER_BLOCK).min(all.len());
            let id = BlockId { index: blk as u64, epoch: h.epoch, generation: gen };
            img.insert(l.block_offset(blk as u64), encode_block(id, &all[a..b]));
        }
    }

    fn exceptions(h: &Header, n: usize) -> Vec<Exception> {
        let l = Layout { chunk_bytes: h.chunk_bytes };
        (0..n as u64).map(|i| Exception { old_chunk: i * 7 % 1000, new_chunk: l.data_chunk(i) }).collect()
    }

    fn scan_img(h: &Header, img: &std::collections::HashMap<u64, [u8; SECTOR]>) -> Scanned {
        scan::<()>(h, 1 << 20, |off| Ok(img.get(&off).copied().unwrap_or([0u8; SECTOR]))).unwrap()
    }

    #[test]
    fn a_stale_block_after_a_rewritten_full_block_is_not_read() {
        let h = header();
        let mut img = std::collections::HashMap::new();
        // Generation 2: 20 entries durable in block 0.
        let all = exceptions(&h, 20);
        write_blocks(&mut img, &h, &all, 0, 2);
        // A lost commit of generation 2 reached block 1 only.
        let lost: Vec<_> = (0..40).map(|i| Exception { old_chunk: 500 + i, new_chunk: 0 }).collect();
        let mut lost_all = all.clone();
        lost_all.extend(lost.iter().enumerate().map(|(i, e)| Exception {
            old_chunk: e.old_chunk,
            new_chunk: Layout { chunk_bytes: 4096 }.data_chunk(20 + i as u64),
        }));
        let l = Layout { chunk_bytes: 4096 };
        let b1 = encode_block(BlockId { index: 1, epoch: h.epoch, generation: 2 }, &lost_all[29..58]);
        img.insert(l.block_offset(1), b1);
        let s = scan_img(&h, &img);
        assert_eq!(s.exceptions, all);
        assert_eq!(s.end, ScanEnd::Partial { index: 0 });
        // Generation 3 fills block 0 with other entries; block 1 is stale.
        let mut all3 = all.clone();
        all3.extend((20..29).map(|i| Exception { old_chunk: 900 + i, new_chunk: l.data_chunk(i) }));
        write_blocks(&mut img, &h, &all3, 20, 3);
        let s = scan_img(&h, &img);
        assert_eq!(s.exceptions, all3);
        assert_eq!(s.end, ScanEnd::Stale { index: 1 });
        // Another epoch ends the scan too.
        let other = Header { epoch: 1, ..h };
        assert_eq!(scan_img(&other, &img).end, ScanEnd::OtherEpoch { index: 0 });
    }

    proptest! {
        #[test]
        fn block_roundtrip(index in any::<u64>(), epoch in any::<u64>(), generation in any::<u64>(),
                           raw in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..=ENTRIES_PER_BLOCK)) {
            let id = BlockId { index, epoch, generation };
            let entries: Vec<_> = raw.iter().map(|&(o, n)| Exception { old_chunk: o, new_chunk: n }).collect();
            let b = encode_block(id, &entries);
            prop_assert_eq!(decode_block(&b, index).unwrap(), (id, entries));
        }

        #[test]
        fn any_single_byte_damage_is_detected(at in 0usize..SECTOR, bit in 0u8..8) {
            let id = BlockId { index: 3, epoch: 4, generation: 5 };
            let mut b = encode_block(id, &[Exception { old_chunk: 1, new_chunk: 2 }]);
            b[at] ^= 1 << bit;
            prop_assert!(decode_block(&b, 3).is_err());
            let mut h = header().encode();
            h[at] ^= 1 << bit;
            // Damage to the magic reads as "unformatted"; anything else is an error.
            let r = Header::decode(&h);
            prop_assert!(r.is_err() || (at < 8 && r == Ok(None)));
        }

        /// Whatever prefix of blocks a crash leaves, the scan returns a prefix of the
        /// committed exceptions, and all of them when every block is there.
        #[test]
        fn scan_reads_a_prefix(n in 0usize..200, keep in proptest::collection::vec(any::<bool>(), 8)) {
            let h = Header { chunk_bytes: 1024, ..header() };
            let all = exceptions(&h, n);
            let mut img = std::collections::HashMap::new();
            write_blocks(&mut img, &h, &all, 0, 1);
            let s = scan_img(&h, &img);
            prop_assert_eq!(&s.exceptions, &all);
            let l = Layout { chunk_bytes: 1024 };
            for (i, k) in keep.iter().enumerate() {
                if !k { img.remove(&l.block_offset(i as u64)); }
            }
            let s = scan_img(&h, &img);
            prop_assert!(all.starts_with(&s.exceptions));
        }
    }
}
