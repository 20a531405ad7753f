//! The ClickHouse-compatible endpoint (`[clickhouse_http]`) against the real ClickHouse:
//! raw HTTP as curl sends it, the real client libraries (clickhouse-connect,
//! @clickhouse/client), queries counted in ClickHouse's own `system.query_log`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::harness::{Proxy, ProxyOptions, Reply, TempDir, clickhouse_url, root};

/// A POST (or GET when `body` is `None`) with exactly these headers.
pub(crate) async fn send(url: &str, headers: &[(&str, &str)], body: Option<&str>) -> Reply {
    let mut builder = match body {
        Some(_) => http::Request::post(url),
        None => http::Request::get(url),
    };
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .expect("request");
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.request(req).await.expect("server answers");
    let status = response.status().as_u16();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("{e}"));
    Reply {
        status,
        version,
        headers,
        body,
    }
}

pub(crate) fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// `sql` through the proxy's endpoint with its key (user = the key's label).
async fn through(proxy: &Proxy, params: &str, sql: &str, extra: &[(&str, &str)]) -> Reply {
    let auth = basic("test", &proxy.key);
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    send(&format!("{}/?{params}", proxy.ch_base), &headers, Some(sql)).await
}

/// `sql` to ClickHouse directly, as user `default`.
async fn direct(params: &str, sql: &str) -> Reply {
    send(&format!("{}/?{params}", clickhouse_url()), &[], Some(sql)).await
}

/// Statements ClickHouse started whose text contains `marker` (from
/// `system.query_log`, after flushing it).
async fn started(marker: &str) -> u64 {
    let flush = direct("", "SYSTEM FLUSH LOGS").await;
    assert_eq!(flush.status, 200, "{}", flush.text());
    let count = direct(
        "",
        &format!(
            "SELECT count() FROM system.query_log WHERE type = 1 AND position(query, '{marker}') > 0 AND position(query, 'query_log') = 0"
        ),
    )
    .await;
    count.text().trim().parse().expect("a count")
}

fn marker() -> String {
    format!("m{:016x}", rand::random::<u64>())
}

