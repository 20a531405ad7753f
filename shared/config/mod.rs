//! The config file: its shape, its defaults and loading it.
//!
//! Owns parsing `config.toml` into typed structs (unknown keys, and keys that
//! do not belong to a parameter's type, are errors that name the key, file and
//! line), where each key is written ([`Lines`], from the parsed document's
//! spans), the [`Diagnostic`] a problem with the file is reported as, and
//! resolving paths relative to the file. It does not check that values make
//! sense together: [`crate::check`] does, for both binaries.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

mod chhttp;
mod cors;
mod scheduler;
pub use chhttp::{ClickHouseHttpCacheRule, ClickHouseHttpConfig};
pub use cors::CorsConfig;
mod tls;
pub use scheduler::{PopularConfig, PopularityConfig, SchedulerConfig, WarmupConfig};
pub use tls::ListenerTls;

/// Why a config could not be loaded. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, or not the config's shape (an unknown key, a wrong type).
    /// Reading stops at the first such problem.
    #[error("{0}")]
    Parse(Diagnostic),
}

/// One problem with a config file: the file, the line of the offending key
/// (or of its table) and the reason. Shown as `FILE: line N: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}: line {line}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// Where each key of a config file is written: the 1-based line of every key
/// path (`["warmup", "2", "cron"]`: entries of arrays by index), taken from
/// the spans of the parsed TOML document, so any way of writing a key
/// (tables, dotted keys, inline tables) is found.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    by_path: HashMap<Vec<String>, usize>,
    /// The key path of each table, by the offset its span starts at.
    tables: HashMap<usize, Vec<String>>,
}

/// Byte offsets of a text's lines, to turn a span into a 1-based line.
struct LineStarts(Vec<usize>);

impl LineStarts {
    fn new(text: &str) -> LineStarts {
        LineStarts(
            std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        )
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&start| start <= offset)
    }
}

impl Lines {
    fn index(doc: &Spanned<DeTable<'_>>, starts: &LineStarts) -> Lines {
        let mut lines = Lines::default();
        lines.table(&mut Vec::new(), doc.span().start, doc.get_ref(), starts);
        lines
    }

