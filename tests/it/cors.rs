//! CORS: preflights answered without a key and without Redis or ClickHouse,
//! CORS headers on every answer to an allowed origin (errors, 429s, exports and
//! the OpenAPI document included), none for other origins, and both counted.

use http::Method;

use crate::harness::{Proxy, ProxyOptions, RedisServer, Reply, free_port, request_method};

const ALLOWED: &str = "http://dash.test:3000";
const SUBDOMAIN: &str = "https://ops.example.com";
const REFUSED: &str = "https://evil.example.net";
const QUERY: &str = "/v1/query/revenue?from=today-3d&to=today&granularity=day";

fn cors_set() -> Vec<(&'static str, &'static str, toml::Value)> {
    let origins = toml::Value::Array(vec![ALLOWED.into(), "https://*.example.com".into()]);
    let tiny: toml::Table = toml::from_str(
        "requests_per_minute = 1\nburst = 1\nqueries = [\"*\"]\nexports = [\"*\"]\n",
    )
    .expect("tier table");
    vec![
        ("cors", "allowed_origins", origins),
        (
            "cors",
            "allowed_headers",
            toml::Value::Array(vec!["X-Dashboard".into()]),
        ),
        ("cors", "max_age", "10m".into()),
        ("tier", "tiny", toml::Value::Table(tiny)),
    ]
}

async fn preflight(proxy: &Proxy, path: &str, origin: &str) -> Reply {
    request_method(
        Method::OPTIONS,
        &format!("{}{path}", proxy.base),
        &[
            ("origin", origin),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "x-api-key,x-dashboard"),
        ],
    )
    .await
    .expect("preflight answered")
}

fn cors_series(kind: &str, result: &str) -> String {
    format!("dashcache_cors_requests_total{{kind=\"{kind}\",result=\"{result}\"}}")
}

/// The answer is readable by a page on `origin`: CORS headers and `Vary: Origin`.
fn readable(reply: &Reply, origin: &str) {
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some(origin),
        "status {}: {:?}",
        reply.status,
        reply.headers
    );
    let exposed = reply.header("access-control-expose-headers").unwrap_or("");
    for name in ["X-Cache", "ETag", "Retry-After", "RateLimit-Remaining"] {
        assert!(exposed.contains(name), "{exposed}");
    }
    assert!(
        reply
            .headers
            .get_all("vary")
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"origin")),
        "{:?}",
        reply.headers
    );
    assert!(reply.header("access-control-allow-credentials").is_none());
}

#[tokio::test]
async fn a_preflight_needs_no_key_and_touches_neither_redis_nor_clickhouse() {
    let mut redis = RedisServer::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        redis_url: redis.url(),
        clickhouse_url: format!("http://127.0.0.1:{}", free_port()),
        set: cors_set(),
        ..Default::default()
    })
    .await;
    redis.stop();
    let paths = [
        QUERY,
        "/v1/export/events?from=today-1d&to=today",
        "/openapi.json",
        "/v1/query/nope",
    ];
    for (path, origin) in paths.iter().zip([ALLOWED, SUBDOMAIN, ALLOWED, SUBDOMAIN]) {
        let reply = preflight(&proxy, path, origin).await;
        assert_eq!(reply.status, 204, "{path}: {}", reply.text());
        assert_eq!(reply.header("access-control-allow-origin"), Some(origin));
        assert_eq!(
            reply.header("access-control-allow-methods"),
            Some("GET, HEAD")
        );
        let allowed = reply.header("access-control-allow-headers").unwrap_or("");
        for name in ["Authorization", "X-API-Key", "If-None-Match", "X-Dashboard"] {
            assert!(allowed.contains(name), "{allowed}");
        }
        assert_eq!(reply.header("access-control-max-age"), Some("600"));
        assert_eq!(reply.header("vary"), Some("origin"));
        assert!(reply.text().is_empty());
    }
    let metrics = proxy.get_with("/metrics", &[]).await.text();
    let value = |series: &str| crate::harness::metric(&metrics, series);
    assert_eq!(value(&cors_series("preflight", "allowed")), 4.0);
    assert_eq!(value(&cors_series("preflight", "refused")), 0.0);
    assert_eq!(value("dashcache_redis_errors_total"), 0.0, "{metrics}");
    assert_eq!(value("dashcache_clickhouse_queries_total"), 0.0);
    assert_eq!(
        value("dashcache_rate_limit_total{outcome=\"allowed\"}"),
        0.0
    );
    assert_eq!(
        value("dashcache_http_requests_total{route=\"preflight\",status=\"204\"}"),
        4.0
    );

    // The request itself, with nothing to answer from: a 503 the page can read.
    let key = proxy.key.clone();
    let reply = proxy
        .get_with(QUERY, &[("origin", ALLOWED), ("x-api-key", &key)])
        .await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    readable(&reply, ALLOWED);
    assert!(reply.header("retry-after").is_some());
}

