//! API keys, tiers, rate limits and tenant isolation.

use std::time::Duration;

use crate::harness::{Proxy, ProxyOptions, RedisServer, patient_redis, shared_prefix};

/// A `[tier.<name>]` table for `ProxyOptions::set`.
fn tier(text: &str) -> toml::Value {
    toml::Value::Table(text.parse().expect("tier table"))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

const URL: &str = "/v1/query/top_countries?from=today-20d&to=today-2d&limit=3&format=ndjson";

#[tokio::test]
async fn keys_are_required_stored_hashed_and_revocable_without_a_restart() {
    let proxy = Proxy::start().await;
    let ok = proxy.get(URL).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    for header in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(ok.header(header).is_some(), "{header} missing");
    }
    // Also accepted as X-API-Key, even next to another Authorization scheme.
    assert_eq!(
        proxy
            .get_with(URL, &[("x-api-key", &proxy.key)])
            .await
            .status,
        200
    );
    let both = [
        ("authorization", "Basic Zm9vOmJhcg=="),
        ("x-api-key", proxy.key.as_str()),
    ];
    assert_eq!(proxy.get_with(URL, &both).await.status, 200);
    // An empty format= is "not given", like any empty parameter.
    assert_eq!(proxy.get(&format!("{URL}&format=")).await.status, 200);

    for (headers, msg) in [
        (vec![], "missing API key"),
        (
            vec![("authorization", "Bearer dck_0000")],
            "unknown API key",
        ),
        (vec![("authorization", "Basic abc")], "missing API key"),
    ] {
        let reply = proxy.get_with(URL, &headers).await;
        assert_eq!(reply.status, 401, "{}", reply.text());
        assert!(
            reply.json()["detail"].as_str().unwrap().contains(msg),
            "{}",
            reply.text()
        );
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }

    // The store holds only hashes.
    let db = std::fs::read(proxy.dir.0.join("control.db")).unwrap_or_default();
    let wal = std::fs::read(proxy.dir.0.join("control.db-wal")).unwrap_or_default();
    let secret = &proxy.key.as_bytes()[4..];
    for bytes in [&db, &wal] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "a plain key is in the store"
        );
    }

    // Revoke with the CLI: refused within a few seconds, no restart.
    let list = proxy.keys(&["list"]);
    let listing = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(!listing.contains(&proxy.key), "list must never print keys");
    let id = listing
        .lines()
        .find(|l| l.starts_with("key_"))
        .and_then(|l| l.split_whitespace().next())
        .expect("a key id in the listing")
        .to_owned();
    assert!(proxy.keys(&["revoke", &id]).status.success());
    let mut revoked = false;
    for _ in 0..50 {
        let reply = proxy.get(URL).await;
        if reply.status == 401 {
            assert!(reply.text().contains("revoked"), "{}", reply.text());
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(revoked, "the revoked key kept working");
}

#[tokio::test]
async fn expired_keys_and_queries_outside_the_tier_are_refused() {
    let proxy = Proxy::start().await;
    let out = proxy.keys(&[
        "add",
        "--tier",
        "free",
        "--tenant",
        "acme",
        "--expires",
        "1s",
    ]);
    assert!(out.status.success());
    let expiring = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let free = proxy.add_key("free", "acme");
    // Time must pass here, and a sleep never ends early: the key expired
    // 1 s after it was minted, at least 0.5 s ago however slow the machine.
    // (Both keys are in the store by now, and a key the proxy does not know
    // yet makes it read the store, so neither needs waiting for a reload.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = proxy
        .get_with(URL, &[("authorization", &bearer(&expiring))])
        .await;
    assert_eq!(reply.status, 401);
    assert!(reply.text().contains("expired"), "{}", reply.text());

    let reply = proxy
        .get_with(
            "/v1/query/active_users?window=hour",
            &[("authorization", &bearer(&free))],
        )
        .await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()["type"], "forbidden");
    assert_eq!(
        proxy
            .get_with(URL, &[("authorization", &bearer(&free))])
            .await
            .status,
        200
    );

    let unknown_tier = proxy.keys(&["add", "--tier", "platinum", "--tenant", "acme"]);
    assert!(!unknown_tier.status.success());
    let bad_tenant = proxy.keys(&["add", "--tier", "free", "--tenant", "ac'me"]);
    assert!(!bad_tenant.status.success());
}

