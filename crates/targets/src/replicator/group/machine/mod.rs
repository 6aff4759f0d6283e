//! The group's state machine: the one place where group state changes and requests
//! complete (DESIGN section 6).
//!
//! Shape (crucible's upstairs): threads only wait and do I/O. A thread that is free
//! hands the machine an event ("the appender is ready", "these entries were applied",
//! "this region was copied", an operator's command); the machine changes its state and
//! answers with [`Effects`]: replies to send, and at most one piece of I/O for that
//! thread to do next ([`Io`]). The result of the I/O comes back as the next event. Unit
//! tests drive [`Machine::apply`] and [`Machine::control`] directly, without threads,
//! sockets or timers (time is an argument).
//!
//! Per SLINK the machine keeps two positions: `shipped` (the last entry handed to the
//! site) and `durable` (the last entry the site made durable). A local site applies
//! synchronously, so both move together; a network site acknowledges durability later,
//! with several epochs in flight.
//!
//! Rules kept here, each once:
//! - a write is acknowledged when its entries are durable in the log, every dirty-log mark
//!   it caused is durable, and every SLINK that made it wait (in ordered mode, throttling,
//!   synchronous or forced) has it durable (DESIGN invariant 1);
//! - an SLINK leaves ordered mode only when it holds the log's oldest entries and leaving
//!   frees the space needed (invariant 5); SLINK 0 never does;
//! - which SLINKs need an entry, and which mark dirty regions instead, is decided when the
//!   append's result arrives, from the state at that moment (a decision from before the
//!   unlocked append is not trusted);
//! - an SLINK returns to (or joins) ordered mode only with a dirty log and a device for
//!   every device of the group, and nothing dirty.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dmrep_core::{Completion, Op, Request};
use rustix::io::Errno;
use tracing::{info, warn};

use super::error::{errno, DevNr, GroupError, Seq, SlinkNr};
use super::{
    Chunk, SlinkSetup, Stats, CACHE_BUDGET, MAX_APPLY_ENTRIES, MAX_BATCH_BYTES, MAX_BATCH_ENTRIES,
    MAX_MULTI_EPOCH_BYTES,
};
use super::{MAX_ENTRY_DATA, PROBE_MAX, PROBE_MIN};
use crate::replicator::dirty::{region_span, DirtyLog};
use crate::replicator::fallbehind::{self, InForce, Lag, Policy, Thresholds};
use crate::replicator::log::{EntryKind, EntryMeta, LogError, NewEntry, Origin, RingLog, SlinkSet};
use crate::replicator::overlay::Overlay;
use crate::replicator::slink::SlinkHandler;
use dmrep_formats::replog::{pad_to_record, ENTRY_HEADER_SIZE, MAX_MARKER_DATA};

mod commands;
mod copy;
mod ordered;
mod roles;
mod slink;
mod writes;

use dmrep_core::events::{self, Action};

/// An event about SLINK `nr` of group `group` (see `dmrep_core::events`).
fn slink_event(group: &str, nr: SlinkNr, fields: &[(&str, String)]) {
    let mut f = vec![("group", group.to_string()), ("slink", nr.to_string())];
    f.extend(fields.iter().cloned());
    events::emit(Action::Change, "slink", &f);
}

/// An event about group `group` (`object`: `group` or `site`).
fn group_event(object: &'static str, group: &str, fields: &[(&str, String)]) {
    let mut f = vec![("group", group.to_string())];
    f.extend(fields.iter().cloned());
    events::emit(Action::Change, object, &f);
}

pub(crate) use slink::{ResyncState, SlinkRt};

/// A request to answer, and how.
pub(crate) type Reply = (Request, Completion, io::Result<()>);

/// A write waiting to be appended (or partly appended: big writes go in slices).
pub(crate) struct Pending {
    dev_nr: DevNr,
    req: Request,
    done: Completion,
    data: Option<Arc<Vec<u8>>>,
    /// Bytes already appended.
    appended: u64,
    /// A write received from the primary (at a secondary): its place in the primary's
    /// history. One entry: the primary's entries are never larger than ours.
    origin: Option<Origin>,
    /// A marker (see [`crate::replicator::marker`]): one entry of kind `Marker`, its
    /// description in `req.buf`; on completion `req.offset` is its seq in the log.
    marker: bool,
}

