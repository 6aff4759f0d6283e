//! `striped <#stripes> <chunk_sectors> {<dev> <offset>}...`: the segment is cut into
//! chunks of `chunk_sectors`, dealt round-robin over the stripes.
//!
//! Chunk `c` of the segment lives on stripe `c % stripes`, as that stripe's chunk
//! number `c / stripes`. The chunk size is a power of two of at least 8 sectors (4 KiB),
//! and the segment length must be a whole number of rows (`stripes * chunk`), as in
//! dm-stripe, so every stripe holds `len / stripes` sectors.

use std::io;
use std::sync::Arc;

use dmrep_core::target::complete_with;
use dmrep_core::units::{sectors_to_bytes, SECTOR_SIZE};
use dmrep_core::{BlockBackend, BuildContext, Claim, Completion, Op, Request, Target, TargetError, TargetStatus};
use dmrep_formats::table::SegmentSpec;
use parking_lot::Mutex;

use crate::params::{number, open_device};

/// Smallest chunk: 8 sectors = 4 KiB, the page size, below which striping only costs.
pub const MIN_CHUNK_SECTORS: u64 = 8;

/// Most stripes in one segment; more would be a typo, not a layout.
pub const MAX_STRIPES: u64 = 256;

struct Stripe {
    dev: Arc<dyn BlockBackend>,
    path: String,
    /// Byte offset of the stripe's area on its device.
    offset: u64,
}

pub struct Striped {
    stripes: Vec<Stripe>,
    /// Chunk size in bytes.
    chunk: u64,
    /// Each stripe's bytes of its device (released at shutdown).
    claims: Mutex<Vec<Claim>>,
}

/// Where a byte offset of the segment lives: `(stripe index, byte offset within the
/// stripe's area)`. Pure arithmetic, tested against a reference below.
pub fn map_offset(offset: u64, chunk: u64, stripes: u64) -> (usize, u64) {
    let c = offset / chunk;
    let within = offset % chunk;
    ((c % stripes) as usize, (c / stripes) * chunk + within)
}

pub fn construct(ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    const T: &str = "striped";
    let a = &seg.args;
    if a.len() < 2 {
        return Err(TargetError::params(T, "expected <#stripes> <chunk_sectors> {<dev> <offset>}..."));
    }
    let n = number(T, "#stripes", &a[0])?;
    if n == 0 || n > MAX_STRIPES {
        return Err(TargetError::params(T, format!("#stripes: expected 1..={MAX_STRIPES}, found {n}")));
    }
    let chunk = number(T, "chunk_sectors", &a[1])?;
    if chunk < MIN_CHUNK_SECTORS || !chunk.is_power_of_two() {
        return Err(TargetError::params(
            T,
            format!("chunk_sectors: expected a power of two >= {MIN_CHUNK_SECTORS}, found {chunk}"),
        ));
    }
    if a.len() as u64 != 2 + 2 * n {
        return Err(TargetError::params(
            T,
            format!(
                "expected {} parameters for {n} stripes (2 + <dev> <offset> per stripe), found {}",
                2 + 2 * n,
                a.len()
            ),
        ));
    }
    let row = n * chunk;
    if !seg.len.is_multiple_of(row) {
        return Err(TargetError::params(
            T,
            format!("length {} is not a multiple of #stripes * chunk_sectors = {row}", seg.len),
        ));
    }
    let per_stripe = seg.len / n;
    let mut stripes = Vec::with_capacity(n as usize);
    let mut claims = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let path = &a[2 + 2 * i];
        let off = number(T, &format!("stripe {i} offset"), &a[3 + 2 * i])?;
        let role = format!("striped segment at sector {}, stripe {i}", seg.start);
        let (dev, claim) = open_device(ctx, T, path, off, per_stripe, role)?;
        stripes.push(Stripe { dev, path: path.clone(), offset: sectors_to_bytes(off) });
        claims.push(claim);
    }
    Ok(Arc::new(Striped { stripes, chunk: sectors_to_bytes(chunk), claims: Mutex::new(claims) }))
}

impl Striped {
    /// Run `f(stripe, device offset, range within the request)` for each chunk piece.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Stripe, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let (idx, within) = map_offset(off, self.chunk, self.stripes.len() as u64);
            let n = (self.chunk - off % self.chunk).min(len - done);
            let s = &self.stripes[idx];
            f(s, s.offset + within, done as usize..(done + n) as usize)?;
            done += n;
        }
        Ok(())
    }

    fn io(&self, req: &mut Request) -> io::Result<()> {
        match req.op {
            Op::Read => {
                let buf = &mut req.buf;
                self.for_each_piece(req.offset, req.len, |s, off, r| s.dev.read_at(&mut buf[r], off))
            }
            Op::Write { fua } => {
                let buf = &req.buf;
                self.for_each_piece(req.offset, req.len, |s, off, r| s.dev.write_at(&buf[r], off))?;
                if fua {
                    self.sync_all()?;
                }
                Ok(())
            }
            Op::Flush => self.sync_all(),
            Op::Discard => self.for_each_piece(req.offset, req.len, |s, off, r| s.dev.discard(off, r.len() as u64)),
            Op::WriteZeroes { may_trim, fua } => {
                self.for_each_piece(req.offset, req.len, |s, off, r| {
                    s.dev.write_zeroes(off, r.len() as u64, may_trim)
                })?;
                if fua {
                    self.sync_all()?;
                }
                Ok(())
            }
        }
    }

    fn sync_all(&self) -> io::Result<()> {
        self.stripes.iter().try_for_each(|s| s.dev.sync())
    }
}