#[tokio::test]
async fn ping_head_options_and_refusals_answer_like_clickhouse() {
    let proxy = Proxy::start().await;
    let ping = send(&format!("{}/ping", proxy.ch_base), &[], None).await;
    assert_eq!((ping.status, ping.text().as_str()), (200, "Ok.\n"));
    let root = send(&format!("{}/", proxy.ch_base), &[], None).await;
    assert_eq!((root.status, root.text().as_str()), (200, "Ok.\n"));

    // No credentials, a wrong key, a user that is not the key's: 516.
    let anonymous = send(&format!("{}/?query=SELECT+1", proxy.ch_base), &[], None).await;
    let wrong = basic("test", "dck_wrong");
    let wrong = send(
        &format!("{}/?query=SELECT+1", proxy.ch_base),
        &[("authorization", wrong.as_str())],
        None,
    )
    .await;
    let other_user = send(
        &format!(
            "{}/?query=SELECT+1&user=someone&password={}",
            proxy.ch_base, proxy.key
        ),
        &[],
        None,
    )
    .await;
    for reply in [&anonymous, &wrong, &other_user] {
        assert_eq!(reply.status, 403, "{}", reply.text());
        assert_eq!(reply.header("x-clickhouse-exception-code"), Some("516"));
        assert!(
            reply.text().starts_with("Code: 516. DB::Exception: "),
            "{}",
            reply.text()
        );
        assert!(
            reply.text().contains("(AUTHENTICATION_FAILED)"),
            "{}",
            reply.text()
        );
    }
    // The same key as X-ClickHouse-User/-Key and as URL parameters works.
    let headers = send(
        &format!("{}/?query=SELECT+1", proxy.ch_base),
        &[
            ("x-clickhouse-user", "test"),
            ("x-clickhouse-key", proxy.key.as_str()),
        ],
        None,
    )
    .await;
    assert_eq!((headers.status, headers.text().as_str()), (200, "1\n"));
    let params = send(
        &format!(
            "{}/?query=SELECT+1&user=test&password={}",
            proxy.ch_base, proxy.key
        ),
        &[],
        None,
    )
    .await;
    assert_eq!((params.status, params.text().as_str()), (200, "1\n"));

    // A tier without the endpoint: 497.
    let free = proxy.add_key("free", "acme");
    let denied = send(
        &format!("{}/?query=SELECT+1", proxy.ch_base),
        &[("authorization", basic("test", &free).as_str())],
        None,
    )
    .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.header("x-clickhouse-exception-code"), Some("497"));

    // Writes and second statements never reach ClickHouse.
    let marker = marker();
    for (sql, code) in [
        (
            format!(
                "INSERT INTO demo.events_daily SELECT * FROM demo.events_daily WHERE country = '{marker}'"
            ),
            "164",
        ),
        (
            format!("/* SELECT */ DROP TABLE IF EXISTS default.{marker}"),
            "164",
        ),
        (
            format!("SELECT 1; DROP TABLE IF EXISTS default.{marker}"),
            "62",
        ),
    ] {
        let reply = through(&proxy, "", &sql, &[]).await;
        assert_eq!(
            reply.header("x-clickhouse-exception-code"),
            Some(code),
            "{sql}"
        );
        assert_eq!(reply.status, if code == "164" { 500 } else { 400 }, "{sql}");
    }
    assert_eq!(started(&marker).await, 0);

    let head = send(&format!("{}/", proxy.ch_base), &[], None).await;
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn answers_are_byte_identical_to_clickhouse_s_and_hits_replay_its_headers() {
    let proxy = Proxy::start().await;
    let sql = "SELECT country, plan, count() AS c, round(sum(revenue), 2) AS r FROM demo.events \
               GROUP BY country, plan ORDER BY country, plan";
    for format in [
        "TabSeparated",
        "TabSeparatedWithNamesAndTypes",
        "CSVWithNames",
        "JSONEachRow",
        "JSONCompact",
        "JSON",
        "Pretty",
        "Native",
        "RowBinary",
        "Values",
    ] {
        let statement = format!("{sql} FORMAT {format}");
        let clickhouse = direct("", &statement).await;
        assert_eq!(clickhouse.status, 200, "{format}: {}", clickhouse.text());
        let miss = through(&proxy, "", &statement, &[]).await;
        let hit = through(&proxy, "", &statement, &[]).await;
        assert_eq!(miss.status, 200, "{format}: {}", miss.text());
        assert_eq!((miss.cache(), hit.cache()), ("MISS", "HIT"), "{format}");
        let (miss_body, hit_body) = (miss.body.clone().unwrap(), hit.body.clone().unwrap());
        assert_eq!(miss_body, hit_body, "{format}: a hit is the stored bytes");
        if format == "JSON" || format == "JSONCompact" {
            // Only the run's statistics (elapsed time) differ between two runs.
            let strip = |body: &Bytes| {
                let mut value: serde_json::Value = serde_json::from_slice(body).unwrap();
                value.as_object_mut().unwrap().remove("statistics");
                value
            };
            assert_eq!(
                strip(&miss_body),
                strip(clickhouse.body.as_ref().unwrap()),
                "{format}"
            );
        } else {
            assert_eq!(&miss_body, clickhouse.body.as_ref().unwrap(), "{format}");
        }
        for reply in [&miss, &hit] {
            for name in ["content-type", "x-clickhouse-server-display-name"] {
                assert_eq!(
                    reply.header(name),
                    clickhouse.header(name),
                    "{format}: {name}"
                );
            }
            assert!(reply.header("x-clickhouse-query-id").is_some(), "{format}");
        }
    }
    // The query id is this request's, on hits too.
    let hit = through(
        &proxy,
        "query_id=mine-1",
        &format!("{sql} FORMAT JSON"),
        &[],
    )
    .await;
    assert_eq!(
        (hit.cache(), hit.header("x-clickhouse-query-id")),
        ("HIT", Some("mine-1"))
    );

    // Compression when the client asks for it (enable_http_compression=1), on a hit.
    let gzip = through(
        &proxy,
        "enable_http_compression=1",
        &format!("{sql} FORMAT TabSeparated"),
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(
        (gzip.cache(), gzip.header("content-encoding")),
        ("HIT", Some("gzip"))
    );
    let mut plain = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&gzip.body.clone().unwrap()[..]),
        &mut plain,
    )
    .unwrap();
    let clickhouse = direct("", &format!("{sql} FORMAT TabSeparated")).await;
    assert_eq!(plain, clickhouse.body.unwrap());

    // Errors pass through with ClickHouse's status and code, and are not cached.
    for (sql, status, code) in [
        ("SELECT 1 +", 400, "62"),
        ("SELECT * FROM demo.no_such_table", 404, "60"),
    ] {
        let clickhouse = direct("", sql).await;
        for _ in 0..2 {
            let reply = through(&proxy, "", sql, &[]).await;
            assert_eq!(reply.status, status, "{sql}: {}", reply.text());
            assert_eq!(reply.status, clickhouse.status, "{sql}");
            assert_eq!(reply.header("x-clickhouse-exception-code"), Some(code));
            assert_eq!(reply.text(), clickhouse.text(), "{sql}");
        }
    }
}

