//! Every error answer the proxy gives, from one place.
//!
//! Owns [`ApiError`]: for each kind of failure its HTTP status, the `type`
//! string of its JSON body (`{"detail": "...", "type": "..."}`), whether it
//! carries `Retry-After` (and how many seconds), its other fixed headers, and
//! what the OpenAPI document says about it (where it can happen, in words).
//! Handlers, auth and routing build error responses only through
//! [`ApiError::reply`]; [`crate::openapi`] lists statuses and `type` values
//! from [`ApiError::ALL`], so the document cannot drift from what is sent.
//! Invalid parameters are the one other error shape: FastAPI's 422,
//! `{"detail": [{loc, msg, type}]}` ([`invalid`]).
//!
//! It does not decide *when* a request fails (handlers and [`crate::auth`]
//! do), and it does not touch success bodies or the NDJSON error line that
//! ends a failed export ([`crate::handlers::export`]).

use dashcache::params::Problem;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};

use crate::reply::{self, Body};

/// The seconds a client is told to wait when nothing can be served now.
const RETRY_SECS: u64 = 5;

/// One kind of error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiError {
    /// An API key in the URL's query string (keys go in headers only).
    KeyInUrl,
    /// No API key, or an unknown, expired or revoked one.
    Unauthorized,
    /// The key's tier is not configured, or may not call this.
    Forbidden,
    /// `/v1/query/{name}` names no query.
    UnknownQuery,
    /// `/v1/export/{name}` names no export.
    UnknownExport,
    /// No route for the path.
    NotFound,
    /// A method other than GET or HEAD.
    MethodNotAllowed,
    /// An export over the tier's row or byte limit.
    ExportTooLarge,
    /// Over the tier's request rate (`Retry-After` from the limiter).
    RateLimited,
    /// Too many uncached queries of one key at once.
    TooManyUncached,
    /// A bug: a template did not render.
    Internal,
    /// ClickHouse did not answer in time.
    UpstreamTimeout,
    /// ClickHouse cannot be reached.
    UpstreamUnavailable,
    /// ClickHouse failed the query.
    UpstreamError,
    /// Too many requests wait for one answer.
    TooManyWaiters,
    /// A stored answer does not decompress (its `type` is `internal`, but it
    /// is worth retrying: the next computation replaces it).
    DamagedEntry,
    /// A CORS preflight from an origin `[cors]` does not allow.
    OriginNotAllowed,
}

/// How an error's `Retry-After` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// Always these seconds.
    Secs(u64),
    /// When the rate limiter allows the key again ([`ApiError::reply_retry_in`]).
    Limiter,
}

/// Where an error can be answered, for the OpenAPI document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `GET /v1/query/{name}`.
    Query,
    /// `GET /v1/export/{name}`.
    Export,
    /// `/healthz`, `/readyz`, `/metrics` when the config protects them.
    Service,
}

impl Surface {
    pub const ALL: [Surface; 3] = [Surface::Query, Surface::Export, Surface::Service];

    pub const fn as_str(self) -> &'static str {
        match self {
            Surface::Query => "query",
            Surface::Export => "export",
            Surface::Service => "service",
        }
    }
}

/// What API-key checks can answer, on every surface that checks keys.
const KEYED: &[Surface] = &[Surface::Query, Surface::Export, Surface::Service];
/// What any computation can answer.
const COMPUTED: &[Surface] = &[Surface::Query, Surface::Export];

impl ApiError {
    pub const ALL: [ApiError; 17] = [
        ApiError::KeyInUrl,
        ApiError::Unauthorized,
        ApiError::Forbidden,
        ApiError::UnknownQuery,
        ApiError::UnknownExport,
        ApiError::NotFound,
        ApiError::MethodNotAllowed,
        ApiError::ExportTooLarge,
        ApiError::RateLimited,
        ApiError::TooManyUncached,
        ApiError::Internal,
        ApiError::UpstreamTimeout,
        ApiError::UpstreamUnavailable,
        ApiError::UpstreamError,
        ApiError::TooManyWaiters,
        ApiError::DamagedEntry,
        ApiError::OriginNotAllowed,
    ];

