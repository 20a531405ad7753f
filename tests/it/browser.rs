//! In a real browser: Debian's chromium, headless, driven by the scenarios
//! of `tests/browser/` (playwright-core from npm, pinned; installed by
//! `scripts/browser-setup`, which `scripts/test` runs). Each test starts a
//! proxy, runs one scenario with `node`, and asserts on what the page saw
//! (the scenario's JSON report) and on what the proxy counted.

use std::time::Duration;

use crate::harness::{Proxy, ProxyOptions, free_port, root};

/// Runs `tests/browser/{script}` with `env`; its JSON report.
pub async fn scenario(script: &str, env: &[(&str, String)]) -> serde_json::Value {
    let dir = root().join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run scripts/browser-setup (scripts/test does)"
    );
    let mut command = tokio::process::Command::new("node");
    command.arg(dir.join(script)).current_dir(&dir);
    for (name, value) in env {
        command.env(name, value);
    }
    let run = command.output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .unwrap_or_else(|_| panic!("{script} did not end within 5 minutes"))
        .expect("node runs (scripts/browser-setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script}: no JSON report ({e}):\n{stdout}\n{stderr}"))
}

/// `[cors]` allowing one page origin, and a tier of one request a minute.
fn browser_options(page_origin: &str) -> ProxyOptions {
    let tiny: toml::Table = toml::from_str(
        "requests_per_minute = 1\nburst = 1\nqueries = [\"*\"]\nexports = [\"*\"]\n",
    )
    .expect("tier table");
    ProxyOptions {
        set: vec![
            (
                "cors",
                "allowed_origins",
                toml::Value::Array(vec![page_origin.into()]),
            ),
            ("tier", "tiny", toml::Value::Table(tiny)),
        ],
        ..Default::default()
    }
}

/// A key of tier `tiny` the proxy has loaded (its one request a minute spent
/// on finding that out).
async fn tiny_key(proxy: &Proxy) -> String {
    let key = proxy.add_key("tiny", "acme");
    for _ in 0..100 {
        let reply = proxy
            .get_with("/v1/query/active_users?window=hour", &[("x-api-key", &key)])
            .await;
        if reply.status != 401 {
            return key;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy did not load the new key");
}

fn n(value: &serde_json::Value) -> i64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}")) as i64
}

