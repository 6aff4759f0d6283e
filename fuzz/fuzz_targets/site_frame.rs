//! Site wire protocol frames. Nothing may panic; a message that decodes re-encodes to
//! the same body and to a frame that decodes to the same message.
//!
//! The input is read twice: as a raw frame (header, then payload, as a session reads
//! it), and as a message body of the kind named by its first byte, decoded behind a
//! header that checks (as if the crcs were right), so that the body checks behind the
//! crcs are reached. Compressed payloads only go through `split_compressed`.

#![no_main]

use dmrep_formats::site::{split_compressed, FrameHeader, Message, MessageKind, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fn check(header: &FrameHeader, body: &[u8]) {
    if let Ok(m) = Message::decode(header, body) {
        assert_eq!(m.kind(), header.kind);
        assert_eq!(m.encode_body(), body, "a decoded message re-encodes to the same body");
        let frame = m.encode();
        let again = FrameHeader::decode(&frame[..HEADER_LEN]).expect("an encoded header decodes");
        again.check_payload(&frame[HEADER_LEN..]).expect("an encoded payload checks");
        let back = Message::decode(&again, &frame[HEADER_LEN..]).expect("an encoded message decodes");
        assert_eq!(back, m);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_LEN {
        if let Ok(h) = FrameHeader::decode(&data[..HEADER_LEN]) {
            let payload = &data[HEADER_LEN..];
            if h.check_payload(payload).is_ok() {
                if h.compressed() {
                    let _ = split_compressed(payload);
                } else {
                    check(&h, payload);
                }
            }
        }
    }

    if let Some((&k, body)) = data.split_first() {
        let kind = MessageKind::from_u16(k as u16 % 10 + 1).expect("kinds 1..=10 exist");
        if body.len() <= kind.max_payload() as usize {
            check(&FrameHeader::new(kind, 0, body), body);
        }
    }
});
