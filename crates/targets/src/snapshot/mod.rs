//! Snapshots, like the kernel's dm-snapshot: `snapshot-origin <origin>` and `snapshot
//! <origin> <COW> P|N <chunk_sectors>`.
//!
//! - A [`CowOrigin`] is the one writer of an origin file (or mapped device) in this
//!   process: every write, write-zeroes and discard through it first copies the old
//!   contents of each chunk it touches out to every live snapshot that has no
//!   exception for that chunk yet, makes that durable, and only then writes the origin.
//!   [`origin_for_file`] hands out the one `CowOrigin` of a file (keyed by device and
//!   inode), so that every writer that opens the file through it (the `snapshot-origin`
//!   target, the replicator's replicas) triggers copy-outs.
//! - A [`Snapshot`] is one exception [`store`] attached to an origin. Reads of a chunk
//!   with an exception come from the COW device, others from the origin. Snapshots are
//!   writable: a write allocates an exception (copying the rest of the chunk from the
//!   origin) and goes there.
//! - A snapshot whose COW device fills up (or fails) becomes invalid, durably; its reads
//!   and writes fail with an error naming the COW device; the origin carries on without
//!   copy-outs for it. If even the invalid state cannot be written to the COW device,
//!   origin writes fail rather than leave a snapshot that would, after a crash, read
//!   as valid but hold the origin's new data.
//!
//! Concurrency: byte-range locks on the origin ([`locks`]) serialise what touches the
//! same chunk (a copy-out and its origin write, a snapshot read of the origin, a
//! snapshot write allocating an exception); other chunks go in parallel, and
//! concurrent commits of one store are grouped ([`store`]).
//!
//! Lifetimes: origins and snapshots are held weakly by process-global registries; the
//! targets hold them. An origin lists its snapshots weakly; a snapshot holds its origin.
//! A table load that names a COW device whose snapshot is live (a reload) gets the same
//! [`Snapshot`]; after a restart the persistent store is reopened, never reformatted.

mod attach;
mod locks;
pub mod origin;
pub mod store;
pub mod target;

pub use attach::snapshot_of_file;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::path::Path;
use std::sync::{Arc, LazyLock, Weak};

use dmrep_core::claims::FileId;
use dmrep_core::{BlockBackend, FileBackend, MappedDevice};
use parking_lot::Mutex;

use self::locks::{RangeGuard, RangeLocks};
use self::store::{Invalid, Store, StoreError};

/// The live origins of this process, by file (or mapped device).
static ORIGINS: LazyLock<Mutex<HashMap<FileId, Weak<CowOrigin>>>> = LazyLock::new(Default::default);

/// The live snapshots of this process, by COW file (or mapped device).
static SNAPSHOTS: LazyLock<Mutex<HashMap<FileId, Weak<Snapshot>>>> = LazyLock::new(Default::default);

/// The registry key of mapped device `uuid` (the claims registry keys it the same way).
pub(crate) fn mapped_id(uuid: &str) -> FileId {
    use std::hash::{Hash, Hasher};
    let mut hs = std::collections::hash_map::DefaultHasher::new();
    uuid.hash(&mut hs);
    FileId::Mapped { id: hs.finish() }
}

/// A shared origin: every writer of an origin file goes through this so that each live
/// snapshot gets the old chunk copied out before it is overwritten.
///
/// As a [`BlockBackend`]: reads pass through; `write_at`, `write_vectored_at`,
/// `write_zeroes` and `discard` copy out first; `size()` is the origin's size.
pub struct CowOrigin {
    dev: Arc<dyn BlockBackend>,
    /// Its key in [`ORIGINS`] (none for an origin built directly, in tests).
    key: Option<FileId>,
    snapshots: Mutex<Vec<Weak<Snapshot>>>,
    locks: RangeLocks,
}

