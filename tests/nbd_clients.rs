//! Real NBD clients against dmrep devices: nbdinfo, qemu-io, qemu-img, nbdcopy, nbdsh,
//! fio. Data is checked both through the clients and in the backing files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn nbdinfo_json(args: &[&str]) -> serde_json::Value {
    let out = run_ok(Command::new("nbdinfo").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo {args:?}: not JSON ({e}):\n{out}"))
}

fn assert_flags(e: &serde_json::Value) {
    for f in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(e[f], true, "{f} of export {}: {e}", e["export-name"]);
    }
    assert_eq!(e["is_read_only"], false, "{e}");
}

#[test]
fn nbdinfo_lists_exports_with_sizes_and_flags() {
    require!("nbdinfo");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 16 * MIB);
    let b = d.make_file_s("b.img", 16 * MIB);
    d.create("lin", &format!("0 8192 linear {a} 0"));
    d.create("str", &format!("0 32768 striped 2 64 {a} 8192 {b} 0"));
    d.create("two", &format!("0 2048 linear {b} 16384\n2048 1024 zero"));

    let list = nbdinfo_json(&["--list", "--json", &format!("nbd+unix://?socket={}", d.nbd.display())]);
    let mut exports: Vec<(String, u64)> = list["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports array: {list}"))
        .iter()
        .map(|e| {
            assert_flags(e);
            (e["export-name"].as_str().unwrap().to_string(), e["export-size"].as_u64().unwrap())
        })
        .collect();
    exports.sort();
    assert_eq!(
        exports,
        [("lin".to_string(), 4 * MIB), ("str".to_string(), 16 * MIB), ("two".to_string(), 3072 * 512)],
        "{list}"
    );

    for (name, size) in [("lin", 4 * MIB), ("str", 16 * MIB)] {
        let v = nbdinfo_json(&["--json", &d.uri(name)]);
        let e = &v["exports"][0];
        assert_eq!(e["export-name"], name, "{v}");
        assert_eq!(e["export-size"], size, "{v}");
        assert_flags(e);
    }
    // A device with no clients still shows open count 0 after nbdinfo went away.
    assert!(wait_until(std::time::Duration::from_secs(10), || d.open_count("lin") == 0));
}

#[test]
fn qemu_io_patterns_fua_discard_on_linear() {
    require!("qemu-io");
    let d = Daemon::start();
    let a = d.make_file("a.img", 8 * MIB);
    // The device starts 1 MiB into the file.
    d.create("lin", &format!("0 8192 linear {} 2048", a.display()));
    let uri = d.uri("lin");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x11 0 1M",
            "write -f -P 0x22 1M 512k", // FUA
            "write -P 0x33 3583k 2k",   // unaligned to 4k, across a 1 MiB boundary
            "write -P 0x44 4092k 4k",   // the last 4 KiB of the device
            "write -z 2M 64k",          // write zeroes
            "flush",
            "read -P 0x11 0 1M",
            "read -P 0x22 1M 512k",
            "read -P 0x33 3583k 2k",
            "read -P 0x44 4092k 4k",
            "read -P 0 2M 64k",
            "read -P 0 1536k 512k", // never written
        ],
    );
    // The data is in the file, shifted by the table's offset.
    assert_eq!(read_at(&a, MIB, 4096), vec![0x11; 4096]);
    assert_eq!(read_at(&a, 2 * MIB, 4096), vec![0x22; 4096]);
    assert_eq!(read_at(&a, MIB + 3583 * KIB, 2048), vec![0x33; 2048]);
    assert_eq!(read_at(&a, MIB + 4092 * KIB, 4096), vec![0x44; 4096]);
    assert_eq!(read_at(&a, 0, 4096), vec![0; 4096], "nothing before the segment's offset");
    assert_eq!(read_at(&a, 5 * MIB, 4096), vec![0; 4096], "nothing past the segment");

    // Discard: the neighbours keep their data; on a regular file the range is
    // deallocated and reads back as zeros.
    qemu_io_ok(&uri, &["discard 64k 128k", "read -P 0x11 0 64k", "read -P 0x11 192k 64k", "read -P 0 64k 128k"]);
    assert_eq!(read_at(&a, MIB + 64 * KIB, 4096), vec![0; 4096]);
    // A failing pattern check is caught (the check itself works).
    let o = qemu_io(&uri, &["read -P 0x99 0 4k"]);
    assert!(!o.status.success() || String::from_utf8_lossy(&o.stdout).contains("failed"), "{}", show(&o));
}

