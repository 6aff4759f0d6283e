//! A scripted raw-socket client: misbehaving clients, exact replies, edge cases.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dmrep_formats::nbd::{self, *};

use super::{wait_until, Fixture, Mode};
use crate::NbdConfig;

/// A hand-driven NBD client.
pub(crate) struct Client {
    pub s: UnixStream,
}

impl Client {
    /// Connect and answer the greeting with fixed newstyle and no zeroes.
    pub(crate) fn connect(path: &Path) -> Self {
        Self::connect_flags(path, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    pub(crate) fn connect_flags(path: &Path, flags: u32) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { s };
        let mut g = [0u8; Greeting::LEN];
        c.s.read_exact(&mut g).unwrap();
        let g = Greeting::decode(&g).unwrap();
        assert_eq!(g.handshake_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.send(&ClientFlags(flags).encode());
        c
    }

    pub(crate) fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub(crate) fn option(&mut self, o: &ClientOption) {
        let mut out = Vec::new();
        o.encode(&mut out);
        self.send(&out);
    }

    /// Send a raw option (code and payload as given).
    pub(crate) fn raw_option(&mut self, option: u32, payload: &[u8]) {
        let mut out = OptionHeader { option, len: payload.len() as u32 }.encode().to_vec();
        out.extend_from_slice(payload);
        self.send(&out);
    }

    pub(crate) fn reply(&mut self) -> (OptionReplyHeader, OptionReply) {
        let mut h = [0u8; OptionReplyHeader::LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::decode(&h).unwrap();
        let mut data = vec![0u8; h.len as usize];
        self.s.read_exact(&mut data).unwrap();
        (h, OptionReply::decode(h.reply, &data).unwrap())
    }

    /// Replies up to and including the final one (ACK or an error).
    pub(crate) fn replies(&mut self, option: u32) -> Vec<OptionReply> {
        let mut v = Vec::new();
        loop {
            let (h, r) = self.reply();
            assert_eq!(h.option, option);
            let last = !matches!(r, OptionReply::Server { .. } | OptionReply::Info(_));
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Negotiate (optionally structured replies) and GO to `name`: (size, flags).
    pub(crate) fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            self.option(&ClientOption::StructuredReply);
            assert_eq!(self.reply().1, OptionReply::Ack);
        }
        self.option(&ClientOption::Go(InfoRequest { name: name.into(), infos: vec![INFO_BLOCK_SIZE] }));
        let mut export = None;
        for r in self.replies(OPT_GO) {
            match r {
                OptionReply::Info(InfoReply::Export { size, flags }) => export = Some((size, flags)),
                OptionReply::Info(_) | OptionReply::Ack => {}
                other => panic!("GO {name}: {other:?}"),
            }
        }
        export.expect("INFO_EXPORT")
    }

    pub(crate) fn request(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader { flags: CmdFlags(flags), command, cookie, offset, len };
        self.send(&h.encode());
    }

    pub(crate) fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        self.request(Command::Write, flags, cookie, offset, data.len() as u32);
        self.send(data);
    }

    /// A simple reply: (error, cookie), then `data_len` bytes if the error is 0.
    pub(crate) fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; SimpleReplyHeader::LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = SimpleReplyHeader::decode(&h).unwrap();
        let mut data = Vec::new();
        if h.error == 0 {
            data.resize(data_len, 0);
            self.s.read_exact(&mut data).unwrap();
        }
        (h.error, h.cookie, data)
    }

    /// One structured chunk (or, for a simple reply that arrives instead, `None`).
    pub(crate) fn chunk(&mut self) -> Result<(ChunkHeader, ReplyChunk), SimpleReplyHeader> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        if u32::from_be_bytes(m) == SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; SimpleReplyHeader::LEN];
            rest[..4].copy_from_slice(&m);
            self.s.read_exact(&mut rest[4..]).unwrap();
            return Err(SimpleReplyHeader::decode(&rest).unwrap());
        }
        let mut h = [0u8; ChunkHeader::LEN];
        h[..4].copy_from_slice(&m);
        self.s.read_exact(&mut h[4..]).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        let mut p = vec![0u8; h.len as usize];
        self.s.read_exact(&mut p).unwrap();
        Ok((h, ReplyChunk::decode(h.kind, &p).unwrap()))
    }

    /// The server closes the connection (within the read timeout).
    pub(crate) fn expect_closed(&mut self) {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close the connection: {e}"),
            }
        }
    }
}

