//! The daemon's configuration: one TOML file describes a protected VM and both
//! hosts of its pair; each host runs `understudyd primary` or `understudyd
//! backup` with it. Every timeout, interval and threshold is a named field with
//! a default. `--set key=value` overrides any field (dotted keys for tables).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use understudy_checkpoint::{CodecPolicy, Compression};
use understudy_common::ids::ReplicationMode;
use understudy_primary::BackupLoss;
use understudy_vmm::{BuiltinBoot, BuiltinGuest};

/// A role, or the config section of the host that starts with it.
pub use understudy_common::ids::Role;

/// One host's addresses.
#[derive(Clone, Copy, Debug)]
pub struct HostAddrs {
    /// Console clients connect here.
    pub console: SocketAddr,
    /// `understudyctl status` and operator requests.
    pub control: SocketAddr,
    /// Prometheus `/metrics` (optional).
    pub metrics: Option<SocketAddr>,
    /// Where it listens as the backup (the `[primary]` host: optional).
    pub replication: Option<SocketAddr>,
}

/// A configuration mistake, naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// A `--set` that is not `key=value`.
    #[error("--set {0:?}: write key=value, e.g. --set epoch_interval=50ms")]
    BadOverride(String),
    /// A setting is unknown, malformed or out of range.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is not a duration like \"25ms\" or \"2s\": {e}"
        ))
    })
}

fn guest<'de, D: Deserializer<'de>>(d: D) -> Result<BuiltinGuest, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn mode<'de, D: Deserializer<'de>>(d: D) -> Result<ReplicationMode, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(serde::de::Error::custom)
}

fn backup_loss<'de, D: Deserializer<'de>>(d: D) -> Result<BackupLoss, D::Error> {
    match String::deserialize(d)?.as_str() {
        "keep-running" => Ok(BackupLoss::KeepRunning),
        "hold-output" => Ok(BackupLoss::HoldOutput),
        other => Err(serde::de::Error::custom(format!(
            "backup_loss {other:?} is unknown: choose \"keep-running\" or \"hold-output\""
        ))),
    }
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// VM name (its identity on both hosts).
    pub name: String,
    /// Built-in guest to boot: counter, dirtier or kv.
    #[serde(deserialize_with = "guest")]
    pub guest: BuiltinGuest,
    /// Guest RAM in MiB.
    #[serde(default = "defaults::memory_mib")]
    pub memory_mib: usize,
    /// Where this host keeps state: the primary its generation and fence
    /// marker, the backup its image (unless `image_dir` says elsewhere).
    pub state_dir: PathBuf,
    /// Where the backup keeps its image (`memory.img`, `meta`, `journal`);
    /// default `<state_dir>/image`. On tmpfs, a promoted host (which runs
    /// the VM on its image) can still copy checkpoints' pages after the
    /// resume, and the image costs no disk writes; it does not survive a
    /// reboot of the host (the primary then resyncs it). The state files
    /// stay in `state_dir`, which must be on disk.
    #[serde(default)]
    pub image_dir: Option<PathBuf>,
    /// How the pair replicates: "checkpoint" (a checkpoint every epoch) or
    /// "replay" (the VM's input log streams to a replica on the backup).
    #[serde(default, deserialize_with = "mode")]
    pub mode: ReplicationMode,
    /// Checkpoint mode: the time between checkpoints.
    #[serde(default = "defaults::epoch_interval", deserialize_with = "duration")]
    pub epoch_interval: Duration,
    /// Replay mode: the time between checkpoints.
    #[serde(
        default = "defaults::checkpoint_interval",
        deserialize_with = "duration"
    )]
    pub checkpoint_interval: Duration,
    /// Replay mode: how far the backup's replica may fall behind before the
    /// guest waits for it (what a failover may have to replay).
    #[serde(default = "defaults::max_replica_lag", deserialize_with = "duration")]
    pub max_replica_lag: Duration,
    /// How often the primary beats.
    #[serde(
        default = "defaults::heartbeat_interval",
        deserialize_with = "duration"
    )]
    pub heartbeat_interval: Duration,
    /// Silence after which the backup promotes.
    #[serde(default = "defaults::heartbeat_timeout", deserialize_with = "duration")]
    pub heartbeat_timeout: Duration,
    /// What the primary does when it loses its backup.
    #[serde(default = "defaults::backup_loss", deserialize_with = "backup_loss")]
    pub backup_loss: BackupLoss,
    /// Checkpoints shipped but not acked before the primary waits.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u64,
    /// Console output the primary may hold unreleased (while no backup acks
    /// it, under hold-output) before it pauses the guest until output can go
    /// out again; bounds memory and every checkpoint's size.
    #[serde(default = "defaults::max_held_output_kib")]
    pub max_held_output_kib: u64,
    /// Console clients served at once (more are told so and closed).
    #[serde(default = "defaults::console_max_clients")]
    pub console_max_clients: usize,
    /// Let the primary boot the VM without reaching the backup first.
    #[serde(default)]
    pub start_unprotected: bool,
    /// fsync the backup's image at every commit (power-loss safety).
    #[serde(default)]
    pub fsync: bool,
    /// Copy a checkpoint's dirty pages after the guest resumed, with the
    /// pages write-protected until copied, so the guest's stop does not grow
    /// with its dirty set (each checkpoint chooses; a promoted host, whose
    /// RAM is its image, copies in the stop unless `image_dir` is on tmpfs).
    /// `false`: always copy inside the stop.
    #[serde(default = "defaults::copy_after_resume")]
    pub copy_after_resume: bool,
    /// Hosts that may migrate the VM to this one while it waits with
    /// `understudyd primary --incoming`: the IP addresses or DNS names their
    /// certificates carry (mutual TLS; ignored in insecure mode).
    #[serde(default)]
    pub incoming_from: Vec<String>,
    /// Parameters of the built-in guests.
    #[serde(default)]
    pub guest_params: GuestParams,
    /// How pages are encoded on the wire.
    #[serde(default)]
    pub codec: CodecConfig,
    /// Mutual TLS, or `insecure` on loopback.
    #[serde(default)]
    pub tls: TlsConfig,
    /// The etcd witness that decides who may release the VM's output
    /// (optional; without it a cut link can leave both hosts serving under
    /// keep-running).
    #[serde(default)]
    pub witness: Option<WitnessSection>,
    /// The `[primary]` host's addresses.
    pub primary: PrimaryAddrs,
    /// The `[backup]` host's addresses.
    pub backup: BackupAddrs,
}

