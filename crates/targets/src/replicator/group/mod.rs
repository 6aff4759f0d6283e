//! A replication group: one log, its SLINKs, its devices, and the threads that move
//! writes through them.
//!
//! Write path: a replicator-dev queues the write here; the *appender* thread takes all
//! queued writes (group commit), appends them to the log as one epoch with one sync,
//! and then acknowledges each write whose synchronous SLINKs (by policy, or forced by
//! fall-behind) have nothing left to do; others wait in `awaiting` until those SLINKs
//! report the entry applied. One *copier* thread per SLINK (SLINK 0, the LDs,
//! included: DESIGN invariant 3) applies entries in log order, one epoch at a time,
//! makes them durable at the site, then persists its cursor in the log.
//!
//! All state changes happen under one mutex in small steps; I/O (log append, device
//! writes, cursor persistence) happens outside it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use dmrep_core::{Completion, Op, Request};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use tracing::{info, warn};

use super::dirty::DirtyLog;
use super::fallbehind::{self, Lag, Mode, Policy, Thresholds};
use super::log::{EntryKind, EntryMeta, LogStats, NewEntry, RecoveryReport, RingLog, SlinkSet};
use super::overlay::Overlay;
use super::slink::{ApplyEntry, SlinkHandler};

mod resync;
pub use resync::ResyncStatus;

/// Largest data of one log entry. Bigger writes are split into entries of this size
/// (they may land in different epochs: a single write has no order within itself).
/// 1 MiB keeps one entry's share of a small log modest while amortising its header.
pub const MAX_ENTRY_DATA: u64 = 1 << 20;

/// Most data appended in one group commit: bounds the latency a big batch adds to the
/// small writes that share it.
const MAX_BATCH_BYTES: u64 = 16 << 20;

/// Most entries in one group commit.
const MAX_BATCH_ENTRIES: usize = 4096;

/// Most entries a copier applies before persisting its cursor (bounds an epoch's
/// share of one apply; a longer epoch is applied in several slices, which keeps write
/// order because the entries of one epoch were concurrent).
const MAX_APPLY_ENTRIES: usize = 4096;

/// Memory for keeping entries' data after the append, so copiers need not read the
/// log back. Past it, copiers read from the log.
const CACHE_BUDGET: u64 = 256 << 20;

/// How often idle threads re-evaluate time-based state (timeout thresholds, probes).
const TICK: Duration = Duration::from_millis(50);

/// First and last delay between probes of an inaccessible SLINK.
const PROBE_MIN: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(15);

pub struct SlinkSetup {
    pub nr: u16,
    pub handler: Arc<dyn SlinkHandler>,
    pub policy: Policy,
    pub thresholds: Thresholds,
}

/// Data of a logged entry, kept in memory.
#[derive(Clone)]
struct Chunk {
    buf: Arc<Vec<u8>>,
    start: usize,
    len: usize,
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A write waiting to be appended (or partly appended: big writes go in slices).
struct Pending {
    dev_nr: u32,
    req: Request,
    done: Completion,
    data: Option<Arc<Vec<u8>>>,
    /// Bytes already appended.
    appended: u64,
    /// SLINKs it must wait for (union over its slices' append times).
    wait: BTreeSet<u16>,
}

struct Awaiting {
    req: Request,
    done: Completion,
    wait: BTreeSet<u16>,
}

struct SlinkRt {
    policy: Policy,
    thresholds: Thresholds,
    /// Highest seq durably applied at the site (the persisted cursor).
    applied: u64,
    /// Entries it still needs: (seq, bytes, appended at).
    outstanding: VecDeque<(u64, u64, Instant)>,
    out_bytes: u64,
    mode: Mode,
    mode_since: SystemTime,
    mode_switches: u64,
    accessible: bool,
    down_since: Option<SystemTime>,
    last_error: Option<String>,
    waiting_for_device: Option<u32>,
    /// Operator pause (`slink <nr> pause`): entries queue in the log, nothing ships.
    paused: bool,
    /// In ordered (log) mode. Off: the SLINK's RDs are out of sync; new writes mark
    /// dirty regions and the resync copies them (DESIGN invariant 5).
    ordered: bool,
    /// Bumped on every ordered/dirty transition: a copier's result from before is void.
    gen: u64,
    resync: resync::ResyncState,
    applied_entries: u64,
    applied_bytes: u64,
    /// Epoch slices applied, and time spent applying them and persisting the cursor (µs).
    applies: u64,
    apply_us: u64,
    cursor_us: u64,
}

impl SlinkRt {
    fn new(policy: Policy, thresholds: Thresholds, ordered: bool, applied: u64, resync: resync::ResyncState) -> Self {
        SlinkRt {
            mode: fallbehind::mode(&policy, &thresholds, &Lag::default()),
            policy,
            thresholds,
            applied,
            outstanding: VecDeque::new(),
            out_bytes: 0,
            mode_since: SystemTime::now(),
            mode_switches: 0,
            accessible: true,
            down_since: None,
            last_error: None,
            waiting_for_device: None,
            paused: false,
            ordered,
            gen: 0,
            resync,
            applied_entries: 0,
            applied_bytes: 0,
            applies: 0,
            apply_us: 0,
            cursor_us: 0,
        }
    }