#[tokio::test]
async fn a_page_on_another_origin_reads_answers_and_errors_and_others_are_blocked() {
    let (page_port, other_port) = (free_port(), free_port());
    let page_origin = format!("http://127.0.0.1:{page_port}");
    let proxy = Proxy::start_with(browser_options(&page_origin)).await;
    let tiny = tiny_key(&proxy).await;
    let seen = scenario(
        "cors.mjs",
        &[
            ("DASHCACHE_PROXY", proxy.base.clone()),
            ("DASHCACHE_KEY", proxy.key.clone()),
            ("DASHCACHE_TINY_KEY", tiny),
            ("DASHCACHE_PAGE_PORT", page_port.to_string()),
            ("DASHCACHE_OTHER_PORT", other_port.to_string()),
        ],
    )
    .await;
    let report = serde_json::to_string_pretty(&seen).unwrap_or_default();

    // One fetch with X-API-Key: a preflight, then the answer and its headers.
    let one = &seen["one"];
    assert_eq!(one["page"]["status"], 200, "{report}");
    assert_eq!(one["page"]["xCache"], "MISS", "{report}");
    assert!(n(&one["page"]["rows"]) > 0, "{report}");
    assert!(one["page"]["rateRemaining"].is_string(), "{report}");
    assert_eq!(n(&one["proxy"]["preflightAllowed"]), 1, "{report}");

    // 10 panels at once: one preflight per panel URL (Chromium keys its
    // preflight cache by URL), none when the dashboard loads them again.
    let panels = seen["panels"].as_array().expect("panel loads");
    assert_eq!(panels.len(), 3);
    for (load, step) in panels.iter().enumerate() {
        let answers = step["page"].as_array().expect("panels");
        assert_eq!(answers.len(), 10);
        for answer in answers {
            assert_eq!(answer["status"], 200, "{report}");
            assert_eq!(n(&answer["rows"]), 5, "{report}");
            assert!(
                ["MISS", "COALESCED", "HIT"].contains(&answer["xCache"].as_str().unwrap_or("")),
                "{report}"
            );
        }
        let expected = if load == 0 { 10 } else { 0 };
        assert_eq!(
            n(&step["proxy"]["preflightAllowed"]),
            expected,
            "load {load}: {report}"
        );
    }
    // Streamed panels (no-store: every load reaches the proxy): 10 preflights
    // for 30 requests.
    let exports = seen["exports"].as_array().expect("export loads");
    for (load, step) in exports.iter().enumerate() {
        for answer in step["page"].as_array().expect("exports") {
            assert_eq!(answer["status"], 200, "{report}");
            assert!(
                answer["text"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("{\"ts\":"),
                "{report}"
            );
        }
        assert_eq!(
            n(&step["proxy"]["actualAllowed"]),
            10,
            "load {load}: {report}"
        );
        let expected = if load == 0 { 10 } else { 0 };
        assert_eq!(
            n(&step["proxy"]["preflightAllowed"]),
            expected,
            "load {load}: {report}"
        );
    }

    // From an origin [cors] does not allow: the browser blocks the fetch
    // after the refused preflight; the request itself never reached the proxy.
    let refused = &seen["refused"];
    assert_eq!(
        refused["page"]["error"], "TypeError: Failed to fetch",
        "{report}"
    );
    assert_eq!(n(&refused["proxy"]["preflightRefused"]), 1, "{report}");
    assert_eq!(n(&refused["proxy"]["actualAllowed"]), 0, "{report}");
    assert_eq!(n(&refused["proxy"]["actualRefused"]), 0, "{report}");
    let console = seen["consoleErrors"].to_string();
    assert!(
        console.contains("has been blocked by CORS policy"),
        "{report}"
    );

    // A 422's and a 429's bodies are readable.
    let invalid = &seen["invalid"]["page"];
    assert_eq!(invalid["status"], 422, "{report}");
    assert_eq!(
        invalid["body"]["detail"][0]["loc"],
        serde_json::json!(["query", "granularity"]),
        "{report}"
    );
    let limited = &seen["limited"]["page"];
    assert_eq!(limited["body"]["type"], "rate_limited", "{report}");
    let retry: u64 = limited["retryAfter"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After readable: {report}"));
    assert!(retry >= 1, "{report}");

    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{report}");
    assert_eq!(seen["offMachine"], serde_json::json!([]), "{report}");
}

/// Where the browser tests save their screenshots (`target/browser-screenshots/`).
fn screenshots() -> std::path::PathBuf {
    let dir = root().join("target/browser-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// What every page test requires: no console errors, no script errors, no
/// request for another host, every request to the proxy.
fn clean(seen: &serde_json::Value, base: &str, report: &str) {
    assert_eq!(seen["consoleErrors"], serde_json::json!([]), "{report}");
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{report}");
    assert_eq!(seen["offMachine"], serde_json::json!([]), "{report}");
    for url in seen["requests"].as_array().expect("requests") {
        let url = url.as_str().unwrap_or("");
        assert!(url.starts_with(base), "{url} is not the proxy's: {report}");
    }
}

#[tokio::test]
async fn docs_render_swagger_ui_from_the_binary_and_try_it_out_works_with_a_key() {
    // The compiled-in files are the pinned npm package's, unchanged.
    for file in ["swagger-ui-bundle.js", "swagger-ui.css"] {
        let vendored = std::fs::read(root().join("proxy/web/swagger-ui").join(file)).unwrap();
        let pinned = root()
            .join("tests/browser/node_modules/swagger-ui-dist")
            .join(file);
        let pinned = std::fs::read(&pinned)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/browser-setup)", pinned.display()));
        assert!(
            vendored == pinned,
            "proxy/web/swagger-ui/{file} differs from the pinned swagger-ui-dist: run scripts/vendor"
        );
    }
    let proxy = Proxy::start().await;
    let shots = screenshots();
    let seen = scenario(
        "docs.mjs",
        &[
            ("DASHCACHE_PROXY", proxy.base.clone()),
            ("DASHCACHE_KEY", proxy.key.clone()),
            ("DASHCACHE_SCREENSHOTS", shots.display().to_string()),
        ],
    )
    .await;
    let report = serde_json::to_string_pretty(&seen).unwrap_or_default();
    assert!(
        seen["title"]
            .as_str()
            .unwrap_or("")
            .starts_with("dashcache"),
        "{report}"
    );
    // Every query and export, and the service routes.
    assert!(n(&seen["operations"]) >= 4, "{report}");
    assert!(shots.join("docs.png").is_file());
    assert!(n(&seen["screenshotColours"]) > 16, "a blank page: {report}");
    assert_eq!(seen["tryItOutStatus"], "200", "{report}");
    let details = seen["tryItOutDetails"].as_str().unwrap_or("");
    assert!(details.contains("\"data\""), "{report}");
    assert!(details.contains("x-cache:"), "{report}");
    clean(&seen, &proxy.base, &report);
    let answered = proxy
        .metric("dashcache_http_requests_total{route=\"query\",status=\"200\"}")
        .await;
    assert_eq!(answered, 1.0, "the try-it-out request reached the proxy");
}

#[tokio::test]
async fn status_shows_what_the_proxy_knows_to_an_operators_key_and_refreshes_itself() {
    let proxy = Proxy::start_with(ProxyOptions {
        set: vec![
            ("auth", "protect_metrics", true.into()),
            ("popularity", "flush_interval", "200ms".into()),
        ],
        ..Default::default()
    })
    .await;
    // Traffic: one computation, then hits.
    let url = "/v1/query/revenue?from=today-7d&to=today&granularity=day";
    for _ in 0..5 {
        assert_eq!(proxy.get(url).await.status, 200);
    }
    // A warm-up run in the same control store.
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_dashcache-scheduler"))
        .arg("--config")
        .arg(proxy.dir.0.join("config.toml"))
        .args(["run", "active-users"])
        .env_remove("DASHCACHE_REDIS_URL")
        .env_remove("DASHCACHE_CLICKHOUSE_URL")
        .env_remove("DASHCACHE_STORE_URL")
        .output()
        .expect("run dashcache-scheduler");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // /status.json needs an operator's key (and /metrics, protected, too); the
    // page itself holds no data.
    let operator = proxy.add_key("operator", "ops");
    let as_operator = [("x-api-key", operator.as_str())];
    for path in ["/status.json", "/metrics"] {
        assert_eq!(proxy.get_with(path, &[]).await.status, 401, "{path}");
        let tenants = proxy.get(path).await;
        assert_eq!(tenants.status, 403, "{path}: {}", tenants.text());
        assert_eq!(tenants.json()["type"], "forbidden", "{path}");
        assert_eq!(
            proxy.get_with(path, &as_operator).await.status,
            200,
            "{path}"
        );
    }
    assert_eq!(proxy.get_with("/status", &[]).await.status, 200);
    // The demand counted reaches Redis (flushed every 200 ms).
    let mut counted = false;
    for _ in 0..100 {
        let status = proxy.get_with("/status.json", &as_operator).await.json();
        if status["popular"]["answers"]
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["query"] == "revenue"))
        {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        counted,
        "the requests never showed among the most requested"
    );
    let status = proxy.get_with("/status.json", &as_operator).await.json();
    assert_eq!(status["cache"]["by_cache"]["MISS"], 1, "{status}");
    assert_eq!(status["cache"]["by_cache"]["HIT"], 4, "{status}");
    assert_eq!(status["cache"]["hit_ratio"], 0.8, "{status}");
    assert_eq!(status["redis"]["ok"], true, "{status}");
    assert_eq!(status["api_keys_per_tier"]["enterprise"], 1, "{status}");
    assert_eq!(
        status["warmup"]["runs"][0]["job"], "active-users",
        "{status}"
    );

    let shots = screenshots();
    let seen = scenario(
        "status.mjs",
        &[
            ("DASHCACHE_PROXY", proxy.base.clone()),
            ("DASHCACHE_KEY", operator.clone()),
            ("DASHCACHE_TENANT_KEY", proxy.key.clone()),
            ("DASHCACHE_SCREENSHOTS", shots.display().to_string()),
        ],
    )
    .await;
    let report = serde_json::to_string_pretty(&seen).unwrap_or_default();
    assert_eq!(seen["askedForKey"], true, "{report}");
    // A tenant's key: the form stays, saying why.
    assert_eq!(seen["tenantKeyFormShown"], true, "{report}");
    assert!(
        seen["tenantKeyError"]
            .as_str()
            .unwrap_or("")
            .contains("operator = true"),
        "{report}"
    );
    assert!(n(&seen["updates"]) >= 2, "{report}");
    assert_eq!(seen["redis"], "up", "{report}");
    // The 5 requests fall in the last minute's intervals.
    let rps: f64 = seen["rps"].as_str().unwrap_or("").parse().unwrap_or(0.0);
    assert!(rps > 0.0, "{report}");
    assert!(
        seen["hit-ratio"].as_str().unwrap_or("").ends_with('%'),
        "{report}"
    );
    let rows = |id: &str| seen[id].as_array().cloned().unwrap_or_default();
    let has_row = |id: &str, cells: &[&str]| {
        rows(id).iter().any(|row| {
            cells
                .iter()
                .enumerate()
                .all(|(i, c)| row[i].as_str() == Some(c))
        })
    };
    assert!(has_row("by-cache", &["HIT", "4"]), "{report}");
    assert!(has_row("by-cache", &["MISS", "1"]), "{report}");
    assert!(
        has_row("replicas", &[&crate::harness::clickhouse_url(), "up"]),
        "{report}"
    );
    assert!(has_row("tiers", &["enterprise", "1"]), "{report}");
    assert!(has_row("popular", &["revenue", "acme", "json"]), "{report}");
    assert!(has_row("warmup", &["active-users"]), "{report}");
    assert!(n(&seen["chartPaths"]) >= 1, "{report}");
    assert!(shots.join("status.png").is_file());
    assert!(n(&seen["screenshotColours"]) > 16, "a blank page: {report}");
    clean_but_the_refused_keys(&seen, &proxy.base, &report);
}

/// [`clean`], except for the 401 the page gets before it has a key and the
/// 403 of the tenant's key (Chromium logs a failed fetch as a console error).
fn clean_but_the_refused_keys(seen: &serde_json::Value, base: &str, report: &str) {
    let errors = seen["consoleErrors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        errors.iter().all(|e| {
            let e = e.as_str().unwrap_or("");
            e.contains("status of 401 (Unauthorized)") || e.contains("status of 403 (Forbidden)")
        }),
        "{report}"
    );
    let mut seen = seen.clone();
    seen["consoleErrors"] = serde_json::json!([]);
    clean(&seen, base, report);
}

