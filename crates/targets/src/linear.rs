//! `linear <dev> <offset>`: maps the segment onto `dev` starting at sector `offset`.

use std::sync::Arc;

use dmrep_core::target::complete_with;
use dmrep_core::units::sectors_to_bytes;
use dmrep_core::{BlockBackend, BuildContext, Claim, Completion, Op, Request, Target, TargetError, TargetStatus};
use dmrep_formats::table::SegmentSpec;
use parking_lot::Mutex;

use crate::params::{expect_args, number, open_device};

pub struct Linear {
    dev: Arc<dyn BlockBackend>,
    path: String,
    /// Byte offset on the device.
    offset: u64,
    /// The segment's bytes of the device (released at shutdown).
    claim: Mutex<Option<Claim>>,
}

pub fn construct(ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    expect_args("linear", &seg.args, 2, "<dev_path> <offset_sectors>")?;
    let offset = number("linear", "offset", &seg.args[1])?;
    let role = format!("linear segment at sector {}", seg.start);
    let (dev, claim) = open_device(ctx, "linear", &seg.args[0], offset, seg.len, role)?;
    Ok(Arc::new(Linear {
        dev,
        path: seg.args[0].clone(),
        offset: sectors_to_bytes(offset),
        claim: Mutex::new(Some(claim)),
    }))
}

/// Do one request against a back-end at `base + req.offset`. Shared by linear-like targets.
pub(crate) fn do_io(dev: &dyn BlockBackend, base: u64, req: &mut Request) -> std::io::Result<()> {
    let off = base + req.offset;
    match req.op {
        Op::Read => dev.read_at(&mut req.buf, off),
        Op::Write { fua } => {
            dev.write_at(&req.buf, off)?;
            if fua {
                dev.sync()?;
            }
            Ok(())
        }
        Op::Flush => dev.sync(),
        Op::Discard => dev.discard(off, req.len),
        Op::WriteZeroes { may_trim, fua } => {
            dev.write_zeroes(off, req.len, may_trim)?;
            if fua {
                dev.sync()?;
            }
            Ok(())
        }
    }
}

impl Target for Linear {
    fn type_name(&self) -> &'static str {
        "linear"
    }

    fn submit(&self, req: Request, done: Completion) {
        complete_with(req, done, |req| do_io(&*self.dev, self.offset, req));
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn status(&self) -> TargetStatus {
        TargetStatus::new("", serde_json::json!({ "device": self.path, "offset_bytes": self.offset }))
    }

    fn shutdown(&self) {
        self.claim.lock().take();
    }
}
