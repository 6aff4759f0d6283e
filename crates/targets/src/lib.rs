//! dmrep targets: `linear`, `striped`, `zero`, `error`, and the replicator.
//!
//! Each target is one module with a constructor of type
//! [`TargetConstructor`](dmrep_core::registry::TargetConstructor); [`registry`] lists
//! them all. Adding a target is one new module plus one line there.

pub mod error;
pub mod linear;
pub mod mirror;
mod params;
pub mod replicator;
pub mod snapshot;
pub mod striped;
pub mod zero;

use dmrep_core::TargetRegistry;

/// Every built-in target type.
pub fn registry() -> TargetRegistry {
    let mut r = TargetRegistry::default();
    r.register("linear", linear::construct);
    r.register("striped", striped::construct);
    r.register("mirror", mirror::construct);
    r.register("zero", zero::construct);
    r.register("error", error::construct);
    r.register("replicator", replicator::target::construct);
    r.register("replicator-dev", replicator::target::construct_dev);
    r.register("snapshot-origin", snapshot::origin::construct);
    r.register("snapshot", snapshot::target::construct);
    r
}
