//! Device lifecycle with clients attached: remove refused while open and forced,
//! load + resume swapping tables, suspend holding (not failing) writes, and
//! suspend/resume cycles under a verifying fio workload.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn remove_refused_while_open_and_forced_remove_fails_further_requests() {
    require!("nbdsh");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 4 * MIB);
    d.create("busy", &format!("0 4096 linear {a} 0"));

    // A client holding the export open, which reads again after we tell it to.
    let client = HoldingClient::start(
        &d.uri("busy"),
        "h.pread(4096, 0)",
        "print('AFTER', 'OK' if h.pread(4096, 0) == bytes(4096) else 'BAD')",
    );
    assert!(wait_until(Duration::from_secs(10), || d.open_count("busy") == 1), "open count with one client");
    let e = d.cli_err(&["remove", "busy"]);
    assert!(e.contains("busy") && e.contains("open"), "error should say the device is open: {e}");
    assert_eq!(d.names(), ["busy"], "refused remove leaves the device");
    // The client was not disturbed.
    let (st, out) = client.finish();
    assert!(st.success(), "{out}");
    assert!(out.contains("AFTER OK"), "{out}");
    assert!(wait_until(Duration::from_secs(10), || d.open_count("busy") == 0), "open count back to 0");
    // Now not open: plain remove works.
    d.cli_ok(&["remove", "busy"]);
    assert!(d.names().is_empty());

    // --force while a client is connected: the device goes, the client's next request fails.
    d.create("busy2", &format!("0 4096 linear {a} 0"));
    let client = HoldingClient::start(
        &d.uri("busy2"),
        "h.pread(512, 0)",
        r#"
try:
    h.pread(4096, 0)
    print("AFTER OK")
except nbd.Error as e:
    print("AFTER ERR", e)
"#,
    );
    assert!(wait_until(Duration::from_secs(10), || d.open_count("busy2") == 1));
    d.cli_ok(&["remove", "--force", "busy2"]);
    assert!(d.names().is_empty(), "forced remove removes");
    let (_, out) = client.finish();
    assert!(out.contains("AFTER ERR"), "a request after forced removal must fail: {out}");
    // The daemon serves on: a new device with the same name works.
    d.create("busy2", "0 2048 zero");
    if have_or_skip("qemu-io") {
        qemu_io_ok(&d.uri("busy2"), &["read -P 0 0 64k"]);
    }
}

#[test]
fn load_and_resume_swap_tables() {
    require!("qemu-io");
    let d = Daemon::start();
    let a = d.make_file("a.img", 4 * MIB);
    let b = d.path("b.img");
    fill_file(&b, 0xbb, 8 * MIB as usize);
    d.create("sw", &format!("0 8192 linear {} 0", a.display()));
    let uri = d.uri("sw");
    qemu_io_ok(&uri, &["write -P 0xaa 0 4M"]);

    // Load: inactive until resume; I/O still sees the old table.
    let new_table = format!("0 16384 linear {} 0", b.display());
    d.cli_ok(&["load", "sw", "--table", &new_table]);
    let i = d.info("sw");
    assert_eq!(i["live_table"], true);
    assert_eq!(i["inactive_table"], true);
    assert_eq!(i["size_sectors"], 8192);
    assert_eq!(d.cli_ok(&["table", "sw", "--inactive"]).trim(), new_table);
    qemu_io_ok(&uri, &["read -P 0xaa 0 4M"]);

    d.cli_ok(&["resume", "sw"]);
    let i = d.info("sw");
    assert_eq!(i["inactive_table"], false);
    assert_eq!(i["size_sectors"], 16384, "the new table's size");
    assert_eq!(d.cli_ok(&["table", "sw"]).trim(), new_table);
    qemu_io_ok(&uri, &["read -P 0xbb 0 8M", "write -P 0xcc 1M 4k"]);
    assert_eq!(read_at(&b, MIB, 4096), vec![0xcc; 4096], "writes go to the new table's file");
    assert_eq!(read_at(&a, MIB, 4096), vec![0xaa; 4096], "the old file is left alone");

    // Suspend, load, resume: the same swap the dmsetup way.
    d.cli_ok(&["suspend", "sw"]);
    d.cli_ok(&["load", "sw", "--table", &format!("0 8192 linear {} 0", a.display())]);
    d.cli_ok(&["resume", "sw"]);
    assert_eq!(d.info("sw")["state"], "active");
    qemu_io_ok(&uri, &["read -P 0xaa 0 4M"]);
}

