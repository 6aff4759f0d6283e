//! Snapshots against the real daemon: `snapshot-origin` and `snapshot` tables over files
//! and over other devices of the daemon, driven over NBD by qemu-io. A snapshot keeps
//! reading the origin as it was when taken, across a restart and across kill -9 in the
//! middle of a stream of copy-outs; a full COW device invalidates the snapshot, not the
//! origin.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// `<used>/<total>` sectors from a snapshot's status line (None: `Invalid` or no line).
fn used_sectors(d: &Daemon, name: &str) -> Option<u64> {
    let out = d.cli_ok(&["status", name]);
    let word = out.split_whitespace().find(|w| w.contains('/') && !w.starts_with('/'))?;
    word.split('/').next()?.parse().ok()
}

/// Origin file of `size` bytes of `byte`, and a zeroed COW file.
fn files(d: &Daemon, size: u64, byte: u8, cow_size: u64) -> (String, String) {
    let origin = d.path("origin.img");
    fill_file(&origin, byte, size as usize);
    let cow = d.make_file_s("cow.img", cow_size);
    (origin.to_str().unwrap().to_string(), cow)
}

#[test]
fn a_snapshot_keeps_the_old_data_across_writes_and_a_restart() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let (origin, cow) = files(&d, 16 * MIB, 0x11, 16 * MIB);
    d.create("snap", &format!("0 32768 snapshot {origin} {cow} P 16"));
    d.create("org", &format!("0 32768 snapshot-origin {origin}"));
    qemu_io_ok(&d.uri("org"), &["write -P 0x22 0 1M", "write -P 0x23 5000k 12k", "write -P 0x24 8191k 1k"]);
    qemu_io_ok(&d.uri("snap"), &["read -P 0x11 0 16M"]);
    qemu_io_ok(&d.uri("org"), &["read -P 0x22 0 1M", "read -P 0x23 5000k 12k", "read -P 0x11 1M 1M"]);
    // The snapshot is writable; its writes do not reach the origin.
    qemu_io_ok(&d.uri("snap"), &["write -P 0x33 2M 64k", "write -P 0x34 100k 3k"]);
    qemu_io_ok(&d.uri("org"), &["read -P 0x11 2M 64k", "read -P 0x22 100k 3k"]);
    qemu_io_ok(&d.uri("snap"), &["read -P 0x33 2M 64k", "read -P 0x34 100k 3k", "read -P 0x11 103k 1k"]);
    assert_eq!(read_at(Path::new(&origin), 0, 4), vec![0x22; 4], "the origin file has the new data");

    let status = d.cli_ok(&["status", "snap"]);
    assert!(status.contains("snapshot"), "{status}");
    let used = used_sectors(&d, "snap").expect("a used/total status");
    assert!(used >= 2048, "1 MiB of copy-outs at least: {status}");
    let o = d.cli_ok(&["status", "org"]);
    assert!(o.contains(&cow), "the origin lists its snapshot: {o}");

    d.restart();
    qemu_io_ok(
        &d.uri("snap"),
        &["read -P 0x11 0 100k", "read -P 0x34 100k 3k", "read -P 0x33 2M 64k", "read -P 0x11 4M 12M"],
    );
    assert_eq!(used_sectors(&d, "snap"), Some(used), "the same exceptions after the restart");
    // Copy-outs go on after the restart, for chunks not copied yet only.
    qemu_io_ok(&d.uri("org"), &["write -P 0x44 10M 1M", "write -P 0x45 0 4k"]);
    qemu_io_ok(&d.uri("snap"), &["read -P 0x11 10M 1M", "read -P 0x11 0 4k"]);

    // A second snapshot on the same COW file is refused; so is one whose COW is the origin.
    let e = d.cli_err(&["create", "snap2", "--table", &format!("0 32768 snapshot {origin} {cow} P 16")]);
    assert!(e.contains(&cow) && e.contains("snap"), "{e}");
    d.cli_ok(&["remove", "snap"]);
    d.cli_ok(&["remove", "org"]);
}

