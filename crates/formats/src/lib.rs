//! dmrep's formats: plain data and its encodings, no I/O, no async runtime.
//!
//! - [`table`]: dmsetup's mapping-table grammar, parsed into a [`table::TableSpec`].
//! - [`nbd`]: the NBD wire protocol (handshake, options, requests, replies).
//! - [`control`]: the control protocol between `dmrep` and its daemon.
//! - [`replog`]: the replication log's on-disk layout.
//! - [`dirtylog`]: the `disk` dirty log's on-disk layout.
//! - [`cow`]: the persistent snapshot exception store's (COW store's) on-disk layout.
//! - [`site`]: the site wire protocol (a primary site ships its log to secondary sites).
//!
//! Every type that crosses a disk or a wire documents its byte layout where it is
//! defined and carries a version.

pub mod control;
pub mod cow;
pub mod dirtylog;
mod le;
pub mod lineage;
pub mod nbd;
pub mod replicator_table;
pub mod replog;
pub mod site;
pub mod table;
