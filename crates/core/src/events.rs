//! The daemon's event stream (`dmrep events`): every state change an operator watches,
//! one event each, in the shape operators know from DRBD's `events2`:
//! `<exists|create|change|destroy> <group|slink|device|site> key:value...`.
//!
//! Events go into one bounded ring ([`CAPACITY`]) numbered from 1; a reader asks for
//! the events after the last one it saw, waiting a moment if there are none. A reader that
//! falls more than the ring behind is told how many it lost (they are never dropped
//! silently); a connected reader polling in time loses none.
//!
//! The JSON form of an event: `{"seq": N, "time_ms": T, "action": "...", "object": "...",
//! "<key>": "<value>", ...}`; the text form: `action object key:value ...` with a value
//! holding spaces or quotes written in double quotes.

use std::collections::VecDeque;
use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use serde_json::{json, Map, Value};

/// Events kept for readers that are behind.
pub const CAPACITY: usize = 4096;

/// What happened to the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The state at the moment a reader asked (`--now`), not a change.
    Exists,
    Create,
    Change,
    Destroy,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Exists => "exists",
            Action::Create => "create",
            Action::Change => "change",
            Action::Destroy => "destroy",
        }
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    pub action: Action,
    /// `group`, `slink`, `device`, `site`.
    pub object: &'static str,
    pub fields: Vec<(String, String)>,
}

impl Event {
    pub fn new(action: Action, object: &'static str, fields: &[(&str, String)]) -> Event {
        let time_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let fields = fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        Event { seq: 0, time_ms, action, object, fields }
    }

    /// `action object key:value ...`.
    pub fn line(&self) -> String {
        let mut s = format!("{} {}", self.action.name(), self.object);
        for (k, v) in &self.fields {
            if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '"') {
                s.push_str(&format!(" {k}:{}", serde_json::to_string(v).unwrap_or_default()));
            } else {
                s.push_str(&format!(" {k}:{v}"));
            }
        }
        s
    }

    pub fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("seq".into(), json!(self.seq));
        m.insert("time_ms".into(), json!(self.time_ms));
        m.insert("action".into(), json!(self.action.name()));
        m.insert("object".into(), json!(self.object));
        for (k, v) in &self.fields {
            m.insert(k.clone(), json!(v));
        }
        Value::Object(m)
    }
}

struct Ring {
    events: VecDeque<Event>,
    /// Seq of the next event.
    next: u64,
}

/// The process's event ring.
pub struct Bus {
    ring: Mutex<Ring>,
    cv: Condvar,
}

static BUS: LazyLock<Bus> =
    LazyLock::new(|| Bus { ring: Mutex::new(Ring { events: VecDeque::new(), next: 1 }), cv: Condvar::new() });

/// Record an event.
pub fn emit(action: Action, object: &'static str, fields: &[(&str, String)]) {
    let mut e = Event::new(action, object, fields);
    let mut r = BUS.ring.lock();
    e.seq = r.next;
    r.next += 1;
    if r.events.len() == CAPACITY {
        r.events.pop_front();
    }
    r.events.push_back(e);
    BUS.cv.notify_all();
}

/// What a reader gets: events after the one it asked from, how many it lost (fell out of
/// the ring before it asked), and the seq to ask after next time.
pub struct Batch {
    pub events: Vec<Event>,
    pub lost: u64,
    pub last: u64,
}

/// The events after seq `after` (see [`position`] to start from now), waiting up to
/// `wait` for one if there are none.
pub fn after(after: u64, wait: Duration) -> Batch {
    let until = Instant::now() + wait;
    let mut r = BUS.ring.lock();
    while r.next <= after + 1 && Instant::now() < until {
        BUS.cv.wait_until(&mut r, until);
    }
    let first_kept = r.events.front().map_or(r.next, |e| e.seq);
    let lost = first_kept.saturating_sub(after + 1);
    let events: Vec<Event> = r.events.iter().filter(|e| e.seq > after).cloned().collect();
    Batch { events, lost, last: r.next - 1 }
}

/// The seq of the newest event (a reader starting now asks after it).
pub fn position() -> u64 {
    BUS.ring.lock().next - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_a_reader_that_falls_behind() {
        let start = position();
        emit(Action::Change, "slink", &[("group", "r0".into()), ("reason", "link down: reset".into())]);
        let b = after(start, Duration::ZERO);
        let e = b.events.iter().find(|e| e.object == "slink").unwrap();
        assert_eq!(e.line(), "change slink group:r0 reason:\"link down: reset\"");
        assert_eq!(e.json()["reason"], "link down: reset");
        assert_eq!(b.lost, 0);
        for i in 0..CAPACITY + 10 {
            emit(Action::Change, "device", &[("n", i.to_string())]);
        }
        let b = after(start, Duration::ZERO);
        assert!(b.lost >= 11, "told it lost events: {}", b.lost);
        assert_eq!(b.events.len(), CAPACITY);
        let t0 = Instant::now();
        let none = after(position(), Duration::from_millis(50));
        assert!(none.events.is_empty() && t0.elapsed() >= Duration::from_millis(40));
    }
}