    /// Whether writes may wait for this SLINK: it is in ordered mode and either
    /// synchronous by policy (then an outage stalls writes: DESIGN invariant 1) or
    /// reachable and not paused (an unreachable asynchronous SLINK does not throttle:
    /// its entries wait in the log, and it leaves ordered mode if the log fills).
    fn throttles(&self) -> bool {
        self.ordered && (self.policy.synchronous || (self.accessible && !self.paused))
    }

    fn lag(&self, now: Instant) -> Lag {
        Lag {
            ios: self.outstanding.len() as u64,
            bytes: self.out_bytes,
            oldest_age: self.outstanding.front().map(|o| now.saturating_duration_since(o.2)),
        }
    }
}

#[derive(Default, Clone, Serialize)]
pub struct Stats {
    pub enabled: bool,
    pub writes: u64,
    pub write_bytes: u64,
    pub batches: u64,
    pub entries: u64,
    pub reads: u64,
    pub reads_from_log: u64,
    pub log_full_waits: u64,
    /// Time spent in log appends (write + sync), microseconds.
    pub append_us: u64,
}

struct State {
    queue: VecDeque<Pending>,
    awaiting: BTreeMap<u64, Awaiting>,
    slinks: BTreeMap<u16, SlinkRt>,
    overlay: Overlay,
    cache: BTreeMap<u64, Chunk>,
    cache_bytes: u64,
    shutdown: bool,
    /// `stop`/`start` messages: shipping paused for every SLINK but 0.
    shipping: bool,
    stats: Stats,
    log_error: Option<String>,
    /// Dirty logs by (slink, dev_nr), with the device's size in bytes.
    dirty: BTreeMap<(u16, u32), (Arc<dyn DirtyLog>, u64)>,
    /// Regions written since the resync of that region started: (slink, dev_nr, region).
    touched: BTreeSet<(u16, u32, u64)>,
    /// Regions the resync is copying now: (slink, dev_nr, region).
    in_copy: BTreeSet<(u16, u32, u64)>,
}

pub(crate) struct Inner {
    pub name: String,
    pub log: RingLog,
    pub log_path: String,
    /// SLINK handlers; an SLINK can be added to a live group (table reload).
    handlers: parking_lot::RwLock<BTreeMap<u16, Arc<dyn SlinkHandler>>>,
    st: Mutex<State>,
    /// Serialises "mark regions dirty + publish the write" against "check + clear a
    /// resynced region" (taken before `st`).
    dirty_lock: Mutex<()>,
    appender_cv: Condvar,
    copier_cv: Condvar,
    pub recovery: Option<RecoveryReport>,
}

/// A running replication group.
pub struct Group {
    pub(crate) inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl Group {
    /// Start a group over an opened log. Entries the log still holds are re-queued for
    /// every SLINK whose cursor is behind them.
    pub fn start(
        name: &str,
        log: RingLog,
        log_path: String,
        recovery: Option<RecoveryReport>,
        slinks: Vec<SlinkSetup>,
    ) -> io::Result<Arc<Group>> {
        let now = Instant::now();
        let mut rts = BTreeMap::new();
        let mut handlers = BTreeMap::new();
        let fresh = recovery.is_none();
        // Recovery cut off entries some site had already applied (corruption of
        // acknowledged entries): the other sites can never get them from the log, so
        // every RD is resynchronised in full from the LD.
        let lost = recovery.as_ref().is_some_and(|r| !r.slinks_ahead.is_empty());
        if lost {
            warn!(group = name, report = ?recovery, "replication log lost entries some site had applied: full resync of every RD");
        }
        for s in slinks {
            if lost && s.nr != 0 && log.cursor(s.nr).is_some() {
                log.unregister_slink(s.nr).map_err(io::Error::other)?;
            }
            // A fresh log starts every SLINK in ordered mode. A reopened log keeps what
            // it says: an SLINK without a cursor had left ordered mode (or is new) and
            // needs a resync of its dirty regions. SLINK 0 is always ordered.
            if log.cursor(s.nr).is_none() && (fresh || s.nr == 0) {
                log.register_slink(s.nr).map_err(io::Error::other)?;
            }
            let ordered = log.cursor(s.nr).is_some();
            if !ordered {
                warn!(group = name, slink = s.nr, "slink is not in ordered mode: its devices will be resynchronised");
            }
            let applied = log.cursor(s.nr).unwrap_or(0);
            let resync = resync::ResyncState { full: lost && s.nr != 0, ..Default::default() };
            rts.insert(s.nr, SlinkRt::new(s.policy, s.thresholds, ordered, applied, resync));
            handlers.insert(s.nr, s.handler);
        }
        let mut overlay = Overlay::default();
        // Re-queue what the recovered log still holds.
        let mut from = 0u64;
        loop {
            let batch = log.entries_from(from, 65536);
            let Some(last) = batch.last().map(|e| e.seq) else { break };
            for e in batch {
                for (nr, rt) in rts.iter_mut() {
                    if e.slinks.contains(*nr) && e.seq > rt.applied {
                        rt.outstanding.push_back((e.seq, e.len as u64, now));
                        rt.out_bytes += e.len as u64;
                        if *nr == 0 {
                            overlay.insert(e.clone());
                        }
                    }
                }
            }
            from = last + 1;
        }
        let inner = Arc::new(Inner {
            name: name.to_string(),
            log,
            log_path,
            handlers: parking_lot::RwLock::new(handlers),
            st: Mutex::new(State {
                queue: VecDeque::new(),
                awaiting: BTreeMap::new(),
                slinks: rts,
                overlay,
                cache: BTreeMap::new(),
                cache_bytes: 0,
                shutdown: false,
                shipping: true,
                stats: Stats::default(),
                log_error: None,
                dirty: BTreeMap::new(),
                touched: BTreeSet::new(),
                in_copy: BTreeSet::new(),
            }),
            dirty_lock: Mutex::new(()),
            appender_cv: Condvar::new(),
            copier_cv: Condvar::new(),
            recovery,
        });
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(std::thread::Builder::new().name(format!("{name}-append")).spawn(move || appender(i))?);
        for nr in inner.handlers.read().keys().copied().collect::<Vec<_>>() {
            let i = inner.clone();
            threads.push(std::thread::Builder::new().name(format!("{name}-slink{nr}")).spawn(move || copier(i, nr))?);
        }
        Ok(Arc::new(Group { inner, threads: Mutex::new(threads) }))
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn handler(&self, nr: u16) -> Option<Arc<dyn SlinkHandler>> {
        self.inner.handler(nr)
    }

    pub fn slink_numbers(&self) -> Vec<u16> {
        self.inner.handlers.read().keys().copied().collect()
    }

    /// Add an SLINK to the live group. It starts out of ordered mode; once its dirty
    /// logs are attached (a `sync` dirty log: every region dirty, so an initial copy
    /// runs while the other SLINKs go on), the resync brings it into ordered mode.
    pub fn add_slink(&self, s: SlinkSetup) -> io::Result<()> {
        let inner = &self.inner;
        {
            let _d = inner.dirty_lock.lock();
            let mut st = inner.st.lock();
            if st.slinks.contains_key(&s.nr) || s.nr == 0 {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("slink {} already exists", s.nr)));
            }
            let resync = resync::ResyncState { new_slink: true, ..Default::default() };
            st.slinks.insert(s.nr, SlinkRt::new(s.policy, s.thresholds, false, 0, resync));
        }
        inner.handlers.write().insert(s.nr, s.handler);
        let i = self.inner.clone();
        let nr = s.nr;
        let t = std::thread::Builder::new().name(format!("{}-slink{nr}", inner.name)).spawn(move || copier(i, nr))?;
        self.threads.lock().push(t);
        info!(group = %inner.name, slink = nr, "slink added to the live group");
        Ok(())
    }

