//! Outages, dirty mode and resynchronisation of the replicator (DESIGN invariants 5 and
//! 6), end to end through the daemon with real clients:
//!
//! - a short outage of a really failing RD (nbdkit's error filter behind nbdfuse) is
//!   absorbed by the log: no copy, write order kept;
//! - a long outage (a paused SLINK) overflows the log: the SLINK leaves ordered mode,
//!   only the touched regions become dirty, and the resync copies only those;
//! - with `+stall` writes block instead, and the SLINK never leaves ordered mode;
//! - a `disk` dirty log survives kill -9, in dirty mode and in the middle of a resync;
//! - application writes racing the resync are neither lost nor torn;
//! - a `sync` dirty log makes an initial full copy, `nosync` none;
//! - a write bigger than a small log still goes through (it is sliced).
//!
//! Every group here: one LD and one RD of 64 MiB, 1 MiB regions, and an 8 MiB log so
//! that it fills quickly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::faulty::{self, FaultyDevice};
use common::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DEV_BYTES: u64 = 64 * MIB;
const SECTORS: u64 = DEV_BYTES / 512;
/// 8 MiB of log: holds seven 1 MiB entries.
const LOG_SECTORS: u64 = 16384;
const REGION: u64 = MIB;
const REGIONS: u64 = DEV_BYTES / REGION;

/// Deadline for the group to settle (catch up, resync) in these small tests.
const SETTLE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------
// Set-up and status helpers.

/// The paper's one-line table: LD on SLINK 0, one RD on SLINK 1 with `policy` and the
/// dirty log `dlog`.
fn table(log: &str, ld: &str, policy: &str, rd: &str, dlog: &str) -> String {
    format!(
        "0 {SECTORS} replicator default 4 {log} 0 auto {LOG_SECTORS} local 2 0 asynchronous 2 0 {ld} - 0 \
         local 2 1 {policy} 2 0 {rd} {dlog}"
    )
}

/// `core 2 2048 nosync`.
fn core_nosync() -> String {
    format!("core 2 {} nosync", REGION / 512)
}

/// Files of one group in the daemon's directory.
struct Files {
    log: String,
    ld: PathBuf,
    rd: PathBuf,
    dlog: PathBuf,
}

impl Files {
    fn new(d: &Daemon, tag: &str) -> Files {
        Files {
            log: d.make_file_s(&format!("replog{tag}"), LOG_SECTORS * 512),
            ld: d.make_file(&format!("ld{tag}.img"), DEV_BYTES),
            rd: d.make_file(&format!("rd{tag}.img"), DEV_BYTES),
            dlog: d.make_file(&format!("dlog{tag}"), MIB),
        }
    }

    fn ld_s(&self) -> String {
        self.ld.display().to_string()
    }

    fn rd_s(&self) -> String {
        self.rd.display().to_string()
    }

    /// `disk 3 <dlog> 2048 nosync`.
    fn disk_nosync(&self) -> String {
        format!("disk 3 {} {} nosync", self.dlog.display(), REGION / 512)
    }
}

/// `status <group> --json`: the replicator's detail.
fn detail(d: &Daemon, group: &str) -> Value {
    let v = d.json(&["status", group]);
    let det = v[0]["segments"][0]["detail"].clone();
    assert!(det["slinks"].is_array(), "status {group} --json has no slinks: {v}");
    det
}

/// One SLINK's entry in a group detail.
fn slink_of(det: &Value, nr: u64) -> Value {
    det["slinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slink"] == nr)
        .unwrap_or_else(|| panic!("no slink {nr} in {det}"))
        .clone()
}

fn slink(d: &Daemon, group: &str, nr: u64) -> Value {
    slink_of(&detail(d, group), nr)
}

/// `status <dev> --json` of a replicator-dev: its entry for SLINK `nr`.
fn dev_slink(d: &Daemon, dev: &str, nr: u64) -> Value {
    let v = d.json(&["status", dev]);
    v[0]["segments"][0]["detail"]["slinks"]
        .as_array()
        .unwrap_or_else(|| panic!("status {dev} --json has no slinks: {v}"))
        .iter()
        .find(|s| s["slink"] == nr)
        .unwrap_or_else(|| panic!("status {dev}: no slink {nr}: {v}"))
        .clone()
}

fn u(v: &Value, what: &str) -> u64 {
    v[what].as_u64().unwrap_or_else(|| panic!("{what} is not a number in {v}"))
}

/// Poll the group's status until `cond` holds; panic with the last status after
/// `timeout`. Returns the status that satisfied it.
fn wait_for(d: &Daemon, group: &str, timeout: Duration, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(timeout, || {
        last = detail(d, group);
        cond(&last)
    });
    assert!(ok, "{group}: not {what} within {timeout:?}; last status:\n{last:#}");
    last
}

/// Every SLINK ordered and caught up.
fn in_sync(det: &Value) -> bool {
    det["slinks"].as_array().unwrap().iter().all(|s| s["sync"]["ordered"] == true && s["outstanding_ios"] == 0)
}

