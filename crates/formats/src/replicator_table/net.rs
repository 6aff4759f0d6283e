//! The `net` SLINK's transport parameters: a remote dmrep site over TCP with mutual TLS.
//!
//! ```text
//! net <#params> <slink_nr> [<policy> [<fallbehind>...]] <host:port> site=<name>
//!     [compress=none|zstd|lz4] [rate=N[k|m|g]] [timeout=N[ms|s|m]]
//! ```
//!
//! - `<host:port>`: where the peer site's daemon listens (`--site-listen`);
//! - `site=`: the peer's site name, which its TLS certificate must carry;
//! - `compress=`: compression of shipped entries and resync data (default none);
//! - `rate=`: bandwidth cap in bytes per second (k, m, g: binary multiples), shared by
//!   shipping and resync; default none;
//! - `timeout=`: a link that answers nothing for this long is down (default 10s).
//!
//! Device lines of a `net` SLINK name the peer's device by its dev_nr, which must be the
//! same as the local one (devices pair by dev_nr across sites): `2 <dev_nr> <dev_nr>`.

use super::error::{invalid, unknown};
use super::parse::{parse_timeout, parse_u64};
use super::{ReplicatorTableError, SlinkNr};

/// Default `timeout`: long enough for a WAN's worst round trips under load, short
/// enough that a dead link is found before an async SLINK's backlog gets large.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Compression of what a `net` SLINK ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compress {
    #[default]
    None,
    Zstd,
    Lz4,
}

impl Compress {
    pub fn name(self) -> &'static str {
        match self {
            Compress::None => "none",
            Compress::Zstd => "zstd",
            Compress::Lz4 => "lz4",
        }
    }
}

/// A `net` SLINK's parameters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetParams {
    /// `host:port` of the peer's site listener.
    pub addr: String,
    /// The peer's site name.
    pub site: String,
    pub compress: Compress,
    /// Bytes per second, if capped.
    pub rate: Option<u64>,
    pub timeout_ms: u64,
}

/// Whether `name` is a valid site name: 1-63 of `a-z0-9-`, not starting or ending with
/// `-` (it is a DNS name in the site's certificate).
pub fn valid_site_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `N[k|m|g]` bytes (binary multiples).
fn parse_rate(v: &str) -> Option<u64> {
    let (digits, mult) = match v.as_bytes().last()?.to_ascii_lowercase() {
        b'k' => (&v[..v.len() - 1], 1u64 << 10),
        b'm' => (&v[..v.len() - 1], 1 << 20),
        b'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    parse_u64(digits).filter(|&n| n > 0)?.checked_mul(mult)
}

impl NetParams {
    /// Parses the transport parameters of `net` SLINK `slink` (what follows its policy
    /// and thresholds).
    pub fn parse(slink: SlinkNr, params: &[String]) -> Result<NetParams, ReplicatorTableError> {
        let ctx = format!("slink {slink}");
        let mut addr = None;
        let mut site = None;
        let mut compress = Compress::None;
        let mut rate = None;
        let mut timeout_ms = DEFAULT_TIMEOUT_MS;
        for p in params {
            match p.split_once('=') {
                Some(("site", v)) => {
                    if !valid_site_name(v) {
                        return Err(invalid(&ctx, "site", "a site name of 1-63 characters a-z, 0-9, -", Some(v)));
                    }
                    site = Some(v.to_string());
                }
                Some(("compress", v)) => {
                    compress = match v {
                        "none" => Compress::None,
                        "zstd" => Compress::Zstd,
                        "lz4" => Compress::Lz4,
                        other => return Err(unknown(&ctx, "compression", other, "none|zstd|lz4")),
                    }
                }
                Some(("rate", v)) => {
                    rate = Some(parse_rate(v).ok_or_else(|| {
                        invalid(&ctx, "rate", "bytes per second, N[k|m|g] (binary multiples)", Some(v))
                    })?)
                }
                Some(("timeout", v)) => {
                    timeout_ms =
                        parse_timeout(v).ok_or_else(|| invalid(&ctx, "timeout", "a duration N[ms|s|m]", Some(v)))?
                }
                Some(_) => return Err(unknown(&ctx, "net parameter", p, "site=|compress=|rate=|timeout=")),
                None => {
                    if addr.is_some() {
                        return Err(invalid(&ctx, "host:port", "one address", Some(p)));
                    }
                    let ok = p
                        .rsplit_once(':')
                        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0));
                    if !ok {
                        return Err(invalid(&ctx, "host:port", "the peer's site listener as host:port", Some(p)));
                    }
                    addr = Some(p.clone());
                }
            }
        }
        let addr = addr.ok_or_else(|| invalid(&ctx, "host:port", "the peer's site listener as host:port", None))?;
        let site = site.ok_or_else(|| invalid(&ctx, "site", "site=<the peer's site name>", None))?;
        Ok(NetParams { addr, site, compress, rate, timeout_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<NetParams, ReplicatorTableError> {
        NetParams::parse(1, &s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn parses_and_refuses() {
        let n = p("10.0.0.2:7800 site=tokyo compress=zstd rate=100m timeout=3s").unwrap();
        assert_eq!(n.addr, "10.0.0.2:7800");
        assert_eq!(
            (n.site.as_str(), n.compress, n.rate, n.timeout_ms),
            ("tokyo", Compress::Zstd, Some(100 << 20), 3000)
        );
        let d = p("[::1]:7 site=a").unwrap();
        assert_eq!((d.compress, d.rate, d.timeout_ms), (Compress::None, None, DEFAULT_TIMEOUT_MS));
        for (args, msg) in [
            ("site=a", "host:port"),
            ("h:1", "site"),
            ("h:0 site=a", "host:port"),
            ("h:1 site=Tokyo", "site"),
            ("h:1 site=a compress=gzip", "compression"),
            ("h:1 site=a rate=0", "rate"),
            ("h:1 site=a colour=blue", "net parameter"),
            ("h:1 h:2 site=a", "one address"),
        ] {
            let e = p(args).unwrap_err().to_string();
            assert!(e.starts_with("slink 1") && e.contains(msg), "{args}: {e}");
        }
    }
}