    fn table(
        &mut self,
        path: &mut Vec<String>,
        start: usize,
        table: &DeTable<'_>,
        starts: &LineStarts,
    ) {
        self.tables.insert(start, path.clone());
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            self.by_path
                .insert(path.clone(), starts.line(key.span().start));
            self.value(path, value, starts);
            path.pop();
        }
    }

    fn value(&mut self, path: &mut Vec<String>, value: &Spanned<DeValue<'_>>, starts: &LineStarts) {
        match value.get_ref() {
            DeValue::Table(table) => self.table(path, value.span().start, table, starts),
            DeValue::Array(array) => {
                for (index, item) in array.iter().enumerate() {
                    path.push(index.to_string());
                    self.by_path
                        .insert(path.clone(), starts.line(item.span().start));
                    self.value(path, item, starts);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The line of `path`, or of the nearest enclosing key that is written
    /// (a missing key is reported at its table).
    pub fn of(&self, path: &[&str]) -> Option<usize> {
        (1..=path.len()).rev().find_map(|n| {
            let key: Vec<String> = path[..n].iter().map(|k| (*k).to_owned()).collect();
            self.by_path.get(&key).copied()
        })
    }

    /// The line of a shape error: toml reports a key a table does not take
    /// through a tagged enum (a parameter's `type`) at the table; the key itself is more useful.
    fn of_error(&self, err: &toml::de::Error, starts: &LineStarts) -> Option<usize> {
        let span = err.span()?;
        let unknown = err
            .message()
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next());
        if let (Some(table), Some(key)) = (self.tables.get(&span.start), unknown) {
            let mut path: Vec<&str> = table.iter().map(String::as_str).collect();
            path.push(key);
            let exact: Vec<String> = path.iter().map(|k| (*k).to_owned()).collect();
            if let Some(line) = self.by_path.get(&exact) {
                return Some(*line);
            }
        }
        Some(starts.line(span.start))
    }
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    /// `[redis]`: answers, locks, rate limits and request counts shared by
    /// every process. `None` when the file has no `[redis]` table and
    /// `DASHCACHE_REDIS_URL` is unset: one process keeps all of it in its
    /// own memory (the single-host mode, README "Single host"). An empty
    /// `[redis]` table is Redis at its defaults, as before.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub coalesce: CoalesceConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Browser pages on other origins (see [`crate::cors`]).
    #[serde(default)]
    pub cors: CorsConfig,
    /// Usage tiers, `[tier.<name>]`: what an API key of that tier may do.
    #[serde(default, rename = "tier")]
    pub tiers: BTreeMap<String, TierConfig>,
    /// Named queries, `[query.<name>]`.
    #[serde(default, rename = "query")]
    pub queries: BTreeMap<String, QueryConfig>,
    /// Streamed exports, `[export.<name>]`: like queries, never cached
    /// (`ttl` and `grace` do not apply).
    #[serde(default, rename = "export")]
    pub exports: BTreeMap<String, QueryConfig>,
    /// The warm-up scheduler's settings (see [`crate::warmup`]).
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// Warm-up jobs, `[[warmup]]` (see [`crate::warmup`]).
    #[serde(default)]
    pub warmup: Vec<WarmupConfig>,
    /// Demand counting for popularity-driven warm-up (see [`crate::popularity`]).
    #[serde(default)]
    pub popularity: PopularityConfig,
    /// The ClickHouse-compatible HTTP endpoint for BI tools.
    #[serde(default)]
    pub clickhouse_http: ClickHouseHttpConfig,
    /// The file this config was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
    /// Where each key is written in that file.
    #[serde(skip)]
    pub lines: Lines,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Which `/v1/*` requests get a log line (see [`RequestLog`]).
    pub request_log: RequestLog,
    /// With `request_log = "sampled"`: the share of successful requests
    /// logged, 0.0 to 1.0 (errors are always logged).
    pub request_log_sample: f64,
    /// `[proxy.tls]`: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) instead of
    /// plain HTTP.
    pub tls: Option<ListenerTls>,
    /// Threads serving requests; 0: one per core. Fewer cost less CPU per
    /// request (fewer hand-offs between threads) where the proxy shares a
    /// small host with ClickHouse (BENCHMARKS.md).
    pub worker_threads: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shutdown_grace: Duration::from_secs(30),
            request_log: RequestLog::default(),
            request_log_sample: 0.01,
            tls: None,
            worker_threads: 0,
        }
    }
}

