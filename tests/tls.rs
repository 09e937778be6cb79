//! Mutual TLS on the replication and control channels, with certificates made
//! by openssl: the pair works with certificates from its CA; a primary or a
//! backup whose certificate another CA signed is refused, and the refusal is
//! logged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Pair, make_ca, make_cert, make_cert_for, make_operator, openssl, wait_status};

fn tls_overrides(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "tls.insecure=false".into(),
        format!("tls.ca={:?}", ca.display().to_string()),
        format!("tls.cert={:?}", cert.display().to_string()),
        format!("tls.key={:?}", key.display().to_string()),
    ]
}

/// Restarts the pair's backup and starts its primary with the given TLS files.
fn start(pair: &mut Pair, backup_tls: Vec<String>, primary_tls: Vec<String>) {
    let mut plain = pair.backup.take().unwrap();
    plain.kill().unwrap();
    plain.wait().unwrap();
    let mut backup_args = backup_tls;
    backup_args.push(pair.backup_state());
    let b: Vec<&str> = backup_args.iter().map(String::as_str).collect();
    pair.backup = Some(pair.spawn("backup", &b));
    let p: Vec<&str> = primary_tls.iter().map(String::as_str).collect();
    pair.primary = Some(pair.spawn("primary", &p));
}

/// The pair's config with an operator's certificate instead of plaintext.
fn operator_config(pair: &Pair, ca: &Path, cert: &Path, key: &Path) -> PathBuf {
    let path = pair.dir.path().join("operator.toml");
    let text = std::fs::read_to_string(&pair.config).unwrap().replace(
        "[tls]\ninsecure = true",
        &format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A CA and the certificates of a pair's hosts (`primary`, `backup`, for
/// 127.0.0.1) and of an operator (`operator`), in a directory of their own
/// (`dir`, for more).
struct PairCerts {
    dir: tempfile::TempDir,
    ca: PathBuf,
    primary: (PathBuf, PathBuf),
    backup: (PathBuf, PathBuf),
    operator: (PathBuf, PathBuf),
}

impl PairCerts {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_ca(d, "ca");
        Self {
            ca: d.join("ca.pem"),
            primary: make_cert(d, "ca", "primary"),
            backup: make_cert(d, "ca", "backup"),
            operator: make_operator(d, "ca", "operator"),
            dir,
        }
    }

    /// Starts `pair` under mutual TLS (`backup_extra`: more overrides for
    /// the backup), waits until the VM is protected, and returns the pair's
    /// config as the operator's.
    fn start(&self, pair: &mut Pair, backup_extra: &[&str]) -> PathBuf {
        self.start_with(pair, &[], backup_extra)
    }

    /// As [`Self::start`], with more overrides for each host.
    fn start_with(
        &self,
        pair: &mut Pair,
        primary_extra: &[&str],
        backup_extra: &[&str],
    ) -> PathBuf {
        let mut backup = tls_overrides(&self.ca, &self.backup.0, &self.backup.1);
        backup.extend(backup_extra.iter().map(|o| o.to_string()));
        let mut primary = tls_overrides(&self.ca, &self.primary.0, &self.primary.1);
        primary.extend(primary_extra.iter().map(|o| o.to_string()));
        start(pair, backup, primary);
        wait_log(pair, "VM protected");
        operator_config(pair, &self.ca, &self.operator.0, &self.operator.1)
    }
}

/// `understudyctl status` of the daemon at `control`, as the operator of
/// `config`.
fn operator_status(control: std::net::SocketAddr, config: &Path) -> String {
    let out = ctl_status(control, config);
    common::assert_success(&out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `understudyctl status --control CONTROL --config CONFIG`, run.
fn ctl_status(control: std::net::SocketAddr, config: &Path) -> std::process::Output {
    Command::new(common::CTL)
        .args(["status", "--control", &control.to_string(), "--config"])
        .arg(config)
        .output()
        .unwrap()
}

/// Waits until `needle` has been logged `times` times.
fn wait_logged(pair: &Pair, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pair.logs().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged {times} times\n{}",
            pair.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_log(pair: &Pair, needle: &str) {
    wait_logged(pair, needle, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_the_right_ca_and_refuses_others() {
    let _serial = common::serial().await;
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    let (pc, pk) = make_cert(d, "ca", "primary");
    let (bc, bk) = make_cert(d, "ca", "backup");
    let (oc, ok) = make_operator(d, "ca", "operator");
    let (xc, xk) = make_cert(d, "other-ca", "intruder");
    let ca = d.join("ca.pem");

    // The right certificates: protected, and status over TLS works.
    let mut pair = Pair::new("counter", "");
    start(
        &mut pair,
        tls_overrides(&ca, &bc, &bk),
        tls_overrides(&ca, &pc, &pk),
    );
    wait_log(&pair, "VM protected");
    let operator_config = operator_config(&pair, &ca, &oc, &ok);
    let out = Command::new(common::CTL)
        .args([
            "status",
            "--control",
            &pair.addrs.primary_control.to_string(),
            "--config",
        ])
        .arg(&operator_config)
        .output()
        .unwrap();
    common::assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("protected       yes"));
    // Without a certificate, the control service refuses.
    assert!(common::status(pair.addrs.primary_control).await.is_none());
    assert!(
        !pair.logs().contains("tls.insecure = true"),
        "no plaintext warning with TLS on"
    );
    drop(pair);

    // A primary with a certificate from another CA: the backup refuses it.
    let mut pair = Pair::new("counter", "");
    start(
        &mut pair,
        tls_overrides(&ca, &bc, &bk),
        tls_overrides(&ca, &xc, &xk),
    );
    // Refused again and again: the primary keeps trying (a certificate can
    // be fixed while it waits) and never gets past the handshake.
    wait_logged(&pair, "tls accept error", 3);
    let logs = pair.logs();
    assert!(logs.contains("waiting for the backup"), "{logs}");
    assert!(
        pair.primary.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the primary still waits\n{logs}"
    );
    assert!(
        !logs.contains("VM booted"),
        "the primary never got past the handshake\n{logs}"
    );
    drop(pair);

    // A backup with a certificate from another CA: the primary refuses it.
    let mut pair = Pair::new("counter", "");
    start(
        &mut pair,
        tls_overrides(&ca, &xc, &xk),
        tls_overrides(&ca, &pc, &pk),
    );
    // Several refused attempts, not one: the primary keeps refusing.
    wait_logged(&pair, "waiting for the backup", 3);
    let logs = pair.logs();
    assert!(!logs.contains("VM booted"), "{logs}");
    assert!(
        logs.to_lowercase().contains("certificate") || logs.contains("tls accept error"),
        "{logs}"
    );

    // Plaintext is explicit and warned about.
    let pair = Pair::new("counter", "");
    wait_status(
        &pair,
        pair.addrs.backup_control,
        "backup up",
        Duration::from_secs(20),
        |_| true,
    )
    .await;
    assert!(
        pair.logs().contains("tls.insecure = true"),
        "{}",
        pair.logs()
    );
}

/// Certificates that end within the warning window (those made here last two
/// days) are named in each daemon's status and log, and every file's end of
/// validity is a metric; with a window shorter than what is left, nothing is
/// said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_end_soon_are_named_in_status_log_and_metrics() {
    let _serial = common::serial().await;
    let certs = PairCerts::new();
    let (ca, (pc, pk)) = (&certs.ca, &certs.primary);
    let (mut pair, metrics) = Pair::with_primary_metrics("counter", "");
    // The backup warns only once a certificate has expired.
    let operator_config = certs.start(&mut pair, &["tls.expiry_warning_days=0"]);
    let status = |control| operator_status(control, &operator_config);
    // The primary (default window, 30 days): its certificate and the CA.
    let primary = status(pair.addrs.primary_control);
    let warnings: Vec<&str> = primary
        .lines()
        .filter(|l| l.starts_with("WARNING"))
        .collect();
    assert_eq!(warnings.len(), 2, "{primary}");
    assert!(
        warnings.iter().any(|w| w.contains(&format!(
            "the TLS certificate {} (CN=primary) expires in",
            pc.display()
        ))),
        "{primary}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("the TLS CA certificate") && w.contains("(CN=ca) expires in")),
        "{primary}"
    );
    assert!(warnings.iter().all(|w| w.contains("renew it")), "{primary}");
    let logs = pair.logs();
    assert!(logs.contains("(CN=primary) expires in"), "{logs}");
    // The backup (window 0): nothing to say.
    let backup = status(pair.addrs.backup_control);
    assert!(!backup.contains("WARNING"), "{backup}");
    assert!(!logs.contains("(CN=backup) expires in"), "{logs}");

    // `understudyd check` says the same of the files, with their dates.
    let mut check = Command::new(common::DAEMON);
    check.arg("check").arg("--config").arg(&pair.config);
    for o in tls_overrides(ca, pc, pk) {
        check.arg("--set").arg(o);
    }
    let out = check.output().unwrap();
    common::assert_success(&out);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "TLS certificate {} (CN=primary): valid until",
            pc.display()
        )) && said.contains("TLS CA certificate")
            && said.contains("warning: the TLS certificate")
            && said.contains("(CN=primary) expires in"),
        "{said}"
    );

    // Each file's end, in Unix time: within the two days the files were made for.
    let scraped = common::scrape(metrics);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    for file in ["certificate", "CA certificate"] {
        let line = scraped
            .lines()
            .find(|l| {
                l.starts_with("understudy_tls_not_after_seconds{")
                    && l.contains(&format!("file=\"{file}\""))
            })
            .unwrap_or_else(|| panic!("no end of validity for the {file}\n{scraped}"));
        let end: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            end > now + 86_400.0 && end <= now + 2.0 * 86_400.0 + 60.0,
            "{line} (now {now})"
        );
    }
}

