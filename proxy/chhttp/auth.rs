//! ClickHouse-style credentials → a dashcache key, its tier and ClickHouse user.
//!
//! Owns accepting a request on the ClickHouse-compatible endpoint: the user
//! is the key's id or label, the password is the key itself (Basic,
//! `X-ClickHouse-User`/`-Key`, or `user`/`password` parameters; see
//! `request::read`). The key's tier must allow the endpoint; its rate limit
//! applies. The ClickHouse user is the tier's, with a password from the
//! environment, never from the client. Failures are ClickHouse's
//! `516 AUTHENTICATION_FAILED` (wrong or missing credentials), `497
//! ACCESS_DENIED` (tier) and `201 QUOTA_EXCEEDED` (rate).

use dashcache::outcome::RateOutcome;

use super::error::ChError;
use super::request::Credentials;
use crate::auth::Caller;
use crate::reply::Body;
use crate::state::App;

/// Authenticates `credentials` and applies the tier's rate limit.
pub async fn authenticate(
    app: &App,
    credentials: Option<&Credentials>,
) -> Result<Caller, http::Response<Body>> {
    let failed = |user: &str| {
        let user = if user.is_empty() { "default" } else { user };
        ChError::AuthenticationFailed.reply(&format!(
            "{user}: Authentication failed: password is incorrect, or there is no user with such name"
        ))
    };
    let Some(credentials) = credentials.filter(|c| !c.password.is_empty()) else {
        return Err(failed(credentials.map_or("", |c| c.user.as_str())));
    };
    let auth = &app.auth;
    let now = chrono::Utc::now();
    let key = auth
        .keys
        .check_or_reload(
            Some(credentials.password.as_str()),
            now.timestamp_millis(),
            &auth.key_store,
        )
        .await
        .map_err(|_| failed(&credentials.user))?;
    let user = credentials.user.as_str();
    if !user.is_empty() && user != key.id && key.label.as_deref() != Some(user) {
        return Err(failed(user));
    }
    let Some(tier) = auth.tiers.get(&key.tier).cloned() else {
        return Err(ChError::AccessDenied.reply(&format!(
            "{}: Not enough privileges: the key's tier `{}` is not configured",
            key.id, key.tier
        )));
    };
    if !tier.clickhouse_http {
        return Err(ChError::AccessDenied.reply(&format!(
            "{}: Not enough privileges: tier `{}` may not use the ClickHouse HTTP interface",
            key.id, tier.name
        )));
    }
    let rate = auth
        .limiter
        .check(&key.id, &tier, now.timestamp_micros())
        .await;
    auth.metrics.rate_outcome(if rate.allowed {
        RateOutcome::Allowed
    } else {
        RateOutcome::Limited
    });
    if !rate.allowed {
        let mut response = ChError::QuotaExceeded.reply_retry(
            &format!(
                "Quota for key {} is exceeded: {} requests per minute (burst {})",
                key.id, tier.requests_per_minute, tier.burst
            ),
            rate.retry_after_secs,
        );
        crate::auth::rate_headers(response.headers_mut(), &rate);
        return Err(response);
    }
    Ok(Caller { key, tier, rate })
}
