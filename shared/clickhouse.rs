//! ClickHouse over its HTTP interface, with the safety rules every query gets.
//!
//! Owns sending rendered SQL (read-only, with per-query limits and a query id)
//! through the `clickhouse` crate, and reading the answer back as raw chunks
//! ([`Answer`]) without ever passing an error off as data: ClickHouse (18.16 and
//! later) reports a failure that happens after the first block by appending the
//! exception text to a `200 OK` body. [`Answer`] holds back the last
//! [`TAIL_HOLDBACK`] bytes of every body and checks them at the end, so such a
//! body fails instead of being served or cached. Small answers are held whole,
//! so their failures become clean HTTP errors before any byte is sent.
//!
//! With several replicas (`[clickhouse] replicas`), [`crate::upstream`] picks
//! the server of each query; a query whose server cannot be reached before its
//! first byte (a network error: refused, reset, unreachable) moves to another
//! replica, each tried at most once. A query that has started streaming is
//! never retried. The replica of each running query is remembered so that
//! [`ClickHouse::kill`] reaches the server that runs it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clickhouse::query::BytesCursor;

use crate::config::{ClickHouseConfig, ReplicaConfig};
use crate::format::Format;
use crate::metrics::{KindLabels, Metrics};
use crate::upstream::{InFlight, Pool};

/// Bytes at the end of every answer held back until the answer is complete.
pub const TAIL_HOLDBACK: usize = 64 * 1024;

/// ClickHouse error code for "timeout exceeded" (`max_execution_time`).
const TIMEOUT_CODE: u32 = 159;

/// Why a query produced no (complete) answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("ClickHouse is unreachable: {0}")]
    Connect(String),
    #[error("ClickHouse refused the query (code {code:?}): {message}")]
    Query { code: Option<u32>, message: String },
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
    /// Network-side bound on waiting for the next chunk.
    read_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// The replicas of one upstream: their health and one client each.
#[derive(Clone)]
struct Upstream {
    /// The health check's bound (`clickhouse.health_timeout`).
    health_timeout: Duration,
    pool: Arc<Pool>,
    /// One per replica, in the pool's order, with every query setting.
    clients: Vec<clickhouse::Client>,
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
        metrics: &Arc<Metrics>,
    ) -> Upstream {
        let clients: Vec<clickhouse::Client> =
            replicas.iter().map(|r| client(config, &r.url)).collect();
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
            running: Arc::default(),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `query` on `replica` (nothing is sent until the cursor is read).
    fn start(
        &self,
        replica: usize,
        query: &Pending,
    ) -> Result<(BytesCursor, InFlight), UpstreamError> {
        let mut request = self.clients[replica]
            .query_raw(&query.sql)
            .with_setting("query_id", query.query_id.as_str());
        for (name, value) in &query.settings {
            request = request.with_setting(name.as_str(), value.as_str());
        }
        let cursor = request
            .fetch_bytes(query.format.clickhouse())
            .map_err(UpstreamError::from_crate)?;
        let mut running = self.running();
        if running.len() >= MAX_RUNNING {
            running.clear();
        }
        running.insert(query.query_id.clone(), replica);
        Ok((cursor, self.pool.start(replica)))
    }
}

/// One replica's client with the settings every query carries.
fn client(config: &ClickHouseConfig, url: &str) -> clickhouse::Client {
    let mut client = clickhouse::Client::default()
        .with_url(url)
        .with_user(&config.user)
        .with_validation(false)
        .with_setting("readonly", config.readonly.to_string())
        .with_setting(
            "max_execution_time",
            config.max_execution_time.as_secs().max(1).to_string(),
        )
        .with_setting("max_result_rows", config.max_result_rows.to_string())
        .with_setting("max_result_bytes", config.max_result_bytes.to_string())
        .with_setting("result_overflow_mode", "throw")
        .with_setting("output_format_json_quote_64bit_integers", "0");
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
}