#[test]
fn kill9_during_a_stream_of_copy_outs_leaves_the_persistent_snapshot_intact() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let (origin, cow) = files(&d, 16 * MIB, 0x5c, 24 * MIB);
    d.create("snap", &format!("0 32768 snapshot {origin} {cow} P 8"));
    d.create("org", &format!("0 32768 snapshot-origin {origin}"));
    // 512 writes of 32 KiB (8 chunks each, some partial), in a background client.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..512u64 {
        cmd.args(["-c", &format!("write -P 0xa7 {} 32k", i * 32 * 1024 + (i % 3) * 512)]);
    }
    cmd.arg(d.uri("org"));
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut client = KillOnDrop(cmd.spawn().unwrap());
    // Kill once a good part of the copy-outs happened (or the client finished).
    assert!(
        wait_until(Duration::from_secs(60), || {
            used_sectors(&d, "snap").is_some_and(|u| u > 8192) || client.0.try_wait().unwrap().is_some()
        }),
        "copy-outs happen"
    );
    let finished = client.0.try_wait().unwrap().is_some();
    let used = used_sectors(&d, "snap");
    d.kill9();
    eprintln!("killed at {used:?} sectors of the COW device used (client finished: {finished})");
    let _ = client.wait_timeout(Duration::from_secs(10));
    drop(client);
    d.restart();
    qemu_io_ok(&d.uri("snap"), &["read -P 0x5c 0 16M"]);
    // Every origin byte is old or new, and the origin still works with its snapshot.
    let img = std::fs::read(&origin).unwrap();
    assert!(img.iter().all(|&b| b == 0x5c || b == 0xa7));
    qemu_io_ok(&d.uri("org"), &["write -P 0xb8 0 16M"]);
    qemu_io_ok(&d.uri("snap"), &["read -P 0x5c 0 16M"]);
}

#[test]
fn a_full_cow_device_invalidates_the_snapshot_but_not_the_origin() {
    require!("qemu-io");
    let mut d = Daemon::start();
    // 4 KiB chunks, 64 KiB COW: header, metadata, 14 data chunks.
    let (origin, cow) = files(&d, 4 * MIB, 0x21, 64 * 1024);
    d.create("snap", &format!("0 8192 snapshot {origin} {cow} P 8"));
    d.create("org", &format!("0 8192 snapshot-origin {origin}"));
    qemu_io_ok(&d.uri("org"), &["write -P 0x31 0 32k"]);
    qemu_io_ok(&d.uri("snap"), &["read -P 0x21 0 1M"]);
    qemu_io_ok(&d.uri("org"), &["write -P 0x32 1M 1M", "read -P 0x32 1M 1M", "read -P 0x31 0 32k"]);
    let status = d.cli_ok(&["status", "snap"]);
    assert!(status.contains("Invalid"), "{status}");
    let o = qemu_io(&d.uri("snap"), &["read 0 4k"]);
    let text = show(&o);
    assert!(!o.status.success() || text.contains("failed") || text.contains("error"), "reads fail: {text}");
    assert!(d.log_text().contains("filled up"), "the daemon says why");
    let json = d.json(&["status", "snap"]).to_string();
    assert!(json.contains("filled up") && json.contains(&cow), "{json}");
    // Still invalid after a restart; the origin keeps working.
    d.restart();
    assert!(d.cli_ok(&["status", "snap"]).contains("Invalid"));
    qemu_io_ok(&d.uri("org"), &["write -P 0x33 3M 64k", "read -P 0x33 3M 64k"]);
}

#[test]
fn snapshots_of_mapped_devices_stack_and_come_down_in_order() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let base = d.path("base.img");
    fill_file(&base, 0x61, (8 * MIB) as usize);
    let cowf = d.make_file_s("cow.img", 8 * MIB);
    d.create("base", &format!("0 16384 linear {} 0", base.display()));
    d.create("cowdev", &format!("0 16384 linear {cowf} 0"));
    d.create("snap", "0 16384 snapshot /dev/mapper/base /dev/mapper/cowdev P 8");
    d.create("org", "0 16384 snapshot-origin /dev/mapper/base");
    qemu_io_ok(&d.uri("org"), &["write -P 0x62 0 2M", "write -P 0x63 7M 4k"]);
    qemu_io_ok(&d.uri("snap"), &["read -P 0x61 0 8M"]);
    qemu_io_ok(&d.uri("base"), &["read -P 0x62 0 2M"]);
    // What is in use cannot go.
    let e = d.cli_err(&["remove", "cowdev"]);
    assert!(e.contains("snap"), "{e}");
    let e = d.cli_err(&["remove", "base"]);
    assert!(e.contains("snap") || e.contains("org"), "{e}");
    d.restart();
    qemu_io_ok(&d.uri("snap"), &["read -P 0x61 0 8M"]);
    qemu_io_ok(&d.uri("org"), &["write -P 0x64 4M 1M"]);
    qemu_io_ok(&d.uri("snap"), &["read -P 0x61 4M 1M"]);
    for n in ["snap", "org", "cowdev", "base"] {
        d.cli_ok(&["remove", n]);
    }
}