/// `guest_params`: what the built-in guests do.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestParams {
    /// counter: milliseconds between lines.
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u64,
    /// dirtier: working set in pages, pages per second, report interval.
    #[serde(default = "defaults::working_set")]
    pub working_set: u64,
    /// dirtier: pages written per second (0: flat out).
    #[serde(default = "defaults::dirty_rate")]
    pub dirty_rate: u64,
    /// dirtier: milliseconds between `work N` lines.
    #[serde(default = "defaults::report_ms")]
    pub report_ms: u64,
}

impl Default for GuestParams {
    fn default() -> Self {
        Self {
            interval_ms: defaults::interval_ms(),
            working_set: defaults::working_set(),
            dirty_rate: defaults::dirty_rate(),
            report_ms: defaults::report_ms(),
        }
    }
}

/// `codec`: page encoding on the wire.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecConfig {
    /// adaptive, raw, lz4 or zstd.
    #[serde(default = "defaults::codec_policy")]
    pub policy: String,
    /// zstd's level when zstd is used.
    #[serde(default = "defaults::zstd_level")]
    pub zstd_level: i32,
    /// Pages the sender remembers for delta encoding.
    #[serde(default = "defaults::delta_cache_pages")]
    pub delta_cache_pages: usize,
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            policy: defaults::codec_policy(),
            zstd_level: defaults::zstd_level(),
            delta_cache_pages: defaults::delta_cache_pages(),
        }
    }
}

/// Mutual TLS for the replication and control channels.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA that signs both hosts' and operators' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// This host's certificate and key (PEM; same paths on both hosts, each
    /// host with its own files).
    pub cert: Option<PathBuf>,
    /// This host's private key (PEM).
    pub key: Option<PathBuf>,
    /// The name the backup's certificate carries (default: its IP address).
    pub backup_name: Option<String>,
    /// The name the primary's certificate carries (default: its IP address).
    pub primary_name: Option<String>,
    /// Plaintext instead of TLS: only on a network you trust with guest memory.
    #[serde(default)]
    pub insecure: bool,
    /// `insecure` on addresses beyond loopback: anyone who can reach the
    /// ports can read guest memory, crash or move the VM. Refused unless set.
    #[serde(default)]
    pub dangerously_allow_insecure_network: bool,
    /// The guest console over TLS too: clients present a certificate the CA
    /// signed for an operator or a console client (`urn:understudy:console:`).
    #[serde(default)]
    pub console: bool,
    /// Certificates the CA revoked: a PEM file of the CA's certificate
    /// revocation list (`openssl ca -gencrl`). This host's servers (control,
    /// replication, the console) refuse a client certificate it lists (a
    /// departed operator's, a stolen host key), and read it again when it
    /// changes. Unset: no revocation.
    pub crl: Option<PathBuf>,
    /// Days before a certificate (this host's, the CA's, the witness's) ends
    /// from which the daemon warns in its status and log (default 30; 0: only
    /// once it has expired). See `understudy_common::tls_validity`.
    pub expiry_warning_days: Option<u32>,
}

