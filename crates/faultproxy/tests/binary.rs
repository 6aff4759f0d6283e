//! The `dmrep-faultproxy` binary: flags, the `listening` line, and the control socket.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The child process, killed if a test fails before it quits.
struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> Proxy {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmrep-faultproxy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim_end().strip_prefix("listening ").unwrap_or_else(|| panic!("first line {line:?}")).parse().unwrap();
    Proxy { child, addr }
}

struct Control {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Control {
    fn connect(path: &Path) -> Control {
        let out = UnixStream::connect(path).unwrap();
        out.set_read_timeout(Some(PATIENCE)).unwrap();
        let input = BufReader::new(out.try_clone().unwrap());
        Control { out, input }
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.out, "{cmd}").unwrap();
        let mut line = String::new();
        self.input.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }

    fn ok(&mut self, cmd: &str) {
        assert_eq!(self.ask(cmd), "ok", "{cmd}");
    }

    fn stats(&mut self) -> serde_json::Value {
        let line = self.ask("stats");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("stats answered {line:?}: {e}"))
    }
}

#[test]
fn control_socket_drives_every_fault() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl.sock");
    let target = echo_server();
    let mut proxy = spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--target",
        &target.to_string(),
        "--control",
        ctl.to_str().unwrap(),
        "--delay-ms",
        "30",
    ]);
    // The control socket is up by the time the address is printed.
    let mut ctl_conn = Control::connect(&ctl);

    // --delay-ms applies from the start.
    let mut c = connect(proxy.addr);
    let t = Instant::now();
    echo(&mut c, b"ping");
    assert!(t.elapsed() >= Duration::from_millis(60), "round trip {:?}", t.elapsed());

    // The proxy counts a write once it returns, which can be after our read.
    wait_until("the echo is counted", || ctl_conn.stats()["bytes_down"] == 4);
    let s = ctl_conn.stats();
    assert_eq!(s["accepted"], 1);
    assert_eq!(s["active"], 1);
    assert_eq!(s["refused"], 0);
    assert_eq!(s["bytes_up"], 4);
    assert_eq!(s["bytes_down"], 4);

    ctl_conn.ok("delay 0");
    ctl_conn.ok("rate 100000000");
    ctl_conn.ok("rate off");

    // Malformed commands are answered, and change nothing.
    for bad in ["", "nonsense", "delay soon", "rate -5", "blackhole maybe", "stall left on", "refuse"] {
        let answer = ctl_conn.ask(bad);
        assert!(answer.starts_with("error: "), "{bad:?} answered {answer:?}");
    }

    ctl_conn.ok("stall up on");
    c.write_all(b"held").unwrap();
    expect_silent(&mut c, Duration::from_millis(300));
    ctl_conn.ok("stall up off");
    expect_read(&mut c, b"held");

    ctl_conn.ok("stall down on");
    c.write_all(b"back").unwrap();
    expect_silent(&mut c, Duration::from_millis(300));
    ctl_conn.ok("stall down off");
    expect_read(&mut c, b"back");

    // A second control connection works alongside the first.
    let mut other = Control::connect(&ctl);
    other.ok("blackhole on");
    c.write_all(b"void").unwrap();
    expect_silent(&mut c, Duration::from_millis(300));
    ctl_conn.ok("blackhole off");
    expect_closed(&mut c);

    ctl_conn.ok("refuse on");
    let mut r = connect(proxy.addr);
    expect_closed(&mut r);
    ctl_conn.ok("refuse off");

    let mut d = connect(proxy.addr);
    echo(&mut d, b"hi");
    ctl_conn.ok("drop");
    expect_closed(&mut d);

    let s = ctl_conn.stats();
    assert_eq!(s["accepted"], 3);
    assert_eq!(s["refused"], 1);

    ctl_conn.ok("quit");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after quit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert!(!ctl.exists(), "control socket left behind");
}

#[test]
fn flags_set_faults_at_start() {
    let target = echo_server();
    let proxy =
        spawn(&["--listen", "127.0.0.1:0", "--target", &target.to_string(), "--stall", "down", "--rate", "1000000"]);
    let mut c = connect(proxy.addr);
    c.write_all(b"held").unwrap();
    expect_silent(&mut c, Duration::from_millis(300));

    let refusing = spawn(&["--listen", "127.0.0.1:0", "--target", &target.to_string(), "--refuse"]);
    let mut r = connect(refusing.addr);
    expect_closed(&mut r);
}

#[test]
fn bad_arguments_fail() {
    let status = Command::new(env!("CARGO_BIN_EXE_dmrep-faultproxy"))
        .args(["--listen", "127.0.0.1:0", "--target", "not-an-address"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
}
