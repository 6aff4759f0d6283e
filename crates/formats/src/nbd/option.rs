//! Option haggling: client options and the server's option replies.

use super::*;

// ---------------------------------------------------------------------------------------
// Options (client -> server)
// ---------------------------------------------------------------------------------------

/// Header of an option request (16 bytes), followed by `len` bytes of payload.
///
/// ```text
/// offset size field
///      0    8 IHAVEOPT 0x49484156454f5054
///      8    4 option (OPT_*)
///     12    4 payload length (at most MAX_OPTION_LEN here)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decode and check the magic and the payload limit ([`MAX_OPTION_LEN`]).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "option header");
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(WireError::BadMagic { what: "option header", found: m, expected: IHAVEOPT });
        }
        let option = r.u32()?;
        let len = r.u32()?;
        if len > MAX_OPTION_LEN {
            return Err(WireError::OptionTooLong { option, len, max: MAX_OPTION_LEN });
        }
        Ok(OptionHeader { option, len })
    }
}

/// Payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
///
/// ```text
/// offset  size field
///      0     4 name length N (at most payload length - 6, and MAX_STRING_LEN)
///      4     N export name (UTF-8)
///    4+N     2 number of information requests K
///    6+N    2K information types (INFO_*), each u16
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    fn decode(payload: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "INFO/GO request";
        let mut r = Reader::new(payload, WHAT);
        let name_len = r.u32()? as usize;
        if name_len > MAX_STRING_LEN {
            return Err(WireError::TooLong { what: "export name", len: name_len, max: MAX_STRING_LEN });
        }
        let name = decode_string(r.take(name_len)?, "export name")?;
        let count = r.u16()? as usize;
        if count > MAX_INFO_REQUESTS {
            return Err(WireError::TooLong {
                what: "INFO/GO information requests",
                len: count,
                max: MAX_INFO_REQUESTS,
            });
        }
        if r.remaining() != count * 2 {
            if r.remaining() < count * 2 {
                return Err(WireError::Truncated {
                    what: WHAT,
                    need: payload.len() - r.remaining() + count * 2,
                    have: payload.len(),
                });
            }
            return Err(WireError::Invalid { what: WHAT, reason: "trailing bytes after the information requests" });
        }
        let mut infos = Vec::with_capacity(count);
        for _ in 0..count {
            infos.push(r.u16()?);
        }
        Ok(InfoRequest { name, infos })
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        put_u32(out, self.name.len() as u32);
        out.extend_from_slice(self.name.as_bytes());
        put_u16(out, self.infos.len() as u16);
        for &i in &self.infos {
            put_u16(out, i);
        }
    }
}

/// An option request, decoded from its header's option code and its payload.
///
/// Payloads: `EXPORT_NAME` carries the export name (the whole payload, UTF-8);
/// `INFO`/`GO` an [`InfoRequest`]; `ABORT` nothing (data is ignored, as the spec asks);
/// `LIST`, `STARTTLS` and `STRUCTURED_REPLY` nothing (data makes them invalid); any other
/// option is kept as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    /// An option this module does not decode (the server answers `REP_ERR_UNSUP`).
    Other {
        option: u32,
        data: Vec<u8>,
    },
}