#[test]
fn garbage_after_handshake_closes_only_that_connection() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    let mut bad = Client::connect(&f.path);
    bad.go("d0", false);
    let mut good = Client::connect(&f.path);
    good.go("d0", true);
    wait_until("two connections", || f.server.connections() == 2);

    bad.send(&[0x5a; 64]);
    bad.expect_closed();
    wait_until("the bad connection to go", || f.server.connections() == 1);

    good.write(0, 1, 4096, &[7u8; 4096]);
    assert_eq!(good.chunk().unwrap_err().error, 0);
    good.request(Command::Read, 0, 2, 4096, 4096);
    let (h, c) = good.chunk().unwrap();
    assert!(h.done() && h.cookie == 2);
    assert_eq!(c, ReplyChunk::OffsetData { offset: 4096, data: vec![7u8; 4096] });
}

#[test]
fn unsupported_and_invalid_options_keep_the_negotiation_going() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    f.add_device("d1", &[2 << 20], Mode::Sync);
    let mut c = Client::connect(&f.path);

    let unsup = |r: &OptionReply| matches!(r, OptionReply::Error { code, .. } if *code == REP_ERR_UNSUP);
    c.raw_option(99, b"hello");
    assert!(unsup(&c.reply().1));
    c.option(&ClientOption::StartTls);
    let (h, r) = c.reply();
    assert_eq!(h.option, OPT_STARTTLS);
    assert!(unsup(&r), "{r:?}");
    c.raw_option(OPT_STARTTLS, b"junk");
    assert!(unsup(&c.reply().1));
    c.raw_option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert!(unsup(&c.reply().1));
    c.raw_option(OPT_EXTENDED_HEADERS, &[]);
    assert!(unsup(&c.reply().1));

    let err = |r: &OptionReply| match r {
        OptionReply::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    };
    c.raw_option(OPT_LIST, b"x");
    assert_eq!(err(&c.reply().1), REP_ERR_INVALID);
    c.raw_option(OPT_INFO, &[0, 0, 0, 9, b'd']);
    assert_eq!(err(&c.reply().1), REP_ERR_INVALID);
    c.raw_option(OPT_INFO, &[0, 0, 0x20, 0, 0, 0]);
    assert_eq!(err(&c.reply().1), REP_ERR_TOO_BIG);
    c.raw_option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(err(&c.reply().1), REP_ERR_INVALID);

    for name in ["", "nope", "d0/../d1"] {
        c.option(&ClientOption::Info(InfoRequest { name: name.into(), infos: vec![] }));
        let r = c.replies(OPT_INFO);
        assert_eq!(r.len(), 1);
        assert_eq!(err(&r[0]), REP_ERR_UNKNOWN, "{name:?}");
    }

    c.option(&ClientOption::List);
    let r = c.replies(OPT_LIST);
    let names: Vec<_> = r
        .iter()
        .filter_map(|r| match r {
            OptionReply::Server { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["d0", "d1"]);
    assert_eq!(r.last(), Some(&OptionReply::Ack));

    c.option(&ClientOption::Info(InfoRequest {
        name: "d1".into(),
        infos: vec![INFO_NAME, INFO_BLOCK_SIZE, 77, INFO_DESCRIPTION, INFO_NAME],
    }));
    let r = c.replies(OPT_INFO);
    assert_eq!(r.len(), 5, "{r:?}");
    assert!(r.contains(&OptionReply::Info(InfoReply::Name("d1".into()))));
    assert!(r.contains(&OptionReply::Info(InfoReply::BlockSize { min: 1, preferred: 4096, max: 32 << 20 })));
    assert!(r.iter().any(|x| matches!(x, OptionReply::Info(InfoReply::Description(_)))));
    let flags = r
        .iter()
        .find_map(|x| match x {
            OptionReply::Info(InfoReply::Export { size, flags }) => {
                assert_eq!(*size, 2 << 20);
                Some(*flags)
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(flags & FLAG_SEND_DF, 0, "no DF without structured replies");
    for bit in
        [FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_CAN_MULTI_CONN]
    {
        assert_ne!(flags & bit, 0);
    }
    assert_eq!(flags & FLAG_READ_ONLY, 0);

    // After all that, GO still works.
    let (size, flags) = c.go("d1", true);
    assert_eq!(size, 2 << 20);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    c.request(Command::Read, CMD_FLAG_DF, 5, 0, 512);
    let (h, chunk) = c.chunk().unwrap();
    assert_eq!((h.cookie, h.done()), (5, true));
    assert!(matches!(chunk, ReplyChunk::OffsetData { offset: 0, ref data } if data.len() == 512));
}

#[test]
fn client_flags_are_checked() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    // Not fixed newstyle.
    Client::connect_flags(&f.path, 0).expect_closed();
    // A flag the server did not offer.
    Client::connect_flags(&f.path, FLAG_C_FIXED_NEWSTYLE | 4).expect_closed();
    // Fixed newstyle without NO_ZEROES is fine.
    let mut c = Client::connect_flags(&f.path, FLAG_C_FIXED_NEWSTYLE);
    c.go("d0", false);
    wait_until("one live connection", || f.server.connections() == 1);
}

#[test]
fn export_name_and_abort() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);

    let mut c = Client::connect_flags(&f.path, FLAG_C_FIXED_NEWSTYLE);
    c.option(&ClientOption::ExportName("d0".into()));
    let mut r = [0u8; ExportNameReply::LEN + ExportNameReply::PAD];
    c.s.read_exact(&mut r).unwrap();
    let e = ExportNameReply::decode(&r).unwrap();
    assert_eq!(e.size, 1 << 20);
    assert!(r[10..].iter().all(|&b| b == 0));
    c.request(Command::Read, 0, 1, 0, 16);
    assert_eq!(c.simple(16), (0, 1, vec![0; 16]));

    let mut c = Client::connect(&f.path);
    c.option(&ClientOption::ExportName("d0".into()));
    let mut r = [0u8; ExportNameReply::LEN];
    c.s.read_exact(&mut r).unwrap();
    c.request(Command::Read, 0, 1, 0, 16);
    assert_eq!(c.simple(16), (0, 1, vec![0; 16]));

    // Unknown export: EXPORT_NAME cannot report an error, so the server closes.
    let mut c = Client::connect(&f.path);
    c.option(&ClientOption::ExportName("nope".into()));
    c.expect_closed();
    let mut c = Client::connect(&f.path);
    c.option(&ClientOption::ExportName(String::new()));
    c.expect_closed();

    let mut c = Client::connect(&f.path);
    c.option(&ClientOption::Abort);
    assert_eq!(c.reply().1, OptionReply::Ack);
    c.expect_closed();
}

#[test]
fn disconnect_mid_write_payload_and_with_requests_in_flight() {
    let f = Fixture::new();
    let (dev, targets) = f.add_device("d0", &[1 << 20], Mode::Delayed);

    let mut c = Client::connect(&f.path);
    c.go("d0", false);
    c.request(Command::Write, 0, 1, 0, 65536);
    c.send(&[1u8; 1000]);
    drop(c);
    f.wait_idle();
    assert_eq!(dev.open_count(), 0);

    // Pipelined writes, then gone without reading a reply.
    let mut c = Client::connect(&f.path);
    c.go("d0", true);
    for i in 0..32u64 {
        c.write(0, i, i * 4096, &[i as u8 + 1; 4096]);
    }
    c.request(Command::Write, 0, 99, 0, 4096);
    drop(c);
    f.wait_idle();
    assert_eq!(dev.open_count(), 0);
    // Every complete write reached the target; the torn one did not.
    wait_until("writes to land", || targets[0].counters().writes.load(Ordering::Relaxed) == 32);

    let mut c = Client::connect(&f.path);
    c.go("d0", false);
    c.request(Command::Read, 0, 7, 31 * 4096, 4096);
    assert_eq!(c.simple(4096), (0, 7, vec![32u8; 4096]));
}

#[test]
fn oversized_requests() {
    let f = Fixture::with_config(NbdConfig { workers_per_conn: 4, max_request_bytes: 65536 });
    f.add_device("d0", &[1 << 20], Mode::Sync);
    for structured in [false, true] {
        let mut c = Client::connect(&f.path);
        c.go("d0", structured);
        let error_of = |c: &mut Client| match c.chunk() {
            Err(h) => h.error,
            Ok((_, ReplyChunk::Error { error, .. })) => error,
            Ok(other) => panic!("{other:?}"),
        };
        // Too long but sane: the payload is consumed, the write fails, the stream goes on.
        c.write(0, 1, 0, &vec![9u8; 131072]);
        assert_eq!(error_of(&mut c), nbd::EOVERFLOW);
        c.request(Command::Read, 0, 2, 0, 131072);
        assert_eq!(error_of(&mut c), nbd::EINVAL);
        c.write(0, 3, 0, &[4u8; 512]);
        assert_eq!(error_of(&mut c), 0);
        // Absurd: closed without reading the payload.
        c.request(Command::Write, 0, 4, 0, u32::MAX);
        c.expect_closed();
    }
}

#[test]
fn bad_flags_unknown_commands_and_errors() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    let mut c = Client::connect(&f.path);
    c.go("d0", false);
    let expect = |c: &mut Client, err: u32, cookie: u64| {
        let (e, k, _) = c.simple(0);
        assert_eq!((e, k), (err, cookie));
    };
    c.request(Command::Read, CMD_FLAG_NO_HOLE, 1, 0, 512);
    expect(&mut c, nbd::EINVAL, 1);
    c.request(Command::Read, CMD_FLAG_DF, 2, 0, 512); // DF needs structured replies
    expect(&mut c, nbd::EINVAL, 2);
    c.write(CMD_FLAG_DF, 3, 0, &[1u8; 512]);
    expect(&mut c, nbd::EINVAL, 3);
    c.request(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 4, 0, 512);
    expect(&mut c, nbd::EINVAL, 4);
    c.request(Command::Cache, 0, 5, 0, 512);
    expect(&mut c, nbd::EINVAL, 5);
    c.request(Command::Other(99), 0, 6, 0, 512);
    expect(&mut c, nbd::EINVAL, 6);
    c.request(Command::BlockStatus, 0, 7, 0, 512);
    expect(&mut c, nbd::EINVAL, 7);
    // Out of range: EINVAL for reads, ENOSPC for writes; overflowing offsets too.
    c.request(Command::Read, 0, 8, 1 << 20, 512);
    expect(&mut c, nbd::EINVAL, 8);
    c.write(0, 9, (1 << 20) - 256, &[1u8; 512]);
    expect(&mut c, nbd::ENOSPC, 9);
    c.request(Command::Trim, 0, 10, u64::MAX - 10, 512);
    expect(&mut c, nbd::ENOSPC, 10);
    // FUA is accepted on every command.
    c.request(Command::Flush, CMD_FLAG_FUA, 11, 0, 0);
    expect(&mut c, 0, 11);
    c.request(Command::Read, CMD_FLAG_FUA, 12, 0, 8);
    assert_eq!(c.simple(8), (0, 12, vec![0; 8]));
    // Zero-length requests.
    c.request(Command::Read, 0, 13, 0, 0);
    expect(&mut c, 0, 13);
    c.write(0, 14, 0, &[]);
    expect(&mut c, 0, 14);
    // DISC: no reply, connection closed.
    c.request(Command::Disc, 0, 15, 0, 0);
    c.expect_closed();
}

