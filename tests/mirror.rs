//! The `mirror` target against the real daemon: a 2-leg mirror written over NBD keeps
//! its leg files equal; a leg that really fails (nbdkit's error filter) is dropped while
//! writes go on, and after it heals `leg 1 recover` copies only the regions written
//! meanwhile; a split leg is a consistent copy that no later write reaches (by message
//! and by a reload with fewer legs); a restart with a `disk` log copies only the regions
//! it marked.

mod common;

use std::path::Path;
use std::time::Duration;

use common::faulty::{self, FaultyDevice};
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// 16 MiB devices, 512 KiB regions (1024 sectors): 32 regions.
const DEV: u64 = 16 * MIB;
const SECTORS: u64 = DEV / 512;
const REGION: u64 = 512 * KIB;
const SETTLE: Duration = Duration::from_secs(60);

fn detail(d: &Daemon, name: &str) -> Value {
    let v = d.json(&["status", name]);
    v[0]["segments"][0]["detail"].clone()
}

fn wait_detail(d: &Daemon, name: &str, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(SETTLE, || {
        last = detail(d, name);
        cond(&last)
    });
    assert!(ok, "{name}: timed out waiting for {what}: {last:#}");
    last
}

fn in_sync(d: &Daemon, name: &str) -> Value {
    wait_detail(d, name, "legs in sync", |v| v["in_sync"] == true && v["resync"]["active"] == false)
}

fn file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn assert_same(a: &Path, b: &Path, what: &str) {
    let (x, y) = (file(a), file(b));
    assert_eq!(x.len(), y.len(), "{what}: sizes");
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{what}: {} and {} differ first at byte {i}", a.display(), b.display());
    }
}

