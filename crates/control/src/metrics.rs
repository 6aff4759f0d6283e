//! Prometheus metrics: `dmrep daemon --metrics-listen ADDR:PORT` serves `GET /metrics`
//! in the text exposition format (version 0.0.4).
//!
//! Names follow Prometheus conventions: the `dmrep_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` for counters. Labels: `device`; `group`, `slink`,
//! `site` (the remote site's name, empty for a local SLINK); `role`, `mode`.
//!
//! Replication lag in seconds (`dmrep_slink_lag_seconds`) is the age of the oldest write
//! the SLINK's site does not have yet: the append time of its oldest outstanding entry
//! while in ordered mode; while out of ordered mode (dirty regions to copy), the time
//! since it left ordered mode, however idle the group is. So it grows while the SLINK is
//! paused or its site unreachable, and is 0 only when the site has every write. At a
//! secondary, `dmrep_site_lag_seconds` is the age of the oldest write of the primary
//! not yet applied here, kept growing by the primary's heartbeats while it is behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dmrep_core::iostats::LATENCY_BOUNDS;
use serde_json::Value;

use crate::daemon::Daemon;

/// One metric family being written: its samples, by label set.
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

/// The families of one scrape, written in name order.
#[derive(Default)]
struct Exposition(BTreeMap<&'static str, Family>);

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    fn add(&mut self, name: &'static str, kind: &'static str, help: &'static str, l: &[(&str, &str)], v: f64) {
        let f = self.0.entry(name).or_insert(Family { help, kind, samples: Vec::new() });
        f.samples.push((labels(l), v));
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, l: &[(&str, &str)], v: f64) {
        self.add(name, "gauge", help, l, v);
    }

    fn counter(&mut self, name: &'static str, help: &'static str, l: &[(&str, &str)], v: f64) {
        self.add(name, "counter", help, l, v);
    }

    /// A histogram family: cumulative bucket counts (the last is `+Inf`) and the sum.
    fn histogram(&mut self, name: &'static str, help: &'static str, l: &[(&str, &str)], cum: &[u64], sum: f64) {
        let f = self.0.entry(name).or_insert(Family { help, kind: "histogram", samples: Vec::new() });
        for (i, c) in cum.iter().enumerate() {
            let le = LATENCY_BOUNDS.get(i).map_or("+Inf".to_string(), |b| format!("{b}"));
            let mut ll: Vec<(&str, &str)> = l.to_vec();
            ll.push(("le", &le));
            f.samples.push((format!("_bucket{}", labels(&ll)), *c as f64));
        }
        f.samples.push((format!("_sum{}", labels(l)), sum));
        f.samples.push((format!("_count{}", labels(l)), *cum.last().unwrap_or(&0) as f64));
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.0 {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for (l, v) in &f.samples {
                // Histogram samples carry their suffix before the labels.
                let (suffix, l) =
                    if l.starts_with('_') { l.split_at(l.find('{').unwrap_or(l.len())) } else { ("", &l[..]) };
                let _ = writeln!(out, "{name}{suffix}{l} {}", num(*v));
            }
        }
        out
    }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn now_ms() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_millis() as f64)
}

