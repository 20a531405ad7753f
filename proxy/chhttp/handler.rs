//! A statement on the ClickHouse-compatible endpoint: cache, coalescing, or pass-through.
//!
//! authenticate → read the statement (no I/O to ClickHouse before it is
//! classified read-only) → key → L1/Redis → freshness → answer, or lead/join
//! the key's flight through the same `Coalescer` and `Filler` as the named
//! API (one ClickHouse query per key across proxies, readers stream, STALE
//! while a refresh runs). Statements no rule caches (metadata, `system.`
//! tables by the shipped rules, `no_cache=1`) go straight through under the
//! key's miss queue (`X-Cache: BYPASS`). Every answer carries `X-Cache` and
//! `X-ClickHouse-Query-Id`; cached ones replay ClickHouse's stored headers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use dashcache::cache::{CacheKey, Entry};
use dashcache::coalesce::{FlightError, Role};
use dashcache::encoding::{self, Encoding};
use dashcache::fill::{FillJob, Filler};
use dashcache::format::Format;
use dashcache::freshness::{self, EarlyRefresh, Freshness};
use dashcache::outcome::CacheStatus;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};

use super::error::{ChError, passed_on};
use super::request::{self, Asked};
use super::rules::Ttl;
use super::statement::{self, Kind, Refusal};
use super::upstream::{self, Exchange};
use crate::auth::Caller;
use crate::reply::{self, Body, BoxError};
use crate::state::App;

/// The cache key's "query" part of every answer of this endpoint.
const KEY_NAME: &str = "clickhouse_http";

/// Runs one statement (`GET /?query=` or `POST /`).
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let (asked, query_param) = request::read(parts.uri.query(), &parts.headers);
    let caller = match super::auth::authenticate(app, asked.credentials.as_ref()).await {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    let mut response = run(app, &parts, body, asked, query_param, &caller).await;
    crate::auth::rate_headers(response.headers_mut(), &caller.rate);
    if crate::routes::may_log(&app.config.proxy, response.status()) {
        response
            .extensions_mut()
            .insert(crate::routes::KeyId(caller.key.id.clone()));
    }
    response
}

async fn run(
    app: &Arc<App>,
    parts: &http::request::Parts,
    body: Incoming,
    asked: Asked,
    query_param: Option<String>,
    caller: &Caller,
) -> Response<Body> {
    let limit = app.config.clickhouse_http.max_query_bytes;
    let body = if parts.method == http::Method::POST {
        match http_body_util::Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return ChError::Syntax.reply(&format!(
                    "Max query size exceeded: the statement is over {limit} bytes (clickhouse_http.max_query_bytes)"
                ));
            }
        }
    } else {
        Bytes::new()
    };
    let Ok(sql) = request::sql(query_param, &body) else {
        return ChError::Syntax.reply("the statement is not valid UTF-8");
    };
    if sql.len() > limit {
        return ChError::Syntax.reply(&format!(
            "Max query size exceeded: the statement is over {limit} bytes (clickhouse_http.max_query_bytes)"
        ));
    }
    let statement = match statement::classify(&sql) {
        Ok(statement) => statement,
        Err(refusal @ Refusal::NotReadOnly(_)) => {
            return ChError::Readonly.reply(&refusal.message());
        }
        Err(refusal) => return ChError::Syntax.reply(&refusal.message()),
    };

    let ch = &app.config.clickhouse;
    let params = request::with_limits(
        &asked.forwarded,
        ch.readonly,
        [
            ch.max_execution_time.as_secs().max(1),
            ch.max_result_rows,
            ch.max_result_bytes,
        ],
    );
    let execution_secs = params
        .iter()
        .find(|(name, _)| name == "max_execution_time")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(30);
    let format = statement::format_clause(statement.text)
        .or_else(|| asked.forwarded.get("default_format").map(String::as_str))
        .unwrap_or("TabSeparated");
    let user = caller.tier.clickhouse_user.clone();
    let exchange = Arc::new(Exchange {
        servers: app.clickhouse_http.servers.clone(),
        sql: sql.clone(),
        params,
        password: app.clickhouse_http.password(&user),
        user,
        detect: upstream::detect(format),
        read_timeout: Duration::from_secs(execution_secs + 5),
    });
    let query_id = asked.query_id.clone().unwrap_or_else(new_query_id);
    let opted_out = asked.no_cache || opts_out(statement.text);
    let ttl = match statement.kind {
        Kind::Select if !opted_out => app.clickhouse_http.rules.ttl(statement.text),
        _ => None,
    };
    let Some(ttl) = ttl else {
        return bypass(app, caller, &exchange, &asked, &parts.headers, &query_id).await;
    };
    let identity = identity(statement.text, &exchange);
    let key = CacheKey::new(
        &app.config.cache.key_prefix,
        KEY_NAME,
        Some(&exchange.user),
        Format::Tsv,
        &identity,
    );
    let answer = Cached {
        app,
        key: &key,
        exchange: &exchange,
        ttl,
        asked: &asked,
        request: &parts.headers,
        query_id: &query_id,
    };
    answer.respond(caller).await
}