fn qemu_write(d: &Daemon, name: &str, writes: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = writes.iter().map(|(p, off, len)| format!("write -P {p} {off} {len}")).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = qemu_io_ok(&d.uri(name), &refs);
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn a_two_leg_mirror_written_over_nbd_keeps_its_legs_equal() {
    require!("qemu-io");
    let d = Daemon::start();
    let a = d.make_file("a", DEV);
    let b = d.make_file("b", DEV);
    fill_file(&a, 0x11, DEV as usize); // leg 0 holds data: the initial sync copies it
    let t = format!("0 {SECTORS} mirror core 2 1024 sync 2 {} 0 {} 0", a.display(), b.display());
    d.create("m0", &t);
    let v = in_sync(&d, "m0");
    assert_eq!(v["resync"]["bytes_copied"], DEV, "initial sync copies every region: {v:#}");
    assert_same(&a, &b, "after the initial sync");
    qemu_write(&d, "m0", &[(0x5a, 0, 64 * KIB), (0x6b, 3 * MIB + 4096, MIB), (0x7c, DEV - 4096, 4096)]);
    let out = qemu_io_ok(&d.uri("m0"), &["read -P 0x6b 3149824 1M", "read -P 0x11 8M 4k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_same(&a, &b, "after writes over NBD");
    assert_eq!(read_at(&b, 3 * MIB + 4096, 2), vec![0x6b; 2]);
    let line = d.cli_ok(&["status", "m0"]);
    let want = format!("mirror 2 {} {} 32/32 1 AA 1 core", a.display(), b.display());
    assert!(line.contains(&want), "status line: {line}");
    // Bad tables are refused with what is wrong.
    let e = d.cli_err(&[
        "create",
        "x",
        "--table",
        &format!("0 {SECTORS} mirror core 1 1000 2 {} 0 {} 0", a.display(), b.display()),
    ]);
    assert!(e.contains("power of two"), "{e}");
    let e = d.cli_err(&["create", "y", "--table", &format!("0 {SECTORS} mirror core 1 1024 1 {} 0", a.display())]);
    assert!(e.contains("leg 0") && e.contains("m0"), "a leg is claimed like linear's: {e}");
    d.cli_ok(&["remove", "m0"]);
}

#[test]
fn a_failing_leg_is_dropped_and_recover_copies_only_the_regions_written_meanwhile() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        skip(&why);
        return;
    }
    let rd = FaultyDevice::start(DEV);
    let d = Daemon::start();
    let a = d.make_file("a", DEV);
    let t = format!("0 {SECTORS} mirror core 2 1024 nosync 2 {} 0 {} 0 1 handle_errors", a.display(), rd.path_s());
    d.create("m0", &t);
    qemu_write(&d, "m0", &[(0x01, 0, 64 * KIB)]);

    // The leg dies mid-workload: the writes still succeed (qemu_write checks).
    rd.fail();
    let outage: Vec<(u8, u64, u64)> = (0..5u64).map(|i| (0x80 | i as u8, i * 3 * MIB + 8 * KIB, 64 * KIB)).collect();
    qemu_write(&d, "m0", &outage);
    let v = wait_detail(&d, "m0", "leg 1 dead", |v| v["legs"][1]["health"] == "dead");
    assert_eq!(v["health"], "AD", "{v:#}");
    assert_eq!(v["legs"][1]["regions_to_copy"], 5, "{v:#}");
    assert!(v["legs"][1]["last_error"].as_str().unwrap_or("").contains("EIO"), "{v:#}");
    let line = d.cli_ok(&["status", "m0"]);
    assert!(line.contains(" 27/32 1 AD 1 core"), "{line}");
    assert!(d.log_text().contains("leg failed and is dropped"), "the daemon log says which leg");

    // Heal and recover: exactly the 5 regions are copied back.
    rd.heal();
    let reply = d.cli_ok(&["message", "m0", "0", "leg", "1", "recover"]);
    assert!(reply.contains("5 regions to copy"), "{reply}");
    let v = in_sync(&d, "m0");
    assert_eq!(v["resync"]["regions_copied"], 5, "{v:#}");
    assert_eq!(v["resync"]["bytes_copied"], 5 * REGION, "{v:#}");
    assert_eq!(v["health"], "AA", "{v:#}");
    d.cli_ok(&["remove", "m0"]);
    assert_same(&a, &rd.image, "after the recovery");
}

#[test]
fn a_split_leg_is_a_consistent_copy_that_takes_no_later_writes() {
    require!("qemu-io");
    let d = Daemon::start();
    let legs: Vec<_> = (0..3).map(|i| d.make_file(&format!("l{i}"), DEV)).collect();
    let ls: Vec<String> = legs.iter().map(|p| p.display().to_string()).collect();
    let t = format!("0 {SECTORS} mirror core 2 1024 nosync 3 {} 0 {} 0 {} 0", ls[0], ls[1], ls[2]);
    d.create("m0", &t);
    qemu_write(&d, "m0", &[(0x0a, 0, 2 * MIB), (0x0b, 5 * MIB, 64 * KIB)]);
    // Split by message while a client keeps writing: the copy matches some moment.
    let reply = d.cli_ok(&["message", "m0", "0", "split", "2"]);
    assert!(reply.contains("split off"), "{reply}");
    let frozen = file(&legs[2]);
    qemu_write(&d, "m0", &[(0x0c, 0, 64 * KIB), (0x0d, 9 * MIB, 4 * KIB)]);
    assert_eq!(file(&legs[2]), frozen, "no write after the split reaches leg 2");
    assert_eq!(read_at(&legs[2], 0, 1), vec![0x0a]);
    assert_eq!(read_at(&legs[2], 5 * MIB, 1), vec![0x0b]);
    assert_eq!(read_at(&legs[0], 0, 1), vec![0x0c]);
    assert_same(&legs[0], &legs[1], "the remaining legs");
    let line = d.cli_ok(&["status", "m0"]);
    assert!(line.contains(&format!("mirror 2 {} {} 32/32 1 AA", ls[0], ls[1])), "{line}");
    // The split leg is free: another device may use it.
    d.create("copy", &format!("0 {SECTORS} linear {} 0", ls[2]));
    let out = qemu_io_ok(&d.uri("copy"), &["read -P 0x0a 0 2M"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    d.cli_ok(&["remove", "copy"]);

    // Split by reload: leg 1 leaves the table.
    qemu_write(&d, "m0", &[(0x0e, MIB, 4 * KIB)]);
    d.cli_ok(&["load", "m0", "--table", &format!("0 {SECTORS} mirror core 2 1024 nosync 1 {} 0", ls[0])]);
    d.cli_ok(&["resume", "m0"]);
    let at_reload = file(&legs[1]);
    assert_eq!(read_at(&legs[1], MIB, 1), vec![0x0e], "leg 1 has every write before the reload");
    assert_eq!(file(&legs[0]), at_reload, "and equals the mirror at the reload");
    qemu_write(&d, "m0", &[(0x0f, MIB, 4 * KIB)]);
    assert_eq!(file(&legs[1]), at_reload, "no write after the reload reaches leg 1");
    let v = detail(&d, "m0");
    assert_eq!(v["in_sync"], true, "the hand-over keeps leg 0 in sync, no copy: {v:#}");
    assert_eq!(v["resync"]["regions_copied"], 0, "{v:#}");
    d.cli_ok(&["remove", "m0"]);
}

#[test]
fn a_restart_with_a_disk_log_copies_only_the_marked_regions() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        skip(&why);
        return;
    }
    let rd = FaultyDevice::start(DEV);
    let mut d = Daemon::start();
    let a = d.make_file("a", DEV);
    let log = d.path("mirror.log"); // created by the table
    let t = format!(
        "0 {SECTORS} mirror disk 3 {} 1024 nosync 2 {} 0 {} 0 1 handle_errors",
        log.display(),
        a.display(),
        rd.path_s()
    );
    d.create("m0", &t);
    qemu_write(&d, "m0", &[(0x21, 0, 64 * KIB), (0x22, 10 * MIB, 64 * KIB)]);
    rd.fail();
    qemu_write(&d, "m0", &[(0x31, 2 * MIB, 4 * KIB), (0x32, 7 * MIB, 600 * KIB)]);
    let v = wait_detail(&d, "m0", "leg 1 dead", |v| v["legs"][1]["health"] == "dead");
    assert_eq!(v["legs"][1]["regions_to_copy"], 3, "4 KiB in one region, 600 KiB across two: {v:#}");

    // Stop the daemon, heal the leg, start again: the table comes back from the state
    // directory, the log still marks the three regions, and only they are copied.
    d.terminate();
    rd.heal();
    d.restart();
    let v = in_sync(&d, "m0");
    assert_eq!(v["resync"]["regions_copied"], 3, "only the marked regions: {v:#}");
    assert_eq!(v["resync"]["bytes_copied"], 3 * REGION, "{v:#}");
    assert_eq!(v["log"]["type"], "disk");
    let out = qemu_io_ok(&d.uri("m0"), &["read -P 0x32 7M 600k", "read -P 0x22 10M 64k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    d.cli_ok(&["remove", "m0"]);
    assert_same(&a, &rd.image, "after the resync at restart");
}
