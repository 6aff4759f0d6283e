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
    // Refused reloads leave the group as it is.
    let e = d.cli_err(&["load", "r0", "--table", &t1]);
    assert!(e.contains("removing slink 2"), "{e}");
    let other_log = d.make_file_s("other", 8 << 20);
    let e = d.cli_err(&["load", "r0", "--table", &t2.replace(&log, &other_log)]);
    assert!(e.contains("replication log"), "{e}");
    assert!(wait_until(Duration::from_secs(5), || d.info("r0")["inactive_table"] == false));
}
