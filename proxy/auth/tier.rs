//! Usage tiers: what an API key of a tier may do, and how much.
//!
//! Compiled from `[tier.*]`: the request rate and burst (enforced by
//! [`crate::auth::ratelimit`]), how many requests per key may wait on ClickHouse at
//! once, which queries and exports the tier may call, export size limits, and
//! a minimum TTL (a cheaper tier accepts older answers, so it costs less),
//! and whether (and as which ClickHouse user) its keys may use the
//! ClickHouse-compatible endpoint, and whether its keys may read the
//! operator pages (`operator`).
//!
//! The rules a `[tier.*]` table must follow (rates of at least 1, allowed
//! queries and exports that exist) are checked with the rest of the config
//! by `dashcache::check`; this compiles an already checked config.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dashcache::config::Config;

/// Names a tier may call: all, or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    All,
    Only(HashSet<String>),
}

impl Allowed {
    fn from_list(list: &[String]) -> Allowed {
        if list.iter().any(|n| n == "*") {
            Allowed::All
        } else {
            Allowed::Only(list.iter().cloned().collect())
        }
    }

    pub fn allows(&self, name: &str) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Only(names) => names.contains(name),
        }
    }
}

/// One tier.
#[derive(Debug, Clone)]
pub struct Tier {
    pub name: String,
    pub requests_per_minute: u32,
    pub burst: u32,
    pub max_concurrent_misses: usize,
    /// Requests of one key that may wait for a miss slot, and for how long.
    pub miss_queue: usize,
    pub miss_queue_wait: Duration,
    pub queries: Allowed,
    pub exports: Allowed,
    pub export_max_rows: u64,
    pub export_max_bytes: u64,
    pub export_max_duration: Duration,
    pub min_ttl: Duration,
    /// Whether its keys may use the ClickHouse-compatible endpoint.
    pub clickhouse_http: bool,
    /// The ClickHouse user its statements there run as.
    pub clickhouse_user: String,
    /// Whether its keys may read the operator pages (`/status.json`, and
    /// `/metrics` when protected).
    pub operator: bool,
}

#[cfg(test)]
impl Tier {
    /// A tier that allows everything, for unit tests to adjust.
    pub fn for_tests() -> Tier {
        Tier {
            name: "t".into(),
            requests_per_minute: 60,
            burst: 1,
            max_concurrent_misses: 1,
            miss_queue: 0,
            miss_queue_wait: Duration::ZERO,
            queries: Allowed::All,
            exports: Allowed::All,
            export_max_rows: 0,
            export_max_bytes: 0,
            export_max_duration: Duration::ZERO,
            min_ttl: Duration::ZERO,
            clickhouse_http: false,
            clickhouse_user: "default".into(),
            operator: false,
        }
    }
}

/// Every tier of a config, by name.
#[derive(Debug, Default)]
pub struct Tiers {
    by_name: BTreeMap<String, Arc<Tier>>,
}

impl Tiers {
    /// Compiles `[tier.*]` of a config `dashcache::check` passed.
    pub fn new(config: &Config) -> Tiers {
        let mut by_name = BTreeMap::new();
        for (name, tier) in &config.tiers {
            by_name.insert(
                name.clone(),
                Arc::new(Tier {
                    name: name.clone(),
                    requests_per_minute: tier.requests_per_minute,
                    burst: tier.burst,
                    max_concurrent_misses: tier.max_concurrent_misses.max(1),
                    miss_queue: tier.miss_queue,
                    miss_queue_wait: tier.miss_queue_wait,
                    queries: Allowed::from_list(&tier.queries),
                    exports: Allowed::from_list(&tier.exports),
                    export_max_rows: tier.export_max_rows,
                    export_max_bytes: tier.export_max_bytes,
                    export_max_duration: tier.export_max_duration,
                    min_ttl: tier.min_ttl.unwrap_or(Duration::ZERO),
                    clickhouse_http: tier.clickhouse_http,
                    clickhouse_user: tier
                        .clickhouse_user
                        .clone()
                        .unwrap_or_else(|| config.clickhouse.user.clone()),
                    operator: tier.operator,
                }),
            );
        }
        Tiers { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tier>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn tiers_compile_and_the_check_refuses_unknown_queries() {
        let text = "[tier.free]\nrequests_per_minute = 60\nburst = 10\nqueries = ['a']\n";
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        let diagnostics = dashcache::check::validate(&config);
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        assert_eq!(
            diagnostics[0].to_string(),
            "c.toml: line 4: tier `free`: allows unknown query `a`"
        );

        let text =
            "[tier.all]\nrequests_per_minute = 60\nburst = 10\nqueries = ['*']\nmin_ttl = '15m'\n";
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        assert!(dashcache::check::validate(&config).is_empty());
        let tiers = Tiers::new(&config);
        let tier = tiers.get("all").unwrap();
        assert!(tier.queries.allows("anything"));
        assert!(!tier.exports.allows("events"));
        assert_eq!(tier.min_ttl, Duration::from_secs(900));
    }
}
