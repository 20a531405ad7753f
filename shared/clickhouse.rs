//! ClickHouse over its HTTP interface, with the safety rules every query gets.
//!
//! Owns sending rendered SQL (read-only, with per-query limits and a query id)
//! through the `clickhouse` crate, and reading the answer back as raw chunks
//! ([`Answer`]) without ever passing an error off as data: ClickHouse (18.16 and
//! later) reports a failure that happens after the first block by appending the
//! exception text to a `200 OK` body. [`Answer`] holds back the last
//! [`TAIL_HOLDBACK`] bytes of every body and checks them at the end, so such a
//! body fails instead of being served or cached. Small answers are held whole,
//! so their failures become clean HTTP errors before any byte is sent. The
//! check matches only the server's exact framings where the server puts them
//! ([`exception_start`]), so data that merely mentions an exception (TSV
//! strings are unquoted) is served as data.
//!
//! With several replicas (`[clickhouse] replicas`), [`crate::upstream`] picks
//! the server of each query; a query whose server cannot be reached before its
//! first byte (a network error: refused, reset, unreachable) moves to another
//! replica, each tried at most once. A query that has started streaming is
//! never retried. The replica of each running query is remembered so that
//! [`ClickHouse::kill`] reaches the server that runs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use clickhouse::query::BytesCursor;
use futures_util::FutureExt as _;

use crate::config::{ClickHouseConfig, Engine, ReplicaConfig, is_https};
use crate::direct::{DirectCursor, Target};
use crate::engine::chdb::ChdbError;
use crate::engine::embedded::{Embedded, EmbeddedAnswer};
pub use crate::exception::error_code;
use crate::format::Format;
pub use crate::holdback::TAIL_HOLDBACK;
use crate::holdback::{GATHER, Holdback};
use crate::metrics::{KindLabels, Metrics};
use crate::outcome::AttemptOutcome;
use crate::upstream::{InFlight, Pool};

/// ClickHouse error code for "timeout exceeded" (`max_execution_time`).
const TIMEOUT_CODE: u32 = 159;

/// Why a query produced no (complete) answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("ClickHouse is unreachable: {0}")]
    Connect(String),
    /// An error status before the first byte; `message` is ClickHouse's body.
    #[error("ClickHouse refused the query (code {code:?}): {message}")]
    Query {
        code: Option<u32>,
        message: String,
        /// The HTTP status, when the client saw it (the `clickhouse` crate hides it).
        status: Option<u16>,
    },
    #[error("ClickHouse failed in the middle of the answer (code {code:?}): {message}")]
    Body { code: Option<u32>, message: String },
    #[error("ClickHouse did not answer within {0:?}")]
    Timeout(Duration),
}

impl UpstreamError {
    /// The ClickHouse error code, when ClickHouse gave one.
    pub fn code(&self) -> Option<u32> {
        match self {
            UpstreamError::Query { code, .. } | UpstreamError::Body { code, .. } => *code,
            _ => None,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout(_)) || self.code() == Some(TIMEOUT_CODE)
    }

    /// Whether the failure says ClickHouse itself is unreachable, slow or
    /// overloaded (what a key's backoff is for), rather than that this query
    /// is wrong: no connection, no answer in time, a transfer cut without an
    /// exception, or one of ClickHouse's overload codes (202 too many
    /// simultaneous queries, 241 memory limit exceeded).
    pub fn says_server_unwell(&self) -> bool {
        const OVERLOAD_CODES: [u32; 2] = [202, 241];
        match self {
            UpstreamError::Connect(_) | UpstreamError::Timeout(_) => true,
            _ if self.is_timeout() => true,
            _ => self
                .code()
                .is_none_or(|code| OVERLOAD_CODES.contains(&code)),
        }
    }

    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            _ if self.is_timeout() => "timeout",
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Query { .. } => "status",
            UpstreamError::Body { .. } => "body",
            UpstreamError::Timeout(_) => "timeout",
        }
    }

    fn from_crate(err: clickhouse::error::Error) -> UpstreamError {
        match err {
            clickhouse::error::Error::BadResponse(message) => UpstreamError::Query {
                code: error_code(message.as_bytes()),
                message,
                status: None,
            },
            clickhouse::error::Error::TimedOut => UpstreamError::Timeout(Duration::ZERO),
            other => UpstreamError::Connect(other.to_string()),
        }
    }
}

/// The ClickHouse client with dashcache's query settings.
#[derive(Clone)]
pub struct ClickHouse {
    upstream: Upstream,
    /// `export_replicas`, when configured.
    exports: Option<Upstream>,
    /// `engine = "embedded"`: queries run in process instead (no replicas).
    embedded: Option<EmbeddedBackend>,
    /// Network-side bound on waiting for the next chunk.
    read_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// The embedded engine (or why it could not be opened in this process) and
/// the settings every query carries.
#[derive(Clone)]
struct EmbeddedBackend {
    engine: Result<Arc<Embedded>, Arc<str>>,
    settings: Vec<(String, String)>,
}

/// Opens `[clickhouse]`'s embedded engine: the library, and `data_path`
/// (created when missing).
fn open_embedded(config: &ClickHouseConfig) -> Result<Arc<Embedded>, ChdbError> {
    let library = config.library.clone().unwrap_or_default();
    let Some(data_path) = &config.data_path else {
        return Err(ChdbError::DataPath {
            path: Default::default(),
            reason: "clickhouse.data_path is not set".into(),
        });
    };
    std::fs::create_dir_all(data_path).map_err(|e| ChdbError::DataPath {
        path: data_path.clone(),
        reason: e.to_string(),
    })?;
    Embedded::open(&library, data_path, config.connections)
}

/// The replicas of one upstream: their health and one client each.
/// One query replica as the health checks see it (for `/status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaState {
    pub url: String,
    /// Takes queries (false: ejected).
    pub up: bool,
    pub in_flight: usize,
}

