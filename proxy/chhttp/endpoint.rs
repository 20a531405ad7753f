//! What the ClickHouse-compatible endpoint keeps in the proxy's state: its
//! ClickHouse servers, TTL rules and the ClickHouse users' passwords (from the
//! environment). Built once at start; imports nothing of the proxy's state,
//! so `state` can hold it while the endpoint's handlers read `App`.

use std::collections::HashMap;
use std::sync::Arc;

use dashcache::config::Config;
use dashcache::metrics::Metrics;

use super::{rules, upstream};

/// What the endpoint needs besides the rest of `App`.
pub struct Endpoint {
    pub servers: upstream::Servers,
    pub rules: rules::Rules,
    /// ClickHouse users' passwords (from the environment), by user.
    passwords: HashMap<String, Option<String>>,
}

impl Endpoint {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Endpoint {
        let urls = config
            .clickhouse
            .query_replicas()
            .into_iter()
            .map(|r| r.url)
            .collect();
        let mut passwords = HashMap::new();
        let users = config
            .tiers
            .values()
            .filter_map(|t| t.clickhouse_user.clone())
            .chain([config.clickhouse.user.clone()]);
        for user in users {
            let password = config.clickhouse_password(&user);
            passwords.insert(user, password);
        }
        Endpoint {
            servers: upstream::Servers::new(
                urls,
                dashcache::tls::clickhouse_client_config(&config.clickhouse),
                metrics,
            ),
            rules: rules::Rules::new(&config.clickhouse_http),
            passwords,
        }
    }

    /// The password dashcache sends for ClickHouse user `user`.
    pub fn password(&self, user: &str) -> Option<String> {
        self.passwords.get(user).cloned().flatten()
    }
}
