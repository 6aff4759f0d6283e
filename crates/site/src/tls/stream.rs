//! [`TlsStream`]: one established site link, full duplex. One I/O thread owns the rustls
//! connection and the non-blocking socket and moves bytes both ways (poll on the socket
//! and an eventfd); a [`TlsWriter`] queues frames (bounded, backpressure) and a
//! [`TlsReader`] reads with a timeout, from two threads at once. See the parent module.

use super::*;

/// An established link: one I/O thread and its two handles. Use [`TlsStream::split`] to
/// get the handles; dropping the stream closes the link.
#[derive(Debug)]
pub struct TlsStream {
    writer: TlsWriter,
    reader: TlsReader,
}

/// The sending half of a [`TlsStream`]. `send` may be called from several threads.
#[derive(Debug)]
pub struct TlsWriter {
    shared: Arc<Shared>,
}

/// The receiving half of a [`TlsStream`]: a blocking [`Read`].
#[derive(Debug)]
pub struct TlsReader {
    shared: Arc<Shared>,
    timeout: Option<Duration>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled on every change the handles may wait for.
    changed: Condvar,
    /// Written to wake the I/O thread out of `poll`.
    wake: OwnedFd,
    /// `site 'paris' at 127.0.0.1:7001`, for errors.
    who: String,
    peer_addr: SocketAddr,
    peer_site: String,
}

#[derive(Debug, Default)]
struct State {
    /// Buffers sent and not yet given to rustls, and how much of the front one was.
    out: VecDeque<Vec<u8>>,
    out_front_done: usize,
    /// Bytes in `out` not yet given to rustls.
    queued: usize,
    /// rustls holds bytes not yet written to the socket.
    tls_pending: bool,
    /// Decrypted bytes for the reader.
    received: VecDeque<u8>,
    /// The I/O thread stopped reading the socket because `received` is full.
    read_paused: bool,
    /// How the reading side ended, once it has.
    read_end: Option<End>,
    /// Why sending is no longer possible, once it is not.
    write_end: Option<End>,
    writer_dropped: bool,
    reader_dropped: bool,
    /// The writer asked to close after what is queued.
    shutdown: bool,
    /// Everything sent, then close_notify, went out to the socket.
    closed_cleanly: bool,
    /// A wake-up is already on its way to the I/O thread.
    wake_pending: bool,
}

/// How one direction ended: `None` kind is a clean end of file.
#[derive(Debug, Clone)]
struct End {
    kind: Option<io::ErrorKind>,
    message: String,
}

impl End {
    fn eof() -> End {
        End { kind: None, message: String::new() }
    }

    fn error(kind: io::ErrorKind, message: String) -> End {
        End { kind: Some(kind), message }
    }

    fn to_io(&self) -> io::Error {
        io::Error::new(self.kind.unwrap_or(io::ErrorKind::BrokenPipe), self.message.clone())
    }
}

impl Shared {
    /// Wake the I/O thread (once, however many changes come before it looks).
    fn wake(&self, st: &mut State) {
        if !st.wake_pending {
            st.wake_pending = true;
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
        }
    }
}

impl TlsStream {
    pub(super) fn start(
        conn: Connection,
        tcp: TcpStream,
        peer_addr: SocketAddr,
        peer_site: String,
    ) -> Result<TlsStream, TlsError> {
        let who = format!("site '{peer_site}' at {peer_addr}");
        let setup = |e: io::Error| TlsError::Io { what: format!("setting up the connection to {who}"), source: e };
        tcp.set_nonblocking(true).map_err(setup)?;
        let wake =
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)
                .map_err(|e| setup(e.into()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            wake,
            who: who.clone(),
            peer_addr,
            peer_site,
        });
        let mut io = IoThread {
            conn,
            tcp,
            shared: shared.clone(),
            close_sent: false,
            fin_sent: false,
            peer_eof: false,
            linger_until: None,
        };
        io.conn.set_buffer_limit(Some(TLS_BUFFER));
        std::thread::Builder::new()
            .name("dmrep-tls".into())
            .spawn(move || io.run())
            .map_err(|e| TlsError::Io { what: format!("starting the I/O thread for {who}"), source: e })?;
        Ok(TlsStream { writer: TlsWriter { shared: shared.clone() }, reader: TlsReader { shared, timeout: None } })
    }

    /// The two handles: send from one thread, read from another.
    pub fn split(self) -> (TlsWriter, TlsReader) {
        (self.writer, self.reader)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.writer.shared.peer_addr
    }

    /// The peer's site: the one its certificate names (the one we expected, when we
    /// dialled).
    pub fn peer_site(&self) -> &str {
        &self.writer.shared.peer_site
    }
}