/// `SETTINGS use_query_cache = 0` in the statement.
fn opts_out(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.match_indices("use_query_cache").any(|(at, word)| {
        let rest = lower[at + word.len()..].trim_start();
        rest.strip_prefix('=')
            .is_some_and(|v| matches!(v.trim_start().chars().next(), Some('0') | Some('f')))
    })
}

/// What identifies an answer besides the ClickHouse user: the statement
/// text and every parameter sent with it (sorted, limits applied).
fn identity(text: &str, exchange: &Exchange) -> String {
    let mut identity = String::with_capacity(text.len() + 128);
    identity.push_str(text);
    for (name, value) in &exchange.params {
        identity.push('\0');
        identity.push_str(name);
        identity.push('=');
        identity.push_str(value);
    }
    identity
}

fn new_query_id() -> String {
    uuid::Uuid::from_u128(rand::random::<u128>()).to_string()
}

/// One cacheable statement being answered.
struct Cached<'a> {
    app: &'a Arc<App>,
    key: &'a CacheKey,
    exchange: &'a Arc<Exchange>,
    ttl: Ttl,
    asked: &'a Asked,
    request: &'a HeaderMap,
    query_id: &'a str,
}

impl Cached<'_> {
    async fn respond(&self, caller: &Caller) -> Response<Body> {
        let app = self.app;
        let now_ms = Utc::now().timestamp_millis();
        if let Some(entry) = app.cache.get(self.key, now_ms).await {
            let early = EarlyRefresh {
                beta: app.config.cache.xfetch_beta,
                window: app.config.cache.early_refresh,
            };
            let min_ttl = i64::try_from(caller.tier.min_ttl.as_millis()).unwrap_or(i64::MAX);
            match freshness::judge_read(&entry.header, now_ms, early, freshness::sample(), min_ttl)
            {
                Freshness::Fresh { refresh_early } => {
                    if refresh_early && self.refresh(&entry) {
                        app.metrics.early_refreshes.inc();
                    }
                    app.metrics.cache_result(CacheStatus::Hit);
                    return self.stored(&entry, CacheStatus::Hit).await;
                }
                Freshness::Stale => {
                    self.refresh(&entry);
                    app.metrics.cache_result(CacheStatus::Stale);
                    return self.stored(&entry, CacheStatus::Stale).await;
                }
                Freshness::Expired => {}
            }
        }
        let (mut subscriber, leader) = match app
            .coalescer
            .join(self.key, app.config.coalesce.max_waiters)
        {
            Role::Leader(producer, subscriber) => {
                let turn = app.auth.misses.admit(&caller.key.id, &caller.tier);
                self.filler().spawn_after(self.job(), producer, turn);
                (subscriber, true)
            }
            Role::Follower(subscriber) => (subscriber, false),
            Role::Overloaded => {
                return ChError::TooManyQueries
                    .reply_retry("too many requests are waiting for this answer", 1);
            }
        };
        let wait = app.config.coalesce.wait_timeout;
        let first = match tokio::time::timeout(wait, subscriber.next()).await {
            Ok(first) => first,
            Err(_) => Some(Err(FlightError::WaitTimeout(wait))),
        };
        let status = if leader && subscriber.computed_here() {
            CacheStatus::Miss
        } else {
            CacheStatus::Coalesced
        };
        // Set before the first chunk (or the end), so known by now.
        let headers = subscriber.headers();
        let body = match first {
            Some(Ok(first)) => reply::stream(first, subscriber),
            None => reply::empty(),
            Some(Err(err)) => return with_query_id(passed_on(&err), self.query_id),
        };
        app.metrics.cache_result(status);
        self.answer(body, &headers, status, Encoding::Identity)
    }

    fn filler(&self) -> Arc<Filler> {
        let app = self.app;
        Arc::new(Filler {
            upstream: Arc::new(upstream::Fill(self.exchange.clone())),
            store: app.cache.clone(),
            metrics: app.metrics.clone(),
            max_entry_bytes: app.config.cache.max_entry_bytes,
            coalesce: app.config.coalesce.clone(),
            // The process's own: one backoff per key and one ClickHouse
            // admission line for both APIs.
            backoff: app.filler.backoff.clone(),
            admission: app.filler.admission.clone(),
        })
    }

    fn job(&self) -> FillJob {
        FillJob {
            key: self.key.clone(),
            query: KEY_NAME.to_owned(),
            sql: self.exchange.sql.clone(),
            range: None,
            asked: None,
            format: self.exchange.detect,
            ttl: self.ttl.ttl,
            grace: self.ttl.grace,
            replaces: None,
        }
    }

    /// Starts a background refresh of `entry` unless one runs in this process.
    fn refresh(&self, entry: &Entry) -> bool {
        match self.app.coalescer.join(self.key, usize::MAX) {
            Role::Leader(producer, _reader) => {
                let mut job = self.job();
                job.replaces = Some(entry.header.created_ms);
                self.filler().spawn(job, producer);
                true
            }
            Role::Follower(_) | Role::Overloaded => false,
        }
    }

    /// A stored answer, as stored when the client takes its encoding, else decoded.
    async fn stored(&self, entry: &Entry, status: CacheStatus) -> Response<Body> {
        let stored = entry.encoding();
        let offered = self.offered();
        if stored != Encoding::Identity && offered.contains(&stored) {
            let accepted = encoding::negotiate(accept_encoding(self.request), &[stored]);
            if accepted == stored {
                let body = reply::full(entry.body.clone());
                return self.answer(body, &entry.header.headers, status, stored);
            }
        }
        match decoded(self.app, entry, stored).await {
            Ok(body) => self.answer(
                reply::full(body),
                &entry.header.headers,
                status,
                Encoding::Identity,
            ),
            Err(err) => {
                tracing::error!(error = %err, "stored answer does not decompress");
                ChError::Network.reply_retry("a stored answer is damaged; retry", 1)
            }
        }
    }

    fn offered(&self) -> &'static [Encoding] {
        if self.asked.compress_response {
            &[Encoding::Zstd, Encoding::Gzip]
        } else {
            &[]
        }
    }

    /// The answer with ClickHouse's `headers`; `sent` is the body's encoding
    /// as it is (identity bodies are compressed here when the client asked).
    fn answer(
        &self,
        body: Body,
        headers: &[(String, String)],
        status: CacheStatus,
        sent: Encoding,
    ) -> Response<Body> {
        let encoding = if sent == Encoding::Identity {
            encoding::negotiate(accept_encoding(self.request), self.offered())
        } else {
            sent
        };
        let body = if sent == Encoding::Identity {
            reply::compressed(body, encoding)
        } else {
            body
        };
        let mut response = Response::new(body);
        let out = response.headers_mut();
        replay(out, headers);
        out.insert(
            reply::names::X_CACHE,
            HeaderValue::from_static(status.as_str()),
        );
        if encoding != Encoding::Identity {
            out.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(encoding.token()),
            );
        }
        with_query_id(response, self.query_id)
    }
}