    pub const fn status(self) -> StatusCode {
        match self {
            ApiError::KeyInUrl => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden | ApiError::OriginNotAllowed => StatusCode::FORBIDDEN,
            ApiError::UnknownQuery | ApiError::UnknownExport | ApiError::NotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::ExportTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited | ApiError::TooManyUncached => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::UpstreamTimeout
            | ApiError::UpstreamUnavailable
            | ApiError::UpstreamError
            | ApiError::TooManyWaiters
            | ApiError::DamagedEntry => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The body's `type`: stable, machine-readable.
    pub const fn as_str(self) -> &'static str {
        match self {
            ApiError::KeyInUrl => "key_in_url",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::UnknownQuery => "unknown_query",
            ApiError::UnknownExport => "unknown_export",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::ExportTooLarge => "export_too_large",
            ApiError::RateLimited => "rate_limited",
            ApiError::TooManyUncached => "too_many_uncached",
            ApiError::Internal | ApiError::DamagedEntry => "internal",
            ApiError::UpstreamTimeout => "upstream_timeout",
            ApiError::UpstreamUnavailable => "upstream_unavailable",
            ApiError::UpstreamError => "upstream_error",
            ApiError::TooManyWaiters => "too_many_waiters",
            ApiError::OriginNotAllowed => "origin_not_allowed",
        }
    }

    /// Whether (and how) the answer carries `Retry-After`.
    pub const fn retry_after(self) -> Option<RetryAfter> {
        match self {
            ApiError::RateLimited => Some(RetryAfter::Limiter),
            ApiError::TooManyUncached => Some(RetryAfter::Secs(1)),
            ApiError::UpstreamTimeout
            | ApiError::UpstreamUnavailable
            | ApiError::UpstreamError
            | ApiError::TooManyWaiters
            | ApiError::DamagedEntry => Some(RetryAfter::Secs(RETRY_SECS)),
            _ => None,
        }
    }

    /// Headers the answer always carries besides `Content-Type` and
    /// `Retry-After`: (name as documented, value).
    pub const fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ApiError::Unauthorized => &[("WWW-Authenticate", "Bearer")],
            ApiError::MethodNotAllowed => &[("Allow", "GET, HEAD")],
            _ => &[],
        }
    }

    /// Whether the answer always carries the `RateLimit-*` headers (answers
    /// after a successful key check on `/v1/*` carry them too, but not every
    /// one of a kind does).
    pub const fn rate_limit_headers(self) -> bool {
        matches!(self, ApiError::RateLimited)
    }

    /// The documented operations that can answer this; none for answers to
    /// requests outside the document (unknown paths, other methods).
    pub const fn surfaces(self) -> &'static [Surface] {
        match self {
            ApiError::KeyInUrl
            | ApiError::Unauthorized
            | ApiError::Forbidden
            | ApiError::RateLimited => KEYED,
            ApiError::UnknownQuery
            | ApiError::TooManyUncached
            | ApiError::TooManyWaiters
            | ApiError::DamagedEntry => &[Surface::Query],
            ApiError::UnknownExport | ApiError::ExportTooLarge => &[Surface::Export],
            ApiError::NotFound | ApiError::MethodNotAllowed | ApiError::OriginNotAllowed => &[],
            ApiError::Internal
            | ApiError::UpstreamTimeout
            | ApiError::UpstreamUnavailable
            | ApiError::UpstreamError => COMPUTED,
        }
    }

    /// When it happens, in words (the OpenAPI response description).
    pub const fn description(self) -> &'static str {
        match self {
            ApiError::KeyInUrl => {
                "An API key in the query string: send it in the `X-API-Key` or `Authorization: Bearer` header"
            }
            ApiError::Unauthorized => "No API key, or an unknown, expired or revoked one",
            ApiError::Forbidden => "The key's tier may not call this, or is not configured",
            ApiError::UnknownQuery => "No such query",
            ApiError::UnknownExport => "No such export",
            ApiError::NotFound => "No such route",
            ApiError::MethodNotAllowed => "A method other than GET or HEAD",
            ApiError::ExportTooLarge => {
                "The export exceeds the tier's row or byte limit: narrow the range or filters"
            }
            ApiError::RateLimited => "Over the tier's request rate",
            ApiError::TooManyUncached => "Too many uncached queries of one key at once",
            ApiError::Internal => "A query template did not render (a bug; logged)",
            ApiError::UpstreamTimeout => {
                "ClickHouse is slow and no stored answer is left: narrow the range or retry later"
            }
            ApiError::UpstreamUnavailable => {
                "ClickHouse is unreachable and no stored answer is left"
            }
            ApiError::UpstreamError => "ClickHouse is failing and no stored answer is left",
            ApiError::TooManyWaiters => "Too many requests wait for one answer",
            ApiError::DamagedEntry => "A stored answer is damaged; it is recomputed",
            ApiError::OriginNotAllowed => {
                "A CORS preflight from an origin not in cors.allowed_origins"
            }
        }
    }

    /// The JSON error answer: what went wrong (`detail`) and this kind's
    /// `type`, status and headers. A [`RetryAfter::Limiter`] kind gets its
    /// `Retry-After` from [`ApiError::reply_retry_in`].
    pub fn reply(self, detail: impl Into<String>) -> Response<Body> {
        let mut response = reply::json(
            self.status(),
            &serde_json::json!({ "detail": detail.into(), "type": self.as_str() }),
        );
        let headers = response.headers_mut();
        for (name, value) in self.headers() {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                headers.insert(name, HeaderValue::from_static(value));
            }
        }
        if let Some(RetryAfter::Secs(secs)) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }

    /// [`ApiError::reply`] with `Retry-After: secs` (the rate limiter's wait).
    pub fn reply_retry_in(self, detail: impl Into<String>, secs: u64) -> Response<Body> {
        debug_assert_eq!(self.retry_after(), Some(RetryAfter::Limiter), "{self:?}");
        let mut response = self.reply(detail);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        response
    }
}

