//! Starting as an operator would: from any directory, with the shipped config
//! (ClickHouse's and Redis's addresses from the environment, as an operator
//! may set them, so that it runs against the test's services), and what that
//! config exposes to a request without a permitted key.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{TempDir, clickhouse_url, free_port, get, redis_url, request, root};

/// The shipped config and its templates in a fresh directory: no `.services/`.
fn shipped_config_in(dir: &TempDir) -> std::path::PathBuf {
    std::fs::copy(root().join("config.toml"), dir.0.join("config.toml")).expect("copy config");
    std::os::unix::fs::symlink(root().join("sql"), dir.0.join("sql")).expect("link sql/");
    dir.0.join("config.toml")
}

fn proxy_command(config: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dashcache-proxy"));
    command
        .current_dir("/")
        .arg("--config")
        .arg(config)
        // The shipped addresses unless the test's services run on other ports.
        .env("DASHCACHE_CLICKHOUSE_URL", clickhouse_url())
        .env("DASHCACHE_REDIS_URL", redis_url())
        .env_remove("DASHCACHE_STORE_URL")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    command
}

/// `keys add` against `config`: (key, key id).
fn add_key(config: &std::path::Path, tier: &str, tenant: &str) -> (String, String) {
    let out = proxy_command(config)
        .args(["keys", "add", "--tier", tier, "--tenant", tenant])
        .output()
        .expect("run keys add");
    assert!(
        out.status.success(),
        "keys add from /: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // "created key_… (tier …, tenant …); the key is shown once:"
    let stderr = String::from_utf8_lossy(&out.stderr);
    let id = stderr
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap_or_else(|| panic!("no key id in: {stderr}"))
        .to_owned();
    (key, id)
}

/// The shipped config's proxy on a free port, healthy; killed on drop.
struct Shipped {
    child: std::process::Child,
    base: String,
}

impl Shipped {
    async fn start(config: &std::path::Path) -> Shipped {
        let port = free_port();
        let child = proxy_command(config)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn proxy");
        let mut shipped = Shipped {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..200 {
            if get(&format!("{}/healthz", shipped.base))
                .await
                .is_ok_and(|r| r.status == 200)
            {
                return shipped;
            }
            if let Ok(Some(status)) = shipped.child.try_wait() {
                panic!("proxy exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("proxy started from / did not become healthy");
    }

    async fn get(&self, path: &str, key: Option<&str>) -> crate::harness::Reply {
        let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
        request(&format!("{}{path}", self.base), &headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

impl Drop for Shipped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const QUERY: &str = "/v1/query/top_countries?from=today-20d&to=today-2d&limit=3";

#[tokio::test]
async fn the_shipped_config_works_from_any_directory_without_a_services_dir() {
    let dir = TempDir::new("startup");
    let config = shipped_config_in(&dir);
    // The control store is relative to the config file, and its directory is created.
    let (key, _) = add_key(&config, "pro", "acme");
    assert!(dir.0.join(".services/control.db").exists());

    let proxy = Shipped::start(&config).await;
    let reply = proxy.get(QUERY, Some(&key)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A fresh install exposes nothing that names tenants, keys or requested
/// parameters to a request without an operator's key: `/status.json` (the
/// `/status` page's data) needs a key of the shipped `operator` tier, a
/// tenant's key gets 403; `/healthz` and `/readyz` stay open for load
/// balancers, and the open `/metrics` names no tenant, key or parameter.
#[tokio::test]
async fn the_shipped_config_shows_operator_pages_only_to_an_operators_key() {
    let dir = TempDir::new("startup-operator");
    let config = shipped_config_in(&dir);
    let (tenant, tenant_id) = add_key(&config, "enterprise", "initech");
    let (operator, _) = add_key(&config, "operator", "ops");
    let proxy = Shipped::start(&config).await;
    // A tenant's traffic, so that there is something to name.
    let asked = "/v1/query/revenue?from=today-9d&to=today-1d&granularity=day&country=SE";
    assert_eq!(proxy.get(asked, Some(&tenant)).await.status, 200);

    assert_eq!(proxy.get("/healthz", None).await.status, 200);
    let ready = proxy.get("/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.text());

    let anonymous = proxy.get("/status.json", None).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(anonymous.json()["type"], "unauthorized");
    let tenants = proxy.get("/status.json", Some(&tenant)).await;
    assert_eq!(tenants.status, 403, "{}", tenants.text());
    assert_eq!(tenants.json()["type"], "forbidden");
    let detail = tenants.json()["detail"].as_str().unwrap_or("").to_owned();
    assert!(detail.contains("operator = true"), "{detail}");
    assert!(!tenants.text().contains(&tenant), "the key is echoed");
    // A key in the URL is refused before anything else, even the operator's.
    let in_url = proxy
        .get(&format!("/status.json?api_key={operator}"), None)
        .await;
    assert_eq!(in_url.status, 400, "{}", in_url.text());

    let status = proxy.get("/status.json", Some(&operator)).await;
    assert_eq!(status.status, 200, "{}", status.text());
    let status = status.json();
    assert_eq!(status["api_keys_per_tier"]["enterprise"], 1, "{status}");
    assert_eq!(status["api_keys_per_tier"]["operator"], 1, "{status}");
    // The operator's tier reads operator pages, not tenants' answers.
    assert_eq!(proxy.get(QUERY, Some(&operator)).await.status, 403);

    // The page itself is open and holds no data: it asks for a key.
    let page = proxy.get("/status", None).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("operator = true"), "{}", page.text());
    // /metrics is open and names no tenant, key or requested parameter.
    let metrics = proxy.get("/metrics", None).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.contains("dashcache_cache_requests_total"), "{text}");
    for named in [
        "initech", "ops", &tenant_id, &tenant, &operator, "today-9d", "SE", "revenue",
    ] {
        assert!(
            !text
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-')
                .any(|word| word == named),
            "/metrics names `{named}`:\n{text}"
        );
    }
}

#[test]
fn an_unusable_store_location_is_one_clear_line() {
    let dir = TempDir::new("startup-bad");
    let config = shipped_config_in(&dir);
    let text = std::fs::read_to_string(&config).expect("read config");
    let text = text.replace(
        "url = \"sqlite://.services/control.db\"",
        "url = \"sqlite:///proc/dashcache-nowhere/control.db\"",
    );
    std::fs::write(&config, text).expect("write config");
    let out = proxy_command(&config)
        .args(["--listen", "127.0.0.1:1"])
        .output()
        .expect("run proxy");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line:\n{stderr}");
    for part in [
        "store.url",
        &config.display().to_string(),
        "/proc/dashcache-nowhere",
        "writable",
    ] {
        assert!(lines[0].contains(part), "{part} missing: {stderr}");
    }
}

#[tokio::test]
async fn every_known_metric_series_is_exported_at_zero_from_the_start() {
    let proxy = crate::harness::Proxy::start().await;
    let text = proxy.get("/metrics").await.text();
    let series = [
        "dashcache_cache_requests_total{result=\"HIT\"}",
        "dashcache_cache_requests_total{result=\"STALE\"}",
        "dashcache_cache_requests_total{result=\"MISS\"}",
        "dashcache_cache_requests_total{result=\"COALESCED\"}",
        "dashcache_cache_stores_total{result=\"stored\"}",
        "dashcache_cache_stores_total{result=\"too_large\"}",
        "dashcache_cache_stores_total{result=\"failed\"}",
        "dashcache_exports_ended_total{result=\"cancelled\"}",
        "dashcache_clickhouse_errors_total{kind=\"timeout\"}",
        "dashcache_miss_queue_total{outcome=\"queued\"}",
        "dashcache_miss_queue_total{outcome=\"full\"}",
        "dashcache_miss_queue_total{outcome=\"timed_out\"}",
        "dashcache_rate_limit_total{outcome=\"limited\"}",
        "dashcache_refresh_failures_total",
        "dashcache_early_refreshes_total",
        "dashcache_http_requests_total{route=\"query\",status=\"429\"}",
        "dashcache_http_requests_total{route=\"export\",status=\"503\"}",
    ];
    for name in series {
        let line = text
            .lines()
            .find(|l| l.rsplit_once(' ').is_some_and(|(s, _)| s == name));
        assert_eq!(
            line.map(|l| l.rsplit_once(' ').map(|(_, v)| v)),
            Some(Some("0")),
            "{name} not at 0:\n{text}"
        );
    }
}
