//! Prometheus metrics of a daemon, named `understudy_<what>_<unit>`, served as
//! text on `/metrics`. Histograms and counters are updated where things happen
//! (once per epoch, ack or heartbeat: never per page); gauges are set at
//! scrape time from the [`Gauges`] the daemon's status reads (this module
//! knows nothing of the status: `status` owns a `Metrics`, not the reverse).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The values the gauges show, read by the caller at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gauges {
    /// `understudy_generation`.
    pub generation: u64,
    /// `understudy_protected`.
    pub protected: bool,
    /// Checkpoints shipped but not acked.
    pub in_flight: u64,
    /// Console output held unreleased, bytes.
    pub held_output: u64,
    /// `understudy_last_epoch`.
    pub last_epoch: u64,
    /// `understudy_role{role}`.
    pub role: &'static str,
    /// "checkpoint" or "replay".
    pub mode: &'static str,
    /// `understudy_replica_lag_exits`.
    pub replica_lag_exits: u64,
    /// `understudy_replica_lag_seconds`.
    pub replica_lag_seconds: f64,
    /// `understudy_witness_reachable`: None without a witness.
    pub witness_reachable: Option<bool>,
    /// `understudy_codec_compressing`, `understudy_link_bytes_per_second`,
    /// `understudy_codec_compress_bytes_per_second`: None before the
    /// adaptive codec decided.
    pub codec: Option<understudy_proto::CodecStatus>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabel {
    rpc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    file: String,
    path: String,
}

