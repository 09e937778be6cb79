//! The primary's calls to the other host (channel setup with mutual TLS,
//! `Hello`, `Probe`, `Goodbye`, `Handover`), and the replication service a
//! host answers with while its primary role runs the VM.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use understudy_checkpoint::epoch::{EncodeError, SenderState};
use understudy_common::wire;
use understudy_proto::replication_client::ReplicationClient;
use understudy_proto::replication_server::Replication;
use understudy_proto::{
    EpochChunk, GoodbyeRequest, HandoverReply, HandoverRequest, HelloRequest, PROTOCOL_VERSION,
    PreviousRun, ProbeRequest,
};

use understudy_common::heartbeat::SessionKey;
use understudy_common::ids::{Incarnation, Role, SessionId};

use crate::host_state::RunRecord;
use crate::{PrimaryError, PrimaryOptions};

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a Hello may take (the backup may resume a lost VM first).
const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long telling the backup of a clean stop may take, connection included
/// (a backup that is gone or frozen must not hold the primary's exit up).
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a handover may take (the backup maps its image and restores).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A call to the backup that did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The backup's address cannot make an endpoint.
    #[error("bad backup address")]
    Endpoint(#[source] tonic::transport::Error),
    /// The TLS files cannot be used.
    #[error("TLS setup failed")]
    Tls(#[source] wire::ClientTlsError),
    /// The connection failed.
    #[error("cannot reach the backup")]
    Connect(#[source] tonic::transport::Error),
    /// The backup answered with an error.
    #[error("the backup answered {}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The backup did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// A host this primary calls: its backup, or a migration's destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub addr: std::net::SocketAddr,
    /// The name its certificate carries (default: its IP address).
    pub name: Option<String>,
}

impl Target {
    /// The configured backup.
    pub(crate) fn backup(opts: &PrimaryOptions) -> Self {
        Self {
            addr: opts.backup,
            name: opts.backup_name.clone(),
        }
    }
}

/// A connected channel to the backup, within the connect timeout.
async fn connect(opts: &PrimaryOptions) -> Result<Channel, PeerError> {
    connect_to(opts, &Target::backup(opts)).await
}

/// The one place channels to other hosts are built: a connected channel to
/// `target` (mutual TLS unless the configuration says insecure: the files
/// read now, the host's certificate checked against the CA and the CRL),
/// within the connect timeout.
async fn connect_to(opts: &PrimaryOptions, target: &Target) -> Result<Channel, PeerError> {
    let addr = target.addr;
    // http://: the TLS, if any, is the connector's (`wire::TlsConnector`).
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(PeerError::Endpoint)?
        .connect_timeout(wire::CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(wire::STREAM_WINDOW)
        .initial_connection_window_size(wire::CONNECTION_WINDOW);
    let connecting = async {
        match &opts.tls {
            Some(tls) => {
                let server_name = target.name.clone().unwrap_or_else(|| addr.ip().to_string());
                let connector = tls.connector(&server_name).map_err(PeerError::Tls)?;
                endpoint.connect_with_connector(connector).await
            }
            None => endpoint.connect().await,
        }
        .map_err(PeerError::Connect)
    };
    match tokio::time::timeout(wire::CONNECT_TIMEOUT, connecting).await {
        Ok(result) => result,
        Err(_) => Err(PeerError::Timeout(wire::CONNECT_TIMEOUT)),
    }
}

/// What the backup said to a Hello.
pub(crate) enum HelloOutcome {
    Accepted(Accepted),
    Deposed(u64),
    /// The backup holds another VM this primary would boot over: an
    /// operator decides; the primary waits.
    HoldsVm(String),
    Refused(String),
    Unreachable(String),
}

/// A backup that took the Hello.
pub(crate) struct Accepted {
    /// The connection the Hello went on: the session's stream goes on it.
    pub channel: Channel,
    /// It takes Pages chunks checked by their page hashes (no body CRC).
    pub pages_by_hash: bool,
    /// A handover may wait there for its epoch's commit
    /// (`HandoverRequest.commit_wait_millis`).
    pub handover_awaits_commit: bool,
    /// It restores a migration's VM ahead of the handover when asked
    /// (`PrepareHandover`).
    pub prepares_handover: bool,
    /// Its image holds only zeros: the first sync leaves zero pages out.
    pub image_zeroed: bool,
    /// A replay handover may wait there for the log's tail
    /// (`HandoverRequest.log_exits`).
    pub handover_awaits_log: bool,
    /// The connection and the Hello's round trip: what a session costs
    /// before its first page (logged with the sync as `setup_ms`).
    pub took: std::time::Duration,
}

/// The encoder's state for a session's sync to a receiver that answered
/// `pages_by_hash` and `image_zeroed` (see [`Accepted`]): over a zeroed
/// image it sends only the pages with content.
pub(crate) fn sync_sender(
    opts: &PrimaryOptions,
    ram_pages: u32,
    generation: u64,
    pages_by_hash: bool,
    image_zeroed: bool,
) -> Result<SenderState, EncodeError> {
    let mut sender = if image_zeroed {
        SenderState::over_zeroed_image(&opts.vm_id, ram_pages, generation, opts.codec)
    } else {
        SenderState::new(&opts.vm_id, ram_pages, generation, opts.codec)
    }?;
    sender.set_pages_by_hash(pages_by_hash);
    Ok(sender)
}

/// One replication session's identity, as the primary opens it.
#[derive(Clone, Debug)]
pub(crate) struct SessionOffer {
    pub id: SessionId,
    pub generation: u64,
    pub incarnation: Incarnation,
    /// Only before the VM boots: what this host ran before.
    pub previous: Option<RunRecord>,
    pub key: SessionKey,
}

impl SessionOffer {
    /// A new session (random id and heartbeat key).
    pub(crate) fn new(
        generation: u64,
        incarnation: Incarnation,
        previous: Option<RunRecord>,
    ) -> Result<Self, PrimaryError> {
        let key = SessionKey::random().ok_or(PrimaryError::NoRandomness)?;
        Ok(Self {
            id: SessionId::random().ok_or(PrimaryError::NoRandomness)?,
            generation,
            incarnation,
            previous,
            key,
        })
    }
}

pub(crate) async fn hello(opts: &PrimaryOptions, offer: &SessionOffer) -> HelloOutcome {
    hello_to(opts, &Target::backup(opts), offer, false).await
}

/// A `Hello` to `target`; `migration`: a live migration's session.
pub(crate) async fn hello_to(
    opts: &PrimaryOptions,
    target: &Target,
    offer: &SessionOffer,
    migration: bool,
) -> HelloOutcome {
    let asked = std::time::Instant::now();
    let channel = match connect_to(opts, target).await {
        Ok(c) => c,
        Err(e) => return HelloOutcome::Unreachable(wire::chain(&e)),
    };
    let mut client = ReplicationClient::new(channel.clone());
    let generation = offer.generation;
    let req = HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        vm_id: opts.vm_id.clone(),
        generation,
        ram_bytes: opts.ram_bytes as u64,
        session: offer.id.raw(),
        incarnation: offer.incarnation.raw(),
        previous: offer.previous.map(|r| PreviousRun {
            incarnation: r.incarnation.raw(),
            state: r.state.to_proto(),
        }),
        heartbeat_key: bytes::Bytes::copy_from_slice(offer.key.as_bytes()),
        mode: match opts.mode {
            understudy_common::ids::ReplicationMode::Checkpoint => {
                understudy_proto::ReplicationMode::Checkpoint
            }
            understudy_common::ids::ReplicationMode::Replay => {
                understudy_proto::ReplicationMode::Replay
            }
        } as i32,
        migration,
        witness_key: opts.witness.as_ref().map(|w| w.key()).unwrap_or_default(),
    };
    match tokio::time::timeout(PEER_CALL_TIMEOUT, client.hello(req)).await {
        Err(_) => {
            HelloOutcome::Unreachable(format!("no answer to Hello within {PEER_CALL_TIMEOUT:?}"))
        }
        Ok(Ok(reply)) => {
            let reply = reply.into_inner();
            HelloOutcome::Accepted(Accepted {
                channel,
                pages_by_hash: reply.pages_by_hash,
                handover_awaits_commit: reply.handover_awaits_commit,
                prepares_handover: reply.prepares_handover,
                image_zeroed: reply.image_zeroed,
                handover_awaits_log: reply.handover_awaits_log,
                took: asked.elapsed(),
            })
        }
        // Only the backup's deliberate answers refuse us for good (wrong VM,
        // RAM size or protocol); anything else, such as a TLS handshake the
        // backup broke off or a reset connection, is worth another try.
        Ok(Err(status)) => match wire::deposed_generation(&status) {
            Some(g) if g > generation => HelloOutcome::Deposed(g),
            // The other host runs the VM at an older generation: it is stale
            // and learns so from its own Hello to this host; try again.
            Some(g) => HelloOutcome::Unreachable(format!(
                "the other host runs the VM at the older generation {g}: waiting for it to be fenced"
            )),
            _ if wire::is_holds_vm(&status) => HelloOutcome::HoldsVm(status.message().into()),
            _ if matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
            ) =>
            {
                HelloOutcome::Refused(status.message().into())
            }
            _ => HelloOutcome::Unreachable(match std::error::Error::source(&status) {
                Some(source) => format!("{}: {}", status.message(), wire::chain(source)),
                None => status.message().into(),
            }),
        },
    }
}

/// Tells the backup not to promote for `session` (once epoch `after.0` has
/// committed there, waiting at most `after.1` for it); the epoch the
/// backup said it held when it stood down (0: a backup that does not say),
/// the generation that deposed the sender if the backup promoted, or that
/// it did not confirm.
pub(crate) async fn say_goodbye(
    opts: &PrimaryOptions,
    generation: u64,
    session: SessionId,
    channel: Option<Channel>,
    after: Option<(u64, Duration)>,
) -> Goodbye {
    let (after_epoch, wait) = after.unwrap_or_default();
    let attempt = async {
        let channel = match channel {
            Some(channel) => channel,
            None => connect(opts).await?,
        };
        ReplicationClient::new(channel)
            .goodbye(GoodbyeRequest {
                generation,
                session: session.raw(),
                after_epoch,
                commit_wait_millis: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            })
            .await
            .map_err(PeerError::Status)
    };
    let timeout = GOODBYE_TIMEOUT + wait;
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(reply)) => {
            let held = reply.into_inner().committed_epoch;
            tracing::info!(held, "told the backup we stop on purpose");
            Goodbye::Held(held)
        }
        Ok(Err(e)) => {
            let deposed_by = match &e {
                PeerError::Status(status) => {
                    wire::deposed_generation(status).filter(|&g| g > generation)
                }
                _ => None,
            };
            if let Some(g) = deposed_by {
                tracing::warn!(generation = g, "goodbye refused: the backup promoted");
                return Goodbye::Deposed(g);
            }
            tracing::warn!(error = %wire::chain(&e), "goodbye not delivered");
            Goodbye::Undelivered
        }
        Err(_) => {
            tracing::warn!(?timeout, "goodbye not delivered: no answer");
            Goodbye::Undelivered
        }
    }
}

