//! Finding a log on disk: the superblock pick and the ring walk. Shared by
//! [`RingLog::open`](super::RingLog::open) and the offline [`inspect`](super::inspect).
//!
//! # Which records are valid
//! The walk starts at the superblock's head position expecting the head seq. A record is
//! valid when its header decodes (magic, version, crc), it names this log's uuid, its seq
//! is the one expected, its incarnation is not older than the previous record's nor, from
//! the fence seq on, than the superblock's, its epoch continues the open epoch or starts
//! a newer one, it does not reach past the ring end or overlap the head, and its data crc
//! matches. A wrap record (same seq as the entry after it) sends the walk to the ring
//! start. The first invalid record ends the walk; the records of an epoch whose last
//! record (flag `EPOCH_END`) was not reached are dropped.

use dmrep_core::BlockBackend;
use dmrep_formats::replog::{
    EntryHeader, HeaderError, RecordKind, Superblock, SuperblockError, ENTRY_HEADER_SIZE, FORMAT_VERSION, RECORD_ALIGN,
    REGION_ALIGN, RING_OFFSET, SB_SLOT_SIZE,
};

use super::LogError;

/// Bytes read at once while walking the ring: large enough that walking a log of small
/// entries costs few reads, small enough to be a negligible allocation.
const WALK_WINDOW: usize = 1 << 20;

pub(crate) fn io_err(what: &'static str, backend: &dyn BlockBackend, offset: u64, e: std::io::Error) -> LogError {
    LogError::Io { what, device: backend.describe(), offset, source: e }
}

pub(crate) fn geometry(backend: &dyn BlockBackend, reason: String) -> LogError {
    LogError::Geometry { device: backend.describe(), reason }
}

/// Reads and decodes both superblock slots.
pub(crate) fn read_slots(
    backend: &dyn BlockBackend,
    start: u64,
) -> Result<[Result<Superblock, SuperblockError>; 2], LogError> {
    if !start.is_multiple_of(REGION_ALIGN) {
        return Err(geometry(backend, format!("start {start} is not a multiple of {REGION_ALIGN}")));
    }
    if start.checked_add(RING_OFFSET).is_none_or(|end| end > backend.size()) {
        return Err(geometry(backend, format!("no room for a log at byte {start} of {}", backend.size())));
    }
    let mut buf = vec![0u8; 2 * SB_SLOT_SIZE];
    backend.read_at(&mut buf, start).map_err(|e| io_err("reading the log superblocks", backend, start, e))?;
    Ok([Superblock::decode(&buf[..SB_SLOT_SIZE]), Superblock::decode(&buf[SB_SLOT_SIZE..])])
}

/// Picks the valid slot with the highest generation. A slot of a newer format version
/// makes the whole log unusable by this build.
pub(crate) fn choose(
    backend: &dyn BlockBackend,
    start: u64,
    slots: &[Result<Superblock, SuperblockError>; 2],
) -> Result<(usize, Superblock), LogError> {
    for s in slots {
        if let Err(SuperblockError::NewerVersion { found, .. }) = s {
            return Err(LogError::NewerVersion {
                device: backend.describe(),
                start,
                found: *found,
                supported: FORMAT_VERSION,
            });
        }
    }
    let best = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().ok().map(|sb| (i, sb)))
        .max_by_key(|(_, sb)| sb.generation);
    let Some((i, sb)) = best else {
        let err =
            |s: &Result<Superblock, SuperblockError>| s.as_ref().err().cloned().unwrap_or(SuperblockError::NoMagic);
        return Err(LogError::NoSuperblock {
            device: backend.describe(),
            start,
            slot_a: err(&slots[0]),
            slot_b: err(&slots[1]),
        });
    };
    if start.checked_add(sb.region_size).is_none_or(|end| end > backend.size()) {
        return Err(geometry(
            backend,
            format!("the log at byte {start} is {} bytes but the device has only {}", sb.region_size, backend.size()),
        ));
    }
    Ok((i, sb.clone()))
}

