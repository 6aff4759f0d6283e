//! One connected stream socket, Unix or TCP, shared by the threads of a connection.
//!
//! Reads and writes go straight to the file descriptor through `rustix` (so replies use
//! `sendmsg` with `MSG_NOSIGNAL`: a vanished client never raises `SIGPIPE`, whatever the
//! embedding program's signal disposition). Reading and writing concurrently from
//! different threads is fine for stream sockets; the connection serialises the writers.

use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use rustix::net::{RecvFlags, SendAncillaryBuffer, SendFlags};

/// A connected client socket.
#[derive(Debug)]
pub(crate) enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Unix(s) => s.as_fd(),
            Sock::Tcp(s) => s.as_fd(),
        }
    }
}

impl Sock {
    /// A name for logs: the TCP peer address, or "unix".
    pub(crate) fn peer(&self) -> String {
        match self {
            Sock::Unix(_) => "unix".to_string(),
            Sock::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp".to_string()),
        }
    }

    /// Blocking receive of at most `buf.len()` bytes; 0 means end of stream.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::net::recv(self, &mut *buf, RecvFlags::empty()) {
                Ok((n, _)) => return Ok(n),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receive whatever is already queued, without waiting. `None`: nothing queued.
    pub(crate) fn recv_nowait(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match rustix::net::recv(self, &mut *buf, RecvFlags::DONTWAIT) {
                Ok((n, _)) => return Ok(Some(n)),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Fill `buf` completely; end of stream is `UnexpectedEof`.
    pub(crate) fn recv_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.recv(buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// Send all of `parts`, in order, with as few `sendmsg` calls as the kernel allows
    /// (one, unless the socket buffer is full).
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        const MAX_PARTS: usize = 4;
        debug_assert!(parts.len() <= MAX_PARTS);
        let mut rest: [&[u8]; MAX_PARTS] = [&[]; MAX_PARTS];
        let mut count = 0;
        for p in parts.iter().filter(|p| !p.is_empty()).take(MAX_PARTS) {
            rest[count] = p;
            count += 1;
        }
        let mut first = 0;
        while first < count {
            let iov: [IoSlice<'_>; MAX_PARTS] =
                std::array::from_fn(
                    |i| {
                        if first + i < count {
                            IoSlice::new(rest[first + i])
                        } else {
                            IoSlice::new(&[])
                        }
                    },
                );
            let n = match rustix::net::sendmsg(
                self,
                &iov[..count - first],
                &mut SendAncillaryBuffer::default(),
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            // Advance past what was sent.
            let mut n = n;
            while first < count && n >= rest[first].len() {
                n -= rest[first].len();
                first += 1;
            }
            if first < count {
                rest[first] = &rest[first][n..];
            }
        }
        Ok(())
    }

    /// `shutdown(2)`: wakes any thread blocked in `recv` on this socket. Errors (the
    /// socket is already shut down or disconnected) are of no interest.
    pub(crate) fn shutdown(&self, how: Shutdown) {
        let how = match how {
            Shutdown::Read => rustix::net::Shutdown::Read,
            Shutdown::Write => rustix::net::Shutdown::Write,
            Shutdown::Both => rustix::net::Shutdown::Both,
        };
        let _ = rustix::net::shutdown(self, how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_all_handles_partial_writes() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Sock::Unix(a);
        let b = Sock::Unix(b);
        // Larger than the socket buffer: forces partial sendmsg calls.
        let big = vec![7u8; 4 << 20];
        let hdr = [1u8, 2, 3];
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 3 + (4 << 20) + 2];
            b.recv_exact(&mut got).unwrap();
            got
        });
        a.send_all(&[&hdr, &[], &big, &[9, 9]]).unwrap();
        let got = reader.join().unwrap();
        assert_eq!(&got[..3], &hdr);
        assert!(got[3..3 + (4 << 20)].iter().all(|&x| x == 7));
        assert_eq!(&got[got.len() - 2..], &[9, 9]);
    }

    #[test]
    fn recv_nowait_and_shutdown() {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Sock::Unix(a);
        let mut buf = [0u8; 8];
        assert_eq!(a.recv_nowait(&mut buf).unwrap(), None);
        a.shutdown(Shutdown::Read);
        assert_eq!(a.recv(&mut buf).unwrap(), 0);
        drop(b);
    }
}
