//! Real NBD clients against the server: nbdinfo, qemu-io, nbdsh (libnbd), nbdcopy.
//! Each test is skipped (with a notice) when its tool is not installed.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use super::{tool, Fixture, Mode};

/// Run `cmd`; returns (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("spawn client tool");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nbdsh -c SCRIPT` with the system Python first in `PATH` (libnbd's module lives there).
fn nbdsh(nbdsh: &Path, script: &str) -> (bool, String, String) {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new(nbdsh).env("PATH", path).arg("-c").arg(script))
}

fn check(what: &str, (ok, out, err): (bool, String, String)) -> String {
    assert!(ok, "{what} failed\nstdout:\n{out}\nstderr:\n{err}");
    out
}

#[test]
fn nbdinfo_lists_exports() {
    let Some(nbdinfo) = tool("nbdinfo") else { return };
    let f = Fixture::new();
    f.add_device("alpha", &[1 << 20], Mode::Sync);
    f.add_device("beta", &[2 << 20, 1 << 20], Mode::Sync);
    let out = check("nbdinfo --list", run(Command::new(&nbdinfo).args(["--list", "--json"]).arg(f.uri(""))));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exports = v["exports"].as_array().unwrap();
    let mut got: Vec<(String, u64)> = exports
        .iter()
        .map(|e| (e["export-name"].as_str().unwrap().to_string(), e["export-size"].as_u64().unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, [("alpha".to_string(), 1 << 20), ("beta".to_string(), 3 << 20)]);
    f.wait_idle();
}

#[test]
fn nbdinfo_describes_an_export() {
    let Some(nbdinfo) = tool("nbdinfo") else { return };
    let f = Fixture::new();
    f.add_device("disk0", &[4 << 20], Mode::Sync);
    let out = check("nbdinfo", run(Command::new(&nbdinfo).arg("--json").arg(f.uri("disk0"))));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk0");
    assert_eq!(e["export-size"], 4 << 20);
    assert_eq!(e["is_read_only"], false);
    for cap in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_df"] {
        assert_eq!(e[cap], true, "{cap} in {e}");
    }
    assert_eq!(e["can_fast_zero"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(v["protocol"], "newstyle-fixed");
}

#[test]
fn qemu_io_round_trip_with_fua_zeroes_and_discard() {
    let Some(qemu_io) = tool("qemu-io") else { return };
    let f = Fixture::new();
    let (_, t) = f.add_device("d0", &[1 << 20], Mode::Sync);
    let tcp = f.server.listen_tcp("127.0.0.1:0").unwrap();
    let cmds = [
        "write -P 0xab 0 64k",
        "write -f -P 0xcd 64k 4k",
        "write -P 0xee 128k 128k",
        "write -z 128k 64k",
        "write -z -u 192k 64k",
        "flush",
        "discard 512k 64k",
        "read -P 0xab 0 64k",
        "read -P 0xcd 64k 4k",
        "read -P 0 128k 128k",
    ];
    for uri in [f.uri("d0"), format!("nbd://{tcp}/d0")] {
        let mut c = Command::new(&qemu_io);
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = check("qemu-io", run(c.arg(&uri)));
        assert!(!out.contains("fail"), "{uri}: {out}");
        assert_eq!(out.matches("read ").count(), 3, "{out}");
    }
    assert_eq!(t[0].data(0, 65536), vec![0xab; 65536]);
    assert_eq!(t[0].data(65536, 4096), vec![0xcd; 4096]);
    let c = t[0].counters();
    assert!(c.fua_writes.load(Ordering::Relaxed) >= 2);
    assert!(c.flushes.load(Ordering::Relaxed) >= 2);
    assert!(c.zeroes_no_trim.load(Ordering::Relaxed) >= 2);
    assert!(c.zeroes_may_trim.load(Ordering::Relaxed) >= 2);
    assert!(c.discards.load(Ordering::Relaxed) >= 2);
}

#[test]
fn nbdsh_errors_keep_the_connection_working() {
    let Some(nbdsh_bin) = tool("nbdsh") else { return };
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    let script = format!(
        r#"
import errno
for sr in (True, False):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(sr)
    h.connect_uri("{uri}")
    assert h.get_structured_replies_negotiated() == sr
    size = h.get_size()
    try:
        h.pread(512, size)
        print("read past the end succeeded")
    except nbd.Error as e:
        print("READ-ERR", sr, e.errno in ("EINVAL", errno.EINVAL), e)
    try:
        h.pwrite(b"x" * 512, size - 256)
        print("write past the end succeeded")
    except nbd.Error as e:
        print("WRITE-ERR", sr, e.errno in ("ENOSPC", errno.ENOSPC), e)
    h.pwrite(b"y" * 4096, 8192)
    assert h.pread(4096, 8192) == b"y" * 4096
    print("STILL-OK", sr)
    h.shutdown()
"#,
        uri = f.uri("d0")
    );
    let out = check("nbdsh", nbdsh(&nbdsh_bin, &script));
    for sr in ["True", "False"] {
        assert!(out.contains(&format!("READ-ERR {sr} True")), "{out}");
        assert!(out.contains(&format!("WRITE-ERR {sr} True")), "{out}");
        assert!(out.contains(&format!("STILL-OK {sr}")), "{out}");
    }
    f.wait_idle();
}

#[test]
fn nbdsh_unknown_export_is_an_error() {
    let Some(nbdsh_bin) = tool("nbdsh") else { return };
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    let script = format!(
        r#"
for name in ("nope", ""):
    h = nbd.NBD()
    try:
        h.connect_uri("{base}".replace("NAME", name))
        print("connected to", repr(name))
    except nbd.Error as e:
        print("UNKNOWN", repr(name), e)
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri("{base}".replace("NAME", ""))
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
print("LIST", sorted(names))
try:
    h.set_export_name("zzz")
    h.opt_info()
    print("info on zzz succeeded")
except nbd.Error as e:
    print("INFO-ERR", e)
h.set_export_name("d0")
h.opt_info()
print("INFO-OK", h.get_size())
h.opt_go()
print("GO-OK", h.pread(4, 0))
"#,
        base = f.uri("NAME")
    );
    let out = check("nbdsh", nbdsh(&nbdsh_bin, &script));
    assert!(out.contains("UNKNOWN 'nope'"), "{out}");
    assert!(out.contains("UNKNOWN ''"), "{out}");
    assert!(out.contains("LIST ['d0']"), "{out}");
    assert!(out.contains("INFO-ERR"), "{out}");
    assert!(out.contains("INFO-OK 1048576"), "{out}");
    assert!(out.contains("GO-OK"), "{out}");
    assert!(!out.contains("succeeded") && !out.contains("connected to"), "{out}");
    f.wait_idle();
}

#[test]
fn nbdsh_pipelined_writes_complete_out_of_order() {
    let Some(nbdsh_bin) = tool("nbdsh") else { return };
    let f = Fixture::new();
    let (_, t) = f.add_device("d0", &[4 << 20], Mode::Delayed);
    let script = format!(
        r#"
h.connect_uri("{uri}")
N = 256
order = []
def done(i):
    def cb(*args):
        order.append(i)
        return 1
    return cb
for i in range(N):
    h.aio_pwrite(bytes([i % 251 + 1]) * 4096, i * 4096, completion=done(i),
                 flags=(nbd.CMD_FLAG_FUA if i % 5 == 0 else 0))
while h.aio_in_flight() > 0:
    h.poll(-1)
assert sorted(order) == list(range(N)), order
print("OUT-OF-ORDER", order != sorted(order))
for i in range(N):
    assert h.pread(4096, i * 4096) == bytes([i % 251 + 1]) * 4096, i
h.flush()
h.zero(4096, 0)
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
h.trim(4096, 8192)
assert h.pread(8192, 0) == bytes(8192)
print("DONE")
"#,
        uri = f.uri("d0")
    );
    let out = check("nbdsh", nbdsh(&nbdsh_bin, &script));
    assert!(out.contains("OUT-OF-ORDER True"), "{out}");
    assert!(out.contains("DONE"), "{out}");
    let c = t[0].counters();
    assert!(c.out_of_order.load(Ordering::Relaxed) > 0);
    assert!(c.fua_writes.load(Ordering::Relaxed) > 0);
    assert_eq!(c.zeroes_no_trim.load(Ordering::Relaxed), 1);
    assert_eq!(c.zeroes_may_trim.load(Ordering::Relaxed), 1);
    assert_eq!(c.discards.load(Ordering::Relaxed), 1);
    f.wait_idle();
}

#[test]
fn nbdcopy_round_trip_over_multiple_connections() {
    let Some(nbdcopy) = tool("nbdcopy") else { return };
    let f = Fixture::new();
    f.add_device("d0", &[3 << 20, 5 << 20], Mode::Delayed);
    let src = f._dir.path().join("src.img");
    let dst = f._dir.path().join("dst.img");
    let mut x: u32 = 12345;
    let data: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::write(&dst, []).unwrap();
    check(
        "nbdcopy to the export",
        run(Command::new(&nbdcopy).args(["--connections=4", "--requests=16"]).arg(&src).arg(f.uri("d0"))),
    );
    check(
        "nbdcopy from the export",
        run(Command::new(&nbdcopy).args(["--connections=4", "--requests=16"]).arg(f.uri("d0")).arg(&dst)),
    );
    assert!(std::fs::read(&dst).unwrap() == data, "data differs");
    f.wait_idle();
}