/// Wait until every SLINK is ordered with nothing outstanding; returns that status.
fn wait_in_sync(d: &Daemon, group: &str) -> Value {
    wait_for(d, group, SETTLE, "in sync (all slinks ordered, nothing outstanding)", in_sync)
}

/// `qemu-io` on a device: one `write -P <pattern> <off> <len>` per item, all required
/// to succeed.
fn qemu_write(d: &Daemon, dev: &str, writes: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = writes.iter().map(|(p, off, len)| format!("write -P {p} {off} {len}")).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(&d.uri(dev), &refs);
}

/// 1 MiB writes, one into each region of `regions`, patterns from `pattern` on.
fn region_writes(regions: impl IntoIterator<Item = u64>, pattern: u8) -> Vec<(u8, u64, u64)> {
    regions.into_iter().enumerate().map(|(i, r)| (pattern.wrapping_add(i as u8) | 1, r * REGION, REGION)).collect()
}

/// The bytes of a whole file.
fn contents(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// RD == LD, byte for byte; on a mismatch name the regions that differ.
fn assert_same(ld: &Path, rd: &Path, what: &str) {
    let a = contents(ld);
    let b = contents(rd);
    assert_eq!(a.len(), b.len(), "{what}: LD and RD sizes differ");
    if a != b {
        let differ: Vec<usize> = a
            .chunks(REGION as usize)
            .zip(b.chunks(REGION as usize))
            .enumerate()
            .filter(|(_, (x, y))| x != y)
            .map(|(i, _)| i)
            .collect();
        panic!("{what}: RD differs from LD in {} regions of 1 MiB: {differ:?}", differ.len());
    }
}

/// Whether the daemon logged that an SLINK left ordered mode (since its log began).
/// A qemu-io writing `writes` to `dev` in the background (it may block: the log full).
fn spawn_writer(d: &Daemon, dev: &str, writes: Vec<(u8, u64, u64)>) -> KillOnDrop {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for (p, off, len) in writes {
        cmd.args(["-c", &format!("write -P {p} {off} {len}")]);
    }
    cmd.arg(d.uri(dev)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    KillOnDrop(cmd.spawn().expect("start qemu-io"))
}

fn left_ordered(d: &Daemon) -> bool {
    d.log_text().contains("slink left ordered mode")
}

/// The daemon log after the last harness restart.
fn log_since_restart(d: &Daemon) -> String {
    let t = d.log_text();
    match t.rfind("===== test harness: restarting daemon =====") {
        Some(i) => t[i..].to_string(),
        None => t,
    }
}

/// Pause SLINK 1, then overflow the log with 1 MiB writes into `regions` (two passes):
/// SLINK 1 leaves ordered mode. Returns its sync status then.
fn overflow_into(d: &Daemon, group: &str, dev: &str, regions: &[u64]) -> Value {
    d.cli_ok(&["message", group, "0", "slink", "1", "pause"]);
    let mut w = region_writes(regions.iter().copied(), 0x11);
    w.extend(region_writes(regions.iter().copied(), 0x40));
    let total: u64 = w.iter().map(|x| x.2).sum();
    assert!(total > LOG_SECTORS * 512, "the test must write more than the log holds");
    qemu_write(d, dev, &w);
    let s = slink(d, group, 1);
    assert_eq!(s["sync"]["ordered"], false, "{total} bytes into an 8 MiB log with slink 1 paused: {s:#}");
    assert_eq!(s["sync"]["state"], "out_of_sync", "paused and out of ordered mode: {s:#}");
    assert!(left_ordered(d), "the daemon log should say the slink left ordered mode");
    s["sync"].clone()
}

// ---------------------------------------------------------------------------------
// 1. Short outage: absorbed by the log.

/// The RD really fails (EIO on every request) while an application writes 2 MiB, less
/// than the log holds. The SLINK is marked down, then probed back once the device
/// heals, catches up from the log: no region copied, ordered all along, RD == LD.
#[test]
fn short_outage_of_a_failing_rd_is_absorbed_by_the_log() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        skip(&why);
        return;
    }
    let rd = FaultyDevice::start(DEV_BYTES);
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &rd.path_s(), &core_nosync()));
    let mut ever_unordered = false;
    let mut watch = |det: &Value| {
        ever_unordered |= slink_of(det, 1)["sync"]["ordered"] != true;
    };

    // Healthy first: the path through nbdkit works.
    qemu_write(&d, "r0-0", &[(0x01, 0, 64 * KIB)]);
    let det = wait_in_sync(&d, "r0");
    watch(&det);

    // The outage: 32 writes of 64 KiB, spread over the device, all acknowledged.
    rd.fail();
    let writes: Vec<(u8, u64, u64)> =
        (0..32u64).map(|i| ((i as u8).wrapping_mul(7) | 0x80, i * 2 * MIB + i * 4 * KIB, 64 * KIB)).collect();
    qemu_write(&d, "r0-0", &writes);
    let det = wait_for(&d, "r0", SETTLE, "showing slink 1 down", |det| {
        watch(det);
        let s = slink_of(det, 1);
        s["accessible"] == false && s["down_since"].is_u64()
    });
    let s1 = slink_of(&det, 1);
    assert!(s1["last_error"].is_string(), "a down slink says why: {s1:#}");
    assert!(u(&s1, "outstanding_ios") > 0, "the writes wait in the log for the down slink: {s1:#}");
    assert_eq!(s1["sync"]["ordered"], true, "a short outage does not leave ordered mode: {s1:#}");
    let mut text = String::new();
    let shown = wait_until(SETTLE, || {
        text = d.cli_ok(&["status", "r0"]);
        text.contains(" 1:A,") && text.contains(",down")
    });
    assert!(shown, "text status should show slink 1 down: {text}");

    // Heal: probed back, catches up from the log.
    rd.heal();
    let det = wait_for(&d, "r0", SETTLE, "caught up after the device healed", |det| {
        watch(det);
        in_sync(det) && slink_of(det, 1)["accessible"] == true
    });
    let s1 = slink_of(&det, 1);
    assert!(!ever_unordered, "slink 1 left ordered mode during a short outage");
    assert!(!left_ordered(&d), "the daemon log says the slink left ordered mode during a short outage");
    assert_eq!(s1["sync"]["state"], "ordered", "{s1:#}");
    assert_eq!(u(&s1["sync"], "bytes_copied"), 0, "no region copied after a short outage: {s1:#}");
    assert_eq!(u(&s1["sync"], "dirty_regions"), 0, "{s1:#}");
    assert!(s1["down_since"].is_null(), "back up: {s1:#}");
    assert!(d.log_text().contains("slink back after an outage"), "the daemon log says the slink came back");
    let dev = dev_slink(&d, "r0-0", 1);
    assert_eq!(dev["write_order_consistent"], true, "{dev}");
    assert_same(&f.ld, &rd.image, "after a short outage");
}

