//! Prometheus metrics (`dmrep daemon --metrics-listen`) and the operator packaging:
//!
//! - the exposition passes `promtool check metrics` and has the series an operator
//!   needs, with their labels and plausible values after real NBD I/O;
//! - a real Prometheus server scraping the daemon sees an SLINK's lag grow while it is
//!   paused and fall back once it is resumed, and loads the alert rules;
//! - the alert rules are valid and their unit tests pass (`promtool test rules`);
//! - the systemd unit is valid.
//!
//! HTTP is spoken with a plain `TcpStream` (HTTP/1.0: no chunked answers to decode).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The packaging directory of the repository.
fn packaging(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging").join(rel)
}

// ---------------------------------------------------------------------------------
// HTTP and the text exposition format.

/// One HTTP answer: status code, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` (HTTP/1.0, so the body ends at the connection's end).
fn http_get(addr: &str, path: &str) -> std::io::Result<Answer> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n")?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) =
        text.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other(format!("no end of headers in {text:?}")))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer { status, headers, body: body.to_string() })
}

/// `GET path`, required to answer 200.
fn get_ok(addr: &str, path: &str) -> String {
    let a = http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    assert_eq!(a.status, 200, "GET http://{addr}{path}: {}", a.body);
    a.body
}

/// Percent-encoding of a query parameter's value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One sample of an exposition: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a text exposition (comments skipped). Panics on a line it cannot read.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
        };
        let (name, labels) = match series.find('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some(i) => {
                assert!(series.ends_with('}'), "unterminated labels: {line:?}");
                (series[..i].to_string(), parse_labels(&series[i + 1..series.len() - 1], line))
            }
        };
        out.push(Sample { name, labels, value });
    }
    out
}

/// `k="v",k2="v2"` with the format's escapes (`\\`, `\"`, `\n`).
fn parse_labels(s: &str, line: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, r) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels in {line:?}"));
        let mut v = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, c)) => v.push(c),
                    None => panic!("bad escape in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        assert!(m.insert(k.to_string(), v).is_none(), "label {k} twice in {line:?}");
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    m
}

/// The samples of `name` whose labels include `want`.
fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect()
}

/// The value of the one sample of `name` with exactly the labels `want`.
fn value(text: &str, samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = find(samples, name, want).into_iter().filter(|s| s.labels.len() == want.len()).collect();
    assert_eq!(found.len(), 1, "expected one sample {name}{want:?}, found {found:?} in:\n{text}");
    found[0].value
}

/// `# TYPE name kind` is declared.
fn assert_type(text: &str, name: &str, kind: &str) {
    assert!(text.lines().any(|l| l == format!("# TYPE {name} {kind}")), "no `# TYPE {name} {kind}` in:\n{text}");
    assert!(text.lines().any(|l| l.starts_with(&format!("# HELP {name} "))), "no `# HELP {name}` in:\n{text}");
}

// ---------------------------------------------------------------------------------
// Set-up.

/// A daemon serving metrics on a free loopback port; returns it and the address.
fn daemon_with_metrics() -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let a = addr.clone();
    let d = Daemon::start_with(move |_| vec!["--metrics-listen".into(), a]);
    // The control socket answers first; the metrics listener is bound just after.
    assert!(
        wait_until(Duration::from_secs(10), || http_get(&addr, "/metrics").is_ok_and(|a| a.status == 200)),
        "metrics at {addr} never answered\n{}",
        d.log_text()
    );
    (d, addr)
}

/// Group `r0` over 16 MiB devices: the LD on SLINK 0, an asynchronous local RD on
/// SLINK 1, an 8 MiB log. The replicated device is the NBD export `r0-0`.
fn group(d: &Daemon) {
    let ld = d.make_file_s("ld", 16 * MIB);
    let rd = d.make_file_s("rd", 16 * MIB);
    let log = d.make_file_s("replog", 8 * MIB);
    d.create(
        "r0",
        &format!(
            "0 32768 replicator default 4 {log} 0 auto 16384 local 2 0 asynchronous 2 0 {ld} - 0 \
             local 2 1 asynchronous 2 0 {rd} core 2 2048 nosync"
        ),
    );
}

