//! The replication log: a persistent ring buffer of write entries, shared by every SLINK
//! of a replicator group.
//!
//! The on-disk layout (superblocks, entry headers) is documented on the types that encode
//! it, in [`dmrep_formats::replog`]. This module places entries in the ring
//! (`space.rs`), appends and frees them (`ring.rs`), recovers the log on open
//! (`recovery.rs`) and dumps it offline (`inspect.rs`).
//!
//! # Life of an entry
//! 1. [`RingLog::append`] writes one batch (one *epoch*, one group commit): headers and
//!    data with one gathered write per contiguous run (two when the batch wraps), then
//!    one sync. The entries are visible ([`RingLog::entries_from`]) and durable when it
//!    returns, and carry consecutive seqs.
//! 2. Each SLINK's copier reads them ([`RingLog::read_data`]), applies them to its device
//!    or site, makes that durable, then calls [`RingLog::set_cursors`].
//! 3. `set_cursors` writes the cursors to the superblock (durable), then advances the
//!    head past every entry that all SLINKs of its bitmap have applied; the space becomes
//!    free for the appender. The head is durable before its space is reused, so recovery
//!    never starts at an overwritten entry.
//!
//! # Recovery
//! On open the valid superblock with the highest generation is taken, the ring is walked
//! from the head, and the first invalid record ends the log; an epoch without its last
//! record is dropped whole (a batch survives a crash entirely or not at all). A torn or
//! corrupt tail is truncated and reported ([`RecoveryReport::truncated`]), never a reason
//! to refuse to start. The open's incarnation is persisted before `open` returns; every
//! later entry carries it, so entries left beyond a truncation are never resurrected.
//!
//! # Threads and locks
//! Every method takes `&self`. Intended use: one appender thread, one copier per SLINK
//! (reading data and setting cursors), any number of status readers. Three locks, always
//! taken in this order: `append` (held for a whole append, I/O included: a second
//! concurrent append waits behind the first), `superblock` (held while a superblock is
//! written and synced: `set_cursors`, `register_slink`, `unregister_slink`, and an append
//! that needs to free space), `meta` (the in-memory state, never held during I/O).
//! `read_data`, `entries_from`, `cursor` and `stats` only take `meta`, briefly.
//!
//! # For callers
//! - Cursors are durable promises: call `set_cursors` only after the SLINK's copy of those
//!   entries is durable. After a crash a copier resumes after its durable cursor, so
//!   entries past it that it had applied are applied again.
//! - `entries_from(cursor + 1, ..)` may start beyond `cursor + 1`: entries that do not
//!   name a SLINK can be freed before its cursor passes them.
//! - Each `set_cursors`, `register_slink` and `unregister_slink` costs one superblock
//!   write and sync: batch cursor updates (one per applied epoch, say).
//! - `register_slink` on a registered SLINK keeps its cursor, so registering every SLINK
//!   of the table after each open is safe. A new SLINK needs nothing already logged.
//! - `Full` writes no entry (at most a superblock that frees space); `append` retried
//!   later may succeed. An entry never spans the ring end, so a nearly empty log can
//!   still refuse a large batch until its head reaches the ring start (an empty log
//!   moves it there by itself).

mod inspect;
mod recovery;
mod ring;
mod space;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::io;

use serde::Serialize;

pub use dmrep_formats::replog::{SlinkSet, SuperblockError};
pub use inspect::{inspect, LogDump, RecordDump, SlotDump, StopDump};
pub use ring::{rand_nonce, RingLog};

use dmrep_formats::replog::RecordKind;

/// What an entry does to its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Write `len` bytes of data at `offset`.
    Write,
    /// Zero `len` bytes at `offset` (no data in the log).
    WriteZeroes,
    /// Discard `len` bytes at `offset` (no data in the log).
    Discard,
    /// A point in the group's history (see [`crate::replicator::marker`]): `len` bytes of
    /// description, no change to any device.
    Marker,
}

impl EntryKind {
    pub(crate) fn record_kind(self) -> RecordKind {
        match self {
            EntryKind::Write => RecordKind::Write,
            EntryKind::WriteZeroes => RecordKind::WriteZeroes,
            EntryKind::Discard => RecordKind::Discard,
            EntryKind::Marker => RecordKind::Marker,
        }
    }

    /// Whether the entry carries `len` bytes of data in the log (writes and markers).
    pub fn has_data(self) -> bool {
        self.record_kind().has_data()
    }

    /// Whether the entry changes a device (everything but a marker).
    pub fn changes_data(self) -> bool {
        self != EntryKind::Marker
    }

    /// `None` for a wrap record, which is not an entry.
    pub(crate) fn from_record(k: RecordKind) -> Option<Self> {
        match k {
            RecordKind::Write => Some(EntryKind::Write),
            RecordKind::WriteZeroes => Some(EntryKind::WriteZeroes),
            RecordKind::Discard => Some(EntryKind::Discard),
            RecordKind::Marker => Some(EntryKind::Marker),
            RecordKind::Wrap => None,
        }
    }
}

/// One entry to append.
#[derive(Clone, Copy, Debug)]
pub struct NewEntry<'a> {
    /// Which device of the group.
    pub dev_nr: u32,
    /// Bytes from the start of the device.
    pub offset: u64,
    pub kind: EntryKind,
    /// Bytes: the data length for a write, the range for write-zeroes and discard.
    pub len: u32,
    /// The data of a write (`len` bytes); empty for the other kinds.
    pub data: &'a [u8],
    /// The SLINKs that must apply this entry before its space can be reused.
    pub slinks: SlinkSet,
    /// Where the entry comes from: `None` for a write of this site (the primary's own
    /// entry; its origin time is the append's); the primary's seq and time for an entry a
    /// secondary received. Origin seqs must grow along the log.
    pub origin: Option<Origin>,
}