impl ClickHouse {
    /// Clients for `[clickhouse]`'s replicas (or its one `url`), with
    /// background health checks while any clone of this value lives.
    pub fn new(config: &ClickHouseConfig, metrics: Arc<Metrics>) -> ClickHouse {
        let upstream = Upstream::new(config, &config.query_replicas(), &metrics);
        let exports = (!config.export_replicas.is_empty())
            .then(|| Upstream::new(config, &config.export_replicas, &metrics));
        ClickHouse {
            upstream,
            exports,
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
    pub fn replicas(&self) -> usize {
        self.upstream.pool.len()
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
            for upstream in std::iter::once(&mut self.upstream).chain(self.exports.as_mut()) {
                for client in &mut upstream.clients {
                    *client = client.clone().with_setting(name, value);
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
        self.query_with(sql, format, query_id, &[])
    }

    /// Like [`ClickHouse::query`], with settings for this query only (an
    /// export's limits); a `max_execution_time` also bounds the read timeout.
    pub fn query_with(
        &self,
        sql: &str,
        format: Format,
        query_id: &str,
        settings: &[(&str, String)],
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
        let pending = Pending {
            sql: sql.to_owned(),
            format,
            query_id: query_id.to_owned(),
            settings: settings
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.clone()))
                .collect(),
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
        Ok(Answer {
            cursor,
            source: Source {
                upstream: self.upstream.clone(),
                query_id: query_id.to_owned(),
                in_flight,
                pending: Some(pending),
                tried: vec![replica],
                metrics: self.metrics.clone(),
            },
            format,
            held: VecDeque::new(),
            held_len: 0,
            finished: false,
            salvage: false,
            failure: None,
            read_timeout,
            metrics: self.metrics.clone(),
        })
    }

    /// Asks ClickHouse to stop a query (its id is one dashcache made), on the
    /// replica that runs it (on every replica if that is not known).
    pub async fn kill(&self, query_id: &str) -> Result<(), UpstreamError> {
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
        cursor: &mut BytesCursor,
    ) -> Result<Option<Bytes>, clickhouse::error::Error> {
        // At most one attempt per replica.
        for _ in 0..=self.upstream.pool.len() {
            let err = match cursor.next().await {
                Ok(chunk) => {
                    self.pending = None;
                    if chunk.is_none() {
                        self.done();
                    }
                    return Ok(chunk);
                }
                Err(err) => err,
            };
            if self.pending.is_none() || !matches!(err, clickhouse::error::Error::Network(_)) {
                self.done();
                return Err(err);
            }
            let failed = self.in_flight.replica();
            self.upstream.pool.unreachable(failed, &err);
            let Some(next) = self.upstream.pool.pick(&self.tried) else {
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
                Err(_) => return Err(err),
            }
        }
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

/// A ClickHouse answer being read: yields chunks that are known not to be
/// (part of) an appended exception.
pub struct Answer {
    cursor: BytesCursor,
    source: Source,
    format: Format,
    held: VecDeque<Bytes>,
    held_len: usize,
    finished: bool,
    /// Yield the complete rows before an appended exception, then fail.
    salvage: bool,
    failure: Option<UpstreamError>,
    read_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Answer {
    /// When ClickHouse fails mid-answer, first yield the complete rows it sent
    /// before the failure, then the error (for streams whose clients can tell
    /// a truncated answer from a whole one). Only for line formats.
    pub fn salvaging(mut self) -> Answer {
        self.salvage = self.format != Format::Json;
        self
    }

    /// The next chunk that is safe to pass on; `None` at the verified end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            if let Some(front) = self.held.front()
                && (self.finished || self.held_len - front.len() >= TAIL_HOLDBACK)
            {
                self.held_len -= front.len();
                return Ok(self.held.pop_front());
            }
            if self.finished {
                return match self.failure.take() {
                    Some(err) => Err(err),
                    None => Ok(None),
                };
            }
            let next =
                tokio::time::timeout(self.read_timeout, self.source.next(&mut self.cursor)).await;
            match next {
                Ok(Ok(Some(chunk))) => {
                    if !chunk.is_empty() {
                        self.held_len += chunk.len();
                        self.held.push_back(chunk);
                    }
                }
                Ok(Ok(None)) => {
                    self.finished = true;
                    self.verify_tail()?;
                }
                Ok(Err(err)) => return Err(counted(&self.metrics, UpstreamError::from_crate(err))),
                Err(_) => {
                    return Err(counted(
                        &self.metrics,
                        UpstreamError::Timeout(self.read_timeout),
                    ));
                }
            }
        }
    }

    /// Checks the held tail of a complete body for an appended exception.
    fn verify_tail(&mut self) -> Result<(), UpstreamError> {
        let mut tail = BytesMut::with_capacity(self.held_len);
        for chunk in &self.held {
            tail.extend_from_slice(chunk);
        }
        let tail = tail.freeze();
        if let Some(at) = exception_start(&tail) {
            let message = String::from_utf8_lossy(&tail[at..]).trim().to_owned();
            let err = counted(
                &self.metrics,
                UpstreamError::Body {
                    code: error_code(&tail[at..]),
                    message,
                },
            );
            if !self.salvage {
                return Err(err);
            }
            // Keep whole lines only: the rows before the failure.
            let rows = tail[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |nl| nl + 1);
            self.held.clear();
            self.held_len = rows;
            if rows > 0 {
                self.held.push_back(tail.slice(..rows));
            }
            self.failure = Some(err);
            return Ok(());
        }
        if self.format == Format::Json && !tail.trim_ascii_end().ends_with(b"}") {
            return Err(counted(
                &self.metrics,
                UpstreamError::Body {
                    code: None,
                    message: "JSON answer ended before its closing brace".into(),
                },
            ));
        }
        self.held.clear();
        if !tail.is_empty() {
            self.held.push_back(tail);
        }
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

/// Where an exception that ClickHouse appended to a body starts, if any.
///
/// 18.16 writes `Code: N, e.displayText() = DB::Exception: …`, current
/// releases `Code: N. DB::Exception: …` or an `__exception__` block. None of
/// these can occur unquoted in JSON, JSONEachRow or CSV rows.
pub fn exception_start(tail: &[u8]) -> Option<usize> {
    if let Some(at) = memchr::memmem::find(tail, b"__exception__") {
        return Some(at);
    }
    memchr::memmem::find_iter(tail, b"Code: ").find(|&at| {
        let rest = &tail[at + 6..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        digits > 0
            && (rest[digits..].starts_with(b", e.displayText() = ")
                || rest[digits..].starts_with(b". DB::Exception"))
    })
}

/// The number after `Code: ` in an exception text.
fn error_code(text: &[u8]) -> Option<u32> {
    let at = memchr::memmem::find(text, b"Code: ")?;
    let digits: Vec<u8> = text[at + 6..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_appended_exceptions_of_old_and_new_servers() {
        let old = b"{\"n\":1}\n{\"n\":2}\nCode: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero, e.what() = DB::Exception\n";
        assert_eq!(exception_start(old), Some(16));
        assert_eq!(error_code(&old[16..]), Some(395));
        let new = b"1,2\nCode: 159. DB::Exception: Timeout exceeded. (TIMEOUT_EXCEEDED)\n";
        assert_eq!(exception_start(new), Some(4));
        assert_eq!(exception_start(b"ok\n__exception__\r\nabc"), Some(3));
    }

    #[test]
    fn data_that_mentions_codes_is_not_an_exception() {
        assert_eq!(exception_start(b"{\"msg\":\"Code: 12\"}\n"), None);
        assert_eq!(exception_start(b"\"Code: x, e.displayText\"\n"), None);
    }
}