/// The one [`CowOrigin`] of the file at `path` in this process (keyed by
/// [`FileId`], i.e. device and inode, held weakly in a process-global registry: created
/// on first use, closed when the last user drops it).
pub fn origin_for_file(path: &Path) -> io::Result<Arc<CowOrigin>> {
    let key = FileId::of_path(path)?;
    origin_for(key, || Ok(Arc::new(FileBackend::open(path)?)))
}

/// The one [`CowOrigin`] of mapped device `dev` of this daemon (keyed by its UUID).
pub fn origin_for_mapped(dev: &Arc<MappedDevice>) -> Arc<CowOrigin> {
    let key = mapped_id(dev.uuid());
    let be = dmrep_core::mapped::MappedBackend::new(dev.clone());
    origin_for(key, || Ok(Arc::new(be))).expect("opening a mapped device cannot fail")
}

fn origin_for(key: FileId, open: impl FnOnce() -> io::Result<Arc<dyn BlockBackend>>) -> io::Result<Arc<CowOrigin>> {
    let mut map = ORIGINS.lock();
    if let Some(o) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(o);
    }
    let o = Arc::new(CowOrigin {
        dev: open()?,
        key: Some(key),
        snapshots: Mutex::new(Vec::new()),
        locks: RangeLocks::default(),
    });
    map.insert(key, Arc::downgrade(&o));
    Ok(o)
}

impl Drop for CowOrigin {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut map = ORIGINS.lock();
            if map.get(&key).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&key);
            }
        }
    }
}

/// `[start, end)` rounded out to multiples of `align` (a power of two).
fn round_out(start: u64, end: u64, align: u64) -> (u64, u64) {
    (start & !(align - 1), end.div_ceil(align).saturating_mul(align))
}

impl CowOrigin {
    /// An origin over `dev` outside the registry (tests, and callers that manage
    /// sharing themselves).
    pub fn new(dev: Arc<dyn BlockBackend>) -> Arc<CowOrigin> {
        Arc::new(CowOrigin { dev, key: None, snapshots: Mutex::new(Vec::new()), locks: RangeLocks::default() })
    }

    /// The back-end underneath (no copy-outs: for reads only).
    pub fn device(&self) -> &Arc<dyn BlockBackend> {
        &self.dev
    }

    /// Live snapshots of this origin, valid or not.
    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        let mut list = self.snapshots.lock();
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }

    /// Attaches a snapshot: waits for every origin write in flight (a write either is
    /// wholly before the snapshot or copies out for it).
    fn attach(&self, s: &Arc<Snapshot>) {
        let _all = self.locks.lock(0, u64::MAX);
        self.snapshots.lock().push(Arc::downgrade(s));
    }

    /// Locks the bytes an origin write of `offset..offset+len` touches (rounded out to
    /// the largest chunk of its snapshots) and returns the snapshots to copy out for.
    fn lock_for_write(&self, offset: u64, len: u64) -> (RangeGuard<'_>, Vec<Arc<Snapshot>>) {
        let mut align = 512u64;
        loop {
            let (a, b) = round_out(offset, offset + len, align);
            let guard = self.locks.lock(a, b);
            let snaps = self.snapshots();
            let need = snaps.iter().map(|s| s.chunk_bytes()).max().unwrap_or(512).max(align);
            if need == align {
                return (guard, snaps);
            }
            // A snapshot with larger chunks: lock more (rare: only when they differ).
            drop(guard);
            align = need;
        }
    }

    /// Runs `write` (which writes the ranges `ranges` of [`CowOrigin::device`], in any
    /// order) after copying out every chunk they touch to every snapshot that needs it,
    /// with one commit per snapshot: a batch of writes (a replica's epoch) pays for one
    /// metadata commit, not one per write. Holds the span of the ranges locked meanwhile.
    pub fn write_batch(&self, ranges: &[(u64, u64)], write: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let ranges: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
        let (Some(lo), Some(hi)) = (ranges.iter().map(|r| r.0).min(), ranges.iter().map(|r| r.0 + r.1).max()) else {
            return write();
        };
        let (_guard, snaps) = self.lock_for_write(lo, hi - lo);
        for s in &snaps {
            s.copy_out_ranges(&ranges)?;
        }
        write()
    }

    /// Runs `write` on the origin after copying out `offset..offset+len` to every
    /// snapshot that needs it.
    fn guarded_write(&self, offset: u64, len: u64, write: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        if len == 0 {
            return write();
        }
        let (guard, snaps) = self.lock_for_write(offset, len);
        let res = snaps.iter().try_for_each(|s| s.copy_out(offset, len)).and_then(|()| write());
        // The range first: dropping the last handle of a snapshot takes the registry's
        // lock, which an `attach` waiting for this range may hold.
        drop(guard);
        drop(snaps);
        res
    }
}

