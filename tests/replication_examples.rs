//! The replicator as a user meets it: the paper's three mapping-table examples (one LD
//! and one RD; the same replicated to two sites; two devices as one group), the
//! two-target form, the tables it must refuse, a synchronous SLINK, and a restart.
//! Data goes in with qemu-io over NBD and is compared in the backing files.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
/// Length of every device (sectors): 32 MiB.
const SECTORS: u64 = 65536;
/// Log file: 32 MiB of ring plus room for its superblocks.
const LOG_BYTES: u64 = 33 * MIB;

/// The log line of every table here.
fn log_line(dir: &Path) -> String {
    format!("default 4 {} 0 auto 65536", dir.join("replog").display())
}

fn ld(dir: &Path, dev: u32, file: &str) -> String {
    format!("local 2 0 asynchronous \\\n  2 {dev} {} \\\n  - 0", dir.join(file).display())
}

fn rd(dir: &Path, slink: u32, dev: u32, file: &str) -> String {
    format!("local 3 {slink} asynchronous ios=100 \\\n  2 {dev} {} \\\n  core 2 2048 nosync", dir.join(file).display())
}

/// A paper-form table: `0 SECTORS replicator` + log + the given triples.
fn table(dir: &Path, parts: &[String]) -> String {
    let mut t = format!("0 {SECTORS} replicator \\\n  {}", log_line(dir));
    for p in parts {
        t.push_str(" \\\n  ");
        t.push_str(p);
    }
    t.push('\n');
    t
}

/// Example 1: one LD, one RD.
fn example1(dir: &Path) -> String {
    table(dir, &[ld(dir, 0, "lvol0"), rd(dir, 1, 0, "sdz")])
}

/// Example 2: the same, replicated to two sites.
fn example2(dir: &Path) -> String {
    table(dir, &[ld(dir, 0, "lvol0"), rd(dir, 1, 0, "sdz"), rd(dir, 2, 0, "sdw")])
}

/// Example 3: two devices as one write-ordered group to one secondary site.
fn example3(dir: &Path) -> String {
    table(dir, &[ld(dir, 0, "lvol0"), ld(dir, 1, "lvol1"), rd(dir, 1, 0, "sdc"), rd(dir, 1, 1, "sdd")])
}

/// Every backing file the examples use, sized, and the log.
fn make_files(d: &Daemon) {
    for f in ["lvol0", "lvol1", "sdz", "sdw", "sdc", "sdd"] {
        d.make_file(f, SECTORS * 512);
    }
    d.make_file("replog", LOG_BYTES);
}

/// Write `text` to a table file in the test directory; returns its path.
fn table_file(d: &Daemon, name: &str, text: &str) -> String {
    let p = d.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// The SLINKs of group `name` as (slink, outstanding_ios).
fn outstanding(d: &Daemon, name: &str) -> Vec<(u64, u64)> {
    let v = d.json(&["status", name]);
    v[0]["segments"][0]["detail"]["slinks"]
        .as_array()
        .unwrap_or_else(|| panic!("status {name} --json has no slinks: {v}"))
        .iter()
        .map(|s| (s["slink"].as_u64().unwrap(), s["outstanding_ios"].as_u64().unwrap()))
        .collect()
}

/// Wait (with a deadline) until every SLINK of `name` has everything.
fn wait_caught_up(d: &Daemon, name: &str, nslinks: usize) {
    let deadline = Duration::from_secs(60);
    let ok = wait_until(deadline, || outstanding(d, name).iter().all(|&(_, o)| o == 0));
    let now = outstanding(d, name);
    assert!(ok, "{name}: SLINKs not caught up after {deadline:?}: {now:?}");
    assert_eq!(now.len(), nslinks, "{name}: SLINKs {now:?}");
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} and {} differ in size", a.display(), b.display());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ first at byte {i}: {:#04x} vs {:#04x}", a.display(), b.display(), x[i], y[i]);
    }
}

/// The two writes of the brief on device `dev` (pattern bytes differ per device).
fn write_patterns(d: &Daemon, dev: &str, p: u8, q: u8) {
    qemu_io_ok(&d.uri(dev), &[&format!("write -P {p:#x} 0 1M"), &format!("write -P {q:#x} 3M 512k")]);
}

