//! `error`: every I/O fails with EIO (like dm-error). Useful to fence a range or to
//! test how clients handle failing devices.

use std::io;
use std::sync::Arc;

use dmrep_core::{BuildContext, Completion, Request, Target, TargetError};
use dmrep_formats::table::SegmentSpec;

use crate::params::expect_args;

pub struct ErrorTarget;

pub fn construct(_ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    expect_args("error", &seg.args, 0, "none")?;
    Ok(Arc::new(ErrorTarget))
}

impl Target for ErrorTarget {
    fn type_name(&self) -> &'static str {
        "error"
    }

    fn submit(&self, req: Request, done: Completion) {
        done.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::IO.raw_os_error())));
    }
}
