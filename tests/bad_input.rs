//! Bad input never crashes the daemon: malformed tables, wrong parameters, missing
//! files, unknown devices, and NBD clients that send garbage or vanish mid-request.
//! Each error is one line naming the problem; the daemon keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// A daemon with a healthy device `good` (with a known pattern) to check it still serves.
fn daemon_with_good_device() -> Daemon {
    let d = Daemon::start_with_tcp();
    let g = d.make_file_s("good.img", 4 * MIB);
    d.create("good", &format!("0 8192 linear {g} 0"));
    if have_or_skip("qemu-io") {
        qemu_io_ok(&d.uri("good"), &["write -P 0x4e 0 1M"]);
    }
    d
}

fn still_serving(d: &mut Daemon) {
    assert!(d.alive(), "the daemon died\n{}", d.log_text());
    assert!(d.names().contains(&"good".to_string()));
    if have_or_skip("qemu-io") {
        qemu_io_ok(&d.uri("good"), &["read -P 0x4e 0 1M", "write -P 0x4e 1M 4k", "read -P 0x4e 1M 4k"]);
    }
}

#[test]
fn malformed_tables_are_refused_with_a_clear_error() {
    let mut d = daemon_with_good_device();
    let f = d.make_file_s("f.img", 4 * MIB); // 8192 sectors
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("missing length", format!("0 linear {f} 0"), &["length"]),
        ("gap", format!("0 1024 linear {f} 0\n2048 1024 linear {f} 1024"), &["gap"]),
        ("overlap", format!("0 2048 linear {f} 0\n1024 1024 linear {f} 2048"), &["overlap"]),
        ("not starting at 0", "8 1024 zero".to_string(), &["start"]),
        ("bad start number", "x 1024 zero".to_string(), &["start"]),
        ("bad length number", "0 12k34 zero".to_string(), &["length", "12k34"]),
        ("negative length", "0 -8 zero".to_string(), &["length"]),
        ("zero length", "0 0 zero".to_string(), &["length"]),
        ("empty table", "# only a comment\n".to_string(), &["segment"]),
        ("unknown target", "0 1024 frobnicate a b".to_string(), &["frobnicate"]),
        ("linear: too few params", format!("0 1024 linear {f}"), &["linear", "parameters"]),
        ("linear: too many params", format!("0 1024 linear {f} 0 0"), &["linear", "parameters"]),
        ("linear: bad offset", format!("0 1024 linear {f} ten"), &["linear", "ten"]),
        ("zero: params", "0 1024 zero 1".to_string(), &["zero", "parameters"]),
        ("error: params", "0 1024 error x".to_string(), &["error", "parameters"]),
        ("striped: count mismatch", format!("0 1024 striped 2 8 {f} 0"), &["striped", "parameters"]),
        ("striped: no params", "0 1024 striped".to_string(), &["striped"]),
        ("striped: chunk not power of two", format!("0 1536 striped 2 12 {f} 0 {f} 4096"), &["power of two"]),
        ("striped: chunk too small", format!("0 1024 striped 2 4 {f} 0 {f} 4096"), &["power of two"]),
        ("striped: zero stripes", "0 1024 striped 0 8".to_string(), &["stripes"]),
        ("striped: length not a multiple", format!("0 1032 striped 2 8 {f} 0 {f} 4096"), &["multiple"]),
        ("striped: bad stripe offset", format!("0 1024 striped 2 8 {f} 0 {f} x1"), &["x1"]),
        (
            "missing file",
            "0 1024 linear /nonexistent/dmrep-missing.img 0".to_string(),
            &["/nonexistent/dmrep-missing.img"],
        ),
        ("linear past the end of its file", format!("0 8200 linear {f} 0"), &["past the end"]),
        ("linear offset past the end", format!("0 1024 linear {f} 8000"), &["past the end"]),
        ("stripe past the end", format!("0 8192 striped 2 8 {f} 0 {f} 4100"), &["past the end"]),
        ("missing file in 2nd segment", format!("0 8 linear {f} 0\n8 8 linear /nonexistent/seg2 0"), &["seg2"]),
    ];
    for (what, table, words) in &cases {
        let e = d.cli_err(&["create", "bad", "--table", table]);
        for w in *words {
            assert!(e.to_lowercase().contains(&w.to_lowercase()), "{what}: error should mention {w:?}: {e}");
        }
        assert_eq!(d.names(), ["good"], "{what}: a refused create leaves no device behind");
        // The same table through `load` on an existing device: refused, nothing loaded.
        let e = d.cli_err(&["load", "good", "--table", table]);
        for w in *words {
            assert!(e.to_lowercase().contains(&w.to_lowercase()), "{what} (load): error should mention {w:?}: {e}");
        }
        assert_eq!(d.info("good")["inactive_table"], false, "{what}: a refused load loads nothing");
    }
    // Errors name the line of a multi-line table.
    let e = d.cli_err(&["create", "bad", "--table", &format!("0 8 linear {f} 0\n\n8 8 linear {f}")]);
    assert!(e.contains("line 3"), "the error names line 3: {e}");
    // Table file that does not exist.
    let e = d.cli_err(&["create", "bad", "/nonexistent/table.txt"]);
    assert!(e.contains("/nonexistent/table.txt"), "{e}");
    still_serving(&mut d);
}

