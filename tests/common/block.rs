//! A block device stack for tests: nbdfuse exposes an NBD export as a file, losetup
//! turns it into a block device, mount puts a file system on it. Torn down in reverse
//! order on drop, also when a test fails half-way.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::*;

/// nbdfuse + loop device + mount point, torn down in reverse order on drop, also when
/// the test fails half-way.
pub struct BlockStack {
    fuse_dir: PathBuf,
    nbdfuse: Option<KillOnDrop>,
    loopdev: Option<String>,
    pub mountpoint: PathBuf,
    mounted: bool,
}

impl BlockStack {
    /// Expose `uri` as `<dir>/fuse/nbd` and attach a loop device to it.
    pub fn attach(dir: &Path, uri: &str, size: u64) -> BlockStack {
        let fuse_dir = dir.join("fuse");
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mountpoint).unwrap();
        let mut s = BlockStack { fuse_dir: fuse_dir.clone(), nbdfuse: None, loopdev: None, mountpoint, mounted: false };
        let child = Command::new("nbdfuse")
            .arg(fuse_dir.join("nbd"))
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nbdfuse");
        s.nbdfuse = Some(KillOnDrop(child));
        let file = fuse_dir.join("nbd");
        let up =
            wait_until(Duration::from_secs(20), || std::fs::metadata(&file).map(|m| m.len() == size).unwrap_or(false));
        assert!(up, "nbdfuse did not expose {} with {size} bytes", file.display());
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        s.loopdev = Some(out.trim().to_string());
        s
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap()
    }

    pub fn mount(&mut self) {
        run_ok(Command::new("mount").args(["-t", "ext4", self.dev()]).arg(&self.mountpoint));
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mountpoint));
        self.mounted = false;
    }

    pub fn fsck_clean(&self) {
        let o = run(Command::new("fsck.ext4").args(["-fn", self.dev()]));
        assert!(o.status.success(), "fsck.ext4 -fn found problems: {}", show(&o));
    }

    /// Orderly teardown; Drop does the same, ignoring errors.
    pub fn detach(mut self) {
        if self.mounted {
            self.umount();
        }
        if let Some(l) = self.loopdev.take() {
            run_ok(Command::new("losetup").args(["-d", &l]));
        }
        run_ok(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir));
        if let Some(mut c) = self.nbdfuse.take() {
            let st = c.wait_timeout(Duration::from_secs(20));
            assert!(st.is_some(), "nbdfuse did not exit after fusermount3 -u");
        }
    }
}

impl Drop for BlockStack {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if self.mounted {
            quiet(Command::new("umount").arg(&self.mountpoint));
            quiet(Command::new("umount").arg("-l").arg(&self.mountpoint));
        }
        if let Some(l) = self.loopdev.take() {
            quiet(Command::new("losetup").args(["-d", &l]));
        }
        if self.nbdfuse.is_some() {
            quiet(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir));
            quiet(Command::new("fusermount3").arg("-uz").arg(&self.fuse_dir));
        }
    }
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n")
}
