//! Test harness: proxy processes, dedicated Redis servers, an HTTP client,
//! direct ClickHouse queries and metric readings.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn clickhouse_url() -> String {
    let port = std::env::var("DASHCACHE_CH_HTTP_PORT").unwrap_or_else(|_| "8123".into());
    format!("http://127.0.0.1:{port}")
}

pub fn redis_url() -> String {
    let port = std::env::var("DASHCACHE_REDIS_PORT").unwrap_or_else(|_| "6379".into());
    format!("redis://127.0.0.1:{port}")
}

/// A fresh cache key prefix, for proxies that must share answers.
pub fn shared_prefix() -> String {
    unique("it-shared")
}

/// `[redis] timeout` for tests whose assertions need Redis to answer while it
/// is up (cross-process coalescing, shared rate limits) under heavy load: the
/// shipped 250 ms is a latency budget, and a reply that a busy machine is
/// slower to read than that makes the proxy go on without Redis (and skip it
/// for `retry_after`), so a second process would compute the key or a limit
/// be counted per process. Not for tests that take Redis down: there a long
/// timeout makes each request wait on reconnection attempts.
pub fn patient_redis() -> (&'static str, &'static str, toml::Value) {
    ("redis", "timeout", "5s".into())
}

/// A port nothing listens on, and one this test run has not handed out
/// before: the proxies bind with `SO_REUSEPORT`, so two of them given the same
/// port would share its connections (one proxy's API port being another's
/// ClickHouse-compatible endpoint, say).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}-{}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(&format!("dashcache-it-{name}")));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How to configure a test proxy: the shipped config with overrides.
pub struct ProxyOptions {
    pub redis_url: String,
    pub clickhouse_url: String,
    /// Extra queries: (name, SQL text, TOML table body).
    pub extra_queries: Vec<(String, String, String)>,
    /// A fixed cache key prefix, so that several proxies share answers.
    pub key_prefix: Option<String>,
    /// Config values to set: (section, key, value).
    pub set: Vec<(&'static str, &'static str, toml::Value)>,
    /// A control store shared with other proxies (default: one per proxy).
    pub store_url: Option<String>,
    /// Tier and tenant of the key `Proxy::get` sends.
    pub tier: &'static str,
    pub tenant: &'static str,
    /// Environment variables of the proxy process (e.g. ClickHouse passwords).
    pub env: Vec<(&'static str, String)>,
    /// For a proxy that serves HTTPS (`[proxy.tls]` among `set`): how the
    /// harness's client connects to it (which CA it trusts, its certificate).
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
    /// Sections left out of the config (e.g. `redis`: the single-host mode),
    /// after `set` is applied.
    pub without: Vec<&'static str>,
    /// TOML appended to the config as written (e.g. `[[warmup]]` entries).
    pub extra: String,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            redis_url: redis_url(),
            clickhouse_url: clickhouse_url(),
            extra_queries: Vec::new(),
            key_prefix: None,
            set: Vec::new(),
            store_url: None,
            tier: "enterprise",
            tenant: "acme",
            env: Vec::new(),
            client_tls: None,
            without: Vec::new(),
            extra: String::new(),
        }
    }
}

/// A running `dashcache-proxy` process, killed on drop.
pub struct Proxy {
    child: Child,
    pub base: String,
    pub dir: TempDir,
    /// The API key `get` sends.
    pub key: String,
    /// The ClickHouse-compatible endpoint (`[clickhouse_http]`), on a port of its own.
    pub ch_base: String,
    /// The client of a proxy that serves HTTPS.
    https: Option<HttpsClient>,
    /// Every key minted for this proxy: none may appear in its log (checked
    /// when it is dropped, in every test).
    minted: std::sync::Mutex<Vec<String>>,
}

impl Proxy {
    pub async fn start() -> Proxy {
        Self::start_with(ProxyOptions::default()).await
    }