    /// Replace an SLINK's policy and thresholds (table reload).
    pub fn set_policy_and_thresholds(&self, nr: u16, policy: Policy, thresholds: Thresholds) -> Result<(), String> {
        let mut st = self.inner.st.lock();
        let rt = st.slinks.get_mut(&nr).ok_or_else(|| format!("no slink {nr}"))?;
        rt.policy = policy;
        rt.thresholds = thresholds;
        update_mode(&self.inner.name, nr, rt, Instant::now());
        drop(st);
        self.inner.appender_cv.notify_all();
        Ok(())
    }

    /// Wake the copiers (a device was attached).
    pub fn kick(&self) {
        self.inner.copier_cv.notify_all();
    }

    /// Queue a write-like request of device `dev_nr`.
    pub fn submit_write(&self, dev_nr: u32, req: Request, done: Completion) {
        let mut st = self.inner.st.lock();
        if st.shutdown {
            drop(st);
            return done.complete(req, Err(errno(108)));
        }
        if let Some(e) = &st.log_error {
            let e = e.clone();
            drop(st);
            warn!(group = %self.inner.name, "write refused: replication log failed: {e}");
            return done.complete(req, Err(errno(5)));
        }
        if st.stats.enabled {
            st.stats.writes += 1;
            st.stats.write_bytes += req.len;
        }
        st.queue.push_back(Pending { dev_nr, req, done, data: None, appended: 0, wait: BTreeSet::new() });
        drop(st);
        self.inner.appender_cv.notify_one();
    }

    /// Read from device `dev_nr`: the LD, overlaid with entries not yet on it.
    pub fn read(&self, dev_nr: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(dev_nr, offset, buf)
    }
}

impl Inner {
    pub(crate) fn handler(&self, nr: u16) -> Option<Arc<dyn SlinkHandler>> {
        self.handlers.read().get(&nr).cloned()
    }