fn read_patterns(d: &Daemon, dev: &str, p: u8, q: u8) {
    qemu_io_ok(
        &d.uri(dev),
        &[
            &format!("read -P {p:#x} 0 1M"),
            "read -P 0 1M 2M",
            &format!("read -P {q:#x} 3M 512k"),
            "read -P 0 3584k 512k",
        ],
    );
}

fn file_has_patterns(f: &Path, p: u8, q: u8) {
    assert!(read_at(f, 0, MIB as usize).iter().all(|&b| b == p), "{}: 0..1M is not {p:#x}", f.display());
    assert!(read_at(f, 3 * MIB, 512 << 10).iter().all(|&b| b == q), "{}: 3M..+512k is not {q:#x}", f.display());
}

fn names(d: &Daemon) -> Vec<String> {
    let mut n = d.names();
    n.sort();
    n
}

/// Create `r0` from the table `build` makes for the test directory, write through
/// every device, check replication, the status lines, the table round trip and
/// removal. `devs[i]` = (LD file, RD files) of device r0-i.
fn run_example(build: fn(&Path) -> String, devs: &[(&str, &[&str])]) {
    require!("qemu-io");
    let d = Daemon::start();
    make_files(&d);
    let tf = table_file(&d, "r0.table", &build(d.dir()));
    d.cli_ok(&["create", "r0", &tf]);
    let mut want: Vec<String> = vec!["r0".into()];
    want.extend((0..devs.len()).map(|i| format!("r0-{i}")));
    assert_eq!(names(&d), want);
    let nslinks = 1 + devs[0].1.len();

    let pats = [(0x5au8, 0x33u8), (0xa7, 0x4c)];
    for (i, (p, q)) in pats.iter().take(devs.len()).enumerate() {
        write_patterns(&d, &format!("r0-{i}"), *p, *q);
    }
    for (i, (p, q)) in pats.iter().take(devs.len()).enumerate() {
        read_patterns(&d, &format!("r0-{i}"), *p, *q);
    }
    wait_caught_up(&d, "r0", nslinks);
    for (i, (l, rs)) in devs.iter().enumerate() {
        let l = d.path(l);
        file_has_patterns(&l, pats[i].0, pats[i].1);
        for r in rs.iter() {
            same_bytes(&l, &d.path(r));
        }
    }

    // Status lines: the control device shows each SLINK, a device each of its copies.
    let st = d.cli_ok(&["status", "r0"]);
    let line = st.trim();
    assert!(line.starts_with(&format!("0 {SECTORS} replicator {nslinks} ")), "status r0: {st}");
    for s in 0..nslinks {
        assert!(line.contains(&format!(" {s}:A,0,0,")), "status r0: SLINK {s} caught up: {st}");
    }
    assert_eq!(line.matches(",up").count(), nslinks, "status r0: {st}");
    assert!(line.contains(" log ") && line.contains(" head ") && line.contains(" next "), "status r0: {st}");
    let regions = SECTORS / 2048;
    for i in 0..devs.len() {
        let st = d.cli_ok(&["status", &format!("r0-{i}")]);
        let mut expect = format!("0 {SECTORS} replicator-dev 0:A,-");
        for s in 1..nslinks {
            expect.push_str(&format!(" {s}:A,{regions}/{regions}"));
        }
        assert_eq!(st.trim(), expect, "status r0-{i}");
    }

    // `table` gives back what `create` takes; removing r0 removes its devices.
    let t = d.cli_ok(&["table", "r0"]);
    assert!(t.starts_with(&format!("0 {SECTORS} replicator default 4 ")), "table r0: {t}");
    d.cli_ok(&["remove", "r0"]);
    assert!(names(&d).is_empty(), "remove r0 left {:?}", names(&d));
    let tf2 = table_file(&d, "r0.table2", &t);
    d.cli_ok(&["create", "r0", &tf2]);
    assert_eq!(names(&d), want);
    assert_eq!(d.cli_ok(&["table", "r0"]), t, "table round trip");
    for (i, (p, q)) in pats.iter().take(devs.len()).enumerate() {
        read_patterns(&d, &format!("r0-{i}"), *p, *q);
    }
    // And it still replicates.
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x77 8M 64k"]);
    wait_caught_up(&d, "r0", nslinks);
    for (l, rs) in devs {
        for r in rs.iter() {
            same_bytes(&d.path(l), &d.path(r));
        }
    }
    assert!(read_at(&d.path(devs[0].0), 8 * MIB, 65536).iter().all(|&b| b == 0x77));
    d.cli_ok(&["remove", "r0"]);
    assert!(names(&d).is_empty(), "remove r0 left {:?}", names(&d));
    assert!(d.cli(&["status", "r0-0"]).status.code() != Some(0), "r0-0 is gone");
}

