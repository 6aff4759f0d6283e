//! A minimal NBD client for tests, written from the protocol specification and
//! independent of the server's own wire code: fixed newstyle handshake, `NBD_OPT_GO`
//! with an export name, simple replies only (no structured replies are requested), and
//! `READ`/`WRITE`/`FLUSH` with pipelining: any number of requests may be in flight on
//! one socket, their replies are matched by handle.
//!
//! Use it either blocking ([`NbdClient::pwrite`], [`NbdClient::pread`],
//! [`NbdClient::flush`]) or pipelined: [`NbdClient::split`] gives a sender (submit
//! requests, each with a caller-chosen handle) and a receiver (take replies in the
//! order the server sends them, with the read data of read replies).
//!
//! Declare it from a test file with
//! `#[path = "common/nbd_client.rs"] mod nbd_client;`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;

const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// Transmission flag: the server accepts FLUSH.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;

/// A reply to one request.
#[derive(Debug)]
pub struct Reply {
    pub handle: u64,
    /// NBD error code (0: success).
    pub error: u32,
    /// The data of a successful read; empty otherwise.
    pub data: Vec<u8>,
}

/// Which command a handle in flight was, and for a read how many bytes it returns.
#[derive(Clone, Copy, Debug)]
enum InFlight {
    Read(u32),
    Other,
}

type Table = Arc<Mutex<HashMap<u64, InFlight>>>;

/// A connected client in the transmission phase.
pub struct NbdClient {
    tx: NbdSender,
    rx: NbdReceiver,
    next_handle: u64,
}

/// The sending half: submits requests.
pub struct NbdSender {
    sock: UnixStream,
    table: Table,
    pub size: u64,
    pub flags: u16,
}

/// The receiving half: reads replies.
pub struct NbdReceiver {
    sock: io::BufReader<UnixStream>,
    table: Table,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdClient {
    /// Connect to the Unix socket `socket` and open export `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdClient> {
        let mut s = UnixStream::connect(socket)?;
        // The handshake must not hang a test forever.
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        if read_u64(&mut s)? != NBDMAGIC {
            return Err(bad("greeting: bad NBDMAGIC"));
        }
        if read_u64(&mut s)? != IHAVEOPT {
            return Err(bad("greeting: server is not newstyle"));
        }
        let hflags = read_u16(&mut s)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad("greeting: server is not fixed newstyle"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;

        // NBD_OPT_GO: u32 name length, name, u16 number of info requests (0).
        let mut payload = Vec::new();
        payload.extend_from_slice(&(export.len() as u32).to_be_bytes());
        payload.extend_from_slice(export.as_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        opt.extend_from_slice(&payload);
        s.write_all(&opt)?;

        let mut size = None;
        let mut flags = 0u16;
        loop {
            if read_u64(&mut s)? != OPT_REPLY_MAGIC {
                return Err(bad("option reply: bad magic"));
            }
            let option = read_u32(&mut s)?;
            let rtype = read_u32(&mut s)?;
            let len = read_u32(&mut s)?;
            if len > 1 << 20 {
                return Err(bad(format!("option reply: length {len} too big")));
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            if option != OPT_GO {
                return Err(bad(format!("option reply for option {option}, expected GO")));
            }
            if rtype & REP_FLAG_ERROR != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("NBD_OPT_GO {export:?}: error {rtype:#x}: {}", String::from_utf8_lossy(&data)),
                ));
            }
            match rtype {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => {
                    let t = u16::from_be_bytes([data[0], data[1]]);
                    if t == INFO_EXPORT {
                        if data.len() != 12 {
                            return Err(bad("NBD_INFO_EXPORT: bad length"));
                        }
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                        flags = u16::from_be_bytes([data[10], data[11]]);
                    }
                }
                _ => {} // other replies are informational
            }
        }
        let size = size.ok_or_else(|| bad("NBD_OPT_GO: no NBD_INFO_EXPORT before ACK"))?;
        s.set_read_timeout(None)?;
        let table: Table = Arc::new(Mutex::new(HashMap::new()));
        let rx = NbdReceiver { sock: io::BufReader::with_capacity(256 << 10, s.try_clone()?), table: table.clone() };
        Ok(NbdClient { tx: NbdSender { sock: s, table, size, flags }, rx, next_handle: 1 })
    }

