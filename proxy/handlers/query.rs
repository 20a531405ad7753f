//! `GET /v1/query/{name}`: the cached read-through path.
//!
//! validate (no I/O before this passes) → render SQL → cache key → L1/Redis →
//! judge freshness → answer, or join/lead the key's flight on a miss.
//! `X-Cache` says which:
//! - `HIT`: a fresh stored answer (XFetch may start a background refresh);
//! - `STALE`: past freshness, within grace: served at once while a background
//!   refresh runs (and kept served while ClickHouse fails);
//! - `MISS`: this process ran the ClickHouse query for this request;
//! - `COALESCED`: the request read along with a computation started by
//!   another request, in this process or another one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use dashcache::cache::{CacheKey, Entry};
use dashcache::catalog::{QueryDef, TimeRange};
use dashcache::clickhouse::UpstreamError;
use dashcache::coalesce::{FlightError, Role, Subscriber};
use dashcache::encoding::{self, Encoding};
use dashcache::fill::FillJob;
use dashcache::freshness::{self, EarlyRefresh, Freshness};
use dashcache::outcome::CacheStatus;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};

use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::prepared::Prepared;
use crate::reply::{self, Body, names};
use crate::state::App;

pub async fn handle<B>(
    app: &Arc<App>,
    name: &str,
    req: &Request<B>,
    caller: &Caller,
) -> Response<Body> {
    let Some(query) = app.catalog.get(name) else {
        return ApiError::UnknownQuery.reply(format!("no query named `{name}`"));
    };
    if !caller.tier.queries.allows(name) {
        return auth::forbidden(caller, &format!("query `{name}`"));
    }

    let now = Utc::now();
    let tenant = Some(caller.key.tenant.as_str());
    let prepared = match app.prepared.prepare(
        &app.config.cache.key_prefix,
        query,
        req.uri().query().unwrap_or(""),
        tenant,
        now,
    ) {
        Ok(prepared) => prepared,
        Err(response) => return *response,
    };
    let Prepared {
        key,
        sql,
        bound,
        format,
        range,
        asked,
    } = &*prepared;
    let format = *format;
    app.popularity
        .record(key, name, query.key_tenant(tenant), format, bound);
    let job = || FillJob {
        key: key.clone(),
        query: name.to_owned(),
        sql: sql.clone(),
        range: *range,
        asked: asked.clone(),
        format,
        ttl: query.ttl,
        grace: query.grace,
        replaces: None,
    };

    let now_ms = now.timestamp_millis();
    let mut timing = ServerTiming::default();
    let lookup = Instant::now();
    let found = app.cache.get(key, now_ms).await;
    timing.add("cache", lookup);
    if let Some(entry) = found {
        let early = EarlyRefresh {
            beta: app.config.cache.xfetch_beta,
            window: app.config.cache.early_refresh,
        };
        let min_ttl = i64::try_from(caller.tier.min_ttl.as_millis()).unwrap_or(i64::MAX);
        match freshness::judge_read(&entry.header, now_ms, early, freshness::sample(), min_ttl) {
            Freshness::Fresh { refresh_early } => {
                if refresh_early {
                    if refresh(app, key, entry.header.created_ms, job()) {
                        app.metrics.early_refreshes.inc();
                    }
                } else if entry.read_once.set(()).is_ok() {
                    refresh_ahead(app, key, &entry, now_ms, job);
                }
                app.metrics.cache_result(CacheStatus::Hit);
                return stored(
                    app,
                    &entry,
                    CacheStatus::Hit,
                    req.headers(),
                    now_ms,
                    &timing,
                )
                .await;
            }
            Freshness::Stale => {
                refresh(app, key, entry.header.created_ms, job());
                app.metrics.cache_result(CacheStatus::Stale);
                return stored(
                    app,
                    &entry,
                    CacheStatus::Stale,
                    req.headers(),
                    now_ms,
                    &timing,
                )
                .await;
            }
            Freshness::Expired => {}
        }
    }

    let (subscriber, leader) = match app.coalescer.join(key, app.config.coalesce.max_waiters) {
        Role::Leader(producer, subscriber) => {
            // Only requests that start a computation take a turn of the key's
            // allowance (waiting in line when it is used up); reading along
            // costs ClickHouse nothing.
            let turn = app.auth.misses.admit(&caller.key.id, &caller.tier);
            app.filler.spawn_after(job(), producer, turn);
            (subscriber, true)
        }
        Role::Follower(subscriber) => (subscriber, false),
        Role::Overloaded => {
            return ApiError::TooManyWaiters
                .reply("too many requests are waiting for this answer; retry shortly");
        }
    };
    streamed(
        app,
        query,
        subscriber,
        leader,
        &prepared,
        req.headers(),
        &mut timing,
    )
    .await
}

