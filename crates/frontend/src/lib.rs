//! NBD frontend
