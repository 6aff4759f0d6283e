//! Transmission: request headers, simple replies and structured reply chunks.

use super::*;

// ---------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------

/// A request's command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A type this module does not know (a server answers `EINVAL`).
    Other(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Other(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Other(v) => v,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Read => f.write_str("READ"),
            Command::Write => f.write_str("WRITE"),
            Command::Disc => f.write_str("DISC"),
            Command::Flush => f.write_str("FLUSH"),
            Command::Trim => f.write_str("TRIM"),
            Command::Cache => f.write_str("CACHE"),
            Command::WriteZeroes => f.write_str("WRITE_ZEROES"),
            Command::BlockStatus => f.write_str("BLOCK_STATUS"),
            Command::Other(v) => write!(f, "command {v}"),
        }
    }
}

/// A request's command flags (16 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmdFlags(pub u16);

impl CmdFlags {
    pub fn fua(self) -> bool {
        self.0 & CMD_FLAG_FUA != 0
    }

    pub fn no_hole(self) -> bool {
        self.0 & CMD_FLAG_NO_HOLE != 0
    }

    pub fn df(self) -> bool {
        self.0 & CMD_FLAG_DF != 0
    }

    pub fn fast_zero(self) -> bool {
        self.0 & CMD_FLAG_FAST_ZERO != 0
    }

    /// The flags set outside `allowed`.
    pub fn outside(self, allowed: u16) -> u16 {
        self.0 & !allowed
    }
}

/// A transmission request header (28 bytes); `WRITE` is followed by `len` bytes of data.
///
/// ```text
/// offset size field
///      0    4 REQUEST_MAGIC 0x25609513
///      4    2 command flags (CMD_FLAG_*)
///      6    2 command type (CMD_*)
///      8    8 cookie (opaque, echoed in the reply; formerly "handle")
///     16    8 offset in bytes
///     24    4 length in bytes
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: CmdFlags,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub const LEN: usize = 28;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.0.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "request header");
        let m = r.u32()?;
        if m != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request header",
                found: u64::from(m),
                expected: u64::from(REQUEST_MAGIC),
            });
        }
        Ok(RequestHeader {
            flags: CmdFlags(r.u16()?),
            command: Command::from_u16(r.u16()?),
            cookie: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------------------

/// A simple reply header (16 bytes); a successful `READ` is followed by its data.
///
/// ```text
/// offset size field
///      0    4 SIMPLE_REPLY_MAGIC 0x67446698
///      4    4 error (0, or an NBD error value)
///      8    8 cookie of the request
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReplyHeader {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReplyHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "simple reply");
        let m = r.u32()?;
        if m != SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "simple reply",
                found: u64::from(m),
                expected: u64::from(SIMPLE_REPLY_MAGIC),
            });
        }
        Ok(SimpleReplyHeader { error: r.u32()?, cookie: r.u64()? })
    }
}

/// A structured reply chunk header (20 bytes), followed by `len` bytes of payload.
///
/// ```text
/// offset size field
///      0    4 STRUCTURED_REPLY_MAGIC 0x668e33ef
///      4    2 flags (REPLY_FLAG_DONE on the last chunk of a reply)
///      6    2 chunk type (REPLY_TYPE_*)
///      8    8 cookie of the request
///     16    4 payload length
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "structured reply chunk");
        let m = r.u32()?;
        if m != STRUCTURED_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "structured reply chunk",
                found: u64::from(m),
                expected: u64::from(STRUCTURED_REPLY_MAGIC),
            });
        }
        Ok(ChunkHeader { flags: r.u16()?, kind: r.u16()?, cookie: r.u64()?, len: r.u32()? })
    }

    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Length of the prefix of an `OFFSET_DATA` chunk: chunk header and the u64 offset.
pub const OFFSET_DATA_PREFIX_LEN: usize = ChunkHeader::LEN + 8;

/// The bytes that precede `data_len` bytes of data in an `OFFSET_DATA` chunk (28 bytes:
/// chunk header with payload length `8 + data_len`, then the u64 offset). Lets a server
/// send header and data with one vectored write and no copy.
///
/// Fails if `data_len` is 0 (the spec requires at least one byte of data) or if
/// `8 + data_len` does not fit the 32-bit length.
pub fn offset_data_prefix(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> Result<[u8; OFFSET_DATA_PREFIX_LEN], WireError> {
    if data_len == 0 {
        return Err(WireError::Invalid { what: "OFFSET_DATA chunk", reason: "no data" });
    }
    let len = data_len.checked_add(8).ok_or(WireError::TooLong {
        what: "OFFSET_DATA chunk",
        len: data_len as usize,
        max: (u32::MAX - 8) as usize,
    })?;
    let mut b = [0u8; OFFSET_DATA_PREFIX_LEN];
    b[..ChunkHeader::LEN].copy_from_slice(
        &ChunkHeader { flags: if done { REPLY_FLAG_DONE } else { 0 }, kind: REPLY_TYPE_OFFSET_DATA, cookie, len }
            .encode(),
    );
    b[ChunkHeader::LEN..].copy_from_slice(&offset.to_be_bytes());
    Ok(b)
}

/// A final `NONE` chunk (20 bytes): a successful reply with no (more) data.
pub fn none_chunk(cookie: u64) -> [u8; ChunkHeader::LEN] {
    ChunkHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_NONE, cookie, len: 0 }.encode()
}

