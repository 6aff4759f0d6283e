//! The state directory.
//!
//! `devices.json` lists every device the daemon has, in creation order (a replicator
//! control device before the devices that refer to it), with its UUID and its active
//! table in canonical text. Written atomically (temporary file, fsync, rename, fsync of
//! the directory) after every change, so a crash leaves either the old or the new list.
//!
//! Layout (JSON): `{"format": 1, "devices": [{"name": .., "uuid": .., "table": ..}]}`;
//! optional per device: `"companion_of": NAME`, `"read_only": true`.
//!
//! `lock` holds the running daemon's pid (text). One daemon per state directory
//! (DESIGN 4.9): [`Store::open`] takes an exclusive `flock` on it, held as long as the
//! store (the daemon's life; the kernel drops it when the process dies, however it
//! dies), and a second daemon fails at once naming the directory and the holder's pid.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Newest version of `devices.json` this build reads and writes.
/// - 1: first version.
/// - 2: a device may be `"read_only": true`. Written only when one is: a daemon that
///   knows only version 1 would bring such a device back writable, so it must refuse
///   the file instead; without read-only devices the file stays version 1.
pub const STORE_FORMAT: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    pub name: String,
    pub uuid: String,
    pub table: String,
    /// Set on devices created by another device's table (the paper-form replicator's
    /// `NAME-<dev_nr>` devices): recreated with their parent, not on their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub companion_of: Option<String>,
    /// Created with `--readonly`: writes fail with EPERM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoreFile {
    format: u32,
    devices: Vec<DeviceRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a dmrep state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: state format {got} is newer than this dmrep understands ({STORE_FORMAT})")]
    Version { path: PathBuf, got: u32 },
    #[error(
        "state directory {} is in use by another dmrep daemon ({}): one daemon per state directory",
        path.display(),
        pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "pid unknown".to_string())
    )]
    Locked { path: PathBuf, pid: Option<u32> },
}

/// The lock file's name in the state directory.
const LOCK_FILE: &str = "lock";

pub struct Store {
    dir: PathBuf,
    /// Holds the directory's lock while the store lives.
    _lock: File,
}

impl Store {
    /// Open (creating if needed) the state directory, and lock it: refused while another
    /// process (another daemon) has it open.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| StoreError::Io { path: dir.to_path_buf(), source: e })?;
        let path = dir.join(LOCK_FILE);
        let io_err = |e| StoreError::Io { path: path.clone(), source: e };
        // Not truncated before it is ours: it names the holder.
        let mut lock =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_err)?;
        if !dmrep_core::claims::try_lock_exclusive(&lock).map_err(io_err)? {
            let mut text = String::new();
            let _ = lock.read_to_string(&mut text);
            let pid = text
                .trim()
                .parse()
                .ok()
                .or_else(|| lock.metadata().ok().and_then(|m| dmrep_core::claims::lock_holder(&m)));
            return Err(StoreError::Locked { path: dir.to_path_buf(), pid });
        }
        lock.set_len(0).map_err(io_err)?;
        lock.write_all(format!("{}\n", std::process::id()).as_bytes()).map_err(io_err)?;
        Ok(Store { dir: dir.to_path_buf(), _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self) -> PathBuf {
        self.dir.join("devices.json")
    }

    /// The recorded devices, in creation order (empty if none recorded yet).
    pub fn load(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let path = self.file();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::Io { path, source: e }),
        };
        let f: StoreFile =
            serde_json::from_slice(&text).map_err(|e| StoreError::Parse { path: path.clone(), source: e })?;
        if f.format > STORE_FORMAT {
            return Err(StoreError::Version { path, got: f.format });
        }
        Ok(f.devices)
    }

    /// Replace the record atomically.
    pub fn save(&self, devices: &[DeviceRecord]) -> Result<(), StoreError> {
        let path = self.file();
        let tmp = self.dir.join("devices.json.tmp");
        let io_err = |e| StoreError::Io { path: path.clone(), source: e };
        let format = if devices.iter().any(|d| d.read_only) { 2 } else { 1 };
        let body =
            serde_json::to_vec_pretty(&StoreFile { format, devices: devices.to_vec() }).expect("records serialise");
        write_atomically(&path, &tmp, &body).map_err(io_err)
    }
}

/// Replace `path` with `bytes` atomically and durably: write `tmp`, sync it, rename it
/// over `path`, sync the directory. A crash leaves the old file or the new one.
pub fn write_atomically(path: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(s.load().unwrap().is_empty());
        let recs = vec![DeviceRecord {
            name: "a".into(),
            uuid: "u".into(),
            table: "0 8 zero\n".into(),
            companion_of: None,
            read_only: true,
        }];
        s.save(&recs).unwrap();
        assert_eq!(s.load().unwrap(), recs);
        let format = |s: &Store| -> u64 {
            serde_json::from_slice::<serde_json::Value>(&fs::read(s.file()).unwrap()).unwrap()["format"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(format(&s), 2, "a read-only device needs format 2");
        s.save(&[DeviceRecord { read_only: false, ..recs[0].clone() }]).unwrap();
        assert_eq!(format(&s), 1, "without read-only devices the file stays readable by older daemons");
        fs::write(s.file(), b"{\"format\": 99, \"devices\": []}").unwrap();
        assert!(s.load().unwrap_err().to_string().contains("newer"));
    }

    #[test]
    fn one_store_per_directory_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let e = Store::open(d.path()).err().expect("a second open is refused").to_string();
        assert!(e.contains(&d.path().display().to_string()), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(s);
        let _again = Store::open(d.path()).unwrap();
    }
}
