//! Live figures of a daemon, updated on hot paths with atomics (and a small
//! lock for the pause-time samples), read by the Control service and, later,
//! the metrics endpoint.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use understudy_proto::control_server::Control;
use understudy_proto::{StatusReply, StatusRequest};

use crate::auth::Access;
use crate::ids::{Epoch, EpochCell};
use crate::operator::{OperatorRequest, OperatorSlot};

const SAMPLES: usize = 1024;
/// Checkpoints kept in order for `Control.Epochs`.
const RECENT: usize = 4096;

/// A bounded window of recent samples, for medians and p99s.
#[derive(Debug, Default)]
pub struct Window {
    samples: Vec<f64>,
    next: usize,
}

impl Window {
    /// Adds a sample (the oldest goes once the window is full).
    pub fn push(&mut self, v: f64) {
        if self.samples.len() < SAMPLES {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
        }
        self.next = (self.next + 1) % SAMPLES;
    }

    /// The q-quantile (0..=1) of the window, 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s[((s.len() as f64 * q) as usize).min(s.len() - 1)]
    }

    /// The mean of the window, 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().sum::<f64>() / self.samples.len() as f64
    }
}

/// What a host is doing, as tools see it: `understudyctl status` shows it
/// as `state` (the kind) beside the sentence that says why, tests and the
/// systemd supervisor match on it, never on the sentence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// The role is starting.
    Starting,
    /// Primary: asking the backup for a session.
    WaitingForBackup,
    /// Primary: the backup holds a VM this boot would replace; an operator
    /// decides (`understudyctl promote` or `discard-image`).
    WaitingForOperator,
    /// Primary or backup: the first full copy is on its way.
    Syncing,
    /// Primary: a backup holds a committed checkpoint of this session.
    Protected,
    /// Primary: no backup; console output is released (keep-running).
    UnprotectedReleasing,
    /// Primary: no backup; console output is held (hold-output, or a run
    /// that cannot be recorded).
    UnprotectedHolding,
    /// Primary: the guest is paused because held output reached its bound.
    OutputBound,
    /// Primary (replay mode): the guest is paused until the backup's
    /// replica catches up with the log.
    ReplicaBehind,
    /// Primary: the session broke; probing the backup and reconnecting.
    Reconnecting,
    /// Primary: handed the VM over in a switchover.
    HandedOver,
    /// Primary: deposed by a higher generation.
    Fenced,
    /// Backup: waiting for a primary (with or without an image).
    Standby,
    /// Backup: holds a committed checkpoint and watches the primary.
    Protecting,
    /// Backup (replay mode): its replica stopped (diverged from the log, or
    /// the log was bad); protecting by checkpoints until the next one
    /// commits and a new replica starts from it.
    ReplicaStopped,
    /// Backup: its image cannot be promoted until a resync.
    NotPromotable,
    /// Backup: its image may be older than output the primary released.
    Stale,
    /// Backup: the primary said goodbye; no promotion.
    PrimaryStopped,
    /// Backup: a promotion failed (the primary, if alive, keeps the VM).
    PromotionFailed,
    /// A promoted backup running the VM.
    Promoted,
    /// Primary: moving the VM to another host (live migration).
    Migrating,
    /// Primary: the VM moved to another host by a live migration.
    MigratedAway,
    /// A host started with `--incoming`: waiting for a migration, or
    /// receiving one.
    Incoming,
    /// A post-copy migration's destination: the VM runs here while its
    /// pages arrive from the source.
    Postcopy,
    /// A role change waits for the etcd witness, which does not answer: a
    /// primary without its backup holds output, a backup whose primary is
    /// silent does not promote.
    WitnessUnreachable,
    /// Backup: the witness's key says another host runs the VM, or its
    /// primary released output alone; no promotion.
    WitnessRefused,
}