impl ClientOption {
    /// The option code (`OPT_*`).
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => OPT_EXPORT_NAME,
            ClientOption::Abort => OPT_ABORT,
            ClientOption::List => OPT_LIST,
            ClientOption::StartTls => OPT_STARTTLS,
            ClientOption::Info(_) => OPT_INFO,
            ClientOption::Go(_) => OPT_GO,
            ClientOption::StructuredReply => OPT_STRUCTURED_REPLY,
            ClientOption::Other { option, .. } => *option,
        }
    }

    /// Decode the payload of option `option`.
    pub fn decode(option: u32, payload: &[u8]) -> Result<Self, WireError> {
        if payload.len() > MAX_OPTION_LEN as usize {
            return Err(WireError::OptionTooLong {
                option,
                len: payload.len().min(u32::MAX as usize) as u32,
                max: MAX_OPTION_LEN,
            });
        }
        let empty = |o: ClientOption, what: &'static str| {
            if payload.is_empty() {
                Ok(o)
            } else {
                Err(WireError::Invalid { what, reason: "option takes no data" })
            }
        };
        match option {
            OPT_EXPORT_NAME => Ok(ClientOption::ExportName(decode_string(payload, "export name")?)),
            OPT_ABORT => Ok(ClientOption::Abort),
            OPT_LIST => empty(ClientOption::List, "LIST"),
            OPT_STARTTLS => empty(ClientOption::StartTls, "STARTTLS"),
            OPT_STRUCTURED_REPLY => empty(ClientOption::StructuredReply, "STRUCTURED_REPLY"),
            OPT_INFO => Ok(ClientOption::Info(InfoRequest::decode(payload)?)),
            OPT_GO => Ok(ClientOption::Go(InfoRequest::decode(payload)?)),
            _ => Ok(ClientOption::Other { option, data: payload.to_vec() }),
        }
    }

    /// Append the whole request (header and payload) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&OptionHeader { option: self.code(), len: 0 }.encode());
        match self {
            ClientOption::ExportName(name) => out.extend_from_slice(name.as_bytes()),
            ClientOption::Info(r) | ClientOption::Go(r) => r.encode_payload(out),
            ClientOption::Other { data, .. } => out.extend_from_slice(data),
            ClientOption::Abort | ClientOption::List | ClientOption::StartTls | ClientOption::StructuredReply => {}
        }
        let len = (out.len() - start - OptionHeader::LEN) as u32;
        out[start + 12..start + 16].copy_from_slice(&len.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------
// Option replies (server -> client)
// ---------------------------------------------------------------------------------------

/// Header of an option reply (20 bytes), followed by `len` bytes of data.
///
/// ```text
/// offset size field
///      0    8 OPT_REPLY_MAGIC 0x0003e889045565a9
///      8    4 option being answered
///     12    4 reply type (REP_*; bit 31 set for errors)
///     16    4 data length
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "option reply header");
        let m = r.u64()?;
        if m != OPT_REPLY_MAGIC {
            return Err(WireError::BadMagic { what: "option reply header", found: m, expected: OPT_REPLY_MAGIC });
        }
        Ok(OptionReplyHeader { option: r.u32()?, reply: r.u32()?, len: r.u32()? })
    }
}

/// The data of an `NBD_REP_INFO` reply: a u16 information type, then its payload.
///
/// ```text
/// INFO_EXPORT      (12 bytes): u16 type=0, u64 export size, u16 transmission flags
/// INFO_NAME        (2+N)     : u16 type=1, N bytes canonical name
/// INFO_DESCRIPTION (2+N)     : u16 type=2, N bytes description
/// INFO_BLOCK_SIZE  (14 bytes): u16 type=3, u32 minimum, u32 preferred, u32 maximum payload
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// An information type this module does not decode.
    Other {
        info: u16,
        data: Vec<u8>,
    },
}

impl InfoReply {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            InfoReply::Export { size, flags } => {
                put_u16(out, INFO_EXPORT);
                put_u64(out, *size);
                put_u16(out, *flags);
            }
            InfoReply::Name(n) => {
                put_u16(out, INFO_NAME);
                out.extend_from_slice(clip(n, MAX_STRING_LEN).as_bytes());
            }
            InfoReply::Description(d) => {
                put_u16(out, INFO_DESCRIPTION);
                out.extend_from_slice(clip(d, MAX_STRING_LEN).as_bytes());
            }
            InfoReply::BlockSize { min, preferred, max } => {
                put_u16(out, INFO_BLOCK_SIZE);
                put_u32(out, *min);
                put_u32(out, *preferred);
                put_u32(out, *max);
            }
            InfoReply::Other { info, data } => {
                put_u16(out, *info);
                out.extend_from_slice(data);
            }
        }
    }

    fn decode(data: &[u8]) -> Result<Self, WireError> {
        const WHAT: &str = "NBD_REP_INFO";
        let mut r = Reader::new(data, WHAT);
        let info = r.u16()?;
        let exact = |r: &Reader<'_>, n: usize| {
            if r.remaining() == n {
                Ok(())
            } else {
                Err(WireError::Invalid { what: WHAT, reason: "wrong length for the information type" })
            }
        };
        match info {
            INFO_EXPORT => {
                exact(&r, 10)?;
                Ok(InfoReply::Export { size: r.u64()?, flags: r.u16()? })
            }
            INFO_NAME => Ok(InfoReply::Name(decode_string(r.rest(), "export name")?)),
            INFO_DESCRIPTION => Ok(InfoReply::Description(decode_string(r.rest(), "export description")?)),
            INFO_BLOCK_SIZE => {
                exact(&r, 12)?;
                Ok(InfoReply::BlockSize { min: r.u32()?, preferred: r.u32()?, max: r.u32()? })
            }
            _ => Ok(InfoReply::Other { info, data: r.rest().to_vec() }),
        }
    }
}

