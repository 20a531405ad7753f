//! The single-host mode: a proxy whose config has no `[redis]` keeps answers,
//! computation locks, rate limits and request counts in its own memory.
//!
//! Each proxy here runs on the test ClickHouse server with the `[redis]`
//! section removed from its config (and `DASHCACHE_REDIS_URL` unset): it
//! must never need, nor report as down, a Redis it was not given.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{Proxy, ProxyOptions, Relay};

/// Options of a proxy without `[redis]`, and without the shipped warm-up
/// jobs (without Redis the proxy would run them: their queries would be
/// counted with the test's).
/// The operator tier's rate is lifted: the tests poll `/status.json`.
pub fn single_host(options: ProxyOptions) -> ProxyOptions {
    let mut without = options.without.clone();
    without.extend(["redis", "warmup"]);
    let mut set = options.set.clone();
    set.push((
        "tier",
        "operator",
        toml::Value::Table(
            "requests_per_minute = 600000\nburst = 100000\nqueries = []\nexports = []\noperator = true"
                .parse()
                .expect("tier table"),
        ),
    ));
    ProxyOptions {
        without,
        set,
        ..options
    }
}

const REVENUE: &str = "/v1/query/revenue?from=today-3d&to=today&granularity=day&format=csv";

#[tokio::test]
async fn without_redis_answers_live_in_the_proxy_and_nothing_reports_redis_down() {
    let proxy = Proxy::start_with(single_host(ProxyOptions::default())).await;
    let first = proxy.get(REVENUE).await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "MISS"),
        "{}",
        proxy.log()
    );
    let second = proxy.get(REVENUE).await;
    assert_eq!(second.cache(), "HIT");
    assert_eq!(second.text(), first.text());
    assert!(proxy.log().contains("no [redis]"), "{}", proxy.log());

    let ready = proxy.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let ready = ready.json();
    assert_eq!(ready["checks"]["redis"]["ok"], true);
    assert_eq!(ready["checks"]["redis"]["configured"], false);
    let ops = proxy.add_key("operator", "ops");
    let status = status_json(&proxy, &ops).await;
    assert_eq!(status["redis"]["ok"], true, "{status}");
    assert_eq!(status["redis"]["configured"], false);
    assert!(
        status["redis"]["memory_bytes"].as_u64() > Some(0),
        "{status}"
    );
    assert_eq!(proxy.metric("dashcache_redis_errors_total").await, 0.0);
    assert!(proxy.metric("dashcache_memory_answers_bytes").await > 0.0);
    // Request counts are kept too: /status lists the answer just read.
    let mut listed = false;
    for _ in 0..200 {
        let status = status_json(&proxy, &ops).await;
        if status["popular"]["answers"]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["query"] == "revenue"))
        {
            listed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed, "revenue never among the popular answers");
}

#[tokio::test]
async fn without_redis_stale_answers_are_served_within_grace_and_while_clickhouse_fails() {
    let mut relay = Relay::start().await;
    let proxy = Proxy::start_with(single_host(ProxyOptions {
        clickhouse_url: relay.url(),
        extra_queries: vec![(
            "brief".into(),
            "SELECT count() AS n FROM demo.events WHERE ts < now()".into(),
            "ttl = \"1s\"\ngrace = \"1h\"".into(),
        )],
        // No early or ahead-of-expiry refresh: the answer goes stale.
        set: vec![
            ("cache", "xfetch_beta", 0.0.into()),
            ("cache", "early_refresh", 0.0.into()),
            ("cache", "refresh_ahead_keys", 0.into()),
        ],
        ..Default::default()
    }))
    .await;
    let first = proxy.get("/v1/query/brief?format=csv").await;
    assert_eq!(first.cache(), "MISS");
    // Past its TTL, within grace: STALE, refreshed in the background.
    let stale = proxy.until("/v1/query/brief?format=csv", "STALE").await;
    assert_eq!(stale.text(), first.text());
    proxy.until("/v1/query/brief?format=csv", "HIT").await;

    // ClickHouse unreachable: the kept answer is served STALE, not an error.
    relay.cut();
    let stale = proxy.until("/v1/query/brief?format=csv", "STALE").await;
    assert_eq!((stale.status, stale.text()), (200, first.text()));
    for _ in 0..3 {
        let reply = proxy.get("/v1/query/brief?format=csv").await;
        assert_eq!((reply.status, reply.cache()), (200, "STALE"));
    }
    relay.restore().await;
    proxy.until("/v1/query/brief?format=csv", "HIT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_a_hundred_concurrent_cold_requests_are_one_clickhouse_query() {
    let proxy = Arc::new(Proxy::start_with(single_host(ProxyOptions::default())).await);
    let url = "/v1/query/revenue?from=today-1d&to=today&granularity=minute&format=csv";
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.get(url).await })
        })
        .collect();
    let mut results: HashMap<String, usize> = HashMap::new();
    let mut bodies = std::collections::HashSet::new();
    for task in tasks {
        let reply = task.await.expect("request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
        *results.entry(reply.cache().to_owned()).or_default() += 1;
        bodies.insert(reply.text());
    }
    assert_eq!(bodies.len(), 1);
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        1.0,
        "{results:?}"
    );
}

