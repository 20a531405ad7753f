//! `[clickhouse] engine = "embedded"`: the proxy answering from ClickHouse's
//! engine in its own process (chDB), with no ClickHouse server.
//!
//! Each test starts a proxy on its own data path with the library
//! `scripts/chdb` fetched (skipped, saying so, without it). The queries read
//! `numbers()`, the same data on every engine, so answers can be compared
//! with the 18.16 server's.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};

use crate::harness::{Proxy, ProxyOptions, TempDir, clickhouse, client, config_text, root};

/// The proxy on the embedded engine with `connections`, extra queries and
/// an export `numbers` streaming `export_sql`; `None` without the library.
async fn embedded_proxy(
    dir: &TempDir,
    connections: i64,
    queries: Vec<(String, String, String)>,
    export_sql: &str,
) -> Option<Proxy> {
    let options = embedded_options(dir, connections, queries, export_sql)?;
    Some(Proxy::start_with(options).await)
}

fn embedded_options(
    dir: &TempDir,
    connections: i64,
    queries: Vec<(String, String, String)>,
    export_sql: &str,
) -> Option<ProxyOptions> {
    let Some(library) = crate::compat::library() else {
        eprintln!("SKIPPED embedded::: no chDB library (run scripts/chdb)");
        return None;
    };
    let export = dir.0.join("numbers_export.sql");
    std::fs::write(&export, export_sql).expect("write export sql");
    let mut table = toml::Table::new();
    table.insert("sql".into(), export.display().to_string().into());
    table.insert("description".into(), "numbers".into());
    Some(ProxyOptions {
        extra_queries: queries,
        set: vec![
            ("clickhouse", "engine", "embedded".into()),
            (
                "clickhouse",
                "data_path",
                dir.0.join("data").display().to_string().into(),
            ),
            (
                "clickhouse",
                "library",
                library.display().to_string().into(),
            ),
            ("clickhouse", "connections", connections.into()),
            ("export", "numbers", toml::Value::Table(table)),
        ],
        ..Default::default()
    })
}

const GROUPED: &str = "SELECT number % 7 AS k, count() AS c, sum(number) AS s, \
     round(avg(number), 2) AS a FROM numbers(100000) GROUP BY k ORDER BY k";

#[tokio::test]
async fn embedded_answers_equal_the_servers_on_the_same_data_and_are_cached() {
    let dir = TempDir::new("embedded");
    let queries = vec![("grouped".into(), GROUPED.into(), "ttl = \"5m\"".into())];
    let Some(proxy) = embedded_proxy(&dir, 2, queries, "SELECT 1").await else {
        return;
    };
    let first = proxy.get("/v1/query/grouped?format=ndjson").await;
    assert_eq!(first.status, 200, "{:?}\n{}", first.body, proxy.log());
    assert_eq!(first.cache(), "MISS");
    let server = clickhouse(&format!("{GROUPED} FORMAT JSONEachRow")).await;
    let rows = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON row"))
            .collect()
    };
    assert_eq!(rows(&first.text()), rows(&server));
    assert_eq!(rows(&server).len(), 7);
    let second = proxy.get("/v1/query/grouped?format=ndjson").await;
    assert_eq!(second.cache(), "HIT");
    // Every format answers, and readiness checks the engine.
    for format in ["json", "csv", "tsv"] {
        let reply = proxy
            .get(&format!("/v1/query/grouped?format={format}"))
            .await;
        assert_eq!(reply.status, 200, "{format}: {:?}", reply.body);
    }
    let ready = proxy.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
}

#[tokio::test]
async fn a_hundred_concurrent_cold_requests_are_one_engine_query() {
    let dir = TempDir::new("embedded");
    let slow = "SELECT count() AS c, sum(number) AS s FROM numbers(30000000)";
    let queries = vec![("slow".into(), slow.into(), "ttl = \"5m\"".into())];
    let Some(proxy) = embedded_proxy(&dir, 4, queries, "SELECT 1").await else {
        return;
    };
    let proxy = std::sync::Arc::new(proxy);
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.get("/v1/query/slow").await })
        })
        .collect();
    for request in requests {
        let reply = request.await.expect("request task");
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        1.0
    );
}

/// Reads an export's body as it streams, counting bytes, until `stop_after`
/// bytes (then drops the connection) or the end; the most RSS the proxy
/// had meanwhile.
async fn stream_export(proxy: &Proxy, path: &str, stop_after: Option<u64>) -> (u64, u64) {
    let request = http::Request::get(format!("{}{path}", proxy.base))
        .header("authorization", format!("Bearer {}", proxy.key))
        .body(Empty::new())
        .expect("request");
    let response = client().request(request).await.expect("export answers");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (mut bytes, mut peak, mut frames) = (0u64, 0u64, 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the export streams to its end");
        if let Some(data) = frame.data_ref() {
            bytes += data.len() as u64;
        }
        frames += 1;
        if frames % 1000 == 0 {
            peak = peak.max(proxy.rss_kib());
        }
        if stop_after.is_some_and(|stop| bytes >= stop) {
            break;
        }
    }
    (bytes, peak.max(proxy.rss_kib()))
}