/// While the device keeps failing, the SLINK stays down: `down_since` is the start of
/// the outage, and probes back off (0.2 s doubling to 15 s, README) instead of calling
/// the SLINK accessible again while its device still fails.
#[test]
fn a_down_slink_stays_down_and_backs_off_while_its_device_fails() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        skip(&why);
        return;
    }
    let rd = FaultyDevice::start(DEV_BYTES);
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &rd.path_s(), &core_nosync()));
    qemu_write(&d, "r0-0", &[(0x01, 0, 64 * KIB)]);
    wait_in_sync(&d, "r0");

    rd.fail();
    qemu_write(&d, "r0-0", &[(0x02, MIB, 64 * KIB)]);
    let det = wait_for(&d, "r0", SETTLE, "showing slink 1 down", |det| slink_of(det, 1)["accessible"] == false);
    let since = slink_of(&det, 1)["down_since"].clone();
    assert!(since.is_u64(), "{det:#}");
    // For two seconds of the outage: still down, still down since the same moment.
    let mut seen = Value::Null;
    let changed = wait_until(Duration::from_secs(2), || {
        seen = slink(&d, "r0", 1);
        seen["accessible"] != false || seen["down_since"] != since
    });
    let flaps = d.log_text().matches("slink answers again").count();
    assert!(
        !changed,
        "slink 1 looked up again, or its down_since moved, while its device still failed \
         (down_since was {since}; {flaps} \"accessible again\" lines in the daemon log): {seen:#}"
    );
    assert_eq!(flaps, 0, "the daemon called slink 1 accessible again while its device still failed");
    // One outage, one warning: retries back off quietly instead of flapping.
    let failures = d.log_text().matches("marking the slink inaccessible").count();
    assert_eq!(failures, 1, "{failures} 'went down' warnings for one outage: flapping");

    rd.heal();
    wait_for(&d, "r0", SETTLE, "caught up after the device healed", |det| {
        in_sync(det) && slink_of(det, 1)["accessible"] == true
    });
    assert_same(&f.ld, &rd.image, "after the outage");
}

// ---------------------------------------------------------------------------------
// 2. Long outage: dirty mode, then a resync of the touched regions only.