    pub async fn start_with(mut options: ProxyOptions) -> Proxy {
        let ch_port = free_port();
        // First, so that a test's own `set` wins.
        options.set.splice(
            0..0,
            [
                ("clickhouse_http", "enabled", true.into()),
                (
                    "clickhouse_http",
                    "listen",
                    format!("127.0.0.1:{ch_port}").into(),
                ),
            ],
        );
        let dir = TempDir::new("proxy");
        let config_path = dir.0.join("config.toml");
        std::fs::write(&config_path, test_config(&options, &dir.0)).expect("write config");
        let key = add_key(&config_path, options.tier, options.tenant);
        let port = free_port();
        let log = std::fs::File::create(dir.0.join("proxy.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_dashcache-proxy"))
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .envs(options.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("DASHCACHE_REDIS_URL")
            .env_remove("DASHCACHE_CLICKHOUSE_URL")
            .env_remove("DASHCACHE_STORE_URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dashcache-proxy");
        let scheme = if options.client_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let proxy = Proxy {
            child,
            base: format!("{scheme}://127.0.0.1:{port}"),
            dir,
            key: key.clone(),
            // Both listeners get `[proxy.tls]`.
            ch_base: format!("{scheme}://127.0.0.1:{ch_port}"),
            https: options.client_tls.map(https_client),
            minted: std::sync::Mutex::new(vec![key.clone()]),
        };
        for _ in 0..200 {
            if let Ok(r) = proxy.request(&format!("{}/healthz", proxy.base), &[]).await
                && r.status == 200
            {
                return proxy;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("proxy did not become healthy; log:\n{}", proxy.log());
    }

    /// GETs `path` (with this proxy's API key) until its `X-Cache` is
    /// `cache` (bounded: 200 tries 100 ms apart), and returns that answer.
    pub async fn until(&self, path: &str, cache: &str) -> Reply {
        for _ in 0..200 {
            let reply = self.get(path).await;
            if reply.cache() == cache {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{path} never answered {cache}; log:\n{}", self.log());
    }

    /// GET with this proxy's API key.
    pub async fn get(&self, path: &str) -> Reply {
        let auth = format!("Bearer {}", self.key);
        self.get_with(path, &[("authorization", auth.as_str())])
            .await
    }

    /// GET with exactly these headers (no key unless given).
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request(&format!("{}{path}", self.base), headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}\nlog:\n{}", self.log()))
    }

    /// GET `url` with the client this proxy takes (HTTPS or plain).
    async fn request(&self, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        match &self.https {
            Some(https) => request_via(https, url, headers).await,
            None => request(url, headers).await,
        }
    }

    /// Mints another key in this proxy's control store.
    pub fn add_key(&self, tier: &str, tenant: &str) -> String {
        let key = add_key(&self.dir.0.join("config.toml"), tier, tenant);
        self.minted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(key.clone());
        key
    }

    /// Runs `dashcache-proxy keys ARGS` against this proxy's config.
    pub fn keys(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_dashcache-proxy"))
            .arg("--config")
            .arg(self.dir.0.join("config.toml"))
            .arg("keys")
            .args(args)
            .output()
            .expect("run dashcache-proxy keys")
    }

    pub async fn metric(&self, name: &str) -> f64 {
        metric(&self.get("/metrics").await.text(), name)
    }

    /// The proxy's resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits (bounded) for the process to exit; its exit status.
    pub async fn exit_status(&mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("proxy did not exit; log:\n{}", self.log());
    }

    /// Kills the process at once (no graceful shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("proxy.log")).unwrap_or_default()
    }
}

impl Drop for Proxy {
    /// Stops the process, then greps its log for every key minted for it:
    /// a test run's logs never hold a full key (names by id only).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            return;
        }
        let log = self.log();
        let minted = self
            .minted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for key in minted.iter() {
            assert!(
                !log.contains(key.as_str()),
                "an API key is in the proxy's log ({}):\n{log}",
                self.dir.0.join("proxy.log").display()
            );
        }
    }
}

/// Mints a key with the CLI, as an operator would.
fn add_key(config: &Path, tier: &str, tenant: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dashcache-proxy"))
        .arg("--config")
        .arg(config)
        .args([
            "keys", "add", "--tier", tier, "--tenant", tenant, "--label", "test",
        ])
        .output()
        .expect("run dashcache-proxy keys add");
    assert!(
        out.status.success(),
        "keys add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The shipped config.toml, pointed at the test servers, with a fresh key prefix.
fn test_config(options: &ProxyOptions, dir: &Path) -> String {
    let shipped = std::fs::read_to_string(root().join("config.toml")).expect("config.toml");
    let mut config: toml::Table = shipped.parse().expect("config.toml parses");
    let set = |config: &mut toml::Table, section: &str, key: &str, value: toml::Value| {
        config
            .entry(section)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .expect("section is a table")
            .insert(key.into(), value);
    };
    set(
        &mut config,
        "redis",
        "url",
        options.redis_url.clone().into(),
    );
    set(&mut config, "redis", "retry_after", "200ms".into());
    set(
        &mut config,
        "clickhouse",
        "url",
        options.clickhouse_url.clone().into(),
    );
    let prefix = options.key_prefix.clone().unwrap_or_else(|| unique("it"));
    set(&mut config, "cache", "key_prefix", prefix.into());
    let store = options
        .store_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/control.db", dir.display()));
    set(&mut config, "store", "url", store.into());
    set(&mut config, "auth", "reload_interval", "200ms".into());
    for (section, key, value) in &options.set {
        set(&mut config, section, key, value.clone());
    }
    for section in &options.without {
        config.remove(*section);
    }
    for section in ["query", "export"] {
        let Some(tables) = config.get_mut(section).and_then(|q| q.as_table_mut()) else {
            continue;
        };
        for (_, query) in tables.iter_mut() {
            let table = query.as_table_mut().expect("query table");
            let sql = table["sql"].as_str().expect("sql path").to_owned();
            table.insert("sql".into(), root().join(sql).display().to_string().into());
        }
    }
    let mut text = toml::to_string(&config).expect("config serializes");
    text.push('\n');
    text.push_str(&options.extra);
    for (name, sql, body) in &options.extra_queries {
        let file = dir.join(format!("{name}.sql"));
        std::fs::write(&file, sql).expect("write sql");
        text.push_str(&format!(
            "\n[query.{name}]\nsql = {:?}\n{body}\n",
            file.display().to_string()
        ));
    }
    text
}

/// One complete HTTP answer. `body` is an error when the transfer was cut.
pub struct Reply {
    pub status: u16,
    /// The HTTP version the answer came in (HTTP/2 when ALPN chose it).
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Reply {
    pub fn text(&self) -> String {
        match &self.body {
            Ok(body) => String::from_utf8_lossy(body).into_owned(),
            Err(e) => panic!("body was cut: {e}"),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn cache(&self) -> &str {
        self.header("x-cache").unwrap_or("-")
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn get(url: &str) -> Result<Reply, String> {
    request(url, &[]).await
}

/// A client for `https://` (and `http://`) URLs: trusts what `tls` trusts,
/// offers HTTP/2 and HTTP/1.1 by ALPN.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

pub fn https_client(tls: Arc<rustls::ClientConfig>) -> HttpsClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_all_versions()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

pub async fn request(url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    request_method(http::Method::GET, url, headers).await
}

/// A request with any method (no body).
pub async fn request_method(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    request_via_method(&client(), method, url, headers).await
}

/// GET `url` through `client`, the body read to its end.
pub async fn request_via<C>(
    client: &Client<C, Empty<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    request_via_method(client, http::Method::GET, url, headers).await
}

/// A request with any method (no body) through `client`, the body read to its end.
async fn request_via_method<C>(
    client: &Client<C, Empty<Bytes>>,
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let mut builder = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder.body(Empty::new()).map_err(|e| format!("{e}"))?;
    let response = client.request(req).await.map_err(|e| chain(&e))?;
    let status = response.status().as_u16();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("{e}"));
    Ok(Reply {
        status,
        version,
        headers,
        body,
    })
}

/// An error and its sources, `: `-separated (a TLS failure is a few levels down).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(&format!(": {err}"));
        source = err.source();
    }
    text
}

/// Runs SQL on ClickHouse directly (not through the proxy).
pub async fn clickhouse(sql: &str) -> String {
    let url = format!(
        "{}/?output_format_json_quote_64bit_integers=0&query={}",
        clickhouse_url(),
        form_urlencoded::byte_serialize(sql.as_bytes()).collect::<String>()
    );
    let reply = get(&url).await.expect("ClickHouse answers");
    assert_eq!(reply.status, 200, "ClickHouse: {}", reply.text());
    reply.text()
}

/// The value of a metric line `name` (exact series, labels included), 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A dedicated Redis server on its own port, for fault tests.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/services up installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on {}", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP relay to the real ClickHouse that a test can cut and restore, to make
/// ClickHouse unreachable for one proxy without stopping it for the others;
/// or hold, to keep ClickHouse's answers from the proxy until released (a
/// query that lasts exactly as long as the test wants, on any machine).
pub struct Relay {
    pub port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Open: answers pass. Closed (`hold`): requests still reach ClickHouse,
    /// its answers wait in the relay.
    gate: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start() -> Relay {
        let mut relay = Relay {
            port: free_port(),
            task: None,
            gate: tokio::sync::watch::Sender::new(true),
        };
        relay.restore().await;
        relay
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops listening and drops every relayed connection.
    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// From now on ClickHouse's answers wait in the relay (the requests still
    /// go through), until `release`.
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    /// Lets held and later answers through.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    pub async fn restore(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("relay port");
        let upstream = clickhouse_url().trim_start_matches("http://").to_owned();
        let gate = self.gate.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let mut gate = gate.subscribe();
                connections.spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let requests = async {
                        let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
                        let _ = to_server.shutdown().await;
                    };
                    let answers = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                            if gate.wait_for(|open| *open).await.is_err()
                                || to_client.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                        let _ = to_client.shutdown().await;
                    };
                    tokio::join!(requests, answers);
                });
            }
        }));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The shipped config with `options`' overrides, as `Proxy::start_with`
