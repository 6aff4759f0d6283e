//! The replicator parameter grammars on tokens split from arbitrary UTF-8 must never
//! panic; a spec that parses must validate and render to tokens that parse back to
//! the same spec.
#![no_main]

use dmrep_formats::replicator_table::{parse_replicator, parse_replicator_dev};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let tokens: Vec<&str> = text.split_whitespace().collect();

    if let Ok(spec) = parse_replicator(&tokens) {
        spec.validate().expect("a parsed spec validates");
        assert_eq!(parse_replicator(&spec.to_args()).expect("canonical tokens parse"), spec);
    }
    if let Ok(spec) = parse_replicator_dev(&tokens) {
        spec.validate().expect("a parsed spec validates");
        assert_eq!(parse_replicator_dev(&spec.to_args()).expect("canonical tokens parse"), spec);
    }
});
