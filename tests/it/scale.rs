//! Scaling out on the engines users run: ClickHouse replicas with failover
//! (the second server is `scripts/services`' replica on its own ports, with
//! the same demo data), and a three-master Redis Cluster on loopback carrying
//! coalescing, cached answers and shared rate limits for several proxies.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::harness::{
    Proxy, ProxyOptions, RedisCluster, RedisSentinel, Reply, TempDir, clickhouse_url,
    patient_redis, replica_clickhouse_url, replica_http_port, replica_services, shared_prefix,
};

/// Each `n` is its own cache key, so every request below reaches ClickHouse.
fn probe_query() -> (String, String, String) {
    (
        "probe".into(),
        "SELECT {n} AS n, count() AS events FROM demo.events".into(),
        "ttl = \"5m\"\n[query.probe.params.n]\ntype = \"int\"\nmin = 0\nmax = 100000000\n".into(),
    )
}

fn replicas() -> toml::Value {
    let replica = |url: String| {
        let mut table = toml::Table::new();
        table.insert("url".into(), url.into());
        toml::Value::Table(table)
    };
    toml::Value::Array(vec![
        replica(clickhouse_url()),
        replica(replica_clickhouse_url()),
    ])
}

fn series(name: &str, url: &str) -> String {
    format!("{name}{{replica=\"{url}\"}}")
}