impl StateKind {
    /// The stable name in `status` (kebab case).
    pub fn name(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::WaitingForBackup => "waiting-for-backup",
            Self::WaitingForOperator => "waiting-for-operator",
            Self::Syncing => "syncing",
            Self::Protected => "protected",
            Self::UnprotectedReleasing => "unprotected-releasing",
            Self::UnprotectedHolding => "unprotected-holding",
            Self::OutputBound => "output-bound",
            Self::ReplicaBehind => "replica-behind",
            Self::Reconnecting => "reconnecting",
            Self::HandedOver => "handed-over",
            Self::Fenced => "fenced",
            Self::Standby => "standby",
            Self::Protecting => "protecting",
            Self::ReplicaStopped => "replica-stopped",
            Self::NotPromotable => "not-promotable",
            Self::Stale => "stale",
            Self::PrimaryStopped => "primary-stopped",
            Self::PromotionFailed => "promotion-failed",
            Self::Promoted => "promoted",
            Self::Migrating => "migrating",
            Self::MigratedAway => "migrated-away",
            Self::Incoming => "incoming",
            Self::Postcopy => "postcopy",
            Self::WitnessUnreachable => "witness-unreachable",
            Self::WitnessRefused => "witness-refused",
        }
    }
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything `understudyctl status` shows.
#[derive(Debug)]
pub struct Stats {
    /// The VM's name.
    pub vm_id: String,
    role: Mutex<crate::ids::Role>,
    state: Mutex<(StateKind, String)>,
    peer: Mutex<String>,
    /// The fencing generation this host is at.
    pub generation: AtomicU64,
    /// A backup holds a committed checkpoint of the current session.
    pub protected: AtomicBool,
    /// A backup: a primary has connected (the link is up).
    pub link_up: AtomicBool,
    /// Last acked (primary) or committed (backup) epoch.
    last_epoch: EpochCell,
    /// Checkpoints taken (primary) or committed (backup).
    pub epochs: AtomicU64,
    /// Bytes shipped (primary) or received (backup): epochs and log.
    pub bytes_shipped: AtomicU64,
    /// Epochs shipped and not yet acked (primary).
    pub in_flight: AtomicU64,
    /// Console output appended but not yet released (bytes).
    pub held_output: AtomicU64,
    /// A promoted backup: the silence it waited out, in µs.
    pub promotion_detect_us: AtomicU64,
    /// A promoted backup: promotion → VM running, in µs.
    pub promotion_resume_us: AtomicU64,
    /// The VM's incarnation, once this host knows one.
    incarnation: Mutex<Option<crate::ids::Incarnation>>,
    /// How the pair replicates (the primary's configuration; a backup
    /// learns it from each session's Hello).
    mode: Mutex<crate::ids::ReplicationMode>,
    /// Replay mode: how far the backup's replica is behind the log, in
    /// exits and in microseconds of the primary's time.
    pub replica_lag_exits: AtomicU64,
    /// See `replica_lag_exits`.
    pub replica_lag_us: AtomicU64,
    /// The last live migration from this host (while it runs, and after).
    migration: Mutex<Option<understudy_proto::MigrationProgress>>,
    /// How this host stands with the etcd witness (None: none configured).
    witness: Mutex<Option<understudy_proto::WitnessStatus>>,
    /// The adaptive codec's last decision (None: none yet, or not adaptive).
    codec: Mutex<Option<understudy_proto::CodecStatus>>,
    /// What the TLS certificates need (`tls_validity::warnings`).
    tls_warnings: Mutex<Vec<String>>,
    /// Prometheus metrics (histograms and counters updated as things happen).
    pub metrics: crate::metrics::Metrics,
    last_epoch_at: Mutex<Option<Instant>>,
    /// The last RECENT checkpoints in order, for drill charts.
    recent: Mutex<std::collections::VecDeque<understudy_proto::EpochSample>>,
    pauses_us: Mutex<Window>,
    dirty_pages: Mutex<Window>,
    epoch_bytes: Mutex<Window>,
    ack_us: Mutex<Window>,
    started: Instant,
}

