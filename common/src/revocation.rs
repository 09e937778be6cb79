//! Connections already up when their peer's certificate is revoked are cut.
//!
//! TLS checks certificates in the handshake only, so a revocation list
//! ([`crate::wire::TlsFiles::crl`]) on its own refuses a certificate at its
//! next connection, while a connection opened before keeps its session: an
//! operator's console, a control channel, a primary's replication stream
//! from a host whose key was copied, for as long as they stay up. Every TLS
//! connection a daemon serves or opens is therefore [`Watched`]: its peer's
//! certificate (issuer and serial) is registered for as long as the
//! connection lives, and when the servers load a new list
//! ([`crate::server_tls::ServerTls`], which looks at its files at least once
//! a second) every registered connection whose certificate it lists is shut
//! down (`shutdown(2)` of its socket: both ends see the connection end at
//! once, whatever was waiting on it). A host or operator cut off this way
//! reconnects, and is refused in the handshake like anyone else.
//!
//! Only revocation cuts: a certificate that expires while its connection is
//! up keeps it until it reconnects (a pair whose renewal came late should not
//! lose its replication at the second the old certificate ends).

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

/// The connections with a certificate at the other end, while they live.
static LIVE: Mutex<Vec<Weak<Peer>>> = Mutex::new(Vec::new());

/// Connections cut so far by this process
/// (`understudy_tls_connections_cut_total`).
pub(crate) static CUT: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The certificates a CA's revocation lists name: by issuer (the DER of its
/// name), the serial numbers it revoked.
#[derive(Debug, Default)]
pub struct Revoked {
    by_issuer: Vec<(Vec<u8>, HashSet<Vec<u8>>)>,
}

impl Revoked {
    /// What `crls` revoke; the error says why one cannot be read.
    pub fn from_crls(crls: &[CertificateRevocationListDer<'_>]) -> Result<Self, String> {
        let mut by_issuer = Vec::with_capacity(crls.len());
        for der in crls {
            let (_, crl) = CertificateRevocationList::from_der(der.as_ref())
                .map_err(|e| format!("not a certificate revocation list: {e}"))?;
            let serials = crl
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect();
            by_issuer.push((crl.issuer().as_raw().to_vec(), serials));
        }
        Ok(Self { by_issuer })
    }

    /// Whether the certificate of `issuer` (its name's DER) and `serial`
    /// (its raw bytes) is listed.
    fn lists(&self, issuer: &[u8], serial: &[u8]) -> bool {
        self.by_issuer
            .iter()
            .any(|(of, serials)| of == issuer && serials.contains(serial))
    }

    /// Whether the certificate `cert` (DER) is listed.
    pub fn revokes(&self, cert: &CertificateDer<'_>) -> bool {
        X509Certificate::from_der(cert.as_ref())
            .is_ok_and(|(_, c)| self.lists(c.issuer().as_raw(), c.raw_serial()))
    }

    /// No list at all (no CRL configured).
    fn is_empty(&self) -> bool {
        self.by_issuer.is_empty()
    }
}

/// One live connection's peer.
#[derive(Debug)]
struct Peer {
    /// The DER of its certificate's issuer name, and its raw serial.
    issuer: Vec<u8>,
    serial: Vec<u8>,
    /// Its subject, for the log.
    subject: String,
    /// Its address, for the log.
    addr: String,
    /// What the connection is ("a client of this host's servers", …).
    what: &'static str,
    /// A second descriptor of the connection's socket: shutting it down
    /// ends the connection however it is used, and, being its own, it is
    /// never another socket's (a descriptor number could be reused once the
    /// connection closes its own).
    socket: OwnedFd,
    cut: AtomicBool,
}

/// A TLS connection registered for cutting while it lives (see the
/// module's doc); reads and writes go straight through.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    _peer: Option<Arc<Peer>>,
}

impl<S> Watched<S> {
    /// The connection itself.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl Watched<tokio_rustls::server::TlsStream<TcpStream>> {
    /// A connection a server accepted (`what` names the server in the
    /// log), registered under its client's certificate.
    pub fn accepted(
        stream: tokio_rustls::server::TlsStream<TcpStream>,
        what: &'static str,
    ) -> Self {
        let (tcp, session) = stream.get_ref();
        let peer = register(tcp, session.peer_certificates(), what);
        Self {
            inner: stream,
            _peer: peer,
        }
    }
}

impl Watched<tokio_rustls::client::TlsStream<TcpStream>> {
    /// A connection this host opened (`what` names it in the log),
    /// registered under its server's certificate.
    pub fn opened(stream: tokio_rustls::client::TlsStream<TcpStream>, what: &'static str) -> Self {
        let (tcp, session) = stream.get_ref();
        let peer = register(tcp, session.peer_certificates(), what);
        Self {
            inner: stream,
            _peer: peer,
        }
    }
}

/// Registers the connection on `tcp` under the first of `certs` (its
/// peer's own), if there is one. One that does not parse, or a socket that
/// cannot be duplicated, is said in the log: the connection works, but is
/// not cut.
fn register(
    tcp: &TcpStream,
    certs: Option<&[CertificateDer<'static>]>,
    what: &'static str,
) -> Option<Arc<Peer>> {
    let der = certs?.first()?;
    let cert = match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => cert,
        Err(error) => {
            tracing::warn!(
                %error,
                connection = what,
                "cannot read the certificate a TLS connection was opened with: it is not cut \
                 if that certificate is revoked while it is up"
            );
            return None;
        }
    };
    let socket = match tcp.as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(error) => {
            tracing::warn!(
                %error,
                connection = what,
                "cannot keep a descriptor of a TLS connection: it is not cut if its peer's \
                 certificate is revoked while it is up"
            );
            return None;
        }
    };
    let peer = Arc::new(Peer {
        issuer: cert.issuer().as_raw().to_vec(),
        serial: cert.raw_serial().to_vec(),
        subject: cert.subject().to_string(),
        addr: tcp
            .peer_addr()
            .map_or_else(|_| "unknown".to_owned(), |a| a.to_string()),
        what,
        socket,
        cut: AtomicBool::new(false),
    });
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|p| p.strong_count() > 0);
    live.push(Arc::downgrade(&peer));
    Some(peer)
}

/// Cuts every live connection whose peer's certificate `revoked` lists;
/// returns how many it cut.
pub fn cut_revoked(revoked: &Revoked) -> usize {
    if revoked.is_empty() {
        return 0;
    }
    let peers: Vec<Arc<Peer>> = {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|p| p.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    };
    let mut cut = 0;
    for peer in peers {
        if !revoked.lists(&peer.issuer, &peer.serial) || peer.cut.swap(true, Ordering::AcqRel) {
            continue;
        }
        let result = socket2::SockRef::from(&peer.socket).shutdown(std::net::Shutdown::Both);
        match result {
            Ok(()) => {
                cut += 1;
                CUT.inc();
                tracing::warn!(
                    peer = %peer.addr,
                    certificate = %peer.subject,
                    connection = peer.what,
                    "connection cut: the certificate it was opened with is revoked"
                );
            }
            // The connection ended on its own meanwhile.
            Err(error) => tracing::debug!(peer = %peer.addr, %error, "cannot cut a connection"),
        }
    }
    cut
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Watched<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