#[test]
fn structured_replies_for_reads_and_errors() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    let mut c = Client::connect(&f.path);
    c.go("d0", true);
    c.request(Command::Read, 0, 1, 0, 0);
    let (h, ch) = c.chunk().unwrap();
    assert_eq!((h.cookie, h.done(), ch), (1, true, ReplyChunk::None));
    c.request(Command::Read, 0, 2, 1 << 20, 512);
    let (h, ch) = c.chunk().unwrap();
    assert!(h.done());
    match ch {
        ReplyChunk::Error { error, message } => {
            assert_eq!(error, nbd::EINVAL);
            assert!(!message.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // Non-read successes use simple replies (allowed: no payload).
    c.write(0, 3, 0, &[1u8; 512]);
    assert_eq!(c.chunk().unwrap_err().error, 0);
    c.write(0, 4, 1 << 20, &[1u8; 512]);
    match c.chunk() {
        Ok((_, ReplyChunk::Error { error, .. })) => assert_eq!(error, nbd::ENOSPC),
        other => panic!("{other:?}"),
    }
}

#[test]
fn disc_waits_for_requests_in_flight() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Delayed);
    let mut c = Client::connect(&f.path);
    c.go("d0", false);
    for i in 0..16u64 {
        c.write(0, i, i * 512, &[3u8; 512]);
    }
    c.request(Command::Disc, 0, 100, 0, 0);
    let mut seen = HashSet::new();
    for _ in 0..16 {
        let (e, k, _) = c.simple(0);
        assert_eq!(e, 0);
        assert!(seen.insert(k));
    }
    c.expect_closed();
}