#[test]
fn paper_example_1_one_ld_one_rd() {
    run_example(example1, &[("lvol0", &["sdz"])]);
}

#[test]
fn paper_example_2_replicated_to_two_sites() {
    run_example(example2, &[("lvol0", &["sdz", "sdw"])]);
}

#[test]
fn paper_example_3_two_devices_as_one_group() {
    run_example(example3, &[("lvol0", &["sdc"]), ("lvol1", &["sdd"])]);
}

/// The examples as printed in the paper: typographic quotes around the table, en dash
/// for "no dirty log", trailing blanks after the backslashes, and (third example) a
/// missing backslash at a line end. Only the paths and sizes are ours (a 1 GiB log is
/// too much for a test).
#[test]
fn paper_examples_verbatim_text_parses() {
    let d = Daemon::start();
    make_files(&d);
    let p = |f: &str| d.path(f).display().to_string();
    let head = format!("\u{201c}0 {SECTORS} replicator \\  \ndefault 4 {} 0 auto 65536 \\  \n", p("replog"));
    let ld0 = format!("local 2 0 asynchronous \\  \n2 0 {} \\  \n\u{2013} 0 \\  \n", p("lvol0"));
    let ld1 = format!("local 2 0 asynchronous \\  \n2 1 {} \\  \n\u{2013} 0 \\  \n", p("lvol1"));
    let rd = |s: u32, dev: u32, f: &str, end: &str| {
        format!("local 3 {s} asynchronous ios=100 \\  \n2 {dev} {} \\  \ncore 2 2048 nosync{end}", p(f))
    };
    let ex1 = format!("{head}{ld0}{}", rd(1, 0, "sdz", " \u{201d}  \n"));
    let ex2 = format!("{head}{ld0}{}{}", rd(1, 0, "sdz", " \\  \n"), rd(2, 0, "sdw", "\u{201d}\n"));
    let ex3 = format!("{head}{ld0}{ld1}{}{}", rd(1, 0, "sdc", "  \n"), rd(1, 1, "sdd", " \u{201d}\n"));
    for (text, clean, n) in [(ex1, example1(d.dir()), 1), (ex2, example2(d.dir()), 1), (ex3, example3(d.dir()), 2)] {
        let tf = table_file(&d, "paper.table", &text);
        d.cli_ok(&["create", "r0", &tf]);
        let got = d.cli_ok(&["table", "r0"]);
        d.cli_ok(&["remove", "r0"]);
        let tf = table_file(&d, "clean.table", &clean);
        d.cli_ok(&["create", "r0", &tf]);
        assert_eq!(got, d.cli_ok(&["table", "r0"]), "the paper's text and the plain table differ:\n{text}");
        assert_eq!(names(&d).len(), 1 + n);
        d.cli_ok(&["remove", "r0"]);
    }
}