/// Polls `proxy`'s metric until `accept` holds; bounded.
async fn metric_until(proxy: &Proxy, name: &str, accept: impl Fn(f64) -> bool) -> f64 {
    let mut value = 0.0;
    for _ in 0..200 {
        value = proxy.metric(name).await;
        if accept(value) {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} stayed at {value}; log:\n{}", proxy.log());
}

/// `clients` concurrent clients each send `each` requests, every one a new
/// key (a ClickHouse query); the failures, described. A fixed count, not a
/// duration: how many requests a phase sends does not depend on how fast the
/// machine is.
async fn load(
    proxy: &Arc<Proxy>,
    next: &Arc<AtomicU64>,
    clients: usize,
    each: usize,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (proxy, next) = (proxy.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for _ in 0..each {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let reply = proxy.get(&format!("/v1/query/probe?n={n}")).await;
                if reply.status != 200 || reply.body.is_err() {
                    failed.push(format!("{} {:?}", reply.status, reply.body));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for task in tasks {
        failed.extend(task.await.expect("client task"));
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_clickhouse_replica_is_failed_over_ejected_and_readmitted() {
    // The replica may be down after an earlier failed run.
    replica_services("up");
    let proxy = Arc::new(
        Proxy::start_with(ProxyOptions {
            extra_queries: vec![probe_query()],
            set: vec![
                ("clickhouse", "replicas", replicas()),
                // Checks run often (re-admission is quick) but never eject
                // within the test: the stopped replica stays "up" until a
                // query finds it unreachable, so that query's failover before
                // its first byte (and the ejection it causes) is certain, not a
                // race between the load and the checks. A slow check of the
                // busy primary cannot eject it either.
                ("clickhouse", "health_interval", "100ms".into()),
                ("clickhouse", "health_timeout", "2s".into()),
                ("clickhouse", "eject_after", 1_000_000.into()),
                ("cache", "l1_max_bytes", 0.into()),
            ],
            ..Default::default()
        })
        .await,
    );
    let replica = replica_clickhouse_url();
    let replica_up = series("dashcache_clickhouse_replica_up", &replica);
    let replica_queries = series("dashcache_clickhouse_replica_queries_total", &replica);
    let ejections = series("dashcache_clickhouse_replica_ejections_total", &replica);
    let failovers = "dashcache_clickhouse_failovers_total";
    // 4 clients × 10 requests a phase, 4 phases: 160 requests, well within the
    // enterprise tier's burst of 1000, so no request can be rate limited
    // however long the replica takes to stop and start.
    let (clients, each) = (4, 10);
    let next = Arc::new(AtomicU64::new(0));
    let mut failed = Vec::new();

    // Both up: each replica takes queries (of two idle replicas, the next
    // query goes to the other one, so the replica gets one of the first two).
    failed.extend(load(&proxy, &next, clients, each).await);
    assert!(proxy.metric(&replica_queries).await >= 1.0);
    assert_eq!(proxy.metric(failovers).await, 0.0);

    // Stopped (the script returns once the server has exited), still counted
    // up: the first query sent to it cannot connect and moves to the primary
    // before its first byte, and the replica is ejected.
    replica_services("down");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", replica_http_port())).is_err(),
        "the replica still listens (`scripts/services down` stops only servers it started)"
    );
    assert_eq!(proxy.metric(&replica_up).await, 1.0);
    failed.extend(load(&proxy, &next, clients, each).await);
    assert!(proxy.metric(failovers).await >= 1.0);
    assert_eq!(proxy.metric(&replica_up).await, 0.0);
    assert!(proxy.metric(&ejections).await >= 1.0);

    // Ejected: it gets no queries; the load goes on.
    let sent_before = proxy.metric(&replica_queries).await;
    failed.extend(load(&proxy, &next, clients, each).await);
    assert_eq!(proxy.metric(&replica_queries).await, sent_before);

    // Started again: one good check re-admits it, and it takes queries again.
    replica_services("up");
    metric_until(&proxy, &replica_up, |v| v == 1.0).await;
    failed.extend(load(&proxy, &next, clients, each).await);
    assert!(proxy.metric(&replica_queries).await > sent_before);

    assert!(
        failed.is_empty(),
        "{} requests failed: {:?}; log:\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        proxy.log()
    );
}

fn on_cluster(cluster: &RedisCluster, prefix: &str) -> ProxyOptions {
    ProxyOptions {
        key_prefix: Some(prefix.to_owned()),
        set: vec![
            ("redis", "cluster_nodes", cluster.nodes()),
            ("cache", "l1_max_bytes", 0.into()),
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_answers_are_cached_and_two_proxies_coalesce_256_cold_requests() {
    let cluster = RedisCluster::start().await;
    let prefix = shared_prefix();
    let options = || {
        let mut options = on_cluster(&cluster, &prefix);
        options.set.push(patient_redis());
        options
    };
    let proxies = Arc::new([
        Proxy::start_with(options()).await,
        Proxy::start_with(options()).await,
    ]);

    // MISS then HIT (no in-process tier: the HIT comes from the cluster),
    // also on the other proxy.
    let url = "/v1/query/revenue?from=today-3d&to=today&granularity=hour";
    let first = proxies[0].get(url).await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "MISS"),
        "{}",
        first.text()
    );
    let again = proxies[0].get(url).await;
    assert_eq!(again.cache(), "HIT");
    let other = proxies[1].get(url).await;
    assert_eq!(other.cache(), "HIT");
    assert_eq!(other.text(), first.text());

    // 256 concurrent cold requests over both proxies: one ClickHouse query.
    let cold = "/v1/query/revenue?from=today-1d&to=today&granularity=minute&format=csv";
    let before = total_queries(&proxies[..]).await;
    let mut tasks = Vec::new();
    for i in 0..256 {
        let proxies = proxies.clone();
        tasks.push(tokio::spawn(async move { proxies[i % 2].get(cold).await }));
    }
    let mut bodies = HashSet::new();
    let mut results: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        let reply = task.await.expect("request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
        *results.entry(reply.cache().to_owned()).or_default() += 1;
        bodies.insert(reply.text());
    }
    assert_eq!(bodies.len(), 1, "every client got the same answer");
    assert_eq!(
        total_queries(&proxies[..]).await - before,
        1.0,
        "{results:?}"
    );
    assert_eq!(results.get("MISS"), Some(&1), "{results:?}");
    for proxy in proxies.iter() {
        assert_eq!(proxy.metric("dashcache_redis_errors_total").await, 0.0);
    }
}

async fn total_queries(proxies: &[Proxy]) -> f64 {
    let mut total = 0.0;
    for proxy in proxies {
        total += proxy.metric("dashcache_clickhouse_queries_total").await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_rate_limit_is_shared_by_two_proxies() {
    let cluster = RedisCluster::start().await;
    let dir = TempDir::new("cluster-store");
    let store = format!("sqlite://{}/control.db", dir.0.display());
    let prefix = shared_prefix();
    let options = || {
        let mut options = on_cluster(&cluster, &prefix);
        options.set.push(patient_redis());
        options.store_url = Some(store.clone());
        // A burst of 10 and one more request a minute: no request is given
        // back while the test runs (seconds), so the count below is exact
        // however slow the machine (at 10 a minute, one came back every 6 s).
        let tier: toml::Value = "requests_per_minute = 1\nburst = 10\nqueries = ['*']"
            .parse::<toml::Table>()
            .expect("tier")
            .into();
        options.set.push(("tier", "test", tier));
        options
    };
    let a = Proxy::start_with(options()).await;
    let b = Proxy::start_with(options()).await;
    let key = a.add_key("test", "acme");
    let auth = format!("Bearer {key}");
    let headers = [("authorization", auth.as_str())];
    // Both proxies load the new key (404: known key, unknown query).
    for proxy in [&a, &b] {
        let mut known = false;
        for _ in 0..50 {
            if proxy.get_with("/v1/query/nope", &headers).await.status == 404 {
                known = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(known, "proxy did not load the new key");
    }
    // The two probes counted: 8 left of the burst of 10, whichever proxy asks.
    let url = "/v1/query/top_countries?from=today-7d&to=today";
    let mut statuses: Vec<u16> = Vec::new();
    for i in 0..13 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        statuses.push(proxy.get_with(url, &headers).await.status);
    }
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    let denied = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((allowed, denied), (8, 5), "{statuses:?}");
    assert_eq!(a.metric("dashcache_redis_errors_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_redis_cluster_down_for_10s_requests_succeed_and_caching_resumes() {
    let mut cluster = RedisCluster::start().await;
    let proxy = Arc::new(Proxy::start_with(on_cluster(&cluster, &shared_prefix())).await);
    let url = "/v1/query/revenue?from=today-2d&to=today&granularity=hour";
    assert_eq!(proxy.get(url).await.cache(), "MISS");
    assert_eq!(proxy.get(url).await.cache(), "HIT");

    cluster.stop();
    // Steady requests while it is down for at least 10 s: a fixed 100, 100 ms
    // apart (so the outage lasts 10 s however fast the machine, and the count
    // stays far below the tier's burst however slow): every one answered
    // (from ClickHouse).
    let mut results: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        let reply: Reply = proxy.get(url).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(reply.body.is_ok());
        *results.entry(reply.cache().to_owned()).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !results.contains_key("HIT"),
        "nothing can be a HIT without Redis: {results:?}"
    );
    assert!(proxy.metric("dashcache_redis_errors_total").await >= 1.0);

    cluster.restart().await;
    cluster.wait_ok().await;
    let mut resumed = false;
    for _ in 0..200 {
        if proxy.get(url).await.cache() == "HIT" {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "caching did not resume; log:\n{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinel_the_proxy_follows_a_master_failover() {
    let mut group = RedisSentinel::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        set: vec![
            ("redis", "sentinel_master", group.name.clone().into()),
            (
                "redis",
                "sentinel_addresses",
                toml::Value::Array(vec![group.url().into()]),
            ),
            ("cache", "l1_max_bytes", 0.into()),
        ],
        ..Default::default()
    })
    .await;
    let url = "/v1/query/revenue?from=today-4d&to=today&granularity=hour";
    assert_eq!(proxy.get(url).await.cache(), "MISS");
    assert_eq!(proxy.get(url).await.cache(), "HIT");

    group.kill_master();
    // Requests go on while the sentinel notices and promotes the replica.
    let reply = proxy.get(url).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        group.await_failover().await,
        "the sentinel never failed over"
    );

    // A new answer is stored on the new master: the old one is dead.
    let fresh = "/v1/query/revenue?from=today-5d&to=today&granularity=hour";
    let mut cached = false;
    for _ in 0..100 {
        let reply = proxy.get(fresh).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        if reply.cache() == "HIT" {
            cached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cached,
        "caching did not resume on the new master; log:\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_scheduler_lease_holds_and_warmed_answers_are_proxy_hits() {
    let cluster = RedisCluster::start().await;
    let prefix = shared_prefix();
    let proxy = Proxy::start_with(on_cluster(&cluster, &prefix)).await;
    // The scheduler shares the proxy's config (and so its cluster and prefix).
    let dir = TempDir::new("cluster-scheduler");
    let config = dir.0.join("config.toml");
    let mut text: toml::Table = std::fs::read_to_string(proxy.dir.0.join("config.toml"))
        .expect("proxy config")
        .parse()
        .expect("toml");
    text.remove("warmup");
    let mut text = toml::to_string(&text).expect("serializes");
    text.push_str(
        "\n[[warmup]]\nname = \"cl\"\ncron = \"0 6 * * *\"\nquery = \"revenue\"\n\
         tenants = [\"acme\"]\nparams = [{ from = \"2026-01-01\", to = \"2026-01-08\" }]\n",
    );
    std::fs::write(&config, text).expect("write config");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_dashcache-scheduler"))
            .arg("--config")
            .arg(&config)
            .args(["run", "cl"])
            .env("RUST_LOG", "info")
            .env_remove("DASHCACHE_REDIS_URL")
            .env_remove("DASHCACHE_CLICKHOUSE_URL")
            .env_remove("DASHCACHE_STORE_URL")
            .output()
            .expect("run dashcache-scheduler")
    };
    // Another host holds the job's lease (a key in the job's hash tag).
    let lease = format!("{prefix}:warmup:{{cl}}:lease");
    let redis_cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-c", "-p", &cluster.ports[0].to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        redis_cli(&["SET", &lease, "elsewhere 1", "PX", "60000"]),
        "OK"
    );
    let held = run();
    let log = String::from_utf8_lossy(&held.stderr).into_owned();
    assert!(!held.status.success(), "ran despite the lease:\n{log}");
    assert!(log.contains("elsewhere"), "{log}");

    assert_eq!(redis_cli(&["DEL", &lease]), "1");
    let ran = run();
    let log = String::from_utf8_lossy(&ran.stderr).into_owned();
    assert!(ran.status.success(), "{log}");
    assert_eq!(
        redis_cli(&["EXISTS", &lease]),
        "0",
        "the lease was released"
    );

    let warmed = proxy
        .get("/v1/query/revenue?from=2026-01-01&to=2026-01-08")
        .await;
    assert_eq!(
        (warmed.status, warmed.cache()),
        (200, "HIT"),
        "{}",
        warmed.text()
    );
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        0.0
    );
}