/// Where each byte of a device lives: a list of segments, each linear or striped.
enum Seg {
    Linear { start: u64, len: u64, file: PathBuf, off: u64 },
    Striped { start: u64, len: u64, chunk: u64, stripes: Vec<(PathBuf, u64)> },
}

/// (file, byte offset) of device byte `pos` (all in bytes).
fn locate(segs: &[Seg], pos: u64) -> (PathBuf, u64) {
    for s in segs {
        match s {
            Seg::Linear { start, len, file, off } if pos >= *start && pos < start + len => {
                return (file.clone(), off + pos - start)
            }
            Seg::Striped { start, len, chunk, stripes } if pos >= *start && pos < start + len => {
                let rel = pos - start;
                let c = rel / chunk;
                let n = stripes.len() as u64;
                let (f, o) = &stripes[(c % n) as usize];
                return (f.clone(), o + (c / n) * chunk + rel % chunk);
            }
            _ => {}
        }
    }
    panic!("{pos} not mapped");
}

/// Check that device bytes `[pos, pos+data.len())` are `data` in the backing files.
fn check_layout(segs: &[Seg], pos: u64, data: &[u8]) {
    let mut files: std::collections::HashMap<PathBuf, Vec<u8>> = Default::default();
    for (i, want) in data.iter().enumerate() {
        let (f, o) = locate(segs, pos + i as u64);
        let content = files.entry(f.clone()).or_insert_with(|| std::fs::read(&f).unwrap());
        assert_eq!(content[o as usize], *want, "device byte {} should be at {}:{o}", pos + i as u64, f.display());
    }
}

#[test]
fn qemu_io_across_stripe_chunks_and_segment_boundary() {
    require!("qemu-io");
    let d = Daemon::start();
    let a = d.make_file("a.img", 8 * MIB);
    let b = d.make_file("b.img", 8 * MIB);
    let c = d.make_file("c.img", 8 * MIB);
    // 2 MiB linear on a (from 1 MiB), then 6 MiB striped over b and c, 8 KiB chunks,
    // c's stripe starting 64 KiB in.
    let table = format!(
        "0 4096 linear {a} 2048\n4096 12288 striped 2 16 {b} 0 {c} 128\n",
        a = a.display(),
        b = b.display(),
        c = c.display()
    );
    d.create("mix", &table);
    let segs = [
        Seg::Linear { start: 0, len: 2 * MIB, file: a.clone(), off: MIB },
        Seg::Striped {
            start: 2 * MIB,
            len: 6 * MIB,
            chunk: 8 * KIB,
            stripes: vec![(b.clone(), 0), (c.clone(), 64 * KIB)],
        },
    ];
    let uri = d.uri("mix");
    let boundary = 2 * MIB;
    qemu_io_ok(
        &uri,
        &[
            // Straddles the segment boundary and then five stripe chunks, unaligned.
            &format!("write -P 0x5a {} 45000", boundary - 3000),
            // Inside the striped segment: across one chunk boundary only.
            &format!("write -f -P 0x6b {} 8192", boundary + 64 * KIB + 4096),
            &format!("read -P 0x5a {} 45000", boundary - 3000),
            &format!("read -P 0x6b {} 8192", boundary + 64 * KIB + 4096),
            // The bytes just around stay zero.
            &format!("read -P 0 {} 1000", boundary - 4000),
            // Discard across the boundary and write zeroes across chunks.
            &format!("discard {} 8192", boundary - 4096),
            &format!("read -P 0 {} 8192", boundary - 4096),
            &format!("write -z {} 20000", boundary + 10000),
            &format!("read -P 0 {} 20000", boundary + 10000),
        ],
    );

    // Random data straddling everything, written from a file, checked in the backing files.
    let data = random_bytes(100_000);
    let src = d.path("rand.bin");
    std::fs::write(&src, &data).unwrap();
    let pos = boundary - 33_333;
    qemu_io_ok(&uri, &[&format!("write -s {} {pos} {}", src.display(), data.len())]);
    check_layout(&segs, pos, &data);
    // And read back through the device.
    let dump = d.path("dump.bin");
    require!("nbdcopy");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&dump));
    let dev = std::fs::read(&dump).unwrap();
    assert_eq!(dev.len() as u64, 8 * MIB);
    assert!(dev[pos as usize..pos as usize + data.len()] == data[..], "device read differs from what was written");
    // The whole device image equals its layout over the files.
    let mut cache: std::collections::HashMap<PathBuf, Vec<u8>> = Default::default();
    for p in (0..8 * MIB).step_by(4093) {
        let (f, o) = locate(&segs, p);
        let content = cache.entry(f.clone()).or_insert_with(|| std::fs::read(&f).unwrap());
        assert_eq!(dev[p as usize], content[o as usize], "device byte {p}");
    }
}

