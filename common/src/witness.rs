//! The witness: one key per VM in an etcd cluster that says who may release
//! the VM's output, changed only by compare-and-swap transactions.
//!
//! Two hosts cannot tell a dead peer from a cut link. With a witness, every
//! change of who may release output is a transaction on the VM's key, which
//! holds a [`Claim`]: the generation, the host that runs the VM, and whether
//! a backup holds everything it released.
//!
//! ```text
//!   primary boots / takes over   ─▶ {g, P, unprotected}
//!   its backup acks a session    ─▶ {g, P, protected}
//!   P loses its backup, keep-running: swap {g, P, protected}
//!                                   ─▶ {g, P, unprotected}, then release
//!   B promotes (silence, restart, operator, handover): swap
//!                  {g, P, *}        ─▶ {g+1, B, unprotected}, then run
//! ```
//!
//! Each swap names the key's mod revision it read: of two hosts racing from
//! the same claim, etcd lets exactly one win. The loser fences itself. A host
//! that cannot reach etcd takes no new role: a backup does not promote, and
//! a primary without its backup holds output. etcd itself is the consensus:
//! nothing here votes or counts.
//!
//! The claim's generation is the fencing token. It moves only by promotion,
//! as the generation on the wire does, so a host deposed through the witness
//! and one deposed by its peer agree on why.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use understudy_proto::etcd::etcdserverpb::{
    Compare, RangeRequest, RequestOp, TxnRequest, compare, kv_client::KvClient, request_op,
    response_op,
};
use understudy_proto::etcd::etcdserverpb::{PutRequest, RangeResponse};

use crate::ids::Generation;
use crate::status::Stats;
use crate::tls_follow::Following;
use crate::wire::TlsFiles;

/// The `[witness]` section: where etcd is and how long to wait for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessConfig {
    /// etcd client URLs (`http://10.0.0.3:2379`; `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// Client certificate, key and CA for etcd (None: plaintext).
    pub tls: Option<TlsFiles>,
    /// The name etcd's certificate carries (default: each endpoint's host).
    pub server_name: Option<String>,
    /// Keys live under this prefix; the VM's key is `prefix + vm name`.
    pub prefix: String,
    /// One request's limit: past it the witness counts as unreachable.
    pub timeout: Duration,
    /// How often a host that runs the VM reads the key to learn whether it
    /// was deposed while it could not hear its peer.
    pub check_interval: Duration,
}

/// Who may release the VM's output, as the witness's key holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The fencing generation the owner runs the VM at.
    pub generation: Generation,
    /// The host that runs the VM (its control address, or its name).
    pub owner: String,
    /// A backup holds everything the owner released: it may promote.
    pub protected: bool,
}

impl Claim {
    /// The key's value: one line, readable with `etcdctl get`.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "generation={} owner={} state={}",
            self.generation,
            self.owner,
            if self.protected {
                "protected"
            } else {
                "unprotected"
            }
        )
        .into_bytes()
    }

    /// Parses [`Self::encode`]; None for anything else.
    pub fn decode(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let (mut generation, mut owner, mut protected) = (None, None, None);
        for field in text.split_whitespace() {
            match field.split_once('=')? {
                ("generation", v) => generation = Some(v.parse().ok()?),
                ("owner", v) if !v.is_empty() => owner = Some(v.to_owned()),
                ("state", "protected") => protected = Some(true),
                ("state", "unprotected") => protected = Some(false),
                _ => return None,
            }
        }
        Some(Self {
            generation: generation?,
            owner: owner?,
            protected: protected?,
        })
    }
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.encode()))
    }
}

/// A claim as read, with the key's mod revision (what a swap compares).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The claim.
    pub claim: Claim,
    /// The key's mod revision when it was read or written.
    pub revision: i64,
}

/// How a compare-and-swap ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Swap {
    /// The key now holds the new claim.
    Won(Held),
    /// Someone changed the key first: what it holds now (None: no key).
    Lost(Option<Held>),
}

/// The witness could not answer, or answered something understudy never
/// writes. Either way nobody may take a new role on it.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// No configured endpoint is usable.
    #[error("witness endpoint {endpoint:?} is not a URL like http://10.0.0.3:2379")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS files for etcd cannot be read.
    #[error("cannot set up TLS for the witness")]
    Tls(#[source] crate::wire::TlsError),
    /// etcd did not answer in time, or refused.
    #[error("etcd did not answer: {0}")]
    Unreachable(String),
    /// The key holds something that is not a claim.
    #[error(
        "the witness key {key} holds {value:?}, which understudy never writes: \
         remove it (etcdctl del {key}) only once you know no host runs the VM"
    )]
    Garbled {
        /// The key.
        key: String,
        /// What it holds.
        value: String,
    },
}