/// A record the walk accepted (or read before stopping).
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub header: EntryHeader,
    /// Ring offset of the header.
    pub pos: u64,
}

/// Why the walk stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The normal end of a log: no header, an older lap's record, a leftover of an
    /// earlier incarnation or of a failed append.
    End(String),
    /// Something that looks like a torn or damaged record of ours.
    Corrupt(String),
}

impl Stop {
    pub fn reason(&self) -> &str {
        match self {
            Stop::End(r) | Stop::Corrupt(r) => r,
        }
    }
}

/// The outcome of a ring walk.
#[derive(Clone, Debug)]
pub(crate) struct Walk {
    /// Records of complete epochs, wrap records included, in ring order.
    pub committed: Vec<Record>,
    /// Records of the trailing epoch whose end was not found: not part of the log.
    pub dropped: Vec<Record>,
    /// Ring offset after the last committed record (the head position if none).
    pub tail_pos: u64,
    pub next_seq: u64,
    /// Epoch of the last committed record.
    pub last_epoch: Option<u64>,
    /// Ring bytes from the head to the tail.
    pub bytes: u64,
    /// Ring offset where the walk stopped.
    pub stop_pos: u64,
    pub stop: Stop,
}

impl Walk {
    /// Entries (wrap records left out) of the committed part.
    pub fn entries(&self) -> impl Iterator<Item = &Record> {
        self.committed.iter().filter(|r| r.header.kind != RecordKind::Wrap)
    }

