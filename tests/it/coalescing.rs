//! Concurrent misses for one key run ClickHouse once.

use crate::harness::Proxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_requests_run_one_clickhouse_query() {
    let proxy = std::sync::Arc::new(Proxy::start().await);
    // A heavier query (raw minutes over a day) so that the requests overlap it.
    let url = "/v1/query/revenue?from=today-1d&to=today&granularity=minute&format=ndjson";
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move { proxy.get(url).await }));
    }
    let mut bodies = std::collections::HashSet::new();
    let mut results = std::collections::HashMap::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        *results.entry(reply.cache().to_owned()).or_insert(0) += 1;
        bodies.insert(reply.text());
    }
    assert_eq!(bodies.len(), 1, "every request got the same answer");
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        1.0,
        "{results:?}"
    );
    assert_eq!(results.get("MISS"), Some(&1), "{results:?}");
    let others: i32 = results
        .iter()
        .filter(|(k, _)| *k != "MISS")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(others, 99);
}
