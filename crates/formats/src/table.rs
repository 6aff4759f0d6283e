//! Mapping tables in dmsetup's format.
//!
//! Placeholder grammar; replaced by the full parser.

use std::fmt;

/// One segment line: `start length target args...` (sectors).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSpec {
    pub start: u64,
    pub len: u64,
    pub target: String,
    pub args: Vec<String>,
    /// 1-based line in the source text where the segment started (0 if built in code).
    #[serde(default)]
    pub line: usize,
}

/// A whole table.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TableSpec {
    pub segments: Vec<SegmentSpec>,
}

impl TableSpec {
    /// Total length in sectors.
    pub fn len_sectors(&self) -> u64 {
        self.segments.last().map(|s| s.start + s.len).unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("table line {line}: {field}: expected {expected}, found {found:?}")]
pub struct TableError {
    pub line: usize,
    pub field: String,
    pub expected: String,
    pub found: String,
}

pub fn parse_table(text: &str) -> Result<TableSpec, TableError> {
    let mut segments = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        let num = |idx: usize, field: &str| -> Result<u64, TableError> {
            f.get(idx).and_then(|s| s.parse().ok()).ok_or(TableError {
                line: i + 1,
                field: field.into(),
                expected: "an integer".into(),
                found: f.get(idx).unwrap_or(&"").to_string(),
            })
        };
        let start = num(0, "start")?;
        let len = num(1, "length")?;
        let target = f.get(2).ok_or(TableError {
            line: i + 1,
            field: "target".into(),
            expected: "a target type".into(),
            found: String::new(),
        })?;
        segments.push(SegmentSpec {
            start,
            len,
            target: target.to_string(),
            args: f[3..].iter().map(|s| s.to_string()).collect(),
            line: i + 1,
        });
    }
    Ok(TableSpec { segments })
}

impl fmt::Display for TableSpec {
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
