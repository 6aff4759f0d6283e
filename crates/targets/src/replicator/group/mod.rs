//! A replication group: one log, its SLINKs, its devices, and the threads that move
//! writes through them.
//!
//! Write path: a replicator-dev queues the write here; the *appender* thread takes all
//! queued writes (group commit), appends them to the log as one epoch with one sync,
//! and then acknowledges each write whose synchronous SLINKs (by policy, or forced by
//! fall-behind) have nothing left to do; others wait until those SLINKs report the entry
//! applied. One *copier* thread per SLINK (SLINK 0, the LDs, included: DESIGN invariant
//! 3) applies entries in log order, one epoch at a time, makes them durable at the site,
//! then persists its cursor in the log.
//!
//! Every state change and every completion happens in [`machine`] (one `apply` for
//! events, one `control` for commands), under one mutex; the threads in [`workers`] only
//! wait and do I/O (log append, dirty-log flushes, device writes, cursor persistence),
//! never under the mutex.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use dmrep_core::{Completion, Request};
use parking_lot::{Condvar, Mutex};
use rustix::io::Errno;
use serde::Serialize;
use tracing::{info, warn};

use super::dirty::DirtyLog;
use super::fallbehind::{InForce, Policy, Thresholds};
use super::log::{EntryKind, EntryMeta, LogStats, Origin, RecoveryReport, RingLog};
use super::marker::{self, MarkerHook};
use super::slink::SlinkHandler;

mod cursors;
pub mod error;
mod machine;
pub mod markers;
pub mod roles;
pub mod site;
mod status;
#[cfg(test)]
mod tests;
pub mod verify;
mod workers;

pub use error::{DevNr, GroupError, Seq, SlinkNr};
use machine::{Control, Effects, Event, Io, Machine};
pub use status::ResyncStatus;

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

/// Most data an SLINK whose site keeps its own log takes in one apply (several epochs;
/// the data is held in memory meanwhile): 32 MiB is a third of a second at 100 MB/s, so a
/// WAN link stays busy between acknowledgements, and below the site protocol's 64 MiB.
const MAX_MULTI_EPOCH_BYTES: u64 = 32 << 20;

/// Memory for keeping entries' data after the append, so copiers need not read the
/// log back. Past it, copiers read from the log.
const CACHE_BUDGET: u64 = 256 << 20;

/// How often idle threads re-evaluate time-based state (timeout thresholds, probes).
const TICK: Duration = Duration::from_millis(50);

/// Longest a clean stop waits for SLINK 0 to apply what the log holds: long enough for a
/// full log at disk speed in the usual case, short enough not to hold a shutdown hostage
/// to a failing LD (what is left is applied at the next start).
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// First and last delay between probes of an inaccessible SLINK.
const PROBE_MIN: Duration = Duration::from_millis(200);
const PROBE_MAX: Duration = Duration::from_secs(15);

pub struct SlinkSetup {
    pub nr: SlinkNr,
    pub handler: Arc<dyn SlinkHandler>,
    pub policy: Policy,
    pub thresholds: Thresholds,
}

/// Data of a logged entry, kept in memory.
#[derive(Clone)]
pub(crate) struct Chunk {
    buf: Arc<Vec<u8>>,
    start: usize,
    len: usize,
}

/// An entry overlaying a read, with its data if cached.
type Overlaid = (EntryMeta, Option<Chunk>);

