//! Mutual TLS between named sites.
//!
//! # Who may talk to whom
//!
//! Every site has the sites' CA certificate (`ca.crt`) and a certificate of its own,
//! issued by that CA, that names the site as its one DNS subject alternative name
//! (`paris.crt` says `DNS:paris`), with its private key. [`SiteTls::load`] reads the
//! three files and refuses a certificate that the CA did not issue, that has expired,
//! that is not for both TLS server and client use, or that names another site than the
//! daemon's.
//!
//! A link is TLS 1.3 with both ends authenticated:
//! - [`SiteTls::connect`] dials a site by address and the name it expects there: the
//!   server's certificate must chain to the CA and name that site (the site name is the
//!   TLS server name), so a link meant for `paris` never reaches `tokyo`.
//! - [`SiteTls::accept`] requires a client certificate chaining to the CA, and returns
//!   the site it names: the peer proves which site it is, the replication logic decides
//!   whether that site may connect.
//!
//! In TLS 1.3 a client finishes its handshake before the server has judged the client's
//! certificate, so a refused client would only learn it at its first read. The server
//! therefore sends one session ticket once it has accepted the client (tickets are only
//! issued, never used to resume: every link is a full handshake), and
//! [`SiteTls::connect`] returns only after that ticket has arrived: when `connect`
//! returns, both ends have accepted each other, and when the server refuses, `connect`
//! reports the server's reason.
//!
//! Refusals are errors in words, naming the file, peer or address concerned
//! ([`TlsError`]).
//!
//! # One connection, two threads
//!
//! A link is used full-duplex: one thread sends frames while another blocks reading the
//! peer's. A rustls connection cannot be shared between threads, so a [`TlsStream`] is
//! one I/O thread that owns the rustls connection and the (non-blocking) TCP socket,
//! and two handles ([`TlsStream::split`]) that talk to it through shared state under a
//! mutex:
//! - [`TlsWriter::send`] queues a buffer and wakes the I/O thread through an eventfd
//!   that the thread polls beside the socket. The queue is bounded
//!   ([`SEND_QUEUE_LIMIT`] bytes not yet written to the socket): `send` blocks while it
//!   is full, so a slow peer slows the sender instead of growing memory.
//!   [`TlsWriter::flush`] waits until everything queued is on the socket.
//! - [`TlsReader`] implements [`Read`]: it takes decrypted bytes that the I/O thread
//!   put aside, blocking until some arrive, the connection ends, or the read timeout
//!   ([`TlsReader::set_read_timeout`]) passes, which returns
//!   [`io::ErrorKind::TimedOut`] so a caller can tell a silent peer from a dead one.
//!   The I/O thread stops reading the socket while [`RECEIVE_BUFFER_LIMIT`] bytes wait
//!   for the reader (backpressure the other way).
//! - The I/O thread loops: move queued bytes into rustls when the socket has taken
//!   everything before them, `poll` the socket (readable when the reader has room,
//!   writable when rustls has bytes to send) and the eventfd, write what rustls has,
//!   read and decrypt what arrived.
//!
//! Closing: [`TlsWriter::shutdown`] or dropping the writer sends what is queued, then
//! TLS close_notify, then a TCP FIN; the peer's reader then sees end of file (`Ok(0)`).
//! The thread ends when the writing side is done and the peer has closed or the reader
//! is dropped; when both handles are dropped it gives what is still queued at most
//! [`LINGER`] to leave. A peer that vanishes without close_notify (killed, link cut,
//! reset) makes reads fail with an error naming the peer (`UnexpectedEof`,
//! `ConnectionReset`), and sends fail likewise once the socket refuses them; nothing
//! hangs, except a read without a timeout on a peer that stays silent but connected.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustix::event::{PollFd, PollFlags};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{StoresServerSessions, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    DistinguishedName, OtherError, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};

use crate::{check_site_name, InvalidSiteName};

/// Bytes that [`TlsWriter::send`] lets wait for the socket before it blocks.
pub const SEND_QUEUE_LIMIT: usize = 8 << 20;

/// Decrypted bytes waiting for the [`TlsReader`] beyond which the I/O thread stops
/// reading the socket until the reader catches up.
pub const RECEIVE_BUFFER_LIMIT: usize = 8 << 20;

/// How long a connection whose two handles are both dropped still tries to send what
/// was queued (then its close_notify) before the I/O thread gives up and closes.
pub const LINGER: Duration = Duration::from_secs(5);

