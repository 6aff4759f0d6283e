//! Restarting the daemon on the same state directory: after SIGTERM (clean exit 0) and
//! after kill -9, the devices come back with their data; a device that cannot come back
//! (a file missing) is listed as unavailable with the reason, and the others come up.

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
    let lost = d.info("lost");
    assert_eq!(lost["state"], "unavailable", "{lost}");
    let reason = lost["reason"].as_str().unwrap();
    assert!(reason.contains(&b.display().to_string()) && reason.contains("No such file"), "{reason}");
}

/// The user's report: a restart with one group's log missing dropped the group, its
/// device included, and `dmrep ls` did not show it. It is listed (text and JSON) as
/// unavailable with the reason, its devices too; the other devices come up; every
/// lifecycle request on it says why it cannot; once the file is back `resume` brings
/// it up (data intact), and `remove` forgets a device that will not come back.
#[test]
fn restart_with_a_group_missing_its_log_lists_it_unavailable() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let a = d.make_file_s("a.img", 4 * MIB);
    d.create("lin", &format!("0 2048 linear {a} 0"));
    let ld = d.make_file_s("ld", 16 * MIB);
    let rd = d.make_file_s("rd", 16 * MIB);
    let log = d.make_file("replog", 8 * MIB);
    let table = format!(
        "0 32768 replicator default 4 {} 0 auto 16384 local 2 0 asynchronous 2 0 {ld} - 0 \
         local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync",
        log.display()
    );
    d.create("r0", &table);
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x5c 0 64k"]);
    let recorded = d.cli_ok(&["table", "r0"]);
    d.terminate();
    let saved = d.path("replog.saved");
    std::fs::rename(&log, &saved).unwrap();
    d.restart();

    // Listed, with the reason, in JSON and in text.
    let ls = d.json(&["ls"]);
    let states: Vec<(String, String)> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v["state"].as_str().unwrap().to_string()))
        .collect();
    let want = [("lin", "active"), ("r0", "unavailable"), ("r0-0", "unavailable")];
    assert_eq!(states, want.map(|(n, s)| (n.to_string(), s.to_string())), "{ls}");
    let reason = ls[1]["reason"].as_str().unwrap().to_string();
    assert!(reason.contains(&log.display().to_string()) && reason.contains("No such file or directory"), "{reason}");
    assert_eq!(ls[2]["reason"], "created by the table of r0, which is unavailable");
    let text = d.cli_ok(&["ls"]);
    assert!(text.contains(&format!("r0\t(unavailable: {reason})")), "{text}");
    let info = d.cli_ok(&["info", "r0"]);
    assert!(info.contains("State:             UNAVAILABLE") && info.contains(&format!("Reason:            {reason}")));
    assert_eq!(d.json(&["status", "r0"])[0]["state"], "unavailable");
    assert!(d.cli_ok(&["status"]).contains(&format!("r0: (unavailable: {reason})")));
    assert_eq!(d.cli_ok(&["table", "r0"]), recorded, "the recorded table, as it will come back");

    // The other device serves; the unavailable ones refuse what needs them, saying why.
    qemu_io_ok(&d.uri("lin"), &["write -P 0x11 0 4k", "read -P 0x11 0 4k"]);
    let why = format!(
        "dmrep: device r0 is unavailable: {reason} (`dmrep resume r0` tries again, `dmrep remove r0` forgets it)"
    );
    assert_eq!(d.cli_err(&["message", "r0", "0", "stop"]), why);
    assert_eq!(d.cli_err(&["suspend", "r0"]), why);
    assert_eq!(d.cli_err(&["create", "r0", "--table", "0 8 zero"]), why);
    assert_eq!(
        d.cli_err(&["remove", "r0-0"]),
        "dmrep: device r0-0 was created by the table of r0 and comes back with it: remove r0"
    );
    // Still missing: resume says so, and nothing changes.
    let e = d.cli_err(&["resume", "r0"]);
    assert!(e.starts_with("dmrep: device r0 is unavailable: ") && e.contains("No such file"), "{e}");
    assert_eq!(d.info("r0-0")["state"], "unavailable");

    // The file is back: resume brings the group up with its data.
    std::fs::rename(&saved, &log).unwrap();
    d.cli_ok(&["resume", "r0"]);
    assert_eq!(d.info("r0")["state"], "active");
    assert_eq!(d.info("r0-0")["state"], "active");
    qemu_io_ok(&d.uri("r0-0"), &["read -P 0x5c 0 64k"]);

    // Gone for good: remove forgets it (and its device), also across restarts.
    d.terminate();
    std::fs::remove_file(&log).unwrap();
    d.restart();
    assert_eq!(d.info("r0")["state"], "unavailable");
    d.cli_ok(&["remove", "r0"]);
    assert_eq!(d.names(), ["lin"]);
    d.restart();
    assert_eq!(d.names(), ["lin"]);
    qemu_io_ok(&d.uri("lin"), &["read -P 0x11 0 4k"]);
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
