//! Claims: who uses which bytes of which file (DESIGN 4.9, "one owner per byte").
//!
//! Every target that opens a file or block device claims the byte range it will read
//! and write, before it writes anything: a `linear` segment its sectors, a replicator its
//! log (`start..start+size`), each LD and RD (`0..device length`) and each `disk` dirty
//! log (the whole file). A claim that overlaps another user's claim on the same file is
//! refused, naming both users and the file.
//!
//! - **The same file** is judged by what the path opens, not by the path: `(st_dev,
//!   st_ino)` for a regular file (a hard link or a symlink is the same file), `st_rdev`
//!   for a block device (two device nodes of one disk are the same disk).
//! - **The same user** may claim its own bytes again: an owner is a device and one of
//!   its *scopes* (a table, or a replicator group that outlives its tables). Claims of
//!   one device in different scopes never conflict: a reloaded table claims what the
//!   live one holds, and the live one lets go when it is replaced (only one of them is
//!   ever active). Within one scope, two different roles (the log and an LD, two RDs)
//!   conflict; the same role claimed twice (a reload loaded twice) does not.
//! - **Other processes**: the first claim on a file takes an exclusive advisory lock
//!   (`flock(LOCK_EX|LOCK_NB)`) on an open file of its own, held until the last claim on
//!   that file is released; so a second daemon (with another state directory) cannot use
//!   the file, and the error names the pid holding the lock when `/proc/locks` tells.
//!
//! A [`Claim`] is an RAII guard: dropping it releases the bytes.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// The range that means "the whole file, whatever its size" (a `disk` dirty log).
pub const WHOLE_FILE: Range<u64> = 0..u64::MAX;

/// What a path opens, independent of the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileId {
    /// A regular file: its file system and inode.
    Inode { dev: u64, ino: u64 },
    /// A block device: the device number it opens (not the inode of its node).
    Block { rdev: u64 },
    /// A mapped device of this daemon (`/dev/mapper/NAME` in a table): a hash of its UUID.
    Mapped { id: u64 },
}

impl FileId {
    pub fn of(meta: &Metadata) -> FileId {
        if meta.file_type().is_block_device() {
            FileId::Block { rdev: meta.rdev() }
        } else {
            FileId::Inode { dev: meta.dev(), ino: meta.ino() }
        }
    }

    /// The file `path` opens (symlinks followed).
    pub fn of_path(path: &Path) -> io::Result<FileId> {
        Ok(FileId::of(&std::fs::metadata(path)?))
    }
}

/// Fresh scope numbers: each [`Owner::new`] is a scope of its own.
static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);

/// Who claims: a device, and the table or group of it the claim belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    device: String,
    scope: u64,
}

impl Owner {
    /// A new scope of `device` (one per table built; one per replicator group).
    pub fn new(device: &str) -> Owner {
        Owner { device: device.to_string(), scope: NEXT_SCOPE.fetch_add(1, Ordering::Relaxed) }
    }

    pub fn device(&self) -> &str {
        &self.device
    }
}

/// Errors of claiming. They reach users: they name the file and both users.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Overlap(Box<Overlap>),
    #[error(
        "{path}: locked by another process{}: a file or device is used by one dmrep daemon at a time",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { path: String, pid: Option<u32> },
}

/// A claim refused because another user holds some of its bytes.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path}: {} for {user} would overlap {} already used by {other}{}: one owner per byte",
    show_range(range),
    show_range(other_range),
    via(path, other_path)
)]
pub struct Overlap {
    pub path: String,
    /// The refused user, e.g. `device r0 (RD of group r0, slink 1 device 0)`.
    pub user: String,
    pub range: Range<u64>,
    /// The user already holding the bytes.
    pub other: String,
    pub other_range: Range<u64>,
    /// The path the other user opened the file by.
    pub other_path: String,
}

