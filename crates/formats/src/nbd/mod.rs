//! The NBD wire protocol: fixed newstyle handshake, options, transmission requests and
//! replies, as specified by the NetworkBlockDevice project's `doc/proto.md`.
//!
//! Only bytes here: encoders append to a `Vec<u8>` or return fixed-size arrays (so the
//! server's I/O path needs no allocation for headers), decoders take byte slices and
//! return a typed [`WireError`] for malformed input. No I/O, no threads.
//!
//! All integers on the wire are big-endian ("network byte order").
//!
//! The protocol's version is the set of negotiated features rather than a number: the
//! server offers handshake flags, the client answers with its own, and options
//! (`NBD_OPT_*`) switch on extensions one at a time. This module implements:
//!
//! | feature | where |
//! |---|---|
//! | fixed newstyle handshake, `NO_ZEROES` | [`Greeting`], [`ClientFlags`] |
//! | options `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS`, `INFO`, `GO`, `STRUCTURED_REPLY` | [`OptionHeader`], [`ClientOption`] |
//! | option replies `ACK`, `SERVER`, `INFO` (`EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), errors | [`OptionReplyHeader`], [`OptionReply`], [`InfoReply`] |
//! | transmission requests and their flags (`FUA`, `NO_HOLE`, `DF`) | [`RequestHeader`], [`CmdFlags`], [`Command`] |
//! | simple replies | [`SimpleReplyHeader`] |
//! | structured reply chunks `OFFSET_DATA`, `OFFSET_HOLE`, `NONE`, `ERROR`, `ERROR_OFFSET` | [`ChunkHeader`], [`ReplyChunk`] |

use std::fmt;

// ---------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------