/// Every metric a daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `understudy_epoch_pause_seconds`: the guest stopped per checkpoint.
    pub epoch_pause: Histogram,
    /// `understudy_epoch_interval_seconds`.
    pub epoch_interval: Histogram,
    /// `understudy_epoch_dirty_pages`.
    pub dirty_pages: Histogram,
    /// `understudy_epoch_bytes_in_bytes_total`: before encoding.
    pub bytes_in: Counter,
    /// `understudy_epoch_bytes_out_bytes_total`: after encoding.
    pub bytes_out: Counter,
    /// `understudy_epochs_total`.
    pub epochs: Counter,
    /// `understudy_epoch_pages_copied_after_resume_total`: dirty pages
    /// copied while the guest ran (write-protected until copied).
    pub copied_after_resume: Counter,
    /// `understudy_epoch_write_waits_total`: guest (or VMM) writes that
    /// waited for their page's copy after the resume.
    pub write_waits: Counter,
    /// `understudy_ack_latency_seconds`.
    pub ack_latency: Histogram,
    /// `understudy_heartbeat_rtt_seconds`.
    pub heartbeat_rtt: Histogram,
    /// `understudy_failovers_total`.
    pub failovers: Counter,
    /// `understudy_switchovers_total`.
    pub switchovers: Counter,
    /// Replay mode: trace log bytes shipped (primary) or received (backup).
    pub log_bytes: Counter,
    /// Replay mode: replicas the backup dropped because they stopped
    /// (divergence, a bad log) and rebuilt from a checkpoint.
    pub replica_restarts: Counter,
    generation: Gauge,
    protected: Gauge,
    lag: Gauge,
    held_output: Gauge,
    last_epoch: Gauge,
    role: Family<RoleLabel, Gauge>,
    mode: Family<ModeLabel, Gauge>,
    replica_lag_exits: Gauge,
    replica_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    refused: Family<RpcLabel, Counter>,
    migrations: Family<OutcomeLabel, Counter>,
    /// `understudy_migration_bytes_total`: sent to migration destinations.
    pub migration_bytes: Counter,
    /// `understudy_migration_downtime_seconds`: the guest stop of each
    /// migration from this host.
    pub migration_downtime: Histogram,
    witness_reachable: Gauge,
    codec_compressing: Gauge,
    link_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    compress_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    witness_decisions: Family<OutcomeLabel, Counter>,
    witness_decision_seconds: Histogram,
    tls_not_after: Family<CertLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered, at zero.
    pub fn new() -> Self {
        let seconds = || Histogram::new(exponential_buckets(25e-6, 2.0, 16)); // 25 µs .. 0.8 s
        let m = Self {
            registry: Registry::with_prefix("understudy"),
            epoch_pause: seconds(),
            epoch_interval: seconds(),
            dirty_pages: Histogram::new(exponential_buckets(1.0, 4.0, 12)),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            epochs: Counter::default(),
            copied_after_resume: Counter::default(),
            write_waits: Counter::default(),
            ack_latency: seconds(),
            heartbeat_rtt: seconds(),
            failovers: Counter::default(),
            switchovers: Counter::default(),
            log_bytes: Counter::default(),
            replica_restarts: Counter::default(),
            generation: Gauge::default(),
            protected: Gauge::default(),
            lag: Gauge::default(),
            held_output: Gauge::default(),
            last_epoch: Gauge::default(),
            role: Family::default(),
            mode: Family::default(),
            replica_lag_exits: Gauge::default(),
            replica_lag: Gauge::default(),
            refused: Family::default(),
            migrations: Family::default(),
            migration_bytes: Counter::default(),
            migration_downtime: seconds(),
            witness_reachable: Gauge::default(),
            codec_compressing: Gauge::default(),
            link_rate: Gauge::default(),
            compress_rate: Gauge::default(),
            witness_decisions: Family::default(),
            witness_decision_seconds: seconds(),
            tls_not_after: Family::default(),
        };
        let mut registry = Registry::with_prefix("understudy");
        registry.register_with_unit(
            "epoch_pause",
            "Time the guest was stopped per checkpoint",
            prometheus_client::registry::Unit::Seconds,
            m.epoch_pause.clone(),
        );
        registry.register_with_unit(
            "epoch_interval",
            "Time between the starts of consecutive checkpoints",
            prometheus_client::registry::Unit::Seconds,
            m.epoch_interval.clone(),
        );
        registry.register(
            "epoch_dirty_pages",
            "Dirty pages per checkpoint",
            m.dirty_pages.clone(),
        );
        registry.register_with_unit(
            "epoch_bytes_in",
            "Guest bytes in checkpoints, before encoding",
            prometheus_client::registry::Unit::Bytes,
            m.bytes_in.clone(),
        );
        registry.register_with_unit(
            "epoch_bytes_out",
            "Bytes shipped for checkpoints, after encoding",
            prometheus_client::registry::Unit::Bytes,
            m.bytes_out.clone(),
        );
        registry.register(
            "epochs",
            "Checkpoints taken (primary) or committed (backup)",
            m.epochs.clone(),
        );
        registry.register(
            "epoch_pages_copied_after_resume",
            "Dirty pages copied after the guest resumed (write-protected until copied) instead of in the stop",
            m.copied_after_resume.clone(),
        );
        registry.register(
            "epoch_write_waits",
            "Writes that waited for their page to be copied after the resume",
            m.write_waits.clone(),
        );
        registry.register_with_unit(
            "ack_latency",
            "Checkpoint taken until acked by the backup",
            prometheus_client::registry::Unit::Seconds,
            m.ack_latency.clone(),
        );
        registry.register_with_unit(
            "heartbeat_rtt",
            "Heartbeat round trip to the backup",
            prometheus_client::registry::Unit::Seconds,
            m.heartbeat_rtt.clone(),
        );
        registry.register(
            "failovers",
            "Promotions of this backup after the primary went silent",
            m.failovers.clone(),
        );
        registry.register(
            "switchovers",
            "Planned role swaps this host took part in (handed the VM over or took it)",
            m.switchovers.clone(),
        );
        registry.register("generation", "Fencing generation", m.generation.clone());
        registry.register(
            "protected",
            "1 when a backup holds a committed checkpoint of the current session",
            m.protected.clone(),
        );
        registry.register(
            "replication_lag_epochs",
            "Checkpoints shipped but not yet acked",
            m.lag.clone(),
        );
        registry.register_with_unit(
            "held_output",
            "Console output the primary holds unreleased (waiting for acks)",
            prometheus_client::registry::Unit::Bytes,
            m.held_output.clone(),
        );
        registry.register(
            "last_epoch",
            "Last acked (primary) or committed (backup) checkpoint",
            m.last_epoch.clone(),
        );
        registry.register("role", "1 for this daemon's current role", m.role.clone());
        registry.register(
            "replication_mode",
            "1 for how the pair replicates (checkpoint or replay)",
            m.mode.clone(),
        );
        registry.register_with_unit(
            "log",
            "Replay mode: trace log shipped (primary) or received (backup)",
            prometheus_client::registry::Unit::Bytes,
            m.log_bytes.clone(),
        );
        registry.register(
            "replica_restarts",
            "Replay mode: replicas dropped after a divergence or a bad log and rebuilt from a checkpoint",
            m.replica_restarts.clone(),
        );
        registry.register(
            "replica_lag_exits",
            "Replay mode: exits the backup's replica is behind the primary's log",
            m.replica_lag_exits.clone(),
        );
        registry.register_with_unit(
            "replica_lag",
            "Replay mode: how far the backup's replica is behind the primary's log",
            prometheus_client::registry::Unit::Seconds,
            m.replica_lag.clone(),
        );
        registry.register(
            "refused_requests",
            "Requests refused because the caller may not make them, by RPC",
            m.refused.clone(),
        );
        registry.register(
            "migrations",
            "Live migrations from this host, by outcome (done: the destination runs the VM; failed: it runs on here; lost: after the switch, not known to run anywhere)",
            m.migrations.clone(),
        );
        registry.register_with_unit(
            "migration",
            "Bytes sent to live migration destinations",
            prometheus_client::registry::Unit::Bytes,
            m.migration_bytes.clone(),
        );
        registry.register_with_unit(
            "migration_downtime",
            "Guest stop of each live migration from this host",
            prometheus_client::registry::Unit::Seconds,
            m.migration_downtime.clone(),
        );
        registry.register(
            "witness_reachable",
            "1 when the last request to the etcd witness was answered, 0 when not, -1 without a witness",
            m.witness_reachable.clone(),
        );
        registry.register(
            "codec_compressing",
            "Adaptive codec: 1 while full pages are compressed, 0 while they go raw (the link outruns the compressor), -1 before its first decision",
            m.codec_compressing.clone(),
        );
        registry.register(
            "link_bytes_per_second",
            "Adaptive codec: the replication link's measured rate (windowed maximum of recent checkpoints' delivery rates); 0 while unknown",
            m.link_rate.clone(),
        );
        registry.register(
            "codec_compress_bytes_per_second",
            "Adaptive codec: the compressor's measured rate on this host, guest bytes per second",
            m.compress_rate.clone(),
        );
        registry.register(
            "witness_decisions",
            "Role decisions taken through the etcd witness, by outcome (won, lost, unreachable)",
            m.witness_decisions.clone(),
        );
        registry.register_with_unit(
            "witness_decision",
            "Time of each compare-and-swap on the witness's key",
            prometheus_client::registry::Unit::Seconds,
            m.witness_decision_seconds.clone(),
        );
        registry.register_with_unit(
            "tls_not_after",
            "When each TLS certificate file this host presents or trusts stops being valid \
             (Unix time; the earliest of the file's certificates)",
            prometheus_client::registry::Unit::Seconds,
            m.tls_not_after.clone(),
        );
        registry.register(
            "tls_connections_cut",
            "TLS connections cut because a revocation list that loaded names their peer's \
             certificate",
            crate::revocation::CUT.clone(),
        );
        Self { registry, ..m }
    }

    /// Sets when the TLS certificate file `path` (`file`: what it is for)
    /// stops being valid, in Unix seconds.
    pub fn set_tls_not_after(&self, file: &str, path: &str, not_after: i64) {
        self.tls_not_after
            .get_or_create(&CertLabel {
                file: file.to_owned(),
                path: path.to_owned(),
            })
            .set(not_after);
    }

    /// Counts and times one decision taken through the witness.
    pub fn witness_decision(&self, outcome: &str, took: std::time::Duration) {
        self.witness_decisions
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
        self.witness_decision_seconds.observe(took.as_secs_f64());
    }

    /// Counts a request refused for want of authority.
    pub fn refused(&self, rpc: &str) {
        self.refused
            .get_or_create(&RpcLabel {
                rpc: rpc.to_owned(),
            })
            .inc();
    }

    /// Counts a live migration that ended (`done` or `failed`).
    pub fn migration_ended(&self, outcome: &str) {
        self.migrations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The text exposition, with the gauges set to `gauges`.
    pub fn render(&self, gauges: &Gauges) -> String {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.generation, gauges.generation);
        set(&self.protected, u64::from(gauges.protected));
        set(&self.lag, gauges.in_flight);
        set(&self.held_output, gauges.held_output);
        set(&self.last_epoch, gauges.last_epoch);
        self.role.clear();
        self.role
            .get_or_create(&RoleLabel {
                role: gauges.role.to_owned(),
            })
            .set(1);
        self.mode.clear();
        self.mode
            .get_or_create(&ModeLabel {
                mode: gauges.mode.to_owned(),
            })
            .set(1);
        set(&self.replica_lag_exits, gauges.replica_lag_exits);
        self.replica_lag.set(gauges.replica_lag_seconds);
        self.witness_reachable.set(match gauges.witness_reachable {
            None => -1,
            Some(r) => i64::from(r),
        });
        let codec = gauges.codec.unwrap_or_default();
        self.codec_compressing.set(match &gauges.codec {
            None => -1,
            Some(c) => i64::from(c.compressing),
        });
        self.link_rate.set(codec.link_bytes_per_second);
        self.compress_rate.set(codec.compress_bytes_per_second);
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` on `listener` until `shutdown`, each scrape answered
/// with `render()`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint failed");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{Gauges, Metrics};

    /// The sample names a daemon exports (with every family populated).
    fn exported() -> BTreeSet<String> {
        let metrics = Metrics::new();
        metrics.refused("Hello");
        metrics.migration_ended("done");
        metrics.witness_decision("won", std::time::Duration::from_millis(1));
        metrics
            .render(&Gauges {
                role: "primary",
                ..Gauges::default()
            })
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    /// Every `understudy_…` name in a PromQL expression.
    fn names_in(expr: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = expr;
        while let Some(at) = rest.find("understudy_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana/understudy.json"))
                .expect("docs/grafana/understudy.json is JSON");
        let exported = exported();
        let mut queries = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                queries.push(target["expr"].as_str().expect("expr").to_owned());
            }
        }
        for var in dashboard["templating"]["list"]
            .as_array()
            .expect("variables")
        {
            if let Some(q) = var["query"].as_str() {
                queries.push(q.to_owned());
            }
        }
        let mut used = 0;
        for query in &queries {
            for name in names_in(query) {
                assert!(
                    exported.contains(&name),
                    "the dashboard queries {name}, which the daemon does not export \
                     (exported: {exported:?})"
                );
                used += 1;
            }
        }
        assert!(used >= 15, "the dashboard queries {used} metrics");
        // And every metric family the daemon exports has a panel.
        for name in &exported {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                queries.iter().any(|q| q.contains(family)),
                "no dashboard panel shows {family}"
            );
        }
    }
}
