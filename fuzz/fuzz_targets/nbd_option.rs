//! NBD handshake-phase parsing: option requests as a server reads them, option replies
//! as a client reads them. Nothing may panic; whatever decodes must re-encode to an
//! equal value.

#![no_main]

use dmrep_formats::nbd::{ClientFlags, ClientOption, Greeting, OptionHeader, OptionReply, OptionReplyHeader};
use libfuzzer_sys::fuzz_target;

fn option_round_trip(code: u32, payload: &[u8]) {
    if let Ok(o) = ClientOption::decode(code, payload) {
        assert_eq!(o.code(), code);
        let mut out = Vec::new();
        o.encode(&mut out);
        let h = OptionHeader::decode(&out).expect("encoded option header decodes");
        assert_eq!(h.option, code);
        assert_eq!(h.len as usize, out.len() - OptionHeader::LEN);
        let back = ClientOption::decode(h.option, &out[OptionHeader::LEN..]).expect("re-decodes");
        assert_eq!(back, o);
    }
}

fn reply_round_trip(option: u32, code: u32, data: &[u8]) {
    if let Ok(r) = OptionReply::decode(code, data) {
        assert_eq!(r.code(), code);
        let mut out = Vec::new();
        r.encode(option, &mut out);
        let h = OptionReplyHeader::decode(&out).expect("encoded reply header decodes");
        assert_eq!((h.option, h.reply), (option, code));
        assert_eq!(h.len as usize, out.len() - OptionReplyHeader::LEN);
        let back = OptionReply::decode(h.reply, &out[OptionReplyHeader::LEN..]).expect("re-decodes");
        assert_eq!(back, r);
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = Greeting::decode(data);
    let _ = ClientFlags::decode(data);

    // A stream of option requests, as the server reads it.
    let mut rest = data;
    while rest.len() >= OptionHeader::LEN {
        let Ok(h) = OptionHeader::decode(&rest[..OptionHeader::LEN]) else { break };
        assert_eq!(h.encode()[..], rest[..OptionHeader::LEN]);
        rest = &rest[OptionHeader::LEN..];
        let n = (h.len as usize).min(rest.len());
        option_round_trip(h.option, &rest[..n]);
        rest = &rest[n..];
    }

    // Without the magic: the first 4 bytes pick the option (and reply type), the
    // rest is the payload. Small codes are folded onto the known ones.
    if data.len() >= 8 {
        let a = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        let b = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
        let payload = &data[8..];
        option_round_trip(a, payload);
        option_round_trip(a % 12, payload);
        reply_round_trip(a, b, payload);
        reply_round_trip(a, b % 5, payload);
        reply_round_trip(a, b | 0x8000_0000, payload);
        let _ = OptionReplyHeader::decode(data);
    }
});