#[derive(Clone)]
struct Upstream {
    /// The health check's bound (`clickhouse.health_timeout`).
    health_timeout: Duration,
    pool: Arc<Pool>,
    /// One per replica, in the pool's order, with every query setting.
    clients: Vec<clickhouse::Client>,
    /// The same replicas for queries on a connection of their own (exports;
    /// `None`: a URL the direct client cannot use, so the pooled one is).
    direct: Vec<Option<Target>>,
    /// The replica of each running query, by query id (for `kill`).
    running: Arc<Mutex<HashMap<String, usize>>>,
}

/// Entries of `running` past this are dropped (answers dropped mid-stream
/// without a kill leave theirs behind).
const MAX_RUNNING: usize = 10_000;

impl Upstream {
    fn new(
        config: &ClickHouseConfig,
        replicas: &[ReplicaConfig],
        tls: Option<&rustls::ClientConfig>,
        metrics: &Arc<Metrics>,
    ) -> Upstream {
        let clients: Vec<clickhouse::Client> = replicas
            .iter()
            .map(|r| client(config, &r.url, tls))
            .collect();
        // (Without `https://` servers no certificate is checked: the built-in
        // roots, never `clickhouse.ca`, which such a config need not read.)
        let direct_tls = match tls {
            Some(tls) => Some(Arc::new(tls.clone())),
            None => crate::tls::client_config(None).ok().map(Arc::new),
        };
        let settings: Vec<(String, String)> = query_settings(config)
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect();
        let direct = replicas
            .iter()
            .map(|r| {
                Target::new(
                    &r.url,
                    &config.user,
                    config.password.as_deref(),
                    settings.clone(),
                    direct_tls.clone()?,
                )
            })
            .collect();
        let pool = Pool::new(replicas, config.eject_after, metrics.clone());
        let probes = clients.clone();
        let timeout = config.health_timeout;
        pool.spawn_checks(config.health_interval, move |index| {
            let client = probes[index].clone();
            async move { probe(&client, timeout).await }
        });
        Upstream {
            health_timeout: timeout,
            pool,
            clients,
            direct,
            running: Arc::default(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `query` on `replica` (nothing is sent until the cursor is read).
    fn start(&self, replica: usize, query: &Pending) -> Result<(Cursor, InFlight), UpstreamError> {
        let settings = query
            .settings
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .chain([("query_id", query.query_id.as_str())]);
        let cursor = match self.direct.get(replica).and_then(Option::as_ref) {
            Some(target) if query.direct => Cursor::Direct(
                target
                    .query(&query.sql, query.format.clickhouse(), settings)
                    .map_err(UpstreamError::from_crate)?,
            ),
            _ => {
                let mut request = self.clients[replica].query_raw(&query.sql);
                for (name, value) in settings {
                    request = request.with_setting(name, value);
                }
                Cursor::Pooled(
                    request
                        .fetch_bytes(query.format.clickhouse())
                        .map_err(UpstreamError::from_crate)?,
                )
            }
        };
        let mut running = self.running();
        if running.len() >= MAX_RUNNING {
            running.clear();
        }
        running.insert(query.query_id.clone(), replica);
        Ok((cursor, self.pool.start(replica)))
    }
}

/// The ClickHouse settings every query carries (as URL parameters), besides
/// its `query_id`: a user whose profile is `readonly=1` must be allowed to
/// change each one (see the README's "ClickHouse user").
pub fn query_settings(config: &ClickHouseConfig) -> Vec<(&'static str, String)> {
    vec![
        ("readonly", config.readonly.to_string()),
        (
            "max_execution_time",
            config.max_execution_time.as_secs().max(1).to_string(),
        ),
        ("max_result_rows", config.max_result_rows.to_string()),
        ("max_result_bytes", config.max_result_bytes.to_string()),
        ("result_overflow_mode", "throw".into()),
        ("output_format_json_quote_64bit_integers", "0".into()),
    ]
}

/// One replica's client with the settings every query carries; over
/// `https://` with `tls` (the server's certificate checked against
/// `clickhouse.ca`).
fn client(
    config: &ClickHouseConfig,
    url: &str,
    tls: Option<&rustls::ClientConfig>,
) -> clickhouse::Client {
    let base = match tls {
        Some(tls) if is_https(url) => {
            // Like the crate's own client (keep-alive; idle connections closed
            // before ClickHouse's 3 s), over TLS.
            let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
            http.set_keepalive(Some(Duration::from_secs(60)));
            let connector = crate::tls::clickhouse_connector(tls.clone(), http);
            clickhouse::Client::with_http_client(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(2))
                    .build(connector),
            )
        }
        _ => clickhouse::Client::default(),
    };
    let mut client = base
        .with_url(url)
        .with_user(&config.user)
        .with_validation(false);
    for (name, value) in query_settings(config) {
        client = client.with_setting(name, value);
    }
    if let Some(password) = &config.password {
        client = client.with_password(password);
    }
    client
}

/// Why a replica failed the health check.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Request(#[from] clickhouse::error::Error),
    #[error("unexpected answer to SELECT 1: {0}")]
    Unexpected(String),
    #[error("no answer to SELECT 1 within {0:?}")]
    Timeout(Duration),
    #[error("no ClickHouse replica configured")]
    NoReplica,
}

/// The background health check: `SELECT 1` within `timeout`.
async fn probe(client: &clickhouse::Client, timeout: Duration) -> Result<(), ProbeError> {
    let check = async {
        let mut cursor = client.query_raw("SELECT 1").fetch_bytes("TSV")?;
        let mut body = Vec::new();
        while let Some(chunk) = cursor.next().await? {
            body.extend_from_slice(&chunk);
        }
        if body.trim_ascii() == b"1" {
            Ok(())
        } else {
            Err(ProbeError::Unexpected(
                String::from_utf8_lossy(&body).into_owned(),
            ))
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

/// What it takes to send a query again, to another replica.
struct Pending {
    sql: String,
    format: Format,
    query_id: String,
    settings: Vec<(String, String)>,
    /// On a connection of its own ([`crate::direct`]): exports.
    direct: bool,
}

/// A query's answer as it arrives from its server.
enum Cursor {
    /// Through the replica's pooled client (the `clickhouse` crate).
    Pooled(BytesCursor),
    /// On a connection of its own, driven by the reader.
    Direct(DirectCursor),
}

impl Cursor {
    async fn next(&mut self) -> Result<Option<Bytes>, clickhouse::error::Error> {
        match self {
            Cursor::Pooled(cursor) => cursor.next().await,
            Cursor::Direct(cursor) => cursor.next().await,
        }
    }
}

impl ClickHouse {
    /// Like [`ClickHouse::new`], but an embedded engine that cannot be
    /// opened (no library, an unusable data path) is an error now.
    pub fn open(config: &ClickHouseConfig, metrics: Arc<Metrics>) -> Result<ClickHouse, ChdbError> {
        if config.engine == Engine::Embedded {
            let engine = open_embedded(config)?;
            return Ok(Self::with_engine(config, metrics, Ok(engine)));
        }
        Ok(Self::new(config, metrics))
    }

    fn with_engine(
        config: &ClickHouseConfig,
        metrics: Arc<Metrics>,
        engine: Result<Arc<Embedded>, Arc<str>>,
    ) -> ClickHouse {
        ClickHouse {
            upstream: Upstream::new(config, &[], None, &metrics),
            exports: None,
            embedded: Some(EmbeddedBackend {
                engine,
                settings: query_settings(config)
                    .into_iter()
                    .map(|(n, v)| (n.to_owned(), v))
                    .collect(),
            }),
            read_timeout: config.max_execution_time + Duration::from_secs(5),
            metrics,
        }
    }

    /// Clients for `[clickhouse]`'s replicas (or its one `url`), with
    /// background health checks while any clone of this value lives. With
    /// `engine = "embedded"` the engine is opened instead; if it cannot be,
    /// every query fails with the reason.
    /// Servers reached over `https://` are checked against `clickhouse.ca`
    /// (read here; the config check has read it already, so a failure means
    /// the file went away since: logged, and those servers fail their TLS
    /// handshakes until a restart).
    pub fn new(config: &ClickHouseConfig, metrics: Arc<Metrics>) -> ClickHouse {
        if config.engine == Engine::Embedded {
            let engine = open_embedded(config).map_err(|e| Arc::from(e.to_string()));
            return Self::with_engine(config, metrics, engine);
        }
        let tls = config
            .uses_tls()
            .then(|| crate::tls::clickhouse_client_config(config));
        let tls = tls.as_ref();
        let upstream = Upstream::new(config, &config.query_replicas(), tls, &metrics);
        let exports = (!config.export_replicas.is_empty())
            .then(|| Upstream::new(config, &config.export_replicas, tls, &metrics));
        ClickHouse {
            upstream,
            exports,
            embedded: None,
            read_timeout: config.max_execution_time + Duration::from_secs(5),
            metrics,
        }
    }

    /// The client for exports: `export_replicas` when configured, else this one.
    pub fn for_exports(&self) -> ClickHouse {
        let mut exports = self.clone();
        if let Some(upstream) = exports.exports.take() {
            exports.upstream = upstream;
        }
        exports
    }

    /// Whether some replica answers the health check (`SELECT 1` within
    /// `clickhouse.health_timeout`) now; the first failure's text otherwise.
    /// The same probe as the background checks; not counted as a query.
    pub async fn ping(&self) -> Result<(), ProbeError> {
        if let Some(embedded) = &self.embedded {
            let engine = embedded
                .engine
                .as_ref()
                .map_err(|e| ProbeError::Unexpected(e.to_string()))?;
            let mut answer = engine.query("SELECT 1", "TSV", "dashcache-ping", Vec::new());
            let mut body = Vec::new();
            let read = async {
                while let Some(chunk) = answer.next().await? {
                    body.extend_from_slice(&chunk);
                }
                Ok::<_, ChdbError>(())
            };
            return match tokio::time::timeout(self.upstream.health_timeout, read).await {
                Err(_) => Err(ProbeError::Timeout(self.upstream.health_timeout)),
                Ok(Err(err)) => Err(ProbeError::Unexpected(err.to_string())),
                Ok(Ok(())) if body.trim_ascii() == b"1" => Ok(()),
                Ok(Ok(())) => Err(ProbeError::Unexpected(
                    String::from_utf8_lossy(&body).into_owned(),
                )),
            };
        }
        let mut first_error = None;
        for client in &self.upstream.clients {
            match probe(client, self.upstream.health_timeout).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        Err(first_error.unwrap_or(ProbeError::NoReplica))
    }

    /// How many replicas queries choose from.
    /// Each query replica's URL, whether it takes queries, and its queries in flight.
    pub fn replica_states(&self) -> Vec<ReplicaState> {
        let pool = &self.upstream.pool;
        (0..pool.len())
            .map(|index| {
                let replica = pool.replica(index);
                ReplicaState {
                    url: replica.name.clone(),
                    up: replica.is_up(),
                    in_flight: replica.in_flight(),
                }
            })
            .collect()
    }

    pub fn replicas(&self) -> usize {
        if self.embedded.is_some() {
            return 1;
        }
        self.upstream.pool.len()
    }

    /// Whether some replica is up (not ejected): false from the moment the
    /// last one is ejected until a health check re-admits one.
    pub fn available(&self) -> bool {
        self.upstream.pool.any_up()
    }

    /// This client with extra ClickHouse settings on every query (e.g. a
    /// warm-up job's `max_threads`), on top of the ones every query carries.
    pub fn with_settings<'a>(
        mut self,
        settings: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> ClickHouse {
        for (name, value) in settings {
            if name == "max_execution_time"
                && let Ok(secs) = value.parse::<u64>()
            {
                self.read_timeout = Duration::from_secs(secs) + Duration::from_secs(5);
            }
            if let Some(embedded) = &mut self.embedded {
                embedded.settings.retain(|(n, _)| n != name);
                embedded.settings.push((name.to_owned(), value.to_owned()));
            }
            for upstream in std::iter::once(&mut self.upstream).chain(self.exports.as_mut()) {
                for client in &mut upstream.clients {
                    *client = client.clone().with_setting(name, value);
                }
                for target in upstream.direct.iter_mut().flatten() {
                    target.set(name, value);
                }
            }
        }
        self
    }

    /// Starts `sql` and returns its answer as a stream of safe chunks.
    pub fn query(
        &self,
        sql: &str,
        format: Format,
        query_id: &str,
    ) -> Result<Answer, UpstreamError> {
        self.start(sql, format, query_id, &[], false)
    }

    /// An export: like [`ClickHouse::query`], with settings for this query
    /// only (the tier's limits; a `max_execution_time` also bounds the read
    /// timeout), on a connection of its own that the answer's reader drives
    /// ([`crate::direct`]: no hand-off per chunk).
    pub fn export(
        &self,
        sql: &str,
        format: Format,
        query_id: &str,
        settings: &[(&str, String)],
    ) -> Result<Answer, UpstreamError> {
        self.start(sql, format, query_id, settings, true)
    }

    fn start(
        &self,
        sql: &str,
        format: Format,
        query_id: &str,
        settings: &[(&str, String)],
        direct: bool,
    ) -> Result<Answer, UpstreamError> {
        self.metrics.clickhouse_queries.inc();
        let mut read_timeout = self.read_timeout;
        for (name, value) in settings {
            if *name == "max_execution_time"
                && let Ok(secs) = value.parse::<u64>()
            {
                read_timeout = Duration::from_secs(secs) + Duration::from_secs(5);
            }
        }
        if let Some(embedded) = &self.embedded {
            let engine = embedded.engine.as_ref().map_err(|e| {
                counted(
                    &self.metrics,
                    UpstreamError::Connect(format!("the embedded engine is not available: {e}")),
                )
            })?;
            let mut all = embedded.settings.clone();
            for (name, value) in settings {
                all.retain(|(n, _)| n != name);
                all.push(((*name).to_owned(), value.clone()));
            }
            let answer = engine.query(sql, format.clickhouse(), query_id, all);
            return Ok(Answer::new(
                Feed::Embedded(answer),
                format,
                read_timeout,
                self.metrics.clone(),
            ));
        }
        let pending = Pending {
            sql: sql.to_owned(),
            format,
            query_id: query_id.to_owned(),
            settings: settings
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.clone()))
                .collect(),
            direct,
        };
        let replica = self
            .upstream
            .pool
            .pick(&[])
            .ok_or_else(|| UpstreamError::Connect("no ClickHouse replica configured".into()))?;
        let (cursor, in_flight) = self
            .upstream
            .start(replica, &pending)
            .map_err(|e| counted(&self.metrics, e))?;
        let source = Source {
            upstream: self.upstream.clone(),
            query_id: query_id.to_owned(),
            in_flight,
            pending: Some(pending),
            tried: vec![replica],
            metrics: self.metrics.clone(),
        };
        Ok(Answer::new(
            Feed::Server { cursor, source },
            format,
            read_timeout,
            self.metrics.clone(),
        ))
    }

    /// Asks ClickHouse to stop a query (its id is one dashcache made), on the
    /// replica that runs it (on every replica if that is not known).
    pub async fn kill(&self, query_id: &str) -> Result<(), UpstreamError> {
        if let Some(embedded) = &self.embedded {
            if let Ok(engine) = &embedded.engine {
                engine.kill(query_id);
            }
            return Ok(());
        }
        if !query_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Ok(());
        }
        let upstream = &self.upstream;
        let replicas: Vec<usize> = match upstream.running().remove(query_id) {
            Some(replica) => vec![replica],
            None => (0..upstream.clients.len()).collect(),
        };
        let sql = format!("KILL QUERY WHERE query_id = '{query_id}' ASYNC");
        let mut result = Ok(());
        for replica in replicas {
            let kill = async {
                let mut cursor = upstream.clients[replica]
                    .query_raw(&sql)
                    .fetch_bytes("TSV")
                    .map_err(UpstreamError::from_crate)?;
                while cursor
                    .next()
                    .await
                    .map_err(UpstreamError::from_crate)?
                    .is_some()
                {}
                Ok(())
            };
            if let Err(err) = kill.await {
                result = Err(err);
            }
        }
        result
    }
}

/// Where an answer's bytes come from: the replica it runs on, and until its
/// first byte, what it takes to move it to another replica.
struct Source {
    upstream: Upstream,
    query_id: String,
    in_flight: InFlight,
    /// `None` once the first byte (or the end) arrived: no failover after that.
    pending: Option<Pending>,
    tried: Vec<usize>,
    metrics: Arc<Metrics>,
}

impl Source {
    /// Reads the next chunk of `cursor`; before the first byte, a network
    /// error ejects the replica and starts the query on an untried one.
    async fn next(
        &mut self,
        cursor: &mut Cursor,
    ) -> Result<Option<Bytes>, clickhouse::error::Error> {
        // At most one attempt per replica.
        for _ in 0..=self.upstream.pool.len() {
            let err = match cursor.next().await {
                Ok(chunk) => {
                    if self.pending.is_some() {
                        self.metrics.attempt(AttemptOutcome::Sent);
                    }
                    self.pending = None;
                    if chunk.is_none() {
                        self.done();
                    }
                    return Ok(chunk);
                }
                Err(err) => err,
            };
            if self.pending.is_none() || !matches!(err, clickhouse::error::Error::Network(_)) {
                if self.pending.is_some() {
                    self.metrics.attempt(AttemptOutcome::Sent);
                }
                self.done();
                return Err(err);
            }
            let failed = self.in_flight.replica();
            self.upstream.pool.unreachable(failed, &err);
            let Some(next) = self.upstream.pool.pick(&self.tried) else {
                self.metrics.attempt(AttemptOutcome::Unreachable);
                self.done();
                return Err(err);
            };
            self.tried.push(next);
            tracing::warn!(
                from = %self.upstream.pool.replica(failed).name,
                to = %self.upstream.pool.replica(next).name,
                error = %err,
                "ClickHouse replica unreachable; query moved"
            );
            self.metrics.clickhouse_failovers.inc();
            let Some(pending) = self.pending.as_ref() else {
                return Err(err);
            };
            match self.upstream.start(next, pending) {
                Ok((again, in_flight)) => {
                    *cursor = again;
                    self.in_flight = in_flight;
                }
                Err(_) => {
                    self.metrics.attempt(AttemptOutcome::Unreachable);
                    return Err(err);
                }
            }
        }
        self.metrics.attempt(AttemptOutcome::Unreachable);
        Err(clickhouse::error::Error::Network(
            "every ClickHouse replica was tried".into(),
        ))
    }

    /// The query ended: it no longer needs killing.
    fn done(&mut self) {
        self.pending = None;
        self.upstream.running().remove(&self.query_id);
    }
}

/// Where an answer's chunks come from. (One per answer, inside it: the
/// server variant's size is not worth a box per query.)
#[allow(clippy::large_enum_variant)]
enum Feed {
    /// A server over HTTP, through the replica that runs the query.
    Server { cursor: Cursor, source: Source },
    /// The embedded engine's blocking thread.
    Embedded(EmbeddedAnswer),
}

impl Feed {
    /// The next chunk, waiting for it. Cancel-safe.
    async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        match self {
            Feed::Server { cursor, source } => {
                source.next(cursor).await.map_err(UpstreamError::from_crate)
            }
            Feed::Embedded(answer) => answer.next().await.map_err(embedded_error),
        }
    }
}

fn embedded_error(err: ChdbError) -> UpstreamError {
    match err.code() {
        Some(code) => UpstreamError::Query {
            code: Some(code),
            message: err.to_string(),
            status: None,
        },
        None => UpstreamError::Connect(err.to_string()),
    }
}

/// A ClickHouse answer being read: yields chunks that are known not to be
/// (part of) an appended exception.
pub struct Answer {
    feed: Feed,
    format: Format,
    tail: Holdback,
    /// Yield the complete rows before an appended exception, then fail.
    salvage: bool,
    failure: Option<UpstreamError>,
    read_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Answer {
    fn new(feed: Feed, format: Format, read_timeout: Duration, metrics: Arc<Metrics>) -> Answer {
        Answer {
            feed,
            format,
            tail: Holdback::new(),
            salvage: false,
            failure: None,
            read_timeout,
            metrics,
        }
    }

    /// When ClickHouse fails mid-answer, first yield the complete rows it sent
    /// before the failure, then the error (for streams whose clients can tell
    /// a truncated answer from a whole one). Only for line formats.
    pub fn salvaging(mut self) -> Answer {
        self.salvage = self.format != Format::Json;
        self
    }

    /// The next piece that is safe to pass on (the chunks that had arrived,
    /// merged: [`crate::holdback`]); `None` at the verified end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            if let Some(piece) = self.tail.pass() {
                return Ok(Some(piece));
            }
            if self.tail.is_finished() {
                return match self.failure.take() {
                    Some(err) => Err(err),
                    None => Ok(None),
                };
            }
            match tokio::time::timeout(self.read_timeout, self.feed.next()).await {
                Ok(read) => self.take(read)?,
                Err(_) => {
                    return Err(counted(
                        &self.metrics,
                        UpstreamError::Timeout(self.read_timeout),
                    ));
                }
            }
            // What arrives right after goes along (reading a chunk is
            // cancel-safe: one that is not there yet stays unread): first
            // what has arrived already, then what comes within `GATHER` (a
            // timer only when the reader would wait).
            while self.tail.wants_more() {
                if let Some(read) = self.feed.next().now_or_never() {
                    self.take(read)?;
                    continue;
                }
                match tokio::time::timeout(GATHER, self.feed.next()).await {
                    Ok(read) => self.take(read)?,
                    Err(_) => break,
                }
            }
        }
    }

    /// Takes one read of the feed: a chunk, the end, or a break.
    fn take(&mut self, read: Result<Option<Bytes>, UpstreamError>) -> Result<(), UpstreamError> {
        match read {
            Ok(Some(chunk)) => {
                self.tail.push(chunk);
                Ok(())
            }
            Ok(None) => self.verify_tail(None),
            // ClickHouse 25.1+ writes its exception and then breaks the
            // stream (no final chunk): report that exception, not the
            // broken transfer, when the held tail ends with one.
            Err(err) => self.verify_tail(Some(err)),
        }
    }

    /// Checks the held tail of a body for an appended exception. `broken`:
    /// the body did not end cleanly but with this error, which is the
    /// answer's failure unless the tail names ClickHouse's own. When
    /// salvaging, the whole rows held before the failure are kept (they
    /// complete the line passed on last), then the failure is reported.
    fn verify_tail(&mut self, broken: Option<UpstreamError>) -> Result<(), UpstreamError> {
        let (tail, before) = self.tail.finish();
        let (end, err) = match (exception_start(&tail, before, self.format), broken) {
            (Some(at), _) => (
                at,
                UpstreamError::Body {
                    code: error_code(&tail[at..]),
                    message: String::from_utf8_lossy(&tail[at..]).trim().to_owned(),
                },
            ),
            (None, Some(err)) => (tail.len(), err),
            (None, None) => {
                if self.format == Format::Json && !tail.trim_ascii_end().ends_with(b"}") {
                    return Err(counted(
                        &self.metrics,
                        UpstreamError::Body {
                            code: None,
                            message: "JSON answer ended before its closing brace".into(),
                        },
                    ));
                }
                self.tail.keep(tail);
                return Ok(());
            }
        };
        let err = counted(&self.metrics, err);
        if !self.salvage {
            return Err(err);
        }
        // Keep whole lines only: the rows before the failure.
        let rows = tail[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |nl| nl + 1);
        self.tail.keep(tail.slice(..rows));
        self.failure = Some(err);
        Ok(())
    }
}

