//! Mapping tables in dmsetup's format.
//!
//! A table is text with one segment per line:
//!
//! ```text
//! <start> <length> <target> <args>...
//! ```
//!
//! `start` and `length` are in 512-byte sectors. The segments must cover the
//! device from sector 0 on, in order, with no gap and no overlap.
//!
//! # Grammar
//!
//! - **Separators**: any run of whitespace (`char::is_whitespace`: spaces, tabs, ...).
//!   Lines end at `\n`; a `\r` before it (CRLF) is dropped. A leading byte-order
//!   mark is ignored.
//! - **Comments**: `#` starts a comment that runs to the end of the physical line,
//!   wherever it appears (a whole-line comment or a trailing one). As there are no
//!   quoted strings (see below), a `#` can never be part of a token.
//! - **Continuation**: a line whose last token ends with `\` (trailing whitespace
//!   after it is fine) is joined with the next line; the `\` acts as a separator.
//!   A line that is empty after removing its comment (a comment-only line) is skipped
//!   and does not end a continuation; a blank line does end it. A `\` anywhere else
//!   is an error.
//! - **Implicit continuation**: a line whose first token starts with a lowercase
//!   ASCII letter cannot start a segment (a segment starts with a number), so it
//!   continues the segment above it, as if that line had ended with `\` — as long as
//!   no blank line lies between them. The paper's third example relies on this (one
//!   of its lines misses its `\`). A line starting with anything else that is not a
//!   number is an error.
//! - **Quotes**: the ASCII double quote `"` and the typographic quotes `“` `”` are
//!   ignored at the start and end of any token, and a token made only of quotes
//!   vanishes: this is what makes quotes around a whole table, around a line, or
//!   the paper's stray `“` harmless. A quote inside a token (`a"b`) is an error: quotes
//!   do not group words.
//! - **Dashes**: a token that is exactly an en dash `–` (U+2013) or an em dash `—`
//!   (U+2014) is read as `-` (the paper typesets the `-` dirty log as `–`).
//! - **Blank lines** are skipped.
//!
//! A segment keeps the line number where it started ([`SegmentSpec::line`]); errors
//! name the physical line of the offending token.
//!
//! # Validation
//!
//! Before any target is built: at least one segment; `start` and `length` are
//! unsigned decimal integers (ASCII digits only), `length > 0`; the first segment
//! starts at 0 and each next one where the previous ended; the target name is
//! `[a-z0-9_-]+`; the end of the table, in bytes, fits in a `u64`.
//!
//! # Canonical form
//!
//! [`TableSpec`]'s `Display` prints one line per segment, `start len target args...`
//! joined by single spaces and terminated by `\n`. It parses back to an equal spec.
//! Equality of [`SegmentSpec`] ignores [`SegmentSpec::line`] (where a segment came
//! from is not part of what it means); reparsing the canonical form sets `line` to the
//! segment's position (1, 2, ...).
//!
//! Arguments produced by the parser are never empty and never contain whitespace,
//! `#`, `\`, quote characters, and are never a lone en/em dash, so the canonical form
//! is unambiguous. A spec built in code with such arguments does not round-trip;
//! [`TableSpec::validate`] rejects it.

use std::fmt;

/// The largest sector count whose size in bytes still fits in a `u64`: a table may
/// not end beyond it, so byte offsets computed from sectors never overflow.
pub const MAX_TABLE_SECTORS: u64 = u64::MAX / 512;

/// Characters read as quotes and ignored around tokens: the ASCII double quote and
/// the typographic opening/closing quotes the paper uses.
const QUOTES: [char; 3] = ['"', '\u{201C}', '\u{201D}'];

/// One segment line: `start length target args...` (sectors).
///
/// Equality ignores [`line`](Self::line).
#[derive(Debug, Clone, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSpec {
    pub start: u64,
    pub len: u64,
    pub target: String,
    pub args: Vec<String>,
    /// 1-based line in the source text where the segment started (0 if built in code).
    #[serde(default)]
    pub line: usize,
}

impl PartialEq for SegmentSpec {
    /// Two segments are equal when they map the same range to the same target with
    /// the same arguments; the source line is provenance, not content.
    fn eq(&self, other: &Self) -> bool {
        self.start == other.start && self.len == other.len && self.target == other.target && self.args == other.args
    }
}

