//! Group-consistent snapshots at this site.
//!
//! When a group's copier reaches a snapshot marker that names this site (see
//! `dmrep_targets::replicator::marker`), every device before it is durable and nothing
//! after it is applied. [`GroupSnapshots::reached`] then, on that copier's thread:
//! 1. creates one sparse COW file per device under
//!    `<state dir>/snapshots/<group>/<name>/dev<N>.cow`, big enough never to fill (the
//!    device's size plus the exception metadata; only what is copied out takes space);
//! 2. attaches a persistent snapshot of each device's file (copy-on-write from now on:
//!    the applies that follow copy each chunk out before they change it);
//! 3. writes `info.json` (below), durably;
//! 4. has the daemon create one device per snapshot, named `<group>.<name>.<N>`, with the
//!    ordinary table `snapshot <device file> <COW file> P <chunk>`: recorded like any
//!    device, exported over NBD, brought back after a restart; the table load finds the
//!    snapshot already attached.
//!
//! Every recorded snapshot is attached when the daemon starts, before its groups come
//! back, and held until it is deleted: no apply after a restart reaches a device before
//! its snapshots copy out.
//!
//! Device creation runs on a worker thread (it takes the daemon's lock, which a removal
//! of the group may hold while it waits for the copier); the copier waits for it a
//! bounded time. The snapshot exists from step 2 either way.
//!
//! `info.json` (version 1): `{"v":1,"group":..,"name":..,"seq":..,"time_us":..,
//! "created_ms":..,"slink":..,"devices":[{"dev_nr":..,"origin":..,"cow":..,"device":..}]}`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};

use std::time::{Duration, SystemTime};

use dmrep_formats::control::{GroupSnapshot, Request, Response, SnapshotDevice};
use dmrep_targets::replicator::marker::{check_snapshot_name, MarkerHook, MarkerOutcome, MarkerReached};
use dmrep_targets::snapshot::Snapshot;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::daemon::Daemon;

/// Chunk size of group snapshots: 8 KiB (16 sectors), a small multiple of the 4 KiB
/// most file systems write, so a scattered workload copies out little it does not change.
pub const CHUNK_SECTORS: u64 = 16;

/// Longest the copier waits for the snapshot devices to be created.
const CREATE_WAIT: Duration = Duration::from_secs(10);