/// writes it (for other processes sharing it, like the scheduler).
pub fn config_text(options: &ProxyOptions, dir: &Path) -> String {
    test_config(options, dir)
}

/// The second ClickHouse (same demo data, other ports) that `scripts/test`
/// starts with `scripts/services`: a replica for failover tests.
pub fn replica_http_port() -> u16 {
    std::env::var("DASHCACHE_CH2_HTTP_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8124)
}

pub fn replica_tcp_port() -> u16 {
    std::env::var("DASHCACHE_CH2_TCP_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9001)
}

pub fn replica_clickhouse_url() -> String {
    format!("http://127.0.0.1:{}", replica_http_port())
}

/// Runs `scripts/services ACTION clickhouse` for the replica's ports.
pub fn replica_services(action: &str) {
    let out = Command::new(root().join("scripts/services"))
        .args([action, "clickhouse"])
        .env("DASHCACHE_CH_HTTP_PORT", replica_http_port().to_string())
        .env("DASHCACHE_CH_TCP_PORT", replica_tcp_port().to_string())
        .output()
        .expect("run scripts/services");
    assert!(
        out.status.success(),
        "scripts/services {action} clickhouse (replica): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A three-master Redis Cluster on loopback, each node with its own dir.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: TempDir,
    children: Vec<Child>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let mut cluster = RedisCluster {
            ports: (0..3).map(|_| free_port()).collect(),
            dir: TempDir::new("redis-cluster"),
            children: Vec::new(),
        };
        cluster.restart().await;
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok().await;
        cluster
    }

    /// Seed node URLs for `[redis] cluster_nodes`.
    pub fn nodes(&self) -> toml::Value {
        toml::Value::Array(
            self.ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}").into())
                .collect(),
        )
    }

    /// Starts every node (again: each keeps its `nodes.conf`, so the
    /// cluster comes back as it was).
    pub async fn restart(&mut self) {
        for port in &self.ports {
            let dir = self.dir.0.join(port.to_string());
            std::fs::create_dir_all(&dir).expect("node dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (scripts/services up installs it)");
            self.children.push(child);
        }
        for port in &self.ports {
            let mut up = false;
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok() {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(up, "redis cluster node did not start on {port}");
        }
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub async fn wait_ok(&self) {
        for _ in 0..200 {
            let all_ok = self.ports.iter().all(|port| {
                Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if all_ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "redis cluster on {:?} never reached cluster_state:ok",
            self.ports
        );
    }

    pub fn stop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis master, one replica and one Sentinel watching them (quorum 1,
/// fast failure detection), each on its own loopback port and dir.
pub struct RedisSentinel {
    pub master_port: u16,
    pub replica_port: u16,
    pub sentinel_port: u16,
    pub name: String,
    dir: TempDir,
    master: Option<Child>,
    others: Vec<Child>,
}

impl RedisSentinel {
    pub async fn start() -> RedisSentinel {
        let mut group = RedisSentinel {
            master_port: free_port(),
            replica_port: free_port(),
            sentinel_port: free_port(),
            name: "dashcache-it".into(),
            dir: TempDir::new("redis-sentinel"),
            master: None,
            others: Vec::new(),
        };
        let redis = |port: u16, extra: &[String]| {
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (scripts/services up installs it)")
        };
        group.master = Some(redis(group.master_port, &[]));
        wait_port(group.master_port).await;
        let replicaof = vec![
            "--replicaof".to_string(),
            "127.0.0.1".to_string(),
            group.master_port.to_string(),
        ];
        group.others.push(redis(group.replica_port, &replicaof));
        wait_port(group.replica_port).await;
        let synced = until_output(
            group.master_port,
            &["info", "replication"],
            "connected_slaves:1",
        )
        .await;
        assert!(synced, "the replica never connected to its master");
        let config = group.dir.0.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {name} 500\n\
                 sentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 1\n",
                port = group.sentinel_port,
                dir = group.dir.0.display(),
                name = group.name,
                master = group.master_port,
            ),
        )
        .expect("sentinel.conf");
        let sentinel = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        group.others.push(sentinel);
        wait_port(group.sentinel_port).await;
        let knows_replica = until_output(
            group.sentinel_port,
            &["sentinel", "replicas", &group.name],
            &group.replica_port.to_string(),
        )
        .await;
        assert!(knows_replica, "the sentinel never found the replica");
        group
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.sentinel_port)
    }

    /// Kills the master: the sentinel promotes the replica.
    pub fn kill_master(&mut self) {
        if let Some(mut child) = self.master.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the sentinel names the replica as the master.
    pub async fn await_failover(&self) -> bool {
        until_output(
            self.sentinel_port,
            &["sentinel", "get-master-addr-by-name", &self.name],
            &self.replica_port.to_string(),
        )
        .await
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        self.kill_master();
        for mut child in self.others.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

/// Polls `redis-cli -p PORT ARGS` (bounded, ~15 s) until its output contains `needle`.
async fn until_output(port: u16, args: &[&str], needle: &str) -> bool {
    for _ in 0..300 {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output();
        if let Ok(out) = out
            && String::from_utf8_lossy(&out.stdout).contains(needle)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A TCP server that accepts connections and never answers (a black-holed
/// Redis: packets go in, nothing comes back, nothing is refused).
pub struct BlackHole {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("black hole port");
        let port = listener.local_addr().expect("black hole address").port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(1..) = inbound.read(&mut buf).await {}
                });
            }
        });
        BlackHole { port, task }
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
