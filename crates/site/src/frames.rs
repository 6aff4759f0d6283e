//! Messages of the site protocol over a [`TlsStream`](crate::tls::TlsStream): encoding
//! with optional compression, and reading one whole, checked frame.

use std::io::{self, Read};

use dmrep_formats::site::{
    encode_frame, join_compressed, split_compressed, Compression, FrameHeader, Message, WireError, FLAG_COMPRESSED,
    HEADER_LEN,
};

use crate::tls::TlsWriter;

/// Bodies smaller than this are sent as they are: compressing a heartbeat-sized body
/// costs more than it saves.
const COMPRESS_MIN: usize = 4096;

/// zstd level: 1 is the fast end (hundreds of MB/s per core), which a replication link
/// needs more than the last few percent of ratio.
const ZSTD_LEVEL: i32 = 1;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("bad frame from the peer: {0}")]
    Wire(#[from] WireError),
    #[error("bad compressed payload from the peer: {0}")]
    Decompress(String),
}

impl FrameError {
    /// Whether the read timed out (the peer said nothing for the read timeout).
    pub fn timed_out(&self) -> bool {
        matches!(self, FrameError::Io(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock))
    }
}

/// The frame for `msg`, its body compressed with `method` when that pays.
pub fn encode(msg: &Message, method: Compression) -> Vec<u8> {
    if method == Compression::None || !msg.kind().compressible() {
        return msg.encode();
    }
    let body = msg.encode_body();
    if body.len() < COMPRESS_MIN {
        return msg.encode();
    }
    let packed = match method {
        Compression::Zstd => zstd::bulk::compress(&body, ZSTD_LEVEL).ok(),
        Compression::Lz4 => Some(lz4_flex::block::compress(&body)),
        Compression::None => None,
    };
    match packed {
        Some(p) if p.len() + 5 < body.len() => {
            let payload = join_compressed(method, body.len() as u32, &p);
            encode_frame(msg.kind(), FLAG_COMPRESSED, &payload)
        }
        _ => msg.encode(),
    }
}

/// Send `msg` (compressed with `method` when that pays); the bytes on the wire.
pub fn send(w: &TlsWriter, msg: &Message, method: Compression) -> io::Result<usize> {
    let frame = encode(msg, method);
    let n = frame.len();
    w.send(frame)?;
    Ok(n)
}

/// Read one frame and decode its message; also the bytes it took on the wire.
pub fn read(r: &mut impl Read) -> Result<(Message, usize), FrameError> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head)?;
    let header = FrameHeader::decode(&head)?;
    let mut payload = vec![0u8; header.payload_len as usize];
    r.read_exact(&mut payload)?;
    header.check_payload(&payload)?;
    let wire = HEADER_LEN + payload.len();
    if !header.compressed() {
        return Ok((Message::decode(&header, &payload)?, wire));
    }
    let (method, raw_len, packed) = split_compressed(&payload)?;
    let body = match method {
        Compression::Zstd => {
            zstd::bulk::decompress(packed, raw_len as usize).map_err(|e| FrameError::Decompress(e.to_string()))?
        }
        Compression::Lz4 => {
            lz4_flex::block::decompress(packed, raw_len as usize).map_err(|e| FrameError::Decompress(e.to_string()))?
        }
        Compression::None => return Err(FrameError::Decompress("compressed with method none".into())),
    };
    if body.len() != raw_len as usize {
        return Err(FrameError::Decompress(format!("{} bytes decompressed, header said {raw_len}", body.len())));
    }
    Ok((Message::decode(&header, &body)?, wire))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmrep_formats::site::{EntryBatch, WireEntry, WireKind};

    fn batch(fill: u8) -> Message {
        let data = vec![fill; 64 << 10];
        Message::Entries(EntryBatch {
            entries: vec![WireEntry {
                seq: 1,
                epoch: 1,
                origin_time_us: 5,
                offset: 0,
                dev_nr: 0,
                kind: WireKind::Write,
                len: data.len() as u32,
                data,
            }],
        })
    }

    #[test]
    fn compressed_frames_round_trip_and_shrink() {
        for method in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let m = batch(7);
            let f = encode(&m, method);
            if method != Compression::None {
                assert!(f.len() < 4096, "{method:?}: {} bytes", f.len());
            }
            let (back, n) = read(&mut &f[..]).unwrap();
            assert_eq!((back, n), (m, f.len()));
        }
    }

    #[test]
    fn a_lying_compressed_length_is_refused() {
        let body = batch(1).encode_body();
        let packed = lz4_flex::block::compress(&body);
        let payload = join_compressed(Compression::Lz4, body.len() as u32 + 10, &packed);
        let f = encode_frame(dmrep_formats::site::MessageKind::Entries, FLAG_COMPRESSED, &payload);
        assert!(matches!(read(&mut &f[..]), Err(FrameError::Decompress(_))));
    }
}
