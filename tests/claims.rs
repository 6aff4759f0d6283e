//! One owner per byte (DESIGN 4.9): no two uses of overlapping bytes of one file, judged
//! by device and inode, not by path; one daemon per state directory, and a file one
//! daemon uses is locked against another. Each refusal names both users and the file,
//! and leaves nothing behind.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
/// Length of every replicated device (sectors): 32 MiB.
const SECTORS: u64 = 65536;
/// Log file: 32 MiB of ring plus room for its superblocks.
const LOG_BYTES: u64 = 33 * MIB;

fn p(d: &Daemon, f: &str) -> String {
    d.path(f).display().to_string()
}

/// The log part of a table: a 32 MiB ring at `start` of `file`.
fn log(d: &Daemon, file: &str, start: u64) -> String {
    format!("default 4 {} {start} auto 65536", p(d, file))
}

fn ld(d: &Daemon, dev: u32, file: &str) -> String {
    format!("local 2 0 asynchronous 2 {dev} {} - 0", p(d, file))
}

fn rd(d: &Daemon, slink: u32, dev: u32, file: &str) -> String {
    format!("local 3 {slink} asynchronous ios=100 2 {dev} {} core 2 2048 nosync", p(d, file))
}

/// A paper-form table: the log, then the triples.
fn table(log: String, parts: &[String]) -> String {
    format!("0 {SECTORS} replicator {log} {}", parts.join(" "))
}

/// Device files (32 MiB each) and a log file, sparse.
fn make_files(d: &Daemon, devs: &[&str], logs: &[&str]) {
    for f in devs {
        d.make_file(f, SECTORS * 512);
    }
    for f in logs {
        d.make_file(f, LOG_BYTES);
    }
}

/// `create` fails naming `words` (the file and both users); nothing is created.
fn refused(d: &Daemon, name: &str, table: &str, words: &[&str]) -> String {
    let before = d.names();
    let e = d.cli_err(&["create", name, "--table", table]);
    for w in words {
        assert!(e.contains(w), "error should mention {w:?}: {e}");
    }
    assert!(e.contains("one owner per byte"), "{e}");
    assert_eq!(d.names(), before, "a refused create leaves nothing behind: {e}");
    e
}

fn all_zero(f: &Path) -> bool {
    std::fs::read(f).unwrap().iter().all(|&b| b == 0)
}

#[test]
fn overlapping_uses_within_one_group_are_refused_naming_both_users() {
    let d = Daemon::start();
    make_files(&d, &["lvol0", "lvol1", "sdz", "sdw", "sdd"], &["replog"]);
    d.make_file("dlog", MIB);
    let lg = || log(&d, "replog", 0);
    let (lv0, lv1, sdz, replog) = (p(&d, "lvol0"), p(&d, "lvol1"), p(&d, "sdz"), p(&d, "replog"));
    let disk_rd = |file: &str, dlog: &str| {
        format!("local 3 1 asynchronous ios=100 2 0 {} disk 3 {} 2048 nosync", p(&d, file), p(&d, dlog))
    };
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "the log as an LD",
            table(lg(), &[ld(&d, 0, "replog"), rd(&d, 1, 0, "sdz")]),
            vec![
                replog.clone(),
                "device r0 (replication log)".into(),
                "device r0 (LD of group r0, slink 0 device 0)".into(),
            ],
        ),
        (
            "device 1's RD as device 0's LD",
            table(lg(), &[ld(&d, 0, "lvol0"), ld(&d, 1, "lvol1"), rd(&d, 1, 0, "sdz"), rd(&d, 1, 1, "lvol0")]),
            vec![
                lv0.clone(),
                "device r0 (LD of group r0, slink 0 device 0)".into(),
                "device r0 (RD of group r0, slink 1 device 1)".into(),
            ],
        ),
        (
            "LD = RD",
            table(lg(), &[ld(&d, 0, "lvol0"), rd(&d, 1, 0, "lvol0")]),
            vec![
                lv0.clone(),
                "device r0 (LD of group r0, slink 0 device 0)".into(),
                "device r0 (RD of group r0, slink 1 device 0)".into(),
            ],
        ),
        (
            "a disk dirty log as the RD",
            table(lg(), &[ld(&d, 0, "lvol0"), disk_rd("sdz", "sdz")]),
            vec![
                sdz.clone(),
                "device r0 (RD of group r0, slink 1 device 0)".into(),
                "device r0 (disk dirty log of group r0, slink 1 device 0)".into(),
            ],
        ),
        (
            "a disk dirty log as an LD",
            table(lg(), &[ld(&d, 0, "lvol0"), ld(&d, 1, "lvol1"), disk_rd("sdz", "lvol1"), rd(&d, 1, 1, "sdd")]),
            vec![
                lv1.clone(),
                "device r0 (LD of group r0, slink 0 device 1)".into(),
                "device r0 (disk dirty log of group r0, slink 1 device 0)".into(),
            ],
        ),
        (
            "a disk dirty log as the log",
            table(lg(), &[ld(&d, 0, "lvol0"), disk_rd("sdz", "replog")]),
            vec![
                replog.clone(),
                "device r0 (replication log)".into(),
                "device r0 (disk dirty log of group r0, slink 1 device 0)".into(),
            ],
        ),
        (
            "one RD on two SLINKs",
            table(lg(), &[ld(&d, 0, "lvol0"), rd(&d, 1, 0, "sdz"), rd(&d, 2, 0, "sdz")]),
            vec![
                sdz.clone(),
                "device r0 (RD of group r0, slink 1 device 0)".into(),
                "device r0 (RD of group r0, slink 2 device 0)".into(),
            ],
        ),
    ];
    for (what, t, words) in &cases {
        let words: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let e = refused(&d, "r0", t, &words);
        eprintln!("{what}: {e}");
    }
    // Nothing was written: not the log, not the dirty logs.
    for f in ["replog", "dlog", "sdz", "lvol1"] {
        assert!(all_zero(&d.path(f)), "a refused table wrote to {f}");
    }
    // The same files, each used once, are fine (the disk dirty log in a file of its own).
    d.create("r0", &table(lg(), &[ld(&d, 0, "lvol0"), disk_rd("sdz", "dlog")]));
    d.cli_ok(&["remove", "r0"]);
}

