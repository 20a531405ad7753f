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