/// Plaintext that rustls holds ahead of the socket: the I/O thread feeds it no more
/// while this much is waiting to be written.
const TLS_BUFFER: usize = 256 << 10;

/// The three files a site's TLS needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The sites' CA certificate (PEM): what every peer's certificate must chain to.
    pub ca: PathBuf,
    /// This site's certificate (PEM), issued by the CA, naming the site; it may be
    /// followed by intermediate CA certificates.
    pub cert: PathBuf,
    /// This site's private key (PEM).
    pub key: PathBuf,
}

/// Why a site's TLS could not be set up or a link could not be made, in words an
/// operator can act on. `who` is a file path (checks of our own certificate at load),
/// `server at <address>` (a link we dial) or `peer <address>` (a link we accept).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// A file holds no usable PEM of the kind needed.
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// The site name given (ours or the one expected of a peer) is not a site name.
    #[error(transparent)]
    SiteName(#[from] InvalidSiteName),
    /// The private key is not the one of the certificate.
    #[error("{key} is not the private key of {cert}")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    /// A certificate does not chain to our CA.
    #[error("{who}: certificate not issued by our CA ({ca})")]
    NotFromCa { who: String, ca: PathBuf },
    /// A certificate's validity ended.
    #[error("{who}: certificate expired on {not_after}")]
    Expired { who: String, not_after: String },
    /// A certificate's validity has not begun.
    #[error("{who}: certificate not valid before {not_before} (is a clock wrong?)")]
    NotYetValid { who: String, not_before: String },
    /// A certificate is not for TLS client and server use.
    #[error("{who}: not a site certificate: {detail}")]
    NotSiteCert { who: String, detail: String },
    /// Our own certificate names another site.
    #[error("{cert} is issued to {presented}, but this daemon is site '{site}'")]
    WrongOwnSite { cert: PathBuf, presented: String, site: String },
    /// The server we dialled is another site than the one we meant to reach.
    #[error("server at {addr} presented a certificate for {presented}, expected '{expected}'")]
    WrongServerSite { addr: String, presented: String, expected: String },
    /// A peer's certificate does not name exactly one site.
    #[error("{who}: a site certificate must name exactly one site (one DNS name); this one names {presented}")]
    NotOneSite { who: String, presented: String },
    /// A client connected without a certificate.
    #[error("peer {addr} presented no client certificate")]
    NoClientCert { addr: String },
    /// The peer refused us during the handshake (a TLS alert), for the reason given.
    #[error("{who} refused the connection: {reason}")]
    Refused { who: String, reason: String },
    /// The TLS handshake failed for another reason.
    #[error("TLS handshake with {who} failed: {reason}")]
    Handshake { who: String, reason: String },
    /// The address could not be resolved.
    #[error("cannot resolve {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    /// Connecting or the handshake took longer than allowed.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// A socket operation failed outside the handshake proper.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A site's TLS identity and policy: the CA it trusts, the certificate it presents, and
/// the rustls configurations for both ends of a link. Cheap to share (`Arc`s inside).
#[derive(Clone)]
pub struct SiteTls {
    site: String,
    files: TlsFiles,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl fmt::Debug for SiteTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteTls").field("site", &self.site).field("files", &self.files).finish_non_exhaustive()
    }
}