impl SegmentSpec {
    /// First sector after this segment (saturating, for specs built in code).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// A whole table. Equality ignores the segments' line numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TableSpec {
    pub segments: Vec<SegmentSpec>,
}

impl TableSpec {
    /// Total length in sectors.
    pub fn len_sectors(&self) -> u64 {
        self.segments.last().map(SegmentSpec::end).unwrap_or(0)
    }

    /// Checks a spec (typically one built in code) against every rule the parser
    /// enforces, including that its arguments survive the canonical form. Errors
    /// name the segment's [`line`](SegmentSpec::line), or its 1-based position when
    /// `line` is 0.
    pub fn validate(&self) -> Result<(), TableError> {
        if self.segments.is_empty() {
            return Err(empty_table());
        }
        let mut prev_end = 0;
        for (i, seg) in self.segments.iter().enumerate() {
            let line = if seg.line == 0 { i + 1 } else { seg.line };
            check_range(line, i == 0, prev_end, seg.start, &seg.start.to_string())?;
            check_len(line, seg.start, seg.len, &seg.len.to_string())?;
            check_target(line, &seg.target)?;
            for (n, arg) in seg.args.iter().enumerate() {
                check_arg(line, n + 1, arg)?;
                if arg.is_empty() || arg.chars().any(char::is_whitespace) || is_dash(arg) {
                    return Err(TableError::new(line, arg_field(n + 1), "a non-empty token without whitespace", arg));
                }
            }
            prev_end = seg.start + seg.len;
        }
        Ok(())
    }
}

/// A table that does not parse or validate.
///
/// Display: `table line <line>: <field>: expected <expected>, found "<found>"
/// [(<note>)]`, or `table: ...` when `line` is 0 (the table as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError {
    /// 1-based physical line of the offending token; 0 for the table as a whole.
    pub line: usize,
    /// Which field: `start`, `length`, `target`, `argument <n>` (1-based), `segments`.
    pub field: String,
    /// What was expected there.
    pub expected: String,
    /// The offending token as written; empty when the field was missing.
    pub found: String,
    /// More detail, e.g. `gap between sector 1024 and 2048`.
    pub note: Option<String>,
}

impl TableError {
    fn new(line: usize, field: impl Into<String>, expected: impl Into<String>, found: &str) -> Self {
        TableError { line, field: field.into(), expected: expected.into(), found: found.to_string(), note: None }
    }

    fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "table: ")?;
        } else {
            write!(f, "table line {}: ", self.line)?;
        }
        write!(f, "{}: expected {}, found ", self.field, self.expected)?;
        if self.found.is_empty() {
            write!(f, "nothing")?;
        } else {
            write!(f, "{:?}", self.found)?;
        }
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

impl std::error::Error for TableError {}

/// A token with the physical line it came from.
struct Token {
    text: String,
    line: usize,
}

/// The logical line being collected: the line it started on and its tokens.
struct Pending {
    line: usize,
    tokens: Vec<Token>,
}

/// Parses and validates a table (see the module documentation for the grammar).
pub fn parse_table(text: &str) -> Result<TableSpec, TableError> {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut segments: Vec<SegmentSpec> = Vec::new();
    let mut pending: Option<Pending> = None;
    // The last line with tokens ended with `\`.
    let mut joining = false;

    for (idx, raw) in text.split('\n').enumerate() {
        let line = idx + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let (content, has_comment) = match raw.find('#') {
            Some(i) => (&raw[..i], true),
            None => (raw, false),
        };
        let (tokens, continues) = tokenize(content, line);

        if tokens.is_empty() {
            if continues {
                // A line holding only `\`: keep joining.
                joining = pending.is_some();
            } else if !has_comment {
                // Blank line: ends the segment being collected.
                if let Some(p) = pending.take() {
                    segments.push(build_segment(p, &segments)?);
                }
                joining = false;
            }
            // Comment-only lines change nothing.
            continue;
        }

        let implicit = tokens[0].text.starts_with(|c: char| c.is_ascii_lowercase());
        match pending.as_mut() {
            Some(p) if joining || implicit => p.tokens.extend(tokens),
            _ => {
                if let Some(p) = pending.take() {
                    segments.push(build_segment(p, &segments)?);
                }
                pending = Some(Pending { line, tokens });
            }
        }
        joining = continues;
    }
    if let Some(p) = pending.take() {
        segments.push(build_segment(p, &segments)?);
    }
    if segments.is_empty() {
        return Err(empty_table());
    }
    Ok(TableSpec { segments })
}

