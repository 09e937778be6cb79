//! The primary's calls to the other host (channel setup with mutual TLS,
//! `Hello`, `Probe`, `Goodbye`, `Handover`), and the replication service a
//! host answers with while its primary role runs the VM.

use tonic::transport::{Channel, Endpoint};
use understudy_common::wire;
use understudy_proto::replication_client::ReplicationClient;
use understudy_proto::replication_server::Replication;
use understudy_proto::{
    Beat, EpochChunk, GoodbyeRequest, HandoverReply, HandoverRequest, HelloRequest,
    PROTOCOL_VERSION, ProbeRequest,
};

use crate::{PrimaryError, PrimaryOptions};

const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long telling the backup of a clean stop may take, connection included
/// (a backup that is gone or frozen must not hold the primary's exit up).
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a handover may take (the backup maps its image and restores).
const HANDOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The one place channels to the backup are built (mutual TLS unless the
/// configuration says insecure).
pub(crate) fn endpoint(opts: &PrimaryOptions) -> Result<Endpoint, PrimaryError> {
    let addr = opts.backup;
    let mut endpoint =
        Endpoint::from_shared(format!("{}://{addr}", wire::scheme(opts.tls.is_some())))
            .map_err(|e| PrimaryError::Replication(e.to_string()))?
            .connect_timeout(wire::CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW);
    if let Some(tls) = &opts.tls {
        let server_name = opts
            .backup_name
            .clone()
            .unwrap_or_else(|| addr.ip().to_string());
        let config = tls
            .client(&server_name)
            .map_err(|e| PrimaryError::Tls(wire::chain(&e)))?;
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| PrimaryError::Tls(wire::chain(&e)))?;
    }
    Ok(endpoint)
}

/// What the backup said to a Hello.
pub(crate) enum HelloOutcome {
    Accepted(ReplicationClient<Channel>),
    Deposed(u64),
    Refused(String),
    Unreachable(String),
}

pub(crate) async fn hello(opts: &PrimaryOptions, generation: u64, session: u64) -> HelloOutcome {
    let channel = match endpoint(opts) {
        Ok(e) => match e.connect().await {
            Ok(c) => c,
            Err(e) => return HelloOutcome::Unreachable(e.to_string()),
        },
        Err(e) => return HelloOutcome::Unreachable(e.to_string()),
    };
    let mut client = ReplicationClient::new(channel);
    let req = HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        vm_id: opts.vm_id.clone(),
        generation,
        ram_bytes: opts.ram_bytes as u64,
        session,
    };
    match client.hello(req).await {
        Ok(_) => HelloOutcome::Accepted(client),
        // Only the backup's deliberate answers refuse us for good (wrong VM,
        // RAM size or protocol); anything else, such as a TLS handshake the
        // backup broke off or a reset connection, is worth another try.
        Err(status) => match wire::deposed_generation(&status) {
            Some(g) if g > generation => HelloOutcome::Deposed(g),
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

pub(crate) async fn say_goodbye(opts: &PrimaryOptions, generation: u64, session: u64) {
    let attempt = async {
        let channel = endpoint(opts)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        ReplicationClient::new(channel)
            .goodbye(GoodbyeRequest {
                generation,
                session,
            })
            .await
            .map_err(|status| status.to_string())
    };
    match tokio::time::timeout(GOODBYE_TIMEOUT, attempt).await {
        Ok(Ok(_)) => tracing::info!("told the backup we stop on purpose"),
        Ok(Err(why)) => tracing::warn!(%why, "goodbye not delivered"),
        Err(_) => tracing::warn!(timeout = ?GOODBYE_TIMEOUT, "goodbye not delivered: no answer"),
    }
}

/// The replication service of a host whose primary role runs the VM: it
/// takes no replication and answers every primary that dials it that it was
/// deposed, with this generation (a probe learns who runs the VM).
pub(crate) struct RunsHere {
    pub(crate) generation: u64,
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
        _: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<understudy_proto::HelloReply>, tonic::Status> {
        self.deposed()
    }

    type ReplicateStream = Refused<understudy_proto::Ack>;

    async fn replicate(
        &self,
        _: tonic::Request<tonic::Streaming<EpochChunk>>,
    ) -> Result<tonic::Response<Self::ReplicateStream>, tonic::Status> {
        self.deposed()
    }

    type HeartbeatStream = Refused<Beat>;

    async fn heartbeat(
        &self,
        _: tonic::Request<tonic::Streaming<Beat>>,
    ) -> Result<tonic::Response<Self::HeartbeatStream>, tonic::Status> {
        self.deposed()
    }

    async fn goodbye(
        &self,
        _: tonic::Request<GoodbyeRequest>,
    ) -> Result<tonic::Response<understudy_proto::GoodbyeReply>, tonic::Status> {
        self.deposed()
    }

    async fn probe(
        &self,
        _: tonic::Request<ProbeRequest>,
    ) -> Result<tonic::Response<understudy_proto::ProbeReply>, tonic::Status> {
        Ok(tonic::Response::new(understudy_proto::ProbeReply {
            generation: self.generation,
            role: "primary".into(),
        }))
    }

    async fn handover(
        &self,
        _: tonic::Request<HandoverRequest>,
    ) -> Result<tonic::Response<HandoverReply>, tonic::Status> {
        self.deposed()
    }
}

/// What the backup said to a handover.
pub(crate) enum HandoverOutcome {
    Done(HandoverReply),
    /// It certainly did not promote (refused, or never reached).
    NotTaken(String),
    Deposed(u64),
    /// The request may have reached it.
    Unknown(String),
}

pub(crate) async fn handover(
    opts: &PrimaryOptions,
    generation: u64,
    session: u64,
    epoch: u64,
) -> HandoverOutcome {
    let connect = async {
        endpoint(opts)?
            .connect()
            .await
            .map_err(|e| PrimaryError::Replication(e.to_string()))
    };
    let channel = match tokio::time::timeout(wire::CONNECT_TIMEOUT, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return HandoverOutcome::NotTaken(format!("cannot reach the backup: {e}")),
        Err(_) => return HandoverOutcome::NotTaken("cannot reach the backup: timed out".into()),
    };
    let mut client = ReplicationClient::new(channel);
    let request = client.handover(HandoverRequest {
        generation,
        session,
        epoch,
    });
    match tokio::time::timeout(HANDOVER_TIMEOUT, request).await {
        Ok(Ok(reply)) => HandoverOutcome::Done(reply.into_inner()),
        Ok(Err(status)) => match wire::deposed_generation(&status) {
            Some(g) if g > generation => HandoverOutcome::Deposed(g),
            _ if status.code() == tonic::Code::FailedPrecondition => {
                HandoverOutcome::NotTaken(status.message().into())
            }
            _ => HandoverOutcome::Unknown(status.to_string()),
        },
        Err(_) => HandoverOutcome::Unknown(format!("no answer within {HANDOVER_TIMEOUT:?}")),
    }
}

pub(crate) async fn probe(opts: &PrimaryOptions, generation: u64) -> Result<(u64, String), String> {
    let attempt = async {
        let channel = endpoint(opts)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let reply = ReplicationClient::new(channel)
            .probe(ProbeRequest { generation })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        Ok((reply.generation, reply.role))
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .map_err(|_| "probe timed out".to_string())?
}
