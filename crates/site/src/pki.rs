//! The sites' certificate authority: one CA per deployment, one certificate per site.
//!
//! [`init`] creates the CA in a directory (`ca.crt`, `ca.key`); [`issue`] signs a site's
//! certificate there (`<site>.crt`, `<site>.key`). A site then needs `ca.crt`, its own
//! `<site>.crt` and `<site>.key` ([`site_files`]), never `ca.key`, which should stay
//! wherever certificates are issued. Nothing is ever overwritten: an existing file is
//! an error, so a CA or a site key cannot be replaced by accident.
//!
//! Keys are ECDSA P-256. The CA is valid 10 years and may sign only end certificates
//! (path length 0); a site certificate is valid 2 years, names the site as its only DNS
//! subject alternative name (and common name), and is for TLS server and client use.
//! Private keys are written mode 0600.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::tls::TlsFiles;
use crate::{check_site_name, InvalidSiteName};

/// The CA certificate's common name.
pub const CA_NAME: &str = "dmrep site CA";

/// The CA certificate's file name in a PKI directory.
pub const CA_CERT: &str = "ca.crt";

/// The CA key's file name in a PKI directory.
pub const CA_KEY: &str = "ca.key";

/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3653);

/// How long a site certificate is valid.
pub const SITE_VALIDITY: Duration = Duration::days(731);

/// Certificates start being valid this long before they are made, so that a peer whose
/// clock is a little behind accepts them at once.
const BACKDATE: Duration = Duration::hours(1);

/// The two files written: a certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why certificates could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The file is there already; it is never overwritten.
    #[error("{path} already exists: not overwriting it (move it away first if you really mean to replace it)")]
    Exists { path: PathBuf },
    /// The directory has no CA to sign with.
    #[error("{path} does not exist: create the CA first (pki init)")]
    NoCa { path: PathBuf },
    /// The site name cannot be used.
    #[error(transparent)]
    SiteName(#[from] InvalidSiteName),
    /// A file could not be read, written or created.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The CA files could not be used.
    #[error("{path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// Generating a key or a certificate failed.
    #[error("cannot make {what}: {reason}")]
    Generate { what: String, reason: String },
}

/// The files site `site` uses from PKI directory `dir` (as written by [`issue`]).
pub fn site_files(dir: &Path, site: &str) -> TlsFiles {
    TlsFiles { ca: dir.join(CA_CERT), cert: dir.join(format!("{site}.crt")), key: dir.join(format!("{site}.key")) }
}

/// Create a CA in `dir` (made if missing): `ca.crt` and `ca.key`. Refuses if either
/// exists.
pub fn init(dir: &Path) -> Result<PkiPaths, PkiError> {
    let paths = PkiPaths { cert: dir.join(CA_CERT), key: dir.join(CA_KEY) };
    refuse_existing(&paths)?;
    fs::create_dir_all(dir).map_err(|e| PkiError::Io { path: dir.to_path_buf(), source: e })?;
    let generate = |e: rcgen::Error| PkiError::Generate { what: "the CA".into(), reason: e.to_string() };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key).map_err(generate)?;
    write_pair(&paths, &cert.pem(), &key.serialize_pem())?;
    Ok(paths)
}

/// Issue site `site`'s certificate with the CA in `dir`: `<site>.crt` and `<site>.key`.
/// Refuses an invalid site name (see [`check_site_name`]) and existing files.
pub fn issue(dir: &Path, site: &str) -> Result<PkiPaths, PkiError> {
    let now = OffsetDateTime::now_utc();
    issue_valid(dir, site, now - BACKDATE, now + SITE_VALIDITY)
}

/// [`issue`] with the validity given (tests make expired certificates with it).
pub(crate) fn issue_valid(
    dir: &Path,
    site: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<PkiPaths, PkiError> {
    check_site_name(site)?;
    let files = site_files(dir, site);
    let paths = PkiPaths { cert: files.cert, key: files.key };
    let ca_key_path = dir.join(CA_KEY);
    let ca_pem = read_ca_file(&files.ca)?;
    let ca_key_pem = read_ca_file(&ca_key_path)?;
    refuse_existing(&paths)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| PkiError::BadCa { path: ca_key_path.clone(), reason: format!("not a usable private key: {e}") })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| PkiError::BadCa { path: files.ca.clone(), reason: format!("not a usable CA certificate: {e}") })?;

    let generate =
        |e: rcgen::Error| PkiError::Generate { what: format!("site {site}'s certificate"), reason: e.to_string() };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(vec![site.to_string()]).map_err(generate)?;
    params.distinguished_name.push(DnType::CommonName, site);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    write_pair(&paths, &cert.pem(), &key.serialize_pem())?;
    Ok(paths)
}

fn read_ca_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => PkiError::NoCa { path: path.to_path_buf() },
        _ => PkiError::Io { path: path.to_path_buf(), source: e },
    })
}

fn refuse_existing(paths: &PkiPaths) -> Result<(), PkiError> {
    for p in [&paths.cert, &paths.key] {
        if fs::symlink_metadata(p).is_ok() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    Ok(())
}

/// Write the key (0600) then the certificate (0644), each only if it does not exist;
/// on failure remove what this call wrote.
fn write_pair(paths: &PkiPaths, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    write_new(&paths.key, key_pem, 0o600)?;
    if let Err(e) = write_new(&paths.cert, cert_pem, 0o644) {
        let _ = fs::remove_file(&paths.key);
        return Err(e);
    }
    Ok(())
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => PkiError::Exists { path: path.to_path_buf() },
        _ => PkiError::Io { path: path.to_path_buf(), source: e },
    })?;
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        drop(f);
        let _ = fs::remove_file(path);
        return Err(PkiError::Io { path: path.to_path_buf(), source: e });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