#[test]
fn qemu_img_convert_and_compare() {
    require!("qemu-img", "qemu-io");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 16 * MIB);
    let b = d.make_file_s("b.img", 16 * MIB);
    d.create("s", &format!("0 16384 striped 2 128 {a} 0 {b} 0\n16384 8192 linear {a} 16384"));
    let uri = d.uri("s");
    let src = d.path("src.img");
    std::fs::write(&src, random_bytes((12 * MIB) as usize)).unwrap();
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    let cmp = |expect_same: bool| {
        let o = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
        if expect_same {
            assert!(o.status.success(), "qemu-img compare: {}", show(&o));
        } else {
            assert_eq!(o.status.code(), Some(1), "qemu-img compare should see a difference: {}", show(&o));
        }
    };
    cmp(true);
    // One changed sector is seen.
    qemu_io_ok(&uri, &["write -P 0xee 9437184 512"]);
    cmp(false);
}

#[test]
fn nbdcopy_both_directions() {
    require!("nbdcopy");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 16 * MIB);
    let b = d.make_file_s("b.img", 16 * MIB);
    let c = d.make_file_s("c.img", 16 * MIB);
    d.create("s3", &format!("0 30720 striped 3 1024 {a} 0 {b} 0 {c} 0"));
    let size = 30720 * 512;
    let uri = d.uri("s3");
    let src = d.path("src.img");
    let data = random_bytes(size);
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    let out = d.path("out.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "nbdcopy device -> file differs from file -> device");
    // The first chunk of each stripe is in its file.
    assert_eq!(read_at(Path::new(&a), 0, 512 * KIB as usize), data[..512 * KIB as usize]);
    assert_eq!(read_at(Path::new(&b), 0, 512 * KIB as usize), data[512 * KIB as usize..1024 * KIB as usize]);
    assert_eq!(read_at(Path::new(&c), 0, 512 * KIB as usize), data[1024 * KIB as usize..1536 * KIB as usize]);
}

#[test]
fn nbdsh_out_of_range_errors_keep_the_connection() {
    require!("nbdsh");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 4 * MIB);
    d.create("r", &format!("0 2048 linear {a} 0"));
    // Client-side bounds checks off, so the requests reach the server.
    let script = r#"
import errno
h.set_strict_mode(0)
size = h.get_size()
print("size", size)
def attempt(name, f):
    try:
        f()
        print(name, "OK")
    except nbd.Error as e:
        print(name, "ERR", errno.errorcode.get(e.errno, e.errno))
attempt("read_past_end", lambda: h.pread(4096, size))
attempt("read_straddling_end", lambda: h.pread(4096, size - 512))
attempt("write_past_end", lambda: h.pwrite(b"x" * 4096, size))
attempt("write_straddling_end", lambda: h.pwrite(b"x" * 4096, size - 512))
attempt("trim_past_end", lambda: h.trim(4096, size))
print("tail", "OK" if h.pread(512, size - 512) == b"\0" * 512 else "BAD")
h.pwrite(b"\xab" * 4096, size - 4096)
h.flush()
print("after", "OK" if h.pread(4096, size - 4096) == b"\xab" * 4096 else "BAD")
print("first", "OK" if h.pread(512, 0) == b"\0" * 512 else "BAD")
"#;
    let out = run_ok(nbdsh().args(["-u", &d.uri("r"), "-c", script]));
    let has = |l: &str| out.lines().any(|x| x.trim() == l);
    assert!(has("size 1048576"), "{out}");
    assert!(has("read_past_end ERR EINVAL"), "{out}");
    assert!(has("read_straddling_end ERR EINVAL"), "{out}");
    assert!(has("write_past_end ERR ENOSPC"), "{out}");
    assert!(has("write_straddling_end ERR ENOSPC"), "{out}");
    assert!(out.contains("trim_past_end ERR"), "{out}");
    assert!(has("after OK") && has("first OK"), "the connection must still work after errors: {out}");
    assert!(has("tail OK"), "a write refused for straddling the end must not write the part that fits: {out}");
    assert_eq!(read_at(Path::new(&a), MIB - 512, 512), vec![0xab; 512]);
}

