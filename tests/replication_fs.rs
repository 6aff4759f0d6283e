//! Is the copy at the other site usable? ext4 on a replicated device, files written
//! continuously; the RD is frozen at an arbitrary moment of the workload (SLINK paused),
//! copied, and the copy must be a file system that e2fsck finds consistent after journal
//! replay alone, holding every file that was synced before, byte for byte.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::block::{is_root, BlockStack};
use common::*;

const MIB: u64 = 1 << 20;

fn file_bytes(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k * 31 + i * 7919) % 251) as u8).collect()
}

#[test]
fn rd_frozen_mid_workload_is_a_consistent_file_system() {
    require!("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount");
    if !is_root() || !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        skip("needs root, /dev/fuse and /dev/loop-control");
        return;
    }
    let d = Daemon::start();
    let size = 96 * MIB;
    let ld = d.make_file_s("ld.img", size);
    let rd = d.make_file_s("rd.img", size);
    let log = d.make_file_s("replog", 32 * MIB);
    d.create(
        "r0",
        &format!(
            "0 {} replicator default 4 {log} 0 auto 65536 local 2 0 asynchronous 2 0 {ld} - 0 \
             local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync",
            size / 512
        ),
    );
    let mut stack = BlockStack::attach(d.dir(), &d.uri("r0-0"), size);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", stack.dev()]));
    stack.mount();
    let mnt = stack.mountpoint.clone();

    // Batch A: written and synced, then fully shipped.
    for i in 0..40 {
        std::fs::write(mnt.join(format!("a{i}")), file_bytes(i, 64 * 1024 + i * 1000)).unwrap();
    }
    run_ok(Command::new("sync").arg("-f").arg(&mnt));
    let shipped = wait_until(Duration::from_secs(30), || {
        let st = d.json(&["status", "r0"]);
        st[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().iter().all(|s| s["outstanding_ios"] == 0)
    });
    assert!(shipped, "batch A reached the RD");

    // Batch B: written continuously; the RD is frozen somewhere in the middle of it.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (mnt, stop, progress) = (mnt.clone(), stop.clone(), progress.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && i < 2000 {
                let p = mnt.join(format!("b{}", i % 200));
                std::fs::write(&p, file_bytes(i, 16 * 1024 + (i % 17) * 4096)).unwrap();
                if i.is_multiple_of(10) {
                    let _ = std::fs::remove_file(mnt.join(format!("b{}", (i + 100) % 200)));
                    let f = std::fs::File::open(&mnt).unwrap();
                    f.sync_all().unwrap();
                }
                i += 1;
                progress.store(i, Ordering::SeqCst);
            }
            i
        })
    };
    // Freeze the RD in the middle of batch B, with files being created and removed.
    assert!(wait_until(Duration::from_secs(30), || progress.load(Ordering::SeqCst) >= 150), "the workload runs");
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    // The copier may be applying one epoch: wait until the RD file stops changing.
    let copy = d.path("rd-copy.img");
    let mut last = Vec::new();
    let settled = wait_until(Duration::from_secs(10), || {
        let now = std::fs::read(&rd).unwrap();
        let same = now == last;
        last = now;
        same
    });
    assert!(settled, "the paused RD kept changing");
    std::fs::write(&copy, &last).unwrap();
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    assert!(written > 0, "the workload ran");

    // The frozen copy: journal replay is allowed, anything else is corruption.
    let o = run(Command::new("e2fsck").args(["-fy"]).arg(&copy));
    let code = o.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 1, "e2fsck -fy found uncorrectable damage (exit {code}): {}", show(&o));
    let o = run(Command::new("e2fsck").args(["-fn"]).arg(&copy));
    assert!(o.status.success(), "after journal replay the copy is clean: {}", show(&o));
    // Every file synced before the freeze is there, byte for byte.
    let m2 = d.path("mnt2");
    std::fs::create_dir_all(&m2).unwrap();
    run_ok(Command::new("mount").args(["-o", "loop,ro"]).arg(&copy).arg(&m2));
    let mut bad = Vec::new();
    for i in 0..40 {
        let got = std::fs::read(m2.join(format!("a{i}"))).unwrap_or_default();
        if got != file_bytes(i, 64 * 1024 + i * 1000) {
            bad.push(i);
        }
    }
    run_ok(Command::new("umount").arg(&m2));
    assert!(bad.is_empty(), "synced files missing or wrong on the frozen RD: {bad:?}");

    // And the live RD converges to the LD.
    stack.umount();
    stack.detach();
    let o = d.cli(&["wait", "r0", "--timeout", "60"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(std::fs::read(&ld).unwrap() == std::fs::read(&rd).unwrap(), "RD equals LD at the end");
}
