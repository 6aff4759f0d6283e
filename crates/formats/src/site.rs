//! The site wire protocol: how a primary site ships its replication log to its secondary
//! sites, and what they answer.
//!
//! Pure encode/decode, no I/O. The transport (TLS over TCP), compression and the sessions
//! on either side live elsewhere. A reader takes one [`FrameHeader`] (24 bytes), then
//! `payload_len` bytes of payload; checks them with [`FrameHeader::check_payload`]; when
//! [`FrameHeader::compressed`], splits them with [`split_compressed`] and decompresses
//! the rest; and hands the body to [`Message::decode`]. All integers are little-endian.
//!
//! ```text
//! frame:              | header (24 bytes) | payload (payload_len bytes) ............ |
//! payload:            the message body, or, when flag bit 0 (compressed) is set:
//! compressed payload: | method u8 | raw_len u32 | compressed body ................. |
//! ```
//!
//! A session: the primary sends a [`Hello`]; the secondary answers a [`Welcome`] or a
//! [`Refused`]. Then the primary sends [`EntryBatch`]es in seq order and [`ResyncData`]
//! (region copies, outside write order); the secondary answers with [`Ack`]s and
//! [`ResyncAck`]s; either side sends [`Heartbeat`]s while idle and a [`Goodbye`] before
//! it closes. Which message may come when, and whether values agree with what was sent
//! before (seqs, features, versions), is the sessions' business: this module checks that
//! each frame and message is well formed.
//!
//! Decoding is strict: a payload that is short, has trailing bytes, holds a string that is
//! not UTF-8, a count over its limit, an unknown enum value, a non-zero reserved field or
//! a wrong checksum is an error naming what is wrong, never a panic and never a guess. So
//! every message has one encoding, and what decodes re-encodes to the same bytes.
//!
//! Versions: the 24-byte frame header is the same in every version; a payload's layout
//! is that of the version in its header. [`Hello`] and [`Refused`] frames carry version 1
//! in every version and their layouts never change, so that a peer can read an offer (or
//! a refusal of it) before the two know a common version; the [`Welcome`] and every later
//! frame carry the version the welcome chose ([`negotiate`]). This build speaks only
//! version 1 and encodes every frame with it.
//!
//! Protocol versions (one line per version, what changed):
//! - 1: first version (added before any release: the `rejoin` kind, 10; lineages in
//!   `hello` and `welcome` instead of a bare generation, diverged regions in `welcome`,
//!   the `promote`, `promoted` and `peers` kinds, 11..13, `verify-request` and
//!   `verify-reply`, 14 and 15, and the `split-brain` refusal).

use crate::le::*;
use crate::lineage::{GenRecord, Lineage, GEN_RECORD_LEN, MAX_GENERATIONS};
use crate::replog::{MAX_COUNTER, MAX_SLINKS};
use std::fmt;

/// Oldest protocol version this build speaks (offered as `proto_min` in a [`Hello`]).
pub const PROTO_MIN: u16 = 1;

/// Newest protocol version this build speaks: a frame with a higher version is refused,
/// its payload may mean something this build does not know.
pub const PROTO_MAX: u16 = 1;

/// Frame magic, `b"DMRS"` read as a little-endian u32: tells a dmrep site stream from
/// anything else that connects to the port (and a desynchronised stream from a frame).
pub const MAGIC: u32 = u32::from_le_bytes(*b"DMRS");

/// Bytes of a frame header: 6 fields of 2 and 4 bytes, then two crcs (see [`FrameHeader`]).
pub const HEADER_LEN: usize = 24;

/// Largest frame payload: a batch carries at most [`MAX_DATA`] (64 MiB) of data plus
/// [`MAX_BATCH_ENTRIES`] entry headers of 48 bytes (3 MiB) and its count; the rest of
/// the 72 MiB is room for what compressing incompressible data adds (well under 1% for
/// zstd and lz4) and the 5-byte compression prefix. A reader never buffers more.
pub const MAX_PAYLOAD: u32 = 72 << 20;

/// Most data bytes one frame carries (the data of a batch's writes, or one resync region):
/// large enough that a 10 Gb/s link stays busy on one frame for 50 ms, small enough that
/// a reader's buffer stays modest.
pub const MAX_DATA: u32 = 64 << 20;

/// Most entries in one batch: 64 MiB of 1 KiB writes; a batch of smaller writes is cut
/// at this count. Bounds the entry headers to 3 MiB and the work before the data is read.
pub const MAX_BATCH_ENTRIES: u32 = 65536;

/// Bytes of an entry header inside a batch (see [`EntryBatch`]): the fields need 45, the
/// rest is reserved so that data starts 8-byte aligned in the body.
pub const ENTRY_HEADER_LEN: usize = 48;

/// Longest group or site name: its length is one byte on the wire. Names come from
/// tables and configuration, where longer names would be unreadable anyway.
pub const MAX_NAME_LEN: usize = 255;

/// Longest reason string ([`Refused`], [`Goodbye`]): one or two sentences for a log line;
/// more is not read, it would only grow a message an attacker can send before the welcome.
pub const MAX_REASON_LEN: usize = 1024;

/// Most devices a [`Hello`] or [`Welcome`] lists: far more than a group has, and it keeps
/// a hello under 50 KiB.
pub const MAX_DEVICES: usize = 4096;

/// Frame flag bit 0: the payload is compressed (see [`split_compressed`]).
pub const FLAG_COMPRESSED: u16 = 1;

/// Every flag bit this version knows; others are refused.
const KNOWN_FLAGS: u16 = FLAG_COMPRESSED;

/// Bytes before the compressed body in a compressed payload: method u8 and raw_len u32.
pub const COMPRESSED_PREFIX_LEN: usize = 5;

/// Bytes of one device row in a hello or welcome: dev_nr u32, bytes u64.
const DEVICE_LEN: usize = 12;

/// Feature bits offered in a [`Hello`] and agreed in a [`Welcome`]: what a peer can do
/// beyond the version's baseline. A peer may use a feature only once it is agreed.
pub mod features {
    /// Frames may carry zstd-compressed payloads ([`super::Compression::Zstd`]).
    pub const ZSTD: u64 = 1;
    /// Frames may carry lz4-compressed payloads ([`super::Compression::Lz4`]).
    pub const LZ4: u64 = 2;
}

/// Every feature bit this build knows. A hello may offer others (a newer peer can do
/// more); a welcome may agree only to these, since it answers an offer from this build.
pub const KNOWN_FEATURES: u64 = features::ZSTD | features::LZ4;

/// The highest protocol version in both ranges, or `None` when they do not overlap.
/// Version 0 is never chosen.
pub fn negotiate(ours_min: u16, ours_max: u16, theirs_min: u16, theirs_max: u16) -> Option<u16> {
    let lo = ours_min.max(theirs_min).max(1);
    let hi = ours_max.min(theirs_max);
    (lo <= hi).then_some(hi)
}

// ---------------------------------------------------------------------------------------
// Errors