/// A write whose entries are in the log, waiting for SLINKs (and dirty-log flushes).
struct Waiting {
    dev_nr: DevNr,
    req: Request,
    done: Completion,
    /// Seq of its last entry.
    seq: Seq,
    wait: BTreeSet<SlinkNr>,
}

/// One slice of a pending write planned into a batch.
pub(crate) struct Slice {
    /// Index into the batch's pendings.
    p: usize,
    start: u64,
    len: u64,
}

/// A group commit handed to the appender.
pub(crate) struct Batch {
    pendings: Vec<Pending>,
    slices: Vec<Slice>,
    /// The SLINKs the entries name (those in ordered mode when planned).
    slinks: SlinkSet,
    /// Each SLINK's ordered-mode era when planned.
    eras: BTreeMap<SlinkNr, u64>,
}

impl Batch {
    /// Writes in the batch.
    pub(crate) fn writes(&self) -> usize {
        self.pendings.len()
    }

    /// The entries to append.
    pub(crate) fn entries(&self) -> Vec<NewEntry<'_>> {
        self.slices
            .iter()
            .map(|s| {
                let p = &self.pendings[s.p];
                let kind = if p.marker { EntryKind::Marker } else { entry_kind(p.req.op) };
                let data: &[u8] = match kind {
                    EntryKind::Write | EntryKind::Marker => {
                        &p.data.as_ref().expect("planned")[s.start as usize..(s.start + s.len) as usize]
                    }
                    _ => &[],
                };
                NewEntry {
                    dev_nr: p.dev_nr,
                    offset: if p.marker { 0 } else { p.req.offset + s.start },
                    kind,
                    len: s.len as u32,
                    data,
                    slinks: self.slinks,
                    origin: p.origin,
                }
            })
            .collect()
    }
}

fn entry_kind(op: Op) -> EntryKind {
    match op {
        Op::Write { .. } => EntryKind::Write,
        Op::WriteZeroes { .. } => EntryKind::WriteZeroes,
        _ => EntryKind::Discard,
    }
}

/// Ring bytes an entry of `data` bytes takes: its header plus its padded data.
fn footprint(data: u64) -> u64 {
    ENTRY_HEADER_SIZE as u64 + pad_to_record(data)
}

/// Entries an SLINK is to apply: one epoch (or a slice of one), in log order.
pub(crate) struct ApplyWork {
    pub slink: SlinkNr,
    pub era: u64,
    /// Entries to apply, with their cached data if any (the others are read back).
    pub entries: Vec<(EntryMeta, Option<Chunk>)>,
    /// Seq of the last entry covered (entries of removed devices are skipped).
    pub last: Seq,
}

/// A dirty region to copy LD -> RD.
pub(crate) struct ResyncWork {
    pub slink: SlinkNr,
    pub era: u64,
    pub dev: DevNr,
    pub region: u64,
    pub offset: u64,
    pub len: u64,
    pub rate_limit: Option<u64>,
}

/// I/O for the thread that asked.
pub(crate) enum Io {
    /// Appender: append the batch, then [`Event::Appended`].
    Append(Box<Batch>),
    /// Appender: flush these dirty logs, then [`Event::DirtyFlushed`].
    FlushDirty(Vec<Arc<dyn DirtyLog>>),
    /// Flush the SLINK's dirty logs, unregister it from the log, then [`Event::Left`].
    Leave { slink: SlinkNr, logs: Vec<Arc<dyn DirtyLog>> },
    /// Appender: register the SLINK in the log (ordered again), then [`Event::Reordered`].
    Reorder { slink: SlinkNr },
    /// Copier: apply (ship), then [`Event::Applied`] (or [`Event::LogReadFailed`]).
    Apply(ApplyWork),
    /// Copier: wait for the site to acknowledge what is in flight, then
    /// [`Event::Applied`] (a pipelining SLINK with nothing more to ship).
    Collect { slink: SlinkNr, era: u64, last: Seq },
    /// Copier: copy the region, then [`Event::Resynced`].
    Resync(ResyncWork),
    /// Copier: probe the site, then [`Event::Probed`].
    Probe { slink: SlinkNr },
}

