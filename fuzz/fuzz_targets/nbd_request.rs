//! NBD transmission-phase parsing: request headers (with write payloads) as a server
//! reads them, simple replies and structured reply chunks as a client reads them.
//! Nothing may panic; whatever decodes must re-encode to the same bytes or value.

#![no_main]

use dmrep_formats::nbd::{
    offset_data_prefix, ChunkHeader, Command, ReplyChunk, RequestHeader, SimpleReplyHeader, REQUEST_MAGIC,
};
use libfuzzer_sys::fuzz_target;

fn chunk_round_trip(kind: u16, cookie: u64, done: bool, payload: &[u8]) {
    if let Ok(c) = ReplyChunk::decode(kind, payload) {
        assert_eq!(c.kind(), kind);
        let mut out = Vec::new();
        c.encode(cookie, done, &mut out);
        let h = ChunkHeader::decode(&out).expect("encoded chunk header decodes");
        assert_eq!((h.kind, h.cookie, h.done()), (kind, cookie, done));
        assert_eq!(h.len as usize, out.len() - ChunkHeader::LEN);
        let back = ReplyChunk::decode(h.kind, &out[ChunkHeader::LEN..]).expect("re-decodes");
        assert_eq!(back, c);
    }
}

fuzz_target!(|data: &[u8]| {
    // A stream of requests, as the server reads it.
    let mut rest = data;
    while rest.len() >= RequestHeader::LEN {
        let Ok(h) = RequestHeader::decode(&rest[..RequestHeader::LEN]) else { break };
        assert_eq!(h.encode()[..], rest[..RequestHeader::LEN]);
        rest = &rest[RequestHeader::LEN..];
        if h.command == Command::Write {
            let n = (h.len as usize).min(rest.len());
            rest = &rest[n..];
        }
    }

    if data.len() >= 24 {
        // Any 24 bytes after the magic are a valid header, and round-trip exactly.
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&data[..24]);
        let h = RequestHeader::decode(&b).expect("magic + 24 bytes is a header");
        assert_eq!(h.encode()[..], b[..]);
        assert_eq!(Command::from_u16(h.command.to_u16()), h.command);

        let cookie = u64::from_be_bytes(data[0..8].try_into().unwrap());
        let offset = u64::from_be_bytes(data[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(data[16..20].try_into().unwrap());
        if let Ok(p) = offset_data_prefix(cookie, offset, len, data[20] & 1 == 1) {
            let ch = ChunkHeader::decode(&p).unwrap();
            assert_eq!(ch.len, len + 8);
            assert_eq!(ch.cookie, cookie);
        }
    }

    // Replies, as a client reads them.
    if let Ok(s) = SimpleReplyHeader::decode(data) {
        assert_eq!(s.encode()[..], data[..SimpleReplyHeader::LEN]);
    }
    if let Ok(h) = ChunkHeader::decode(data) {
        assert_eq!(h.encode()[..], data[..ChunkHeader::LEN]);
        chunk_round_trip(h.kind, h.cookie, h.done(), &data[ChunkHeader::LEN..]);
    }
    // Without the magic: the first 2 bytes pick the chunk type.
    if data.len() >= 2 {
        let kind = u16::from_be_bytes([data[0], data[1]]);
        let payload = &data[2..];
        chunk_round_trip(kind, 7, true, payload);
        chunk_round_trip(kind % 3, 7, false, payload);
        chunk_round_trip(0x8000 | (kind % 3), 7, true, payload);
    }
});
