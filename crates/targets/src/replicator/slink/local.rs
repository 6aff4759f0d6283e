//! `local` (alias `blockdev`): the site's devices are files or block devices on this
//! host (iSCSI, FC and the like look local too).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use dmrep_core::{BlockBackend, Claim, TargetError};
use parking_lot::{Mutex, RwLock};

use super::{ApplyEntry, SlinkHandler};
use crate::replicator::log::EntryKind;
use crate::snapshot::CowOrigin;

struct Dev {
    backend: Arc<dyn BlockBackend>,
    /// The file's copy-on-write origin (`backend`, as itself): an apply copies out for
    /// all its writes at once. None for test back-ends and missing devices.
    cow: Option<Arc<CowOrigin>>,
    path: String,
    /// Missing when the table was restored: `backend` fails every I/O, and probes try
    /// to open `path` again (this many bytes needed).
    missing: Option<u64>,
    /// Its claims (DESIGN 4.9): released when the last `Arc<Dev>` goes, i.e. once the
    /// device is detached and no I/O to it is in flight.
    claims: Mutex<Vec<Claim>>,
}

/// Devices by dev_nr.
#[derive(Default)]
pub struct LocalSlink {
    devs: RwLock<BTreeMap<u32, Arc<Dev>>>,
    /// Test hook: a back-end to use instead of opening a path (fault injection).
    #[cfg(any(test, feature = "test-support"))]
    overrides: RwLock<BTreeMap<String, Arc<dyn BlockBackend>>>,
    /// Test hook: behave like a site that keeps its own log (several epochs per apply).
    #[cfg(any(test, feature = "test-support"))]
    keeps_log: std::sync::atomic::AtomicBool,
}

impl LocalSlink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Use `backend` whenever `path` is attached (tests: slow or failing devices).
    #[cfg(any(test, feature = "test-support"))]
    pub fn override_path(&self, path: &str, backend: Arc<dyn BlockBackend>) {
        self.overrides.write().insert(path.to_string(), backend);
    }

    /// Behave, for the group, like a site with a log of its own (tests of multi-epoch
    /// applies without a network).
    #[cfg(any(test, feature = "test-support"))]
    pub fn pretend_keeps_log(&self) {
        self.keeps_log.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The back-end [`LocalSlink::override_path`] set for `path`, if any.
    #[cfg(any(test, feature = "test-support"))]
    fn overridden(&self, path: &str) -> Option<Arc<dyn BlockBackend>> {
        self.overrides.read().get(path).cloned()
    }

    /// Without the test hooks nothing is overridden.
    #[cfg(not(any(test, feature = "test-support")))]
    fn overridden(&self, _path: &str) -> Option<Arc<dyn BlockBackend>> {
        None
    }

    fn dev(&self, dev_nr: u32) -> io::Result<Arc<Dev>> {
        self.devs
            .read()
            .get(&dev_nr)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("device {dev_nr} not attached")))
    }
}

/// Apply one entry to `dev`.
fn apply_one(dev: &dyn BlockBackend, e: &ApplyEntry<'_>) -> io::Result<()> {
    match e.kind {
        EntryKind::Write => dev.write_at(e.data, e.offset),
        EntryKind::WriteZeroes => dev.write_zeroes(e.offset, e.len as u64, false),
        // A discarded range reads as zeros afterwards, as it did from the log before it
        // was applied: reads never change with timing.
        EntryKind::Discard => dev.write_zeroes(e.offset, e.len as u64, true),
        EntryKind::Marker => Ok(()),
    }
}

/// The back-end of a device missing when its table was restored: every I/O fails.
struct Missing(String);

impl Missing {
    fn err(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{}: missing (it was not there when the group started)", self.0),
        )
    }
}