impl TlsConfig {
    /// How long before a certificate's end the daemon warns
    /// (`expiry_warning_days`, default 30).
    pub fn expiry_warning(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.expiry_warning_days.unwrap_or(30)) * 86_400)
    }
}

/// `[witness]`: an etcd cluster both hosts reach, holding one key per VM
/// (see `understudy_common::witness`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessSection {
    /// etcd client URLs, e.g. `["http://10.0.0.3:2379"]` (`https://` with
    /// ca, cert and key).
    pub endpoints: Vec<String>,
    /// The CA that signs etcd's certificates (PEM).
    pub ca: Option<PathBuf>,
    /// This host's client certificate for etcd (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// The name etcd's certificates carry (default: each endpoint's host).
    pub server_name: Option<String>,
    /// Keys live under this prefix; the VM's key is the prefix and its name.
    #[serde(default = "defaults::witness_prefix")]
    pub prefix: String,
    /// One request's limit, past which etcd counts as unreachable.
    #[serde(default = "defaults::witness_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// How often the host that runs the VM reads its key (to learn that it
    /// was deposed while it could not hear the other host).
    #[serde(
        default = "defaults::witness_check_interval",
        deserialize_with = "duration"
    )]
    pub check_interval: Duration,
}

/// The primary host's addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrimaryAddrs {
    /// Guest console served to clients (TCP).
    pub console: SocketAddr,
    /// Control service (`understudyctl status`).
    pub control: SocketAddr,
    /// Prometheus metrics (`/metrics`); none if unset.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Where this host listens as the backup after a switchover; without it
    /// the primary refuses switchovers.
    #[serde(default)]
    pub replication: Option<SocketAddr>,
}

/// The backup host's addresses.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupAddrs {
    /// Replication service: the backup listens here, the primary connects here.
    pub replication: SocketAddr,
    /// Guest console after promotion (accepts clients while standby).
    pub console: SocketAddr,
    /// `understudyctl status` and operator requests.
    pub control: SocketAddr,
    /// Prometheus metrics (`/metrics`); none if unset.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// What each setting may be: outside these, a daemon would spin, starve, or
/// never notice a failure.
mod bounds {
    use std::ops::RangeInclusive;
    use std::time::Duration;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The heartbeat timeout covers at least this many beats.
    pub const MIN_BEATS_PER_TIMEOUT: u32 = 3;

    /// Under 1 ms the pause overhead dominates; over 10 s output waits that
    /// long for its checkpoint.
    pub const EPOCH_INTERVAL: RangeInclusive<Duration> = ms(1)..=ms(10_000);
    /// Replay mode: each checkpoint pauses the guest for its dirty pages;
    /// over 10 minutes a restarted backup replays that much log.
    pub const CHECKPOINT_INTERVAL: RangeInclusive<Duration> = ms(50)..=ms(600_000);
    /// Replay mode: under 10 ms the guest waits for every segment; over a
    /// minute a failover may replay that long.
    pub const MAX_REPLICA_LAG: RangeInclusive<Duration> = ms(10)..=ms(60_000);
    /// Timers are not precise below 1 ms; over 1 s the pair notices little.
    pub const HEARTBEAT_INTERVAL: RangeInclusive<Duration> = ms(1)..=ms(1_000);
    /// At least 3 × the interval (checked separately); over a minute a dead
    /// primary goes unnoticed for that long.
    pub const HEARTBEAT_TIMEOUT: RangeInclusive<Duration> = ms(3)..=ms(60_000);
    /// Each checkpoint in flight holds its pages in memory on both hosts.
    pub const MAX_IN_FLIGHT: RangeInclusive<u64> = 1..=1024;
    /// Held output travels in every checkpoint (whose device state is at most
    /// 16 MiB).
    pub const MAX_HELD_OUTPUT_KIB: RangeInclusive<u64> = 64..=8192;
    /// Each client holds a descriptor and a task.
    pub const CONSOLE_MAX_CLIENTS: RangeInclusive<usize> = 1..=4096;
    /// Under 10 ms a loaded etcd reads as down; over 10 s a failover waits
    /// that long on it.
    pub const WITNESS_TIMEOUT: RangeInclusive<Duration> = ms(10)..=ms(10_000);
    /// Reads of the key by the host that runs the VM.
    pub const WITNESS_CHECK_INTERVAL: RangeInclusive<Duration> = ms(100)..=ms(60_000);
}

mod defaults {
    use std::time::Duration;

    use understudy_primary::BackupLoss;

