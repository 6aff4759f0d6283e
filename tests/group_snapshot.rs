//! Group-consistent snapshots at a site (`dmrep snapshot create|ls|delete`): the snapshot
//! holds the group's state at the marker, on every device, while replication goes on; it
//! is served over NBD, survives a restart, and goes with `delete`. With ext4 on the
//! group at the primary, a snapshot taken at a remote site mid-workload passes
//! `fsck.ext4 -fn` after journal replay and holds every file synced before the marker.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::block::{is_root, BlockStack};
use common::sites::*;
use common::*;

const MIB: u64 = 1 << 20;

/// A group `r0` of two devices at `d`: LDs and a local SLINK 1 to RD files.
fn local_group(d: &Daemon, size: u64) -> (Vec<String>, Vec<String>) {
    let log = d.make_file_s("replog", 32 * MIB);
    let lds: Vec<String> = (0..2).map(|n| d.make_file_s(&format!("ld{n}"), size)).collect();
    let rds: Vec<String> = (0..2).map(|n| d.make_file_s(&format!("rd{n}"), size)).collect();
    let mut t = format!("0 {} replicator default 4 {log} 0 auto 65536", size / 512);
    for n in 0..2 {
        t += &format!(" local 2 0 async 2 {n} {} - 0", lds[n]);
        t += &format!(" local 2 1 async 2 {n} {} core 2 2048 nosync", rds[n]);
    }
    d.create("r0", &t);
    (lds, rds)
}

fn write_pattern(d: &Daemon, dev: &str, byte: u8, off: u64, len: u64) {
    qemu_io_ok(&d.uri(dev), &[&format!("write -P {byte} {off} {len}")]);
}

fn reads_pattern(d: &Daemon, dev: &str, byte: u8, off: u64, len: u64) -> bool {
    let o = qemu_io(&d.uri(dev), &[&format!("read -P {byte} {off} {len}")]);
    o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
}

#[test]
fn snapshot_of_a_local_slink_holds_the_marker_state_on_every_device_and_survives_restart() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let size = 8 * MIB;
    let (_lds, rds) = local_group(&d, size);
    // Before the marker: 0x11 on device 0, 0x22 on device 1.
    write_pattern(&d, "r0-0", 0x11, 0, MIB);
    write_pattern(&d, "r0-1", 0x22, MIB, MIB);
    let out = d.cli_ok(&["snapshot", "create", "r0", "before", "--slink", "1"]);
    assert!(out.contains("r0.before.0") && out.contains("r0.before.1"), "{out}");
    // After it: both overwritten; the RDs get the new data, the snapshot keeps the old.
    write_pattern(&d, "r0-0", 0x33, 0, MIB);
    write_pattern(&d, "r0-1", 0x44, MIB, MIB);
    assert!(d.cli(&["wait", "r0", "--timeout", "30"]).status.success());
    assert!(read_at(Path::new(&rds[0]), 0, 4096).iter().all(|b| *b == 0x33), "the RD goes on applying");
    assert!(reads_pattern(&d, "r0.before.0", 0x11, 0, MIB), "device 0's snapshot holds the write before the marker");
    assert!(reads_pattern(&d, "r0.before.1", 0x22, MIB, MIB), "device 1's snapshot too");
    assert!(reads_pattern(&d, "r0.before.1", 0, 0, MIB), "and nothing else");

    let ls = d.json(&["snapshot", "ls", "r0"]);
    let s = &ls[0];
    assert_eq!((s["group"].as_str(), s["name"].as_str(), s["slink"].as_u64()), (Some("r0"), Some("before"), Some(1)));
    assert!(s["seq"].as_u64().unwrap() >= 2, "{s}");
    for dev in s["devices"].as_array().unwrap() {
        assert_eq!(dev["state"], "valid", "{dev}");
        assert!(dev["used_bytes"].as_u64().unwrap() >= MIB, "the overwritten MiB was copied out: {dev}");
    }
    // A second snapshot of the same name is refused by name; at slink 0 (the LDs) it works.
    let e = d.cli_err(&["snapshot", "create", "r0", "before", "--slink", "1"]);
    assert!(e.contains("exists already"), "{e}");
    d.cli_ok(&["snapshot", "create", "r0", "lds", "--slink", "0"]);
    assert!(reads_pattern(&d, "r0.lds.0", 0x33, 0, MIB));

    // Restart: the persistent snapshots come back with their contents.
    d.kill9();
    d.restart();
    assert!(reads_pattern(&d, "r0.before.0", 0x11, 0, MIB), "after kill -9 and restart");
    assert!(reads_pattern(&d, "r0.before.1", 0x22, MIB, MIB));
    // Copy-on-write goes on after the restart: a new write leaves the snapshot alone.
    write_pattern(&d, "r0-0", 0x55, 0, MIB);
    assert!(d.cli(&["wait", "r0", "--timeout", "30"]).status.success());
    assert!(reads_pattern(&d, "r0.before.0", 0x11, 0, MIB), "copy-on-write after the restart");
    assert!(reads_pattern(&d, "r0.lds.0", 0x33, 0, MIB), "the LD snapshot too");

    // Delete: devices and files go.
    d.cli_ok(&["snapshot", "delete", "r0", "before"]);
    assert!(!d.names().iter().any(|n| n.starts_with("r0.before")), "{:?}", d.names());
    assert!(!d.dir().join("state/snapshots/r0/before").exists());
    let e = d.cli_err(&["snapshot", "delete", "r0", "before"]);
    assert!(e.contains("no snapshot before"), "{e}");
    // A marker its SLINK will never reach (it leaves ordered mode first): the command
    // says so at once instead of waiting out its timeout.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    let mut waiting = d.cli_cmd(&["snapshot", "create", "r0", "never", "--slink", "1", "--timeout", "120"]);
    let child = waiting.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        group_status(&d, "r0")["slinks"][1]["outstanding_ios"].as_u64().unwrap_or(0) > 0
    }));
    d.cli_ok(&["message", "r0", "0", "slink", "1", "invalidate"]);
    let t0 = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success() && t0.elapsed() < Duration::from_secs(30), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("left ordered mode"), "{}", show(&out));
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    assert!(d.cli(&["wait", "r0", "--timeout", "30"]).status.success());
    // Bad names and slinks are refused, naming them.
    assert!(d.cli_err(&["snapshot", "create", "r0", "a/b"]).contains("a/b"));
    assert!(d.cli_err(&["snapshot", "create", "r0", "x", "--slink", "5"]).contains("5"));
}

