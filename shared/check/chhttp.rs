//! The rules of `[clickhouse_http]` and of the tiers' `clickhouse_http` keys.
//!
//! Checks what the endpoint needs to start and to mean what it says: cache
//! rule patterns that compile, a listener of its own, ClickHouse user names
//! that can be sent. It does not build the rules (the proxy's
//! `chhttp::rules` does, from a checked config).

use crate::config::{Config, Diagnostic};

/// Every problem with `[clickhouse_http]` and the tiers' `clickhouse_user`.
pub(super) fn check(config: &Config) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let section = &config.clickhouse_http;
    if section.enabled && section.listen == config.proxy.listen {
        diagnostics.push(config.diagnostic(
            &["clickhouse_http", "listen"],
            format!(
                "clickhouse_http.listen = {} is proxy.listen too; the endpoint needs a port of its own",
                section.listen
            ),
        ));
    }
    if section.max_query_bytes == 0 {
        diagnostics.push(config.diagnostic(
            &["clickhouse_http", "max_query_bytes"],
            "clickhouse_http.max_query_bytes must be at least 1",
        ));
    }
    for (index, rule) in section.cache.iter().enumerate() {
        if let Err(err) = regex::RegexBuilder::new(&rule.pattern)
            .case_insensitive(true)
            .build()
        {
            let index = index.to_string();
            diagnostics.push(config.diagnostic(
                &["clickhouse_http", "cache", &index, "pattern"],
                format!(
                    "[[clickhouse_http.cache]] #{}: pattern does not compile: {}",
                    index,
                    err.to_string().lines().last().unwrap_or_default()
                ),
            ));
        }
    }
    for (name, tier) in &config.tiers {
        if let Some(user) = &tier.clickhouse_user
            && (user.is_empty()
                || !user
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.@".contains(c)))
        {
            diagnostics.push(config.diagnostic(
                &["tier", name, "clickhouse_user"],
                format!(
                    "tier `{name}`: clickhouse_user `{user}` must be letters, digits, `_`, `-`, `.` or `@`"
                ),
            ));
        }
    }
    diagnostics
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn bad_patterns_users_and_a_shared_port_are_reported_with_their_lines() {
        let text = "[proxy]\nlisten = '127.0.0.1:9999'\n\
            [clickhouse_http]\nenabled = true\nlisten = '127.0.0.1:9999'\n\
            [[clickhouse_http.cache]]\npattern = 'demo\\.'\nttl = '1m'\n\
            [[clickhouse_http.cache]]\npattern = '(unclosed'\nttl = '1m'\n\
            [tier.t]\nrequests_per_minute = 1\nburst = 1\nclickhouse_http = true\nclickhouse_user = 'a b'\n";
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        let found: Vec<String> = check(&config).iter().map(|d| d.to_string()).collect();
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(
            found[0].starts_with("c.toml: line 5: clickhouse_http.listen"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("c.toml: line 10: [[clickhouse_http.cache]] #1"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("c.toml: line 16: tier `t`: clickhouse_user"),
            "{found:?}"
        );

        let unknown = "[clickhouse_http]\nenabled = true\nport = 1\n";
        let err = Config::parse(unknown, Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
