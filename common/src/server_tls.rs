//! The TLS side of this host's servers (control, replication, the console),
//! following its files: each handshake uses what the certificate, key and CA
//! files hold now, so renewed certificates take effect at the next connection,
//! with no restart (a restart of the primary's daemon would stop its VM).
//! TLS checks certificates only in the handshake: connections already up
//! keep the session they have, except that a revocation list that loads cuts
//! those whose peer it revokes ([`crate::revocation`]).
//!
//! The files are looked at at each handshake, and at least once a second
//! while a server accepts connections ([`incoming`]), and loaded again when
//! one changed; a change that does not load keeps the last configuration
//! that did ([`crate::tls_follow`]).
//!
//! The gRPC servers take their connections through [`incoming`]: handshakes
//! run side by side, each within [`HANDSHAKE_TIMEOUT`], so a client that
//! connects and says nothing holds up no one else.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;

use crate::revocation::{Revoked, Watched};
use crate::tls_follow::Following;
use crate::wire::{ServerTlsError, TlsFiles};

/// How long a client may take over its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a server that accepts connections looks at its files even if
/// no one connects: a revocation cuts the connections it names within this.
pub const FILES_LOOKED_AT: Duration = Duration::from_secs(1);

/// What a server's files load into: its configuration, and what their
/// revocation list revokes.
type Loaded = (Arc<rustls::ServerConfig>, Arc<Revoked>);

/// A server's TLS configuration, loaded again from its files when they change.
pub struct ServerTls {
    /// ALPN protocols offered (`h2` for gRPC; none for the console).
    alpn: Vec<Vec<u8>>,
    /// What the files loaded last.
    current: Following<Loaded>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("alpn", &self.alpn)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// For a gRPC server (HTTP/2 by ALPN). Fails if the files do not load now.
    pub fn grpc(files: &TlsFiles) -> Result<Arc<Self>, ServerTlsError> {
        Self::new(files, vec![b"h2".to_vec()])
    }

    /// For the console (plain TLS). Fails if the files do not load now.
    pub fn console(files: &TlsFiles) -> Result<Arc<Self>, ServerTlsError> {
        Self::new(files, Vec::new())
    }

    fn new(files: &TlsFiles, alpn: Vec<Vec<u8>>) -> Result<Arc<Self>, ServerTlsError> {
        let current = Following::new(Some(files), "TLS files", || load(files, &alpn))?;
        Ok(Arc::new(Self { alpn, current }))
    }

    /// The configuration for the next handshake: what the files hold now, or
    /// the last that loaded if they do not load. Files that loaded again in
    /// this call cut the connections their revocation list names first.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        let ((config, revoked), loaded_now) =
            self.current.get_noting(|files| load(files, &self.alpn));
        if loaded_now {
            crate::revocation::cut_revoked(&revoked);
        }
        config
    }

    /// An acceptor for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config())
    }
}

fn load(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<Loaded, ServerTlsError> {
    let (config, revoked) = files.server_config_revoking(alpn.to_vec())?;
    Ok((Arc::new(config), Arc::new(revoked)))
}

/// A handshake's outcome, with whom.
type Handshake = (
    std::net::SocketAddr,
    Result<std::io::Result<TlsStream<TcpStream>>, tokio::time::error::Elapsed>,
);

/// The TLS connections a gRPC server accepts on `listener`: Nagle's
/// algorithm off (as [`crate::wire::incoming`]), each handshake on its own
/// task. A refused handshake is logged (`tls accept error`) and skipped.
/// Dropping the stream closes `listener` and drops the handshakes under
/// way (a role that ends gives its listener back).
///
/// The files are looked at every [`FILES_LOOKED_AT`] too, so that a new
/// revocation list cuts the connections it names (every TLS connection of
/// the process, whichever server or client it belongs to) with no one
/// connecting. Each connection is [`Watched`].
pub fn incoming(listener: TcpListener, tls: Arc<ServerTls>) -> Incoming {
    let mut look = tokio::time::interval(FILES_LOOKED_AT);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Incoming {
        listener,
        tls,
        handshakes: JoinSet::new(),
        look,
    }
}

/// See [`incoming`].
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    tls: Arc<ServerTls>,
    handshakes: JoinSet<Handshake>,
    look: tokio::time::Interval,
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Watched<TlsStream<TcpStream>>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        while self.look.poll_tick(cx).is_ready() {
            self.tls.config();
        }
        // Every connection waiting is taken into a handshake first.
        loop {
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, peer))) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    let acceptor = self.tls.acceptor();
                    self.handshakes.spawn(async move {
                        let done =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                        (peer, done)
                    });
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => break,
            }
        }
        loop {
            match self.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok((_, Ok(Ok(stream)))))) => {
                    return Poll::Ready(Some(Ok(Watched::accepted(
                        stream,
                        "a client of this host's gRPC servers",
                    ))));
                }
                Poll::Ready(Some(Ok((peer, Ok(Err(error)))))) => {
                    tracing::info!(%peer, %error, "tls accept error");
                }
                Poll::Ready(Some(Ok((peer, Err(_))))) => {
                    tracing::info!(
                        %peer,
                        "tls accept error: no handshake within {HANDSHAKE_TIMEOUT:?}"
                    );
                }
                // A handshake task that panicked: nothing to serve.
                Poll::Ready(Some(Err(_))) => {}
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}