    /// A description of what was cut off, or `None` when the log ended cleanly.
    pub fn truncated(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Stop::Corrupt(r) = &self.stop {
            parts.push(format!("ring offset {}: {r}", self.stop_pos));
        }
        if let Some(first) = self.dropped.first() {
            let entries: Vec<&Record> = self.dropped.iter().filter(|r| r.header.kind != RecordKind::Wrap).collect();
            let seqs = match (entries.first(), entries.last()) {
                (Some(a), Some(b)) => format!(", seq {}..={}", a.header.seq, b.header.seq),
                _ => String::new(),
            };
            parts.push(format!(
                "dropped incomplete epoch {} ({} entries{seqs}, from ring offset {})",
                first.header.epoch,
                entries.len(),
                first.pos
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Reads the ring through a window, so that walking small entries costs few reads.
struct RingReader<'a> {
    backend: &'a dyn BlockBackend,
    base: u64,
    ring_len: u64,
    buf: Vec<u8>,
    win_pos: u64,
    win_len: usize,
}

impl<'a> RingReader<'a> {
    /// `[pos, pos + len)` of the ring; the caller keeps it inside the ring.
    fn get(&mut self, pos: u64, len: usize) -> Result<&[u8], LogError> {
        debug_assert!(pos + len as u64 <= self.ring_len);
        let inside = pos >= self.win_pos && pos + len as u64 <= self.win_pos + self.win_len as u64;
        if !inside {
            let want = (len.max(WALK_WINDOW) as u64).min(self.ring_len - pos) as usize;
            self.buf.resize(want, 0);
            let at = self.base + pos;
            self.backend
                .read_at(&mut self.buf[..want], at)
                .map_err(|e| io_err("reading the log ring", self.backend, at, e))?;
            self.win_pos = pos;
            self.win_len = want;
        }
        let a = (pos - self.win_pos) as usize;
        Ok(&self.buf[a..a + len])
    }
}

/// Walks the ring of the log at `start` described by `sb`. Reads only.
pub(crate) fn walk(backend: &dyn BlockBackend, start: u64, sb: &Superblock) -> Result<Walk, LogError> {
    let ring_len = sb.ring_len;
    let mut rd =
        RingReader { backend, base: start + sb.ring_offset, ring_len, buf: Vec::new(), win_pos: 0, win_len: 0 };
    let mut pos = sb.head_pos;
    let mut expected = sb.head_seq;
    let mut walked = 0u64;
    let mut prev_inc: Option<u64> = None;
    // Epoch of the records after the last EPOCH_END, if any were read.
    let mut open_epoch: Option<u64> = None;
    let mut last_epoch: Option<u64> = None;
    let mut committed = Vec::new();
    let mut pending: Vec<Record> = Vec::new();
    let (mut tail_pos, mut next_seq, mut bytes) = (sb.head_pos, sb.head_seq, 0u64);

    let stop = loop {
        if pos == ring_len {
            pos = 0;
        }
        if walked + ENTRY_HEADER_SIZE as u64 > ring_len {
            break Stop::End("walked the whole ring".into());
        }
        let mut hb = [0u8; ENTRY_HEADER_SIZE];
        hb.copy_from_slice(rd.get(pos, ENTRY_HEADER_SIZE)?);
        let h = match EntryHeader::decode(&hb) {
            Ok(h) => h,
            Err(HeaderError::NoMagic) => break Stop::End("no entry header".into()),
            Err(e) => break Stop::Corrupt(format!("bad entry header ({e}) where seq {expected} was expected")),
        };
        if h.uuid != sb.uuid {
            break Stop::End("entry of another log".into());
        }
        if h.seq != expected {
            break Stop::End(format!("entry seq {} where seq {expected} was expected", h.seq));
        }
        if h.incarnation > sb.incarnation {
            break Stop::Corrupt(format!(
                "seq {}: incarnation {} is newer than the superblock's {}",
                h.seq, h.incarnation, sb.incarnation
            ));
        }
        if let Some(p) = prev_inc.filter(|&p| h.incarnation < p) {
            break Stop::End(format!("stale seq {} of incarnation {} after incarnation {p}", h.seq, h.incarnation));
        }
        if h.seq >= sb.fence_seq && h.incarnation < sb.incarnation {
            break Stop::End(format!(
                "stale seq {} of incarnation {} (incarnation {} starts at seq {})",
                h.seq, h.incarnation, sb.incarnation, sb.fence_seq
            ));
        }
        match (open_epoch, last_epoch) {
            (Some(e), _) if h.epoch != e => {
                break Stop::Corrupt(format!("seq {}: epoch {} inside epoch {e}", h.seq, h.epoch));
            }
            (None, Some(l)) if h.epoch <= l => {
                break Stop::End(format!("stale seq {}: epoch {} after epoch {l}", h.seq, h.epoch));
            }
            _ => {}
        }
        let rec_len = h.record_len();
        let advance = if h.kind == RecordKind::Wrap {
            if h.epoch_end() {
                break Stop::Corrupt(format!("wrap record for seq {} marked as the end of its epoch", h.seq));
            }
            ring_len - pos
        } else {
            if pos + rec_len > ring_len {
                break Stop::Corrupt(format!("seq {}: {rec_len}-byte record runs past the ring end", h.seq));
            }
            rec_len
        };
        if walked + advance > ring_len {
            break Stop::Corrupt(format!("seq {}: record would overlap the head", h.seq));
        }
        let data_len = h.data_len() as usize;
        if data_len > 0 {
            let computed = crc32c::crc32c(rd.get(pos + ENTRY_HEADER_SIZE as u64, data_len)?);
            if computed != h.data_crc {
                break Stop::Corrupt(format!("data crc mismatch (seq {})", h.seq));
            }
        }
        prev_inc = Some(h.incarnation);
        open_epoch = Some(h.epoch);
        let end = h.epoch_end();
        if h.kind != RecordKind::Wrap {
            expected += 1;
        }
        pending.push(Record { header: h, pos });
        walked += advance;
        pos += advance;
        debug_assert!(pos.is_multiple_of(RECORD_ALIGN));
        if end {
            last_epoch = open_epoch.take();
            committed.append(&mut pending);
            tail_pos = if pos == ring_len { 0 } else { pos };
            next_seq = expected;
            bytes = walked;
        }
    };
    Ok(Walk { committed, dropped: pending, tail_pos, next_seq, last_epoch, bytes, stop_pos: pos, stop })
}