#[test]
fn long_outage_goes_to_dirty_mode_and_resyncs_only_touched_regions() {
    require!("qemu-io");
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &f.rd_s(), &core_nosync()));

    // 17 MiB of writes, all inside the first 8 MiB (regions 0..=7); the last one is
    // unaligned and spans regions 3 and 4.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    let mut w = region_writes(0..8, 0x11);
    w.extend(region_writes(0..8, 0x51));
    w.push((0x77, 3 * MIB + 512 * KIB, MIB));
    qemu_write(&d, "r0-0", &w);

    let s1 = slink(&d, "r0", 1);
    let sy = &s1["sync"];
    assert_eq!(sy["ordered"], false, "17 MiB into an 8 MiB log with the slink paused: {s1:#}");
    assert_eq!(sy["state"], "out_of_sync", "{s1:#}");
    assert_eq!(sy["reason"], "replication log full", "{s1:#}");
    assert_eq!(u(sy, "regions"), REGIONS, "{s1:#}");
    let dirty = u(sy, "dirty_regions");
    assert!(dirty <= 9, "only the first 8 MiB was written, yet {dirty} of {REGIONS} regions are dirty: {s1:#}");
    assert_eq!(dirty, 8, "every written region (0..=7) must be dirty: {s1:#}");
    assert_eq!(u(&s1, "outstanding_ios"), 0, "out of ordered mode nothing waits in the log: {s1:#}");
    let text = d.cli_ok(&["status", "r0"]);
    assert!(text.contains("out_of_sync 8/64 dirty"), "text status: {text}");
    let dev = dev_slink(&d, "r0-0", 1);
    assert_eq!(dev["write_order_consistent"], false, "{dev}");
    assert_eq!(dev["regions_in_sync"], REGIONS - 8, "{dev}");
    assert_eq!(dev["regions"], REGIONS, "{dev}");
    // Writes still work in dirty mode, and mark regions (region 5 is dirty already).
    qemu_write(&d, "r0-0", &[(0x99, 5 * MIB + 4 * KIB, 4 * KIB)]);

    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    let det = wait_in_sync(&d, "r0");
    let sy = slink_of(&det, 1)["sync"].clone();
    let copied = u(&sy, "bytes_copied");
    assert!(copied <= 9 * MIB, "resync copied {copied} bytes: more than the dirty regions: {sy:#}");
    assert_eq!(copied, dirty * REGION, "resync copies exactly the dirty regions: {sy:#}");
    assert_eq!(u(&sy, "regions_done"), dirty, "{sy:#}");
    assert!(d.log_text().contains("resync complete"), "daemon log says the resync completed");
    let dev = dev_slink(&d, "r0-0", 1);
    assert_eq!(dev["write_order_consistent"], true, "{dev}");
    assert_eq!(dev["regions_in_sync"], REGIONS, "{dev}");
    // The LD holds the last writes; the RD equals it.
    assert_eq!(read_at(&f.ld, 0, 4), vec![0x51; 4]);
    assert_eq!(read_at(&f.ld, 4 * MIB - 1, 2), vec![0x77; 2]);
    assert_eq!(read_at(&f.ld, 5 * MIB + 4 * KIB, 4), vec![0x99; 4]);
    assert_same(&f.ld, &f.rd, "after the resync");
}

/// The same with a really failing RD instead of a pause: the down SLINK holds the log
/// until it fills, leaves ordered mode, the resync fails while the device does, and
/// copies the dirty regions once it heals.
#[test]
fn long_outage_of_a_failing_rd_resyncs_the_dirty_regions_once_it_heals() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        skip(&why);
        return;
    }
    let rd = FaultyDevice::start(DEV_BYTES);
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &rd.path_s(), &core_nosync()));
    qemu_write(&d, "r0-0", &[(0x01, 0, 64 * KIB)]);
    wait_in_sync(&d, "r0");

    rd.fail();
    let mut w = region_writes(10..18, 0x13);
    w.extend(region_writes(10..18, 0x53));
    qemu_write(&d, "r0-0", &w);
    let s1 = slink(&d, "r0", 1);
    assert_eq!(s1["sync"]["ordered"], false, "16 MiB into an 8 MiB log with slink 1 down: {s1:#}");
    let dirty = u(&s1["sync"], "dirty_regions");
    assert_eq!(dirty, 8, "regions 10..18 were written: {s1:#}");
    // The resync cannot copy to a failing device: nothing gets cleared.
    let det = wait_for(&d, "r0", SETTLE, "with slink 1 down", |det| slink_of(det, 1)["accessible"] == false);
    let sy = slink_of(&det, 1)["sync"].clone();
    assert_eq!(u(&sy, "dirty_regions"), dirty, "{sy:#}");
    assert_eq!(u(&sy, "bytes_copied"), 0, "{sy:#}");

    rd.heal();
    let det = wait_in_sync(&d, "r0");
    let s1 = slink_of(&det, 1);
    assert_eq!(s1["accessible"], true, "{s1:#}");
    assert_eq!(u(&s1["sync"], "bytes_copied"), dirty * REGION, "only the dirty regions are copied: {s1:#}");
    assert_same(&f.ld, &rd.image, "after a long outage of a failing RD");
}

// ---------------------------------------------------------------------------------
// 3. `+stall`: writes wait for room instead.

