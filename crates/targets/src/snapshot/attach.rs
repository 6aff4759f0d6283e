//! Snapshots taken by the program rather than by a table load (a group-consistent
//! snapshot at a marker): attached now, found by the `snapshot` table that serves them.

use std::path::Path;
use std::sync::Arc;

use dmrep_core::claims::FileId;
use dmrep_core::{BlockBackend, FileBackend};

use super::{origin_for_file, Snapshot};

/// Attach a snapshot of the file at `origin` with its COW store in the file at `cow`
/// (formatted if new, reopened if it holds one), registered so that a later table
/// `snapshot <origin> <cow> P|N <chunk>` gets this one. Copy-on-write starts now for
/// every writer of `origin` that goes through [`origin_for_file`]. The snapshot lives
/// as long as the returned `Arc` or a table that holds it.
pub fn snapshot_of_file(
    origin: &Path,
    cow: &Path,
    chunk_bytes: u64,
    persistent: bool,
) -> Result<Arc<Snapshot>, super::target::BuildError> {
    let o = origin_for_file(origin).map_err(|e| super::target::BuildError::Cow(origin.display().to_string(), e))?;
    let key = FileId::of_path(cow).map_err(|e| super::target::BuildError::Cow(cow.display().to_string(), e))?;
    let cow_name = cow.display().to_string();
    Snapshot::for_cow(key, &o, &cow_name, chunk_bytes, persistent, || {
        Ok(Arc::new(FileBackend::open(cow)?) as Arc<dyn BlockBackend>)
    })
}