/// Rows of a direct ClickHouse query (TSV), each as its fields.
async fn direct(sql: &str) -> Vec<Vec<String>> {
    crate::harness::clickhouse(&format!("{sql} FORMAT TSV"))
        .await
        .lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// `2026-11-19T00:00:00Z/2026-12-03T00:00:00Z` as ClickHouse DateTime literals.
fn range_sql(range: &str) -> (String, String) {
    let (from, to) = range
        .split_once('/')
        .unwrap_or_else(|| panic!("X-Time-Range: {range}"));
    let literal = |t: &str| {
        format!(
            "toDateTime('{}')",
            t.trim_end_matches('Z').replace('T', " ")
        )
    };
    (literal(from), literal(to))
}

/// The panel's bars equal revenue (to the cent) and events per bucket of a
/// direct aggregate of the raw events.
async fn same_as_clickhouse(panel: &serde_json::Value, bucket: &str, filter: &str, report: &str) {
    let (from, to) = range_sql(panel["range"].as_str().unwrap_or(""));
    let expected = direct(&format!(
        "SELECT toString({bucket}(ts)) AS b, round(sum(revenue), 2), count() FROM demo.events \
         WHERE tenant_id = 'acme' AND ts >= {from} AND ts < {to} {filter} GROUP BY b ORDER BY b"
    ))
    .await;
    let bars = panel["bars"].as_array().expect("bars");
    assert!(!bars.is_empty(), "{report}");
    assert_eq!(bars.len(), expected.len(), "{expected:?}\n{report}");
    for (bar, row) in bars.iter().zip(&expected) {
        assert_eq!(bar["t"], row[0].as_str(), "{report}");
        let revenue: f64 = row[1].parse().expect("revenue");
        let drawn = bar["revenue"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (drawn - revenue).abs() < 0.011,
            "{}: {drawn} vs {revenue}",
            row[0]
        );
        assert_eq!(
            n(&bar["events"]),
            row[2].parse::<i64>().expect("count"),
            "{report}"
        );
    }
}

#[tokio::test]
async fn the_example_dashboard_draws_clickhouses_numbers_streams_its_export_and_cancels_it() {
    let page_port = free_port();
    let proxy = Proxy::start_with(browser_options(&format!("http://127.0.0.1:{page_port}"))).await;
    let shots = screenshots();
    let seen = scenario(
        "dashboard.mjs",
        &[
            ("DASHCACHE_PROXY", proxy.base.clone()),
            ("DASHCACHE_KEY", proxy.key.clone()),
            ("DASHCACHE_CLICKHOUSE", crate::harness::clickhouse_url()),
            ("DASHCACHE_PAGE_PORT", page_port.to_string()),
            ("DASHCACHE_SCREENSHOTS", shots.display().to_string()),
        ],
    )
    .await;
    let report = serde_json::to_string_pretty(&seen).unwrap_or_default();
    assert_eq!(seen["fragmentCleared"], true, "{report}");
    assert!(n(&seen["screenshotColours"]) > 16, "a blank page: {report}");
    assert!(shots.join("dashboard.png").is_file());
    for panel in ["revenue", "byCountry", "byHour", "again"] {
        let x_cache = seen[panel]["xCache"].as_str().unwrap_or("");
        assert!(
            ["HIT", "MISS", "COALESCED", "STALE"].contains(&x_cache),
            "{panel}: {report}"
        );
    }
    assert_eq!(seen["revenue"]["xCache"], "MISS", "{report}");

    // The chart, filtered, by hour, and again: ClickHouse's numbers.
    same_as_clickhouse(&seen["revenue"], "toStartOfDay", "", &report).await;
    let country = seen["country"].as_str().expect("a country");
    let by_country = format!("AND country = '{country}'");
    same_as_clickhouse(&seen["byCountry"], "toStartOfDay", &by_country, &report).await;
    same_as_clickhouse(&seen["byHour"], "toStartOfHour", &by_country, &report).await;
    assert_eq!(seen["again"]["bars"], seen["revenue"]["bars"], "{report}");

    // The table: the top countries of the same range.
    let (from, to) = range_sql(seen["revenue"]["range"].as_str().unwrap_or(""));
    let expected = direct(&format!(
        "SELECT country, round(sum(revenue), 2), count() FROM demo.events \
         WHERE tenant_id = 'acme' AND ts >= {from} AND ts < {to} \
         GROUP BY country ORDER BY sum(revenue) DESC, country LIMIT 10"
    ))
    .await;
    let rows = seen["top"]["rows"].as_array().expect("table rows");
    assert_eq!(rows.len(), expected.len(), "{report}");
    for (row, want) in rows.iter().zip(&expected) {
        assert_eq!(row["country"], want[0].as_str(), "{report}");
        let revenue: f64 = want[1].parse().expect("revenue");
        assert!((row["revenue"].as_f64().unwrap_or(f64::NAN) - revenue).abs() < 0.011);
        assert_eq!(n(&row["events"]), want[2].parse::<i64>().expect("count"));
    }

    // The export: every row of the 30 days, the first drawn when a small
    // part of the body had arrived.
    let export = &seen["export"];
    assert_eq!(export["state"], "done", "{report}");
    let today = chrono::Utc::now().date_naive();
    let from = today - chrono::Duration::days(30);
    let count = direct(&format!(
        "SELECT count() FROM demo.events WHERE tenant_id = 'acme' \
         AND ts >= toDateTime('{from} 00:00:00') AND ts < toDateTime('{today} 00:00:00')"
    ))
    .await;
    assert_eq!(
        n(&export["rows"]),
        count[0][0].parse::<i64>().expect("count"),
        "{report}"
    );
    assert!(
        n(&export["bytesAtFirstRows"]) * 10 < n(&export["bytes"]),
        "rows drawn only near the end: {report}"
    );
    assert_eq!(n(&seen["exportShown"]), 50, "{report}");
    eprintln!(
        "dashboard export: {} rows, {} bytes, first rows after {:.0} ms, all after {:.0} ms",
        export["rows"],
        export["bytes"],
        export["msToFirstRows"].as_f64().unwrap_or(0.0),
        export["msTotal"].as_f64().unwrap_or(0.0)
    );

    // Cancel: the ClickHouse query was running, and is gone.
    assert!(n(&seen["runningBeforeCancel"]) >= 1, "{report}");
    assert_eq!(seen["cancelled"]["state"], "cancelled", "{report}");
    assert_eq!(seen["status"], "cancelled", "{report}");
    assert_eq!(n(&seen["runningAfterCancel"]), 0, "{report}");
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = proxy
            .metric("dashcache_exports_ended_total{result=\"cancelled\"}")
            .await;
        if counted >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, 1.0, "{report}");
    assert_eq!(seen["error"], serde_json::Value::Null, "{report}");
    assert_eq!(seen["consoleErrors"], serde_json::json!([]), "{report}");
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{report}");
    assert_eq!(seen["offMachine"], serde_json::json!([]), "{report}");
}

