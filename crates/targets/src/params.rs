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
    if let Some(name) = path.strip_prefix(MAPPER) {
        return open_mapped(ctx, target, name, offset_sectors, need_sectors, role);
    }
    let be =
        FileBackend::open(Path::new(path)).map_err(|e| TargetError::Device { path: path.to_string(), source: e })?;
    let range = fits(target, path, offset_sectors, need_sectors, be.size())?;
    let claim = ctx.claim(path, range, role)?;
    Ok((Arc::new(be), claim))
}

/// The bytes `need_sectors` from `offset_sectors` take of a device of `size` bytes at
/// `path`, or why they do not fit (also for targets that open their devices themselves).
pub(crate) fn fits(
    target: &'static str,
    path: &str,
    offset_sectors: u64,
    need_sectors: u64,
    size: u64,
) -> Result<std::ops::Range<u64>, TargetError> {
    match offset_sectors.checked_add(need_sectors).map(sectors_to_bytes) {
        Some(end) if end <= size => Ok(sectors_to_bytes(offset_sectors)..end),
        _ => Err(TargetError::params(
            target,
            format!(
                "{path}: segment runs past the end of the device (needs sectors {offset_sectors}..{}, device has {} sectors)",
                offset_sectors.saturating_add(need_sectors),
                size / 512
            ),
        )),
    }
}

/// The prefix that names another device of this daemon in a table (stacking).
pub const MAPPER: &str = "/dev/mapper/";

/// `/dev/mapper/NAME`: device NAME of this daemon as the back-end (stacking), with the
/// same checks as a file: it must exist (and not be the device being built), hold the
/// segment, and the range must not be claimed by another table.
fn open_mapped(
    ctx: &BuildContext<'_>,
    target: &'static str,
    name: &str,
    offset_sectors: u64,
    need_sectors: u64,
    role: String,
) -> Result<(Arc<dyn BlockBackend>, Claim), TargetError> {
    let path = format!("{MAPPER}{name}");
    let dev = mapped_device(ctx, target, name)?;
    let be = dmrep_core::mapped::MappedBackend::new(dev.clone());
    let range = fits(target, &path, offset_sectors, need_sectors, be.size())?;
    let claim = ctx.devices.claims().claim_mapped(&ctx.owner, role, dev.uuid(), &path, range)?;
    Ok((Arc::new(be), claim))
}

/// Device NAME of this daemon, named in a table as `/dev/mapper/NAME`: it must exist
/// and not be the device being built.
pub(crate) fn mapped_device(
    ctx: &BuildContext<'_>,
    target: &'static str,
    name: &str,
) -> Result<Arc<dmrep_core::MappedDevice>, TargetError> {
    let path = format!("{MAPPER}{name}");
    if name == ctx.device_name {
        return Err(TargetError::params(target, format!("{path}: a device cannot be stacked on itself")));
    }
    ctx.devices.get(name).ok_or_else(|| {
        TargetError::params(
            target,
            format!("{path}: no device named {name} in this daemon (a /dev/mapper/NAME path names one of its devices)"),
        )
    })
}

/// Check the parameter count.
pub(crate) fn expect_args(target: &'static str, args: &[String], n: usize, usage: &str) -> Result<(), TargetError> {
    if args.len() != n {
        return Err(TargetError::params(target, format!("expected {n} parameters ({usage}), found {}", args.len())));
    }
    Ok(())
}