/// The proxy's access log: one line per `/v1/*` request costs about a
/// quarter of hot-hit throughput (BENCHMARKS.md), so production logs errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestLog {
    /// No request lines (metrics still count every request).
    Off,
    /// Answers with status 400 and above (429s and 5xx included).
    #[default]
    Errors,
    /// Errors, and `request_log_sample` of the rest.
    Sampled,
    /// Every request.
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// ClickHouse HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub user: String,
    /// Prefer the environment variable `DASHCACHE_CLICKHOUSE_PASSWORD`.
    pub password: Option<String>,
    /// For `https://` URLs: the CAs (PEM bundle) that sign the servers'
    /// certificates (default: the Mozilla roots built into the binary).
    pub ca: Option<PathBuf>,
    /// ClickHouse `readonly` level of every query: 1 (no writes, no settings
    /// changes, no table functions beyond what the URL sets), or 2 for servers
    /// that refuse per-query limits under 1.
    pub readonly: u8,
    /// Per-query wall-clock limit (ClickHouse `max_execution_time`).
    #[serde(with = "humantime_serde")]
    pub max_execution_time: Duration,
    /// Per-query result limits (`max_result_rows`, `max_result_bytes`).
    pub max_result_rows: u64,
    pub max_result_bytes: u64,
    /// Several servers with the same data: when given, they replace `url`.
    /// Queries go to the healthy replica with the fewest queries in flight
    /// per unit of weight (see [`crate::upstream`]).
    pub replicas: Vec<ReplicaConfig>,
    /// Servers for exports only, so big downloads do not compete with
    /// dashboards (default: the same replicas as queries).
    pub export_replicas: Vec<ReplicaConfig>,
    /// How often every replica is checked with `SELECT 1`.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// How long a check may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    /// Failed checks in a row that eject a replica (a query that cannot
    /// connect ejects it at once); one good check re-admits it.
    pub eject_after: u32,
    /// Computations (misses, refreshes, warm-ups) one process runs at
    /// ClickHouse at once; exports are not counted.
    pub max_in_flight: usize,
    /// Computations that may wait for a slot; more are refused at once.
    pub max_queued: usize,
    /// The longest wait for a slot.
    #[serde(with = "humantime_serde")]
    pub queue_wait: Duration,
    /// `server` (ClickHouse over HTTP, the default) or `embedded` (ClickHouse's
    /// engine in this process, chDB, on `data_path`).
    pub engine: Engine,
    /// The embedded engine's data directory (relative to the config file).
    pub data_path: Option<PathBuf>,
    /// The embedded engine's `libchdb.so` (`scripts/chdb` prints its path;
    /// `DASHCACHE_CHDB_LIB` overrides it; relative to the config file).
    pub library: Option<PathBuf>,
    /// Embedded queries running at once, each on a blocking thread.
    pub connections: usize,
}

/// Which engine answers queries (`[clickhouse] engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Server,
    Embedded,
}

/// One ClickHouse server of `[clickhouse] replicas`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Its HTTP interface, e.g. `http://10.0.0.2:8123`.
    pub url: String,
    /// Its share of the queries relative to the others (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Whether a URL's scheme is `https` (any case).
pub fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

fn default_weight() -> u32 {
    1
}

impl ClickHouseConfig {
    /// The servers for queries: `replicas`, or `url` as a list of one.
    /// Whether any server is reached over `https://`.
    pub fn uses_tls(&self) -> bool {
        self.query_replicas()
            .iter()
            .chain(&self.export_replicas)
            .any(|r| is_https(&r.url))
    }