/// The host names of the HTTPS scenario (Chromium maps both to 127.0.0.1).
const PAGE_HOST: &str = "dashboard.test";
const PROXY_HOST: &str = "dashcache.test";

#[tokio::test]
async fn an_https_page_on_another_origin_streams_an_export_from_the_proxy_over_https() {
    use crate::tls::{Ca, cert_dir, install, port_of, tls_table};
    // One CA for both sites; Chromium trusts it (an NSS database the
    // scenario makes), the harness's client too.
    let ca = Ca::new("dashcache-it browser CA");
    let dir = cert_dir("browser-https");
    install(&dir.0, &ca.server_for(&[PROXY_HOST, "127.0.0.1"]));
    let page = ca.server_for(&[PAGE_HOST]);
    let (page_cert, page_key, ca_file) = (
        dir.0.join("page.pem"),
        dir.0.join("page-key.pem"),
        dir.0.join("ca.pem"),
    );
    for (file, text) in [
        (&page_cert, &page.cert_pem),
        (&page_key, &page.key_pem),
        (&ca_file, &ca.pem()),
    ] {
        std::fs::write(file, text).expect("write PEM");
    }
    let page_port = free_port();
    let mut options = browser_options(&format!("https://{PAGE_HOST}:{page_port}"));
    options.set.push(("proxy", "tls", tls_table(&dir.0, None)));
    options.client_tls = Some(ca.trusting());
    let proxy = Proxy::start_with(options).await;
    let proxy_origin = format!("https://{PROXY_HOST}:{}", port_of(&proxy));
    let seen = scenario(
        "https.mjs",
        &[
            ("DASHCACHE_PROXY", proxy_origin.clone()),
            ("DASHCACHE_KEY", proxy.key.clone()),
            ("DASHCACHE_CA", ca_file.display().to_string()),
            ("DASHCACHE_PAGE_HOST", PAGE_HOST.to_owned()),
            ("DASHCACHE_PAGE_PORT", page_port.to_string()),
            ("DASHCACHE_PAGE_CERT", page_cert.display().to_string()),
            ("DASHCACHE_PAGE_KEY", page_key.display().to_string()),
        ],
    )
    .await;
    let report = serde_json::to_string_pretty(&seen).unwrap_or_default();

    // The page: https://, a secure context, its certificate trusted.
    assert_eq!(seen["pageStatus"], 200, "{report}");
    assert_eq!(
        seen["pageOrigin"],
        format!("https://{PAGE_HOST}:{page_port}"),
        "{report}"
    );
    assert_eq!(seen["secureContext"], true, "{report}");
    let security = &seen["pageSecurity"];
    assert_eq!(security["state"], "secure", "{report}");
    assert_eq!(security["issues"], serde_json::json!([]), "{report}");
    assert_eq!(security["issuer"], "dashcache-it browser CA", "{report}");

    // The answer and the export, read across origins.
    assert_eq!(seen["query"]["status"], 200, "{report}");
    assert!(n(&seen["query"]["rows"]) > 0, "{report}");
    let export = &seen["export"];
    assert_eq!(export["status"], 200, "{report}");
    assert_eq!(export["trailing"], "", "{report}");
    assert_eq!(
        export["firstRowKeys"],
        serde_json::json!(["ts", "user_id", "country", "plan", "event", "revenue"]),
        "{report}"
    );
    let today = chrono::Utc::now().date_naive();
    let from = today - chrono::Duration::days(7);
    let count = direct(&format!(
        "SELECT count() FROM demo.events WHERE tenant_id = 'acme' \
         AND ts >= toDateTime('{from} 00:00:00') AND ts < toDateTime('{today} 00:00:00')"
    ))
    .await;
    assert_eq!(
        n(&export["rows"]),
        count[0][0].parse::<i64>().expect("count"),
        "{report}"
    );
    // Chunk by chunk: the first row was read when a small part had arrived.
    assert!(n(&export["chunks"]) > 1, "{report}");
    assert!(
        n(&export["bytesAtFirstRow"]) * 10 < n(&export["bytes"]),
        "{report}"
    );

    // Every response over TLS from a certificate of the test CA, judged
    // secure by Chromium; the proxy's over HTTP/2 (ALPN).
    let responses = seen["responses"].as_array().expect("responses");
    let from_proxy: Vec<_> = responses
        .iter()
        .filter(|r| {
            r["url"]
                .as_str()
                .unwrap_or("")
                .starts_with(proxy_origin.as_str())
        })
        .collect();
    assert!(from_proxy.len() >= 2, "{report}");
    for r in responses {
        assert_eq!(r["securityState"], "secure", "{report}");
        assert_eq!(r["issuer"], "dashcache-it browser CA", "{report}");
    }
    for r in &from_proxy {
        assert_eq!(r["protocol"], "h2", "{report}");
        assert_eq!(r["subject"], PROXY_HOST, "{report}");
    }
    // The preflight went over TLS too, and the proxy allowed it.
    let preflights = proxy
        .metric("dashcache_cors_requests_total{kind=\"preflight\",result=\"allowed\"}")
        .await;
    assert!(preflights >= 1.0, "{report}");
    let actual = proxy
        .metric("dashcache_cors_requests_total{kind=\"actual\",result=\"allowed\"}")
        .await;
    assert!(actual >= 2.0, "{report}");

    // The proxy sent the whole export: the client did not leave early.
    // (counted when the response body is dropped: waited for, bounded)
    let mut ended = (0.0, 0.0);
    for _ in 0..100 {
        ended = (
            proxy
                .metric("dashcache_exports_ended_total{result=\"complete\"}")
                .await,
            proxy
                .metric("dashcache_exports_ended_total{result=\"cancelled\"}")
                .await,
        );
        if ended.0 + ended.1 >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ended, (1.0, 0.0), "{report}");

    // No failed load, mixed content, certificate or console error. One
    // exception, Chromium's: a `Cache-Control: no-store` response (every
    // export) read to its end through `getReader()` is reported to DevTools
    // as canceled (`net::ERR_ABORTED`) once the page has read it all, with
    // any server (a bare node server reproduces it); the rows above are all
    // there and the proxy counted the export complete.
    for failed in seen["failed"].as_array().expect("failed loads") {
        assert!(
            failed["url"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("{proxy_origin}/v1/export/"))
                && failed["type"] == "Fetch"
                && failed["canceled"] == true
                && failed["error"] == "net::ERR_ABORTED",
            "{report}"
        );
    }
    assert_eq!(seen["consoleErrors"], serde_json::json!([]), "{report}");
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{report}");
    assert_eq!(seen["offMachine"], serde_json::json!([]), "{report}");

    // The controls: over http:// the page could not call the proxy at all,
    // and a Chromium without the CA does not trust the page.
    let mixed = &seen["mixed"];
    assert_eq!(mixed["error"], "TypeError: Failed to fetch", "{report}");
    assert_eq!(
        mixed["failed"][0]["blockedReason"], "mixed-content",
        "{report}"
    );
    assert!(
        mixed["consoleErrors"].to_string().contains("Mixed Content"),
        "{report}"
    );
    assert_eq!(seen["untrusted"]["loaded"], false, "{report}");
    assert!(
        seen["untrusted"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("ERR_CERT_AUTHORITY_INVALID"),
        "{report}"
    );
}
