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
use super::{Chunk, SlinkSetup, Stats, CACHE_BUDGET, MAX_APPLY_ENTRIES, MAX_BATCH_BYTES, MAX_BATCH_ENTRIES};
use super::{MAX_ENTRY_DATA, PROBE_MAX, PROBE_MIN};
use crate::replicator::dirty::{region_span, DirtyLog};
use crate::replicator::fallbehind::{self, Lag, Mode, Policy, Thresholds};
use crate::replicator::log::{EntryKind, EntryMeta, LogError, NewEntry, RingLog, SlinkSet};
use crate::replicator::overlay::Overlay;
use crate::replicator::slink::SlinkHandler;
use dmrep_formats::replog::{pad_to_record, ENTRY_HEADER_SIZE};

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
                let kind = entry_kind(p.req.op);
                let data: &[u8] = match kind {
                    EntryKind::Write => {
                        &p.data.as_ref().expect("planned")[s.start as usize..(s.start + s.len) as usize]
                    }
                    _ => &[],
                };
                NewEntry {
                    dev_nr: p.dev_nr,
                    offset: p.req.offset + s.start,
                    kind,
                    len: s.len as u32,
                    data,
                    slinks: self.slinks,
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
    /// Copier: apply, then [`Event::Applied`] (or [`Event::LogReadFailed`]).
    Apply(ApplyWork),
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
    Reordered {
        slink: SlinkNr,
        result: Result<(), LogError>,
    },
    /// SLINK `slink`'s copier is free.
    CopierReady {
        slink: SlinkNr,
    },
    Applied {
        slink: SlinkNr,
        era: u64,
        last: Seq,
        took: Duration,
        result: io::Result<()>,
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

/// The link to a site: reachable or not, and when to probe.
struct Link {
    accessible: bool,
    down_since: Option<SystemTime>,
    last_error: Option<String>,
    next_probe: Instant,
    backoff: Duration,
    /// Real work succeeded since the last failure (backoff resets only then, so a site
    /// that answers probes but fails I/O is not reported as flapping).
    healthy: bool,
}

/// Per-SLINK resync bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct ResyncState {
    /// No dirty region left: the appender may return the SLINK to ordered mode.
    pub done: bool,
    pub reason: Option<String>,
    pub since: Option<SystemTime>,
    pub regions_done: u64,
    pub bytes_copied: u64,
    pub started: Option<Instant>,
    /// Bytes per second; None: unlimited.
    pub rate_limit: Option<u64>,
    /// Where the pass is: the next region to look at (device, region). Passes go
    /// through the devices in order, so a region rewritten behind the pass waits for
    /// the next pass instead of being copied again and again.
    cursor: (DevNr, u64),
}

pub(crate) struct SlinkRt {
    pub handler: Arc<dyn SlinkHandler>,
    pub policy: Policy,
    pub thresholds: Thresholds,
    /// Last entry handed to the site.
    pub shipped: Seq,
    /// Last entry durable at the site (the cursor to persist).
    pub durable: Seq,
    /// Entries it still needs: (seq, bytes, appended at).
    outstanding: VecDeque<(Seq, u64, Instant)>,
    out_bytes: u64,
    /// The mode in force (what status shows).
    pub mode: Mode,
    pub mode_since: SystemTime,
    pub mode_switches: u64,
    /// Mode changes not logged (rate limit), and when one was last logged.
    mode_unlogged: u64,
    mode_logged: Option<Instant>,
    link: Link,
    pub waiting_for_device: Option<DevNr>,
    /// Operator pause (`slink <nr> pause`): entries queue in the log, nothing ships.
    pub paused: bool,
    /// In ordered (log) mode. Off: its RDs are out of sync; new writes mark dirty
    /// regions and the resync copies them.
    pub ordered: bool,
    /// Leaving ordered mode: dirty logs being flushed and the log cursor dropped.
    leaving: bool,
    /// Bumped on every ordered/dirty transition: work handed out before is void.
    era: u64,
    pub resync: ResyncState,
    pub applied_entries: u64,
    pub applied_bytes: u64,
    /// Epoch slices applied, and time spent applying them and persisting the cursor (µs).
    pub applies: u64,
    pub apply_us: u64,
    pub cursor_us: u64,
}

/// Longest quiet time between two logged mode changes of one SLINK.
const MODE_LOG_EVERY: Duration = Duration::from_secs(1);

impl SlinkRt {
    fn new(s: SlinkSetup, ordered: bool, durable: Seq, now: Instant) -> Self {
        SlinkRt {
            mode: fallbehind::mode(&s.policy, &s.thresholds, &Lag::default()),
            handler: s.handler,
            policy: s.policy,
            thresholds: s.thresholds,
            shipped: durable,
            durable,
            outstanding: VecDeque::new(),
            out_bytes: 0,
            mode_since: SystemTime::now(),
            mode_switches: 0,
            mode_unlogged: 0,
            mode_logged: None,
            link: Link {
                accessible: true,
                down_since: None,
                last_error: None,
                next_probe: now,
                backoff: PROBE_MIN,
                healthy: true,
            },
            waiting_for_device: None,
            paused: false,
            ordered,
            leaving: false,
            era: 0,
            resync: ResyncState::default(),
            applied_entries: 0,
            applied_bytes: 0,
            applies: 0,
            apply_us: 0,
            cursor_us: 0,
        }
    }

    /// Whether writes may wait for this SLINK: it is in ordered mode and either
    /// synchronous by policy (then an outage stalls writes: DESIGN invariant 1) or
    /// reachable and not paused (an unreachable or paused asynchronous SLINK does not
    /// throttle: its entries wait in the log, and it leaves ordered mode if it holds the
    /// log when the log fills).
    fn throttles(&self) -> bool {
        self.ordered && !self.leaving && (self.policy.synchronous || (self.link.accessible && !self.paused))
    }

    pub fn lag(&self, now: Instant) -> Lag {
        Lag {
            ios: self.outstanding.len() as u64,
            bytes: self.out_bytes,
            oldest_age: self.outstanding.front().map(|o| now.saturating_duration_since(o.2)),
        }
    }

    /// Leaving ordered mode (out of sync already).
    pub fn leaving(&self) -> bool {
        self.leaving
    }
    pub fn accessible(&self) -> bool {
        self.link.accessible
    }
    pub fn down_since(&self) -> Option<SystemTime> {
        self.link.down_since
    }
    pub fn last_error(&self) -> Option<&str> {
        self.link.last_error.as_deref()
    }

    /// Whether the SLINK's writes must wait for it now.
    fn makes_writes_wait(&self) -> bool {
        self.throttles() && self.mode.waits()
    }

    /// Recompute the mode in force: a down or paused asynchronous SLINK does not
    /// throttle, so it is shown (and treated) as asynchronous whatever its lag.
    fn update_mode(&mut self, group: &str, nr: SlinkNr, now: Instant) {
        let m = if self.policy.synchronous || self.throttles() {
            fallbehind::next_mode(&self.policy, &self.thresholds, &self.lag(now), self.mode)
        } else {
            Mode::Asynchronous
        };
        if m == self.mode {
            return;
        }
        let from = std::mem::replace(&mut self.mode, m);
        self.mode_since = SystemTime::now();
        self.mode_switches += 1;
        if self.mode_logged.is_none_or(|t| now.saturating_duration_since(t) >= MODE_LOG_EVERY) {
            info!(group, slink = nr, ?from, to = ?m, lag = ?self.lag(now), unlogged = self.mode_unlogged, "slink mode changed");
            self.mode_logged = Some(now);
            self.mode_unlogged = 0;
        } else {
            self.mode_unlogged += 1;
        }
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
                        if *nr == 0 {
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
    pub fn awaiting(&self) -> usize {
        self.awaiting.len() + self.unflushed.len()
    }

    /// The devices of the group: the LDs attached to SLINK 0, less removed ones.
    fn devices(&self) -> Vec<DevNr> {
        self.slinks[&0].handler.devices().into_iter().filter(|d| !self.removed.contains(d)).collect()
    }

    /// Apply an event.
    pub(crate) fn apply(&mut self, now: Instant, ev: Event) -> Effects {
        match ev {
            Event::Submit { dev_nr, req, done } => self.submit(dev_nr, req, done),
            Event::AppenderReady => self.appender_ready(now),
            Event::Appended { batch, took, result } => {
                self.stats.append_us += took.as_micros() as u64;
                self.appended(now, batch, result)
            }
            Event::DirtyFlushed { result } => self.dirty_flushed(result),
            Event::Left { slink, result } => self.left(now, slink, result),
            Event::Reordered { slink, result } => self.reordered(now, slink, result),
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

    // ---------------------------------------------------------------------------------
    // Writes

    fn submit(&mut self, dev_nr: DevNr, req: Request, done: Completion) -> Effects {
        let mut fx = Effects::default();
        if self.shutdown {
            fx.fail(req, done, Errno::SHUTDOWN);
            return fx;
        }
        if let Some(e) = &self.log_error {
            warn!(group = %self.name, "write refused: {e}");
            let e = e.errno();
            fx.fail(req, done, e);
            return fx;
        }
        if self.stats.enabled {
            self.stats.writes += 1;
            self.stats.write_bytes += req.len;
        }
        self.queue.push_back(Pending { dev_nr, req, done, data: None, appended: 0 });
        fx.wake_appender = true;
        fx
    }

    fn appender_ready(&mut self, now: Instant) -> Effects {
        if self.shutdown {
            return Effects::default();
        }
        if let Some(e) = self.log_error.clone() {
            let mut fx = Effects::default();
            for p in self.queue.drain(..) {
                fx.fail(p.req, p.done, e.errno());
            }
            return fx;
        }
        if let Some(nr) = self.reorder_candidate() {
            return Effects::io(Io::Reorder { slink: nr });
        }
        if self.log_full.is_some_and(|t| now.saturating_duration_since(t) < super::TICK) {
            return Effects::default();
        }
        match self.plan(now) {
            Some(b) => Effects::io(Io::Append(Box::new(b))),
            None => Effects::default(),
        }
    }

    /// Plan a batch from the queue front: slices within batch limits (entry headers
    /// counted) and every throttling SLINK's fall-behind admission.
    fn plan(&mut self, now: Instant) -> Option<Batch> {
        if self.queue.is_empty() {
            return None;
        }
        let slice_max = |data: bool| if data { MAX_ENTRY_DATA } else { u32::MAX as u64 & !511 };
        let mut sizes = Vec::new();
        let mut bytes = 0u64;
        'outer: for p in self.queue.iter() {
            let data = matches!(p.req.op, Op::Write { .. });
            let mut at = p.appended;
            while at < p.req.len {
                let n = (p.req.len - at).min(slice_max(data));
                let ring = footprint(if data { n } else { 0 });
                if sizes.len() >= MAX_BATCH_ENTRIES || (bytes + ring > self.batch_bytes && !sizes.is_empty()) {
                    break 'outer;
                }
                sizes.push(n);
                bytes += ring;
                at += n;
            }
        }
        let mut admit = sizes.len();
        for rt in self.slinks.values().filter(|rt| rt.throttles()) {
            admit = admit.min(fallbehind::admit(&rt.policy, &rt.thresholds, &rt.lag(now), sizes.iter().copied()));
        }
        if admit == 0 {
            return None;
        }
        let mut pendings = Vec::new();
        let mut slices = Vec::new();
        let mut left = admit;
        while left > 0 {
            let Some(mut p) = self.queue.pop_front() else { break };
            if p.data.is_none() {
                p.data = Some(Arc::new(std::mem::take(&mut p.req.buf)));
            }
            let data = matches!(p.req.op, Op::Write { .. });
            let mut at = p.appended;
            while left > 0 && at < p.req.len {
                let n = (p.req.len - at).min(slice_max(data));
                slices.push(Slice { p: pendings.len(), start: at, len: n });
                at += n;
                left -= 1;
            }
            pendings.push(p);
        }
        let mut set = SlinkSet::default();
        let mut eras = BTreeMap::new();
        for (nr, rt) in &self.slinks {
            if rt.ordered && !rt.leaving {
                set.insert(*nr);
            }
            eras.insert(*nr, rt.era);
        }
        Some(Batch { pendings, slices, slinks: set, eras })
    }

    fn appended(&mut self, now: Instant, batch: Box<Batch>, result: Result<Vec<EntryMeta>, LogError>) -> Effects {
        let mut fx = Effects::default();
        let Batch { mut pendings, slices, slinks: _, eras } = *batch;
        if self.shutdown {
            for p in pendings {
                fx.fail(p.req, p.done, Errno::SHUTDOWN);
            }
            return fx;
        }
        let metas = match result {
            Ok(m) => m,
            Err(LogError::Full { needed, .. }) => {
                // Nothing was written: put the writes back, in order.
                self.stats.log_full_waits += 1;
                for p in pendings.drain(..).rev() {
                    self.queue.push_front(p);
                }
                return match self.log_full_victim(needed) {
                    Some(nr) => self.begin_leave(now, nr, "replication log full"),
                    None => {
                        self.log_full = Some(now);
                        fx
                    }
                };
            }
            Err(e) => {
                warn!(group = %self.name, "replication log append failed: {e}");
                for p in pendings {
                    fx.fail(p.req, p.done, Errno::IO);
                }
                let mut more = self.fail_log(GroupError::Log(e));
                fx.replies.append(&mut more.replies);
                return fx;
            }
        };
        self.log_full = None;
        self.stats.batches += 1;
        self.stats.entries += metas.len() as u64;
        let mut last_seq = vec![0; pendings.len()];
        let mut added = vec![0; pendings.len()];
        let mut flush: Vec<Arc<dyn DirtyLog>> = Vec::new();
        for (s, m) in slices.iter().zip(metas) {
            last_seq[s.p] = m.seq;
            added[s.p] += s.len;
            if m.kind == EntryKind::Write && self.cache_bytes + m.len as u64 <= CACHE_BUDGET {
                let buf = pendings[s.p].data.clone().expect("planned");
                self.cache_bytes += m.len as u64;
                self.cache.insert(m.seq, Chunk { buf, start: s.start as usize, len: s.len as usize });
            }
            for (nr, rt) in self.slinks.iter_mut() {
                let named = m.slinks.contains(*nr) && eras.get(nr) == Some(&rt.era);
                if rt.ordered && !rt.leaving && named {
                    rt.outstanding.push_back((m.seq, m.len as u64, now));
                    rt.out_bytes += m.len as u64;
                } else if !rt.ordered || rt.leaving {
                    // Out of ordered mode now (even if it was not when planned): the
                    // write becomes dirty regions, published with it.
                    match self.dirty.get(&(*nr, m.dev_nr)) {
                        Some((log, _)) => {
                            log.mark_range(m.offset, m.len as u64);
                            if !flush.iter().any(|l| Arc::ptr_eq(l, log)) {
                                flush.push(log.clone());
                            }
                            for r in region_span(m.offset, m.len as u64, log.region_bytes()) {
                                if self.in_copy.contains(&(*nr, m.dev_nr, r)) {
                                    self.touched.insert((*nr, m.dev_nr, r));
                                }
                            }
                        }
                        None => {
                            self.missed.insert((*nr, m.dev_nr));
                        }
                    }
                } else {
                    // Ordered but not named: it joined ordered mode after the plan,
                    // which only the appender does, between batches.
                    debug_assert!(false, "slink {nr} ordered but not named by entry {}", m.seq);
                    self.missed.insert((*nr, m.dev_nr));
                }
            }
            if m.slinks.contains(0) {
                self.overlay.insert(m);
            }
        }
        for (nr, rt) in self.slinks.iter_mut() {
            rt.update_mode(&self.name, *nr, now);
        }
        let waiting: BTreeSet<SlinkNr> =
            self.slinks.iter().filter(|(_, rt)| rt.makes_writes_wait()).map(|(nr, _)| *nr).collect();
        let mut done = Vec::new();
        for (i, mut p) in pendings.into_iter().enumerate() {
            p.appended += added[i];
            if p.appended < p.req.len {
                // The rest goes in a later batch, before anything queued after it.
                self.queue.push_front(p);
                continue;
            }
            done.push(Waiting { dev_nr: p.dev_nr, req: p.req, done: p.done, seq: last_seq[i], wait: waiting.clone() });
        }
        if flush.is_empty() {
            for w in done {
                self.settle(w, &mut fx);
            }
        } else {
            self.unflushed.extend(done);
            fx.io = Some(Io::FlushDirty(flush));
        }
        fx.wake_copiers = true;
        fx
    }

    /// A write whose entries (and dirty marks) are durable: acknowledge it, or make it
    /// wait for the SLINKs that still lack it.
    fn settle(&mut self, mut w: Waiting, fx: &mut Effects) {
        w.wait.retain(|nr| self.slinks.get(nr).is_some_and(|rt| rt.makes_writes_wait() && rt.durable < w.seq));
        if w.wait.is_empty() {
            fx.ok(w.req, w.done);
        } else {
            self.awaiting.insert(w.seq, w);
        }
    }

    fn dirty_flushed(&mut self, result: io::Result<()>) -> Effects {
        let mut fx = Effects::default();
        let held = std::mem::take(&mut self.unflushed);
        match result {
            Ok(()) => {
                for w in held {
                    self.settle(w, &mut fx);
                }
            }
            Err(e) => {
                warn!(group = %self.name, "marking dirty regions failed: {e}");
                for w in held {
                    fx.fail(w.req, w.done, Errno::IO);
                }
                let mut more = self.fail_log(GroupError::DirtyLog { slink: 0, source: e });
                fx.replies.append(&mut more.replies);
            }
        }
        fx
    }

    /// The log is failing: refuse writes from now on (they fail with EIO), and fail
    /// those queued. Writes already in the log keep their way to the sites, except that
    /// copiers stop when cursors cannot be persisted.
    fn fail_log(&mut self, e: GroupError) -> Effects {
        let mut fx = Effects::default();
        if self.log_error.is_none() {
            warn!(group = %self.name, "replication group refuses writes from now on: {e}");
            self.log_error = Some(Arc::new(e));
        }
        for p in self.queue.drain(..) {
            fx.fail(p.req, p.done, Errno::IO);
        }
        fx.wake_copiers = true;
        fx.wake_appender = true;
        fx
    }

    // ---------------------------------------------------------------------------------
    // Leaving ordered mode, and the way back

    /// Whether SLINK `nr` may leave ordered mode: not SLINK 0, no `stall`.
    fn may_leave(&self, nr: SlinkNr) -> bool {
        let rt = &self.slinks[&nr];
        nr != 0 && rt.ordered && !rt.leaving && !rt.policy.stall
    }

    /// The log is full (`needed` bytes): the SLINK that holds the log's oldest entries
    /// leaves ordered mode, if it may and if leaving frees the space needed (and a good
    /// share of the ring, so that a replica just behind another does not flap).
    /// Otherwise nobody leaves: writes wait for the copiers (SLINK 0, usually).
    fn log_full_victim(&self, needed: u64) -> Option<SlinkNr> {
        let mut holders: Vec<(Seq, SlinkNr)> = self
            .slinks
            .iter()
            .filter(|(_, rt)| rt.ordered && !rt.leaving)
            .filter_map(|(nr, rt)| rt.outstanding.front().map(|o| (o.0, *nr)))
            .collect();
        holders.sort();
        let &(oldest, nr) = holders.first()?;
        if !self.may_leave(nr) {
            return None;
        }
        // The holder's entries before the next holder's oldest are what leaving frees.
        let next = holders.iter().find(|(_, n)| *n != nr).map(|h| h.0).unwrap_or(Seq::MAX);
        let freed: u64 = self.slinks[&nr].outstanding.iter().take_while(|o| o.0 < next).map(|o| footprint(o.1)).sum();
        let enough = needed.max(self.ring_len / 8);
        if freed < enough {
            tracing::debug!(group = %self.name, slink = nr, oldest, freed, enough, "log full: leaving would free too little; writes wait");
            return None;
        }
        Some(nr)
    }

    /// Take SLINK `nr` out of ordered mode: every entry it still needs becomes dirty
    /// regions (in memory now, durable by the returned [`Io::Leave`], which then drops
    /// its cursor from the log). Writes waiting for it are released by [`Event::Left`].
    fn begin_leave(&mut self, now: Instant, nr: SlinkNr, reason: &str) -> Effects {
        let rt = self.slinks.get_mut(&nr).expect("slink");
        let last = rt.outstanding.back().map(|o| o.0);
        let from = rt.durable + 1;
        rt.leaving = true;
        rt.era += 1;
        rt.outstanding.clear();
        rt.out_bytes = 0;
        let rate_limit = rt.resync.rate_limit;
        rt.resync = ResyncState {
            reason: Some(reason.to_string()),
            since: Some(SystemTime::now()),
            rate_limit,
            ..Default::default()
        };
        rt.update_mode(&self.name, nr, now);
        let mut marked = 0u64;
        if let Some(last) = last {
            let mut from = from;
            'scan: loop {
                let metas = self.log.entries_from(from, 65536);
                let Some(end) = metas.last().map(|m| m.seq) else { break };
                for m in metas {
                    if m.seq > last {
                        break 'scan;
                    }
                    if !m.slinks.contains(nr) {
                        continue;
                    }
                    match self.dirty.get(&(nr, m.dev_nr)) {
                        Some((log, _)) => log.mark_range(m.offset, m.len as u64),
                        None => {
                            self.missed.insert((nr, m.dev_nr));
                        }
                    }
                    marked += 1;
                }
                from = end + 1;
            }
        }
        let logs: Vec<Arc<dyn DirtyLog>> =
            self.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.clone()).collect();
        warn!(group = %self.name, slink = nr, reason, entries = marked, "slink left ordered mode: its devices are out of sync until a resync ends");
        Effects::io(Io::Leave { slink: nr, logs })
    }

    fn left(&mut self, now: Instant, nr: SlinkNr, result: Result<(), GroupError>) -> Effects {
        let mut fx = Effects::default();
        if let Err(e) = result {
            // Its dirty regions may not be durable: writes that waited for it cannot be
            // acknowledged as safe, and the log cannot be trusted to be consistent.
            let mut more = self.fail_log(e);
            fx.replies.append(&mut more.replies);
        }
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.leaving = false;
        rt.ordered = false;
        rt.update_mode(&self.name, nr, now);
        let dirty: u64 = self.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.dirty_count()).sum();
        info!(group = %self.name, slink = nr, dirty_regions = dirty, "slink out of ordered mode");
        // Writes that waited for this SLINK no longer do.
        let released: Vec<Seq> = self
            .awaiting
            .iter_mut()
            .filter_map(|(seq, a)| {
                a.wait.remove(&nr);
                a.wait.is_empty().then_some(*seq)
            })
            .collect();
        for s in released {
            let a = self.awaiting.remove(&s).expect("present");
            if self.log_error.is_some() {
                fx.fail(a.req, a.done, Errno::IO);
            } else {
                fx.ok(a.req, a.done);
            }
        }
        self.prune_cache();
        self.log_full = None;
        fx.wake_appender = true;
        fx.wake_copiers = true;
        fx
    }

    /// An SLINK out of ordered mode whose resync found nothing dirty, with a device and
    /// a dirty log for every device of the group.
    fn reorder_candidate(&self) -> Option<SlinkNr> {
        let devices = self.devices();
        self.slinks
            .iter()
            .find(|(nr, rt)| {
                !rt.ordered
                    && !rt.leaving
                    && rt.resync.done
                    && devices.iter().all(|d| {
                        rt.handler.has_device(*d)
                            && self.dirty.get(&(**nr, *d)).is_some_and(|(l, _)| l.dirty_count() == 0)
                            && !self.missed.contains(&(**nr, *d))
                    })
                    && !self.in_copy.iter().any(|k| k.0 == **nr)
            })
            .map(|(nr, _)| *nr)
    }

    fn reordered(&mut self, now: Instant, nr: SlinkNr, result: Result<(), LogError>) -> Effects {
        if let Err(e) = result {
            warn!(group = %self.name, slink = nr, "cannot return to ordered mode: {e}");
            return self.fail_log(GroupError::Log(e));
        }
        let durable = self.log.cursor(nr).unwrap_or(0);
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.ordered = true;
        rt.era += 1;
        rt.durable = durable;
        rt.shipped = durable;
        rt.outstanding.clear();
        rt.out_bytes = 0;
        let took = rt.resync.started.map(|t| now.saturating_duration_since(t));
        info!(
            group = %self.name, slink = nr, regions = rt.resync.regions_done, bytes = rt.resync.bytes_copied, took = ?took,
            "resync complete: slink in ordered mode"
        );
        // What the resync did stays in the status until the next one starts.
        rt.resync.done = false;
        rt.resync.reason = None;
        rt.resync.since = None;
        rt.resync.cursor = (0, 0);
        rt.update_mode(&self.name, nr, now);
        let dirty: u64 = self.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.dirty_count()).sum();
        if dirty > 0 {
            // A dirty log attached meanwhile with regions to copy.
            return self.begin_leave(now, nr, "initial synchronisation");
        }
        Effects { wake_copiers: true, ..Default::default() }
    }

    // ---------------------------------------------------------------------------------
    // Copiers

    fn copier_ready(&mut self, now: Instant, nr: SlinkNr) -> Effects {
        if self.shutdown || self.log_error.is_some() {
            // With a failed log, cursors may not be durable: shipping more epochs could
            // break the crash-replay order rule.
            return Effects::default();
        }
        let Some(rt) = self.slinks.get(&nr) else { return Effects::default() };
        if rt.leaving {
            return Effects::default();
        }
        if !rt.link.accessible {
            return if now >= rt.link.next_probe { Effects::io(Io::Probe { slink: nr }) } else { Effects::default() };
        }
        let shipping = (nr == 0 || self.shipping) && !rt.paused;
        if !shipping {
            return Effects::default();
        }
        if !rt.ordered {
            if rt.resync.done {
                return Effects::default();
            }
            return self.next_region(now, nr);
        }
        if rt.outstanding.is_empty() || rt.shipped > rt.durable {
            return Effects::default();
        }
        match self.next_epoch(nr) {
            Some(w) => {
                self.slinks.get_mut(&nr).expect("slink").shipped = w.last;
                Effects::io(Io::Apply(w))
            }
            None => Effects::default(),
        }
    }

    /// The next entries SLINK `nr` must apply: the rest of the first epoch it lacks,
    /// only entries the machine has recorded, and only once their devices are attached.
    /// Entries of removed devices are skipped (SLINK 0 keeps its LDs until applied).
    fn next_epoch(&mut self, nr: SlinkNr) -> Option<ApplyWork> {
        let rt = &self.slinks[&nr];
        let last_known = rt.outstanding.back()?.0;
        let mut from = rt.shipped + 1;
        let mut epoch = None;
        let mut out = Vec::new();
        let mut last = rt.shipped;
        const SCAN_WINDOW: usize = 64;
        'scan: loop {
            let metas = self.log.entries_from(from, SCAN_WINDOW);
            let full = metas.len() == SCAN_WINDOW;
            let Some(next) = metas.last().map(|m| m.seq + 1) else { break };
            for m in metas {
                if m.seq > last_known || out.len() == MAX_APPLY_ENTRIES {
                    break 'scan;
                }
                if !m.slinks.contains(nr) {
                    continue;
                }
                match epoch {
                    None => epoch = Some(m.epoch),
                    Some(e) if e != m.epoch => break 'scan,
                    _ => {}
                }
                if nr != 0 && self.removed.contains(&m.dev_nr) {
                    last = m.seq;
                    continue;
                }
                if !rt.handler.has_device(m.dev_nr) {
                    let dev = m.dev_nr;
                    self.slinks.get_mut(&nr).expect("slink").waiting_for_device = Some(dev);
                    return None;
                }
                last = m.seq;
                let c = self.cache.get(&m.seq).cloned();
                out.push((m, c));
            }
            if !full {
                break;
            }
            from = next;
        }
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.waiting_for_device = None;
        (last > rt.shipped).then_some(ApplyWork { slink: nr, era: rt.era, entries: out, last })
    }

    fn applied(
        &mut self,
        now: Instant,
        nr: SlinkNr,
        era: u64,
        last: Seq,
        took: Duration,
        result: io::Result<()>,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some(rt) = self.slinks.get_mut(&nr) else { return fx };
        if rt.era != era {
            // The SLINK left ordered mode meanwhile: these entries are dirty regions now.
            return fx;
        }
        if let Err(e) = result {
            rt.shipped = rt.durable;
            self.went_down(now, nr, "applying entries", &e);
            return fx;
        }
        self.recovered(nr);
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.shipped = rt.shipped.max(last);
        rt.durable = last;
        rt.applies += 1;
        rt.apply_us += took.as_micros() as u64;
        while rt.outstanding.front().is_some_and(|o| o.0 <= last) {
            let (_, b, _) = rt.outstanding.pop_front().expect("front");
            rt.out_bytes -= b;
            rt.applied_entries += 1;
            rt.applied_bytes += b;
        }
        rt.update_mode(&self.name, nr, now);
        if nr == 0 {
            self.overlay.remove_through(last);
            let drained: Vec<DevNr> = self.detach_ld.iter().filter(|(_, s)| **s <= last).map(|(d, _)| *d).collect();
            for d in drained {
                self.detach_ld.remove(&d);
                self.slinks[&0].handler.detach(d);
                info!(group = %self.name, dev_nr = d, "removed device's entries are on its LD: detached");
            }
        }
        let released: Vec<Seq> = self
            .awaiting
            .range_mut(..=last)
            .filter_map(|(seq, a)| {
                a.wait.remove(&nr);
                a.wait.is_empty().then_some(*seq)
            })
            .collect();
        for s in released {
            let a = self.awaiting.remove(&s).expect("present");
            fx.ok(a.req, a.done);
        }
        self.prune_cache();
        self.log_full = None;
        fx.cursor = Some(last);
        fx.wake_appender = true;
        fx.wake_copiers = true;
        fx
    }

    /// Data every SLINK in ordered mode has applied leaves the cache.
    fn prune_cache(&mut self) {
        let min = self.slinks.values().filter(|r| r.ordered && !r.leaving).map(|r| r.durable).min().unwrap_or(Seq::MAX);
        while let Some((&seq, _)) = self.cache.first_key_value() {
            if seq > min {
                break;
            }
            let c = self.cache.remove(&seq).expect("present");
            self.cache_bytes -= c.len as u64;
        }
    }

    fn went_down(&mut self, now: Instant, nr: SlinkNr, doing: &str, e: &io::Error) {
        let rt = self.slinks.get_mut(&nr).expect("slink");
        let l = &mut rt.link;
        if std::mem::replace(&mut l.healthy, false) {
            warn!(group = %self.name, slink = nr, "{doing} failed, marking the slink inaccessible: {e}");
            l.backoff = PROBE_MIN;
            l.down_since = Some(SystemTime::now());
        } else {
            l.backoff = (l.backoff * 2).min(PROBE_MAX);
        }
        l.accessible = false;
        l.next_probe = now + l.backoff;
        l.last_error = Some(e.to_string());
        rt.update_mode(&self.name, nr, now);
    }

    /// Real work succeeded: an outage, if there was one, is over.
    fn recovered(&mut self, nr: SlinkNr) {
        let l = &mut self.slinks.get_mut(&nr).expect("slink").link;
        if !std::mem::replace(&mut l.healthy, true) {
            l.backoff = PROBE_MIN;
            if let Some(t) = l.down_since.take() {
                info!(group = %self.name, slink = nr, down_for = ?t.elapsed().unwrap_or_default(), "slink back after an outage");
            }
        }
    }

    fn probed(&mut self, now: Instant, nr: SlinkNr, result: io::Result<()>) -> Effects {
        let Some(rt) = self.slinks.get_mut(&nr) else { return Effects::default() };
        match result {
            Ok(()) => {
                rt.link.accessible = true;
                rt.update_mode(&self.name, nr, now);
                info!(group = %self.name, slink = nr, "slink answers again; resuming shipping");
            }
            Err(e) => {
                rt.link.backoff = (rt.link.backoff * 2).min(PROBE_MAX);
                rt.link.next_probe = now + rt.link.backoff;
                rt.link.last_error = Some(e.to_string());
            }
        }
        Effects { wake_copiers: true, wake_appender: true, ..Default::default() }
    }

    // ---------------------------------------------------------------------------------
    // Resync

    /// The next dirty region of SLINK `nr`, from where the pass is; marks it in copy.
    fn next_region(&mut self, now: Instant, nr: SlinkNr) -> Effects {
        let rt = &self.slinks[&nr];
        let (cur_dev, cur_region) = rt.resync.cursor;
        // Regions at or after the cursor first, then from the start (a new pass).
        let mut found = None;
        let mut waiting = None;
        for pass in 0..2 {
            for ((s, dev), (log, bytes)) in self.dirty.range((nr, 0)..=(nr, DevNr::MAX)) {
                debug_assert_eq!(*s, nr);
                let from = match (pass, dev.cmp(&cur_dev)) {
                    (0, std::cmp::Ordering::Less) => continue,
                    (0, std::cmp::Ordering::Equal) => cur_region,
                    _ => 0,
                };
                let Some(r) = log.next_dirty(from) else { continue };
                if !rt.handler.has_device(*dev) {
                    waiting = Some(*dev);
                    continue;
                }
                let rb = log.region_bytes();
                found = Some((*dev, r, r * rb, rb.min(bytes.saturating_sub(r * rb))));
                break;
            }
            if found.is_some() {
                break;
            }
        }
        let era = rt.era;
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.waiting_for_device = waiting;
        let Some((dev, region, offset, len)) = found else {
            if waiting.is_none() {
                rt.resync.done = true;
                return Effects { wake_appender: true, ..Default::default() };
            }
            return Effects::default();
        };
        rt.resync.started.get_or_insert(now);
        rt.resync.cursor = (dev, region + 1);
        let rate_limit = rt.resync.rate_limit;
        self.in_copy.insert((nr, dev, region));
        self.touched.remove(&(nr, dev, region));
        Effects::io(Io::Resync(ResyncWork { slink: nr, era, dev, region, offset, len, rate_limit }))
    }

    fn resynced(&mut self, now: Instant, w: ResyncWork, result: io::Result<()>) -> Effects {
        let key = (w.slink, w.dev, w.region);
        self.in_copy.remove(&key);
        let retouched = self.touched.remove(&key);
        let mut fx = Effects { wake_copiers: true, ..Default::default() };
        let Some(rt) = self.slinks.get_mut(&w.slink) else { return fx };
        if let Err(e) = result {
            self.went_down(now, w.slink, "resync", &e);
            return fx;
        }
        if rt.era != w.era {
            return fx;
        }
        self.recovered(w.slink);
        if !retouched {
            if let Some((log, _)) = self.dirty.get(&(w.slink, w.dev)) {
                log.clear(w.region);
                fx.flush.push(log.clone());
            }
            let rt = self.slinks.get_mut(&w.slink).expect("slink");
            rt.resync.regions_done += 1;
            rt.resync.bytes_copied += w.len;
        }
        fx
    }

    // ---------------------------------------------------------------------------------
    // Commands

    /// Apply an operator's or a table's command.
    pub(crate) fn control(&mut self, now: Instant, c: Control) -> Result<Effects, GroupError> {
        let mut fx = Effects { wake_appender: true, wake_copiers: true, ..Default::default() };
        match c {
            Control::AddSlink(s, dirty) => return self.add_slink(now, s, dirty),
            Control::SetPolicy { slink, policy, thresholds } => {
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                let t = thresholds.unwrap_or(rt.thresholds);
                if policy.synchronous && !t.is_empty() {
                    return Err(GroupError::SyncWithThresholds(slink));
                }
                rt.policy = policy;
                rt.thresholds = t;
                rt.update_mode(&self.name, slink, now);
                self.release_waits(&mut fx);
            }
            Control::SetThresholds { slink, update, clear } => {
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                if rt.policy.synchronous && !update.is_empty() {
                    return Err(GroupError::ThresholdsOnSync(slink));
                }
                let t = &mut rt.thresholds;
                if clear {
                    *t = Thresholds::default();
                }
                t.ios = update.ios.or(t.ios);
                t.bytes = update.bytes.or(t.bytes);
                t.timeout = update.timeout.or(t.timeout);
                rt.update_mode(&self.name, slink, now);
                self.release_waits(&mut fx);
            }
            Control::Pause { slink, paused } => {
                if slink == 0 {
                    return Err(GroupError::Slink0("paused"));
                }
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                rt.paused = paused;
                rt.update_mode(&self.name, slink, now);
                info!(group = %self.name, slink, paused, "slink shipping {}", if paused { "paused" } else { "resumed" });
                self.release_waits(&mut fx);
            }
            Control::Shipping(on) => self.shipping = on,
            Control::Statistics(cmd) => match cmd.as_str() {
                "on" => self.stats.enabled = true,
                "off" => self.stats.enabled = false,
                "reset" => self.stats = Stats { enabled: self.stats.enabled, ..Stats::default() },
                _ => return Err(GroupError::Statistics(cmd)),
            },
            Control::ResyncRate { slink, rate } => {
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                rt.resync.rate_limit = (rate > 0).then_some(rate);
            }
            Control::AttachDirty { slink, dev, log, dev_bytes, initial_dirty } => {
                return self.attach_dirty(now, slink, dev, log, dev_bytes, initial_dirty)
            }
            Control::RemoveDevice(dev) => self.remove_device(dev),
            Control::CancelDevice(dev) => self.cancel_device(dev, &mut fx),
            Control::Shutdown => {
                self.shutdown = true;
                for p in self.queue.drain(..) {
                    fx.fail(p.req, p.done, Errno::SHUTDOWN);
                }
                for (_, a) in std::mem::take(&mut self.awaiting) {
                    fx.fail(a.req, a.done, Errno::SHUTDOWN);
                }
                for a in self.unflushed.drain(..) {
                    fx.fail(a.req, a.done, Errno::SHUTDOWN);
                }
            }
        }
        Ok(fx)
    }

    /// After a policy or link change: writes no longer waiting for anything go.
    fn release_waits(&mut self, fx: &mut Effects) {
        let slinks = &self.slinks;
        let released: Vec<Seq> = self
            .awaiting
            .iter_mut()
            .filter_map(|(seq, a)| {
                a.wait.retain(|nr| slinks.get(nr).is_some_and(|rt| rt.makes_writes_wait() && rt.durable < *seq));
                a.wait.is_empty().then_some(*seq)
            })
            .collect();
        for s in released {
            let a = self.awaiting.remove(&s).expect("present");
            fx.ok(a.req, a.done);
        }
    }

    /// Add an SLINK with a dirty log for every device of the group (atomically: it
    /// joins with them or not at all). With no device in the group it joins ordered
    /// mode at once (nothing to copy); otherwise it starts out of ordered mode and its
    /// resync (a `sync` dirty log: every region) brings it in.
    fn add_slink(
        &mut self,
        now: Instant,
        s: SlinkSetup,
        dirty: Vec<(DevNr, Arc<dyn DirtyLog>, u64, bool)>,
    ) -> Result<Effects, GroupError> {
        if self.slinks.contains_key(&s.nr) {
            return Err(GroupError::SlinkExists(s.nr));
        }
        let nr = s.nr;
        let mut rt = SlinkRt::new(s, false, 0, now);
        rt.resync.reason = Some("slink added".into());
        rt.resync.since = Some(SystemTime::now());
        self.slinks.insert(nr, rt);
        for (dev, log, bytes, initial) in dirty {
            if initial {
                log.mark_all();
            }
            self.dirty.insert((nr, dev), (log, bytes));
        }
        info!(group = %self.name, slink = nr, "slink added to the live group");
        Ok(Effects { wake_appender: true, wake_copiers: true, ..Default::default() })
    }

    /// Attach the dirty log of device `dev` on SLINK `nr`. Every region starts dirty when
    /// asked (`sync` on a new RD), when the SLINK missed writes of the device with no
    /// dirty log to record them, or when an out-of-sync SLINK's in-memory log was lost.
    fn attach_dirty(
        &mut self,
        now: Instant,
        nr: SlinkNr,
        dev: DevNr,
        log: Arc<dyn DirtyLog>,
        dev_bytes: u64,
        initial_dirty: bool,
    ) -> Result<Effects, GroupError> {
        let rt = self.slinks.get(&nr).ok_or(GroupError::NoSlink(nr))?;
        let missed = self.missed.remove(&(nr, dev));
        if initial_dirty || missed || (!rt.ordered && log.kind() == "core") {
            log.mark_all();
        }
        self.removed.remove(&dev);
        self.dirty.insert((nr, dev), (log.clone(), dev_bytes));
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.resync.done = false;
        if rt.ordered && !rt.leaving && nr != 0 && log.dirty_count() > 0 {
            return Ok(self.begin_leave(now, nr, "initial synchronisation"));
        }
        Ok(Effects { flush: vec![log], wake_copiers: true, ..Default::default() })
    }

    /// A replicator-dev went away: its RDs leave the group at once (SLINKs skip its
    /// entries and forget its regions); its LD stays on SLINK 0 until SLINK 0 applied
    /// every entry of it (acknowledged writes reach the LD).
    fn remove_device(&mut self, dev: DevNr) {
        self.removed.insert(dev);
        self.dirty.retain(|(_, d), _| *d != dev);
        self.in_copy.retain(|k| k.1 != dev);
        self.touched.retain(|k| k.1 != dev);
        self.missed.retain(|k| k.1 != dev);
        for (nr, rt) in self.slinks.iter() {
            if *nr != 0 {
                rt.handler.detach(dev);
            }
        }
        let pending_on_ld = self.overlay.last_seq_of(dev);
        match pending_on_ld {
            Some(seq) => {
                self.detach_ld.insert(dev, seq);
            }
            None => self.slinks[&0].handler.detach(dev),
        }
    }

    /// Fail the writes of device `dev` that the group holds (queued, or waiting for a
    /// synchronous SLINK): its device is going away. Entries in the log stay.
    fn cancel_device(&mut self, dev: DevNr, fx: &mut Effects) {
        let (gone, keep): (VecDeque<Pending>, VecDeque<Pending>) =
            std::mem::take(&mut self.queue).into_iter().partition(|p| p.dev_nr == dev);
        self.queue = keep;
        let seqs: Vec<Seq> = self.awaiting.iter().filter(|(_, a)| a.dev_nr == dev).map(|(s, _)| *s).collect();
        if !gone.is_empty() || !seqs.is_empty() {
            warn!(group = %self.name, dev_nr = dev, queued = gone.len(), waiting = seqs.len(), "device going away: its held writes fail");
        }
        for p in gone {
            fx.fail(p.req, p.done, Errno::SHUTDOWN);
        }
        for s in seqs {
            let a = self.awaiting.remove(&s).expect("present");
            fx.fail(a.req, a.done, Errno::SHUTDOWN);
        }
    }
}