    pub fn memory_mib() -> usize {
        64
    }
    pub fn epoch_interval() -> Duration {
        Duration::from_millis(25)
    }
    pub fn heartbeat_interval() -> Duration {
        Duration::from_millis(10)
    }
    pub fn checkpoint_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_replica_lag() -> Duration {
        Duration::from_secs(1)
    }
    pub fn heartbeat_timeout() -> Duration {
        Duration::from_millis(100)
    }
    pub fn backup_loss() -> BackupLoss {
        BackupLoss::KeepRunning
    }
    pub fn console_max_clients() -> usize {
        understudy_common::console::DEFAULT_MAX_CLIENTS
    }
    pub fn copy_after_resume() -> bool {
        true
    }
    pub fn max_held_output_kib() -> u64 {
        4096
    }
    pub fn max_in_flight() -> u64 {
        4
    }
    pub fn interval_ms() -> u64 {
        50
    }
    pub fn working_set() -> u64 {
        1024
    }
    pub fn dirty_rate() -> u64 {
        10_000
    }
    pub fn report_ms() -> u64 {
        1000
    }
    pub fn codec_policy() -> String {
        "adaptive".into()
    }
    pub fn zstd_level() -> i32 {
        3
    }
    pub fn delta_cache_pages() -> usize {
        8192
    }
    pub fn witness_prefix() -> String {
        "/understudy/".into()
    }
    pub fn witness_timeout() -> Duration {
        Duration::from_millis(500)
    }
    pub fn witness_check_interval() -> Duration {
        Duration::from_secs(1)
    }
}