#[tokio::test]
async fn without_redis_rate_limits_hold_in_the_process() {
    let tiny: toml::Table =
        toml::from_str("requests_per_minute = 1\nburst = 3\nqueries = [\"*\"]\n").expect("tier");
    let proxy = Proxy::start_with(single_host(ProxyOptions {
        set: vec![("tier", "tiny", toml::Value::Table(tiny))],
        ..Default::default()
    }))
    .await;
    let key = proxy.add_key("tiny", "acme");
    let bearer = format!("Bearer {key}");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let reply = proxy
            .get_with(REVENUE, &[("authorization", bearer.as_str())])
            .await;
        if reply.status == 429 {
            assert_eq!(reply.json()["type"], "rate_limited");
            assert!(reply.header("retry-after").is_some());
        }
        statuses.push(reply.status);
    }
    // A burst of 3 at 1 a minute: the 4th and 5th within the minute are refused.
    assert_eq!(statuses, vec![200, 200, 200, 429, 429], "{}", proxy.log());
    assert_eq!(proxy.metric("dashcache_redis_errors_total").await, 0.0);
}

#[tokio::test]
async fn without_redis_answers_in_memory_stay_within_their_byte_bound() {
    const BOUND: u64 = 200_000;
    let proxy = Proxy::start_with(single_host(ProxyOptions {
        extra_queries: vec![(
            "wide".into(),
            "SELECT user_id, cityHash64(user_id, {seed}) AS h FROM demo.events LIMIT 1500".into(),
            "ttl = \"1h\"\n[query.wide.params.seed]\ntype = \"int\"\nmin = 0\nmax = 1000\nrequired = true"
                .into(),
        )],
        set: vec![("cache", "memory_max_bytes", (BOUND as i64).into())],
        ..Default::default()
    }))
    .await;
    let mut stored = 0usize;
    for seed in 0..30 {
        let reply = proxy
            .get(&format!("/v1/query/wide?seed={seed}&format=ndjson"))
            .await;
        assert_eq!(
            (reply.status, reply.cache()),
            (200, "MISS"),
            "{}",
            proxy.log()
        );
        stored += reply.body.as_ref().map_or(0, |b| b.len());
        let held = proxy.metric("dashcache_memory_answers_bytes").await;
        assert!(held > 0.0 && held <= BOUND as f64, "{held} bytes held");
    }
    assert!(stored as u64 > 2 * BOUND, "the answers outweigh the bound");
    let ops = proxy.add_key("operator", "ops");
    let status = status_json(&proxy, &ops).await;
    let held = status["redis"]["memory_bytes"].as_u64().expect("bytes");
    assert!(held <= BOUND, "{status}");
    // Not all of them could be kept: some are computed again.
    let mut again = 0;
    for seed in 0..30 {
        let reply = proxy
            .get(&format!("/v1/query/wide?seed={seed}&format=ndjson"))
            .await;
        assert_eq!(reply.status, 200);
        if reply.cache() == "MISS" {
            again += 1;
        }
    }
    assert!(
        again > 0,
        "30 answers of {stored} bytes all kept in {BOUND}"
    );
}