#[test]
fn suspended_device_holds_requests() {
    let f = Fixture::new();
    let (dev, _) = f.add_device("d0", &[1 << 20], Mode::Sync);
    let mut c = Client::connect(&f.path);
    c.go("d0", false);
    c.write(0, 1, 0, &[5u8; 4096]);
    assert_eq!(c.simple(0).0, 0);

    dev.suspend(dmrep_core::device::SUSPEND_TIMEOUT).unwrap();
    c.request(Command::Read, 0, 2, 0, 4096);
    c.write(0, 3, 4096, &[6u8; 4096]);
    // Held, not failed: nothing comes back while suspended.
    c.s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut b = [0u8; 1];
    let e = c.s.read(&mut b).unwrap_err();
    assert!(matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
    c.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    dev.resume(dmrep_core::device::SUSPEND_TIMEOUT).unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut h = [0u8; SimpleReplyHeader::LEN];
        c.s.read_exact(&mut h).unwrap();
        let h = SimpleReplyHeader::decode(&h).unwrap();
        assert_eq!(h.error, 0);
        if h.cookie == 2 {
            let mut d = vec![0u8; 4096];
            c.s.read_exact(&mut d).unwrap();
            assert_eq!(d, vec![5u8; 4096]);
        }
        got.push(h.cookie);
    }
    got.sort();
    assert_eq!(got, [2, 3]);
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let f = Fixture::new();
    let (_, targets) = f.add_device("d0", &[4 << 20], Mode::Delayed);
    let mut c = Client::connect(&f.path);
    c.go("d0", false);
    // More than the in-flight cap, sent from another thread while replies are read.
    const N: u64 = 600;
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            let h = RequestHeader {
                flags: CmdFlags(if i % 7 == 0 { CMD_FLAG_FUA } else { 0 }),
                command: Command::Write,
                cookie: i,
                offset: (i % 1024) * 4096,
                len: 4096,
            };
            w.write_all(&h.encode()).unwrap();
            w.write_all(&[(i % 251) as u8; 4096]).unwrap();
        }
    });
    let mut order = Vec::new();
    for _ in 0..N {
        let (e, k, _) = c.simple(0);
        assert_eq!(e, 0);
        order.push(k);
    }
    sender.join().unwrap();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..N).collect::<Vec<_>>());
    assert_ne!(order, sorted, "replies came back in completion order");
    assert!(targets[0].counters().out_of_order.load(Ordering::Relaxed) > 0);
    assert!(targets[0].counters().fua_writes.load(Ordering::Relaxed) > 0);
    for i in 0..N {
        c.request(Command::Read, 0, i, i * 4096, 4096);
        let (e, k, d) = c.simple(4096);
        assert_eq!((e, k), (0, i));
        assert_eq!(d, vec![(i % 251) as u8; 4096]);
    }
}

