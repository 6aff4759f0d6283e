use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned};

use super::*;
use crate::pki;
use crate::testutil::{accept_loop, require, run_timeout, serve, wait_until, Accepted, TestPki, DEADLINE, HANDSHAKE};

// ---- helpers ----

/// The byte at offset `i` of the big transfer: not periodic at any power of two.
fn pattern(i: usize) -> u8 {
    (i ^ (i >> 11) ^ (i >> 23)).wrapping_mul(31) as u8
}

fn recv_timeout<T>(rx: &mpsc::Receiver<T>) -> T {
    rx.recv_timeout(DEADLINE).expect("no result before the deadline")
}

/// `SiteTls::connect` must fail; its error.
fn connect_err(client: &SiteTls, addr: &str, expected: &str) -> TlsError {
    match client.connect(addr, expected, HANDSHAKE) {
        Ok(_) => panic!("connect to {addr} as {expected} succeeded"),
        Err(e) => e,
    }
}

/// What the accept side got; must be an error.
fn accept_err(rx: &mpsc::Receiver<Accepted>) -> TlsError {
    match recv_timeout(rx) {
        Ok((_, site)) => panic!("accept succeeded for site {site}"),
        Err(e) => e,
    }
}

fn roots(ca: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(roots)
}

fn chain(cert: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A plain rustls client trusting `ca`, presenting `cert`/`key` or nothing.
fn raw_client(ca: &Path, cert_key: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca));
    Arc::new(match cert_key {
        None => b.with_no_client_auth(),
        Some((c, k)) => b.with_client_auth_cert(chain(c), PrivateKeyDer::from_pem_file(k).unwrap()).unwrap(),
    })
}

/// Connect a plain rustls client to `addr` as server `name`, finish its side of the
/// handshake and read: the server's verdict comes as an alert. Returns the error seen.
fn raw_client_error(cfg: Arc<ClientConfig>, addr: &str, name: &str) -> String {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let conn = ClientConnection::new(cfg, ServerName::try_from(name.to_string()).unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            return e.to_string();
        }
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => panic!("read {n} bytes, expected the server's refusal"),
        Err(e) => e.to_string(),
    }
}

/// A plain rustls server presenting `cert`/`key`, requiring clients from `ca`.
fn raw_server(ca: &Path, cert: &Path, key: &Path) -> Arc<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca), provider()).build().unwrap();
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain(cert), PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap(),
    )
}

/// Two sites of one PKI, `tokyo` accepting, and `paris` connected to it: (paris's
/// stream, tokyo's stream).
fn pair() -> (TestPki, TlsStream, TlsStream) {
    let pki = TestPki::new();
    let paris = pki.site("paris");
    let (addr, rx) = accept_loop(pki.site("tokyo"));
    let p = paris.connect(&addr, "tokyo", HANDSHAKE).unwrap();
    let (t, peer) = recv_timeout(&rx).unwrap();
    assert_eq!(peer, "paris");
    assert_eq!(t.peer_site(), "paris");
    assert_eq!(p.peer_site(), "tokyo");
    (pki, p, t)
}

// ---- a good pair ----

#[test]
fn pair_moves_64_mib_one_way_while_messages_flow_the_other() {
    const TOTAL: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    const MESSAGES: usize = 2000;
    let (_pki, p, t) = pair();
    let (pw, mut pr) = p.split();
    let (tw, mut tr) = t.split();
    let max_queued = Arc::new(AtomicUsize::new(0));

    // paris -> tokyo: 64 MiB in 1 MiB buffers, then close.
    let mq = max_queued.clone();
    let big_sender = std::thread::spawn(move || {
        for off in (0..TOTAL).step_by(CHUNK) {
            pw.send((off..off + CHUNK).map(pattern).collect()).unwrap();
            mq.fetch_max(pw.queued(), Ordering::Relaxed);
        }
        pw.flush().unwrap();
        pw.shutdown();
    });
    let big_receiver = std::thread::spawn(move || {
        let mut got = 0usize;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = tr.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(got + k), "byte {} differs", got + k);
            }
            got += n;
        }
        got
    });
    // tokyo -> paris at the same time: small numbered messages, then close.
    let small_sender = std::thread::spawn(move || {
        for i in 0..MESSAGES {
            tw.send(format!("message {i:06}\n").into_bytes()).unwrap();
        }
        tw.shutdown();
    });
    let small_receiver = std::thread::spawn(move || {
        let mut all = String::new();
        pr.read_to_string(&mut all).unwrap();
        all
    });

    let all = small_receiver.join().unwrap();
    let expected: String = (0..MESSAGES).map(|i| format!("message {i:06}\n")).collect();
    assert!(all == expected, "small messages differ: got {} bytes, expected {}", all.len(), expected.len());
    small_sender.join().unwrap();
    big_sender.join().unwrap();
    assert_eq!(big_receiver.join().unwrap(), TOTAL);
    assert!(max_queued.load(Ordering::Relaxed) <= SEND_QUEUE_LIMIT, "queue exceeded its bound");
}

