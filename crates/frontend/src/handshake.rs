//! The handshake phase: fixed newstyle negotiation, up to the choice of an export.
//!
//! Only fixed newstyle is offered (oldstyle cannot name an export; plain newstyle cannot
//! report errors): a client that does not set `FLAG_C_FIXED_NEWSTYLE` is disconnected.
//! Options understood: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`. Every other option, `STARTTLS` included, is answered with
//! `NBD_REP_ERR_UNSUP` and the negotiation goes on. Export names are mapped-device names;
//! there is no default export (the empty name is unknown). A device that holds no data
//! (a replicator control device) is not exported: not listed, and unknown to
//! `INFO`/`GO`/`EXPORT_NAME`. A read-only device is exported with `NBD_FLAG_READ_ONLY`
//! (and without the write-only flags: FUA, TRIM, WRITE_ZEROES).

use std::sync::Arc;

use dmrep_core::device::OpenHandle;
use dmrep_core::{DeviceRegistry, MappedDevice};
use dmrep_formats::nbd::{
    self, ClientFlags, ClientOption, ExportNameReply, Greeting, InfoReply, InfoRequest, OptionHeader, OptionReply,
    WireError,
};

use crate::sock::Sock;

/// Most options one client may send before it must pick an export. Far more than any
/// real client needs (libnbd sends fewer than ten); bounds a client that loops forever.
const MAX_OPTIONS: usize = 1024;