/// What happened.
pub(crate) enum Event {
    /// A client's write (write, write-zeroes or discard) of device `dev_nr`.
    Submit {
        dev_nr: DevNr,
        req: Request,
        done: Completion,
        /// `Some` for an entry received from the primary (a secondary's receiver).
        origin: Option<Origin>,
    },
    /// A marker to append after everything queued before it (see
    /// [`crate::replicator::marker`]); `done` completes once it is durable in the log
    /// (and at the synchronous SLINKs), with its log seq in the request's `offset`.
    Mark {
        description: Vec<u8>,
        done: Completion,
        /// `Some` for a marker received from the primary.
        origin: Option<Origin>,
    },
    /// The appender is free.
    AppenderReady,
    Appended {
        batch: Box<Batch>,
        took: Duration,
        result: Result<Vec<EntryMeta>, LogError>,
    },
    DirtyFlushed {
        result: io::Result<()>,
    },
    Left {
        slink: SlinkNr,
        result: Result<(), GroupError>,
    },
    /// The site could not be told it rejoins ordered mode: it is down; rejoining is
    /// tried again once it answers.
    RejoinFailed {
        slink: SlinkNr,
        error: io::Error,
    },
    Reordered {
        slink: SlinkNr,
        result: Result<(), LogError>,
    },
    /// SLINK `slink`'s copier is free.
    CopierReady {
        slink: SlinkNr,
    },
    /// Entries up to `last` were shipped; `Ok(d)`: everything up to `d` is durable there.
    Applied {
        slink: SlinkNr,
        era: u64,
        last: Seq,
        took: Duration,
        result: io::Result<Seq>,
    },
    LogReadFailed {
        slink: SlinkNr,
        seq: Seq,
        error: LogError,
    },
    Resynced {
        work: ResyncWork,
        result: io::Result<()>,
    },
    Probed {
        slink: SlinkNr,
        result: io::Result<()>,
    },
    /// Persisting cursors failed.
    CursorsFailed {
        error: LogError,
    },
    /// Time spent persisting cursors, for the SLINKs' statistics.
    CursorsPersisted {
        slinks: Vec<SlinkNr>,
        took: Duration,
    },
}

/// Operators' and tables' commands.
pub(crate) enum Control {
    AddSlink(SlinkSetup, Vec<(DevNr, Arc<dyn DirtyLog>, u64, bool)>),
    SetPolicy {
        slink: SlinkNr,
        policy: Policy,
        thresholds: Option<Thresholds>,
    },
    /// Set the thresholds given (`Some`), keep the others; `clear`: drop all first.
    SetThresholds {
        slink: SlinkNr,
        update: Thresholds,
        clear: bool,
    },
    Pause {
        slink: SlinkNr,
        paused: bool,
    },
    Shipping(bool),
    Statistics(String),
    /// Take an SLINK out of the group (a reload left it out): its copier stops, writes
    /// stop waiting for it, its dirty logs and devices are let go.
    RemoveSlink(SlinkNr),
    /// Hold (true) or release (false) the group's writes: the control device is
    /// suspended or resumed.
    Freeze(bool),
    /// Copy every region of the SLINK's devices again (DRBD's invalidate-remote).
    Invalidate(SlinkNr),
    /// The site's role changed (durable already): `true` for a secondary.
    SetRole(bool),
    /// Refuse application writes: a newer generation exists.
    Fence(String),
    /// The SLINK's site was heard from: if down, probe it now.
    ProbeNow(SlinkNr),
    /// A split brain was found (`Some`) or resolved (`None`).
    SplitBrain(Option<String>),
    /// A standby SLINK's site has everything through this local seq.
    StandbyAcked {
        slink: SlinkNr,
        through: Seq,
    },
    /// The site of an SLINK needs a resync (see [`Machine::site_resync`]).
    SiteResync {
        slink: SlinkNr,
        after: u64,
        regions: Vec<dmrep_formats::site::Region>,
        full: bool,
        why: String,
    },
    ResyncRate {
        slink: SlinkNr,
        rate: u64,
    },
    /// Attach the dirty log of a device on an SLINK; `initial_dirty`: every region dirty.
    AttachDirty {
        slink: SlinkNr,
        dev: DevNr,
        log: Arc<dyn DirtyLog>,
        dev_bytes: u64,
        initial_dirty: bool,
    },
    /// A replicator-dev went away.
    RemoveDevice(DevNr),
    /// Fail the writes of a device that the group holds (its device is going away).
    CancelDevice(DevNr),
    Shutdown,
}