/// How a goodbye ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Goodbye {
    /// The backup stands down, holding this committed epoch.
    Held(u64),
    /// The backup promoted: this generation deposed the sender.
    Deposed(u64),
    /// No answer, or a refusal for another reason: unknown.
    Undelivered,
}

/// The replication service of a host whose primary role runs the VM: it
/// takes no replication and answers every primary that dials it that it was
/// deposed, with this generation (a probe learns who runs the VM).
pub(crate) struct RunsHere {
    pub(crate) generation: u64,
    pub(crate) auth: understudy_common::auth::Authority,
}

impl RunsHere {
    fn deposed<T>(&self) -> Result<T, tonic::Status> {
        Err(wire::deposed(
            self.generation,
            format!(
                "deposed: the VM runs on this host as the primary at generation {}; this host is not a backup",
                self.generation
            ),
        ))
    }
}

type Refused<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Replication for RunsHere {
    async fn hello(
        &self,
        req: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<understudy_proto::HelloReply>, tonic::Status> {
        self.auth.check(
            &req,
            "Replication.Hello",
            understudy_common::auth::Access::PeerHost,
        )?;
        self.deposed()
    }

    type ReplicateStream = Refused<understudy_proto::Ack>;

    async fn replicate(
        &self,
        req: tonic::Request<tonic::Streaming<EpochChunk>>,
    ) -> Result<tonic::Response<Self::ReplicateStream>, tonic::Status> {
        self.auth.check(
            &req,
            "Replication.Replicate",
            understudy_common::auth::Access::PeerHost,
        )?;
        self.deposed()
    }

    async fn goodbye(
        &self,
        req: tonic::Request<GoodbyeRequest>,
    ) -> Result<tonic::Response<understudy_proto::GoodbyeReply>, tonic::Status> {
        self.auth.check(
            &req,
            "Replication.Goodbye",
            understudy_common::auth::Access::PeerHost,
        )?;
        self.deposed()
    }

    async fn probe(
        &self,
        req: tonic::Request<ProbeRequest>,
    ) -> Result<tonic::Response<understudy_proto::ProbeReply>, tonic::Status> {
        self.auth.check(
            &req,
            "Replication.Probe",
            understudy_common::auth::Access::PeerHost,
        )?;
        Ok(tonic::Response::new(understudy_proto::ProbeReply {
            generation: self.generation,
            role: Role::Primary.name().into(),
        }))
    }

    async fn handover(
        &self,
        req: tonic::Request<HandoverRequest>,
    ) -> Result<tonic::Response<HandoverReply>, tonic::Status> {
        self.auth.check(
            &req,
            "Replication.Handover",
            understudy_common::auth::Access::PeerHost,
        )?;
        self.deposed()
    }

    async fn prepare_handover(
        &self,
        req: tonic::Request<understudy_proto::PrepareHandoverRequest>,
    ) -> Result<tonic::Response<understudy_proto::PrepareHandoverReply>, tonic::Status> {
        self.auth.check(
            &req,
            "Replication.PrepareHandover",
            understudy_common::auth::Access::PeerHost,
        )?;
        self.deposed()
    }
}

/// What the backup said to a handover.
#[derive(Debug)]
pub(crate) enum HandoverOutcome {
    Done(HandoverReply),
    /// It certainly did not promote (refused, or never reached).
    NotTaken(String),
    Deposed(u64),
    /// The request may have reached it.
    Unknown(String),
}

/// A switchover's handover to the backup; `channel`: the session's own
/// connection while its stream lives (else a new one).
pub(crate) async fn handover(
    opts: &PrimaryOptions,
    generation: u64,
    session: SessionId,
    epoch: u64,
    channel: Option<Channel>,
) -> HandoverOutcome {
    handover_to(
        opts,
        &Target::backup(opts),
        generation,
        Some(session),
        epoch,
        HandoverKind::Plain {
            commit_wait: Duration::ZERO,
        },
        channel.map(ReplicationClient::new),
    )
    .await
}

/// What a post-copy handover carries (see `HandoverRequest`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PostcopyHandover<'a> {
    pub valid: &'a [u8],
    pub zero: &'a [u8],
    pub state: &'a [u8],
}

