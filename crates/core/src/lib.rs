//! dmrep core: the pieces of a user-space device-mapper that know nothing of any
//! particular mapping.
//!
//! - [`target`]: the object-safe [`Target`](target::Target) trait, the I/O
//!   [`Request`](target::Request) and its asynchronous [`Completion`](target::Completion).
//! - [`backend`]: positional block back-ends (regular files and block devices).
//! - [`claims`]: who uses which bytes of which file (one owner per byte).
//! - [`device`]: mapped devices: active/inactive tables, suspend/resume, in-flight accounting.
//! - [`errors`]: error text for users (OS errors by name, causes kept).
//! - [`registry`]: the set of mapped devices and the target-type registry.
//! - [`units`]: sector/byte newtypes and conversions, in one place.
//! - `fault` (feature `test-support`, and this crate's tests): test back-ends, an
//!   in-memory device that loses power and fail points for any back-end.

pub mod backend;
pub mod claims;
pub mod device;
pub mod errors;
pub mod events;
#[cfg(any(test, feature = "test-support"))]
pub mod fault;
pub mod iostats;
pub mod mapped;
pub mod registry;
pub mod target;
pub mod units;

pub use backend::{BlockBackend, FileBackend};
pub use claims::{Claim, ClaimError, Claims, Owner};
pub use device::{DeviceInfo, DeviceState, MappedDevice};
pub use registry::{BuildContext, DeviceRegistry, TargetRegistry};
pub use target::{Completion, IoSink, Op, Request, Target, TargetError, TargetStatus};
