//! The replication log's on-disk layout: superblocks, entry headers, the SLINK bitmap.
//!
//! Pure encode/decode, no I/O. The log itself (placement, recovery, concurrency) lives
//! in `dmrep-targets`' `replicator::log`.
//!
//! A log occupies a region `[start, start + region_size)` of a block back-end; all
//! positions below are relative to that region, and all integers are little-endian.
//!
//! ```text
//! region:  | superblock A (4 KiB) | superblock B (4 KiB) | ring (region_size - 8 KiB) ...... |
//!          0                      4096                   8192 = RING_OFFSET                  region_size
//! ring:    | hdr | data..pad | hdr | data..pad | hdr(Wrap) | free ... | hdr | data | ...
//!          each record 512-aligned: one 512-byte header, then the data padded to 512
//! ```
//!
//! Counters (seqs, epochs, generations, incarnations, the fence) are at most
//! [`MAX_COUNTER`]; a decoded value above it is refused as damage.
//!
//! Format versions (one line per version, what changed):
//! - 1: first version.
//! - 2: the superblock carries the site's role for the group, the group's UUID and
//!   generation, and the origin floor (see [`SiteState`]); entry headers (entry version 2)
//!   carry their origin seq and origin time. Version 1 logs open as a primary of
//!   generation 1 whose group UUID is the log's UUID; version 1 entries have no origin.
//! - 3: the superblock carries the group's lineage (the newest generations the site has
//!   been part of, see [`crate::lineage`]) instead of a bare generation number, and site
//!   flags (inconsistent, discard-local). A version 2 superblock reads as a lineage of its
//!   one generation (nonce 0, from seq 1) and no flags.
//! - 4: entries may be markers (record kind 5, see [`RecordKind::Marker`]); the layout is
//!   version 3's. The version says so to older builds, which would otherwise stop reading
//!   the ring at the first marker.

use crate::le::*;
use crate::lineage::{GenRecord, Lineage, GEN_RECORD_LEN, MAX_GENERATIONS};
use serde::{Deserialize, Serialize};

/// The site part of a version 2 or 3 superblock (offsets 106, 107, 2672..2904).
fn decode_site(b: &[u8], version: u32) -> Result<SiteState, SuperblockError> {
    let mut group_uuid = [0u8; 16];
    group_uuid.copy_from_slice(&b[2672..2688]);
    let role =
        SiteRole::from_u8(b[106]).ok_or_else(|| SuperblockError::Invalid(format!("unknown site role {}", b[106])))?;
    let generation = get_u64(b, 2688);
    let (lineage, flags) = if version == 2 {
        let l = Lineage::from_records(&[GenRecord { generation: generation.max(1), nonce: 0, start: 1 }])
            .map_err(SuperblockError::Invalid)?;
        (l, 0)
    } else {
        let n = get_u16(b, 2704) as usize;
        if n == 0 || n > MAX_GENERATIONS {
            return Err(SuperblockError::Invalid(format!("lineage of {n} generations (1..={MAX_GENERATIONS})")));
        }
        let records: Vec<GenRecord> =
            (0..n).map(|i| GenRecord::decode(&b[2712 + i * GEN_RECORD_LEN..2712 + (i + 1) * GEN_RECORD_LEN])).collect();
        let l = Lineage::from_records(&records).map_err(|e| SuperblockError::Invalid(format!("lineage: {e}")))?;
        if l.generation() != generation {
            return Err(SuperblockError::Invalid(format!(
                "group generation {generation} is not the lineage's current one ({})",
                l.generation()
            )));
        }
        (l, b[107])
    };
    if flags & !(FLAG_INCONSISTENT | FLAG_DISCARD_LOCAL) != 0 {
        return Err(SuperblockError::Invalid(format!("unknown site flags {flags:#x}")));
    }
    Ok(SiteState {
        role,
        group_uuid,
        lineage,
        origin_floor: get_u64(b, 2696),
        inconsistent: flags & FLAG_INCONSISTENT != 0,
        discard_local: flags & FLAG_DISCARD_LOCAL != 0,
    })
}

/// On-disk format version written by this build. Opening a log with a higher version
/// is refused: its layout may mean something this build does not know.
pub const FORMAT_VERSION: u32 = 4;

/// Superblock magic: names the region as a dmrep log for `dmrep log dump` and for
/// `auto`, which must not mistake arbitrary data for a log.
pub const SB_MAGIC: [u8; 8] = *b"DMREPLOG";

/// Bytes per superblock slot: one 4 KiB page, the atomic write unit of most devices and
/// large enough for the 256-entry cursor table.
pub const SB_SLOT_SIZE: usize = 4096;

/// Offset of the ring in the region: after the two superblock slots (A at 0, B at 4096).
pub const RING_OFFSET: u64 = 2 * SB_SLOT_SIZE as u64;

/// Alignment of the region start and size: the page size, so that superblock writes
/// never share a page with anything else.
pub const REGION_ALIGN: u64 = 4096;

/// Smallest region: two superblocks plus a ring that holds a useful number of 4 KiB
/// writes (about 250); anything smaller would be full all the time.
pub const MIN_REGION_SIZE: u64 = 1 << 20;

