//! When this host's TLS certificates stop being valid, told ahead.
//!
//! TLS checks certificates only in the handshake, so a pair that is connected
//! runs on past the day its certificate or CA expires, and nothing shows until
//! the next connection: after a network blip, a daemon restart or a
//! switchover, the hosts can no longer reach each other, the VM runs
//! unprotected (or holds its output), and a primary that dies then loses it.
//! A daemon reads the validity of the certificates it presents and trusts when
//! it starts and every hour after ([`read`]), exports each file's end of
//! validity as a metric, and reports what needs doing ([`warnings`]) in its
//! status and log: a certificate that expires within the warning window
//! (`tls.expiry_warning_days`), one that has expired, and one that is not
//! valid yet (a clock or a certificate that is wrong).
//!
//! A renewed file takes effect at the next handshake: the servers load their
//! files again when they change (`crate::tls_follow`), the clients read them
//! at each connection, and the witness's client is built again when its
//! files change (`crate::witness`). So what the files hold is what the daemon
//! presents, and the files are what is checked.

use std::path::{Path, PathBuf};
use std::time::Duration;

use x509_parser::prelude::{FromDer, X509Certificate};

/// One certificate of a PEM file, and when it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validity {
    /// What the file is for ("certificate", "CA certificate", …).
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The certificate's subject, to tell the certificates of a file apart.
    pub subject: String,
    /// Valid from (Unix seconds).
    pub not_before: i64,
    /// Valid until (Unix seconds).
    pub not_after: i64,
}