/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`: the page size, which every
/// back-end handles without read-modify-write.
pub(crate) const PREFERRED_BLOCK: u32 = 4096;

/// Why a negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed option: {0}")]
    Wire(#[from] WireError),
    #[error("client flags {0:#x} carry bits the server did not offer")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("EXPORT_NAME: unknown export {0:?}")]
    UnknownExport(String),
    #[error("EXPORT_NAME: {0}")]
    BadExportName(WireError),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// What a successful negotiation agreed on.
pub(crate) struct Negotiated {
    pub device: Arc<MappedDevice>,
    /// Held for the connection's lifetime: the device is busy while served.
    pub open: OpenHandle,
    pub structured: bool,
    pub export: String,
}

/// Server-side settings the handshake advertises.
pub(crate) struct Limits {
    pub max_request: u32,
}

/// The transmission flags for an export. `DF` only with structured replies, as the spec
/// requires; the server always sends a read as one chunk, so `DF` costs nothing. A
/// read-only export offers no flag that only writes use (as nbdkit does); a write sent
/// anyway gets EPERM, as the spec asks.
pub(crate) fn transmission_flags(structured: bool, read_only: bool) -> u16 {
    let mut f = nbd::FLAG_HAS_FLAGS | nbd::FLAG_SEND_FLUSH | nbd::FLAG_CAN_MULTI_CONN;
    if read_only {
        f |= nbd::FLAG_READ_ONLY;
    } else {
        f |= nbd::FLAG_SEND_FUA | nbd::FLAG_SEND_TRIM | nbd::FLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        f |= nbd::FLAG_SEND_DF;
    }
    f
}

/// Run the handshake. `Ok(None)`: the client aborted (a soft disconnect).
pub(crate) fn negotiate(
    sock: &Sock,
    devices: &DeviceRegistry,
    limits: &Limits,
) -> Result<Option<Negotiated>, HandshakeError> {
    let offered = nbd::FLAG_FIXED_NEWSTYLE | nbd::FLAG_NO_ZEROES;
    sock.send_all(&[&Greeting { handshake_flags: offered }.encode()])?;
    let mut b = [0u8; ClientFlags::LEN];
    sock.recv_exact(&mut b)?;
    let flags = ClientFlags::decode(&b)?;
    if flags.unknown_bits(offered) != 0 {
        return Err(HandshakeError::UnknownClientFlags(flags.0));
    }
    if !flags.fixed_newstyle() {
        return Err(HandshakeError::NotFixedNewstyle(flags.0));
    }

    let mut structured = false;
    let mut payload = Vec::new();
    let mut out = Vec::with_capacity(256);
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OptionHeader::LEN];
        sock.recv_exact(&mut h)?;
        // Bad magic or an oversized payload: the stream cannot be trusted any more.
        let hdr = OptionHeader::decode(&h)?;
        payload.resize(hdr.len as usize, 0);
        sock.recv_exact(&mut payload)?;
        out.clear();

        if hdr.option == nbd::OPT_STARTTLS {
            reply_error(&mut out, hdr.option, nbd::REP_ERR_UNSUP, "TLS is not supported by this server");
            sock.send_all(&[&out])?;
            continue;
        }
        let opt = match ClientOption::decode(hdr.option, &payload) {
            Ok(o) => o,
            Err(e) if hdr.option == nbd::OPT_EXPORT_NAME => return Err(HandshakeError::BadExportName(e)),
            Err(e) => {
                tracing::debug!(option = hdr.option, error = %e, "invalid option");
                reply_error(&mut out, hdr.option, e.option_reply_code(), &e.to_string());
                sock.send_all(&[&out])?;
                continue;
            }
        };
        match opt {
            ClientOption::ExportName(name) => {
                let Some(dev) = lookup(devices, &name).filter(|d| d.holds_data()) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                ExportNameReply { size: dev.size(), flags: transmission_flags(structured, dev.export_read_only()) }
                    .encode(flags.no_zeroes(), &mut out);
                sock.send_all(&[&out])?;
                return Ok(Some(Negotiated { open: dev.open(), device: dev, structured, export: name }));
            }
            ClientOption::Abort => {
                OptionReply::Ack.encode(hdr.option, &mut out);
                // The client may already be gone; that is its right after ABORT.
                let _ = sock.send_all(&[&out]);
                return Ok(None);
            }
            ClientOption::List => {
                for dev in devices.list().into_iter().filter(|d| d.holds_data()) {
                    OptionReply::Server { name: dev.name(), description: String::new() }.encode(hdr.option, &mut out);
                }
                OptionReply::Ack.encode(hdr.option, &mut out);
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = hdr.option == nbd::OPT_GO;
                match lookup(devices, &req.name) {
                    None => {
                        let msg = if req.name.is_empty() {
                            "no default export: name a mapped device".to_string()
                        } else {
                            format!("unknown export {:?} (no such mapped device)", req.name)
                        };
                        reply_error(&mut out, hdr.option, nbd::REP_ERR_UNKNOWN, &msg);
                    }
                    Some(dev) if dev.live_table().is_none() => {
                        let msg = format!("export {:?} has no active table", req.name);
                        reply_error(&mut out, hdr.option, nbd::REP_ERR_UNKNOWN, &msg);
                    }
                    Some(dev) if !dev.holds_data() => {
                        let msg = format!(
                            "{:?} is a replicator control device: it holds no data and is not exported \
                             (its group's devices are)",
                            req.name
                        );
                        reply_error(&mut out, hdr.option, nbd::REP_ERR_UNKNOWN, &msg);
                    }
                    Some(dev) => {
                        info_replies(&mut out, hdr.option, &dev, &req, structured, limits);
                        OptionReply::Ack.encode(hdr.option, &mut out);
                        sock.send_all(&[&out])?;
                        if go {
                            return Ok(Some(Negotiated {
                                open: dev.open(),
                                device: dev,
                                structured,
                                export: req.name,
                            }));
                        }
                        continue;
                    }
                }
            }
            ClientOption::StructuredReply => {
                structured = true;
                OptionReply::Ack.encode(hdr.option, &mut out);
            }
            ClientOption::StartTls | ClientOption::Other { .. } => {
                let msg = format!("option {} is not supported by this server", hdr.option);
                reply_error(&mut out, hdr.option, nbd::REP_ERR_UNSUP, &msg);
            }
        }
        sock.send_all(&[&out])?;
    }
    Err(HandshakeError::TooManyOptions)
}

/// The device named `name`. The empty name is no export.
fn lookup(devices: &DeviceRegistry, name: &str) -> Option<Arc<MappedDevice>> {
    if name.is_empty() {
        return None;
    }
    devices.get(name)
}

fn reply_error(out: &mut Vec<u8>, option: u32, code: u32, message: &str) {
    OptionReply::Error { code, message: message.to_string() }.encode(option, out);
}

/// `NBD_REP_INFO` replies for `INFO`/`GO`: `NBD_INFO_EXPORT` always, then each
/// requested type this server knows (once each); unknown requests are ignored.
fn info_replies(
    out: &mut Vec<u8>,
    option: u32,
    dev: &MappedDevice,
    req: &InfoRequest,
    structured: bool,
    limits: &Limits,
) {
    OptionReply::Info(InfoReply::Export {
        size: dev.size(),
        flags: transmission_flags(structured, dev.export_read_only()),
    })
    .encode(option, out);
    let mut sent = [false; 4];
    for &info in &req.infos {
        let reply = match info {
            nbd::INFO_NAME => InfoReply::Name(dev.name()),
            nbd::INFO_DESCRIPTION => InfoReply::Description(format!("dmrep mapped device {}", dev.uuid())),
            nbd::INFO_BLOCK_SIZE => {
                InfoReply::BlockSize { min: 1, preferred: PREFERRED_BLOCK, max: limits.max_request }
            }
            _ => continue,
        };
        if std::mem::replace(&mut sent[info as usize], true) {
            continue;
        }
        OptionReply::Info(reply).encode(option, out);
    }
}