/// Alignment of every record in the ring: one sector, the unit a device writes
/// atomically, so a header is never torn in half on a device that honours it.
pub const RECORD_ALIGN: u64 = 512;

/// Size of an entry header: one sector (see [`RECORD_ALIGN`]); the fields need 336.
pub const ENTRY_HEADER_SIZE: usize = 512;

/// Entry header format version (independent of the superblock's, so entries can evolve).
/// 1: first version; 2: origin seq and origin time (in bytes that were reserved, zero, in
/// version 1, so a version 1 header reads as "no origin").
pub const ENTRY_VERSION: u16 = 2;

/// Entry header magic, `b"DMRE"` read as a little-endian u32: tells a header from data
/// when dumping a ring by hand.
pub const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"DMRE");

/// SLINK numbers are `0..MAX_SLINKS`: the original allowed SLINK numbers up to 2048, and
/// a 2048-bit bitmap is 256 bytes, half an entry header.
pub const MAX_SLINKS: usize = 2048;

/// An SLINK number, `0..MAX_SLINKS` (0: the local devices). One type wherever an SLINK
/// is named: tables, the log, the group.
pub type SlinkNr = u16;

/// At most this many SLINKs can be registered (have a cursor) at once: 256 cursors of
/// 10 bytes fill 2560 bytes, which fits in a 4 KiB superblock with room to spare.
pub const MAX_CURSORS: usize = 256;

/// Largest value a counter (seq, epoch, generation, incarnation, fence) may hold on disk.
/// Each grows by one per record, write or open: at a billion a second, 2^63 takes 292
/// years. A larger value is damage or a crafted log; decoding refuses it, so the
/// log's own `+ 1`s can never overflow.
pub const MAX_COUNTER: u64 = (1 << 63) - 1;

/// Flag on the last record of an epoch (one `append` call): recovery accepts an epoch only
/// if its end is present, so a batch survives a crash entirely or not at all.
pub const FLAG_EPOCH_END: u8 = 1;

/// Every flag bit this version knows; others are refused.
const KNOWN_FLAGS: u8 = FLAG_EPOCH_END;

/// Size of one cursor table row: slink u16 + applied seq u64.
const CURSOR_ROW: usize = 10;
/// Offset of the cursor table in a superblock slot.
const CURSOR_TABLE_OFF: usize = 112;

/// Rounds `n` up to a multiple of [`RECORD_ALIGN`].
pub const fn pad_to_record(n: u64) -> u64 {
    n.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

// ---------------------------------------------------------------------------------------
// SLINK bitmap

/// A set of SLINK numbers (`0..2048`) as a 2048-bit bitmap: the SLINKs that need an entry.
///
/// On disk: 32 little-endian u64 words, bit `n % 64` of word `n / 64` is SLINK `n`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SlinkSet([u64; 32]);

impl SlinkSet {
    /// The empty set.
    pub const fn new() -> Self {
        SlinkSet([0; 32])
    }

    /// A set from its SLINK numbers.
    ///
    /// # Panics
    /// If a number is `>= 2048` (see [`SlinkSet::insert`]).
    pub fn from_slinks(slinks: impl IntoIterator<Item = u16>) -> Self {
        let mut s = SlinkSet::new();
        for n in slinks {
            s.insert(n);
        }
        s
    }

    /// Adds `slink`; returns whether it was absent.
    ///
    /// # Panics
    /// If `slink >= 2048`: SLINK numbers are validated when a table is parsed, so a larger
    /// one here is a programming error.
    pub fn insert(&mut self, slink: u16) -> bool {
        assert!((slink as usize) < MAX_SLINKS, "SLINK number {slink} out of range (max {})", MAX_SLINKS - 1);
        let (w, b) = (slink as usize / 64, slink % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !was
    }

    /// Removes `slink`; returns whether it was present. Out-of-range numbers are absent.
    pub fn remove(&mut self, slink: u16) -> bool {
        if slink as usize >= MAX_SLINKS {
            return false;
        }
        let (w, b) = (slink as usize / 64, slink % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] &= !(1 << b);
        was
    }

    pub fn contains(&self, slink: u16) -> bool {
        (slink as usize) < MAX_SLINKS && self.0[slink as usize / 64] & (1 << (slink % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// SLINK numbers in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u16;
                bits &= bits - 1;
                Some(w as u16 * 64 + b)
            })
        })
    }

    /// The raw words (for encoding).
    pub fn words(&self) -> &[u64; 32] {
        &self.0
    }

    /// A set from raw words (for decoding); every bit pattern is a valid set.
    pub fn from_words(words: [u64; 32]) -> Self {
        SlinkSet(words)
    }
}

