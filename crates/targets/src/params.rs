//! Shared helpers for parsing target parameters and opening devices.

use std::path::Path;
use std::sync::Arc;

use dmrep_core::units::sectors_to_bytes;
use dmrep_core::{BlockBackend, BuildContext, Claim, FileBackend, TargetError};

/// Parse an unsigned integer parameter, naming it in the error.
pub(crate) fn number(target: &'static str, field: &str, s: &str) -> Result<u64, TargetError> {
    s.parse::<u64>()
        .map_err(|_| TargetError::params(target, format!("{field}: expected an unsigned integer, found {s:?}")))
}

/// Open a device (regular file or block device), check that `need_sectors` from
/// `offset_sectors` fit in it, and claim those sectors for `role` of the table being
/// built (keep the claim as long as the back-end).
pub(crate) fn open_device(
    ctx: &BuildContext<'_>,
    target: &'static str,
    path: &str,
    offset_sectors: u64,
    need_sectors: u64,
    role: String,
) -> Result<(Arc<dyn BlockBackend>, Claim), TargetError> {
    let be =
        FileBackend::open(Path::new(path)).map_err(|e| TargetError::Device { path: path.to_string(), source: e })?;
    let end = offset_sectors.checked_add(need_sectors).map(sectors_to_bytes);
    match end {
        Some(end) if end <= be.size() => {
            let claim = ctx.claim(path, sectors_to_bytes(offset_sectors)..end, role)?;
            Ok((Arc::new(be), claim))
        }
        _ => Err(TargetError::params(
            target,
            format!(
                "{path}: segment runs past the end of the device (needs sectors {offset_sectors}..{}, device has {} sectors)",
                offset_sectors.saturating_add(need_sectors),
                be.size() / 512
            ),
        )),
    }
}

/// Check the parameter count.
pub(crate) fn expect_args(target: &'static str, args: &[String], n: usize, usage: &str) -> Result<(), TargetError> {
    if args.len() != n {
        return Err(TargetError::params(target, format!("expected {n} parameters ({usage}), found {}", args.len())));
    }
    Ok(())
}