    pub fn query_replicas(&self) -> Vec<ReplicaConfig> {
        if self.replicas.is_empty() {
            vec![ReplicaConfig {
                url: self.url.clone(),
                weight: 1,
            }]
        } else {
            self.replicas.clone()
        }
    }
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            user: "default".into(),
            password: None,
            ca: None,
            readonly: 1,
            max_execution_time: Duration::from_secs(30),
            max_result_rows: 1_000_000,
            max_result_bytes: 256 << 20,
            replicas: Vec::new(),
            export_replicas: Vec::new(),
            health_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(1),
            eject_after: 2,
            max_in_flight: 64,
            max_queued: 1024,
            queue_wait: Duration::from_secs(10),
            engine: Engine::Server,
            data_path: None,
            library: None,
            connections: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`; `DASHCACHE_REDIS_URL` overrides it.
    pub url: String,
    /// Upper bound on one Redis round trip; past it the request goes on without Redis.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// After a Redis failure, how long to skip Redis before trying again.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Redis Cluster: some of its nodes (`redis://host:port`); the others are
    /// discovered. When given, `url` is not used.
    pub cluster_nodes: Vec<String>,
    /// Sentinel: the monitored master's name and the sentinels to ask for it
    /// (`redis://host:26379`). The master's password and db come from `url`.
    pub sentinel_master: Option<String>,
    pub sentinel_addresses: Vec<String>,
    /// For `rediss://` URLs (single server or Cluster): the CAs (PEM bundle)
    /// that sign the servers' certificates (default: the system's trust store).
    pub ca: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            timeout: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
            cluster_nodes: Vec::new(),
            sentinel_master: None,
            sentinel_addresses: Vec::new(),
            ca: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Prefix of every Redis key dashcache writes.
    pub key_prefix: String,
    /// Answers larger than this are streamed but not stored.
    pub max_entry_bytes: usize,
    /// TTL of queries that do not set their own.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// How long past its freshness an answer may still be served (STALE) while
    /// it is refreshed, or while ClickHouse fails; queries may set their own.
    #[serde(with = "humantime_serde")]
    pub default_grace: Duration,
    /// XFetch's beta: above 1 refreshes earlier, below 1 later, 0 never early.
    pub xfetch_beta: f64,
    /// A read in this last share of an answer's TTL (0.0–1.0) starts a
    /// background refresh, so answers that are being read never expire
    /// however cheap they are (XFetch alone favours slow queries).
    pub early_refresh: f64,
    /// Answers being read are refreshed just before they expire (one timer per
    /// answer, armed by its first `HIT`): at most this many at once (0: off).
    pub refresh_ahead_keys: usize,
    /// `now` in relative times (`now-7d`) is rounded down to this step when a
    /// request or refresh resolves it (so the range an answer states is whole minutes).
    #[serde(with = "humantime_serde")]
    pub now_step: Duration,
    /// In-process cache in front of Redis: total body bytes (0 disables it).
    pub l1_max_bytes: u64,
    /// How long an answer stays in the in-process cache (never past its freshness).
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    /// Without `[redis]`: the bytes of answers (bodies as stored, headers and
    /// keys) the process keeps in memory, through their stale window.
    pub memory_max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            key_prefix: "dashcache".into(),
            max_entry_bytes: 8 << 20,
            default_ttl: Duration::from_secs(300),
            default_grace: Duration::from_secs(3600),
            xfetch_beta: 1.0,
            early_refresh: 0.2,
            refresh_ahead_keys: 10_000,
            now_step: Duration::from_secs(60),
            l1_max_bytes: 64 << 20,
            l1_ttl: Duration::from_secs(2),
            memory_max_bytes: 256 << 20,
        }
    }
}

/// The control store (run history, API keys).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (the file and its directory are created if missing; a
    /// relative PATH is relative to the config file) or `postgres://…`;
    /// `DASHCACHE_STORE_URL` overrides it (taken as it is).
    pub url: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://dashcache-control.db".into(),
        }
    }
}

/// API keys: where they are checked and how fast changes reach the proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How often the proxy re-reads keys from the control store (new,
    /// revoked and expired keys take effect within this).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Whether `/metrics` needs an API key (of a tier with `operator = true`,
    /// like `/status.json` always does).
    pub protect_metrics: bool,
    /// Whether `/healthz` needs an API key.
    pub protect_health: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            reload_interval: Duration::from_secs(2),
            protect_metrics: false,
            protect_health: false,
        }
    }
}

/// One `[tier.<name>]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Sustained request rate per key.
    pub requests_per_minute: u32,
    /// Requests a key may make at once after being idle.
    pub burst: u32,
    /// Requests per key waiting on ClickHouse at once, per proxy process.
    #[serde(default = "default_concurrent_misses")]
    pub max_concurrent_misses: usize,
    /// Requests of one key that may wait, in arrival order, for one of its
    /// `max_concurrent_misses` slots (a dashboard loading many cold panels at
    /// once); past that, 429.
    #[serde(default = "default_miss_queue")]
    pub miss_queue: usize,
    /// How long a request waits in that queue before it gets 429.
    #[serde(default = "default_miss_queue_wait", with = "humantime_serde")]
    pub miss_queue_wait: Duration,
    /// Queries this tier may call (`"*"`: all).
    #[serde(default)]
    pub queries: Vec<String>,
    /// Exports this tier may call (`"*"`: all).
    #[serde(default)]
    pub exports: Vec<String>,
    /// Largest export, in rows and bytes (0: no limit beyond ClickHouse's).
    #[serde(default)]
    pub export_max_rows: u64,
    #[serde(default)]
    pub export_max_bytes: u64,
    /// Wall-clock limit of one export (ClickHouse `max_execution_time`).
    #[serde(default = "default_export_duration", with = "humantime_serde")]
    pub export_max_duration: Duration,
    /// Answers this young count as fresh for this tier even past the query's
    /// TTL: cheaper tiers see slightly older numbers and cost less.
    #[serde(default, with = "humantime_serde")]
    pub min_ttl: Option<Duration>,
    /// Whether keys of this tier may use the ClickHouse-compatible endpoint
    /// (`[clickhouse_http]`).
    #[serde(default)]
    pub clickhouse_http: bool,
    /// The ClickHouse user its statements there run as (default:
    /// `clickhouse.user`); its password comes from the environment
    /// (`DASHCACHE_CLICKHOUSE_PASSWORD_<USER>`), never from the client.
    #[serde(default)]
    pub clickhouse_user: Option<String>,
    /// Whether keys of this tier may read the operator pages: `/status.json`
    /// (always needs such a key) and `/metrics` (with `auth.protect_metrics`).
    /// They name tenants, API keys per tier and requested parameters, so a
    /// tenant's key must not read them.
    #[serde(default)]
    pub operator: bool,
}