impl std::fmt::Debug for SlinkSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl std::fmt::Display for SlinkSet {
    /// `0,2,5` (or `-` when empty).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, s) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

impl Serialize for SlinkSet {
    /// As a list of SLINK numbers.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for SlinkSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<u16>::deserialize(d)?;
        let mut s = SlinkSet::new();
        for n in v {
            if n as usize >= MAX_SLINKS {
                return Err(serde::de::Error::custom(format!("SLINK number {n} out of range")));
            }
            s.insert(n);
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------
// Superblock

/// One superblock slot: where the log is, how far its consumers got, and what recovery
/// needs to find the tail. Two slots (A at region offset 0, B at 4096) are written
/// alternately; the valid slot with the highest generation wins, so a torn superblock
/// write falls back to the previous one and loses nothing that was acknowledged.
///
/// Byte layout (4096 bytes, little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 8 | magic `"DMREPLOG"` | identifies a log; `auto` must not adopt random data |
/// | 8 | 4 | version u32 (= 1) | a newer layout is refused, not misread |
/// | 12 | 4 | crc32c | over the whole 4096-byte slot with this field zeroed |
/// | 16 | 16 | uuid | names the log; every entry header carries it, so entries of an earlier log in the same region are never taken for ours |
/// | 32 | 8 | region_size | bytes, superblocks included: on open the size on disk wins |
/// | 40 | 8 | ring_offset (= 8192) | where the ring starts in the region |
/// | 48 | 8 | ring_len | bytes of ring (region_size - ring_offset) |
/// | 56 | 8 | generation | +1 on every superblock write; picks the newer slot |
/// | 64 | 8 | incarnation | +1 on every open; entries carry it, so entries left over from before a truncation are never resurrected |
/// | 72 | 8 | fence_seq | first seq the current incarnation could write: an entry with seq >= fence_seq must carry an incarnation >= this one's |
/// | 80 | 8 | head_pos | ring offset of the oldest entry some SLINK still needs (or of the tail when none) |
/// | 88 | 8 | head_seq | seq expected at head_pos |
/// | 96 | 8 | next_epoch | floor for the next epoch, so epochs keep increasing across restarts of an empty log |
/// | 104 | 2 | cursor count u16 | rows used in the table below |
/// | 106 | 1 | role u8: 1 primary, 2 secondary (version 2; version 1 reads as primary) | a site knows after a crash whether it may accept writes |
/// | 107 | 1 | site flags u8 (version 3): bit 0 inconsistent, bit 1 discard-local; other bits zero | see [`SiteState`] |
/// | 108 | 4 | reserved, zero | |
/// | 112 | 2560 | cursor table: 256 rows of (slink u16, applied_seq u64), sorted by slink | the highest seq each registered SLINK has durably applied |
/// | 2672 | 16 | group uuid (version 2; version 1 reads as the log uuid) | every site of a group has the same; a peer of another group is refused |
/// | 2688 | 8 | group generation u64 (version 2; version 1 reads as 1; version 3: the lineage's current one) | grows with every promotion; fences stale primaries |
/// | 2696 | 8 | origin floor u64 | highest origin seq durable in this log before its head: what a secondary has received even when its log is empty |
/// | 2704 | 2 | lineage length u16 (version 3; 1..=8) | |
/// | 2706 | 6 | reserved, zero | |
/// | 2712 | 24 each | lineage records, oldest first ([`crate::lineage::GenRecord`]) | the generations this site was part of: fast failback and split-brain detection |
/// | 2904 | 1192 | reserved, zero | |
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Superblock {
    /// Serialised as the usual hyphenated text.
    #[serde(serialize_with = "uuid_text")]
    pub uuid: [u8; 16],
    pub region_size: u64,
    pub ring_offset: u64,
    pub ring_len: u64,
    pub generation: u64,
    pub incarnation: u64,
    pub fence_seq: u64,
    pub head_pos: u64,
    pub head_seq: u64,
    pub next_epoch: u64,
    /// `(slink, applied_seq)`, sorted by slink, unique, at most [`MAX_CURSORS`].
    pub cursors: Vec<(u16, u64)>,
    /// The site's part in its group (version 2).
    pub site: SiteState,
}

/// A site's role for its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteRole {
    /// Accepts writes from applications and ships them to the other sites.
    Primary = 1,
    /// Receives the primary's stream; its devices are read-only.
    Secondary = 2,
}

impl SiteRole {
    pub fn from_u8(v: u8) -> Option<SiteRole> {
        match v {
            1 => Some(SiteRole::Primary),
            2 => Some(SiteRole::Secondary),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SiteRole::Primary => "primary",
            SiteRole::Secondary => "secondary",
        }
    }
}

/// What a site keeps about its group beside the log (superblock version 2, offsets 106
/// and 2672..2704; see [`Superblock`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SiteState {
    pub role: SiteRole,
    /// Serialised as the usual hyphenated text.
    #[serde(serialize_with = "uuid_text")]
    pub group_uuid: [u8; 16],
    /// The generations of the group's history this site was part of, newest last; its
    /// current generation grows with every promotion (1 for a new group).
    pub lineage: Lineage,
    /// Highest origin seq (the primary's seq) this log held before its head: a secondary's
    /// "received" when every entry it received has been applied and dropped.
    pub origin_floor: u64,
    /// The devices here are being copied outside write order (a resync from the primary,
    /// after a failback or a discarded split brain): not a prefix state until it ends.
    pub inconsistent: bool,
    /// The operator chose to discard this site's writes since a split brain: the next
    /// primary's history replaces them (`dmrep resolve --discard-local`).
    pub discard_local: bool,
}

impl SiteState {
    /// The group's generation as this site knows it.
    pub fn generation(&self) -> u64 {
        self.lineage.generation()
    }

