//! The replicator (DESIGN sections 3-5): a group of devices replicated as one
//! write-ordered entity through a persistent ring-buffer log to any number of SLINKs.
//!
//! - [`log`]: the replication log (ring buffer), format in `dmrep_formats::replog`.
//! - [`group`]: the group: group commit, per-SLINK copiers, acknowledgements.
//! - [`fallbehind`]: policies and fall-behind thresholds (pure logic).
//! - [`overlay`]: read-your-writes index of entries not yet on the LDs.
//! - [`slink`]: the SLINK handler trait and its transports.
//! - [`target`]: the `replicator` (control) and `replicator-dev` targets.

pub mod dirty;
pub mod fallbehind;
pub mod group;
pub mod log;
pub mod marker;
pub mod overlay;
pub mod slink;
pub mod target;
