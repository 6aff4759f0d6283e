//! A real file system on a dmrep device: nbdfuse exposes the export as a file,
//! losetup makes it a block device, then mkfs.ext4, mount, files, umount, fsck.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// nbdfuse + loop device + mount point, torn down in reverse order on drop, also when
/// the test fails half-way.
struct BlockStack {
    fuse_dir: PathBuf,
    nbdfuse: Option<KillOnDrop>,
    loopdev: Option<String>,
    mountpoint: PathBuf,
    mounted: bool,
}

impl BlockStack {
    /// Expose `uri` as `<dir>/fuse/nbd` and attach a loop device to it.
    fn attach(dir: &Path, uri: &str, size: u64) -> BlockStack {
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

    fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap()
    }

    fn mount(&mut self) {
        run_ok(Command::new("mount").args(["-t", "ext4", self.dev()]).arg(&self.mountpoint));
        self.mounted = true;
    }

    fn umount(&mut self) {
        run_ok(Command::new("umount").arg(&self.mountpoint));
        self.mounted = false;
    }

    fn fsck_clean(&self) {
        let o = run(Command::new("fsck.ext4").args(["-fn", self.dev()]));
        assert!(o.status.success(), "fsck.ext4 -fn found problems: {}", show(&o));
    }

    /// Orderly teardown; Drop does the same, ignoring errors.
    fn detach(mut self) {
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

fn checksum(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

fn is_root() -> bool {
    run(Command::new("id").arg("-u")).stdout.starts_with(b"0\n")
}

#[test]
fn ext4_on_striped_device_survives_remount_and_fsck() {
    require!("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount");
    if !is_root() || !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP: needs root, /dev/fuse and /dev/loop-control");
        return;
    }
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 48 * MIB);
    let b = d.make_file_s("b.img", 48 * MIB);
    let size = 96 * MIB;
    d.create("fs", &format!("0 {} striped 2 128 {a} 0 {b} 0", size / 512));
    let uri = d.uri("fs");

    let mut files: Vec<(String, u64, usize)> = Vec::new();
    {
        let mut s = BlockStack::attach(d.dir(), &uri, size);
        assert!(wait_until(Duration::from_secs(10), || d.open_count("fs") >= 1), "nbdfuse holds the export open");
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", s.dev()]));
        s.mount();
        let sub = s.mountpoint.join("dir");
        std::fs::create_dir(&sub).unwrap();
        for i in 0..24usize {
            let len = (i * 97_531) % (3 * MIB as usize) + 1 + i;
            let data = random_bytes(len);
            let name = if i % 2 == 0 { format!("f{i}") } else { format!("dir/f{i}") };
            std::fs::write(s.mountpoint.join(&name), &data).unwrap();
            files.push((name, checksum(&data), len));
        }
        run_ok(Command::new("sync").arg("-f").arg(&s.mountpoint));
        s.umount();
        s.fsck_clean();
        s.detach();
    }
    assert!(wait_until(Duration::from_secs(10), || d.open_count("fs") == 0), "export closed after teardown");

    // A fresh stack: everything read now comes through dmrep, not a cache.
    let mut s = BlockStack::attach(d.dir(), &uri, size);
    s.fsck_clean();
    s.mount();
    for (name, sum, len) in &files {
        let data = std::fs::read(s.mountpoint.join(name)).unwrap();
        assert_eq!(data.len(), *len, "{name}: size");
        assert_eq!(checksum(&data), *sum, "{name}: checksum");
    }
    s.umount();
    s.fsck_clean();
    s.detach();
}