/// The original implementation's two-target form: a control device with the log and
/// SLINKs, and a `replicator-dev` per device.
#[test]
fn two_target_form_replicates_and_protects_its_control_device() {
    require!("qemu-io");
    let d = Daemon::start();
    let log = d.make_file_s("replog", LOG_BYTES);
    let lv = d.make_file_s("lvol0", SECTORS * 512);
    let rd0 = d.make_file_s("rd0", SECTORS * 512);
    d.create(
        "grp",
        &format!("0 8 replicator default 4 {log} 0 auto 65536 local 2 0 asynchronous local 3 1 asynchronous ios=100"),
    );
    d.create("db0", &format!("0 {SECTORS} replicator-dev grp 0 0 1 {lv} - 0 1 1 {rd0} core 2 2048 nosync"));
    assert_eq!(names(&d), ["db0", "grp"]);
    write_patterns(&d, "db0", 0x5a, 0x33);
    read_patterns(&d, "db0", 0x5a, 0x33);
    wait_caught_up(&d, "grp", 2);
    file_has_patterns(Path::new(&lv), 0x5a, 0x33);
    same_bytes(Path::new(&lv), Path::new(&rd0));
    let st = d.cli_ok(&["status", "db0"]);
    assert_eq!(st.trim(), format!("0 {SECTORS} replicator-dev 0:A,- 1:A,32/32"), "status db0");
    let st = d.cli_ok(&["status", "grp"]);
    assert!(st.starts_with("0 8 replicator 2 0:A,0,0,") && st.contains(" 1:A,0,0,"), "status grp: {st}");

    // The control device cannot go while a device uses it.
    let e = d.cli_err(&["remove", "grp"]);
    assert!(e.contains("db0"), "remove grp: {e}");
    assert_eq!(names(&d), ["db0", "grp"]);
    qemu_io_ok(&d.uri("db0"), &["write -P 0x21 5M 4k"]);
    wait_caught_up(&d, "grp", 2);
    same_bytes(Path::new(&lv), Path::new(&rd0));
    // Table round trip of both.
    let (tg, td) = (d.cli_ok(&["table", "grp"]), d.cli_ok(&["table", "db0"]));
    d.cli_ok(&["remove", "db0"]);
    d.cli_ok(&["remove", "grp"]);
    assert!(names(&d).is_empty());
    d.create("grp", tg.trim());
    d.create("db0", td.trim());
    read_patterns(&d, "db0", 0x5a, 0x33);
    d.cli_ok(&["remove", "db0"]);
    d.cli_ok(&["remove", "grp"]);
}