#[tokio::test]
async fn a_second_identical_query_is_a_hit_that_clickhouse_never_sees() {
    let proxy = Proxy::start().await;
    let marker = marker();
    let sql = format!("SELECT '{marker}' AS m, count() FROM demo.events_daily");
    let first = through(&proxy, "log_queries=1", &sql, &[]).await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "MISS"),
        "{}",
        first.text()
    );
    assert_eq!(started(&marker).await, 1);
    let second = through(&proxy, "log_queries=1", &sql, &[]).await;
    assert_eq!(second.cache(), "HIT");
    assert_eq!(second.body.unwrap(), first.body.unwrap());
    assert_eq!(
        started(&marker).await,
        1,
        "the hit sent nothing to ClickHouse"
    );
}

#[tokio::test]
async fn connection_details_share_an_entry_and_format_or_settings_do_not() {
    let proxy = Proxy::start().await;
    let sql =
        "SELECT country, count() AS c FROM demo.events_daily GROUP BY country ORDER BY country";
    let first = through(
        &proxy,
        "query_id=a1&session_id=s1",
        sql,
        &[("user-agent", "grafana/11")],
    )
    .await;
    assert_eq!(first.cache(), "MISS");
    for (params, headers) in [
        (
            "query_id=a2&session_id=s2&session_timeout=60",
            vec![("user-agent", "superset")],
        ),
        (
            "wait_end_of_query=1&send_progress_in_http_headers=1",
            vec![("x-dashboard-uid", "d1")],
        ),
        ("", vec![("x-grafana-panel-id", "7")]),
    ] {
        let reply = through(&proxy, params, &format!("-- panel\n{sql}  \n"), &headers).await;
        assert_eq!(reply.cache(), "HIT", "{params} {headers:?}");
        assert_eq!(reply.body.unwrap(), first.body.clone().unwrap());
    }
    for (params, statement, headers) in [
        ("", format!("{sql} FORMAT CSV"), vec![]),
        ("default_format=CSV", sql.to_owned(), vec![]),
        (
            "",
            sql.to_owned(),
            vec![("x-clickhouse-format", "JSONEachRow")],
        ),
        ("max_threads=1", sql.to_owned(), vec![]),
        ("extremes=1", sql.to_owned(), vec![]),
    ] {
        let reply = through(&proxy, params, &statement, &headers).await;
        assert_eq!(reply.status, 200, "{params} {statement}: {}", reply.text());
        assert_eq!(reply.cache(), "MISS", "{params} {statement} {headers:?}");
    }
    // no_cache=1 passes through.
    let bypass = through(&proxy, "no_cache=1", sql, &[]).await;
    assert_eq!((bypass.status, bypass.cache()), (200, "BYPASS"));
    assert_eq!(bypass.body.unwrap(), first.body.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_cold_queries_over_two_proxies_run_once() {
    let dir = TempDir::new("chhttp-two");
    let shared = |prefix: &str| ProxyOptions {
        key_prefix: Some(prefix.to_owned()),
        store_url: Some(format!("sqlite://{}/control.db", dir.0.display())),
        ..Default::default()
    };
    let prefix = format!("chtwo-{}", marker());
    let a = Arc::new(Proxy::start_with(shared(&prefix)).await);
    let b = Arc::new(Proxy::start_with(shared(&prefix)).await);
    let marker = marker();
    // Long enough that the requests overlap it; a late one is a HIT, not a query.
    let sql = Arc::new(format!("SELECT '{marker}' AS m, sleep(1) AS s"));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let proxy = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (sql, key) = (sql.clone(), a.key.clone());
        tasks.push(tokio::spawn(async move {
            let auth = basic("test", &key);
            send(
                &format!("{}/?log_queries=1", proxy.ch_base),
                &[("authorization", auth.as_str())],
                Some(&sql),
            )
            .await
        }));
    }
    let mut statuses = HashMap::new();
    let mut bodies = std::collections::HashSet::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        *statuses.entry(reply.cache().to_owned()).or_insert(0) += 1;
        bodies.insert(reply.body.unwrap());
    }
    assert_eq!(bodies.len(), 1, "{statuses:?}");
    assert_eq!(started(&marker).await, 1, "{statuses:?}");
}