#[test]
fn check_accepts_a_config_without_redis_and_says_it_runs_on_one_host() {
    let dir = crate::harness::TempDir::new("single-check");
    let path = dir.0.join("config.toml");
    let text = crate::harness::config_text(&single_host(ProxyOptions::default()), &dir.0);
    assert!(!text.contains("[redis]"), "{text}");
    std::fs::write(&path, text).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dashcache-proxy"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env_remove("DASHCACHE_REDIS_URL")
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("mode: single host (no [redis])"),
        "{stdout}"
    );
    // The environment still gives Redis to a file that names none.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dashcache-proxy"))
        .arg("--config")
        .arg(&path)
        .arg("check")
        .env("DASHCACHE_REDIS_URL", crate::harness::redis_url())
        .output()
        .expect("run check");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mode: servers: "),
        "{out:?}"
    );
}

/// `scripts/demo --embedded` run as a newcomer would, with every ClickHouse
/// and Redis binary on PATH replaced by a stub that records being called: the
/// demo's printed curl lines answer (MISS then HIT, a 422, a 401, a streamed
/// export), and no stub was ever called.
#[tokio::test]
async fn scripts_demo_embedded_serves_its_curl_lines_without_any_server() {
    let Some(library) = crate::compat::library() else {
        eprintln!("SKIPPED single::scripts_demo_embedded…: no chDB library (run scripts/chdb)");
        return;
    };
    let dir = crate::harness::TempDir::new("demo-embedded");
    let stubs = dir.0.join("bin");
    std::fs::create_dir_all(&stubs).expect("stub dir");
    let called = dir.0.join("called");
    for name in [
        "clickhouse",
        "clickhouse-server",
        "clickhouse-client",
        "redis-server",
        "redis-cli",
    ] {
        let stub = stubs.join(name);
        std::fs::write(
            &stub,
            format!("#!/bin/sh\necho {name} >>'{}'\nexit 1\n", called.display()),
        )
        .expect("write stub");
        let mut perms = std::fs::metadata(&stub).expect("stub").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&stub, perms).expect("chmod stub");
    }
    let path = format!(
        "{}:{}",
        stubs.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let listen = format!("127.0.0.1:{}", crate::harness::free_port());
    let out = dir.0.join("demo.out");
    let mut demo = std::process::Command::new(crate::harness::root().join("scripts/demo"))
        .arg("--embedded")
        .env("PATH", &path)
        .env("DASHCACHE_PROXY_BIN", env!("CARGO_BIN_EXE_dashcache-proxy"))
        .env("DASHCACHE_CHDB_LIB", &library)
        .env("DASHCACHE_DEMO_DIR", dir.0.join("single"))
        .env("DASHCACHE_DEMO_ROWS", "20000")
        .env("DASHCACHE_DEMO_LISTEN", &listen)
        .env("DASHCACHE_DEMO_PAGES", "off")
        .env_remove("DASHCACHE_REDIS_URL")
        .env_remove("DASHCACHE_CLICKHOUSE_URL")
        .stdout(std::fs::File::create(&out).expect("demo output"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run scripts/demo --embedded");
    let mut printed = String::new();
    for _ in 0..1200 {
        printed = std::fs::read_to_string(&out).unwrap_or_default();
        if printed.contains("/status") || demo.try_wait().ok().flatten().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = printed
        .split_whitespace()
        .find_map(|w| w.strip_prefix("KEY="))
        .unwrap_or_else(|| panic!("no key printed:\n{printed}"))
        .to_owned();
    let ops = printed
        .split_whitespace()
        .find_map(|w| w.strip_prefix("OPS="))
        .unwrap_or_else(|| panic!("no operator key printed:\n{printed}"))
        .to_owned();
    let lines: Vec<&str> = printed
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert!(lines.len() >= 11, "{printed}");
    // The demo's warm-up job runs in the proxy every 15 s: wait for its first
    // run before the line that shows it.
    let base = format!("http://{listen}");
    let mut warmed = false;
    for _ in 0..600 {
        let metrics = crate::harness::get(&format!("{base}/metrics"))
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        let runs = "dashcache_warmup_runs_total{job=\"demo-warmup\",outcome=\"ok\"}";
        if crate::harness::metric(&metrics, runs) >= 1.0 {
            warmed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(warmed, "the demo's warm-up job never ran:\n{printed}");
    let run = |line: &str| {
        let out = std::process::Command::new("bash")
            .args(["-c", line])
            .env("KEY", &key)
            .env("OPS", &ops)
            .output()
            .expect("run a curl line");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answers: Vec<String> = lines.iter().map(|l| run(l)).collect();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status();
    let _ = demo.wait();
    let lower = |i: usize| answers[i].to_ascii_lowercase();
    assert!(
        lower(0).contains("200 ok") && lower(0).contains("x-cache: miss"),
        "{}",
        answers[0]
    );
    assert!(lower(1).contains("x-cache: hit"), "{}", answers[1]);
    assert!(
        answers[2].starts_with("\"t\",\"revenue\""),
        "{}",
        answers[2]
    );
    assert!(answers[3].lines().count() == 5, "{}", answers[3]);
    assert!(answers[4].contains("\"users\""), "{}", answers[4]);
    assert!(answers[5].contains("range_too_wide"), "{}", answers[5]);
    assert!(answers[6].contains("unauthorized"), "{}", answers[6]);
    assert_eq!(answers[7].lines().count(), 3, "{}", answers[7]);
    assert!(
        answers[8].contains("dashcache_memory_answers_bytes"),
        "{}",
        answers[8]
    );
    assert!(
        answers[9].contains("\"configured\":false"),
        "{}",
        answers[9]
    );
    assert!(
        !called.exists(),
        "a server binary was called: {}",
        std::fs::read_to_string(&called).unwrap_or_default()
    );
}

/// `/status.json` as an operator reads it (a tenant's key gets 403 there).
async fn status_json(proxy: &Proxy, operator: &str) -> serde_json::Value {
    let reply = proxy
        .get_with("/status.json", &[("x-api-key", operator)])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// Waits (bounded) until the proxy's metric `series` reaches `at_least`.
async fn metric_at_least(proxy: &Proxy, series: &str, at_least: f64) {
    for _ in 0..300 {
        if proxy.metric(series).await >= at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{series} never reached {at_least}; log:\n{}", proxy.log());
}

#[tokio::test]
async fn without_redis_the_proxy_runs_a_warm_up_job_that_fills_its_cache() {
    let proxy = Proxy::start_with(single_host(ProxyOptions {
        extra: "[[warmup]]\nname = \"soon\"\ncron = \"*/2 * * * * *\"\nquery = \"revenue\"\n\
                tenants = [\"acme\"]\nparams = [{ from = \"today-7d\", to = \"today\", granularity = \"day\" }]\n"
            .into(),
        ..Default::default()
    }))
    .await;
    assert!(
        proxy.log().contains("warm-up jobs run in this proxy"),
        "{}",
        proxy.log()
    );
    // No request has asked for it: only the job can have computed it.
    metric_at_least(
        &proxy,
        "dashcache_warmup_runs_total{job=\"soon\",outcome=\"ok\"}",
        1.0,
    )
    .await;
    assert!(
        proxy
            .metric("dashcache_warmup_keys_total{job=\"soon\",outcome=\"warmed\"}")
            .await
            >= 1.0
    );
    let reply = proxy
        .get("/v1/query/revenue?from=today-7d&to=today&granularity=day")
        .await;
    assert_eq!(
        (reply.status, reply.cache()),
        (200, "HIT"),
        "{}",
        proxy.log()
    );
    // The run is in the history /status reads.
    let ops = proxy.add_key("operator", "ops");
    let status = status_json(&proxy, &ops).await;
    let runs = status["warmup"]["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(runs.iter().any(|r| r["job"] == "soon"), "{status}");
}

#[tokio::test]
async fn without_redis_a_popular_job_reads_the_counts_kept_in_memory() {
    let proxy = Proxy::start_with(single_host(ProxyOptions {
        set: vec![("popularity", "flush_interval", "100ms".into())],
        // Longer than the answer's TTL: every popular answer is refreshed.
        extra: "[[warmup]]\nname = \"popular\"\ncron = \"*/2 * * * * *\"\n\
                popular = { top = 10, hours = 1 }\nrefresh_ahead = \"1h\"\n"
            .into(),
        ..Default::default()
    }))
    .await;
    let first = proxy.get(REVENUE).await;
    assert_eq!(first.cache(), "MISS");
    metric_at_least(
        &proxy,
        "dashcache_warmup_keys_total{job=\"popular\",outcome=\"warmed\"}",
        1.0,
    )
    .await;
    assert_eq!(proxy.get(REVENUE).await.cache(), "HIT");
}