    /// A primary of generation 1 of a new group.
    pub fn new_primary(group_uuid: [u8; 16], nonce: u64) -> SiteState {
        SiteState {
            role: SiteRole::Primary,
            group_uuid,
            lineage: Lineage::first(nonce),
            origin_floor: 0,
            inconsistent: false,
            discard_local: false,
        }
    }
}

const FLAG_INCONSISTENT: u8 = 1;
const FLAG_DISCARD_LOCAL: u8 = 2;

fn uuid_text<S: serde::Serializer>(u: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&uuid::Uuid::from_bytes(*u))
}

/// Why a superblock slot is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("slot is {0} bytes, expected 4096")]
    Short(usize),
    #[error("no dmrep log magic")]
    NoMagic,
    #[error("format version {found} is newer than this build supports ({supported})")]
    NewerVersion { found: u32, supported: u32 },
    #[error("format version 0 is not valid")]
    VersionZero,
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("invalid field: {0}")]
    Invalid(String),
}

impl Superblock {
    /// Encodes into one 4096-byte slot, crc included.
    ///
    /// # Panics
    /// If there are more than [`MAX_CURSORS`] cursors (a caller bug: the log refuses to
    /// register more).
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.cursors.len() <= MAX_CURSORS, "too many cursors");
        let mut b = vec![0u8; SB_SLOT_SIZE];
        b[0..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        b[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut b, 32, self.region_size);
        put_u64(&mut b, 40, self.ring_offset);
        put_u64(&mut b, 48, self.ring_len);
        put_u64(&mut b, 56, self.generation);
        put_u64(&mut b, 64, self.incarnation);
        put_u64(&mut b, 72, self.fence_seq);
        put_u64(&mut b, 80, self.head_pos);
        put_u64(&mut b, 88, self.head_seq);
        put_u64(&mut b, 96, self.next_epoch);
        put_u16(&mut b, 104, self.cursors.len() as u16);
        b[106] = self.site.role as u8;
        b[107] =
            (self.site.inconsistent as u8 * FLAG_INCONSISTENT) | (self.site.discard_local as u8 * FLAG_DISCARD_LOCAL);
        for (i, &(slink, seq)) in self.cursors.iter().enumerate() {
            let o = CURSOR_TABLE_OFF + i * CURSOR_ROW;
            put_u16(&mut b, o, slink);
            put_u64(&mut b, o + 2, seq);
        }
        b[2672..2688].copy_from_slice(&self.site.group_uuid);
        put_u64(&mut b, 2688, self.site.generation());
        put_u64(&mut b, 2696, self.site.origin_floor);
        let records = self.site.lineage.records();
        put_u16(&mut b, 2704, records.len() as u16);
        for (i, r) in records.iter().enumerate() {
            r.encode(&mut b[2712 + i * GEN_RECORD_LEN..]);
        }
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decodes and validates one slot.
    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() != SB_SLOT_SIZE {
            return Err(SuperblockError::Short(b.len()));
        }
        if b[0..8] != SB_MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        // Version before crc: a newer layout may checksum differently, and "newer
        // version" is the message the user needs either way.
        let version = get_u32(b, 8);
        if version > FORMAT_VERSION {
            return Err(SuperblockError::NewerVersion { found: version, supported: FORMAT_VERSION });
        }
        if version == 0 {
            return Err(SuperblockError::VersionZero);
        }
        let stored = get_u32(b, 12);
        let computed = crc_with_zeroed(b, 12);
        if stored != computed {
            return Err(SuperblockError::Crc { stored, computed });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let count = get_u16(b, 104) as usize;
        if count > MAX_CURSORS {
            return Err(SuperblockError::Invalid(format!("{count} cursors, at most {MAX_CURSORS}")));
        }
        let cursors: Vec<(u16, u64)> = (0..count)
            .map(|i| {
                let o = CURSOR_TABLE_OFF + i * CURSOR_ROW;
                (get_u16(b, o), get_u64(b, o + 2))
            })
            .collect();
        let sb = Superblock {
            uuid,
            region_size: get_u64(b, 32),
            ring_offset: get_u64(b, 40),
            ring_len: get_u64(b, 48),
            generation: get_u64(b, 56),
            incarnation: get_u64(b, 64),
            fence_seq: get_u64(b, 72),
            head_pos: get_u64(b, 80),
            head_seq: get_u64(b, 88),
            next_epoch: get_u64(b, 96),
            cursors,
            site: if version == 1 { SiteState::new_primary(uuid, 0) } else { decode_site(b, version)? },
        };
        sb.validate().map_err(SuperblockError::Invalid)?;
        Ok(sb)
    }

    /// Checks the geometry and the invariants between fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.region_size < MIN_REGION_SIZE || !self.region_size.is_multiple_of(REGION_ALIGN) {
            return Err(format!(
                "region size {} (must be a multiple of {REGION_ALIGN} and at least {MIN_REGION_SIZE})",
                self.region_size
            ));
        }
        if self.ring_offset != RING_OFFSET {
            return Err(format!("ring offset {} (version 1 uses {RING_OFFSET})", self.ring_offset));
        }
        if self.ring_len != self.region_size - self.ring_offset {
            return Err(format!("ring length {} does not match region size {}", self.ring_len, self.region_size));
        }
        if self.head_pos >= self.ring_len || !self.head_pos.is_multiple_of(RECORD_ALIGN) {
            return Err(format!("head position {} outside the ring or unaligned", self.head_pos));
        }
        if self.head_seq == 0 || self.generation == 0 || self.incarnation == 0 || self.site.generation() == 0 {
            return Err("head seq, generation, group generation and incarnation start at 1".into());
        }
        for (name, v) in [
            ("generation", self.generation),
            ("incarnation", self.incarnation),
            ("fence seq", self.fence_seq),
            ("head seq", self.head_seq),
            ("next epoch", self.next_epoch),
            ("group generation", self.site.generation()),
            ("origin floor", self.site.origin_floor),
        ] {
            if v > MAX_COUNTER {
                return Err(format!("{name} {v} is beyond the counter limit {MAX_COUNTER}"));
            }
        }
        for w in self.cursors.windows(2) {
            if w[0].0 >= w[1].0 {
                return Err(format!("cursor table not sorted/unique at slink {}", w[1].0));
            }
        }
        if let Some(&(s, _)) = self.cursors.iter().find(|(s, _)| *s as usize >= MAX_SLINKS) {
            return Err(format!("cursor for SLINK {s} out of range"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Entry header

/// What a ring record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A write: `len` bytes of data follow the header.
    Write = 1,
    /// Zero `len` bytes at `offset`; no data.
    WriteZeroes = 2,
    /// Discard `len` bytes at `offset`; no data.
    Discard = 3,
    /// "The next record is at the ring start": written at the tail when the next entry
    /// does not fit before the ring end. Carries the seq of that next entry.
    Wrap = 4,
    /// A point in the group's history that a site acts on when it has applied every entry
    /// before it (a group-consistent snapshot). `len` bytes of data follow the header: the
    /// marker's description (see `replicator::marker` in dmrep-targets), at most
    /// [`MAX_MARKER_DATA`]. It changes no device.
    Marker = 5,
}

/// Largest description a marker entry carries.
pub const MAX_MARKER_DATA: u32 = 4096;

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => RecordKind::Write,
            2 => RecordKind::WriteZeroes,
            3 => RecordKind::Discard,
            4 => RecordKind::Wrap,
            5 => RecordKind::Marker,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Write => "write",
            RecordKind::WriteZeroes => "write_zeroes",
            RecordKind::Discard => "discard",
            RecordKind::Wrap => "wrap",
            RecordKind::Marker => "marker",
        }
    }

    /// Whether `len` bytes of data follow the header.
    pub fn has_data(self) -> bool {
        matches!(self, RecordKind::Write | RecordKind::Marker)
    }
}