fn default_concurrent_misses() -> usize {
    4
}

fn default_miss_queue() -> usize {
    64
}

fn default_miss_queue_wait() -> Duration {
    Duration::from_secs(10)
}

fn default_export_duration() -> Duration {
    Duration::from_secs(600)
}

/// How concurrent misses for one key wait for a single computation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoalesceConfig {
    /// Requests that may wait on one key in one process; more get 503.
    pub max_waiters: usize,
    /// How long a request waits for the first byte of a coalesced answer.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Lifetime of the Redis lock that makes one process compute a key; the
    /// holder renews it while computing, so it only expires when the holder dies.
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// How often processes waiting on another's lock look for the answer.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// After a key's computation failed, it is not tried again for this long
    /// (doubling with each failure in a row, jittered; 0 disables).
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// The longest such wait.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        Self {
            max_waiters: 4096,
            wait_timeout: Duration::from_secs(35),
            lock_ttl: Duration::from_secs(10),
            poll_interval: Duration::from_millis(20),
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// One `[query.<name>]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// SQL template path, relative to the config file. May name an enum
    /// parameter, e.g. `queries/revenue_{granularity}.sql`: one file per value.
    pub sql: String,
    #[serde(default)]
    pub description: Option<String>,
    /// How long an answer stays fresh (defaults to `cache.default_ttl`).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// How long a stale answer may still be served (defaults to `cache.default_grace`).
    #[serde(default, with = "humantime_serde")]
    pub grace: Option<Duration>,
    #[serde(default)]
    pub params: BTreeMap<String, ParamConfig>,
    /// The time range rule for queries that read a time range.
    #[serde(default)]
    pub range: Option<RangeConfig>,
}

/// The declared type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// A point in time: `YYYY-MM-DD`, RFC 3339, or relative (`today`, `now-7d`).
    Time,
    /// One of `values`.
    Enum,
    /// A whole number within `min`..=`max`.
    Int,
    /// A string matching `pattern` (anchored) and at most `max_len` long.
    String,
}

/// A default, written as in TOML (`default = "day"` or `default = 10`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DefaultValue {
    Int(i64),
    Str(String),
}

impl DefaultValue {
    /// The default as the text a URL would carry.
    pub fn as_text(&self) -> String {
        match self {
            DefaultValue::Int(n) => n.to_string(),
            DefaultValue::Str(s) => s.clone(),
        }
    }
}

/// One `[query.<name>.params.<param>]` table. Its `type` says which keys it
/// may have: a key that belongs to another type (`pattern` on an `int`) is an
/// error naming the key, like any unknown key.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ParamConfig {
    /// A point in time: `YYYY-MM-DD`, RFC 3339, or relative (`today`, `now-7d`).
    Time(TimeParam),
    /// One of `values`.
    Enum(EnumParam),
    /// A whole number within `min`..=`max`.
    Int(IntParam),
    /// A string matching `pattern` (anchored) or one of `values`, at most `max_len` long.
    String(StringParam),
}