/// Two tiers whose keys run as ClickHouse users `bi_a` (reads `demo`) and
/// `bi_b` (no `demo`; its profile adds `extremes` to JSON), written by
/// `scripts/services` into ClickHouse's users.xml.
fn two_tenants() -> ProxyOptions {
    let tier = |user: &str| {
        toml::Value::Table(
            [
                ("requests_per_minute".into(), 6000.into()),
                ("burst".into(), 1000.into()),
                ("clickhouse_http".into(), true.into()),
                ("clickhouse_user".into(), user.into()),
            ]
            .into_iter()
            .collect(),
        )
    };
    ProxyOptions {
        set: vec![
            ("tier", "bi_a", tier("bi_a")),
            ("tier", "bi_b", tier("bi_b")),
        ],
        tier: "bi_a",
        env: vec![
            ("DASHCACHE_CLICKHOUSE_PASSWORD_BI_A", "bi-a-secret".into()),
            ("DASHCACHE_CLICKHOUSE_PASSWORD_BI_B", "bi-b-secret".into()),
        ],
        ..Default::default()
    }
}

#[tokio::test]
async fn keys_mapped_to_different_clickhouse_users_never_share_answers() {
    let proxy = Proxy::start_with(two_tenants()).await;
    let key_a = proxy.key.clone();
    let key_b = proxy.add_key("bi_b", "globex");
    let as_key = |key: String, sql: &'static str| {
        let url = format!("{}/", proxy.ch_base);
        async move {
            send(
                &url,
                &[("authorization", basic("test", &key).as_str())],
                Some(sql),
            )
            .await
        }
    };
    // Only bi_a may read demo: bi_b gets ClickHouse's refusal, before and after bi_a's answer is cached.
    let counted = "SELECT count() AS c FROM demo.events_daily FORMAT JSONEachRow";
    let before = as_key(key_b.clone(), counted).await;
    let a1 = as_key(key_a.clone(), counted).await;
    let a2 = as_key(key_a.clone(), counted).await;
    let after = as_key(key_b.clone(), counted).await;
    assert_eq!(
        (a1.status, a1.cache(), a2.cache()),
        (200, "MISS", "HIT"),
        "{}",
        a1.text()
    );
    for b in [&before, &after] {
        assert_eq!(b.status, 500, "{}", b.text());
        assert!(
            b.text()
                .contains("Access denied to database demo for user bi_b"),
            "{}",
            b.text()
        );
        assert_ne!(b.cache(), "HIT");
    }
    // The same SQL both may run: each user's own answer, each cached for that user only.
    let shared = "SELECT 1 AS x FORMAT JSON";
    let a1 = as_key(key_a.clone(), shared).await;
    let b1 = as_key(key_b.clone(), shared).await;
    let a2 = as_key(key_a, shared).await;
    let b2 = as_key(key_b, shared).await;
    assert_eq!(
        (a1.cache(), b1.cache(), a2.cache(), b2.cache()),
        ("MISS", "MISS", "HIT", "HIT")
    );
    assert!(!a1.text().contains("\"extremes\""), "{}", a1.text());
    assert!(b1.text().contains("\"extremes\""), "{}", b1.text());
    assert_eq!(a2.body.unwrap(), a1.body.unwrap());
    assert_eq!(b2.body.unwrap(), b1.body.unwrap());
}

#[tokio::test]
async fn an_answer_that_fails_mid_stream_is_a_broken_stream_and_not_stored() {
    // No rules: statements on system tables are cached too, so this one goes through a fill.
    let proxy = Proxy::start_with(ProxyOptions {
        set: vec![("clickhouse_http", "cache", toml::Value::Array(Vec::new()))],
        ..Default::default()
    })
    .await;
    // ~1.5 MB of rows, then an exception: ClickHouse has sent 200 by then.
    // (18.16 refuses a SETTINGS clause under readonly=1; URL settings are fine.)
    let sql = "SELECT number, toString(number) AS s, throwIf(number = 150000) AS boom \
               FROM system.numbers LIMIT 200000";
    for expected in ["MISS", "MISS"] {
        let reply = through(&proxy, "max_block_size=1000", sql, &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.cache(), expected, "a failed answer is never stored");
        assert!(
            reply.body.is_err(),
            "the client sees a cut transfer, not a clean end"
        );
    }
    assert_eq!(
        proxy
            .metric("dashcache_cache_stores_total{result=\"stored\"}")
            .await,
        0.0
    );
    // The same through a pass-through (no_cache=1).
    let reply = through(&proxy, "no_cache=1&max_block_size=1000", sql, &[]).await;
    assert_eq!((reply.status, reply.cache()), (200, "BYPASS"));
    assert!(reply.body.is_err());
}

