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

use dmrep_core::{Completion, Request};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use tracing::{info, warn};

use super::dirty::DirtyLog;
use super::fallbehind::{self, Lag, Mode, Policy, Thresholds};
use super::log::{EntryKind, EntryMeta, LogStats, RecoveryReport, RingLog};
use super::overlay::Overlay;
use super::slink::SlinkHandler;

mod append;
mod copier;
mod cursors;
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
    dev_nr: u32,
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
    /// Persists the SLINKs' cursors, coalescing concurrent updates.
    cursors: cursors::Committer,
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
    /// The appender and the copiers.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The cursor committer: stopped after the copiers, which wait for it.
    committer: Mutex<Option<JoinHandle<()>>>,
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
                    // Only SLINKs in ordered mode ship entries; the others have them as
                    // dirty regions already.
                    if rt.ordered && e.slinks.contains(*nr) && e.seq > rt.applied {
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
            cursors: cursors::Committer::default(),
            appender_cv: Condvar::new(),
            copier_cv: Condvar::new(),
            recovery,
        });
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(std::thread::Builder::new().name(format!("{name}-append")).spawn(move || append::appender(i))?);
        for nr in inner.handlers.read().keys().copied().collect::<Vec<_>>() {
            let i = inner.clone();
            threads.push(
                std::thread::Builder::new().name(format!("{name}-slink{nr}")).spawn(move || copier::copier(i, nr))?,
            );
        }
        let i = inner.clone();
        let committer = std::thread::Builder::new().name(format!("{name}-cursors")).spawn(move || cursors::run(&i))?;
        Ok(Arc::new(Group { inner, threads: Mutex::new(threads), committer: Mutex::new(Some(committer)) }))
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
        let t = std::thread::Builder::new()
            .name(format!("{}-slink{nr}", inner.name))
            .spawn(move || copier::copier(i, nr))?;
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
        self.inner.cursors.stop();
        if let Some(t) = self.committer.lock().take() {
            let _ = t.join();
        }
        let _ = self.inner.log.sync();
        info!(group = %self.inner.name, "replication group stopped");
    }

    /// Give back the writes of device `dev_nr` that the group still holds (queued, or
    /// waiting for a synchronous SLINK): they fail with ESHUTDOWN (the device is going
    /// away). Entries already in the log stay there and are shipped as usual.
    pub fn cancel_device(&self, dev_nr: u32) {
        let (queued, waiting) = {
            let mut st = self.inner.st.lock();
            let (queued, keep): (VecDeque<Pending>, VecDeque<Pending>) =
                std::mem::take(&mut st.queue).into_iter().partition(|p| p.dev_nr == dev_nr);
            st.queue = keep;
            let seqs: Vec<u64> = st.awaiting.iter().filter(|(_, a)| a.dev_nr == dev_nr).map(|(s, _)| *s).collect();
            let waiting: Vec<Awaiting> = seqs.iter().filter_map(|s| st.awaiting.remove(s)).collect();
            (queued, waiting)
        };
        if !queued.is_empty() || !waiting.is_empty() {
            warn!(group = %self.inner.name, dev_nr, queued = queued.len(), waiting = waiting.len(), "device going away: its held writes fail");
        }
        for p in queued {
            p.done.complete(p.req, Err(errno(108)));
        }
        for a in waiting {
            a.done.complete(a.req, Err(errno(108)));
        }
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
