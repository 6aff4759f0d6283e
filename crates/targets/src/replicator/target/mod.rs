//! The `replicator` control target and the `replicator-dev` target.
//!
//! Two table forms (DESIGN section 5):
//! - the paper's one-line form: a `replicator` segment naming the log, the SLINKs and
//!   the devices; the daemon then creates one companion device `NAME-<dev_nr>` per LD,
//!   whose table is the equivalent `replicator-dev` line ([`Target::companions`]);
//! - the two-target form: a `replicator` control device (log and SLINKs only) and one
//!   `replicator-dev <control> <dev_nr> ...` device per replicated device.
//!
//! The control device itself holds no data: reads return zeros, writes fail (EPERM).

//! Split by concern: [`control`] (the `replicator` target: the group, its log and
//! SLINKs, reloads, messages, status) and [`dev`] (the `replicator-dev` target: one
//! replicated device). What both use (claims, dirty logs, conversions) is here.

mod control;
mod dev;

pub use control::{construct, ReplicatorTarget};
pub use dev::{construct_dev, ReplicatorDev};

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmrep_core::claims::{FileId, WHOLE_FILE};
use dmrep_core::units::sectors_to_bytes;
use dmrep_core::{
    BlockBackend, BuildContext, Claim, Claims, Completion, FileBackend, Op, Owner, Request, Target, TargetError,
    TargetStatus,
};
use dmrep_formats::replicator_table::{
    parse_replicator, parse_replicator_dev, DirtyLogSpec, OpenMode, ReplicaSpec, ReplicatorSpec, SlinkKind,
};
use dmrep_formats::table::SegmentSpec;
use parking_lot::Mutex;

use super::dirty::core::CoreLog;
use super::dirty::disk::DiskLog;
use super::dirty::DirtyLog;
use super::fallbehind::{Policy, Thresholds};
use super::group::{DevNr, Group, SlinkNr, SlinkSetup, MAX_ENTRY_DATA};
use super::log::RingLog;
use super::slink::local::LocalSlink;
use super::slink::SlinkHandler;

const T: &str = "replicator";

/// Smallest log that holds one maximal entry: superblocks (8 KiB), an entry header
/// (512 B) and a maximal entry's data, plus one header of slack for the wrap marker.
const MIN_LOG_BYTES: u64 = 8192 + 1024 + MAX_ENTRY_DATA;
const TD: &str = "replicator-dev";

/// Claims (DESIGN 4.9) on a group's files, made for one owner: the group itself (its
/// log; the paper form's devices; SLINKs a reload adds), or a replicator-dev's table
/// (the devices it attaches). Each guard goes to what uses the bytes: the group (released
/// when it stops), an SLINK handler (released when the device is detached), a dirty log.
struct Claiming<'a> {
    registry: &'a Arc<Claims>,
    owner: &'a Owner,
    group: &'a str,
    /// Files created for this table: removed again unless the table is accepted.
    created: std::cell::RefCell<Vec<NewFile>>,
}

/// A file dmrep created for a table (a missing replication log or `disk` dirty log):
/// sparse, at the size needed (nothing is written that the log or dirty log does not
/// write itself; a file system that cannot hold the data later fails those writes,
/// which fail as I/O errors). Removed when dropped, unless kept.
struct NewFile {
    path: std::path::PathBuf,
    keep: bool,
}

