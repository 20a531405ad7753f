//! How long answers of the ClickHouse-compatible endpoint stay fresh.
//!
//! Compiled from `[clickhouse_http]` (`ttl`, `grace`) and its
//! `[[clickhouse_http.cache]]` rules, first match wins (patterns were checked by
//! `dashcache::check`). A TTL of 0 means the statement is passed through.

use std::time::Duration;

use dashcache::config::ClickHouseHttpConfig;
use regex::{Regex, RegexBuilder};

/// Freshness of one statement's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl {
    pub ttl: Duration,
    pub grace: Duration,
}

/// The compiled rules.
pub struct Rules {
    rules: Vec<(Regex, Ttl)>,
    default: Ttl,
}

impl Rules {
    pub fn new(config: &ClickHouseHttpConfig) -> Rules {
        let rules = config
            .cache
            .iter()
            .filter_map(|rule| {
                let regex = RegexBuilder::new(&rule.pattern)
                    .case_insensitive(true)
                    .build()
                    .ok()?;
                let ttl = Ttl {
                    ttl: rule.ttl,
                    grace: rule.grace.unwrap_or(config.grace),
                };
                Some((regex, ttl))
            })
            .collect();
        Rules {
            rules,
            default: Ttl {
                ttl: config.ttl,
                grace: config.grace,
            },
        }
    }

    /// The freshness of `statement`'s answers; `None`: not cached.
    pub fn ttl(&self, statement: &str) -> Option<Ttl> {
        let ttl = self
            .rules
            .iter()
            .find(|(regex, _)| regex.is_match(statement))
            .map_or(self.default, |(_, ttl)| *ttl);
        (!ttl.ttl.is_zero()).then_some(ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dashcache::config::ClickHouseHttpCacheRule;

    #[test]
    fn the_first_matching_rule_wins_and_zero_passes_through() {
        let config = ClickHouseHttpConfig {
            cache: vec![
                ClickHouseHttpCacheRule {
                    pattern: r"\bsystem\.".into(),
                    ttl: Duration::ZERO,
                    grace: None,
                },
                ClickHouseHttpCacheRule {
                    pattern: r"demo\.events_daily".into(),
                    ttl: Duration::from_secs(600),
                    grace: Some(Duration::from_secs(1)),
                },
            ],
            ..ClickHouseHttpConfig::default()
        };
        let rules = Rules::new(&config);
        assert_eq!(rules.ttl("SELECT * FROM SYSTEM.settings"), None);
        assert_eq!(
            rules.ttl("select 1 from demo.events_daily"),
            Some(Ttl {
                ttl: Duration::from_secs(600),
                grace: Duration::from_secs(1)
            })
        );
        assert_eq!(rules.ttl("SELECT 1").map(|t| t.ttl), Some(config.ttl));
    }
}