/// The 512-byte header of every ring record.
///
/// Byte layout (little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4 | magic `"DMRE"` | tells a header from data |
/// | 4 | 2 | version u16 (= 1) | entries can evolve apart from the superblock |
/// | 6 | 1 | kind u8: 1 write, 2 write-zeroes, 3 discard, 4 wrap, 5 marker (format 4) | |
/// | 7 | 1 | flags u8: bit 0 = last record of its epoch | a batch survives a crash whole or not at all |
/// | 8 | 4 | header crc32c | over these 512 bytes with this field zeroed (data crc included) |
/// | 12 | 4 | data crc32c | over the `len` data bytes (0 when there is no data) |
/// | 16 | 16 | log uuid | records of an earlier log in the same region never match |
/// | 32 | 8 | seq | consecutive; recovery walks expecting seq+1 (a wrap record carries the next entry's seq) |
/// | 40 | 8 | epoch | one per `append` (group commit); increasing |
/// | 48 | 8 | incarnation | of the open that wrote it; non-decreasing along the ring |
/// | 56 | 8 | offset | bytes on the device |
/// | 64 | 4 | dev_nr | which device of the group |
/// | 68 | 4 | len | bytes: of data (write, marker) or of the range (write-zeroes, discard) |
/// | 72 | 8 | origin seq (version 2) | the primary's seq of the entry at a secondary; 0 at the primary (the entry's own seq) |
/// | 80 | 256 | SLINK bitmap (see [`SlinkSet`]) | the SLINKs that needed this entry when appended |
/// | 336 | 8 | origin time (version 2): microseconds since the Unix epoch when the primary appended it | lag in seconds, restore by time |
/// | 344 | 168 | reserved, zero | |
///
/// A write's (or marker's) data follows the header, padded with zeros to a multiple of 512.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub kind: RecordKind,
    pub flags: u8,
    pub data_crc: u32,
    pub uuid: [u8; 16],
    pub seq: u64,
    pub epoch: u64,
    pub incarnation: u64,
    pub offset: u64,
    pub dev_nr: u32,
    pub len: u32,
    pub slinks: SlinkSet,
    /// The primary's seq of this entry (0: this log's own entry, origin seq = seq).
    pub origin_seq: u64,
    /// When the primary appended it, microseconds since the Unix epoch (0: unknown).
    pub origin_time_us: u64,
}

