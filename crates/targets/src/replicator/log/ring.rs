//! [`RingLog`]: appending, reading, cursors and head advance, open and create.

use std::collections::{BTreeMap, VecDeque};
use std::io::IoSlice;
use std::sync::Arc;

use parking_lot::Mutex;

use dmrep_core::BlockBackend;
use dmrep_formats::replog::{
    pad_to_record, EntryHeader, RecordKind, SlinkSet, Superblock, ENTRY_HEADER_SIZE, FLAG_EPOCH_END, MAX_CURSORS,
    MAX_SLINKS, MIN_REGION_SIZE, RECORD_ALIGN, REGION_ALIGN, RING_OFFSET, SB_SLOT_SIZE,
};
use dmrep_formats::replog::{SiteState, SuperblockError, MAX_MARKER_DATA};

use super::recovery::{self, geometry, io_err};
use super::space::{self, RingState};
use super::{EntryKind, EntryMeta, LogError, LogStats, NewEntry, Origin, RecoveryReport, SlinkStats};

/// Padding source: data is padded to 512 bytes with zeros taken from here, so the data
/// itself is never copied.
static ZEROS: [u8; ENTRY_HEADER_SIZE] = [0; ENTRY_HEADER_SIZE];

/// A persistent ring buffer of write entries with per-SLINK cursors. See the
/// [module documentation](super) for the life of an entry, recovery and locking.
pub struct RingLog {
    backend: Arc<dyn BlockBackend>,
    /// Byte offset of the region on the back-end.
    start: u64,
    region_size: u64,
    ring_len: u64,
    uuid: [u8; 16],
    /// Of this open; written into every entry.
    incarnation: u64,
    /// First seq this incarnation could write (persisted in every superblock).
    fence_seq: u64,
    /// Serialises appends (held for the whole append, I/O included).
    append_lock: Mutex<()>,
    /// Serialises superblock writes.
    sb: Mutex<SbWriter>,
    /// In-memory state; never held during I/O.
    meta: Mutex<Meta>,
    /// Set when a failed append could not be made harmless: nothing may sync any more.
    poisoned: Mutex<Option<String>>,
}

/// Which slot the next superblock write goes to, and the last generation used.
struct SbWriter {
    /// The slot not holding the newest acknowledged superblock.
    next_slot: usize,
    generation: u64,
}

/// A live entry, compactly: entries of one batch usually share one SLINK set.
#[derive(Clone, Debug)]
struct Live {
    seq: u64,
    epoch: u64,
    offset: u64,
    pos: u64,
    dev_nr: u32,
    len: u32,
    data_crc: u32,
    kind: EntryKind,
    slinks: Arc<SlinkSet>,
    origin_seq: u64,
    origin_time_us: u64,
}

impl Live {
    fn to_meta(&self) -> EntryMeta {
        EntryMeta {
            seq: self.seq,
            epoch: self.epoch,
            dev_nr: self.dev_nr,
            offset: self.offset,
            len: self.len,
            kind: self.kind,
            slinks: *self.slinks,
            origin_seq: self.origin_seq,
            origin_time_us: self.origin_time_us,
            pos: self.pos,
            data_crc: self.data_crc,
        }
    }

    /// Whether every registered SLINK in the entry's bitmap has applied it (SLINKs not
    /// registered any more count as done).
    fn done(&self, cursors: &BTreeMap<u16, u64>) -> bool {
        cursors.iter().all(|(&s, &c)| c >= self.seq || !self.slinks.contains(s))
    }
}

/// Everything that changes, under one lock.
struct Meta {
    head_pos: u64,
    head_seq: u64,
    tail_pos: u64,
    next_seq: u64,
    next_epoch: u64,
    /// Entries with seq in `head_seq..next_seq`, in order.
    entries: VecDeque<Live>,
    cursors: BTreeMap<u16, u64>,
    /// Per registered SLINK: (entries, bytes) after its cursor that it needs.
    pending: BTreeMap<u16, (u64, u64)>,
    /// The site's role and group (persisted in every superblock).
    site: SiteState,
    /// Origin seq of the newest durable entry (the floor when the log is empty).
    origin_tail: u64,
}

impl Meta {
    fn ring_state(&self, ring_len: u64) -> RingState {
        RingState { ring_len, head_pos: self.head_pos, tail_pos: self.tail_pos, empty: self.entries.is_empty() }
    }

    fn index_of(&self, seq: u64) -> Option<usize> {
        let front = self.entries.front()?.seq;
        let i = seq.checked_sub(front)? as usize;
        (i < self.entries.len()).then_some(i)
    }

    /// Where the head would be with `cursors`: past every leading entry that is done.
    fn compute_head(&self, cursors: &BTreeMap<u16, u64>) -> (u64, u64) {
        let done = self.entries.iter().take_while(|e| e.done(cursors)).count();
        if done == 0 {
            (self.head_pos, self.head_seq)
        } else if let Some(e) = self.entries.get(done) {
            (e.pos, e.seq)
        } else {
            (self.tail_pos, self.next_seq)
        }
    }