/// What the caller does after the state changed (outside the lock).
#[must_use]
#[derive(Default)]
pub(crate) struct Effects {
    pub replies: Vec<Reply>,
    pub io: Option<Io>,
    /// The copier persists this cursor (its SLINK applied through it).
    pub cursor: Option<Seq>,
    /// Dirty logs to flush (clears after a resync: not urgent, never under the lock).
    pub flush: Vec<Arc<dyn DirtyLog>>,
    pub wake_appender: bool,
    pub wake_copiers: bool,
}

impl Effects {
    fn io(io: Io) -> Self {
        Effects { io: Some(io), ..Default::default() }
    }
    fn ok(&mut self, req: Request, done: Completion) {
        self.replies.push((req, done, Ok(())));
    }
    fn fail(&mut self, req: Request, done: Completion, e: Errno) {
        self.replies.push((req, done, Err(errno(e))));
    }
}

pub(crate) struct Machine {
    pub name: String,
    log: Arc<RingLog>,
    queue: VecDeque<Pending>,
    /// Writes appended, waiting for SLINKs, by the seq of their last entry.
    awaiting: BTreeMap<Seq, Waiting>,
    /// Writes appended whose dirty-log marks are being flushed.
    unflushed: Vec<Waiting>,
    pub slinks: BTreeMap<SlinkNr, SlinkRt>,
    pub overlay: Overlay,
    pub cache: BTreeMap<Seq, Chunk>,
    cache_bytes: u64,
    pub shutdown: bool,
    /// `stop`/`start` messages: shipping paused for every SLINK but 0.
    pub shipping: bool,
    pub stats: Stats,
    pub log_error: Option<Arc<GroupError>>,
    /// Dirty logs by (slink, dev_nr), with the device's size in bytes.
    pub dirty: BTreeMap<(SlinkNr, DevNr), (Arc<dyn DirtyLog>, u64)>,
    /// Regions written since the resync of that region started: (slink, dev_nr, region).
    touched: BTreeSet<(SlinkNr, DevNr, u64)>,
    /// Regions the resync is copying now: (slink, dev_nr, region).
    in_copy: BTreeSet<(SlinkNr, DevNr, u64)>,
    /// (slink, dev) that missed writes with no dirty log to record them: the device's
    /// dirty log starts all dirty when it is attached.
    missed: BTreeSet<(SlinkNr, DevNr)>,
    /// Devices removed from the group: SLINKs other than 0 skip their entries.
    removed: BTreeSet<DevNr>,
    /// LDs to detach from SLINK 0 once it applied through the seq (device removed).
    detach_ld: BTreeMap<DevNr, Seq>,
    /// The log was full and no SLINK could leave, at this time: the appender waits for
    /// copiers (tries again after progress, or a tick).
    log_full: Option<Instant>,
    /// The control device is suspended: no new batch is appended (writes of every device
    /// of the group wait in the queue), a point where the log holds whole writes only.
    pub frozen: bool,
    /// The site is a secondary (its log's role, read once: role changes go through
    /// [`Group::set_site`](super::Group::set_site), which updates it): writes come only
    /// from its primary's stream. Kept here so a write does not read the log's state.
    pub secondary: bool,
    /// A newer generation of the group exists (why): application writes are refused.
    pub fenced: Option<String>,
    /// Another site accepted writes as primary from the same parent generation (what was
    /// found): reported in status until resolved.
    pub split_brain: Option<String>,
    /// While an online verify runs: the regions (of `verify::VERIFY_REGION` bytes)
    /// application writes touched (see `group::verify`).
    pub verify_watch: Option<BTreeSet<(DevNr, u64)>>,
    /// A batch is with the appender (or its dirty-log flush is): not yet settled.
    pub appending: bool,
    /// Ring length, and the most bytes one batch may take of it.
    ring_len: u64,
    batch_bytes: u64,
}

