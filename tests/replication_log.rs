//! The replication log through the real daemon: a corrupted tail (bytes overwritten in
//! the last entries) is found by `dmrep log check`, truncated to the last good prefix on
//! restart and reported; the daemon starts, and every site converges again.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_dmrep");

#[test]
fn corrupted_log_tail_is_truncated_and_sites_reconverge() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let ld = d.make_file_s("ld", 64 << 20);
    let rd = d.make_file_s("rd", 64 << 20);
    let replog = d.make_file_s("replog", 16 << 20);
    d.create(
        "r0",
        &format!(
            "0 131072 replicator default 4 {replog} 0 auto 32768 local 2 0 asynchronous 2 0 {ld} - 0 \
             local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync"
        ),
    );
    // SLINK 1 paused: its entries stay in the log.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    for i in 0..8u64 {
        qemu_io_ok(&d.uri("r0-0"), &[&format!("write -P {} {}k 64k", 0x10 + i, i * 64)]);
    }
    d.kill9();

    let o = run(Command::new(BIN).args(["log", "check", &replog]));
    assert!(o.status.success(), "an intact log checks clean: {}", show(&o));
    let o = run(Command::new(BIN).args(["log", "dump", "--json", &replog]));
    assert!(o.status.success(), "{}", show(&o));
    let dump: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let recs = dump["records"].as_array().unwrap();
    let writes: Vec<&serde_json::Value> =
        recs.iter().filter(|r| r["committed"] == true && r["len"].as_u64() > Some(0)).collect();
    assert!(writes.len() >= 8, "eight writes are in the log: {dump}");
    // Overwrite bytes in the data of the second-to-last entry.
    let victim = writes[writes.len() - 2];
    let pos = 8192 + victim["ring_pos"].as_u64().unwrap() + 512 + 1000;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&replog).unwrap();
        f.write_all_at(&[0xde, 0xad, 0xbe, 0xef, 0x55, 0xaa], pos).unwrap();
    }
    let o = run(Command::new(BIN).args(["log", "check", &replog]));
    assert!(!o.status.success(), "a corrupted log does not check clean: {}", show(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("truncate"), "check says what recovery would cut: {text}");
    let victim_seq = victim["seq"].as_u64().unwrap();

    // The daemon starts, recovers to the last good prefix and reports it.
    d.restart();
    assert!(d.names().contains(&"r0-0".to_string()), "the group is back");
    assert!(
        wait_until(Duration::from_secs(10), || d.log_text().contains("truncated")
            || d.log_text().contains("lost entries")),
        "the truncation is reported in the daemon log:\n{}",
        d.log_text()
    );
    let st = d.json(&["status", "r0"]);
    let next = st[0]["segments"][0]["detail"]["log"]["next_seq"].as_u64().unwrap();
    assert_eq!(next, victim_seq, "the log ends just before the corrupted entry");
    // The LD had applied the lost entries: every RD is resynchronised from it.
    let o = d.cli(&["wait", "r0", "--timeout", "60"]);
    assert!(o.status.success(), "the group gets back in sync: {}\n{}", show(&o), d.log_text());
    assert!(std::fs::read(&ld).unwrap() == std::fs::read(&rd).unwrap(), "RD equals LD");
    // The data written before the crash reads back through the device.
    for i in 0..8u64 {
        qemu_io_ok(&d.uri("r0-0"), &[&format!("read -P {} {}k 64k", 0x10 + i, i * 64)]);
    }
}

/// A small tmpfs mounted for one test (needs root and `mount`), unmounted when dropped.
struct SmallFs {
    dir: std::path::PathBuf,
}

