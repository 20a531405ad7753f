//! Freshness without stampedes: cross-process coalescing, XFetch early
//! refresh, stale-while-revalidate, stale-if-error, leader takeover.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{Proxy, ProxyOptions, Relay, clickhouse_url, patient_redis, shared_prefix};

fn query(name: &str, sql: &str, table: &str) -> (String, String, String) {
    (name.into(), sql.into(), table.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_run_one_clickhouse_query_for_256_concurrent_cold_requests() {
    let prefix = shared_prefix();
    let options = || ProxyOptions {
        key_prefix: Some(prefix.clone()),
        set: vec![patient_redis()],
        ..Default::default()
    };
    let proxies = Arc::new([
        Proxy::start_with(options()).await,
        Proxy::start_with(options()).await,
    ]);
    let url = "/v1/query/revenue?from=today-1d&to=today&granularity=minute&format=csv";
    let mut tasks = Vec::new();
    for i in 0..256 {
        let proxies = proxies.clone();
        tasks.push(tokio::spawn(async move { proxies[i % 2].get(url).await }));
    }
    let mut bodies = HashSet::new();
    let mut results: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        *results.entry(reply.cache().to_owned()).or_default() += 1;
        bodies.insert(reply.text());
    }
    assert_eq!(bodies.len(), 1, "every client got the same answer");
    let mut queries = 0.0;
    for proxy in proxies.iter() {
        queries += proxy.metric("dashcache_clickhouse_queries_total").await;
    }
    assert_eq!(queries, 1.0, "{results:?}");
    assert_eq!(results.get("MISS"), Some(&1), "{results:?}");
}

#[tokio::test]
async fn a_steadily_read_entry_is_refreshed_before_it_expires() {
    // A beta this large makes XFetch refresh on (nearly) every read of a fresh
    // entry, so the outcome is a certainty, not a timing.
    let proxy = Proxy::start_with(ProxyOptions {
        extra_queries: vec![query(
            "short",
            "SELECT count() AS n FROM demo.events WHERE ts < now()",
            "ttl = \"2s\"\ngrace = \"0s\"",
        )],
        set: vec![("cache", "xfetch_beta", 1e9.into())],
        ..Default::default()
    })
    .await;
    assert_eq!(proxy.get("/v1/query/short").await.cache(), "MISS");
    // Steady traffic for more than twice the TTL (50 reads 100 ms apart: a
    // slower machine only spreads them wider). Each read starts a refresh
    // unless one is running, so all 50 are HITs as long as one refresh (a
    // count() over the demo data) takes less than the 2 s TTL: the one
    // timing this test relies on, as XFetch itself does.
    let mut results: HashMap<String, usize> = HashMap::new();
    for _ in 0..50 {
        let reply = proxy.get("/v1/query/short").await;
        assert_eq!(reply.status, 200);
        *results.entry(reply.cache().to_owned()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        results.get("HIT"),
        Some(&50),
        "no MISS or STALE after the first: {results:?}"
    );
    assert!(proxy.metric("dashcache_early_refreshes_total").await >= 2.0);
    assert!(proxy.metric("dashcache_clickhouse_queries_total").await >= 3.0);
}

#[tokio::test]
async fn with_clickhouse_unreachable_stale_answers_are_served_and_fresh_ones_resume_after() {
    let mut relay = Relay::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        clickhouse_url: relay.url(),
        extra_queries: vec![query(
            "brief",
            "SELECT count() AS n FROM demo.events WHERE ts < now()",
            "ttl = \"1s\"\ngrace = \"1h\"",
        )],
        set: vec![("cache", "xfetch_beta", 0.0.into())],
        ..Default::default()
    })
    .await;
    let first = proxy.get("/v1/query/brief").await;
    assert_eq!(first.cache(), "MISS");

    relay.cut();
    let stale = proxy.until("/v1/query/brief", "STALE").await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), first.text());
    // Keeps serving stale while every background refresh fails.
    for _ in 0..3 {
        let reply = proxy.get("/v1/query/brief").await;
        assert_eq!((reply.status, reply.cache()), (200, "STALE"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Refreshes fail in the background: wait (bounded) for one to be counted
    // rather than assume the reads above took long enough.
    let mut failed = 0.0;
    for _ in 0..200 {
        failed = proxy.metric("dashcache_refresh_failures_total").await;
        if failed >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        failed >= 1.0,
        "no failed refresh counted; log:\n{}",
        proxy.log()
    );
    // Nothing stored for this one: 503 with Retry-After, JSON body.
    let uncached = proxy
        .get("/v1/query/top_countries?from=today-9d&to=today")
        .await;
    assert_eq!(uncached.status, 503, "{}", uncached.text());
    assert!(uncached.header("retry-after").is_some());
    assert_eq!(uncached.json()["type"], "upstream_unavailable");

    relay.restore().await;
    let fresh = proxy.until("/v1/query/brief", "HIT").await;
    assert_eq!(fresh.status, 200);
    // The uncached key failed moments ago: it backs off (503) until its
    // backoff ends, then it is computed.
    let mut answered = false;
    for _ in 0..200 {
        let reply = proxy
            .get("/v1/query/top_countries?from=today-9d&to=today")
            .await;
        if reply.status == 200 {
            answered = true;
            break;
        }
        assert_eq!(reply.json()["type"], "upstream_unavailable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "log:\n{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_computing_process_dies_a_waiting_process_takes_over() {
    let prefix = shared_prefix();
    let options = |clickhouse_url: String| ProxyOptions {
        clickhouse_url,
        key_prefix: Some(prefix.clone()),
        extra_queries: vec![query("slow", "SELECT 42 AS answer", "ttl = \"5m\"")],
        set: vec![("coalesce", "lock_ttl", "1s".into())],
        ..Default::default()
    };
    // The leader's ClickHouse answers wait in a relay that is never released:
    // its query runs until the process is killed, however long the steps
    // below take (a `sleep(2)` query had to outlast them).
    let relay = Relay::start().await;
    relay.hold();
    let mut leader = Proxy::start_with(options(relay.url())).await;
    let waiter = Arc::new(Proxy::start_with(options(clickhouse_url())).await);
    let (leader_url, auth) = (
        format!("{}/v1/query/slow", leader.base),
        format!("Bearer {}", leader.key),
    );
    let leader_request = tokio::spawn(async move {
        crate::harness::request(&leader_url, &[("authorization", auth.as_str())]).await
    });
    // Wait until the leader has started the query (and so holds the lock).
    let mut started = false;
    for _ in 0..500 {
        if leader.metric("dashcache_clickhouse_queries_total").await >= 1.0 {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started,
        "the leader never started its query; log:\n{}",
        leader.log()
    );
    let mut waiting = Vec::new();
    for _ in 0..20 {
        let waiter = waiter.clone();
        waiting.push(tokio::spawn(
            async move { waiter.get("/v1/query/slow").await },
        ));
    }
    // Kill the leader once the waiter has all 20 in hand (/metrics itself is
    // the 21st), not after a guessed 300 ms: they find the leader's lock,
    // which outlives it by up to `lock_ttl`, and wait on it.
    let mut arrived = false;
    for _ in 0..500 {
        if waiter.metric("dashcache_http_in_flight_requests").await >= 21.0 {
            arrived = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(arrived, "the waiting requests never arrived");
    assert_eq!(
        waiter.metric("dashcache_clickhouse_queries_total").await,
        0.0,
        "the waiter must wait while the leader holds the lock"
    );
    leader.kill();
    if let Ok(reply) = leader_request.await.unwrap() {
        assert!(
            reply.body.is_err(),
            "the killed leader's client got a whole answer: {} {:?}",
            reply.status,
            reply.body
        );
    }
    for task in waiting {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(reply.text().contains("42"), "{}", reply.text());
    }
    assert_eq!(
        waiter.metric("dashcache_clickhouse_queries_total").await,
        1.0,
        "the waiter took over once"
    );
}