impl SiteTls {
    /// Load the CA, the certificate and the key of site `site_name`, and check that the
    /// certificate is issued by the CA, valid now, for TLS server and client use, names
    /// exactly `site_name`, and matches the key.
    pub fn load(files: &TlsFiles, site_name: &str) -> Result<SiteTls, TlsError> {
        check_site_name(site_name)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = read_certs(&files.ca)?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(|e| TlsError::Pem {
                path: files.ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(&files.cert)?;
        let key = read_key(&files.key)?;

        // Check our own certificate the way peers will: as a server for our name, as a
        // client, and naming only us.
        let ctx = Ctx { who: files.cert.display().to_string(), ca: files.ca.clone(), role: Role::Own };
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let inner_client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let name = ServerName::try_from(site_name.to_string()).expect("checked site name is a DNS name");
        let now = UnixTime::now();
        let own_names = site_names(&chain[0]);
        server_verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).map_err(|e| {
            if is_name_mismatch(&e) {
                TlsError::WrongOwnSite {
                    cert: files.cert.clone(),
                    presented: describe_names(&own_names),
                    site: site_name.to_string(),
                }
            } else {
                ctx.map(e)
            }
        })?;
        inner_client_verifier.verify_client_cert(&chain[0], &chain[1..], now).map_err(|e| ctx.map(e))?;
        if own_names != [site_name] {
            return Err(TlsError::WrongOwnSite {
                cert: files.cert.clone(),
                presented: describe_names(&own_names),
                site: site_name.to_string(),
            });
        }

        let key_error = |e: rustls::Error| match e {
            rustls::Error::InconsistentKeys(_) => {
                TlsError::KeyMismatch { key: files.key.clone(), cert: files.cert.clone() }
            }
            e => TlsError::Pem { path: files.key.clone(), reason: format!("unusable private key: {e}") },
        };
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(SiteClientVerifier(inner_client_verifier)))
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(key_error)?;
        server.session_storage = Arc::new(IssueOnlyTickets);
        server.send_tls13_tickets = 1;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            // `dangerous` is only the way in for a custom verifier: ours runs the whole
            // webpki check and changes nothing but how a wrong name is reported.
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SiteServerVerifier(server_verifier)))
            .with_client_auth_cert(chain, key)
            .map_err(key_error)?;
        client.resumption = Resumption::disabled();
        Ok(SiteTls {
            site: site_name.to_string(),
            files: files.clone(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// This site's name.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Connect to the site `expected_site` at `addr` (`host:port`): TCP connect, then a
    /// TLS handshake in which the server must present a certificate from our CA naming
    /// `expected_site`, and must accept ours. `timeout` bounds the whole of it.
    pub fn connect(&self, addr: &str, expected_site: &str, timeout: Duration) -> Result<TlsStream, TlsError> {
        check_site_name(expected_site)?;
        let deadline = Instant::now() + timeout;
        let tcp = connect_tcp(addr, deadline, timeout)?;
        let peer = tcp.peer_addr().map_err(|e| TlsError::Io { what: format!("connection to {addr}"), source: e })?;
        let name = ServerName::try_from(expected_site.to_string()).expect("checked site name is a DNS name");
        let conn = ClientConnection::new(self.client.clone(), name).map_err(|e| TlsError::Config(e.to_string()))?;
        let ctx = Ctx {
            who: format!("server at {addr}"),
            ca: self.files.ca.clone(),
            role: Role::Dialled { addr: addr.to_string(), expected: expected_site.to_string() },
        };
        let mut conn = Connection::Client(conn);
        let mut tcp = tcp;
        handshake(&mut conn, &mut tcp, deadline, timeout, &ctx)?;
        TlsStream::start(conn, tcp, peer, expected_site.to_string())
    }

    /// Run the server side of the handshake on an accepted TCP connection: the client
    /// must present a certificate from our CA naming exactly one site. Returns the
    /// stream and that site's name. `timeout` bounds the handshake.
    pub fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<(TlsStream, String), TlsError> {
        let deadline = Instant::now() + timeout;
        let peer = tcp.peer_addr().map_err(|e| TlsError::Io { what: "accepted connection".into(), source: e })?;
        let _ = tcp.set_nodelay(true);
        let conn = ServerConnection::new(self.server.clone()).map_err(|e| TlsError::Config(e.to_string()))?;
        let ctx = Ctx {
            who: format!("peer {peer}"),
            ca: self.files.ca.clone(),
            role: Role::Accepted { addr: peer.to_string() },
        };
        let mut conn = Connection::Server(conn);
        let mut tcp = tcp;
        handshake(&mut conn, &mut tcp, deadline, timeout, &ctx)?;
        // The verifier let only certificates naming exactly one site through.
        let names = conn.peer_certificates().and_then(|c| c.first()).map(site_names).unwrap_or_default();
        let [site] = <[String; 1]>::try_from(names)
            .map_err(|names| TlsError::NotOneSite { who: ctx.who.clone(), presented: describe_names(&names) })?;
        Ok((TlsStream::start(conn, tcp, peer, site.clone())?, site))
    }
}

/// What a handshake error is about: our own certificate at load, a server we dialled,
/// or a client that dialled us.
enum Role {
    Own,
    Dialled { addr: String, expected: String },
    Accepted { addr: String },
}

struct Ctx {
    who: String,
    ca: PathBuf,
    role: Role,
}

impl Ctx {
    /// Put a rustls error in words.
    fn map(&self, e: rustls::Error) -> TlsError {
        let who = self.who.clone();
        match e {
            rustls::Error::NoCertificatesPresented => match &self.role {
                Role::Accepted { addr } => TlsError::NoClientCert { addr: addr.clone() },
                _ => TlsError::Handshake { who, reason: "it presented no certificate".into() },
            },
            rustls::Error::InvalidCertificate(ce) => self.map_cert(ce),
            rustls::Error::AlertReceived(alert) => TlsError::Refused { who, reason: alert_words(alert) },
            e => TlsError::Handshake { who, reason: e.to_string() },
        }
    }

    #[allow(deprecated)] // rustls still returns the context-less variants in places
    fn map_cert(&self, ce: CertificateError) -> TlsError {
        let who = self.who.clone();
        match ce {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsError::NotFromCa { who, ca: self.ca.clone() }
            }
            CertificateError::Expired => TlsError::Expired { who, not_after: "an earlier date".into() },
            CertificateError::ExpiredContext { not_after, .. } => {
                TlsError::Expired { who, not_after: format_time(not_after) }
            }
            CertificateError::NotValidYet => TlsError::NotYetValid { who, not_before: "a later date".into() },
            CertificateError::NotValidYetContext { not_before, .. } => {
                TlsError::NotYetValid { who, not_before: format_time(not_before) }
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                let presented = match &ce {
                    CertificateError::NotValidForNameContext { presented, .. } => describe_names(presented),
                    _ => "another site".into(),
                };
                match &self.role {
                    Role::Dialled { addr, expected } => {
                        TlsError::WrongServerSite { addr: addr.clone(), presented, expected: expected.clone() }
                    }
                    _ => TlsError::NotOneSite { who, presented },
                }
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                TlsError::NotSiteCert {
                    who,
                    detail: "its extended key usage lacks TLS client or server authentication".into(),
                }
            }
            CertificateError::Other(OtherError(e)) if e.downcast_ref::<NotOneSite>().is_some() => {
                let names = &e.downcast_ref::<NotOneSite>().expect("checked").0;
                TlsError::NotOneSite { who, presented: describe_names(names) }
            }
            ce => TlsError::Handshake { who, reason: format!("certificate refused: {ce}") },
        }
    }
}

fn is_name_mismatch(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

/// What a peer's alert says about us.
fn alert_words(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::CertificateRequired => "it requires a client certificate, and we presented none".into(),
        AlertDescription::UnknownCA => {
            "it does not trust our certificate: not issued by its CA (do both sites use certificates from the same CA?)"
                .into()
        }
        // What rustls sends when a certificate's signature does not verify with the key of
        // the CA it names: another CA of the same name (every dmrep CA is "dmrep site CA").
        AlertDescription::DecryptError => "it does not trust our certificate: a signature did not verify (not issued by its CA? \
            do both sites use certificates from the same CA?)"
            .into(),
        AlertDescription::CertificateExpired => "it says our certificate has expired".into(),
        AlertDescription::BadCertificate => {
            "it rejected our certificate (bad certificate: for instance not the site it expected, or not exactly one site name)"
                .into()
        }
        AlertDescription::CertificateUnknown => {
            "it rejected our certificate (certificate unknown: does it name exactly one site?)".into()
        }
        AlertDescription::UnsupportedCertificate => {
            "it rejected our certificate (unsupported certificate: not for TLS client and server use?)".into()
        }
        AlertDescription::HandshakeFailure | AlertDescription::ProtocolVersion => {
            format!("no TLS parameters in common ({alert:?}; sites speak TLS 1.3)")
        }
        other => format!("TLS alert {other:?}"),
    }
}

/// `site 'tokyo'`, `sites 'a', 'b'`, or `no site (no DNS name)`.
fn describe_names(names: &[String]) -> String {
    match names {
        [] => "no site (no DNS name)".into(),
        [one] => format!("site '{one}'"),
        many => format!("sites {}", many.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")),
    }
}

/// The DNS names in a certificate's subject alternative names (empty if it cannot be
/// parsed).
fn site_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.valid_dns_names().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    }
}

