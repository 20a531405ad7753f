//! Who is calling: API key → tier and tenant, and the per-key rate limit.
//!
//! Runs before anything else on `/v1/*` routes: 400 for a key in the query
//! string (keys go in headers only; such URLs are logged with the value
//! hidden, [`loggable_uri`]); 401 for a missing, unknown, expired or revoked key; 403 for a key whose tier is not configured; 429 with
//! `Retry-After` past the tier's rate. Every answer to an authenticated request
//! carries the `RateLimit-*` headers. The tenant used in queries is the key's,
//! never anything in the URL. The operator pages need a key of a tier with
//! `operator = true` (the router checks [`tier::Tier::operator`]; 403 from
//! [`not_operator`]).

use std::borrow::Cow;
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
use dashcache::catalog::is_credential_param;
use dashcache::outcome::RateOutcome;
use http::{HeaderMap, Request, Response, Uri, header};

use crate::error::ApiError;
use crate::reply::{self, Body};

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

/// The credential-like names in a query string (see
/// [`dashcache::catalog::CREDENTIAL_PARAMS`]).
fn credential_names(query: &str) -> impl Iterator<Item = Cow<'_, str>> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(name, _)| name)
        .filter(|name| is_credential_param(name))
}

/// 400 for a request that carries an API key (or what may be one) in its
/// query string: it says where the key goes instead, and never echoes it.
pub fn key_in_url(uri: &Uri) -> Option<Response<Body>> {
    let name = credential_names(uri.query()?).next()?;
    Some(ApiError::KeyInUrl.reply(format!(
        "API keys are not accepted in the URL (`{name}=`): URLs end up in logs and browser history. \
         Send the key in the `X-API-Key: <key>` or `Authorization: Bearer <key>` header, and \
         consider this key exposed"
    )))
}

/// The URI as the request log writes it: the values of credential-like
/// query parameters replaced by `REDACTED`.
pub fn loggable_uri(uri: &Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.to_string();
    };
    if credential_names(query).next().is_none() {
        return uri.to_string();
    }
    let mut redacted = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if is_credential_param(&name) {
            redacted.append_pair(&name, "REDACTED");
        } else {
            redacted.append_pair(&name, &value);
        }
    }
    format!("{}?{}", uri.path(), redacted.finish())
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

/// 403 for a key whose tier may not read the operator pages (`path`).
pub fn not_operator(caller: &Caller, path: &str) -> Response<Body> {
    ApiError::Forbidden.reply(format!(
        "{path} is an operator page: tier `{}` may not read it; use a key of a tier with \
         `operator = true`",
        caller.tier.name
    ))
}

/// The IETF `RateLimit-*` headers.
pub fn rate_headers(headers: &mut HeaderMap, rate: &Decision) {
    use crate::reply::names;
    headers.insert(names::RATELIMIT_LIMIT, reply::number(rate.limit.into()));
    headers.insert(
        names::RATELIMIT_REMAINING,
        reply::number(rate.remaining.into()),
    );
    headers.insert(names::RATELIMIT_RESET, reply::number(rate.reset_secs));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_urls_are_refused_and_logged_redacted() {
        for uri in [
            "/v1/query/q?api_key=SECRET&from=now-1d",
            "/v1/query/q?from=now-1d&Token=SECRET",
            "/v1/export/e?access_token=SECRET",
            "/v1/query/q?key=SECRET",
        ] {
            let uri: Uri = uri.parse().unwrap();
            let refused = key_in_url(&uri).expect("refused");
            assert_eq!(refused.status(), 400);
            let logged = loggable_uri(&uri);
            assert!(!logged.contains("SECRET"), "{logged}");
            assert!(logged.contains("=REDACTED"), "{logged}");
        }
        let fine: Uri = "/v1/query/q?from=now-1d&keys=a".parse().unwrap();
        assert!(key_in_url(&fine).is_none());
        assert_eq!(loggable_uri(&fine), "/v1/query/q?from=now-1d&keys=a");
    }
}
