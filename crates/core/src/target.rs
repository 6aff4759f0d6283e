//! The target interface.
//!
//! A mapped device hands each I/O to the target of the segment it falls in as a
//! [`Request`] together with a [`Completion`]. The target may complete the request at
//! once, on the calling thread (linear, striped, zero, error), or queue it and complete
//! it later from another thread (the replicator completes a write when its log entry is
//! durable). The request travels with its buffer and goes back through the completion
//! on every path, error paths included, so that the frontend can always reply.
//!
//! Offsets and lengths are in bytes relative to the start of the target's segment;
//! the device has already checked them against the segment.

use std::io;
use std::sync::Arc;

/// What an I/O request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Fill `buf` (already `len` bytes long) from the device.
    Read,
    /// Write `buf`. With `fua`, the data must be durable before completion.
    Write { fua: bool },
    /// Make every completed write durable.
    Flush,
    /// The range's contents become unspecified; the device may deallocate it.
    Discard,
    /// The range reads as zeros afterwards. `may_trim`: the device may deallocate
    /// instead of writing zeros.
    WriteZeroes { may_trim: bool, fua: bool },
}

impl Op {
    /// Whether the request changes data.
    pub fn is_write(self) -> bool {
        !matches!(self, Op::Read | Op::Flush)
    }
}

/// One I/O request. Owned by whoever is working on it; handed back on completion.
#[derive(Debug)]
pub struct Request {
    pub op: Op,
    /// Byte offset, relative to the receiver (device, or target segment).
    pub offset: u64,
    /// Length in bytes. For `Read` and `Write`, equal to `buf.len()`.
    pub len: u64,
    /// Data: to fill for `Read`, to write for `Write`; empty otherwise.
    pub buf: Vec<u8>,
    /// Opaque to targets: the submitter's own handle (for NBD, a slot index).
    pub tag: u64,
}

impl Request {
    pub fn new(op: Op, offset: u64, len: u64, buf: Vec<u8>, tag: u64) -> Self {
        Request { op, offset, len, buf, tag }
    }
}

/// Receives finished requests. Implemented by whoever submits I/O (the NBD
/// connection, a split join, a test). Must not block for long: it may run on a
/// target's worker thread.
pub trait IoSink: Send + Sync {
    fn complete(&self, req: Request, result: io::Result<()>);
}

/// The right to complete one request. Cloning an `Arc` per request, no allocation.
/// An optional guard (for in-flight accounting) is released after the sink ran.
///
/// A request must always get a reply: a `Completion` dropped without [`complete`]
/// (a bug on some error path) still completes its request, with `ECANCELED`, so the
/// client is answered and drains do not hang; debug builds assert on it.
///
/// [`complete`]: Completion::complete
pub struct Completion {
    /// `None` once completed.
    sink: Option<Arc<dyn IoSink>>,
    /// The request's tag, to fail it if the completion is dropped.
    tag: u64,
    guard: Option<crate::device::InflightGuard>,
}

impl Completion {
    /// The completion of the request tagged `tag`, reported to `sink`.
    pub fn new(sink: Arc<dyn IoSink>, tag: u64) -> Self {
        Completion { sink: Some(sink), tag, guard: None }
    }

    /// A completion that keeps `guard` alive until the request has completed.
    pub(crate) fn with_guard(sink: Arc<dyn IoSink>, tag: u64, guard: crate::device::InflightGuard) -> Self {
        Completion { sink: Some(sink), tag, guard: Some(guard) }
    }

    /// Complete the request. Consumes the completion: a request completes once.
    pub fn complete(mut self, req: Request, result: io::Result<()>) {
        if let Some(g) = self.guard.as_mut() {
            g.ok = result.is_ok();
        }
        if let Some(sink) = self.sink.take() {
            sink.complete(req, result);
        }
        drop(self.guard.take());
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            debug_assert!(std::thread::panicking(), "request {} dropped without a reply", self.tag);
            tracing::error!(tag = self.tag, "request dropped without a reply: failing it (ECANCELED)");
            let req = Request::new(Op::Flush, 0, 0, Vec::new(), self.tag);
            sink.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::CANCELED.raw_os_error())));
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

