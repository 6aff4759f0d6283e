//! The daemon's state: devices, their tables, and the answers to control requests.
//!
//! Lifecycle requests (create, load, resume, suspend, remove, rename, message) are
//! serialised by one lock; read-only requests (status, info, table, ls) take none. The
//! lock is never held while a device waits for its in-flight I/O (suspend, or a resume
//! that swaps tables): that wait is bounded, and a removal (which fails the requests it
//! waits for) or a resume (which cancels it) must not queue behind it.
//!
//! A recorded device that cannot be brought back at start-up (a file missing, a log
//! that does not open) is *unavailable*: listed with the reason, its record kept, the
//! other devices up. `resume` tries it again, `remove` forgets it.

use std::sync::Arc;
use std::time::Duration;

use dmrep_core::device::{LiveTable, Quiesce, SUSPEND_TIMEOUT};
use dmrep_core::events::{self, Action, Event};
use dmrep_core::target::{Op, Request as IoRequest};
use dmrep_core::{BuildContext, DeviceRegistry, MappedDevice, TargetRegistry};
use dmrep_formats::control::{
    DeviceInfo, DeviceState, DeviceStatus, DeviceTable, Request, Response, SegmentStatus, PROTOCOL_VERSION,
};
use dmrep_formats::table::{parse_table, TableError};
use parking_lot::Mutex;
use tracing::{error, info, warn};