/// Arms the refresh-ahead timer of a stored answer on its first `HIT` in this
/// process (see [`crate::ahead`]): just before the answer expires it is
/// refreshed, unless an answer at least as new was stored meanwhile (the
/// fill checks under the key's lock).
fn refresh_ahead(
    app: &Arc<App>,
    key: &CacheKey,
    entry: &Entry,
    now_ms: i64,
    job: impl FnOnce() -> FillJob,
) {
    let created = entry.header.created_ms;
    app.ahead.arm(key, &entry.header, now_ms, || {
        let (app, key, job) = (Arc::downgrade(app), key.clone(), job());
        async move {
            let Some(app) = app.upgrade() else { return };
            if refresh(&app, &key, created, job) {
                app.metrics.ahead_refreshes.inc();
            }
        }
    });
}

/// Starts a background refresh of the answer created at `created_ms` unless
/// one is already running in this process (other processes are kept out by
/// the fill's Redis lock), or ClickHouse should not be asked now: every
/// replica is ejected, or the key's last computation failed and its backoff
/// runs (no retry storm: the stored answer is served meanwhile).
fn refresh(app: &App, key: &CacheKey, created_ms: i64, mut job: FillJob) -> bool {
    if app.filler.may_refresh(key).is_err() {
        return false;
    }
    match app.coalescer.join(key, usize::MAX) {
        Role::Leader(producer, _reader) => {
            job.replaces = Some(created_ms);
            app.filler.spawn(job, producer);
            true
        }
        Role::Follower(_) | Role::Overloaded => false,
    }
}

/// A stored answer (HIT or STALE), or 304 when the client has it already.
/// The stored body goes out as it is when the client accepts its encoding
/// (no compression work on a hit); otherwise it is decompressed.
async fn stored(
    app: &App,
    entry: &Entry,
    cache: CacheStatus,
    request: &HeaderMap,
    now_ms: i64,
    timing: &ServerTiming,
) -> Response<Body> {
    let age = u64::try_from((now_ms - entry.header.created_ms) / 1000).unwrap_or(0);
    let max_age = u64::try_from((entry.header.fresh_until_ms - now_ms) / 1000).unwrap_or(0);
    let not_modified = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|tag| tag.trim() == entry.header.etag || tag.trim() == "*")
        });
    let stored_encoding = entry.encoding();
    let accepted = encoding::negotiate(accept_encoding(request), &[stored_encoding]);
    let mut sent_encoding = Encoding::Identity;
    let mut response = if not_modified {
        let mut response = Response::new(reply::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else if stored_encoding == Encoding::Identity || accepted == stored_encoding {
        sent_encoding = stored_encoding;
        Response::new(reply::full(entry.body.clone()))
    } else {
        match decoded(app, entry, stored_encoding).await {
            Ok(body) => Response::new(reply::full(body)),
            Err(err) => {
                tracing::error!(error = %err, "stored answer does not decompress");
                return ApiError::DamagedEntry.reply("a stored answer is damaged; retry shortly");
            }
        }
    };
    let served = entry.served();
    let headers = response.headers_mut();
    // A hit carries about 16 headers (these, RateLimit-*, CORS): room for
    // them at once instead of growing the map as they come.
    headers.reserve(16);
    headers.insert(names::X_CACHE, HeaderValue::from_static(cache.as_str()));
    if let Some(etag) = &served.etag {
        headers.insert(header::ETAG, etag.clone());
    }
    if let Some(content_type) = &served.content_type {
        headers.insert(header::CONTENT_TYPE, content_type.clone());
    }
    headers.insert(header::AGE, reply::number(age));
    if let Some(range) = &served.time_range {
        headers.insert(names::X_TIME_RANGE, range.clone());
    }
    headers.insert(header::CACHE_CONTROL, reply::private_max_age(max_age));
    reply::set_encoding(headers, sent_encoding);
    timing.write(headers);
    response
}

/// The uncompressed body of a stored answer, decompressed off the async
/// runtime when large.
async fn decoded(app: &App, entry: &Entry, stored: Encoding) -> std::io::Result<Bytes> {
    if let Some(body) = entry.identity.get() {
        return Ok(body.clone());
    }
    let limit = app.config.cache.max_entry_bytes;
    let body = if entry.body.len() < 16 * 1024 {
        encoding::decompress(&entry.body, stored, limit)?
    } else {
        let packed = entry.body.clone();
        tokio::task::spawn_blocking(move || encoding::decompress(&packed, stored, limit))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))?
    };
    // Kept with the entry: while it sits in L1, the next such client costs nothing.
    let _ = entry.identity.set(body.clone());
    Ok(body)
}