impl Target for Striped {
    fn type_name(&self) -> &'static str {
        "striped"
    }

    fn submit(&self, req: Request, done: Completion) {
        complete_with(req, done, |req| self.io(req));
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn status(&self) -> TargetStatus {
        let devs: Vec<_> = self.stripes.iter().map(|s| s.path.clone()).collect();
        TargetStatus::new(
            format!("{} {}", self.stripes.len(), "A".repeat(self.stripes.len())),
            serde_json::json!({ "stripes": devs.len(), "chunk_sectors": self.chunk / SECTOR_SIZE, "devices": devs }),
        )
    }

    fn shutdown(&self) {
        self.claims.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: deal chunks one by one, as a person would on paper.
    fn reference(offset: u64, chunk: u64, stripes: u64) -> (usize, u64) {
        let mut filled = vec![0u64; stripes as usize];
        let mut pos = 0u64;
        let mut s = 0usize;
        loop {
            if offset < pos + chunk {
                return (s, filled[s] + (offset - pos));
            }
            filled[s] += chunk;
            pos += chunk;
            s = (s + 1) % stripes as usize;
        }
    }

    proptest! {
        #[test]
        fn mapping_matches_reference(stripes in 1u64..8, chunk_pow in 12u32..16, off in 0u64..(1 << 20)) {
            let chunk = 1u64 << chunk_pow;
            prop_assert_eq!(map_offset(off, chunk, stripes), reference(off, chunk, stripes));
        }
    }

    fn seg(args: &[&str], len: u64) -> SegmentSpec {
        SegmentSpec {
            start: 0,
            len,
            target: "striped".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            line: 1,
        }
    }

    fn ctx_build(s: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
        let reg = dmrep_core::DeviceRegistry::new();
        construct(&BuildContext::new("t", &reg), s)
    }

    #[test]
    fn rejects_bad_params() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, vec![0u8; 1 << 20]).unwrap();
        let p = f.to_str().unwrap();
        let err = |a: &[&str], len| ctx_build(&seg(a, len)).err().unwrap().to_string();
        assert!(err(&["2", "12", p, "0", p, "0"], 64).contains("power of two"));
        assert!(err(&["2", "4", p, "0", p, "0"], 64).contains("power of two >= 8"));
        assert!(err(&["2", "8", p, "0"], 64).contains("expected 6 parameters"));
        assert!(err(&["2", "8", p, "0", p, "0"], 24).contains("multiple"));
        assert!(err(&["0", "8"], 16).contains("#stripes"));
        assert!(err(&["2", "8", p, "0", p, "2040"], 64).contains("past the end"));
        assert!(err(&["1", "8", "/nonexistent/x", "0"], 8).contains("/nonexistent/x"));
        assert!(ctx_build(&seg(&["2", "8", p, "0", p, "1024"], 2048)).is_ok());
        // Two stripes over the same sectors of one file: one owner per byte.
        let e = err(&["2", "8", p, "0", p, "16"], 64);
        assert!(e.contains("stripe 0") && e.contains("stripe 1") && e.contains(p), "{e}");
    }

    #[test]
    fn io_lands_on_the_right_stripe() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, vec![0u8; 64 * 1024]).unwrap();
        std::fs::write(&b, vec![0u8; 64 * 1024]).unwrap();
        let t = ctx_build(&seg(&["2", "8", a.to_str().unwrap(), "0", b.to_str().unwrap(), "8"], 128)).unwrap();
        // Write 12 KiB at 2 KiB: pieces on a(chunk0), b(chunk0), a(chunk1).
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
        struct Sink(std::sync::Mutex<Option<(Request, io::Result<()>)>>);
        impl dmrep_core::IoSink for Sink {
            fn complete(&self, req: Request, r: io::Result<()>) {
                *self.0.lock().unwrap() = Some((req, r));
            }
        }
        let sink = Arc::new(Sink(std::sync::Mutex::new(None)));
        t.submit(Request::new(Op::Write { fua: true }, 2048, 12288, data.clone(), 0), Completion::new(sink.clone(), 0));
        assert!(sink.0.lock().unwrap().take().unwrap().1.is_ok());
        let fa = std::fs::read(&a).unwrap();
        let fb = std::fs::read(&b).unwrap();
        assert_eq!(&fa[2048..4096], &data[..2048]);
        assert_eq!(&fb[4096..8192], &data[2048..6144]); // stripe b starts at sector 8
        assert_eq!(&fa[4096..8192], &data[6144..10240]);
        assert_eq!(&fb[8192..10240], &data[10240..]);
        t.submit(Request::new(Op::Read, 2048, 12288, vec![0; 12288], 0), Completion::new(sink.clone(), 0));
        let (req, r) = sink.0.lock().unwrap().take().unwrap();
        assert!(r.is_ok());
        assert_eq!(req.buf, data);
    }
}
