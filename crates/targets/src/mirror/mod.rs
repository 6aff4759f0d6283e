//! `mirror` (dm-mirror, "dm-raid1"): every write goes to every leg, reads go to one.
//!
//! ```text
//! mirror <log type> <#log params> <log params...> <#legs> {<dev> <offset>}... [<#features> <features...>]
//!   core <#=1|2> <region_sectors> [sync|nosync]
//!   disk <#=2|3> <log_dev> <region_sectors> [sync|nosync]
//!   features: handle_errors
//! ```
//!
//! - [`spec`]: the table, parsed into data first.
//! - [`state`]: legs and regions, the one place where their state changes.
//! - `io`: the write, read and flush paths, the resync worker, split and recover.
//! - `report`: status line, JSON and messages.
//!
//! The region log is one of the replicator's dirty logs ([`crate::replicator::dirty`]):
//! a region is marked (durably, with `disk`) before a write into it starts and cleared
//! lazily once every leg has it, so after a crash only marked regions can differ and a
//! restart copies only those, from the primary leg (leg 0). A `core` log keeps nothing
//! over a restart; with `sync` (its default) a restart copies everything again.
//!
//! `sync`/`nosync` of a `disk` log apply when the log is formatted (the table is new:
//! default `sync`, a full copy from leg 0); an existing log is trusted, so that the
//! daemon restoring the table at a restart copies only the marked regions.
//!
//! A table reload of the same device hands the leg state over: a leg listed again (same
//! device and offset) keeps the regions it lacks, a new device at the index of a dead leg
//! replaces it and gets the regions written while it was dead, any other new leg gets a
//! full copy (none with `nosync`), and a leg left out is split off as it was at the
//! reload's suspend.

mod io;
mod report;
pub mod spec;
pub mod state;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use dmrep_core::claims::WHOLE_FILE;
use dmrep_core::units::sectors_to_bytes;
use dmrep_core::{events, TargetStatus};
use dmrep_core::{BlockBackend, BuildContext, Claim, Completion, FileBackend, Op, Request, Target, TargetError};
use dmrep_formats::table::SegmentSpec;
use parking_lot::{Condvar, Mutex};

use crate::params::open_device;
use crate::replicator::dirty::core::CoreLog;
use crate::replicator::dirty::disk::{bytes_needed, DiskLog};
use crate::replicator::dirty::DirtyLog;
use spec::{LogSpec, MirrorSpec, SyncMode};
use state::{Health, State};

const T: &str = "mirror";

/// One leg: a device and where the segment starts on it.
pub struct Leg {
    pub dev: Arc<dyn BlockBackend>,
    pub path: String,
    /// Byte offset on the device.
    pub offset: u64,
    claim: Mutex<Option<Claim>>,
}

impl Leg {
    pub fn new(dev: Arc<dyn BlockBackend>, path: &str, offset: u64, claim: Option<Claim>) -> Self {
        Leg { dev, path: path.to_string(), offset, claim: Mutex::new(claim) }
    }
}

/// Where the region log lives.
pub enum LogDev {
    Core,
    /// `fresh`: formatted by this table's construction.
    Disk {
        dev: Arc<dyn BlockBackend>,
        path: String,
        fresh: bool,
        claim: Option<Claim>,
    },
}

/// What the target and its worker thread share.
pub(crate) struct Shared {
    pub legs: Vec<Leg>,
    pub spec: MirrorSpec,
    /// Segment length in bytes.
    pub len: u64,
    pub region_bytes: u64,
    pub handle_errors: bool,
    /// The device's name, for events and logs.
    pub device: String,
    pub state: Mutex<State>,
    /// Woken on every state change writers, the worker or a split wait for.
    pub cv: Condvar,
    log_dev: Mutex<LogDev>,
    /// Set at activation (first resume).
    log: Mutex<Option<Arc<dyn DirtyLog>>>,
    /// The table this one replaces on the same device (a reload), for the hand-over.
    pred: Option<Weak<Shared>>,
    life: Mutex<Life>,
}

