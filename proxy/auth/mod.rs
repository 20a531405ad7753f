//! Who is calling: API key → tier and tenant, and the per-key rate limit.
//!
//! Runs before anything else on `/v1/*` routes: 401 for a missing, unknown,
//! expired or revoked key; 403 for a key whose tier is not configured; 429 with
//! `Retry-After` past the tier's rate. Every answer to an authenticated request
//! carries the `RateLimit-*` headers. The tenant used in queries is the key's,
//! never anything in the URL.

use std::sync::Arc;

pub mod keys;
pub mod missqueue;
pub mod ratelimit;
pub mod tier;

use dashcache::metrics::Metrics;

use self::keys::{ApiKey, KeyError, KeyRing, KeyStore};
use self::missqueue::MissQueue;
use self::ratelimit::Decision;
use self::ratelimit::RateLimiter;
use self::tier::Tier;
use self::tier::Tiers;
use dashcache::outcome::RateOutcome;
use http::{HeaderMap, HeaderValue, Request, Response, header};

use crate::error::ApiError;
use crate::reply::Body;

/// An authenticated caller.
pub struct Caller {
    pub key: Arc<ApiKey>,
    pub tier: Arc<Tier>,
    pub rate: Decision,
}

/// The key a request presents: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    // Another scheme (say Basic, added by a gateway) does not hide X-API-Key.
    bearer.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    })
}

/// Who may call, and how much: keys, tiers, rate limits, miss queue.
pub struct Auth {
    pub keys: Arc<KeyRing>,
    pub key_store: KeyStore,
    pub tiers: Tiers,
    pub limiter: Arc<RateLimiter>,
    /// Per-key turns at starting a computation (`max_concurrent_misses`).
    pub misses: MissQueue,
    pub metrics: Arc<Metrics>,
}

impl Auth {
    /// Authenticates and rate-limits a request.
    pub async fn authenticate<B>(&self, req: &Request<B>) -> Result<Caller, Response<Body>> {
        authenticate(self, req).await
    }
}

async fn authenticate<B>(app: &Auth, req: &Request<B>) -> Result<Caller, Response<Body>> {
    let now = chrono::Utc::now();
    let key = app
        .keys
        .check_or_reload(
            presented(req.headers()),
            now.timestamp_millis(),
            &app.key_store,
        )
        .await
        .map_err(unauthorized)?;
    let Some(tier) = app.tiers.get(&key.tier).cloned() else {
        tracing::warn!(key = %key.id, tier = %key.tier, "key of an unconfigured tier");
        return Err(
            ApiError::Forbidden.reply(format!("this key's tier `{}` is not configured", key.tier))
        );
    };
    let rate = app
        .limiter
        .check(&key.id, &tier, now.timestamp_micros())
        .await;
    app.metrics.rate_outcome(if rate.allowed {
        RateOutcome::Allowed
    } else {
        RateOutcome::Limited
    });
    if !rate.allowed {
        let mut response = ApiError::RateLimited.reply_retry_in(
            format!(
                "rate limit of {} requests per minute (burst {}) exceeded; retry in {} s",
                tier.requests_per_minute, tier.burst, rate.retry_after_secs
            ),
            rate.retry_after_secs,
        );
        rate_headers(response.headers_mut(), &rate);
        return Err(response);
    }
    Ok(Caller { key, tier, rate })
}

fn unauthorized(err: KeyError) -> Response<Body> {
    ApiError::Unauthorized.reply(err.to_string())
}

/// 403 for a query or export outside the caller's tier.
pub fn forbidden(caller: &Caller, what: &str) -> Response<Body> {
    ApiError::Forbidden.reply(format!("tier `{}` may not call {what}", caller.tier.name))
}

/// The IETF `RateLimit-*` headers.
pub fn rate_headers(headers: &mut HeaderMap, rate: &Decision) {
    headers.insert("ratelimit-limit", HeaderValue::from(rate.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(rate.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(rate.reset_secs));
}
