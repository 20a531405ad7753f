//! `GET /v1/query/{name}`: the cached read-through path.
//!
//! validate (no I/O before this passes) → render SQL → cache key → Redis →
//! on a miss, join or lead the key's flight → respond. `X-Cache` says which:
//! `HIT` (from Redis), `MISS` (this request started the ClickHouse query),
//! `COALESCED` (it read along with another request's query).

use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use dashcache::cache::{CacheKey, Entry};
use dashcache::catalog::NOW_STEP;
use dashcache::clickhouse::UpstreamError;
use dashcache::coalesce::{FlightError, Role, Subscriber};
use dashcache::fill::FillJob;
use dashcache::format::Format;
use dashcache::params::{Clock, Problem, RawParam};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};

use crate::app::App;
use crate::reply::{self, Body};

pub async fn handle<B>(app: &Arc<App>, name: &str, req: &Request<B>) -> Response<Body> {
    let Some(query) = app.catalog.get(name) else {
        return reply::error(
            StatusCode::NOT_FOUND,
            "unknown_query",
            format!("no query named `{name}`"),
        );
    };

    let raw: Vec<RawParam> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).collect();
    let (format, params, mut problems) = split_format(raw);
    let clock = Clock {
        now: Utc::now(),
        now_step: NOW_STEP,
    };
    let bound = match query.bind(&params, &clock) {
        Ok(bound) if problems.is_empty() => bound,
        Ok(_) => return reply::invalid(&problems),
        Err(more) => {
            problems.extend(more);
            return reply::invalid(&problems);
        }
    };
    let sql = match query.render(&bound) {
        Ok(sql) => sql,
        Err(err) => {
            tracing::error!(query = name, error = %err, "template rendering failed");
            return reply::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "query template error",
            );
        }
    };
    let key = CacheKey::new(&app.config.cache.key_prefix, name, None, format, &sql);

    if let Some(entry) = fresh(app.cache.get(&key).await) {
        app.metrics.cache_result("HIT");
        return hit(entry, req.headers());
    }

    match app.coalescer.join(&key) {
        Role::Follower(subscriber) => {
            app.metrics.cache_result("COALESCED");
            streamed(subscriber, format, "COALESCED", query.ttl.as_secs()).await
        }
        Role::Leader(mut producer, subscriber) => {
            // The key may have been stored between the lookup and the join.
            if let Some(entry) = fresh(app.cache.get(&key).await) {
                producer.push(entry.body.clone());
                producer.complete();
                app.metrics.cache_result("HIT");
                return hit(entry, req.headers());
            }
            app.metrics.cache_result("MISS");
            let job = FillJob {
                key,
                query: name.to_owned(),
                sql,
                format,
                ttl: query.ttl,
            };
            app.filler.spawn(job, producer);
            streamed(subscriber, format, "MISS", query.ttl.as_secs()).await
        }
    }
}

/// Separates the proxy's own `format` parameter from the query's parameters.
fn split_format(raw: Vec<RawParam<'_>>) -> (Format, Vec<RawParam<'_>>, Vec<Problem>) {
    let mut format = None;
    let mut problems = Vec::new();
    let mut params = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name != "format" {
            params.push((name, value));
        } else if format.is_some() {
            problems.push(Problem::query(
                "format",
                "duplicate_parameter",
                "given more than once",
            ));
        } else if let Some(f) = Format::from_param(&value) {
            format = Some(f);
        } else {
            problems.push(Problem::query(
                "format",
                "enum",
                "must be one of: json, csv, ndjson",
            ));
            format = Some(Format::Json);
        }
    }
    (format.unwrap_or(Format::Json), params, problems)
}

fn fresh(entry: Option<Entry>) -> Option<Entry> {
    entry.filter(|e| Utc::now().timestamp_millis() < e.header.fresh_until_ms)
}

fn hit(entry: Entry, request: &HeaderMap) -> Response<Body> {
    let now = Utc::now().timestamp_millis();
    let age = (now - entry.header.created_ms).max(0) / 1000;
    let max_age = (entry.header.fresh_until_ms - now).max(0) / 1000;
    let not_modified = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == entry.header.etag || tag.trim() == "*")
        });
    let mut response = if not_modified {
        let mut response = Response::new(reply::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        Response::new(reply::full(entry.body))
    };
    let headers = response.headers_mut();
    headers.insert("x-cache", HeaderValue::from_static("HIT"));
    if let Ok(etag) = HeaderValue::from_str(&entry.header.etag) {
        headers.insert(header::ETAG, etag);
    }
    if let Ok(content_type) = HeaderValue::from_str(&entry.header.content_type) {
        headers.insert(header::CONTENT_TYPE, content_type);
    }
    headers.insert(header::AGE, HeaderValue::from(age));
    cache_control(headers, max_age);
    response
}

/// Answers from a flight: waits for the first chunk (or the verdict) so that
/// a failure before any byte becomes a proper error status.
async fn streamed(
    mut subscriber: Subscriber,
    format: Format,
    cache: &'static str,
    max_age: u64,
) -> Response<Body> {
    let body = match subscriber.next().await {
        Some(Ok(first)) => reply::stream(first, subscriber),
        None => reply::full(Bytes::new()),
        Some(Err(err)) => return upstream_error(&err),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert("x-cache", HeaderValue::from_static(cache));
    cache_control(headers, max_age as i64);
    response
}

fn cache_control(headers: &mut HeaderMap, max_age: i64) {
    if let Ok(value) = HeaderValue::from_str(&format!("max-age={max_age}")) {
        headers.insert(header::CACHE_CONTROL, value);
    }
}

/// A failed computation as the client sees it. ClickHouse's own message stays
/// in the proxy's log: it can carry SQL and server internals.
fn upstream_error(err: &FlightError) -> Response<Body> {
    match err {
        FlightError::Upstream(err) if err.is_timeout() => reply::error(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "ClickHouse did not finish the query in time; narrow the range or try later",
        ),
        FlightError::Upstream(UpstreamError::Connect(_)) => reply::error(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            "ClickHouse is unreachable",
        ),
        FlightError::Upstream(err) => reply::error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            match err.code() {
                Some(code) => format!("ClickHouse failed the query (code {code})"),
                None => "ClickHouse failed the query".to_string(),
            },
        ),
        FlightError::Aborted => reply::error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the query ended without an answer",
        ),
    }
}
