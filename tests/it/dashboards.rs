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

/// A dashboard polling "the last 7 days": one cache entry, refreshed in the
/// background, whose stated range moves with the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relative_range_keeps_one_entry_whose_range_moves_with_each_refresh() {
    let proxy = Proxy::start_with(ProxyOptions {
        set: vec![
            // `now` in whole seconds, so the test crosses many "minute" steps
            // in seconds; every hit starts an early refresh (XFetch).
            ("cache", "now_step", "1s".into()),
            ("cache", "xfetch_beta", 1e9.into()),
        ],
        ..Default::default()
    })
    .await;
    let url = "/v1/query/revenue?from=now-7d&to=now&granularity=day";
    let first = proxy.get(url).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.cache(), "MISS");
    let range = |reply: &crate::harness::Reply| -> (i64, i64) {
        let value = reply.header("x-time-range").expect("x-time-range");
        let (from, to) = value.split_once('/').expect("an interval");
        let secs = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t)
                .unwrap_or_else(|e| panic!("{t}: {e}"))
                .timestamp()
        };
        (secs(from), secs(to))
    };
    let (from, to) = range(&first);
    assert_eq!(to - from, 7 * 86_400, "the range is the 7 days asked for");

    // The same request goes on hitting the one entry; refreshes move its range.
    let mut moved = false;
    for _ in 0..300 {
        let reply = proxy.get(url).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.cache(), "HIT", "a polling dashboard never misses");
        let age: u64 = reply
            .header("age")
            .and_then(|a| a.parse().ok())
            .expect("age");
        assert!(age <= 300, "an answer older than its TTL: {age}s");
        let (f, t) = range(&reply);
        assert_eq!(t - f, 7 * 86_400);
        if t > to {
            moved = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(moved, "the stated range never moved with the clock");

    // The same range written another way is the same entry.
    let same = proxy
        .get("/v1/query/revenue?from=now-168h&to=now&granularity=day")
        .await;
    assert_eq!(same.cache(), "HIT", "now-168h is now-7d");
    // Another tenant never shares it.
    let other = proxy.add_key("enterprise", "globex");
    let theirs = proxy.get_with(url, &[("x-api-key", &other)]).await;
    assert_eq!(theirs.status, 200, "{}", theirs.text());
    assert_eq!(
        theirs.cache(),
        "MISS",
        "a tenant got another tenant's entry"
    );
}

/// An answer that is read is refreshed just before it expires, with no read
/// needed in its last moments (refresh-ahead): a dashboard polling less often
/// than the early-refresh window never gets an answer older than its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_that_is_read_is_refreshed_before_it_expires_without_further_reads() {
    let proxy = Proxy::start_with(ProxyOptions {
        extra_queries: vec![(
            "polled".into(),
            "SELECT count() AS n FROM demo.events WHERE ts < now()".into(),
            "ttl = \"6s\"\ngrace = \"1h\"".into(),
        )],
        set: vec![
            // Neither XFetch nor the read window: only refresh-ahead refreshes.
            ("cache", "xfetch_beta", 0.0.into()),
            ("cache", "early_refresh", 0.0.into()),
        ],
        ..Default::default()
    })
    .await;
    let url = "/v1/query/polled";
    assert_eq!(proxy.get(url).await.cache(), "MISS");
    let stores = proxy
        .metric("dashcache_cache_stores_total{result=\"stored\"}")
        .await;
    // One read while fresh arms the timer...
    assert_eq!(proxy.get(url).await.cache(), "HIT");
    // ...and, with no other read, the answer is computed again and stored
    // (bounded wait: the timer fires about a second before the 6 s TTL ends).
    let mut refreshed = false;
    for _ in 0..300 {
        if proxy.metric("dashcache_ahead_refreshes_total").await >= 1.0
            && proxy
                .metric("dashcache_cache_stores_total{result=\"stored\"}")
                .await
                > stores
        {
            refreshed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refreshed, "no refresh-ahead; log:\n{}", proxy.log());
    let reply = proxy.get(url).await;
    assert_eq!(reply.cache(), "HIT", "{}", proxy.log());
    let age: u64 = reply
        .header("age")
        .and_then(|a| a.parse().ok())
        .expect("age");
    assert!(age < 6, "the answer read is the refreshed one: Age {age}");
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        2.0
    );
}

/// Popularity counts the request as asked, so the `popular` job warms
/// exactly the relative requests dashboards will ask for next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_popular_job_warms_relative_requests_as_dashboards_asked_them() {
    let prefix = crate::harness::shared_prefix();
    let options = || ProxyOptions {
        key_prefix: Some(prefix.clone()),
        set: vec![("popularity", "flush_interval", "100ms".into())],
        ..Default::default()
    };
    let asked = [
        "/v1/query/revenue?from=now-24h&to=now&granularity=hour",
        "/v1/query/revenue?from=yesterday&to=today&granularity=hour",
        "/v1/query/top_countries?from=today-7d&to=today&limit=5",
    ];
    let dashboard = Proxy::start_with(options()).await;
    for path in asked {
        let reply = dashboard.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }
    // Counted in Redis (flushed in the background; bounded wait).
    let client = redis::Client::open(crate::harness::redis_url()).expect("redis");
    let mut redis = redis::aio::ConnectionManager::new(client)
        .await
        .expect("redis");
    let mut members: Vec<String> = Vec::new();
    for _ in 0..200 {
        let hour = dashcache::popularity::hour_key(&prefix, chrono::Utc::now());
        members = redis::cmd("ZRANGE")
            .arg(&hour)
            .arg(0)
            .arg(-1)
            .query_async(&mut redis)
            .await
            .expect("zrange");
        if members.len() >= asked.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    members.sort();
    assert_eq!(members.len(), asked.len(), "counted as asked: {members:?}");
    // In canonical form: now-24h is now-1d, yesterday is today-1d.
    for relative in ["from=now-1d", "from=today-1d", "from=today-7d"] {
        assert!(
            members.iter().any(|m| m.contains(relative)),
            "{relative} not counted as asked: {members:?}"
        );
    }
    drop(dashboard);
    // The answers are gone (say, expired overnight); the counts remain.
    let answers: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:v*"))
        .query_async(&mut redis)
        .await
        .expect("keys");
    assert!(!answers.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&answers)
        .query_async(&mut redis)
        .await
        .expect("del");

    // The popular job warms them...
    let dir = crate::harness::TempDir::new("popular-relative");
    let mut text = crate::harness::config_text(&options(), &dir.0);
    let mut config: toml::Table = text.parse().expect("toml");
    config.remove("warmup");
    text = toml::to_string(&config).expect("toml");
    text.push_str("\n[[warmup]]\nname = \"popular\"\ncron = \"0 * * * *\"\npopular = { top = 10, hours = 2 }\n");
    let path = dir.0.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dashcache-scheduler"))
        .arg("--config")
        .arg(&path)
        .args(["run", "popular"])
        .output()
        .expect("run the popular job");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // ...so the next dashboard's requests are hits that cost ClickHouse nothing.
    let next = Proxy::start_with(options()).await;
    for path in asked {
        let reply = next.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(reply.cache(), "HIT", "{path} was not warmed");
    }
    assert_eq!(next.metric("dashcache_clickhouse_queries_total").await, 0.0);
}