fn accept_encoding(request: &HeaderMap) -> Option<&str> {
    request
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
}

/// Answers from a flight: waits (bounded) for the first chunk or the verdict,
/// so that a failure before any byte becomes a proper error status.
async fn streamed(
    app: &App,
    query: &QueryDef,
    mut subscriber: Subscriber,
    leader: bool,
    prepared: &Prepared,
    request: &HeaderMap,
    timing: &mut ServerTiming,
) -> Response<Body> {
    let wait = app.config.coalesce.wait_timeout;
    let started = Instant::now();
    let first = match tokio::time::timeout(wait, subscriber.next()).await {
        Ok(first) => first,
        Err(_) => Some(Err(FlightError::WaitTimeout(wait))),
    };
    timing.add("clickhouse", started);
    // Only the request that started the flight, in the process that ran the
    // query, is the MISS; everyone else read along.
    let cache = if leader && subscriber.computed_here() {
        CacheStatus::Miss
    } else {
        CacheStatus::Coalesced
    };
    let body = match first {
        Some(Ok(first)) => reply::stream(first, subscriber),
        None => reply::full(Bytes::new()),
        Some(Err(err)) => return upstream_error(&err),
    };
    app.metrics.cache_result(cache);
    let encoding = encoding::negotiate(accept_encoding(request), &[Encoding::Zstd, Encoding::Gzip]);
    let mut response = Response::new(reply::compressed(body, encoding));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prepared.format.content_type()),
    );
    headers.insert(names::X_CACHE, HeaderValue::from_static(cache.as_str()));
    time_range(headers, prepared.range);
    headers.insert(
        header::CACHE_CONTROL,
        reply::private_max_age(query.ttl.as_secs()),
    );
    reply::set_encoding(headers, encoding);
    timing.write(headers);
    response
}

/// `X-Time-Range`: the absolute range `[from, to)` the answer covers (a
/// relative request's moves with each refresh).
fn time_range(headers: &mut HeaderMap, range: Option<TimeRange>) {
    if let Some(range) = range
        && let Ok(value) = HeaderValue::from_str(&range.header_value())
    {
        headers.insert(names::X_TIME_RANGE, value);
    }
}

/// The `Server-Timing` header: where a request's time went.
#[derive(Default)]
struct ServerTiming {
    entries: Vec<(&'static str, Duration)>,
}

impl ServerTiming {
    fn add(&mut self, name: &'static str, since: Instant) {
        self.entries.push((name, since.elapsed()));
    }

    /// `name;dur=<ms with two decimals>, …`, written in one buffer.
    fn write(&self, headers: &mut HeaderMap) {
        use std::fmt::Write;
        let mut text = String::with_capacity(24 * self.entries.len());
        for (i, (name, took)) in self.entries.iter().enumerate() {
            let hundredths = took.as_micros() / 10;
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(
                text,
                "{sep}{name};dur={}.{:02}",
                hundredths / 100,
                hundredths % 100
            );
        }
        if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(text)) {
            headers.insert(names::SERVER_TIMING, value);
        }
    }
}

/// A failed computation as the client sees it: 503 + `Retry-After` (429
/// when the key has too many computations), nothing being cached to serve
/// instead. ClickHouse's own message stays in the log: it can carry SQL and
/// server internals.
fn upstream_error(err: &FlightError) -> Response<Body> {
    match err {
        FlightError::Upstream(err) if err.is_timeout() => ApiError::UpstreamTimeout
            .reply("ClickHouse did not finish the query in time; narrow the range or retry later"),
        FlightError::Upstream(UpstreamError::Connect(_)) => {
            ApiError::UpstreamUnavailable.reply("ClickHouse is unreachable")
        }
        FlightError::Upstream(err) => ApiError::UpstreamError.reply(match err.code() {
            Some(code) => format!("ClickHouse failed the query (code {code})"),
            None => "ClickHouse failed the query".to_string(),
        }),
        FlightError::WaitTimeout(wait) => {
            ApiError::UpstreamTimeout.reply(format!("no answer within {}s", wait.as_secs()))
        }
        FlightError::Aborted => ApiError::UpstreamError.reply("the query ended without an answer"),
        FlightError::OverCapacity(detail) => ApiError::TooManyUncached.reply(detail.clone()),
        FlightError::Saturated(refused) => ApiError::UpstreamTimeout.reply(format!(
            "ClickHouse is busy with this proxy's other queries ({refused}); retry shortly"
        )),
        FlightError::BackingOff(wait) => ApiError::UpstreamUnavailable.reply(format!(
            "ClickHouse failed this query moments ago; it is tried again in {}s",
            wait.as_secs().max(1)
        )),
    }
}
