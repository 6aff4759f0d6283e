//! A real device that fails on demand: `nbdkit --filter=error file IMAGE` serves a
//! backing image over a Unix socket, and `nbdfuse` turns that export into an ordinary
//! file (`<mnt>/nbd`) to give the replicator as a device path. While the trigger file
//! exists every NBD request fails with EIO, so every read, write and sync the daemon
//! does on the file fails like a dead disk or a cut link; remove the trigger and it
//! works again. The image itself is a plain file the test reads to compare contents.
//!
//! [`FaultyDevice`] tears the stack down (unmount, nbdfuse, nbdkit) when dropped, also
//! when the test fails half-way. Drop it after the daemon that uses it: declare it
//! before the [`super::Daemon`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{have, wait_until, KillOnDrop};

/// Why the fault stack cannot run here, if it cannot (missing tool, no FUSE, no error
/// filter); the test passes it to [`super::skip`] and returns.
pub fn unavailable() -> Option<String> {
    for t in ["nbdkit", "nbdfuse", "fusermount3"] {
        if !have(t) {
            return Some(format!("{t} not installed"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse (FUSE unavailable)".into());
    }
    let ok = Command::new("nbdkit")
        .args(["-U", "-", "--filter=error", "null", "size=1M", "--run", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Some("nbdkit's error filter is not available".into());
    }
    None
}

/// An image served through nbdkit's error filter and exposed as a file by nbdfuse.
pub struct FaultyDevice {
    dir: tempfile::TempDir,
    /// The backing image nbdkit serves (read it to check the device's contents).
    pub image: PathBuf,
    /// While this file exists, every request fails with EIO.
    pub trigger: PathBuf,
    /// The file to use as the device path (`<mnt>/nbd`).
    pub path: PathBuf,
    mnt: PathBuf,
    nbdkit: Option<KillOnDrop>,
    nbdfuse: Option<KillOnDrop>,
    mounted: bool,
}

impl FaultyDevice {
    /// Serve a fresh zero-filled image of `size` bytes and wait until `path` shows it.
    pub fn start(size: u64) -> FaultyDevice {
        // Short path: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new().prefix("dmrep-f").tempdir_in("/tmp").unwrap();
        let p = dir.path().to_path_buf();
        let image = p.join("rd.img");
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let mnt = p.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let sock = p.join("nbdkit.sock");
        let mut f = FaultyDevice {
            trigger: p.join("fail"),
            path: mnt.join("nbd"),
            image,
            mnt,
            dir,
            nbdkit: None,
            nbdfuse: None,
            mounted: false,
        };
        let nbdkit = Command::new("nbdkit")
            .arg("-f")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(&sock)
            .args(["--filter=error", "file"])
            .arg(&f.image)
            .args(["error=EIO", "error-rate=100%"])
            .arg(format!("error-file={}", f.trigger.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        f.nbdkit = Some(KillOnDrop(nbdkit));
        let up = wait_until(Duration::from_secs(20), || sock.exists());
        assert!(up, "nbdkit did not create {}", sock.display());
        let nbdfuse = Command::new("nbdfuse")
            .arg(&f.mnt)
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nbdfuse");
        f.nbdfuse = Some(KillOnDrop(nbdfuse));
        f.mounted = true;
        let path = f.path.clone();
        let up =
            wait_until(Duration::from_secs(20), || std::fs::metadata(&path).map(|m| m.len() == size).unwrap_or(false));
        assert!(up, "nbdfuse did not expose {} with {size} bytes", f.path.display());
        f
    }

    /// The device path as a string, for tables.
    pub fn path_s(&self) -> String {
        self.path.to_str().unwrap().to_string()
    }

    /// From now on every request fails with EIO.
    pub fn fail(&self) {
        std::fs::write(&self.trigger, b"").unwrap();
    }

    /// From now on requests succeed again.
    pub fn heal(&self) {
        let _ = std::fs::remove_file(&self.trigger);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FaultyDevice {
    fn drop(&mut self) {
        self.heal();
        let quiet = |c: &mut Command| {
            let _ = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if self.mounted {
            quiet(Command::new("fusermount3").arg("-u").arg(&self.mnt));
            if let Some(c) = self.nbdfuse.as_mut() {
                if c.wait_timeout(Duration::from_secs(5)).is_none() {
                    // Still busy (a process holds the file open): detach lazily.
                    quiet(Command::new("fusermount3").arg("-uz").arg(&self.mnt));
                }
            }
            self.mounted = false;
        }
        // KillOnDrop kills and reaps whatever is still running.
        self.nbdfuse.take();
        self.nbdkit.take();
    }
}