/// Why bytes are not a valid frame or message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame header is {0} bytes, expected {HEADER_LEN}")]
    HeaderLen(usize),
    #[error("bad frame magic {0:#010x} (expected {MAGIC:#010x}, \"DMRS\")")]
    BadMagic(u32),
    #[error("frame header crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("protocol version {0} is not supported (this build speaks {PROTO_MIN} to {PROTO_MAX})")]
    Version(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("unknown frame flags {0:#06x}")]
    UnknownFlags(u16),
    #[error("{0} frames cannot be compressed (only entries and resync-data frames)")]
    NotCompressible(MessageKind),
    #[error("{what}: reserved bytes are not zero")]
    Reserved { what: &'static str },
    #[error("{kind} frame payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { kind: MessageKind, len: u32, max: u32 },
    #[error("payload is {found} bytes, the frame header says {expected}")]
    PayloadLen { expected: u32, found: usize },
    #[error("payload crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadCrc { stored: u32, computed: u32 },
    #[error("unknown compression method {0}")]
    UnknownCompression(u8),
    #[error("decompressed payload of {len} bytes exceeds the limit of {max}")]
    RawTooLarge { len: u32, max: u32 },
    #[error("{what}: truncated: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("{what}: {extra} trailing bytes")]
    Trailing { what: &'static str, extra: usize },
    #[error("{what}: not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what}: {len} bytes exceeds the limit of {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what}: {count} exceeds the limit of {max}")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("unknown role {0}")]
    UnknownRole(u8),
    #[error("unknown refuse code {0}")]
    UnknownRefuseCode(u16),
    #[error("entry seq {seq}: unknown entry kind {kind}")]
    UnknownEntryKind { seq: u64, kind: u8 },
    #[error("entry seq {seq} follows seq {prev} (seqs must strictly increase within a batch)")]
    SeqOrder { prev: u64, seq: u64 },
    #[error("entry seq {seq}: epoch {epoch} is below the previous entry's {prev}")]
    EpochOrder { seq: u64, prev: u64, epoch: u64 },
    #[error("entry seq {seq}: data crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    EntryDataCrc { seq: u64, stored: u32, computed: u32 },
    #[error("resync data for device {dev_nr} at {offset}: data crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ResyncDataCrc { dev_nr: u32, offset: u64, stored: u32, computed: u32 },
    #[error("{field} {value} is beyond the counter limit {MAX_COUNTER}")]
    Counter { field: &'static str, value: u64 },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

fn invalid(what: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Invalid { what, reason: reason.into() }
}

fn counter(field: &'static str, value: u64) -> Result<(), WireError> {
    if value > MAX_COUNTER {
        return Err(WireError::Counter { field, value });
    }
    Ok(())
}

fn range(what: &'static str, offset: u64, len: u64) -> Result<(), WireError> {
    if offset.checked_add(len).is_none() {
        return Err(invalid(what, format!("range of {len} bytes at {offset} ends beyond 2^64")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Enums

/// A fieldless enum carried as an integer, with `from_<int>` (`None` for a value this
/// version does not know), `name` and `Display` (the name).
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident: $int:ident, $from:ident {
        $($(#[$vm:meta])* $v:ident = $n:literal => $s:literal,)*
    }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($int)]
        pub enum $name {
            $($(#[$vm])* $v = $n,)*
        }

        impl $name {
            pub fn $from(v: $int) -> Option<Self> {
                match v {
                    $($n => Some($name::$v),)*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $($name::$v => $s,)*
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

wire_enum! {
    /// What a frame carries: one kind per [`Message`] variant.
    MessageKind: u16, from_u16 {
        Hello = 1 => "hello",
        Welcome = 2 => "welcome",
        Refused = 3 => "refused",
        Entries = 4 => "entries",
        Ack = 5 => "ack",
        Heartbeat = 6 => "heartbeat",
        ResyncData = 7 => "resync-data",
        ResyncAck = 8 => "resync-ack",
        Goodbye = 9 => "goodbye",
        Rejoin = 10 => "rejoin",
        Promote = 11 => "promote",
        Promoted = 12 => "promoted",
        Peers = 13 => "peers",
        VerifyRequest = 14 => "verify-request",
        VerifyReply = 15 => "verify-reply",
    }
}

impl MessageKind {
    /// Whether frames of this kind may be compressed: only those that carry data.
    pub fn compressible(self) -> bool {
        matches!(self, MessageKind::Entries | MessageKind::ResyncData)
    }

    /// Largest payload a frame of this kind may have (and, for compressible kinds, the
    /// largest decompressed body). A header claiming more is refused before its payload
    /// is read, so a peer cannot make a reader buffer 72 MiB for a heartbeat.
    pub fn max_payload(self) -> u32 {
        use MessageKind::*;
        let n = match self {
            Hello => 35 + LINEAGE_MAX_LEN + 2 * MAX_NAME_LEN + MAX_DEVICES * DEVICE_LEN,
            Welcome => 50 + LINEAGE_MAX_LEN + MAX_NAME_LEN + MAX_DEVICES * DEVICE_LEN + MAX_REGIONS * REGION_LEN,
            Promote | Promoted => LINEAGE_MAX_LEN,
            Peers => 2 + MAX_PEERS * (9 + MAX_NAME_LEN),
            VerifyRequest => 20,
            VerifyReply => 24,
            Refused => 4 + MAX_REASON_LEN,
            Entries | ResyncData => MAX_PAYLOAD as usize,
            Ack | ResyncAck => 16,
            Rejoin => 8,
            Heartbeat => 24,
            Goodbye => 2 + MAX_REASON_LEN,
        };
        n as u32
    }
}

wire_enum! {
    /// A site's role in its group, as it sees itself.
    Role: u8, from_u8 {
        /// Takes writes and ships its log.
        Primary = 1 => "primary",
        /// Receives the log and applies it.
        Secondary = 2 => "secondary",
    }
}

wire_enum! {
    /// Why a secondary refuses a hello. Codes added by a later version are sent only to a
    /// primary whose hello offered that version (the hello says which it speaks).
    RefuseCode: u16, from_u16 {
        /// No protocol version in common.
        BadVersion = 1 => "bad-version",
        /// The secondary has no group of that name.
        UnknownGroup = 2 => "unknown-group",
        /// The group exists with another uuid: a different group under the same name.
        WrongGroupUuid = 3 => "wrong-group-uuid",
        /// The secondary is not the site the primary meant to reach.
        WrongSite = 4 => "wrong-site",
        /// The receiver is not a secondary of the group (it is primary itself).
        NotSecondary = 5 => "not-secondary",
        /// The sender's generation is older than one the secondary has seen: a stale primary.
        StaleGeneration = 6 => "stale-generation",
        /// The device lists (numbers or sizes) do not match.
        DeviceMismatch = 7 => "device-mismatch",
        /// Another primary session is active for the group.
        Busy = 8 => "busy",
        /// The secondary failed on its side; the reason says how.
        Internal = 9 => "internal",
        /// Both sites accepted writes as primary from a common generation: never merged
        /// automatically (`dmrep resolve --discard-local` at the losing site).
        SplitBrain = 10 => "split-brain",
    }
}

wire_enum! {
    /// Compression method of a compressed payload: its first byte.
    Compression: u8, from_u8 {
        /// Not compressed: a setting for the sender; never the method of a compressed payload.
        None = 0 => "none",
        Zstd = 1 => "zstd",
        Lz4 = 2 => "lz4",
    }
}

impl Compression {
    /// The feature bit both sides must have agreed before this method is used (0 for none).
    pub fn feature(self) -> u64 {
        match self {
            Compression::None => 0,
            Compression::Zstd => features::ZSTD,
            Compression::Lz4 => features::LZ4,
        }
    }
}

wire_enum! {
    /// What a log entry does, in an [`EntryBatch`]. Same values as the log's record kinds.
    WireKind: u8, from_u8 {
        /// `len` bytes of data follow the entry header.
        Write = 1 => "write",
        /// Zero `len` bytes at `offset`; no data.
        WriteZeroes = 2 => "write-zeroes",
        /// Discard `len` bytes at `offset`; no data.
        Discard = 3 => "discard",
        /// A marker: `len` bytes of description follow (see the log's record kind 5);
        /// no device changes.
        Marker = 5 => "marker",
    }
}

impl WireKind {
    /// Whether `len` bytes of data follow the entry header.
    pub fn has_data(self) -> bool {
        matches!(self, WireKind::Write | WireKind::Marker)
    }
}

// ---------------------------------------------------------------------------------------
// Frames

/// The fixed header in front of every frame's payload.
///
/// Byte layout (24 bytes, little-endian; the same in every protocol version):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4 | magic `"DMRS"` | tells a site stream from anything else, and a lost frame boundary from a frame |
/// | 4 | 2 | version u16 | the protocol version the payload is encoded with ([`PROTO_MIN`]..=[`PROTO_MAX`]) |
/// | 6 | 2 | kind u16 ([`MessageKind`]) | what the payload is |
/// | 8 | 2 | flags u16: bit 0 = compressed; others zero | an unknown bit could change the payload's meaning, so it is refused |
/// | 10 | 2 | reserved, zero | |
/// | 12 | 4 | payload_len u32 | at most the kind's [`MessageKind::max_payload`]: the reader knows how much to read, and refuses to buffer more |
/// | 16 | 4 | payload crc32c | over the payload as sent (compressed, if it is): TLS protects against tampering, this against bugs on either side |
/// | 20 | 4 | header crc32c | over bytes 0..20: a damaged length is never trusted |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: MessageKind,
    pub flags: u16,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl FrameHeader {
    /// The header for `payload` (as sent: compressed when `flags` says so), at
    /// [`PROTO_MAX`].
    ///
    /// # Panics
    /// If `flags` has unknown bits, asks to compress a kind that cannot be, or the payload
    /// is longer than the kind allows (caller bugs: [`FrameHeader::decode`] refuses all).
    pub fn new(kind: MessageKind, flags: u16, payload: &[u8]) -> FrameHeader {
        assert_eq!(flags & !KNOWN_FLAGS, 0, "unknown frame flags {flags:#06x}");
        assert!(flags & FLAG_COMPRESSED == 0 || kind.compressible(), "{kind} frames cannot be compressed");
        assert!(
            payload.len() <= kind.max_payload() as usize,
            "{kind} frame payload of {} bytes exceeds the limit of {}",
            payload.len(),
            kind.max_payload()
        );
        FrameHeader {
            version: PROTO_MAX,
            kind,
            flags,
            payload_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
        }
    }

    /// Whether the payload is compressed: then [`split_compressed`] it and decompress the
    /// rest before [`Message::decode`].
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// The 24 header bytes, header crc included. Writes the fields as they are: only
    /// [`FrameHeader::new`] checks them.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        put_u32(&mut b, 0, MAGIC);
        put_u16(&mut b, 4, self.version);
        put_u16(&mut b, 6, self.kind as u16);
        put_u16(&mut b, 8, self.flags);
        put_u32(&mut b, 12, self.payload_len);
        put_u32(&mut b, 16, self.payload_crc);
        let crc = crc32c::crc32c(&b[..20]);
        put_u32(&mut b, 20, crc);
        b
    }

    /// Decodes and checks a header: magic, header crc, version, kind, flags, reserved
    /// bytes, and the payload length against the kind's limit. `b` must be exactly
    /// [`HEADER_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<FrameHeader, WireError> {
        if b.len() != HEADER_LEN {
            return Err(WireError::HeaderLen(b.len()));
        }
        let magic = get_u32(b, 0);
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        // The crc before the fields: a damaged version or kind is reported as damage.
        let stored = get_u32(b, 20);
        let computed = crc32c::crc32c(&b[..20]);
        if stored != computed {
            return Err(WireError::HeaderCrc { stored, computed });
        }
        let version = get_u16(b, 4);
        if !(PROTO_MIN..=PROTO_MAX).contains(&version) {
            return Err(WireError::Version(version));
        }
        let raw_kind = get_u16(b, 6);
        let kind = MessageKind::from_u16(raw_kind).ok_or(WireError::UnknownKind(raw_kind))?;
        let flags = get_u16(b, 8);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::UnknownFlags(flags));
        }
        if flags & FLAG_COMPRESSED != 0 && !kind.compressible() {
            return Err(WireError::NotCompressible(kind));
        }
        if get_u16(b, 10) != 0 {
            return Err(WireError::Reserved { what: "frame header" });
        }
        let payload_len = get_u32(b, 12);
        if payload_len > kind.max_payload() {
            return Err(WireError::PayloadTooLarge { kind, len: payload_len, max: kind.max_payload() });
        }
        Ok(FrameHeader { version, kind, flags, payload_len, payload_crc: get_u32(b, 16) })
    }

    /// Checks the payload as received (before any decompression): its length and crc.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), WireError> {
        if payload.len() != self.payload_len as usize {
            return Err(WireError::PayloadLen { expected: self.payload_len, found: payload.len() });
        }
        let computed = crc32c::crc32c(payload);
        if computed != self.payload_crc {
            return Err(WireError::PayloadCrc { stored: self.payload_crc, computed });
        }
        Ok(())
    }
}

/// A whole frame: the header for `payload` (see [`FrameHeader::new`], which says when it
/// panics) followed by the payload. For sending a compressed body built with
/// [`join_compressed`] (with `flags` = [`FLAG_COMPRESSED`]); [`Message::encode`] is the
/// path for uncompressed messages.
pub fn encode_frame(kind: MessageKind, flags: u16, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader::new(kind, flags, payload);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// Splits a compressed payload into its method, the length of the body once
/// decompressed, and the compressed bytes. The caller decompresses, and must refuse a
/// body whose length is not `raw_len`.
///
/// Byte layout (little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 1 | method u8 ([`Compression`], never 0) | which decompressor; it must be an agreed feature |
/// | 1 | 4 | raw_len u32 (at most [`MAX_PAYLOAD`]) | the reader allocates the output once, and a decompression bomb is refused before it starts |
/// | 5 | rest | compressed body | |
pub fn split_compressed(payload: &[u8]) -> Result<(Compression, u32, &[u8]), WireError> {
    let mut r = Reader::new(payload, "compressed payload");
    let m = r.u8()?;
    let method = Compression::from_u8(m).ok_or(WireError::UnknownCompression(m))?;
    if method == Compression::None {
        return Err(invalid("compressed payload", "method 0 (none) in a frame flagged compressed"));
    }
    let raw_len = r.u32()?;
    if raw_len > MAX_PAYLOAD {
        return Err(WireError::RawTooLarge { len: raw_len, max: MAX_PAYLOAD });
    }
    Ok((method, raw_len, r.rest()))
}

/// A compressed payload: the prefix [`split_compressed`] reads, then `compressed`.
///
/// # Panics
/// If `method` is [`Compression::None`] or `raw_len` exceeds [`MAX_PAYLOAD`].
pub fn join_compressed(method: Compression, raw_len: u32, compressed: &[u8]) -> Vec<u8> {
    assert_ne!(method, Compression::None, "a compressed payload needs a compression method");
    assert!(raw_len <= MAX_PAYLOAD, "decompressed payload of {raw_len} bytes exceeds the limit of {MAX_PAYLOAD}");
    let mut out = Vec::with_capacity(COMPRESSED_PREFIX_LEN + compressed.len());
    out.push(method as u8);
    push_u32(&mut out, raw_len);
    out.extend_from_slice(compressed);
    out
}

// ---------------------------------------------------------------------------------------
// Reading and writing payload fields

/// A cursor over a payload that fails with [`WireError::Truncated`].
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() - self.pos < n {
            return Err(WireError::Truncated {
                what: self.what,
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(get_u16(self.take(2)?, 0))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(get_u32(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(get_u64(self.take(8)?, 0))
    }
    fn uuid(&mut self) -> Result<[u8; 16], WireError> {
        Ok(self.take(16)?.try_into().expect("16 bytes"))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A name: u8 length, then that many bytes of UTF-8.
    fn name(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u8()? as usize;
        utf8(self.take(len)?, what)
    }

    /// A reason: u16 length (at most [`MAX_REASON_LEN`]), then that many bytes of UTF-8.
    fn reason(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > MAX_REASON_LEN {
            return Err(WireError::TooLong { what, len, max: MAX_REASON_LEN });
        }
        utf8(self.take(len)?, what)
    }

    /// A lineage: count u8 (1..=8), then the records.
    fn lineage(&mut self) -> Result<Lineage, WireError> {
        let n = self.u8()? as usize;
        if n == 0 || n > MAX_GENERATIONS {
            return Err(WireError::TooMany { what: "lineage length", count: n, max: MAX_GENERATIONS });
        }
        let records: Vec<GenRecord> =
            (0..n).map(|_| self.take(GEN_RECORD_LEN).map(GenRecord::decode)).collect::<Result<_, _>>()?;
        Lineage::from_records(&records).map_err(|e| invalid("lineage", e))
    }

    fn region(&mut self) -> Result<Region, WireError> {
        Ok(Region { dev_nr: self.u32()?, offset: self.u64()?, len: self.u64()? })
    }

    fn devices(&mut self) -> Result<Vec<DeviceInfo>, WireError> {
        let count = self.u16()? as usize;
        if count > MAX_DEVICES {
            return Err(WireError::TooMany { what: "device count", count, max: MAX_DEVICES });
        }
        (0..count).map(|_| Ok(DeviceInfo { dev_nr: self.u32()?, bytes: self.u64()? })).collect()
    }

    /// Refuses bytes left over after the message.
    fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(WireError::Trailing { what: self.what, extra }),
        }
    }
}

fn utf8(b: &[u8], what: &'static str) -> Result<String, WireError> {
    String::from_utf8(b.to_vec()).map_err(|_| WireError::BadUtf8 { what })
}

fn check_name(what: &'static str, s: &str) -> Result<(), WireError> {
    if s.is_empty() {
        return Err(invalid(what, "empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(WireError::TooLong { what, len: s.len(), max: MAX_NAME_LEN });
    }
    Ok(())
}

fn check_reason(what: &'static str, s: &str) -> Result<(), WireError> {
    if s.len() > MAX_REASON_LEN {
        return Err(WireError::TooLong { what, len: s.len(), max: MAX_REASON_LEN });
    }
    Ok(())
}

fn check_devices(devices: &[DeviceInfo]) -> Result<(), WireError> {
    if devices.len() > MAX_DEVICES {
        return Err(WireError::TooMany { what: "device count", count: devices.len(), max: MAX_DEVICES });
    }
    for w in devices.windows(2) {
        if w[0].dev_nr >= w[1].dev_nr {
            let reason = format!("device {} follows device {} (must strictly increase)", w[1].dev_nr, w[0].dev_nr);
            return Err(invalid("device list", reason));
        }
    }
    Ok(())
}

fn push_name(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn push_reason(out: &mut Vec<u8>, s: &str) {
    push_u16(out, s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}

fn push_lineage(out: &mut Vec<u8>, l: &Lineage) {
    out.push(l.records().len() as u8);
    for r in l.records() {
        let mut b = [0u8; GEN_RECORD_LEN];
        r.encode(&mut b);
        out.extend_from_slice(&b);
    }
}

fn push_region(out: &mut Vec<u8>, g: &Region) {
    push_u32(out, g.dev_nr);
    push_u64(out, g.offset);
    push_u64(out, g.len);
}

fn push_devices(out: &mut Vec<u8>, devices: &[DeviceInfo]) {
    push_u16(out, devices.len() as u16);
    for d in devices {
        push_u32(out, d.dev_nr);
        push_u64(out, d.bytes);
    }
}

// ---------------------------------------------------------------------------------------
// Messages

/// One device of a group as a site sees it, in [`Hello`] and [`Welcome`].
///
/// Byte layout (12 bytes): dev_nr u32 at 0, bytes u64 at 4. Lists are sorted by dev_nr,
/// unique, at most [`MAX_DEVICES`], so that both sides compare them row by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// The device's number in the group (as in the replicator table).
    pub dev_nr: u32,
    /// Its size in bytes: a secondary device smaller than the primary's cannot take the log.
    pub bytes: u64,
}

/// Primary -> secondary, the first frame of a session: who is calling, for which group,
/// with which versions and features.
///
/// Payload layout (little-endian; `g` and `s` are the lengths of the two names):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 2 | proto_min u16 | oldest version the sender speaks (at least 1) |
/// | 2 | 2 | proto_max u16 | newest (at least proto_min): the secondary picks with [`negotiate`] |
/// | 4 | 8 | features u64 | bits offered; unknown bits allowed, a newer peer offers more |
/// | 12 | 1 | group name length (1..=255) | |
/// | 13 | g | group name, UTF-8 | the secondary looks the group up by name |
/// | 13+g | 16 | group uuid | a group recreated under the same name is another group |
/// | 29+g | 1 | site name length (1..=255) | |
/// | 30+g | s | site name (the sender's), UTF-8 | for the secondary's logs and checks |
/// | 30+g+s | 1 | role u8 ([`Role`]) | two primaries must not feed each other |
/// | 31+g+s | 1+24n | lineage: count u8 (1..=8), then n [`GenRecord`]s | the sender's generations: a stale primary is refused, a newer one fences the receiver, a split brain is found |
/// | 32+g+s+24n | 2 | slink u16 (< 2048) | the SLINK number the secondary has at the sender; informational |
/// | 34+g+s+24n | 2 | device count u16 (at most 4096) | |
/// | 36+g+s+24n | 12 each | devices ([`DeviceInfo`]) | the secondary checks numbers and sizes before taking writes |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub proto_min: u16,
    pub proto_max: u16,
    pub features: u64,
    pub group_name: String,
    pub group_uuid: [u8; 16],
    pub site: String,
    pub role: Role,
    pub lineage: Lineage,
    pub slink: u16,
    pub devices: Vec<DeviceInfo>,
}

impl Hello {
    fn validate(&self) -> Result<(), WireError> {
        if self.proto_min == 0 || self.proto_min > self.proto_max {
            let reason = format!("version range {}..={} is empty or starts at 0", self.proto_min, self.proto_max);
            return Err(invalid("hello", reason));
        }
        check_name("group name", &self.group_name)?;
        check_name("site name", &self.site)?;
        if self.slink as usize >= MAX_SLINKS {
            return Err(invalid("hello", format!("SLINK number {} out of range (max {})", self.slink, MAX_SLINKS - 1)));
        }
        check_devices(&self.devices)
    }

    fn put(&self, out: &mut Vec<u8>) {
        push_u16(out, self.proto_min);
        push_u16(out, self.proto_max);
        push_u64(out, self.features);
        push_name(out, &self.group_name);
        out.extend_from_slice(&self.group_uuid);
        push_name(out, &self.site);
        out.push(self.role as u8);
        push_lineage(out, &self.lineage);
        push_u16(out, self.slink);
        push_devices(out, &self.devices);
    }

    fn read(r: &mut Reader) -> Result<Hello, WireError> {
        Ok(Hello {
            proto_min: r.u16()?,
            proto_max: r.u16()?,
            features: r.u64()?,
            group_name: r.name("group name")?,
            group_uuid: r.uuid()?,
            site: r.name("site name")?,
            role: read_role(r)?,
            lineage: r.lineage()?,
            slink: r.u16()?,
            devices: r.devices()?,
        })
    }
}

fn read_role(r: &mut Reader) -> Result<Role, WireError> {
    let v = r.u8()?;
    Role::from_u8(v).ok_or(WireError::UnknownRole(v))
}

/// Secondary -> primary: the hello is accepted; what was agreed and how far the
/// secondary got, so the primary knows where to resume.
///
/// Payload layout (little-endian; `s` is the site name's length):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 2 | proto u16 (not 0) | the chosen version: every later frame carries it |
/// | 2 | 8 | features u64 | agreed: a subset of the offer, known bits only |
/// | 10 | 1 | site name length (1..=255) | |
/// | 11 | s | site name (the sender's), UTF-8 | the primary checks it reached the site it meant |
/// | 11+s | 1 | role u8 ([`Role`]) | |
/// | 12+s | 1+24n | lineage: count u8 (1..=8), then n [`GenRecord`]s | the secondary's generations (after it adopted the primary's) |
/// | 13+s+24n | 16 | group uuid | |
/// | 29+s+24n | 8 | received u64 | highest origin seq durable in the secondary's log: shipping resumes after it |
/// | 37+s+24n | 8 | applied u64 | highest origin seq applied to its devices |
/// | 45+s+24n | 2 | device count u16 (at most 4096) | |
/// | 47+s+24n | 12 each | devices ([`DeviceInfo`]) | the secondary's view, for the primary's checks |
/// | .. | 4 | diverged region count u32 (at most [`MAX_REGIONS`]) | |
/// | .. | 20 each | regions ([`Region`]) the secondary wrote that the primary's history does not have (a failed-back old primary, a discarded split brain): the primary copies them back | fast failback without a full copy |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub proto: u16,
    pub features: u64,
    pub site: String,
    pub role: Role,
    pub lineage: Lineage,
    pub group_uuid: [u8; 16],
    pub received: u64,
    pub applied: u64,
    pub devices: Vec<DeviceInfo>,
    pub diverged: Vec<Region>,
}

impl Welcome {
    fn validate(&self) -> Result<(), WireError> {
        if self.proto == 0 {
            return Err(invalid("welcome", "protocol version 0"));
        }
        if self.features & !KNOWN_FEATURES != 0 {
            let reason = format!("agrees to unknown features {:#x}", self.features & !KNOWN_FEATURES);
            return Err(invalid("welcome", reason));
        }
        check_name("site name", &self.site)?;
        counter("received seq", self.received)?;
        counter("applied seq", self.applied)?;
        check_devices(&self.devices)?;
        if self.diverged.len() > MAX_REGIONS {
            return Err(WireError::TooMany { what: "diverged regions", count: self.diverged.len(), max: MAX_REGIONS });
        }
        self.diverged.iter().try_for_each(|g| range("diverged region", g.offset, g.len))
    }

    fn put(&self, out: &mut Vec<u8>) {
        push_u16(out, self.proto);
        push_u64(out, self.features);
        push_name(out, &self.site);
        out.push(self.role as u8);
        push_lineage(out, &self.lineage);
        out.extend_from_slice(&self.group_uuid);
        push_u64(out, self.received);
        push_u64(out, self.applied);
        push_devices(out, &self.devices);
        push_u32(out, self.diverged.len() as u32);
        for g in &self.diverged {
            push_u32(out, g.dev_nr);
            push_u64(out, g.offset);
            push_u64(out, g.len);
        }
    }

    fn read(r: &mut Reader) -> Result<Welcome, WireError> {
        Ok(Welcome {
            proto: r.u16()?,
            features: r.u64()?,
            site: r.name("site name")?,
            role: read_role(r)?,
            lineage: r.lineage()?,
            group_uuid: r.uuid()?,
            received: r.u64()?,
            applied: r.u64()?,
            devices: r.devices()?,
            diverged: {
                let n = r.u32()? as usize;
                if n > MAX_REGIONS {
                    return Err(WireError::TooMany { what: "diverged regions", count: n, max: MAX_REGIONS });
                }
                (0..n)
                    .map(|_| Ok(Region { dev_nr: r.u32()?, offset: r.u64()?, len: r.u64()? }))
                    .collect::<Result<_, _>>()?
            },
        })
    }
}

/// Secondary -> primary: the hello is refused; the secondary closes after sending it.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 2 | code u16 ([`RefuseCode`]) | what the primary's operator must fix |
/// | 2 | 2 | reason length u16 (at most 1024) | |
/// | 4 | n | reason, UTF-8 | the details, for the primary's log |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: RefuseCode,
    pub reason: String,
}

/// One log entry as shipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireEntry {
    /// Seq in the primary's log (the "origin seq" acks refer to).
    pub seq: u64,
    /// Epoch in the primary's log: entries of one epoch are applied all or none.
    pub epoch: u64,
    /// Microseconds since the Unix epoch when the primary appended it: lag is measured by it.
    pub origin_time_us: u64,
    /// Bytes on the device.
    pub offset: u64,
    pub dev_nr: u32,
    pub kind: WireKind,
    /// Bytes of data for a write (equal to `data.len()`), of the range otherwise.
    pub len: u32,
    /// The data of a write (the description of a marker); empty otherwise.
    pub data: Vec<u8>,
}

/// Primary -> secondary: consecutive entries of the log, in seq order.
///
/// The body can be compressed (flag bit 0): the sender compresses [`EntryBatch::encode_body`]
/// and sends it with [`join_compressed`] and [`encode_frame`]; the receiver decompresses
/// before [`Message::decode`] (or [`EntryBatch::decode_body`]).
///
/// Body layout (little-endian):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4 | count u32 (at most 65536) | |
/// | 4 | ... | entries, each a 48-byte header then its data | |
///
/// Entry header (48 bytes; a write's or marker's `len` bytes of data follow it, unpadded):
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 8 | seq u64 | strictly increasing within a batch (gaps allowed: entries for other SLINKs) |
/// | 8 | 8 | epoch u64 | non-decreasing: the secondary keeps the primary's epochs |
/// | 16 | 8 | origin_time_us u64 | append time at the primary, for lag reporting |
/// | 24 | 8 | offset u64 | bytes on the device; offset + len fits in u64 |
/// | 32 | 4 | dev_nr u32 | which device of the group |
/// | 36 | 1 | kind u8 ([`WireKind`]): 1 write, 2 write-zeroes, 3 discard, 5 marker | |
/// | 37 | 3 | reserved, zero | |
/// | 40 | 4 | len u32 | bytes: of data (write) or of the range (write-zeroes, discard) |
/// | 44 | 4 | data crc32c | over the data (0 without data): checked again when stored in the secondary's log |
///
/// Seqs and epochs are at most the log's counter limit ([`MAX_COUNTER`]); the data of a
/// batch is at most [`MAX_DATA`] bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryBatch {
    pub entries: Vec<WireEntry>,
}

impl EntryBatch {
    /// Checks everything decoding checks, except what the encoding fixes (crcs, reserved).
    pub fn validate(&self) -> Result<(), WireError> {
        let n = self.entries.len();
        if n > MAX_BATCH_ENTRIES as usize {
            return Err(WireError::TooMany { what: "batch entry count", count: n, max: MAX_BATCH_ENTRIES as usize });
        }
        let mut data = 0usize;
        let mut prev: Option<&WireEntry> = None;
        for e in &self.entries {
            counter("entry seq", e.seq)?;
            counter("entry epoch", e.epoch)?;
            range("entry", e.offset, e.len as u64)?;
            let data_len = if e.kind.has_data() { e.len as usize } else { 0 };
            if e.data.len() != data_len {
                let reason =
                    format!("seq {} ({}) has {} bytes of data, expected {data_len}", e.seq, e.kind, e.data.len());
                return Err(invalid("entry", reason));
            }
            data += data_len;
            if let Some(p) = prev {
                if e.seq <= p.seq {
                    return Err(WireError::SeqOrder { prev: p.seq, seq: e.seq });
                }
                if e.epoch < p.epoch {
                    return Err(WireError::EpochOrder { seq: e.seq, prev: p.epoch, epoch: e.epoch });
                }
            }
            prev = Some(e);
        }
        if data > MAX_DATA as usize {
            return Err(WireError::TooLong { what: "batch data", len: data, max: MAX_DATA as usize });
        }
        Ok(())
    }

    /// The body (uncompressed payload) of an entries frame.
    ///
    /// # Panics
    /// If [`EntryBatch::validate`] fails: a caller bug; the receiver would refuse it.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.put(&mut out);
        out
    }

    fn put(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.validate() {
            panic!("cannot encode an entries message: {e}");
        }
        let data: usize = self.entries.iter().map(|e| e.data.len()).sum();
        out.reserve(4 + self.entries.len() * ENTRY_HEADER_LEN + data);
        push_u32(out, self.entries.len() as u32);
        for e in &self.entries {
            push_u64(out, e.seq);
            push_u64(out, e.epoch);
            push_u64(out, e.origin_time_us);
            push_u64(out, e.offset);
            push_u32(out, e.dev_nr);
            out.extend_from_slice(&[e.kind as u8, 0, 0, 0]);
            push_u32(out, e.len);
            push_u32(out, crc32c::crc32c(&e.data));
            out.extend_from_slice(&e.data);
        }
    }

    /// Decodes and checks an entries body (decompressed, if it was compressed).
    pub fn decode_body(b: &[u8]) -> Result<EntryBatch, WireError> {
        let mut r = Reader::new(b, "entries");
        let batch = EntryBatch::read(&mut r)?;
        r.finish()?;
        batch.validate()?;
        Ok(batch)
    }

    fn read(r: &mut Reader) -> Result<EntryBatch, WireError> {
        let count = r.u32()?;
        if count > MAX_BATCH_ENTRIES {
            let (count, max) = (count as usize, MAX_BATCH_ENTRIES as usize);
            return Err(WireError::TooMany { what: "batch entry count", count, max });
        }
        // Capacity by what the body can hold, not by what it claims.
        let mut entries = Vec::with_capacity((count as usize).min(r.remaining() / ENTRY_HEADER_LEN));
        for _ in 0..count {
            let h = r.take(ENTRY_HEADER_LEN)?;
            let seq = get_u64(h, 0);
            let kind = WireKind::from_u8(h[36]).ok_or(WireError::UnknownEntryKind { seq, kind: h[36] })?;
            if h[37..40] != [0, 0, 0] {
                return Err(WireError::Reserved { what: "entry header" });
            }
            let len = get_u32(h, 40);
            let stored = get_u32(h, 44);
            let data = match kind {
                WireKind::Write | WireKind::Marker => {
                    let data = r.take(len as usize)?;
                    let computed = crc32c::crc32c(data); // 0 for no data
                    if computed != stored {
                        return Err(WireError::EntryDataCrc { seq, stored, computed });
                    }
                    data.to_vec()
                }
                _ if stored != 0 => {
                    return Err(invalid("entry", format!("seq {seq} has no data but a data crc {stored:#010x}")));
                }
                _ => Vec::new(),
            };
            entries.push(WireEntry {
                seq,
                epoch: get_u64(h, 8),
                origin_time_us: get_u64(h, 16),
                offset: get_u64(h, 24),
                dev_nr: get_u32(h, 32),
                kind,
                len,
                data,
            });
        }
        Ok(EntryBatch { entries })
    }
}

/// Secondary -> primary: how far the secondary got, after each batch is durable in its
/// log and as it applies entries.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 8 | received u64 | highest origin seq durable in the secondary's log |
/// | 8 | 8 | applied u64 | highest origin seq applied to its devices |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub received: u64,
    pub applied: u64,
}

/// Either way, while there is nothing else to send: the link is alive, and how far the
/// sender is.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 8 | time_us u64 | sender's clock, microseconds since the Unix epoch: round trip and clock skew |
/// | 8 | 8 | last_seq u64 | sender's newest seq: the receiver sees how far behind it is |
/// | 16 | 8 | durable u64 | sender's newest durable seq |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub time_us: u64,
    pub last_seq: u64,
    pub durable: u64,
}

/// Primary -> secondary: a region copied outside write order (resynchronisation).
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4 | dev_nr u32 | which device of the group |
/// | 4 | 8 | offset u64 | bytes on the device; offset + len fits in u64 |
/// | 12 | 4 | len u32 (at most [`MAX_DATA`]) | bytes of data that follow |
/// | 16 | 4 | data crc32c | over the data (0 when empty) |
/// | 20 | len | data | |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncData {
    pub dev_nr: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Secondary -> primary: a [`ResyncData`] region is durable on the secondary's device.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4 | dev_nr u32 | |
/// | 4 | 8 | offset u64 | as in the resync data |
/// | 12 | 4 | len u32 | as in the resync data: the primary clears that region's dirty bits |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncAck {
    pub dev_nr: u32,
    pub offset: u64,
    pub len: u32,
}

/// Either way, before closing: why, for the other side's log.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 2 | reason length u16 (at most 1024) | |
/// | 2 | n | reason, UTF-8 | |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goodbye {
    pub reason: String,
}

/// Primary -> secondary, after a resync: the secondary's devices now equal the
/// primary's group state at `seq` (every dirty region was copied); shipping resumes after
/// it. The secondary records `seq` as received once its log is applied, then acks.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 8 | seq u64 | the primary's seq the copy stands at |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejoin {
    pub seq: u64,
}

/// Largest encoded lineage (count byte and records).
const LINEAGE_MAX_LEN: usize = 1 + MAX_GENERATIONS * GEN_RECORD_LEN;

/// Most diverged regions a [`Welcome`] lists (a site with more merges neighbours, which
/// copies a little more, never less).
pub const MAX_REGIONS: usize = 1 << 16;

/// Bytes of one encoded [`Region`].
pub const REGION_LEN: usize = 20;

/// Most sites a [`Peers`] frame lists.
pub const MAX_PEERS: usize = 64;

/// A byte range of one device of the group.
///
/// Byte layout (20 bytes): dev_nr u32 at 0, offset u64 at 4, len u64 at 12.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Region {
    pub dev_nr: u32,
    pub offset: u64,
    pub len: u64,
}

/// Primary -> secondary, in a planned switchover once the secondary has every entry: it
/// becomes the primary of the new generation (the last record of `lineage`, starting
/// right after what it received). Answered by [`Promoted`] once durable there.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 1+24n | lineage: count u8 (1..=8), then n [`GenRecord`]s | the group's lineage with the new generation last |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promote {
    pub lineage: Lineage,
}

/// Secondary -> primary: it is the primary of the lineage's newest generation now.
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 1+24n | lineage: count u8 (1..=8), then n [`GenRecord`]s | as now persisted at the new primary |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promoted {
    pub lineage: Lineage,
}

/// Primary -> secondary, from time to time, unanswered: how far each other site of the
/// group has durably received. A secondary keeps in its log only the entries the others
/// lack, so that if it becomes primary it ships them from its log (no copy).
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 2 | count u16 (at most 64) | |
/// | 2 | per site | name length u8, name (UTF-8), received u64 | |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peers {
    pub positions: Vec<(String, u64)>,
}