    /// Read from device `dev_nr`: the LD, overlaid with entries not yet on it.
    fn read(&self, dev_nr: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let ld = self.handler(0).ok_or_else(|| errno(6))?;
        // An entry read back from the log may have been applied and its space reused
        // in the meantime (crc mismatch): then the LD has it, so try again.
        for _ in 0..8 {
            let pending: Vec<(EntryMeta, Option<Chunk>)> = {
                let mut st = self.st.lock();
                if st.stats.enabled {
                    st.stats.reads += 1;
                }
                let over = st.overlay.overlapping(dev_nr, offset, buf.len() as u64);
                if !over.is_empty() && st.stats.enabled {
                    st.stats.reads_from_log += 1;
                }
                over.into_iter()
                    .map(|e| {
                        let c = st.cache.get(&e.seq).cloned();
                        (e, c)
                    })
                    .collect()
            };
            ld.read(dev_nr, offset, buf)?;
            let mut ok = true;
            for (e, chunk) in pending {
                let s = e.offset.max(offset);
                let t = (e.offset + e.len as u64).min(offset + buf.len() as u64);
                let dst = &mut buf[(s - offset) as usize..(t - offset) as usize];
                let src_off = (s - e.offset) as usize;
                match e.kind {
                    EntryKind::Write => match chunk {
                        Some(c) => dst.copy_from_slice(&c.bytes()[src_off..src_off + dst.len()]),
                        None => {
                            let mut data = vec![0u8; e.len as usize];
                            if self.log.read_data(&e, &mut data).is_err() {
                                ok = false;
                                break;
                            }
                            dst.copy_from_slice(&data[src_off..src_off + dst.len()]);
                        }
                    },
                    EntryKind::WriteZeroes | EntryKind::Discard => dst.fill(0),
                }
            }
            if ok {
                return Ok(());
            }
        }
        Err(errno(5))
    }
}

impl Group {
    /// Stop the threads. Queued writes fail with ESHUTDOWN; awaiting ones too (their
    /// entries are in the log and will be shipped after a restart).
    pub fn shutdown(&self) {
        let (queued, awaiting) = {
            let mut st = self.inner.st.lock();
            st.shutdown = true;
            (std::mem::take(&mut st.queue), std::mem::take(&mut st.awaiting))
        };
        self.inner.appender_cv.notify_all();
        self.inner.copier_cv.notify_all();
        for p in queued {
            p.done.complete(p.req, Err(errno(108)));
        }
        for (_, a) in awaiting {
            a.done.complete(a.req, Err(errno(108)));
        }
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        let _ = self.inner.log.sync();
        info!(group = %self.inner.name, "replication group stopped");
    }

    /// Change an SLINK's policy.
    pub fn set_policy(&self, nr: u16, policy: Policy) -> Result<(), String> {
        let mut st = self.inner.st.lock();
        let rt = st.slinks.get_mut(&nr).ok_or_else(|| format!("no slink {nr}"))?;
        if policy.synchronous && !rt.thresholds.is_empty() {
            return Err(format!("slink {nr}: a synchronous slink takes no fall-behind threshold; clear them first"));
        }
        rt.policy = policy;
        update_mode(&self.inner.name, nr, rt, Instant::now());
        drop(st);
        self.inner.appender_cv.notify_all();
        Ok(())
    }

    /// Change one fall-behind threshold.
    pub fn set_threshold(&self, nr: u16, f: impl FnOnce(&mut Thresholds)) -> Result<(), String> {
        let mut st = self.inner.st.lock();
        let rt = st.slinks.get_mut(&nr).ok_or_else(|| format!("no slink {nr}"))?;
        if rt.policy.synchronous {
            return Err(format!("slink {nr} is synchronous: fall-behind thresholds apply to asynchronous slinks"));
        }
        f(&mut rt.thresholds);
        update_mode(&self.inner.name, nr, rt, Instant::now());
        drop(st);
        self.inner.appender_cv.notify_all();
        Ok(())
    }

    pub fn set_shipping(&self, on: bool) {
        self.inner.st.lock().shipping = on;
        self.inner.copier_cv.notify_all();
    }

    /// Pause or resume shipping to one SLINK (not SLINK 0: the LDs are always fed).
    pub fn set_paused(&self, nr: u16, paused: bool) -> Result<(), String> {
        if nr == 0 {
            return Err("slink 0 (the local devices) cannot be paused".into());
        }
        let mut st = self.inner.st.lock();
        let rt = st.slinks.get_mut(&nr).ok_or_else(|| format!("no slink {nr}"))?;
        rt.paused = paused;
        info!(group = %self.inner.name, slink = nr, paused, "slink shipping {}", if paused { "paused" } else { "resumed" });
        drop(st);
        self.inner.copier_cv.notify_all();
        Ok(())
    }

    pub fn statistics(&self, cmd: &str) -> Result<(), String> {
        let mut st = self.inner.st.lock();
        match cmd {
            "on" => st.stats.enabled = true,
            "off" => st.stats.enabled = false,
            "reset" => st.stats = Stats { enabled: st.stats.enabled, ..Stats::default() },
            other => return Err(format!("statistics: expected on|off|reset, found {other:?}")),
        }
        Ok(())
    }

    /// Everything status shows.
    pub fn status(&self) -> GroupStatus {
        let now = Instant::now();
        let handlers = self.inner.handlers.read().clone();
        let st = self.inner.st.lock();
        let slinks = st
            .slinks
            .iter()
            .filter(|(nr, _)| handlers.contains_key(nr))
            .map(|(nr, rt)| {
                let lag = rt.lag(now);
                SlinkStatus {
                    slink: *nr,
                    kind: handlers[nr].kind(),
                    devices: handlers[nr].describe(),
                    policy: rt.policy,
                    thresholds: rt.thresholds,
                    mode: fallbehind::mode(&rt.policy, &rt.thresholds, &lag),
                    mode_since: unix_ms(rt.mode_since),
                    mode_switches: rt.mode_switches,
                    outstanding_ios: lag.ios,
                    outstanding_bytes: lag.bytes,
                    oldest_outstanding_ms: lag.oldest_age.map(|a| a.as_millis() as u64),
                    applied_seq: rt.applied,
                    accessible: rt.accessible,
                    down_since: rt.down_since.map(unix_ms),
                    last_error: rt.last_error.clone(),
                    waiting_for_device: rt.waiting_for_device,
                    shipping: (*nr == 0 || st.shipping) && !rt.paused,
                    paused: rt.paused,
                    sync: resync::status(&st, *nr),
                    applied_entries: rt.applied_entries,
                    applied_bytes: rt.applied_bytes,
                    applies: rt.applies,
                    apply_us: rt.apply_us,
                    cursor_us: rt.cursor_us,
                }
            })
            .collect();
        GroupStatus {
            group: self.inner.name.clone(),
            log_path: self.inner.log_path.clone(),
            log: self.inner.log.stats(),
            queued_writes: st.queue.len(),
            awaiting_writes: st.awaiting.len(),
            pending_on_ld: st.overlay.len(),
            slinks,
            statistics: st.stats.enabled.then(|| st.stats.clone()),
            log_error: st.log_error.clone(),
            recovery: self.inner.recovery.as_ref().map(|r| format!("{r:?}")),
        }
    }