impl TlsWriter {
    /// Queue `bytes` for the peer. Blocks while more than [`SEND_QUEUE_LIMIT`] bytes are
    /// queued and not yet on the socket (a buffer larger than that waits for the queue
    /// to empty). Fails once the connection can no longer send (peer gone, reset, after
    /// [`shutdown`](Self::shutdown)), with the reason.
    pub fn send(&self, bytes: Vec<u8>) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let sh = &*self.shared;
        let mut st = sh.state.lock();
        loop {
            if let Some(end) = &st.write_end {
                return Err(end.to_io());
            }
            if st.shutdown {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("connection to {} is shut down for sending", sh.who),
                ));
            }
            if st.queued == 0 || st.queued + bytes.len() <= SEND_QUEUE_LIMIT {
                break;
            }
            sh.changed.wait(&mut st);
        }
        st.queued += bytes.len();
        st.out.push_back(bytes);
        sh.wake(&mut st);
        Ok(())
    }

    /// Wait until everything sent so far is written to the socket (not that the peer
    /// has read it), or fail if it never will be.
    pub fn flush(&self) -> io::Result<()> {
        let sh = &*self.shared;
        let mut st = sh.state.lock();
        loop {
            if st.queued == 0 && !st.tls_pending && (st.write_end.is_none() || st.closed_cleanly) {
                return Ok(());
            }
            if let Some(end) = &st.write_end {
                return Err(end.to_io());
            }
            sh.changed.wait(&mut st);
        }
    }

    /// Close the sending side after what is queued: the peer reads it all, then end of
    /// file. Further sends fail. Returns at once (see [`flush`](Self::flush)).
    pub fn shutdown(&self) {
        let mut st = self.shared.state.lock();
        st.shutdown = true;
        self.shared.wake(&mut st);
    }

    /// Bytes queued and not yet handed to TLS.
    pub fn queued(&self) -> usize {
        self.shared.state.lock().queued
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.peer_addr
    }

    /// The peer's site.
    pub fn peer_site(&self) -> &str {
        &self.shared.peer_site
    }
}

impl Drop for TlsWriter {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.writer_dropped = true;
        self.shared.wake(&mut st);
    }
}

impl TlsReader {
    /// How long a [`read`](Read::read) waits for data before it fails with
    /// [`io::ErrorKind::TimedOut`]; `None` waits for ever. A zero duration is refused,
    /// as by [`TcpStream::set_read_timeout`].
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if timeout == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero read timeout is not allowed"));
        }
        self.timeout = timeout;
        Ok(())
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.shared.peer_addr
    }

    /// The peer's site.
    pub fn peer_site(&self) -> &str {
        &self.shared.peer_site
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let sh = &*self.shared;
        let mut st = sh.state.lock();
        loop {
            if !st.received.is_empty() {
                let n = st.received.read(buf)?;
                if st.received.is_empty() && st.received.capacity() > 1 << 20 {
                    // Give back what a burst took.
                    st.received.shrink_to(64 << 10);
                }
                if st.read_paused && st.received.len() < RECEIVE_BUFFER_LIMIT {
                    sh.wake(&mut st);
                }
                return Ok(n);
            }
            if let Some(end) = &st.read_end {
                return match end.kind {
                    None => Ok(0),
                    Some(_) => Err(end.to_io()),
                };
            }
            match deadline {
                None => sh.changed.wait(&mut st),
                Some(d) => {
                    if Instant::now() >= d {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "nothing received from {} for {:?}",
                                sh.who,
                                self.timeout.expect("a deadline comes from a timeout")
                            ),
                        ));
                    }
                    sh.changed.wait_until(&mut st, d);
                }
            }
        }
    }
}