impl Chunk {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
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

pub(crate) struct Inner {
    pub name: String,
    pub log: Arc<RingLog>,
    pub log_path: String,
    /// The state machine: every group state change happens in it, under this lock.
    m: Mutex<Machine>,
    /// Persists the SLINKs' cursors, coalescing concurrent updates.
    cursors: cursors::Committer,
    appender_cv: Condvar,
    copier_cv: Condvar,
    pub recovery: Option<RecoveryReport>,
    /// Acts on the markers this site's copiers reach (see [`super::marker`]).
    hook: Mutex<Option<Arc<dyn MarkerHook>>>,
    /// Signalled when the hook is set.
    hook_set: Condvar,
    /// What the hook did, by marker name.
    markers: marker::Outcomes,
    /// SLINKs whose devices are snapshotted before a resync overwrites them, and those
    /// whose resync snapshot exists now.
    resync_snapshots: Mutex<(std::collections::BTreeSet<SlinkNr>, std::collections::BTreeSet<SlinkNr>)>,
}

/// A running replication group.
pub struct Group {
    pub(crate) inner: Arc<Inner>,
    /// The appender and the copiers.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The cursor committer: stopped after the copiers, which wait for it.
    committer: Mutex<Option<JoinHandle<()>>>,
    /// At a secondary: what its receiver knows of the primary.
    following: Mutex<site::Following>,
    /// Serialises what decides the site's role at a handshake or a promotion: the
    /// number of the newest primary session admitted (see [`Group::admission`]).
    roles: Mutex<u64>,
    /// The current or last online verify.
    verify: Mutex<Option<verify::VerifyStatus>>,
}

impl Inner {
    /// Feed the machine an event; carry out its effects. Returns the I/O to do next.
    fn event(&self, ev: Event) -> (Option<Io>, Option<Seq>) {
        let fx = self.m.lock().apply(Instant::now(), ev);
        self.carry_out(fx)
    }

    /// Send replies, flush what is to flush, wake threads: outside the lock.
    fn carry_out(&self, fx: Effects) -> (Option<Io>, Option<Seq>) {
        let Effects { replies, io, cursor, flush, wake_appender, wake_copiers } = fx;
        if wake_appender {
            self.appender_cv.notify_all();
        }
        if wake_copiers {
            self.copier_cv.notify_all();
        }
        for (req, done, result) in replies {
            done.complete(req, result);
        }
        for log in flush {
            if let Err(e) = log.flush() {
                // Only clears and initial marks go this way: a lost clear costs a copy.
                warn!(group = %self.name, "flushing a dirty log failed: {e}");
            }
        }
        (io, cursor)
    }

    /// An operator's or a table's command, carried out to the end (leaving ordered mode
    /// included).
    fn control(&self, c: Control) -> Result<(), GroupError> {
        let fx = self.m.lock().control(Instant::now(), c)?;
        let (mut io, _) = self.carry_out(fx);
        while let Some(i) = io.take() {
            let ev = match i {
                Io::Leave { slink, logs } => self.leave(slink, &logs),
                other => {
                    debug_assert!(false, "a command asked for I/O it cannot do");
                    drop(other);
                    break;
                }
            };
            io = self.event(ev).0;
        }
        Ok(())
    }

    /// Make an SLINK's dirty regions durable, then drop its cursor from the log.
    fn leave(&self, slink: SlinkNr, logs: &[Arc<dyn DirtyLog>]) -> Event {
        let result = logs
            .iter()
            .try_for_each(|l| l.flush())
            .map_err(|source| GroupError::DirtyLog { slink, source })
            .and_then(|()| self.log.unregister_slink(slink).map_err(GroupError::Log));
        Event::Left { slink, result }
    }

    pub(crate) fn handler(&self, nr: SlinkNr) -> Option<Arc<dyn SlinkHandler>> {
        self.m.lock().slinks.get(&nr).map(|rt| rt.handler.clone())
    }

    /// Read from device `dev_nr`: the LD, overlaid with entries not yet on it.
    fn read(&self, dev_nr: DevNr, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // An entry read back from the log may have been applied and its space reused
        // in the meantime (crc mismatch): then the LD has it, so try again.
        for _ in 0..8 {
            let (ld, pending): (Arc<dyn SlinkHandler>, Vec<Overlaid>) = {
                let mut m = self.m.lock();
                let over = m.overlay.overlapping(dev_nr, offset, buf.len() as u64);
                if m.stats.enabled {
                    m.stats.reads += 1;
                    if !over.is_empty() {
                        m.stats.reads_from_log += 1;
                    }
                }
                let ld = m.slinks[&0].handler.clone();
                let pending = over
                    .into_iter()
                    .map(|e| {
                        let c = m.cache.get(&e.seq).cloned();
                        (e, c)
                    })
                    .collect();
                (ld, pending)
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
                    // A discard is applied as zeroes (reads never change with timing).
                    EntryKind::WriteZeroes | EntryKind::Discard => dst.fill(0),
                    EntryKind::Marker => {}
                }
            }
            if ok {
                return Ok(());
            }
        }
        Err(error::errno(Errno::IO))
    }
}