/// `sectors a..b`, `bytes a..b` when not sector-aligned, or `the whole file`.
fn show_range(r: &Range<u64>) -> String {
    if *r == WHOLE_FILE {
        "the whole file".to_string()
    } else if r.end == u64::MAX {
        format!("bytes {}..the end", r.start)
    } else if r.start.is_multiple_of(512) && r.end.is_multiple_of(512) {
        format!("sectors {}..{}", r.start / 512, r.end / 512)
    } else {
        format!("bytes {}..{}", r.start, r.end)
    }
}

fn via(path: &str, other_path: &str) -> String {
    if path == other_path {
        String::new()
    } else {
        format!(" (through {other_path})")
    }
}

/// One claim held.
struct Held {
    id: u64,
    owner: Owner,
    role: String,
    range: Range<u64>,
    path: String,
}

impl Held {
    fn user(&self) -> String {
        user(&self.owner, &self.role)
    }
}

fn user(owner: &Owner, role: &str) -> String {
    format!("device {} ({role})", owner.device)
}

/// The claims on one file, and the open file holding its lock against other processes.
struct Entry {
    /// The open file holding the lock other processes see (none for a mapped device).
    _lock: Option<File>,
    claims: Vec<Held>,
}

/// The claims registry of one daemon. Share it as `Arc<Claims>`: each [`Claim`] keeps
/// a reference to release itself.
#[derive(Default)]
pub struct Claims {
    files: Mutex<HashMap<FileId, Entry>>,
    next_id: AtomicU64,
}

impl Claims {
    pub fn new() -> Arc<Claims> {
        Arc::new(Claims::default())
    }

