//! Starting as an operator would: from any directory, with the shipped config.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{TempDir, free_port, get, root};

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
        .env_remove("DASHCACHE_STORE_URL")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    command
}

#[tokio::test]
async fn the_shipped_config_works_from_any_directory_without_a_services_dir() {
    let dir = TempDir::new("startup");
    let config = shipped_config_in(&dir);
    // The control store is relative to the config file, and its directory is created.
    let out = proxy_command(&config)
        .args(["keys", "add", "--tier", "pro", "--tenant", "acme"])
        .output()
        .expect("run keys add");
    assert!(
        out.status.success(),
        "keys add from /: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(dir.0.join(".services/control.db").exists());

    let port = free_port();
    let mut child = proxy_command(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn proxy");
    let base = format!("http://127.0.0.1:{port}");
    let mut healthy = false;
    for _ in 0..200 {
        if get(&format!("{base}/healthz"))
            .await
            .is_ok_and(|r| r.status == 200)
        {
            healthy = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("proxy exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "proxy started from / did not become healthy");
    let reply = crate::harness::request(
        &format!("{base}/v1/query/top_countries?from=today-20d&to=today-2d&limit=3"),
        &[("x-api-key", &key)],
    )
    .await
    .expect("query");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(reply.status, 200, "{}", reply.text());
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