/// Splits one physical line (comment already removed) into tokens, dropping quote
/// characters around tokens and reading lone dashes as `-`. Returns whether the line
/// ends with a continuation `\`. Character checks happen later, where the field
/// each token fills is known.
fn tokenize(content: &str, line: usize) -> (Vec<Token>, bool) {
    let mut tokens: Vec<Token> = content
        .split(char::is_whitespace)
        .map(|t| t.trim_matches(&QUOTES[..]))
        .filter(|t| !t.is_empty())
        .map(|t| Token { text: if is_dash(t) { "-".to_string() } else { t.to_string() }, line })
        .collect();
    let mut continues = false;
    if let Some(last) = tokens.last_mut() {
        if let Some(rest) = last.text.strip_suffix('\\') {
            continues = true;
            let rest = rest.trim_end_matches(&QUOTES[..]).to_string();
            if rest.is_empty() {
                tokens.pop();
            } else {
                last.text = if is_dash(&rest) { "-".to_string() } else { rest };
            }
        }
    }
    (tokens, continues)
}

/// En dash or em dash as a whole token.
fn is_dash(t: &str) -> bool {
    t == "\u{2013}" || t == "\u{2014}"
}

fn empty_table() -> TableError {
    TableError::new(0, "segments", "at least one segment", "").with_note("the table has no segment lines")
}

fn arg_field(n: usize) -> String {
    format!("argument {n}")
}

/// Turns a collected logical line into a segment, validating it against the
/// segments before it.
fn build_segment(p: Pending, prev: &[SegmentSpec]) -> Result<SegmentSpec, TableError> {
    let mut it = p.tokens.into_iter();
    let first = prev.is_empty();
    let prev_end = prev.last().map(|s| s.start + s.len).unwrap_or(0);

    // Every token comes from a line that has at least one, so `start` exists.
    let start_tok = it.next().map(|t| (t.text, t.line)).unwrap_or_default();
    let start = parse_number(p.line, "start", &start_tok.0)?;
    check_range(p.line, first, prev_end, start, &start_tok.0)?;

    let (len_tok, len_line) = match it.next() {
        Some(t) => (t.text, t.line),
        None => return Err(TableError::new(start_tok.1, "length", "the segment length in sectors", "")),
    };
    let len = parse_number(len_line, "length", &len_tok)?;
    check_len(len_line, start, len, &len_tok)?;

    let target = match it.next() {
        Some(t) => {
            check_target(t.line, &t.text)?;
            t.text
        }
        None => return Err(TableError::new(len_line, "target", "a target type name ([a-z0-9_-]+)", "")),
    };

    let mut args = Vec::new();
    for (n, t) in it.enumerate() {
        check_arg(t.line, n + 1, &t.text)?;
        args.push(t.text);
    }
    Ok(SegmentSpec { start, len, target, args, line: p.line })
}

fn parse_number(line: usize, field: &str, tok: &str) -> Result<u64, TableError> {
    let what = if field == "start" {
        "an unsigned decimal integer (the segment's first sector)"
    } else {
        "an unsigned decimal integer (the segment's length in sectors)"
    };
    if tok.is_empty() || !tok.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TableError::new(line, field, what, tok));
    }
    tok.parse::<u64>().map_err(|_| TableError::new(line, field, what, tok).with_note("does not fit in 64 bits"))
}

fn check_range(line: usize, first: bool, prev_end: u64, start: u64, tok: &str) -> Result<(), TableError> {
    if first {
        if start != 0 {
            return Err(TableError::new(line, "start", "0 (the first segment starts at sector 0)", tok)
                .with_note(format!("gap between sector 0 and {start}")));
        }
        return Ok(());
    }
    if start == prev_end {
        return Ok(());
    }
    let err = TableError::new(line, "start", format!("{prev_end} (the end of the previous segment)"), tok);
    Err(if start > prev_end {
        err.with_note(format!("gap between sector {prev_end} and {start}"))
    } else {
        err.with_note(format!("overlaps previous segment ending at {prev_end}"))
    })
}

