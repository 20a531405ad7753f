//! `GET /v1/export/{name}`: raw data streamed from ClickHouse, never cached.
//!
//! The body is ClickHouse's own HTTP response (JSONEachRow, CSVWithNames,
//! TSVWithNames), passed through as it arrives, the chunks that arrive
//! together merged ([`dashcache::holdback`]): hyper asks for the next piece
//! only when the client has taken the last one, so a slow client slows the
//! read from ClickHouse instead of filling memory (the only buffer is
//! [`dashcache::holdback::TAIL_HOLDBACK`] plus at most
//! [`dashcache::holdback::PASS_BATCH`] gathered, and the piece in hand). Each
//! export has its own ClickHouse `query_id`; if the client goes away before
//! the end, the upstream connection is dropped and `KILL QUERY` is sent.
//!
//! Clients that send `Accept-Encoding: zstd` or `gzip` get the stream
//! compressed on the fly, chunk by chunk.
//!
//! How an export ends:
//! - a failure before the first byte (limit, timeout, ClickHouse down) is a
//!   JSON error with a proper status;
//! - NDJSON that fails mid-stream (a tier limit hit, a timeout) ends with one
//!   last line `{"error": {...}}` after the last complete row;
//! - CSV/TSV that fails mid-stream is cut: the chunked transfer never
//!   terminates properly, which every HTTP client reports as an error.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use dashcache::clickhouse::{Answer, ClickHouse, UpstreamError};
use dashcache::encoding::{self, Encoding};
use dashcache::format::Format;
use dashcache::metrics::Metrics;
use dashcache::outcome::ExportOutcome;
use dashcache::params::RawParam;
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use crate::auth::{self, Caller};
use crate::error::{self, ApiError};
use crate::reply::{self, Body, BoxError};
use crate::state::App;

/// ClickHouse error code for "too many rows or bytes" (`max_result_rows`/`_bytes`).
const LIMIT_CODE: u32 = 396;

pub async fn handle<B>(
    app: &Arc<App>,
    name: &str,
    req: &Request<B>,
    caller: &Caller,
) -> Response<Body> {
    let started = Instant::now();
    let Some(export) = app.catalog.export(name) else {
        return ApiError::UnknownExport.reply(format!("no export named `{name}`"));
    };
    if !caller.tier.exports.allows(name) {
        return auth::forbidden(caller, &format!("export `{name}`"));
    }

    let raw: Vec<RawParam> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).collect();
    let (format, params, mut problems) = Format::split_param(raw, &Format::LINES);
    let format = format
        .or_else(|| {
            req.headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .and_then(Format::from_accept)
        })
        .unwrap_or(Format::Ndjson);
    let clock = export.clock(Utc::now());
    let bound = match export.bind(&params, &clock, Some(&caller.key.tenant)) {
        Ok(bound) if problems.is_empty() => bound,
        Ok(_) => return error::invalid(&problems),
        Err(more) => {
            problems.extend(more);
            return error::invalid(&problems);
        }
    };
    let sql = match export.render(&bound) {
        Ok(sql) => sql,
        Err(err) => {
            tracing::error!(export = name, error = %err, "template rendering failed");
            return ApiError::Internal.reply("export template error");
        }
    };

    let tier = &caller.tier;
    let settings = [
        ("max_result_rows", tier.export_max_rows.to_string()),
        ("max_result_bytes", tier.export_max_bytes.to_string()),
        (
            "max_execution_time",
            tier.export_max_duration.as_secs().max(1).to_string(),
        ),
    ];
    let query_id = format!(
        "dashcache-export-{}",
        hex::encode(rand::random::<[u8; 12]>())
    );
    let clickhouse = &app.clickhouse.for_exports();
    let mut kill = KillOnDrop::new(clickhouse.clone(), query_id.clone());
    let mut answer = match clickhouse.export(&sql, format, &query_id, &settings) {
        Ok(answer) => answer.salvaging(),
        Err(err) => {
            kill.disarm();
            return failed_before_first_byte(&err, caller);
        }
    };
    let first = match answer.next().await {
        Ok(first) => first,
        Err(err) => {
            kill.disarm();
            return failed_before_first_byte(&err, caller);
        }
    };
    app.metrics.exports_started.inc();
    app.metrics
        .export_first_byte
        .observe(started.elapsed().as_secs_f64());
    if first.is_none() {
        kill.disarm();
    }

    let stream = ExportStream {
        answer,
        first,
        format,
        kill,
        metrics: app.metrics.clone(),
        done: false,
    };
    let body = StreamBody::new(futures_util::stream::unfold(stream, |mut s| async move {
        let item = s.next().await?;
        Some((item, s))
    }))
    .boxed_unsync();
    let accept = req
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok());
    let encoding = encoding::negotiate(accept, &[Encoding::Zstd, Encoding::Gzip]);

    let mut response = Response::new(reply::compressed(body, encoding));
    let headers = response.headers_mut();
    reply::set_encoding(headers, encoding);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(id) = HeaderValue::from_str(&query_id) {
        // To find (or kill) the export in ClickHouse's system.processes.
        headers.insert("x-dashcache-query-id", id);
    }
    if let Ok(disposition) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{name}.{}\"",
        format.extension()
    )) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    response
}