    /// Installs cursors made durable together with `head`, and moves the head there.
    fn install(&mut self, cursors: BTreeMap<u16, u64>, head: (u64, u64)) {
        let old = std::mem::take(&mut self.cursors);
        let mut pending = BTreeMap::new();
        for (&s, &c) in &cursors {
            let p = match (old.get(&s), self.pending.get(&s)) {
                (Some(&o), Some(&p)) => self.pending_minus(s, o, c, p),
                _ => self.count_pending(s, c),
            };
            pending.insert(s, p);
        }
        self.cursors = cursors;
        self.pending = pending;
        while self.entries.front().is_some_and(|e| e.seq < head.1) {
            self.entries.pop_front();
        }
        self.head_pos = head.0;
        self.head_seq = head.1;
    }

    /// `p` minus the entries in `(from, to]` that SLINK `s` needs.
    fn pending_minus(&self, s: u16, from: u64, to: u64, mut p: (u64, u64)) -> (u64, u64) {
        if to > from {
            if let Some(first) = self.entries.front().map(|e| e.seq) {
                let a = (from + 1).max(first);
                for e in self.entries.iter().skip((a - first) as usize).take_while(|e| e.seq <= to) {
                    if e.slinks.contains(s) {
                        p.0 = p.0.saturating_sub(1);
                        p.1 = p.1.saturating_sub(e.len as u64);
                    }
                }
            }
        }
        p
    }

    fn count_pending(&self, s: u16, cursor: u64) -> (u64, u64) {
        self.entries
            .iter()
            .filter(|e| e.seq > cursor && e.slinks.contains(s))
            .fold((0, 0), |(n, b), e| (n + 1, b + e.len as u64))
    }

    fn slink_stats(&self, s: u16) -> Option<SlinkStats> {
        let cursor = *self.cursors.get(&s)?;
        let (pending_entries, pending_bytes) = self.pending.get(&s).copied().unwrap_or_default();
        Some(SlinkStats { slink: s, cursor, pending_entries, pending_bytes })
    }
}

impl RingLog {
    // -----------------------------------------------------------------------------------
    // Create and open

    /// Creates a new, empty log in `[start, start + size)` of `backend`, overwriting
    /// whatever was there (both superblock slots are rewritten; old ring contents stay
    /// but belong to another uuid). `start` and `size` must be multiples of 4096,
    /// `size` at least 1 MiB. Durable on return. On error no log is left: the region is
    /// discarded (on a file, its blocks go back to the file system).
    pub fn create(backend: Arc<dyn BlockBackend>, start: u64, size: u64) -> Result<Self, LogError> {
        let b = &*backend;
        if !start.is_multiple_of(REGION_ALIGN) || !size.is_multiple_of(REGION_ALIGN) {
            return Err(geometry(b, format!("start {start} and size {size} must be multiples of {REGION_ALIGN}")));
        }
        if size < MIN_REGION_SIZE {
            return Err(geometry(b, format!("size {size} is below the minimum of {MIN_REGION_SIZE} bytes")));
        }
        if start.checked_add(size).is_none_or(|end| end > b.size()) {
            return Err(geometry(b, format!("{start}+{size} is beyond the end of the device ({})", b.size())));
        }
        let sb = Superblock {
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            region_size: size,
            ring_offset: RING_OFFSET,
            ring_len: size - RING_OFFSET,
            generation: 1,
            incarnation: 1,
            fence_seq: 1,
            head_pos: 0,
            head_seq: 1,
            next_epoch: 1,
            cursors: Vec::new(),
            site: SiteState::new_primary([0; 16], rand_nonce()),
        };
        let mut sb = sb;
        sb.site.group_uuid = sb.uuid;
        let written = (|| {
            // Write the ring out once: on a sparse file every append would otherwise
            // allocate blocks, and each allocation turns the append's sync into a
            // file-system journal commit (measured here: ~1.3 ms instead of ~0.1 ms).
            preallocate(b, start + RING_OFFSET, size - RING_OFFSET)?;
            // Slot A holds the new superblock, slot B is zeroed: one write, one sync.
            let mut buf = sb.encode();
            buf.resize(2 * SB_SLOT_SIZE, 0);
            b.write_at(&buf, start).map_err(|e| io_err("writing the new log's superblocks", b, start, e))?;
            b.sync().map_err(|e| io_err("syncing the new log's superblocks", b, start, e))
        })();
        if let Err(e) = written {
            // No log was made: give back the space the attempt took (a full file system,
            // say, stays no fuller than before). The region reads as zeros: no valid
            // superblock, which is what `create` would have overwritten anyway.
            if let Err(d) = b.discard(start, size) {
                tracing::warn!(device = %b.describe(), start, size, "could not give back a failed log's space: {d}");
            }
            return Err(e);
        }
        tracing::info!(device = %b.describe(), start, size, "created replication log");
        Ok(Self::from_parts(backend, start, &sb, 1, BTreeMap::new(), VecDeque::new(), sb.head_pos, 1))
    }