fn file_bytes(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k * 31 + i * 7919) % 251) as u8).collect()
}

impl Site {
    /// Group `g` of one device of `size` bytes, with `peer` on net SLINK 1.
    fn group(&self, size: u64, secondary: bool, peer: (&str, std::net::SocketAddr)) {
        let dev = self.d.make_file_s("dev0", size);
        let log = self.d.make_file_s("replog", 32 * MIB);
        let (n, role) = if secondary { (5, " role=secondary") } else { (4, "") };
        let mut t =
            format!("0 {} replicator default {n} {log} 0 auto 65536{role} local 2 0 async 2 0 {dev} - 0", size / 512);
        let (site, addr) = peer;
        t += &format!(" net 5 1 async {addr} site={site} timeout=1s 2 0 0 core 2 2048 nosync");
        self.d.create("g", &t);
    }
}

#[test]
fn ext4_snapshot_at_a_remote_site_mid_workload_is_consistent_and_replication_goes_on() {
    require!("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount");
    if !is_root() || !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        skip("needs root, /dev/fuse and /dev/loop-control");
        return;
    }
    let pki = pki(&["paris", "tokyo"]);
    let paris = Site::start("paris", pki.path());
    let tokyo = Site::start("tokyo", pki.path());
    let size = 96 * MIB;
    tokyo.group(size, true, ("paris", paris.listen));
    paris.group(size, false, ("tokyo", tokyo.listen));

    let mut stack = BlockStack::attach(paris.d.dir(), &paris.d.uri("g-0"), size);
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", stack.dev()]));
    stack.mount();
    let mnt = stack.mountpoint.clone();

    // Files written and synced; the marker goes in while they keep coming.
    let stop = Arc::new(AtomicBool::new(false));
    let synced = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (mnt, stop, synced) = (mnt.clone(), stop.clone(), synced.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && i < 1200 {
                let p = mnt.join(format!("f{i}"));
                let f = std::fs::File::create(&p).unwrap();
                use std::io::Write;
                (&f).write_all(&file_bytes(i, 8192 + (i % 13) * 4096)).unwrap();
                f.sync_all().unwrap();
                std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
                i += 1;
                synced.store(i, Ordering::SeqCst);
            }
            i
        })
    };
    assert!(wait_until(Duration::from_secs(60), || synced.load(Ordering::SeqCst) >= 100), "the workload runs");
    let before = synced.load(Ordering::SeqCst);
    let out = paris.d.cli_ok(&["snapshot", "create", "g", "mid", "--slink", "1"]);
    // Files begun after the marker was logged are not in the snapshot.
    let after = synced.load(Ordering::SeqCst) + 1;
    assert!(out.contains("tokyo"), "{out}");
    // Tokyo takes it when it reaches the marker, while paris keeps writing.
    let taken = wait_until(Duration::from_secs(60), || {
        let ls = tokyo.d.json(&["snapshot", "ls"]);
        ls.as_array().is_some_and(|a| a.iter().any(|s| s["name"] == "mid"))
            && tokyo.d.names().iter().any(|n| n == "g.mid.0")
    });
    assert!(taken, "tokyo took the snapshot\n{}", tokyo.d.log_text());
    assert!(wait_until(Duration::from_secs(60), || synced.load(Ordering::SeqCst) >= before + 100), "writes go on");
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();

    // The snapshot, mounted from tokyo over NBD: journal replay, then clean; every file
    // synced before the marker is there, byte for byte.
    let snapdir = tokyo.d.path("snap");
    std::fs::create_dir_all(&snapdir).unwrap();
    let mut snap = BlockStack::attach(&snapdir, &tokyo.d.uri("g.mid.0"), size);
    let o = run(Command::new("fsck.ext4").args(["-fy", snap.dev()]));
    let code = o.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 1, "fsck.ext4 -fy found uncorrectable damage (exit {code}): {}", show(&o));
    snap.fsck_clean();
    snap.mount();
    let mut bad = Vec::new();
    for i in 0..before {
        let got = std::fs::read(snap.mountpoint.join(format!("f{i}"))).unwrap_or_default();
        if got != file_bytes(i, 8192 + (i % 13) * 4096) {
            bad.push(i);
        }
    }
    let later: Vec<usize> = (after..written).filter(|i| snap.mountpoint.join(format!("f{i}")).exists()).collect();
    snap.detach();
    assert!(bad.is_empty(), "files synced before the marker missing or wrong in the snapshot: {bad:?}");
    assert!(later.is_empty(), "files created after the marker are in the snapshot: {later:?}");
    eprintln!("snapshot at file {before}..{after}, {written} files written in all");

    // Replication went on meanwhile: tokyo converges to paris.
    stack.umount();
    stack.detach();
    assert!(written > before);
    let converged = wait_until(Duration::from_secs(60), || {
        let st = group_status(&paris.d, "g");
        slink_of(&st, 1)["outstanding_ios"] == 0
            && std::fs::read(paris.dev(0)).unwrap() == std::fs::read(tokyo.dev(0)).unwrap()
    });
    assert!(converged, "tokyo converges to paris after the snapshot");
    tokyo.d.cli_ok(&["snapshot", "delete", "g", "mid"]);
}

