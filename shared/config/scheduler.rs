//! The scheduler's sections of the config file: `[scheduler]`, `[[warmup]]`
//! and `[popularity]`, as written (raw, deserialized, defaults applied).
//!
//! Only their shape lives here, so that the config stays a leaf; compiling
//! jobs (cron, time zones, parameter sets, keys) belongs to the scheduler,
//! counting demand to `crate::popularity`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::DefaultValue;

/// `[scheduler]`: defaults for every job and how the scheduler process behaves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Time zone of jobs that do not name one (IANA name, e.g. `Europe/Berlin`).
    pub timezone: String,
    /// Keys one job computes at the same time (ClickHouse queries in flight).
    pub concurrency: usize,
    /// Random delay before a scheduled run starts, up to this.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// An entry still fresh for longer than this (XFetch-adjusted) is skipped.
    #[serde(with = "humantime_serde")]
    pub refresh_ahead: Duration,
    /// Lifetime of the Redis lease of a running job; renewed while it runs.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long running jobs may go on after SIGTERM before they are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Reload the config when its file changes (SIGHUP always reloads).
    pub watch: bool,
    /// Name of this host in the run history (default: the system host name).
    pub host: Option<String>,
    /// Redis round-trip bound for the scheduler (it is not latency-bound like
    /// the proxy; the larger of this and `redis.timeout` applies).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Where the scheduler serves `/metrics` (off when absent).
    pub metrics_listen: Option<SocketAddr>,
    /// ClickHouse settings of every warm-up query (jobs may add their own),
    /// e.g. `{ max_threads = 2, priority = 10 }`.
    pub settings: BTreeMap<String, DefaultValue>,
    /// Whether `dashcache-proxy` runs the `[[warmup]]` jobs itself (see
    /// [`SchedulerConfig::runs_in_proxy`]); unset: yes without `[redis]`, no with it.
    pub in_proxy: Option<bool>,
}

impl SchedulerConfig {
    /// Whether the proxy runs the warm-up jobs: `in_proxy` if set, else
    /// when there is no Redis (`has_redis: false`) to share warmed answers
    /// with a `dashcache-scheduler`.
    pub fn runs_in_proxy(&self, has_redis: bool) -> bool {
        self.in_proxy.unwrap_or(!has_redis)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            timezone: "UTC".into(),
            concurrency: 2,
            jitter: Duration::ZERO,
            refresh_ahead: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            in_proxy: None,
            watch: true,
            host: None,
            redis_timeout: Duration::from_secs(2),
            metrics_listen: None,
            settings: BTreeMap::new(),
        }
    }
}

/// One `[[warmup]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    pub name: String,
    /// 5 fields (`30 6 * * Mon-Fri`) or 6 with seconds first.
    pub cron: String,
    /// IANA time zone; defaults to `scheduler.timezone`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// The catalog query to warm (absent for a `popular` job).
    #[serde(default)]
    pub query: Option<String>,
    /// Tenants to warm each parameter set for (required for tenant-scoped queries).
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Response formats to warm (default `["json"]`).
    #[serde(default)]
    pub formats: Vec<String>,
    /// Explicit parameter sets, as URL values (`{ from = "today-7d", to = "today" }`).
    #[serde(default)]
    pub params: Vec<BTreeMap<String, DefaultValue>>,
    /// Value lists whose cartesian product is combined with every explicit set.
    #[serde(default)]
    pub matrix: BTreeMap<String, Vec<DefaultValue>>,
    #[serde(default)]
    pub concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub jitter: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub refresh_ahead: Option<Duration>,
    /// Extra ClickHouse settings for this job's queries.
    #[serde(default)]
    pub settings: BTreeMap<String, DefaultValue>,
    /// Makes this a popularity job: refresh the most requested keys.
    #[serde(default)]
    pub popular: Option<PopularConfig>,
}

/// `popular = { top = 100, hours = 24 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PopularConfig {
    /// How many keys (K).
    pub top: usize,
    /// Over how many past hours of demand (N).
    pub hours: u32,
}

/// `[popularity]`: how the proxy counts demand.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PopularityConfig {
    /// Count requests at all.
    pub enabled: bool,
    /// How often counts are sent to Redis.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How long an hour's counts are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Distinct keys counted between flushes; more are dropped (and counted as dropped).
    pub max_pending: usize,
}

impl Default for PopularityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flush_interval: Duration::from_secs(5),
            retention: Duration::from_secs(48 * 3600),
            max_pending: 100_000,
        }
    }
}