#[test]
fn nbdsh_unknown_export_is_an_error() {
    require!("nbdsh", "qemu-io");
    let d = Daemon::start();
    d.create("known", "0 2048 zero");
    let script = format!(
        r#"
try:
    h.connect_uri("{}")
    print("CONNECTED")
except nbd.Error as e:
    print("ERR", e)
"#,
        d.uri("unknown")
    );
    let out = run_ok(nbdsh().args(["-c", &script]));
    assert!(out.starts_with("ERR"), "connecting to an unknown export must fail: {out}");
    // nbdinfo agrees, and the known export still works.
    if have_or_skip("nbdinfo") {
        let o = run(Command::new("nbdinfo").arg(d.uri("unknown")));
        assert!(!o.status.success(), "{}", show(&o));
    }
    qemu_io_ok(&d.uri("known"), &["read -P 0 0 64k"]);
}

#[test]
fn fio_randwrite_verify_on_striped() {
    require!("fio");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 16 * MIB);
    let b = d.make_file_s("b.img", 16 * MIB);
    d.create("f", &format!("0 65536 striped 2 128 {a} 0 {b} 0"));
    let out = run_ok(
        Command::new("fio")
            // fio writes verify state files into its working directory: keep them out of the tree.
            .current_dir(d.dir())
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", d.uri("f")),
                "--rw=randwrite",
                "--bs=4k",
                "--size=30M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
            ]),
    );
    let json_start = out.find('{').unwrap_or_else(|| panic!("no JSON from fio:\n{out}"));
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 30 * MIB, "all 30 MiB written: {}", job["write"]);
    assert_eq!(job["read"]["io_bytes"], 30 * MIB, "all 30 MiB read back to verify: {}", job["read"]);
}

#[test]
fn qemu_io_patterns_on_striped() {
    require!("qemu-io");
    let d = Daemon::start();
    let files: Vec<PathBuf> = (0..3).map(|i| d.make_file(&format!("s{i}.img"), 4 * MIB)).collect();
    // Three stripes of 4 KiB chunks; the second stripe starts 8 KiB into its file.
    let table =
        format!("0 12288 striped 3 8 {} 0 {} 16 {} 0", files[0].display(), files[1].display(), files[2].display());
    d.create("st", &table);
    let segs = [Seg::Striped {
        start: 0,
        len: 6 * MIB,
        chunk: 4 * KIB,
        stripes: vec![(files[0].clone(), 0), (files[1].clone(), 8 * KIB), (files[2].clone(), 0)],
    }];
    let uri = d.uri("st");
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x01 0 4k",      // chunk 0, stripe 0
            "write -P 0x02 4k 4k",     // chunk 1, stripe 1
            "write -P 0x03 8k 4k",     // chunk 2, stripe 2
            "write -f -P 0x04 14k 9k", // straddles chunks 3, 4, 5 (FUA)
            "write -P 0x05 1020k 1M",  // many chunks, unaligned start
            "read -P 0x01 0 4k",
            "read -P 0x02 4k 4k",
            "read -P 0x03 8k 4k",
            "read -P 0x04 14k 9k",
            "read -P 0x05 1020k 1M",
            "read -P 0 12k 2k",
            "discard 1M 64k",
            "read -P 0x05 1020k 4k",
            "read -P 0 1M 64k",
            "read -P 0x05 1088k 4k",
        ],
    );
    assert_eq!(read_at(&files[0], 0, 4096), vec![0x01; 4096]);
    assert_eq!(read_at(&files[1], 8 * KIB, 4096), vec![0x02; 4096]);
    assert_eq!(read_at(&files[2], 0, 4096), vec![0x03; 4096]);
    assert_eq!(read_at(&files[1], 0, 8192), vec![0; 8192], "nothing before stripe 1's offset");
    check_layout(&segs, 14 * KIB, &vec![0x04; 9 * 1024]);
    // 0x05 on 1020k..2044k except the discarded 1024k..1088k, which reads as zeros.
    check_layout(&segs, 1020 * KIB, &vec![0x05; 4 * 1024]);
    check_layout(&segs, MIB, &vec![0; 64 * 1024]);
    check_layout(&segs, 1088 * KIB, &vec![0x05; 956 * 1024]);
}

