//! Online verify: `dmrep verify GROUP --slink N` compares the group's devices with a
//! site's copy while writes go on. A region corrupted behind dmrep's back is found,
//! exactly that one; `--fix` repairs it through the resync; a verify under a concurrent
//! write workload reports no false mismatch; a remote site's copy is checksummed there.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::process::Stdio;

use common::sites::*;
use common::*;

const MIB: u64 = 1 << 20;

/// Group r0 of one 32 MiB device with a local SLINK 1 (an RD).
fn local_group(d: &Daemon) -> (String, String) {
    let ld = d.make_file_s("ld", 32 * MIB);
    let rd = d.make_file_s("rd", 32 * MIB);
    let log = d.dir().join("replog");
    d.create(
        "r0",
        &format!(
            "0 65536 replicator default 4 {} 0 auto 32768 local 2 0 async 2 0 {ld} - 0 \
             local 2 1 async 2 0 {rd} core 2 2048 nosync",
            log.display()
        ),
    );
    (ld, rd)
}

fn corrupt(path: &str, offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0xee; 512], offset).unwrap();
    f.sync_all().unwrap();
}

fn verify_json(d: &Daemon, args: &[&str]) -> (bool, serde_json::Value) {
    let o = d.cli(&[&["verify", "r0"], args, &["--json"]].concat());
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let v: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("null")).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    (o.status.success(), v)
}

#[test]
fn verify_finds_exactly_the_corrupted_region_and_fix_repairs_it() {
    require!("qemu-io");
    let d = Daemon::start();
    let (ld, rd) = local_group(&d);
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x33 0 32M"]);
    d.cli_ok(&["wait", "r0", "--timeout", "60"]);
    let (ok, v) = verify_json(&d, &["--slink", "1"]);
    assert!(ok && v["mismatches"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["regions_done"], 32);

    corrupt(&rd, 5 * MIB + 4096);
    let (ok, v) = verify_json(&d, &["--slink", "1"]);
    assert!(!ok, "regions differ: exit status 1");
    assert_eq!(v["mismatches"], serde_json::json!([{"dev_nr": 0, "offset": 5 * MIB, "len": MIB}]), "{v}");
    let text = d.cli(&["verify", "r0", "--slink", "1"]);
    let out = show(&text);
    assert!(out.contains("differs: device 0 bytes 5242880..+1048576") && out.contains("--fix"), "{out}");

    let (ok, v) = verify_json(&d, &["--slink", "1", "--fix"]);
    assert!(ok, "{v}");
    d.cli_ok(&["wait", "r0", "--timeout", "60"]);
    assert_eq!(std::fs::read(&ld).unwrap(), std::fs::read(&rd).unwrap(), "repaired by the resync");
    let st = group_status(&d, "r0");
    assert_eq!(slink_of(&st, 1)["sync"]["bytes_copied"], MIB, "only that region was copied");
    let (ok, v) = verify_json(&d, &["--slink", "1"]);
    assert!(ok && v["mismatches"].as_array().unwrap().is_empty(), "{v}");
    assert!(d.cli_err(&["verify", "r0", "--slink", "0"]).contains("slink 0"));
    assert!(d.cli_err(&["verify", "r0", "--slink", "7"]).contains("no slink 7"));
}

#[test]
fn verify_under_writes_reports_no_false_mismatch() {
    require!("fio");
    let d = Daemon::start();
    let (_ld, _rd) = local_group(&d);
    let uri = format!("nbd+unix:///r0-0?socket={}", d.nbd.display());
    let mut fio = KillOnDrop(
        std::process::Command::new("fio")
            .args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k"])
            .args(["--iodepth=8", "--size=32M", "--time_based", "--runtime=6", "--output=/dev/null"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Slow enough (8 MiB/s each side) that the writes overlap the whole verify.
    let (ok, v) = verify_json(&d, &["--slink", "1", "--rate", "8388608"]);
    assert!(ok, "false mismatches under writes: {v}");
    assert!(v["mismatches"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["regions_done"], 32, "{v}");
    assert!(fio.wait_timeout(std::time::Duration::from_secs(30)).is_some_and(|s| s.success()));
}

#[test]
fn a_remote_sites_copy_is_verified_there() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let (tokyo, tokyo_at) = site_daemon("tokyo", pki.path());
    let (paris, paris_at) = site_daemon("paris", pki.path());
    let table = |d: &Daemon, secondary: bool, peer: &str, addr: SocketAddr| {
        let dev = d.make_file_s("dev0", 32 * MIB);
        let (n, role) = if secondary { (5, " role=secondary") } else { (4, "") };
        format!(
            "0 65536 replicator default {n} {} 0 auto 32768{role} local 2 0 async 2 0 {dev} - 0 \
             net 4 1 async {addr} site={peer} 2 0 0 core 2 2048 nosync",
            d.dir().join("replog").display()
        )
    };
    tokyo.create("r0", &table(&tokyo, true, "paris", paris_at));
    paris.create("r0", &table(&paris, false, "tokyo", tokyo_at));
    qemu_io_ok(&paris.uri("r0-0"), &["write -P 0x44 0 32M"]);
    paris.cli_ok(&["wait", "r0", "--timeout", "60"]);
    assert!(wait_until(std::time::Duration::from_secs(30), || group_status(&tokyo, "r0")["site"]["lag_entries"] == 0));
    let bytes_before = slink_of(&group_status(&paris, "r0"), 1)["link"]["bytes_wire"].as_u64().unwrap();
    corrupt(tokyo.dir().join("dev0").to_str().unwrap(), 17 * MIB);
    let (ok, v) = verify_json(&paris, &["--slink", "1"]);
    assert!(!ok);
    assert_eq!(v["mismatches"], serde_json::json!([{"dev_nr": 0, "offset": 17 * MIB, "len": MIB}]), "{v}");
    let wire = slink_of(&group_status(&paris, "r0"), 1)["link"]["bytes_wire"].as_u64().unwrap() - bytes_before;
    assert!(wire < MIB, "checksums, not data, crossed the link: {wire} bytes");
    let (ok, _) = verify_json(&paris, &["--slink", "1", "--fix"]);
    assert!(ok);
    paris.cli_ok(&["wait", "r0", "--timeout", "60"]);
    assert!(wait_until(std::time::Duration::from_secs(30), || {
        std::fs::read(paris.dir().join("dev0")).unwrap() == std::fs::read(tokyo.dir().join("dev0")).unwrap()
    }));
}