#[test]
fn one_log_for_two_groups_is_refused_through_a_hard_link_or_at_an_overlapping_start() {
    let d = Daemon::start();
    make_files(&d, &["lvol0", "sdz", "lvol1", "sdw"], &[]);
    // Room for two 32 MiB rings one after the other.
    d.make_file("replog", 2 * LOG_BYTES);
    std::fs::hard_link(d.path("replog"), d.path("replog.link")).unwrap();
    std::os::unix::fs::symlink(d.path("replog"), d.path("replog.sym")).unwrap();
    d.create("r0", &table(log(&d, "replog", 0), &[ld(&d, 0, "lvol0"), rd(&d, 1, 0, "sdz")]));
    let r1 = |log: String| table(log, &[ld(&d, 0, "lvol1"), rd(&d, 1, 0, "sdw")]);
    let (link, sym, replog) = (p(&d, "replog.link"), p(&d, "replog.sym"), p(&d, "replog"));
    let via = format!("(through {replog})");
    let both = ["device r0 (replication log)", "device r1 (replication log)"];
    refused(&d, "r1", &r1(log(&d, "replog.link", 0)), &[&link, &via, both[0], both[1], "sectors 0..65536"]);
    refused(&d, "r1", &r1(log(&d, "replog.sym", 0)), &[&sym, both[0], both[1]]);
    refused(&d, "r1", &r1(log(&d, "replog", 2048)), &[&replog, both[0], both[1], "sectors 2048..67584"]);
    // Where r0's ring ends, another one may start: no byte is shared.
    d.create("r1", &r1(log(&d, "replog.link", LOG_BYTES / 512)));
    d.cli_ok(&["remove", "r1"]);
    // An existing log keeps its size on disk, whatever the table says: all of it is claimed.
    d.cli_ok(&["remove", "r0"]);
    let small = format!("default 4 {replog} 0 auto 4096");
    d.create("r0", &table(small, &[ld(&d, 0, "lvol0"), rd(&d, 1, 0, "sdz")]));
    refused(&d, "r1", &r1(log(&d, "replog", 8192)), &[&replog, both[0], both[1], "sectors 0..65536"]);
    d.cli_ok(&["remove", "r0"]);
}

#[test]
fn one_ld_in_three_groups_is_refused_and_removal_releases_it() {
    let d = Daemon::start();
    make_files(&d, &["lvol0", "rd0", "rd1", "rd2"], &["log0", "log1", "log2"]);
    let t = |i: u32| table(log(&d, &format!("log{i}"), 0), &[ld(&d, 0, "lvol0"), rd(&d, 1, 0, &format!("rd{i}"))]);
    d.create("r0", &t(0));
    let lv = p(&d, "lvol0");
    for (name, i) in [("r1", 1), ("r2", 2)] {
        let mine = format!("device {name} (LD of group {name}, slink 0 device 0)");
        refused(&d, name, &t(i), &[&lv, "device r0 (LD of group r0, slink 0 device 0)", &mine]);
    }
    // Removing r0 (and its companion r0-0) lets the LD go: now r1 may have it, r2 not.
    d.cli_ok(&["remove", "r0"]);
    d.create("r1", &t(1));
    refused(&d, "r2", &t(2), &[&lv, "device r1 (LD of group r1, slink 0 device 0)"]);
    d.cli_ok(&["remove", "r1"]);
}