#[derive(Default)]
struct Life {
    activated: bool,
    shut: bool,
    /// The resync is paused (suspended device).
    paused: bool,
    worker: Option<JoinHandle<()>>,
}

/// The `mirror` target of one segment.
pub struct Mirror {
    pub(crate) s: Arc<Shared>,
}

/// The mirrors built for a segment of a device (key `mirror:<device>:<start>`), so a
/// reload's new table finds the live one it replaces: by the live target's address.
struct Handoffs(Mutex<Vec<(usize, Weak<Shared>)>>);

fn handoff_key(device: &str, start: u64) -> String {
    format!("mirror:{device}:{start}")
}

fn addr(t: *const ()) -> usize {
    t as usize
}

pub fn construct(ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    let spec = spec::parse(&seg.args)?;
    let len = sectors_to_bytes(seg.len);
    let mut legs = Vec::with_capacity(spec.legs.len());
    for (i, l) in spec.legs.iter().enumerate() {
        let role = format!("mirror segment at sector {}, leg {i}", seg.start);
        let (dev, claim) = open_device(ctx, T, &l.path, l.offset_sectors, seg.len, role)?;
        legs.push(Leg::new(dev, &l.path, sectors_to_bytes(l.offset_sectors), Some(claim)));
    }
    let log = match &spec.log {
        LogSpec::Core { .. } => LogDev::Core,
        LogSpec::Disk { path, region_sectors, sync } => {
            open_disk_log(ctx, seg, path, len, sectors_to_bytes(*region_sectors), *sync)?
        }
    };
    // The live mirror of this segment, if this is a reload.
    let key = handoff_key(ctx.device_name, seg.start);
    let live: Vec<usize> = ctx
        .devices
        .get(ctx.device_name)
        .and_then(|d| d.live_table())
        .map(|t| {
            t.targets().filter(|(s, _)| s.start == seg.start).map(|(_, t)| addr(Arc::as_ptr(t) as *const ())).collect()
        })
        .unwrap_or_default();
    let handoffs = ctx.devices.lookup::<Handoffs>(&key).unwrap_or_else(|| {
        let h = Arc::new(Handoffs(Mutex::new(Vec::new())));
        ctx.devices.publish(&key, h.clone());
        h
    });
    let pred = handoffs.0.lock().iter().find(|(a, w)| live.contains(a) && w.strong_count() > 0).map(|(_, w)| w.clone());
    let m = Arc::new(Mirror::new(legs, spec, len, log, ctx.device_name, pred));
    let mut list = handoffs.0.lock();
    list.retain(|(_, w)| w.strong_count() > 0);
    list.push((addr(Arc::as_ptr(&m) as *const ()), Arc::downgrade(&m.s)));
    Ok(m)
}