/// The status of invalid parameters ([`invalid`]).
pub const INVALID_STATUS: StatusCode = StatusCode::UNPROCESSABLE_ENTITY;

/// The operations that bind parameters, so can answer [`invalid`].
pub const INVALID_SURFACES: &[Surface] = COMPUTED;

/// 422 listing every invalid parameter, in FastAPI's shape.
pub fn invalid(problems: &[Problem]) -> Response<Body> {
    reply::json(INVALID_STATUS, &serde_json::json!({ "detail": problems }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn every_kind_answers_with_its_status_type_and_headers() {
        for kind in ApiError::ALL {
            let response = kind.reply("what went wrong");
            assert_eq!(response.status(), kind.status(), "{kind:?}");
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/json",
                "{kind:?}"
            );
            let retry = response.headers().get(header::RETRY_AFTER);
            match kind.retry_after() {
                Some(RetryAfter::Secs(secs)) => {
                    assert_eq!(retry.unwrap(), &secs.to_string(), "{kind:?}")
                }
                Some(RetryAfter::Limiter) | None => assert!(retry.is_none(), "{kind:?}"),
            }
            for (name, value) in kind.headers() {
                assert_eq!(response.headers()[*name], *value, "{kind:?}");
            }
            assert_eq!(
                body(response).await,
                serde_json::json!({ "detail": "what went wrong", "type": kind.as_str() })
            );
        }
    }

    #[test]
    fn the_answers_of_today_keep_their_status_and_headers() {
        let in_url = ApiError::KeyInUrl.reply("header");
        assert_eq!(in_url.status(), 400);
        assert!(in_url.headers().get("www-authenticate").is_none());
        let unauthorized = ApiError::Unauthorized.reply("no key");
        assert_eq!(unauthorized.status(), 401);
        assert_eq!(unauthorized.headers()["www-authenticate"], "Bearer");
        let method = ApiError::MethodNotAllowed.reply("POST");
        assert_eq!(method.status(), 405);
        assert_eq!(method.headers()["allow"], "GET, HEAD");
        let limited = ApiError::RateLimited.reply_retry_in("slow down", 7);
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()["retry-after"], "7");
        let uncached = ApiError::TooManyUncached.reply("wait");
        assert_eq!(uncached.headers()["retry-after"], "1");
        for kind in [
            ApiError::UpstreamTimeout,
            ApiError::UpstreamUnavailable,
            ApiError::UpstreamError,
            ApiError::TooManyWaiters,
            ApiError::DamagedEntry,
        ] {
            let response = kind.reply("later");
            assert_eq!(response.status(), 503, "{kind:?}");
            assert_eq!(response.headers()["retry-after"], "5", "{kind:?}");
        }
        assert_eq!(ApiError::DamagedEntry.as_str(), "internal");
        assert_eq!(ApiError::Internal.status(), 500);
        assert!(ApiError::Internal.retry_after().is_none());
        assert_eq!(ApiError::ExportTooLarge.status(), 413);
        assert!(ApiError::ExportTooLarge.retry_after().is_none());
    }

    #[tokio::test]
    async fn invalid_parameters_keep_fastapis_shape() {
        let problems = [Problem::query("from", "missing", "field required")];
        let response = invalid(&problems);
        assert_eq!(response.status(), 422);
        let body = body(response).await;
        assert_eq!(
            body["detail"][0]["loc"],
            serde_json::json!(["query", "from"])
        );
        assert_eq!(body["detail"][0]["type"], "missing");
        assert!(body.get("type").is_none());
    }
}