/// A table on one line (the continuation backslashes joined).
fn one_line(t: &str) -> String {
    t.replace("\\\n", " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Tables the replicator must refuse, each with an error naming the problem, leaving
/// nothing behind.
#[test]
fn invalid_tables_are_refused_with_precise_errors() {
    let d = Daemon::start();
    make_files(&d);
    let dir = d.dir();
    let small_log = d.make_file_s("small.log", 512 << 10);
    let small_rd = d.make_file_s("small.rd", SECTORS * 512 / 2);
    // Big enough a file, but the table asks for a 1 MiB ring.
    let fresh_log = d.make_file_s("fresh.log", LOG_BYTES);
    let l = log_line(dir);
    let ld0 = ld(dir, 0, "lvol0");
    let rd1 = rd(dir, 1, 0, "sdz");
    let p = |f: &str| dir.join(f).display().to_string();
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("no SLINK 0", rd1.clone(), &["slink 0"]),
        (
            "SLINK 0 with a dirty log",
            format!("local 2 0 asynchronous 2 0 {} core 2 2048 nosync {rd1}", p("lvol0")),
            &["slink 0", "dirty log", "core"],
        ),
        (
            "an RD without a dirty log",
            format!("{ld0} local 3 1 asynchronous ios=100 2 0 {} - 0", p("sdz")),
            &["slink 1", "dirty log"],
        ),
        (
            "synchronous with a threshold",
            format!("{ld0} local 3 1 synchronous ios=10 2 0 {} core 2 2048 nosync", p("sdz")),
            &["synchronous", "ios=10"],
        ),
        ("a dev_nr with no LD", format!("{ld0} {rd1} {}", rd(dir, 1, 1, "sdd")), &["device 1", "slink 0"]),
        (
            "region sizes differ between the RDs of one device",
            format!("{ld0} {rd1} local 3 2 asynchronous ios=100 2 0 {} core 2 4096 nosync", p("sdw")),
            &["region size", "4096", "2048"],
        ),
        (
            "an RD smaller than the device",
            format!("{ld0} local 2 1 asynchronous 2 0 {small_rd} core 2 2048 nosync"),
            &["small.rd", "smaller"],
        ),
    ];
    for (what, rest, words) in &cases {
        let t = one_line(&format!("0 {SECTORS} replicator {l} {rest}"));
        let e = d.cli_err(&["create", "bad", "--table", &t]);
        for w in words.iter() {
            assert!(e.contains(w), "{what}: error should mention {w:?}: {e}");
        }
        assert!(names(&d).is_empty(), "{what}: left {:?} behind", names(&d));
    }
    // A log too small for one maximal entry (1 MiB of data), sized by the file or
    // by the table.
    for t in [
        format!("0 {SECTORS} replicator default 4 {small_log} 0 auto 1024 {ld0} {rd1}"),
        format!("0 {SECTORS} replicator default 3 {small_log} 0 auto {ld0} {rd1}"),
        format!("0 {SECTORS} replicator default 4 {fresh_log} 0 auto 2048 {ld0} {rd1}"),
    ] {
        let t = one_line(&t);
        let e = d.cli_err(&["create", "bad", "--table", &t]);
        assert!(e.contains("log") && (e.contains("small") || e.contains("minimum")), "small log: {e}");
        assert!(names(&d).is_empty());
    }
    // The daemon carries on: a good table still works.
    let tf = table_file(&d, "ok.table", &example1(dir));
    d.cli_ok(&["create", "r0", &tf]);
    d.cli_ok(&["remove", "r0"]);
}

/// A refused table builds nothing: in particular it does not format the replication
/// log (a later `auto` would silently open that log, with the refused table's size).
#[test]
fn refused_tables_leave_the_log_untouched() {
    let d = Daemon::start();
    make_files(&d);
    let dir = d.dir();
    let small_rd = d.make_file_s("small.rd", SECTORS * 512 / 2);
    let ld0 = ld(dir, 0, "lvol0");
    let rd1 = rd(dir, 1, 0, "sdz");
    let cases = [
        (
            "an RD smaller than the device",
            "65536",
            format!("{ld0} local 2 1 asynchronous 2 0 {small_rd} core 2 2048 nosync"),
        ),
        ("a dev_nr with no LD", "65536", format!("{ld0} {rd1} {}", rd(dir, 1, 1, "sdd"))),
        (
            "an RD without a dirty log",
            "65536",
            format!("{ld0} local 2 1 asynchronous 2 0 {} - 0", dir.join("sdz").display()),
        ),
        ("a ring too small for one maximal entry", "2048", format!("{ld0} {rd1}")),
    ];
    let mut wrote = Vec::new();
    for (i, (what, ring, rest)) in cases.iter().enumerate() {
        // A fresh log file per case.
        let log = d.make_file(&format!("replog{i}"), LOG_BYTES);
        let t = format!("0 {SECTORS} replicator default 4 {} 0 auto {ring} {rest}", log.display());
        d.cli_err(&["create", "bad", "--table", &one_line(&t)]);
        let nz = std::fs::read(&log).unwrap().iter().filter(|&&x| x != 0).count();
        if nz != 0 {
            wrote.push(format!("{what}: {nz} non-zero bytes"));
        }
    }
    assert!(wrote.is_empty(), "refused tables formatted the replication log: {wrote:?}");
}

/// A synchronous SLINK holds the data when the write is acknowledged: no waiting.
#[test]
fn synchronous_slink_has_the_data_when_the_write_returns() {
    require!("qemu-io");
    let d = Daemon::start();
    make_files(&d);
    let dir = d.dir();
    let sync_rd = format!(
        "local 2 1 synchronous \
  2 0 {} \
  core 2 2048 nosync",
        dir.join("sdz").display()
    );
    let tf = table_file(&d, "r0.table", &table(dir, &[ld(dir, 0, "lvol0"), sync_rd]));
    d.cli_ok(&["create", "r0", &tf]);
    let st = d.cli_ok(&["status", "r0"]);
    assert!(st.contains(" 1:S,"), "status r0 shows SLINK 1 synchronous: {st}");
    let rdf = d.path("sdz");
    for (i, p) in [0x11u8, 0x22, 0x33].iter().enumerate() {
        let off = i as u64 * 2 * MIB;
        qemu_io_ok(&d.uri("r0-0"), &[&format!("write -P {p:#x} {off} 1M")]);
        // No wait: the acknowledgement came after the RD had it.
        let got = read_at(&rdf, off, MIB as usize);
        assert!(got.iter().all(|b| b == p), "RD lacks write {i} ({p:#x} at {off}) right after it was acknowledged");
    }
    wait_caught_up(&d, "r0", 2);
    same_bytes(&d.path("lvol0"), &rdf);
}

/// SIGTERM and restart: the group and its devices come back, data reads back, and
/// entries still in the log when the daemon stopped are shipped after the restart.
#[test]
fn restart_brings_the_group_back_and_replication_continues() {
    require!("qemu-io");
    let mut d = Daemon::start();
    make_files(&d);
    let tf = table_file(&d, "r0.table", &example3(d.dir()));
    d.cli_ok(&["create", "r0", &tf]);
    let t = d.cli_ok(&["table", "r0"]);
    write_patterns(&d, "r0-0", 0x5a, 0x33);
    write_patterns(&d, "r0-1", 0xa7, 0x4c);
    wait_caught_up(&d, "r0", 2);
    // Entries queued for the RDs across the restart.
    d.cli_ok(&["message", "r0", "0", "stop"]);
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x66 6M 256k"]);
    qemu_io_ok(&d.uri("r0-1"), &["write -P 0x67 7M 256k"]);
    let out = outstanding(&d, "r0");
    assert!(out.iter().any(|&(s, o)| s == 1 && o > 0), "shipping stopped, SLINK 1 should lag: {out:?}");

    d.terminate();
    d.restart();
    assert_eq!(names(&d), ["r0", "r0-0", "r0-1"]);
    assert_eq!(d.cli_ok(&["table", "r0"]), t, "table after restart");
    read_patterns(&d, "r0-0", 0x5a, 0x33);
    read_patterns(&d, "r0-1", 0xa7, 0x4c);
    qemu_io_ok(&d.uri("r0-0"), &["read -P 0x66 6M 256k"]);
    qemu_io_ok(&d.uri("r0-1"), &["read -P 0x67 7M 256k"]);
    // Shipping on (whether or not `stop` outlived the restart), more writes, caught up.
    d.cli_ok(&["message", "r0", "0", "start"]);
    qemu_io_ok(&d.uri("r0-1"), &["write -P 0x68 9M 64k"]);
    wait_caught_up(&d, "r0", 2);
    same_bytes(&d.path("lvol0"), &d.path("sdc"));
    same_bytes(&d.path("lvol1"), &d.path("sdd"));
    assert!(read_at(&d.path("sdd"), 7 * MIB, 256 << 10).iter().all(|&b| b == 0x67));
    assert!(read_at(&d.path("sdc"), 6 * MIB, 256 << 10).iter().all(|&b| b == 0x66));
}

/// `auto` makes a missing log and a missing `disk` dirty log at the size they need
/// (sparse: nothing written beyond what they write themselves); a refused table leaves
/// no file it created behind.
#[test]
fn auto_creates_missing_log_and_dirty_log_files() {
    require!("qemu-io");
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start();
    let ld = d.make_file_s("ld", 32 * MIB);
    let rd = d.make_file_s("rd", 32 * MIB);
    let log = d.path("newlog");
    let dl = d.path("newdirty");
    // Refused (the RD is too small): nothing created stays.
    let small = d.make_file_s("small", MIB);
    let table = |rd: &str| {
        format!(
            "0 {SECTORS} replicator default 4 {} 0 auto 65536 local 2 0 async 2 0 {ld} - 0 \
             local 2 1 async 2 0 {rd} disk 3 {} 2048 sync",
            log.display(),
            dl.display()
        )
    };
    let e = d.cli_err(&["create", "r0", "--table", &table(&small)]);
    assert!(e.contains("smaller"), "{e}");
    assert!(!log.exists() && !dl.exists(), "a refused table left created files behind");
    // Accepted: both files made at the size they need. The log's ring is written out
    // once on purpose (appends into a sparse file would each cost a journal commit);
    // the dirty log stays sparse.
    d.create("r0", &table(&rd));
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 65536 * 512);
    let m = std::fs::metadata(&dl).unwrap();
    assert!(m.len() > 0);
    assert!(m.blocks() * 512 <= m.len(), "the dirty log file is no larger than needed");
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x5c 0 2M"]);
    let o = d.cli(&["wait", "r0", "--timeout", "60"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(std::fs::read(&ld).unwrap() == std::fs::read(&rd).unwrap());
}