/// `info.json`'s version.
const INFO_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Info {
    v: u32,
    group: String,
    name: String,
    seq: u64,
    time_us: u64,
    created_ms: u64,
    slink: u16,
    devices: Vec<InfoDevice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InfoDevice {
    dev_nr: u32,
    origin: String,
    cow: String,
    device: String,
}

/// Work for the daemon, done on the snapshot thread.
type Job = Box<dyn FnOnce(&Daemon, &GroupSnapshots) + Send>;

/// The daemon's marker hook and its snapshots' bookkeeping.
pub struct GroupSnapshots {
    dir: PathBuf,
    /// This daemon's site name: a marker naming another site is not for it.
    site: Option<String>,
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Every snapshot at this site, attached from the moment it is taken (or from the
    /// daemon's start, before the groups come back, so that no apply reaches a device
    /// before its snapshots copy out) until it is deleted. Its device's table finds it.
    held: Mutex<BTreeMap<GroupAndName, Vec<Arc<Snapshot>>>>,
}

/// A snapshot's group and name.
type GroupAndName = (String, String);

/// The size of a COW file for a device of `origin_bytes`: every chunk copied out plus
/// its metadata (generously: an eighth more, and a MiB), sparse.
fn cow_bytes(origin_bytes: u64) -> u64 {
    origin_bytes + origin_bytes / 8 + (1 << 20)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl GroupSnapshots {
    /// The hook of `daemon`, keeping its snapshots under `state_dir/snapshots`.
    pub fn new(daemon: Weak<Daemon>, state_dir: &Path, site: Option<String>) -> Arc<GroupSnapshots> {
        let (tx, rx) = mpsc::channel::<Job>();
        let me = Arc::new(GroupSnapshots {
            dir: state_dir.join("snapshots"),
            site,
            jobs: Mutex::new(tx),
            held: Mutex::default(),
        });
        me.attach_all();
        let weak_me = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("snapshot-devices".into())
            .spawn(move || {
                for job in rx {
                    if let (Some(d), Some(s)) = (daemon.upgrade(), weak_me.upgrade()) {
                        job(&d, &s);
                    }
                }
            })
            .expect("spawning the snapshot thread");
        me
    }

    fn snap_dir(&self, group: &str, name: &str) -> PathBuf {
        self.dir.join(group).join(name)
    }

    fn take(&self, at: &MarkerReached) -> Result<String, String> {
        let m = &at.marker;
        check_snapshot_name(&m.name)?;
        let dir = self.snap_dir(&at.group, &m.name);
        if dir.join("info.json").exists() {
            return Err(format!(
                "a snapshot {} of group {} exists already (dmrep snapshot delete {} {} first)",
                m.name, at.group, at.group, m.name
            ));
        }
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let made = self.make(at, &dir);
        if made.is_err() {
            // Nothing half made stays (the snapshots attached so far went with `keep`).
            let _ = fs::remove_dir_all(&dir);
        }
        made
    }

    /// Steps 1 to 4 in `dir`.
    fn make(&self, at: &MarkerReached, dir: &Path) -> Result<String, String> {
        let m = &at.marker;
        let mut keep = Vec::new();
        let mut devices = Vec::new();
        for (nr, path) in &at.devices {
            let cow = dir.join(format!("dev{nr}.cow"));
            let origin_bytes = fs::metadata(path).map_err(|e| format!("{path}: {e}"))?.len();
            let f = fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&cow)
                .map_err(|e| format!("{}: {e}", cow.display()))?;
            f.set_len(cow_bytes(origin_bytes)).map_err(|e| format!("{}: {e}", cow.display()))?;
            drop(f);
            let s = dmrep_targets::snapshot::snapshot_of_file(Path::new(path), &cow, CHUNK_SECTORS * 512, true)
                .map_err(|e| format!("snapshot of {path}: {e}"))?;
            keep.push(s);
            devices.push(InfoDevice {
                dev_nr: *nr,
                origin: path.clone(),
                cow: cow.display().to_string(),
                device: format!("{}.{}.{nr}", at.group, m.name),
            });
        }
        let info = Info {
            v: INFO_VERSION,
            group: at.group.clone(),
            name: m.name.clone(),
            seq: at.seq,
            time_us: at.time_us,
            created_ms: now_ms(),
            slink: at.slink,
            devices,
        };
        crate::store::write_atomically(
            &dir.join("info.json"),
            &dir.join("info.json.tmp"),
            &serde_json::to_vec_pretty(&info).expect("json"),
        )
        .map_err(|e| format!("{}: {e}", dir.join("info.json").display()))?;
        let tables: Vec<(String, String)> = info
            .devices
            .iter()
            .map(|d| {
                let sectors = fs::metadata(&d.origin).map(|m| m.len() / 512).unwrap_or(0);
                (d.device.clone(), format!("0 {sectors} snapshot {} {} P {CHUNK_SECTORS}", d.origin, d.cow))
            })
            .collect();
        let names: Vec<String> = tables.iter().map(|t| t.0.clone()).collect();
        let (tx, rx) = mpsc::channel();
        self.held.lock().insert((at.group.clone(), m.name.clone()), keep);
        let job: Job = Box::new(move |d, _| {
            let _ = tx.send(create_devices(d, &tables));
        });
        let _ = self.jobs.lock().send(job);
        match rx.recv_timeout(CREATE_WAIT) {
            Ok(Ok(())) => Ok(format!("snapshot {} at seq {}: devices {}", m.name, at.seq, names.join(", "))),
            Ok(Err(e)) => Err(format!("snapshot {} taken, but its devices: {e}", m.name)),
            Err(_) => Ok(format!("snapshot {} at seq {}: devices {} being created", m.name, at.seq, names.join(", "))),
        }
    }

    /// The snapshots recorded at this site (`info.json` files), sorted.
    fn infos(&self, group: Option<&str>) -> Vec<Info> {
        let mut infos = Vec::new();
        let Ok(groups) = fs::read_dir(&self.dir) else { return infos };
        for g in groups.flatten() {
            if group.is_some_and(|want| g.file_name().to_str() != Some(want)) {
                continue;
            }
            for s in fs::read_dir(g.path()).into_iter().flatten().flatten() {
                match fs::read(s.path().join("info.json")).map(|b| serde_json::from_slice::<Info>(&b)) {
                    Ok(Ok(i)) => infos.push(i),
                    Ok(Err(e)) => warn!("{}: {e}", s.path().join("info.json").display()),
                    Err(_) => {} // taken half way (crash): nothing to list
                }
            }
        }
        infos.sort_by(|a, b| (&a.group, a.seq, &a.name).cmp(&(&b.group, b.seq, &b.name)));
        infos
    }

    /// At start-up, before any group: attach every recorded snapshot to its device.
    fn attach_all(&self) {
        for i in self.infos(None) {
            let mut keep = Vec::new();
            for d in &i.devices {
                match dmrep_targets::snapshot::snapshot_of_file(
                    Path::new(&d.origin),
                    Path::new(&d.cow),
                    CHUNK_SECTORS * 512,
                    true,
                ) {
                    Ok(s) => keep.push(s),
                    Err(e) => warn!(group = %i.group, name = %i.name, "snapshot of {} not attached: {e}", d.origin),
                }
            }
            self.held.lock().insert((i.group, i.name), keep);
        }
    }

    /// The snapshots of `group` (or all) at this site.
    pub fn list(&self, daemon: &Daemon, group: Option<&str>) -> Vec<GroupSnapshot> {
        let mut out = Vec::new();
        for i in self.infos(group) {
            let devices = i
                .devices
                .iter()
                .map(|d| {
                    let (state, used_bytes) = match daemon.segment_detail(&d.device) {
                        Some(j) => (
                            if j["valid"].as_bool().unwrap_or(false) { "valid" } else { "invalid" }.to_string(),
                            j["used_sectors"].as_u64().unwrap_or(0) * 512,
                        ),
                        None => ("missing".to_string(), 0),
                    };
                    SnapshotDevice {
                        dev_nr: d.dev_nr,
                        device: d.device.clone(),
                        origin: d.origin.clone(),
                        cow: d.cow.clone(),
                        state,
                        used_bytes,
                    }
                })
                .collect();
            out.push(GroupSnapshot {
                group: i.group,
                name: i.name,
                seq: i.seq,
                time_us: i.time_us,
                created_ms: i.created_ms,
                slink: i.slink,
                devices,
            });
        }
        out
    }

    /// Remove snapshot `name` of `group`: its devices, then its files.
    pub fn delete(&self, daemon: &Daemon, group: &str, name: &str) -> Result<(), String> {
        check_snapshot_name(name)?;
        let dir = self.snap_dir(group, name);
        let info: Info = match fs::read(dir.join("info.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", dir.join("info.json").display()))?,
            Err(_) if dir.exists() => {
                // Taken half way (a crash): only files.
                return fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()));
            }
            Err(_) => return Err(format!("no snapshot {name} of group {group} at this site")),
        };
        for d in &info.devices {
            if daemon.devices().get(&d.device).is_none() {
                continue;
            }
            match daemon.handle(Request::Remove { name: d.device.clone(), force: false }) {
                Response::Ok => {}
                Response::Error { message } => return Err(format!("removing {}: {message}", d.device)),
                other => return Err(format!("removing {}: unexpected answer {other:?}", d.device)),
            }
        }
        self.held.lock().remove(&(group.to_string(), name.to_string()));
        fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        info!(group, name, "snapshot deleted");
        Ok(())
    }
}

