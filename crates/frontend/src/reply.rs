//! Writing replies without blocking the completing thread.
//!
//! A completion may run on a target's own thread (the replicator completes writes from
//! its log writer), and [`dmrep_core::IoSink`] asks it not to block for long. So a reply
//! is first tried with one non-blocking vectored `sendmsg`: when the socket buffer has
//! room (the normal case) that is the whole cost. When it does not (the client is slow
//! to read), the unsent rest joins a per-connection backlog that a flusher thread drains
//! with blocking writes; while the backlog is non-empty, later replies queue behind it
//! so that replies never interleave on the stream. A queued reply keeps its request slot
//! (and buffer) until it is on the wire, so the in-flight caps bound the backlog too.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex};

use crate::sock::{advance, Sock};

/// Longest reply header: an `ERROR` chunk header with its error and message length
/// (26 bytes), or an `OFFSET_DATA` chunk header with its offset (28).
pub(crate) const HEAD_MAX: usize = 32;

/// One reply: a header, then a message (error chunks) or the request's data (reads).
pub(crate) struct Reply {
    head: [u8; HEAD_MAX],
    head_len: usize,
    /// Error message bytes (structured error chunks only).
    msg: Vec<u8>,
    /// The request's buffer: sent when `send_buf`, recycled afterwards in any case.
    pub buf: Vec<u8>,
    send_buf: bool,
    /// The request slot to release once the reply is out (none for replies to
    /// requests that never reached the device).
    pub slot: Option<u32>,
    /// Bytes already sent.
    sent: usize,
}

impl Reply {
    pub(crate) fn new(head: &[u8], slot: Option<u32>) -> Self {
        let mut h = [0u8; HEAD_MAX];
        h[..head.len()].copy_from_slice(head);
        Reply { head: h, head_len: head.len(), msg: Vec::new(), buf: Vec::new(), send_buf: false, slot, sent: 0 }
    }

    /// Attach the request's buffer; `send` says whether it is the reply's payload.
    pub(crate) fn with_buf(mut self, buf: Vec<u8>, send: bool) -> Self {
        self.buf = buf;
        self.send_buf = send;
        self
    }

    pub(crate) fn with_msg(mut self, msg: Vec<u8>) -> Self {
        self.msg = msg;
        self
    }

    /// What is left to send.
    fn parts(&self) -> [&[u8]; 3] {
        let data: &[u8] = if self.send_buf { &self.buf } else { &[] };
        let mut p = [&self.head[..self.head_len], &self.msg[..], data];
        advance(&mut p, self.sent);
        p
    }

    /// Bytes of the reply (header, message, data), sent or not.
    pub(crate) fn len(&self) -> usize {
        self.head_len + self.msg.len() + if self.send_buf { self.buf.len() } else { 0 }
    }
}

struct State {
    backlog: VecDeque<Reply>,
    /// The flusher owns the stream (it is sending, or the backlog is non-empty).
    flushing: bool,
    flusher_started: bool,
    closed: bool,
}

/// What became of a reply handed to [`Replies::send`].
pub(crate) enum Sent {
    /// Sent, or dropped because the socket is dead: the caller releases it.
    Done(Reply),
    /// Queued for the flusher, which releases it. `start_flusher`: this is the first
    /// backlog of the connection and the caller must start the flusher thread.
    Queued { start_flusher: bool },
}

/// The reply side of a connection.
pub(crate) struct Replies {
    state: Mutex<State>,
    cond: Condvar,
    /// No more replies can be written: they are dropped.
    pub broken: AtomicBool,
}

impl Replies {
    pub(crate) fn new() -> Self {
        Replies {
            state: Mutex::new(State {
                backlog: VecDeque::new(),
                flushing: false,
                flusher_started: false,
                closed: false,
            }),
            cond: Condvar::new(),
            broken: AtomicBool::new(false),
        }
    }

    /// Send `r` now if the socket takes it without waiting, else queue it.
    pub(crate) fn send(&self, sock: &Sock, mut r: Reply) -> Sent {
        if self.broken.load(Ordering::Relaxed) {
            return Sent::Done(r);
        }
        let mut st = self.state.lock();
        if !st.flushing {
            match sock.send_nowait(&r.parts()) {
                Ok(n) => r.sent += n,
                Err(e) => {
                    drop(st);
                    tracing::debug!("writing a reply: {e}; closing the connection");
                    self.break_stream(sock);
                    return Sent::Done(r);
                }
            }
            if r.sent == r.len() {
                return Sent::Done(r);
            }
            st.flushing = true;
        }
        st.backlog.push_back(r);
        let start = !std::mem::replace(&mut st.flusher_started, true);
        drop(st);
        self.cond.notify_one();
        Sent::Queued { start_flusher: start }
    }

