//! Adding an SLINK to a live group by reloading the control device's table: the new
//! RD is filled by an initial sync while writes go on, the other SLINKs are untouched,
//! and a reload that would remove an SLINK or change the log is refused.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn slink_added_by_reload_gets_an_initial_sync_while_writes_go_on() {
    require!("qemu-io");
    let d = Daemon::start();
    let ld = d.make_file_s("ld", 32 << 20);
    let rd = d.make_file_s("rd", 32 << 20);
    let rd2 = d.make_file_s("rd2", 32 << 20);
    let log = d.make_file_s("replog", 8 << 20);
    let t1 = format!(
        "0 65536 replicator default 4 {log} 0 auto 16384 local 2 0 asynchronous 2 0 {ld} - 0 \
         local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync"
    );
    d.create("r0", &t1);
    // Names fixed by the group: the control device and the devices its table creates.
    assert!(d.cli_err(&["rename", "r0-0", "x"]).contains("created by the table of r0"));
    assert!(d.cli_err(&["rename", "r0", "y"]).contains("control device"));
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x61 0 4M", "write -P 0x62 20M 3M"]);
    let t2 = format!("{t1} local 3 2 asynchronous ios=200 2 0 {rd2} core 2 2048 sync");
    d.cli_ok(&["load", "r0", "--table", &t2]);
    // Loaded, not live: nothing changes before resume.
    let st = d.json(&["status", "r0"]);
    assert_eq!(st[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().len(), 2);
    d.cli_ok(&["resume", "r0"]);
    // Writes go on during the initial sync.
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x63 1M 1M", "write -P 0x64 30M 1M"]);
    let o = d.cli(&["wait", "r0", "--timeout", "60"]);
    assert!(o.status.success(), "{}", show(&o));
    let st = d.json(&["status", "r0"]);
    let slinks = st[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().clone();
    assert_eq!(slinks.len(), 3, "slink 2 is part of the group: {st}");
    let s2 = slinks.iter().find(|s| s["slink"] == 2).unwrap();
    assert_eq!(s2["sync"]["ordered"], true);
    // The whole device, plus the regions that writes touched while they were copied.
    let copied = s2["sync"]["bytes_copied"].as_u64().unwrap();
    assert!((32 << 20..=36 << 20).contains(&copied), "the initial sync copied the whole device once: {s2}");
    let s1 = slinks.iter().find(|s| s["slink"] == 1).unwrap();
    assert_eq!(s1["sync"]["bytes_copied"].as_u64(), Some(0), "slink 1 was never resynced: {s1}");
    let l = std::fs::read(&ld).unwrap();
    assert!(l == std::fs::read(&rd).unwrap(), "RD1 equals LD");
    assert!(l == std::fs::read(&rd2).unwrap(), "RD2 equals LD");
    // The live table now has three SLINKs and survives a restart as such.
    assert!(d.cli_ok(&["table", "r0"]).contains(&rd2));
    // The device's own table and status show the new SLINK too, without a restart.
    assert!(d.cli_ok(&["table", "r0-0"]).contains(&rd2), "{}", d.cli_ok(&["table", "r0-0"]));
    let dev = d.json(&["status", "r0-0"]);
    assert_eq!(dev[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().len(), 3, "{dev}");
    // Refused reloads leave the group as it is.
    let other_ld = d.make_file_s("other_ld", 32 << 20);
    let e = d.cli_err(&["load", "r0", "--table", &t2.replace(&ld, &other_ld)]);
    assert!(e.contains("must stay") && e.contains("keeps its LDs"), "{e}");
    let other_log = d.make_file_s("other", 8 << 20);
    let e = d.cli_err(&["load", "r0", "--table", &t2.replace(&log, &other_log)]);
    assert!(e.contains("replication log"), "{e}");
    assert!(wait_until(Duration::from_secs(5), || d.info("r0")["inactive_table"] == false));
}

/// R1 (reproduced by a review): in the two-target form, a reload of the control device
/// adding an SLINK while the group has devices used to register the SLINK with no device:
/// it grew a backlog forever and wedged the group once the log filled. Now the reload is
/// refused at `load` with an error naming the device that has no replica on the new
/// SLINK, and the group carries on.
#[test]
fn two_target_reload_adding_an_slink_without_devices_is_refused() {
    require!("qemu-io");
    let d = Daemon::start();
    let ld = d.make_file_s("ld", 8 << 20);
    let rd = d.make_file_s("rd", 8 << 20);
    let log = d.make_file_s("replog", 8 << 20);
    let ctl = format!("0 16384 replicator default 4 {log} 0 auto 16384 local 2 0 async local 2 1 async");
    d.create("grp", &ctl);
    d.create("db0", &format!("0 16384 replicator-dev grp 0 0 1 {ld} - 0 1 1 {rd} core 2 2048 nosync"));
    qemu_io_ok(&d.uri("db0"), &["write -P 0x11 0 1M"]);
    let e = d.cli_err(&["load", "grp", "--table", &format!("{ctl} local 2 2 async")]);
    assert!(e.contains("slink 2 cannot join group grp") && e.contains("device 0"), "{e}");
    // The group is unchanged and healthy: writes go on, both copies in order.
    qemu_io_ok(&d.uri("db0"), &["write -P 0x12 1M 1M"]);
    let o = d.cli(&["wait", "grp", "--timeout", "30"]);
    assert!(o.status.success(), "{}", show(&o));
    let st = d.json(&["status", "grp"]);
    let slinks = st[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().clone();
    assert_eq!(slinks.len(), 2, "{st}");
    assert!(std::fs::read(&ld).unwrap() == std::fs::read(&rd).unwrap());
}

/// R3: removing a replicator-dev while an SLINK is paused with a backlog of its entries
/// does not stop that SLINK (nor the group) for good: on resume it skips the removed
/// device's entries and catches up with the others'.
#[test]
fn removing_a_device_with_a_backlog_does_not_stop_its_slink() {
    require!("qemu-io");
    let d = Daemon::start();
    let (ld0, ld1) = (d.make_file_s("ld0", 8 << 20), d.make_file_s("ld1", 8 << 20));
    let (rd0, rd1) = (d.make_file_s("rd0", 8 << 20), d.make_file_s("rd1", 8 << 20));
    let log = d.make_file_s("replog", 8 << 20);
    d.create("grp", &format!("0 16384 replicator default 4 {log} 0 auto 16384 local 2 0 async local 2 1 async"));
    d.create("db0", &format!("0 16384 replicator-dev grp 0 0 1 {ld0} - 0 1 1 {rd0} core 2 2048 nosync"));
    d.create("db1", &format!("0 16384 replicator-dev grp 1 0 1 {ld1} - 0 1 1 {rd1} core 2 2048 nosync"));
    d.cli_ok(&["message", "grp", "0", "slink", "1", "pause"]);
    qemu_io_ok(&d.uri("db1"), &["write -P 0x21 0 1M"]);
    qemu_io_ok(&d.uri("db0"), &["write -P 0x22 0 1M"]);
    d.cli_ok(&["remove", "db1"]);
    d.cli_ok(&["message", "grp", "0", "slink", "1", "resume"]);
    let o = d.cli(&["wait", "grp", "--timeout", "30"]);
    assert!(o.status.success(), "slink 1 catches up after the removal: {}", show(&o));
    assert!(std::fs::read(&ld0).unwrap() == std::fs::read(&rd0).unwrap(), "RD0 equals LD0");
    assert_eq!(
        read_at(std::path::Path::new(&ld1), 0, 4096),
        vec![0x21; 4096],
        "the removed device's LD has its writes"
    );
}

/// R7: a `core ... sync` device added to a group that was recovered after a restart gets
/// its initial copy (it used to be trusted, and reported consistent, with no copy).
#[test]
fn sync_device_added_after_restart_gets_an_initial_copy() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let (ld0, ld1) = (d.make_file_s("ld0", 8 << 20), d.make_file_s("ld1", 8 << 20));
    let (rd0, rd1) = (d.make_file_s("rd0", 8 << 20), d.make_file_s("rd1", 8 << 20));
    let log = d.make_file_s("replog", 8 << 20);
    d.create("grp", &format!("0 16384 replicator default 4 {log} 0 auto 16384 local 2 0 async local 2 1 async"));
    d.create("db0", &format!("0 16384 replicator-dev grp 0 0 1 {ld0} - 0 1 1 {rd0} core 2 2048 nosync"));
    qemu_io_ok(&d.uri("db0"), &["write -P 0x31 0 1M"]);
    d.restart();
    // LD1 already holds data the RD lacks.
    fill_file(std::path::Path::new(&ld1), 0x5a, 8 << 20);
    d.create("db1", &format!("0 16384 replicator-dev grp 1 0 1 {ld1} - 0 1 1 {rd1} core 2 2048 sync"));
    let o = d.cli(&["wait", "grp", "--timeout", "30"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(std::fs::read(&ld1).unwrap() == std::fs::read(&rd1).unwrap(), "RD1 was copied from LD1");
    assert!(std::fs::read(&ld0).unwrap() == std::fs::read(&rd0).unwrap());
}

/// Issue 8: by reload, an SLINK leaves a live group (the others go on, nothing waits for
/// it), and a failed RD is replaced by a new one that gets an initial copy of its own.
#[test]
fn reload_removes_an_slink_and_replaces_an_rd() {
    require!("qemu-io");
    let d = Daemon::start();
    let ld = d.make_file_s("ld", 16 << 20);
    let rd1 = d.make_file_s("rd1", 16 << 20);
    let rd2 = d.make_file_s("rd2", 16 << 20);
    let log = d.make_file_s("replog", 16 << 20);
    let head = format!("0 32768 replicator default 4 {log} 0 auto 32768 local 2 0 async 2 0 {ld} - 0");
    let s1 = |rd: &str| format!(" local 2 1 async 2 0 {rd} core 2 2048 nosync");
    let s2 = format!(" local 2 2 sync 2 0 {rd2} core 2 2048 nosync");
    d.create("r0", &format!("{head}{}{s2}", s1(&rd1)));
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x41 0 1M"]);
    // SLINK 2 (synchronous) leaves: writes no longer wait for it.
    d.cli_ok(&["load", "r0", "--table", &format!("{head}{}", s1(&rd1))]);
    d.cli_ok(&["resume", "r0"]);
    let st = d.json(&["status", "r0"]);
    let slinks = st[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().clone();
    assert_eq!(slinks.len(), 2, "slink 2 left: {st}");
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x42 1M 1M"]);
    assert!(!d.cli_ok(&["table", "r0"]).contains(&rd2));
    assert!(!d.cli_ok(&["table", "r0-0"]).contains(&rd2), "the device's table follows");
    // SLINK 1's RD replaced by a new, empty file: copied in full, then in order again.
    let rd1b = d.make_file_s("rd1b", 16 << 20);
    d.cli_ok(&["load", "r0", "--table", &format!("{head}{}", s1(&rd1b))]);
    d.cli_ok(&["resume", "r0"]);
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x43 2M 1M"]);
    let o = d.cli(&["wait", "r0", "--timeout", "60"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(std::fs::read(&ld).unwrap() == std::fs::read(&rd1b).unwrap(), "the new RD equals the LD");
    let st = d.json(&["status", "r0"]);
    let s =
        st[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().iter().find(|s| s["slink"] == 1).unwrap().clone();
    assert!(s["sync"]["bytes_copied"].as_u64().unwrap() >= 16 << 20, "the new RD was copied in full: {s}");
    // The old RD is free for other uses again.
    d.create("other", &format!("0 32768 linear {rd1} 0"));
}