/// One replicator group's metrics, from its status (the control target's detail).
fn group(e: &mut Exposition, g: &str, st: &Value) {
    let gl = [("group", g)];
    e.gauge("dmrep_log_used_bytes", "Bytes of the replication log in use.", &gl, f(&st["log"]["used_bytes"]));
    e.gauge("dmrep_log_size_bytes", "Bytes of the replication log's ring.", &gl, f(&st["log"]["ring_len"]));
    let site = &st["site"];
    let role = site["role"].as_str().unwrap_or("primary");
    for r in ["primary", "secondary"] {
        e.gauge(
            "dmrep_site_role",
            "This site's role for the group (1 for the role it has).",
            &[("group", g), ("role", r)],
            (r == role) as u8 as f64,
        );
    }
    e.gauge("dmrep_site_generation", "The group's generation as this site knows it.", &gl, f(&site["generation"]));
    e.gauge(
        "dmrep_site_fenced",
        "1 when this site refuses writes: a newer generation exists.",
        &gl,
        (!site["fenced"].is_null()) as u8 as f64,
    );
    e.gauge(
        "dmrep_site_split_brain",
        "1 while a split brain with another site is reported.",
        &gl,
        (!site["split_brain"].is_null()) as u8 as f64,
    );
    e.gauge(
        "dmrep_site_inconsistent",
        "1 while this site's devices are copied outside write order (not a prefix state).",
        &gl,
        (site["inconsistent"] == true) as u8 as f64,
    );
    if role == "secondary" {
        e.gauge(
            "dmrep_site_lag_seconds",
            "At a secondary: age of the oldest write of the primary not yet applied here.",
            &gl,
            f(&site["lag_seconds"]),
        );
        e.gauge(
            "dmrep_site_lag_entries",
            "At a secondary: entries of the primary not yet applied here.",
            &gl,
            f(&site["lag_entries"]),
        );
        e.gauge(
            "dmrep_site_lag_bytes",
            "At a secondary: bytes received and not yet applied here.",
            &gl,
            f(&site["lag_bytes"]),
        );
    }
    let now = now_ms();
    for s in st["slinks"].as_array().into_iter().flatten() {
        let nr = s["slink"].to_string();
        let site_name = s["link"]["site"].as_str().unwrap_or("");
        let l = [("group", g), ("slink", nr.as_str()), ("site", site_name)];
        let sync = &s["sync"];
        let ordered = sync["ordered"] == true;
        let lag = if ordered {
            f(&s["oldest_outstanding_ms"]) / 1e3
        } else {
            sync["since_ms"].as_f64().map_or(0.0, |t| ((now - t) / 1e3).max(0.0))
        };
        e.gauge(
            "dmrep_slink_lag_seconds",
            "Age of the oldest write the SLINK's site does not have (0: it has every write).",
            &l,
            lag,
        );
        e.gauge(
            "dmrep_slink_lag_entries",
            "Log entries the SLINK's site has not applied.",
            &l,
            f(&s["outstanding_ios"]),
        );
        e.gauge(
            "dmrep_slink_lag_bytes",
            "Bytes of the log entries the SLINK's site has not applied.",
            &l,
            f(&s["outstanding_bytes"]),
        );
        e.gauge("dmrep_slink_up", "1 when the SLINK's site is reachable.", &l, (s["accessible"] == true) as u8 as f64);
        e.gauge("dmrep_slink_paused", "1 while an operator paused the SLINK.", &l, (s["paused"] == true) as u8 as f64);
        e.gauge(
            "dmrep_slink_ordered",
            "1 in ordered (write-order consistent) mode, 0 with dirty regions to copy.",
            &l,
            ordered as u8 as f64,
        );
        let mode = if ordered { s["mode"].as_str().unwrap_or("") } else { "dirty" };
        for m in ["synchronous", "asynchronous", "forced_synchronous", "dirty"] {
            let ml = [("group", g), ("slink", nr.as_str()), ("site", site_name), ("mode", m)];
            e.gauge(
                "dmrep_slink_mode",
                "The SLINK's mode in force (1 for the mode it is in).",
                &ml,
                (m == mode) as u8 as f64,
            );
        }
        e.gauge(
            "dmrep_slink_resync_remaining_bytes",
            "Bytes of dirty regions the resync has left to copy.",
            &l,
            f(&sync["remaining_bytes"]),
        );
        e.gauge(
            "dmrep_slink_resync_eta_seconds",
            "Estimated seconds until the resync ends (0 when none runs or no rate is known yet).",
            &l,
            f(&sync["eta_s"]),
        );
        e.counter(
            "dmrep_slink_resync_copied_bytes_total",
            "Bytes the current or last resync copied.",
            &l,
            f(&sync["bytes_copied"]),
        );
        e.counter(
            "dmrep_slink_applied_bytes_total",
            "Bytes of log entries the SLINK's site applied.",
            &l,
            f(&s["applied_bytes"]),
        );
        if !s["link"].is_null() {
            let link = &s["link"];
            for (kind, v) in [("raw", &link["bytes_raw"]), ("wire", &link["bytes_wire"])] {
                let kl = [("group", g), ("slink", nr.as_str()), ("site", site_name), ("kind", kind)];
                e.counter(
                    "dmrep_slink_sent_bytes_total",
                    "Bytes sent to the site: data shipped (raw) and on the wire after compression (wire).",
                    &kl,
                    f(v),
                );
            }
            e.counter(
                "dmrep_slink_connects_total",
                "Connections made to the site (reconnects included).",
                &l,
                f(&link["connects"]),
            );
        }
    }
}

