//! Units. Device-mapper tables count 512-byte sectors; the I/O path counts bytes.
//! Every conversion between the two happens here.

/// Bytes in one sector. Device-mapper's unit since the 1990s; NBD counts bytes.
pub const SECTOR_SIZE: u64 = 512;

/// Sectors to bytes. Saturates instead of wrapping: a table with a huge length is
/// refused later by a size check rather than silently wrapped.
pub const fn sectors_to_bytes(sectors: u64) -> u64 {
    sectors.saturating_mul(SECTOR_SIZE)
}

/// Bytes to whole sectors (rounded down).
pub const fn bytes_to_sectors(bytes: u64) -> u64 {
    bytes / SECTOR_SIZE
}