fn check_len(line: usize, start: u64, len: u64, tok: &str) -> Result<(), TableError> {
    if len == 0 {
        return Err(TableError::new(line, "length", "a length of at least 1 sector", tok));
    }
    let room = MAX_TABLE_SECTORS.saturating_sub(start);
    if len > room {
        return Err(TableError::new(line, "length", format!("at most {room} sectors"), tok)
            .with_note("the table would end beyond 2^64 bytes"));
    }
    Ok(())
}

fn check_target(line: usize, name: &str) -> Result<(), TableError> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(TableError::new(line, "target", "a target type name ([a-z0-9_-]+)", name))
    }
}

/// Characters that cannot be part of an argument (the tokenizer already removed
/// whitespace, comments, surrounding quotes and the continuation `\`).
fn check_arg(line: usize, n: usize, arg: &str) -> Result<(), TableError> {
    if arg.contains(&QUOTES[..]) {
        return Err(TableError::new(line, arg_field(n), "no quote character inside a token", arg)
            .with_note("quotes are ignored only around tokens; they do not group words"));
    }
    if arg.contains('\\') {
        return Err(TableError::new(line, arg_field(n), "no backslash inside a token", arg)
            .with_note("a \"\\\" continues a line only at the end of the line"));
    }
    if arg.contains('#') {
        return Err(
            TableError::new(line, arg_field(n), "no \"#\" inside a token", arg).with_note("\"#\" starts a comment")
        );
    }
    Ok(())
}

