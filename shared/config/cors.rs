//! `[cors]`: which web pages on other origins may call the proxy from a
//! browser, as written (deserialized, defaults applied).
//!
//! Only the shape lives here, so that the config stays a leaf; what an origin
//! pattern means and which headers are always allowed or exposed is
//! [`crate::cors`], answering preflights and adding the headers is the proxy's.

use std::time::Duration;

use serde::Deserialize;

/// `[cors]`. With no `allowed_origins` (the default) no page on another
/// origin may read an answer: browsers block it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins whose pages may call the proxy: exact (`https://dash.example.com`,
    /// `http://localhost:3000`), every subdomain (`https://*.example.com`), or `*`
    /// (any origin; not with `allow_credentials`).
    pub allowed_origins: Vec<String>,
    /// Request headers a page may send besides the built-in ones
    /// (`Authorization`, `X-API-Key`, `If-None-Match`, `Accept`, `Accept-Encoding`).
    pub allowed_headers: Vec<String>,
    /// Response headers a page may read besides the built-in ones (`X-Cache`,
    /// `Age`, `ETag`, `Cache-Control`, `RateLimit-*`, `Retry-After`, …).
    pub exposed_headers: Vec<String>,
    /// How long a browser may reuse a preflight's answer
    /// (`Access-Control-Max-Age`; Chromium caps it at 2 h, Firefox at 24 h).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Whether pages may send cookies or HTTP authentication along
    /// (`Access-Control-Allow-Credentials: true`). API keys in a header need no credentials.
    pub allow_credentials: bool,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_headers: Vec::new(),
            exposed_headers: Vec::new(),
            max_age: Duration::from_secs(2 * 3600),
            allow_credentials: false,
        }
    }
}
