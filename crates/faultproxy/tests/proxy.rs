//! The library proxy against real servers on loopback.

mod common;

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use dmrep_faultproxy::{Direction, FaultProxy};

const MIB: usize = 1024 * 1024;

fn proxy_to(target: std::net::SocketAddr) -> FaultProxy {
    FaultProxy::start(any_port(), target).unwrap()
}

fn check_echo_intact(proxy: &FaultProxy, seed: u64, len: usize) {
    let data = pattern(seed, len);
    let mut want = Fnv::new();
    want.update(&data);
    let (n, hash) = echo_all(proxy.addr(), data);
    assert_eq!(n, len);
    assert_eq!(hash, want.0, "bytes changed on the way");
}

#[test]
fn forwards_16_mib_both_ways_intact() {
    let proxy = proxy_to(echo_server());
    check_echo_intact(&proxy, 1, 16 * MIB);
    wait_until("all bytes are counted", || {
        let s = proxy.stats();
        s.bytes_up == 16 * MIB as u64 && s.bytes_down == 16 * MIB as u64
    });
    // The echo closed after our EOF: the connection is gone.
    wait_until("no connection is active", || proxy.stats().active == 0);
    let s = proxy.stats();
    assert_eq!((s.accepted, s.refused), (1, 0));
}

#[test]
fn forwards_intact_in_order_under_delay_on_two_connections() {
    let proxy = proxy_to(echo_server());
    proxy.set_delay(Duration::from_millis(10));
    let a = thread::scope(|sc| {
        let a = sc.spawn(|| check_echo_intact(&proxy, 2, 8 * MIB));
        check_echo_intact(&proxy, 3, 8 * MIB);
        a.join()
    });
    a.unwrap();
}

#[test]
fn delay_adds_latency_each_way() {
    let proxy = proxy_to(echo_server());
    proxy.set_delay(Duration::from_millis(50));
    assert_eq!(proxy.delay(), Duration::from_millis(50));
    let mut c = connect(proxy.addr());
    for _ in 0..3 {
        let t = Instant::now();
        echo(&mut c, b"ping");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(100), "round trip {rtt:?} under twice the one-way delay");
    }
}

#[test]
fn delay_does_not_cap_throughput() {
    let (sink, done) = sink_server();
    let proxy = proxy_to(sink);
    let delay = Duration::from_millis(20);
    proxy.set_delay(delay);
    let len = 16 * MIB;
    let t = Instant::now();
    assert_eq!(send_to_sink(proxy.addr(), len), len as u64);
    let (n, last) = done.recv_timeout(PATIENCE).unwrap();
    assert_eq!(n, len as u64);
    let took = last - t;
    // One 64 KiB chunk per delay would take 256 x 20 ms = 5.12 s.
    let serial = delay * (len / (64 * 1024)) as u32;
    assert!(took >= delay, "{took:?}: data arrived before the delay");
    assert!(took < serial / 2, "16 MiB took {took:?}: the delay caps throughput (one chunk per delay: {serial:?})");
}

#[test]
fn rate_caps_throughput_shared_across_connections() {
    let (sink, done) = sink_server();
    let proxy = proxy_to(sink);
    let rate = MIB as u64; // bytes per second, per direction
    proxy.set_rate(Some(rate));
    assert_eq!(proxy.rate(), Some(rate));
    let t = Instant::now();
    // Two connections of 1 MiB each: 2 s at the shared rate (1 s each if not shared).
    thread::scope(|sc| {
        let a = sc.spawn(|| send_to_sink(proxy.addr(), MIB));
        assert_eq!(send_to_sink(proxy.addr(), MIB), MIB as u64);
        assert_eq!(a.join().unwrap(), MIB as u64);
    });
    let (_, l1) = done.recv_timeout(PATIENCE).unwrap();
    let (_, l2) = done.recv_timeout(PATIENCE).unwrap();
    let took = l1.max(l2) - t;
    assert!(took >= Duration::from_millis(1600), "2 MiB at 1 MiB/s took only {took:?}");
    assert!(took <= Duration::from_secs(8), "2 MiB at 1 MiB/s took {took:?}");

    // Lifted: 4 MiB (4 s at the old rate) moves quickly.
    proxy.set_rate(None);
    let t = Instant::now();
    assert_eq!(send_to_sink(proxy.addr(), 4 * MIB), 4 * MIB as u64);
    let (_, last) = done.recv_timeout(PATIENCE).unwrap();
    assert!(last - t < Duration::from_secs(3), "4 MiB took {:?} with no rate", last - t);
}

#[test]
fn drop_resets_every_connection() {
    let proxy = proxy_to(echo_server());
    let mut a = connect(proxy.addr());
    let mut b = connect(proxy.addr());
    echo(&mut a, b"one");
    echo(&mut b, b"two");
    wait_until("both connections are active", || proxy.stats().active == 2);
    proxy.drop_connections();
    expect_closed(&mut a);
    expect_closed(&mut b);
    wait_until("no connection is active", || proxy.stats().active == 0);
    // New connections are unaffected.
    let mut c = connect(proxy.addr());
    echo(&mut c, b"three");
}

