//! Offline, read-only view of a log: `dmrep log dump|check PATH`.

use std::fmt;

use serde::Serialize;

use dmrep_core::BlockBackend;
use dmrep_formats::replog::{RecordKind, SlinkSet, Superblock, SB_SLOT_SIZE};

use super::recovery::{self, Stop};
use super::LogError;

/// Everything `inspect` found. `Serialize` for `--json`, `Display` for people.
#[derive(Clone, Debug, Serialize)]
pub struct LogDump {
    pub device: String,
    pub start: u64,
    /// Both superblock slots (A, then B).
    pub slots: Vec<SlotDump>,
    /// The slot recovery would use (0 = A, 1 = B); `None` when neither is valid.
    pub active_slot: Option<usize>,
    /// Why no slot can be used, when none can.
    pub error: Option<String>,
    /// Every record walked from the head, in ring order, including wrap records and the
    /// records of a dropped incomplete epoch.
    pub records: Vec<RecordDump>,
    /// Live entries recovery would keep.
    pub entries: u64,
    /// Seq the next append would get.
    pub next_seq: Option<u64>,
    /// Ring bytes in use.
    pub used_bytes: u64,
    /// Where and why the walk stopped.
    pub stop: Option<StopDump>,
    /// What recovery would cut off (see `RecoveryReport::truncated`).
    pub truncated: Option<String>,
}