async fn limited(
    proxies: &[&Proxy],
    key: &str,
    requests: usize,
) -> (usize, Vec<crate::harness::Reply>) {
    let mut denied = Vec::new();
    let mut allowed = 0;
    for i in 0..requests {
        let reply = proxies[i % proxies.len()]
            .get_with(URL, &[("authorization", &bearer(key))])
            .await;
        match reply.status {
            200 => allowed += 1,
            429 => denied.push(reply),
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    (allowed, denied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_shared_by_every_proxy() {
    let dir = crate::harness::TempDir::new("shared-store");
    let store = format!("sqlite://{}/control.db", dir.0.display());
    let prefix = shared_prefix();
    let options = || ProxyOptions {
        store_url: Some(store.clone()),
        key_prefix: Some(prefix.clone()),
        set: vec![
            patient_redis(),
            (
                "tier",
                "test",
                // A burst of 10, then one request a minute: nothing is given
                // back while the test runs (seconds; a minute would take a
                // machine tens of times slower), so the counts below are exact
                // (at 10 a minute, one came back every 6 s).
                tier("requests_per_minute = 1\nburst = 10\nqueries = ['*']"),
            ),
        ],
        ..Default::default()
    };
    let a = Proxy::start_with(options()).await;
    let b = Proxy::start_with(options()).await;
    let key = a.add_key("test", "acme");
    // Both proxies pick the new key up from the shared store.
    for proxy in [&a, &b] {
        let mut known = false;
        for _ in 0..50 {
            if proxy
                .get_with("/v1/query/nope", &[("authorization", &bearer(&key))])
                .await
                .status
                == 404
            {
                known = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(known, "proxy did not load the new key");
    }
    // Those two probes counted: 8 left of the burst; 8 + 5 requests → 5 denied.
    let (allowed, denied) = limited(&[&a, &b], &key, 13).await;
    assert_eq!((allowed, denied.len()), (8, 5));
    // A second key, all requests at once (checks of one key are batched):
    // still exactly the burst is allowed.
    let other = a.add_key("test", "acme");
    for proxy in [&a, &b] {
        let mut known = false;
        for _ in 0..50 {
            if proxy
                .get_with("/v1/query/nope", &[("authorization", &bearer(&other))])
                .await
                .status
                == 404
            {
                known = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(known, "proxy did not load the second key");
    }
    // Those two probes counted: 8 left of 10.
    let proxies = std::sync::Arc::new([a, b]);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (proxies, other) = (proxies.clone(), other.clone());
        tasks.push(tokio::spawn(async move {
            proxies[i % 2]
                .get_with(URL, &[("authorization", &bearer(&other))])
                .await
                .status
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        8,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        8,
        "{statuses:?}"
    );
    let [a, _b] = &*proxies;
    let last = denied.last().unwrap();
    let _ = a;
    assert_eq!(last.json()["type"], "rate_limited");
    assert!(last.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(last.header("ratelimit-remaining"), Some("0"));
    assert_eq!(last.header("ratelimit-limit"), Some("10"));
}

#[tokio::test]
async fn with_redis_down_the_local_limiter_still_limits() {
    let mut redis = RedisServer::start().await;
    let proxy = Proxy::start_with(ProxyOptions {
        redis_url: redis.url(),
        set: vec![(
            "tier",
            "test",
            // One request back a minute (was every 10 s): none comes back
            // while these few requests run, however slow the machine.
            tier("requests_per_minute = 1\nburst = 6\nqueries = ['*']"),
        )],
        ..Default::default()
    })
    .await;
    let key = proxy.add_key("test", "acme");
    redis.stop();
    let mut known = false;
    for _ in 0..50 {
        let reply = proxy
            .get_with("/v1/query/nope", &[("authorization", &bearer(&key))])
            .await;
        if reply.status == 404 {
            known = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(known, "proxy did not load the new key");
    let (allowed, denied) = limited(&[&proxy], &key, 8).await;
    assert_eq!((allowed, denied.len()), (5, 3));
}

fn rows(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn tenants_see_only_their_own_numbers_and_never_each_others_cache() {
    let proxy = Proxy::start().await;
    let globex = proxy.add_key("enterprise", "globex");
    let acme_first = proxy.get(URL).await;
    let acme_again = proxy.get(URL).await;
    assert_eq!((acme_first.cache(), acme_again.cache()), ("MISS", "HIT"));
    let other = proxy
        .get_with(URL, &[("authorization", &bearer(&globex))])
        .await;
    assert_eq!(other.status, 200);
    assert_eq!(
        other.cache(),
        "MISS",
        "globex must not get acme's cached answer"
    );
    assert_ne!(other.text(), acme_first.text());

    for (tenant, reply) in [("acme", &acme_first), ("globex", &other)] {
        let direct = crate::harness::clickhouse(&format!(
            "SELECT country, count() AS events FROM demo.events WHERE tenant_id = '{tenant}' \
             AND ts >= toDateTime(toDate(now()) - 20) AND ts < toDateTime(toDate(now()) - 2) \
             GROUP BY country ORDER BY sum(revenue) DESC, country LIMIT 3 FORMAT JSONEachRow"
        ))
        .await;
        let ours: Vec<_> = rows(&reply.text())
            .iter()
            .map(|r| (r["country"].clone(), r["events"].clone()))
            .collect();
        let theirs: Vec<_> = rows(&direct)
            .iter()
            .map(|r| (r["country"].clone(), r["events"].clone()))
            .collect();
        assert_eq!(ours, theirs, "{tenant}");
    }
}

#[tokio::test]
async fn tampering_gets_4xx_and_never_reaches_clickhouse() {
    let proxy = Proxy::start().await;
    let attempts = [
        "/v1/query/revenue?from=today-2d&to=today&tenant=globex",
        "/v1/query/revenue?from=today-2d&to=today&TENANT=globex",
        "/v1/query/revenue?from=today-2d%27%20OR%201%3D1--&to=today",
        "/v1/query/revenue?from=today-2d&to=today&granularity=day%27)%20UNION%20SELECT%201--",
        "/v1/query/revenue?from=today-2d&to=today&country=DE%27%2C%27FR",
        "/v1/query/revenue?from=today-2d&to=today&country=D%00E",
        "/v1/query/revenue?from=today-2d&to=today&country=%FF%FE",
        "/v1/query/revenue?from=today-2d&to=today&country=D%C3%89",
        "/v1/query/revenue?from=today-2d&to=today&plan=pro&plan=free",
        "/v1/query/revenue?from=today-2d&to=today&plan=pro%3Bfree",
        "/v1/query/top_countries?from=today-2d&to=today&limit=1%20OR%201",
        "/v1/query/top_countries?from=today-2d&to=today&limit=-1",
        "/v1/query/top_countries?from=today-2d&to=today&limit=99999999999999999999999",
        "/v1/query/top_countries?from=today-2d&to=today&offset=0x10",
        "/v1/query/active_users?window=hour%0A",
        "/v1/query/active_users?window[]=hour",
    ];
    for url in attempts {
        let reply = proxy.get(url).await;
        assert!(
            (400..500).contains(&reply.status),
            "{url}: {} {}",
            reply.status,
            reply.text()
        );
        assert!(reply.json()["detail"].is_array() || reply.json()["detail"].is_string());
    }
    let long = format!(
        "/v1/query/revenue?from=today-2d&to=today&country={}",
        "DE,".repeat(2000)
    );
    assert_eq!(proxy.get(&long).await.status, 422);
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        0.0
    );
}

#[tokio::test]
async fn a_cheaper_tier_accepts_older_answers() {
    let proxy = Proxy::start_with(ProxyOptions {
        extra_queries: vec![(
            "brief".into(),
            "SELECT count() AS n FROM demo.events WHERE tenant_id = {tenant}".into(),
            "ttl = \"1s\"\ngrace = \"0s\"".into(),
        )],
        set: vec![
            // No early refreshes: a cheap read would start one (the entry is
            // past its own TTL) and the full-price request would join it.
            ("cache", "xfetch_beta", 0.0.into()),
            ("cache", "early_refresh", 0.0.into()),
            ("cache", "l1_max_bytes", 0.into()),
            (
                "tier",
                "cheap",
                tier("requests_per_minute = 600\nburst = 100\nqueries = ['*']\nmin_ttl = '1h'"),
            ),
        ],
        ..Default::default()
    })
    .await;
    let cheap = proxy.add_key("cheap", "acme");
    assert_eq!(proxy.get("/v1/query/brief").await.cache(), "MISS");
    // The answer was stored before its MISS ended (fill.rs), and a sleep never
    // ends early: afterwards it is past its 1 s TTL however slow the machine.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Past the query's TTL: the cheap tier still takes the stored answer...
    let mut reply = None;
    for _ in 0..50 {
        let r = proxy
            .get_with("/v1/query/brief", &[("authorization", &bearer(&cheap))])
            .await;
        if r.status != 401 {
            reply = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = reply.expect("the cheap key was never loaded");
    assert_eq!((reply.status, reply.cache()), (200, "HIT"));
    // ...while the full-price tier gets a new one.
    assert_eq!(proxy.get("/v1/query/brief").await.cache(), "MISS");
}