/// The subject of the certificate the server at `addr` presents to a new
/// connection (`openssl s_client`, as the operator `cert`/`key`).
fn presented(addr: std::net::SocketAddr, ca: &Path, cert: &Path, key: &Path) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-CAfile"])
        .arg(ca)
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (Debian package openssl) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no server certificate in\n{text}"))
        .trim()
        .to_owned()
}

/// Certificates renewed in place are presented at the next connection, with
/// no restart (the pair stays up and protected), and a renewal that does not
/// load keeps the last good one and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_presented_without_a_restart() {
    let _serial = common::serial().await;
    let certs = PairCerts::new();
    let (rc, rk) = make_cert(certs.dir.path(), "ca", "backup-renewed");
    let (ca, (bc, bk), (oc, ok)) = (&certs.ca, &certs.backup, &certs.operator);
    let mut pair = Pair::new("counter", "");
    let operator_config = certs.start(&mut pair, &[]);
    let control = pair.addrs.backup_control;
    let presented = || presented(control, ca, oc, ok);
    let status = || operator_status(control, &operator_config);
    assert_eq!(presented(), "CN = backup");

    // Renewed as a tool would: a new file renamed over the old one.
    for (from, to) in [(&rk, bk), (&rc, bc)] {
        let tmp = to.with_extension("new");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
    assert_eq!(presented(), "CN = backup-renewed");
    wait_log(
        &pair,
        "TLS files changed: new connections use what they hold now",
    );
    assert!(status().contains("protected       yes"), "{}", status());

    // A renewal that does not load: the last good certificate stays.
    std::fs::write(
        bc,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert_eq!(presented(), "CN = backup-renewed");
    wait_log(&pair, "TLS files changed but do not load");
    assert!(status().contains("protected       yes"), "{}", status());
    assert!(
        pair.backup.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the backup runs on\n{}",
        pair.logs()
    );
}

/// `openssl ca`'s database for the CA `ca` in `dir` (what it revoked), and
/// its configuration file.
fn ca_database(dir: &Path, ca: &str) -> PathBuf {
    let db = dir.join(format!("{ca}-db"));
    std::fs::create_dir(&db).unwrap();
    std::fs::write(db.join("index.txt"), "").unwrap();
    std::fs::write(db.join("crlnumber"), "1000\n").unwrap();
    let cnf = db.join("ca.cnf");
    std::fs::write(
        &cnf,
        format!(
            "[ca]\ndefault_ca = this\n[this]\ndatabase = {db}/index.txt\n\
             crlnumber = {db}/crlnumber\ncertificate = {dir}/{ca}.pem\n\
             private_key = {dir}/{ca}.key\ndefault_md = sha256\ndefault_crl_days = 30\n",
            db = db.display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    cnf
}

/// The CA of `cnf` revokes `cert`.
fn revoke(dir: &Path, cnf: &Path, cert: &Path) {
    let (cnf, cert) = (cnf.display().to_string(), cert.display().to_string());
    openssl(dir, &["ca", "-config", &cnf, "-revoke", &cert]);
}

/// The CA of `cnf`'s revocation list as it stands, renamed over `to` (as a
/// tool would replace it).
fn publish_crl(dir: &Path, cnf: &Path, to: &Path) {
    let staged = to.with_extension("new");
    let (cnf, out) = (cnf.display().to_string(), staged.display().to_string());
    openssl(dir, &["ca", "-config", &cnf, "-gencrl", "-out", &out]);
    std::fs::rename(&staged, to).unwrap();
}

/// `understudyctl status` of the daemon at `control` as the operator of
/// `config`, refused: what it says.
fn refused_status(control: std::net::SocketAddr, config: &Path) -> String {
    let out = ctl_status(control, config);
    assert!(
        !out.status.success(),
        "status was answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tls.crl`: a certificate the CA revoked is refused at its next connection,
/// with no restart, while everyone else's work on and the pair stays
/// protected; a list the servers cannot use (another CA's) keeps the last
/// one that loaded instead of refusing everyone. Connections the revoked
/// certificate opened before (a control channel, the console) are cut.
/// Clients check the servers too: with the backup's certificate revoked (its
/// key stolen, say), an operator's tool will not talk to it, and its
/// primary cuts its replication to it, and is refused when it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_at_its_next_connection() {
    let _serial = common::serial().await;
    let certs = PairCerts::new();
    let d = certs.dir.path();
    let (departed_cert, departed_key) = make_operator(d, "ca", "departed");
    let cnf = ca_database(d, "ca");
    let crl = d.join("crl.pem");
    publish_crl(d, &cnf, &crl);
    let (mut pair, metrics) = Pair::with_primary_metrics("counter", "");
    let crl_override = format!("tls.crl={:?}", crl.display().to_string());
    let departed = operator_config(&pair, &certs.ca, &departed_cert, &departed_key);
    let departed = {
        let to = pair.dir.path().join("departed.toml");
        std::fs::rename(&departed, &to).unwrap();
        to
    };
    let with = [crl_override.as_str(), "tls.console=true"];
    let operator = certs.start_with(&mut pair, &with, &with);
    let control = pair.addrs.backup_control;
    assert!(operator_status(control, &departed).contains("protected       yes"));
    // Connections the departed operator opens before the revocation: a
    // control channel and the primary's console.
    let held = channel(control, &certs.ca, &departed_cert, &departed_key).await;
    let mut held = understudy_proto::control_client::ControlClient::new(held);
    held.status(understudy_proto::StatusRequest {})
        .await
        .unwrap();
    let mut console = console_over_tls(
        pair.addrs.primary_console,
        &certs.ca,
        &departed_cert,
        &departed_key,
    )
    .await;

    revoke(d, &cnf, &departed_cert);
    publish_crl(d, &cnf, &crl);
    let said = refused_status(control, &departed);
    assert!(said.contains("error"), "{said}");
    wait_log(
        &pair,
        "TLS files changed: new connections use what they hold now",
    );
    wait_log(&pair, "tls accept error");
    assert!(
        pair.logs().contains("invalid peer certificate: Revoked"),
        "the refusal names the revocation\n{}",
        pair.logs()
    );
    // Both connections it had are cut: the console ends, the channel's
    // next call finds its connection gone and is refused at the new one.
    wait_logged(
        &pair,
        "connection cut: the certificate it was opened with is revoked",
        2,
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::io::AsyncReadExt::read(&mut console, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the revoked operator's console still runs");
    let call = held.status(understudy_proto::StatusRequest {}).await;
    assert!(
        call.is_err(),
        "the revoked operator's channel still answers"
    );
    let status = operator_status(control, &operator);
    assert!(status.contains("protected       yes"), "{status}");

    // `understudyd check` puts the list through what the servers do.
    let check = || {
        let mut check = Command::new(common::DAEMON);
        check.arg("check").arg("--config").arg(&pair.config);
        for o in tls_overrides(&certs.ca, &certs.backup.0, &certs.backup.1) {
            check.arg("--set").arg(o);
        }
        let out = check.arg("--set").arg(&crl_override).output().unwrap();
        common::assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let said = check();
    assert!(
        said.contains("loads, and passes this host's certificate"),
        "{said}"
    );

    // Another CA's list (it covers none of this pair's certificates, so
    // it would refuse them all): not loaded, the last one stays.
    make_ca(d, "other-ca");
    let other = ca_database(d, "other-ca");
    publish_crl(d, &other, &crl);
    refused_status(control, &departed);
    wait_log(&pair, "TLS files changed but do not load");
    assert!(
        pair.logs()
            .contains("does not pass this host's own certificate"),
        "{}",
        pair.logs()
    );
    let said = check();
    assert!(
        said.contains("warning: the certificate revocation list")
            && said.contains("does not pass this host's own certificate"),
        "{said}"
    );
    // The status says the list is not in force (the log alone would let
    // a revocation look done).
    let status = operator_status(control, &operator);
    assert!(status.contains("protected       yes"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("WARNING") && l.contains("TLS files changed but do not load")),
        "{status}"
    );

    // The backup's certificate revoked: the backup itself keeps the list
    // it had (its own certificate does not pass the new one), an operator
    // whose tool has the list does not reach it.
    revoke(d, &cnf, &certs.backup.0);
    publish_crl(d, &cnf, &crl);
    let checking = pair.dir.path().join("checking.toml");
    let text = std::fs::read_to_string(&operator).unwrap().replace(
        "[tls]\n",
        &format!("[tls]\ncrl = {:?}\n", crl.display().to_string()),
    );
    std::fs::write(&checking, text).unwrap();
    let said = refused_status(control, &checking);
    assert!(said.contains("Revoked"), "{said}");
    // Its primary, with the list, cuts the replication it had with it (the
    // test does not connect to the primary meanwhile: it looks at its files
    // on its own), and refuses it when it reconnects.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pair.logs().lines().any(|l| {
        l.contains("connection cut: the certificate it was opened with is revoked")
            && l.contains("a connection to another host")
    }) {
        assert!(Instant::now() < deadline, "{}", pair.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    while !pair
        .logs()
        .lines()
        .any(|l| l.contains("backup not available yet") && l.contains("Revoked"))
    {
        assert!(Instant::now() < deadline, "{}", pair.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The primary cut two: the revoked operator's console, and its
    // replication to the backup.
    let scraped = common::scrape(metrics);
    assert!(
        scraped.contains("understudy_tls_connections_cut_total 2\n"),
        "{scraped}"
    );
    let status = operator_status(pair.addrs.primary_control, &checking);
    assert!(status.contains("role            primary"), "{status}");
    assert!(!status.contains("protected       yes"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_runs_over_mutual_tls_in_both_directions() {
    let _serial = common::serial().await;
    let certs = PairCerts::new();
    let mut pair = Pair::switchable("counter", "");
    let operator_config = certs.start(&mut pair, &[]);
    // There and back: the handover, the new primary's replication to the
    // old one and the operator's requests all run over mutual TLS.
    for _ in 0..2 {
        let text = common::switchover(&pair, &operator_config);
        assert!(text.contains("protected again"), "{text}");
    }
    assert!(!pair.logs().contains("tls accept error"), "{}", pair.logs());
}

/// What a revocation list revokes, by which the connections already up are
/// cut: its CA's certificates of the serials it lists, and no other CA's
/// certificate of the same serial.
#[test]
fn a_list_names_only_certificates_of_its_own_ca() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
    use understudy_common::revocation::Revoked;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    let (alice, _) = make_operator(d, "ca", "alice");
    // Bob: another CA's certificate with Alice's serial number.
    let serial = openssl(d, &["x509", "-in", "alice.pem", "-noout", "-serial"]);
    let serial = serial.trim().trim_start_matches("serial=");
    common::request_with_new_key(d, "bob", &["-out", "bob.csr"]);
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "bob.csr",
            "-CA",
            "other-ca.pem",
            "-CAkey",
            "other-ca.key",
            "-set_serial",
            &format!("0x{serial}"),
            "-out",
            "bob.pem",
            "-days",
            "2",
        ],
    );
    let bob = d.join("bob.pem");
    let cert = |p: &Path| CertificateDer::from_pem_file(p).unwrap();
    let crl = d.join("crl.pem");
    let list = || {
        let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(&crl)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        Revoked::from_crls(&crls).unwrap()
    };
    let other = ca_database(d, "other-ca");
    revoke(d, &other, &bob);
    publish_crl(d, &other, &crl);
    assert!(list().revokes(&cert(&bob)));
    assert!(
        !list().revokes(&cert(&alice)),
        "another CA's list names Alice"
    );
    let cnf = ca_database(d, "ca");
    publish_crl(d, &cnf, &crl);
    assert!(!list().revokes(&cert(&alice)));
    revoke(d, &cnf, &alice);
    publish_crl(d, &cnf, &crl);
    assert!(list().revokes(&cert(&alice)));
    assert!(!list().revokes(&cert(&bob)));
}

/// A console connection to `addr` over TLS presenting `cert`/`key`, once
/// the guest's output flows on it.
async fn console_over_tls(
    addr: std::net::SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let connector = understudy_common::wire::TlsFiles {
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
        crl: None,
    }
    .console_connector()
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(n > 0, "the console sent nothing");
    stream
}

/// A gRPC channel to `addr` presenting `cert`/`key` (server checked against `ca`).
async fn channel(
    addr: std::net::SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ))
        .domain_name("127.0.0.1");
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_may_call_only_what_it_is_for() {
    use understudy_proto::control_client::ControlClient;
    use understudy_proto::replication_client::ReplicationClient;
    let _serial = common::serial().await;
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    make_ca(d, "ca");
    let (pc, pk) = make_cert(d, "ca", "primary");
    let (bc, bk) = make_cert(d, "ca", "backup");
    let (oc, ok) = make_operator(d, "ca", "alice");
    // From the pair's CA, but naming neither host nor an operator.
    let (sc, sk) = make_cert_for(d, "ca", "stranger", "IP:10.9.9.9");
    let ca = d.join("ca.pem");
    let mut pair = Pair::new("counter", "");
    start(
        &mut pair,
        tls_overrides(&ca, &bc, &bk),
        tls_overrides(&ca, &pc, &pk),
    );
    wait_log(&pair, "VM protected");
    let denied = |r: Result<(), tonic::Status>, what: &str| match r {
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        other => panic!("{what}: {other:?}\n{}", pair.logs()),
    };
    // An operator reads and operates, but cannot act as the primary.
    let op = channel(pair.addrs.replication, &ca, &oc, &ok).await;
    let hello = fake_hello();
    denied(
        ReplicationClient::new(op)
            .hello(hello.clone())
            .await
            .map(|_| ()),
        "an operator's Hello",
    );
    let op = channel(pair.addrs.backup_control, &ca, &oc, &ok).await;
    ControlClient::new(op)
        .status(understudy_proto::StatusRequest {})
        .await
        .unwrap();
    // A stranger from the same CA gets nothing, not even a probe.
    let st = channel(pair.addrs.replication, &ca, &sc, &sk).await;
    denied(
        ReplicationClient::new(st)
            .probe(understudy_proto::ProbeRequest { generation: 1 })
            .await
            .map(|_| ()),
        "a stranger's probe",
    );
    let st = channel(pair.addrs.primary_control, &ca, &sc, &sk).await;
    denied(
        ControlClient::new(st.clone())
            .status(understudy_proto::StatusRequest {})
            .await
            .map(|_| ()),
        "a stranger's status",
    );
    denied(
        ControlClient::new(st)
            .crash(understudy_proto::CrashRequest {})
            .await
            .map(|_| ()),
        "a stranger's crash",
    );
    // A host reads figures but cannot order a switchover or a crash.
    let host = channel(pair.addrs.primary_control, &ca, &bc, &bk).await;
    ControlClient::new(host.clone())
        .status(understudy_proto::StatusRequest {})
        .await
        .unwrap();
    denied(
        ControlClient::new(host)
            .switchover(understudy_proto::SwitchoverRequest {})
            .await
            .map(|_| ()),
        "a host's switchover",
    );
    // Every refusal is logged with who asked; the pair never noticed.
    let logs = pair.logs();
    assert!(logs.contains("operator \"alice\""), "{logs}");
    assert!(logs.contains("10.9.9.9"), "{logs}");
    assert_eq!(
        logs.matches("request refused: not authorized").count(),
        5,
        "{logs}"
    );
    let s = common::status(pair.addrs.backup_control).await;
    assert!(s.is_none(), "plaintext status is refused under TLS");
    assert!(!logs.contains("promoting"), "{logs}");
}

/// A Hello as a primary would send it.
fn fake_hello() -> understudy_proto::HelloRequest {
    understudy_proto::HelloRequest {
        protocol_version: understudy_proto::PROTOCOL_VERSION,
        vm_id: "test-vm".into(),
        generation: 1 << 40,
        ram_bytes: 16 << 20,
        session: 1,
        incarnation: 7,
        previous: None,
        heartbeat_key: vec![0; 32].into(),
        mode: 0,
        migration: false,
        witness_key: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_over_tls_serves_operators_and_console_clients_only() {
    use understudy_common::console::ResumingClient;
    use understudy_common::wire::TlsFiles;
    let _serial = common::serial().await;
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    make_ca(d, "ca");
    let (pc, pk) = make_cert(d, "ca", "primary");
    let (bc, bk) = make_cert(d, "ca", "backup");
    let (cc, ck) = make_cert_for(d, "ca", "bob", "URI:urn:understudy:console:bob");
    let ca = d.join("ca.pem");
    let mut pair = Pair::new("counter", "guest_params = { interval_ms = 10 }");
    let with_console = |mut o: Vec<String>| {
        o.push("tls.console=true".into());
        o
    };
    start(
        &mut pair,
        with_console(tls_overrides(&ca, &bc, &bk)),
        with_console(tls_overrides(&ca, &pc, &pk)),
    );
    wait_log(&pair, "VM protected");
    let connector = |cert: &Path, key: &Path| {
        TlsFiles {
            ca: ca.clone(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            crl: None,
        }
        .console_connector()
        .unwrap()
    };
    // A console client reads the guest's output over TLS.
    let mut bob =
        ResumingClient::connect_now_with(pair.addrs.primary_console, Some(connector(&cc, &ck)))
            .await
            .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), bob.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("count"));
    // A host's certificate is not a console client's; plaintext gets nothing.
    let host = tokio::time::timeout(
        Duration::from_secs(5),
        ResumingClient::connect_now_with(pair.addrs.primary_console, Some(connector(&bc, &bk))),
    )
    .await
    .unwrap();
    assert!(host.is_err(), "a host certificate opened the console");
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        ResumingClient::connect_now(pair.addrs.primary_console),
    )
    .await
    .unwrap();
    assert!(plain.is_err(), "plaintext opened a TLS console");
    assert!(
        pair.logs().contains("console client refused"),
        "{}",
        pair.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_takes_a_migration_only_from_the_hosts_it_names() {
    // Under mutual TLS the destination's replication service admits only
    // the hosts `incoming_from` names; the source checks the destination's
    // certificate against the address it was given; migrate is an operator's
    // call.
    let _serial = common::serial().await;
    let certs = PairCerts::new();
    let (dc, dk) = make_cert(certs.dir.path(), "ca", "dest");
    let ca = &certs.ca;
    let mut pair = Pair::new("kv", "");
    let operator = certs.start(&mut pair, &[]);
    let tls = format!(
        "ca = {:?}\ncert = {:?}\nkey = {:?}",
        ca.display().to_string(),
        dc.display().to_string(),
        dk.display().to_string()
    );
    let migrate = |dest: &common::Destination, config: &Path| {
        Command::new(common::CTL)
            .args(["migrate", "--quiet", "--config"])
            .arg(config)
            .args(["--to", &dest.replication.to_string(), "--mode", "precopy"])
            .output()
            .unwrap()
    };
    // A destination that names another source refuses this one.
    let stranger =
        common::Destination::start_config("kv", 16, "incoming_from = [\"10.9.9.9\"]", &tls, "");
    let out = migrate(&stranger, &operator);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the VM runs on here"), "{err}");
    assert!(stranger.logs().contains("refused"), "{}", stranger.logs());
    drop(stranger);
    // Without an operator certificate, migrate is refused outright.
    let dest =
        common::Destination::start_config("kv", 16, "incoming_from = [\"127.0.0.1\"]", &tls, "");
    let out = migrate(&dest, &pair.config);
    assert!(!out.status.success());
    // The named source, asked by an operator: the VM moves.
    let out = migrate(&dest, &operator);
    common::assert_success(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the destination runs the VM"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let code = pair.wait_primary_exit(Duration::from_secs(10));
    assert!(code.success(), "{}", pair.logs());
}

/// The witness over mutual TLS: etcd requires client certificates from its
/// CA; a host with the right files swaps the key, one whose certificate
/// another CA signed is not let in (the witness is unreachable to it, so it
/// takes no role), and neither is one that expects another server name.
/// Renewed files are presented at the next request, with no restart; files
/// that do not load keep what loaded last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_witness_speaks_to_etcd_over_mutual_tls_only_and_follows_renewals() {
    use understudy_common::witness::{Claim, Swap, Witness, WitnessConfig, WitnessError};
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    make_ca(d, "etcd-ca");
    make_ca(d, "other-ca");
    let (server_cert, server_key) = make_cert(d, "etcd-ca", "etcd");
    let (client_cert, client_key) = make_cert(d, "etcd-ca", "host-a");
    let (stranger_cert, stranger_key) = make_cert(d, "other-ca", "stranger");
    let ca = d.join("etcd-ca.pem");
    let etcd = common::Etcd::start_tls(common::free_addr(), [ca.clone(), server_cert, server_key]);
    let stats = std::sync::Arc::new(understudy_common::status::Stats::new(
        "vm1",
        understudy_common::ids::Role::Primary,
        String::new(),
        1,
    ));
    let config = |cert: &Path, key: &Path, server_name: Option<&str>| WitnessConfig {
        endpoints: vec![format!("https://{}", etcd.client)],
        tls: Some(understudy_common::wire::TlsFiles {
            ca: ca.clone(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            crl: None,
        }),
        server_name: server_name.map(str::to_owned),
        prefix: "/understudy/".into(),
        timeout: Duration::from_secs(2),
        check_interval: Duration::from_secs(1),
    };
    let claim = Claim {
        generation: understudy_common::ids::Generation(1),
        owner: "a".into(),
        protected: false,
    };
    let handle = |config: WitnessConfig, me: &str| {
        Witness::new(&config, "vm1", me.into(), stats.clone()).unwrap()
    };
    let host = handle(config(&client_cert, &client_key, None), "a");
    let won = host.swap("boot", None, &claim).await.unwrap();
    assert!(matches!(won, Swap::Won(_)), "{won:?}");
    assert_eq!(
        etcd.get("/understudy/vm1"),
        "generation=1 owner=a state=unprotected"
    );
    let stranger = handle(config(&stranger_cert, &stranger_key, None), "s");
    for (what, witness) in [
        ("a certificate from another CA", stranger.clone()),
        (
            "another server name",
            handle(
                config(&client_cert, &client_key, Some("elsewhere.example")),
                "a",
            ),
        ),
    ] {
        let e = witness.read().await.unwrap_err();
        assert!(matches!(e, WitnessError::Unreachable(_)), "{what}: {e}");
    }

    // The stranger's files renewed with a certificate etcd's CA signed (each
    // renamed over, as a renewal should): the same handle presents it at its
    // next request, with no restart.
    let renew = |from: &Path, to: &Path| {
        let staged = to.with_extension("new");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    };
    renew(&client_cert, &stranger_cert);
    renew(&client_key, &stranger_key);
    let held = stranger.read().await.unwrap();
    assert_eq!(held.map(|h| h.claim), Some(claim.clone()));
    // A renewal gone wrong (not a certificate) keeps what loaded last.
    std::fs::write(d.join("garbage.new"), "not a certificate\n").unwrap();
    std::fs::rename(d.join("garbage.new"), &stranger_cert).unwrap();
    let held = stranger.read().await.unwrap();
    assert_eq!(held.map(|h| h.claim), Some(claim));
}
