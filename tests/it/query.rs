//! The read-through path: correct answers, MISS then HIT, formats, validation.

use serde_json::Value;

use crate::harness::{Proxy, ProxyOptions, clickhouse};

/// A day-aligned range inside the demo data (the last 90 days).
const RANGE_DAYS: (i64, i64) = (10, 3);

fn day_start(days_ago: i64) -> i64 {
    let now = chrono::Utc::now().timestamp();
    (now / 86_400 - days_ago) * 86_400
}

fn rfc3339(secs: i64) -> String {
    dashcache::timeexpr::format(secs)
}

/// Rows of an NDJSON body.
fn rows(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn assert_same_numbers(ours: &[Value], direct: &[Value]) {
    assert!(!direct.is_empty(), "the demo data covers the range");
    assert_eq!(ours.len(), direct.len(), "bucket count");
    for (a, b) in ours.iter().zip(direct) {
        assert_eq!(a["t"], b["t"]);
        assert_eq!(a["events"], b["events"], "events at {}", a["t"]);
        assert_eq!(a["users"], b["users"], "users at {}", a["t"]);
        let (x, y) = (
            a["revenue"].as_f64().unwrap(),
            b["revenue"].as_f64().unwrap(),
        );
        // Answers carry money rounded to cents.
        assert!(
            (x - y).abs() <= 0.005 + 1e-9 * y.abs().max(1.0),
            "revenue at {}: {x} vs {y}",
            a["t"]
        );
    }
}

#[tokio::test]
async fn revenue_by_day_matches_a_direct_aggregate_of_events() {
    let proxy = Proxy::start().await;
    let (from, to) = (day_start(RANGE_DAYS.0), day_start(RANGE_DAYS.1));
    let reply = proxy
        .get(&format!(
            "/v1/query/revenue?from={}&to={}&granularity=day&format=ndjson",
            rfc3339(from),
            rfc3339(to)
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let direct = clickhouse(&format!(
        "SELECT toDateTime(toDate(ts)) AS t, sum(revenue) AS revenue, count() AS events, uniq(user_id) AS users \
         FROM demo.events WHERE tenant_id = 'acme' AND ts >= toDateTime({from}) AND ts < toDateTime({to}) \
         GROUP BY t ORDER BY t FORMAT JSONEachRow"
    ))
    .await;
    assert_same_numbers(&rows(&reply.text()), &rows(&direct));
    assert_eq!(rows(&reply.text()).len(), 7);
}

#[tokio::test]
async fn revenue_by_hour_with_filters_matches_a_direct_aggregate() {
    let proxy = Proxy::start().await;
    let (from, to) = (day_start(5), day_start(3));
    let reply = proxy
        .get(&format!(
            "/v1/query/revenue?from={from_s}&to={to_s}&granularity=hour&country=FR,DE&plan=pro,enterprise&format=ndjson",
            from_s = rfc3339(from),
            to_s = rfc3339(to)
        ))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let direct = clickhouse(&format!(
        "SELECT toStartOfHour(ts) AS t, sum(revenue) AS revenue, count() AS events, uniq(user_id) AS users \
         FROM demo.events WHERE tenant_id = 'acme' AND ts >= toDateTime({from}) AND ts < toDateTime({to}) \
         AND country IN ('DE', 'FR') AND plan IN ('pro', 'enterprise') \
         GROUP BY t ORDER BY t FORMAT JSONEachRow"
    ))
    .await;
    assert_same_numbers(&rows(&reply.text()), &rows(&direct));
}

#[tokio::test]
async fn a_miss_is_stored_and_the_next_request_is_a_hit_with_the_same_body() {
    let proxy = Proxy::start().await;
    let url = "/v1/query/top_countries?from=today-30d&to=today&limit=5";
    let first = proxy.get(url).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.cache(), "MISS");
    let second = proxy.get(url).await;
    assert_eq!(second.cache(), "HIT");
    assert_eq!(first.text(), second.text());
    assert!(second.header("etag").is_some());
    // The answer is ClickHouse's JSON layout with 64-bit integers as numbers.
    let json = second.json();
    assert_eq!(json["rows"], 5);
    assert!(json["meta"].is_array());
    assert!(json["data"][0]["events"].is_u64(), "{}", json["data"][0]);
    // Parameters in another order and defaults spelled out: the same key.
    let reordered = proxy
        .get("/v1/query/top_countries?limit=5&offset=0&to=today&from=today-30d")
        .await;
    assert_eq!(reordered.cache(), "HIT");
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("dashcache_cache_requests_total{result=\"HIT\"}")
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric("dashcache_cache_requests_total{result=\"MISS\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn formats_are_cached_separately_and_have_their_content_types() {
    let proxy = Proxy::start().await;
    let base = "/v1/query/revenue?from=today-3d&to=today&granularity=day";
    let json = proxy.get(base).await;
    let csv = proxy.get(&format!("{base}&format=csv")).await;
    let ndjson = proxy.get(&format!("{base}&format=ndjson")).await;
    assert_eq!(json.header("content-type"), Some("application/json"));
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    assert_eq!(ndjson.header("content-type"), Some("application/x-ndjson"));
    assert_eq!([json.cache(), csv.cache(), ndjson.cache()], ["MISS"; 3]);
    assert!(
        csv.text()
            .starts_with("\"t\",\"revenue\",\"events\",\"users\"\n"),
        "{}",
        csv.text()
    );
    let json_rows = json.json()["data"].as_array().unwrap().len();
    assert_eq!(csv.text().lines().count(), json_rows + 1);
    assert_eq!(rows(&ndjson.text()).len(), json_rows);
}

#[tokio::test]
async fn the_other_demo_queries_answer() {
    let proxy = Proxy::start().await;
    let active = proxy.get("/v1/query/active_users?window=day").await;
    assert_eq!(active.status, 200, "{}", active.text());
    assert_eq!(active.json()["rows"], 1);
    let range = format!(
        "from={}&to={}",
        rfc3339(day_start(30)),
        rfc3339(day_start(1))
    );
    let page = proxy
        .get(&format!(
            "/v1/query/top_countries?{range}&limit=2&offset=1&format=ndjson"
        ))
        .await;
    let all = proxy
        .get(&format!(
            "/v1/query/top_countries?{range}&limit=3&format=ndjson"
        ))
        .await;
    // Float sums may differ in the last bits between two runs: compare the rest.
    let key = |rows: Vec<serde_json::Value>| -> Vec<(serde_json::Value, serde_json::Value)> {
        rows.into_iter()
            .map(|r| (r["country"].clone(), r["events"].clone()))
            .collect()
    };
    assert_eq!(
        key(rows(&page.text())),
        key(rows(&all.text()))[1..].to_vec()
    );
}

/// (query string, parameter that must be named, error type)
const INVALID: &[(&str, &str, &str)] = &[
    ("to=now", "from", "missing"),
    ("from=2024-13-45&to=now", "from", "datetime_parsing"),
    ("from=now-1d&to=now&granularity=week", "granularity", "enum"),
    (
        "from=now-730d&to=now&granularity=hour",
        "to",
        "range_too_wide",
    ),
    (
        "from=now-1d&to=now&country=us%27)%3B%20DROP%20TABLE%20demo.events%3B--",
        "country",
        "string_pattern_mismatch",
    ),
    (
        "from=now-1d&to=now&country=DE&country=FR",
        "country",
        "duplicate_parameter",
    ),
    (
        "from=now-1d&to=now&tenant=globex",
        "tenant",
        "extra_forbidden",
    ),
    ("from=now-1d&to=now&colour=red", "colour", "extra_forbidden"),
    ("from=now&to=now-1d", "to", "range_empty"),
    ("from=now-1d&to=now&format=xml", "format", "enum"),
];

#[tokio::test]
async fn invalid_parameters_get_422_naming_each_field_and_never_reach_clickhouse() {
    let proxy = Proxy::start().await;
    for (query, field, kind) in INVALID {
        let reply = proxy.get(&format!("/v1/query/revenue?{query}")).await;
        assert_eq!(reply.status, 422, "{query}: {}", reply.text());
        let detail = &reply.json()["detail"];
        let named = detail.as_array().unwrap().iter().any(|d| {
            d["loc"] == serde_json::json!(["query", field])
                && d["type"] == *kind
                && d["msg"].is_string()
        });
        assert!(named, "{query}: expected {field}/{kind} in {detail}");
    }
    let wide = proxy
        .get("/v1/query/revenue?from=now-730d&to=now&granularity=hour")
        .await;
    assert!(wide.text().contains("at most 31 days"), "{}", wide.text());
    let long = proxy
        .get(&format!(
            "/v1/query/revenue?from=now-1d&to=now&country={}",
            "A".repeat(5000)
        ))
        .await;
    assert_eq!(long.status, 422);
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        0.0
    );
}

#[tokio::test]
async fn unknown_queries_and_routes_are_json_404s() {
    let proxy = Proxy::start().await;
    let reply = proxy.get("/v1/query/nope?from=now").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["type"], "unknown_query");
    let reply = proxy.get("/v2/else").await;
    assert_eq!(reply.status, 404);
    assert!(reply.json()["detail"].is_string());
    let metrics = proxy.get("/metrics").await.text();
    assert!(
        metrics.contains("dashcache_http_requests_total{route=\"query\",status=\"404\"} 1"),
        "{metrics}"
    );
}

/// Money comes out as a person writes it: at most two decimals, in every format.
#[tokio::test]
async fn revenue_has_at_most_two_decimals_in_every_format() {
    let proxy = Proxy::start().await;
    let two_decimals = |value: &str| {
        let value = value.trim().trim_matches('"');
        assert!(value.parse::<f64>().is_ok(), "not a number: {value}");
        value.split_once('.').is_none_or(|(_, d)| d.len() <= 2)
    };
    for query in [
        "revenue?from=today-30d&to=today&granularity=day",
        "revenue?from=today-2d&to=today&granularity=hour",
        "revenue?from=today-1d&to=today&granularity=minute",
        "revenue?from=today-90d&to=today&granularity=month",
        "top_countries?from=today-30d&to=today&limit=10",
    ] {
        for format in ["json", "ndjson", "csv", "tsv"] {
            let reply = proxy
                .get(&format!("/v1/query/{query}&format={format}"))
                .await;
            assert_eq!(reply.status, 200, "{query} {format}: {}", reply.text());
            let text = reply.text();
            let values: Vec<String> = match format {
                "json" => reply.json()["data"]
                    .as_array()
                    .expect("data")
                    .iter()
                    .map(|row| row["revenue"].to_string())
                    .collect(),
                "ndjson" => rows(&text)
                    .iter()
                    .map(|row| row["revenue"].to_string())
                    .collect(),
                _ => {
                    let sep = if format == "csv" { ',' } else { '\t' };
                    let mut lines = text.lines();
                    let header: Vec<&str> = lines.next().expect("header").split(sep).collect();
                    let at = header
                        .iter()
                        .position(|h| h.trim_matches('"') == "revenue")
                        .expect("a revenue column");
                    lines
                        .map(|l| l.split(sep).nth(at).expect("column").to_owned())
                        .collect()
                }
            };
            assert!(!values.is_empty(), "{query} {format}: no rows");
            for value in values {
                assert!(two_decimals(&value), "{query} {format}: revenue {value}");
            }
        }
    }
}

/// What the looking-alike query selects: a value with 18.16's exception
/// framing mid-line, and one with the newer marker.
const LOOKALIKE: &str = "SELECT 'x Code: 60, e.displayText() = DB::Exception: fake' AS s, \
     'mid __exception__ line' AS t";

#[tokio::test]
async fn data_that_mentions_an_exception_is_served_whole_and_a_real_one_is_not() {
    let proxy = Proxy::start_with(ProxyOptions {
        extra_queries: vec![
            ("lookalike".into(), LOOKALIKE.into(), "ttl = \"5m\"".into()),
            (
                // ClickHouse has sent 200 OK and ~1.5 MB of rows when it fails.
                "fails_late".into(),
                "SELECT number, toString(number) AS s, throwIf(number = 150000) AS boom \
                 FROM system.numbers LIMIT 200000 SETTINGS max_block_size = 1000"
                    .into(),
                "ttl = \"5m\"".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    // TSV strings are unquoted: the value is on the line as it is.
    let direct = clickhouse(&format!("{LOOKALIKE} FORMAT TSVWithNames")).await;
    assert!(direct.contains("\nx Code: 60, e.displayText() = DB::Exception: fake\t"));
    for format in ["tsv", "csv", "ndjson", "json"] {
        let reply = proxy
            .get(&format!("/v1/query/lookalike?format={format}"))
            .await;
        assert_eq!(reply.status, 200, "{format}: {}", reply.text());
        assert!(reply.body.is_ok(), "{format}: the transfer was cut");
        assert_eq!(reply.cache(), "MISS", "{format}");
        let text = reply.text();
        assert!(
            text.contains("x Code: 60, e.displayText() = DB::Exception: fake")
                && text.contains("mid __exception__ line"),
            "{format}: {text}"
        );
        if format == "tsv" {
            assert_eq!(text, direct, "the whole body");
        }
        // It was stored: the next request is a HIT with the same body.
        let again = proxy
            .get(&format!("/v1/query/lookalike?format={format}"))
            .await;
        assert_eq!(again.cache(), "HIT", "{format}");
        assert_eq!(again.text(), text, "{format}");
    }

    // A real failure after the first rows, in TSV too, is still one.
    let reply = proxy.get("/v1/query/fails_late?format=tsv").await;
    assert!(
        !(reply.status == 200 && reply.body.is_ok()),
        "a failed TSV answer looked like a success"
    );
    if let Ok(body) = &reply.body {
        assert!(!String::from_utf8_lossy(body).contains("DB::Exception"));
    }
    let again = proxy.get("/v1/query/fails_late?format=tsv").await;
    assert_ne!(again.cache(), "HIT");
}
