//! The replicator: replication log, site links, dirty logs.

pub mod log;