#[test]
fn send_blocks_while_the_peer_does_not_read() {
    const TOTAL: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    let (_pki, p, t) = pair();
    let (pw, _pr) = p.split();
    let (_tw, mut tr) = t.split();
    let pw = Arc::new(pw);
    let sent = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let sender = {
        let (pw, sent, finished) = (pw.clone(), sent.clone(), finished.clone());
        std::thread::spawn(move || {
            for off in (0..TOTAL).step_by(CHUNK) {
                pw.send((off..off + CHUNK).map(pattern).collect()).unwrap();
                sent.fetch_add(CHUNK, Ordering::Relaxed);
            }
            finished.store(true, Ordering::Relaxed);
        })
    };
    // Nobody reads at tokyo: the queue fills and the sender blocks before it is done.
    assert!(wait_until(DEADLINE, || pw.queued() + CHUNK > SEND_QUEUE_LIMIT), "the send queue never filled");
    assert!(!finished.load(Ordering::Relaxed), "all 64 MiB were accepted without the peer reading");
    let held = sent.load(Ordering::Relaxed);
    assert!(held < 48 << 20, "{held} bytes accepted while the peer read nothing");
    // Reading resumes the flow, and everything arrives.
    let mut got = 0;
    let mut buf = vec![0u8; 256 << 10];
    while got < TOTAL {
        let n = tr.read(&mut buf).unwrap();
        assert!(n > 0);
        assert!(buf[..n].iter().enumerate().all(|(k, b)| *b == pattern(got + k)), "data differs near {got}");
        got += n;
    }
    sender.join().unwrap();
}

#[test]
fn read_timeout_fires_on_a_silent_peer() {
    let (_pki, p, _t) = pair();
    let (_pw, mut pr) = p.split();
    assert!(pr.set_read_timeout(Some(Duration::ZERO)).is_err());
    pr.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let start = Instant::now();
    let e = pr.read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(e.to_string().contains("site 'tokyo'"), "{e}");
}

#[test]
fn dropped_peer_gives_eof_then_sends_fail() {
    let (_pki, p, t) = pair();
    let (pw, mut pr) = p.split();
    let (tw, tr) = t.split();
    tw.send(b"last words".to_vec()).unwrap();
    drop(tw);
    drop(tr);
    let mut got = Vec::new();
    pr.set_read_timeout(Some(DEADLINE)).unwrap();
    pr.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    // tokyo's socket is closed: sends soon fail, with the peer named.
    let mut err = None;
    assert!(wait_until(DEADLINE, || match pw.send(vec![0u8; 4096]) {
        Ok(()) => false,
        Err(e) => {
            err = Some(e);
            true
        }
    }));
    let e = err.unwrap();
    assert!(e.to_string().contains("site 'tokyo'"), "{e}");
    assert!(pw.flush().is_err());
}

#[test]
fn peer_vanishing_without_close_notify_is_an_error_not_a_hang() {
    let pki = TestPki::new();
    let paris = pki.site("paris");
    pki::issue(pki.path(), "tokyo").unwrap();
    let files = pki::site_files(pki.path(), "tokyo");
    let cfg = raw_server(&files.ca, &files.cert, &files.key);
    // tokyo completes the handshake, then its socket closes with no close_notify.
    let (addr, rx) = serve(move |tcp| {
        let mut s = StreamOwned::new(ServerConnection::new(cfg.clone()).unwrap(), tcp);
        while s.conn.is_handshaking() || s.conn.wants_write() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
    });
    let p = paris.connect(&addr, "tokyo", HANDSHAKE).unwrap();
    recv_timeout(&rx);
    let (_pw, mut pr) = p.split();
    pr.set_read_timeout(Some(DEADLINE)).unwrap();
    let e = pr.read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
    assert!(e.to_string().contains("without TLS close_notify"), "{e}");
}