impl Stats {
    /// The figures of a daemon starting in `role` at `generation`.
    pub fn new(vm_id: &str, role: crate::ids::Role, peer: String, generation: u64) -> Self {
        Self {
            vm_id: vm_id.to_owned(),
            role: Mutex::new(role),
            state: Mutex::new((StateKind::Starting, "starting".into())),
            peer: Mutex::new(peer),
            generation: AtomicU64::new(generation),
            protected: AtomicBool::new(false),
            link_up: AtomicBool::new(false),
            last_epoch: EpochCell::new(),
            epochs: AtomicU64::new(0),
            bytes_shipped: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            held_output: AtomicU64::new(0),
            promotion_detect_us: AtomicU64::new(0),
            promotion_resume_us: AtomicU64::new(0),
            incarnation: Mutex::new(None),
            mode: Mutex::default(),
            replica_lag_exits: AtomicU64::new(0),
            replica_lag_us: AtomicU64::new(0),
            migration: Mutex::new(None),
            witness: Mutex::new(None),
            codec: Mutex::new(None),
            tls_warnings: Mutex::default(),
            metrics: crate::metrics::Metrics::new(),
            last_epoch_at: Mutex::new(None),
            recent: Mutex::default(),
            pauses_us: Mutex::default(),
            dirty_pages: Mutex::default(),
            epoch_bytes: Mutex::default(),
            ack_us: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// The gauges' values now, for a metrics scrape.
    pub fn gauges(&self) -> crate::metrics::Gauges {
        crate::metrics::Gauges {
            generation: self.generation.load(Ordering::Acquire),
            protected: self.protected.load(Ordering::Acquire),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            held_output: self.held_output.load(Ordering::Relaxed),
            last_epoch: self.last_epoch().map_or(0, |e| e.0),
            role: self.role().name(),
            mode: self.mode().as_str(),
            replica_lag_exits: self.replica_lag_exits.load(Ordering::Relaxed),
            replica_lag_seconds: self.replica_lag_us.load(Ordering::Relaxed) as f64 / 1e6,
            witness_reachable: lock(&self.witness).as_ref().map(|w| w.reachable),
            codec: *lock(&self.codec),
        }
    }

    /// How the pair replicates.
    pub fn mode(&self) -> crate::ids::ReplicationMode {
        *lock(&self.mode)
    }

    /// Sets how the pair replicates.
    pub fn set_mode(&self, mode: crate::ids::ReplicationMode) {
        *lock(&self.mode) = mode;
    }

    /// The metrics' text exposition, gauges read now.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.gauges())
    }

    /// Sets the role shown (a role change).
    pub fn set_role(&self, role: crate::ids::Role) {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = role;
    }

    /// A new role on this host (a switchover): role, peer and the figures
    /// that describe one role's link start over; counters and histograms
    /// carry on (Prometheus counters never go back).
    pub fn start_role(&self, role: crate::ids::Role, peer: String) {
        self.set_role(role);
        *lock(&self.peer) = peer;
        self.protected.store(false, Ordering::Release);
        self.link_up.store(false, Ordering::Release);
        self.in_flight.store(0, Ordering::Relaxed);
        self.last_epoch.set(None);
        *lock(&self.codec) = None;
        self.set_state(StateKind::Starting, "starting");
    }

    /// The current role.
    pub fn role(&self) -> crate::ids::Role {
        *self.role.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the host does now, and the sentence that says why.
    pub fn set_state(&self, kind: StateKind, detail: impl Into<String>) {
        *lock(&self.state) = (kind, detail.into());
    }

    /// The kind of what the host does now.
    pub fn state_kind(&self) -> StateKind {
        lock(&self.state).0
    }

    /// The sentence that says what the host does now.
    pub fn state(&self) -> String {
        lock(&self.state).1.clone()
    }

    /// The VM this host runs or protects.
    pub fn set_incarnation(&self, incarnation: Option<crate::ids::Incarnation>) {
        *lock(&self.incarnation) = incarnation;
    }

    /// The last acked (primary) or committed (backup) epoch.
    pub fn set_last_epoch(&self, epoch: Epoch) {
        self.last_epoch.set(Some(epoch));
    }

    /// See [`Stats::set_last_epoch`]; None before the first.
    pub fn last_epoch(&self) -> Option<Epoch> {
        self.last_epoch.get()
    }

    /// Records one checkpoint taken on the primary: guest stop time, dirty
    /// pages, bytes before and after encoding.
    pub fn record_epoch(&self, pause: Duration, dirty_pages: usize, bytes_in: u64, bytes: u64) {
        let now = Instant::now();
        if let Some(last) = lock(&self.last_epoch_at).replace(now) {
            self.metrics
                .epoch_interval
                .observe((now - last).as_secs_f64());
        }
        self.metrics.epoch_pause.observe(pause.as_secs_f64());
        self.metrics.dirty_pages.observe(dirty_pages as f64);
        self.metrics.bytes_in.inc_by(bytes_in);
        self.metrics.bytes_out.inc_by(bytes);
        self.metrics.epochs.inc();
        {
            let mut recent = lock(&self.recent);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(understudy_proto::EpochSample {
                pause_micros: pause.as_secs_f64() * 1e6,
                dirty_pages: dirty_pages as u64,
                bytes,
            });
        }
        self.epochs.fetch_add(1, Ordering::Relaxed);
        self.bytes_shipped.fetch_add(bytes, Ordering::Relaxed);
        lock(&self.pauses_us).push(pause.as_secs_f64() * 1e6);
        lock(&self.dirty_pages).push(dirty_pages as f64);
        lock(&self.epoch_bytes).push(bytes as f64);
    }

    /// A checkpoint copied `pages` after the guest resumed; `waits` writes
    /// waited for their page's copy.
    pub fn record_copy_after_resume(&self, pages: usize, waits: usize) {
        self.metrics.copied_after_resume.inc_by(pages as u64);
        self.metrics.write_waits.inc_by(waits as u64);
    }

    /// A checkpoint was acked `latency` after it was taken.
    pub fn record_ack(&self, latency: Duration) {
        self.metrics.ack_latency.observe(latency.as_secs_f64());
        lock(&self.ack_us).push(latency.as_secs_f64() * 1e6);
    }

    /// A heartbeat's round trip.
    pub fn record_heartbeat_rtt(&self, rtt: Duration) {
        self.metrics.heartbeat_rtt.observe(rtt.as_secs_f64());
    }

    /// The status as `Control.Status` answers it.
    pub fn reply(&self) -> StatusReply {
        let last = self.last_epoch();
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        let pauses = lock(&self.pauses_us);
        StatusReply {
            vm_id: self.vm_id.clone(),
            role: self.role().name().to_owned(),
            generation: self.generation.load(Ordering::Acquire),
            protected: self.protected.load(Ordering::Acquire),
            last_epoch: last.map_or(0, |e| e.0),
            has_epoch: last.is_some(),
            epochs_per_second: self.epochs.load(Ordering::Relaxed) as f64 / elapsed,
            pause_p50_micros: pauses.quantile(0.5),
            pause_p99_micros: pauses.quantile(0.99),
            dirty_pages_per_epoch: lock(&self.dirty_pages).mean(),
            bytes_per_epoch: lock(&self.epoch_bytes).mean(),
            replication_lag_epochs: self.in_flight.load(Ordering::Relaxed),
            ack_latency_micros: lock(&self.ack_us).quantile(0.5),
            state: self.state(),
            state_kind: self.state_kind().name().to_owned(),
            bytes_shipped: self.bytes_shipped.load(Ordering::Relaxed),
            epochs: self.epochs.load(Ordering::Relaxed),
            peer: lock(&self.peer).clone(),
            promotion_detect_micros: self.promotion_detect_us.load(Ordering::Relaxed),
            promotion_resume_micros: self.promotion_resume_us.load(Ordering::Relaxed),
            incarnation: lock(&self.incarnation)
                .map(|i| i.to_string())
                .unwrap_or_default(),
            mode: self.mode().as_str().to_owned(),
            replica_lag_exits: self.replica_lag_exits.load(Ordering::Relaxed),
            replica_lag_millis: self.replica_lag_us.load(Ordering::Relaxed) as f64 / 1e3,
            migration: lock(&self.migration).clone(),
            witness: lock(&self.witness).clone(),
            codec: *lock(&self.codec),
            warnings: lock(&self.tls_warnings)
                .iter()
                .cloned()
                .chain(crate::tls_follow::not_loaded())
                .collect(),
        }
    }

    /// Reports what the TLS certificates need (none: nothing); returns
    /// whether that changed.
    pub fn set_tls_warnings(&self, warnings: Vec<String>) -> bool {
        let mut held = lock(&self.tls_warnings);
        let changed = *held != warnings;
        *held = warnings;
        changed
    }

    /// Reports the adaptive codec's last decision (None: no longer adapting,
    /// e.g. a new role).
    pub fn set_codec(&self, codec: Option<understudy_proto::CodecStatus>) {
        *lock(&self.codec) = codec;
    }

    /// Reports a witness (a daemon with one starts with a default report).
    pub fn set_witness(&self, status: understudy_proto::WitnessStatus) {
        *lock(&self.witness) = Some(status);
    }

    /// Updates the witness report (if a witness is configured).
    pub fn update_witness(&self, update: impl FnOnce(&mut understudy_proto::WitnessStatus)) {
        if let Some(w) = lock(&self.witness).as_mut() {
            update(w);
        }
    }

    /// The witness report, if a witness is configured.
    pub fn witness(&self) -> Option<understudy_proto::WitnessStatus> {
        lock(&self.witness).clone()
    }

    /// Reports the progress of a live migration from this host.
    pub fn set_migration(&self, progress: understudy_proto::MigrationProgress) {
        *lock(&self.migration) = Some(progress);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Control gRPC service over a daemon's [`Stats`]; operator requests go
/// to whichever role is installed in `operator`.
#[derive(Debug, Clone)]
pub struct ControlService {
    /// What `Status` and `Epochs` answer from.
    pub stats: std::sync::Arc<Stats>,
    /// Where `Switchover`, `Promote` and `DiscardImage` go.
    pub operator: OperatorSlot,
    /// Who may call what (operators change things; hosts may read).
    pub auth: crate::auth::Authority,
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn status(
        &self,
        request: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusReply>, tonic::Status> {
        self.auth
            .check(&request, "Control.Status", Access::OperatorOrHost)?;
        Ok(tonic::Response::new(self.stats.reply()))
    }

    async fn epochs(
        &self,
        request: tonic::Request<understudy_proto::EpochsRequest>,
    ) -> Result<tonic::Response<understudy_proto::EpochsReply>, tonic::Status> {
        self.auth
            .check(&request, "Control.Epochs", Access::OperatorOrHost)?;
        let samples = lock(&self.stats.recent).iter().cloned().collect();
        Ok(tonic::Response::new(understudy_proto::EpochsReply {
            samples,
        }))
    }

    async fn crash(
        &self,
        request: tonic::Request<understudy_proto::CrashRequest>,
    ) -> Result<tonic::Response<understudy_proto::CrashReply>, tonic::Status> {
        self.auth
            .check(&request, "Control.Crash", Access::Operator)?;
        let role = self.stats.role();
        if role != crate::ids::Role::Primary || !self.stats.protected.load(Ordering::Acquire) {
            return Err(tonic::Status::failed_precondition(format!(
                "kill drill refused: it needs a primary whose VM is protected (this daemon: {role}, {})",
                self.stats.state()
            )));
        }
        tracing::warn!("kill drill: this daemon SIGKILLs itself, as the loss of its host would");
        tokio::spawn(async {
            // Usually lets the answer go out first; a lost answer is fine
            // (the caller watches the takeover itself).
            tokio::time::sleep(Duration::from_millis(20)).await;
            // SAFETY: signalling our own process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        });
        Ok(tonic::Response::new(understudy_proto::CrashReply {}))
    }

    async fn switchover(
        &self,
        request: tonic::Request<understudy_proto::SwitchoverRequest>,
    ) -> Result<tonic::Response<understudy_proto::SwitchoverReply>, tonic::Status> {
        self.auth
            .check(&request, "Control.Switchover", Access::Operator)?;
        self.operator
            .request(self.stats.role().name(), OperatorRequest::Switchover)
            .await
            .map(tonic::Response::new)
    }

    async fn migrate(
        &self,
        request: tonic::Request<understudy_proto::MigrateRequest>,
    ) -> Result<tonic::Response<understudy_proto::MigrateReply>, tonic::Status> {
        self.auth
            .check(&request, "Control.Migrate", Access::Operator)?;
        let request = request.into_inner();
        self.operator
            .request(self.stats.role().name(), |tx| {
                OperatorRequest::Migrate(request, tx)
            })
            .await
            .map(tonic::Response::new)
    }

    async fn promote(
        &self,
        request: tonic::Request<understudy_proto::PromoteRequest>,
    ) -> Result<tonic::Response<understudy_proto::PromoteReply>, tonic::Status> {
        self.auth
            .check(&request, "Control.Promote", Access::Operator)?;
        self.operator
            .request(self.stats.role().name(), OperatorRequest::Promote)
            .await
            .map(tonic::Response::new)
    }

    async fn discard_image(
        &self,
        request: tonic::Request<understudy_proto::DiscardImageRequest>,
    ) -> Result<tonic::Response<understudy_proto::DiscardImageReply>, tonic::Status> {
        self.auth
            .check(&request, "Control.DiscardImage", Access::Operator)?;
        self.operator
            .request(self.stats.role().name(), OperatorRequest::DiscardImage)
            .await
            .map(tonic::Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_role_starts_without_the_last_roles_link_figures() {
        let stats = Stats::new("vm", crate::ids::Role::Primary, "b:1".into(), 1);
        stats.set_last_epoch(crate::ids::Epoch(7));
        stats.set_codec(Some(understudy_proto::CodecStatus {
            compressing: true,
            ..Default::default()
        }));
        assert!(stats.reply().codec.is_some() && stats.reply().has_epoch);
        stats.start_role(crate::ids::Role::Backup, "a:1".into());
        let reply = stats.reply();
        assert_eq!((reply.codec, reply.has_epoch), (None, false));
        assert_eq!(stats.gauges().codec, None);
    }

    #[test]
    fn window_quantiles() {
        let mut w = Window::default();
        assert_eq!(w.quantile(0.5), 0.0);
        for i in 1..=100 {
            w.push(i as f64);
        }
        assert_eq!(w.quantile(0.5), 51.0);
        assert_eq!(w.quantile(0.99), 100.0);
        assert_eq!(w.mean(), 50.5);
        for _ in 0..SAMPLES {
            w.push(7.0);
        }
        assert_eq!(w.quantile(0.99), 7.0, "old samples age out");
    }
}
