//! `[clickhouse_http]`: the ClickHouse-compatible HTTP endpoint, as written.
//!
//! Only the shape and defaults live here; the rules (patterns that compile,
//! a listen address of its own) are in `crate::check`, and the endpoint itself
//! in the proxy (`proxy/chhttp/`). Which keys may use it, and as which
//! ClickHouse user, is said per tier (`[tier.*] clickhouse_http`,
//! `clickhouse_user`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// `[clickhouse_http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseHttpConfig {
    /// Whether the proxy opens the endpoint's listener.
    pub enabled: bool,
    /// Where BI tools connect (host and port are all they need).
    pub listen: SocketAddr,
    /// How long a cached answer is fresh when no `[[clickhouse_http.cache]]`
    /// rule matches its statement (0: not cached).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long past `ttl` a stale answer may still be served while it is refreshed.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Largest statement accepted, in bytes (the request body included).
    pub max_query_bytes: usize,
    /// TTL rules by statement pattern, first match wins.
    pub cache: Vec<ClickHouseHttpCacheRule>,
}

impl Default for ClickHouseHttpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8124)),
            ttl: Duration::from_secs(60),
            grace: Duration::from_secs(300),
            max_query_bytes: 256 * 1024,
            cache: Vec::new(),
        }
    }
}

/// One `[[clickhouse_http.cache]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseHttpCacheRule {
    /// A regular expression searched in the statement (case-insensitive),
    /// e.g. `"\\bdemo\\.events_daily\\b"` or `"(?s)^SELECT .* FROM system\\."`.
    pub pattern: String,
    /// Freshness of answers to matching statements (0: never cached).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Grace of matching answers (default: the section's `grace`).
    #[serde(default, with = "humantime_serde")]
    pub grace: Option<Duration>,
}