/// A certificate file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ValidityError {
    /// Not readable, or not PEM (as the servers read it).
    #[error(transparent)]
    Read(#[from] crate::wire::ServerTlsError),
    /// A PEM block that is not an X.509 certificate.
    #[error("the TLS {what} {path} holds a certificate that does not parse: {why}")]
    Parse {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's word.
        why: String,
    },
    /// No certificate at all.
    #[error("the TLS {what} {path} holds no certificate")]
    Empty {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
}

/// Every certificate in the PEM file `path` (`what` names it in messages).
pub fn read_file(what: &'static str, path: &Path) -> Result<Vec<Validity>, ValidityError> {
    let ders = crate::wire::server_tls_config::certs(what, path)?;
    if ders.is_empty() {
        return Err(ValidityError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    ders.iter()
        .map(|der| {
            let (_, cert) = X509Certificate::from_der(der).map_err(|e| ValidityError::Parse {
                what,
                path: path.to_owned(),
                why: e.to_string(),
            })?;
            let validity = cert.validity();
            Ok(Validity {
                what,
                path: path.to_owned(),
                subject: cert.subject().to_string(),
                not_before: validity.not_before.timestamp(),
                not_after: validity.not_after.timestamp(),
            })
        })
        .collect()
}

/// Every certificate of `files`: `(what, path)` pairs.
pub fn read(files: &[(&'static str, &Path)]) -> Result<Vec<Validity>, ValidityError> {
    let mut all = Vec::new();
    for &(what, path) in files {
        all.extend(read_file(what, path)?);
    }
    Ok(all)
}

/// What needs doing about `certs` at `now` (Unix seconds), one sentence each:
/// expired, not valid yet, or expiring within `window`.
pub fn warnings(certs: &[Validity], now: i64, window: Duration) -> Vec<String> {
    certs
        .iter()
        .filter_map(|c| warning(c, now, window))
        .collect()
}

fn warning(c: &Validity, now: i64, window: Duration) -> Option<String> {
    let name = format!("the TLS {} {} ({})", c.what, c.path.display(), c.subject);
    let fix = "renew it (docs/OPERATIONS.md, \"Renewing certificates\")";
    if now >= c.not_after {
        Some(format!(
            "{name} expired {} ago, at {}: the pair cannot connect again with it (after a \
             network blip, a restart or a switchover); {fix}",
            span(now - c.not_after),
            utc(c.not_after)
        ))
    } else if now < c.not_before {
        Some(format!(
            "{name} is not valid before {} ({} from now by this host's clock): check the \
             clock, or the certificate",
            utc(c.not_before),
            span(c.not_before - now)
        ))
    } else if c.not_after - now <= window.as_secs() as i64 {
        Some(format!(
            "{name} expires in {}, at {}: {fix}",
            span(c.not_after - now),
            utc(c.not_after)
        ))
    } else {
        None
    }
}

/// A span of seconds, as a person reads it.
fn span(secs: i64) -> String {
    let secs = secs.max(0);
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "days"),
        s if s >= 2 * 3_600 => (s / 3_600, "hours"),
        s if s >= 2 * 60 => (s / 60, "minutes"),
        s => (s, "seconds"),
    };
    format!("{n} {unit}")
}

/// Unix seconds as a UTC date and time.
pub fn utc(secs: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_or_else(|_| format!("{secs} (Unix time)"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA valid 2026-12-03 07:35:50 to 2036-11-30 07:35:50 UTC (made with
    /// `openssl req -x509 -days 3650`).
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjzCCATWgAwIBAgIUJS2f2g1SRQ1NvJusuKRUuNDRL4UwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSdW5kZXJzdHVkeS10ZXN0LWNhMB4XDTI2MTIwMzA3MzU1MFoX
DTM2MTEzMDA3MzU1MFowHTEbMBkGA1UEAwwSdW5kZXJzdHVkeS10ZXN0LWNhMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGDdzybcyNjal9a2XCvaxWSBLH3gQHxIA
y5qSf1yG68PaVS8V57feXsBkcTjpqGefR5iiZgSTuZbu709Ue3Ep/aNTMFEwHQYD
VR0OBBYEFIdWNI7Ii7DWbw1Wg0UHt89tMCgeMB8GA1UdIwQYMBaAFIdWNI7Ii7DW
bw1Wg0UHt89tMCgeMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIg
TKfhtJBU2Fr+0CfbyweUqZQlz6OdaxdlxEEVL1sWAIkCIQCU/rmxhXx472CStCWl
ElToeyAj66H9/12PMZ4o9uR6vg==
-----END CERTIFICATE-----
";
    /// A host certificate the CA signed, valid 2026-12-03 07:35:50 to
    /// 2027-01-02 07:35:50 UTC (30 days).
    const HOST: &str = "-----BEGIN CERTIFICATE-----
MIIBJTCBzQIUFrcXm9HVU0obJs0vUWkUze95UecwCgYIKoZIzj0EAwIwHTEbMBkG
A1UEAwwSdW5kZXJzdHVkeS10ZXN0LWNhMB4XDTI2MTIwMzA3MzU1MFoXDTI3MDEw
MjA3MzU1MFowDzENMAsGA1UEAwwEaG9zdDBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABESfAalfa2+Uekvjob+slgY7vSLmuMWCPl6zMXdevm5N5Z0bdP1CslD5ARII
HuQknT30FuVugkvaCYDvUyeB5Z8wCgYIKoZIzj0EAwIDRwAwRAIgAsqDfg3EMJ0R
iDdj/Q3ISEvAdk+iRj2ooAHh/4IhANwCIHSyYw9u2CG/9nNJxiLK2k5fh/A2szrD
smSi8mH1GWx0
-----END CERTIFICATE-----
";
    const FROM: i64 = 1_796_283_350;
    const HOST_UNTIL: i64 = 1_798_875_350;
    const CA_UNTIL: i64 = 2_111_643_350;
    const DAY: i64 = 86_400;

    fn files(dir: &Path) -> (PathBuf, PathBuf) {
        let (ca, host) = (dir.join("ca.pem"), dir.join("host.pem"));
        std::fs::write(&ca, CA).unwrap();
        std::fs::write(&host, HOST).unwrap();
        (ca, host)
    }

    fn window(days: u64) -> Duration {
        Duration::from_secs(days * DAY as u64)
    }

    #[test]
    fn a_pem_file_says_when_each_certificate_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, host) = files(dir.path());
        // A bundle: the file's certificates in order.
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, format!("{HOST}{CA}")).unwrap();
        let certs = read(&[("certificate", &host), ("CA certificate", &bundle)]).unwrap();
        let ends: Vec<(&str, i64, i64)> = certs
            .iter()
            .map(|c| (c.what, c.not_before, c.not_after))
            .collect();
        assert_eq!(
            ends,
            [
                ("certificate", FROM, HOST_UNTIL),
                ("CA certificate", FROM, HOST_UNTIL),
                ("CA certificate", FROM, CA_UNTIL),
            ]
        );
        assert_eq!(certs[0].subject, "CN=host");
        assert_eq!(certs[2].subject, "CN=understudy-test-ca");
        assert_eq!(
            read_file("CA certificate", &ca).unwrap()[0].not_after,
            CA_UNTIL
        );
    }

    #[test]
    fn files_that_hold_no_certificate_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = read_file("certificate", &empty).unwrap_err().to_string();
        assert!(
            e.contains("holds no certificate") && e.contains("empty.pem"),
            "{e}"
        );
        let missing = dir.path().join("missing.pem");
        let e = read_file("CA certificate", &missing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read the TLS CA certificate"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = read_file("certificate", &garbage).unwrap_err().to_string();
        assert!(e.contains("does not parse"), "{e}");
    }

    #[test]
    fn a_certificate_is_reported_within_the_window_expired_and_not_yet_valid() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, host) = files(dir.path());
        let certs = read(&[("certificate", &host), ("CA certificate", &ca)]).unwrap();
        // Twenty days before the host's certificate ends: nothing within 14
        // days, the host's certificate within 30.
        let now = HOST_UNTIL - 20 * DAY;
        assert!(warnings(&certs, now, window(14)).is_empty());
        let w = warnings(&certs, now, window(30));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("the TLS certificate ")
                && w[0].contains("(CN=host) expires in 20 days")
                && w[0].contains("renew it"),
            "{}",
            w[0]
        );
        // Three hours left.
        let w = warnings(&certs, HOST_UNTIL - 3 * 3_600, window(1));
        assert!(w[0].contains("expires in 3 hours"), "{w:?}");
        // Expired an hour ago.
        let w = warnings(&certs, HOST_UNTIL + 3_600, window(0));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("expired 60 minutes ago") && w[0].contains("cannot connect again"),
            "{}",
            w[0]
        );
        // A clock a day behind the certificates.
        let w = warnings(&certs, FROM - DAY, window(0));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().all(|w| w.contains("is not valid before")), "{w:?}");
        // Past the CA's end: both.
        assert_eq!(warnings(&certs, CA_UNTIL, window(0)).len(), 2);
    }
}