/// The JSON error for an export that failed before its first byte.
fn failed_before_first_byte(err: &UpstreamError, caller: &Caller) -> Response<Body> {
    tracing::warn!(error = %err, "export failed before its first byte");
    if err.code() == Some(LIMIT_CODE) {
        return ApiError::ExportTooLarge.reply(format!(
            "the export exceeds tier `{}`'s limit ({} rows, {} bytes); narrow the range or filters",
            caller.tier.name, caller.tier.export_max_rows, caller.tier.export_max_bytes
        ));
    }
    let (kind, detail) = if err.is_timeout() {
        (
            ApiError::UpstreamTimeout,
            "the export exceeded its time limit; narrow the range",
        )
    } else if matches!(err, UpstreamError::Connect(_)) {
        (ApiError::UpstreamUnavailable, "ClickHouse is unreachable")
    } else {
        (ApiError::UpstreamError, "ClickHouse failed the export")
    };
    kind.reply(detail)
}

/// The body of one export.
struct ExportStream {
    answer: Answer,
    first: Option<Bytes>,
    format: Format,
    kill: KillOnDrop,
    metrics: Arc<Metrics>,
    done: bool,
}

impl ExportStream {
    async fn next(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        if self.done {
            return None;
        }
        let next = match self.first.take() {
            Some(first) => Ok(Some(first)),
            None => self.answer.next().await,
        };
        match next {
            Ok(Some(chunk)) => {
                self.metrics.export_bytes.inc_by(chunk.len() as u64);
                Some(Ok(Frame::data(chunk)))
            }
            Ok(None) => self.end(ExportOutcome::Complete),
            Err(err) => {
                tracing::warn!(query_id = %self.kill.query_id, error = %err, "export failed mid-stream");
                if self.format == Format::Ndjson {
                    self.end::<()>(ExportOutcome::Truncated);
                    Some(Ok(Frame::data(error_line(&err))))
                } else {
                    self.end::<()>(ExportOutcome::Failed);
                    Some(Err(BoxError::from(format!(
                        "export failed: {}",
                        err.kind()
                    ))))
                }
            }
        }
    }

    fn end<T>(&mut self, outcome: ExportOutcome) -> Option<T> {
        self.done = true;
        self.kill.disarm();
        self.metrics.export_ended(outcome);
        None
    }
}

impl Drop for ExportStream {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.export_ended(ExportOutcome::Cancelled);
        }
    }
}

/// The last line of an NDJSON export that did not finish.
fn error_line(err: &UpstreamError) -> Bytes {
    let (kind, detail) = if err.code() == Some(LIMIT_CODE) {
        (
            "limit_exceeded",
            "the export reached the tier's row or byte limit",
        )
    } else if err.is_timeout() {
        ("timeout", "the export reached its time limit")
    } else {
        ("upstream_error", "ClickHouse failed during the export")
    };
    let line =
        serde_json::json!({ "error": { "type": kind, "code": err.code(), "detail": detail } });
    Bytes::from(format!("{line}\n"))
}

/// Kills the export's ClickHouse query when dropped armed (client gone).
struct KillOnDrop {
    clickhouse: ClickHouse,
    query_id: String,
    armed: bool,
}

impl KillOnDrop {
    fn new(clickhouse: ClickHouse, query_id: String) -> KillOnDrop {
        KillOnDrop {
            clickhouse,
            query_id,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let clickhouse = self.clickhouse.clone();
        let query_id = std::mem::take(&mut self.query_id);
        tracing::info!(%query_id, "export abandoned by its client; killing the query");
        tokio::spawn(async move {
            if let Err(err) = clickhouse.kill(&query_id).await {
                tracing::warn!(%query_id, error = %err, "KILL QUERY failed");
            }
        });
    }
}
