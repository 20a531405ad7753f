//! CORS: lets pages on the origins `[cors]` allows call the proxy from a
//! browser, and keeps every other page from reading its answers.
//!
//! Owns answering preflights (`OPTIONS` with `Access-Control-Request-Method`:
//! no API key, no Redis or ClickHouse, the same answer for every path) and
//! adding `Access-Control-Allow-Origin`, `-Expose-Headers`, `-Allow-Credentials`
//! and `Vary: Origin` to every other answer, errors included, and counting
//! both in `dashcache_cors_requests_total`. Every header value is built once
//! at start; a request without `Origin` costs one header lookup (and, with
//! CORS on, one `Vary` line). What an origin pattern means is
//! [`dashcache::cors`]; the router decides where these hooks run.

use std::sync::Arc;

use dashcache::config::CorsConfig;
use dashcache::cors::{ALLOWED_HEADERS, EXPOSED_HEADERS, OriginPattern};
use dashcache::metrics::{CorsLabels, Metrics};
use dashcache::outcome::{CorsKind, CorsOutcome};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use prometheus_client::metrics::counter::Counter;

use crate::error::ApiError;
use crate::reply::{self, Body};

/// The methods a page may use (`Access-Control-Allow-Methods`).
const METHODS: &str = "GET, HEAD";

/// `[cors]`, compiled once at start.
pub struct Cors {
    /// Empty: CORS is off, no origin is allowed.
    origins: Vec<OriginPattern>,
    allow_headers: HeaderValue,
    expose_headers: HeaderValue,
    max_age: HeaderValue,
    credentials: bool,
    counters: Counters,
}

/// `dashcache_cors_requests_total`, one handle per series.
struct Counters {
    preflight_allowed: Counter,
    preflight_refused: Counter,
    actual_allowed: Counter,
    actual_refused: Counter,
}

impl Counters {
    fn new(metrics: &Metrics) -> Counters {
        let counter = |kind: CorsKind, result: CorsOutcome| {
            metrics
                .cors_requests
                .get_or_create(&CorsLabels {
                    kind: kind.as_str(),
                    result: result.as_str(),
                })
                .clone()
        };
        Counters {
            preflight_allowed: counter(CorsKind::Preflight, CorsOutcome::Allowed),
            preflight_refused: counter(CorsKind::Preflight, CorsOutcome::Refused),
            actual_allowed: counter(CorsKind::Actual, CorsOutcome::Allowed),
            actual_refused: counter(CorsKind::Actual, CorsOutcome::Refused),
        }
    }
}

/// A comma-separated header value of `builtin` and then `extra` (names the
/// config check refused are left out).
fn list(builtin: &[&str], extra: &[String]) -> HeaderValue {
    let names: Vec<&str> = builtin
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
        .filter(|name| dashcache::cors::is_header_name(name))
        .collect();
    HeaderValue::from_str(&names.join(", ")).unwrap_or_else(|_| HeaderValue::from_static(""))
}

impl Cors {
    /// Compiles a checked `[cors]` (patterns the check refused are skipped).
    pub fn new(config: &CorsConfig, metrics: &Arc<Metrics>) -> Cors {
        Cors {
            origins: config
                .allowed_origins
                .iter()
                .filter_map(|o| OriginPattern::parse(o).ok())
                .collect(),
            allow_headers: list(ALLOWED_HEADERS, &config.allowed_headers),
            expose_headers: list(EXPOSED_HEADERS, &config.exposed_headers),
            max_age: HeaderValue::from(config.max_age.as_secs()),
            credentials: config.allow_credentials,
            counters: Counters::new(metrics),
        }
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        let origin = origin.as_bytes();
        self.origins.iter().any(|pattern| pattern.matches(origin))
    }