#[test]
fn two_target_form_devices_are_claimed_by_their_replicator_dev() {
    let d = Daemon::start();
    make_files(&d, &["lvol0", "rd0", "rd1"], &["replog"]);
    d.create(
        "grp",
        &format!(
            "0 8 replicator default 4 {} 0 auto 65536 local 2 0 asynchronous local 3 1 asynchronous ios=100",
            p(&d, "replog")
        ),
    );
    let dev = |nr: u32, l: &str, r: &str| {
        format!("0 {SECTORS} replicator-dev grp {nr} 0 1 {} - 0 1 1 {} core 2 2048 nosync", p(&d, l), p(&d, r))
    };
    d.create("db0", &dev(0, "lvol0", "rd0"));
    refused(
        &d,
        "db1",
        &dev(1, "lvol0", "rd1"),
        &[
            &p(&d, "lvol0"),
            "device db0 (LD of group grp, slink 0 device 0)",
            "device db1 (LD of group grp, slink 0 device 1)",
        ],
    );
    refused(
        &d,
        "db1",
        &dev(1, "rd1", "replog"),
        &[&p(&d, "replog"), "device grp (replication log)", "device db1 (RD of group grp, slink 1 device 1)"],
    );
    // The group carries on with its device; removing db0 releases its LD.
    assert_eq!(d.names(), ["db0", "grp"]);
    d.cli_ok(&["remove", "db0"]);
    d.create("db1", &dev(1, "lvol0", "rd1"));
    d.cli_ok(&["remove", "db1"]);
    d.cli_ok(&["remove", "grp"]);
}

#[test]
fn linear_and_striped_segments_over_the_same_bytes_are_refused() {
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 8 * MIB); // 16384 sectors
    let b = d.make_file_s("b.img", 8 * MIB);
    d.create("lin0", &format!("0 8192 linear {a} 0"));
    let lin0 = "device lin0 (linear segment at sector 0)";
    refused(&d, "lin1", &format!("0 8192 linear {a} 4096"), &[&a, lin0, "device lin1 (linear segment at sector 0)"]);
    refused(
        &d,
        "str",
        &format!("0 4096 striped 2 8 {b} 0 {a} 8000"),
        &[&a, lin0, "device str (striped segment at sector 0, stripe 1)", "sectors 8000..10048"],
    );
    // Two segments of one table over the same bytes.
    refused(
        &d,
        "two",
        &format!("0 1024 linear {b} 0\n1024 1024 linear {b} 512"),
        &[&b, "device two (linear segment at sector 0)", "device two (linear segment at sector 1024)"],
    );
    // Next to each other is fine.
    d.create("lin1", &format!("0 8192 linear {a} 8192"));
    // A reload claims what the live table holds: the same table again, or a shifted one
    // over its own bytes; not another device's bytes.
    d.cli_ok(&["load", "lin0", "--table", &format!("0 8192 linear {a} 0")]);
    d.cli_ok(&["resume", "lin0"]);
    d.cli_ok(&["load", "lin0", "--table", &format!("0 4096 linear {a} 2048")]);
    d.cli_ok(&["resume", "lin0"]);
    let e = d.cli_err(&["load", "lin0", "--table", &format!("0 8192 linear {a} 4096")]);
    assert!(e.contains("device lin1 (linear segment at sector 0)") && e.contains(lin0), "{e}");
    // Claims follow a rename; removal releases them.
    d.cli_ok(&["rename", "lin1", "lin9"]);
    refused(&d, "lin1", &format!("0 8 linear {a} 8192"), &["device lin9 (linear segment at sector 0)"]);
    d.cli_ok(&["remove", "lin9"]);
    d.create("lin1", &format!("0 8 linear {a} 8192"));
}

