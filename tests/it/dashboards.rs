//! What dashboards send: many cold panels of one key at once, keys minted
//! while the dashboard is already polling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::harness::{Proxy, ProxyOptions, clickhouse};

/// A panel query that takes a moment at ClickHouse, marked so that the test
/// can find its own queries in `system.processes`; each `n` is its own key.
fn slow_panel(marker: &str) -> (String, String, String) {
    (
        "panel".into(),
        format!("SELECT {{n}} AS n, sleep(0.2) AS slept, '{marker}' AS marker"),
        "ttl = \"5m\"\n[query.panel.params.n]\ntype = \"int\"\nmin = 0\nmax = 1000\n".into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_cold_panels_of_one_pro_key_all_answer_while_clickhouse_runs_at_most_four() {
    let marker = format!("panel-marker-{}", std::process::id());
    let proxy = Arc::new(
        Proxy::start_with(ProxyOptions {
            extra_queries: vec![slow_panel(&marker)],
            tier: "pro", // max_concurrent_misses = 4 in the shipped config
            ..Default::default()
        })
        .await,
    );

    // Watches ClickHouse itself (not the proxy's counters) while the panels
    // load: the most of this test's queries it ever runs at once. The
    // watcher's own SQL must not match, so the marker is split.
    let (half, rest) = marker.split_at(6);
    let running = format!(
        "SELECT count() FROM system.processes WHERE query LIKE concat('%', '{half}', '{rest}', '%')"
    );
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (done, most) = (done.clone(), most.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            while !done.load(Ordering::Acquire) && samples < 100_000 {
                let now: u64 = clickhouse(&running).await.trim().parse().unwrap_or(0);
                most.fetch_max(now, Ordering::AcqRel);
                samples += 1;
            }
        })
    };

    let panels: Vec<_> = (0..40)
        .map(|n| {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.get(&format!("/v1/query/panel?n={n}")).await })
        })
        .collect();
    for (n, panel) in panels.into_iter().enumerate() {
        let reply = panel.await.expect("panel task");
        assert_eq!(reply.status, 200, "panel {n}: {}", reply.text());
        assert_eq!(reply.header("x-cache"), Some("MISS"), "panel {n}");
        assert!(
            reply.text().contains(&marker),
            "panel {n}: {}",
            reply.text()
        );
    }
    done.store(true, Ordering::Release);
    watcher.await.expect("watcher");

    let most = most.load(Ordering::Acquire);
    assert!(
        most <= 4,
        "ClickHouse ran {most} of one pro key's queries at once"
    );
    assert!(most >= 1, "the watcher never saw a panel query running");
    // Some had to wait their turn, none was refused.
    assert!(
        proxy
            .metric("dashcache_miss_queue_total{outcome=\"queued\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        proxy
            .metric("dashcache_miss_queue_total{outcome=\"full\"}")
            .await,
        0.0
    );
    assert_eq!(
        proxy
            .metric("dashcache_miss_queue_total{outcome=\"timed_out\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_minted_during_a_flood_of_unknown_keys_works_on_its_first_request() {
    // A long periodic reload, so only on-demand reloads can find the new key.
    let proxy = Arc::new(
        Proxy::start_with(ProxyOptions {
            set: vec![("auth", "reload_interval", "1h".into())],
            ..Default::default()
        })
        .await,
    );
    const URL: &str = "/v1/query/top_countries?from=today-20d&to=today-2d&limit=3";
    // Unknown keys keep arriving, so an on-demand reload has nearly always
    // just run when the new key arrives.
    let stop = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..4)
        .map(|_| {
            let (proxy, stop) = (proxy.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0u32;
                while !stop.load(Ordering::Acquire) && sent < 100_000 {
                    let reply = proxy
                        .get_with(URL, &[("x-api-key", "dck_made_up_key_0000")])
                        .await;
                    assert_eq!(reply.status, 401, "{}", reply.text());
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    for round in 0..3 {
        let key = proxy.add_key("pro", "acme");
        let reply = proxy.get_with(URL, &[("x-api-key", &key)]).await;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
    }
    stop.store(true, Ordering::Release);
    for task in flood {
        assert!(task.await.expect("flood task") >= 1);
    }
}