/// The whole exposition for a scrape.
pub fn render(daemon: &Daemon) -> String {
    let mut e = Exposition::default();
    e.gauge("dmrep_build_info", "The running dmrep's version.", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    for dev in daemon.devices().list() {
        let name = dev.name();
        let l = [("device", name.as_str())];
        let s = dev.io_stats();
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        e.counter("dmrep_device_reads_total", "Read requests completed.", &l, ld(&s.reads));
        e.counter("dmrep_device_read_bytes_total", "Bytes of read requests completed.", &l, ld(&s.read_bytes));
        e.counter(
            "dmrep_device_writes_total",
            "Write, write-zeroes and discard requests completed.",
            &l,
            ld(&s.writes),
        );
        e.counter(
            "dmrep_device_write_bytes_total",
            "Bytes of write, write-zeroes and discard requests completed.",
            &l,
            ld(&s.write_bytes),
        );
        e.counter("dmrep_device_flushes_total", "Flush requests completed.", &l, ld(&s.flushes));
        e.counter("dmrep_device_errors_total", "Requests completed with an error.", &l, ld(&s.errors));
        let (cum, sum) = s.read_latency.snapshot();
        e.histogram("dmrep_device_read_latency_seconds", "Latency of read requests.", &l, &cum, sum);
        let (cum, sum) = s.write_latency.snapshot();
        e.histogram("dmrep_device_write_latency_seconds", "Latency of write requests.", &l, &cum, sum);
        e.gauge("dmrep_device_size_bytes", "Size of the device.", &l, dev.size() as f64);
        e.gauge("dmrep_device_open_clients", "NBD clients that have the device open.", &l, dev.open_count() as f64);
        if let Some(table) = dev.live_table() {
            for (_, t) in table.targets() {
                if t.type_name() == "replicator" {
                    group(&mut e, &name, &t.status().json);
                }
            }
        }
    }
    e.render()
}

/// Serve `GET /metrics` on `listener` until `stop` (checked every 200 ms). One request
/// per connection, each on its own short-lived thread (a scrape every few seconds).
pub fn serve(listener: TcpListener, daemon: Arc<Daemon>, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((tcp, _)) => {
                let d = daemon.clone();
                let _ = std::thread::Builder::new().name("metrics".into()).spawn(move || answer(tcp, &d));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => {
                tracing::warn!("metrics listener: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(())
}

fn answer(tcp: TcpStream, daemon: &Daemon) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(10)));
    let mut r = BufReader::new(match tcp.try_clone() {
        Ok(t) => t,
        Err(_) => return,
    });
    let mut first = String::new();
    if r.read_line(&mut first).is_err() {
        return;
    }
    // Skip the headers.
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(daemon)),
        ("GET", "/") => ("200 OK", "text/plain; charset=utf-8", "dmrep daemon: metrics at /metrics\n".to_string()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found: try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_string()),
    };
    let mut w = tcp;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let mut e = Exposition::default();
        e.gauge("dmrep_b", "B.", &[("group", "g\"1")], 1.5);
        e.counter("dmrep_a_total", "A.", &[], 3.0);
        e.histogram("dmrep_c_seconds", "C.", &[("device", "d")], &[1; LATENCY_BOUNDS.len() + 1], 0.25);
        let t = e.render();
        assert!(t.starts_with("# HELP dmrep_a_total A.\n# TYPE dmrep_a_total counter\ndmrep_a_total 3\n"), "{t}");
        assert!(t.contains("dmrep_b{group=\"g\\\"1\"} 1.5\n"), "{t}");
        assert!(t.contains("dmrep_c_seconds_bucket{device=\"d\",le=\"0.00005\"} 1\n"), "{t}");
        assert!(t.contains("dmrep_c_seconds_bucket{device=\"d\",le=\"+Inf\"} 1\n"), "{t}");
        assert!(t.contains("dmrep_c_seconds_sum{device=\"d\"} 0.25\ndmrep_c_seconds_count{device=\"d\"} 1\n"), "{t}");
    }
}
