//! `parse_table` on arbitrary UTF-8 must never panic; a table that parses must
//! validate, and its canonical form must parse back to an equal table (line numbers
//! excepted: `SegmentSpec` equality ignores them) whose canonical form is the same.
//!
//! Segments of the replicator targets go on through their parameter grammar, as in
//! the daemon; a spec that parses must survive a trip through a table line.
#![no_main]

use dmrep_formats::replicator_table::{parse_replicator, parse_replicator_dev};
use dmrep_formats::table::parse_table;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = parse_table(text) else { return };
    spec.validate().expect("a parsed table validates");
    let canonical = spec.to_string();
    let again = parse_table(&canonical).expect("the canonical form parses");
    assert_eq!(again, spec);
    assert_eq!(again.to_string(), canonical);

    for seg in &spec.segments {
        match seg.target.as_str() {
            "replicator" => {
                if let Ok(r) = parse_replicator(&seg.args) {
                    let t = parse_table(&format!("0 8 replicator {r}")).expect("rendered spec is a table line");
                    assert_eq!(parse_replicator(&t.segments[0].args).expect("reparses"), r);
                }
            }
            "replicator-dev" => {
                if let Ok(r) = parse_replicator_dev(&seg.args) {
                    let t = parse_table(&format!("0 8 replicator-dev {r}")).expect("rendered spec is a table line");
                    assert_eq!(parse_replicator_dev(&t.segments[0].args).expect("reparses"), r);
                }
            }
            _ => {}
        }
    }
});