#[test]
fn stall_policy_blocks_writes_while_the_log_is_full_and_stays_ordered() {
    require!("qemu-io");
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous+stall", &f.rd_s(), &core_nosync()));
    d.cli_ok(&["message", "r0", "0", "statistics", "on"]);
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);

    // 16 MiB of 1 MiB writes into the first 8 MiB, in the background.
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for (p, off, len) in region_writes(0..8, 0x21).into_iter().chain(region_writes(0..8, 0x61)) {
        cmd.args(["-c", &format!("write -P {p} {off} {len}")]);
    }
    cmd.arg(d.uri("r0-0")).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut writer = KillOnDrop(cmd.spawn().expect("start qemu-io"));

    let det = wait_for(&d, "r0", SETTLE, "with a full log and a write waiting for room", |det| {
        det["statistics"]["log_full_waits"].as_u64().unwrap_or(0) > 0
    });
    let log = &det["log"];
    assert!(
        u(log, "free_bytes") < MIB + 64 * KIB,
        "writes wait for room only when a 1 MiB entry does not fit: {log:#}"
    );
    assert_eq!(writer.0.try_wait().unwrap(), None, "the writer should be blocked by the full log");
    // Still blocked a while later: the log stays full, nothing leaves ordered mode.
    assert_eq!(writer.wait_timeout(Duration::from_secs(1)), None, "qemu-io finished while the log was full");
    let s1 = slink(&d, "r0", 1);
    assert_eq!(s1["sync"]["ordered"], true, "a +stall slink never leaves ordered mode: {s1:#}");
    assert!(u(&s1, "outstanding_ios") > 0, "{s1:#}");
    assert!(!left_ordered(&d), "the daemon log says a +stall slink left ordered mode");

    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    let st = writer.wait_timeout(SETTLE).expect("qemu-io did not finish after resume");
    let mut out = String::new();
    use std::io::Read;
    writer.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    writer.0.stderr.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(st.success() && !out.contains("failed") && !out.contains("error"), "qemu-io: {st}\n{out}");
    assert_eq!(out.matches("wrote 1048576/1048576").count(), 16, "all 16 writes completed:\n{out}");

    let det = wait_in_sync(&d, "r0");
    let s1 = slink_of(&det, 1);
    assert!(!left_ordered(&d), "the daemon log says a +stall slink left ordered mode");
    assert_eq!(u(&s1["sync"], "bytes_copied"), 0, "no resync with +stall: {s1:#}");
    assert_eq!(read_at(&f.ld, 7 * MIB, 4), vec![region_writes(0..8, 0x61)[7].0; 4]);
    assert_same(&f.ld, &f.rd, "after a stalled outage");
}

// ---------------------------------------------------------------------------------
// 4. kill -9 in dirty mode: the disk dirty log keeps the regions.

#[test]
fn kill9_in_dirty_mode_keeps_dirty_regions_with_a_disk_log() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &f.rd_s(), &f.disk_nosync()));
    overflow_into(&d, "r0", "r0-0", &(0..8).collect::<Vec<_>>());
    // Writes in dirty mode mark regions directly (not through the log).
    qemu_write(&d, "r0-0", &[(0x3c, 20 * MIB + 8 * KIB, 64 * KIB), (0x3d, 40 * MIB, 4 * KIB)]);
    let before = slink(&d, "r0", 1)["sync"].clone();
    let dirty = u(&before, "dirty_regions");
    assert_eq!(dirty, 10, "regions 0..=7, 20 and 40 were written: {before:#}");

    d.kill9();
    d.restart();
    // The pause is not persisted: the resync may be under way already. What is still
    // dirty is at most what was, never the whole device.
    let sy = slink(&d, "r0", 1)["sync"].clone();
    assert!(
        u(&sy, "dirty_regions") <= dirty,
        "after kill -9 the disk dirty log must hold the same {dirty} regions, not more: {sy:#}"
    );
    let log = log_since_restart(&d);
    assert!(log.contains("slink is not in ordered mode"), "the restarted daemon should say slink 1 is out of sync");

    let det = wait_in_sync(&d, "r0");
    let sy = slink_of(&det, 1)["sync"].clone();
    assert_eq!(
        u(&sy, "bytes_copied"),
        dirty * REGION,
        "the resync after restart copies exactly the {dirty} dirty regions (no full copy): {sy:#}"
    );
    let dev = dev_slink(&d, "r0-0", 1);
    assert_eq!(dev["write_order_consistent"], true, "{dev}");
    assert_same(&f.ld, &f.rd, "after kill -9 in dirty mode and the resync");
}

/// A `core` dirty log is lost with the daemon: after kill -9 in dirty mode the whole
/// RD is resynchronised (README), and ends equal to the LD.
#[test]
fn kill9_in_dirty_mode_with_a_core_log_resyncs_everything() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &f.rd_s(), &core_nosync()));
    overflow_into(&d, "r0", "r0-0", &(0..8).collect::<Vec<_>>());
    d.kill9();
    d.restart();
    assert!(log_since_restart(&d).contains("slink is not in ordered mode"), "slink 1 comes back out of sync");
    let det = wait_in_sync(&d, "r0");
    let sy = slink_of(&det, 1)["sync"].clone();
    assert_eq!(u(&sy, "bytes_copied"), DEV_BYTES, "a lost core dirty log means a full resync: {sy:#}");
    assert_same(&f.ld, &f.rd, "after kill -9 with a core dirty log");
}

