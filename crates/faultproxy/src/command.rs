//! The control socket's language: one command per line, one answer per command.
//!
//! | command | answer |
//! | --- | --- |
//! | `delay MS` | `ok` |
//! | `rate BYTES_PER_S` or `rate off` | `ok` |
//! | `drop` | `ok` |
//! | `blackhole on` or `blackhole off` | `ok` |
//! | `stall up on`, `stall up off`, `stall down on`, `stall down off` | `ok` |
//! | `refuse on` or `refuse off` | `ok` |
//! | `stats` | one line of JSON: [`ProxyStats`](crate::ProxyStats) |
//! | `quit` | `ok`, then the proxy exits |
//!
//! Anything else is answered `error: ...`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::{Direction, FaultProxy};

/// One control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Delay(Duration),
    Rate(Option<u64>),
    Drop,
    Blackhole(bool),
    Stall(Direction, bool),
    Refuse(bool),
    Stats,
    Quit,
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn on_off(word: Option<&str>, cmd: &str) -> Result<bool, ParseError> {
    match word {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        _ => Err(ParseError(format!("usage: {cmd} on|off"))),
    }
}

impl FromStr for Command {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Self, ParseError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let usage = |u: &str| Err(ParseError(format!("usage: {u}")));
        let cmd = match words.as_slice() {
            [] => return Err(ParseError("empty command".into())),
            ["delay", ms] => match ms.parse::<u64>() {
                Ok(ms) => Command::Delay(Duration::from_millis(ms)),
                Err(_) => return usage("delay MS"),
            },
            ["rate", "off"] => Command::Rate(None),
            ["rate", r] => match r.parse::<u64>() {
                Ok(r) => Command::Rate(Some(r)),
                Err(_) => return usage("rate BYTES_PER_S|off"),
            },
            ["drop"] => Command::Drop,
            ["blackhole", rest @ ..] if rest.len() <= 1 => {
                Command::Blackhole(on_off(rest.first().copied(), "blackhole")?)
            }
            ["stall", dir, rest @ ..] if rest.len() <= 1 => match dir.parse::<Direction>() {
                Ok(d) => Command::Stall(d, on_off(rest.first().copied(), "stall up|down")?),
                Err(_) => return usage("stall up|down on|off"),
            },
            ["refuse", rest @ ..] if rest.len() <= 1 => Command::Refuse(on_off(rest.first().copied(), "refuse")?),
            ["stats"] => Command::Stats,
            ["quit"] => Command::Quit,
            [w, ..] => {
                return match *w {
                    "delay" => usage("delay MS"),
                    "rate" => usage("rate BYTES_PER_S|off"),
                    "drop" | "stats" | "quit" => usage(w),
                    "blackhole" | "refuse" => usage(&format!("{w} on|off")),
                    "stall" => usage("stall up|down on|off"),
                    _ => Err(ParseError(format!(
                        "unknown command {w:?} (delay, rate, drop, blackhole, stall, refuse, stats, quit)"
                    ))),
                }
            }
        };
        Ok(cmd)
    }
}

impl FaultProxy {
    /// Carries out `cmd` and returns its answer: `ok`, or the JSON line of `stats`.
    /// `quit` is answered `ok` and otherwise left to the caller.
    pub fn execute(&self, cmd: Command) -> String {
        match cmd {
            Command::Delay(d) => self.set_delay(d),
            Command::Rate(r) => self.set_rate(r),
            Command::Drop => self.drop_connections(),
            Command::Blackhole(on) => self.blackhole(on),
            Command::Stall(dir, on) => self.stall(dir, on),
            Command::Refuse(on) => self.refuse(on),
            Command::Stats => return self.stats().to_json(),
            Command::Quit => {}
        }
        "ok".into()
    }

    /// Parses and carries out one control line; the answer (`ok`, JSON, or
    /// `error: ...`) and whether it was `quit`.
    pub fn execute_line(&self, line: &str) -> (String, bool) {
        match line.parse::<Command>() {
            Ok(cmd) => (self.execute(cmd), cmd == Command::Quit),
            Err(e) => (format!("error: {e}"), false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let ok = [
            ("delay 50", Command::Delay(Duration::from_millis(50))),
            ("  delay   0 ", Command::Delay(Duration::ZERO)),
            ("rate 1000000", Command::Rate(Some(1_000_000))),
            ("rate off", Command::Rate(None)),
            ("drop", Command::Drop),
            ("blackhole on", Command::Blackhole(true)),
            ("blackhole off", Command::Blackhole(false)),
            ("stall up on", Command::Stall(Direction::Up, true)),
            ("stall down off", Command::Stall(Direction::Down, false)),
            ("refuse on", Command::Refuse(true)),
            ("refuse off", Command::Refuse(false)),
            ("stats", Command::Stats),
            ("quit", Command::Quit),
        ];
        for (line, cmd) in ok {
            assert_eq!(line.parse::<Command>(), Ok(cmd), "{line}");
        }
    }

    #[test]
    fn rejects_malformed_lines() {
        for line in [
            "",
            "delay",
            "delay -1",
            "delay 1.5",
            "rate",
            "rate fast",
            "drop now",
            "blackhole",
            "blackhole yes",
            "stall sideways on",
            "stall up",
            "stall up on now",
            "refuse maybe",
            "stats please",
            "frobnicate",
        ] {
            assert!(line.parse::<Command>().is_err(), "{line:?} parsed");
        }
    }
}