fn format_time(t: UnixTime) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t.as_secs() as i64) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => format!("{} s after 1970", t.as_secs()),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, "certificate", e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_path_buf(), reason: "no certificate (PEM) in it".into() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, "private key", e))
}

fn pem_error(path: &Path, what: &str, e: pem::Error) -> TlsError {
    match e {
        pem::Error::Io(source) => TlsError::Read { path: path.to_path_buf(), source },
        pem::Error::NoItemsFound => {
            TlsError::Pem { path: path.to_path_buf(), reason: format!("no {what} (PEM) in it") }
        }
        e => TlsError::Pem { path: path.to_path_buf(), reason: format!("cannot read a {what} from it: {e}") },
    }
}

/// The client certificate check: the webpki one (chains to our CA, valid now, for TLS
/// client use), then exactly one site name.
#[derive(Debug)]
struct SiteClientVerifier(Arc<dyn ClientCertVerifier>);

/// A peer certificate that names no site or several (carried through rustls's error).
#[derive(Debug)]
struct NotOneSite(Vec<String>);

impl fmt::Display for NotOneSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate names {} instead of exactly one site", describe_names(&self.0))
    }
}

impl std::error::Error for NotOneSite {}

impl ClientCertVerifier for SiteClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        let names = site_names(end_entity);
        if names.len() != 1 || check_site_name(&names[0]).is_err() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NotOneSite(
                names,
            ))))));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The server certificate check: the webpki one, with the names a certificate for