/// `create --readonly`: the device refuses writes with EPERM (also when a client sends
/// one it was told not to), is advertised read-only over NBD, says so in `info` and
/// `ls`, and stays so across a restart.
#[test]
fn a_readonly_device_is_exported_read_only_and_refuses_writes() {
    require!("nbdinfo", "nbdsh", "qemu-io");
    let mut d = Daemon::start();
    let a = d.path("a.img");
    fill_file(&a, 0x5a, MIB as usize);
    d.cli_ok(&["create", "ro", "--readonly", "--table", &format!("0 2048 linear {} 0", a.display())]);
    let check = |d: &Daemon| {
        let e = nbdinfo_json(&["--json", &d.uri("ro")]);
        let e = &e["exports"][0];
        assert_eq!(e["is_read_only"], true, "{e}");
        for f in ["can_fua", "can_trim", "can_zero"] {
            assert_eq!(e[f], false, "{f}: {e}");
        }
        assert_eq!(e["can_flush"], true, "{e}");
        assert_eq!(d.info("ro")["read_only"], true);
        assert!(d.cli_ok(&["info", "ro"]).contains("State:             ACTIVE (READ-ONLY)"));
        assert!(d.cli_ok(&["ls"]).contains("ro\t(2048 sectors, active, read-only)"));
        let out = run_ok(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", &d.uri("ro")]));
        assert!(out.contains("read 65536/65536"), "{out}");
        // A client that ignores the flag (libnbd's strict mode off) gets EPERM for every
        // kind of write; the file is untouched.
        let script = format!(
            "import errno\nh.set_strict_mode(0)\nh.connect_uri({:?})\n\
             for name, f in [('write', lambda: h.pwrite(b'x' * 512, 0)), ('trim', lambda: h.trim(512, 0)), \
             ('zero', lambda: h.zero(512, 0)), ('fua', lambda: h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_FUA))]:\n\
             \x20   try:\n        f()\n        print(name, 'OK')\n\
             \x20   except nbd.Error as e:\n        print(name, errno.errorcode.get(e.errno, e.errno))\n\
             h.flush()\nprint('flush OK')",
            d.uri("ro")
        );
        let out = run_ok(nbdsh().args(["-c", &script]));
        assert_eq!(out, "write EPERM\ntrim EPERM\nzero EPERM\nfua EPERM\nflush OK\n");
        assert_eq!(std::fs::read(&a).unwrap(), vec![0x5a; MIB as usize]);
    };
    check(&d);
    d.restart();
    check(&d);
    // A writable device beside it is not affected.
    let b = d.make_file_s("b.img", MIB);
    d.create("rw", &format!("0 2048 linear {b} 0"));
    assert_eq!(d.info("rw")["read_only"], false);
    qemu_io_ok(&d.uri("rw"), &["write -P 0x11 0 4k", "read -P 0x11 0 4k"]);
}

/// A replicator control device holds no data: it is not exported (not listed, and
/// refused by name with the reason), while its group's devices are.
#[test]
fn a_replicator_control_device_is_not_exported() {
    require!("nbdinfo", "qemu-io");
    let d = Daemon::start();
    let ld = d.make_file_s("ld", 16 * MIB);
    let rd = d.make_file_s("rd", 16 * MIB);
    let ld1 = d.make_file_s("ld1", 16 * MIB);
    let rd1 = d.make_file_s("rd1", 16 * MIB);
    let log = d.make_file_s("replog", 16 * MIB);
    let log1 = d.make_file_s("replog1", 16 * MIB);
    d.create(
        "r0",
        &format!(
            "0 32768 replicator default 4 {log} 0 auto 16384 local 2 0 asynchronous 2 0 {ld} - 0 \
             local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync"
        ),
    );
    // The two-target form: a control device and a replicator-dev.
    d.create("grp", &format!("0 8 replicator default 4 {log1} 0 auto 16384 local 1 0 local 2 1 async"));
    d.create("db0", &format!("0 32768 replicator-dev grp 0 0 1 {ld1} - 0 1 1 {rd1} core 2 2048 nosync"));
    let list = nbdinfo_json(&["--list", "--json", &format!("nbd+unix://?socket={}", d.nbd.display())]);
    let mut names: Vec<&str> =
        list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["db0", "r0-0"], "{list}");
    for ctl in ["r0", "grp"] {
        // (libnbd shows the server's message in its debug output.)
        let o = run(Command::new("nbdinfo").arg(d.uri(ctl)).env("LIBNBD_DEBUG", "1"));
        assert!(!o.status.success(), "{}", show(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("is a replicator control device: it holds no data and is not exported"), "{err}");
        let o = qemu_io(&d.uri(ctl), &["read 0 4k"]);
        assert!(!o.status.success(), "{}", show(&o));
    }
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x21 0 4k", "read -P 0x21 0 4k"]);
    qemu_io_ok(&d.uri("db0"), &["write -P 0x22 0 4k", "read -P 0x22 0 4k"]);
}