impl NewFile {
    /// Create `path` with `bytes` bytes if nothing is there. `None`: it existed.
    fn create_if_missing(path: &str, bytes: u64) -> Result<Option<NewFile>, TargetError> {
        let p = Path::new(path);
        let file = match std::fs::OpenOptions::new().write(true).create_new(true).open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) => return Err(TargetError::Device { path: path.to_string(), source: e }),
        };
        let new = NewFile { path: p.to_path_buf(), keep: false };
        file.set_len(bytes).map_err(|e| TargetError::Device { path: path.to_string(), source: e })?;
        tracing::info!(path, bytes, "created a sparse file for the table");
        Ok(Some(new))
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl<'a> Claiming<'a> {
    fn new(registry: &'a Arc<Claims>, owner: &'a Owner, group: &'a str) -> Self {
        Claiming { registry, owner, group, created: Default::default() }
    }

    /// Create `path` (`bytes` long, sparse) if it is missing; removed again unless the
    /// table is accepted ([`Claiming::accept`]).
    fn create_if_missing(&self, path: &str, bytes: u64) -> Result<(), TargetError> {
        if let Some(f) = NewFile::create_if_missing(path, bytes)? {
            self.created.borrow_mut().push(f);
        }
        Ok(())
    }

    /// Whether this table created `path` (it was missing).
    fn created(&self, path: &str) -> bool {
        self.created.borrow().iter().any(|f| f.path == Path::new(path))
    }

    /// The table is accepted: the files created for it stay.
    fn accept(self) {
        for mut f in self.created.take() {
            f.keep = true;
            drop(f);
        }
    }

    fn claim(&self, path: &str, range: Range<u64>, role: String) -> Result<Claim, TargetError> {
        Ok(self.registry.claim(self.owner, role, Path::new(path), range)?)
    }

    /// Device `dev_nr` of SLINK `slink` (the LD on SLINK 0, else an RD): `0..bytes`.
    fn device(&self, slink: SlinkNr, dev_nr: DevNr, path: &str, bytes: u64) -> Result<Claim, TargetError> {
        let kind = if slink == 0 { "LD" } else { "RD" };
        self.claim(path, 0..bytes, format!("{kind} of group {}, slink {slink} device {dev_nr}", self.group))
    }

    /// The `disk` dirty log of replica `r` of device `dev_nr` (`dev_bytes` long), if it
    /// has one: the whole file, created at the size it needs if missing.
    fn dirty_log(&self, dev_nr: u32, r: &ReplicaSpec, dev_bytes: u64) -> Result<Option<Claim>, TargetError> {
        match &r.dirty_log {
            DirtyLogSpec::Disk { path, region_sectors, .. } => {
                let regions = dev_bytes.div_ceil(sectors_to_bytes(*region_sectors).max(1));
                self.create_if_missing(path, super::dirty::disk::bytes_needed(regions))?;
                let role = format!("disk dirty log of group {}, slink {} device {dev_nr}", self.group, r.slink_nr);
                self.claim(path, WHOLE_FILE, role).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// An RD whose file is gone when the daemon restores its table: the group comes up
/// degraded (that SLINK down, probed until the file is back) rather than not at all.
/// Only at a restore, only for RDs: an operator's new table naming a missing file is
/// refused, and a missing LD stops its device.
fn missing_rd(ctx: &BuildContext<'_>, slink: SlinkNr, path: &str) -> bool {
    let missing = ctx.restoring && slink != 0 && !Path::new(path).exists();
    if missing {
        tracing::warn!(device = ctx.device_name, slink, path, "replica missing at restart: its slink starts down");
    }
    missing
}

/// What a control device publishes for its replicator-devs.
pub struct GroupHandle {
    group: Mutex<Option<Arc<Group>>>,
    /// Paths attached by the paper form, per (slink, dev_nr).
    declared: Mutex<Vec<(SlinkNr, DevNr, String)>>,
    /// Tables (live and loaded) using the group: it stops when the last one goes.
    users: AtomicUsize,
    /// The log's file and start byte (a reload must keep them).
    log_key: (FileId, u64),
    /// The log's size as its table gives it (a reload keeps it).
    log_size: Option<u64>,
    /// The group's own claims, released when it stops; `owner` makes more (reloads).
    owner: Owner,
    claims: Mutex<Vec<Claim>>,
    dev_bytes: u64,
    /// The log was created (not recovered) when the group started.
    fresh_log: bool,
}

impl GroupHandle {
    fn group(&self) -> Option<Arc<Group>> {
        self.group.lock().clone()
    }
}

/// A group as a site receiver sees it.
pub struct SiteGroup {
    pub group: Arc<Group>,
    /// Bytes of each device of the group.
    pub dev_bytes: u64,
}

/// The group named `name` (its control device), if it runs.
pub fn site_group(devices: &dmrep_core::DeviceRegistry, name: &str) -> Option<SiteGroup> {
    let h = devices.lookup::<GroupHandle>(name)?;
    let group = h.group()?;
    Some(SiteGroup { group, dev_bytes: h.dev_bytes })
}

pub fn thresholds_of(f: &dmrep_formats::replicator_table::FallBehind) -> Thresholds {
    Thresholds { ios: f.ios, bytes: f.size_bytes, timeout: f.timeout_ms.map(Duration::from_millis) }
}

/// A replica's dirty log, opened (a new `disk` log is formatted), and whether every
/// region must start dirty. A `sync` dirty log means an initial full copy when the RD is
/// new to the group (`new_rd`: the group's log was created now, or the SLINK is being
/// added); a `disk` log formatted now already starts all dirty, an existing one is
/// trusted. `None` for the LD (no dirty log).
type OpenedDirty = Option<(Arc<dyn DirtyLog>, bool)>;

fn open_dirty(
    r: &ReplicaSpec,
    dev_nr: u32,
    dev_bytes: u64,
    new_rd: bool,
    slink_ordered: bool,
    claiming: &Claiming<'_>,
) -> Result<OpenedDirty, TargetError> {
    let claim = claiming.dirty_log(dev_nr, r, dev_bytes)?;
    Ok(match &r.dirty_log {
        DirtyLogSpec::None => None,
        DirtyLogSpec::Core { region_sectors, sync } => {
            Some((Arc::new(CoreLog::new(dev_bytes, sectors_to_bytes(*region_sectors))), *sync && new_rd))
        }
        DirtyLogSpec::Disk { path, region_sectors, sync } => {
            // A dirty log missing for an RD out of sync in a group that had it already
            // (a restart): what it said is lost, so every region is dirty. (An SLINK in
            // ordered mode has nothing dirty to lose.)
            let all_dirty = *sync || (claiming.created(path) && !new_rd && !slink_ordered);
            let (mut l, _formatted) = DiskLog::open(path, dev_bytes, sectors_to_bytes(*region_sectors), all_dirty)
                .map_err(|e| TargetError::failed(T, e))?;
            if let Some(c) = claim {
                l.keep_claim(c);
            }
            Some((Arc::new(l), false))
        }
    })
}

/// Attach an opened dirty log of device `dev_nr`'s replica `r` to the group.
fn attach_opened(
    group: &Group,
    dev_nr: u32,
    r: &ReplicaSpec,
    dev_bytes: u64,
    opened: OpenedDirty,
) -> Result<(), TargetError> {
    match opened {
        None => Ok(()),
        Some((log, initial)) => {
            group.attach_dirty_log(r.slink_nr, dev_nr, log, dev_bytes, initial).map_err(|e| TargetError::failed(T, e))
        }
    }
}

/// Open a replica's dirty log and attach it to the group.
fn attach_dirty(
    group: &Group,
    dev_nr: u32,
    r: &ReplicaSpec,
    dev_bytes: u64,
    new_rd: bool,
    claiming: &Claiming<'_>,
) -> Result<(), TargetError> {
    let ordered = group.is_ordered(r.slink_nr);
    attach_opened(group, dev_nr, r, dev_bytes, open_dirty(r, dev_nr, dev_bytes, new_rd, ordered, claiming)?)
}