    /// Opens the log at `start` (its size is read from disk) and recovers it: see the
    /// [module documentation](super). The new incarnation is durable on return.
    pub fn open(backend: Arc<dyn BlockBackend>, start: u64) -> Result<(Self, RecoveryReport), LogError> {
        let slots = recovery::read_slots(&*backend, start)?;
        let (slot, sb) = recovery::choose(&*backend, start, &slots)?;
        Self::recover(backend, start, slot, sb)
    }

    /// `auto`: opens the log at `start` if there is one with a valid superblock (its size
    /// on disk wins over `size`), else creates one of `size` bytes. The report is `None`
    /// when a log was created. A log of a newer format version is an error, never
    /// overwritten.
    pub fn open_or_create(
        backend: Arc<dyn BlockBackend>,
        start: u64,
        size: u64,
    ) -> Result<(Self, Option<RecoveryReport>), LogError> {
        let slots = recovery::read_slots(&*backend, start)?;
        match recovery::choose(&*backend, start, &slots) {
            Ok((slot, sb)) => {
                if sb.region_size != size {
                    tracing::info!(device = %backend.describe(), start, on_disk = sb.region_size, requested = size,
                        "replication log size on disk differs from the table's; the size on disk wins");
                }
                let (log, report) = Self::recover(backend, start, slot, sb)?;
                Ok((log, Some(report)))
            }
            // Nothing there at all: a new log. A damaged one (a superblock with our magic
            // that does not check) is never overwritten by `auto`: that would throw away
            // acknowledged writes; `create` says so explicitly.
            Err(LogError::NoSuperblock {
                slot_a: SuperblockError::NoMagic, slot_b: SuperblockError::NoMagic, ..
            }) => {
                tracing::info!(device = %backend.describe(), start, "no replication log found, creating one");
                Ok((Self::create(backend, start, size)?, None))
            }
            Err(e) => Err(e),
        }
    }