/// The client test runner's programs: a Python with clickhouse-connect and
/// node with @clickhouse/client, installed by `scripts/clients`.
fn clients() -> (PathBuf, PathBuf) {
    let python = root().join(".services/clients-venv/bin/python");
    let modules = root().join("tests/clients/node_modules/@clickhouse/client");
    assert!(
        python.exists() && modules.exists(),
        "client libraries missing: run scripts/clients (scripts/test does)"
    );
    (python, root().join("tests/clients"))
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("run a client");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn real_client_libraries_get_the_same_through_dashcache_as_from_clickhouse() {
    let (python, dir) = clients();
    let proxy = Proxy::start().await;
    let url = clickhouse_url();
    let (host, port) = url
        .trim_start_matches("http://")
        .split_once(':')
        .expect("host:port");
    let ch_port = proxy.ch_base.rsplit(':').next().unwrap().to_owned();
    let connect = |host: &str, port: &str, user: &str, password: &str| {
        run(Command::new(&python)
            .arg(dir.join("connect.py"))
            .args([host, port, user, password]))
    };
    let node = |url: &str, user: &str, password: &str| {
        run(Command::new("node")
            .arg(dir.join("client.mjs"))
            .args([url, user, password]))
    };
    let direct_py = connect(host, port, "default", "");
    let through_py = connect("127.0.0.1", &ch_port, "test", &proxy.key);
    assert_eq!(through_py, direct_py, "clickhouse-connect");
    assert!(direct_py.contains("\"error_code\": 164"), "{direct_py}");
    let direct_js = node(&url, "default", "");
    let through_js = node(&proxy.ch_base, "test", &proxy.key);
    assert_eq!(through_js, direct_js, "@clickhouse/client");
    for code in [62, 60, 159, 164] {
        assert!(
            direct_js.contains(&format!("\"error_code\":{code}")),
            "{direct_js}"
        );
    }
    // Run again: now answered from the cache, still the same.
    assert_eq!(
        connect("127.0.0.1", &ch_port, "test", &proxy.key),
        direct_py
    );
    assert!(
        proxy
            .metric("dashcache_cache_requests_total{result=\"HIT\"}")
            .await
            > 0.0
    );
}

/// `sql` through the endpoint until `X-Cache` is `want` (bounded; no guess at timing).
async fn until_cache(proxy: &Proxy, sql: &str, want: &str) -> Reply {
    for _ in 0..400 {
        let reply = through(proxy, "", sql, &[]).await;
        if reply.cache() == want {
            return reply;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("never {want}; log:\n{}", proxy.log());
}

#[tokio::test]
async fn with_clickhouse_unreachable_stale_answers_are_served_and_fresh_ones_resume_after() {
    let mut relay = crate::harness::Relay::start().await;
    let rule = toml::Value::Table(
        [
            ("pattern".into(), "brief_marker".into()),
            ("ttl".into(), "1s".into()),
            ("grace".into(), "1h".into()),
        ]
        .into_iter()
        .collect(),
    );
    let proxy = Proxy::start_with(ProxyOptions {
        clickhouse_url: relay.url(),
        set: vec![
            ("clickhouse_http", "cache", toml::Value::Array(vec![rule])),
            ("cache", "xfetch_beta", 0.0.into()),
            ("cache", "early_refresh", 0.0.into()),
        ],
        ..Default::default()
    })
    .await;
    let sql = "SELECT 'brief_marker' AS m, count() AS n FROM demo.events_daily FORMAT JSONEachRow";
    let first = through(&proxy, "", sql, &[]).await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "MISS"),
        "{}",
        first.text()
    );

    relay.cut();
    let stale = until_cache(&proxy, sql, "STALE").await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.body.clone().unwrap(), first.body.clone().unwrap());
    assert_eq!(stale.header("content-type"), first.header("content-type"));
    // Nothing stored for another statement: ClickHouse's network error shape, retry later.
    let uncached = through(&proxy, "", "SELECT 2 AS brief_other", &[]).await;
    assert_eq!(uncached.status, 503, "{}", uncached.text());
    assert_eq!(uncached.header("x-clickhouse-exception-code"), Some("210"));
    assert!(uncached.header("retry-after").is_some());

    relay.restore().await;
    let fresh = until_cache(&proxy, sql, "HIT").await;
    assert_eq!(fresh.body.unwrap(), first.body.unwrap());
}