    /// Entries (ios) still outstanding for SLINK `nr`.
    pub fn outstanding(&self, nr: u16) -> Option<u64> {
        self.inner.st.lock().slinks.get(&nr).map(|rt| rt.outstanding.len() as u64)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, Clone, Serialize)]
pub struct SlinkStatus {
    pub slink: u16,
    pub kind: &'static str,
    pub devices: String,
    pub policy: Policy,
    pub thresholds: Thresholds,
    pub mode: Mode,
    pub mode_since: u64,
    pub mode_switches: u64,
    pub outstanding_ios: u64,
    pub outstanding_bytes: u64,
    pub oldest_outstanding_ms: Option<u64>,
    pub applied_seq: u64,
    pub accessible: bool,
    pub down_since: Option<u64>,
    pub last_error: Option<String>,
    pub waiting_for_device: Option<u32>,
    pub shipping: bool,
    pub paused: bool,
    pub sync: ResyncStatus,
    pub applied_entries: u64,
    pub applied_bytes: u64,
    pub applies: u64,
    pub apply_us: u64,
    pub cursor_us: u64,
}

#[derive(Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub log_path: String,
    pub log: LogStats,
    pub queued_writes: usize,
    pub awaiting_writes: usize,
    pub pending_on_ld: usize,
    pub slinks: Vec<SlinkStatus>,
    pub statistics: Option<Stats>,
    pub log_error: Option<String>,
    pub recovery: Option<String>,
}

/// Recompute an SLINK's mode; log a change.
fn update_mode(group: &str, nr: u16, rt: &mut SlinkRt, now: Instant) {
    let m = fallbehind::mode(&rt.policy, &rt.thresholds, &rt.lag(now));
    if m != rt.mode {
        info!(group, slink = nr, from = ?rt.mode, to = ?m, lag = ?rt.lag(now), "slink mode changed");
        rt.mode = m;
        rt.mode_since = SystemTime::now();
        rt.mode_switches += 1;
    }
}

/// One slice of a pending write planned into a batch.
struct Slice {
    /// Index into the batch's pendings.
    p: usize,
    start: u64,
    len: u64,
}

fn entry_kind(op: Op) -> EntryKind {
    match op {
        Op::Write { .. } => EntryKind::Write,
        Op::WriteZeroes { .. } => EntryKind::WriteZeroes,
        _ => EntryKind::Discard,
    }
}

/// Plan a batch from the queue front: slices within batch limits and every async
/// SLINK's fall-behind admission. Takes the planned pendings off the queue.
fn plan(st: &mut State, now: Instant) -> Option<(Vec<Pending>, Vec<Slice>)> {
    if st.queue.is_empty() {
        return None;
    }
    // Sizes of upcoming slices, for admission.
    let mut sizes = Vec::new();
    let mut bytes = 0u64;
    'outer: for p in st.queue.iter() {
        let data = matches!(p.req.op, Op::Write { .. });
        let mut at = p.appended;
        loop {
            let n = (p.req.len - at).min(if data { MAX_ENTRY_DATA } else { u32::MAX as u64 & !511 });
            if sizes.len() >= MAX_BATCH_ENTRIES || (bytes + n > MAX_BATCH_BYTES && !sizes.is_empty()) {
                break 'outer;
            }
            sizes.push((n, if data { n } else { 0 }));
            bytes += if data { n } else { 0 };
            at += n;
            if at >= p.req.len {
                break;
            }
        }
    }
    let mut admit = sizes.len();
    for rt in st.slinks.values().filter(|rt| rt.throttles()) {
        let lag = rt.lag(now);
        admit = admit.min(fallbehind::admit(&rt.policy, &rt.thresholds, &lag, sizes.iter().map(|s| s.0)));
    }
    if admit == 0 {
        return None;
    }
    let mut pendings = Vec::new();
    let mut slices = Vec::new();
    let mut left = admit;
    while left > 0 {
        let Some(mut p) = st.queue.pop_front() else { break };
        if p.data.is_none() {
            p.data = Some(Arc::new(std::mem::take(&mut p.req.buf)));
        }
        let idx = pendings.len();
        let mut at = p.appended;
        let data = matches!(p.req.op, Op::Write { .. });
        while left > 0 && at < p.req.len {
            let n = (p.req.len - at).min(if data { MAX_ENTRY_DATA } else { u32::MAX as u64 & !511 });
            slices.push(Slice { p: idx, start: at, len: n });
            at += n;
            left -= 1;
        }
        pendings.push(p);
    }
    Some((pendings, slices))
}