#[test]
fn drop_sends_a_reset() {
    let proxy = proxy_to(echo_server());
    let mut a = connect(proxy.addr());
    echo(&mut a, b"ping");
    proxy.drop_connections();
    // Not a FIN: the read fails with a reset rather than returning EOF.
    a.set_read_timeout(Some(PATIENCE)).unwrap();
    let err = std::io::Read::read(&mut a, &mut [0u8; 8]).expect_err("EOF instead of a reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn blackhole_is_silent_then_drops_blackholed_connections() {
    let proxy = proxy_to(echo_server());
    let mut old = connect(proxy.addr());
    echo(&mut old, b"before");
    wait_until("the echo is counted", || proxy.stats().bytes_down == 6);
    let before = proxy.stats();

    proxy.blackhole(true);
    old.write_all(b"into the void").unwrap();
    expect_silent(&mut old, Duration::from_millis(300));
    // Still established: writing works, no error is pending.
    old.write_all(b"more").unwrap();
    expect_silent(&mut old, Duration::from_millis(100));

    // A new connection is accepted, and goes nowhere.
    let mut new = connect(proxy.addr());
    new.write_all(b"hello?").unwrap();
    expect_silent(&mut new, Duration::from_millis(300));
    let during = proxy.stats();
    assert_eq!((during.bytes_up, during.bytes_down), (before.bytes_up, before.bytes_down));
    assert_eq!(during.active, 2);

    proxy.blackhole(false);
    expect_closed(&mut old);
    expect_closed(&mut new);
    let mut again = connect(proxy.addr());
    echo(&mut again, b"after");
    wait_until("only the new connection is active", || proxy.stats().active == 1);
}

#[test]
fn blackhole_keeps_a_client_eof_to_itself() {
    let proxy = proxy_to(echo_server());
    proxy.blackhole(true);
    let mut c = connect(proxy.addr());
    c.write_all(b"x").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    // Our FIN went into the hole: no FIN comes back either.
    expect_silent(&mut c, Duration::from_millis(300));
    proxy.blackhole(false);
    expect_closed(&mut c);
}

#[test]
fn stall_up_holds_then_releases() {
    let proxy = proxy_to(echo_server());
    let mut c = connect(proxy.addr());
    echo(&mut c, b"warm");
    proxy.stall(Direction::Up, true);
    c.write_all(b"held").unwrap();
    expect_silent(&mut c, Duration::from_millis(300));
    assert_eq!(proxy.stats().bytes_up, 4, "stalled data went up");
    proxy.stall(Direction::Up, false);
    expect_read(&mut c, b"held");
}

#[test]
fn stall_down_holds_then_releases() {
    let proxy = proxy_to(echo_server());
    let mut c = connect(proxy.addr());
    echo(&mut c, b"warm");
    proxy.stall(Direction::Down, true);
    c.write_all(b"held").unwrap();
    // It does reach the target, and the echo comes back to the proxy...
    wait_until("the target got it", || proxy.stats().bytes_up == 8);
    // ...and stops there.
    expect_silent(&mut c, Duration::from_millis(300));
    assert_eq!(proxy.stats().bytes_down, 4);
    proxy.stall(Direction::Down, false);
    expect_read(&mut c, b"held");
}

#[test]
fn stall_holds_megabytes_and_loses_none() {
    let proxy = proxy_to(echo_server());
    proxy.stall(Direction::Up, true);
    let data = pattern(9, 4 * MIB);
    let mut want = Fnv::new();
    want.update(&data);
    let addr = proxy.addr();
    let t = thread::spawn(move || echo_all(addr, data));
    wait_until("a connection is up", || proxy.stats().active == 1);
    // Not waiting for work: giving the stall time to leak, were it to.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(proxy.stats().bytes_up, 0);
    proxy.stall(Direction::Up, false);
    let (n, hash) = t.join().unwrap();
    assert_eq!((n, hash), (4 * MIB, want.0));
}

#[test]
fn refuse_closes_new_connections() {
    let proxy = proxy_to(echo_server());
    let mut old = connect(proxy.addr());
    echo(&mut old, b"old");
    proxy.refuse(true);
    let mut c = connect(proxy.addr());
    expect_closed(&mut c);
    wait_until("the refusal is counted", || proxy.stats().refused == 1);
    // Connections already open carry on.
    echo(&mut old, b"still");
    proxy.refuse(false);
    let mut c = connect(proxy.addr());
    echo(&mut c, b"welcome");
    let s = proxy.stats();
    assert_eq!((s.accepted, s.refused), (3, 1));
}

#[test]
fn unreachable_target_closes_the_client() {
    // A port nobody listens on: bind one, then free it.
    let free = std::net::TcpListener::bind(any_port()).unwrap().local_addr().unwrap();
    let proxy = proxy_to(free);
    let mut c = connect(proxy.addr());
    expect_closed(&mut c);
    wait_until("nothing is active", || proxy.stats().active == 0);
}

#[test]
fn dropping_the_proxy_stops_it() {
    let proxy = proxy_to(echo_server());
    let addr = proxy.addr();
    let mut c = connect(addr);
    echo(&mut c, b"ping");
    proxy.set_delay(Duration::from_millis(20));
    proxy.stall(Direction::Down, true);
    c.write_all(b"in flight").unwrap();
    let t = Instant::now();
    drop(proxy);
    assert!(t.elapsed() < PATIENCE, "drop took {:?}", t.elapsed());
    expect_closed(&mut c);
    let err = TcpStream::connect(addr).expect_err("still listening");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}