/// An option reply, decoded.
///
/// Data per reply type:
/// ```text
/// REP_ACK     : none
/// REP_SERVER  : u32 name length N, N bytes name, then a description (rest of the data)
/// REP_INFO    : see InfoReply
/// REP_ERR_*   : optional UTF-8 message (the whole data)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    Server {
        name: String,
        description: String,
    },
    Info(InfoReply),
    /// `code` has bit 31 set (`REP_ERR_*`).
    Error {
        code: u32,
        message: String,
    },
    /// A non-error reply type this module does not decode.
    Other {
        reply: u32,
        data: Vec<u8>,
    },
}

impl OptionReply {
    /// The reply type (`REP_*`).
    pub fn code(&self) -> u32 {
        match self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { .. } => REP_SERVER,
            OptionReply::Info(_) => REP_INFO,
            OptionReply::Error { code, .. } => *code,
            OptionReply::Other { reply, .. } => *reply,
        }
    }

    /// Append the whole reply to option `option` (header and data) to `out`.
    /// Strings longer than [`MAX_STRING_LEN`] are clipped.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&OptionReplyHeader { option, reply: self.code(), len: 0 }.encode());
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                let name = clip(name, MAX_STRING_LEN);
                put_u32(out, name.len() as u32);
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(clip(description, MAX_STRING_LEN).as_bytes());
            }
            OptionReply::Info(i) => i.encode(out),
            OptionReply::Error { message, .. } => out.extend_from_slice(clip(message, MAX_STRING_LEN).as_bytes()),
            OptionReply::Other { data, .. } => out.extend_from_slice(data),
        }
        let len = (out.len() - start - OptionReplyHeader::LEN) as u32;
        out[start + 16..start + 20].copy_from_slice(&len.to_be_bytes());
    }

    /// Decode the data of a reply whose header said `reply` and whose data is `data`.
    pub fn decode(reply: u32, data: &[u8]) -> Result<Self, WireError> {
        match reply {
            REP_ACK => {
                if data.is_empty() {
                    Ok(OptionReply::Ack)
                } else {
                    Err(WireError::Invalid { what: "NBD_REP_ACK", reason: "carries data" })
                }
            }
            REP_SERVER => {
                let mut r = Reader::new(data, "NBD_REP_SERVER");
                let n = r.u32()? as usize;
                if n > MAX_STRING_LEN {
                    return Err(WireError::TooLong { what: "export name", len: n, max: MAX_STRING_LEN });
                }
                let name = decode_string(r.take(n)?, "export name")?;
                let description = decode_string(r.rest(), "export description")?;
                Ok(OptionReply::Server { name, description })
            }
            REP_INFO => Ok(OptionReply::Info(InfoReply::decode(data)?)),
            r if r & REP_FLAG_ERROR != 0 => {
                Ok(OptionReply::Error { code: r, message: decode_string(data, "option error message")? })
            }
            r => Ok(OptionReply::Other { reply: r, data: data.to_vec() }),
        }
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME` (10 bytes, or 134 with the padding).
///
/// ```text
/// offset size field
///      0    8 export size in bytes
///      8    2 transmission flags
///     10  124 zeroes, omitted when the client set FLAG_C_NO_ZEROES
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: u16,
}

impl ExportNameReply {
    /// Length without the padding.
    pub const LEN: usize = 10;
    /// Length of the reserved zero padding.
    pub const PAD: usize = 124;

    pub fn encode(&self, no_zeroes: bool, out: &mut Vec<u8>) {
        put_u64(out, self.size);
        put_u16(out, self.flags);
        if !no_zeroes {
            out.extend_from_slice(&[0u8; Self::PAD]);
        }
    }

    /// Decode the first [`Self::LEN`] bytes (padding, if any, is the caller's to skip).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "export name reply");
        Ok(ExportNameReply { size: r.u64()?, flags: r.u16()? })
    }
}
