//! A real file system on a dmrep device: nbdfuse exposes the export as a file,
//! losetup makes it a block device, then mkfs.ext4, mount, files, umount, fsck.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::block::{is_root, BlockStack};
use common::*;

const MIB: u64 = 1 << 20;

fn checksum(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

#[test]
fn ext4_on_striped_device_survives_remount_and_fsck() {
    require!("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount");
    if !is_root() || !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        skip("needs root, /dev/fuse and /dev/loop-control");
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