impl SmallFs {
    /// Mount a tmpfs of `size` (mount's syntax, `4m`) at `dir`; `None` when this
    /// machine does not let us (not root, no tmpfs).
    fn mount(dir: std::path::PathBuf, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(&dir).unwrap();
        let o = run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir));
        o.status.success().then_some(SmallFs { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Issue 8: creating a log on a file system that fills up failed without saying why
/// (no errno) and left the space it took allocated. The error names the OS error; an
/// existing file is as sparse as before (the file system is no fuller than it was), and
/// a file the table made is removed.
#[test]
fn creating_a_log_on_a_full_file_system_names_enospc_and_gives_the_space_back() {
    use std::os::unix::fs::MetadataExt;
    require!("mount", "umount");
    let d = Daemon::start();
    let Some(fs) = SmallFs::mount(d.path("small"), "4m") else {
        skip("cannot mount a tmpfs here (mount needs root)");
        return;
    };
    let ld = d.make_file_s("ld", 16 << 20);
    let rd = d.make_file_s("rd", 16 << 20);
    let log = fs.dir.join("replog");
    std::fs::File::create(&log).unwrap().set_len(8 << 20).unwrap();
    let table = format!(
        "0 32768 replicator default 4 {} 0 create 16384 local 2 0 asynchronous 2 0 {ld} - 0 \
         local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync",
        log.display()
    );
    let e = d.cli_err(&["create", "r0", "--table", &table]);
    let head = format!(
        "dmrep: table line 1: replicator: replication log {0}: pre-writing the new log on {0} at byte ",
        log.display()
    );
    assert!(e.starts_with(&head), "{e}");
    assert!(e.ends_with(": No space left on device (ENOSPC)"), "{e}");
    assert_eq!(std::fs::metadata(&log).unwrap().blocks(), 0, "the space the attempt took is given back");
    assert!(d.names().is_empty());
    // A log file the table creates (it was missing) is removed again.
    let made = fs.dir.join("made");
    let e = d.cli_err(&[
        "create",
        "r0",
        "--table",
        &table.replace(&log.display().to_string(), &made.display().to_string()),
    ]);
    assert!(e.ends_with(": No space left on device (ENOSPC)"), "{e}");
    assert!(!made.exists(), "the log file the failed create made is gone");
    assert!(d.names().is_empty());
    // With room for it, the same log is created (the failed attempt left nothing in the way).
    drop(fs);
    let big = d.make_file("replog", 8 << 20);
    d.create("r0", &table.replace(&log.display().to_string(), &big.display().to_string()));
}

/// Issue 8: a reload of a control table with another log size was accepted, and
/// `table` then showed a size the log does not have. It is refused at `load`.
#[test]
fn a_reload_that_changes_the_log_size_is_refused() {
    let d = Daemon::start();
    let ld = d.make_file_s("ld", 16 << 20);
    let rd = d.make_file_s("rd", 16 << 20);
    let log = d.make_file_s("replog", 16 << 20);
    let table = |size: &str| {
        format!(
            "0 32768 replicator default {} {log} 0 auto{size} local 2 0 asynchronous 2 0 {ld} - 0 \
             local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync",
            if size.is_empty() { 3 } else { 4 }
        )
    };
    d.create("r0", &table(" 16384"));
    let before = d.cli_ok(&["table", "r0"]);
    for (size, found) in [(" 32768", "32768 sectors"), ("", "no size")] {
        let e = d.cli_err(&["load", "r0", "--table", &table(size)]);
        assert_eq!(
            e,
            format!(
                "dmrep: table line 1: replicator: a reloaded table must keep the replication log's size \
                 (16384 sectors in the live table, {found} in this one): a live log cannot be resized"
            )
        );
    }
    assert_eq!(d.info("r0")["inactive_table"], false);
    assert_eq!(d.cli_ok(&["table", "r0"]), before);
    // The same size (other changes aside) is a reload like any other.
    d.cli_ok(&[
        "load",
        "r0",
        "--table",
        &table(" 16384").replace("local 2 1 asynchronous", "local 3 1 asynchronous ios=100"),
    ]);
    d.cli_ok(&["resume", "r0"]);
    assert!(d.cli_ok(&["table", "r0"]).contains("ios=100"));
}

/// A table whose log mode is `create` makes the log once: a restart (after kill -9,
/// with entries not yet at a replica) opens and recovers it instead of wiping them.
#[test]
fn a_create_log_is_recovered_not_recreated_on_restart() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let ld = d.make_file_s("ld", 16 << 20);
    let rd = d.make_file("rd", 16 << 20);
    let log = d.make_file_s("replog", 8 << 20);
    d.create(
        "r0",
        &format!(
            "0 32768 replicator default 4 {log} 0 create 16384 local 2 0 asynchronous 2 0 {ld} - 0 \
             local 2 1 asynchronous 2 0 {} core 2 2048 nosync",
            rd.display()
        ),
    );
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x3c 0 64k"]);
    d.kill9();
    d.restart();
    // (A restart resumes every SLINK: the recovered entry ships.)
    let st = d.json(&["status", "r0"]);
    let recovery = st[0]["segments"][0]["detail"]["recovery"].as_str().unwrap_or_default().to_string();
    assert!(recovery.contains("entries: 1,"), "the log was recovered with its entry: {st}");
    let shipped = wait_until(Duration::from_secs(30), || read_at(&rd, 0, 65536) == vec![0x3c; 65536]);
    assert!(shipped, "the entry reaches the replica after the restart");
    qemu_io_ok(&d.uri("r0-0"), &["read -P 0x3c 0 64k"]);
    assert!(!d.log_text().split("restarting daemon").nth(1).unwrap_or("").contains("created replication log"));
}