#[test]
fn a_replicator_reload_keeps_its_claims_and_new_slinks_are_checked() {
    let d = Daemon::start();
    make_files(&d, &["lvol0", "sdz", "sdw"], &["replog"]);
    let base = [ld(&d, 0, "lvol0"), rd(&d, 1, 0, "sdz")];
    let t = table(log(&d, "replog", 0), &base);
    d.create("r0", &t);
    // The same table again: no conflict with itself.
    d.cli_ok(&["load", "r0", "--table", &t]);
    d.cli_ok(&["resume", "r0"]);
    // A new SLINK whose RD is SLINK 1's: refused at load.
    let mut parts = base.to_vec();
    parts.push(rd(&d, 2, 0, "sdz"));
    let e = d.cli_err(&["load", "r0", "--table", &table(log(&d, "replog", 0), &parts)]);
    for w in [p(&d, "sdz").as_str(), "RD of group r0, slink 1 device 0", "RD of group r0, slink 2 device 0"] {
        assert!(e.contains(w), "{w:?}: {e}");
    }
    // A new SLINK on a file of its own: loaded twice (the second replaces the first), resumed.
    parts.pop();
    parts.push(rd(&d, 2, 0, "sdw"));
    let t2 = table(log(&d, "replog", 0), &parts);
    d.cli_ok(&["load", "r0", "--table", &t2]);
    d.cli_ok(&["load", "r0", "--table", &t2]);
    d.cli_ok(&["resume", "r0"]);
    assert!(d.cli_ok(&["status", "r0"]).starts_with("0 65536 replicator 3 "), "{}", d.cli_ok(&["status", "r0"]));
    // SLINK 2's RD is the group's now.
    refused(
        &d,
        "x",
        &format!("0 8 linear {} 0", p(&d, "sdw")),
        &["device r0 (RD of group r0, slink 2 device 0)", "device x (linear segment at sector 0)"],
    );
    d.cli_ok(&["remove", "r0"]);
    d.create("x", &format!("0 8 linear {} 0", p(&d, "sdw")));
}

/// The spawned command of a second daemon on `state`, with sockets of its own.
fn second_daemon(d: &Daemon, state: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--control")
        .arg(d.path("c2.sock"))
        .arg("daemon")
        .arg("--state-dir")
        .arg(state)
        .arg("--nbd-unix")
        .arg(d.path("n2.sock"));
    c
}

#[test]
fn a_second_daemon_on_the_same_state_directory_fails_at_once() {
    let d = Daemon::start();
    make_files(&d, &["lvol0", "sdz"], &["replog"]);
    d.create("r0", &table(log(&d, "replog", 0), &[ld(&d, 0, "lvol0"), rd(&d, 1, 0, "sdz")]));
    let o = run_timeout(&mut second_daemon(&d, &d.state), Duration::from_secs(20));
    let e = check_one_line_error("second daemon", &o);
    assert!(e.contains(&d.state.display().to_string()), "{e}");
    assert!(e.contains(&format!("pid {}", d.pid())), "{e}");
    assert!(e.contains("in use by another dmrep daemon"), "{e}");
    assert!(!d.path("c2.sock").exists(), "the second daemon must not have started serving");
    // The first one carries on.
    assert_eq!(d.names(), ["r0", "r0-0"]);
    assert!(d.cli_ok(&["status", "r0"]).starts_with("0 65536 replicator 2 "));
}

#[test]
fn a_second_daemon_with_another_state_directory_cannot_use_the_first_ones_files() {
    let mut d1 = Daemon::start();
    make_files(&d1, &["lvol0", "sdz", "lvol1", "sdw"], &["replog"]);
    let a = d1.make_file_s("a.img", 4 * MIB);
    d1.create("r0", &table(log(&d1, "replog", 0), &[ld(&d1, 0, "lvol0"), rd(&d1, 1, 0, "sdz")]));
    d1.create("lin", &format!("0 2048 linear {a} 0"));
    let d2 = Daemon::start();
    let locked = format!("locked by another process (pid {})", d1.pid());
    // d1's log, with devices d1 does not use.
    let t = table(log(&d1, "replog", 0), &[ld(&d1, 0, "lvol1"), rd(&d1, 1, 0, "sdw")]);
    let e = d2.cli_err(&["create", "r0", "--table", &t]);
    assert!(e.contains(&format!("{}: {locked}", p(&d1, "replog"))), "{e}");
    // Any file d1 uses, even at bytes d1 does not use.
    let e = d2.cli_err(&["create", "lin", "--table", &format!("0 2048 linear {a} 4096")]);
    assert!(e.contains(&format!("{a}: {locked}")), "{e}");
    assert!(d2.names().is_empty());
    // Once d1 is gone, the files are free.
    d1.terminate();
    d2.create("r0", &t);
    d2.create("lin", &format!("0 2048 linear {a} 4096"));
}