/// Why 512 bytes are not a valid entry header.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no entry magic")]
    NoMagic,
    #[error("entry version {0} is not supported (this build reads 1 to {ENTRY_VERSION})")]
    Version(u16),
    #[error("header crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
    #[error("wrap record with len {0} (must be 0)")]
    WrapLen(u32),
    #[error("marker with {0} bytes of description (at most {MAX_MARKER_DATA})")]
    MarkerLen(u32),
    #[error("{field} {value} is beyond the counter limit {MAX_COUNTER}")]
    Counter { field: &'static str, value: u64 },
}

impl EntryHeader {
    /// Bytes of data that follow the header on disk (before padding).
    pub fn data_len(&self) -> u64 {
        if self.kind.has_data() {
            self.len as u64
        } else {
            0
        }
    }

    /// Bytes the whole record occupies in the ring: header plus padded data.
    pub fn record_len(&self) -> u64 {
        ENTRY_HEADER_SIZE as u64 + pad_to_record(self.data_len())
    }

    pub fn epoch_end(&self) -> bool {
        self.flags & FLAG_EPOCH_END != 0
    }

    /// Encodes into 512 bytes, header crc included.
    pub fn encode(&self) -> [u8; ENTRY_HEADER_SIZE] {
        let mut b = [0u8; ENTRY_HEADER_SIZE];
        put_u32(&mut b, 0, ENTRY_MAGIC);
        put_u16(&mut b, 4, ENTRY_VERSION);
        b[6] = self.kind as u8;
        b[7] = self.flags;
        put_u32(&mut b, 12, self.data_crc);
        b[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut b, 32, self.seq);
        put_u64(&mut b, 40, self.epoch);
        put_u64(&mut b, 48, self.incarnation);
        put_u64(&mut b, 56, self.offset);
        put_u32(&mut b, 64, self.dev_nr);
        put_u32(&mut b, 68, self.len);
        put_u64(&mut b, 72, self.origin_seq);
        for (i, w) in self.slinks.words().iter().enumerate() {
            put_u64(&mut b, 80 + 8 * i, *w);
        }
        put_u64(&mut b, 336, self.origin_time_us);
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, 8, crc);
        b
    }

    /// The primary's seq of this entry.
    pub fn origin(&self) -> u64 {
        if self.origin_seq == 0 {
            self.seq
        } else {
            self.origin_seq
        }
    }

    /// Decodes and checks magic, version, crc, kind and flags. Whether the header belongs
    /// where it was found (uuid, seq, epoch, incarnation) is the walker's business.
    pub fn decode(b: &[u8; ENTRY_HEADER_SIZE]) -> Result<EntryHeader, HeaderError> {
        if get_u32(b, 0) != ENTRY_MAGIC {
            return Err(HeaderError::NoMagic);
        }
        let version = get_u16(b, 4);
        if version == 0 || version > ENTRY_VERSION {
            return Err(HeaderError::Version(version));
        }
        let stored = get_u32(b, 8);
        let computed = crc_with_zeroed(b, 8);
        if stored != computed {
            return Err(HeaderError::Crc { stored, computed });
        }
        let kind = RecordKind::from_u8(b[6]).ok_or(HeaderError::Kind(b[6]))?;
        let flags = b[7];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(HeaderError::Flags(flags));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let mut words = [0u64; 32];
        for (i, w) in words.iter_mut().enumerate() {
            *w = get_u64(b, 80 + 8 * i);
        }
        let len = get_u32(b, 68);
        if kind == RecordKind::Wrap && len != 0 {
            return Err(HeaderError::WrapLen(len));
        }
        if kind == RecordKind::Marker && len > MAX_MARKER_DATA {
            return Err(HeaderError::MarkerLen(len));
        }
        let (seq, epoch, incarnation) = (get_u64(b, 32), get_u64(b, 40), get_u64(b, 48));
        let origin_seq = get_u64(b, 72);
        for (field, value) in [("seq", seq), ("epoch", epoch), ("incarnation", incarnation), ("origin seq", origin_seq)]
        {
            if value > MAX_COUNTER {
                return Err(HeaderError::Counter { field, value });
            }
        }
        Ok(EntryHeader {
            kind,
            flags,
            data_crc: get_u32(b, 12),
            uuid,
            seq,
            epoch,
            incarnation,
            offset: get_u64(b, 56),
            dev_nr: get_u32(b, 64),
            len,
            slinks: SlinkSet::from_words(words),
            origin_seq,
            origin_time_us: get_u64(b, 336),
        })
    }
}