/// A structured reply chunk, decoded.
///
/// Payloads per chunk type:
/// ```text
/// NONE         : empty
/// OFFSET_DATA  : u64 offset, data (at least 1 byte)
/// OFFSET_HOLE  : u64 offset, u32 hole size (non-zero)
/// ERROR        : u32 error (non-zero), u16 message length M, M bytes message
/// ERROR_OFFSET : u32 error (non-zero), u16 message length M, M bytes message, u64 offset
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyChunk {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        len: u32,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// A chunk type this module does not decode (raw payload).
    Other {
        kind: u16,
        data: Vec<u8>,
    },
}

impl ReplyChunk {
    /// The chunk type (`REPLY_TYPE_*`).
    pub fn kind(&self) -> u16 {
        match self {
            ReplyChunk::None => REPLY_TYPE_NONE,
            ReplyChunk::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            ReplyChunk::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            ReplyChunk::Error { .. } => REPLY_TYPE_ERROR,
            ReplyChunk::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
            ReplyChunk::Other { kind, .. } => *kind,
        }
    }

    /// Append the whole chunk (header and payload) to `out`. Messages are clipped to
    /// [`MAX_STRING_LEN`] bytes.
    pub fn encode(&self, cookie: u64, done: bool, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(
            &ChunkHeader { flags: if done { REPLY_FLAG_DONE } else { 0 }, kind: self.kind(), cookie, len: 0 }.encode(),
        );
        match self {
            ReplyChunk::None => {}
            ReplyChunk::OffsetData { offset, data } => {
                put_u64(out, *offset);
                out.extend_from_slice(data);
            }
            ReplyChunk::OffsetHole { offset, len } => {
                put_u64(out, *offset);
                put_u32(out, *len);
            }
            ReplyChunk::Error { error, message } => {
                let m = clip(message, MAX_STRING_LEN);
                put_u32(out, *error);
                put_u16(out, m.len() as u16);
                out.extend_from_slice(m.as_bytes());
            }
            ReplyChunk::ErrorOffset { error, message, offset } => {
                let m = clip(message, MAX_STRING_LEN);
                put_u32(out, *error);
                put_u16(out, m.len() as u16);
                out.extend_from_slice(m.as_bytes());
                put_u64(out, *offset);
            }
            ReplyChunk::Other { data, .. } => out.extend_from_slice(data),
        }
        let len = (out.len() - start - ChunkHeader::LEN) as u32;
        out[start + 16..start + 20].copy_from_slice(&len.to_be_bytes());
    }

    /// Decode the payload of a chunk of type `kind`.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Self, WireError> {
        let invalid = |what, reason| WireError::Invalid { what, reason };
        match kind {
            REPLY_TYPE_NONE => {
                if payload.is_empty() {
                    Ok(ReplyChunk::None)
                } else {
                    Err(invalid("NONE chunk", "carries a payload"))
                }
            }
            REPLY_TYPE_OFFSET_DATA => {
                let mut r = Reader::new(payload, "OFFSET_DATA chunk");
                let offset = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(invalid("OFFSET_DATA chunk", "no data"));
                }
                Ok(ReplyChunk::OffsetData { offset, data: data.to_vec() })
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let mut r = Reader::new(payload, "OFFSET_HOLE chunk");
                let offset = r.u64()?;
                let len = r.u32()?;
                if r.remaining() != 0 {
                    return Err(invalid("OFFSET_HOLE chunk", "trailing bytes"));
                }
                if len == 0 {
                    return Err(invalid("OFFSET_HOLE chunk", "empty hole"));
                }
                Ok(ReplyChunk::OffsetHole { offset, len })
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let what = if kind == REPLY_TYPE_ERROR { "ERROR chunk" } else { "ERROR_OFFSET chunk" };
                let mut r = Reader::new(payload, what);
                let error = r.u32()?;
                if error == 0 {
                    return Err(invalid(what, "error value 0"));
                }
                let n = r.u16()? as usize;
                let message = decode_string(r.take(n)?, "error message")?;
                if kind == REPLY_TYPE_ERROR {
                    if r.remaining() != 0 {
                        return Err(invalid(what, "trailing bytes"));
                    }
                    return Ok(ReplyChunk::Error { error, message });
                }
                let offset = r.u64()?;
                if r.remaining() != 0 {
                    return Err(invalid(what, "trailing bytes"));
                }
                Ok(ReplyChunk::ErrorOffset { error, message, offset })
            }
            _ => Ok(ReplyChunk::Other { kind, data: payload.to_vec() }),
        }
    }
}

/// An `ERROR` chunk with a message, appended to `out` (header and payload).
pub fn encode_error_chunk(cookie: u64, error: u32, message: &str, out: &mut Vec<u8>) {
    let m = clip(message, MAX_STRING_LEN);
    out.extend_from_slice(
        &ChunkHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_ERROR, cookie, len: 6 + m.len() as u32 }.encode(),
    );
    put_u32(out, error);
    put_u16(out, m.len() as u16);
    out.extend_from_slice(m.as_bytes());
}

/// Length of an `ERROR` chunk without a message: header, u32 error, u16 message length.
pub const ERROR_CHUNK_LEN: usize = ChunkHeader::LEN + 6;

/// A final `ERROR` chunk without a message (26 bytes), with no allocation.
pub fn error_chunk(cookie: u64, error: u32) -> [u8; ERROR_CHUNK_LEN] {
    let mut b = [0u8; ERROR_CHUNK_LEN];
    b[..ChunkHeader::LEN]
        .copy_from_slice(&ChunkHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_ERROR, cookie, len: 6 }.encode());
    b[ChunkHeader::LEN..ChunkHeader::LEN + 4].copy_from_slice(&error.to_be_bytes());
    b
}
