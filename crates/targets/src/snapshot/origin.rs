//! `snapshot-origin <origin>`: the origin device, written through its [`CowOrigin`] so
//! that every snapshot of it gets old chunks copied out before they are overwritten.
//! It claims the origin's bytes (`0..length`), as `linear` would.

use std::path::Path;
use std::sync::Arc;

use dmrep_core::claims::FileId;
use dmrep_core::target::complete_with;
use dmrep_core::units::sectors_to_bytes;
use dmrep_core::{
    BlockBackend, BuildContext, Claim, Completion, MappedDevice, Request, Target, TargetError, TargetStatus,
};
use dmrep_formats::table::SegmentSpec;
use parking_lot::Mutex;

use super::{origin_for_file, origin_for_mapped, CowOrigin};
use crate::params::{expect_args, fits, mapped_device, MAPPER};

/// An origin named in a table, opened through the process-wide registry.
pub(crate) struct OpenedOrigin {
    pub origin: Arc<CowOrigin>,
    /// Its key (device and inode of a file, or a mapped device's UUID).
    pub id: FileId,
    /// The mapped device, for `/dev/mapper/NAME`.
    pub mapped: Option<Arc<MappedDevice>>,
}

/// Opens the origin at `path` (a file, block device or `/dev/mapper/NAME`) and checks
/// that `len_sectors` fit in it. Claims nothing.
pub(crate) fn open_origin(
    ctx: &BuildContext<'_>,
    target: &'static str,
    path: &str,
    len_sectors: u64,
) -> Result<OpenedOrigin, TargetError> {
    let opened = match path.strip_prefix(MAPPER) {
        Some(name) => {
            let dev = mapped_device(ctx, target, name)?;
            OpenedOrigin { origin: origin_for_mapped(&dev), id: super::mapped_id(dev.uuid()), mapped: Some(dev) }
        }
        None => {
            let dev_err = |e| TargetError::Device { path: path.to_string(), source: e };
            let id = FileId::of_path(Path::new(path)).map_err(dev_err)?;
            OpenedOrigin { origin: origin_for_file(Path::new(path)).map_err(dev_err)?, id, mapped: None }
        }
    };
    fits(target, path, 0, len_sectors, opened.origin.size())?;
    Ok(opened)
}

pub struct SnapshotOrigin {
    origin: Arc<CowOrigin>,
    path: String,
    claim: Mutex<Option<Claim>>,
}

pub fn construct(ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    expect_args("snapshot-origin", &seg.args, 1, "<origin_dev>")?;
    let path = &seg.args[0];
    let opened = open_origin(ctx, "snapshot-origin", path, seg.len)?;
    let role = format!("snapshot origin at sector {}", seg.start);
    let range = 0..sectors_to_bytes(seg.len);
    let claim = match &opened.mapped {
        Some(dev) => ctx.devices.claims().claim_mapped(&ctx.owner, role, dev.uuid(), path, range)?,
        None => ctx.claim(path, range, role)?,
    };
    Ok(Arc::new(SnapshotOrigin { origin: opened.origin, path: path.clone(), claim: Mutex::new(Some(claim)) }))
}

impl Target for SnapshotOrigin {
    fn type_name(&self) -> &'static str {
        "snapshot-origin"
    }

    fn submit(&self, req: Request, done: Completion) {
        complete_with(req, done, |req| crate::linear::do_io(&*self.origin, 0, req));
    }

    fn supports_discard(&self) -> bool {
        true
    }

    /// Line: the number of live snapshots, then their COW devices.
    fn status(&self) -> TargetStatus {
        let snaps = self.origin.snapshots();
        let mut line = snaps.len().to_string();
        for s in &snaps {
            line.push(' ');
            line.push_str(&s.cow_path());
        }
        let list: Vec<_> = snaps.iter().map(|s| s.status_json()).collect();
        TargetStatus::new(line, serde_json::json!({ "device": self.path, "snapshots": list }))
    }

    fn shutdown(&self) {
        self.claim.lock().take();
    }
}
