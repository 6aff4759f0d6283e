//! Servers and checks shared by the proxy's tests: real sockets on loopback, and waits
//! on conditions with deadlines.

#![allow(dead_code)]

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An echo server: writes back all it reads, and closes its side after the client's EOF.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(any_port()).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// A sink: reads each connection to EOF and reports the byte count and when the last
/// byte arrived; then sends the count back (8 bytes, little endian) and closes.
pub fn sink_server() -> (SocketAddr, mpsc::Receiver<(u64, Instant)>) {
    let listener = TcpListener::bind(any_port()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                let mut last = Instant::now();
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            total += n as u64;
                            last = Instant::now();
                        }
                        Err(_) => return,
                    }
                }
                let _ = tx.send((total, last));
                let _ = s.write_all(&total.to_le_bytes());
            });
        }
    });
    (addr, rx)
}

/// Polls `cond` until it holds, failing the test after [`PATIENCE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    // (A refusing proxy may have reset the connection already: the test sees that next.)
    let _ = s.set_nodelay(true);
    s
}

/// Sends `msg` and expects it back (through an echo server) within [`PATIENCE`].
pub fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    expect_read(s, msg);
}

/// Expects exactly `msg` to arrive within [`PATIENCE`].
pub fn expect_read(s: &mut TcpStream, msg: &[u8]) {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// Expects the connection to end (EOF or reset) within [`PATIENCE`], whatever data
/// still arrives before that.
pub fn expect_closed(s: &mut TcpStream) {
    let deadline = Instant::now() + PATIENCE;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "connection still open after {PATIENCE:?}");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if is_reset(&e) => return,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => panic!("unexpected error waiting for close: {e}"),
        }
    }
}

/// Expects nothing at all (no data, no EOF, no reset) for `quiet`.
pub fn expect_silent(s: &mut TcpStream, quiet: Duration) {
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Err(e) if is_timeout(&e) => {}
        Ok(0) => panic!("got EOF, expected silence"),
        Ok(n) => panic!("got {n} bytes, expected silence"),
        Err(e) => panic!("got {e}, expected silence"),
    }
    assert!(s.take_error().unwrap().is_none());
}

pub fn is_reset(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe)
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, 64 bits: the same whatever the chunking.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Sends `data` through `addr` (an echo, behind the proxy) while reading the echo
/// back; returns (bytes, hash) of what came back once the far side closed.
pub fn echo_all(addr: SocketAddr, data: Vec<u8>) -> (usize, u64) {
    let mut s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for chunk in data.chunks(100_000) {
            w.write_all(chunk).unwrap();
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut h = Fnv::new();
    let mut n = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let k = s.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k;
    }
    sender.join().unwrap();
    (n, h.0)
}

/// Sends `len` bytes to a [`sink_server`] through `addr`, half-closes, and reads the
/// sink's count back.
pub fn send_to_sink(addr: SocketAddr, len: usize) -> u64 {
    let mut s = connect(addr);
    let data = vec![0x5au8; len];
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).unwrap();
    u64::from_le_bytes(count)
}