/// An entry's place in the primary's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The primary's seq.
    pub seq: u64,
    /// When the primary appended it, microseconds since the Unix epoch.
    pub time_us: u64,
}

/// An entry in the log, as returned by [`RingLog::append`] and [`RingLog::entries_from`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// Consecutive over the life of the log, starting at 1.
    pub seq: u64,
    /// Shared by the entries of one append; increasing.
    pub epoch: u64,
    pub dev_nr: u32,
    pub offset: u64,
    pub len: u32,
    pub kind: EntryKind,
    /// The SLINKs that needed the entry when it was appended.
    pub slinks: SlinkSet,
    /// The primary's seq of the entry (equal to `seq` at the primary).
    pub origin_seq: u64,
    /// When the primary appended it, microseconds since the Unix epoch (0: unknown,
    /// an entry written before origin times were kept).
    pub origin_time_us: u64,
    /// Ring offset of the header.
    pub(crate) pos: u64,
    pub(crate) data_crc: u32,
}

impl EntryMeta {
    /// Where the entry's header is, in bytes from the ring start (for messages).
    pub fn ring_pos(&self) -> u64 {
        self.pos
    }
}

/// Per-SLINK progress, from [`RingLog::stats`] and [`RingLog::slink_stats`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlinkStats {
    pub slink: u16,
    /// Highest seq the SLINK has durably applied.
    pub cursor: u64,
    /// Entries it still has to apply (those after its cursor with it in their bitmap).
    pub pending_entries: u64,
    /// Sum of their `len` (data for writes, the range for write-zeroes and discards).
    pub pending_bytes: u64,
}

/// A snapshot of the log, for status output and fall-behind accounting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LogStats {
    /// Region size in bytes (superblocks included).
    pub size: u64,
    pub ring_len: u64,
    /// Ring bytes between head and tail (headers, padding and wrap waste included).
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Live entries (head to tail).
    pub entries: u64,
    pub head_seq: u64,
    pub next_seq: u64,
    pub next_epoch: u64,
    pub incarnation: u64,
    pub uuid: String,
    pub slinks: Vec<SlinkStats>,
}

/// What [`RingLog::open`] found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Live entries recovered.
    pub entries: u64,
    /// Seq of the first live entry (the head).
    pub first_seq: u64,
    /// Seq the next append gets.
    pub next_seq: u64,
    /// Ring bytes in use.
    pub bytes: u64,
    /// The incarnation this open runs as.
    pub incarnation: u64,
    /// What was cut off, and where, when the tail was torn or corrupt, e.g.
    /// `"ring offset 40960: data crc mismatch (seq 1234)"`. `None` for a clean log.
    pub truncated: Option<String>,
    /// SLINKs whose durable cursor was beyond the recovered log `(slink, cursor)`: they
    /// applied entries the log lost (only after corruption of acknowledged entries). Their
    /// cursors were pulled back to the recovered tail; their copies need a full resync.
    pub slinks_ahead: Vec<(u16, u64)>,
}

/// Errors of the replication log. I/O errors keep their cause and say what was being
/// done where.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{what} on {device} at byte {offset}")]
    Io {
        what: &'static str,
        device: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("no valid dmrep log superblock at {device}+{start}: slot A: {slot_a}; slot B: {slot_b}")]
    NoSuperblock { device: String, start: u64, slot_a: SuperblockError, slot_b: SuperblockError },
    #[error(
        "dmrep log at {device}+{start} has format version {found}; this build supports versions up to {supported}"
    )]
    NewerVersion { device: String, start: u64, found: u32, supported: u32 },
    #[error("log region on {device}: {reason}")]
    Geometry { device: String, reason: String },
    #[error("log full: the batch needs {needed} bytes of ring, {free} are free")]
    Full { needed: u64, free: u64 },
    #[error("batch entry {index}: {len} bytes of data, the largest entry this log can hold is {max}")]
    TooLarge { index: usize, len: u64, max: u64 },
    #[error("batch of {needed} bytes can never fit in a ring of {ring_len} bytes: split it")]
    BatchTooLarge { needed: u64, ring_len: u64 },
    #[error("batch entry {index}: {reason}")]
    BadEntry { index: usize, reason: String },
    #[error("SLINK {0} is not registered with the log")]
    UnknownSlink(u16),
    #[error("SLINK number {0} out of range (0..=2047)")]
    SlinkOutOfRange(u16),
    #[error("cannot register SLINK {slink}: {max} SLINKs are registered already")]
    TooManySlinks { slink: u16, max: usize },
    #[error("SLINK {slink}: cursor {seq} is beyond the last entry (seq {last})")]
    CursorBeyondTail { slink: u16, seq: u64, last: u64 },
    #[error("SLINK {slink}: cursor {seq} is behind its current cursor {current}")]
    CursorBackwards { slink: u16, seq: u64, current: u64 },
    #[error("entry seq {seq} is no longer in the log (head is at seq {head_seq})")]
    NotLive { seq: u64, head_seq: u64 },
    #[error(
        "entry seq {seq} at ring offset {pos}: data crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    DataCrc { seq: u64, pos: u64, stored: u32, computed: u32 },
    #[error("read_data of entry seq {seq}: buffer of {got} bytes, the entry holds {want}")]
    BufferSize { seq: u64, got: usize, want: usize },
    #[error("log on {device} refuses writes after an I/O error it could not clean up ({reason}); reopen it")]
    Poisoned { device: String, reason: String },
}
