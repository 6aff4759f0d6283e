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

    /// One `sendmsg` of the non-empty `parts` (at most [`MAX_PARTS`]), retried on EINTR.
    fn sendmsg(&self, parts: &[&[u8]], flags: SendFlags) -> Result<usize, Errno> {
        let mut iov: [IoSlice<'_>; MAX_PARTS] = [IoSlice::new(&[]); MAX_PARTS];
        let mut n = 0;
        for p in parts.iter().filter(|p| !p.is_empty()).take(MAX_PARTS) {
            iov[n] = IoSlice::new(p);
            n += 1;
        }
        self.sendmsg_iov(&iov[..n], flags)
    }

    fn sendmsg_iov(&self, iov: &[IoSlice<'_>], flags: SendFlags) -> Result<usize, Errno> {
        loop {
            match rustix::net::sendmsg(self, iov, &mut SendAncillaryBuffer::default(), flags | SendFlags::NOSIGNAL) {
                Err(Errno::INTR) => continue,
                r => return r,
            }
        }
    }

    /// Like [`Self::send_nowait`], for a prepared gather list.
    pub(crate) fn send_nowait_iov(&self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.sendmsg_iov(iov, SendFlags::DONTWAIT) {
            Ok(n) => Ok(n),
            Err(Errno::AGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Send as much of `parts` as the socket takes without waiting; returns the byte
    /// count (0 when the socket buffer is full).
    pub(crate) fn send_nowait(&self, parts: &[&[u8]]) -> io::Result<usize> {
        match self.sendmsg(parts, SendFlags::DONTWAIT) {
            Ok(n) => Ok(n),
            Err(Errno::AGAIN) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Send all of `parts`, in order, waiting as needed.
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut rest: [&[u8]; MAX_PARTS] = [&[]; MAX_PARTS];
        let count = parts.len().min(MAX_PARTS);
        rest[..count].copy_from_slice(&parts[..count]);
        let mut skip = 0;
        loop {
            advance(&mut rest[..count], skip);
            if rest.iter().all(|p| p.is_empty()) {
                return Ok(());
            }
            skip = self.sendmsg(&rest[..count], SendFlags::empty())?;
            if skip == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
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

/// Most parts one vectored send takes: a reply is a header, a message, and data.
pub(crate) const MAX_PARTS: usize = 4;

/// Drop the first `n` bytes of the concatenation of `parts`.
pub(crate) fn advance(parts: &mut [&[u8]], mut n: usize) {
    for p in parts.iter_mut() {
        let k = n.min(p.len());
        *p = &p[k..];
        n -= k;
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
    fn advance_across_parts() {
        let (a, b, c) = ([1u8, 2, 3], [4u8], [5u8, 6]);
        let mut p: [&[u8]; 3] = [&a, &b, &c];
        advance(&mut p, 4);
        assert_eq!(p, [&[][..], &[][..], &[5u8, 6][..]]);
        advance(&mut p, 1);
        assert_eq!(p[2], &[6]);
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
