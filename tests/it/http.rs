//! HTTP semantics for clients and operators: conditional requests, content
//! encodings, Server-Timing, readiness and graceful shutdown.

use std::io::Read;
use std::time::Duration;

use crate::harness::{Proxy, ProxyOptions, RedisServer, Relay};

const URL: &str = "/v1/query/revenue?from=today-60d&to=today&granularity=day";

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

#[tokio::test]
async fn etags_give_304_and_answers_are_private() {
    let proxy = Proxy::start().await;
    let miss = proxy.get(URL).await;
    assert_eq!(miss.cache(), "MISS");
    assert!(
        miss.header("server-timing")
            .unwrap()
            .contains("clickhouse;dur=")
    );
    let hit = proxy.get(URL).await;
    assert_eq!(hit.cache(), "HIT");
    let etag = hit
        .header("etag")
        .expect("an ETag on a cached answer")
        .to_owned();
    assert!(
        hit.header("cache-control")
            .unwrap()
            .starts_with("private, max-age=")
    );
    assert!(hit.header("age").is_some());
    assert!(hit.header("server-timing").unwrap().contains("cache;dur="));
    assert_eq!(hit.header("vary"), Some("accept-encoding"));

    let auth = format!("Bearer {}", proxy.key);
    let not_modified = proxy
        .get_with(URL, &[("authorization", &auth), ("if-none-match", &etag)])
        .await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.as_ref().unwrap().is_empty());
    let changed = proxy
        .get_with(
            URL,
            &[("authorization", &auth), ("if-none-match", "W/\"other\"")],
        )
        .await;
    assert_eq!(changed.status, 200);
}

#[tokio::test]
async fn compressed_answers_decode_to_the_same_bytes() {
    let proxy = Proxy::start().await;
    let auth = format!("Bearer {}", proxy.key);
    // Hourly rows over two weeks: a large answer, stored compressed.
    const URL: &str = "/v1/query/revenue?from=today-14d&to=today&granularity=hour";
    // A streamed MISS, compressed on the fly.
    let miss = proxy
        .get_with(
            URL,
            &[("authorization", &auth), ("accept-encoding", "gzip")],
        )
        .await;
    assert_eq!(
        (miss.cache(), miss.header("content-encoding")),
        ("MISS", Some("gzip"))
    );
    let plain = proxy.get(URL).await;
    assert_eq!(
        (plain.cache(), plain.header("content-encoding")),
        ("HIT", None)
    );
    let plain = plain.body.unwrap();
    assert!(
        plain.len() > dashcache::encoding::STORE_THRESHOLD,
        "stored compressed"
    );
    assert_eq!(gunzip(miss.body.as_ref().unwrap()), plain);

    // A HIT served as stored (gzip) to a gzip client, decompressed for others.
    let hit = proxy
        .get_with(
            URL,
            &[("authorization", &auth), ("accept-encoding", "br, gzip")],
        )
        .await;
    assert_eq!(
        (hit.cache(), hit.header("content-encoding")),
        ("HIT", Some("gzip"))
    );
    assert_eq!(gunzip(hit.body.as_ref().unwrap()), plain);
    let refused = proxy
        .get_with(
            URL,
            &[("authorization", &auth), ("accept-encoding", "gzip;q=0")],
        )
        .await;
    assert_eq!(refused.header("content-encoding"), None);
    assert_eq!(refused.body.unwrap(), plain);

    // zstd where preferred, on a streamed answer.
    let zstd = proxy
        .get_with(
            "/v1/query/revenue?from=today-30d&to=today&granularity=day&format=csv",
            &[("authorization", &auth), ("accept-encoding", "zstd, gzip")],
        )
        .await;
    assert_eq!(zstd.header("content-encoding"), Some("zstd"));
    let decoded = zstd::stream::decode_all(&zstd.body.unwrap()[..]).unwrap();
    assert!(
        String::from_utf8(decoded)
            .unwrap()
            .starts_with("\"t\",\"revenue\"")
    );
}

#[tokio::test]
async fn readiness_names_each_dependency() {
    let mut redis = RedisServer::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        redis_url: redis.url(),
        ..Default::default()
    })
    .await;
    let ready = proxy.get_with("/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["checks"]["clickhouse"]["ok"], true);
    redis.stop();
    let not_ready = proxy.get_with("/readyz", &[]).await;
    assert_eq!(not_ready.status, 503);
    assert_eq!(not_ready.json()["checks"]["redis"]["ok"], false);
    assert_eq!(not_ready.json()["checks"]["clickhouse"]["ok"], true);
    assert_eq!(proxy.get_with("/healthz", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_and_an_export_finish_then_exits_zero() {
    // ClickHouse's answers wait in the relay until released: both requests are
    // surely still running when SIGTERM comes, on any machine (a `sleep(2)`
    // query only was if the test got there within 2 s).
    let relay = Relay::start().await;
    relay.hold();
    let mut proxy = Proxy::start_with(ProxyOptions {
        clickhouse_url: relay.url(),
        extra_queries: vec![(
            "slow".into(),
            "SELECT {tenant} AS tenant".into(),
            "ttl = \"1m\"".into(),
        )],
        ..Default::default()
    })
    .await;
    let auth = format!("Bearer {}", proxy.key);
    let slow = tokio::spawn({
        let url = format!("{}/v1/query/slow", proxy.base);
        let auth = auth.clone();
        async move { crate::harness::request(&url, &[("authorization", &auth)]).await }
    });
    let export = tokio::spawn({
        let url = format!(
            "{}/v1/export/events?from=today-30d&to=today&format=csv",
            proxy.base
        );
        async move { crate::harness::request(&url, &[("authorization", &auth)]).await }
    });
    // Both requests are in flight once the proxy has sent two ClickHouse queries.
    let mut both = false;
    for _ in 0..500 {
        if proxy.metric("dashcache_clickhouse_queries_total").await >= 2.0 {
            both = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(both, "requests did not start; log:\n{}", proxy.log());
    proxy.terminate();
    // Answers flow only once the proxy is shutting down (it logs so).
    let mut stopping = false;
    for _ in 0..500 {
        if proxy
            .log()
            .contains("shutting down: finishing in-flight requests")
        {
            stopping = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopping, "no shutdown after SIGTERM; log:\n{}", proxy.log());
    assert!(!slow.is_finished() && !export.is_finished());
    relay.release();
    let slow = slow.await.unwrap().expect("the slow request completes");
    assert_eq!(slow.status, 200, "{}", slow.text());
    assert!(slow.text().contains("acme"));
    let export = export.await.unwrap().expect("the export completes");
    assert_eq!(export.status, 200);
    let csv = export.body.expect("the whole export, not a cut one");
    assert!(csv.len() > 10 << 20, "a real export: {} bytes", csv.len());
    let status = proxy.exit_status().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", proxy.log());
}