impl MarkerHook for GroupSnapshots {
    fn exists(&self, group: &str, name: &str) -> bool {
        self.snap_dir(group, name).join("info.json").exists()
    }

    fn drop_snapshot(&self, group: &str, name: &str) {
        let (group, name) = (group.to_string(), name.to_string());
        let job: Job = Box::new(move |d, s| match s.delete(d, &group, &name) {
            Ok(()) => info!(group, name, "resync ended: its snapshot dropped"),
            Err(e) => warn!(group, name, "resync ended, but its snapshot was not dropped: {e}"),
        });
        let _ = self.jobs.lock().send(job);
    }

    fn reached(&self, at: &MarkerReached) -> MarkerOutcome {
        if let Some(site) = &at.marker.site {
            if self.site.as_deref() != Some(site.as_str()) {
                return MarkerOutcome::NotHere;
            }
        }
        match self.take(at) {
            Ok(what) => MarkerOutcome::Done(what),
            Err(why) => MarkerOutcome::Failed(why),
        }
    }
}

/// Create the snapshot devices (any failure removes those created).
fn create_devices(daemon: &Daemon, tables: &[(String, String)]) -> Result<(), String> {
    let mut made = Vec::new();
    for (name, table) in tables {
        let req = Request::Create { name: name.clone(), table: table.clone(), uuid: None, read_only: false };
        match daemon.handle(req) {
            Response::Ok => made.push(name.clone()),
            other => {
                for n in made {
                    let _ = daemon.handle(Request::Remove { name: n, force: true });
                }
                return Err(match other {
                    Response::Error { message } => format!("creating {name}: {message}"),
                    o => format!("creating {name}: unexpected answer {o:?}"),
                });
            }
        }
    }
    Ok(())
}