/// Counts a failed query by kind and passes the error on.
fn counted(metrics: &Metrics, err: UpstreamError) -> UpstreamError {
    metrics
        .clickhouse_errors
        .get_or_create(&KindLabels { kind: err.kind() })
        .inc();
    err
}

/// The marker of the `__exception__` framings (ClickHouse 25.1+).
const MARKER: &[u8] = b"__exception__";

/// Where an exception that ClickHouse appended to a complete `format` body
/// starts, if any. `tail` is the end of the body; `before` is the byte just
/// before it (`None` when `tail` is the whole body), so that a match at the
/// start of `tail` is known to start a line or not.
///
/// Only the server's exact framings count, where the server writes them:
/// - 25.11+: `\r\n__exception__\r\n<TAG>\r\n<message>\n<length> <TAG>\r\n__exception__\r\n`
///   closing the body, checked whole: the same tag twice, `length` the
///   message's. (The tag's `X-ClickHouse-Exception-Tag` header stays inside
///   the `clickhouse` crate, so the structure is what is matched.)
/// - 25.1–25.10: `__exception__\r\n<message>` at a line start.
/// - 18.16: `Code: N, e.displayText() = DB::Exception: …`; later releases
///   `Code: N. DB::Exception: …` (or another `DB::…Exception`), at a line start.
/// - 23.9–25.10 (`http_write_exception_in_output_format`): the format's own
///   member, a JSONEachRow line `{"exception": "Code: N. …"}` (rows are
///   written without the space after the colon) or JSON's top-level
///   `\t"exception": "Code: N. …"` (row fields are indented deeper).
///
/// Rows of the line formats end with a newline, so an appended text starts a
/// line; inside a value TSV and JSONEachRow escape newlines, so text that
/// merely mentions `Code: 42, e.displayText() = ` or `__exception__`
/// mid-line is data. (A TSV row whose first value, or a CSV value continuing
/// after a raw newline, begins with the exact framing still reads as a
/// failure: that fails safe, nothing is served or cached.) JSON is one
/// document that the server appends to right after the last row (18.16
/// writes `}Code: …`), and its strings may hold anything: there an appended
/// text counts only after a structural character and when the body does not
/// close with `}`; a raw `\r\n` (the marker's) cannot occur in a JSON string.
pub fn exception_start(tail: &[u8], before: Option<u8>, format: Format) -> Option<usize> {
    if let Some(at) = tagged_exception(tail) {
        return Some(at);
    }
    let previous = |at: usize| if at == 0 { before } else { Some(tail[at - 1]) };
    let line_starts = || {
        memchr::memchr_iter(b'\n', tail)
            .map(|nl| nl + 1)
            .filter(|&at| at < tail.len())
            .chain(before.is_none_or(|b| b == b'\n').then_some(0))
    };
    let marker_line =
        |line: &[u8]| line.starts_with(MARKER) && line[MARKER.len()..].starts_with(b"\r\n");
    if format == Format::Json {
        if let Some(at) = line_starts()
            .filter(|&at| member(&tail[at..], b"\t\"exception\": \""))
            .min()
        {
            return Some(at);
        }
        if let Some(at) =
            memchr::memmem::find_iter(tail, MARKER).find(|&at| marker_line(&tail[at..]))
        {
            return Some(at);
        }
        if tail.trim_ascii_end().ends_with(b"}") {
            return None;
        }
        return memchr::memmem::find_iter(tail, b"Code: ").find(|&at| {
            previous(at).is_none_or(|b| b"{}[],".contains(&b) || b.is_ascii_whitespace())
                && code_framing(&tail[at..])
        });
    }
    line_starts()
        .filter(|&at| {
            let line = &tail[at..];
            marker_line(line)
                || code_framing(line)
                || (format == Format::Ndjson && member(line, b"{\"exception\": \""))
        })
        .min()
}