/// kill -9 in dirty mode while entries written after the SLINK left ordered mode are
/// still in the log (SLINK 0, the LD, lags: here its device fails). After the restart
/// those entries are its dirty regions, not its backlog: the resync copies them and the
/// SLINK ends ordered with nothing outstanding.
#[test]
fn kill9_in_dirty_mode_while_the_ld_lags_behind() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        skip(&why);
        return;
    }
    let ld = FaultyDevice::start(DEV_BYTES);
    let mut d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &ld.path_s(), "asynchronous", &f.rd_s(), &f.disk_nosync()));
    d.cli_ok(&["message", "r0", "0", "statistics", "on"]);
    qemu_write(&d, "r0-0", &[(0x01, 0, 64 * KIB)]);
    wait_in_sync(&d, "r0");

    // SLINK 1 paused holds the log alone until it is full: it leaves ordered mode. Then
    // the LD fails: SLINK 0 holds the log, never leaves, and the writer waits for room.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    qemu_write(&d, "r0-0", &region_writes(0..12, 0x21));
    qemu_write(&d, "r0-0", &region_writes(0..12, 0x22));
    wait_for(&d, "r0", SETTLE, "with slink 1 out of ordered mode", |det| slink_of(det, 1)["sync"]["ordered"] == false);
    ld.fail();
    let writer = spawn_writer(&d, "r0-0", region_writes(0..12, 0x31));
    let full_before = u(&detail(&d, "r0")["statistics"], "log_full_waits");
    let det = wait_for(&d, "r0", SETTLE, "with the log full of entries the LD lacks", |det| {
        det["statistics"]["log_full_waits"].as_u64().unwrap_or(0) > full_before && u(&det["log"], "entries") > 0
    });
    let dirty = u(&slink_of(&det, 1)["sync"], "dirty_regions");
    assert!(dirty > 0 && dirty <= 12, "{det:#}");

    d.kill9();
    drop(writer);
    ld.heal();
    d.restart();
    let det = wait_in_sync(&d, "r0");
    let sy = slink_of(&det, 1)["sync"].clone();
    assert!(u(&sy, "bytes_copied") <= 12 * REGION, "no full copy: {sy:#}");
    assert_same(&ld.image, &f.rd, "after kill -9 in dirty mode with the LD behind");
}

/// A clean stop (SIGTERM) waits for SLINK 0 to apply what the log holds (bounded), so
/// the LD files hold every acknowledged write while the daemon is down: here the LD fails,
/// writes are acknowledged from the log, SIGTERM arrives, the LD heals during the drain.
#[test]
fn sigterm_drains_slink0_before_stopping() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let ld = FaultyDevice::start(DEV_BYTES);
    let mut d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &ld.path_s(), "asynchronous", &f.rd_s(), &f.disk_nosync()));
    wait_in_sync(&d, "r0");
    ld.fail();
    qemu_write(&d, "r0-0", &region_writes(0..4, 0x41));
    assert!(u(&slink(&d, "r0", 0), "outstanding_ios") > 0, "the LD lacks the writes");
    let pid = d.pid().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    assert!(wait_until(SETTLE, || d.log_text().contains("waiting for the LDs")), "the daemon drains SLINK 0");
    ld.heal();
    let st = d.terminate_status();
    assert!(st.success(), "{st}");
    let img = std::fs::read(&ld.image).unwrap();
    for (p, off, len) in region_writes(0..4, 0x41) {
        let at = off as usize;
        assert!(
            img[at..at + len as usize].iter().all(|b| *b == p),
            "the write at {off} reached the LD before the stop"
        );
    }
}

