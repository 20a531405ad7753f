//! The service-manager protocol as systemd sees it: both binaries run with a
//! `NOTIFY_SOCKET` the test listens on (as systemd's would be) and must say
//! `READY=1` only once they serve, ping `WATCHDOG=1` when `WATCHDOG_USEC`
//! asks for it, wrap a scheduler reload in `RELOADING=1` … `READY=1`, and
//! say `STOPPING=1` on SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::harness::{ProxyOptions, TempDir, config_text, free_port, get};

/// Upper bound on waiting for one notification (a hung binary fails the test).
const PATIENCE: Duration = Duration::from_secs(60);

/// The test's end of `NOTIFY_SOCKET`.
struct Manager {
    socket: UnixDatagram,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl Manager {
    fn bind(dir: &Path) -> (Manager, String) {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let manager = Manager {
            socket,
            seen: Vec::new(),
        };
        (manager, path.display().to_string())
    }

    /// Waits for a message carrying `line` (e.g. `READY=1`) and returns it.
    async fn expect(&mut self, line: &str) -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            let received = tokio::time::timeout(PATIENCE, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {line} notification; seen: {:?}", self.seen))
                .expect("recv");
            let message = String::from_utf8_lossy(&buf[..received]).into_owned();
            self.seen.push(message.clone());
            if message.lines().any(|l| l == line) {
                return message;
            }
        }
    }
}

struct Process(Child);

impl Process {
    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.0.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().expect("wait")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shipped config pointed at the test servers, without warm-up jobs.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let mut config: toml::Table = config_text(&ProxyOptions::default(), dir)
        .parse()
        .expect("toml");
    config.remove("warmup");
    let path = dir.join("config.toml");
    std::fs::write(&path, toml::to_string(&config).expect("serializes")).expect("write config");
    path
}

fn command(binary: &str, config: &Path, notify_socket: &str, log: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", notify_socket)
        .env("RUST_LOG", "info")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("DASHCACHE_REDIS_URL")
        .env_remove("DASHCACHE_CLICKHOUSE_URL")
        .env_remove("DASHCACHE_STORE_URL")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    command
}

#[tokio::test]
async fn proxy_is_ready_once_listening_pings_the_watchdog_and_says_stopping() {
    let dir = TempDir::new("service-proxy");
    let config = write_config(&dir.0);
    let (mut manager, socket) = Manager::bind(&dir.0);
    let port = free_port();
    let mut proxy = Process(
        command(
            env!("CARGO_BIN_EXE_dashcache-proxy"),
            &config,
            &socket,
            &dir.0.join("proxy.log"),
        )
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("WATCHDOG_USEC", "400000")
        .spawn()
        .expect("spawn dashcache-proxy"),
    );

    let ready = manager.expect("READY=1").await;
    assert!(ready.contains("STATUS=listening on 127.0.0.1:"), "{ready}");
    // READY=1 means it serves: the very next request is answered.
    let health = get(&format!("http://127.0.0.1:{port}/healthz"))
        .await
        .expect("healthz right after READY=1");
    assert_eq!(health.status, 200);

    manager.expect("WATCHDOG=1").await;
    manager.expect("WATCHDOG=1").await;

    proxy.signal("TERM");
    manager.expect("STOPPING=1").await;
    assert!(proxy.wait().success());
    let log = std::fs::read_to_string(dir.0.join("proxy.log")).unwrap_or_default();
    assert!(!log.contains("notification failed"), "{log}");
}

#[tokio::test]
async fn scheduler_is_ready_once_scheduled_and_wraps_reloads() {
    let dir = TempDir::new("service-scheduler");
    let config = write_config(&dir.0);
    let (mut manager, socket) = Manager::bind(&dir.0);
    let mut scheduler = Process(
        command(
            env!("CARGO_BIN_EXE_dashcache-scheduler"),
            &config,
            &socket,
            &dir.0.join("scheduler.log"),
        )
        .arg("serve")
        .spawn()
        .expect("spawn dashcache-scheduler"),
    );

    let ready = manager.expect("READY=1").await;
    assert!(ready.contains("warm-up jobs scheduled"), "{ready}");

    scheduler.signal("HUP");
    let reloading = manager.expect("RELOADING=1").await;
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd 253+ needs MONOTONIC_USEC with RELOADING=1: {reloading}"
    );
    let reloaded = manager.expect("READY=1").await;
    assert!(reloaded.contains("(reloaded)"), "{reloaded}");

    scheduler.signal("TERM");
    manager.expect("STOPPING=1").await;
    assert!(scheduler.wait().success());
    // No watchdog was asked for, so none was pinged.
    assert!(
        !manager.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "{:?}",
        manager.seen
    );
}
