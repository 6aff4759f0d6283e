//! Restarting the daemon on the same state directory: after SIGTERM (clean exit 0) and
//! after kill -9, the devices come back with their data.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn sigterm_then_restart_brings_devices_and_data_back() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let a = d.make_file_s("a.img", 8 * MIB);
    let b = d.make_file_s("b.img", 8 * MIB);
    d.create("lin", &format!("0 8192 linear {a} 0"));
    d.create("str", &format!("0 8192 striped 2 16 {a} 8192 {b} 0"));
    d.create("gone", "0 64 zero");
    d.cli_ok(&["rename", "gone", "gone2"]);
    d.cli_ok(&["remove", "gone2"]);
    d.create("renamed", "0 64 zero");
    d.cli_ok(&["rename", "renamed", "renamed2"]);
    let uuids: Vec<_> = ["lin", "str"].iter().map(|n| d.info(n)["uuid"].clone()).collect();
    let tables: Vec<_> = ["lin", "str"].iter().map(|n| d.cli_ok(&["table", n])).collect();
    qemu_io_ok(&d.uri("lin"), &["write -P 0x1f 0 1M", "write -P 0x2f 3M 1M"]);
    qemu_io_ok(&d.uri("str"), &["write -P 0x3f 4k 3M"]);

    d.terminate();
    assert!(!d.control.exists() || d.cli(&["ls"]).status.code() != Some(0), "the daemon is gone");
    d.restart();

    let mut names = d.names();
    names.sort();
    assert_eq!(names, ["lin", "renamed2", "str"], "removed devices stay removed, renames stick");
    for (i, n) in ["lin", "str"].iter().enumerate() {
        assert_eq!(d.info(n)["uuid"], uuids[i], "{n} keeps its UUID");
        assert_eq!(d.cli_ok(&["table", n]), tables[i], "{n} keeps its table");
        assert_eq!(d.info(n)["state"], "active");
    }
    qemu_io_ok(&d.uri("lin"), &["read -P 0x1f 0 1M", "read -P 0x2f 3M 1M", "read -P 0 1M 2M"]);
    qemu_io_ok(&d.uri("str"), &["read -P 0x3f 4k 3M", "read -P 0 0 4k"]);

    // A table swapped in by load + resume is the one that comes back.
    d.cli_ok(&["load", "lin", "--table", &format!("0 4096 linear {a} 0")]);
    d.cli_ok(&["resume", "lin"]);
    // A loaded but not resumed table is not persisted as live.
    d.cli_ok(&["load", "str", "--table", "0 8 zero"]);
    d.terminate();
    d.restart();
    assert_eq!(d.info("lin")["size_sectors"], 4096);
    assert_eq!(d.cli_ok(&["table", "str"]), tables[1]);
    qemu_io_ok(&d.uri("lin"), &["read -P 0x1f 0 1M"]);
}

#[test]
fn kill9_then_restart_keeps_acknowledged_writes() {
    require!("nbdsh", "qemu-io");
    let mut d = Daemon::start();
    let a = d.make_file_s("a.img", 8 * MIB);
    let b = d.make_file_s("b.img", 8 * MIB);
    d.create("lin", &format!("0 8192 linear {a} 0"));
    d.create("str", &format!("0 16384 striped 2 128 {a} 8192 {b} 0"));
    // Writes acknowledged to a client that is still connected (no disconnect flush)
    // when the daemon is killed.
    let l = HoldingClient::start(&d.uri("lin"), "h.pwrite(b'\\x5a' * 1048576, 1048576)", "");
    let s = HoldingClient::start(&d.uri("str"), "h.pwrite(b'\\xa5' * 3000000, 65536)", "");
    d.kill9();
    drop(l);
    drop(s);
    d.restart();
    let mut names = d.names();
    names.sort();
    assert_eq!(names, ["lin", "str"]);
    qemu_io_ok(&d.uri("lin"), &["read -P 0x5a 1M 1M", "read -P 0 0 1M", "read -P 0 2M 2M"]);
    qemu_io_ok(&d.uri("str"), &["read -P 0xa5 65536 3000000", "read -P 0 0 65536"]);
    // The restarted daemon still works for writes, and its open counts start at 0.
    assert!(wait_until(Duration::from_secs(10), || d.open_count("lin") == 0));
    qemu_io_ok(&d.uri("lin"), &["write -P 0x6a 0 4k", "read -P 0x6a 0 4k"]);
}

#[test]
fn restart_with_a_missing_backing_file_keeps_the_others() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let a = d.make_file_s("a.img", 4 * MIB);
    let b = d.make_file("b.img", 4 * MIB);
    d.create("ok", &format!("0 2048 linear {a} 0"));
    d.create("lost", &format!("0 2048 linear {} 0", b.display()));
    qemu_io_ok(&d.uri("ok"), &["write -P 0x42 0 64k"]);
    d.terminate();
    std::fs::remove_file(&b).unwrap();
    d.restart();
    assert!(d.names().contains(&"ok".to_string()), "the device whose file is there comes back");
    qemu_io_ok(&d.uri("ok"), &["read -P 0x42 0 64k"]);
    assert!(d.log_text().contains("lost"), "the daemon logs the device it could not restore");
}

/// Issue 8: a restart with one RD file missing used to drop the whole group, the LD's
/// device included. Now the group comes up degraded: writes go on, the RD's SLINK is
/// down (an outage, absorbed by the log), and once the file is back it catches up.
#[test]
fn restart_with_a_missing_rd_comes_up_degraded() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let ld = d.make_file_s("ld", 16 << 20);
    let rd = d.make_file_s("rd", 16 << 20);
    let log = d.make_file_s("replog", 16 << 20);
    d.create(
        "r0",
        &format!(
            "0 32768 replicator default 4 {log} 0 auto 32768 local 2 0 async 2 0 {ld} - 0 \
             local 2 1 async 2 0 {rd} core 2 2048 nosync"
        ),
    );
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x11 0 1M"]);
    let o = d.cli(&["wait", "r0", "--timeout", "30"]);
    assert!(o.status.success(), "{}", show(&o));
    d.terminate();
    let away = d.path("rd.away");
    std::fs::rename(&rd, &away).unwrap();
    d.restart();
    assert!(d.names().contains(&"r0-0".to_string()), "the LD's device is back: {:?}", d.names());
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x22 1M 1M"]);
    let st = d.json(&["status", "r0"]);
    let s1 =
        st[0]["segments"][0]["detail"]["slinks"].as_array().unwrap().iter().find(|s| s["slink"] == 1).unwrap().clone();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let st = d.json(&["status", "r0"]);
            st[0]["segments"][0]["detail"]["slinks"][1]["accessible"] == false
        }),
        "slink 1 is down while its RD is missing: {s1}"
    );
    std::fs::rename(&away, &rd).unwrap();
    let o = d.cli(&["wait", "r0", "--timeout", "60"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(std::fs::read(&ld).unwrap() == std::fs::read(&rd).unwrap(), "RD caught up from the log");
}