/// `NBDMAGIC` in ASCII: first 8 bytes the server sends, in every handshake style.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT` in ASCII: marks the newstyle handshake, and starts every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply (fixed newstyle).
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply (formerly `NBD_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

/// Largest option payload accepted. The longest legitimate option is `INFO`/`GO` with a
/// 4096-byte name and a handful of information requests, far below this; anything larger
/// is treated as a denial-of-service attempt (the spec allows a hard disconnect then).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, error message, description) the spec allows: "MUST be
/// no longer than 4096 bytes".
pub const MAX_STRING_LEN: usize = 4096;
/// Most information requests one `INFO`/`GO` may carry: the spec forbids duplicates and
/// defines four types; this leaves room for future types while bounding the work.
pub const MAX_INFO_REQUESTS: usize = 1024;

// ---------------------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------------------

/// Handshake flag (server, bit 0): the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag (server, bit 1): the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag (bit 0): the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag (bit 1): the server must not send the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent with the export size)
// ---------------------------------------------------------------------------------------

/// Bit 0: must always be set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Bit 1: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Bit 2: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Bit 3: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Bit 4: the export behaves like a rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Bit 5: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Bit 6: `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Bit 7: `NBD_CMD_FLAG_DF` is supported (only with structured replies).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Bit 8: flush and FUA effects are visible across all connections to the export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Bit 9: resize extension.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Bit 10: `NBD_CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Bit 11: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------

/// Choose an export and enter transmission; cannot report errors.
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export, stay in negotiation.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use 64-bit extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------
// Option reply types
// ---------------------------------------------------------------------------------------

/// The option succeeded (or a list ended). No data.
pub const REP_ACK: u32 = 1;
/// One export of a `LIST`.
pub const REP_SERVER: u32 = 2;
/// One piece of information about an export (`INFO`/`GO`).
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks the error replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is not known by this server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Known, valid, but refused by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Known but syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must request `NBD_INFO_BLOCK_SIZE` first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request or the reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Extended headers must be negotiated first.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// ---------------------------------------------------------------------------------------
// Information types (NBD_REP_INFO)
// ---------------------------------------------------------------------------------------

/// Export size and transmission flags (mandatory before a successful `INFO`/`GO`).
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------
// Commands and command flags
// ---------------------------------------------------------------------------------------

/// Read `length` bytes at `offset`.
pub const CMD_READ: u16 = 0;
/// Write the `length` bytes that follow the header.
pub const CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Make completed writes durable.
pub const CMD_FLUSH: u16 = 3;
/// Discard a range (a hint).
pub const CMD_TRIM: u16 = 4;
/// Prefetch a range (a hint).
pub const CMD_CACHE: u16 = 5;
/// Make a range read as zeros.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag bit 0: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag bit 1 (`WRITE_ZEROES`): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag bit 2 (`READ`): reply with at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag bit 3 (`BLOCK_STATUS`): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag bit 4 (`WRITE_ZEROES`): fail fast unless zeroing is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag bit 5: extended-headers payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---------------------------------------------------------------------------------------
// Structured replies
// ---------------------------------------------------------------------------------------

/// Structured reply flag bit 0: this is the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload; final chunk of a successful reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: `u64 offset` then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: `u64 offset`, `u32 hole size`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks error chunks.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Chunk type: `u32 error`, `u16 message length`, message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Chunk type: like `ERROR`, followed by `u64 offset`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// ---------------------------------------------------------------------------------------
// Error values (transmission)
// ---------------------------------------------------------------------------------------

/// Operation not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error; also the fallback for errors without an NBD value.
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument (bad flags, unknown command, out of range read).
pub const EINVAL: u32 = 22;
/// No space left (write beyond the end of the export).
pub const ENOSPC: u32 = 28;
/// Value too large (request too long for `DF`, or for the server).
pub const EOVERFLOW: u32 = 75;
/// Operation not supported (fast zero).
pub const ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The NBD error value for a Linux `errno`. The spec restricts the values on the wire;
/// `EDQUOT` and `EFBIG` become `ENOSPC` as it asks, `EOPNOTSUPP` (same number as
/// `ENOTSUP` on Linux) stays, everything without an NBD value becomes `EIO`.
pub fn error_from_errno(errno: i32) -> u32 {
    const EFBIG: i32 = 27;
    const EDQUOT: i32 = 122;
    match errno {
        1 => EPERM,
        5 => EIO,
        12 => ENOMEM,
        22 => EINVAL,
        28 | EFBIG | EDQUOT => ENOSPC,
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EIO,
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Malformed NBD input. Names the structure and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{what}: truncated: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("{what}: bad magic {found:#x} (expected {expected:#x})")]
    BadMagic { what: &'static str, found: u64, expected: u64 },
    #[error("option {option}: payload of {len} bytes exceeds the limit of {max} bytes")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    #[error("{what}: {len} bytes exceeds the limit of {max} bytes")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what}: not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: &'static str },
}

impl WireError {
    /// The option reply error code a server should answer a badly formed option with.
    pub fn option_reply_code(&self) -> u32 {
        match self {
            WireError::TooLong { .. } | WireError::OptionTooLong { .. } => REP_ERR_TOO_BIG,
            _ => REP_ERR_INVALID,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------------------

/// A cursor over input bytes that fails with [`WireError::Truncated`].
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let rest = self.buf.len() - self.pos;
        if rest < n {
            return Err(WireError::Truncated {
                what: self.what,
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Decode a protocol string: at most [`MAX_STRING_LEN`] bytes of UTF-8.
fn decode_string(bytes: &[u8], what: &'static str) -> Result<String, WireError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(WireError::TooLong { what, len: bytes.len(), max: MAX_STRING_LEN });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| WireError::BadUtf8 { what })
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

mod handshake;
mod option;
mod transmission;

pub use handshake::*;
pub use option::*;
pub use transmission::*;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_bytes() {
        let g = Greeting { handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES };
        let b = g.encode();
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
        assert_eq!(Greeting::decode(&b).unwrap(), g);
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(Greeting::decode(&bad), Err(WireError::BadMagic { .. })));
        assert!(matches!(Greeting::decode(&b[..17]), Err(WireError::Truncated { need: 18, have: 17, .. })));
    }

    #[test]
    fn client_flags() {
        let f = ClientFlags::decode(&[0, 0, 0, 3]).unwrap();
        assert!(f.fixed_newstyle() && f.no_zeroes());
        assert_eq!(f.unknown_bits(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), 0);
        assert_eq!(f.unknown_bits(FLAG_FIXED_NEWSTYLE), 2);
        let f = ClientFlags::decode(&[0x80, 0, 0, 1]).unwrap();
        assert_eq!(f.unknown_bits(3), 0x8000_0000);
        assert!(ClientFlags::decode(&[0, 0, 1]).is_err());
    }

    #[test]
    fn option_header() {
        let h = OptionHeader { option: OPT_GO, len: 10 };
        let b = h.encode();
        assert_eq!(&b[..8], b"IHAVEOPT");
        assert_eq!(&b[8..], &[0, 0, 0, 7, 0, 0, 0, 10]);
        assert_eq!(OptionHeader::decode(&b).unwrap(), h);
        let big = OptionHeader { option: 99, len: MAX_OPTION_LEN + 1 }.encode();
        assert_eq!(
            OptionHeader::decode(&big),
            Err(WireError::OptionTooLong { option: 99, len: MAX_OPTION_LEN + 1, max: MAX_OPTION_LEN })
        );
        let mut bad = b;
        bad[7] ^= 1;
        assert!(matches!(OptionHeader::decode(&bad), Err(WireError::BadMagic { .. })));
    }

    #[test]
    fn options_decode() {
        assert_eq!(ClientOption::decode(OPT_EXPORT_NAME, b"disk0").unwrap(), ClientOption::ExportName("disk0".into()));
        assert_eq!(ClientOption::decode(OPT_EXPORT_NAME, b"").unwrap(), ClientOption::ExportName(String::new()));
        assert!(matches!(ClientOption::decode(OPT_EXPORT_NAME, &[0xff, 0xfe]), Err(WireError::BadUtf8 { .. })));
        assert!(matches!(
            ClientOption::decode(OPT_EXPORT_NAME, &[b'a'; MAX_STRING_LEN + 1]),
            Err(WireError::TooLong { .. })
        ));
        // ABORT ignores data, as the spec asks.
        assert_eq!(ClientOption::decode(OPT_ABORT, b"xyz").unwrap(), ClientOption::Abort);
        assert_eq!(ClientOption::decode(OPT_LIST, b"").unwrap(), ClientOption::List);
        for o in [OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED_REPLY] {
            let e = ClientOption::decode(o, b"x").unwrap_err();
            assert!(matches!(e, WireError::Invalid { .. }));
            assert_eq!(e.option_reply_code(), REP_ERR_INVALID);
        }
        assert_eq!(
            ClientOption::decode(OPT_SET_META_CONTEXT, b"\0\0").unwrap(),
            ClientOption::Other { option: OPT_SET_META_CONTEXT, data: vec![0, 0] }
        );
    }

    #[test]
    fn info_request_layout() {
        let payload = [0, 0, 0, 2, b'd', b'0', 0, 2, 0, INFO_BLOCK_SIZE as u8, 0, INFO_NAME as u8];
        let o = ClientOption::decode(OPT_GO, &payload).unwrap();
        let req = InfoRequest { name: "d0".into(), infos: vec![INFO_BLOCK_SIZE, INFO_NAME] };
        assert_eq!(o, ClientOption::Go(req.clone()));
        let mut enc = Vec::new();
        o.encode(&mut enc);
        assert_eq!(&enc[16..], &payload);
        assert_eq!(OptionHeader::decode(&enc).unwrap().len, payload.len() as u32);

        // Name length beyond the payload.
        assert!(matches!(ClientOption::decode(OPT_INFO, &[0, 0, 0, 9, b'a', 0, 0]), Err(WireError::Truncated { .. })));
        // Huge name length: refused before looking at the data.
        assert!(matches!(
            ClientOption::decode(OPT_INFO, &[0xff, 0xff, 0xff, 0xff, 0, 0]),
            Err(WireError::TooLong { .. })
        ));
        // Fewer info requests than announced.
        assert!(matches!(ClientOption::decode(OPT_INFO, &[0, 0, 0, 0, 0, 2, 0, 3]), Err(WireError::Truncated { .. })));
        // Trailing garbage.
        assert!(matches!(ClientOption::decode(OPT_INFO, &[0, 0, 0, 0, 0, 0, 1]), Err(WireError::Invalid { .. })));
        // Missing count.
        assert!(ClientOption::decode(OPT_INFO, &[0, 0, 0, 0]).is_err());
    }

    #[test]
    fn option_replies_bytes() {
        let mut out = Vec::new();
        OptionReply::Ack.encode(OPT_ABORT, &mut out);
        assert_eq!(out, [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]);

        out.clear();
        OptionReply::Info(InfoReply::Export { size: 1 << 20, flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH })
            .encode(OPT_GO, &mut out);
        let h = OptionReplyHeader::decode(&out).unwrap();
        assert_eq!(h, OptionReplyHeader { option: OPT_GO, reply: REP_INFO, len: 12 });
        assert_eq!(&out[20..], &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 5]);

        out.clear();
        OptionReply::Info(InfoReply::BlockSize { min: 1, preferred: 4096, max: 1 << 25 }).encode(OPT_INFO, &mut out);
        assert_eq!(OptionReplyHeader::decode(&out).unwrap().len, 14);

        out.clear();
        OptionReply::Server { name: "ab".into(), description: String::new() }.encode(OPT_LIST, &mut out);
        assert_eq!(&out[16..], &[0, 0, 0, 6, 0, 0, 0, 2, b'a', b'b']);

        out.clear();
        OptionReply::Error { code: REP_ERR_UNSUP, message: "no".into() }.encode(OPT_STARTTLS, &mut out);
        let h = OptionReplyHeader::decode(&out).unwrap();
        assert_eq!(h.reply, 0x8000_0001);
        assert_eq!(
            OptionReply::decode(h.reply, &out[20..]).unwrap(),
            OptionReply::Error { code: REP_ERR_UNSUP, message: "no".into() }
        );
    }

    #[test]
    fn option_reply_decode_errors() {
        assert!(OptionReply::decode(REP_ACK, b"x").is_err());
        assert!(OptionReply::decode(REP_SERVER, &[0, 0, 0, 5, b'a']).is_err());
        assert!(OptionReply::decode(REP_INFO, &[0]).is_err());
        assert!(OptionReply::decode(REP_INFO, &[0, 0, 1]).is_err());
        assert!(OptionReply::decode(REP_INFO, &[0, 3, 0, 0, 0, 1]).is_err());
        assert!(OptionReplyHeader::decode(&[0; 20]).is_err());
    }

    #[test]
    fn export_name_reply() {
        let r = ExportNameReply { size: 4096, flags: FLAG_HAS_FLAGS };
        let mut out = Vec::new();
        r.encode(false, &mut out);
        assert_eq!(out.len(), 134);
        assert!(out[10..].iter().all(|&b| b == 0));
        assert_eq!(ExportNameReply::decode(&out).unwrap(), r);
        out.clear();
        r.encode(true, &mut out);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1]);
    }

    #[test]
    fn request_header_bytes() {
        let h = RequestHeader {
            flags: CmdFlags(CMD_FLAG_FUA),
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            len: 512,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0]
        );
        assert_eq!(RequestHeader::decode(&b).unwrap(), h);
        assert!(matches!(RequestHeader::decode(&b[..27]), Err(WireError::Truncated { .. })));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(
            RequestHeader::decode(&bad),
            Err(WireError::BadMagic { what: "request header", found: 0x0060_9513, expected: 0x2560_9513 })
        );
        assert_eq!(Command::from_u16(99), Command::Other(99));
        assert_eq!(Command::from_u16(6), Command::WriteZeroes);
        let f = CmdFlags(CMD_FLAG_NO_HOLE | CMD_FLAG_DF | 0x100);
        assert!(f.no_hole() && f.df() && !f.fua());
        assert_eq!(f.outside(CMD_FLAG_NO_HOLE | CMD_FLAG_DF), 0x100);
    }

    #[test]
    fn reply_headers() {
        let s = SimpleReplyHeader { error: EINVAL, cookie: 7 };
        let b = s.encode();
        assert_eq!(&b[..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22]);
        assert_eq!(SimpleReplyHeader::decode(&b).unwrap(), s);
        assert!(SimpleReplyHeader::decode(&[0; 16]).is_err());

        let p = offset_data_prefix(9, 4096, 512, true).unwrap();
        let h = ChunkHeader::decode(&p).unwrap();
        assert_eq!(h, ChunkHeader { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_OFFSET_DATA, cookie: 9, len: 520 });
        assert!(h.done());
        assert_eq!(&p[20..], &4096u64.to_be_bytes());
        assert!(offset_data_prefix(9, 0, 0, true).is_err());
        assert!(offset_data_prefix(9, 0, u32::MAX - 7, true).is_err());
        assert!(offset_data_prefix(9, 0, u32::MAX - 8, true).is_ok());

        let n = none_chunk(3);
        let h = ChunkHeader::decode(&n).unwrap();
        assert_eq!((h.kind, h.len, h.done()), (REPLY_TYPE_NONE, 0, true));

        let e = error_chunk(4, EIO);
        let h = ChunkHeader::decode(&e).unwrap();
        assert_eq!((h.kind, h.len), (REPLY_TYPE_ERROR, 6));
        assert_eq!(
            ReplyChunk::decode(h.kind, &e[20..]).unwrap(),
            ReplyChunk::Error { error: EIO, message: String::new() }
        );
        let mut out = Vec::new();
        encode_error_chunk(4, ENOSPC, "full", &mut out);
        let h = ChunkHeader::decode(&out).unwrap();
        assert_eq!(h.len as usize, out.len() - 20);
        assert_eq!(
            ReplyChunk::decode(h.kind, &out[20..]).unwrap(),
            ReplyChunk::Error { error: ENOSPC, message: "full".into() }
        );
    }

    #[test]
    fn chunk_decode_errors() {
        assert!(ReplyChunk::decode(REPLY_TYPE_NONE, b"x").is_err());
        assert!(ReplyChunk::decode(REPLY_TYPE_OFFSET_DATA, &[0; 8]).is_err());
        assert!(ReplyChunk::decode(REPLY_TYPE_OFFSET_HOLE, &[0; 12]).is_err());
        assert!(ReplyChunk::decode(REPLY_TYPE_OFFSET_HOLE, &[0; 13]).is_err());
        assert!(ReplyChunk::decode(REPLY_TYPE_ERROR, &[0, 0, 0, 0, 0, 0]).is_err());
        assert!(ReplyChunk::decode(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 9, b'a']).is_err());
        assert!(ReplyChunk::decode(REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0, 0, 1]).is_err());
        assert!(ReplyChunk::decode(REPLY_TYPE_ERROR_OFFSET, &[0, 0, 0, 5, 0, 0]).is_err());
    }

    #[test]
    fn errno_mapping() {
        for (e, n) in [
            (1, EPERM),
            (5, EIO),
            (12, ENOMEM),
            (22, EINVAL),
            (28, ENOSPC),
            (27, ENOSPC),
            (122, ENOSPC),
            (75, EOVERFLOW),
            (95, ENOTSUP),
            (108, ESHUTDOWN),
            (6, EIO),
            (0, EIO),
            (-1, EIO),
        ] {
            assert_eq!(error_from_errno(e), n, "errno {e}");
        }
    }

    #[test]
    fn clip_keeps_char_boundaries() {
        let s = "é".repeat(3000); // 6000 bytes
        let c = clip(&s, MAX_STRING_LEN);
        assert!(c.len() <= MAX_STRING_LEN && c.len() >= MAX_STRING_LEN - 1);
        let mut out = Vec::new();
        OptionReply::Error { code: REP_ERR_INVALID, message: s }.encode(1, &mut out);
        let h = OptionReplyHeader::decode(&out).unwrap();
        assert!(OptionReply::decode(h.reply, &out[20..]).is_ok());
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9._+-é]{0,40}").unwrap()
    }

    fn client_option() -> impl Strategy<Value = ClientOption> {
        let info = || {
            (name(), proptest::collection::vec(any::<u16>(), 0..8))
                .prop_map(|(name, infos)| InfoRequest { name, infos })
        };
        prop_oneof![
            name().prop_map(ClientOption::ExportName),
            Just(ClientOption::Abort),
            Just(ClientOption::List),
            Just(ClientOption::StartTls),
            info().prop_map(ClientOption::Info),
            info().prop_map(ClientOption::Go),
            Just(ClientOption::StructuredReply),
            (12u32.., proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(option, data)| ClientOption::Other { option, data }),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        let info = prop_oneof![
            (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoReply::Export { size, flags }),
            name().prop_map(InfoReply::Name),
            name().prop_map(InfoReply::Description),
            (any::<u32>(), any::<u32>(), any::<u32>())
                .prop_map(|(min, preferred, max)| { InfoReply::BlockSize { min, preferred, max } }),
            (4u16.., proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(info, data)| InfoReply::Other { info, data }),
        ];
        prop_oneof![
            Just(OptionReply::Ack),
            (name(), name()).prop_map(|(name, description)| OptionReply::Server { name, description }),
            info.prop_map(OptionReply::Info),
            (any::<u32>(), name()).prop_map(|(c, message)| OptionReply::Error { code: c | REP_FLAG_ERROR, message }),
            (5u32..0x8000_0000, proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(reply, data)| OptionReply::Other { reply, data }),
        ]
    }

    fn reply_chunk() -> impl Strategy<Value = ReplyChunk> {
        prop_oneof![
            Just(ReplyChunk::None),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
                .prop_map(|(offset, data)| ReplyChunk::OffsetData { offset, data }),
            (any::<u64>(), 1u32..).prop_map(|(offset, len)| ReplyChunk::OffsetHole { offset, len }),
            (1u32.., name()).prop_map(|(error, message)| ReplyChunk::Error { error, message }),
            (1u32.., name(), any::<u64>())
                .prop_map(|(error, message, offset)| { ReplyChunk::ErrorOffset { error, message, offset } }),
            (3u16..5, proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(kind, data)| ReplyChunk::Other { kind, data }),
        ]
    }

    proptest! {
        #[test]
        fn client_option_round_trip(o in client_option()) {
            let mut out = Vec::new();
            o.encode(&mut out);
            let h = OptionHeader::decode(&out).unwrap();
            prop_assert_eq!(h.len as usize, out.len() - OptionHeader::LEN);
            let back = ClientOption::decode(h.option, &out[OptionHeader::LEN..]).unwrap();
            prop_assert_eq!(back, o);
        }

        #[test]
        fn option_reply_round_trip(r in option_reply(), option in any::<u32>()) {
            let mut out = Vec::new();
            r.encode(option, &mut out);
            let h = OptionReplyHeader::decode(&out).unwrap();
            prop_assert_eq!(h.option, option);
            prop_assert_eq!(h.len as usize, out.len() - OptionReplyHeader::LEN);
            let back = OptionReply::decode(h.reply, &out[OptionReplyHeader::LEN..]).unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn request_round_trip(flags in any::<u16>(), cmd in any::<u16>(), cookie in any::<u64>(),
                              offset in any::<u64>(), len in any::<u32>()) {
            let h = RequestHeader { flags: CmdFlags(flags), command: Command::from_u16(cmd), cookie, offset, len };
            prop_assert_eq!(RequestHeader::decode(&h.encode()).unwrap(), h);
            prop_assert_eq!(h.command.to_u16(), cmd);
        }

        #[test]
        fn reply_round_trip(error in any::<u32>(), cookie in any::<u64>(), flags in any::<u16>(),
                            kind in any::<u16>(), len in any::<u32>()) {
            let s = SimpleReplyHeader { error, cookie };
            prop_assert_eq!(SimpleReplyHeader::decode(&s.encode()).unwrap(), s);
            let c = ChunkHeader { flags, kind, cookie, len };
            prop_assert_eq!(ChunkHeader::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn chunk_round_trip(c in reply_chunk(), cookie in any::<u64>(), done in any::<bool>()) {
            let mut out = Vec::new();
            c.encode(cookie, done, &mut out);
            let h = ChunkHeader::decode(&out).unwrap();
            prop_assert_eq!((h.cookie, h.done()), (cookie, done));
            prop_assert_eq!(h.len as usize, out.len() - ChunkHeader::LEN);
            prop_assert_eq!(ReplyChunk::decode(h.kind, &out[ChunkHeader::LEN..]).unwrap(), c);
        }

        #[test]
        fn decoders_never_panic(option in any::<u32>(), kind in any::<u16>(),
                                data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ClientOption::decode(option, &data);
            let _ = ClientOption::decode(option % 12, &data);
            let _ = OptionReply::decode(option, &data);
            let _ = OptionReply::decode(option % 4, &data);
            let _ = ReplyChunk::decode(kind, &data);
            let _ = ReplyChunk::decode(kind % 3, &data);
            let _ = ReplyChunk::decode(REPLY_TYPE_FLAG_ERROR | (kind % 3), &data);
            let _ = OptionHeader::decode(&data);
            let _ = RequestHeader::decode(&data);
            let _ = Greeting::decode(&data);
        }
    }
}