#[tokio::test]
async fn an_export_streams_a_gigabyte_in_bounded_memory() {
    let dir = TempDir::new("embedded");
    // ~110 bytes per NDJSON line: 10 million lines are about 1.1 GB.
    let sql = "SELECT number AS n, repeat('x', 80) AS s FROM numbers(10000000)";
    let Some(proxy) = embedded_proxy(&dir, 2, Vec::new(), sql).await else {
        return;
    };
    let before = proxy.rss_kib();
    let (bytes, peak) = stream_export(&proxy, "/v1/export/numbers?format=ndjson", None).await;
    assert!(bytes > 1_000_000_000, "{bytes} bytes");
    // The engine's library is mapped once; the stream itself adds little.
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!("embedded export: {bytes} bytes, RSS {before} KiB -> peak {peak} KiB");
    assert!(
        growth_mib < 512,
        "RSS grew by {growth_mib} MiB over a 1 GB export"
    );
}

#[tokio::test]
async fn an_export_cancelled_mid_stream_stops_the_engines_query() {
    let dir = TempDir::new("embedded");
    // One connection: nothing else can run while the export's query does.
    let endless = "SELECT number AS n, toString(number) AS s FROM system.numbers";
    let queries = vec![(
        "after".into(),
        "SELECT 42 AS answer".into(),
        "ttl = \"5m\"".into(),
    )];
    let Some(proxy) = embedded_proxy(&dir, 1, queries, endless).await else {
        return;
    };
    let (bytes, _) = stream_export(&proxy, "/v1/export/numbers?format=csv", Some(1 << 20)).await;
    assert!(bytes >= 1 << 20);
    // The client left: the engine's query stops and its connection is free,
    // so the next query answers (it would wait for the endless one otherwise).
    let after = tokio::time::timeout(Duration::from_secs(120), proxy.get("/v1/query/after")).await;
    let after = after.expect("the export's query still holds the only connection");
    assert_eq!(after.status, 200, "{:?}", after.body);
    assert!(after.text().contains("42"));
}

#[tokio::test]
async fn an_export_over_its_tiers_row_limit_ends_as_a_limit_error() {
    let dir = TempDir::new("embedded");
    let sql = "SELECT number AS n, toString(number) AS s FROM numbers(3000000)";
    let Some(proxy) = embedded_proxy(&dir, 2, Vec::new(), sql).await else {
        return;
    };
    // `pro` exports at most 1,000,000 rows: the engine stops there (396).
    let key = proxy.add_key("pro", "acme");
    let auth = format!("Bearer {key}");
    let ndjson = proxy
        .get_with(
            "/v1/export/numbers?format=ndjson",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(ndjson.status, 200);
    let text = ndjson.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 1000, "rows before the limit are delivered");
    assert!(lines.len() <= 1_000_001, "{} lines", lines.len());
    let last: serde_json::Value = serde_json::from_str(lines.last().expect("lines")).expect("json");
    assert_eq!(last["error"]["type"], "limit_exceeded", "{last}");
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["n"].is_u64())),
        "every line before the error is a whole row"
    );
}

#[tokio::test]
async fn demo_data_loaded_with_the_sql_command_is_what_the_proxy_serves() {
    let dir = TempDir::new("embedded");
    let Some(options) = embedded_options(&dir, 2, Vec::new(), "SELECT 1") else {
        return;
    };
    let config = dir.0.join("load.toml");
    std::fs::write(&config, config_text(&options, &dir.0)).expect("config");
    let proxy_bin = env!("CARGO_BIN_EXE_dashcache-proxy");
    let load = std::process::Command::new(root().join("scripts/demo-data"))
        .args([
            "--embedded",
            config.to_str().expect("path"),
            "--rows",
            "50000",
        ])
        .env("DASHCACHE_PROXY_BIN", proxy_bin)
        .output()
        .expect("run scripts/demo-data");
    assert!(
        load.status.success(),
        "{}{}",
        String::from_utf8_lossy(&load.stdout),
        String::from_utf8_lossy(&load.stderr)
    );
    // The range: every day of the data, as absolute dates.
    let today = chrono::Utc::now().date_naive();
    let (from, to) = (today - chrono::Days::new(100), today + chrono::Days::new(1));
    let epoch = |d: chrono::NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp()
    };
    let expected = std::process::Command::new(proxy_bin)
        .args(["--config", config.to_str().expect("path"), "sql"])
        .arg(format!(
            "SELECT count() FROM demo.events WHERE tenant_id = 'acme' \
             AND toDateTime(toDate(ts)) >= toDateTime({}) AND toDateTime(toDate(ts)) < toDateTime({})",
            epoch(from),
            epoch(to)
        ))
        .output()
        .expect("run dashcache-proxy sql");
    assert!(
        expected.status.success(),
        "{}",
        String::from_utf8_lossy(&expected.stderr)
    );
    let expected: u64 = String::from_utf8_lossy(&expected.stdout)
        .trim()
        .parse()
        .expect("a count");
    assert!(expected > 10_000, "{expected}");

    let proxy = Proxy::start_with(options).await;
    let reply = proxy
        .get(&format!(
            "/v1/query/revenue?from={from}&to={to}&granularity=day&format=ndjson"
        ))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let events: u64 = reply
        .text()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("row")["events"]
                .as_u64()
                .expect("events")
        })
        .sum();
    assert_eq!(events, expected);
}
