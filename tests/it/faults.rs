//! Failing parts: Redis going away, ClickHouse unreachable or failing mid-answer.

use std::time::Duration;

use crate::harness::{Proxy, ProxyOptions, RedisServer, free_port};

#[tokio::test]
async fn redis_down_still_answers_from_clickhouse_and_caching_resumes_when_it_returns() {
    let mut redis = RedisServer::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        redis_url: redis.url(),
        // Without the in-process tier, every answer below comes from Redis or ClickHouse.
        set: vec![("cache", "l1_max_bytes", 0.into())],
        ..Default::default()
    })
    .await;
    let url = "/v1/query/revenue?from=today-2d&to=today&granularity=hour";
    assert_eq!(proxy.get(url).await.cache(), "MISS");
    assert_eq!(proxy.get(url).await.cache(), "HIT");

    redis.stop();
    let queries = proxy.metric("dashcache_clickhouse_queries_total").await;
    for _ in 0..3 {
        let reply = proxy.get(url).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        // Computed again (nothing can be stored): MISS, or COALESCED when a
        // request arrives while the previous computation is still landing.
        assert!(
            ["MISS", "COALESCED"].contains(&reply.cache()),
            "{}",
            reply.cache()
        );
    }
    assert!(proxy.metric("dashcache_clickhouse_queries_total").await > queries);
    assert!(proxy.metric("dashcache_redis_errors_total").await >= 1.0);

    redis.restart().await;
    // The proxy retries Redis by itself; poll until answers are cached again.
    let mut resumed = false;
    for _ in 0..100 {
        if proxy.get(url).await.cache() == "HIT" {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "caching did not resume; log:\n{}", proxy.log());
}

#[tokio::test]
async fn clickhouse_unreachable_without_a_stored_answer_is_a_503_with_retry_after() {
    let proxy = Proxy::start_with(ProxyOptions {
        clickhouse_url: format!("http://127.0.0.1:{}", free_port()),
        ..Default::default()
    })
    .await;
    let url = "/v1/query/revenue?from=today-2d&to=today";
    for _ in 0..2 {
        let reply = proxy.get(url).await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.json()["type"], "upstream_unavailable");
        assert_eq!(reply.header("retry-after"), Some("5"));
        assert_ne!(reply.cache(), "HIT");
    }
    // The first request's computation was tried twice before it got an error;
    // the second found the key backing off and was not sent at all.
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        2.0
    );
    assert_eq!(
        proxy
            .metric("dashcache_clickhouse_attempts_total{result=\"backing_off\"}")
            .await,
        1.0
    );
}

fn failing_queries() -> ProxyOptions {
    ProxyOptions {
        extra_queries: vec![
            (
                // Fails after ~1.5 MB of rows: ClickHouse has sent 200 OK by then
                // and appends the exception to the body.
                "fails_late".into(),
                "SELECT number, toString(number) AS s, throwIf(number = 150000) AS boom \
                 FROM system.numbers LIMIT 200000 SETTINGS max_block_size = 1000"
                    .into(),
                "ttl = \"5m\"".into(),
            ),
            (
                "fails_early".into(),
                "SELECT throwIf(number = 3) FROM system.numbers LIMIT 10".into(),
                "ttl = \"5m\"".into(),
            ),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn an_error_clickhouse_appends_to_a_200_body_is_never_served_as_success_or_cached() {
    let proxy = Proxy::start_with(failing_queries()).await;
    for format in ["ndjson", "csv", "json"] {
        let reply = proxy
            .get(&format!("/v1/query/fails_late?format={format}"))
            .await;
        // Either a clean error status, or a transfer the client sees as cut.
        let complete_success = reply.status == 200 && reply.body.is_ok();
        assert!(
            !complete_success,
            "{format}: a failed query looked like a success"
        );
        if let Ok(body) = &reply.body {
            assert!(
                !String::from_utf8_lossy(body).contains("DB::Exception"),
                "{format}: leaked the exception"
            );
        }
    }
    assert_eq!(
        proxy
            .metric("dashcache_cache_stores_total{result=\"stored\"}")
            .await,
        0.0
    );
    let again = proxy.get("/v1/query/fails_late?format=ndjson").await;
    assert_ne!(again.cache(), "HIT");
}

#[tokio::test]
async fn an_error_before_the_first_byte_is_a_clean_json_error() {
    let proxy = Proxy::start_with(failing_queries()).await;
    let reply = proxy.get("/v1/query/fails_early").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["type"], "upstream_error");
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("395"),
        "{}",
        reply.text()
    );
    assert!(
        !reply.text().contains("DB::Exception"),
        "ClickHouse internals leaked"
    );
}