fn appender(inner: Arc<Inner>) {
    loop {
        let (mut pendings, slices, waits, slinks, unordered) = {
            let mut st = inner.st.lock();
            let planned = loop {
                if st.shutdown {
                    return;
                }
                resync::maybe_reorder(&inner, &mut st);
                if let Some(p) = plan(&mut st, Instant::now()) {
                    break p;
                }
                inner.appender_cv.wait_for(&mut st, TICK);
            };
            let now = Instant::now();
            // Every SLINK in ordered mode needs the new entries; the others get their
            // regions marked dirty instead.
            let mut set = SlinkSet::default();
            let mut waits = BTreeSet::new();
            let mut unordered = Vec::new();
            for (nr, rt) in st.slinks.iter_mut() {
                if !rt.ordered {
                    unordered.push(*nr);
                    continue;
                }
                set.insert(*nr);
                update_mode(&inner.name, *nr, rt, now);
                if rt.throttles() && rt.mode.waits() {
                    waits.insert(*nr);
                }
            }
            (planned.0, planned.1, waits, set, unordered)
        };
        let entries: Vec<NewEntry<'_>> = slices
            .iter()
            .map(|s| {
                let p = &pendings[s.p];
                let kind = entry_kind(p.req.op);
                let data: &[u8] = match kind {
                    EntryKind::Write => {
                        &p.data.as_ref().expect("planned")[s.start as usize..(s.start + s.len) as usize]
                    }
                    _ => &[],
                };
                NewEntry { dev_nr: p.dev_nr, offset: p.req.offset + s.start, kind, len: s.len as u32, data, slinks }
            })
            .collect();
        let t0 = Instant::now();
        let result = inner.log.append(&entries);
        let append_us = t0.elapsed().as_micros() as u64;
        drop(entries);
        inner.st.lock().stats.append_us += append_us;
        match result {
            Ok(metas) => {
                // SLINKs out of ordered mode: their regions are durably dirty before
                // the write is acknowledged, and published with the write (under the
                // dirty lock) so that a resync of the region cannot miss it.
                let _d = inner.dirty_lock.lock();
                if let Err(e) = resync::mark_written(&inner, &unordered, &metas) {
                    warn!(group = %inner.name, "marking dirty regions failed: {e}");
                    inner.st.lock().log_error = Some(format!("dirty log: {e}"));
                    for p in pendings {
                        p.done.complete(p.req, Err(errno(5)));
                    }
                    continue;
                }
                finish_append(&inner, pendings, &slices, metas, &waits, &unordered)
            }
            Err(super::log::LogError::Full { .. }) => {
                // Nothing was written: put the writes back, in order. An SLINK holding
                // the log that may leave ordered mode does so; else wait for copiers.
                let switched = resync::leave_ordered_for_space(&inner);
                let mut st = inner.st.lock();
                st.stats.log_full_waits += 1;
                for p in pendings.drain(..).rev() {
                    st.queue.push_front(p);
                }
                if !switched {
                    inner.appender_cv.wait_for(&mut st, TICK);
                }
            }
            Err(e) => {
                warn!(group = %inner.name, "replication log append failed: {e}");
                let mut st = inner.st.lock();
                st.log_error = Some(e.to_string());
                drop(st);
                for p in pendings {
                    p.done.complete(p.req, Err(errno(5)));
                }
            }
        }
    }
}

/// Record appended entries, acknowledge what may be acknowledged.
fn finish_append(
    inner: &Inner,
    pendings: Vec<Pending>,
    slices: &[Slice],
    metas: Vec<EntryMeta>,
    waits: &BTreeSet<u16>,
    unordered: &[u16],
) {
    let now = Instant::now();
    let mut ready = Vec::new();
    let mut st = inner.st.lock();
    resync::touch(&mut st, unordered, &metas);
    st.stats.batches += 1;
    st.stats.entries += metas.len() as u64;
    let mut last_seq: Vec<u64> = vec![0; pendings.len()];
    for (s, m) in slices.iter().zip(metas) {
        last_seq[s.p] = m.seq;
        if m.kind == EntryKind::Write && st.cache_bytes + m.len as u64 <= CACHE_BUDGET {
            let buf = pendings[s.p].data.clone().expect("planned");
            st.cache_bytes += m.len as u64;
            st.cache.insert(m.seq, Chunk { buf, start: s.start as usize, len: s.len as usize });
        }
        for (nr, rt) in st.slinks.iter_mut() {
            if m.slinks.contains(*nr) {
                rt.outstanding.push_back((m.seq, m.len as u64, now));
                rt.out_bytes += m.len as u64;
            }
        }
        if m.slinks.contains(0) {
            st.overlay.insert(m);
        }
    }
    for (nr, rt) in st.slinks.iter_mut() {
        update_mode(&inner.name, *nr, rt, now);
    }
    for (i, mut p) in pendings.into_iter().enumerate() {
        p.wait.extend(waits.iter().copied());
        p.appended += slices.iter().filter(|s| s.p == i).map(|s| s.len).sum::<u64>();
        if p.appended < p.req.len {
            // The rest goes in a later batch, before anything queued after it.
            st.queue.push_front(p);
            continue;
        }
        // Slices already applied by a fast copier? Only SLINKs behind the last seq wait.
        let seq = last_seq[i];
        p.wait.retain(|nr| st.slinks.get(nr).is_some_and(|rt| rt.applied < seq));
        if p.wait.is_empty() {
            ready.push((p.req, p.done));
        } else {
            st.awaiting.insert(seq, Awaiting { req: p.req, done: p.done, wait: p.wait });
        }
    }
    drop(st);
    inner.copier_cv.notify_all();
    for (req, done) in ready {
        done.complete(req, Ok(()));
    }
}

