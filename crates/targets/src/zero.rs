//! `zero`: reads return zeros, writes are accepted and dropped (like dm-zero).

use std::sync::Arc;

use dmrep_core::target::complete_with;
use dmrep_core::{BuildContext, Completion, Op, Request, Target, TargetError};
use dmrep_formats::table::SegmentSpec;

use crate::params::expect_args;

pub struct Zero;

pub fn construct(_ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    expect_args("zero", &seg.args, 0, "none")?;
    Ok(Arc::new(Zero))
}

impl Target for Zero {
    fn type_name(&self) -> &'static str {
        "zero"
    }

    fn submit(&self, req: Request, done: Completion) {
        complete_with(req, done, |req| {
            if req.op == Op::Read {
                req.buf.fill(0);
            }
            Ok(())
        });
    }

    fn supports_discard(&self) -> bool {
        true
    }
}