    /// Send a batch of replies (in order) with as few non-blocking vectored writes as
    /// the socket takes; what it does not take joins the backlog. Sent (or dropped)
    /// replies move to `done` for the caller to release. Returns whether the caller
    /// must start the flusher thread.
    pub(crate) fn send_batch(&self, sock: &Sock, batch: &mut Vec<Reply>, done: &mut Vec<Reply>) -> bool {
        /// Gather-list size per `sendmsg`: well under `IOV_MAX` (1024), and 21 replies
        /// of up to three parts each.
        const IOV: usize = 64;
        if self.broken.load(Ordering::Relaxed) {
            done.append(batch);
            return false;
        }
        let mut st = self.state.lock();
        if !st.flushing {
            let mut first = 0;
            while first < batch.len() {
                let mut iov = [IoSlice::new(&[]); IOV];
                let mut n = 0;
                let mut end = first;
                while end < batch.len() && n + 3 <= IOV {
                    for p in batch[end].parts() {
                        if !p.is_empty() {
                            iov[n] = IoSlice::new(p);
                            n += 1;
                        }
                    }
                    end += 1;
                }
                let mut sent = match sock.send_nowait_iov(&iov[..n]) {
                    Ok(k) => k,
                    Err(e) => {
                        drop(st);
                        tracing::debug!("writing replies: {e}; closing the connection");
                        self.break_stream(sock);
                        done.append(batch);
                        return false;
                    }
                };
                while first < end {
                    let r = &mut batch[first];
                    let rest = r.len() - r.sent;
                    if sent < rest {
                        r.sent += sent;
                        break;
                    }
                    r.sent += rest;
                    sent -= rest;
                    first += 1;
                }
                if first < end {
                    break; // the socket is full
                }
            }
            done.extend(batch.drain(..first));
            if batch.is_empty() {
                return false;
            }
            st.flushing = true;
        }
        st.backlog.extend(batch.drain(..));
        let start = !std::mem::replace(&mut st.flusher_started, true);
        drop(st);
        self.cond.notify_one();
        start
    }

    /// The flusher thread's body: send the backlog in order with blocking writes,
    /// handing each finished (or dropped) reply to `release`, until [`Self::close`].
    pub(crate) fn flush(&self, sock: &Sock, release: impl Fn(Reply)) {
        loop {
            let mut st = self.state.lock();
            let r = loop {
                if let Some(r) = st.backlog.pop_front() {
                    break r;
                }
                st.flushing = false;
                if st.closed {
                    return;
                }
                self.cond.wait(&mut st);
            };
            drop(st);
            if !self.broken.load(Ordering::Relaxed) {
                if let Err(e) = sock.send_all(&r.parts()) {
                    tracing::debug!("writing a reply: {e}; closing the connection");
                    self.break_stream(sock);
                }
            }
            release(r);
        }
    }

    /// Empty the backlog (when no flusher can run): the caller releases the replies.
    pub(crate) fn take_backlog(&self) -> Vec<Reply> {
        let mut st = self.state.lock();
        st.flushing = false;
        st.backlog.drain(..).collect()
    }

    /// Let the flusher exit once the backlog is empty.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.cond.notify_all();
    }

    /// The stream is unusable: drop further replies and wake the reader.
    pub(crate) fn break_stream(&self, sock: &Sock) {
        self.broken.store(true, Ordering::SeqCst);
        sock.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    #[test]
    fn backlog_keeps_order_and_releases_everything() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sock = Arc::new(Sock::Unix(a));
        let replies = Arc::new(Replies::new());
        let released = Arc::new(Mutex::new(Vec::new()));
        // Far more than the socket buffer holds while nobody reads.
        let mut flusher = None;
        for i in 0..64u32 {
            let r = Reply::new(&i.to_be_bytes(), Some(i)).with_buf(vec![i as u8; 100_000], true);
            match replies.send(&sock, r) {
                Sent::Done(r) => released.lock().push(r.slot.unwrap()),
                Sent::Queued { start_flusher } => {
                    if start_flusher {
                        let (s, q, rel) = (sock.clone(), replies.clone(), released.clone());
                        flusher = Some(std::thread::spawn(move || q.flush(&s, |r| rel.lock().push(r.slot.unwrap()))));
                    }
                }
            }
        }
        assert!(flusher.is_some(), "the socket buffer filled up");
        let mut got = vec![0u8; 64 * 100_004];
        b.read_exact(&mut got).unwrap();
        for (i, rec) in got.chunks(100_004).enumerate() {
            assert_eq!(&rec[..4], &(i as u32).to_be_bytes());
            assert!(rec[4..].iter().all(|&x| x == i as u8));
        }
        replies.close();
        flusher.unwrap().join().unwrap();
        assert_eq!(*released.lock(), (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn batches_go_out_in_order_and_overflow_into_the_backlog() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let sock = Arc::new(Sock::Unix(a));
        let replies = Arc::new(Replies::new());
        let mut done = Vec::new();
        // Small replies: one batch, all sent at once.
        let mut batch: Vec<Reply> = (0..30u32).map(|i| Reply::new(&i.to_be_bytes(), Some(i))).collect();
        assert!(!replies.send_batch(&sock, &mut batch, &mut done));
        assert!(batch.is_empty());
        assert_eq!(done.len(), 30);
        let mut got = [0u8; 120];
        b.read_exact(&mut got).unwrap();
        for (i, c) in got.chunks(4).enumerate() {
            assert_eq!(c, &(i as u32).to_be_bytes());
        }
        // Large ones: the socket fills up and the rest goes to the flusher, in order.
        done.clear();
        let mut batch: Vec<Reply> = (0..40u32)
            .map(|i| {
                Reply::new(&i.to_be_bytes(), Some(i)).with_msg(b"m".to_vec()).with_buf(vec![i as u8; 50_000], true)
            })
            .collect();
        assert!(replies.send_batch(&sock, &mut batch, &mut done));
        assert!(done.len() < 40);
        let (s, q) = (sock.clone(), replies.clone());
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let f2 = flushed.clone();
        let flusher = std::thread::spawn(move || q.flush(&s, |r| f2.lock().push(r.slot.unwrap())));
        let mut got = vec![0u8; 40 * 50_005];
        b.read_exact(&mut got).unwrap();
        for (i, rec) in got.chunks(50_005).enumerate() {
            assert_eq!(&rec[..4], &(i as u32).to_be_bytes());
            assert_eq!(rec[4], b'm');
            assert!(rec[5..].iter().all(|&x| x == i as u8));
        }
        replies.close();
        flusher.join().unwrap();
        let mut all: Vec<u32> = done.iter().map(|r| r.slot.unwrap()).collect();
        all.extend(flushed.lock().iter());
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }
}