/// crc32c of `b` with the 4 bytes at `at` taken as zero.
fn crc_with_zeroed(b: &[u8], at: usize) -> u32 {
    let crc = crc32c::crc32c(&b[..at]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &b[at + 4..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_sb() -> Superblock {
        Superblock {
            uuid: [7; 16],
            region_size: 4 << 20,
            ring_offset: RING_OFFSET,
            ring_len: (4 << 20) - RING_OFFSET,
            generation: 3,
            incarnation: 2,
            fence_seq: 10,
            head_pos: 4096,
            head_seq: 9,
            next_epoch: 5,
            cursors: vec![(0, 8), (3, 12), (2047, 1)],
            site: SiteState {
                role: SiteRole::Secondary,
                group_uuid: [4; 16],
                lineage: Lineage::first(5).promoted(6, 40),
                origin_floor: 77,
                inconsistent: true,
                discard_local: false,
            },
        }
    }

    #[test]
    fn superblock_roundtrip_and_layout() {
        let sb = sample_sb();
        let b = sb.encode();
        assert_eq!(b.len(), SB_SLOT_SIZE);
        assert_eq!(&b[0..8], b"DMREPLOG");
        assert_eq!(get_u32(&b, 8), FORMAT_VERSION);
        assert_eq!(get_u64(&b, 56), 3);
        assert_eq!(b[106], 2, "role");
        assert_eq!(&b[2672..2688], &[4; 16], "group uuid");
        assert_eq!(get_u64(&b, 2688), 2, "group generation");
        assert_eq!(b[107], 1, "flags");
        assert_eq!(get_u16(&b, 2704), 2, "lineage length");
        assert_eq!(GenRecord::decode(&b[2736..2760]), GenRecord { generation: 2, nonce: 6, start: 40 });
        assert_eq!(get_u64(&b, 2696), 77, "origin floor");
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
    }

    #[test]
    fn superblock_crc_covers_whole_slot() {
        let b = sample_sb().encode();
        // A flip anywhere, even in the reserved tail, is caught.
        for at in [16, 60, 200, 3000, 4095] {
            let mut c = b.clone();
            c[at] ^= 1;
            assert!(matches!(Superblock::decode(&c), Err(SuperblockError::Crc { .. })), "flip at {at}");
        }
    }

    #[test]
    fn superblock_version_checks() {
        let mut b = sample_sb().encode();
        put_u32(&mut b, 8, 5);
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::NewerVersion { found: 5, supported: 4 }));
        put_u32(&mut b, 8, 0);
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::VersionZero));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(SuperblockError::NoMagic));
    }

    /// A version 1 superblock (a log written before sites had roles) opens as a primary
    /// of generation 1 whose group is named by the log's uuid, whatever its reserved bytes.
    #[test]
    fn superblock_version_1_reads_as_a_primary() {
        let mut b = sample_sb().encode();
        put_u32(&mut b, 8, 1);
        b[106] = 0;
        b[2672..2704].fill(0);
        let crc = crc_with_zeroed(&b, 12);
        put_u32(&mut b, 12, crc);
        let sb = Superblock::decode(&b).unwrap();
        assert_eq!(sb.site, SiteState::new_primary([7; 16], 0));
        // A version 2 superblock: its generation, as a lineage of one, no flags.
        let mut b = sample_sb().encode();
        put_u32(&mut b, 8, 2);
        b[107] = 0;
        b[2704..2904].fill(0);
        put_u64(&mut b, 2688, 6);
        let crc = crc_with_zeroed(&b, 12);
        put_u32(&mut b, 12, crc);
        let site = Superblock::decode(&b).unwrap().site;
        assert_eq!((site.generation(), site.lineage.records().len(), site.inconsistent), (6, 1, false));
        // ... and an unknown role in a version 2 superblock is damage.
        let mut b = sample_sb().encode();
        b[106] = 9;
        let crc = crc_with_zeroed(&b, 12);
        put_u32(&mut b, 12, crc);
        assert!(matches!(Superblock::decode(&b), Err(SuperblockError::Invalid(m)) if m.contains("role")));
    }

    #[test]
    fn superblock_rejects_bad_geometry() {
        let mut sb = sample_sb();
        sb.head_pos = sb.ring_len;
        assert!(matches!(Superblock::decode(&sb.encode()), Err(SuperblockError::Invalid(_))));
        let mut sb = sample_sb();
        sb.cursors = vec![(3, 1), (3, 2)];
        assert!(matches!(Superblock::decode(&sb.encode()), Err(SuperblockError::Invalid(_))));
    }

    fn sample_header() -> EntryHeader {
        EntryHeader {
            kind: RecordKind::Write,
            flags: FLAG_EPOCH_END,
            data_crc: 0xdead_beef,
            uuid: [1; 16],
            seq: 42,
            epoch: 7,
            incarnation: 3,
            offset: 1 << 40,
            dev_nr: 5,
            len: 4096,
            slinks: SlinkSet::from_slinks([0, 1, 2047]),
            origin_seq: 1000,
            origin_time_us: 1_800_000_000_000_000,
        }
    }

    #[test]
    fn header_roundtrip_and_errors() {
        let h = sample_header();
        let b = h.encode();
        assert_eq!(&b[0..4], b"DMRE");
        assert_eq!(EntryHeader::decode(&b).unwrap(), h);
        assert_eq!(h.record_len(), 512 + 4096);
        let mut c = b;
        c[100] ^= 0x10;
        assert!(matches!(EntryHeader::decode(&c), Err(HeaderError::Crc { .. })));
        let mut c = b;
        c[0] = 0;
        assert_eq!(EntryHeader::decode(&c), Err(HeaderError::NoMagic));
        assert_eq!(EntryHeader::decode(&[0u8; 512]), Err(HeaderError::NoMagic));
        let mut w = h.clone();
        w.kind = RecordKind::Wrap;
        assert_eq!(EntryHeader::decode(&w.encode()), Err(HeaderError::WrapLen(4096)));
        w.len = 0;
        assert_eq!(EntryHeader::decode(&w.encode()).unwrap().record_len(), 512);
    }

    #[test]
    fn counters_that_could_overflow_are_refused() {
        // Found by fuzzing log recovery: a checksummed superblock or header holding
        // u64::MAX made the log's `+ 1`s overflow (a panic in debug builds, a wrap to
        // an invalid incarnation in release builds).
        for f in [56, 64, 72, 88, 96] {
            let mut b = sample_sb().encode();
            put_u64(&mut b, f, MAX_COUNTER + 1);
            let crc = crc_with_zeroed(&b, 12);
            put_u32(&mut b, 12, crc);
            let e = Superblock::decode(&b).unwrap_err();
            assert!(e.to_string().contains("beyond the counter limit"), "field at {f}: {e}");
        }
        let mut sb = sample_sb();
        sb.incarnation = MAX_COUNTER;
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        for (field, set) in [
            ("seq", (|h: &mut EntryHeader| h.seq = u64::MAX) as fn(&mut EntryHeader)),
            ("epoch", |h| h.epoch = MAX_COUNTER + 1),
            ("incarnation", |h| h.incarnation = u64::MAX),
        ] {
            let mut h = sample_header();
            set(&mut h);
            let value = match field {
                "seq" => h.seq,
                "epoch" => h.epoch,
                _ => h.incarnation,
            };
            assert_eq!(EntryHeader::decode(&h.encode()), Err(HeaderError::Counter { field, value }));
        }
    }

    #[test]
    fn slinkset_basics() {
        let mut s = SlinkSet::new();
        assert!(s.is_empty());
        assert!(s.insert(0));
        assert!(!s.insert(0));
        assert!(s.insert(64));
        assert!(s.insert(2047));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 64, 2047]);
        assert_eq!(s.len(), 3);
        assert!(s.contains(64) && !s.contains(65) && !s.contains(4000));
        assert!(s.remove(64));
        assert!(!s.remove(64));
        assert_eq!(s.to_string(), "0,2047");
        assert_eq!(serde_json::to_string(&s).unwrap(), "[0,2047]");
        let back: SlinkSet = serde_json::from_str("[0,2047]").unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<SlinkSet>("[2048]").is_err());
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn slinkset_insert_out_of_range_panics() {
        SlinkSet::new().insert(2048);
    }

    proptest! {
        #[test]
        fn header_roundtrip(kind in 1u8..=3, last in any::<bool>(), seq in 0..=MAX_COUNTER, epoch in 0..=MAX_COUNTER,
                            inc in 0..=MAX_COUNTER, offset in any::<u64>(), dev in any::<u32>(), len in any::<u32>(),
                            slinks in proptest::collection::vec(0u16..2048, 0..20), crc in any::<u32>()) {
            let h = EntryHeader {
                kind: RecordKind::from_u8(kind).unwrap(),
                flags: if last { FLAG_EPOCH_END } else { 0 },
                data_crc: crc, uuid: [9; 16], seq, epoch, incarnation: inc, offset, dev_nr: dev, len,
                slinks: SlinkSet::from_slinks(slinks), origin_seq: seq / 2, origin_time_us: offset,
            };
            prop_assert_eq!(EntryHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn marker_header_roundtrip(seq in 1..=MAX_COUNTER, len in 0..=MAX_MARKER_DATA) {
            let h = EntryHeader {
                kind: RecordKind::Marker, flags: FLAG_EPOCH_END, data_crc: 7, uuid: [3; 16], seq, epoch: seq,
                incarnation: 1, offset: 0, dev_nr: 0, len, slinks: SlinkSet::from_slinks([0u16, 2]),
                origin_seq: 0, origin_time_us: 5,
            };
            prop_assert_eq!(h.data_len(), len as u64);
            prop_assert_eq!(EntryHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 512)) {
            let arr: [u8; 512] = b.clone().try_into().unwrap();
            let _ = EntryHeader::decode(&arr);
            let mut slot = vec![0u8; 4096];
            slot[..512].copy_from_slice(&b);
            slot[0..8].copy_from_slice(&SB_MAGIC);
            let _ = Superblock::decode(&slot);
        }
    }
}