/// What every parameter type has (each type's table repeats these keys:
/// serde cannot flatten into a table that refuses unknown keys).
#[derive(Debug, Clone, Default)]
pub struct ParamCommon {
    pub required: bool,
    pub default: Option<DefaultValue>,
    pub description: Option<String>,
    /// Accept a comma-separated list (`country=DE,FR`); bound as an array.
    pub list: bool,
    pub max_items: Option<usize>,
}

/// `type = "time"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeParam {
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<DefaultValue>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub list: bool,
    #[serde(default)]
    pub max_items: Option<usize>,
}

/// `type = "enum"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnumParam {
    /// The allowed values.
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<DefaultValue>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub list: bool,
    #[serde(default)]
    pub max_items: Option<usize>,
}

/// `type = "int"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntParam {
    #[serde(default)]
    pub min: Option<i64>,
    #[serde(default)]
    pub max: Option<i64>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<DefaultValue>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub list: bool,
    #[serde(default)]
    pub max_items: Option<usize>,
}

/// `type = "string"`: needs a `pattern` or `values`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StringParam {
    /// Anchored regular expression every value must match.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Allowed values.
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub max_len: Option<usize>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<DefaultValue>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub list: bool,
    #[serde(default)]
    pub max_items: Option<usize>,
}

impl ParamConfig {
    pub fn kind(&self) -> ParamType {
        match self {
            ParamConfig::Time(_) => ParamType::Time,
            ParamConfig::Enum(_) => ParamType::Enum,
            ParamConfig::Int(_) => ParamType::Int,
            ParamConfig::String(_) => ParamType::String,
        }
    }

    /// The keys every type has.
    pub fn common(&self) -> ParamCommon {
        macro_rules! common {
            ($p:expr) => {
                ParamCommon {
                    required: $p.required,
                    default: $p.default.clone(),
                    description: $p.description.clone(),
                    list: $p.list,
                    max_items: $p.max_items,
                }
            };
        }
        match self {
            ParamConfig::Time(p) => common!(p),
            ParamConfig::Enum(p) => common!(p),
            ParamConfig::Int(p) => common!(p),
            ParamConfig::String(p) => common!(p),
        }
    }
}