/// What a copier does next.
enum Work {
    Apply(u64, Vec<(EntryMeta, Option<Chunk>)>),
    Resync,
    Probe,
}

/// Persists one SLINK's cursor in the log off the copier's path, so that epoch e's
/// cursor is written while epoch e+1's data goes to the site.
///
/// Order rule (why this is safe): after a crash the copier re-applies every entry after
/// the durable cursor. Re-applying epoch e over a site that also holds part of e+1 is
/// harmless (e+1's writes were concurrent with each other), but re-applying e-1 over e+1
/// could roll back a block e+1 depends on. So before epoch e+1 starts, the cursor of
/// epoch e-1 must be durable: the copier waits for the previous persist before
/// handing over the next one, and only then takes new work.
struct CursorPipe {
    tx: Option<crossbeam_channel::Sender<u64>>,
    done: crossbeam_channel::Receiver<Result<(), String>>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl CursorPipe {
    fn new(inner: Arc<Inner>, nr: u16) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<u64>(1);
        let (dtx, done) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new().name(format!("{}-cursor{nr}", inner.name)).spawn(move || {
            for seq in rx {
                let t0 = Instant::now();
                let r = match inner.log.set_cursors(&[(nr, seq)]) {
                    // The SLINK left (and maybe re-entered) ordered mode since: the
                    // persisted state already moved past this cursor.
                    Err(super::log::LogError::UnknownSlink(_) | super::log::LogError::CursorBackwards { .. }) => Ok(()),
                    r => r.map_err(|e| e.to_string()),
                };
                if let Some(rt) = inner.st.lock().slinks.get_mut(&nr) {
                    rt.cursor_us += t0.elapsed().as_micros() as u64;
                }
                if dtx.send(r).is_err() {
                    return;
                }
            }
        })?;
        Ok(CursorPipe { tx: Some(tx), done, in_flight: false, thread: Some(thread) })
    }

    /// Wait for the persist in flight, if any.
    fn wait(&mut self) -> Result<(), String> {
        if std::mem::take(&mut self.in_flight) {
            return self.done.recv().unwrap_or_else(|_| Err("cursor thread gone".into()));
        }
        Ok(())
    }

    /// Wait for the previous persist, then start persisting `seq`.
    fn persist(&mut self, seq: u64) -> Result<(), String> {
        let prev = self.wait();
        if let Some(tx) = &self.tx {
            if tx.send(seq).is_ok() {
                self.in_flight = true;
            }
        }
        prev
    }
}