/// The uncompressed body of a stored answer (kept with the entry while in L1).
async fn decoded(app: &App, entry: &Entry, stored: Encoding) -> std::io::Result<Bytes> {
    if stored == Encoding::Identity {
        return Ok(entry.body.clone());
    }
    if let Some(body) = entry.identity.get() {
        return Ok(body.clone());
    }
    let (packed, limit) = (entry.body.clone(), app.config.cache.max_entry_bytes);
    let body = tokio::task::spawn_blocking(move || encoding::decompress(&packed, stored, limit))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))?;
    let _ = entry.identity.set(body.clone());
    Ok(body)
}

fn accept_encoding(request: &HeaderMap) -> Option<&str> {
    request
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
}

/// ClickHouse's kept headers onto `out`.
fn replay(out: &mut HeaderMap, headers: &[(String, String)]) {
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.insert(name, value);
        }
    }
}

fn with_query_id(mut response: Response<Body>, query_id: &str) -> Response<Body> {
    if let Ok(value) = HeaderValue::from_str(query_id) {
        response
            .headers_mut()
            .insert("x-clickhouse-query-id", value);
    }
    response
}

/// A statement passed through: streamed from ClickHouse under a turn of the
/// key's miss queue, never stored.
async fn bypass(
    app: &Arc<App>,
    caller: &Caller,
    exchange: &Arc<Exchange>,
    asked: &Asked,
    request: &HeaderMap,
    query_id: &str,
) -> Response<Body> {
    let slot = match app.auth.misses.admit(&caller.key.id, &caller.tier).await {
        Ok(slot) => slot,
        Err(err) => return with_query_id(passed_on(&err), query_id),
    };
    let mut answer = exchange.start(query_id);
    let first = match answer.next_chunk().await {
        Ok(first) => first,
        Err(err) => return with_query_id(passed_on(&FlightError::Upstream(err)), query_id),
    };
    app.metrics.cache_result(CacheStatus::Bypass);
    let headers = answer.kept_headers().to_vec();
    let rest = futures_util::stream::unfold(
        (answer, slot, first.is_none()),
        |(mut answer, slot, done)| async move {
            if done {
                return None;
            }
            match answer.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(Frame::data(chunk)), (answer, slot, false))),
                Ok(None) => None,
                Err(err) => Some((Err(BoxError::from(err)), (answer, slot, true))),
            }
        },
    );
    let first =
        futures_util::stream::iter(first.map(|chunk| Ok::<_, BoxError>(Frame::data(chunk))));
    let body: Body =
        http_body_util::StreamBody::new(futures_util::StreamExt::chain(first, rest)).boxed_unsync();
    let offered: &[Encoding] = if asked.compress_response {
        &[Encoding::Zstd, Encoding::Gzip]
    } else {
        &[]
    };
    let encoding = encoding::negotiate(accept_encoding(request), offered);
    let mut response = Response::new(reply::compressed(body, encoding));
    let out = response.headers_mut();
    replay(out, &headers);
    out.insert(
        reply::names::X_CACHE,
        HeaderValue::from_static(CacheStatus::Bypass.as_str()),
    );
    if encoding != Encoding::Identity {
        out.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(encoding.token()),
        );
    }
    with_query_id(response, query_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_query_cache_0_opts_out() {
        assert!(opts_out("SELECT 1 SETTINGS use_query_cache = 0"));
        assert!(opts_out("SELECT 1 SETTINGS USE_QUERY_CACHE=false"));
        assert!(!opts_out("SELECT 1 SETTINGS use_query_cache = 1"));
        assert!(!opts_out("SELECT 1"));
    }
}