/// UUIDs key the daemon's records and are printed on lines of text: empty ones, ones
/// with a control character (a newline) or surrounding space, over-long ones, and one
/// another device has are refused (issue 8: all were accepted, and removing one of two
/// devices with the same UUID forgot both).
#[test]
fn bad_and_duplicate_uuids_are_refused() {
    let mut d = daemon_with_good_device();
    d.cli_ok(&["create", "u1", "--uuid", "LVM-abc 123", "--table", "0 8 zero"]);
    assert_eq!(d.info("u1")["uuid"], "LVM-abc 123");
    let long = "x".repeat(129);
    for bad in ["", "a\nb", "tab\there", " lead", "trail ", long.as_str()] {
        let e = d.cli_err(&["create", "u2", "--uuid", bad, "--table", "0 8 zero"]);
        assert_eq!(
            e,
            format!(
                "dmrep: invalid UUID {bad:?}: use 1-128 characters, no control characters (such as a newline) \
                 and no leading or trailing space"
            )
        );
    }
    d.cli_ok(&["create", "u2", "--uuid", &"y".repeat(128), "--table", "0 8 zero"]);
    let e = d.cli_err(&["create", "u3", "--uuid", "LVM-abc 123", "--table", "0 8 zero"]);
    assert_eq!(e, "dmrep: UUID LVM-abc 123 is already used by device u1");
    let good = d.info("good")["uuid"].as_str().unwrap().to_string();
    let e = d.cli_err(&["create", "u3", "--uuid", &good, "--table", "0 8 zero"]);
    assert_eq!(e, format!("dmrep: UUID {good} is already used by device good"));
    // Nothing was created, and each device keeps its own record across a restart.
    assert_eq!(d.names(), ["good", "u1", "u2"]);
    d.cli_ok(&["remove", "u1"]);
    d.restart();
    assert_eq!(d.names(), ["good", "u2"]);
    still_serving(&mut d);
}

#[test]
fn names_and_unknown_devices() {
    let mut d = daemon_with_good_device();
    let e = d.cli_err(&["create", "good", "--table", "0 8 zero"]);
    assert!(e.contains("good") && e.contains("exists"), "{e}");
    assert_eq!(d.info("good")["size_sectors"], 8192, "a duplicate create does not touch the device");
    for bad in ["bad/name", ".hidden", "-dash", "with space", ""] {
        let e = d.cli_err(&["create", "--table", "0 8 zero", "--", bad]);
        assert!(e.contains("name"), "{bad:?}: {e}");
    }
    let e = d.cli_err(&["rename", "good", "bad/name"]);
    assert!(e.contains("name"), "{e}");
    assert_eq!(d.names(), ["good"]);

    let commands: Vec<Vec<&str>> = vec![
        vec!["load", "nosuch", "--table", "0 8 zero"],
        vec!["clear", "nosuch"],
        vec!["suspend", "nosuch"],
        vec!["resume", "nosuch"],
        vec!["remove", "nosuch"],
        vec!["remove", "--force", "nosuch"],
        vec!["rename", "nosuch", "other"],
        vec!["status", "nosuch"],
        vec!["status", "nosuch", "--json"],
        vec!["table", "nosuch"],
        vec!["table", "nosuch", "--inactive"],
        vec!["info", "nosuch"],
        vec!["info", "nosuch", "--json"],
        vec!["message", "nosuch", "0", "hello"],
        vec!["wait", "nosuch"],
        vec!["wait", "nosuch", "--resync", "--timeout", "1"],
    ];
    for c in &commands {
        let e = d.cli_err(c);
        assert_eq!(e, "dmrep: device nosuch not found", "{c:?}");
    }
    // Resume with nothing loaded on an active device is harmless; message past the end fails.
    d.cli_ok(&["resume", "good"]);
    let e = d.cli_err(&["message", "good", "8192", "x"]);
    assert!(e.contains("8192"), "{e}");
    still_serving(&mut d);
}

// ---- raw NBD clients ----

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;

fn set_timeouts<S: RawSock>(s: &S) {
    s.timeouts(Some(Duration::from_secs(10)));
}

trait RawSock: Read + Write {
    fn timeouts(&self, t: Option<Duration>);
}
impl RawSock for UnixStream {
    fn timeouts(&self, t: Option<Duration>) {
        self.set_read_timeout(t).unwrap();
        self.set_write_timeout(t).unwrap();
    }
}
impl RawSock for TcpStream {
    fn timeouts(&self, t: Option<Duration>) {
        self.set_read_timeout(t).unwrap();
        self.set_write_timeout(t).unwrap();
    }
}