#[tokio::test]
async fn every_answer_to_an_allowed_origin_is_readable_errors_included() {
    let proxy = Proxy::start_with(ProxyOptions {
        set: cors_set(),
        ..Default::default()
    })
    .await;
    let key = proxy.key.clone();
    let keyed = |origin: &'static str| [("origin", origin), ("x-api-key", key.as_str())];

    let reply = proxy.get_with(QUERY, &keyed(ALLOWED)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    readable(&reply, ALLOWED);
    assert!(["MISS", "HIT"].contains(&reply.cache()));
    // Vary keeps naming the encoding negotiation too.
    let vary: Vec<_> = reply.headers.get_all("vary").iter().collect();
    assert_eq!(vary, ["accept-encoding", "origin"]);

    let hit = proxy.get_with(QUERY, &keyed(SUBDOMAIN)).await;
    assert_eq!(hit.cache(), "HIT");
    readable(&hit, SUBDOMAIN);
    let etag = hit
        .header("etag")
        .expect("a stored answer's ETag")
        .to_owned();
    let not_modified = proxy
        .get_with(
            QUERY,
            &[
                ("origin", SUBDOMAIN),
                ("x-api-key", &key),
                ("if-none-match", &etag),
            ],
        )
        .await;
    assert_eq!(not_modified.status, 304);
    readable(&not_modified, SUBDOMAIN);

    let invalid = proxy
        .get_with(
            "/v1/query/revenue?from=today-3d&to=today&granularity=week",
            &keyed(ALLOWED),
        )
        .await;
    assert_eq!(invalid.status, 422);
    readable(&invalid, ALLOWED);
    assert_eq!(invalid.json()["detail"][0]["loc"][1], "granularity");

    let no_key = proxy.get_with(QUERY, &[("origin", ALLOWED)]).await;
    assert_eq!(no_key.status, 401);
    readable(&no_key, ALLOWED);
    let unknown = proxy.get_with("/nowhere", &[("origin", ALLOWED)]).await;
    assert_eq!(unknown.status, 404);
    readable(&unknown, ALLOWED);
    let document = proxy
        .get_with("/openapi.json", &[("origin", ALLOWED)])
        .await;
    assert_eq!(document.status, 200);
    readable(&document, ALLOWED);

    let export = proxy
        .get_with(
            "/v1/export/events?from=today-1d&to=today&format=ndjson",
            &keyed(ALLOWED),
        )
        .await;
    assert_eq!(export.status, 200, "{}", export.text());
    readable(&export, ALLOWED);

    // Over the rate: the 429 and its Retry-After are readable too.
    let tiny = proxy.add_key("tiny", "acme");
    let mut limited = None;
    for _ in 0..10 {
        let reply = proxy
            .get_with(QUERY, &[("origin", ALLOWED), ("x-api-key", &tiny)])
            .await;
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let limited = limited.expect("a 429 within 10 requests at 1 per minute");
    readable(&limited, ALLOWED);
    assert_eq!(limited.json()["type"], "rate_limited");
    assert!(limited.header("retry-after").is_some());

    let metrics = proxy.get_with("/metrics", &[]).await.text();
    let allowed = crate::harness::metric(&metrics, &cors_series("actual", "allowed"));
    assert!(allowed >= 9.0, "{allowed}");
    assert_eq!(
        crate::harness::metric(&metrics, &cors_series("actual", "refused")),
        0.0
    );
}

#[tokio::test]
async fn another_origin_gets_no_cors_headers_and_is_counted() {
    let proxy = Proxy::start_with(ProxyOptions {
        set: cors_set(),
        ..Default::default()
    })
    .await;
    let metrics = proxy.get_with("/metrics", &[]).await.text();
    for kind in ["preflight", "actual"] {
        for result in ["allowed", "refused"] {
            let series = cors_series(kind, result);
            assert!(
                metrics.contains(&format!("{series} 0")),
                "{series} missing:\n{metrics}"
            );
        }
    }
    for origin in [
        REFUSED,
        "https://example.com",
        "http://dash.test:3001",
        "null",
    ] {
        let reply = preflight(&proxy, QUERY, origin).await;
        assert_eq!(reply.status, 403, "{origin}");
        assert!(
            reply.header("access-control-allow-origin").is_none(),
            "{origin}"
        );
        assert!(
            reply.header("access-control-allow-headers").is_none(),
            "{origin}"
        );
        assert_eq!(reply.json()["type"], "origin_not_allowed");
    }
    // A request sent anyway (no preflight: curl, or a simple request) is
    // answered, but without CORS headers a browser keeps it from the page.
    let key = proxy.key.clone();
    let reply = proxy
        .get_with(QUERY, &[("origin", REFUSED), ("x-api-key", &key)])
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("access-control-allow-origin").is_none());
    assert!(reply.header("access-control-expose-headers").is_none());
    // Without Origin (not a browser): no CORS headers, only Vary.
    let plain = proxy.get(QUERY).await;
    assert!(plain.header("access-control-allow-origin").is_none());

    let metrics = proxy.get_with("/metrics", &[]).await.text();
    let value = |series: &str| crate::harness::metric(&metrics, series);
    assert_eq!(value(&cors_series("preflight", "refused")), 4.0);
    assert_eq!(value(&cors_series("actual", "refused")), 1.0);
    assert_eq!(value(&cors_series("actual", "allowed")), 0.0);
}