/// Invariant 5: when SLINK 0 holds the log's oldest entries (its device fails) while a
/// replica is paused at the same point, leaving ordered mode would free nothing: the
/// replica stays ordered and writes wait for room. After the LD heals and the replica
/// resumes, every copy is equal with no resync.
#[test]
fn a_replica_is_not_expelled_while_slink0_holds_the_log() {
    require!("qemu-io");
    if let Some(why) = faulty::unavailable() {
        eprintln!("SKIP: {why}");
        return;
    }
    let ld = FaultyDevice::start(DEV_BYTES);
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &ld.path_s(), "asynchronous", &f.rd_s(), &f.disk_nosync()));
    d.cli_ok(&["message", "r0", "0", "statistics", "on"]);
    wait_in_sync(&d, "r0");
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    ld.fail();
    let mut writer = spawn_writer(&d, "r0-0", region_writes(0..12, 0x31));
    let det = wait_for(&d, "r0", SETTLE, "with the log full", |det| {
        det["statistics"]["log_full_waits"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(slink_of(&det, 1)["sync"]["ordered"], true, "the replica was expelled: {det:#}");
    assert!(!left_ordered(&d), "no slink left ordered mode");
    ld.heal();
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    assert!(wait_until(SETTLE, || writer.0.try_wait().unwrap().is_some()), "the writer finishes once the LD heals");
    let det = wait_in_sync(&d, "r0");
    assert_eq!(u(&slink_of(&det, 1)["sync"], "bytes_copied"), 0, "no resync: {det:#}");
    assert_same(&ld.image, &f.rd, "after the LD healed");
}

// ---------------------------------------------------------------------------------
// 5. kill -9 in the middle of a resync: it resumes with what is left.

#[test]
fn kill9_during_resync_resumes_with_the_remaining_regions() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &f.rd_s(), &f.disk_nosync()));
    // 2 MiB/s: one 1 MiB region every half second.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resync-rate", &(2 * MIB).to_string()]);
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    qemu_write(&d, "r0-0", &region_writes(0..32, 0x05));
    let sy = slink(&d, "r0", 1)["sync"].clone();
    assert_eq!(sy["ordered"], false, "{sy:#}");
    let start_dirty = u(&sy, "dirty_regions");
    assert_eq!(start_dirty, 32, "regions 0..32 were written: {sy:#}");

    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    let det = wait_for(&d, "r0", SETTLE, "resyncing with a few regions done", |det| {
        let sy = &slink_of(det, 1)["sync"];
        sy["state"] == "resyncing" && sy["regions_done"].as_u64().unwrap_or(0) >= 3
    });
    let sy = slink_of(&det, 1)["sync"].clone();
    let (done, dirty) = (u(&sy, "regions_done"), u(&sy, "dirty_regions"));
    assert!(dirty > 0, "the rate limit should keep the resync running: {sy:#}");
    assert_eq!(sy["rate_limit"], 2 * MIB, "{sy:#}");
    d.kill9();

    d.restart();
    let sy = slink(&d, "r0", 1)["sync"].clone();
    assert!(u(&sy, "dirty_regions") <= dirty, "after kill -9 mid-resync more regions are dirty than before: {sy:#}");
    assert!(log_since_restart(&d).contains("slink is not in ordered mode"), "slink 1 comes back out of sync");

    // What the resumed resync copies is what was left (nothing is written meanwhile).
    let det = wait_in_sync(&d, "r0");
    let sy = slink_of(&det, 1)["sync"].clone();
    let copied = u(&sy, "bytes_copied");
    assert_eq!(copied % REGION, 0, "{sy:#}");
    let remaining = copied / REGION;
    assert!(
        remaining < start_dirty,
        "after kill -9 mid-resync the resync copied {remaining} regions again: not fewer than the {start_dirty} \
         dirty before it started ({done} were done): {sy:#}"
    );
    assert!(
        remaining <= dirty,
        "{done} regions were done and {dirty} dirty before kill -9, but {remaining} were copied after: {sy:#}"
    );
    assert_same(&f.ld, &f.rd, "after kill -9 during the resync");
}

// ---------------------------------------------------------------------------------
// 6. Application writes racing the resync.