/// Read the server's greeting and check it.
fn greeting(s: &mut impl Read) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..8], NBDMAGIC);
    assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
}

/// The server must close the connection (EOF or reset) within the read timeout,
/// whatever it sends before.
fn expect_closed(s: &mut impl Read, what: &str) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("{what}: the server should close the connection, but: {e}"),
        }
    }
}

/// Fixed-newstyle handshake and NBD_OPT_GO for `name`; returns the export size.
fn handshake_go(s: &mut (impl Read + Write), name: &str) -> u64 {
    greeting(s);
    s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut size = None;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply header");
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).unwrap();
        match typ {
            1 => return size.expect("NBD_INFO_EXPORT before ACK"), // NBD_REP_ACK
            3 => {
                // NBD_REP_INFO
                if u16::from_be_bytes(data[..2].try_into().unwrap()) == 0 {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
            }
            t => panic!("unexpected option reply type {t:#x}: {:?}", String::from_utf8_lossy(&data)),
        }
    }
}

fn request_header(typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&typ.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

#[test]
fn garbage_instead_of_handshake_reply() {
    let mut d = daemon_with_good_device();
    // Unix: garbage client flags.
    let mut s = UnixStream::connect(&d.nbd).unwrap();
    set_timeouts(&s);
    greeting(&mut s);
    s.write_all(&[0xff; 64]).unwrap();
    expect_closed(&mut s, "unix garbage flags");
    // TCP: an HTTP request.
    let mut t = TcpStream::connect(d.tcp.as_ref().unwrap()).unwrap();
    set_timeouts(&t);
    greeting(&mut t);
    t.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    expect_closed(&mut t, "tcp http");
    // Valid flags, then an option header with a wrong magic.
    let mut s = UnixStream::connect(&d.nbd).unwrap();
    set_timeouts(&s);
    greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
    expect_closed(&mut s, "bad option magic");
    // An option claiming 2 GiB of data, then gone: nothing is allocated or waited for.
    let mut s = UnixStream::connect(&d.nbd).unwrap();
    set_timeouts(&s);
    greeting(&mut s);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    s.write_all(&opt).unwrap();
    let _ = s.write_all(&[0u8; 1000]);
    drop(s);
    // Connections that say nothing and go away, some before the greeting is read.
    for _ in 0..20 {
        drop(UnixStream::connect(&d.nbd).unwrap());
        drop(TcpStream::connect(d.tcp.as_ref().unwrap()).unwrap());
    }
    // A valid handshake followed by a request with a bad magic: the connection closes.
    let mut s = UnixStream::connect(&d.nbd).unwrap();
    set_timeouts(&s);
    assert_eq!(handshake_go(&mut s, "good"), 4 * MIB);
    s.write_all(&[0xde; 28]).unwrap();
    expect_closed(&mut s, "bad request magic");
    still_serving(&mut d);
    assert!(wait_until(Duration::from_secs(10), || d.open_count("good") == 0), "all raw connections closed");
}

#[test]
fn client_disconnects_in_the_middle_of_a_write() {
    let mut d = daemon_with_good_device();
    for (i, over_tcp) in [false, true, false, true].into_iter().enumerate() {
        let mut s: Box<dyn RawSockDyn> = if over_tcp {
            let t = TcpStream::connect(d.tcp.as_ref().unwrap()).unwrap();
            set_timeouts(&t);
            Box::new(t)
        } else {
            let u = UnixStream::connect(&d.nbd).unwrap();
            set_timeouts(&u);
            Box::new(u)
        };
        assert_eq!(handshake_go(&mut s, "good"), 4 * MIB);
        assert!(wait_until(Duration::from_secs(10), || d.open_count("good") >= 1));
        // WRITE of 1 MiB at 2 MiB, then only 4 KiB of it, then gone.
        s.write_all(&request_header(1, i as u64, 2 * MIB, MIB as u32)).unwrap();
        s.write_all(&[0x99; 4096]).unwrap();
        drop(s);
        assert!(
            wait_until(Duration::from_secs(10), || d.open_count("good") == 0),
            "the half-written connection is cleaned up"
        );
    }
    // A client that sends a read and disappears before the reply.
    let mut s = UnixStream::connect(&d.nbd).unwrap();
    set_timeouts(&s);
    handshake_go(&mut s, "good");
    s.write_all(&request_header(0, 1, 0, MIB as u32)).unwrap();
    drop(s);
    assert!(wait_until(Duration::from_secs(10), || d.open_count("good") == 0));
    still_serving(&mut d);
    if have_or_skip("qemu-io") {
        // The interrupted write was not applied half-way as if it had completed.
        qemu_io_ok(&d.uri("good"), &["read -P 0 2M 1M"]);
    }
}

trait RawSockDyn: Read + Write {}
impl<T: Read + Write> RawSockDyn for T {}