impl Group {
    /// Start a group over an opened log. Entries the log still holds are re-queued for
    /// every SLINK whose cursor is behind them.
    pub fn start(
        name: &str,
        log: impl Into<Arc<RingLog>>,
        log_path: String,
        recovery: Option<RecoveryReport>,
        slinks: Vec<SlinkSetup>,
    ) -> Result<Arc<Group>, GroupError> {
        let fresh = recovery.is_none();
        // Recovery cut off entries some site had already applied (corruption of
        // acknowledged entries): the other sites can never get them from the log, so
        // every RD is resynchronised in full from the LD.
        let lost = recovery.as_ref().is_some_and(|r| !r.slinks_ahead.is_empty());
        if lost {
            warn!(group = name, report = ?recovery, "replication log lost entries some site had applied: full resync of every RD");
        }
        let log: Arc<RingLog> = log.into();
        let numbers: Vec<SlinkNr> = slinks.iter().map(|s| s.nr).collect();
        let machine = Machine::new(name, log.clone(), fresh, lost, slinks, Instant::now())?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            log,
            log_path,
            m: Mutex::new(machine),
            cursors: cursors::Committer::default(),
            appender_cv: Condvar::new(),
            copier_cv: Condvar::new(),
            recovery,
            hook: Mutex::new(None),
            hook_set: Condvar::new(),
            markers: marker::Outcomes::default(),
            resync_snapshots: Mutex::default(),
        });
        let spawn_err = GroupError::Threads;
        let mut threads = Vec::new();
        let i = inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("{name}-append"))
                .spawn(move || workers::appender(i))
                .map_err(spawn_err)?,
        );
        for nr in numbers {
            threads.push(workers::spawn_copier(&inner, nr).map_err(spawn_err)?);
        }
        let i = inner.clone();
        let committer = std::thread::Builder::new()
            .name(format!("{name}-cursors"))
            .spawn(move || cursors::run(&i))
            .map_err(spawn_err)?;
        Ok(Arc::new(Group {
            inner,
            threads: Mutex::new(threads),
            committer: Mutex::new(Some(committer)),
            following: Mutex::default(),
            roles: Mutex::new(0),
            verify: Mutex::new(None),
        }))
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn handler(&self, nr: SlinkNr) -> Option<Arc<dyn SlinkHandler>> {
        self.inner.handler(nr)
    }

    pub fn slink_numbers(&self) -> Vec<SlinkNr> {
        self.inner.m.lock().slinks.keys().copied().collect()
    }

    /// The devices of the group (LDs attached to SLINK 0).
    pub fn device_numbers(&self) -> Vec<DevNr> {
        self.inner.handler(0).map(|h| h.devices()).unwrap_or_default()
    }

    /// Add an SLINK to the live group together with the dirty logs of its devices
    /// `(dev_nr, log, device bytes, every region dirty)`: atomically, one for every
    /// device of the group. A `sync` dirty log means an initial copy, which runs while
    /// the other SLINKs go on; the SLINK joins ordered mode when it ends.
    pub fn add_slink(
        &self,
        s: SlinkSetup,
        dirty: Vec<(DevNr, Arc<dyn DirtyLog>, u64, bool)>,
    ) -> Result<(), GroupError> {
        let nr = s.nr;
        let logs: Vec<Arc<dyn DirtyLog>> = dirty.iter().map(|d| d.1.clone()).collect();
        self.inner.control(Control::AddSlink(s, dirty))?;
        for l in logs {
            l.flush().map_err(|source| GroupError::DirtyLog { slink: nr, source })?;
        }
        let t = workers::spawn_copier(&self.inner, nr).map_err(GroupError::Threads)?;
        self.threads.lock().push(t);
        Ok(())
    }

    /// Take SLINK `nr` out of the live group (a reloaded table leaves it out): it stops,
    /// nothing waits for it any more, and its claim on the log's entries goes.
    pub fn remove_slink(&self, nr: SlinkNr) -> Result<(), GroupError> {
        self.inner.control(Control::RemoveSlink(nr))?;
        self.inner.log.unregister_slink(nr).map_err(GroupError::Log)?;
        self.inner.appender_cv.notify_all();
        Ok(())
    }

    /// Replace an SLINK's policy and thresholds (table reload).
    pub fn set_policy_and_thresholds(&self, nr: SlinkNr, policy: Policy, t: Thresholds) -> Result<(), GroupError> {
        self.inner.control(Control::SetPolicy { slink: nr, policy, thresholds: Some(t) })
    }

    /// Wake the copiers (a device was attached).
    pub fn kick(&self) {
        self.inner.copier_cv.notify_all();
    }

    /// Queue a write-like request of device `dev_nr`.
    pub fn submit_write(&self, dev_nr: DevNr, req: Request, done: Completion) {
        let _ = self.inner.event(Event::Submit { dev_nr, req, done, origin: None });
    }

    /// Queue a write received from the primary (at a secondary): appended with its
    /// origin, answered once durable in this site's log.
    pub fn submit_received(&self, dev_nr: DevNr, req: Request, done: Completion, origin: Origin) {
        let _ = self.inner.event(Event::Submit { dev_nr, req, done, origin: Some(origin) });
    }

    /// Queue a marker received from the primary (at a secondary), like a received write.
    pub fn submit_received_marker(&self, description: Vec<u8>, done: Completion, origin: Origin) {
        let _ = self.inner.event(Event::Mark { description, done, origin: Some(origin) });
    }

    /// Read from device `dev_nr`: the LD, overlaid with entries not yet on it.
    pub fn read(&self, dev_nr: DevNr, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(dev_nr, offset, buf)
    }

    /// Stop the threads. Queued writes fail with ESHUTDOWN; awaiting ones too (their
    /// entries are in the log and will be shipped after a restart).
    pub fn shutdown(&self) {
        self.drain_ld();
        let _ = self.inner.control(Control::Shutdown);
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

    /// A clean stop: wait (at most [`DRAIN_WAIT`]) until SLINK 0 has applied every entry,
    /// so that the LD files hold every acknowledged write while the daemon is down.
    fn drain_ld(&self) {
        let until = Instant::now() + DRAIN_WAIT;
        let mut m = self.inner.m.lock();
        let mut said = false;
        loop {
            let left = m.slinks.get(&0).map(|rt| rt.lag(Instant::now()).ios).unwrap_or(0);
            if left == 0 || m.log_error.is_some() {
                return;
            }
            if !std::mem::replace(&mut said, true) {
                info!(group = %self.inner.name, entries = left, "stopping: waiting for the LDs to have every entry of the log");
            }
            if Instant::now() >= until {
                warn!(group = %self.inner.name, entries = left, "stopping with entries not yet on the LDs: they stay in the log and are applied at the next start");
                return;
            }
            self.inner.copier_cv.wait_for(&mut m, TICK);
        }
    }

    /// Give back the writes of device `dev_nr` that the group still holds (queued, or
    /// waiting for a synchronous SLINK): they fail with ESHUTDOWN (the device is going
    /// away). Entries already in the log stay there and are shipped as usual.
    pub fn cancel_device(&self, dev_nr: DevNr) {
        let _ = self.inner.control(Control::CancelDevice(dev_nr));
    }

    /// A replicator-dev went away: see [`Machine`]'s `remove_device`.
    pub fn remove_device(&self, dev_nr: DevNr) {
        let _ = self.inner.control(Control::RemoveDevice(dev_nr));
    }

    /// Change an SLINK's policy.
    pub fn set_policy(&self, nr: SlinkNr, policy: Policy) -> Result<(), GroupError> {
        self.inner.control(Control::SetPolicy { slink: nr, policy, thresholds: None })
    }

    /// Change fall-behind thresholds: those set in `update` change, the others stay
    /// (all go first with `clear`).
    pub fn set_thresholds(&self, nr: SlinkNr, update: Thresholds, clear: bool) -> Result<(), GroupError> {
        self.inner.control(Control::SetThresholds { slink: nr, update, clear })
    }

    pub fn set_shipping(&self, on: bool) {
        let _ = self.inner.control(Control::Shipping(on));
    }

    /// Pause or resume shipping to one SLINK (not SLINK 0: the LDs are always fed).
    pub fn set_paused(&self, nr: SlinkNr, paused: bool) -> Result<(), GroupError> {
        self.inner.control(Control::Pause { slink: nr, paused })
    }

    pub fn statistics(&self, cmd: &str) -> Result<(), GroupError> {
        self.inner.control(Control::Statistics(cmd.to_string()))
    }

    /// Attach the dirty log of device `dev` on SLINK `nr`. With `initial_dirty` every
    /// region starts dirty (a `sync` dirty log on a new RD: initial full copy).
    pub fn attach_dirty_log(
        &self,
        nr: SlinkNr,
        dev: DevNr,
        log: Arc<dyn DirtyLog>,
        dev_bytes: u64,
        initial_dirty: bool,
    ) -> Result<(), GroupError> {
        self.inner.control(Control::AttachDirty { slink: nr, dev, log, dev_bytes, initial_dirty })
    }

    /// Hold the writes of every device of the group (the control device is suspended):
    /// no new batch goes into the log, and this returns once the batch being appended, if
    /// any, is settled (at most [`DRAIN_WAIT`]): the log then holds whole writes only.
    pub fn freeze(&self) {
        let _ = self.inner.control(Control::Freeze(true));
        let until = Instant::now() + DRAIN_WAIT;
        let mut m = self.inner.m.lock();
        while (m.appending || m.awaiting_flush()) && Instant::now() < until {
            self.inner.copier_cv.wait_for(&mut m, TICK);
        }
    }

    /// Let the group's writes flow again (the control device is resumed).
    pub fn thaw(&self) {
        let _ = self.inner.control(Control::Freeze(false));
    }

    /// Copy every region of SLINK `nr`'s devices again (a full resync of that site).
    pub fn invalidate(&self, nr: SlinkNr) -> Result<(), GroupError> {
        self.inner.control(Control::Invalidate(nr))
    }

    /// Limit the resync of SLINK `nr` to `rate` bytes per second (0: unlimited).
    pub fn set_resync_rate(&self, nr: SlinkNr, rate: u64) -> Result<(), GroupError> {
        self.inner.control(Control::ResyncRate { slink: nr, rate })
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
    pub mode: InForce,
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
    /// The transport's own view (a network link: connected, bytes raw and on the wire,
    /// reconnects, round trip, last error).
    pub link: Option<serde_json::Value>,
}

#[derive(Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub log_path: String,
    pub log: LogStats,
    pub queued_writes: usize,
    pub awaiting_writes: usize,
    /// The control device is suspended: the group's writes are held.
    pub writes_held: bool,
    pub pending_on_ld: usize,
    pub slinks: Vec<SlinkStatus>,
    pub statistics: Option<Stats>,
    pub log_error: Option<String>,
    pub recovery: Option<String>,
    /// Resync snapshots that exist now (`resync-<slink>`: an SLINK's devices as they were
    /// before its resync began, write-order consistent; dropped when it ends).
    pub resync_snapshots: Vec<String>,
    /// The site's role, group identity and, at a secondary, the primary it follows.
    pub site: site::SiteStatus,
}