/// Errors of target construction and messages. They reach users: name the thing.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown target type \"{0}\" (known: {1})")]
    UnknownType(String, String),
    #[error("{target}: {msg}")]
    Params { target: &'static str, msg: String },
    #[error("{path}: {source}")]
    Device {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{target}: message not understood: {msg}")]
    Message { target: &'static str, msg: String },
    /// A target's own error, kept with its cause (e.g. a replication group's).
    #[error("{target}: {source}")]
    Failed {
        target: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Claim(#[from] crate::claims::ClaimError),
    #[error("{0}")]
    Other(String),
}

impl TargetError {
    pub fn failed(target: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        TargetError::Failed { target, source: Box::new(e) }
    }

    pub fn params(target: &'static str, msg: impl Into<String>) -> Self {
        TargetError::Params { target, msg: msg.into() }
    }
}

/// A target's status: the dmsetup-style line and the same facts as JSON.
#[derive(Debug, Clone, Default)]
pub struct TargetStatus {
    pub line: String,
    pub json: serde_json::Value,
}

impl TargetStatus {
    pub fn new(line: impl Into<String>, json: serde_json::Value) -> Self {
        TargetStatus { line: line.into(), json }
    }
}

/// A mapping target: one instance per table segment.
///
/// Object-safe. Optional capabilities default to "unsupported" or "nothing to do".
pub trait Target: Send + Sync {
    /// The table keyword (`linear`, `striped`, ...).
    fn type_name(&self) -> &'static str;

    /// Start one request; complete it through `done`, now or later, from any thread.
    fn submit(&self, req: Request, done: Completion);

    /// Whether discard/write-zeroes are meaningful (advertised to NBD clients).
    fn supports_discard(&self) -> bool {
        false
    }

    /// Whether the segment holds data applications use. A device with a segment that
    /// holds none (a replicator control device: its group's devices hold the data) is
    /// not exported over NBD. Default: true.
    fn holds_data(&self) -> bool {
        true
    }

    /// Whether the segment takes no writes from applications now (a secondary site's
    /// replicated device); the device is then exported read-only. Default: false.
    fn read_only(&self) -> bool {
        false
    }

    /// Current status.
    fn status(&self) -> TargetStatus {
        TargetStatus::default()
    }

    /// A message from `dmrep message`. The reply is printed to the user.
    fn message(&self, args: &[String]) -> Result<String, TargetError> {
        let _ = args;
        Err(TargetError::Message { target: self.type_name(), msg: "this target takes no messages".into() })
    }

    /// Called before the device stops taking new I/O (suspend). Default: nothing.
    fn presuspend(&self) {}

    /// Called after all in-flight I/O of the device completed (suspended). Default: nothing.
    fn postsuspend(&self) {}

    /// Called when the table becomes active again (resume). Default: nothing.
    fn resume(&self) {}

    /// Devices this target asks the daemon to create beside its own, as
    /// `(name, table text)`: the paper's one-line replicator table creates one device
    /// per LD this way. Default: none.
    fn companions(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The device is going away and its in-flight requests did not finish within the
    /// grace period: complete every request this target still holds (with an error, e.g.
    /// ESHUTDOWN) instead of waiting for whatever it waits for. Default: nothing (a
    /// target that completes requests on the submitting thread holds none).
    fn cancel(&self) {}

    /// Called when the table is being dropped (device removed or table replaced):
    /// release resources, stop threads. Default: nothing.
    fn shutdown(&self) {}
}

/// Complete `req` with a synchronous result computed by `f`. Helper for targets whose
/// I/O is synchronous.
pub fn complete_with(req: Request, done: Completion, f: impl FnOnce(&mut Request) -> io::Result<()>) {
    let mut req = req;
    let res = f(&mut req);
    done.complete(req, res);
}
