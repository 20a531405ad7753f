//! Outages under a burst of requests, judged by counts: what failed, and how
//! many queries ClickHouse was sent. ClickHouse gone (relay cut), Redis
//! stopped and restarted empty (dedicated server), Redis black-holed.

use std::time::Duration;

use futures_util::future::join_all;

use crate::harness::{
    BlackHole, Proxy, ProxyOptions, RedisServer, Relay, Reply, patient_redis, shared_prefix,
};

async fn burst(proxy: &Proxy, urls: &[String], per_url: usize) -> Vec<Reply> {
    let requests = urls
        .iter()
        .flat_map(|url| std::iter::repeat_n(url, per_url))
        .map(|url| proxy.get(url));
    join_all(requests).await
}

fn all_ok(replies: &[Reply], proxy: &Proxy) {
    for reply in replies {
        assert_eq!(
            reply.status,
            200,
            "{}; log:\n{}",
            reply
                .body
                .as_ref()
                .map_or("(cut)".into(), |b| String::from_utf8_lossy(b).into_owned()),
            proxy.log()
        );
        assert!(reply.body.is_ok(), "a cut answer");
    }
}

async fn queries(proxy: &Proxy) -> f64 {
    proxy.metric("dashcache_clickhouse_queries_total").await
}

async fn attempts(proxy: &Proxy, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "dashcache_clickhouse_attempts_total{{result=\"{result}\"}}"
        ))
        .await
}

/// Revenue over ranges in the past: a distinct key each, fresh for 5 minutes.
fn revenue(n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| format!("/v1/query/revenue?from=2024-01-{i:02}&to=2024-02-01&granularity=day"))
        .collect()
}