#[test]
fn write_while_suspended_waits_for_resume() {
    require!("qemu-io");
    let d = Daemon::start();
    let a = d.make_file("a.img", 4 * MIB);
    d.create("sus", &format!("0 8192 linear {} 0", a.display()));
    let uri = d.uri("sus");

    d.cli_ok(&["suspend", "sus"]);
    assert_eq!(d.info("sus")["state"], "suspended");
    assert!(d.cli_ok(&["info", "sus"]).contains("SUSPENDED"));
    let child = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 64k 64k", &uri])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    // The write is held: the client neither finishes nor fails, the file is untouched.
    assert!(wait_until(Duration::from_secs(10), || d.open_count("sus") == 1), "client connected while suspended");
    let held = child.wait_timeout(Duration::from_millis(1500));
    assert!(held.is_none(), "a write to a suspended device must wait, but the client exited with {held:?}");
    assert_eq!(read_at(&a, 64 * 1024, 65536), vec![0; 65536], "nothing written while suspended");
    // Read-only requests still answer while suspended.
    d.cli_ok(&["status", "sus"]);

    let resumed_at = Instant::now();
    d.cli_ok(&["resume", "sus"]);
    let st = child.wait_timeout(Duration::from_secs(30)).expect("the held write completes after resume");
    let mut out = String::new();
    use std::io::Read;
    child.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(st.success(), "the held write must succeed: {st} {out}");
    assert!(out.contains("wrote 65536/65536"), "{out}");
    assert!(resumed_at.elapsed() < Duration::from_secs(30));
    assert_eq!(read_at(&a, 64 * 1024, 65536), vec![0x77; 65536]);
    qemu_io_ok(&uri, &["read -P 0x77 64k 64k"]);
}

#[test]
fn suspend_resume_cycles_under_fio_verify() {
    require!("fio");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 32 * MIB);
    let b = d.make_file_s("b.img", 32 * MIB);
    d.create("cyc", &format!("0 65536 striped 2 64 {a} 0 {b} 0"));
    let out_file = d.path("fio.json");
    let child = Command::new("fio")
        // fio writes verify state files into its working directory: keep them out of the tree.
        .current_dir(d.dir())
        .args([
            "--name=cycles",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("cyc")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=24M",
            "--iodepth=16",
            // Slow enough that the cycles below overlap the writes.
            "--rate_iops=3000",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .arg(format!("--output={}", out_file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut fio = KillOnDrop(child);
    assert!(wait_until(Duration::from_secs(20), || d.open_count("cyc") >= 1), "fio connected");
    let mut cycles = 0;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = fio.0.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "fio did not finish within 60 s");
        d.cli_ok(&["suspend", "cyc"]);
        assert_eq!(d.info("cyc")["state"], "suspended");
        d.cli_ok(&["resume", "cyc"]);
        cycles += 1;
    };
    let mut err = String::new();
    use std::io::Read;
    fio.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let out = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(status.success(), "fio failed under suspend/resume ({cycles} cycles): {status}\n{err}\n{out}");
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').expect("fio JSON")..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 24 * MIB);
    assert_eq!(job["read"]["io_bytes"], 24 * MIB, "verify read everything back");
    eprintln!("{cycles} suspend/resume cycles while fio ran");
    assert!(cycles >= 10, "only {cycles} suspend/resume cycles overlapped fio");
    assert_eq!(d.info("cyc")["state"], "active");
}

/// SIGTERM while a suspended device holds a client's write: the daemon still exits
/// (cleanly, at once), the held write fails and never reaches the backing file.
#[test]
fn sigterm_with_a_request_held_by_a_suspended_device_exits() {
    require!("nbdsh");
    let mut d = Daemon::start();
    let file = d.make_file_s("held.img", 1 << 20);
    d.create("held", &format!("0 2048 linear {file} 0"));
    d.cli_ok(&["suspend", "held"]);
    // The asynchronous write is on the wire when nbdsh says READY; the device holds it.
    let _client = HoldingClient::start(&d.uri("held"), "c = h.aio_pwrite(b'\\x11' * 4096, 0)", "");
    d.terminate();
    let data = std::fs::read(&file).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0), "a held, never acknowledged write reached the file");
}