impl Drop for TlsReader {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.reader_dropped = true;
        st.received = VecDeque::new();
        self.shared.wake(&mut st);
    }
}

/// The thread that owns the TLS connection and the socket.
struct IoThread {
    conn: Connection,
    tcp: TcpStream,
    shared: Arc<Shared>,
    close_sent: bool,
    fin_sent: bool,
    /// The peer's TCP FIN (or reset) was read: nothing more will arrive.
    peer_eof: bool,
    /// Both handles are gone: give up sending at this instant.
    linger_until: Option<Instant>,
}

/// What one pass of the I/O loop wants from `poll`.
struct Want {
    read: bool,
    write: bool,
    timeout: Option<Duration>,
}

/// Socket bytes read per pass at most, so a fast sender does not starve our writes.
const READ_PER_PASS: usize = 1 << 20;

impl IoThread {
    fn run(mut self) {
        loop {
            self.take_plaintext();
            let Some(want) = self.step() else { break };
            let mut fds = Vec::with_capacity(2);
            let mut sock_flags = PollFlags::empty();
            if want.read {
                sock_flags |= PollFlags::IN;
            }
            if want.write {
                sock_flags |= PollFlags::OUT;
            }
            fds.push(PollFd::new(&self.shared.wake, PollFlags::IN));
            if !sock_flags.is_empty() {
                // Left out when nothing is wanted of it: a hung-up socket would wake
                // poll for ever.
                fds.push(PollFd::new(&self.tcp, sock_flags));
            }
            let timeout = want.timeout.map(|t| rustix::event::Timespec::try_from(t).expect("a linger fits a timespec"));
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    self.fail_both(
                        io::Error::from(e).kind(),
                        format!("connection to {}: poll failed: {e}", self.shared.who),
                    );
                    break;
                }
            }
            let wake_ready = !fds[0].revents().is_empty();
            let sock_ready = fds.get(1).map(|f| f.revents()).unwrap_or(PollFlags::empty());
            drop(fds);
            if wake_ready {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(&self.shared.wake, &mut b);
            }
            if want.write && sock_ready.intersects(PollFlags::OUT | PollFlags::ERR | PollFlags::HUP) {
                self.write_socket();
            }
            if want.read && sock_ready.intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP) {
                self.read_socket();
            }
        }
        // The socket closes as `self` drops.
        let sh = &*self.shared;
        let mut st = sh.state.lock();
        let closed = End::error(io::ErrorKind::NotConnected, format!("connection to {} is closed", sh.who));
        st.read_end.get_or_insert_with(|| closed.clone());
        st.write_end.get_or_insert(closed);
        st.out.clear();
        st.queued = 0;
        st.tls_pending = false;
        sh.changed.notify_all();
    }

    /// Under the lock: hand queued bytes to rustls, start closing when asked, publish
    /// progress, and decide what to wait for; `None` ends the thread.
    fn step(&mut self) -> Option<Want> {
        let sh = self.shared.clone();
        let mut st = sh.state.lock();
        st.wake_pending = false;
        let before = (st.queued, st.tls_pending, st.write_end.is_some());
        if st.write_end.is_none() {
            // Feed rustls only when the socket has taken everything before.
            while !self.conn.wants_write() && !st.out.is_empty() {
                let front = st.out.front().expect("not empty");
                let from = st.out_front_done;
                let n = match io::Write::write(&mut self.conn.writer(), &front[from..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let front_len = front.len();
                st.queued -= n;
                if from + n == front_len {
                    st.out.pop_front();
                    st.out_front_done = 0;
                } else {
                    st.out_front_done += n;
                }
            }
            if (st.shutdown || st.writer_dropped) && st.out.is_empty() && !self.close_sent {
                self.conn.send_close_notify();
                self.close_sent = true;
            }
            if self.close_sent && !self.conn.wants_write() && !self.fin_sent {
                let _ = self.tcp.shutdown(Shutdown::Write);
                self.fin_sent = true;
                st.closed_cleanly = true;
                st.write_end = Some(End::error(
                    io::ErrorKind::BrokenPipe,
                    format!("connection to {} is shut down for sending", sh.who),
                ));
            }
        }
        st.tls_pending = self.conn.wants_write() && st.write_end.is_none();
        let write_done = st.write_end.is_some();
        let read_done = st.read_end.is_some() || self.peer_eof;
        if before != (st.queued, st.tls_pending, write_done) {
            sh.changed.notify_all();
        }

        if write_done && (read_done || st.reader_dropped) {
            return None;
        }
        let mut timeout = None;
        if st.reader_dropped && st.writer_dropped {
            let until = *self.linger_until.get_or_insert_with(|| Instant::now() + LINGER);
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            timeout = Some(left);
        }
        st.read_paused = !st.reader_dropped && st.received.len() >= RECEIVE_BUFFER_LIMIT;
        Some(Want { read: !read_done && !st.read_paused, write: !write_done && self.conn.wants_write(), timeout })
    }

    /// Write what rustls has until the socket would block.
    fn write_socket(&mut self) {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let sh = &*self.shared;
                    let mut st = sh.state.lock();
                    st.write_end = Some(End::error(e.kind(), format!("cannot send to {}: {e}", sh.who)));
                    st.out.clear();
                    st.queued = 0;
                    sh.changed.notify_all();
                    return;
                }
            }
        }
    }

    /// Read and decrypt what the socket has (up to [`READ_PER_PASS`]).
    fn read_socket(&mut self) {
        let mut total = 0;
        while total < READ_PER_PASS {
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => {
                    self.peer_eof = true;
                    break;
                }
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.peer_eof = true;
                    let message = match e.kind() {
                        io::ErrorKind::ConnectionReset => format!("{} reset the connection", self.shared.who),
                        _ => format!("cannot receive from {}: {e}", self.shared.who),
                    };
                    self.fail_both(e.kind(), message);
                    return;
                }
            }
            if !self.process() {
                return;
            }
            self.take_plaintext();
        }
        if !self.process() {
            return;
        }
        self.take_plaintext();
    }

    /// Process the records read; on a TLS error, tell the peer and end both ways.
    fn process(&mut self) -> bool {
        match self.conn.process_new_packets() {
            Ok(_) => true,
            Err(e) => {
                while self.conn.wants_write() {
                    if self.conn.write_tls(&mut self.tcp).is_err() {
                        break;
                    }
                }
                let message = match &e {
                    rustls::Error::AlertReceived(a) => {
                        format!("{} ended the connection with TLS alert {a:?}", self.shared.who)
                    }
                    e => format!("TLS error on the connection to {}: {e}", self.shared.who),
                };
                self.fail_both(io::ErrorKind::InvalidData, message);
                false
            }
        }
    }

    /// Move decrypted bytes to the reader (or drop them if it is gone), and note a clean
    /// or unclean end of the peer's stream.
    fn take_plaintext(&mut self) {
        let sh = self.shared.clone();
        let mut buf = [0u8; 16 << 10];
        let mut st = sh.state.lock();
        if st.read_end.is_some() {
            return;
        }
        let received = st.received.len();
        loop {
            match self.conn.reader().read(&mut buf) {
                Ok(0) => {
                    st.read_end = Some(End::eof());
                    break;
                }
                Ok(n) => {
                    if !st.reader_dropped {
                        st.received.extend(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.peer_eof {
                        st.read_end = Some(End::error(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "{} closed the connection without TLS close_notify (peer stopped or link cut)",
                                sh.who
                            ),
                        ));
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    st.read_end = Some(End::error(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} closed the connection without TLS close_notify (peer stopped or link cut)", sh.who),
                    ));
                    break;
                }
                Err(e) => {
                    st.read_end = Some(End::error(e.kind(), format!("receiving from {}: {e}", sh.who)));
                    break;
                }
            }
        }
        if st.received.len() != received || st.read_end.is_some() {
            sh.changed.notify_all();
        }
    }

    /// The connection is unusable both ways.
    fn fail_both(&mut self, kind: io::ErrorKind, message: String) {
        let sh = &*self.shared;
        let mut st = sh.state.lock();
        let end = End::error(kind, message);
        st.read_end.get_or_insert_with(|| end.clone());
        st.write_end.get_or_insert(end);
        st.out.clear();
        st.queued = 0;
        sh.changed.notify_all();
        self.peer_eof = true;
    }
}