impl Config {
    /// Reads `path`, applies `overrides` (`key=value`, TOML values; bare words
    /// are strings) and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, overrides)
    }

    /// Parses `text` (the file at `path`) with `--set` `overrides` applied, and checks it.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_owned()));
            let mut parts: Vec<&str> = key.trim().split('.').collect();
            let last = parts
                .pop()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
            let mut t = &mut table;
            for part in parts {
                t = t
                    .entry(part)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| ConfigError::BadOverride(o.clone()))?;
            }
            t.insert(last.to_owned(), value);
        }
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(e.message().to_owned()))?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "name {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        understudy_vmm::memory::validate_ram_size(self.memory_mib.saturating_mul(1 << 20))
            .map_err(|e| format!("memory_mib: {e}"))?;
        if let Some(image_dir) = &self.image_dir
            && self.state_dir.starts_with(image_dir)
        {
            return Err(format!(
                "image_dir {} holds state_dir {}: the image needs a directory of its own \
                 (e.g. {}), or leave image_dir out for <state_dir>/image",
                image_dir.display(),
                self.state_dir.display(),
                image_dir.join(&self.name).join("image").display()
            ));
        }
        for (field, value, range) in [
            (
                "epoch_interval",
                self.epoch_interval,
                bounds::EPOCH_INTERVAL,
            ),
            (
                "heartbeat_interval",
                self.heartbeat_interval,
                bounds::HEARTBEAT_INTERVAL,
            ),
            (
                "heartbeat_timeout",
                self.heartbeat_timeout,
                bounds::HEARTBEAT_TIMEOUT,
            ),
            (
                "checkpoint_interval",
                self.checkpoint_interval,
                bounds::CHECKPOINT_INTERVAL,
            ),
            (
                "max_replica_lag",
                self.max_replica_lag,
                bounds::MAX_REPLICA_LAG,
            ),
        ] {
            if !range.contains(&value) {
                return Err(format!(
                    "{field} {value:?} is out of range: use {:?} to {:?} (e.g. \"{}\")",
                    range.start(),
                    range.end(),
                    humantime::format_duration(match field {
                        "epoch_interval" => defaults::epoch_interval(),
                        "heartbeat_interval" => defaults::heartbeat_interval(),
                        "checkpoint_interval" => defaults::checkpoint_interval(),
                        "max_replica_lag" => defaults::max_replica_lag(),
                        _ => defaults::heartbeat_timeout(),
                    })
                ));
            }
        }
        if self.heartbeat_timeout < self.heartbeat_interval * bounds::MIN_BEATS_PER_TIMEOUT {
            return Err(format!(
                "heartbeat_timeout ({:?}) must be at least {} × heartbeat_interval ({:?}), or a single late beat promotes the backup",
                self.heartbeat_timeout,
                bounds::MIN_BEATS_PER_TIMEOUT,
                self.heartbeat_interval
            ));
        }
        if !bounds::MAX_HELD_OUTPUT_KIB.contains(&self.max_held_output_kib) {
            return Err(format!(
                "max_held_output_kib {} is out of range: use {} to {} (default {})",
                self.max_held_output_kib,
                bounds::MAX_HELD_OUTPUT_KIB.start(),
                bounds::MAX_HELD_OUTPUT_KIB.end(),
                defaults::max_held_output_kib()
            ));
        }
        if !bounds::CONSOLE_MAX_CLIENTS.contains(&self.console_max_clients) {
            return Err(format!(
                "console_max_clients {} is out of range: use {} to {} (default {})",
                self.console_max_clients,
                bounds::CONSOLE_MAX_CLIENTS.start(),
                bounds::CONSOLE_MAX_CLIENTS.end(),
                defaults::console_max_clients()
            ));
        }
        if self.tls.console && self.tls.insecure {
            return Err("tls.console = true needs mutual TLS (ca, cert, key), not insecure".into());
        }
        if !bounds::MAX_IN_FLIGHT.contains(&self.max_in_flight) {
            return Err(format!(
                "max_in_flight {} is out of range: use {} to {} (default {})",
                self.max_in_flight,
                bounds::MAX_IN_FLIGHT.start(),
                bounds::MAX_IN_FLIGHT.end(),
                defaults::max_in_flight()
            ));
        }
        self.codec_policy()?;
        let t = &self.tls;
        if t.insecure && !t.dangerously_allow_insecure_network {
            let exposed: Vec<String> = self
                .all_addresses()
                .into_iter()
                .filter(|(_, a)| !a.ip().is_loopback())
                .map(|(field, a)| format!("{field} = {a}"))
                .collect();
            if !exposed.is_empty() {
                return Err(format!(
                    "tls.insecure = true is refused beyond loopback ({}): anyone who reaches these \
                     ports could read guest memory, crash or move the VM. Use mutual TLS (tls.ca, \
                     tls.cert, tls.key); only on a network you trust completely, also set \
                     tls.dangerously_allow_insecure_network = true",
                    exposed.join(", ")
                ));
            }
        }
        if let Some(w) = &self.witness {
            validate_witness(w)?;
        }
        if t.dangerously_allow_insecure_network && !t.insecure {
            return Err(
                "tls.dangerously_allow_insecure_network is set but tls.insecure is not: remove it"
                    .into(),
            );
        }
        match (t.insecure, &t.ca, &t.cert, &t.key) {
            (true, None, None, None) | (false, Some(_), Some(_), Some(_)) => {}
            (true, ..) => {
                return Err("tls: insecure = true but ca/cert/key are set: choose one".into());
            }
            (false, ..) => {
                return Err(
                    "tls: set ca, cert and key (mutual TLS), or insecure = true for plaintext on a network you trust with guest memory"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The witness, if `[witness]` is set.
    pub fn witness_config(&self) -> Option<understudy_common::witness::WitnessConfig> {
        let w = self.witness.as_ref()?;
        let tls = match (&w.ca, &w.cert, &w.key) {
            (Some(ca), Some(cert), Some(key)) => Some(understudy_common::wire::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                crl: None,
            }),
            _ => None,
        };
        Some(understudy_common::witness::WitnessConfig {
            endpoints: w.endpoints.clone(),
            tls,
            server_name: w.server_name.clone(),
            prefix: w.prefix.clone(),
            timeout: w.timeout,
            check_interval: w.check_interval,
        })
    }

    /// Every address in the file, by field name.
    pub fn all_addresses(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut out = vec![
            ("primary.console", self.primary.console),
            ("primary.control", self.primary.control),
            ("backup.replication", self.backup.replication),
            ("backup.console", self.backup.console),
            ("backup.control", self.backup.control),
        ];
        out.extend(self.primary.metrics.map(|a| ("primary.metrics", a)));
        out.extend(self.primary.replication.map(|a| ("primary.replication", a)));
        out.extend(self.backup.metrics.map(|a| ("backup.metrics", a)));
        out
    }

    /// The TLS files, or None when insecure.
    pub fn tls_files(&self) -> Option<understudy_common::wire::TlsFiles> {
        let t = &self.tls;
        Some(understudy_common::wire::TlsFiles {
            ca: t.ca.clone()?,
            cert: t.cert.clone()?,
            key: t.key.clone()?,
            crl: t.crl.clone(),
        })
    }

    /// The codec policy `codec` describes.
    pub fn codec_policy(&self) -> Result<CodecPolicy, String> {
        let c = &self.codec;
        let mut policy = match c.policy.as_str() {
            "adaptive" => CodecPolicy::ADAPTIVE,
            "raw" => CodecPolicy::RAW,
            "lz4" => CodecPolicy::LZ4,
            "zstd" => {
                if !(1..=19).contains(&c.zstd_level) {
                    return Err(format!("codec.zstd_level {} must be 1 to 19", c.zstd_level));
                }
                CodecPolicy {
                    compression: Compression::Zstd(c.zstd_level),
                    adaptive: false,
                    ..CodecPolicy::ADAPTIVE
                }
            }
            other => {
                return Err(format!(
                    "codec.policy {other:?} is unknown: choose adaptive, raw, lz4 or zstd"
                ));
            }
        };
        policy.delta_cache_pages = c.delta_cache_pages;
        Ok(policy)
    }

    /// The built-in guest and its parameters.
    pub fn boot(&self) -> BuiltinBoot {
        let p = &self.guest_params;
        match self.guest {
            BuiltinGuest::Counter => BuiltinBoot::counter(p.interval_ms),
            BuiltinGuest::Dirtier => BuiltinBoot::dirtier(p.working_set, p.dirty_rate, p.report_ms),
            BuiltinGuest::Kv => BuiltinBoot::new(BuiltinGuest::Kv),
        }
    }

    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> usize {
        self.memory_mib << 20
    }

    /// Where the backup keeps its image: `image_dir`, or `state_dir/image`.
    pub fn image_dir(&self) -> PathBuf {
        self.image_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("image"))
    }

    /// The addresses of the host listed under `[primary]` or `[backup]`.
    pub fn host(&self, section: Role) -> HostAddrs {
        match section {
            Role::Primary => HostAddrs {
                console: self.primary.console,
                control: self.primary.control,
                metrics: self.primary.metrics,
                replication: self.primary.replication,
            },
            Role::Backup => HostAddrs {
                console: self.backup.console,
                control: self.backup.control,
                metrics: self.backup.metrics,
                replication: Some(self.backup.replication),
            },
        }
    }

    /// Why the host of `section` cannot take the role it does not start with
    /// (a switchover swaps them), or None when it can.
    pub fn switchover_unavailable(&self) -> Option<String> {
        self.primary.replication.is_none().then(|| {
            "primary.replication is not set: the primary's host has no address to serve as the backup from \
             (set it in the config on both hosts)"
                .to_owned()
        })
    }

    /// The primary role on the host of `home` (the section it was started
    /// with), replicating to the other host.
    pub fn primary_options(
        &self,
        home: Role,
    ) -> Result<understudy_primary::PrimaryOptions, String> {
        let peer = home.other();
        let backup = self
            .host(peer)
            .replication
            .ok_or_else(|| self.switchover_unavailable().unwrap_or_default())?;
        Ok(understudy_primary::PrimaryOptions {
            vm_id: self.name.clone(),
            boot: self.boot(),
            ram_bytes: self.ram_bytes(),
            state_dir: self.state_dir.clone(),
            backup,
            epoch_interval: self.epoch_interval,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            backup_loss: self.backup_loss,
            codec: self.codec_policy()?,
            max_in_flight: self.max_in_flight,
            max_held_output: (self.max_held_output_kib << 10) as usize,
            copy_after_resume: self.copy_after_resume,
            start_unprotected: self.start_unprotected,
            tls: self.tls_files(),
            // The name on the other host's certificate, when not its IP.
            backup_name: self.peer_name(peer).cloned(),
            switchover_unavailable: self.switchover_unavailable(),
            auth: self.authority(home, None),
            mode: self.mode,
            checkpoint_interval: self.checkpoint_interval,
            max_replica_lag: self.max_replica_lag,
            witness: None,
        })
    }

    /// The DNS name the certificate of the host of `section` carries, if set.
    fn peer_name(&self, section: Role) -> Option<&String> {
        match section {
            Role::Backup => self.tls.backup_name.as_ref(),
            Role::Primary => self.tls.primary_name.as_ref(),
        }
    }

    /// Who may call what on the host of `home`: under mutual TLS, the other
    /// host is whoever's certificate names one of its addresses (or its
    /// configured name); operators carry an operator URI.
    pub fn authority(
        &self,
        home: Role,
        stats: Option<std::sync::Arc<understudy_common::status::Stats>>,
    ) -> understudy_common::auth::Authority {
        if self.tls.insecure {
            return understudy_common::auth::Authority::insecure();
        }
        let peer = home.other();
        let a = self.host(peer);
        let mut names: Vec<String> = [Some(a.console), Some(a.control), a.metrics, a.replication]
            .into_iter()
            .flatten()
            .map(|addr| addr.ip().to_string())
            .collect();
        names.extend(self.peer_name(peer).map(|n| n.to_ascii_lowercase()));
        names.sort();
        names.dedup();
        let on_refusal = stats.map(|stats| {
            understudy_common::auth::OnRefusal(std::sync::Arc::new(move |rpc: &str| {
                stats.metrics.refused(rpc)
            }))
        });
        understudy_common::auth::Authority::mutual_tls(names, on_refusal)
    }

    /// The backup role on the host of `home`.
    pub fn backup_options(&self, home: Role) -> Result<understudy_backup::BackupOptions, String> {
        let replication_listen = self
            .host(home)
            .replication
            .ok_or_else(|| self.switchover_unavailable().unwrap_or_default())?;
        Ok(understudy_backup::BackupOptions {
            vm_id: self.name.clone(),
            ram_bytes: self.ram_bytes() as u64,
            image_dir: self.image_dir(),
            replication_listen,
            handover_unavailable: self.switchover_unavailable(),
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            primary_releases_alone: self.backup_loss == BackupLoss::KeepRunning,
            fsync: self.fsync,
            // The output a primary may hold, its last epoch's past the
            // limit, and the VM's own state (a few KiB) with room to spare.
            max_device_state: ((self.max_held_output_kib << 10) + (1 << 20)) as usize,
            tls: self.tls_files(),
            auth: self.authority(home, None),
            incoming: false,
            witness: None,
        })
    }

    /// Who may migrate a VM to this host while it runs with `--incoming`:
    /// the hosts `incoming_from` names (mutual TLS), besides the pair's other
    /// host.
    pub fn incoming_authority(
        &self,
        stats: Option<std::sync::Arc<understudy_common::status::Stats>>,
    ) -> understudy_common::auth::Authority {
        if self.tls.insecure {
            return understudy_common::auth::Authority::insecure();
        }
        let on_refusal = stats.map(|stats| {
            understudy_common::auth::OnRefusal(std::sync::Arc::new(move |rpc: &str| {
                stats.metrics.refused(rpc)
            }))
        });
        let mut names: Vec<String> = self
            .incoming_from
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        understudy_common::auth::Authority::mutual_tls(names, on_refusal)
    }
}