/// Open (and format, if new) the `disk` log, creating the file if it is missing.
fn open_disk_log(
    ctx: &BuildContext<'_>,
    seg: &SegmentSpec,
    path: &str,
    len: u64,
    region_bytes: u64,
    sync: SyncMode,
) -> Result<LogDev, TargetError> {
    let regions = len.div_ceil(region_bytes);
    let p = Path::new(path);
    let created = match std::fs::OpenOptions::new().write(true).create_new(true).open(p) {
        Ok(f) => {
            f.set_len(bytes_needed(regions)).map_err(|e| TargetError::Device { path: path.into(), source: e })?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(TargetError::Device { path: path.into(), source: e }),
    };
    let undo = |e: TargetError| {
        if created {
            let _ = std::fs::remove_file(p);
        }
        e
    };
    let claim =
        ctx.claim(path, WHOLE_FILE, format!("disk log of mirror segment at sector {}", seg.start)).map_err(undo)?;
    let dev: Arc<dyn BlockBackend> =
        Arc::new(FileBackend::open(p).map_err(|e| undo(TargetError::Device { path: path.into(), source: e }))?);
    let (_, fresh) = DiskLog::open_on(dev.clone(), path, len, region_bytes, sync != SyncMode::NoSync)
        .map_err(|e| undo(TargetError::failed(T, e)))?;
    Ok(LogDev::Disk { dev, path: path.to_string(), fresh, claim: Some(claim) })
}

impl Mirror {
    /// A mirror over opened legs (tests build one over memory back-ends this way).
    pub(crate) fn new(
        legs: Vec<Leg>,
        spec: MirrorSpec,
        len: u64,
        log: LogDev,
        device: &str,
        pred: Option<Weak<Shared>>,
    ) -> Mirror {
        let region_bytes = sectors_to_bytes(spec.log.region_sectors());
        let regions = len.div_ceil(region_bytes);
        Mirror {
            s: Arc::new(Shared {
                state: Mutex::new(State::new(legs.len(), regions, region_bytes)),
                legs,
                handle_errors: spec.handle_errors,
                spec,
                len,
                region_bytes,
                device: device.to_string(),
                cv: Condvar::new(),
                log_dev: Mutex::new(log),
                log: Mutex::new(None),
                pred,
                life: Mutex::new(Life::default()),
            }),
        }
    }
}

impl Shared {
    /// The region log (activating the mirror if it was not yet).
    pub(crate) fn log(self: &Arc<Self>) -> Arc<dyn DirtyLog> {
        if let Some(l) = self.log.lock().clone() {
            return l;
        }
        self.activate();
        self.log.lock().clone().expect("activated")
    }

    /// First resume: open the log for real (a reload's predecessor has written its last
    /// marks by now), set up which leg lacks what, start the worker.
    fn activate(self: &Arc<Self>) {
        let mut life = self.life.lock();
        if life.activated || life.shut {
            return;
        }
        life.activated = true;
        let (log, fresh): (Arc<dyn DirtyLog>, bool) = match &*self.log_dev.lock() {
            LogDev::Core => (Arc::new(CoreLog::new(self.len, self.region_bytes)), true),
            LogDev::Disk { dev, path, fresh, .. } => {
                match DiskLog::open_on(dev.clone(), path, self.len, self.region_bytes, true) {
                    Ok((l, _)) => (Arc::new(l), *fresh),
                    Err(e) => {
                        // Read back what construction just read: only an I/O error gets
                        // here. Every region counts as lacking on every leg but leg 0.
                        tracing::error!(device = %self.device, error = %e, "mirror: cannot read the disk log again: full resync");
                        let l = Arc::new(CoreLog::new(self.len, self.region_bytes));
                        l.mark_all();
                        self.state.lock().log_failed = true;
                        (l, false)
                    }
                }
            }
        };
        let handed = self
            .pred
            .as_ref()
            .and_then(Weak::upgrade)
            .filter(|p| p.region_bytes == self.region_bytes && p.len == self.len && p.life.lock().shut);
        {
            let mut st = self.state.lock();
            match handed {
                Some(p) => self.take_over(&mut st, &p.state.lock()),
                None => self.initial(&mut st, &*log, fresh),
            }
            for r in 0..st.regions {
                if st.any_stale(r) && !log.is_dirty(r) {
                    log.mark_range(r * self.region_bytes, 1);
                }
            }
            st.queue_clean_marks(&*log);
        }
        if let Err(e) = log.flush() {
            tracing::error!(device = %self.device, error = %e, "mirror: cannot write the region log");
            self.state.lock().log_failed = true;
        }
        *self.log.lock() = Some(log);
        let me = self.clone();
        life.worker = Some(
            std::thread::Builder::new()
                .name(format!("mirror-{}", self.device))
                .spawn(move || me.worker())
                .expect("spawn the mirror worker"),
        );
    }

    /// No predecessor: what the log and the sync mode say.
    fn initial(&self, st: &mut State, log: &dyn DirtyLog, fresh_log: bool) {
        let all = match (&self.spec.log, self.spec.log.sync()) {
            (_, SyncMode::NoSync) if fresh_log => false,
            (LogSpec::Core { .. }, _) => true,
            // A disk log: a fresh one starts all marked (sync), an existing one is trusted.
            (LogSpec::Disk { .. }, _) => false,
        };
        for leg in st.legs.iter_mut().skip(1) {
            if all {
                for r in 0..leg.stale.regions() {
                    leg.stale.set(r);
                }
            } else {
                let mut r = 0;
                while let Some(m) = log.next_dirty(r) {
                    leg.stale.set(m);
                    r = m + 1;
                }
            }
        }
    }

    /// A reload: legs carry over from the table this one replaces.
    fn take_over(&self, st: &mut State, old: &State) {
        let p = self.pred.as_ref().and_then(Weak::upgrade).expect("predecessor");
        let nosync = self.spec.log.sync() == SyncMode::NoSync;
        for (i, leg) in self.legs.iter().enumerate() {
            let same = p.legs.iter().position(|o| o.path == leg.path && o.offset == leg.offset);
            let from = match same {
                Some(j) if old.legs[j].health != Health::Split => Some(j),
                Some(_) => None,
                // A new device where a dead leg was: it replaces that leg.
                None => (i < old.legs.len() && matches!(old.legs[i].health, Health::Failed(_))).then_some(i),
            };
            match from {
                Some(j) => {
                    st.legs[i].stale = old.legs[j].stale.clone();
                    if old.legs[j].health == Health::Failed(state::FailKind::Flush) {
                        st.legs[i].stale = full(st.regions);
                    }
                }
                None if nosync => {}
                None => st.legs[i].stale = full(st.regions),
            }
        }
        tracing::info!(device = %self.device, "mirror: leg state handed over from the table this reload replaces");
    }

    fn emit(&self, leg: usize, what: &str, detail: String) {
        let fields = [
            ("name", self.device.clone()),
            ("target", T.to_string()),
            ("leg", leg.to_string()),
            ("device", self.legs[leg].path.clone()),
            ("health", what.to_string()),
            ("detail", detail),
        ];
        events::emit(events::Action::Change, "device", &fields);
    }
}

/// Every region set.
fn full(regions: u64) -> crate::replicator::dirty::Bitmap {
    let mut b = crate::replicator::dirty::Bitmap::new(regions);
    for r in 0..regions {
        b.set(r);
    }
    b
}

impl Target for Mirror {
    fn type_name(&self) -> &'static str {
        T
    }

    fn submit(&self, mut req: Request, done: Completion) {
        let res = match req.op {
            Op::Read => self.s.read(&mut req),
            Op::Flush => self.s.flush_legs(),
            _ => self.s.write(&req),
        };
        done.complete(req, res);
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn status(&self) -> TargetStatus {
        self.s.status()
    }

    fn message(&self, args: &[String]) -> Result<String, TargetError> {
        self.s.message(args)
    }

    fn presuspend(&self) {
        self.s.life.lock().paused = true;
    }

    fn postsuspend(&self) {
        self.s.quiesce();
    }

    fn resume(&self) {
        self.s.life.lock().paused = false;
        self.s.log();
        self.s.cv.notify_all();
    }

    fn shutdown(&self) {
        let worker = {
            let mut life = self.s.life.lock();
            life.shut = true;
            life.worker.take()
        };
        self.s.state.lock().stopping = true;
        self.s.cv.notify_all();
        if let Some(w) = worker {
            if w.join().is_err() {
                tracing::error!(device = %self.s.device, "mirror worker panicked");
            }
        }
        self.s.quiesce();
        for l in &self.s.legs {
            l.claim.lock().take();
        }
        if let LogDev::Disk { claim, .. } = &mut *self.s.log_dev.lock() {
            claim.take();
        }
    }
}
