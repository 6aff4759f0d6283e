//! Block back-ends: positional I/O on regular files and block devices.
//!
//! One trait, [`BlockBackend`], so that other implementations (O_DIRECT, io_uring, a
//! fault-injecting wrapper for tests) plug in behind it.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// Positional, thread-safe block I/O. All offsets and lengths in bytes.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Write all of `bufs`, back to back, starting at `offset` (a gathered write: the
    /// replication log writes header, data and padding of many entries in one call
    /// without copying them into one buffer). The default writes each buffer in turn.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Make completed writes durable.
    fn sync(&self) -> io::Result<()>;
    /// Deallocate a range (it reads as zeros afterwards on files).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make a range read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()>;
    /// A name for messages (the path).
    fn describe(&self) -> String;
}

/// A regular file or block device opened read-write.
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    is_block: bool,
}

impl FileBackend {
    /// Open `path` read-write. Its size is fixed at open time.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::from_file(OpenOptions::new().read(true).write(true).open(path)?, path)
    }

    /// Open `path` read-only (offline inspection). Writes fail with EBADF.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Self::from_file(OpenOptions::new().read(true).open(path)?, path)
    }

    /// Size the opened file (a block device's size is where a seek to the end lands).
    fn from_file(mut file: File, path: &Path) -> io::Result<Self> {
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or block device"));
        }
        let size = if is_block { file.seek(SeekFrom::End(0))? } else { meta.len() };
        Ok(FileBackend { file, path: path.to_path_buf(), size, is_block })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Largest zero buffer written at once when zeroing cannot punch holes.
const ZERO_CHUNK: usize = 1 << 20;

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        write_all_vectored_at(&self.file, bufs, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_block || len == 0 {
            // Discard is advisory; block devices would need BLKDISCARD, not worth it.
            return Ok(());
        }
        punch_hole(&self.file, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.is_block {
            let mode = if may_trim {
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE
            } else {
                rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE
            };
            if rustix::fs::fallocate(&self.file, mode, offset, len).is_ok() {
                return Ok(());
            }
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Most buffers one `pwritev` accepts (Linux's `IOV_MAX`); longer lists are split.
const IOV_MAX: usize = 1024;

/// `pwritev` until every byte is written: resumes after short writes and `EINTR`.
fn write_all_vectored_at(file: &File, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
    let mut idx = 0; // first buffer not completely written
    let mut skip = 0; // bytes of bufs[idx] already written
    let mut at = offset;
    let mut partial: Vec<IoSlice<'_>> = Vec::new();
    while idx < bufs.len() {
        if skip == bufs[idx].len() {
            idx += 1;
            skip = 0;
            continue;
        }
        let end = (idx + IOV_MAX).min(bufs.len());
        let res = if skip == 0 {
            rustix::io::pwritev(file, &bufs[idx..end], at)
        } else {
            partial.clear();
            partial.push(IoSlice::new(&bufs[idx][skip..]));
            partial.extend_from_slice(&bufs[idx + 1..end]);
            rustix::io::pwritev(file, &partial, at)
        };
        let mut n = match res {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing")),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += n as u64;
        while n > 0 {
            let left = bufs[idx].len() - skip;
            if n >= left {
                n -= left;
                idx += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    match rustix::fs::fallocate(file, mode, offset, len) {
        Ok(()) => Ok(()),
        // A file system without hole punching: discard is advisory, ignore.
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_roundtrip_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0xabu8; 8192]).unwrap();
        let b = FileBackend::open(&p).unwrap();
        assert_eq!(b.size(), 8192);
        b.write_at(&[1, 2, 3], 100).unwrap();
        let mut buf = [0u8; 3];
        b.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [1, 2, 3]);
        b.write_zeroes(0, 4096, false).unwrap();
        let mut buf = vec![0xffu8; 4096];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        b.discard(4096, 4096).unwrap();
        let mut buf = vec![0xffu8; 10];
        b.read_at(&mut buf, 8182).unwrap();
    }

    #[test]
    fn vectored_write_many_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let b = FileBackend::open(&p).unwrap();
        // More buffers than IOV_MAX, of uneven sizes, some empty.
        let chunks: Vec<Vec<u8>> = (0..2500u32).map(|i| vec![(i % 251) as u8; (i % 7) as usize]).collect();
        let slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        b.write_vectored_at(&slices, 1000).unwrap();
        let want: Vec<u8> = chunks.concat();
        let mut got = vec![0u8; want.len()];
        b.read_at(&mut got, 1000).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn open_refuses_directories() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FileBackend::open(dir.path()).is_err());
    }
}