/// Issue 8: suspending a replicator control device holds the writes of every device of
/// its group (a consistent point across devices), and resuming it lets them go.
#[test]
fn suspending_the_control_device_holds_the_whole_group() {
    require!("qemu-io");
    let d = Daemon::start();
    let (ld0, ld1) = (d.make_file_s("ld0", 8 * MIB), d.make_file_s("ld1", 8 * MIB));
    let (rd0, rd1) = (d.make_file_s("rd0", 8 * MIB), d.make_file_s("rd1", 8 * MIB));
    let log = d.make_file_s("replog", 8 * MIB);
    d.create(
        "r0",
        &format!(
            "0 16384 replicator default 4 {log} 0 auto 16384 \
             local 2 0 async 2 0 {ld0} - 0 local 2 0 async 2 1 {ld1} - 0 \
             local 2 1 async 2 0 {rd0} core 2 2048 nosync local 2 1 async 2 1 {rd1} core 2 2048 nosync"
        ),
    );
    d.cli_ok(&["suspend", "r0"]);
    let mut writers: Vec<KillOnDrop> = ["r0-0", "r0-1"]
        .iter()
        .map(|dev| {
            KillOnDrop(
                Command::new("qemu-io")
                    .args(["-f", "raw", "-c", "write -P 0x33 0 64k", &d.uri(dev)])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let st = d.json(&["status", "r0"]);
            st[0]["segments"][0]["detail"]["queued_writes"] == 2
        }),
        "both devices' writes are held"
    );
    assert!(d.cli_ok(&["status", "r0"]).contains("writes held"));
    assert!(writers.iter_mut().all(|w| w.0.try_wait().unwrap().is_none()), "no write completed while suspended");
    d.cli_ok(&["resume", "r0"]);
    for w in writers.iter_mut() {
        assert!(wait_until(Duration::from_secs(20), || w.0.try_wait().unwrap().is_some()), "the write completes");
        assert!(w.0.wait().unwrap().success());
    }
    let o = d.cli(&["wait", "r0", "--timeout", "30"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(read_at(std::path::Path::new(&rd1), 0, 4), vec![0x33; 4]);
}

// ---------------------------------------------------------------------------------
// Requests a target holds (issue 8): a suspend waits for them only so long, and never
// keeps a removal or a resume waiting.

/// A paper-form group `r0` whose SLINK 1 is synchronous and paused (what a down
/// synchronous SLINK does to writes), and a client whose write to `r0-0` the group
/// holds. When let go, the client prints `WRITE OK` or `WRITE ERR <errno name>`.
fn group_holding_a_write(d: &Daemon) -> HoldingClient {
    group_with_paused_sync_slink(d);
    let client = HoldingClient::start(
        &d.uri("r0-0"),
        "c = h.aio_pwrite(b'\\x22' * 4096, 0)",
        "import errno\n\
         try:\n    while not h.aio_command_completed(c):\n        h.poll(-1)\n    print('WRITE OK')\n\
         except nbd.Error as e:\n    print('WRITE ERR', errno.errorcode.get(e.errno, e.errno))",
    );
    let held = wait_until(Duration::from_secs(10), || {
        d.json(&["status", "r0"])[0]["segments"][0]["detail"]["awaiting_writes"] == 1
    });
    assert!(held, "the write waits for the synchronous SLINK");
    client
}

/// `dmrep suspend NAME` in the background (it may wait).
fn spawn_cli(d: &Daemon, args: &[&str]) -> KillOnDrop {
    KillOnDrop(d.cli_cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
}

fn stderr_of(c: &mut KillOnDrop) -> String {
    let mut s = String::new();
    use std::io::Read;
    c.0.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// The user's report: `suspend` of a device whose write waits for a down synchronous
/// SLINK blocked forever, and `remove --force` queued behind it. Now the removal goes
/// ahead at once (the held write fails with ESHUTDOWN after the grace period) and the
/// suspend returns.
#[test]
fn remove_force_does_not_wait_behind_a_suspend_of_a_device_holding_a_write() {
    require!("nbdsh");
    let d = Daemon::start();
    let client = group_holding_a_write(&d);
    let mut suspend = spawn_cli(&d, &["suspend", "r0-0"]);
    assert!(
        wait_until(Duration::from_secs(10), || d.info("r0-0")["state"] == "suspended"),
        "the suspend closes the gate and waits"
    );
    let t0 = Instant::now();
    d.cli_ok(&["remove", "--force", "r0"]);
    eprintln!("remove --force took {:?}", t0.elapsed());
    let st = suspend.wait_timeout(Duration::from_secs(30)).expect("the suspend returns once the device is removed");
    let err = stderr_of(&mut suspend);
    assert!(!st.success(), "{err}");
    // Removed under it, or (on a very slow machine) given up first: either way it ended.
    assert!(
        err.contains("dmrep: device r0-0 was removed while waiting for its in-flight requests")
            || err.contains("dmrep: suspend of r0-0 gave up after 10 s"),
        "{err}"
    );
    assert!(d.names().is_empty(), "{:?}", d.names());
    let (_, out) = client.finish();
    assert!(out.contains("WRITE ERR ESHUTDOWN"), "the held write fails with ESHUTDOWN: {out}");
}

/// A suspend that cannot drain gives up after its timeout, saying why, and leaves the
/// device active; one that waits is cancelled by `resume`, which does not queue behind
/// it (nor do other lifecycle requests).
#[test]
fn a_suspend_held_up_by_a_down_synchronous_slink_gives_up_or_is_cancelled() {
    require!("nbdsh");
    let d = Daemon::start();
    let client = group_holding_a_write(&d);
    let e = d.cli_err(&["suspend", "r0-0", "--timeout", "1"]);
    assert_eq!(
        e,
        "dmrep: suspend of r0-0 gave up after 1 s: 1 request(s) still in flight, held by its target \
         (e.g. writes waiting for a synchronous SLINK that is down); the device is active again \
         (retry later, or `dmrep remove --force` fails them)"
    );
    assert_eq!(d.info("r0-0")["state"], "active");

    let mut suspend = spawn_cli(&d, &["suspend", "r0-0", "--timeout", "600"]);
    assert!(wait_until(Duration::from_secs(10), || d.info("r0-0")["state"] == "suspended"));
    // Lifecycle requests are not serialised behind the waiting suspend.
    d.cli_ok(&["message", "r0", "0", "statistics", "on"]);
    d.cli_ok(&["resume", "r0-0"]);
    let st = suspend.wait_timeout(Duration::from_secs(30)).expect("resume ends the waiting suspend");
    let err = stderr_of(&mut suspend);
    assert!(!st.success(), "{err}");
    assert_eq!(
        err.trim(),
        "dmrep: suspend of r0-0 did not complete: the device was resumed while it waited for in-flight requests"
    );
    assert_eq!(d.info("r0-0")["state"], "active");

    // The SLINK comes back: the write completes, and a suspend now drains at once.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    let (_, out) = client.finish();
    assert!(out.contains("WRITE OK"), "{out}");
    d.cli_ok(&["suspend", "r0-0", "--timeout", "5"]);
    assert_eq!(d.info("r0-0")["state"], "suspended");
    d.cli_ok(&["resume", "r0-0"]);
}