#[test]
fn resync_snapshot_keeps_a_consistent_copy_until_the_resync_ends_even_across_kill9() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let size = 8 * MIB;
    let log = d.make_file_s("replog", 32 * MIB);
    let ld = d.make_file_s("ld0", size);
    let rd = d.make_file_s("rd0", size);
    d.create(
        "r0",
        &format!(
            "0 {} replicator default 4 {log} 0 auto 65536 local 2 0 async 2 0 {ld} - 0 \
             local 3 1 async resync_snapshot 2 0 {rd} core 2 2048 nosync",
            size / 512
        ),
    );
    assert!(d.cli_ok(&["table", "r0"]).contains("async resync_snapshot"), "the option is in the canonical table");
    write_pattern(&d, "r0-0", 0x11, 0, size);
    assert!(d.cli(&["wait", "r0", "--timeout", "30"]).status.success());
    // The RD is behind (paused), then everything is to be copied again, slowly.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    write_pattern(&d, "r0-0", 0x22, 0, size);
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resync-rate", "1048576"]);
    d.cli_ok(&["message", "r0", "0", "slink", "1", "invalidate"]);
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    let snapped = wait_until(Duration::from_secs(30), || {
        group_status(&d, "r0")["resync_snapshots"].as_array().is_some_and(|a| a.iter().any(|n| n == "resync-1"))
    });
    assert!(snapped, "the resync snapshot exists while the resync runs: {}", group_status(&d, "r0"));
    assert!(reads_pattern(&d, "r0.resync-1.0", 0x11, 0, size), "it is the RD before the resync");
    // kill -9 in the middle of the resync. Its persistent COW store, opened by another
    // daemon with the `snapshot` target, still holds the RD as it was before the resync.
    d.kill9();
    let cow = d.dir().join("state/snapshots/r0/resync-1/dev0.cow");
    {
        let v = Daemon::start();
        v.create("check", &format!("0 {} snapshot {rd} {} P 16", size / 512, cow.display()));
        assert!(reads_pattern(&v, "check", 0x11, 0, size), "after kill -9, the resync snapshot is intact");
        v.cli_ok(&["remove", "check"]);
    }
    // The restarted daemon brings it back and finishes the resync; then the snapshot goes.
    d.restart();
    assert!(d.log_text().contains("restored device=r0.resync-1.0"), "the resync snapshot came back with the daemon");
    assert!(d.cli(&["wait", "r0", "--timeout", "60"]).status.success());
    let gone = wait_until(Duration::from_secs(20), || !d.names().iter().any(|n| n.starts_with("r0.resync-1")));
    assert!(gone, "the resync snapshot is dropped when the resync ends: {:?}", d.names());
    assert!(read_at(Path::new(&rd), 0, 4096).iter().all(|b| *b == 0x22), "the RD caught up");
    assert!(group_status(&d, "r0")["resync_snapshots"].as_array().unwrap().is_empty());
}
