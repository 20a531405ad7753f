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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clickhouse::query::BytesCursor;

use crate::config::ClickHouseConfig;
use crate::format::Format;
use crate::metrics::{KindLabels, Metrics};

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
    client: clickhouse::Client,
    /// Network-side bound on waiting for the next chunk.
    read_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl ClickHouse {
    pub fn new(config: &ClickHouseConfig, metrics: Arc<Metrics>) -> ClickHouse {
        let mut client = clickhouse::Client::default()
            .with_url(&config.url)
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
        ClickHouse {
            client,
            read_timeout: config.max_execution_time + Duration::from_secs(5),
            metrics,
        }
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
            self.client = self.client.with_setting(name, value);
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
        let mut query = self
            .client
            .query_raw(sql)
            .with_setting("query_id", query_id);
        let mut read_timeout = self.read_timeout;
        for (name, value) in settings {
            if *name == "max_execution_time"
                && let Ok(secs) = value.parse::<u64>()
            {
                read_timeout = Duration::from_secs(secs) + Duration::from_secs(5);
            }
            query = query.with_setting(*name, value.as_str());
        }
        let cursor = query
            .fetch_bytes(format.clickhouse())
            .map_err(|e| self.failed(UpstreamError::from_crate(e)))?;
        Ok(Answer {
            cursor,
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

    /// Asks ClickHouse to stop a query (its id is one dashcache made).
    pub async fn kill(&self, query_id: &str) -> Result<(), UpstreamError> {
        if !query_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Ok(());
        }
        let sql = format!("KILL QUERY WHERE query_id = '{query_id}' ASYNC");
        let mut cursor = self
            .client
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
    }

    fn failed(&self, err: UpstreamError) -> UpstreamError {
        self.metrics
            .clickhouse_errors
            .get_or_create(&KindLabels { kind: err.kind() })
            .inc();
        err
    }
}

/// A ClickHouse answer being read: yields chunks that are known not to be
/// (part of) an appended exception.
pub struct Answer {
    cursor: BytesCursor,
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
            let next = tokio::time::timeout(self.read_timeout, self.cursor.next()).await;
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
                Ok(Err(err)) => return Err(self.failed(UpstreamError::from_crate(err))),
                Err(_) => return Err(self.failed(UpstreamError::Timeout(self.read_timeout))),
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
            let err = self.failed(UpstreamError::Body {
                code: error_code(&tail[at..]),
                message,
            });
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
            return Err(self.failed(UpstreamError::Body {
                code: None,
                message: "JSON answer ended before its closing brace".into(),
            }));
        }
        self.held.clear();
        if !tail.is_empty() {
            self.held.push_back(tail);
        }
        Ok(())
    }

    fn failed(&self, err: UpstreamError) -> UpstreamError {
        self.metrics
            .clickhouse_errors
            .get_or_create(&KindLabels { kind: err.kind() })
            .inc();
        err
    }
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