/// A host's handle on the VM's key.
#[derive(Clone, Debug)]
pub struct Witness {
    etcd: Arc<Etcd>,
    key: Vec<u8>,
    timeout: Duration,
    check_interval: Duration,
    me: String,
    stats: Arc<Stats>,
}

/// The client of etcd, built again when its TLS files change, as the servers
/// load theirs again ([`crate::tls_follow`]): a renewed client certificate
/// is presented at the next request, with no restart.
#[derive(Debug)]
struct Etcd {
    config: WitnessConfig,
    /// The client, as the TLS files (if any) last built it.
    current: Following<KvClient<Channel>>,
}

impl Etcd {
    fn new(config: &WitnessConfig) -> Result<Self, WitnessError> {
        Ok(Self {
            current: Following::new(config.tls.as_ref(), "witness TLS files", || {
                Self::connect(config)
            })?,
            config: config.clone(),
        })
    }

    /// A client of the endpoints of `config` (connecting lazily: an etcd
    /// that is down now is only "unreachable" when asked).
    fn connect(config: &WitnessConfig) -> Result<KvClient<Channel>, WitnessError> {
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for url in &config.endpoints {
            let bad = |source| WitnessError::Endpoint {
                endpoint: url.clone(),
                source,
            };
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(bad)?
                .connect_timeout(config.timeout)
                .timeout(config.timeout)
                .tcp_nodelay(true);
            if let Some(tls) = &config.tls {
                let name = match &config.server_name {
                    Some(n) => n.clone(),
                    None => endpoint.uri().host().unwrap_or_default().to_owned(),
                };
                endpoint = endpoint
                    .tls_config(tls.client(&name).map_err(WitnessError::Tls)?)
                    .map_err(bad)?;
            }
            endpoints.push(endpoint);
        }
        let channel = match endpoints.as_slice() {
            [one] => one.connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        Ok(KvClient::new(channel))
    }

    /// The client for the next request: built again first if the TLS files
    /// changed since.
    fn kv(&self) -> KvClient<Channel> {
        self.current.get(|_| Self::connect(&self.config))
    }
}

impl Witness {
    /// A handle for `vm`'s key, acting as host `me`. Connects lazily: an
    /// etcd that is down now is only "unreachable" when asked. Fails if an
    /// endpoint or the TLS files (read again whenever they change) are bad.
    pub fn new(
        config: &WitnessConfig,
        vm: &str,
        me: String,
        stats: Arc<Stats>,
    ) -> Result<Self, WitnessError> {
        let witness = Self {
            etcd: Arc::new(Etcd::new(config)?),
            key: format!("{}{vm}", config.prefix).into_bytes(),
            timeout: config.timeout,
            check_interval: config.check_interval,
            me,
            stats,
        };
        witness.stats.set_witness(Default::default());
        Ok(witness)
    }

    /// This host's name in claims.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// How often a host that runs the VM reads its key.
    pub fn check_interval(&self) -> Duration {
        self.check_interval
    }

    /// The key, for messages.
    pub fn key(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }

    /// The claim the key holds now (None: no key yet). A linearizable read:
    /// it goes through etcd's leader, so a partitioned member cannot answer
    /// with an old claim.
    pub async fn read(&self) -> Result<Option<Held>, WitnessError> {
        let request = RangeRequest {
            key: self.key.clone(),
            ..Default::default()
        };
        let reply = self.ask(self.etcd.kv().range(request)).await?;
        self.held(reply)
    }