impl BlockBackend for CowOrigin {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.dev.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.guarded_write(offset, buf.len() as u64, || self.dev.write_at(buf, offset))
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.guarded_write(offset, len, || self.dev.write_vectored_at(bufs, offset))
    }

    fn sync(&self) -> io::Result<()> {
        self.dev.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guarded_write(offset, len, || self.dev.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.guarded_write(offset, len, || self.dev.write_zeroes(offset, len, may_trim))
    }

    fn describe(&self) -> String {
        self.dev.describe()
    }
}

/// One exception store attached to an origin.
pub struct Snapshot {
    origin: Arc<CowOrigin>,
    store: Store,
    /// Its key in [`SNAPSHOTS`] (none for a snapshot built directly, in tests).
    key: Option<FileId>,
}

/// Why a snapshot cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "COW device {cow} is already in use by a snapshot (of {origin}, chunk size {chunk} sectors, {kind}): \
         two snapshots cannot share a COW device"
    )]
    InUse { cow: String, origin: String, chunk: u64, kind: &'static str },
}

impl Snapshot {
    /// Opens the store on `cow` (named `cow_path`) and attaches it to `origin`; see
    /// [`Store::open`]. Not registered: for tests and callers that manage sharing.
    pub fn open(
        origin: &Arc<CowOrigin>,
        cow: Arc<dyn BlockBackend>,
        cow_path: &str,
        chunk_bytes: u64,
        persistent: bool,
    ) -> Result<Arc<Snapshot>, SnapshotError> {
        Self::open_keyed(origin, cow, cow_path, chunk_bytes, persistent, None)
    }

    fn open_keyed(
        origin: &Arc<CowOrigin>,
        cow: Arc<dyn BlockBackend>,
        cow_path: &str,
        chunk_bytes: u64,
        persistent: bool,
        key: Option<FileId>,
    ) -> Result<Arc<Snapshot>, SnapshotError> {
        let store = Store::open(cow, cow_path, chunk_bytes, persistent, origin.size())?;
        let s = Arc::new(Snapshot { origin: origin.clone(), store, key });
        origin.attach(&s);
        Ok(s)
    }