    /// Claim bytes `range` of the file at `path` for `owner`'s `role` (e.g. `replication
    /// log`). Refused if another user holds overlapping bytes of the same file, or if
    /// another process holds the file's lock.
    pub fn claim(
        self: &Arc<Self>,
        owner: &Owner,
        role: impl Into<String>,
        path: &Path,
        range: Range<u64>,
    ) -> Result<Claim, ClaimError> {
        let role = role.into();
        let shown = path.display().to_string();
        let io_err = |e| ClaimError::Io { path: shown.clone(), source: e };
        // Non-blocking: opening a FIFO for reading would wait for a writer.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)
            .map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(io_err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or block device")));
        }
        let id = FileId::of(&meta);
        let mut files = self.files.lock();
        match files.get(&id) {
            Some(entry) => {
                let clash = entry.claims.iter().find(|h| {
                    overlaps(&h.range, &range)
                        && !(h.owner.device == owner.device && (h.owner.scope != owner.scope || h.role == role))
                });
                if let Some(h) = clash {
                    return Err(ClaimError::Overlap(Box::new(Overlap {
                        path: shown,
                        user: user(owner, &role),
                        range,
                        other: h.user(),
                        other_range: h.range.clone(),
                        other_path: h.path.clone(),
                    })));
                }
            }
            None => {
                if !try_lock_exclusive(&file).map_err(io_err)? {
                    return Err(ClaimError::Locked { path: shown, pid: lock_holder(&meta) });
                }
                files.insert(id, Entry { _lock: Some(file), claims: Vec::new() });
            }
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = files.get_mut(&id).expect("entry present");
        entry.claims.push(Held { id: n, owner: owner.clone(), role, range, path: shown });
        Ok(Claim { registry: self.clone(), file: id, id: n })
    }

    /// Claim `range` of mapped device `uuid` (shown as `shown`) for `role` of `owner`:
    /// a table stacked on another device of this daemon. The same rules as for files.
    pub fn claim_mapped(
        self: &Arc<Self>,
        owner: &Owner,
        role: impl Into<String>,
        uuid: &str,
        shown: &str,
        range: Range<u64>,
    ) -> Result<Claim, ClaimError> {
        use std::hash::{Hash, Hasher};
        let role = role.into();
        let mut hs = std::collections::hash_map::DefaultHasher::new();
        uuid.hash(&mut hs);
        let id = FileId::Mapped { id: hs.finish() };
        let mut files = self.files.lock();
        let entry = files.entry(id).or_insert_with(|| Entry { _lock: None, claims: Vec::new() });
        let clash = entry.claims.iter().find(|h| {
            overlaps(&h.range, &range)
                && !(h.owner.device == owner.device && (h.owner.scope != owner.scope || h.role == role))
        });
        if let Some(h) = clash {
            return Err(ClaimError::Overlap(Box::new(Overlap {
                path: shown.to_string(),
                user: user(owner, &role),
                range,
                other: h.user(),
                other_range: h.range.clone(),
                other_path: h.path.clone(),
            })));
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        entry.claims.push(Held { id: n, owner: owner.clone(), role, range, path: shown.to_string() });
        Ok(Claim { registry: self.clone(), file: id, id: n })
    }

    /// A device was renamed: its claims follow (so that a new device of the old name
    /// is not taken for it).
    pub fn rename_device(&self, old: &str, new: &str) {
        for e in self.files.lock().values_mut() {
            for h in e.claims.iter_mut().filter(|h| h.owner.device == old) {
                h.owner.device = new.to_string();
            }
        }
    }

    /// The users of a file, as errors name them (tests, diagnostics).
    pub fn users(&self, file: FileId) -> Vec<String> {
        self.files.lock().get(&file).map(|e| e.claims.iter().map(Held::user).collect()).unwrap_or_default()
    }

    fn release(&self, file: FileId, id: u64) {
        let mut files = self.files.lock();
        if let Some(e) = files.get_mut(&file) {
            e.claims.retain(|h| h.id != id);
            if e.claims.is_empty() {
                // Closing the lock's file lets other processes have the file.
                files.remove(&file);
            }
        }
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Bytes held; released when dropped.
pub struct Claim {
    registry: Arc<Claims>,
    file: FileId,
    id: u64,
}

impl Claim {
    pub fn file(&self) -> FileId {
        self.file
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim").field("file", &self.file).field("id", &self.id).finish()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.registry.release(self.file, self.id);
    }
}

/// Take an exclusive advisory lock (`flock`) on `file` without waiting. `Ok(false)`:
/// another open file holds a lock on it. A file system without `flock` support gets no
/// lock (and a warning) rather than refusing every file on it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(rustix::io::Errno::INTR) => try_lock_exclusive(file),
        Err(e @ (rustix::io::Errno::NOLCK | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL)) => {
            tracing::warn!("no advisory lock on this file system ({e}): other processes are not kept out");
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// The pid holding a `flock` on the inode `meta` describes, read from `/proc/locks`
/// (lines like `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF`; waiters, marked
/// `->`, are skipped). `None` when it cannot tell.
pub fn lock_holder(meta: &Metadata) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{}", rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()), meta.ino());
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    text.lines().filter(|l| !l.contains("->")).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 6 && f[1] == "FLOCK" && f[5] == want {
            f[4].parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn file(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        p
    }

    #[test]
    fn overlapping_ranges_of_two_users_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "f");
        let reg = Claims::new();
        let (a, b) = (Owner::new("r0"), Owner::new("lin0"));
        let _log = reg.claim(&a, "replication log", &f, 0..MIB).unwrap();
        let e = reg.claim(&b, "linear segment at sector 0", &f, MIB - 512..2 * MIB).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ClaimError::Overlap(_)), "{msg}");
        assert!(msg.contains(&f.display().to_string()), "{msg}");
        assert!(msg.contains("device r0 (replication log)"), "{msg}");
        assert!(msg.contains("device lin0 (linear segment at sector 0)"), "{msg}");
        assert!(msg.contains("sectors 2047..4096") && msg.contains("sectors 0..2048"), "{msg}");
        // Adjacent is not overlapping.
        let _c = reg.claim(&b, "linear segment at sector 0", &f, MIB..2 * MIB).unwrap();
        // Two roles of one scope conflict too (the log as an LD).
        let e = reg.claim(&a, "LD of group r0, slink 0 device 0", &f, 0..512).unwrap_err().to_string();
        assert!(e.contains("LD") && e.contains("replication log"), "{e}");
    }

    #[test]
    fn a_hard_link_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "f");
        let link = dir.path().join("link");
        std::fs::hard_link(&f, &link).unwrap();
        let reg = Claims::new();
        let _a = reg.claim(&Owner::new("r0"), "replication log", &f, 0..MIB).unwrap();
        let e = reg.claim(&Owner::new("r1"), "replication log", &link, 512..1024).unwrap_err().to_string();
        assert!(e.starts_with(&link.display().to_string()), "{e}");
        assert!(e.contains(&format!("(through {})", f.display())), "{e}");
        assert!(e.contains("device r0 (replication log)") && e.contains("device r1 (replication log)"), "{e}");
        assert_eq!(FileId::of_path(&f).unwrap(), FileId::of_path(&link).unwrap());
    }

    #[test]
    fn the_same_owner_may_claim_again_and_other_tables_of_a_device_do_not_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "f");
        let reg = Claims::new();
        let group = Owner::new("r0");
        let _rd = reg.claim(&group, "RD of group r0, slink 2 device 0", &f, 0..MIB).unwrap();
        // The same role in the same scope (a reload loaded twice).
        let _again = reg.claim(&group, "RD of group r0, slink 2 device 0", &f, 0..MIB).unwrap();
        // A new table of the same device (a reload), whatever its role.
        let _new = reg.claim(&Owner::new("r0"), "linear segment at sector 0", &f, 0..MIB).unwrap();
        // Another device: refused.
        assert!(reg.claim(&Owner::new("r1"), "RD of group r0, slink 2 device 0", &f, 0..MIB).is_err());
        assert_eq!(reg.users(FileId::of_path(&f).unwrap()).len(), 3);
    }

    #[test]
    fn claims_are_released_on_drop_and_so_is_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "f");
        let (reg, other) = (Claims::new(), Claims::new());
        let a = reg.claim(&Owner::new("r0"), "replication log", &f, 0..MIB).unwrap();
        let b = reg.claim(&Owner::new("r0"), "replication log", &f, 0..MIB).unwrap();
        // Another registry (as another daemon would) finds the file locked.
        match other.claim(&Owner::new("x"), "linear segment at sector 0", &f, 2 * MIB..3 * MIB) {
            Err(ClaimError::Locked { pid, .. }) => {
                if std::path::Path::new("/proc/locks").exists() {
                    assert_eq!(pid, Some(std::process::id()));
                }
            }
            r => panic!("expected Locked, got {r:?}"),
        }
        drop(a);
        assert!(reg.claim(&Owner::new("r1"), "replication log", &f, 0..MIB).is_err(), "b still holds");
        drop(b);
        assert!(reg.users(FileId::of_path(&f).unwrap()).is_empty());
        let _c = reg.claim(&Owner::new("r1"), "replication log", &f, 0..MIB).unwrap();
        drop(_c);
        // All released: the lock is gone too.
        let e = other.claim(&Owner::new("x"), "linear segment at sector 0", &f, 0..MIB).unwrap();
        drop(e);
    }

    #[test]
    fn renamed_devices_keep_their_claims() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "f");
        let reg = Claims::new();
        let _a = reg.claim(&Owner::new("old"), "linear segment at sector 0", &f, 0..MIB).unwrap();
        reg.rename_device("old", "new");
        let e = reg.claim(&Owner::new("old"), "linear segment at sector 0", &f, 0..MIB).unwrap_err().to_string();
        assert!(e.contains("already used by device new (linear segment at sector 0)"), "{e}");
    }

    #[test]
    fn whole_file_and_errors_of_opening() {
        let dir = tempfile::tempdir().unwrap();
        let f = file(&dir, "f");
        let reg = Claims::new();
        let _d = reg.claim(&Owner::new("r0"), "disk dirty log of group r0, slink 1 device 0", &f, WHOLE_FILE).unwrap();
        let e = reg.claim(&Owner::new("r1"), "replication log", &f, 0..MIB).unwrap_err().to_string();
        assert!(e.contains("would overlap the whole file already used by device r0"), "{e}");
        let e = reg.claim(&Owner::new("r1"), "x", &dir.path().join("missing"), 0..1).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
        let e = reg.claim(&Owner::new("r1"), "x", dir.path(), 0..1).unwrap_err().to_string();
        assert!(e.contains("not a regular file or block device"), "{e}");
    }
}