/// The time-range rule of a query: which parameters bound it, and how wide it may be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeConfig {
    /// Names of the `time` parameters that start (inclusive) and end (exclusive) the range.
    pub from: String,
    pub to: String,
    /// The enum parameter the maximum span depends on, if any.
    #[serde(default)]
    pub granularity: Option<String>,
    /// One maximum span, or one per granularity value.
    pub max_span: MaxSpan,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MaxSpan {
    One(#[serde(with = "humantime_serde")] Duration),
    ByGranularity(BTreeMap<String, humantime_serde::Serde<Duration>>),
}

impl Config {
    /// Reads and parses a config file; applies environment overrides for secrets.
    /// Relative paths in the file (SQL templates, a SQLite control store, TLS files)
    /// resolve against the file's directory, wherever the process was started.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.apply_env(|name| std::env::var(name).ok());
        Ok(config)
    }

    /// Parses config text; `path` is used for messages and relative paths.
    /// Only the shape is checked here; [`crate::check`] checks the values.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let starts = LineStarts::new(text);
        let diagnostic = |line: Option<usize>, err: &toml::de::Error| {
            ConfigError::Parse(Diagnostic {
                file: path.to_owned(),
                line,
                reason: err.message().to_owned(),
            })
        };
        let doc = DeTable::parse(text)
            .map_err(|err| diagnostic(err.span().map(|s| starts.line(s.start)), &err))?;
        let lines = Lines::index(&doc, &starts);
        let mut config = Config::deserialize(toml::de::Deserializer::from(doc))
            .map_err(|err| diagnostic(lines.of_error(&err, &starts), &err))?;
        config.path = path.to_owned();
        config.lines = lines;
        config.store.url = sqlite_url_against(&config.store.url, config.base_dir());
        let base = config.base_dir().to_owned();
        for path in [
            &mut config.clickhouse.data_path,
            &mut config.clickhouse.library,
        ]
        .into_iter()
        .flatten()
        {
            *path = base.join(&*path);
        }
        if let Some(tls) = &mut config.proxy.tls {
            tls.resolve_against(&base);
        }
        let redis_ca = config.redis.as_mut().map(|r| &mut r.ca);
        for ca in [Some(&mut config.clickhouse.ca), redis_ca]
            .into_iter()
            .flatten()
        {
            if let Some(ca) = ca
                && ca.is_relative()
            {
                *ca = base.join(&*ca);
            }
        }
        Ok(config)
    }

    /// Secrets and endpoints may come from the environment instead of the file.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(url) = var("DASHCACHE_CLICKHOUSE_URL") {
            self.clickhouse.url = url;
        }
        if let Some(password) = var("DASHCACHE_CLICKHOUSE_PASSWORD") {
            self.clickhouse.password = Some(password);
        }
        if let Some(library) = var("DASHCACHE_CHDB_LIB").filter(|l| !l.is_empty()) {
            self.clickhouse.library = Some(PathBuf::from(library));
        }
        if let Some(url) = var("DASHCACHE_REDIS_URL") {
            self.redis.get_or_insert_with(RedisConfig::default).url = url;
        }
        if let Some(url) = var("DASHCACHE_STORE_URL") {
            self.store.url = url;
        }
    }

    /// How long answers must stay in Redis after creation: the longest tier
    /// `min_ttl`, so cheaper tiers find the older answers they accept.
    pub fn min_retention(&self) -> Duration {
        self.tiers
            .values()
            .filter_map(|t| t.min_ttl)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// The directory relative paths in this config are resolved against.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The password of ClickHouse user `user`: `clickhouse.password` for
    /// `clickhouse.user`, else `DASHCACHE_CLICKHOUSE_PASSWORD_<USER>` (upper
    /// case, other characters than letters and digits as `_`), if set.
    pub fn clickhouse_password(&self, user: &str) -> Option<String> {
        if user == self.clickhouse.user {
            return self.clickhouse.password.clone();
        }
        std::env::var(clickhouse_password_var(user)).ok()
    }

    /// A problem with the key at `path` (or its nearest written table).
    pub fn diagnostic(&self, path: &[&str], reason: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.path.clone(),
            line: self.lines.of(path),
            reason: reason.into(),
        }
    }
}

/// The environment variable holding ClickHouse user `user`'s password.
pub fn clickhouse_password_var(user: &str) -> String {
    let name: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("DASHCACHE_CLICKHOUSE_PASSWORD_{name}")
}