#[tokio::test]
async fn clickhouse_gone_cached_keys_answer_uncached_get_503_and_each_key_is_tried_at_most_twice() {
    let mut relay = Relay::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        clickhouse_url: relay.url(),
        extra_queries: vec![(
            "brief".into(),
            "SELECT {n} AS n".into(),
            "ttl = \"1s\"\ngrace = \"1h\"\n[query.brief.params.n]\ntype = \"int\"\nmin = 0\nmax = 100000\n"
                .into(),
        )],
        set: vec![
            // One failure keeps a key from ClickHouse for the whole test, so
            // the bound below does not depend on how long the test takes.
            ("coalesce", "backoff", "1h".into()),
            ("coalesce", "backoff_max", "1h".into()),
            ("cache", "xfetch_beta", 0.0.into()),
            ("cache", "early_refresh", 0.0.into()),
        ],
        ..Default::default()
    })
    .await;
    let cached: Vec<String> = (0..5).map(|n| format!("/v1/query/brief?n={n}")).collect();
    let uncached: Vec<String> = (100..103)
        .map(|n| format!("/v1/query/brief?n={n}"))
        .collect();
    for url in &cached {
        let reply = proxy.get(url).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.cache(), "MISS");
    }
    assert_eq!(attempts(&proxy, "ejected").await, 0.0, "exported at 0");

    relay.cut();
    let before = queries(&proxy).await;
    let sent_before = attempts(&proxy, "sent").await;
    // Until the answers' 1 s freshness has run out.
    let mut stale = false;
    for _ in 0..200 {
        let reply = proxy.get(&cached[0]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        if reply.cache() == "STALE" {
            stale = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stale, "the answer never went stale");

    let (mut served_stale, mut refused) = (0, 0);
    for _ in 0..40 {
        for url in &cached {
            let reply = proxy.get(url).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert!(
                ["HIT", "STALE"].contains(&reply.cache()),
                "{}",
                reply.cache()
            );
            served_stale += usize::from(reply.cache() == "STALE");
        }
        for url in &uncached {
            let reply = proxy.get(url).await;
            assert_eq!(reply.status, 503, "{}", reply.text());
            assert_eq!(reply.json()["type"], "upstream_unavailable");
            assert!(reply.header("retry-after").is_some());
            refused += 1;
        }
    }
    assert_eq!(refused, 120);
    assert!(served_stale >= 100, "{served_stale}");
    // 320 reads of 8 keys, all of them wanting ClickHouse: at most one
    // attempt (2 queries: the retry once) per key, not one per read.
    let sent = queries(&proxy).await - before;
    assert!(sent <= 16.0, "{sent} queries for 8 keys");
    assert_eq!(attempts(&proxy, "sent").await, sent_before, "none reached");
    assert!(attempts(&proxy, "unreachable").await >= 1.0);
    // Refreshes of the cached keys were not even started once the replica was
    // ejected (or once their key had failed).
    assert!(
        attempts(&proxy, "ejected").await + attempts(&proxy, "backing_off").await >= 100.0,
        "{}",
        proxy.get("/metrics").await.text()
    );

    // ClickHouse returns: a health check re-admits it, and a key that never
    // failed is computed at once.
    relay.restore().await;
    let up = format!(
        "dashcache_clickhouse_replica_up{{replica=\"{}\"}}",
        relay.url()
    );
    let mut readmitted = false;
    for _ in 0..200 {
        if proxy.metric(&up).await == 1.0 {
            readmitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(readmitted, "not re-admitted; log:\n{}", proxy.log());
    let reply = proxy.get("/v1/query/brief?n=999").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.cache(), "MISS");
}

#[tokio::test]
async fn redis_stopped_and_restarted_empty_fails_nothing_and_costs_one_query_per_key_at_most() {
    let mut redis = RedisServer::start().await;
    let prefix = shared_prefix();
    let options = |url: String| ProxyOptions {
        redis_url: url,
        key_prefix: Some(prefix.clone()),
        set: vec![
            // The in-process hot path lapses quickly: what follows is served
            // by what the process kept, not by the hot path.
            ("cache", "l1_ttl", "50ms".into()),
            ("cache", "xfetch_beta", 0.0.into()),
            ("cache", "early_refresh", 0.0.into()),
        ],
        ..Default::default()
    };
    let keys = revenue(6);
    // `a` computes every answer (stored in Redis); `b` has seen none of them.
    let a = Proxy::start_with(options(redis.url())).await;
    let b = Proxy::start_with(options(redis.url())).await;
    for url in &keys {
        let reply = a.get(url).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let (a0, b0) = (queries(&a).await, queries(&b).await);

    redis.stop();
    // Longer than l1_ttl: no answer is on a's hot path any more.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let (ra, rb) = tokio::join!(burst(&a, &keys, 8), burst(&b, &keys, 8));
        all_ok(&ra, &a);
        all_ok(&rb, &b);
    }
    // `a` kept its answers (fresh for 5 minutes): no query. `b` computed each
    // key once and kept it for the rest of the outage.
    assert_eq!(queries(&a).await, a0, "a: {}", a.log());
    assert!(queries(&b).await - b0 <= keys.len() as f64);
    assert!(a.metric("dashcache_l1_fallbacks_total").await >= 1.0);

    // Redis comes back empty: kept answers are still served, a third process
    // (nothing kept) computes each key once, coalesced.
    redis.restart().await;
    let c = Proxy::start_with(options(redis.url())).await;
    let c0 = queries(&c).await;
    for _ in 0..3 {
        let (ra, rb, rc) = tokio::join!(
            burst(&a, &keys, 8),
            burst(&b, &keys, 8),
            burst(&c, &keys, 8)
        );
        all_ok(&ra, &a);
        all_ok(&rb, &b);
        all_ok(&rc, &c);
    }
    assert_eq!(queries(&a).await, a0);
    assert!(queries(&b).await - b0 <= keys.len() as f64);
    assert!(queries(&c).await - c0 <= keys.len() as f64);
}

#[tokio::test]
async fn a_black_holed_redis_costs_one_timeout_per_retry_after_not_one_per_request() {
    let hole = BlackHole::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        redis_url: hole.redis_url(),
        set: vec![
            ("redis", "timeout", "300ms".into()),
            ("redis", "retry_after", "1h".into()),
        ],
        ..Default::default()
    })
    .await;
    let keys = revenue(2);
    for _ in 0..10 {
        for url in &keys {
            let reply = proxy.get(url).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    // Rate limits, cache reads, locks and writes of 20 requests all needed
    // Redis: only the first operation waited for it.
    assert_eq!(
        proxy.metric("dashcache_redis_errors_total").await,
        1.0,
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn a_slow_clickhouse_gets_at_most_max_in_flight_and_the_line_behind_it_is_bounded() {
    use futures_util::StreamExt;
    use futures_util::stream::FuturesUnordered;

    let relay = Relay::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        clickhouse_url: relay.url(),
        extra_queries: vec![(
            "brief".into(),
            "SELECT {n} AS n".into(),
            "ttl = \"5m\"\n[query.brief.params.n]\ntype = \"int\"\nmin = 0\nmax = 100000\n".into(),
        )],
        set: vec![
            ("clickhouse", "max_in_flight", 2.into()),
            ("clickhouse", "max_queued", 3.into()),
            ("clickhouse", "queue_wait", "1h".into()),
        ],
        ..Default::default()
    })
    .await;
    let cached = "/v1/query/brief?n=0";
    assert_eq!(proxy.get(cached).await.cache(), "MISS");
    let before = queries(&proxy).await;

    // ClickHouse's answers now wait in the relay for as long as the test
    // wants: as slow as it gets. Ten cold keys at once.
    relay.hold();
    let auth = format!("Bearer {}", proxy.key);
    let mut pending: FuturesUnordered<_> = (1..=10)
        .map(|n| {
            let url = format!("{}/v1/query/brief?n={n}", proxy.base);
            let auth = auth.clone();
            async move {
                crate::harness::request(&url, &[("authorization", auth.as_str())])
                    .await
                    .expect("an answer")
            }
        })
        .collect();
    // Two run, three wait in line, the other five are refused at once.
    for _ in 0..5 {
        let reply = tokio::time::timeout(Duration::from_secs(60), pending.next())
            .await
            .expect("refused at once")
            .expect("a reply");
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.json()["type"], "upstream_timeout");
        assert!(reply.header("retry-after").is_some());
    }
    assert_eq!(
        queries(&proxy).await - before,
        2.0,
        "only max_in_flight sent"
    );
    assert_eq!(proxy.metric("dashcache_clickhouse_in_flight").await, 2.0);
    assert_eq!(proxy.metric("dashcache_clickhouse_queued").await, 3.0);
    assert_eq!(
        proxy
            .metric("dashcache_clickhouse_admissions_total{outcome=\"queue_full\"}")
            .await,
        5.0
    );
    // A stored answer does not wait for ClickHouse.
    let hit = proxy.get(cached).await;
    assert_eq!((hit.status, hit.cache()), (200, "HIT"));

    // ClickHouse speeds up: the running and the waiting ones are answered,
    // never more than two at a time.
    relay.release();
    while let Some(reply) = tokio::time::timeout(Duration::from_secs(60), pending.next())
        .await
        .expect("answered after release")
    {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(queries(&proxy).await - before, 5.0);
    assert_eq!(
        proxy
            .metric("dashcache_clickhouse_admissions_total{outcome=\"after_wait\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn computations_waiting_for_a_clickhouse_slot_give_up_after_queue_wait() {
    let relay = Relay::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        clickhouse_url: relay.url(),
        extra_queries: vec![(
            "brief".into(),
            "SELECT {n} AS n".into(),
            "ttl = \"5m\"\n[query.brief.params.n]\ntype = \"int\"\nmin = 0\nmax = 100000\n".into(),
        )],
        set: vec![
            ("clickhouse", "max_in_flight", 1.into()),
            ("clickhouse", "max_queued", 10.into()),
            ("clickhouse", "queue_wait", "200ms".into()),
        ],
        ..Default::default()
    })
    .await;
    relay.hold();
    let auth = format!("Bearer {}", proxy.key);
    let running = {
        let url = format!("{}/v1/query/brief?n=1", proxy.base);
        let auth = auth.clone();
        tokio::spawn(async move {
            crate::harness::request(&url, &[("authorization", auth.as_str())]).await
        })
    };
    // Wait (bounded) until the first computation holds the only slot.
    let mut holding = false;
    for _ in 0..200 {
        if proxy.metric("dashcache_clickhouse_in_flight").await == 1.0 {
            holding = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(holding, "{}", proxy.log());
    // These wait in line and give up: however long ClickHouse takes, they
    // are answered (503) and never sent.
    for n in 2..=4 {
        let reply = proxy.get(&format!("/v1/query/brief?n={n}")).await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.json()["type"], "upstream_timeout");
    }
    assert_eq!(
        proxy
            .metric("dashcache_clickhouse_admissions_total{outcome=\"wait_timeout\"}")
            .await,
        3.0
    );
    assert_eq!(queries(&proxy).await, 1.0);
    relay.release();
    let first = running.await.expect("joined").expect("a reply");
    assert_eq!(first.status, 200, "{}", first.text());
}

// Multi-threaded: the relay keeps relaying while the test waits on requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_proxies_killed_only_its_request_in_flight_fails_the_other_answers_everything() {
    let prefix = shared_prefix();
    let relay = Relay::start().await;
    let options = |clickhouse_url: String| ProxyOptions {
        key_prefix: Some(prefix.clone()),
        clickhouse_url,
        set: vec![patient_redis()],
        ..Default::default()
    };
    let a = Proxy::start_with(options(crate::harness::clickhouse_url())).await;
    let mut b = Proxy::start_with(options(relay.url())).await;
    let keys = revenue(4);
    for url in &keys {
        let reply = a.get(url).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // B is computing a key (ClickHouse's answer waits in the relay) when it is killed.
    relay.hold();
    let computing = "/v1/query/revenue?from=2023-06-01&to=2023-07-01&granularity=day";
    let in_flight = tokio::spawn({
        let url = format!("{}{computing}", b.base);
        let auth = format!("Bearer {}", b.key);
        async move { crate::harness::request(&url, &[("authorization", auth.as_str())]).await }
    });
    let mut sent = false;
    for _ in 0..400 {
        if queries(&b).await >= 1.0 {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(sent, "{}", b.log());
    b.kill();
    let cut = in_flight.await.expect("joined");
    assert!(
        cut.as_ref().map_or(true, |r| r.body.is_err()),
        "the request in flight on the killed proxy cannot have completed"
    );
    // A answers everything: the warmed keys, and the key B was computing
    // (once B's computation lock, no longer renewed, expires).
    all_ok(&burst(&a, &keys, 8).await, &a);
    let reply = a.get(computing).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        a.metric("dashcache_http_requests_total{route=\"query\",status=\"503\"}")
            .await,
        0.0
    );
}
