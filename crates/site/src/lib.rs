//! dmrep remote site links: everything a link between two sites needs below the
//! replication logic.
//!
//! - [`tls`]: mutual TLS between named sites (both ends present a certificate from the
//!   sites' CA that names their site) and [`tls::TlsStream`], a full-duplex connection
//!   one thread can write to while another blocks reading.
//! - [`frames`]: site-protocol messages over a TLS stream (compression included).
//! - [`net`]: the `net` SLINK handler at a primary (the shipper).
//! - [`receiver`]: the site listener at a secondary (the receiver).
//! - [`rate`]: the token bucket of a link's bandwidth cap.
//! - [`pki`]: the small CA that issues those certificates (`ca.crt`/`ca.key`, then one
//!   `<site>.crt`/`<site>.key` per site).
//!
//! A site name is what a site's certificate carries as its DNS subject alternative
//! name, and what a peer is checked against: see [`check_site_name`].

pub mod board;
pub mod frames;
pub mod net;
pub mod pki;
pub mod rate;
pub mod receiver;
pub mod tls;

#[cfg(test)]
mod testutil;

/// A site name that cannot be used: what is wrong with it, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid site name '{name}': {why}")]
pub struct InvalidSiteName {
    /// The name as given.
    pub name: String,
    /// What rule it breaks.
    pub why: &'static str,
}

/// Check that `name` can name a site: 1 to 63 characters of `a-z`, `0-9` and `-`, not
/// starting or ending with `-`, and not reading as a number (all digits, or `0x`
/// followed by hex digits), which TLS would take for an IP address rather than a name.
/// Such a name is one DNS label, so it is both a file name (`<site>.crt`) and a TLS
/// server name.
pub fn check_site_name(name: &str) -> Result<(), InvalidSiteName> {
    let bad = |why| Err(InvalidSiteName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return bad("use only lowercase letters a-z, digits 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it must not start or end with '-'");
    }
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return bad("it reads as a number (all digits, or 0x and hex digits), which TLS takes for an address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_site_name;

    #[test]
    fn site_names() {
        for good in ["paris", "tokyo", "a", "site-2", "2nd-site", "x".repeat(63).as_str(), "0xg"] {
            assert_eq!(check_site_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("Paris", "lowercase"),
            ("par is", "lowercase"),
            ("paris.fr", "lowercase"),
            ("-paris", "start or end"),
            ("paris-", "start or end"),
            ("123", "number"),
            ("0x1f", "number"),
            (&"x".repeat(64), "63"),
        ] {
            let e = check_site_name(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("'{bad}'")), "{e}");
        }
    }
}
