//! gRPC conventions both roles follow: how "you were deposed" is said (the
//! higher generation travels in response metadata, so the loser can fence
//! itself without parsing messages) and the HTTP/2 tuning every channel uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Status;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const GENERATION_KEY: &str = "understudy-generation";

/// HTTP/2 flow-control windows: big enough for epoch streams (PERF-NOTES:
/// windows plus 1 MiB frames reach ~2.6 GB/s on loopback; size windows to at
/// least bandwidth × RTT on real links). A backup stops reading its stream
/// while it commits an epoch (the journal and the image: each page written
/// twice), so the stream window is what lets the primary send the next
/// epoch meanwhile instead of stalling: at 16 MiB it could not get a 40 MB
/// checkpoint ahead, and 64 MiB made checkpoints of 10 000 pages ~20 %
/// faster on loopback (`docs/ARCHITECTURE.md`). The cost is memory: a
/// backup may hold up to the connection window of received, unread data.
pub const STREAM_WINDOW: u32 = 64 << 20;
/// HTTP/2 connection window (all streams of one connection).
pub const CONNECTION_WINDOW: u32 = 128 << 20;
/// HTTP/2 frame size (the largest the protocol allows).
pub const MAX_FRAME: u32 = (1 << 20) - 1;
/// Connect timeout for peer channels.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An error with its sources, `a: b: c`, for messages that cross the wire.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// "The peer has a newer generation than you: stop."
pub fn deposed(generation: u64, message: impl Into<String>) -> Status {
    let mut status = Status::failed_precondition(message);
    if let Ok(value) = generation.to_string().parse() {
        status.metadata_mut().insert(GENERATION_KEY, value);
    }
    status
}

const HOLDS_VM_KEY: &str = "understudy-holds-vm";

/// "This backup holds a VM your boot would replace; an operator decides."
/// The primary waits (and says why) instead of giving up.
pub fn holds_vm(message: impl Into<String>) -> Status {
    let mut status = Status::failed_precondition(message);
    status.metadata_mut().insert(
        HOLDS_VM_KEY,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

/// Whether `status` is a [`holds_vm`] refusal.
pub fn is_holds_vm(status: &Status) -> bool {
    status.metadata().get(HOLDS_VM_KEY).is_some()
}

/// The generation a `deposed` status carries, if any.
pub fn deposed_generation(status: &Status) -> Option<u64> {
    status
        .metadata()
        .get(GENERATION_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deposed_carries_the_generation() {
        let s = deposed(7, "you were deposed");
        assert_eq!(deposed_generation(&s), Some(7));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(deposed_generation(&Status::internal("x")), None);
    }
}

/// This host's mutual-TLS material: the CA that signs both hosts' (and the
/// operator's) certificates, and this host's certificate and key (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA that signs both hosts' and the operators' certificates.
    pub ca: PathBuf,
    /// This host's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// TLS material that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the TLS {what} {path}")]
pub struct TlsError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        what,
        path: path.to_owned(),
        source,
    })
}

/// What a daemon's TLS files looked like (modified time, size and inode of
/// the CA, the certificate and the key; None for one it cannot see): a
/// change means they are to be loaded again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsStamp([Option<(std::time::SystemTime, u64, u64)>; 3]);

fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl TlsFiles {
    /// What the files look like now (three `stat`s).
    pub fn stamp(&self) -> TlsStamp {
        TlsStamp([stamp(&self.ca), stamp(&self.cert), stamp(&self.key)])
    }

    fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(
            read("certificate", &self.cert)?,
            read("key", &self.key)?,
        ))
    }

    fn ca_cert(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(read("CA certificate", &self.ca)?))
    }

    /// A client that presents this host's certificate and accepts only a
    /// server whose certificate the CA signed for `server_name` (a DNS name or
    /// an IP address in the certificate's subjectAltName).
    pub fn client(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(self.ca_cert()?)
            .identity(self.identity()?)
            .domain_name(server_name))
    }
}

