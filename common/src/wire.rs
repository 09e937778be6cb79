//! gRPC conventions both roles follow: how "you were deposed" is said (the
//! higher generation travels in response metadata, so the loser can fence
//! itself without parsing messages) and the HTTP/2 tuning every channel uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpStream;

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
    /// Certificates the CA revoked (a PEM file of the CA's revocation
    /// list), or None: the servers refuse a client certificate it lists,
    /// and the clients a server's.
    pub crl: Option<PathBuf>,
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
/// the CA, the certificate, the key and the CRL; None for one it cannot see
/// or does not have): a change means they are to be loaded again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsStamp([Option<(std::time::SystemTime, u64, u64)>; 4]);

fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl TlsFiles {
    /// What the files look like now (a `stat` of each).
    pub fn stamp(&self) -> TlsStamp {
        TlsStamp([
            stamp(&self.ca),
            stamp(&self.cert),
            stamp(&self.key),
            self.crl.as_deref().and_then(stamp),
        ])
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

/// Connects tonic channels to another host over mutual TLS terminated here
/// with rustls, as the servers do, so that the certificate the server
/// presents is checked against the CRL too (tonic's own client TLS takes a
/// CA only). The endpoint's URI is `http://`: the TLS is this connector's.
/// tonic's `connect_timeout` bounds the connection and the handshake.
#[derive(Clone)]
pub struct TlsConnector {
    tls: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsFiles {
    /// A connector for a gRPC channel to a server whose certificate the CA
    /// signed for `server_name` (a DNS name or an IP address in its
    /// subjectAltName) and the CRL, if any, does not list; this host's
    /// certificate is presented. The files are read now.
    pub fn connector(&self, server_name: &str) -> Result<TlsConnector, ClientTlsError> {
        let name =
            rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|_| {
                ClientTlsError::ServerName {
                    name: server_name.to_owned(),
                }
            })?;
        let config = self.client_config(vec![b"h2".to_vec()])?;
        Ok(TlsConnector {
            tls: tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
            server_name: name,
        })
    }
}

/// A client's TLS that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// The files do not load.
    #[error(transparent)]
    Files(#[from] ServerTlsError),
    /// The server's name is neither a DNS name nor an IP address.
    #[error("{name:?} is not a server name a certificate can carry (a DNS name or an IP address)")]
    ServerName {
        /// The name.
        name: String,
    },
}

/// A connection a [`TlsConnector`] opened.
type Opened =
    hyper_util::rt::TokioIo<crate::revocation::Watched<tokio_rustls::client::TlsStream<TcpStream>>>;

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Opened>> + Send>>;

impl tonic::codegen::Service<http::Uri> for TlsConnector {
    type Response = Opened;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (tls, name) = (self.tls.clone(), self.server_name.clone());
        Box::pin(async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{uri} names no host"),
                    )
                })?;
            let tcp = TcpStream::connect(authority.as_str()).await?;
            // Small messages leave at once (see `incoming`).
            tcp.set_nodelay(true)?;
            let stream = tls.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(
                crate::revocation::Watched::opened(stream, "a connection to another host"),
            ))
        })
    }
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
    /// The CA cannot verify server certificates.
    #[error("the CA in {path} is not usable")]
    ServerVerifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    /// The CRL does not pass this host's own certificate: checked when the
    /// files load, so that a CRL the verifier cannot use refuses nothing
    /// (the last configuration that loaded stays).
    #[error(
        "the certificate revocation list {path} does not pass this host's own certificate {cert}: \
         a CRL of another CA, a damaged one, or one that revokes this host (issue it again \
         with the pair's CA: docs/OPERATIONS.md, \"Revoking a certificate\")"
    )]
    Crl {
        /// The CRL file.
        path: PathBuf,
        /// This host's certificate.
        cert: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The CRL cannot be read for the serial numbers it revokes.
    #[error("the certificate revocation list {path} cannot be read ({why})")]
    CrlUnreadable {
        /// The CRL file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

pub(crate) mod server_tls_config {
    use std::path::Path;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

    use super::{ServerTlsError, TlsFiles};
    use crate::revocation::Revoked;

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

    /// A CA's revocation lists.
    type Crls = Vec<CertificateRevocationListDer<'static>>;

    /// Every CRL in the PEM file `path` (at least one).
    fn crls(path: &Path) -> Result<Crls, ServerTlsError> {
        let read = |source| ServerTlsError::Read {
            what: "certificate revocation list",
            path: path.to_owned(),
            source,
        };
        let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(path)
            .map_err(read)?
            .collect::<Result<_, _>>()
            .map_err(read)?;
        if crls.is_empty() {
            return Err(read(rustls::pki_types::pem::Error::NoItemsFound));
        }
        Ok(crls)
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
            self.server_config_revoking(alpn).map(|(config, _)| config)
        }

        /// [`Self::server_config`], and what its revocation list revokes
        /// (read once for both), for cutting the connections already up
        /// ([`crate::revocation`]).
        pub(crate) fn server_config_revoking(
            &self,
            alpn: Vec<Vec<u8>>,
        ) -> Result<(rustls::ServerConfig, Revoked), ServerTlsError> {
            let provider = provider();
            let (roots, crls) = self.trust()?;
            let revoked = match (&self.crl, &crls) {
                (Some(path), Some(crls)) => {
                    Revoked::from_crls(crls).map_err(|why| ServerTlsError::CrlUnreadable {
                        path: path.clone(),
                        why,
                    })?
                }
                _ => Revoked::default(),
            };
            let (verifier, chain) = self.client_verifier(&provider, roots, crls)?;
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(rustls_err("protocol versions", &self.ca))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key(&self.key)?)
                .map_err(rustls_err("certificate", &self.cert))?;
            config.alpn_protocols = alpn;
            Ok((config, revoked))
        }

        /// What checks the certificates clients present (signed by the CA,
        /// not revoked by `crls`), and this host's own chain. With a CRL,
        /// this host's own certificate is put through the check first: a
        /// CRL of another CA (which covers none of the pair's certificates,
        /// so would refuse them all), a damaged one, or one that revokes
        /// this host does not load.
        fn client_verifier(
            &self,
            provider: &Arc<rustls::crypto::CryptoProvider>,
            roots: Arc<rustls::RootCertStore>,
            crls: Option<Crls>,
        ) -> Result<
            (
                Arc<dyn rustls::server::danger::ClientCertVerifier>,
                Vec<CertificateDer<'static>>,
            ),
            ServerTlsError,
        > {
            let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots,
                provider.clone(),
            );
            if let Some(crls) = crls {
                // The pair's CA signs every certificate directly: its CRL
                // covers them all, and a certificate it does not cover
                // (another issuer's CRL) is refused.
                builder = builder.with_crls(crls).only_check_end_entity_revocation();
            }
            let verifier = builder.build().map_err(|source| ServerTlsError::Verifier {
                path: self.ca.clone(),
                source,
            })?;
            let chain = certs("certificate", &self.cert)?;
            if let (Some(crl), Some((own, intermediates))) = (&self.crl, chain.split_first()) {
                verifier
                    .verify_client_cert(own, intermediates, rustls::pki_types::UnixTime::now())
                    .map_err(|source| ServerTlsError::Crl {
                        path: crl.clone(),
                        cert: self.cert.clone(),
                        source,
                    })?;
            }
            Ok((verifier, chain))
        }

        /// The CA's certificates, and its revocation list if there is one.
        fn trust(&self) -> Result<(Arc<rustls::RootCertStore>, Option<Crls>), ServerTlsError> {
            let crls = self.crl.as_deref().map(crls).transpose()?;
            Ok((Arc::new(roots(self)?), crls))
        }

        /// A TLS client's configuration: presents this host's certificate,
        /// and accepts only a server whose certificate the CA signed and
        /// the CRL (if any) does not list; `alpn`: the protocols asked for.
        pub fn client_config(
            &self,
            alpn: Vec<Vec<u8>>,
        ) -> Result<rustls::ClientConfig, ServerTlsError> {
            let provider = provider();
            let (roots, crls) = self.trust()?;
            // The list is checked against this host's certificate, as a
            // server checks it.
            let (_, chain) = self.client_verifier(&provider, roots.clone(), crls.clone())?;
            let mut builder = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                provider.clone(),
            );
            if let Some(crls) = crls {
                builder = builder.with_crls(crls).only_check_end_entity_revocation();
            }
            let verifier = builder
                .build()
                .map_err(|source| ServerTlsError::ServerVerifier {
                    path: self.ca.clone(),
                    source,
                })?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(rustls_err("protocol versions", &self.ca))?
                .with_webpki_verifier(verifier)
                .with_client_auth_cert(chain, key(&self.key)?)
                .map_err(rustls_err("certificate", &self.cert))?;
            config.alpn_protocols = alpn;
            Ok(config)
        }

        /// A console client that presents this certificate and accepts only
        /// a server the CA signed (for the IP it dials) and the CRL does
        /// not list.
        pub fn console_connector(&self) -> Result<tokio_rustls::TlsConnector, ServerTlsError> {
            Ok(tokio_rustls::TlsConnector::from(Arc::new(
                self.client_config(Vec::new())?,
            )))
        }
    }
}