// ---------------------------------------------------------------------------------
// The exposition.

#[test]
fn metrics_pass_promtool_and_name_what_operators_need() {
    require!("qemu-io", "promtool");
    let (d, addr) = daemon_with_metrics();
    group(&d);
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x5a 0 256k", "write -P 0x5b 1M 64k", "read 0 64k", "flush"]);
    // SLINK 1 catches up (asynchronous): its lag is then 0.
    assert!(
        wait_until(Duration::from_secs(20), || {
            let t = get_ok(&addr, "/metrics");
            let s = parse_exposition(&t);
            find(&s, "dmrep_slink_lag_entries", &[("group", "r0"), ("slink", "1")]).iter().all(|s| s.value == 0.0)
        }),
        "SLINK 1 never caught up:\n{}",
        get_ok(&addr, "/metrics")
    );

    let a = http_get(&addr, "/metrics").unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    let ctype = a.header("content-type").unwrap_or("");
    assert!(ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"), "Content-Type {ctype:?}");
    let text = a.body;
    let s = parse_exposition(&text);
    let v = |name: &str, want: &[(&str, &str)]| value(&text, &s, name, want);

    // Device counters of the replicated device, after real NBD I/O.
    let dev = [("device", "r0-0")];
    assert_type(&text, "dmrep_device_writes_total", "counter");
    assert_type(&text, "dmrep_device_reads_total", "counter");
    assert!(v("dmrep_device_writes_total", &dev) >= 2.0, "{text}");
    assert!(v("dmrep_device_write_bytes_total", &dev) >= (256 + 64) as f64 * 1024.0, "{text}");
    assert!(v("dmrep_device_reads_total", &dev) >= 1.0, "{text}");
    assert!(v("dmrep_device_read_bytes_total", &dev) >= 64.0 * 1024.0, "{text}");
    assert!(v("dmrep_device_flushes_total", &dev) >= 1.0, "{text}");
    assert_eq!(v("dmrep_device_errors_total", &dev), 0.0, "{text}");
    assert_eq!(v("dmrep_device_size_bytes", &dev), (16 * MIB) as f64, "{text}");

    // The write latency histogram: a count, a sum, cumulative buckets ending in +Inf.
    assert_type(&text, "dmrep_device_write_latency_seconds", "histogram");
    let count = v("dmrep_device_write_latency_seconds_count", &dev);
    assert!(count >= 2.0, "{text}");
    assert!(v("dmrep_device_write_latency_seconds_sum", &dev) > 0.0, "{text}");
    let buckets = find(&s, "dmrep_device_write_latency_seconds_bucket", &dev);
    assert!(buckets.len() >= 2, "{text}");
    let mut prev = 0.0;
    for b in &buckets {
        assert!(b.value >= prev, "buckets not cumulative: {buckets:?}");
        prev = b.value;
    }
    assert_eq!(buckets.last().unwrap().labels["le"], "+Inf", "{buckets:?}");
    assert_eq!(v("dmrep_device_write_latency_seconds_bucket", &[("device", "r0-0"), ("le", "+Inf")]), count);
    assert!(v("dmrep_device_read_latency_seconds_count", &dev) >= 1.0, "{text}");

    // The group's SLINK 1 (local: empty site label), caught up.
    let sl = [("group", "r0"), ("slink", "1"), ("site", "")];
    assert_type(&text, "dmrep_slink_lag_seconds", "gauge");
    assert_eq!(v("dmrep_slink_lag_seconds", &sl), 0.0, "{text}");
    assert_eq!(v("dmrep_slink_lag_entries", &sl), 0.0, "{text}");
    assert_eq!(v("dmrep_slink_lag_bytes", &sl), 0.0, "{text}");
    assert_eq!(v("dmrep_slink_up", &sl), 1.0, "{text}");
    assert_eq!(v("dmrep_slink_paused", &sl), 0.0, "{text}");
    assert_eq!(v("dmrep_slink_ordered", &sl), 1.0, "{text}");
    assert!(v("dmrep_slink_applied_bytes_total", &sl) >= (256 + 64) as f64 * 1024.0, "{text}");
    for (m, want) in [("synchronous", 0.0), ("asynchronous", 1.0), ("forced_synchronous", 0.0), ("dirty", 0.0)] {
        assert_eq!(
            v("dmrep_slink_mode", &[("group", "r0"), ("slink", "1"), ("site", ""), ("mode", m)]),
            want,
            "{text}"
        );
    }
    assert_eq!(v("dmrep_slink_resync_remaining_bytes", &sl), 0.0, "{text}");
    assert_eq!(v("dmrep_slink_resync_eta_seconds", &sl), 0.0, "{text}");
    assert_type(&text, "dmrep_slink_resync_copied_bytes_total", "counter");
    v("dmrep_slink_resync_copied_bytes_total", &sl);

    // The log and the site.
    let g = [("group", "r0")];
    let size = v("dmrep_log_size_bytes", &g);
    assert!(size > 0.0 && size <= (8 * MIB) as f64, "log size {size}: {text}");
    let used = v("dmrep_log_used_bytes", &g);
    assert!((0.0..=size).contains(&used), "log used {used}: {text}");
    assert_eq!(v("dmrep_site_role", &[("group", "r0"), ("role", "primary")]), 1.0, "{text}");
    assert_eq!(v("dmrep_site_role", &[("group", "r0"), ("role", "secondary")]), 0.0, "{text}");
    assert!(v("dmrep_site_generation", &g) >= 1.0, "{text}");
    assert_eq!(v("dmrep_site_fenced", &g), 0.0, "{text}");
    assert_eq!(v("dmrep_site_split_brain", &g), 0.0, "{text}");
    assert_eq!(v("dmrep_site_inconsistent", &g), 0.0, "{text}");
    assert!(find(&s, "dmrep_site_lag_seconds", &[]).is_empty(), "a primary has no site lag: {text}");

    // Counters end in _total, every family is declared, nothing is declared twice.
    let mut declared = BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = l.split_once(' ').unwrap();
        assert!(declared.insert(name.to_string(), kind.to_string()).is_none(), "{name} declared twice");
        assert!(name.starts_with("dmrep_"), "{name}: not dmrep_-prefixed");
        assert_eq!(kind == "counter", name.ends_with("_total"), "{name} is a {kind}");
    }
    for smp in &s {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| smp.name.strip_suffix(suf).filter(|f| declared.get(*f).is_some_and(|k| k == "histogram")))
            .unwrap_or(&smp.name);
        assert!(declared.contains_key(family), "{} has no # TYPE", smp.name);
    }

    // Other paths and methods.
    let a = http_get(&addr, "/nope").unwrap();
    assert_eq!(a.status, 404, "{}", a.body);
    let a = http_get(&addr, "/metrics/extra").unwrap();
    assert_eq!(a.status, 404, "{}", a.body);
    let mut tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 405 "), "{raw}");

    // promtool's linter, last (everything above holds whatever it says): exit 0, no
    // lint problem printed.
    let file = d.path("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let o = run(Command::new("promtool").args(["check", "metrics"]).stdin(std::fs::File::open(&file).unwrap()));
    let said = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && said.trim().is_empty(), "promtool check metrics: {}\non:\n{text}", show(&o));
}