impl LogDump {
    /// A valid superblock and nothing to truncate.
    pub fn is_clean(&self) -> bool {
        self.active_slot.is_some() && self.truncated.is_none()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SlotDump {
    /// `"A"` or `"B"`.
    pub slot: &'static str,
    /// Byte offset on the device.
    pub offset: u64,
    /// Why the slot is not valid.
    pub error: Option<String>,
    pub superblock: Option<Superblock>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecordDump {
    pub seq: u64,
    pub epoch: u64,
    pub incarnation: u64,
    pub kind: RecordKind,
    /// The last record of its epoch.
    pub epoch_end: bool,
    pub dev_nr: u32,
    pub offset: u64,
    pub len: u32,
    pub slinks: SlinkSet,
    /// Byte offset of the header from the ring start.
    pub ring_pos: u64,
    /// Part of a complete epoch (recovery keeps it) or of the dropped incomplete one.
    pub committed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct StopDump {
    pub ring_pos: u64,
    pub reason: String,
    /// A torn or damaged record rather than the normal end of the log.
    pub corrupt: bool,
}

/// Reads the log at `start` without changing anything: both superblocks, and the ring
/// walked from the head as recovery would. A log without a valid superblock is not an
/// error here (the dump says why each slot is invalid); I/O errors and a region that
/// cannot hold a log are.
pub fn inspect(backend: &dyn BlockBackend, start: u64) -> Result<LogDump, LogError> {
    let slots = recovery::read_slots(backend, start)?;
    let slot_dumps = slots
        .iter()
        .enumerate()
        .map(|(i, s)| SlotDump {
            slot: if i == 0 { "A" } else { "B" },
            offset: start + (i * SB_SLOT_SIZE) as u64,
            error: s.as_ref().err().map(|e| e.to_string()),
            superblock: s.as_ref().ok().cloned(),
        })
        .collect();
    let mut dump = LogDump {
        device: backend.describe(),
        start,
        slots: slot_dumps,
        active_slot: None,
        error: None,
        records: Vec::new(),
        entries: 0,
        next_seq: None,
        used_bytes: 0,
        stop: None,
        truncated: None,
    };
    let (slot, sb) = match recovery::choose(backend, start, &slots) {
        Ok(x) => x,
        Err(e @ (LogError::NoSuperblock { .. } | LogError::NewerVersion { .. } | LogError::Geometry { .. })) => {
            dump.error = Some(e.to_string());
            return Ok(dump);
        }
        Err(e) => return Err(e),
    };
    dump.active_slot = Some(slot);
    let walk = recovery::walk(backend, start, &sb)?;
    let rec = |r: &recovery::Record, committed| RecordDump {
        seq: r.header.seq,
        epoch: r.header.epoch,
        incarnation: r.header.incarnation,
        kind: r.header.kind,
        epoch_end: r.header.epoch_end(),
        dev_nr: r.header.dev_nr,
        offset: r.header.offset,
        len: r.header.len,
        slinks: r.header.slinks,
        ring_pos: r.pos,
        committed,
    };
    dump.records =
        walk.committed.iter().map(|r| rec(r, true)).chain(walk.dropped.iter().map(|r| rec(r, false))).collect();
    dump.entries = walk.entries().count() as u64;
    dump.next_seq = Some(walk.next_seq);
    dump.used_bytes = walk.bytes;
    dump.stop = Some(StopDump {
        ring_pos: walk.stop_pos,
        reason: walk.stop.reason().to_string(),
        corrupt: matches!(walk.stop, Stop::Corrupt(_)),
    });
    dump.truncated = walk.truncated();
    Ok(dump)
}

impl fmt::Display for LogDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "replication log on {} at byte {}", self.device, self.start)?;
        for (i, s) in self.slots.iter().enumerate() {
            let active = if self.active_slot == Some(i) { " [active]" } else { "" };
            match (&s.superblock, &s.error) {
                (Some(sb), _) => writeln!(
                    f,
                    "  superblock {} (byte {}): valid, generation {}, incarnation {}{active}",
                    s.slot, s.offset, sb.generation, sb.incarnation
                )?,
                (None, Some(e)) => writeln!(f, "  superblock {} (byte {}): invalid: {e}", s.slot, s.offset)?,
                (None, None) => writeln!(f, "  superblock {} (byte {}): invalid", s.slot, s.offset)?,
            }
        }
        if let Some(e) = &self.error {
            return writeln!(f, "  no usable log: {e}");
        }
        let Some(sb) = self.active_slot.and_then(|i| self.slots[i].superblock.as_ref()) else {
            return Ok(());
        };
        writeln!(
            f,
            "  uuid {}, region {} bytes, ring {} bytes at offset {}",
            uuid::Uuid::from_bytes(sb.uuid),
            sb.region_size,
            sb.ring_len,
            sb.ring_offset
        )?;
        writeln!(
            f,
            "  head seq {} at ring offset {}, next epoch {}, fence seq {}",
            sb.head_seq, sb.head_pos, sb.next_epoch, sb.fence_seq
        )?;
        if sb.cursors.is_empty() {
            writeln!(f, "  cursors: none")?;
        } else {
            let c: Vec<String> = sb.cursors.iter().map(|(s, q)| format!("slink {s} = {q}")).collect();
            writeln!(f, "  cursors: {}", c.join(", "))?;
        }
        writeln!(
            f,
            "  {} entries, next seq {}, {} bytes of ring in use",
            self.entries,
            self.next_seq.unwrap_or(0),
            self.used_bytes
        )?;
        if !self.records.is_empty() {
            writeln!(
                f,
                "  {:>10} {:>8} {:>5} {:<12} {:>6} {:>14} {:>10} {:>10}  slinks",
                "seq", "epoch", "inc", "kind", "dev", "offset", "len", "ring_pos"
            )?;
        }
        for r in &self.records {
            let mark = match (r.committed, r.epoch_end) {
                (false, _) => " (dropped)",
                (true, true) => " |",
                (true, false) => "",
            };
            writeln!(
                f,
                "  {:>10} {:>8} {:>5} {:<12} {:>6} {:>14} {:>10} {:>10}  {}{mark}",
                r.seq,
                r.epoch,
                r.incarnation,
                r.kind.name(),
                r.dev_nr,
                r.offset,
                r.len,
                r.ring_pos,
                r.slinks
            )?;
        }
        if let Some(s) = &self.stop {
            let what = if s.corrupt { "corrupt record" } else { "end of log" };
            writeln!(f, "  walk stopped at ring offset {} ({what}): {}", s.ring_pos, s.reason)?;
        }
        match &self.truncated {
            Some(t) => writeln!(f, "  recovery would truncate: {t}"),
            None => writeln!(f, "  clean"),
        }
    }
}