#[test]
fn cross_segment_requests() {
    let f = Fixture::new();
    let (_, t) = f.add_device("d0", &[64 << 10, 64 << 10], Mode::Sync);
    let mut c = Client::connect(&f.path);
    c.go("d0", true);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    c.write(0, 1, (64 << 10) - 4096, &data);
    assert_eq!(c.chunk().unwrap_err().error, 0);
    assert_eq!(t[0].data((64 << 10) - 4096, 4096), &data[..4096]);
    assert_eq!(t[1].data(0, 4096), &data[4096..]);
    c.request(Command::Read, 0, 2, (64 << 10) - 4096, 8192);
    let (_, ch) = c.chunk().unwrap();
    assert_eq!(ch, ReplyChunk::OffsetData { offset: (64 << 10) - 4096, data });
}

#[test]
fn a_client_that_does_not_read_replies_does_not_stall_the_target() {
    let f = Fixture::new();
    // Reads and writes complete on the target's own thread, shared by both clients.
    let (dev, _) = f.add_device("d0", &[8 << 20], Mode::DelayedAll);
    let mut slow = Client::connect(&f.path);
    slow.go("d0", true);
    const N: u64 = 64;
    const LEN: u32 = 256 << 10;
    for i in 0..N {
        slow.request(Command::Read, 0, i, (i % 32) * u64::from(LEN), LEN);
    }
    // Far more reply data than the socket buffers hold; the slow client reads none yet.
    let mut fast = Client::connect(&f.path);
    fast.go("d0", false);
    for i in 0..50u64 {
        fast.write(0, i, i * 4096, &[i as u8; 4096]);
        assert_eq!(fast.simple(0), (0, i, Vec::new()));
        fast.request(Command::Read, 0, i, i * 4096, 4096);
        assert_eq!(fast.simple(4096), (0, i, vec![i as u8; 4096]));
    }
    let mut seen = HashSet::new();
    for _ in 0..N {
        match slow.chunk() {
            Ok((h, ReplyChunk::OffsetData { data, .. })) => {
                assert_eq!(data.len(), LEN as usize);
                assert!(seen.insert(h.cookie));
            }
            other => panic!("{other:?}"),
        }
    }
    drop(slow);
    drop(fast);
    f.wait_idle();
    assert_eq!(dev.open_count(), 0);
}