#[test]
fn writer_shutdown_is_eof_for_the_peer_and_the_other_way_still_works() {
    let (_pki, p, t) = pair();
    let (pw, mut pr) = p.split();
    let (tw, mut tr) = t.split();
    pw.send(b"bye".to_vec()).unwrap();
    pw.shutdown();
    assert!(pw.send(b"more".to_vec()).is_err());
    let mut got = Vec::new();
    tr.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    tw.send(b"still here".to_vec()).unwrap();
    drop(tw);
    let mut back = Vec::new();
    pr.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"still here");
}

// ---- refusals ----

#[test]
fn client_without_certificate_is_refused() {
    let pki = TestPki::new();
    let (addr, rx) = accept_loop(pki.site("tokyo"));
    let client_err = raw_client_error(raw_client(&pki.path().join("ca.crt"), None), &addr, "tokyo");
    let e = accept_err(&rx);
    assert!(matches!(e, TlsError::NoClientCert { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with("peer 127.0.0.1:") && msg.ends_with("presented no client certificate"), "{msg}");
    assert!(client_err.contains("CertificateRequired"), "{client_err}");
}

#[test]
fn client_certificate_from_another_ca_is_refused_by_the_server() {
    // A client of another CA that trusts ours (a plain rustls client: SiteTls would not
    // load a certificate that its CA file does not vouch for).
    let pki = TestPki::new();
    let other = TestPki::new();
    pki::issue(other.path(), "paris").unwrap();
    let files = pki::site_files(other.path(), "paris");
    let (addr, rx) = accept_loop(pki.site("tokyo"));
    let ca = pki.path().join("ca.crt");
    let client_err = raw_client_error(raw_client(&ca, Some((&files.cert, &files.key))), &addr, "tokyo");
    let e = accept_err(&rx);
    assert!(matches!(e, TlsError::NotFromCa { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with("peer 127.0.0.1:"), "{msg}");
    assert!(msg.ends_with(&format!(": certificate not issued by our CA ({})", ca.display())), "{msg}");
    // Both CAs are named "dmrep site CA": rustls finds the name, and the signature fails.
    assert!(client_err.contains("UnknownCA") || client_err.contains("DecryptError"), "{client_err}");
}

#[test]
fn connect_reports_the_servers_refusal() {
    // paris trusts both CAs but holds a certificate from the other one: it accepts
    // tokyo, tokyo refuses it, and connect (not a later read) says so.
    let pki = TestPki::new();
    let other = TestPki::new();
    pki::issue(other.path(), "paris").unwrap();
    let mut files = pki::site_files(other.path(), "paris");
    files.ca = other.path().join("both.crt");
    let bundle = [other.path().join("ca.crt"), pki.path().join("ca.crt")].map(|p| std::fs::read_to_string(p).unwrap());
    std::fs::write(&files.ca, bundle.concat()).unwrap();
    let paris = SiteTls::load(&files, "paris").unwrap();
    let (addr, rx) = accept_loop(pki.site("tokyo"));
    let e = connect_err(&paris, &addr, "tokyo");
    assert!(matches!(e, TlsError::Refused { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("server at {addr} refused the connection: it does not trust our certificate")),
        "{e}"
    );
    assert!(matches!(accept_err(&rx), TlsError::NotFromCa { .. }));
}

#[test]
fn certificate_from_another_ca_is_refused_both_ways() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let paris_other = other.site("paris");
    let (addr, rx) = accept_loop(pki.site("tokyo"));
    let e = connect_err(&paris_other, &addr, "tokyo");
    // paris checks tokyo's certificate first: not from paris's CA.
    assert!(matches!(e, TlsError::NotFromCa { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("server at {addr}: certificate not issued by our CA ({})", other.path().join("ca.crt").display())
    );
    // tokyo hears that paris refused it.
    let e = accept_err(&rx);
    assert!(matches!(e, TlsError::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("refused the connection: it does not trust our certificate"), "{e}");
}

#[test]
fn server_of_another_site_is_refused() {
    let pki = TestPki::new();
    let paris = pki.site("paris");
    let (addr, rx) = accept_loop(pki.site("tokyo"));
    let e = connect_err(&paris, &addr, "london");
    assert!(matches!(e, TlsError::WrongServerSite { .. }), "{e:?}");
    assert_eq!(e.to_string(), format!("server at {addr} presented a certificate for site 'tokyo', expected 'london'"));
    let e = accept_err(&rx);
    assert!(matches!(e, TlsError::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("it rejected our certificate (bad certificate"), "{e}");
}

#[test]
fn expired_certificates_are_refused() {
    let pki = TestPki::new();
    let now = time::OffsetDateTime::now_utc();
    let expired =
        pki::issue_valid(pki.path(), "paris", now - time::Duration::days(30), now - time::Duration::days(1)).unwrap();
    let files = pki::site_files(pki.path(), "paris");
    // Our own: load says so.
    let e = SiteTls::load(&files, "paris").unwrap_err();
    assert!(matches!(e, TlsError::Expired { .. }), "{e:?}");
    assert!(e.to_string().starts_with(&format!("{}: certificate expired on ", expired.cert.display())), "{e}");

    // A client's: the server refuses it.
    let (addr, rx) = accept_loop(pki.site("tokyo"));
    let client_err = raw_client_error(raw_client(&files.ca, Some((&files.cert, &files.key))), &addr, "tokyo");
    let e = accept_err(&rx);
    assert!(matches!(e, TlsError::Expired { .. }), "{e:?}");
    assert!(e.to_string().starts_with("peer 127.0.0.1:"), "{e}");
    assert!(e.to_string().contains(": certificate expired on "), "{e}");
    assert!(client_err.contains("CertificateExpired"), "{client_err}");

    // A server's: connect refuses it.
    let cfg = raw_server(&files.ca, &files.cert, &files.key);
    let (addr, _rx) = serve(move |tcp| {
        let mut s = StreamOwned::new(ServerConnection::new(cfg.clone()).unwrap(), tcp);
        let _ = s.conn.complete_io(&mut s.sock);
    });
    let e = connect_err(&pki.site("london"), &addr, "paris");
    assert!(matches!(e, TlsError::Expired { .. }), "{e:?}");
    assert!(e.to_string().starts_with(&format!("server at {addr}: certificate expired on ")), "{e}");
}

#[test]
fn certificate_naming_two_sites_is_refused() {
    let pki = TestPki::new();
    // Issue, with the CA, a certificate naming paris and tokyo.
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path().join("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.path().join("ca.crt")).unwrap(), ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["paris".to_string(), "tokyo".to_string()]).unwrap();
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (pki.path().join("two.crt"), pki.path().join("two.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let files = TlsFiles { ca: pki.path().join("ca.crt"), cert: cert_path.clone(), key: key_path.clone() };

    let e = SiteTls::load(&files, "paris").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{} is issued to sites 'paris', 'tokyo', but this daemon is site 'paris'", cert_path.display())
    );
    let (addr, rx) = accept_loop(pki.site("london"));
    raw_client_error(raw_client(&files.ca, Some((&cert_path, &key_path))), &addr, "london");
    let e = accept_err(&rx);
    assert!(matches!(e, TlsError::NotOneSite { .. }), "{e:?}");
    assert!(e.to_string().ends_with("this one names sites 'paris', 'tokyo'"), "{e}");
}

#[test]
fn load_explains_what_is_wrong() {
    let pki = TestPki::new();
    pki::issue(pki.path(), "tokyo").unwrap();
    pki::issue(pki.path(), "paris").unwrap();
    let tokyo = pki::site_files(pki.path(), "tokyo");
    // Another site's certificate.
    let e = SiteTls::load(&tokyo, "paris").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{} is issued to site 'tokyo', but this daemon is site 'paris'", tokyo.cert.display())
    );
    // Another site's key.
    let mut mixed = tokyo.clone();
    mixed.key = pki::site_files(pki.path(), "paris").key;
    let e = SiteTls::load(&mixed, "tokyo").unwrap_err();
    assert_eq!(e.to_string(), format!("{} is not the private key of {}", mixed.key.display(), mixed.cert.display()));
    // Another CA.
    let other = TestPki::new();
    let mut foreign = tokyo.clone();
    foreign.ca = other.path().join("ca.crt");
    let e = SiteTls::load(&foreign, "tokyo").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{}: certificate not issued by our CA ({})", tokyo.cert.display(), foreign.ca.display())
    );
    // Missing files, a key file that is a certificate, a bad site name.
    let mut missing = tokyo.clone();
    missing.cert = pki.path().join("nowhere.crt");
    let e = SiteTls::load(&missing, "tokyo").unwrap_err();
    assert!(e.to_string().starts_with(&format!("cannot read {}: ", missing.cert.display())), "{e}");
    let mut not_key = tokyo.clone();
    not_key.key = tokyo.cert.clone();
    let e = SiteTls::load(&not_key, "tokyo").unwrap_err();
    assert_eq!(e.to_string(), format!("{}: no private key (PEM) in it", tokyo.cert.display()));
    let e = SiteTls::load(&tokyo, "Tokyo").unwrap_err();
    assert!(matches!(e, TlsError::SiteName(_)), "{e:?}");
}

#[test]
fn connect_failures_name_the_address() {
    let pki = TestPki::new();
    let paris = pki.site("paris");
    // Nobody listening.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = l.local_addr().unwrap().to_string();
    drop(l);
    let e = connect_err(&paris, &closed, "tokyo");
    assert!(e.to_string().starts_with(&format!("cannot connect to {closed}: ")), "{e}");
    // A listener that never answers the handshake.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = l.local_addr().unwrap().to_string();
    let e = paris.connect(&silent, "tokyo", Duration::from_millis(300)).err().unwrap();
    assert_eq!(e.to_string(), format!("TLS handshake with server at {silent} timed out after 300ms"));
    drop(l);
    // A bad expected name.
    assert!(matches!(connect_err(&paris, &silent, "to kyo"), TlsError::SiteName(_)));
}

#[test]
fn accept_times_out_on_a_silent_client() {
    let pki = TestPki::new();
    let tokyo = pki.site("tokyo");
    let (addr, rx) = serve(move |tcp| tokyo.accept(tcp, Duration::from_millis(300)).map(|_| ()));
    let _silent = TcpStream::connect(&addr).unwrap();
    let e = recv_timeout(&rx).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("TLS handshake with peer 127.0.0.1:") && msg.ends_with("timed out after 300ms"), "{msg}");
}

// ---- openssl interoperability ----

#[test]
fn openssl_s_client_handshakes_with_a_certificate_and_is_refused_without() {
    require!("openssl");
    let pki = TestPki::new();
    let tokyo = pki.site("tokyo");
    pki::issue(pki.path(), "paris").unwrap();
    let paris = pki::site_files(pki.path(), "paris");
    // Each accepted link gets a greeting and is closed; the accept results come back.
    let (addr, rx) = serve(move |tcp| match tokyo.accept(tcp, HANDSHAKE) {
        Ok((stream, site)) => {
            let (w, _r) = stream.split();
            w.send(format!("hello {site}, this is tokyo\n").into_bytes()).unwrap();
            w.flush().unwrap();
            Ok(site)
        }
        Err(e) => Err(e),
    });
    let s_client = |with_cert: bool| {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &addr, "-CAfile"]).arg(&paris.ca).args([
            "-verify_return_error",
            "-verify_hostname",
            "tokyo",
            "-servername",
            "tokyo",
            "-ign_eof",
        ]);
        if with_cert {
            cmd.arg("-cert").arg(&paris.cert).arg("-key").arg(&paris.key);
        }
        run_timeout(&mut cmd, DEADLINE)
    };

    let out = s_client(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(recv_timeout(&rx).unwrap(), "paris", "s_client: {stdout}\n{stderr}");
    assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}\n{stderr}");
    assert!(stdout.contains("TLSv1.3"), "{stdout}");
    assert!(stdout.contains("hello paris, this is tokyo"), "{stdout}\n{stderr}");

    let out = s_client(false);
    let e = recv_timeout(&rx).unwrap_err();
    assert!(matches!(e, TlsError::NoClientCert { .. }), "{e:?}");
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("hello"), "{all}");
    assert!(all.contains("certificate required"), "{all}");
}