/// another site presents given as plain site names.
#[derive(Debug)]
struct SiteServerVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for SiteServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).map_err(|e| {
            if is_name_mismatch(&e) {
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    expected: server_name.to_owned(),
                    presented: site_names(end_entity),
                })
            } else {
                e
            }
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Server session "storage" that lets rustls issue a TLS 1.3 ticket (the client's sign
/// that we accepted it: see the module doc) but never resumes a session.
#[derive(Debug)]
struct IssueOnlyTickets;

impl StoresServerSessions for IssueOnlyTickets {
    fn put(&self, _key: Vec<u8>, _value: Vec<u8>) -> bool {
        true
    }

    fn get(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn take(&self, _key: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn can_cache(&self) -> bool {
        false
    }
}

/// TCP connect to any address `addr` resolves to, by `deadline`.
fn connect_tcp(addr: &str, deadline: Instant, timeout: Duration) -> Result<TcpStream, TlsError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| TlsError::Resolve { addr: addr.to_string(), reason: e.to_string() })?
        .collect();
    let timed_out = || TlsError::Timeout { what: format!("connection to {addr}"), after: timeout };
    let mut last = None;
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => Err(timed_out()),
        Some(e) => Err(TlsError::Connect { addr: addr.to_string(), source: e }),
        None => Err(TlsError::Resolve { addr: addr.to_string(), reason: "no address".into() }),
    }
}

/// Drive the handshake on the blocking socket until it is complete (for a client: until
/// the server's ticket says it accepted us) and nothing is left to send, by `deadline`.
fn handshake(
    conn: &mut Connection,
    tcp: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
    ctx: &Ctx,
) -> Result<(), TlsError> {
    let timed_out = || TlsError::Timeout { what: format!("TLS handshake with {}", ctx.who), after: timeout };
    let io_failed = |e: io::Error| TlsError::Handshake { who: ctx.who.clone(), reason: e.to_string() };
    loop {
        let accepted = match &*conn {
            Connection::Client(c) => !c.is_handshaking() && c.tls13_tickets_received() > 0,
            Connection::Server(s) => !s.is_handshaking(),
        };
        if accepted && !conn.wants_write() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        if conn.wants_write() {
            tcp.set_write_timeout(Some(left)).map_err(io_failed)?;
            match conn.write_tls(tcp) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Err(timed_out()),
                Err(e) => return Err(io_failed(e)),
            }
            continue;
        }
        tcp.set_read_timeout(Some(left)).map_err(io_failed)?;
        match conn.read_tls(tcp) {
            Ok(0) => {
                // What arrived before the end may explain it (an alert).
                conn.process_new_packets().map_err(|e| ctx.map(e))?;
                return Err(TlsError::Handshake {
                    who: ctx.who.clone(),
                    reason: "the peer closed the connection during the handshake".into(),
                });
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Err(timed_out()),
            Err(e) => return Err(io_failed(e)),
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (rustls queued an alert), as far as it listens.
            let _ = tcp.set_write_timeout(Some(left.min(Duration::from_secs(1))));
            while conn.wants_write() {
                if conn.write_tls(tcp).is_err() {
                    break;
                }
            }
            return Err(ctx.map(e));
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

mod stream;
pub use stream::{TlsReader, TlsStream, TlsWriter};

#[cfg(test)]
mod tests;