/// `http://` or `https://` for a peer, by whether TLS is on.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// The connections a gRPC server accepts on `listener`, with Nagle's
/// algorithm off. (tonic's own `tcp_nodelay` applies only to listeners it
/// binds itself.) Small messages must leave at once: an ack held back by
/// Nagle until the peer's delayed ACK (~40 ms) delays the output it
/// releases by as much.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// A gRPC server's TLS (mutual, following its files: see
/// [`crate::server_tls`]) when `tls` is given; the error names a file that
/// does not load.
pub fn server_tls(
    tls: Option<&TlsFiles>,
) -> Result<Option<std::sync::Arc<crate::server_tls::ServerTls>>, String> {
    tls.map(crate::server_tls::ServerTls::grpc)
        .transpose()
        .map_err(|e| chain(&e))
}

/// Serves `router` on `listener` until `signal`: over TLS with `tls`
/// ([`server_tls`]), else in plaintext.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<crate::server_tls::ServerTls>>,
    signal: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), signal)
                .await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(crate::server_tls::incoming(listener, tls), signal)
                .await
        }
    }
}

/// A port that cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what})")]
pub struct ListenError {
    what: &'static str,
    addr: std::net::SocketAddr,
    #[source]
    source: std::io::Error,
}

impl ListenError {
    /// `what` (console, control, …) cannot listen on `addr`.
    pub fn new(what: &'static str, addr: std::net::SocketAddr, source: std::io::Error) -> Self {
        Self { what, addr, source }
    }
}

/// Binds a TCP listener for `what` (console, control, replication, metrics).
pub async fn listen(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { what, addr, source })
}

/// TLS material for a server (control, replication, the console) that
/// cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    /// A PEM file cannot be read.
    #[error("cannot read the TLS {what} {path}")]
    Read {
        /// Which file ("CA", "certificate", "key").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused what the file holds.
    #[error("the TLS {what} {path} is not usable")]
    Rustls {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The CA cannot verify client certificates.
    #[error("the CA in {path} is not usable")]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

pub(crate) mod server_tls_config {
    use std::path::Path;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::{ServerTlsError, TlsFiles};

    /// Every certificate in the PEM file `path` (`what` names it in errors).
    pub(crate) fn certs(
        what: &'static str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, ServerTlsError> {
        let read = |source| ServerTlsError::Read {
            what,
            path: path.to_owned(),
            source,
        };
        CertificateDer::pem_file_iter(path)
            .map_err(read)?
            .collect::<Result<_, _>>()
            .map_err(read)
    }

    fn key(path: &Path) -> Result<PrivateKeyDer<'static>, ServerTlsError> {
        PrivateKeyDer::from_pem_file(path).map_err(|source| ServerTlsError::Read {
            what: "key",
            path: path.to_owned(),
            source,
        })
    }

    fn roots(files: &TlsFiles) -> Result<rustls::RootCertStore, ServerTlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs("CA certificate", &files.ca)? {
            roots.add(cert).map_err(|source| ServerTlsError::Rustls {
                what: "CA certificate",
                path: files.ca.clone(),
                source,
            })?;
        }
        Ok(roots)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn rustls_err<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(rustls::Error) -> ServerTlsError + 'a {
        move |source| ServerTlsError::Rustls {
            what,
            path: path.to_owned(),
            source,
        }
    }

    impl TlsFiles {
        /// A TLS server's configuration: this host's certificate, and
        /// clients must present a certificate the CA signed (who they are
        /// is checked per call); `alpn`: the protocols offered.
        pub fn server_config(
            &self,
            alpn: Vec<Vec<u8>>,
        ) -> Result<rustls::ServerConfig, ServerTlsError> {
            let provider = provider();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(self)?),
                provider.clone(),
            )
            .build()
            .map_err(|source| ServerTlsError::Verifier {
                path: self.ca.clone(),
                source,
            })?;
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(rustls_err("protocol versions", &self.ca))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs("certificate", &self.cert)?, key(&self.key)?)
                .map_err(rustls_err("certificate", &self.cert))?;
            config.alpn_protocols = alpn;
            Ok(config)
        }

        /// A console client that presents this certificate and accepts only
        /// a server the CA signed (for the IP it dials).
        pub fn console_connector(&self) -> Result<tokio_rustls::TlsConnector, ServerTlsError> {
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(rustls_err("protocol versions", &self.ca))?
                .with_root_certificates(roots(self)?)
                .with_client_auth_cert(certs("certificate", &self.cert)?, key(&self.key)?)
                .map_err(rustls_err("certificate", &self.cert))?;
            Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
        }
    }
}