/// Whether `text` starts with `prefix` and an exception's `Code: N…` framing.
fn member(text: &[u8], prefix: &[u8]) -> bool {
    text.starts_with(prefix) && code_framing(&text[prefix.len()..])
}

/// Whether `text` starts like an exception message: `Code: N` then
/// `, e.displayText() = ` (18.16) or `. ` (later), then `DB::…Exception: `.
fn code_framing(text: &[u8]) -> bool {
    let Some(rest) = text.strip_prefix(b"Code: ") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return false;
    }
    let rest = &rest[digits..];
    let Some(rest) = rest
        .strip_prefix(b", e.displayText() = ")
        .or_else(|| rest.strip_prefix(b". "))
        .and_then(|rest| rest.strip_prefix(b"DB::"))
    else {
        return false;
    };
    let name = rest
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    rest[..name].ends_with(b"Exception") && rest[name..].starts_with(b": ")
}

/// Where 25.11's tagged exception block closing `tail` starts, if it does.
fn tagged_exception(tail: &[u8]) -> Option<usize> {
    const OPENING: &[u8] = b"\r\n__exception__\r\n";
    let rest = tail.strip_suffix(OPENING)?;
    let space = memchr::memrchr(b' ', rest)?;
    let tag = &rest[space + 1..];
    if tag.is_empty() || tag.len() > 64 || !tag.iter().all(u8::is_ascii_graphic) {
        return None;
    }
    let digits = rest[..space]
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || digits > 9 {
        return None;
    }
    let length_at = space - digits;
    let length: usize = std::str::from_utf8(&rest[length_at..space])
        .ok()?
        .parse()
        .ok()?;
    // The message ends with the newline just before its length.
    if length == 0 || rest.get(length_at.checked_sub(1)?) != Some(&b'\n') {
        return None;
    }
    let message_at = length_at.checked_sub(length)?;
    let at = message_at.checked_sub(OPENING.len() + tag.len() + 2)?;
    let opening = &rest[at..message_at];
    (opening.starts_with(OPENING) && opening[OPENING.len()..].strip_suffix(b"\r\n") == Some(tag))
        .then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [Format; 4] = [Format::Json, Format::Csv, Format::Ndjson, Format::Tsv];

    /// Rows of `format` before a failure (a JSON document cut after a row).
    fn rows(format: Format) -> &'static [u8] {
        match format {
            Format::Json => b"{\n\t\"meta\":\n\t[\n\t\t{\n\t\t\t\"name\": \"n\",\n\t\t\t\"type\": \"UInt64\"\n\t\t}\n\t],\n\n\t\"data\":\n\t[\n\t\t{\n\t\t\t\"n\": 1\n\t\t}",
            Format::Csv => b"\"n\"\n1\n2\n",
            Format::Ndjson => b"{\"n\":1}\n{\"n\":2}\n",
            Format::Tsv => b"n\n1\n2\n",
        }
    }

    /// The body `rows` + `appended`, and where the appended part starts.
    fn failed(format: Format, appended: &[u8]) -> (Vec<u8>, usize) {
        let mut body = rows(format).to_vec();
        let at = body.len();
        body.extend_from_slice(appended);
        (body, at)
    }

    /// 25.11's block with `tag` around `message` (which ends with a newline).
    fn tagged(tag: &str, message: &str, length: usize) -> Vec<u8> {
        format!("\r\n__exception__\r\n{tag}\r\n{message}{length} {tag}\r\n__exception__\r\n")
            .into_bytes()
    }

    #[test]
    fn every_real_framing_at_the_end_of_a_body_is_an_exception() {
        let message = "Code: 395. DB::Exception: boom. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO) (version 25.11.1.1)\n";
        let framings: Vec<Vec<u8>> = vec![
            // 18.16, as it writes it (measured against the local server).
            b"Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero, e.what() = DB::Exception\n".to_vec(),
            // Releases up to 24.x.
            b"Code: 159. DB::Exception: Timeout exceeded: elapsed 1.2 seconds, maximum: 0.1. (TIMEOUT_EXCEEDED) (version 24.10.1.2812 (official build))\n".to_vec(),
            b"Code: 210. DB::NetException: I/O error: Broken pipe. (NETWORK_ERROR) (version 23.8.8.20)\n".to_vec(),
            // 25.1-25.10.
            format!("__exception__\r\n{message}").into_bytes(),
            // 25.11+.
            tagged("Ab3dE5gH1jK7mN9p", message, message.len()),
        ];
        for format in FORMATS {
            for framing in &framings {
                let (body, at) = failed(format, framing);
                let text = String::from_utf8_lossy(framing);
                assert_eq!(
                    exception_start(&body, None, format),
                    Some(at),
                    "{format:?}: {text}"
                );
                assert!(error_code(&body[at..]).is_some(), "{format:?}: {text}");
                // Also when the held tail starts just there, after a passed-on line.
                assert_eq!(
                    exception_start(&body[at..], Some(b'\n'), format),
                    Some(0),
                    "{format:?}: {text}"
                );
            }
        }
        // 18.16 appends right after the last JSON row, on the same line.
        let (body, at) = failed(Format::Json, &framings[0]);
        assert_eq!(body[at - 1], b'}');
        assert_eq!(error_code(&body[at..]), Some(395));
    }

    #[test]
    fn the_formats_own_exception_member_is_an_exception() {
        let member = "\"exception\": \"Code: 395. DB::Exception: boom. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO) (version 24.8.1.1)\"";
        let json = format!(
            "{}\n\t],\n\n\t\"rows\": 1,\n\n\t{member}\n}}\n",
            String::from_utf8_lossy(rows(Format::Json))
        );
        let at = json.find("\t\"exception\"").unwrap();
        assert_eq!(
            exception_start(json.as_bytes(), None, Format::Json),
            Some(at)
        );
        assert_eq!(error_code(&json.as_bytes()[at..]), Some(395));

        let (ndjson, at) = failed(Format::Ndjson, format!("{{{member}}}\n").as_bytes());
        assert_eq!(exception_start(&ndjson, None, Format::Ndjson), Some(at));
    }

    #[test]
    fn data_that_mentions_exceptions_is_not_an_exception() {
        let fake = "x Code: 42, e.displayText() = DB::Exception: fake";
        let bodies: Vec<(Format, String)> = vec![
            (
                Format::Tsv,
                format!("s\tt\n{fake}\tmid __exception__ line\n2\tCode: 60. DB::Exception: y\n"),
            ),
            (
                Format::Tsv,
                "s\nescaped\\r\\n__exception__\\r\\nCode: 1. DB::Exception: z\n".into(),
            ),
            (
                Format::Csv,
                format!("\"s\",\"t\"\n\"{fake}\",\"mid __exception__ line\"\n"),
            ),
            (
                Format::Csv,
                "\"s\"\n\"Code: 42, e.displayText() = DB::Exception: quoted\"\n".into(),
            ),
            (
                Format::Ndjson,
                format!("{{\"s\":\"{fake}\",\"t\":\"mid __exception__ line\"}}\n"),
            ),
            // A column named `exception`: rows have no space after the colon.
            (
                Format::Ndjson,
                "{\"exception\":\"Code: 1. DB::Exception: a value\"}\n".into(),
            ),
            // JSON that closes, with strings holding every framing's words.
            (
                Format::Json,
                format!(
                    "{{\n\t\"data\":\n\t[\n\t\t{{\n\t\t\t\"s\": \"{fake}\",\n\t\t\t\"t\": \"}}Code: 42, e.displayText() = DB::Exception: a\",\n\t\t\t\"exception\": \"Code: 1. DB::Exception: b\",\n\t\t\t\"u\": \"__exception__\\r\\n\"\n\t\t}}\n\t],\n\n\t\"rows\": 1\n}}\n"
                ),
            ),
            (Format::Ndjson, "{\"msg\":\"Code: 12\"}\n".into()),
            (Format::Csv, "\"Code: x, e.displayText\"\n".into()),
        ];
        for (format, body) in &bodies {
            assert_eq!(
                exception_start(body.as_bytes(), None, *format),
                None,
                "{format:?}: {body}"
            );
        }
        // A tail that starts mid-line does not start with an exception.
        let line = b"Code: 42, e.displayText() = DB::Exception: fake\n";
        assert_eq!(exception_start(line, Some(b'x'), Format::Tsv), None);
        assert_eq!(exception_start(line, Some(b'\n'), Format::Tsv), Some(0));
    }

    #[test]
    fn the_tagged_block_is_checked_whole() {
        let message = "Code: 159. DB::Exception: Timeout exceeded. (TIMEOUT_EXCEEDED)\n";
        let mut body = b"1\n".to_vec();
        body.extend(tagged("Ab3dE5gH1jK7mN9p", message, message.len()));
        assert_eq!(tagged_exception(&body), Some(2));
        // A wrong length, another closing tag, a missing opening: not that block.
        let mut wrong = b"1\n".to_vec();
        wrong.extend(tagged("Ab3dE5gH1jK7mN9p", message, message.len() + 1));
        assert_eq!(tagged_exception(&wrong), None);
        let other = String::from_utf8(body.clone()).unwrap().replacen(
            "Ab3dE5gH1jK7mN9p\r\nCode",
            "Zb3dE5gH1jK7mN9p\r\nCode",
            1,
        );
        assert_eq!(tagged_exception(other.as_bytes()), None);
        let closing = format!(
            "1\n{message}{} Ab3dE5gH1jK7mN9p\r\n__exception__\r\n",
            message.len()
        );
        assert_eq!(tagged_exception(closing.as_bytes()), None);
        // Data mid-line that ends like the block's closing line is not one either.
        let data = b"s\nx 12 Ab3dE5gH1jK7mN9p\r\n__exception__\r\n";
        assert_eq!(tagged_exception(data), None);
    }
}