use crate::store::{DeviceRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("table line {line}: {source}")]
    Target {
        line: usize,
        #[source]
        source: dmrep_core::TargetError,
    },
    #[error(transparent)]
    Registry(#[from] dmrep_core::registry::RegistryError),
    #[error(transparent)]
    Device(#[from] dmrep_core::device::DeviceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("device {0} not found")]
    NotFound(String),
    #[error("device {name} is open {count} time(s) (NBD clients connected); disconnect them or use --force")]
    Busy { name: String, count: u32 },
    #[error("device {name} has no segment at sector {sector} (size {size} sectors)")]
    NoSegment { name: String, sector: u64, size: u64 },
    #[error(transparent)]
    Message(#[from] dmrep_core::TargetError),
    #[error("{0}")]
    Unsupported(String),
    #[error("device {name} is used by {users}: remove those first")]
    InUse { name: String, users: String },
    #[error(
        "device {name} is unavailable: {reason} (`dmrep resume {name}` tries again, `dmrep remove {name}` forgets it)"
    )]
    Unavailable { name: String, reason: String },
    #[error("device {name} was created by the table of {parent} and comes back with it: {what} {parent}")]
    Companion { name: String, parent: String, what: &'static str },
    #[error("invalid UUID {0:?}: use 1-128 characters, no control characters (such as a newline) and no leading or trailing space")]
    BadUuid(String),
    #[error("UUID {uuid} is already used by device {name}")]
    UuidInUse { uuid: String, name: String },
}

/// Longest UUID accepted: device-mapper's (DM_UUID_LEN, 129 bytes with the NUL).
const MAX_UUID: usize = 128;

/// Whether `uuid` is usable as a device UUID (it is shown on lines of text and keys the
/// device's record).
fn valid_uuid(uuid: &str) -> bool {
    !uuid.is_empty() && uuid.len() <= MAX_UUID && !uuid.chars().any(char::is_control) && uuid.trim() == uuid
}

/// A device a request names: live, or recorded and unavailable.
enum Entry {
    Live(Arc<MappedDevice>),
    Unavailable(DeviceRecord, String),
}

pub struct Daemon {
    devices: Arc<DeviceRegistry>,
    targets: TargetRegistry,
    store: Store,
    /// The persisted records, in creation order; includes devices that could not be
    /// restored at start-up, so that their records are not lost.
    records: Mutex<Vec<DeviceRecord>>,
    /// Recorded devices that are not live, by UUID, with the reason (start-up failed).
    unavailable: Mutex<Vec<(String, String)>>,
    ops: Mutex<()>,
    /// Set while [`Daemon::restore`] rebuilds the recorded tables.
    restoring: std::sync::atomic::AtomicBool,
    /// Group-consistent snapshots (set once, by [`Daemon::enable_snapshots`]).
    snapshots: std::sync::OnceLock<Arc<crate::snapshots::GroupSnapshots>>,
}

impl Daemon {
    /// A daemon over `store`. Call [`Daemon::restore`] to bring recorded devices back.
    pub fn new(store: Store, targets: TargetRegistry) -> Arc<Self> {
        Arc::new(Daemon {
            devices: Arc::new(DeviceRegistry::new()),
            targets,
            store,
            records: Mutex::new(Vec::new()),
            unavailable: Mutex::new(Vec::new()),
            ops: Mutex::new(()),
            restoring: std::sync::atomic::AtomicBool::new(false),
            snapshots: std::sync::OnceLock::new(),
        })
    }

    /// Take group-consistent snapshots at this site (as site `site`, if named), kept under
    /// `state_dir/snapshots`: publishes the marker hook for the groups built from now on.
    /// Call before [`Daemon::restore`].
    pub fn enable_snapshots(self: &Arc<Self>, state_dir: &std::path::Path, site: Option<String>) {
        let s = crate::snapshots::GroupSnapshots::new(Arc::downgrade(self), state_dir, site);
        let hook: Arc<dyn dmrep_targets::replicator::marker::MarkerHook> = s.clone();
        self.devices.publish(
            dmrep_targets::replicator::marker::HOOK_KEY,
            Arc::new(dmrep_targets::replicator::marker::HookSlot(hook)),
        );
        let _ = self.snapshots.set(s);
    }

    /// The status detail (JSON) of device `name`'s first segment, if it is live.
    pub fn segment_detail(&self, name: &str) -> Option<serde_json::Value> {
        let dev = self.devices.get(name)?;
        let table = dev.live_table()?;
        let (_, t) = table.targets().next()?;
        Some(t.status().json)
    }

    pub fn devices(&self) -> &Arc<DeviceRegistry> {
        &self.devices
    }

    /// Bring back the devices recorded in the state directory. Returns how many came
    /// back and the errors of those that did not: they stay recorded and are listed as
    /// unavailable (with their companions); the others come up all the same.
    pub fn restore(&self) -> Result<(usize, Vec<String>), DaemonError> {
        let _g = self.ops.lock();
        let recs = self.store.load()?;
        *self.records.lock() = recs.clone();
        let mut ok = 0;
        let mut errors = Vec::new();
        // Dependency order: a device stacked on others (`/dev/mapper/NAME` in its table)
        // comes back after them, whatever order they were created in.
        let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
        let mut pending: Vec<&DeviceRecord> = recs.iter().filter(|r| r.companion_of.is_none()).collect();
        let mut done: Vec<String> = Vec::new();
        while !pending.is_empty() {
            let ready = |r: &&DeviceRecord| {
                stacked_on(&r.table).iter().all(|d| *d == r.name || done.contains(d) || !names.contains(&d.as_str()))
            };
            let mut batch: Vec<&DeviceRecord> = pending.iter().copied().filter(ready).collect();
            if batch.is_empty() {
                // A cycle: each fails with its own reason.
                batch = pending.clone();
            }
            pending.retain(|r| !batch.iter().any(|b| b.uuid == r.uuid));
            for r in batch {
                match self.restore_one(r, &recs) {
                    Ok(()) => {
                        info!(device = %r.name, "restored");
                        ok += 1;
                    }
                    Err(e) => {
                        error!(device = %r.name, "could not restore: {e}");
                        errors.push(format!("{}: {e}", r.name));
                    }
                }
                done.push(r.name.clone());
                done.extend(recs.iter().filter(|c| c.companion_of.as_deref() == Some(&r.name)).map(|c| c.name.clone()));
            }
        }
        Ok((ok, errors))
    }

    /// Create recorded device `r` (and its companions) again; on failure they are
    /// unavailable, with the reason. `ops` held.
    fn restore_one(&self, r: &DeviceRecord, recs: &[DeviceRecord]) -> Result<(), DaemonError> {
        let companions: Vec<&DeviceRecord> =
            recs.iter().filter(|c| c.companion_of.as_deref() == Some(r.name.as_str())).collect();
        let mut ids: Vec<&str> = vec![&r.uuid];
        ids.extend(companions.iter().map(|c| c.uuid.as_str()));
        self.unavailable.lock().retain(|(u, _)| !ids.contains(&u.as_str()));
        self.restoring.store(true, std::sync::atomic::Ordering::SeqCst);
        let res = self.create_locked(&r.name, &r.table, Some(r.uuid.clone()), recs, r.read_only);
        self.restoring.store(false, std::sync::atomic::Ordering::SeqCst);
        match res {
            Ok(created) => {
                // A companion the table no longer names stays recorded, unavailable.
                for c in companions.iter().filter(|c| !created.contains(&c.name)) {
                    let why = format!("the table of {} no longer creates it", r.name);
                    self.unavailable.lock().push((c.uuid.clone(), why));
                }
                Ok(())
            }
            Err(e) => {
                let mut un = self.unavailable.lock();
                un.push((r.uuid.clone(), e.to_string()));
                for c in companions {
                    un.push((c.uuid.clone(), format!("created by the table of {}, which is unavailable", r.name)));
                }
                Err(e)
            }
        }
    }

    /// Parse and build a table for device `name`. Nothing is left behind on error.
    fn build(&self, name: &str, text: &str) -> Result<LiveTable, DaemonError> {
        let spec = parse_table(text)?;
        let restoring = self.restoring.load(std::sync::atomic::Ordering::SeqCst);
        let ctx = BuildContext { restoring, ..BuildContext::new(name, &self.devices) };
        let mut built = Vec::with_capacity(spec.segments.len());
        for seg in &spec.segments {
            match self.targets.build(&ctx, seg) {
                Ok(t) => built.push(t),
                Err(e) => {
                    built.iter().for_each(|t: &Arc<dyn dmrep_core::Target>| t.shutdown());
                    return Err(DaemonError::Target { line: seg.line, source: e });
                }
            }
        }
        Ok(LiveTable::new(spec, built))
    }

    /// Create a device and the companions its targets ask for (UUIDs of companions
    /// come from `known` records when they were created before). All or nothing.
    /// Returns the names created, the device first.
    fn create_locked(
        &self,
        name: &str,
        table: &str,
        uuid: Option<String>,
        known: &[DeviceRecord],
        read_only: bool,
    ) -> Result<Vec<String>, DaemonError> {
        self.create_one(name, table, uuid, read_only)?;
        let mut created = vec![name.to_string()];
        let companions: Vec<(String, String)> = self
            .devices
            .get(name)
            .and_then(|d| d.live_table())
            .map(|t| t.targets().flat_map(|(_, t)| t.companions()).collect())
            .unwrap_or_default();
        for (cname, ctable) in companions {
            let cuuid = known.iter().find(|r| r.name == cname).map(|r| r.uuid.clone());
            if let Err(e) = self.create_one(&cname, &ctable, cuuid, read_only) {
                for n in created.iter().rev() {
                    if let Ok(d) = self.devices.take(n) {
                        d.shutdown();
                    }
                }
                return Err(e);
            }
            created.push(cname);
        }
        Ok(created)
    }

    fn create_one(&self, name: &str, table: &str, uuid: Option<String>, read_only: bool) -> Result<(), DaemonError> {
        // Build before inserting, so a bad table leaves no device behind. The name and
        // UUID are checked first so the error for a duplicate is not a table error.
        if self.devices.get(name).is_some() {
            return Err(dmrep_core::registry::RegistryError::Exists(name.to_string()).into());
        }
        if !dmrep_core::registry::valid_name(name) {
            return Err(dmrep_core::registry::RegistryError::BadName(name.to_string()).into());
        }
        if let Some(u) = &uuid {
            if let Some(d) = self.devices.list().into_iter().find(|d| d.uuid() == u) {
                return Err(DaemonError::UuidInUse { uuid: u.clone(), name: d.name() });
            }
        }
        let live = self.build(name, table)?;
        let dev = match self.devices.insert(name, uuid) {
            Ok(d) => d,
            Err(e) => {
                live.targets().for_each(|(_, t)| t.shutdown());
                return Err(e.into());
            }
        };
        dev.set_read_only(read_only);
        dev.load(live);
        // A new device has no I/O in flight: nothing to wait for.
        dev.resume(SUSPEND_TIMEOUT)?;
        events::emit(Action::Create, "device", &device_fields(&dev));
        Ok(())
    }

    /// The record of an unavailable device named `name`, and why it is unavailable.
    fn unavailable(&self, name: &str) -> Option<(DeviceRecord, String)> {
        let recs = self.records.lock();
        let un = self.unavailable.lock();
        let rec = recs.iter().find(|r| r.name == name && un.iter().any(|(u, _)| *u == r.uuid))?;
        let reason = un.iter().find(|(u, _)| *u == rec.uuid).map(|(_, why)| why.clone()).unwrap_or_default();
        Some((rec.clone(), reason))
    }

    /// Every unavailable device: its record and the reason.
    fn unavailable_all(&self) -> Vec<(DeviceRecord, String)> {
        let recs = self.records.lock();
        let un = self.unavailable.lock();
        recs.iter()
            .filter_map(|r| un.iter().find(|(u, _)| *u == r.uuid).map(|(_, why)| (r.clone(), why.clone())))
            .collect()
    }

    /// The device `name`, live or unavailable.
    fn entry(&self, name: &str) -> Result<Entry, DaemonError> {
        if let Some(d) = self.devices.get(name) {
            return Ok(Entry::Live(d));
        }
        match self.unavailable(name) {
            Some((rec, why)) => Ok(Entry::Unavailable(rec, why)),
            None => Err(DaemonError::NotFound(name.to_string())),
        }
    }

    /// Change the records with `f` and save them atomically.
    fn persist(&self, f: impl FnOnce(&mut Vec<DeviceRecord>)) -> Result<(), DaemonError> {
        let mut recs = self.records.lock();
        let mut next = recs.clone();
        f(&mut next);
        self.store.save(&next)?;
        *recs = next;
        Ok(())
    }

    /// The live device `name` (an unavailable one is an error saying so).
    fn device(&self, name: &str) -> Result<Arc<MappedDevice>, DaemonError> {
        match self.entry(name)? {
            Entry::Live(d) => Ok(d),
            Entry::Unavailable(_, reason) => Err(DaemonError::Unavailable { name: name.to_string(), reason }),
        }
    }

    /// The devices a read-only request is about: one, or all (by name).
    fn selected(&self, name: &Option<String>) -> Result<Vec<Entry>, DaemonError> {
        match name {
            Some(n) => Ok(vec![self.entry(n)?]),
            None => {
                let mut all: Vec<(String, Entry)> =
                    self.devices.list().into_iter().map(|d| (d.name(), Entry::Live(d))).collect();
                all.extend(
                    self.unavailable_all().into_iter().map(|(r, why)| (r.name.clone(), Entry::Unavailable(r, why))),
                );
                all.sort_by(|a, b| a.0.cmp(&b.0));
                Ok(all.into_iter().map(|(_, e)| e).collect())
            }
        }
    }

    /// Try an unavailable device again (`resume`): it comes up with its companions, or
    /// stays unavailable with the new reason. `ops` held.
    fn retry(&self, rec: DeviceRecord) -> Result<Response, DaemonError> {
        if let Some(parent) = rec.companion_of {
            return Err(DaemonError::Companion { name: rec.name, parent, what: "resume" });
        }
        let recs = self.records.lock().clone();
        self.restore_one(&rec, &recs)
            .map_err(|e| DaemonError::Unavailable { name: rec.name.clone(), reason: e.to_string() })?;
        info!(device = %rec.name, "restored on request");
        Ok(Response::Ok)
    }

    /// Answer one control request.
    pub fn handle(&self, req: Request) -> Response {
        match self.handle_inner(req) {
            Ok(r) => r,
            Err(e) => Response::Error { message: e.to_string() },
        }
    }

    fn handle_inner(&self, req: Request) -> Result<Response, DaemonError> {
        match req {
            Request::Version => {
                Ok(Response::Version { daemon: env!("CARGO_PKG_VERSION").to_string(), protocol: PROTOCOL_VERSION })
            }
            Request::Create { name, table, uuid, read_only } => {
                let _g = self.ops.lock();
                if let Some((rec, reason)) = self.unavailable(&name) {
                    return Err(DaemonError::Unavailable { name: rec.name, reason });
                }
                if let Some(u) = &uuid {
                    if !valid_uuid(u) {
                        return Err(DaemonError::BadUuid(u.clone()));
                    }
                    if let Some(r) = self.records.lock().iter().find(|r| r.uuid == *u) {
                        return Err(DaemonError::UuidInUse { uuid: u.clone(), name: r.name.clone() });
                    }
                }
                let created = self.create_locked(&name, &table, uuid, &[], read_only)?;
                let recs: Vec<DeviceRecord> = created
                    .iter()
                    .filter_map(|n| self.devices.get(n))
                    .filter_map(|d| record_of(&d))
                    .map(|mut r| {
                        if r.name != name {
                            r.companion_of = Some(name.clone());
                        }
                        r
                    })
                    .collect();
                if let Err(e) = self.persist(|r| r.extend(recs)) {
                    // Not recorded means not created: undo.
                    for n in created.iter().rev() {
                        if let Ok(d) = self.devices.take(n) {
                            d.shutdown();
                        }
                    }
                    return Err(e);
                }
                info!(device = %name, companions = ?&created[1..], "created");
                Ok(Response::Ok)
            }
            Request::Load { name, table } => {
                let _g = self.ops.lock();
                let dev = self.device(&name)?;
                let live = self.build(&name, &table)?;
                dev.load(live);
                info!(device = %name, "table loaded (inactive)");
                Ok(Response::Ok)
            }
            Request::Clear { name } => {
                let _g = self.ops.lock();
                self.device(&name)?.clear_inactive();
                Ok(Response::Ok)
            }
            Request::Suspend { name, timeout_ms } => {
                let dev = {
                    let _g = self.ops.lock();
                    self.device(&name)?
                };
                // Not under `ops`: see the module documentation.
                dev.suspend(timeout_of(timeout_ms))?;
                info!(device = %name, "suspended");
                Ok(Response::Ok)
            }
            Request::Resume { name, timeout_ms } => {
                let timeout = timeout_of(timeout_ms);
                let dev = {
                    let _g = self.ops.lock();
                    match self.entry(&name)? {
                        Entry::Live(d) => d,
                        Entry::Unavailable(rec, _) => return self.retry(rec),
                    }
                };
                // A swap needs the device quiet: wait for that first, not under `ops`.
                if dev.inactive_table().is_some() {
                    dev.quiesce(timeout, Quiesce::Swap)?;
                }
                let _g = self.ops.lock();
                if !self.devices.get(&name).is_some_and(|d| Arc::ptr_eq(&d, &dev)) {
                    return Err(dmrep_core::device::DeviceError::Removed(name).into());
                }
                if !dev.resume(timeout)? {
                    return Ok(Response::Ok);
                }
                let rec = record_of(&dev).expect("resumed with a table");
                self.persist(|r| match r.iter_mut().find(|x| x.uuid == rec.uuid) {
                    Some(x) => x.table = rec.table,
                    None => r.push(rec),
                })?;
                info!(device = %name, "new table active");
                // The devices the new table creates (a replicator's companions) take the
                // tables it gives them now (an SLINK added or removed shows in them).
                let stale: Vec<(Arc<MappedDevice>, String)> = dev
                    .live_table()
                    .map(|t| t.targets().flat_map(|(_, t)| t.companions()).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(cname, ctable)| {
                        let c = self.devices.get(&cname)?;
                        let now = c.live_table().map(|t| t.spec.to_string());
                        let new = dmrep_formats::table::parse_table(&ctable).ok()?.to_string();
                        (now.as_deref() != Some(new.as_str())).then_some((c, ctable))
                    })
                    .collect();
                for (c, ctable) in &stale {
                    c.load(self.build(&c.name(), ctable)?);
                }
                drop(_g);
                for (c, _) in stale {
                    let cname = c.name();
                    let swapped = c.quiesce(timeout, Quiesce::Swap).and_then(|()| {
                        let _g = self.ops.lock();
                        c.resume(timeout)
                    });
                    match swapped {
                        Ok(_) => {
                            if let Some(rec) = record_of(&c) {
                                self.persist(|r| {
                                    if let Some(x) = r.iter_mut().find(|x| x.uuid == rec.uuid) {
                                        x.table = rec.table;
                                    }
                                })?;
                            }
                            info!(device = %cname, "table follows its control device's");
                        }
                        Err(e) => warn!(device = %cname, "table not refreshed from its control device: {e}"),
                    }
                }
                Ok(Response::Ok)
            }
            Request::Remove { name, force } => {
                let _g = self.ops.lock();
                if let Entry::Unavailable(rec, _) = self.entry(&name)? {
                    // Forget it, and the companions it would have brought back.
                    if let Some(parent) = rec.companion_of {
                        return Err(DaemonError::Companion { name, parent, what: "remove" });
                    }
                    let mut uuids = vec![rec.uuid.clone()];
                    uuids.extend(
                        self.records
                            .lock()
                            .iter()
                            .filter(|r| r.companion_of.as_deref() == Some(name.as_str()))
                            .map(|r| r.uuid.clone()),
                    );
                    self.persist(|r| r.retain(|x| !uuids.contains(&x.uuid)))?;
                    self.unavailable.lock().retain(|(u, _)| !uuids.contains(u));
                    info!(device = %name, "unavailable device forgotten");
                    return Ok(Response::Ok);
                }
                // Devices using this one (replicator-dev on a control device) go
                // first if they are its companions; otherwise they block the removal.
                let companions: Vec<String> = self
                    .records
                    .lock()
                    .iter()
                    .filter(|r| r.companion_of.as_deref() == Some(&name))
                    .map(|r| r.name.clone())
                    .collect();
                let mapper = format!("/dev/mapper/{name}");
                let users: Vec<String> = self
                    .devices
                    .list()
                    .iter()
                    .filter(|d| !companions.contains(&d.name()))
                    .filter(|d| {
                        d.live_table().is_some_and(|t| {
                            t.targets().any(|(s, _)| {
                                (s.target == "replicator-dev" && s.args.first() == Some(&name))
                                    || s.args.contains(&mapper)
                            })
                        })
                    })
                    .map(|d| d.name())
                    .collect();
                if !users.is_empty() {
                    return Err(DaemonError::InUse { name, users: users.join(", ") });
                }
                let mut victims: Vec<Arc<MappedDevice>> =
                    companions.iter().filter_map(|n| self.devices.get(n)).collect();
                victims.push(self.device(&name)?);
                for d in &victims {
                    let count = d.open_count();
                    if count > 0 && !force {
                        return Err(DaemonError::Busy { name: d.name(), count });
                    }
                }
                for d in &victims {
                    let d = self.devices.take(&d.name())?;
                    d.shutdown();
                    events::emit(Action::Destroy, "device", &[("name", d.name())]);
                }
                let uuids: Vec<String> = victims.iter().map(|d| d.uuid().to_string()).collect();
                self.persist(|r| r.retain(|x| !uuids.contains(&x.uuid)))?;
                info!(device = %name, forced = force, companions = ?companions, "removed");
                Ok(Response::Ok)
            }
            Request::Rename { name, new_name } => {
                let _g = self.ops.lock();
                let dev = self.device(&name)?;
                if dev.live_table().is_some_and(|t| t.targets().any(|(s, _)| s.target == "replicator")) {
                    return Err(DaemonError::Unsupported(format!(
                        "{name} is a replicator control device: its replicator-dev devices refer to it by name, so it cannot be renamed"
                    )));
                }
                let uuid = dev.uuid().to_string();
                let parent = self.records.lock().iter().find(|r| r.uuid == uuid).and_then(|r| r.companion_of.clone());
                if let Some(parent) = parent {
                    return Err(DaemonError::Unsupported(format!(
                        "{name} was created by the table of {parent} and keeps the name that table gives it"
                    )));
                }
                self.devices.rename(&name, &new_name)?;
                self.persist(|r| r.iter_mut().filter(|x| x.uuid == uuid).for_each(|x| x.name = new_name.clone()))?;
                Ok(Response::Ok)
            }
            Request::Info { name } => {
                Ok(Response::Infos { devices: self.selected(&name)?.iter().map(info_of).collect() })
            }
            Request::List => Ok(Response::Infos { devices: self.selected(&None)?.iter().map(info_of).collect() }),
            Request::Table { name, inactive } => {
                let tables = self
                    .selected(&name)?
                    .iter()
                    .map(|e| match e {
                        Entry::Live(d) => {
                            let t = if inactive { d.inactive_table() } else { d.live_table() };
                            DeviceTable { name: d.name(), table: t.map(|t| t.spec.to_string()).unwrap_or_default() }
                        }
                        // The recorded table: what it will be when it comes back.
                        Entry::Unavailable(r, _) => DeviceTable {
                            name: r.name.clone(),
                            table: if inactive { String::new() } else { r.table.clone() },
                        },
                    })
                    .collect();
                Ok(Response::Tables { tables })
            }
            Request::Status { name } => {
                let devices = self
                    .selected(&name)?
                    .iter()
                    .map(|e| match e {
                        Entry::Live(d) => DeviceStatus {
                            name: d.name(),
                            state: d.state(),
                            segments: d
                                .status()
                                .into_iter()
                                .map(|(seg, st)| SegmentStatus {
                                    start: seg.start,
                                    len: seg.len,
                                    target: seg.target,
                                    line: st.line,
                                    detail: st.json,
                                })
                                .collect(),
                            reason: None,
                        },
                        Entry::Unavailable(r, why) => DeviceStatus {
                            name: r.name.clone(),
                            state: DeviceState::Unavailable,
                            segments: Vec::new(),
                            reason: Some(why.clone()),
                        },
                    })
                    .collect();
                Ok(Response::Statuses { devices })
            }
            Request::Events { after, wait_ms, now } => {
                let mut out = Vec::new();
                // Where the reader starts: after what it saw, else from now (after the
                // snapshot, so no change between the two is missed: it is in both).
                let from = after.unwrap_or_else(events::position);
                // (Each with its text line too: JSON objects do not keep the fields' order.)
                let with_line = |e: &Event| {
                    let mut v = e.json();
                    v["line"] = e.line().into();
                    v
                };
                if now {
                    out.extend(self.snapshot().iter().map(with_line));
                }
                let wait = if now { Duration::ZERO } else { Duration::from_millis(wait_ms.min(10_000)) };
                let b = events::after(from, wait);
                out.extend(b.events.iter().map(with_line));
                Ok(Response::Events { events: out, lost: b.lost, last: b.last })
            }
            Request::Snapshots { group } => {
                let s = self
                    .snapshots
                    .get()
                    .ok_or_else(|| DaemonError::Unsupported("this daemon takes no snapshots".into()))?;
                Ok(Response::Snapshots { snapshots: s.list(self, group.as_deref()) })
            }
            Request::SnapshotDelete { group, name } => {
                let s = self
                    .snapshots
                    .get()
                    .ok_or_else(|| DaemonError::Unsupported("this daemon takes no snapshots".into()))?;
                s.delete(self, &group, &name).map_err(DaemonError::Unsupported)?;
                Ok(Response::Ok)
            }
            Request::Message { name, sector, args } => {
                let target = {
                    let _g = self.ops.lock();
                    let dev = self.device(&name)?;
                    let table = dev.live_table().ok_or_else(|| DaemonError::NotFound(name.clone()))?;
                    let size = table.size() / 512;
                    let found = table
                        .targets()
                        .find(|(s, _)| s.start <= sector && sector < s.start + s.len)
                        .map(|(_, t)| t.clone());
                    found.ok_or(DaemonError::NoSegment { name, sector, size })?
                };
                // (Outside the lock: a switchover holds writes and drains for seconds; the
                // target stays alive while this holds it.)
                Ok(Response::Reply { text: target.message(&args)? })
            }
        }
    }

    /// Flush and stop every device (SIGTERM/SIGINT), before the NBD server drains its
    /// connections: a request a device holds (suspended, or waiting for a synchronous
    /// SLINK that is down) was never acknowledged; stopping the device fails it with
    /// ESHUTDOWN (after a grace period), so nothing waits for it. I/O still arriving fails.
    pub fn shutdown(&self) {
        let _g = self.ops.lock();
        // A suspended device takes no flush (it would be held too) and has nothing to flush.
        let live = |d: &Arc<MappedDevice>| d.live_table().is_some() && d.state() == dmrep_core::DeviceState::Active;
        for dev in self.devices.list().into_iter().filter(live) {
            let (_, r) = dev.submit_wait(IoRequest::new(Op::Flush, 0, 0, Vec::new(), 0));
            if let Err(e) = r {
                warn!(device = %dev.name(), "flush at shutdown failed: {e}");
            }
        }
        // Reverse creation order: devices that use a control device go first.
        let recs = self.records.lock().clone();
        let mut devs = self.devices.list();
        devs.sort_by_key(|d| std::cmp::Reverse(recs.iter().position(|r| r.uuid == d.uuid())));
        for dev in devs {
            dev.shutdown();
        }
        info!("all devices flushed and stopped");
    }
}

fn record_of(d: &MappedDevice) -> Option<DeviceRecord> {
    d.live_table().map(|t| DeviceRecord {
        name: d.name(),
        uuid: d.uuid().to_string(),
        table: t.spec.to_string(),
        companion_of: None,
        read_only: d.read_only(),
    })
}

/// How long a suspend (or a swapping resume) waits for in-flight I/O.
fn timeout_of(ms: Option<u64>) -> Duration {
    ms.map(Duration::from_millis).unwrap_or(SUSPEND_TIMEOUT)
}

/// What `info` and `ls` show of a device; an unavailable one has the size of its
/// recorded table, and the reason.
fn info_of(e: &Entry) -> DeviceInfo {
    match e {
        Entry::Live(d) => d.info(),
        Entry::Unavailable(r, why) => {
            let spec = parse_table(&r.table).ok();
            let sectors = spec.as_ref().and_then(|s| s.segments.last()).map(|s| s.start + s.len).unwrap_or(0);
            DeviceInfo {
                name: r.name.clone(),
                uuid: r.uuid.clone(),
                state: DeviceState::Unavailable,
                open_count: 0,
                segments: spec.map(|s| s.segments.len()).unwrap_or(0),
                size_bytes: sectors * 512,
                size_sectors: sectors,
                live_table: false,
                inactive_table: false,
                read_only: r.read_only,
                reason: Some(why.clone()),
            }
        }
    }
}

/// The fields of a device's events.
fn device_fields(d: &MappedDevice) -> Vec<(&'static str, String)> {
    vec![("name", d.name()), ("size", d.size().to_string()), ("read_only", d.read_only().to_string())]
}

impl Daemon {
    /// The current state as `exists` events (`dmrep events --now`): every device, and for
    /// every replicator group its site, its SLINKs and its log.
    fn snapshot(&self) -> Vec<Event> {
        let mut out = Vec::new();
        for d in self.devices.list() {
            out.push(Event::new(Action::Exists, "device", &device_fields(&d)));
            let Some(t) = d.live_table() else { continue };
            for (_, target) in t.targets().filter(|(s, _)| s.target == "replicator") {
                let st = target.status().json;
                let g = d.name();
                let s = |v: &serde_json::Value| match v {
                    serde_json::Value::String(x) => x.clone(),
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                };
                out.push(Event::new(
                    Action::Exists,
                    "group",
                    &[
                        ("group", g.clone()),
                        ("log_used", s(&st["log"]["used_bytes"])),
                        ("log_size", s(&st["log"]["ring_len"])),
                        ("writes_held", s(&st["writes_held"])),
                    ],
                ));
                let site = &st["site"];
                out.push(Event::new(
                    Action::Exists,
                    "site",
                    &[
                        ("group", g.clone()),
                        ("role", s(&site["role"])),
                        ("generation", s(&site["generation"])),
                        ("fenced", (!site["fenced"].is_null()).to_string()),
                        ("split_brain", (!site["split_brain"].is_null()).to_string()),
                    ],
                ));
                for sl in st["slinks"].as_array().into_iter().flatten() {
                    let ordered = sl["sync"]["ordered"] == true;
                    out.push(Event::new(
                        Action::Exists,
                        "slink",
                        &[
                            ("group", g.clone()),
                            ("slink", s(&sl["slink"])),
                            ("mode", if ordered { s(&sl["mode"]) } else { "dirty".into() }),
                            ("up", s(&sl["accessible"])),
                            ("outstanding", s(&sl["outstanding_ios"])),
                            ("dirty_regions", s(&sl["sync"]["dirty_regions"])),
                        ],
                    ));
                }
            }
        }
        out.push(Event::new(Action::Exists, "-", &[]));
        out
    }
}

/// The devices of this daemon a table is stacked on (`/dev/mapper/NAME` words).
pub fn stacked_on(table: &str) -> Vec<String> {
    table.split_whitespace().filter_map(|w| w.strip_prefix("/dev/mapper/")).map(str::to_string).collect()
}