impl Machine {
    /// A machine over an opened log. `lost`: recovery cut entries some site had applied,
    /// so every RD needs a full resync (their SLINKs start out of ordered mode).
    pub(crate) fn new(
        name: &str,
        log: Arc<RingLog>,
        fresh: bool,
        lost: bool,
        slinks: Vec<SlinkSetup>,
        now: Instant,
    ) -> Result<Machine, GroupError> {
        let ring_len = log.stats().ring_len;
        let mut m = Machine {
            name: name.to_string(),
            log: log.clone(),
            queue: VecDeque::new(),
            awaiting: BTreeMap::new(),
            unflushed: Vec::new(),
            slinks: BTreeMap::new(),
            overlay: Overlay::default(),
            cache: BTreeMap::new(),
            cache_bytes: 0,
            shutdown: false,
            shipping: true,
            stats: Stats::default(),
            log_error: None,
            dirty: BTreeMap::new(),
            touched: BTreeSet::new(),
            in_copy: BTreeSet::new(),
            missed: BTreeSet::new(),
            removed: BTreeSet::new(),
            detach_ld: BTreeMap::new(),
            log_full: None,
            frozen: false,
            secondary: log.site().role == dmrep_formats::replog::SiteRole::Secondary,
            fenced: None,
            split_brain: None,
            verify_watch: None,
            appending: false,
            ring_len,
            // A batch must fit in the ring with room to spare, however small the log.
            batch_bytes: MAX_BATCH_BYTES.min(ring_len / 4),
        };
        for s in slinks {
            if lost && s.nr != 0 && log.cursor(s.nr).is_some() {
                log.unregister_slink(s.nr).map_err(GroupError::Log)?;
            }
            // A fresh log starts every SLINK in ordered mode. A reopened log keeps what
            // it says: an SLINK without a cursor had left ordered mode (or is new) and
            // needs a resync of its dirty regions. SLINK 0 is always ordered.
            if log.cursor(s.nr).is_none() && (fresh || s.nr == 0) {
                log.register_slink(s.nr).map_err(GroupError::Log)?;
            }
            let ordered = log.cursor(s.nr).is_some();
            if !ordered {
                warn!(group = name, slink = s.nr, "slink is not in ordered mode: its devices will be resynchronised");
            }
            let nr = s.nr;
            let mut rt = SlinkRt::new(s, ordered, log.cursor(nr).unwrap_or(0), now);
            rt.standby = Self::standby_for(nr, &*rt.handler, m.secondary);
            if !ordered {
                rt.resync.reason = Some(if lost { "log lost entries" } else { "out of sync at start" }.into());
                rt.resync.since = Some(SystemTime::now());
            }
            m.slinks.insert(nr, rt);
        }
        // Re-queue what the recovered log still holds.
        let mut from = 0;
        loop {
            let batch = log.entries_from(from, 65536);
            let Some(last) = batch.last().map(|e| e.seq) else { break };
            for e in batch {
                for (nr, rt) in m.slinks.iter_mut() {
                    if rt.ordered && e.slinks.contains(*nr) && e.seq > rt.durable {
                        rt.outstanding.push_back((e.seq, e.len as u64, now));
                        rt.out_bytes += e.len as u64;
                        if *nr == 0 && e.kind.changes_data() {
                            m.overlay.insert(e.clone());
                        }
                    }
                }
            }
            from = last + 1;
        }
        if lost {
            // Every RD is copied in full: their dirty logs start all dirty.
            for nr in m.slinks.keys().filter(|n| **n != 0) {
                for d in m.slinks[&0].handler.devices() {
                    m.missed.insert((*nr, d));
                }
            }
        }
        Ok(m)
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
    /// Writes whose dirty-log marks are being flushed.
    pub fn awaiting_flush(&self) -> bool {
        !self.unflushed.is_empty()
    }
    pub fn awaiting(&self) -> usize {
        self.awaiting.len() + self.unflushed.len()
    }

    /// SLINK `nr` no longer holds the writes up to `through`: those that now wait for
    /// nothing, taken out of `awaiting`.
    fn release(&mut self, nr: SlinkNr, through: Seq) -> Vec<Waiting> {
        let done: Vec<Seq> = self
            .awaiting
            .range_mut(..=through)
            .filter_map(|(seq, a)| {
                a.wait.remove(&nr);
                a.wait.is_empty().then_some(*seq)
            })
            .collect();
        done.iter().map(|s| self.awaiting.remove(s).expect("present")).collect()
    }

    /// The seq of the last entry of device `dev` that SLINK `nr` still needs (0: none).
    fn last_needed(&self, dev: DevNr, nr: SlinkNr) -> Seq {
        let Some(rt) = self.slinks.get(&nr) else { return 0 };
        let Some(&(last, _, _)) = rt.outstanding.back() else { return 0 };
        let mut found = 0;
        let mut from = rt.durable + 1;
        while from <= last {
            let metas = self.log.entries_from(from, 4096);
            let Some(end) = metas.last().map(|m| m.seq) else { break };
            for m in metas.iter().filter(|m| m.seq <= last && m.dev_nr == dev && m.slinks.contains(nr)) {
                found = m.seq;
            }
            from = end + 1;
        }
        found
    }

    /// The devices of the group: the LDs attached to SLINK 0, less removed ones.
    fn devices(&self) -> Vec<DevNr> {
        self.slinks[&0].handler.devices().into_iter().filter(|d| !self.removed.contains(d)).collect()
    }

    /// Apply an event.
    pub(crate) fn apply(&mut self, now: Instant, ev: Event) -> Effects {
        match ev {
            Event::Submit { dev_nr, req, done, origin } => self.submit(dev_nr, req, done, origin),
            Event::Mark { description, done, origin } => self.submit_marker(description, done, origin),
            Event::AppenderReady => self.appender_ready(now),
            Event::Appended { batch, took, result } => {
                self.stats.append_us += took.as_micros() as u64;
                self.appended(now, batch, result)
            }
            Event::DirtyFlushed { result } => self.dirty_flushed(result),
            Event::Left { slink, result } => self.left(now, slink, result),
            Event::Reordered { slink, result } => self.reordered(now, slink, result),
            Event::RejoinFailed { slink, error } => {
                if self.slinks.contains_key(&slink) {
                    self.went_down(now, slink, "telling the site it rejoins ordered mode", &error);
                }
                Effects { wake_copiers: true, ..Default::default() }
            }
            Event::CopierReady { slink } => self.copier_ready(now, slink),
            Event::Applied { slink, era, last, took, result } => self.applied(now, slink, era, last, took, result),
            Event::LogReadFailed { slink, seq, error } => {
                self.fail_log(GroupError::LogRead { slink, seq, source: error })
            }
            Event::Resynced { work, result } => self.resynced(now, work, result),
            Event::Probed { slink, result } => self.probed(now, slink, result),
            Event::CursorsFailed { error } => self.fail_log(GroupError::Cursors(error)),
            Event::CursorsPersisted { slinks, took } => {
                // The head may have moved: room in the log.
                self.log_full = None;
                for nr in slinks {
                    if let Some(rt) = self.slinks.get_mut(&nr) {
                        rt.cursor_us += took.as_micros() as u64;
                    }
                }
                Effects::default()
            }
        }
    }
}
