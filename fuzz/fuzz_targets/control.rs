//! Control-protocol lines, as the daemon (requests) and the CLI (responses) read them.
//! Nothing may panic; a line that decodes encodes to one line that decodes to the same
//! value (responses carrying floating-point JSON numbers excepted: serde_json's default
//! float parsing is not exact, so only their re-decoding is checked).

#![no_main]

use dmrep_formats::control::{
    decode_request, decode_response, encode, RequestFrame, Response, ResponseFrame, PROTOCOL_VERSION,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// One `\n`-terminated line with no other newline; returns it without the newline.
fn one_line(enc: &[u8]) -> &[u8] {
    assert_eq!(enc.last(), Some(&b'\n'), "a frame ends with a newline");
    let line = &enc[..enc.len() - 1];
    assert!(!line.contains(&b'\n'), "a frame is one line");
    line
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn response_has_float(r: &Response) -> bool {
    match r {
        Response::Statuses { devices } => devices.iter().flat_map(|d| &d.segments).any(|s| has_float(&s.detail)),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        if let Ok(r) = decode_request(line) {
            let enc = encode(&RequestFrame { version: PROTOCOL_VERSION, request: r.clone() });
            let back = decode_request(one_line(&enc)).expect("an encoded request decodes");
            assert_eq!(back, r);
        }
        if let Ok(r) = decode_response(line) {
            let enc = encode(&ResponseFrame { version: PROTOCOL_VERSION, response: r.clone() });
            let back = decode_response(one_line(&enc)).expect("an encoded response decodes");
            if !response_has_float(&r) {
                assert_eq!(back, r);
            }
        }
    }
});
