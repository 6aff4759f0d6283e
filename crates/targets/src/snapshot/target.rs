//! `snapshot <origin> <COW> P|N <chunk_sectors>`: a writable point-in-time view of the
//! origin, its changed chunks kept on the COW device (`P`: persistent, survives
//! restarts; `N`: transient, in memory). It claims the whole COW device; the origin is
//! claimed by whoever writes it (a `snapshot-origin` table), not by the snapshot.

use std::io;
use std::path::Path;
use std::sync::Arc;

use dmrep_core::claims::{FileId, WHOLE_FILE};
use dmrep_core::target::complete_with;
use dmrep_core::{
    BlockBackend, BuildContext, Claim, Completion, FileBackend, Op, Request, Target, TargetError, TargetStatus,
};
use dmrep_formats::table::SegmentSpec;
use parking_lot::Mutex;

use super::origin::open_origin;
use super::store::StoreError;
use super::{Snapshot, SnapshotError};
use crate::params::{expect_args, mapped_device, number, MAPPER};

const NAME: &str = "snapshot";

/// Opens the COW device (called only when its store is not live already).
type OpenCow = Box<dyn FnOnce() -> io::Result<Arc<dyn BlockBackend>>>;

/// Why a snapshot table cannot be built (beyond its parameters).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("COW device {0}: {1}")]
    Cow(String, #[source] io::Error),
}

impl From<StoreError> for BuildError {
    fn from(e: StoreError) -> Self {
        BuildError::Snapshot(e.into())
    }
}

pub struct SnapshotTarget {
    /// `None` after shutdown.
    snap: Mutex<Option<Arc<Snapshot>>>,
    origin_path: String,
    claim: Mutex<Option<Claim>>,
}

pub fn construct(ctx: &BuildContext<'_>, seg: &SegmentSpec) -> Result<Arc<dyn Target>, TargetError> {
    let usage = "<origin_dev> <COW_dev> P|N <chunk_sectors>";
    expect_args(NAME, &seg.args, 4, usage)?;
    let (origin_path, cow_path) = (&seg.args[0], &seg.args[1]);
    let persistent = match seg.args[2].as_str() {
        "P" | "p" => true,
        "N" | "n" => false,
        other => {
            return Err(TargetError::params(
                NAME,
                format!("persistence {other:?}: expected P (persistent) or N (transient)"),
            ))
        }
    };
    let chunk_sectors = number(NAME, "chunk size", &seg.args[3])?;
    if !chunk_sectors.is_power_of_two() || chunk_sectors > dmrep_formats::cow::MAX_CHUNK_BYTES / 512 {
        return Err(TargetError::params(
            NAME,
            format!(
                "chunk size {chunk_sectors} sectors: expected a power of two from 1 to {}",
                dmrep_formats::cow::MAX_CHUNK_BYTES / 512
            ),
        ));
    }
    let origin = open_origin(ctx, NAME, origin_path, seg.len)?;

    // The COW device: claimed whole, first, so that another device's snapshot on it is
    // refused naming both.
    let role = format!("COW device of snapshot at sector {}", seg.start);
    let (cow_id, claim, open_cow): (FileId, Claim, OpenCow) = match cow_path.strip_prefix(MAPPER) {
        Some(name) => {
            let dev = mapped_device(ctx, NAME, name)?;
            let claim = ctx.devices.claims().claim_mapped(&ctx.owner, role, dev.uuid(), cow_path, WHOLE_FILE)?;
            let be = dmrep_core::mapped::MappedBackend::new(dev.clone());
            (super::mapped_id(dev.uuid()), claim, Box::new(move || Ok(Arc::new(be) as Arc<dyn BlockBackend>)))
        }
        None => {
            let id = FileId::of_path(Path::new(cow_path))
                .map_err(|e| TargetError::Device { path: cow_path.clone(), source: e })?;
            let claim = ctx.claim(cow_path, WHOLE_FILE, role)?;
            let p = cow_path.clone();
            (id, claim, Box::new(move || Ok(Arc::new(FileBackend::open(Path::new(&p))?) as Arc<dyn BlockBackend>)))
        }
    };
    if cow_id == origin.id {
        return Err(TargetError::params(
            NAME,
            format!("COW device {cow_path} is the origin {origin_path}: the snapshot needs a device of its own"),
        ));
    }
    let snap = Snapshot::for_cow(cow_id, &origin.origin, cow_path, chunk_sectors * 512, persistent, open_cow)
        .map_err(|e| TargetError::failed(NAME, e))?;
    Ok(Arc::new(SnapshotTarget {
        snap: Mutex::new(Some(snap)),
        origin_path: origin_path.clone(),
        claim: Mutex::new(Some(claim)),
    }))
}

impl SnapshotTarget {
    fn io(&self, req: &mut Request) -> io::Result<()> {
        let Some(snap) = self.snap.lock().clone() else {
            return Err(io::Error::other("snapshot device is shut down"));
        };
        match req.op {
            Op::Read => snap.read_at(&mut req.buf, req.offset),
            Op::Write { fua } => {
                snap.write_at(Some(&req.buf), req.offset, req.len)?;
                if fua {
                    snap.sync()?;
                }
                Ok(())
            }
            Op::WriteZeroes { fua, .. } => {
                snap.write_at(None, req.offset, req.len)?;
                if fua {
                    snap.sync()?;
                }
                Ok(())
            }
            Op::Flush => snap.sync(),
            // Advisory, and a snapshot has nothing to deallocate: the chunk stays.
            Op::Discard => snap.store().check_valid(),
        }
    }
}

impl Target for SnapshotTarget {
    fn type_name(&self) -> &'static str {
        NAME
    }

    fn submit(&self, req: Request, done: Completion) {
        complete_with(req, done, |req| self.io(req));
    }

    /// `<used sectors>/<total sectors> <metadata sectors>` or `Invalid`, as the kernel.
    fn status(&self) -> TargetStatus {
        match self.snap.lock().clone() {
            Some(s) => TargetStatus::new(s.status_line(), s.status_json()),
            None => TargetStatus::new("", serde_json::json!({ "origin": self.origin_path })),
        }
    }

    fn shutdown(&self) {
        self.snap.lock().take();
        self.claim.lock().take();
    }
}
