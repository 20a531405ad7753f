//! Streamed exports: equal to ClickHouse's own answer, bounded memory,
//! cancellation, tier limits and how truncation shows.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use http_body_util::BodyExt;

use crate::harness::{Proxy, ProxyOptions, clickhouse, client};

/// Line count and an order-independent checksum (ClickHouse streams rows
/// of parallel threads in no fixed order).
fn digest(body: &[u8]) -> (usize, u64) {
    let mut lines = 0;
    let mut sum = 0u64;
    for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let mut h = DefaultHasher::new();
        line.hash(&mut h);
        sum = sum.wrapping_add(h.finish());
        lines += 1;
    }
    (lines, sum)
}

const RANGE: &str = "from=today-25d&to=today";

fn direct_sql() -> String {
    "SELECT ts, user_id, country, plan, event, revenue FROM demo.events \
     WHERE tenant_id = 'acme' AND ts >= toDateTime(toDate(now()) - 25) AND ts < toDateTime(toDate(now()))"
        .to_string()
}

#[tokio::test]
async fn a_million_row_export_equals_what_clickhouse_returns_directly() {
    let proxy = Proxy::start().await;
    for (format, clickhouse_format, content_type) in [
        ("ndjson", "JSONEachRow", "application/x-ndjson"),
        ("csv", "CSVWithNames", "text/csv; charset=utf-8"),
    ] {
        let reply = proxy
            .get(&format!("/v1/export/events?{RANGE}&format={format}"))
            .await;
        assert_eq!(reply.status, 200, "{format}");
        assert_eq!(reply.header("content-type"), Some(content_type));
        assert_eq!(
            reply.header("content-disposition"),
            Some(format!("attachment; filename=\"events.{format}\"").as_str())
        );
        let ours = digest(reply.body.as_ref().expect("complete body"));
        let direct = clickhouse(&format!("{} FORMAT {clickhouse_format}", direct_sql())).await;
        let theirs = digest(direct.as_bytes());
        assert!(theirs.0 >= 1_000_000, "the range holds {} rows", theirs.0);
        assert_eq!(ours, theirs, "{format}");
    }
    assert_eq!(
        proxy
            .metric("dashcache_exports_ended_total{result=\"complete\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn tsv_by_accept_header_and_tiers_without_exports_are_refused() {
    let proxy = Proxy::start().await;
    let auth = format!("Bearer {}", proxy.key);
    let reply = proxy
        .get_with(
            "/v1/export/events?from=today-1d&to=today&country=DE&event=purchase",
            &[
                ("authorization", &auth),
                ("accept", "text/tab-separated-values"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("text/tab-separated-values; charset=utf-8")
    );
    assert!(
        reply
            .text()
            .starts_with("ts\tuser_id\tcountry\tplan\tevent\trevenue\n")
    );
    assert!(
        reply
            .text()
            .lines()
            .skip(1)
            .all(|l| l.contains("\tDE\t") && l.contains("\tpurchase\t"))
    );

    let bad = proxy
        .get("/v1/export/events?from=today-100d&to=today&format=json")
        .await;
    assert_eq!(bad.status, 422);
    let kinds: Vec<_> = bad.json()["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["type"].clone())
        .collect();
    assert!(
        kinds.contains(&"range_too_wide".into()) && kinds.contains(&"enum".into()),
        "{kinds:?}"
    );

    // No wait for a reload: a key the proxy does not know yet makes it read
    // the store, where a key minted before the request already is.
    let free = proxy.add_key("free", "acme");
    let reply = proxy
        .get_with(
            "/v1/export/events?from=today-1d&to=today",
            &[("authorization", &format!("Bearer {free}"))],
        )
        .await;
    assert_eq!(reply.status, 403, "{}", reply.text());
}

/// Reads the head and the first chunk of an export, then hangs up.
async fn abandon_after_first_chunk(proxy: &Proxy, path: &str) -> String {
    let req = http::Request::get(format!("{}{path}", proxy.base))
        .header("authorization", format!("Bearer {}", proxy.key))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = client().request(req).await.expect("export starts");
    assert_eq!(response.status(), 200);
    let query_id = response.headers()["x-dashcache-query-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.into_body();
    let first = body
        .frame()
        .await
        .expect("a first chunk")
        .expect("readable");
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    drop(body);
    query_id
}

/// Exports read ClickHouse on a connection of their own (`direct`): one
/// whose replica cannot be reached moves to another before its first byte,
/// like every query.
#[tokio::test]
async fn an_export_whose_replica_is_down_moves_to_another() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let replica = |url: String| {
        let mut table = toml::Table::new();
        table.insert("url".into(), url.into());
        toml::Value::Table(table)
    };
    let proxy = Proxy::start_with(ProxyOptions {
        set: vec![
            (
                "clickhouse",
                "export_replicas",
                toml::Value::Array(vec![
                    replica(format!("http://127.0.0.1:{dead}")),
                    replica(crate::harness::clickhouse_url()),
                ]),
            ),
            // Only a query that finds it unreachable ejects the dead one.
            ("clickhouse", "eject_after", 1_000_000.into()),
        ],
        ..Default::default()
    })
    .await;
    let path = "/v1/export/events?from=today-2d&to=today&format=ndjson";
    // Replicas are taken in turn: of two exports, one goes to the dead one first.
    let mut digests = Vec::new();
    for _ in 0..2 {
        let reply = proxy.get(path).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        digests.push(digest(reply.body.as_ref().expect("complete export")));
    }
    assert!(digests[0].0 > 1000, "{} rows", digests[0].0);
    assert_eq!(digests[0], digests[1]);
    assert!(
        proxy.metric("dashcache_clickhouse_failovers_total").await >= 1.0,
        "no export was moved"
    );
}

#[tokio::test]
async fn a_client_that_hangs_up_leaves_no_query_running() {
    let proxy = Proxy::start().await;
    let query_id = abandon_after_first_chunk(
        &proxy,
        "/v1/export/events?from=today-90d&to=today&format=csv",
    )
    .await;
    let mut gone = false;
    for _ in 0..100 {
        let running = clickhouse(&format!(
            "SELECT count() FROM system.processes WHERE query_id = '{query_id}'"
        ))
        .await;
        if running.trim() == "0" {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "query {query_id} still runs in ClickHouse");
    // No wait needed: the proxy counts the cancellation before it sends the
    // KILL (the export stream's drop runs before its kill guard's).
    assert_eq!(
        proxy
            .metric("dashcache_exports_ended_total{result=\"cancelled\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_slow_client_does_not_grow_the_proxys_memory() {
    let proxy = Proxy::start().await;
    let req = http::Request::get(format!(
        "{}/v1/export/events?from=today-90d&to=today",
        proxy.base
    ))
    .header("authorization", format!("Bearer {}", proxy.key))
    .body(http_body_util::Empty::<bytes::Bytes>::new())
    .unwrap();
    let response = client().request(req).await.unwrap();
    let mut body = response.into_body();
    let mut read = 0usize;
    let before = proxy.rss_kib();
    // Read ~4 MB slowly while ClickHouse could send hundreds: the proxy must
    // not buffer what the client has not taken. The pauses give a proxy that
    // buffered time to show it; nothing marks "it would have by now", so they
    // stay. A slower machine sends fewer bytes meanwhile, which can only make
    // this pass more easily, never fail: the bound is on memory, not time.
    while read < 4 << 20 {
        let frame = body.frame().await.unwrap().unwrap();
        read += frame.data_ref().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = proxy.rss_kib();
    drop(body);
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

fn limited(rows: u64) -> ProxyOptions {
    let tier = format!(
        "requests_per_minute = 600\nburst = 100\nqueries = ['*']\nexports = ['*']\nexport_max_rows = {rows}"
    );
    ProxyOptions {
        set: vec![("tier", "limited", toml::Value::Table(tier.parse().unwrap()))],
        ..Default::default()
    }
}

#[tokio::test]
async fn limits_hit_before_the_first_byte_are_a_clear_413() {
    let proxy = Proxy::start_with(limited(1000)).await;
    // Works at once, without waiting for a reload (see the TSV test).
    let key = proxy.add_key("limited", "acme");
    let reply = proxy
        .get_with(
            "/v1/export/events?from=today-20d&to=today",
            &[("authorization", &format!("Bearer {key}"))],
        )
        .await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.json()["type"], "export_too_large");
}

#[tokio::test]
async fn limits_hit_mid_stream_end_ndjson_with_an_error_line_and_cut_csv() {
    let proxy = Proxy::start_with(limited(300_000)).await;
    // Works at once, without waiting for a reload (see the TSV test).
    let key = proxy.add_key("limited", "acme");
    let auth = format!("Bearer {key}");
    let ndjson = proxy
        .get_with(
            "/v1/export/events?from=today-60d&to=today&format=ndjson",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(ndjson.status, 200);
    let text = ndjson.text();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 1000, "rows before the limit are delivered");
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "limit_exceeded", "{last}");
    assert!(
        lines[..lines.len() - 1]
            .iter()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["ts"].is_string())
    );
    assert!(!text.contains("DB::Exception"));

    let csv = proxy
        .get_with(
            "/v1/export/events?from=today-60d&to=today&format=csv",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(csv.status, 200);
    assert!(csv.body.is_err(), "a truncated CSV must not look complete");
    assert_eq!(
        proxy
            .metric("dashcache_exports_ended_total{result=\"truncated\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("dashcache_exports_ended_total{result=\"failed\"}")
            .await,
        1.0
    );
}