    /// Replaces the claim `from` (as read, by its revision; None: only if
    /// there is no key) by `to`, in one transaction. A swap whose answer was
    /// lost may have happened: one that finds `to` already there counts as
    /// won. `decision` names it in status and metrics.
    pub async fn swap(
        &self,
        decision: &str,
        from: Option<&Held>,
        to: &Claim,
    ) -> Result<Swap, WitnessError> {
        let started = Instant::now();
        let result = self.try_swap(from, to).await;
        let outcome = match &result {
            Ok(Swap::Won(_)) => "won",
            Ok(Swap::Lost(_)) => "lost",
            Err(_) => "unreachable",
        };
        let took = started.elapsed();
        self.stats.metrics.witness_decision(outcome, took);
        self.stats.update_witness(|w| {
            w.last_decision = decision.to_owned();
            w.last_outcome = outcome.to_owned();
            w.last_decision_micros = took.as_micros() as u64;
        });
        match &result {
            Ok(Swap::Won(held)) => {
                tracing::info!(decision, claim = %held.claim, revision = held.revision, took_us = took.as_micros() as u64, "witness: swap won")
            }
            Ok(Swap::Lost(now)) => {
                tracing::warn!(decision, now = ?now.as_ref().map(|h| h.claim.to_string()), "witness: swap lost")
            }
            Err(e) => tracing::warn!(decision, error = %e, "witness: unreachable"),
        }
        result
    }

    async fn try_swap(&self, from: Option<&Held>, to: &Claim) -> Result<Swap, WitnessError> {
        let guard = match from {
            Some(held) => Compare {
                result: compare::CompareResult::Equal.into(),
                target: compare::CompareTarget::Mod.into(),
                key: self.key.clone(),
                target_union: Some(compare::TargetUnion::ModRevision(held.revision)),
                ..Default::default()
            },
            None => Compare {
                result: compare::CompareResult::Equal.into(),
                target: compare::CompareTarget::Create.into(),
                key: self.key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
                ..Default::default()
            },
        };
        let range = RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: self.key.clone(),
                ..Default::default()
            })),
        };
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: self.key.clone(),
                value: to.encode(),
                ..Default::default()
            })),
        };
        let request = TxnRequest {
            compare: vec![guard],
            success: vec![put, range.clone()],
            failure: vec![range],
        };
        let reply = self.ask(self.etcd.kv().txn(request)).await?;
        let now = reply
            .responses
            .into_iter()
            .find_map(|r| match r.response {
                Some(response_op::Response::ResponseRange(range)) => Some(range),
                _ => None,
            })
            .unwrap_or_default();
        Ok(match self.held(now)? {
            Some(held) if reply.succeeded || held.claim == *to => Swap::Won(held),
            other => Swap::Lost(other),
        })
    }

    /// One request to etcd, within the timeout.
    async fn ask<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, WitnessError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(self.unreachable(status.message().to_owned())),
            Err(_) => Err(self.unreachable(format!("no answer in {:?}", self.timeout))),
        }
    }

    /// The claim in an answer from etcd (and, in status, that etcd answered
    /// with it).
    fn held(&self, reply: RangeResponse) -> Result<Option<Held>, WitnessError> {
        let held = match reply.kvs.into_iter().next() {
            None => None,
            Some(kv) => match Claim::decode(&kv.value) {
                Some(claim) => Some(Held {
                    claim,
                    revision: kv.mod_revision,
                }),
                None => {
                    let error = WitnessError::Garbled {
                        key: self.key(),
                        value: String::from_utf8_lossy(&kv.value).into_owned(),
                    };
                    self.stats.update_witness(|w| {
                        w.reachable = true;
                        w.error = error.to_string();
                    });
                    return Err(error);
                }
            },
        };
        self.stats.update_witness(|w| {
            w.reachable = true;
            w.error.clear();
            w.claim = held
                .as_ref()
                .map(|h| h.claim.to_string())
                .unwrap_or_default();
        });
        Ok(held)
    }

    fn unreachable(&self, why: String) -> WitnessError {
        self.stats.update_witness(|w| {
            w.reachable = false;
            w.error = why.clone();
        });
        WitnessError::Unreachable(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_round_trip_and_strangers_are_refused() {
        let claim = Claim {
            generation: Generation(7),
            owner: "10.0.0.1:7101".into(),
            protected: true,
        };
        assert_eq!(
            claim.encode(),
            b"generation=7 owner=10.0.0.1:7101 state=protected"
        );
        assert_eq!(Claim::decode(&claim.encode()), Some(claim.clone()));
        let unprotected = Claim {
            protected: false,
            ..claim
        };
        assert_eq!(Claim::decode(&unprotected.encode()), Some(unprotected));
        for bad in [
            &b""[..],
            b"generation=7 owner=a",
            b"generation=x owner=a state=protected",
            b"generation=7 owner= state=protected",
            b"generation=7 owner=a state=maybe",
            b"generation=7 owner=a state=protected extra=1",
            b"\xff\xfe",
        ] {
            assert_eq!(Claim::decode(bad), None, "{bad:?}");
        }
    }
}
