use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use super::*;
use crate::testutil::{accept_loop, require, run_timeout, DEADLINE, HANDSHAKE};
use crate::tls::SiteTls;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_then_issue_gives_sites_that_load_and_connect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let ca = init(&dir).unwrap();
    assert_eq!(ca, PkiPaths { cert: dir.join("ca.crt"), key: dir.join("ca.key") });
    assert_eq!(mode(&ca.key), 0o600);
    let paris = issue(&dir, "paris").unwrap();
    assert_eq!(paris, PkiPaths { cert: dir.join("paris.crt"), key: dir.join("paris.key") });
    assert_eq!(mode(&paris.key), 0o600);
    issue(&dir, "tokyo").unwrap();

    // Validity and roles, as the certificates say.
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let days_left = |p: &Path| {
        let pem = fs::read(p).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .map(|san| san.value.general_names.iter().map(|n| n.to_string()).collect())
            .unwrap_or_default();
        let ca = cert.basic_constraints().unwrap().map(|b| (b.value.ca, b.value.path_len_constraint));
        assert!(cert.validity().not_before.timestamp() <= now);
        // Whole days left, rounded to the nearest: seconds pass between issuing and now.
        ((cert.validity().not_after.timestamp() - now + 43200) / 86400, names, ca)
    };
    assert_eq!(days_left(&ca.cert), (CA_VALIDITY.whole_days(), vec![], Some((true, Some(0)))));
    assert_eq!(
        days_left(&paris.cert),
        (SITE_VALIDITY.whole_days(), vec!["DNSName(paris)".to_string()], Some((false, None)))
    );

    let paris = SiteTls::load(&site_files(&dir, "paris"), "paris").unwrap();
    let tokyo = SiteTls::load(&site_files(&dir, "tokyo"), "tokyo").unwrap();
    assert_eq!(tokyo.site(), "tokyo");
    let (addr, rx) = accept_loop(tokyo);
    let p = paris.connect(&addr, "tokyo", HANDSHAKE).unwrap();
    let (t, peer) = rx.recv_timeout(DEADLINE).unwrap().unwrap();
    assert_eq!(peer, "paris");
    let (pw, _pr) = p.split();
    let (_tw, mut tr) = t.split();
    pw.send(b"ping".to_vec()).unwrap();
    drop(pw);
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut tr, &mut got).unwrap();
    assert_eq!(got, b"ping");
}

#[test]
fn nothing_is_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir).unwrap();
    let ca_before = fs::read(dir.join("ca.crt")).unwrap();
    let e = init(dir).unwrap_err();
    assert!(matches!(e, PkiError::Exists { .. }), "{e:?}");
    assert!(e.to_string().starts_with(&format!("{} already exists: not overwriting it", dir.join("ca.crt").display())));
    assert_eq!(fs::read(dir.join("ca.crt")).unwrap(), ca_before);

    // A lone ca.key left behind blocks init too.
    let tmp2 = tempfile::tempdir().unwrap();
    fs::write(tmp2.path().join("ca.key"), "x").unwrap();
    let e = init(tmp2.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{} already exists: not overwriting it (move it away first if you really mean to replace it)",
            tmp2.path().join("ca.key").display()
        )
    );

    issue(dir, "paris").unwrap();
    let key_before = fs::read(dir.join("paris.key")).unwrap();
    let e = issue(dir, "paris").unwrap_err();
    assert!(matches!(&e, PkiError::Exists { path } if path == &dir.join("paris.crt")), "{e:?}");
    assert_eq!(fs::read(dir.join("paris.key")).unwrap(), key_before);
}

#[test]
fn issue_needs_a_ca_and_a_valid_name() {
    let tmp = tempfile::tempdir().unwrap();
    let e = issue(tmp.path(), "paris").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("{} does not exist: create the CA first (pki init)", tmp.path().join("ca.crt").display())
    );
    init(tmp.path()).unwrap();
    for bad in ["", "Paris", "-paris", "paris-", "par_is", "paris.fr", "../etc", "123", &"a".repeat(64)] {
        let e = issue(tmp.path(), bad).unwrap_err();
        assert!(matches!(e, PkiError::SiteName(_)), "{bad}: {e:?}");
        assert!(e.to_string().starts_with(&format!("invalid site name '{bad}': ")), "{e}");
    }
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 2, "only ca.crt and ca.key");
    for good in ["a", "site-2", "2nd", &"a".repeat(63)] {
        issue(tmp.path(), good).unwrap();
    }
}

#[test]
fn openssl_verifies_the_certificates() {
    require!("openssl");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir).unwrap();
    issue(dir, "paris").unwrap();
    let (ca, cert) = (dir.join("ca.crt"), dir.join("paris.crt"));
    for purpose in [None, Some("sslserver"), Some("sslclient")] {
        let mut cmd = Command::new("openssl");
        cmd.arg("verify").arg("-CAfile").arg(&ca);
        if let Some(p) = purpose {
            cmd.args(["-purpose", p]);
        }
        let out = run_timeout(cmd.arg(&cert), DEADLINE);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.trim_end().ends_with(": OK"),
            "openssl verify {purpose:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Its fields, as openssl reads them.
    let out = run_timeout(Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&cert), DEADLINE);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DNS:paris"), "{text}");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CN=dmrep site CA") || text.contains("CN = dmrep site CA"), "{text}");
    // A certificate from another CA does not verify.
    let other = tempfile::tempdir().unwrap();
    init(other.path()).unwrap();
    let out = run_timeout(
        Command::new("openssl").arg("verify").arg("-CAfile").arg(other.path().join("ca.crt")).arg(&cert),
        DEADLINE,
    );
    assert!(!out.status.success());
}