    fn recover(
        backend: Arc<dyn BlockBackend>,
        start: u64,
        slot: usize,
        sb: Superblock,
    ) -> Result<(Self, RecoveryReport), LogError> {
        let walk = recovery::walk(&*backend, start, &sb)?;
        let mut entries = VecDeque::new();
        let mut last_set: Option<Arc<SlinkSet>> = None;
        for r in walk.entries() {
            let h = &r.header;
            let slinks = match &last_set {
                Some(s) if **s == h.slinks => s.clone(),
                _ => Arc::new(h.slinks),
            };
            last_set = Some(slinks.clone());
            entries.push_back(Live {
                seq: h.seq,
                epoch: h.epoch,
                offset: h.offset,
                pos: r.pos,
                dev_nr: h.dev_nr,
                len: h.len,
                data_crc: h.data_crc,
                kind: EntryKind::from_record(h.kind).expect("wraps filtered out"),
                slinks,
                origin_seq: h.origin(),
                origin_time_us: h.origin_time_us,
            });
        }
        let next_seq = walk.next_seq;
        let mut cursors: BTreeMap<u16, u64> = sb.cursors.iter().copied().collect();
        let mut slinks_ahead = Vec::new();
        for (&s, c) in cursors.iter_mut() {
            if *c >= next_seq {
                slinks_ahead.push((s, *c));
                *c = next_seq - 1;
            }
        }
        let next_epoch = sb.next_epoch.max(walk.last_epoch.map_or(0, |e| e + 1));
        let truncated = walk.truncated();
        let incarnation = sb.incarnation + 1;
        let mut persisted = sb.clone();
        persisted.incarnation = incarnation;
        persisted.fence_seq = next_seq;
        let log = Self::from_parts(backend, start, &persisted, next_epoch, cursors, entries, walk.tail_pos, next_seq);
        // The new incarnation (and fence) must be durable before anything is appended
        // with it. This sync also makes the recovered entries durable, if a process
        // crash left them in the page cache only.
        {
            let mut w = log.sb.lock();
            *w = SbWriter { next_slot: 1 - slot, generation: sb.generation };
            let m = log.meta.lock();
            let (head, cursors, site) = ((m.head_pos, m.head_seq), m.cursors.clone(), m.site_to_persist());
            drop(m);
            log.persist(&mut w, head, &cursors, next_epoch, site)?;
        }
        let stats = log.stats();
        let report = RecoveryReport {
            entries: stats.entries,
            first_seq: stats.head_seq,
            next_seq,
            bytes: walk.bytes,
            incarnation,
            truncated,
            slinks_ahead,
        };
        if let Some(t) = &report.truncated {
            tracing::warn!(device = %log.backend.describe(), start, "replication log tail truncated: {t}");
        }
        for (s, c) in &report.slinks_ahead {
            tracing::warn!(device = %log.backend.describe(), start, slink = s, cursor = c, next_seq,
                "SLINK applied entries the recovered log does not have; it needs a full resync");
        }
        Ok((log, report))
    }

    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        backend: Arc<dyn BlockBackend>,
        start: u64,
        sb: &Superblock,
        next_epoch: u64,
        cursors: BTreeMap<u16, u64>,
        entries: VecDeque<Live>,
        tail_pos: u64,
        next_seq: u64,
    ) -> Self {
        let mut meta = Meta {
            head_pos: sb.head_pos,
            head_seq: sb.head_seq,
            tail_pos,
            next_seq,
            next_epoch,
            origin_tail: entries.back().map_or(0, |e: &Live| e.origin_seq).max(sb.site.origin_floor),
            entries,
            cursors: BTreeMap::new(),
            pending: BTreeMap::new(),
            site: sb.site,
        };
        meta.install(cursors, (sb.head_pos, sb.head_seq));
        RingLog {
            backend,
            start,
            region_size: sb.region_size,
            ring_len: sb.ring_len,
            uuid: sb.uuid,
            incarnation: sb.incarnation,
            fence_seq: sb.fence_seq,
            append_lock: Mutex::new(()),
            sb: Mutex::new(SbWriter { next_slot: 1, generation: sb.generation }),
            meta: Mutex::new(meta),
            poisoned: Mutex::new(None),
        }
    }

    // -----------------------------------------------------------------------------------
    // Append

    /// Appends `batch` as one epoch: consecutive seqs, one gathered write per contiguous
    /// run of the ring (two when it wraps), one sync. Durable and visible on return.
    ///
    /// Errors, with nothing appended: [`LogError::Full`] when the batch does not fit even
    /// after freeing what the cursors allow (wait for the SLINKs, or take one out of
    /// ordered mode); [`LogError::TooLarge`] / [`LogError::BatchTooLarge`] when it never
    /// will; [`LogError::BadEntry`] for inconsistent entries; I/O errors. After an I/O
    /// error the batch's first record is overwritten with zeros (not synced): the batch
    /// may still survive a crash that comes before the next successful sync (an append,
    /// a superblock write, [`RingLog::sync`]), never one after it. Its seqs are reused.
    pub fn append(&self, batch: &[NewEntry<'_>]) -> Result<Vec<EntryMeta>, LogError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.max_entry_data();
        let mut sizes = Vec::with_capacity(batch.len());
        for (index, e) in batch.iter().enumerate() {
            let bad = |reason: String| LogError::BadEntry { index, reason };
            match e.kind {
                EntryKind::Write | EntryKind::Marker if e.data.len() != e.len as usize => {
                    return Err(bad(format!("{:?} of len {} with {} bytes of data", e.kind, e.len, e.data.len())));
                }
                EntryKind::Marker if e.len > MAX_MARKER_DATA => {
                    return Err(bad(format!("marker of {} bytes (at most {MAX_MARKER_DATA})", e.len)));
                }
                EntryKind::WriteZeroes | EntryKind::Discard if !e.data.is_empty() => {
                    return Err(bad(format!("{:?} carries {} bytes of data", e.kind, e.data.len())));
                }
                _ => {}
            }
            if e.offset.checked_add(e.len as u64).is_none() {
                return Err(bad(format!("range {}+{} overflows", e.offset, e.len)));
            }
            let data = if e.kind.has_data() { e.len as u64 } else { 0 };
            if data > max {
                return Err(LogError::TooLarge { index, len: data, max });
            }
            sizes.push(ENTRY_HEADER_SIZE as u64 + pad_to_record(data));
        }
        let needed: u64 = sizes.iter().sum();
        if needed > self.ring_len {
            return Err(LogError::BatchTooLarge { needed, ring_len: self.ring_len });
        }

        let _serial = self.append_lock.lock();
        self.check_poison()?;
        // Origins grow along the log: a received entry older than what the log holds is a
        // duplicate or a reordering, never appended.
        {
            let mut prev = self.meta.lock().origin_tail;
            for (index, e) in batch.iter().enumerate() {
                if let Some(o) = e.origin {
                    if o.seq <= prev {
                        return Err(LogError::BadEntry {
                            index,
                            reason: format!("origin seq {} is not after {prev}, the log's newest", o.seq),
                        });
                    }
                    prev = o.seq;
                }
            }
        }
        let now_us = now_us();
        let (placement, first_seq, epoch, tail_pos) = self.reserve(&sizes, needed)?;
        // The group's history seq of each entry: a received entry's is its origin's; an
        // application write's goes on from the newest the log holds (at a site promoted to
        // primary, from what it had received).
        let origin_base = self.meta.lock().origin_tail;
        let origins: Vec<Origin> = batch
            .iter()
            .enumerate()
            .map(|(i, e)| e.origin.unwrap_or(Origin { seq: origin_base + 1 + i as u64, time_us: now_us }))
            .collect();

        // Headers (the data crc is the only pass over the data).
        let data_crcs: Vec<u32> =
            batch.iter().map(|e| if e.kind.has_data() { crc32c::crc32c(e.data) } else { 0 }).collect();
        let headers: Vec<[u8; ENTRY_HEADER_SIZE]> = batch
            .iter()
            .enumerate()
            .map(|(i, e)| {
                self.header(e, first_seq + i as u64, epoch, data_crcs[i], i + 1 == batch.len(), origins[i]).encode()
            })
            .collect();
        let wrap_header = placement.wrap.map(|(_, i)| {
            EntryHeader {
                kind: RecordKind::Wrap,
                flags: 0,
                data_crc: 0,
                uuid: self.uuid,
                seq: first_seq + i as u64,
                epoch,
                incarnation: self.incarnation,
                offset: 0,
                dev_nr: 0,
                len: 0,
                slinks: SlinkSet::new(),
                origin_seq: 0,
                origin_time_us: 0,
            }
            .encode()
        });

        // One run from the tail, a second from the ring start when the batch wraps.
        let split = placement.second_run.unwrap_or(batch.len());
        let mut runs: [Vec<IoSlice<'_>>; 2] = [Vec::new(), Vec::new()];
        for (i, e) in batch.iter().enumerate() {
            if let (Some((_, wi)), Some(w)) = (placement.wrap, &wrap_header) {
                if wi == i {
                    runs[0].push(IoSlice::new(w));
                }
            }
            let run = &mut runs[usize::from(i >= split)];
            run.push(IoSlice::new(&headers[i]));
            if e.kind.has_data() && !e.data.is_empty() {
                run.push(IoSlice::new(e.data));
                let pad = (pad_to_record(e.data.len() as u64) - e.data.len() as u64) as usize;
                if pad > 0 {
                    run.push(IoSlice::new(&ZEROS[..pad]));
                }
            }
        }

        let io = (|| {
            let base = self.start + RING_OFFSET;
            for (run, at) in runs.iter().zip([tail_pos, 0]) {
                if !run.is_empty() {
                    self.backend
                        .write_vectored_at(run, base + at)
                        .map_err(|e| io_err("writing log entries", &*self.backend, base + at, e))?;
                }
            }
            self.backend.sync().map_err(|e| io_err("syncing log entries", &*self.backend, base + tail_pos, e))
        })();
        if let Err(e) = io {
            self.scrub_failed_append(tail_pos);
            return Err(e);
        }

        // Publish.
        let mut m = self.meta.lock();
        let mut out = Vec::with_capacity(batch.len());
        let mut last_set: Option<Arc<SlinkSet>> = m.entries.back().map(|l| l.slinks.clone());
        for (i, e) in batch.iter().enumerate() {
            let slinks = match &last_set {
                Some(s) if **s == e.slinks => s.clone(),
                _ => Arc::new(e.slinks),
            };
            last_set = Some(slinks.clone());
            let live = Live {
                seq: first_seq + i as u64,
                epoch,
                offset: e.offset,
                pos: placement.positions[i],
                dev_nr: e.dev_nr,
                len: e.len,
                data_crc: data_crcs[i],
                kind: e.kind,
                slinks,
                origin_seq: origins[i].seq,
                origin_time_us: origins[i].time_us,
            };
            m.origin_tail = live.origin_seq;
            let Meta { pending, cursors, .. } = &mut *m;
            for (s, p) in pending.iter_mut() {
                if e.slinks.contains(*s) && cursors.get(s).is_some_and(|&c| c < live.seq) {
                    p.0 += 1;
                    p.1 += e.len as u64;
                }
            }
            out.push(live.to_meta());
            m.entries.push_back(live);
        }
        m.tail_pos = placement.new_tail;
        m.next_seq = first_seq + batch.len() as u64;
        Ok(out)
    }

    fn header(&self, e: &NewEntry<'_>, seq: u64, epoch: u64, data_crc: u32, last: bool, origin: Origin) -> EntryHeader {
        EntryHeader {
            kind: e.kind.record_kind(),
            flags: if last { FLAG_EPOCH_END } else { 0 },
            data_crc,
            uuid: self.uuid,
            seq,
            epoch,
            incarnation: self.incarnation,
            offset: e.offset,
            dev_nr: e.dev_nr,
            len: e.len,
            slinks: e.slinks,
            origin_seq: origin.seq,
            origin_time_us: origin.time_us,
        }
    }

    /// Finds room for records of `sizes` at the tail, freeing space if the cursors allow
    /// (durable head first), or moving an empty log's head to the ring start. Returns the
    /// placement, the first seq, the epoch and the tail it starts at. The caller holds the
    /// append lock, so the tail cannot move; the head only moves forward meanwhile, which
    /// keeps the placement valid.
    fn reserve(&self, sizes: &[u64], needed: u64) -> Result<(space::Placement, u64, u64, u64), LogError> {
        let mut tried_advance = false;
        loop {
            {
                let mut m = self.meta.lock();
                let st = m.ring_state(self.ring_len);
                if let Some(p) = space::place(&st, sizes) {
                    let epoch = m.next_epoch;
                    m.next_epoch += 1;
                    return Ok((p, m.next_seq, epoch, m.tail_pos));
                }
                if tried_advance {
                    // Head advanced as far as it can. An empty log whose head is not at
                    // the ring start may still fit the batch in one piece from there.
                    if !(st.empty && st.head_pos != 0) {
                        return Err(LogError::Full { needed, free: st.free() });
                    }
                }
            }
            if !tried_advance {
                tried_advance = true;
                self.commit_cursors(|m| Ok(m.cursors.clone()))?;
            } else {
                self.rebase_empty()?;
            }
        }
    }

    /// Moves the head (and tail) of an empty log to the ring start, durably.
    fn rebase_empty(&self) -> Result<(), LogError> {
        let mut w = self.sb.lock();
        self.check_poison()?;
        let (seq, cursors, next_epoch, site) = {
            let m = self.meta.lock();
            if !m.entries.is_empty() || m.head_pos == 0 {
                return Ok(());
            }
            (m.head_seq, m.cursors.clone(), m.next_epoch, m.site_to_persist())
        };
        self.persist(&mut w, (0, seq), &cursors, next_epoch, site)?;
        let mut m = self.meta.lock();
        m.head_pos = 0;
        m.tail_pos = 0;
        Ok(())
    }

    /// After a failed append: zero the first record slot of the batch, so that no later
    /// sync can make a batch that was reported as failed valid. If even that fails, the
    /// log refuses to sync anything until it is reopened (recovery sorts it out).
    fn scrub_failed_append(&self, tail_pos: u64) {
        let at = self.start + RING_OFFSET + tail_pos;
        if let Err(e) = self.backend.write_at(&ZEROS, at) {
            let reason = format!("could not invalidate a failed append at byte {at}: {e}");
            tracing::error!(device = %self.backend.describe(), "{reason}");
            *self.poisoned.lock() = Some(reason);
        }
    }

    fn check_poison(&self) -> Result<(), LogError> {
        match &*self.poisoned.lock() {
            Some(reason) => Err(LogError::Poisoned { device: self.backend.describe(), reason: reason.clone() }),
            None => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------
    // Reading

    /// Reads the data of write (or marker) entry `e` into `buf` (exactly `e.len` bytes)
    /// and checks its crc. For write-zeroes and discard entries `buf` must be empty. Fails with
    /// [`LogError::NotLive`] if the head has passed the entry.
    pub fn read_data(&self, e: &EntryMeta, buf: &mut [u8]) -> Result<(), LogError> {
        let want = if e.kind.has_data() { e.len as usize } else { 0 };
        if buf.len() != want {
            return Err(LogError::BufferSize { seq: e.seq, got: buf.len(), want });
        }
        self.check_live(e)?;
        if want == 0 {
            return Ok(());
        }
        let at = self.start + RING_OFFSET + e.pos + ENTRY_HEADER_SIZE as u64;
        self.backend.read_at(buf, at).map_err(|err| io_err("reading log entry data", &*self.backend, at, err))?;
        // The space could have been reused while reading if the entry was freed.
        self.check_live(e)?;
        let computed = crc32c::crc32c(buf);
        if computed != e.data_crc {
            return Err(LogError::DataCrc { seq: e.seq, pos: e.pos, stored: e.data_crc, computed });
        }
        Ok(())
    }

    fn check_live(&self, e: &EntryMeta) -> Result<(), LogError> {
        let m = self.meta.lock();
        match m.index_of(e.seq).map(|i| &m.entries[i]) {
            Some(l) if l.pos == e.pos => Ok(()),
            _ => Err(LogError::NotLive { seq: e.seq, head_seq: m.head_seq }),
        }
    }

    /// Up to `max` live entries with seq >= `seq`, in order.
    pub fn entries_from(&self, seq: u64, max: usize) -> Vec<EntryMeta> {
        let m = self.meta.lock();
        let Some(front) = m.entries.front().map(|e| e.seq) else { return Vec::new() };
        let skip = (seq.saturating_sub(front) as usize).min(m.entries.len());
        m.entries.range(skip..).take(max).map(Live::to_meta).collect()
    }

    // -----------------------------------------------------------------------------------
    // Cursors

    /// Registers `slink` with cursor = the last seq: it needs nothing already in the log.
    /// Durable on return. Registering a registered SLINK changes nothing (its cursor is
    /// kept), so a replicator may register every SLINK of its table after each open.
    pub fn register_slink(&self, slink: u16) -> Result<(), LogError> {
        if slink as usize >= MAX_SLINKS {
            return Err(LogError::SlinkOutOfRange(slink));
        }
        self.commit_cursors(|m| {
            let mut c = m.cursors.clone();
            if !c.contains_key(&slink) {
                if c.len() >= MAX_CURSORS {
                    return Err(LogError::TooManySlinks { slink, max: MAX_CURSORS });
                }
                c.insert(slink, m.next_seq - 1);
            }
            Ok(c)
        })
    }

    /// Moves every registered cursor to the last seq: no SLINK needs anything the log
    /// holds (a site discarding its history, see `rebase_origin`). Durable on return.
    pub fn cursors_to_tail(&self) -> Result<(), LogError> {
        self.commit_cursors(|m| Ok(m.cursors.keys().map(|k| (*k, m.next_seq - 1)).collect()))
    }

    /// Forgets `slink`: entries stop waiting for it (the head may advance). Durable on
    /// return. Unregistering an unknown SLINK changes nothing.
    pub fn unregister_slink(&self, slink: u16) -> Result<(), LogError> {
        self.commit_cursors(|m| {
            let mut c = m.cursors.clone();
            c.remove(&slink);
            Ok(c)
        })
    }

    /// The cursor of `slink` (highest seq it has durably applied), if registered.
    pub fn cursor(&self, slink: u16) -> Option<u64> {
        self.meta.lock().cursors.get(&slink).copied()
    }

    /// Sets cursors: `(slink, seq)` means the SLINK has durably applied every entry up to
    /// `seq`. The caller must have made the SLINK's copies durable first. Writes one
    /// superblock (write + sync) holding all cursors and the head advanced past every
    /// entry now done; returns when it is durable. Cursors never go backwards; a cursor
    /// may pass entries that do not name the SLINK. Batch updates: each call costs a sync.
    pub fn set_cursors(&self, updates: &[(u16, u64)]) -> Result<(), LogError> {
        self.commit_cursors(|m| {
            let mut c = m.cursors.clone();
            for &(slink, seq) in updates {
                let current = *c.get(&slink).ok_or(LogError::UnknownSlink(slink))?;
                if seq < current {
                    return Err(LogError::CursorBackwards { slink, seq, current });
                }
                if seq >= m.next_seq {
                    return Err(LogError::CursorBeyondTail { slink, seq, last: m.next_seq - 1 });
                }
                c.insert(slink, seq);
            }
            Ok(c)
        })
    }

    /// Under the superblock lock: `plan` computes the new cursors from the current state;
    /// the head is advanced past what they make done; if anything changed, the superblock
    /// is written and synced, and only then the new state installed (so freed space is
    /// reused only once the head that freed it is durable).
    fn commit_cursors(&self, plan: impl FnOnce(&Meta) -> Result<BTreeMap<u16, u64>, LogError>) -> Result<(), LogError> {
        let mut w = self.sb.lock();
        let (cursors, head, next_epoch, site) = {
            let m = self.meta.lock();
            let cursors = plan(&m)?;
            let head = m.compute_head(&cursors);
            if cursors == m.cursors && head == (m.head_pos, m.head_seq) {
                return Ok(());
            }
            (cursors, head, m.next_epoch, m.site_to_persist())
        };
        self.check_poison()?;
        self.persist(&mut w, head, &cursors, next_epoch, site)?;
        self.meta.lock().install(cursors, head);
        Ok(())
    }

    /// Writes and syncs a superblock into the slot not holding the newest acknowledged
    /// one. Caller holds the superblock lock.
    fn persist(
        &self,
        w: &mut SbWriter,
        head: (u64, u64),
        cursors: &BTreeMap<u16, u64>,
        next_epoch: u64,
        site: SiteState,
    ) -> Result<(), LogError> {
        w.generation += 1;
        let sb = Superblock {
            uuid: self.uuid,
            region_size: self.region_size,
            ring_offset: RING_OFFSET,
            ring_len: self.ring_len,
            generation: w.generation,
            incarnation: self.incarnation,
            fence_seq: self.fence_seq,
            head_pos: head.0,
            head_seq: head.1,
            next_epoch,
            cursors: cursors.iter().map(|(&s, &c)| (s, c)).collect(),
            site,
        };
        let at = self.start + (w.next_slot * SB_SLOT_SIZE) as u64;
        let b = &*self.backend;
        b.write_at(&sb.encode(), at).map_err(|e| io_err("writing the log superblock", b, at, e))?;
        b.sync().map_err(|e| io_err("syncing the log superblock", b, at, e))?;
        w.next_slot = 1 - w.next_slot;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Status

    pub fn stats(&self) -> LogStats {
        let m = self.meta.lock();
        let st = m.ring_state(self.ring_len);
        LogStats {
            size: self.region_size,
            ring_len: self.ring_len,
            used_bytes: st.used(),
            free_bytes: st.free(),
            entries: m.entries.len() as u64,
            head_seq: m.head_seq,
            next_seq: m.next_seq,
            next_epoch: m.next_epoch,
            incarnation: self.incarnation,
            uuid: uuid::Uuid::from_bytes(self.uuid).to_string(),
            slinks: m.cursors.keys().filter_map(|&s| m.slink_stats(s)).collect(),
        }
    }

    /// Cursor and backlog of one SLINK (cheap: kept up to date incrementally).
    pub fn slink_stats(&self, slink: u16) -> Option<SlinkStats> {
        self.meta.lock().slink_stats(slink)
    }

    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// The site's role and group as persisted (origin floor: see [`RingLog::received`]).
    pub fn site(&self) -> SiteState {
        self.meta.lock().site
    }

    /// The highest origin seq durable in this log: at a secondary, what it has received.
    pub fn received(&self) -> u64 {
        self.meta.lock().origin_tail
    }

    /// Changes the site's role or group and makes it durable (one superblock write).
    pub fn set_site(&self, change: impl FnOnce(&mut SiteState)) -> Result<(), LogError> {
        let mut w = self.sb.lock();
        let (head, cursors, next_epoch, site) = {
            let m = self.meta.lock();
            let mut site = m.site;
            change(&mut site);
            ((m.head_pos, m.head_seq), m.cursors.clone(), m.next_epoch, site)
        };
        self.check_poison()?;
        let mut persisted = site;
        persisted.origin_floor = self.meta.lock().origin_tail;
        self.persist(&mut w, head, &cursors, next_epoch, persisted)?;
        self.meta.lock().site = site;
        Ok(())
    }

    /// Sets what a secondary log has received (the primary's seq it resumes after, e.g.
    /// once a resync made its devices equal to the primary at that seq; every entry the
    /// log holds is older). Refused if the seq goes backwards. Durable on return; on an
    /// error nothing changes.
    pub fn set_received(&self, origin_seq: u64) -> Result<(), LogError> {
        let _serial = self.append_lock.lock();
        let before = {
            let mut m = self.meta.lock();
            if origin_seq < m.origin_tail {
                return Err(LogError::BadEntry {
                    index: 0,
                    reason: format!("received seq {origin_seq} is before what the log has ({})", m.origin_tail),
                });
            }
            std::mem::replace(&mut m.origin_tail, origin_seq)
        };
        let r = self.set_site(|_| {});
        if r.is_err() {
            // Not durable: what is received stays what it was.
            self.meta.lock().origin_tail = before;
        }
        r
    }

    /// Start the log's history over at `origin_seq`: a site whose entries past it are
    /// another history (a failed-back old primary, a discarded split brain) follows the
    /// new primary from there. Only when the log holds no entries (every SLINK's cursor
    /// at the tail, see `Group::discard_history`). Durable on return.
    pub fn rebase_origin(&self, origin_seq: u64) -> Result<(), LogError> {
        let _serial = self.append_lock.lock();
        let before = {
            let mut m = self.meta.lock();
            if !m.entries.is_empty() {
                return Err(LogError::BadEntry {
                    index: 0,
                    reason: format!("the log still holds {} entries: its history cannot start over", m.entries.len()),
                });
            }
            std::mem::replace(&mut m.origin_tail, origin_seq)
        };
        let r = self.set_site(|_| {});
        if r.is_err() {
            self.meta.lock().origin_tail = before;
        }
        r
    }

    /// The largest data of a single entry that can ever fit: the ring minus one header
    /// (an entry never spans the ring end; an empty log moves its head to the ring start
    /// to make room for one this large). Also bounded by the u32 length field.
    pub fn max_entry_data(&self) -> u64 {
        (self.ring_len - ENTRY_HEADER_SIZE as u64).min(u32::MAX as u64 & !(RECORD_ALIGN - 1))
    }

    /// Syncs the back-end. Appends and cursor updates are durable already when they
    /// return; this is for callers that want a barrier.
    pub fn sync(&self) -> Result<(), LogError> {
        self.check_poison()?;
        self.backend.sync().map_err(|e| io_err("syncing the log", &*self.backend, self.start, e))
    }

    /// The back-end and region start (for messages).
    pub fn location(&self) -> (String, u64) {
        (self.backend.describe(), self.start)
    }
}

/// A random generation nonce (never 0, which marks lineages from before nonces).
pub fn rand_nonce() -> u64 {
    let u = uuid::Uuid::new_v4();
    u64::from_le_bytes(u.as_bytes()[..8].try_into().expect("8 bytes")).max(1)
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Meta {
    /// The site state as a superblock written now records it.
    fn site_to_persist(&self) -> SiteState {
        SiteState { origin_floor: self.origin_tail, ..self.site }
    }
}

/// Chunk written at a time when pre-writing a new log's ring.
const PREALLOC_CHUNK: usize = 1 << 20;

/// Writes zeros over `[at, at+len)` so the file system allocates it now, not on the
/// I/O path. Logs progress for large logs.
fn preallocate(b: &dyn BlockBackend, at: u64, len: u64) -> Result<(), LogError> {
    let zeros = vec![0u8; PREALLOC_CHUNK];
    let mut done = 0u64;
    let mut next_report = 1u64 << 30;
    while done < len {
        let n = (len - done).min(PREALLOC_CHUNK as u64) as usize;
        b.write_at(&zeros[..n], at + done).map_err(|e| io_err("pre-writing the new log", b, at + done, e))?;
        done += n as u64;
        if done >= next_report {
            tracing::info!(device = %b.describe(), done_mib = done >> 20, total_mib = len >> 20, "pre-writing replication log");
            next_report += 1 << 30;
        }
    }
    Ok(())
}