    /// Connect, retrying until `timeout` (the server may still be starting).
    pub fn connect_retry(socket: &Path, export: &str, timeout: Duration) -> io::Result<NbdClient> {
        let end = Instant::now() + timeout;
        loop {
            match NbdClient::connect(socket, export) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= end => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.tx.size
    }

    /// The two halves, for pipelining from two threads.
    pub fn split(self) -> (NbdSender, NbdReceiver) {
        (self.tx, self.rx)
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    fn expect(&mut self, h: u64) -> io::Result<Reply> {
        let r = self.rx.recv()?;
        if r.handle != h {
            return Err(bad(format!("reply for handle {} while only {h} is in flight", r.handle)));
        }
        if r.error != 0 {
            return Err(io::Error::other(format!("NBD error {}", r.error)));
        }
        Ok(r)
    }

    /// Blocking write.
    pub fn pwrite(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let h = self.handle();
        self.tx.write(h, offset, data)?;
        self.expect(h).map(|_| ())
    }

    /// Blocking read of `len` bytes.
    pub fn pread(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let h = self.handle();
        self.tx.read(h, offset, len)?;
        self.expect(h).map(|r| r.data)
    }

    /// Blocking flush.
    pub fn flush(&mut self) -> io::Result<()> {
        let h = self.handle();
        self.tx.flush(h)?;
        self.expect(h).map(|_| ())
    }

    /// Send `NBD_CMD_DISC` and close.
    pub fn disconnect(mut self) {
        let _ = self.tx.disconnect();
    }
}

impl NbdSender {
    fn request(&mut self, cmd: u16, handle: u64, offset: u64, len: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes()); // command flags
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        if cmd != CMD_DISC {
            let kind = if cmd == CMD_READ { InFlight::Read(len) } else { InFlight::Other };
            let prev = self.table.lock().unwrap().insert(handle, kind);
            assert!(prev.is_none(), "NBD handle {handle} used twice while in flight");
        }
        self.sock.write_all(&b)
    }

    /// Submit a write of `data` at `offset` with `handle`.
    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.request(CMD_WRITE, handle, offset, data.len() as u32, data)
    }

    /// Submit a read of `len` bytes at `offset` with `handle`.
    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_READ, handle, offset, len, &[])
    }

    /// Submit a flush with `handle`.
    pub fn flush(&mut self, handle: u64) -> io::Result<()> {
        self.request(CMD_FLUSH, handle, 0, 0, &[])
    }

    /// Send `NBD_CMD_DISC` (no reply comes).
    pub fn disconnect(&mut self) -> io::Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[])
    }

    /// Shut the socket down both ways (the receiver then sees end of file).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

impl NbdReceiver {
    /// The next reply. End of file, a bad magic or a reply for a handle not in flight
    /// is an error (the connection cannot be trusted any more).
    pub fn recv(&mut self) -> io::Result<Reply> {
        let magic = read_u32(&mut self.sock)?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(bad(format!("reply magic {magic:#x} is not the simple reply magic")));
        }
        let error = read_u32(&mut self.sock)?;
        let handle = read_u64(&mut self.sock)?;
        let kind = self
            .table
            .lock()
            .unwrap()
            .remove(&handle)
            .ok_or_else(|| bad(format!("reply for handle {handle}, which is not in flight")))?;
        let mut data = Vec::new();
        if let (InFlight::Read(len), 0) = (kind, error) {
            data.resize(len as usize, 0);
            self.sock.read_exact(&mut data)?;
        }
        Ok(Reply { handle, error, data })
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}
