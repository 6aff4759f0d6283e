//! Replication log (ring buffer).