impl fmt::Display for TableSpec {
    /// The canonical form: one `start len target args...` line per segment.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.segments {
            write!(f, "{} {} {}", s.start, s.len, s.target)?;
            for a in &s.args {
                write!(f, " {a}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(start: u64, len: u64, target: &str, args: &[&str]) -> SegmentSpec {
        SegmentSpec { start, len, target: target.into(), args: args.iter().map(|s| s.to_string()).collect(), line: 0 }
    }

    fn err(text: &str) -> TableError {
        parse_table(text).expect_err("table should not parse")
    }

    /// The paper's first example (section 2.4.3), as quoted: typographic quotes,
    /// en dash for the `-` dirty log, trailing `\` followed by two spaces.
    pub(crate) const PAPER_1: &str = "\u{201C}0 311296 replicator \\  \n\
default 4 /dev/vg00/replog 0 auto 2097152 \\  \n\
local 2 0 asynchronous \\  \n\
2 0 /dev/vg00/lvol0 \\  \n\
\u{2013} 0 \\  \n\
local 3 1 asynchronous ios=100 \\  \n\
2 0 /dev/sdz \\  \n\
core 2 2048 nosync \u{201C}  \n";

    /// The paper's "another 3 lines" added to the first example (its line 8 gets
    /// the `\` that joins them).
    pub(crate) const PAPER_2_EXTRA: &str = "\u{201C}local 3 2 asynchronous ios=100 \\  \n\
2 0 /dev/sdw \\  \n\
core 2 2048 nosync\u{201D}\n";

    /// The paper's third example verbatim: two devices to one secondary site. Its
    /// line 11 misses the `\` (implicit continuation covers it).
    pub(crate) const PAPER_3: &str = "\u{201C}0 311296 replicator \\  \n\
default 4 /dev/vg00/replog 0 auto 2097152 \\  \n\
local 2 0 asynchronous \\  \n\
2 0 /dev/vg00/lvol0 \\  \n\
\u{2013} 0 \\  \n\
local 2 0 asynchronous \\  \n\
2 1 /dev/vg00/lvol1 \\  \n\
\u{2013} 0 \\  \n\
local 3 1 asynchronous ios=100 \\  \n\
2 0 /dev/sdc \\  \n\
core 2 2048 nosync  \n\
local 3 1 asynchronous ios=100 \\  \n\
2 1 /dev/sdd \\  \n\
core 2 2048 nosync \u{201C}\n";

    pub(crate) fn paper_2() -> String {
        let first = PAPER_1.trim_end().trim_end_matches('\u{201C}').trim_end();
        format!("{first} \\\n{PAPER_2_EXTRA}")
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn paper_example_1() {
        let t = parse_table(PAPER_1).unwrap();
        assert_eq!(t.segments.len(), 1);
        let s = &t.segments[0];
        assert_eq!((s.start, s.len, s.target.as_str(), s.line), (0, 311296, "replicator", 1));
        assert_eq!(
            s.args,
            words(
                "default 4 /dev/vg00/replog 0 auto 2097152 local 2 0 asynchronous \
                 2 0 /dev/vg00/lvol0 - 0 local 3 1 asynchronous ios=100 2 0 /dev/sdz \
                 core 2 2048 nosync"
            )
        );
        assert_eq!(t.len_sectors(), 311296);
    }

    #[test]
    fn paper_example_2() {
        let t = parse_table(&paper_2()).unwrap();
        assert_eq!(t.segments.len(), 1);
        let args = &t.segments[0].args;
        assert_eq!(
            args[args.len() - 12..],
            words("local 3 2 asynchronous ios=100 2 0 /dev/sdw core 2 2048 nosync")[..]
        );
        assert_eq!(args.len(), 27 + 12);
    }

    #[test]
    fn paper_example_3() {
        let t = parse_table(PAPER_3).unwrap();
        assert_eq!(t.segments.len(), 1);
        assert_eq!(
            t.segments[0].args,
            words(
                "default 4 /dev/vg00/replog 0 auto 2097152 \
                 local 2 0 asynchronous 2 0 /dev/vg00/lvol0 - 0 \
                 local 2 0 asynchronous 2 1 /dev/vg00/lvol1 - 0 \
                 local 3 1 asynchronous ios=100 2 0 /dev/sdc core 2 2048 nosync \
                 local 3 1 asynchronous ios=100 2 1 /dev/sdd core 2 2048 nosync"
            )
        );
    }

    #[test]
    fn simple_multi_segment() {
        let t = parse_table("0 100 linear /dev/a 0\n100 50 zero\n150 10 error\n").unwrap();
        assert_eq!(
            t,
            TableSpec {
                segments: vec![
                    seg(0, 100, "linear", &["/dev/a", "0"]),
                    seg(100, 50, "zero", &[]),
                    seg(150, 10, "error", &[]),
                ]
            }
        );
        assert_eq!(t.segments.iter().map(|s| s.line).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(t.len_sectors(), 160);
    }

    #[test]
    fn comments_whole_line_and_trailing() {
        let t = parse_table("# a table\n  # indented comment\n0 8 zero # trailing\n8 8 linear /x 0#glued\n").unwrap();
        assert_eq!(t.segments[0], seg(0, 8, "zero", &[]));
        assert_eq!(t.segments[0].line, 3);
        assert_eq!(t.segments[1], seg(8, 8, "linear", &["/x", "0"]));
    }

    #[test]
    fn backslash_continuation_keeps_first_line() {
        let t = parse_table("\n0 8 \\\nlinear \\   \n /dev/x\\\n 0\n8 1 zero").unwrap();
        assert_eq!(t.segments[0], seg(0, 8, "linear", &["/dev/x", "0"]));
        assert_eq!(t.segments[0].line, 2);
        assert_eq!(t.segments[1].line, 6);
    }

    #[test]
    fn comment_lines_inside_continuation_are_skipped() {
        let t = parse_table("0 8 linear \\\n# the path\n  /dev/x \\\n  # the offset\n  0\n").unwrap();
        assert_eq!(t.segments, vec![seg(0, 8, "linear", &["/dev/x", "0"])]);
    }

    #[test]
    fn backslash_before_comment_continues() {
        let t = parse_table("0 8 linear \\ # path follows\n/dev/x 0\n").unwrap();
        assert_eq!(t.segments, vec![seg(0, 8, "linear", &["/dev/x", "0"])]);
    }

    #[test]
    fn blank_line_ends_continuation() {
        let e = err("0 8 linear /x \\\n\n0 8 zero\n");
        assert_eq!((e.line, e.field.as_str()), (3, "start"));
        assert!(e.note.as_deref().unwrap().contains("overlaps previous segment ending at 8"));
    }

    #[test]
    fn trailing_backslash_at_end_of_text() {
        let t = parse_table("0 8 zero \\").unwrap();
        assert_eq!(t.segments, vec![seg(0, 8, "zero", &[])]);
    }

    #[test]
    fn lone_backslash_line_continues() {
        let t = parse_table("0 8 linear\n\\\n/x 0\n").unwrap();
        // `/x` does not start with a letter: only the lone `\` joins it.
        assert_eq!(t.segments, vec![seg(0, 8, "linear", &["/x", "0"])]);
    }

    #[test]
    fn backslash_inside_token_is_an_error() {
        let e = err("0 8 linear /a\\b 0\n");
        assert_eq!((e.line, e.field.as_str()), (1, "argument 1"));
        let e = err("0 8 linear \\ /a 0\n");
        assert_eq!(e.field, "argument 1");
        assert_eq!(e.found, "\\");
    }

    #[test]
    fn implicit_continuation_of_word_lines() {
        let t = parse_table("0 8 linear\n/x 0\n").err().unwrap();
        assert_eq!((t.line, t.field.as_str()), (2, "start"));
        let t = parse_table("0 8 replicator a\nb c\n# note\nd\n8 8 zero").unwrap();
        assert_eq!(t.segments[0].args, words("a b c d"));
        assert_eq!(t.segments[1].line, 5);
        // A blank line stops it.
        let e = err("0 8 zero\n\nlinear /x 0\n");
        assert_eq!((e.line, e.field.as_str(), e.found.as_str()), (3, "start", "linear"));
        // Not at the start of the table.
        let e = err("linear 0 8\n");
        assert_eq!((e.line, e.field.as_str()), (1, "start"));
        // Upper case does not continue.
        let e = err("0 8 zero\nLinear\n");
        assert_eq!((e.line, e.found.as_str()), (2, "Linear"));
    }

    #[test]
    fn quotes_around_table_line_and_token() {
        let t = parse_table("\"0 8 zero\n8 8 linear /x 0\"\n").unwrap();
        assert_eq!(t.segments.len(), 2);
        let t = parse_table("\"0 8 linear /x 0\"\n\u{201C}8 8 zero\u{201D}\n").unwrap();
        assert_eq!(t.segments[0], seg(0, 8, "linear", &["/x", "0"]));
        assert_eq!(t.segments[1], seg(8, 8, "zero", &[]));
        let t = parse_table("0 8 linear \"/x\" \u{201C} 0 \u{201D}\n").unwrap();
        assert_eq!(t.segments[0].args, ["/x", "0"]);
        // A line made only of quotes is blank.
        let t = parse_table("\"\n0 8 zero\n\"\n").unwrap();
        assert_eq!(t.segments.len(), 1);
    }

    #[test]
    fn quote_inside_token_is_an_error() {
        let e = err("0 8 linear /a\"b 0\n");
        assert_eq!(e.field, "argument 1");
        assert!(e.to_string().contains("quote"), "{e}");
        let e = err("0 8 li\"near /a 0\n");
        assert_eq!(e.field, "target");
        let e = err("0 8\u{201D}8 zero\n");
        assert_eq!(e.field, "length");
    }

    #[test]
    fn dashes() {
        let t = parse_table("0 8 x \u{2013} \u{2014} a\u{2013}b \"\u{2013}\"\n").unwrap();
        assert_eq!(t.segments[0].args, ["-", "-", "a\u{2013}b", "-"]);
        let t = parse_table("0 8 x \u{2013}\\\n").unwrap();
        assert_eq!(t.segments[0].args, ["-"]);
    }

    #[test]
    fn separators_blank_lines_crlf_bom() {
        let t = parse_table("\u{FEFF}\r\n\t0\t\t8   linear  /x\t0 \r\n\r\n   \r\n8 8 zero\r\n").unwrap();
        assert_eq!(t.segments[0], seg(0, 8, "linear", &["/x", "0"]));
        assert_eq!(t.segments[0].line, 2);
        assert_eq!(t.segments[1].line, 5);
    }

    #[test]
    fn empty_tables() {
        for text in ["", "\n\n", "# only a comment\n", "\"\"", "  \\\n"] {
            let e = err(text);
            assert_eq!((e.line, e.field.as_str()), (0, "segments"), "{text:?}");
            assert_eq!(
                e.to_string(),
                "table: segments: expected at least one segment, found nothing \
                 (the table has no segment lines)"
            );
        }
    }

    #[test]
    fn start_and_length_must_be_unsigned_decimal() {
        for (text, field) in [
            ("x 8 zero", "start"),
            ("-1 8 zero", "start"),
            ("+0 8 zero", "start"),
            ("0x0 8 zero", "start"),
            ("0 8.5 zero", "length"),
            ("0 -8 zero", "length"),
            ("0 ８ zero", "length"),
            ("0 99999999999999999999 zero", "length"),
        ] {
            let e = err(text);
            assert_eq!((e.line, e.field.as_str()), (1, field), "{text}");
        }
        let e = err("0 99999999999999999999 zero");
        assert_eq!(e.note.as_deref(), Some("does not fit in 64 bits"));
        // Leading zeros are just decimal.
        let t = parse_table("000 010 zero\n").unwrap();
        assert_eq!(t.segments[0], seg(0, 10, "zero", &[]));
    }

    #[test]
    fn zero_length_is_an_error() {
        let e = err("0 0 zero\n");
        assert_eq!(e.to_string(), "table line 1: length: expected a length of at least 1 sector, found \"0\"");
    }

    #[test]
    fn missing_fields() {
        let e = err("0\n");
        assert_eq!((e.field.as_str(), e.found.as_str()), ("length", ""));
        assert!(e.to_string().ends_with("found nothing"), "{e}");
        let e = err("0 8\n");
        assert_eq!(e.field, "target");
        // Missing fields are reported on the line where the segment ran out.
        let e = err("0 \\\n8\n");
        assert_eq!((e.line, e.field.as_str()), (2, "target"));
    }

    #[test]
    fn first_segment_must_start_at_zero() {
        let e = err("8 8 zero\n");
        assert_eq!(
            e.to_string(),
            "table line 1: start: expected 0 (the first segment starts at sector 0), \
             found \"8\" (gap between sector 0 and 8)"
        );
    }

    #[test]
    fn gap_and_overlap() {
        let e = err("0 1024 zero\n# c\n2048 8 zero\n");
        assert_eq!(
            e.to_string(),
            "table line 3: start: expected 1024 (the end of the previous segment), \
             found \"2048\" (gap between sector 1024 and 2048)"
        );
        let e = err("0 1024 zero\n1000 8 zero\n");
        assert_eq!(
            e.to_string(),
            "table line 2: start: expected 1024 (the end of the previous segment), \
             found \"1000\" (overlaps previous segment ending at 1024)"
        );
        // Out of order is an overlap too.
        let e = err("0 8 zero\n8 8 zero\n0 8 zero\n");
        assert_eq!((e.line, e.note.as_deref()), (3, Some("overlaps previous segment ending at 16")));
    }

    #[test]
    fn target_names() {
        parse_table("0 8 snapshot-origin_2 a\n").unwrap();
        for bad in ["Linear", "lin.ear", "línear", "a/b"] {
            let e = err(&format!("0 8 {bad}\n"));
            assert_eq!((e.field.as_str(), e.found.as_str()), ("target", bad));
        }
        // A dash token is a valid (if odd) target name.
        parse_table("0 8 \u{2013}\n").unwrap();
    }

    #[test]
    fn total_length_overflow() {
        let max = MAX_TABLE_SECTORS;
        parse_table(&format!("0 {max} zero\n")).unwrap();
        let e = err(&format!("0 {} zero\n", max + 1));
        assert_eq!(e.field, "length");
        let e = err(&format!("0 {} zero\n{} 2 zero\n", max - 1, max - 1));
        assert_eq!((e.line, e.field.as_str()), (2, "length"));
        assert!(e.to_string().contains("at most 1 sectors"), "{e}");
        let e = err(&format!("0 {} zero\n", u64::MAX));
        assert_eq!(e.field, "length");
    }

    #[test]
    fn error_names_line_of_offending_token() {
        let e = err("0 8 linear \\\n/x \\\n0 a\"b\n");
        assert_eq!((e.line, e.field.as_str()), (3, "argument 3"));
    }

    #[test]
    fn equality_ignores_line() {
        let mut a = seg(0, 8, "zero", &[]);
        let b = a.clone();
        a.line = 7;
        assert_eq!(a, b);
    }

    #[test]
    fn display_is_canonical_and_reparses() {
        let t = parse_table(PAPER_3).unwrap();
        let text = t.to_string();
        assert!(text.starts_with("0 311296 replicator default 4 /dev/vg00/replog 0 auto 2097152 local"));
        assert!(text.ends_with("core 2 2048 nosync\n"));
        assert_eq!(text.lines().count(), 1);
        let again = parse_table(&text).unwrap();
        assert_eq!(again, t);
        assert_eq!(again.segments[0].line, 1);
        assert_eq!(again.to_string(), text);
    }

    #[test]
    fn validate_catches_code_built_specs() {
        let ok = TableSpec { segments: vec![seg(0, 8, "zero", &[]), seg(8, 8, "linear", &["/x", "0"])] };
        ok.validate().unwrap();
        let bad_args: [&[&str]; 6] = [&[""], &["a b"], &["#"], &["a\\"], &["\""], &["\u{2013}"]];
        for args in bad_args {
            let t = TableSpec { segments: vec![seg(0, 8, "x", args)] };
            let e = t.validate().unwrap_err();
            assert_eq!(e.field, "argument 1", "{args:?}");
        }
        assert_eq!(TableSpec::default().validate().unwrap_err().field, "segments");
        let gap = TableSpec { segments: vec![seg(0, 8, "zero", &[]), seg(9, 8, "zero", &[])] };
        assert_eq!(gap.validate().unwrap_err().line, 2);
        let overflow = TableSpec { segments: vec![seg(0, u64::MAX, "zero", &[])] };
        assert_eq!(overflow.validate().unwrap_err().field, "length");
        let bad_target = TableSpec { segments: vec![seg(0, 1, "Zero", &[])] };
        assert_eq!(bad_target.validate().unwrap_err().field, "target");
    }

    // Property tests.

    fn arb_target() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,12}"
    }

    /// Arguments the parser can produce: no whitespace, `#`, `\`, quotes; not empty;
    /// not a lone dash. Includes non-ASCII and control characters that are not
    /// whitespace.
    fn arb_arg() -> impl Strategy<Value = String> {
        "[^\\s#\\\\\"\u{201C}\u{201D}]{1,10}".prop_filter("lone dash", |s| !is_dash(s))
    }

    fn arb_spec() -> impl Strategy<Value = TableSpec> {
        prop::collection::vec(
            (
                prop_oneof![1u64..1_000_000, Just(1u64), 1u64..=MAX_TABLE_SECTORS / 64],
                arb_target(),
                prop::collection::vec(arb_arg(), 0..8),
            ),
            1..8,
        )
        .prop_map(|segs| {
            let mut start = 0;
            let segments = segs
                .into_iter()
                .enumerate()
                .map(|(i, (len, target, args))| {
                    let s = SegmentSpec { start, len, target, args, line: i + 1 };
                    start += len;
                    s
                })
                .collect();
            TableSpec { segments }
        })
    }

    proptest! {
        #[test]
        fn round_trip(spec in arb_spec()) {
            spec.validate().unwrap();
            let text = spec.to_string();
            let parsed = parse_table(&text).unwrap();
            prop_assert_eq!(&parsed, &spec);
            // Line numbers are set by position when reparsing the canonical form.
            for (i, s) in parsed.segments.iter().enumerate() {
                prop_assert_eq!(s.line, i + 1);
            }
            prop_assert_eq!(parsed.to_string(), text);
        }

        #[test]
        fn round_trip_after_decoration(spec in arb_spec(), crlf in any::<bool>(), quote in any::<bool>()) {
            // Continuations, comments, quotes and CRLF do not change the result.
            let nl = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            if quote { text.push('\u{201C}'); }
            for s in &spec.segments {
                text.push_str(&format!("# segment at {}{nl}", s.start));
                text.push_str(&format!("{}\t{} \\{nl}  {}", s.start, s.len, s.target));
                for a in &s.args {
                    text.push_str(&format!(" \\  {nl}    {a}"));
                }
                text.push_str(&format!("  # end{nl}{nl}"));
            }
            if quote { text.push('"'); }
            prop_assert_eq!(parse_table(&text).unwrap(), spec);
        }

        #[test]
        fn garbage_never_panics(text in "\\PC*") {
            if let Ok(spec) = parse_table(&text) {
                spec.validate().unwrap();
                prop_assert_eq!(parse_table(&spec.to_string()).unwrap(), spec);
            }
        }

        #[test]
        fn table_like_garbage_never_panics(
            lines in prop::collection::vec(
                "[0-9 \t#\\\\\"\u{201C}\u{201D}\u{2013}a-z\r]{0,20}", 0..10)
        ) {
            let text = lines.join("\n");
            if let Ok(spec) = parse_table(&text) {
                spec.validate().unwrap();
                prop_assert_eq!(parse_table(&spec.to_string()).unwrap(), spec);
            }
        }
    }
}