impl BlockBackend for Missing {
    fn size(&self) -> u64 {
        0
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(self.err())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(self.err())
    }
    fn sync(&self) -> io::Result<()> {
        Err(self.err())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(self.err())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(self.err())
    }
    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl SlinkHandler for LocalSlink {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn attach(&self, dev_nr: u32, device: &str, need_bytes: u64) -> Result<(), TargetError> {
        let (backend, cow): (Arc<dyn BlockBackend>, _) = match self.overridden(device) {
            Some(b) => (b, None),
            // Through the file's one copy-on-write origin: a snapshot of this device
            // (a group snapshot, a `snapshot` table) gets its old chunks before they change.
            None => {
                let o = crate::snapshot::origin_for_file(Path::new(device))
                    .map_err(|e| TargetError::Device { path: device.to_string(), source: e })?;
                (o.clone(), Some(o))
            }
        };
        if backend.size() < need_bytes {
            return Err(TargetError::params(
                "replicator",
                format!(
                    "{device}: device {dev_nr} is {} sectors, smaller than the {} sectors it must hold",
                    backend.size() / 512,
                    need_bytes / 512
                ),
            ));
        }
        self.devs.write().insert(
            dev_nr,
            Arc::new(Dev { backend, cow, path: device.to_string(), missing: None, claims: Mutex::default() }),
        );
        Ok(())
    }

    fn attach_missing(&self, dev_nr: u32, device: &str, need_bytes: u64) {
        let backend: Arc<dyn BlockBackend> = Arc::new(Missing(device.to_string()));
        self.devs.write().insert(
            dev_nr,
            Arc::new(Dev {
                backend,
                cow: None,
                path: device.to_string(),
                missing: Some(need_bytes),
                claims: Mutex::default(),
            }),
        );
    }

    fn keep_claim(&self, dev_nr: u32, claim: Claim) {
        // (A device not attached uses nothing: the claim goes at once.)
        if let Some(d) = self.devs.read().get(&dev_nr) {
            d.claims.lock().push(claim);
        }
    }

    fn detach(&self, dev_nr: u32) {
        self.devs.write().remove(&dev_nr);
    }

    fn keeps_log(&self) -> bool {
        #[cfg(any(test, feature = "test-support"))]
        if self.keeps_log.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        false
    }

    fn has_device(&self, dev_nr: u32) -> bool {
        self.devs.read().contains_key(&dev_nr)
    }

    fn devices(&self) -> Vec<u32> {
        self.devs.read().keys().copied().collect()
    }

    fn apply(&self, entries: &[ApplyEntry<'_>]) -> io::Result<()> {
        // Device by device, each device's entries in the given order (overlapping ones
        // land in order); the devices' order does not matter: all are synced before the
        // apply returns. (The copier acts on markers before handing the rest over.)
        let mut by_dev: BTreeMap<u32, Vec<&ApplyEntry<'_>>> = BTreeMap::new();
        for e in entries.iter().filter(|e| e.kind.changes_data()) {
            by_dev.entry(e.dev_nr).or_default().push(e);
        }
        for (nr, es) in &by_dev {
            let dev = self.dev(*nr)?;
            match &dev.cow {
                // One copy-out commit for the whole batch, then the writes themselves.
                Some(o) => {
                    let ranges: Vec<(u64, u64)> = es.iter().map(|e| (e.offset, e.len as u64)).collect();
                    o.write_batch(&ranges, || es.iter().try_for_each(|e| apply_one(&**o.device(), e)))?
                }
                None => es.iter().try_for_each(|e| apply_one(&*dev.backend, e))?,
            }
        }
        for nr in by_dev.keys() {
            self.dev(*nr)?.backend.sync()?;
        }
        Ok(())
    }

    fn read(&self, dev_nr: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.dev(dev_nr)?.backend.read_at(buf, offset)
    }

    /// Exercise the write path down to the device: a read alone may be answered by
    /// the page cache while the device is dead. Sector 0 is written back with its own
    /// contents and synced; nothing else writes to this SLINK's devices while it is
    /// down (the copier that would is the one probing).
    fn probe(&self) -> io::Result<()> {
        // A device that was missing is opened again first (it came back).
        let missing: Vec<(u32, String, u64)> =
            self.devs.read().iter().filter_map(|(nr, d)| d.missing.map(|b| (*nr, d.path.clone(), b))).collect();
        for (nr, path, need) in missing {
            self.attach(nr, &path, need).map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
            tracing::info!(path, dev_nr = nr, "a device missing at start is back");
        }
        let devs: Vec<_> = self.devs.read().values().map(|d| d.backend.clone()).collect();
        let mut sector = [0u8; 512];
        for d in devs {
            d.read_at(&mut sector, 0)?;
            d.write_at(&sector, 0)?;
            d.sync()?;
        }
        Ok(())
    }

    fn device_path(&self, dev_nr: u32) -> Option<String> {
        self.devs.read().get(&dev_nr).map(|d| d.path.clone())
    }

    fn describe(&self) -> String {
        self.devs.read().iter().map(|(nr, d)| format!("{nr}:{}", d.path)).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmrep_core::claims::FileId;
    use dmrep_core::{Claims, Owner};

    #[test]
    fn a_kept_claim_lasts_until_the_device_is_detached_and_idle() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ld");
        std::fs::write(&f, vec![0u8; 8192]).unwrap();
        let path = f.to_str().unwrap();
        let reg = Claims::new();
        let s = LocalSlink::new();
        s.attach(0, path, 8192).unwrap();
        s.keep_claim(0, reg.claim(&Owner::new("db0"), "LD of group g, slink 0 device 0", &f, 0..8192).unwrap());
        let id = FileId::of_path(&f).unwrap();
        assert_eq!(reg.users(id).len(), 1);
        // I/O in flight (a copier holds the device) keeps the claim past the detach.
        let busy = s.dev(0).unwrap();
        s.detach(0);
        assert_eq!(reg.users(id).len(), 1);
        drop(busy);
        assert!(reg.users(id).is_empty());
        // A claim for a device not attached goes at once.
        s.keep_claim(7, reg.claim(&Owner::new("db0"), "x", &f, 0..512).unwrap());
        assert!(reg.users(id).is_empty());
    }
}