    /// Whether a request is a CORS preflight: `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`.
    pub fn is_preflight<B>(req: &http::Request<B>) -> bool {
        req.method() == http::Method::OPTIONS
            && req.headers().contains_key(header::ORIGIN)
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The answer to a preflight from `origin`: 204 with what a page may
    /// send, or, for an origin that is not allowed, a 403 without CORS headers
    /// (the browser then blocks the request it asked about).
    pub fn preflight(&self, origin: &HeaderValue) -> Response<Body> {
        if !self.allows(origin) {
            self.counters.preflight_refused.inc();
            let mut response = ApiError::OriginNotAllowed.reply(format!(
                "origin {} is not in cors.allowed_origins",
                String::from_utf8_lossy(origin.as_bytes())
            ));
            response
                .headers_mut()
                .append(header::VARY, HeaderValue::from_static("origin"));
            return response;
        }
        self.counters.preflight_allowed.inc();
        let mut response = Response::new(reply::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(METHODS),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            self.allow_headers.clone(),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        headers.append(header::VARY, HeaderValue::from_static("origin"));
        response
    }

    /// Adds the CORS headers of an answer to a request that carried `origin`
    /// (none: nothing but `Vary: Origin`, with CORS on). An origin that is not
    /// allowed gets no CORS headers, so its page cannot read the answer.
    pub fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if self.origins.is_empty() {
            if origin.is_some() {
                self.counters.actual_refused.inc();
            }
            return;
        }
        // The answer depends on Origin: caches must keep them apart.
        headers.append(header::VARY, HeaderValue::from_static("origin"));
        let Some(origin) = origin else {
            return;
        };
        if !self.allows(origin) {
            self.counters.actual_refused.inc();
            return;
        }
        self.counters.actual_allowed.inc();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            self.expose_headers.clone(),
        );
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cors(origins: &[&str], credentials: bool) -> Cors {
        let config = CorsConfig {
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            allowed_headers: vec!["X-Dashboard".into()],
            exposed_headers: vec!["X-Extra".into()],
            max_age: Duration::from_secs(600),
            allow_credentials: credentials,
        };
        Cors::new(&config, &Arc::new(Metrics::new()))
    }

    fn origin(text: &'static str) -> HeaderValue {
        HeaderValue::from_static(text)
    }

    #[test]
    fn an_allowed_preflight_says_what_a_page_may_send_and_for_how_long() {
        let cors = cors(&["https://*.example.com"], false);
        let response = cors.preflight(&origin("https://dash.example.com"));
        assert_eq!(response.status(), 204);
        let h = response.headers();
        assert_eq!(h["access-control-allow-origin"], "https://dash.example.com");
        assert_eq!(h["access-control-allow-methods"], "GET, HEAD");
        assert_eq!(
            h["access-control-allow-headers"],
            "Authorization, X-API-Key, If-None-Match, Accept, Accept-Encoding, X-Dashboard"
        );
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["vary"], "origin");
        assert!(h.get("access-control-allow-credentials").is_none());
        assert_eq!(cors.counters.preflight_allowed.get(), 1);
    }

    #[test]
    fn a_refused_origin_gets_no_cors_headers_and_is_counted() {
        let cors = cors(&["https://dash.example.com"], true);
        let response = cors.preflight(&origin("https://evil.example.net"));
        assert_eq!(response.status(), 403);
        assert!(
            response
                .headers()
                .get("access-control-allow-origin")
                .is_none()
        );
        let mut headers = HeaderMap::new();
        cors.decorate(Some(&origin("https://evil.example.net")), &mut headers);
        assert!(headers.get("access-control-allow-origin").is_none());
        assert_eq!(headers["vary"], "origin");
        assert_eq!(cors.counters.preflight_refused.get(), 1);
        assert_eq!(cors.counters.actual_refused.get(), 1);
    }

    #[test]
    fn answers_to_allowed_origins_expose_the_proxys_headers() {
        let cors = cors(&["https://dash.example.com"], true);
        let mut headers = HeaderMap::new();
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        cors.decorate(Some(&origin("https://dash.example.com")), &mut headers);
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://dash.example.com"
        );
        assert_eq!(headers["access-control-allow-credentials"], "true");
        let exposed = headers["access-control-expose-headers"].to_str().unwrap();
        for name in [
            "X-Cache",
            "ETag",
            "RateLimit-Remaining",
            "Retry-After",
            "X-Extra",
        ] {
            assert!(exposed.contains(name), "{exposed}");
        }
        let vary: Vec<_> = headers.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["accept-encoding", "origin"]);
        // No Origin: only Vary.
        let mut plain = HeaderMap::new();
        cors.decorate(None, &mut plain);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn with_cors_off_nothing_is_added() {
        let cors = cors(&[], false);
        let mut headers = HeaderMap::new();
        cors.decorate(Some(&origin("https://dash.example.com")), &mut headers);
        cors.decorate(None, &mut headers);
        assert!(headers.is_empty());
        assert_eq!(cors.counters.actual_refused.get(), 1);
    }
}