#[test]
fn slow_synchronous_targets_get_requests_in_parallel() {
    let f = Fixture::with_config(NbdConfig { workers_per_conn: 4, max_request_bytes: 1 << 20 });
    let (_, t) = f.add_device("d0", &[4 << 20], Mode::SlowSync);
    let mut c = Client::connect(&f.path);
    c.go("d0", true);
    const N: u64 = 400;
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            let (command, len) = if i % 2 == 0 { (Command::Write, 4096) } else { (Command::Read, 4096) };
            let h = RequestHeader { flags: CmdFlags(0), command, cookie: i, offset: (i / 2) * 4096, len };
            w.write_all(&h.encode()).unwrap();
            if command == Command::Write {
                w.write_all(&[(i % 251) as u8; 4096]).unwrap();
            }
        }
    });
    let mut seen = HashSet::new();
    for _ in 0..N {
        match c.chunk() {
            Err(h) => {
                assert_eq!(h.error, 0);
                assert!(seen.insert(h.cookie));
            }
            Ok((h, ReplyChunk::OffsetData { data, .. })) => {
                assert_eq!(data.len(), 4096);
                assert!(seen.insert(h.cookie));
            }
            Ok(other) => panic!("{other:?}"),
        }
    }
    sender.join().unwrap();
    assert_eq!(seen.len() as u64, N);
    let threads = t[0].submitters.lock().len();
    assert!((2..=4).contains(&threads), "{threads} submitting threads");
    drop(c);
    f.wait_idle();
}