/// Primary -> secondary (online verify): the crc32c of a range of one device, computed
/// at the secondary on the state its log leads to; answered by [`VerifyReply`].
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 4 | dev_nr u32 | |
/// | 4 | 8 | offset u64 | |
/// | 12 | 8 | len u64 (at most [`MAX_DATA`]) | |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyRequest {
    pub region: Region,
}

/// Secondary -> primary: the checksum asked by a [`VerifyRequest`].
///
/// | off | len | field | why |
/// |----:|----:|-------|-----|
/// | 0 | 20 | the region, as asked ([`Region`]) | |
/// | 20 | 4 | crc32c of its bytes | |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyReply {
    pub region: Region,
    pub crc: u32,
}

/// One message of the site protocol: a frame's decoded payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Refused(Refused),
    Entries(EntryBatch),
    Ack(Ack),
    Heartbeat(Heartbeat),
    ResyncData(ResyncData),
    ResyncAck(ResyncAck),
    Goodbye(Goodbye),
    Rejoin(Rejoin),
    Promote(Promote),
    Promoted(Promoted),
    Peers(Peers),
    VerifyRequest(VerifyRequest),
    VerifyReply(VerifyReply),
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello(_) => MessageKind::Hello,
            Message::Welcome(_) => MessageKind::Welcome,
            Message::Refused(_) => MessageKind::Refused,
            Message::Entries(_) => MessageKind::Entries,
            Message::Ack(_) => MessageKind::Ack,
            Message::Heartbeat(_) => MessageKind::Heartbeat,
            Message::ResyncData(_) => MessageKind::ResyncData,
            Message::ResyncAck(_) => MessageKind::ResyncAck,
            Message::Goodbye(_) => MessageKind::Goodbye,
            Message::Rejoin(_) => MessageKind::Rejoin,
            Message::Promote(_) => MessageKind::Promote,
            Message::Promoted(_) => MessageKind::Promoted,
            Message::Peers(_) => MessageKind::Peers,
            Message::VerifyRequest(_) => MessageKind::VerifyRequest,
            Message::VerifyReply(_) => MessageKind::VerifyReply,
        }
    }

    /// Checks that the message can be encoded: everything decoding checks that is not
    /// fixed by the encoding itself (names, counts, orders, counters, ranges).
    pub fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => h.validate(),
            Message::Welcome(w) => w.validate(),
            Message::Refused(r) => check_reason("refuse reason", &r.reason),
            Message::Entries(b) => b.validate(),
            Message::Ack(a) => counter("received seq", a.received).and(counter("applied seq", a.applied)),
            Message::Heartbeat(h) => counter("last seq", h.last_seq).and(counter("durable seq", h.durable)),
            Message::ResyncData(d) => {
                if d.data.len() > MAX_DATA as usize {
                    let (len, max) = (d.data.len(), MAX_DATA as usize);
                    return Err(WireError::TooLong { what: "resync data", len, max });
                }
                range("resync data", d.offset, d.data.len() as u64)
            }
            Message::ResyncAck(a) => range("resync ack", a.offset, a.len as u64),
            Message::Goodbye(g) => check_reason("goodbye reason", &g.reason),
            Message::Rejoin(r) => counter("rejoin seq", r.seq),
            Message::Promote(_) | Message::Promoted(_) => Ok(()),
            Message::VerifyRequest(VerifyRequest { region: g })
            | Message::VerifyReply(VerifyReply { region: g, .. }) => {
                if g.len > MAX_DATA as u64 {
                    return Err(WireError::TooLong {
                        what: "verify region",
                        len: g.len as usize,
                        max: MAX_DATA as usize,
                    });
                }
                range("verify region", g.offset, g.len)
            }
            Message::Peers(p) => {
                if p.positions.len() > MAX_PEERS {
                    return Err(WireError::TooMany { what: "peer count", count: p.positions.len(), max: MAX_PEERS });
                }
                p.positions.iter().try_for_each(|(n, v)| check_name("peer site", n).and(counter("peer received", *v)))
            }
        }
    }

    /// The message's body: the frame payload before any compression.
    ///
    /// # Panics
    /// If [`Message::validate`] fails: a caller bug; the receiver would refuse it.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.put(&mut out);
        out
    }

    /// The whole frame, header included, uncompressed, at [`PROTO_MAX`]. To send a
    /// compressed body, compress [`Message::encode_body`] and use [`join_compressed`] and
    /// [`encode_frame`].
    ///
    /// # Panics
    /// If [`Message::validate`] fails: a caller bug; the receiver would refuse it.
    pub fn encode(&self) -> Vec<u8> {
        // The body goes straight after room for the header: a 64 MiB batch is not copied.
        let mut out = vec![0u8; HEADER_LEN];
        self.put(&mut out);
        let header = FrameHeader::new(self.kind(), 0, &out[HEADER_LEN..]);
        out[..HEADER_LEN].copy_from_slice(&header.encode());
        out
    }

    fn put(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.validate() {
            panic!("cannot encode a {} message: {e}", self.kind());
        }
        match self {
            Message::Hello(h) => h.put(out),
            Message::Welcome(w) => w.put(out),
            Message::Refused(r) => {
                push_u16(out, r.code as u16);
                push_reason(out, &r.reason);
            }
            Message::Entries(b) => b.put(out),
            Message::Ack(a) => {
                push_u64(out, a.received);
                push_u64(out, a.applied);
            }
            Message::Heartbeat(h) => {
                push_u64(out, h.time_us);
                push_u64(out, h.last_seq);
                push_u64(out, h.durable);
            }
            Message::ResyncData(d) => {
                out.reserve(20 + d.data.len());
                push_u32(out, d.dev_nr);
                push_u64(out, d.offset);
                push_u32(out, d.data.len() as u32);
                push_u32(out, crc32c::crc32c(&d.data));
                out.extend_from_slice(&d.data);
            }
            Message::ResyncAck(a) => {
                push_u32(out, a.dev_nr);
                push_u64(out, a.offset);
                push_u32(out, a.len);
            }
            Message::Goodbye(g) => push_reason(out, &g.reason),
            Message::Rejoin(r) => push_u64(out, r.seq),
            Message::Promote(p) => push_lineage(out, &p.lineage),
            Message::Promoted(p) => push_lineage(out, &p.lineage),
            Message::VerifyRequest(v) => push_region(out, &v.region),
            Message::VerifyReply(v) => {
                push_region(out, &v.region);
                push_u32(out, v.crc);
            }
            Message::Peers(p) => {
                push_u16(out, p.positions.len() as u16);
                for (n, v) in &p.positions {
                    push_name(out, n);
                    push_u64(out, *v);
                }
            }
        }
    }

    /// Decodes a message body of the header's kind. `body` is the payload after
    /// [`FrameHeader::check_payload`]; when the header says [`FrameHeader::compressed`],
    /// the caller has split ([`split_compressed`]) and decompressed it first.
    pub fn decode(header: &FrameHeader, body: &[u8]) -> Result<Message, WireError> {
        let kind = header.kind;
        let mut r = Reader::new(body, kind.name());
        let m = match kind {
            MessageKind::Hello => Message::Hello(Hello::read(&mut r)?),
            MessageKind::Welcome => Message::Welcome(Welcome::read(&mut r)?),
            MessageKind::Refused => {
                let v = r.u16()?;
                let code = RefuseCode::from_u16(v).ok_or(WireError::UnknownRefuseCode(v))?;
                Message::Refused(Refused { code, reason: r.reason("refuse reason")? })
            }
            MessageKind::Entries => Message::Entries(EntryBatch::read(&mut r)?),
            MessageKind::Ack => Message::Ack(Ack { received: r.u64()?, applied: r.u64()? }),
            MessageKind::Heartbeat => {
                Message::Heartbeat(Heartbeat { time_us: r.u64()?, last_seq: r.u64()?, durable: r.u64()? })
            }
            MessageKind::ResyncData => {
                let (dev_nr, offset, len, stored) = (r.u32()?, r.u64()?, r.u32()?, r.u32()?);
                let data = r.take(len as usize)?;
                let computed = crc32c::crc32c(data); // 0 for no data
                if computed != stored {
                    return Err(WireError::ResyncDataCrc { dev_nr, offset, stored, computed });
                }
                Message::ResyncData(ResyncData { dev_nr, offset, data: data.to_vec() })
            }
            MessageKind::ResyncAck => {
                Message::ResyncAck(ResyncAck { dev_nr: r.u32()?, offset: r.u64()?, len: r.u32()? })
            }
            MessageKind::Goodbye => Message::Goodbye(Goodbye { reason: r.reason("goodbye reason")? }),
            MessageKind::Rejoin => Message::Rejoin(Rejoin { seq: r.u64()? }),
            MessageKind::Promote => Message::Promote(Promote { lineage: r.lineage()? }),
            MessageKind::Promoted => Message::Promoted(Promoted { lineage: r.lineage()? }),
            MessageKind::VerifyRequest => Message::VerifyRequest(VerifyRequest { region: r.region()? }),
            MessageKind::VerifyReply => Message::VerifyReply(VerifyReply { region: r.region()?, crc: r.u32()? }),
            MessageKind::Peers => {
                let n = r.u16()? as usize;
                if n > MAX_PEERS {
                    return Err(WireError::TooMany { what: "peer count", count: n, max: MAX_PEERS });
                }
                let positions = (0..n).map(|_| Ok((r.name("peer site")?, r.u64()?))).collect::<Result<_, _>>()?;
                Message::Peers(Peers { positions })
            }
        };
        r.finish()?;
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reads a whole frame the way a session does (uncompressed frames only).
    fn decode_frame(b: &[u8]) -> Result<Message, WireError> {
        let h = FrameHeader::decode(&b[..HEADER_LEN.min(b.len())])?;
        let payload = &b[HEADER_LEN..];
        h.check_payload(payload)?;
        Message::decode(&h, payload)
    }

    /// Decodes `body` as a frame of `kind`, through a header that checks.
    fn decode_body(kind: MessageKind, body: &[u8]) -> Result<Message, WireError> {
        decode_frame(&encode_frame(kind, 0, body))
    }

    /// A header of `kind` for [`Message::decode`] alone (its length and crc unused).
    fn raw_header(kind: MessageKind) -> FrameHeader {
        FrameHeader { version: 1, kind, flags: 0, payload_len: 0, payload_crc: 0 }
    }

    /// Header bytes with the header crc made right again after a field was changed.
    fn reseal(mut b: [u8; HEADER_LEN]) -> [u8; HEADER_LEN] {
        let crc = crc32c::crc32c(&b[..20]);
        put_u32(&mut b, 20, crc);
        b
    }

    fn hello() -> Hello {
        Hello {
            proto_min: 1,
            proto_max: 1,
            features: KNOWN_FEATURES,
            group_name: "pg0".into(),
            group_uuid: [0xab; 16],
            site: "paris".into(),
            role: Role::Primary,
            lineage: Lineage::first(3).promoted(9, 50),
            slink: 3,
            devices: vec![DeviceInfo { dev_nr: 0, bytes: 1 << 30 }, DeviceInfo { dev_nr: 2, bytes: 4096 }],
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            proto: 1,
            features: features::LZ4,
            site: "lyon-é".into(),
            role: Role::Secondary,
            lineage: Lineage::first(3).promoted(9, 50),
            group_uuid: [0xab; 16],
            received: 100,
            applied: 90,
            devices: hello().devices,
            diverged: vec![Region { dev_nr: 0, offset: 4096, len: 65536 }],
        }
    }

    fn entry(seq: u64, epoch: u64, kind: WireKind, data: &[u8], len: u32) -> WireEntry {
        WireEntry {
            seq,
            epoch,
            origin_time_us: 1_700_000_000_000_000 + seq,
            offset: seq * 4096,
            dev_nr: 1,
            kind,
            len,
            data: data.to_vec(),
        }
    }

    fn batch() -> EntryBatch {
        EntryBatch {
            entries: vec![
                entry(10, 4, WireKind::Write, b"hello world", 11),
                entry(11, 4, WireKind::WriteZeroes, b"", 8192),
                entry(13, 5, WireKind::Discard, b"", 1 << 20),
                entry(14, 5, WireKind::Write, &[7u8; 4096], 4096),
            ],
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(hello()),
            Message::Welcome(welcome()),
            Message::Refused(Refused { code: RefuseCode::StaleGeneration, reason: "generation 6 < 7".into() }),
            Message::Refused(Refused { code: RefuseCode::Busy, reason: String::new() }),
            Message::Entries(batch()),
            Message::Entries(EntryBatch::default()),
            Message::Ack(Ack { received: 14, applied: 13 }),
            Message::Heartbeat(Heartbeat { time_us: u64::MAX, last_seq: 14, durable: 12 }),
            Message::ResyncData(ResyncData { dev_nr: 2, offset: 1 << 20, data: vec![1, 2, 3, 4, 5] }),
            Message::ResyncData(ResyncData { dev_nr: 2, offset: 0, data: Vec::new() }),
            Message::ResyncAck(ResyncAck { dev_nr: 2, offset: 1 << 20, len: 5 }),
            Message::Goodbye(Goodbye { reason: "shutting down".into() }),
            Message::Rejoin(Rejoin { seq: 77 }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_messages() {
            let b = m.encode();
            let h = FrameHeader::decode(&b[..HEADER_LEN]).unwrap();
            assert_eq!((h.version, h.kind, h.flags, h.compressed()), (1, m.kind(), 0, false));
            assert_eq!(h.payload_len as usize, b.len() - HEADER_LEN);
            assert_eq!(&b[HEADER_LEN..], &m.encode_body()[..], "{}", m.kind());
            assert_eq!(decode_frame(&b).unwrap(), m);
        }
        let b = batch();
        assert_eq!(EntryBatch::decode_body(&b.encode_body()).unwrap(), b);
    }

    #[test]
    fn header_layout() {
        let b = Message::Ack(Ack { received: 1, applied: 1 }).encode();
        assert_eq!(&b[0..4], b"DMRS");
        assert_eq!(get_u16(&b, 4), 1);
        assert_eq!(get_u16(&b, 6), MessageKind::Ack as u16);
        assert_eq!(get_u16(&b, 8), 0);
        assert_eq!(get_u16(&b, 10), 0);
        assert_eq!(get_u32(&b, 12), 16);
        assert_eq!(get_u32(&b, 16), crc32c::crc32c(&b[24..]));
        assert_eq!(get_u32(&b, 20), crc32c::crc32c(&b[..20]));
        // Entry header: kind at 36, len at 40, data crc at 44, data at 48.
        let e = EntryBatch { entries: vec![entry(1, 1, WireKind::Write, b"abc", 3)] }.encode_body();
        assert_eq!(get_u32(&e, 0), 1);
        assert_eq!((e[4 + 36], get_u32(&e, 4 + 40), get_u32(&e, 4 + 44)), (1, 3, crc32c::crc32c(b"abc")));
        assert_eq!(&e[4 + 48..], b"abc");
    }

    #[test]
    fn max_payloads_match_the_largest_messages() {
        let devices: Vec<_> = (0..MAX_DEVICES as u32).map(|n| DeviceInfo { dev_nr: n, bytes: u64::MAX }).collect();
        let name = "n".repeat(MAX_NAME_LEN);
        let reason = "r".repeat(MAX_REASON_LEN);
        let lineage = (0..20).fold(Lineage::first(1), |l, i| l.promoted(i, 10 * (i + 1)));
        let diverged = vec![Region { dev_nr: 1, offset: 0, len: 1 }; MAX_REGIONS];
        let peers = (0..MAX_PEERS).map(|i| (format!("{i:0>255}"), 5)).collect();
        let largest = [
            Message::Hello(Hello {
                group_name: name.clone(),
                site: name.clone(),
                devices: devices.clone(),
                lineage,
                ..hello()
            }),
            Message::Welcome(Welcome { site: name, devices, lineage, diverged, ..welcome() }),
            Message::Promote(Promote { lineage }),
            Message::Promoted(Promoted { lineage }),
            Message::Peers(Peers { positions: peers }),
            Message::VerifyRequest(VerifyRequest { region: Region { dev_nr: 1, offset: 2, len: 3 } }),
            Message::VerifyReply(VerifyReply { region: Region { dev_nr: 1, offset: 2, len: 3 }, crc: 4 }),
            Message::Refused(Refused { code: RefuseCode::Internal, reason: reason.clone() }),
            Message::Ack(Ack { received: 0, applied: 0 }),
            Message::Heartbeat(Heartbeat { time_us: 0, last_seq: 0, durable: 0 }),
            Message::ResyncAck(ResyncAck { dev_nr: 0, offset: 0, len: 0 }),
            Message::Goodbye(Goodbye { reason }),
        ];
        for m in largest {
            assert_eq!(m.encode_body().len(), m.kind().max_payload() as usize, "{}", m.kind());
            assert_eq!(decode_frame(&m.encode()).unwrap(), m);
        }
        // The largest batch fits in a frame.
        let full = 4 + MAX_BATCH_ENTRIES as u64 * ENTRY_HEADER_LEN as u64 + MAX_DATA as u64;
        assert!(full + COMPRESSED_PREFIX_LEN as u64 <= MAX_PAYLOAD as u64);
    }

    #[test]
    fn compressed_frames() {
        let body = Message::Entries(batch()).encode_body();
        // Stand-in for a compressor: this module never looks inside the compressed bytes.
        let squeezed: Vec<u8> = body.iter().rev().copied().collect();
        let frame = encode_frame(
            MessageKind::Entries,
            FLAG_COMPRESSED,
            &join_compressed(Compression::Zstd, body.len() as u32, &squeezed),
        );
        let h = FrameHeader::decode(&frame[..HEADER_LEN]).unwrap();
        assert!(h.compressed());
        h.check_payload(&frame[HEADER_LEN..]).unwrap();
        let (method, raw_len, rest) = split_compressed(&frame[HEADER_LEN..]).unwrap();
        assert_eq!((method, raw_len as usize, rest), (Compression::Zstd, body.len(), &squeezed[..]));
        let unsqueezed: Vec<u8> = rest.iter().rev().copied().collect();
        assert_eq!(Message::decode(&h, &unsqueezed).unwrap(), Message::Entries(batch()));
        assert_eq!(Compression::Lz4.feature(), features::LZ4);

        assert_eq!(split_compressed(&[9, 0, 0, 0, 0]), Err(WireError::UnknownCompression(9)));
        assert!(matches!(split_compressed(&[0, 0, 0, 0, 0]), Err(WireError::Invalid { .. })));
        assert!(matches!(split_compressed(&[1, 0, 0]), Err(WireError::Truncated { need: 5, have: 3, .. })));
        let mut p = join_compressed(Compression::Lz4, MAX_PAYLOAD, b"x");
        assert_eq!(split_compressed(&p).unwrap(), (Compression::Lz4, MAX_PAYLOAD, &b"x"[..]));
        put_u32(&mut p, 1, MAX_PAYLOAD + 1);
        let e = split_compressed(&p).unwrap_err();
        assert_eq!(e, WireError::RawTooLarge { len: MAX_PAYLOAD + 1, max: MAX_PAYLOAD });
        assert_eq!(e.to_string(), "decompressed payload of 75497473 bytes exceeds the limit of 75497472");

        // Only data-carrying kinds may be compressed.
        let mut b: [u8; HEADER_LEN] =
            Message::Goodbye(Goodbye { reason: String::new() }).encode()[..HEADER_LEN].try_into().unwrap();
        put_u16(&mut b, 8, FLAG_COMPRESSED);
        assert_eq!(FrameHeader::decode(&reseal(b)), Err(WireError::NotCompressible(MessageKind::Goodbye)));
    }

    #[test]
    fn header_errors() {
        let frame = Message::Heartbeat(Heartbeat { time_us: 1, last_seq: 2, durable: 3 }).encode();
        let good: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
        assert_eq!(FrameHeader::decode(&good[..23]), Err(WireError::HeaderLen(23)));
        assert_eq!(FrameHeader::decode(&frame), Err(WireError::HeaderLen(frame.len())));

        let mut b = good;
        b[0] = b'X';
        assert_eq!(FrameHeader::decode(&b), Err(WireError::BadMagic(u32::from_le_bytes(*b"XMRS"))));
        let mut b = good;
        b[12] ^= 1;
        assert!(matches!(FrameHeader::decode(&b), Err(WireError::HeaderCrc { .. })));
        let mut b = good;
        b[21] ^= 1;
        assert!(matches!(FrameHeader::decode(&b), Err(WireError::HeaderCrc { .. })));

        let patched = |at: usize, v: u16| {
            let mut b = good;
            put_u16(&mut b, at, v);
            FrameHeader::decode(&reseal(b))
        };
        assert_eq!(patched(4, 0), Err(WireError::Version(0)));
        assert_eq!(patched(4, 2), Err(WireError::Version(2)));
        assert_eq!(
            patched(4, 2).unwrap_err().to_string(),
            "protocol version 2 is not supported (this build speaks 1 to 1)"
        );
        assert_eq!(patched(6, 0), Err(WireError::UnknownKind(0)));
        assert_eq!(patched(6, 16), Err(WireError::UnknownKind(16)));
        assert_eq!(patched(8, 2), Err(WireError::UnknownFlags(2)));
        assert_eq!(patched(8, 0x8001), Err(WireError::UnknownFlags(0x8001)));
        assert_eq!(patched(10, 1), Err(WireError::Reserved { what: "frame header" }));

        let mut b = good;
        put_u16(&mut b, 6, MessageKind::Entries as u16);
        put_u32(&mut b, 12, 90_000_000);
        let e = FrameHeader::decode(&reseal(b)).unwrap_err();
        assert_eq!(e, WireError::PayloadTooLarge { kind: MessageKind::Entries, len: 90_000_000, max: MAX_PAYLOAD });
        assert_eq!(e.to_string(), "entries frame payload of 90000000 bytes exceeds the limit of 75497472");
        put_u32(&mut b, 12, MAX_PAYLOAD);
        assert!(FrameHeader::decode(&reseal(b)).is_ok());
        // A heartbeat may not claim more than its 24 bytes.
        put_u32(&mut b, 12, 25);
        put_u16(&mut b, 6, MessageKind::Heartbeat as u16);
        assert!(matches!(FrameHeader::decode(&reseal(b)), Err(WireError::PayloadTooLarge { len: 25, max: 24, .. })));
    }

    #[test]
    fn payload_errors() {
        let mut frame = Message::Goodbye(Goodbye { reason: "bye".into() }).encode();
        let h = FrameHeader::decode(&frame[..HEADER_LEN]).unwrap();
        *frame.last_mut().unwrap() = b'!';
        assert!(matches!(decode_frame(&frame), Err(WireError::PayloadCrc { .. })));
        assert_eq!(
            h.check_payload(&frame[HEADER_LEN..frame.len() - 1]),
            Err(WireError::PayloadLen { expected: 5, found: 4 })
        );
    }

    #[test]
    fn truncated_and_trailing_bodies() {
        for m in all_messages() {
            let body = m.encode_body();
            for n in 0..body.len() {
                let e = decode_body(m.kind(), &body[..n]).unwrap_err();
                assert!(matches!(e, WireError::Truncated { .. }), "{} cut at {n}: {e}", m.kind());
            }
            let mut long = body.clone();
            long.push(0);
            let trailing = Err(WireError::Trailing { what: m.kind().name(), extra: 1 });
            assert_eq!(Message::decode(&raw_header(m.kind()), &long), trailing);
        }
        assert_eq!(EntryBatch::decode_body(&[0, 0, 0, 0, 9]), Err(WireError::Trailing { what: "entries", extra: 1 }));
    }

    #[test]
    fn string_errors() {
        let body = Message::Hello(hello()).encode_body();
        // The group name "pg0" is at 13..16.
        let mut b = body.clone();
        b[13] = 0xff;
        assert_eq!(decode_body(MessageKind::Hello, &b), Err(WireError::BadUtf8 { what: "group name" }));
        let mut b = body.clone();
        b[12] = 0;
        b.drain(13..16);
        let e = decode_body(MessageKind::Hello, &b).unwrap_err();
        assert_eq!(e.to_string(), "group name: empty");

        let mut b = Message::Goodbye(Goodbye { reason: String::new() }).encode_body();
        put_u16(&mut b, 0, 1025);
        b.extend_from_slice(&[b'x'; 1025]);
        // The frame header already refuses the length; Message::decode on its own too.
        let goodbye = FrameHeader { payload_len: b.len() as u32, ..raw_header(MessageKind::Goodbye) };
        let frame = [&goodbye.encode()[..], &b].concat();
        assert!(matches!(decode_frame(&frame), Err(WireError::PayloadTooLarge { len: 1027, max: 1026, .. })));
        let e = Message::decode(&goodbye, &b).unwrap_err();
        assert_eq!(e, WireError::TooLong { what: "goodbye reason", len: 1025, max: MAX_REASON_LEN });
        assert_eq!(e.to_string(), "goodbye reason: 1025 bytes exceeds the limit of 1024");
        let b = [1, 0, 2, 0, 0xc3, 0x28];
        assert_eq!(decode_body(MessageKind::Refused, &b), Err(WireError::BadUtf8 { what: "refuse reason" }));
    }

    #[test]
    fn enum_and_field_errors() {
        let body = Message::Hello(hello()).encode_body();
        // Role is at 30 + g + s = 38.
        let mut b = body.clone();
        b[38] = 3;
        assert_eq!(decode_body(MessageKind::Hello, &b), Err(WireError::UnknownRole(3)));
        let mut b = body.clone();
        put_u16(&mut b, 0, 2); // proto_min 2 > proto_max 1
        assert!(matches!(decode_body(MessageKind::Hello, &b), Err(WireError::Invalid { what: "hello", .. })));
        let mut b = body.clone();
        put_u16(&mut b, 88, 2048); // slink (after the lineage: 1 + 2 * 24 bytes at 39)
        assert!(matches!(decode_body(MessageKind::Hello, &b), Err(WireError::Invalid { what: "hello", .. })));
        let mut b = body.clone();
        put_u16(&mut b, 90, 4097); // device count
        let e = decode_body(MessageKind::Hello, &b).unwrap_err();
        assert_eq!(e, WireError::TooMany { what: "device count", count: 4097, max: MAX_DEVICES });
        let mut b = body.clone();
        put_u32(&mut b, 92 + 12, 0); // second device number equal to the first
        assert!(matches!(decode_body(MessageKind::Hello, &b), Err(WireError::Invalid { what: "device list", .. })));
        // A hello may offer features this build does not know; a welcome may not agree to them.
        let m = Message::Hello(Hello { features: u64::MAX, ..hello() });
        assert_eq!(decode_frame(&m.encode()).unwrap(), m);
        let mut b = Message::Welcome(welcome()).encode_body();
        put_u64(&mut b, 2, 4);
        assert!(matches!(decode_body(MessageKind::Welcome, &b), Err(WireError::Invalid { what: "welcome", .. })));

        assert_eq!(decode_body(MessageKind::Refused, &[11, 0, 0, 0]), Err(WireError::UnknownRefuseCode(11)));
        let mut b = [0u8; 16];
        put_u64(&mut b, 0, MAX_COUNTER + 1);
        let e = decode_body(MessageKind::Ack, &b).unwrap_err();
        assert_eq!(e, WireError::Counter { field: "received seq", value: MAX_COUNTER + 1 });
        let mut b = [0u8; 16];
        put_u64(&mut b, 4, u64::MAX);
        put_u32(&mut b, 12, 1);
        assert!(matches!(decode_body(MessageKind::ResyncAck, &b), Err(WireError::Invalid { what: "resync ack", .. })));

        let mut b = Message::ResyncData(ResyncData { dev_nr: 1, offset: 512, data: vec![9; 100] }).encode_body();
        b[50] ^= 1;
        assert!(matches!(
            decode_body(MessageKind::ResyncData, &b),
            Err(WireError::ResyncDataCrc { dev_nr: 1, offset: 512, .. })
        ));
    }

    /// Offset of entry `i`'s header in `batch().encode_body()`.
    fn entry_at(i: usize) -> usize {
        4 + batch().entries[..i].iter().map(|e| ENTRY_HEADER_LEN + e.data.len()).sum::<usize>()
    }

    #[test]
    fn entry_errors() {
        let body = batch().encode_body();
        let patch = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = body.clone();
            f(&mut b);
            decode_body(MessageKind::Entries, &b).unwrap_err()
        };
        let (e1, e2) = (entry_at(1), entry_at(2));
        assert_eq!(patch(&|b| put_u64(b, e1, 10)), WireError::SeqOrder { prev: 10, seq: 10 });
        assert_eq!(patch(&|b| put_u64(b, e2, 5)), WireError::SeqOrder { prev: 11, seq: 5 });
        assert_eq!(
            patch(&|b| put_u64(b, e2, 5)).to_string(),
            "entry seq 5 follows seq 11 (seqs must strictly increase within a batch)"
        );
        assert_eq!(patch(&|b| put_u64(b, e1 + 8, 3)), WireError::EpochOrder { seq: 11, prev: 4, epoch: 3 });
        assert!(matches!(patch(&|b| b[4 + 48] ^= 0x20), WireError::EntryDataCrc { seq: 10, .. }));
        assert!(matches!(patch(&|b| b[4 + 44] ^= 1), WireError::EntryDataCrc { seq: 10, .. }));
        assert_eq!(patch(&|b| b[e1 + 36] = 4), WireError::UnknownEntryKind { seq: 11, kind: 4 });
        assert_eq!(patch(&|b| b[e1 + 38] = 1), WireError::Reserved { what: "entry header" });
        assert!(matches!(patch(&|b| put_u32(b, e1 + 44, 1)), WireError::Invalid { what: "entry", .. }));
        assert_eq!(patch(&|b| put_u64(b, e1, u64::MAX)), WireError::Counter { field: "entry seq", value: u64::MAX });
        assert!(matches!(patch(&|b| put_u64(b, e1 + 24, u64::MAX)), WireError::Invalid { what: "entry", .. }));
        // A write longer than the body is truncated, not a huge allocation.
        assert!(matches!(patch(&|b| put_u32(b, 4 + 40, u32::MAX)), WireError::Truncated { .. }));
        assert_eq!(
            patch(&|b| put_u32(b, 0, MAX_BATCH_ENTRIES + 1)),
            WireError::TooMany { what: "batch entry count", count: 65537, max: 65536 }
        );
    }

    #[test]
    fn validate_and_encode_refuse_what_decoding_would() {
        let mut b = batch();
        b.entries[1].data = vec![1];
        assert!(Message::Entries(b).validate().is_err());
        let mut b = batch();
        b.entries.swap(0, 1);
        assert_eq!(b.validate(), Err(WireError::SeqOrder { prev: 11, seq: 10 }));
        let b =
            EntryBatch { entries: vec![entry(1, 1, WireKind::Write, &vec![0; MAX_DATA as usize + 1], MAX_DATA + 1)] };
        assert!(matches!(b.validate(), Err(WireError::TooLong { what: "batch data", .. })));
        let h = Hello { site: "x".repeat(256), ..hello() };
        assert_eq!(Message::Hello(h).validate(), Err(WireError::TooLong { what: "site name", len: 256, max: 255 }));
    }

    #[test]
    #[should_panic(expected = "cannot encode a hello message: site name: empty")]
    fn encoding_an_invalid_message_panics() {
        Message::Hello(Hello { site: String::new(), ..hello() }).encode();
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(1, 1, 1, 1), Some(1));
        assert_eq!(negotiate(1, 3, 2, 5), Some(3));
        assert_eq!(negotiate(2, 5, 1, 3), Some(3));
        assert_eq!(negotiate(1, 1, 2, 3), None);
        assert_eq!(negotiate(3, 2, 1, 5), None);
        assert_eq!(negotiate(0, 0, 0, 0), None);
        assert_eq!(negotiate(PROTO_MIN, PROTO_MAX, 0, 9), Some(PROTO_MAX));
    }

    #[test]
    fn enum_values() {
        for k in 1..=9 {
            assert_eq!(MessageKind::from_u16(k).unwrap() as u16, k);
        }
        for c in 1..=9 {
            assert_eq!(RefuseCode::from_u16(c).unwrap() as u16, c);
        }
        assert_eq!(RefuseCode::WrongGroupUuid.to_string(), "wrong-group-uuid");
        assert_eq!(MessageKind::ResyncData.to_string(), "resync-data");
        assert_eq!((Role::from_u8(0), WireKind::from_u8(4), Compression::from_u8(3)), (None, None, None));
    }

    fn arb_entries() -> impl Strategy<Value = EntryBatch> {
        let one = (
            1u64..1000,
            0u64..3,
            any::<u64>(),
            0u64..(1 << 50),
            any::<u32>(),
            1u8..=3,
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..200),
        );
        proptest::collection::vec(one, 0..40).prop_map(|raw| {
            let (mut seq, mut epoch) = (0u64, 0u64);
            let entries = raw
                .into_iter()
                .map(|(dseq, depoch, t, offset, dev_nr, kind, len, data)| {
                    seq += dseq;
                    epoch += depoch;
                    let kind = WireKind::from_u8(kind).unwrap();
                    let (len, data) =
                        if kind == WireKind::Write { (data.len() as u32, data) } else { (len, Vec::new()) };
                    WireEntry { seq, epoch, origin_time_us: t, offset, dev_nr, kind, len, data }
                })
                .collect();
            EntryBatch { entries }
        })
    }

    fn arb_hello() -> impl Strategy<Value = Hello> {
        let devices = proptest::collection::btree_map(any::<u32>(), any::<u64>(), 0..50)
            .prop_map(|m| m.into_iter().map(|(dev_nr, bytes)| DeviceInfo { dev_nr, bytes }).collect::<Vec<_>>());
        (
            1u16..10,
            0u16..10,
            any::<u64>(),
            "\\PC{1,60}",
            any::<[u8; 16]>(),
            "[a-z0-9.-]{1,255}",
            any::<bool>(),
            (any::<u64>(), 1u64..1000, 0usize..4),
            0u16..2048,
            devices,
        )
            .prop_filter("names fit in 255 bytes", |t| t.3.len() <= MAX_NAME_LEN)
            .prop_map(
                |(min, span, features, group_name, group_uuid, site, primary, generation, slink, devices)| Hello {
                    proto_min: min,
                    proto_max: min + span,
                    features,
                    group_name,
                    group_uuid,
                    site,
                    role: if primary { Role::Primary } else { Role::Secondary },
                    lineage: (0..generation.2)
                        .fold(Lineage::first(generation.0), |l, i| l.promoted(i as u64, generation.1 * (i as u64 + 1))),
                    slink,
                    devices,
                },
            )
    }

    proptest! {
        #[test]
        fn entries_round_trip(b in arb_entries()) {
            let body = b.encode_body();
            prop_assert_eq!(&EntryBatch::decode_body(&body).unwrap(), &b);
            let m = Message::Entries(b);
            prop_assert_eq!(decode_frame(&m.encode()).unwrap(), m);
        }

        #[test]
        fn hello_round_trip(h in arb_hello()) {
            let m = Message::Hello(h);
            prop_assert_eq!(decode_frame(&m.encode()).unwrap(), m);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..400), kind in 1u16..=15) {
            let _ = decode_frame(&b);
            let _ = split_compressed(&b);
            if let Ok(m) = Message::decode(&raw_header(MessageKind::from_u16(kind).unwrap()), &b) {
                // What decodes is canonical: it re-encodes to the same bytes.
                prop_assert_eq!(m.encode_body(), b);
            }
        }

        #[test]
        fn any_bit_flip_in_a_frame_is_caught(i in 0usize..1000, bit in 0u8..8) {
            let frame = Message::Entries(batch()).encode();
            let mut b = frame.clone();
            let i = i % b.len();
            b[i] ^= 1 << bit;
            prop_assert!(decode_frame(&b).is_err());
        }
    }
}