fn validate_witness(w: &WitnessSection) -> Result<(), String> {
    if w.endpoints.is_empty() {
        return Err(
            "witness.endpoints is empty: list etcd's client URLs, e.g. [\"http://10.0.0.3:2379\"]"
                .into(),
        );
    }
    let tls = match (&w.ca, &w.cert, &w.key) {
        (None, None, None) => false,
        (Some(_), Some(_), Some(_)) => true,
        _ => {
            return Err(
                "witness: set all of ca, cert and key (TLS to etcd), or none (plaintext)".into(),
            );
        }
    };
    let scheme = if tls { "https://" } else { "http://" };
    for e in &w.endpoints {
        if !e.starts_with(scheme) {
            return Err(format!(
                "witness.endpoints: {e:?} must start with {scheme} ({})",
                if tls {
                    "ca, cert and key are set"
                } else {
                    "no TLS files are set; add ca, cert and key for https"
                }
            ));
        }
    }
    if w.prefix.is_empty() || w.prefix.chars().any(char::is_whitespace) {
        return Err(format!(
            "witness.prefix {:?}: use a non-empty prefix without spaces, e.g. \"/understudy/\"",
            w.prefix
        ));
    }
    for (field, value, range) in [
        ("witness.timeout", w.timeout, bounds::WITNESS_TIMEOUT),
        (
            "witness.check_interval",
            w.check_interval,
            bounds::WITNESS_CHECK_INTERVAL,
        ),
    ] {
        if !range.contains(&value) {
            return Err(format!(
                "{field} {value:?} is out of range: use {:?} to {:?}",
                range.start(),
                range.end()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "demo"
guest = "counter"
state_dir = "/tmp/x"
[primary]
console = "127.0.0.1:7401"
control = "127.0.0.1:7501"
[backup]
replication = "127.0.0.1:7301"
console = "127.0.0.1:7402"
control = "127.0.0.1:7502"
[tls]
insecure = true
"#;

    fn parse(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::parse(text, Path::new("test.toml"), &o)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(GOOD, &[]).unwrap();
        assert_eq!(c.epoch_interval, Duration::from_millis(25));
        assert_eq!(c.backup_loss, BackupLoss::KeepRunning);
        let c = parse(
            GOOD,
            &[
                "epoch_interval=10ms",
                "backup_loss=hold-output",
                "guest_params.interval_ms=7",
                "memory_mib=32",
            ],
        )
        .unwrap();
        assert_eq!(c.epoch_interval, Duration::from_millis(10));
        assert_eq!(c.backup_loss, BackupLoss::HoldOutput);
        assert_eq!(c.guest_params.interval_ms, 7);
        assert_eq!(c.memory_mib, 32);
    }

    #[test]
    fn a_fixed_codec_is_fixed_and_only_adaptive_adapts() {
        let policy = |name: &str| {
            parse(GOOD, &[&format!("codec.policy={name:?}")])
                .unwrap()
                .codec_policy()
                .unwrap()
        };
        assert!(policy("adaptive").adaptive);
        for fixed in ["lz4", "zstd", "raw"] {
            assert!(!policy(fixed).adaptive, "{fixed} must not adapt");
        }
        assert_eq!(policy("lz4").compression, Compression::Lz4);
    }

    #[test]
    fn insecure_beyond_loopback_needs_the_explicit_override() {
        let c = parse(
            GOOD,
            &[
                "backup.console=\"10.0.0.2:7401\"",
                "tls.dangerously_allow_insecure_network=true",
            ],
        )
        .unwrap();
        assert!(c.tls.dangerously_allow_insecure_network);
    }

    #[test]
    fn every_mistake_gets_one_clear_error() {
        let cases: &[(&[&str], &str)] = &[
            (&["epoch_intreval=5ms"], "unknown field `epoch_intreval`"),
            (&["epoch_interval=soon"], "is not a duration"),
            (&["guest=linux"], "choose counter, dirtier or kv"),
            (&["memory_mib=3"], "memory_mib"),
            (
                &["backup_loss=panic"],
                "choose \"keep-running\" or \"hold-output\"",
            ),
            (
                &["heartbeat_timeout=15ms"],
                "at least 3 × heartbeat_interval",
            ),
            (
                &["codec.policy=brotli"],
                "choose adaptive, raw, lz4 or zstd",
            ),
            (&["name=a b"], "letters, digits"),
            (
                &["state_dir=\"/var/lib/u/web1\"", "image_dir=\"/var/lib/u\""],
                "image_dir /var/lib/u holds state_dir /var/lib/u/web1",
            ),
            (
                &[
                    "state_dir=\"/var/lib/u/web1\"",
                    "image_dir=\"/var/lib/u/web1\"",
                ],
                "needs a directory of its own",
            ),
            (&["backup.replication=nowhere"], "invalid socket address"),
            (&["oops"], "write key=value"),
            (
                &["heartbeat_interval=0s", "heartbeat_timeout=0s"],
                "heartbeat_interval 0ns is out of range",
            ),
            (&["epoch_interval=0s"], "epoch_interval 0ns is out of range"),
            (
                &["epoch_interval=1h"],
                "epoch_interval 3600s is out of range",
            ),
            (
                &["heartbeat_interval=5s", "heartbeat_timeout=15s"],
                "heartbeat_interval 5s is out of range",
            ),
            (
                &["heartbeat_timeout=10min"],
                "heartbeat_timeout 600s is out of range",
            ),
            (
                &["max_in_flight=100000"],
                "max_in_flight 100000 is out of range",
            ),
            (
                &["max_held_output_kib=65536"],
                "max_held_output_kib 65536 is out of range",
            ),
            (&["tls.insecure=false"], "set ca, cert and key"),
            (
                &["backup.console=\"10.0.0.2:7401\""],
                "refused beyond loopback (backup.console = 10.0.0.2:7401)",
            ),
            (
                &[
                    "tls.dangerously_allow_insecure_network=true",
                    "tls.insecure=false",
                ],
                "tls.insecure is not: remove it",
            ),
            (
                &["tls.ca=/ca.pem"],
                "insecure = true but ca/cert/key are set",
            ),
            (&["witness.endpoints=[]"], "witness.endpoints is empty"),
            (
                &["witness.endpoints=[\"10.0.0.3:2379\"]"],
                "must start with http://",
            ),
            (
                &[
                    "witness.endpoints=[\"http://10.0.0.3:2379\"]",
                    "witness.ca=/ca.pem",
                ],
                "set all of ca, cert and key",
            ),
            (
                &[
                    "witness.endpoints=[\"http://10.0.0.3:2379\"]",
                    "witness.timeout=1h",
                ],
                "witness.timeout 3600s is out of range",
            ),
            (&["witness.prefix=x"], "missing field `endpoints`"),
        ];
        for (overrides, needle) in cases {
            let err = parse(GOOD, overrides).unwrap_err().to_string();
            assert!(err.contains(needle), "{overrides:?}: {err}");
        }
        let err = parse("name = ", &[]).unwrap_err().to_string();
        assert!(err.contains("not valid TOML"), "{err}");
        let err = parse(&GOOD.replace("guest = \"counter\"\n", ""), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `guest`"), "{err}");
    }

    #[test]
    fn a_witness_section_becomes_the_witness_config() {
        assert!(parse(GOOD, &[]).unwrap().witness_config().is_none());
        let c = parse(
            GOOD,
            &["witness.endpoints=[\"http://127.0.0.1:2379\", \"http://127.0.0.2:2379\"]"],
        )
        .unwrap();
        let w = c.witness_config().unwrap();
        assert_eq!(w.endpoints.len(), 2);
        assert_eq!(w.prefix, "/understudy/");
        assert_eq!(w.timeout, Duration::from_millis(500));
        assert!(w.tls.is_none());
    }
}