impl Drop for CursorPipe {
    fn drop(&mut self) {
        let _ = self.wait();
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn copier(inner: Arc<Inner>, nr: u16) {
    let Some(handler) = inner.handler(nr) else { return };
    let mut backoff = PROBE_MIN;
    let mut next_probe = Instant::now();
    let mut cursor = match CursorPipe::new(inner.clone(), nr) {
        Ok(c) => c,
        Err(e) => {
            warn!(group = %inner.name, slink = nr, "cannot start the cursor thread: {e}");
            return;
        }
    };
    loop {
        let work = {
            let mut st = inner.st.lock();
            loop {
                if st.shutdown {
                    return;
                }
                let rt = &st.slinks[&nr];
                let shipping = (nr == 0 || st.shipping) && !rt.paused;
                if !rt.accessible {
                    if Instant::now() >= next_probe {
                        break Work::Probe;
                    }
                } else if shipping && !rt.ordered && !rt.resync.done {
                    break Work::Resync;
                } else if shipping && !rt.outstanding.is_empty() {
                    if let Some(w) = next_epoch(&inner, &mut st, nr, &*handler) {
                        break Work::Apply(st.slinks[&nr].gen, w);
                    }
                }
                inner.copier_cv.wait_for(&mut st, TICK);
            }
        };
        match work {
            Work::Probe => match handler.probe() {
                Ok(()) => {
                    let mut st = inner.st.lock();
                    let rt = st.slinks.get_mut(&nr).expect("slink");
                    rt.accessible = true;
                    rt.down_since = None;
                    info!(group = %inner.name, slink = nr, "slink accessible again; resuming shipping");
                    backoff = PROBE_MIN;
                }
                Err(e) => {
                    backoff = (backoff * 2).min(PROBE_MAX);
                    next_probe = Instant::now() + backoff;
                    inner.st.lock().slinks.get_mut(&nr).expect("slink").last_error = Some(e.to_string());
                }
            },
            Work::Resync => {
                if let Err(e) = resync::step(&inner, nr, &*handler) {
                    warn!(group = %inner.name, slink = nr, "resync failed, marking inaccessible: {e}");
                    let mut st = inner.st.lock();
                    let rt = st.slinks.get_mut(&nr).expect("slink");
                    rt.accessible = false;
                    rt.down_since = Some(SystemTime::now());
                    rt.last_error = Some(e.to_string());
                    backoff = PROBE_MIN;
                    next_probe = Instant::now() + backoff;
                }
            }
            Work::Apply(gen, batch) => match apply(&inner, nr, &*handler, gen, batch) {
                Ok(None) => {}
                Ok(Some(last)) => {
                    if let Err(e) = cursor.persist(last) {
                        warn!(group = %inner.name, slink = nr, "persisting the slink cursor failed: {e}");
                        inner.st.lock().log_error = Some(format!("persisting slink {nr} cursor: {e}"));
                    }
                }
                Err(e) => {
                    warn!(group = %inner.name, slink = nr, "slink failed, marking inaccessible: {e}");
                    let mut st = inner.st.lock();
                    let rt = st.slinks.get_mut(&nr).expect("slink");
                    rt.accessible = false;
                    rt.down_since = Some(SystemTime::now());
                    rt.last_error = Some(e.to_string());
                    backoff = PROBE_MIN;
                    next_probe = Instant::now() + backoff;
                }
            },
        }
    }
}

/// The next entries SLINK `nr` must apply: the rest of the first epoch it lacks, only
/// entries the appender has recorded (seq <= its last outstanding), and only once
/// their devices are attached.
fn next_epoch(
    inner: &Inner,
    st: &mut State,
    nr: u16,
    handler: &dyn SlinkHandler,
) -> Option<Vec<(EntryMeta, Option<Chunk>)>> {
    let rt = &st.slinks[&nr];
    let last_known = rt.outstanding.back()?.0;
    let metas = inner.log.entries_from(rt.applied + 1, MAX_APPLY_ENTRIES);
    let mut epoch = None;
    let mut out = Vec::new();
    for m in metas {
        if m.seq > last_known {
            break;
        }
        if !m.slinks.contains(nr) {
            continue;
        }
        match epoch {
            None => epoch = Some(m.epoch),
            Some(e) if e != m.epoch => break,
            _ => {}
        }
        if !handler.has_device(m.dev_nr) {
            let rt = st.slinks.get_mut(&nr).expect("slink");
            rt.waiting_for_device = Some(m.dev_nr);
            return None;
        }
        let c = st.cache.get(&m.seq).cloned();
        out.push((m, c));
    }
    st.slinks.get_mut(&nr).expect("slink").waiting_for_device = None;
    (!out.is_empty()).then_some(out)
}

/// Apply entries to the site (durably), then account and acknowledge. Returns the last
/// seq applied; the caller persists it as the SLINK's cursor.
fn apply(
    inner: &Inner,
    nr: u16,
    handler: &dyn SlinkHandler,
    gen: u64,
    batch: Vec<(EntryMeta, Option<Chunk>)>,
) -> io::Result<Option<u64>> {
    // Entries not in the cache are read back from the log.
    let mut owned: Vec<Option<Vec<u8>>> = Vec::with_capacity(batch.len());
    for (m, c) in &batch {
        if m.kind == EntryKind::Write && c.is_none() {
            let mut v = vec![0u8; m.len as usize];
            inner.log.read_data(m, &mut v).map_err(io::Error::other)?;
            owned.push(Some(v));
        } else {
            owned.push(None);
        }
    }
    let entries: Vec<ApplyEntry<'_>> = batch
        .iter()
        .zip(&owned)
        .map(|((m, c), o)| ApplyEntry {
            dev_nr: m.dev_nr,
            offset: m.offset,
            len: m.len,
            kind: m.kind,
            data: match (c, o) {
                (Some(c), _) => c.bytes(),
                (None, Some(v)) => v,
                _ => &[],
            },
        })
        .collect();
    let t0 = Instant::now();
    handler.apply(&entries)?;
    let t1 = Instant::now();
    let last = batch.last().expect("non-empty").0.seq;

    let now = Instant::now();
    let mut ready = Vec::new();
    let mut st = inner.st.lock();
    let rt = st.slinks.get_mut(&nr).expect("slink");
    if rt.gen != gen {
        // The SLINK left ordered mode meanwhile: these entries are dirty regions now.
        return Ok(None);
    }
    rt.applied = last;
    rt.applies += 1;
    rt.apply_us += (t1 - t0).as_micros() as u64;
    while rt.outstanding.front().is_some_and(|o| o.0 <= last) {
        let (_, b, _) = rt.outstanding.pop_front().expect("front");
        rt.out_bytes -= b;
        rt.applied_entries += 1;
        rt.applied_bytes += b;
    }
    update_mode(&inner.name, nr, rt, now);
    if nr == 0 {
        for (m, _) in &batch {
            st.overlay.remove(m);
        }
    }
    let done_seqs: Vec<u64> = st
        .awaiting
        .range_mut(..=last)
        .filter_map(|(seq, a)| {
            a.wait.remove(&nr);
            a.wait.is_empty().then_some(*seq)
        })
        .collect();
    for s in done_seqs {
        let a = st.awaiting.remove(&s).expect("present");
        ready.push((a.req, a.done));
    }
    // Data every SLINK has applied leaves the cache.
    let min_applied = st.slinks.values().map(|r| r.applied).min().unwrap_or(0);
    while let Some((&seq, _)) = st.cache.first_key_value() {
        if seq > min_applied {
            break;
        }
        let c = st.cache.remove(&seq).expect("present");
        st.cache_bytes -= c.len as u64;
    }
    drop(st);
    inner.appender_cv.notify_all();
    for (req, done) in ready {
        done.complete(req, Ok(()));
    }
    Ok(Some(last))
}
