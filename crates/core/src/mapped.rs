//! A mapped device of this daemon as the back-end of another table (stacking).

use std::io;
use std::sync::Arc;

use crate::device::MappedDevice;
use crate::target::{Op, Request};

/// A mapped device of this daemon as the back-end of another table (stacking:
/// `/dev/mapper/NAME` in a table). Each call is one request to the device, waited for.
pub struct MappedBackend {
    dev: Arc<MappedDevice>,
}

impl MappedBackend {
    pub fn new(dev: Arc<MappedDevice>) -> MappedBackend {
        MappedBackend { dev }
    }

    fn run(&self, op: Op, offset: u64, len: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let (req, r) = self.dev.submit_wait(Request::new(op, offset, len, buf, 0));
        r.map(|()| req.buf)
    }
}

impl crate::backend::BlockBackend for MappedBackend {
    fn size(&self) -> u64 {
        self.dev.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let out = self.run(Op::Read, offset, buf.len() as u64, vec![0u8; buf.len()])?;
        buf.copy_from_slice(&out[..buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.run(Op::Write { fua: false }, offset, buf.len() as u64, buf.to_vec()).map(|_| ())
    }

    fn sync(&self) -> io::Result<()> {
        self.run(Op::Flush, 0, 0, Vec::new()).map(|_| ())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.run(Op::Discard, offset, len, Vec::new()).map(|_| ())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.run(Op::WriteZeroes { may_trim, fua: false }, offset, len, Vec::new()).map(|_| ())
    }

    fn describe(&self) -> String {
        format!("/dev/mapper/{}", self.dev.name())
    }
}