    /// The snapshot whose COW device is `key` if it is live (a reload of its device
    /// gets the same one), else a new one opened with `open_cow`. A live one must have
    /// the same origin, chunk size and persistence.
    pub(crate) fn for_cow(
        key: FileId,
        origin: &Arc<CowOrigin>,
        cow_path: &str,
        chunk_bytes: u64,
        persistent: bool,
        open_cow: impl FnOnce() -> io::Result<Arc<dyn BlockBackend>>,
    ) -> Result<Arc<Snapshot>, crate::snapshot::target::BuildError> {
        let mut map = SNAPSHOTS.lock();
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            if Arc::ptr_eq(&s.origin, origin) && s.chunk_bytes() == chunk_bytes && s.store.persistent() == persistent {
                return Ok(s);
            }
            return Err(SnapshotError::InUse {
                cow: cow_path.to_string(),
                origin: s.origin.describe(),
                chunk: s.chunk_bytes() / 512,
                kind: if s.store.persistent() { "persistent" } else { "transient" },
            }
            .into());
        }
        let cow = open_cow().map_err(|e| crate::snapshot::target::BuildError::Cow(cow_path.to_string(), e))?;
        let s = Self::open_keyed(origin, cow, cow_path, chunk_bytes, persistent, Some(key))?;
        map.insert(key, Arc::downgrade(&s));
        Ok(s)
    }

    /// Its origin.
    pub fn origin(&self) -> &Arc<CowOrigin> {
        &self.origin
    }

    /// Its exception store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// False once its COW store filled up (or failed).
    pub fn is_valid(&self) -> bool {
        self.store.invalid().is_none()
    }

    /// The COW device's path (as the table names it).
    pub fn cow_path(&self) -> String {
        self.store.path().to_string()
    }

    /// Chunks of the COW device in use (header, metadata and data).
    pub fn used_chunks(&self) -> u64 {
        self.store.used_chunks()
    }

    /// Whole chunks of the COW device.
    pub fn total_chunks(&self) -> u64 {
        self.store.total_chunks()
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> u64 {
        self.store.chunk_bytes()
    }

    /// Bytes of origin chunk `c` (the last chunk of an origin may be short).
    fn chunk_len(&self, c: u64) -> u64 {
        let cb = self.chunk_bytes();
        (self.origin.size().saturating_sub(c * cb)).min(cb)
    }

    /// Origin chunks touched by `offset..offset+len`.
    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let cb = self.chunk_bytes();
        offset / cb..(offset + len).div_ceil(cb)
    }

    /// Copies out the old contents of the chunks of `offset..offset+len` that have no
    /// exception yet, durably. Called by the origin with the range locked. An invalid
    /// snapshot needs nothing, once its header says so.
    fn copy_out(&self, offset: u64, len: u64) -> io::Result<()> {
        self.copy_out_ranges(&[(offset, len)])
    }

    /// [`Snapshot::copy_out`] of several ranges with one commit (the ranges locked).
    fn copy_out_ranges(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        if self.store.invalid().is_none() {
            let mut done = Vec::new();
            let mut buf = Vec::new();
            for c in ranges.iter().flat_map(|(o, l)| self.chunks(*o, *l)) {
                if self.store.lookup(c).is_some() {
                    continue;
                }
                let Ok((n, new)) = self.store.allocate(c) else { break };
                let cb = self.chunk_bytes();
                buf.resize(self.chunk_len(c) as usize, 0);
                let res =
                    self.origin.dev.read_at(&mut buf, c * cb).and_then(|()| self.store.cow().write_at(&buf, new * cb));
                if let Err(e) = res {
                    self.store.fail(&e);
                    break;
                }
                done.push(n);
            }
            if self.store.commit(&done).is_ok() {
                return Ok(());
            }
        }
        // Invalid (now or before): the origin write may go on once that is durable.
        match self.store.invalid_durable() {
            Ok(true) => Ok(()),
            Ok(false) => Err(io::Error::other(format!(
                "origin write refused: copy-out to snapshot COW device {} failed",
                self.store.path()
            ))),
            Err(e) => Err(io::Error::other(format!(
                "origin write refused: snapshot COW device {} failed and cannot be marked invalid: {}",
                self.store.path(),
                dmrep_core::errors::io_error_text(&e)
            ))),
        }
    }

    /// Reads `buf.len()` bytes of the snapshot at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.store.check_valid()?;
        let (a, b) = round_out(offset, offset + buf.len() as u64, self.chunk_bytes());
        let _guard = self.origin.locks.lock(a, b);
        self.store.check_valid()?;
        let cb = self.chunk_bytes();
        let mut at = offset;
        let end = offset + buf.len() as u64;
        while at < end {
            let c = at / cb;
            let piece = ((c + 1) * cb).min(end) - at;
            let dst = &mut buf[(at - offset) as usize..(at - offset + piece) as usize];
            match self.store.lookup(c) {
                Some(new) => self.store.cow().read_at(dst, new * cb + at % cb)?,
                None => self.origin.dev.read_at(dst, at)?,
            }
            at += piece;
        }
        Ok(())
    }

    /// Writes `data` to the snapshot at `offset` (`None`: zeros of `len` bytes):
    /// chunks with an exception are written in the COW device; others get one first,
    /// the rest of the chunk copied from the origin. Returns once the new exceptions
    /// are durable (the data of existing ones is durable after a flush).
    pub fn write_at(&self, data: Option<&[u8]>, offset: u64, len: u64) -> io::Result<()> {
        self.store.check_valid()?;
        if len == 0 {
            return Ok(());
        }
        let cb = self.chunk_bytes();
        let (a, b) = round_out(offset, offset + len, cb);
        let _guard = self.origin.locks.lock(a, b);
        let end = offset + len;
        let mut done = Vec::new();
        let mut chunk = Vec::new();
        let mut at = offset;
        let res = (|| {
            while at < end {
                let c = at / cb;
                let piece = ((c + 1) * cb).min(end) - at;
                let src = data.map(|d| &d[(at - offset) as usize..(at - offset + piece) as usize]);
                match self.store.lookup(c) {
                    Some(new) => match src {
                        Some(s) => self.store.cow().write_at(s, new * cb + at % cb)?,
                        None => self.store.cow().write_zeroes(new * cb + at % cb, piece, false)?,
                    },
                    None => {
                        let (n, new) = self.store.allocate(c)?;
                        chunk.resize(self.chunk_len(c) as usize, 0);
                        let r = (|| {
                            if piece < chunk.len() as u64 {
                                self.origin.dev.read_at(&mut chunk, c * cb)?;
                            }
                            let within = (at % cb) as usize..(at % cb + piece) as usize;
                            match src {
                                Some(s) => chunk[within].copy_from_slice(s),
                                None => chunk[within].fill(0),
                            }
                            self.store.cow().write_at(&chunk, new * cb)
                        })();
                        if let Err(e) = r {
                            self.store.fail(&e);
                            return Err(e);
                        }
                        done.push(n);
                    }
                }
                at += piece;
            }
            Ok(())
        })();
        // Exceptions allocated before an error are committed all the same (their data
        // is written), so that allocation order is kept for later writers.
        let committed = self.store.commit(&done);
        res.and(committed)
    }

    /// Makes completed snapshot writes durable.
    pub fn sync(&self) -> io::Result<()> {
        self.store.check_valid()?;
        self.store.cow().sync()
    }

    /// The dmsetup-style status: `<used sectors>/<total sectors> <metadata sectors>`,
    /// or `Invalid`.
    pub fn status_line(&self) -> String {
        if !self.is_valid() {
            return "Invalid".to_string();
        }
        let cs = self.chunk_bytes() / 512;
        format!("{}/{} {}", self.used_chunks() * cs, self.total_chunks() * cs, self.store.metadata_chunks() * cs)
    }

    /// The same facts as JSON, with the paths.
    pub fn status_json(&self) -> serde_json::Value {
        let cs = self.chunk_bytes() / 512;
        let invalid = self.store.invalid().map(|why| match why {
            Invalid::Full => "filled up".to_string(),
            Invalid::Loaded => "invalid when loaded".to_string(),
            Invalid::Failed(e) => format!("failed: {e}"),
        });
        serde_json::json!({
            "origin": self.origin.describe(),
            "cow": self.cow_path(),
            "persistent": self.store.persistent(),
            "chunk_sectors": cs,
            "valid": invalid.is_none(),
            "invalid_reason": invalid,
            "exceptions": self.store.exceptions(),
            "used_sectors": self.used_chunks() * cs,
            "total_sectors": self.total_chunks() * cs,
            "metadata_sectors": self.store.metadata_chunks() * cs,
        })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut map = SNAPSHOTS.lock();
            if map.get(&key).is_some_and(|w| w.strong_count() == 0) {
                map.remove(&key);
            }
        }
    }
}