#[test]
fn writes_racing_a_resync_are_verified_and_replicated() {
    require!("qemu-io", "fio");
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &f.rd_s(), &core_nosync()));
    // 8 MiB/s: the 48 regions take six seconds or more, fio well under one.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resync-rate", &(8 * MIB).to_string()]);
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    qemu_write(&d, "r0-0", &region_writes(0..48, 0x09));
    let sy = slink(&d, "r0", 1)["sync"].clone();
    assert_eq!(u(&sy, "dirty_regions"), 48, "{sy:#}");

    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    wait_for(&d, "r0", SETTLE, "resyncing", |det| slink_of(det, 1)["sync"]["state"] == "resyncing");

    // Random writes all over the regions under resync, read back and checked.
    let out = run_ok(Command::new("fio").current_dir(d.dir()).args([
        "--name=race",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("r0-0")),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--size=48M",
        "--io_size=32M",
        "--iodepth=8",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json_start = out.find('{').unwrap_or_else(|| panic!("no JSON from fio:\n{out}"));
    let v: Value = serde_json::from_str(&out[json_start..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert!(u(&job["write"], "io_bytes") >= 32 * MIB, "fio wrote all it should: {}", job["write"]);
    assert!(u(&job["read"], "io_bytes") > 0, "fio verified what it wrote: {}", job["read"]);

    // The race really happened: the resync was still going when fio ended.
    let s1 = slink(&d, "r0", 1);
    assert_eq!(s1["sync"]["ordered"], false, "the resync ended before fio did: no race tested: {s1:#}");

    d.cli_ok(&["message", "r0", "0", "slink", "1", "resync-rate", "0"]);
    let det = wait_in_sync(&d, "r0");
    let sy = slink_of(&det, 1)["sync"].clone();
    assert!(u(&sy, "bytes_copied") >= 48 * REGION, "{sy:#}");
    assert_same(&f.ld, &f.rd, "after writes raced the resync");
}

// ---------------------------------------------------------------------------------
// 7. Initial synchronisation: `sync` copies everything, `nosync` nothing.

#[test]
fn sync_dirty_log_copies_everything_and_nosync_nothing() {
    let d = Daemon::start();
    // `sync`: an LD with content, an empty RD.
    let a = Files::new(&d, "a");
    std::fs::write(&a.ld, random_bytes(DEV_BYTES as usize)).unwrap();
    let dlog = format!("core 2 {} sync", REGION / 512);
    d.create("ra", &table(&a.log, &a.ld_s(), "asynchronous", &a.rd_s(), &dlog));
    let det = wait_in_sync(&d, "ra");
    let sy = slink_of(&det, 1)["sync"].clone();
    assert_eq!(u(&sy, "bytes_copied"), DEV_BYTES, "initial sync copies the whole device: {sy:#}");
    assert_eq!(u(&sy, "regions_done"), REGIONS, "{sy:#}");
    assert_eq!(u(&sy, "dirty_regions"), 0, "{sy:#}");
    assert!(d.log_text().contains("initial synchronisation"), "the daemon log names the initial synchronisation");
    let dev = dev_slink(&d, "ra-0", 1);
    assert_eq!(dev["write_order_consistent"], true, "{dev}");
    assert_eq!(dev["regions_in_sync"], REGIONS, "{dev}");
    assert_same(&a.ld, &a.rd, "after the initial sync");

    // `nosync`: trusted as equal, nothing copied, in sync from the start.
    let b = Files::new(&d, "b");
    let mut content = random_bytes(DEV_BYTES as usize);
    std::fs::write(&b.ld, &content).unwrap();
    d.create("rb", &table(&b.log, &b.ld_s(), "asynchronous", &b.rd_s(), &core_nosync()));
    let s1 = slink(&d, "rb", 1);
    assert_eq!(s1["sync"]["ordered"], true, "{s1:#}");
    assert_eq!(s1["sync"]["state"], "ordered", "{s1:#}");
    assert_eq!(u(&s1["sync"], "dirty_regions"), 0, "{s1:#}");
    let dev = dev_slink(&d, "rb-0", 1);
    assert_eq!(dev["write_order_consistent"], true, "{dev}");
    assert_eq!(dev["regions_in_sync"], REGIONS, "{dev}");
    // A write replicates as usual; nothing else reaches the RD.
    qemu_write(&d, "rb-0", &[(0x42, 10 * MIB, 64 * KIB)]);
    let det = wait_in_sync(&d, "rb");
    let sy = slink_of(&det, 1)["sync"].clone();
    assert_eq!(u(&sy, "bytes_copied"), 0, "nosync copies nothing: {sy:#}");
    let mut expect_rd = vec![0u8; DEV_BYTES as usize];
    expect_rd[(10 * MIB) as usize..(10 * MIB + 64 * KIB) as usize].fill(0x42);
    content[(10 * MIB) as usize..(10 * MIB + 64 * KIB) as usize].fill(0x42);
    assert!(contents(&b.ld) == content, "LD of rb holds its content plus the write");
    assert!(contents(&b.rd) == expect_rd, "with nosync the RD gets the new write only, no copy");
}

// ---------------------------------------------------------------------------------
// 8. A write bigger than a small log is sliced, not refused forever.

/// The log only has to hold one maximal entry (1 MiB); a write of 8 MiB into an 8 MiB
/// log must go through in slices, and must not break the group for later writes.
#[test]
fn a_write_larger_than_a_small_log_goes_through() {
    require!("qemu-io");
    let d = Daemon::start();
    let f = Files::new(&d, "");
    d.create("r0", &table(&f.log, &f.ld_s(), "asynchronous", &f.rd_s(), &core_nosync()));
    let o = qemu_io(&d.uri("r0-0"), &["write -P 0x5a 0 8M"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    let later = qemu_io(&d.uri("r0-0"), &["write -P 0x6b 32M 4k"]);
    let later_text = String::from_utf8_lossy(&later.stdout).into_owned() + &String::from_utf8_lossy(&later.stderr);
    let det = detail(&d, "r0");
    assert!(
        o.status.success() && !text.contains("failed"),
        "an 8 MiB write into a group with an 8 MiB log failed: {text}\nlog_error: {}",
        det["log_error"]
    );
    assert!(
        later.status.success() && !later_text.contains("failed"),
        "a 4 KiB write after it failed: {later_text}\nlog_error: {}",
        det["log_error"]
    );
    wait_in_sync(&d, "r0");
    assert_eq!(read_at(&f.ld, 8 * MIB - 4, 4), vec![0x5a; 4]);
    assert_same(&f.ld, &f.rd, "after a write larger than the log");
}

// ---------------------------------------------------------------------------------
// 9. Shutdown while a write waits for a synchronous SLINK that is down.

/// A write waiting for a paused synchronous SLINK (never acknowledged) must not keep
/// the daemon from exiting on SIGTERM: after a grace period the device gives it back
/// with an error, and the daemon exits cleanly.
#[test]
fn sigterm_while_a_write_waits_for_a_down_synchronous_slink_exits() {
    require!("nbdsh");
    let mut d = Daemon::start();
    group_with_paused_sync_slink(&d);
    let _client = HoldingClient::start(&d.uri("r0-0"), "c = h.aio_pwrite(b'\\x22' * 4096, 0)", "");
    let waiting = wait_until(Duration::from_secs(10), || {
        d.json(&["status", "r0"])[0]["segments"][0]["detail"]["awaiting_writes"] == 1
    });
    assert!(waiting, "the write waits for the synchronous SLINK");
    d.terminate();
    assert!(d.log_text().contains("its held writes fail"), "{}", d.log_text());
}