/// What a handover asks of the host taking the VM.
#[derive(Clone, Copy, Debug)]
pub(crate) enum HandoverKind<'a> {
    /// Run the checkpoint named by the epoch once committed: at once, or
    /// (a migration's final epoch sent together with the handover, only to
    /// a host that said `handover_awaits_commit`) within `commit_wait`.
    Plain { commit_wait: Duration },
    /// A post-copy migration: run now, fetching the pages it lacks.
    Postcopy(PostcopyHandover<'a>),
    /// A replay migration: run the replica that replayed the log from the
    /// committed checkpoint (the base) to its end: the log up to exit
    /// `log_exits`, waiting for it up to `wait` (only at a host that said
    /// `handover_awaits_log`; 0: the host holds it already).
    Replay { log_exits: u64, wait: Duration },
}

impl HandoverKind<'_> {
    /// How long the host taking the VM may wait for the epoch's commit.
    pub(crate) fn commit_wait(&self) -> Duration {
        match self {
            Self::Plain { commit_wait } => *commit_wait,
            Self::Replay { wait, .. } => *wait,
            Self::Postcopy(_) => Duration::ZERO,
        }
    }
}

/// [`handover`] to `target`, of `kind`. `client`: a connection to `target`
/// already open (else a new one). `session` None: the stream is gone, and
/// the request names no session, which the target refuses.
pub(crate) async fn handover_to(
    opts: &PrimaryOptions,
    target: &Target,
    generation: u64,
    session: Option<SessionId>,
    epoch: u64,
    kind: HandoverKind<'_>,
    client: Option<ReplicationClient<Channel>>,
) -> HandoverOutcome {
    let mut client = match client {
        Some(c) => c,
        None => match connect_to(opts, target).await {
            Ok(c) => ReplicationClient::new(c),
            Err(e) => return HandoverOutcome::NotTaken(wire::chain(&e)),
        },
    };
    let postcopy = match kind {
        HandoverKind::Postcopy(p) => Some(p),
        _ => None,
    };
    let commit_wait = kind.commit_wait();
    let request = client.handover(HandoverRequest {
        generation,
        session: session.map_or(0, SessionId::raw),
        epoch,
        postcopy: postcopy.is_some(),
        valid_pages: postcopy
            .map(|p| p.valid.to_vec())
            .unwrap_or_default()
            .into(),
        postcopy_state: postcopy
            .map(|p| p.state.to_vec())
            .unwrap_or_default()
            .into(),
        zero_pages: postcopy.map(|p| p.zero.to_vec()).unwrap_or_default().into(),
        replay: matches!(kind, HandoverKind::Replay { .. }),
        commit_wait_millis: u32::try_from(commit_wait.as_millis()).unwrap_or(u32::MAX),
        log_exits: match kind {
            HandoverKind::Replay { log_exits, .. } => log_exits,
            _ => 0,
        },
    });
    // The answer may wait for the commit, then for the promotion.
    let timeout = HANDOVER_TIMEOUT + commit_wait;
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(reply)) => HandoverOutcome::Done(reply.into_inner()),
        Ok(Err(status)) => match wire::deposed_generation(&status) {
            Some(g) if g > generation => HandoverOutcome::Deposed(g),
            _ if status.code() == tonic::Code::FailedPrecondition => {
                HandoverOutcome::NotTaken(status.message().into())
            }
            _ => HandoverOutcome::Unknown(status.to_string()),
        },
        Err(_) => HandoverOutcome::Unknown(format!("no answer within {timeout:?}")),
    }
}

/// Who answers at the backup's address: its generation and role (None: a
/// role this build does not know).
pub(crate) async fn probe(
    opts: &PrimaryOptions,
    generation: u64,
) -> Result<(u64, Option<Role>), PeerError> {
    let attempt = async {
        let reply = ReplicationClient::new(connect(opts).await?)
            .probe(ProbeRequest { generation })
            .await
            .map_err(PeerError::Status)?
            .into_inner();
        Ok((reply.generation, Role::from_name(&reply.role)))
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .map_err(|_| PeerError::Timeout(PROBE_TIMEOUT))?
}