// ---------------------------------------------------------------------------------
// A real Prometheus server.

/// A `prometheus` server with its own configuration and storage in a temporary
/// directory, on a free loopback port; killed when dropped (its log shown if the test
/// failed).
struct Prometheus {
    addr: String,
    log: PathBuf,
    _child: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrape `target` (job `dmrep`) every second, evaluating `rules` every second.
    fn start(target: &str, rules: &Path) -> Prometheus {
        let dir = tempfile::Builder::new().prefix("dmrep-prom").tempdir_in("/tmp").unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: dmrep\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("prometheus.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { addr, log, _child: KillOnDrop(child), _dir: dir };
        assert!(
            wait_until(Duration::from_secs(30), || http_get(&p.addr, "/-/ready").is_ok_and(|a| a.status == 200)),
            "prometheus on {} not ready in 30 s",
            p.addr
        );
        p
    }

    /// `GET /api/v1/...`, parsed; requires `"status": "success"`.
    fn api(&self, path_and_query: &str) -> Value {
        let body = get_ok(&self.addr, &format!("/api/v1/{path_and_query}"));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "{path_and_query}: {v}");
        v
    }

    /// An instant query: the values of the result vector's elements.
    fn query(&self, q: &str) -> Vec<f64> {
        let v = self.api(&format!("query?query={}", urlencode(q)));
        assert_eq!(v["data"]["resultType"], "vector", "{q}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{q}: {r}")))
            .collect()
    }

    /// The value of a query that has one element, None while it has none.
    fn query_one(&self, q: &str) -> Option<f64> {
        let vals = self.query(q);
        assert!(vals.len() <= 1, "{q}: more than one series: {vals:?}");
        vals.first().copied()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== prometheus log ({}) =====\n{}\n===== end of prometheus log =====",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[test]
fn prometheus_server_sees_lag_grow_while_paused_and_fall_when_resumed() {
    require!("qemu-io", "prometheus");
    let (d, addr) = daemon_with_metrics();
    group(&d);
    let prom = Prometheus::start(&addr, &packaging("prometheus/dmrep-alerts.yml"));

    // The target is scraped, and the alert rules are loaded and evaluate cleanly.
    assert!(
        wait_until(Duration::from_secs(30), || prom.query_one(r#"up{job="dmrep"}"#) == Some(1.0)),
        "prometheus never scraped {addr}: {}",
        prom.api("targets")
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            let v = prom.api("rules");
            let groups = v["data"]["groups"].as_array().cloned().unwrap_or_default();
            let rules: Vec<Value> =
                groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
            groups.iter().any(|g| g["name"] == "dmrep")
                && rules.iter().any(|r| r["name"] == "DmrepReplicationLagAboveRPO")
                && rules.iter().all(|r| r["health"] == "ok")
        }),
        "alert rules not loaded or not healthy: {}",
        prom.api("rules")
    );
    let lag = r#"dmrep_slink_lag_seconds{job="dmrep",group="r0",slink="1"}"#;
    assert!(wait_until(Duration::from_secs(20), || prom.query_one(lag) == Some(0.0)), "{lag}: {:?}", prom.query(lag));

    // Paused, the SLINK lacks the new write: its lag grows with the write's age.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    qemu_io_ok(&d.uri("r0-0"), &["write -P 0x77 0 64k", "flush"]);
    let mut first = 0.0;
    assert!(
        wait_until(Duration::from_secs(30), || {
            first = prom.query_one(lag).unwrap_or(0.0);
            first > 2.0
        }),
        "{lag} never above 2 while paused: {:?}\n{}",
        prom.query(lag),
        get_ok(&addr, "/metrics")
    );
    assert_eq!(prom.query_one(r#"dmrep_slink_paused{slink="1"}"#), Some(1.0));
    assert!(prom.query_one(r#"dmrep_slink_lag_entries{slink="1"}"#).unwrap_or(0.0) >= 1.0);
    let mut later = 0.0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            later = prom.query_one(lag).unwrap_or(0.0);
            later > first
        }),
        "{lag} did not grow past {first} while paused (last {later})"
    );

    // Resumed, it catches up: the lag falls to (nearly) 0.
    d.cli_ok(&["message", "r0", "0", "slink", "1", "resume"]);
    let mut last = later;
    assert!(
        wait_until(Duration::from_secs(30), || {
            last = prom.query_one(lag).unwrap_or(f64::MAX);
            last < 1.0
        }),
        "{lag} did not fall below 1 after resume (last {last})\n{}",
        get_ok(&addr, "/metrics")
    );
    assert!(
        wait_until(Duration::from_secs(20), || prom.query_one(r#"dmrep_slink_paused{slink="1"}"#) == Some(0.0)),
        "dmrep_slink_paused never back to 0"
    );
    // Nothing fires in this healthy group (the RPO is 60 s; the lag stayed far below).
    let alerts = prom.api("alerts");
    assert_eq!(alerts["data"]["alerts"].as_array().map(Vec::len), Some(0), "{alerts}");
}

// ---------------------------------------------------------------------------------
// The packaging files.

#[test]
fn alert_rules_are_valid() {
    require!("promtool");
    let rules = packaging("prometheus/dmrep-alerts.yml");
    let out = run_ok(Command::new("promtool").args(["check", "rules"]).arg(&rules));
    assert!(out.contains("SUCCESS") && !out.to_lowercase().contains("warn"), "promtool check rules: {out}");
    // The unit tests name the rule file relative to themselves.
    let tests = packaging("prometheus/dmrep-alerts.test.yml");
    let out = run_ok(Command::new("promtool").args(["test", "rules"]).arg(&tests).current_dir(packaging("prometheus")));
    assert!(out.contains("SUCCESS") && !out.contains("FAILED"), "promtool test rules: {out}");
}

/// `key=value` lines of a unit file's `[section]` (comments skipped).
fn unit_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut cur = String::new();
    let mut out = Vec::new();
    for l in text.lines().map(str::trim) {
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if l.starts_with('[') {
            cur = l.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        if cur == section {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not key=value in [{section}]: {l:?}"));
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

#[test]
fn systemd_unit_is_valid() {
    let unit = packaging("systemd/dmrep.service");
    let text = std::fs::read_to_string(&unit).unwrap();

    // What the daemon needs of its unit, read without any tool.
    let service = unit_section(&text, "Service");
    let get = |k: &str| -> Vec<&str> { service.iter().filter(|(kk, _)| kk == k).map(|(_, v)| v.as_str()).collect() };
    for (k, want) in [
        ("Type", "simple"),
        ("StateDirectory", "dmrep"),
        ("RuntimeDirectory", "dmrep"),
        ("RuntimeDirectoryPreserve", "no"),
        ("KillSignal", "SIGTERM"),
        ("TimeoutStopSec", "60"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "65536"),
    ] {
        assert_eq!(get(k), [want], "{k} in [Service] of {}", unit.display());
    }
    assert_eq!(unit_section(&text, "Install"), [("WantedBy".to_string(), "multi-user.target".to_string())]);
    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart: {exec:?}");
    let argv: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(
        argv,
        ["/usr/local/bin/dmrep", "daemon", "--state-dir", "/var/lib/dmrep", "--nbd-unix", "/run/dmrep/nbd.sock"]
    );
    // Every flag of the unit (the commented examples too) is one `dmrep daemon` has.
    let help = run_ok(Command::new(BIN).args(["daemon", "--help"]));
    let flags: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("/usr/local/bin/dmrep daemon") || l.trim_start_matches('#').trim_start().starts_with("--")
        })
        .flat_map(str::split_whitespace)
        .filter(|w| w.starts_with("--"))
        .collect();
    for f in ["--state-dir", "--nbd-unix", "--metrics-listen", "--site-name", "--site-listen", "--tls-dir"] {
        assert!(flags.contains(&f), "the unit does not show {f}: {flags:?}");
    }
    for f in &flags {
        assert!(help.contains(&format!("{f} ")), "{f} of the unit is not a `dmrep daemon` flag:\n{help}");
    }
    // The default control socket is in the RuntimeDirectory.
    assert!(help.contains("/run/dmrep/control.sock"), "{help}");

    // systemd's own verdict, with the ExecStart binary pointed at the one built here
    // (verify requires it to exist).
    if !have_or_skip("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("dmrep.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/dmrep", BIN)).unwrap();
    let o = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
    let said = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && said.trim().is_empty(), "systemd-analyze verify: {}", show(&o));
}