/// A `sqlite:` URL whose file path is relative, made absolute against `base`
/// (the config file's directory); other URLs (and `:memory:`) as they are.
pub fn sqlite_url_against(url: &str, base: &Path) -> String {
    let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    else {
        return url.to_owned();
    };
    let (file, options) = match rest.split_once('?') {
        Some((file, options)) => (file, Some(options)),
        None => (rest, None),
    };
    if file.is_empty() || file.starts_with(':') || Path::new(file).is_absolute() {
        return url.to_owned();
    }
    let absolute = base.join(file);
    match options {
        Some(options) => format!("sqlite://{}?{options}", absolute.display()),
        None => format!("sqlite://{}", absolute.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_sqlite_store_resolves_against_the_config_file() {
        let base = Path::new("/etc/dashcache");
        assert_eq!(
            sqlite_url_against("sqlite://.services/control.db", base),
            "sqlite:///etc/dashcache/.services/control.db"
        );
        assert_eq!(
            sqlite_url_against("sqlite:c.db?mode=rwc", base),
            "sqlite:///etc/dashcache/c.db?mode=rwc"
        );
        for unchanged in [
            "sqlite:///var/lib/dashcache/control.db",
            "sqlite::memory:",
            "postgres://u@h/db",
        ] {
            assert_eq!(sqlite_url_against(unchanged, base), unchanged);
        }
        let config = Config::parse("", Path::new("/srv/dc/config.toml")).unwrap();
        assert_eq!(config.store.url, "sqlite:///srv/dc/dashcache-control.db");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key_and_line() {
        let err = Config::parse(
            "[redis]\nurl = \"redis://x\"\nttl = 5\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("c.toml"), "{err}");
        assert!(err.contains("ttl"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn lines_are_found_however_a_key_is_written() {
        let text = "[scheduler]\ntimezone = \"x\"\n\n[[warmup]]\nname = \"a\"\ncron = \"x\"\n\n\
                    [[warmup]]\nname = \"b\"\nmatrix = { window = [\"hour\"] }\n[warmup.params]\n\n\
                    [tier.free]\nrequests_per_minute = 1\nburst = 1\nqueries = [\n  \"a\",\n  \"b\",\n]\n";
        let doc = DeTable::parse(text).unwrap();
        let lines = Lines::index(&doc, &LineStarts::new(text));
        assert_eq!(lines.of(&["scheduler", "timezone"]), Some(2));
        assert_eq!(lines.of(&["warmup", "0"]), Some(4));
        assert_eq!(lines.of(&["warmup", "0", "cron"]), Some(6));
        assert_eq!(lines.of(&["warmup", "1", "matrix", "window"]), Some(10));
        assert_eq!(lines.of(&["warmup", "1", "params"]), Some(11));
        // A key that is not written: its table.
        assert_eq!(lines.of(&["warmup", "1", "tenants"]), Some(8));
        assert_eq!(lines.of(&["tier", "free", "queries", "1"]), Some(18));
        assert_eq!(lines.of(&["nowhere"]), None);
    }

    #[test]
    fn a_key_of_another_parameter_type_is_reported_at_its_line() {
        let text = "[query.q]\nsql = \"q.sql\"\n[query.q.params.limit]\ntype = \"int\"\nmin = 1\npattern = \"[0-9]+\"\n";
        let err = Config::parse(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.toml: line 6: unknown field `pattern`"),
            "{err}"
        );
    }

    #[test]
    fn defaults_fill_missing_sections() {
        let config = Config::parse("", Path::new("c.toml")).unwrap();
        assert_eq!(config.clickhouse.url, "http://127.0.0.1:8123");
        assert_eq!(config.cache.max_entry_bytes, 8 << 20);
        assert!(config.queries.is_empty());
    }

    #[test]
    fn environment_overrides_secrets() {
        let mut config = Config::parse("", Path::new("c.toml")).unwrap();
        config.apply_env(|name| match name {
            "DASHCACHE_REDIS_URL" => Some("redis://:pw@10.0.0.1:6380".into()),
            "DASHCACHE_CLICKHOUSE_PASSWORD" => Some("secret".into()),
            _ => None,
        });
        assert_eq!(
            config.redis.as_ref().map(|r| r.url.as_str()),
            Some("redis://:pw@10.0.0.1:6380")
        );
        assert_eq!(config.clickhouse.password.as_deref(), Some("secret"));
    }

    #[test]
    fn redis_is_absent_only_without_a_table_and_without_the_environment() {
        let path = Path::new("c.toml");
        let none = Config::parse("[cache]\nkey_prefix = \"x\"\n", path).unwrap();
        assert!(none.redis.is_none());
        // An empty table is Redis at its defaults, as it always was.
        let empty = Config::parse("[redis]\n", path).unwrap();
        assert_eq!(
            empty.redis.map(|r| r.url),
            Some("redis://127.0.0.1:6379".to_owned())
        );
        let mut from_env = Config::parse("", path).unwrap();
        from_env.apply_env(|name| {
            (name == "DASHCACHE_REDIS_URL").then(|| "redis://10.0.0.2:6379".to_owned())
        });
        assert_eq!(
            from_env.redis.map(|r| r.timeout),
            Some(Duration::from_millis(250))
        );
    }
}
