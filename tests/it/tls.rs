//! TLS with certificates this test makes (rcgen). On the proxy's listeners
//! (the API's and the ClickHouse-compatible endpoint's): the same answers as
//! over plain HTTP, HTTP/2 chosen by ALPN, a certificate
//! replaced on disk served to new connections while a request in flight on
//! an old one completes, a bad replacement kept out, and mutual TLS. To
//! ClickHouse (`https://`, through a TLS relay in front of the real server)
//! and Redis (`rediss://`, a real `redis-server --tls-port`): verified
//! against the configured `ca`, refused without it; the ClickHouse-compatible
//! endpoint's own client to ClickHouse too.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::harness::{Proxy, ProxyOptions, https_client, request_via};

/// A certificate authority made for one test (the browser tests use it too).
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, and the certificate as DER.
pub(crate) struct Issued {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for the proxy on loopback.
    fn server(&self, name: &str) -> Issued {
        self.issue(
            name,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A server certificate for these names (DNS names or IP addresses).
    pub(crate) fn server_for(&self, names: &[&str]) -> Issued {
        self.issue(names[0], names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, name: &str) -> Issued {
        self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("CA root");
        roots
    }

    /// A client trusting this CA (no client certificate).
    pub(crate) fn trusting(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(self.roots())
                .with_no_client_auth(),
        )
    }

    /// A client trusting this CA that presents `identity`.
    fn trusting_as(&self, identity: &Issued) -> Arc<rustls::ClientConfig> {
        let chain = vec![identity.der.clone()];
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("client key");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(self.roots())
                .with_client_auth_cert(chain, key)
                .expect("client certificate"),
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Writes `issued` as `cert.pem` and `key.pem` in `dir` the way certbot and
/// editors do: each file renamed into place whole.
pub(crate) fn install(dir: &Path, issued: &Issued) {
    for (name, text) in [("cert.pem", &issued.cert_pem), ("key.pem", &issued.key_pem)] {
        let temporary = dir.join(format!(".{name}.new"));
        std::fs::write(&temporary, text).expect("write PEM");
        std::fs::rename(&temporary, dir.join(name)).expect("rename PEM");
    }
}

/// A directory for the proxy's certificate files, outside the proxy's own.
pub(crate) fn cert_dir(name: &str) -> crate::harness::TempDir {
    crate::harness::TempDir::new(name)
}

/// `[proxy.tls]` pointing at `dir`'s files.
pub(crate) fn tls_table(dir: &Path, client_ca: Option<PathBuf>) -> toml::Value {
    let mut table = toml::Table::new();
    table.insert(
        "cert".into(),
        dir.join("cert.pem").display().to_string().into(),
    );
    table.insert(
        "key".into(),
        dir.join("key.pem").display().to_string().into(),
    );
    if let Some(ca) = client_ca {
        table.insert("client_ca".into(), ca.display().to_string().into());
    }
    toml::Value::Table(table)
}

async fn https_proxy(
    dir: &Path,
    client_ca: Option<PathBuf>,
    client: Arc<rustls::ClientConfig>,
) -> Proxy {
    Proxy::start_with(ProxyOptions {
        set: vec![("proxy", "tls", tls_table(dir, client_ca))],
        client_tls: Some(client),
        ..Default::default()
    })
    .await
}

/// The certificate the proxy presents to a new connection now.
async fn served_certificate(
    port: u16,
    client: Arc<rustls::ClientConfig>,
) -> Result<CertificateDer<'static>, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, connection) = tls.get_ref();
    connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| cert.clone().into_owned())
        .ok_or_else(|| "no certificate".to_string())
}

pub(crate) fn port_of(proxy: &Proxy) -> u16 {
    proxy
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in base URL")
}

/// Line count and an order-independent checksum (rows come in no fixed order).
fn digest(body: &[u8]) -> (usize, u64) {
    use std::hash::{DefaultHasher, Hash, Hasher};
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

/// A JSON answer without its timings (`statistics`).
fn answer(reply: &crate::harness::Reply) -> (serde_json::Value, serde_json::Value) {
    let json = reply.json();
    (json["meta"].clone(), json["data"].clone())
}

const QUERY: &str = "/v1/query/revenue?from=today-14d&to=today&granularity=day";
const EXPORT: &str = "/v1/export/events?from=today-2d&to=today&format=ndjson";

#[tokio::test]
async fn https_answers_as_http_does_and_negotiates_http2() {
    let ca = Ca::new("dashcache-it CA");
    let dir = cert_dir("tls-same");
    install(&dir.0, &ca.server("proxy"));
    let secure = https_proxy(&dir.0, None, ca.trusting()).await;
    let plain = Proxy::start().await;
    assert!(secure.base.starts_with("https://"), "{}", secure.base);

    let over_tls = secure.get(QUERY).await;
    let over_http = plain.get(QUERY).await;
    assert_eq!(over_tls.status, 200, "{}", over_tls.text());
    assert_eq!(answer(&over_tls), answer(&over_http));
    // The harness's HTTPS client offers h2 and http/1.1: ALPN picks HTTP/2.
    assert_eq!(over_tls.version, http::Version::HTTP_2);
    assert_eq!(over_http.version, http::Version::HTTP_11);

    let export_tls = secure.get(EXPORT).await;
    let export_http = plain.get(EXPORT).await;
    assert_eq!(export_tls.status, 200);
    assert_eq!(export_tls.version, http::Version::HTTP_2);
    let rows = digest(export_tls.body.as_ref().expect("complete export"));
    assert!(rows.0 > 1000, "{} rows", rows.0);
    assert_eq!(
        rows,
        digest(export_http.body.as_ref().expect("complete export"))
    );

    // The ClickHouse-compatible endpoint's listener is HTTPS too: the same
    // answer, over HTTP/2.
    let (endpoint_tls, endpoint_http) = (
        endpoint(&secure, &https_client(ca.trusting())).await,
        endpoint(&plain, &https_client(ca.trusting())).await,
    );
    assert!(secure.ch_base.starts_with("https://"), "{}", secure.ch_base);
    assert_eq!(endpoint_tls.status, 200, "{}", endpoint_tls.text());
    assert_eq!(endpoint_tls.version, http::Version::HTTP_2);
    assert_eq!(endpoint_http.version, http::Version::HTTP_11);
    assert_eq!(endpoint_tls.text(), endpoint_http.text());
    assert!(endpoint_tls.text().lines().count() > 1);

    // A client offering only HTTP/1.1 gets HTTP/1.1 over TLS.
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*ca.trusting()).clone())
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector);
    let auth = format!("Bearer {}", secure.key);
    let reply = request_via(
        &client,
        &format!("{}{QUERY}", secure.base),
        &[("authorization", &auth)],
    )
    .await
    .expect("HTTP/1.1 over TLS");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.version, http::Version::HTTP_11);
    assert_eq!(answer(&reply), answer(&over_http));

    // Plain HTTP to the TLS port is not served.
    let plain_to_tls =
        crate::harness::get(&format!("http://127.0.0.1:{}/healthz", port_of(&secure))).await;
    assert!(
        plain_to_tls.map_or(true, |r| r.status >= 400),
        "plain HTTP was answered on the TLS port"
    );
}

#[tokio::test]
async fn replaced_certificate_files_are_served_to_new_connections_while_old_ones_finish() {
    let ca = Ca::new("dashcache-it CA");
    let dir = cert_dir("tls-reload");
    let first = ca.server("first");
    install(&dir.0, &first);
    let proxy = https_proxy(&dir.0, None, ca.trusting()).await;
    let port = port_of(&proxy);
    assert_eq!(
        served_certificate(port, ca.trusting()).await,
        Ok(first.der.clone())
    );

    // An export in flight on a connection made with the first certificate:
    // its head and first chunk read, the rest not yet.
    let client = https_client(ca.trusting());
    let req = http::Request::get(format!("{}{EXPORT}", proxy.base))
        .header("authorization", format!("Bearer {}", proxy.key))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = client.request(req).await.expect("export starts");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let frame = body
        .frame()
        .await
        .expect("a first chunk")
        .expect("readable");
    received.extend_from_slice(frame.data_ref().expect("data"));

    // A bad replacement (not PEM) is refused: the first certificate stays.
    std::fs::write(dir.0.join(".cert.pem.new"), "not a certificate").expect("write");
    std::fs::rename(dir.0.join(".cert.pem.new"), dir.0.join("cert.pem")).expect("rename");
    let kept = until(|| async {
        proxy
            .log()
            .contains("TLS certificate not reloaded: keeping the current one")
    })
    .await;
    assert!(kept, "no refusal logged:\n{}", proxy.log());
    assert_eq!(
        served_certificate(port, ca.trusting()).await,
        Ok(first.der.clone())
    );

    // The renewal: new handshakes get the second certificate.
    let second = ca.server("second");
    install(&dir.0, &second);
    let switched = until(|| async {
        served_certificate(port, ca.trusting()).await.as_ref() == Ok(&second.der)
    })
    .await;
    assert!(
        switched,
        "the new certificate is not served:\n{}",
        proxy.log()
    );
    assert!(proxy.log().contains("TLS certificate reloaded"));

    // The export in flight reads to its end, complete.
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|e| panic!("export cut: {e}\n{}", proxy.log()));
        if let Some(data) = frame.data_ref() {
            received.extend_from_slice(data);
        }
    }
    let whole = proxy.get(EXPORT).await;
    assert_eq!(
        digest(&received),
        digest(whole.body.as_ref().expect("complete export"))
    );

    // SIGHUP reloads too, and says so.
    let third = ca.server("third");
    install(&dir.0, &third);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let switched = until(|| async {
        served_certificate(port, ca.trusting()).await.as_ref() == Ok(&third.der)
    })
    .await;
    assert!(switched, "not switched after SIGHUP:\n{}", proxy.log());
    let hup = until(|| async {
        proxy
            .log()
            .contains("SIGHUP: only TLS certificates are reloaded")
    })
    .await;
    assert!(hup, "{}", proxy.log());
    assert_eq!(proxy.get(QUERY).await.status, 200);
}

#[tokio::test]
async fn with_client_ca_only_clients_with_a_certificate_from_it_are_served() {
    let ca = Ca::new("dashcache-it CA");
    let clients = Ca::new("dashcache-it client CA");
    let dir = cert_dir("tls-mtls");
    install(&dir.0, &ca.server("proxy"));
    let client_ca = dir.0.join("clients.pem");
    std::fs::write(&client_ca, clients.pem()).expect("write client CA");
    let identity = clients.client("dashboard");
    let proxy = https_proxy(&dir.0, Some(client_ca), ca.trusting_as(&identity)).await;

    let served = proxy.get(QUERY).await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(served.version, http::Version::HTTP_2);

    let auth = format!("Bearer {}", proxy.key);
    let url = format!("{}{QUERY}", proxy.base);
    let anonymous = request_via(
        &https_client(ca.trusting()),
        &url,
        &[("authorization", &auth)],
    )
    .await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was served: {}",
        anonymous.map(|r| r.status).unwrap_or_default()
    );

    // The ClickHouse-compatible endpoint shares the listener settings: mutual
    // TLS there too.
    let endpoint_served = endpoint(&proxy, &https_client(ca.trusting_as(&identity))).await;
    assert_eq!(endpoint_served.status, 200, "{}", endpoint_served.text());
    let endpoint_anonymous = request_via(
        &https_client(ca.trusting()),
        &endpoint_url(&proxy),
        &[("authorization", &crate::chhttp::basic("", &proxy.key))],
    )
    .await;
    assert!(
        endpoint_anonymous.is_err(),
        "the endpoint served a client without a certificate"
    );

    // A certificate from another CA is refused too.
    let stranger = ca.client("stranger");
    let foreign = request_via(
        &https_client(ca.trusting_as(&stranger)),
        &url,
        &[("authorization", &auth)],
    )
    .await;
    assert!(foreign.is_err(), "a client of another CA was served");
}

/// A read-only statement on the proxy's ClickHouse-compatible endpoint (GET
/// with `query=`, as ClickHouse's HTTP interface takes it).
fn endpoint_url(proxy: &Proxy) -> String {
    let sql = "SELECT country, count() FROM demo.events WHERE tenant_id = 'acme' \
               GROUP BY country ORDER BY country FORMAT TSV";
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", sql)
        .finish();
    format!("{}/?{query}", proxy.ch_base)
}

/// [`endpoint_url`]'s answer through `client`, with the proxy's key.
async fn endpoint(proxy: &Proxy, client: &crate::harness::HttpsClient) -> crate::harness::Reply {
    let auth = crate::chhttp::basic("", &proxy.key);
    request_via(client, &endpoint_url(proxy), &[("authorization", &auth)])
        .await
        .unwrap_or_else(|e| panic!("the endpoint: {e}\n{}", proxy.log()))
}

/// TLS in front of the real ClickHouse: accepts with `issued` and relays
/// each connection to ClickHouse's HTTP port. Stops when dropped.
struct TlsRelay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl TlsRelay {
    async fn start(issued: &Issued) -> TlsRelay {
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![issued.der.clone()], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay port");
        let port = listener.local_addr().expect("relay address").port();
        let upstream = crate::harness::clickhouse_url()
            .trim_start_matches("http://")
            .to_owned();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut inbound) = acceptor.accept(inbound).await else {
                        return;
                    };
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        TlsRelay { port, task }
    }
}

impl Drop for TlsRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn clickhouse_over_https_is_verified_against_the_configured_ca() {
    let ca = Ca::new("dashcache-it ClickHouse CA");
    let relay = TlsRelay::start(&ca.server("clickhouse")).await;
    let dir = cert_dir("tls-clickhouse");
    let ca_file = dir.0.join("clickhouse-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let url = format!("https://127.0.0.1:{}", relay.port);
    let trusting = Proxy::start_with(ProxyOptions {
        clickhouse_url: url.clone(),
        set: vec![("clickhouse", "ca", ca_file.display().to_string().into())],
        ..Default::default()
    })
    .await;
    let plain = Proxy::start().await;
    let over_tls = trusting.get(QUERY).await;
    assert_eq!(over_tls.status, 200, "{}", over_tls.text());
    assert_eq!(answer(&over_tls), answer(&plain.get(QUERY).await));
    assert_eq!(trusting.get("/readyz").await.status, 200);
    // Exports go on a connection of their own (`direct`), over TLS as well.
    let export_tls = trusting.get(EXPORT).await;
    assert_eq!(export_tls.status, 200, "{}", export_tls.text());
    let rows = digest(export_tls.body.as_ref().expect("complete export"));
    assert!(rows.0 > 1000, "{} rows", rows.0);
    assert_eq!(
        rows,
        digest(
            plain
                .get(EXPORT)
                .await
                .body
                .as_ref()
                .expect("complete export")
        )
    );

    // Without `ca` only the built-in public roots are trusted: this server is not.
    let untrusting = Proxy::start_with(ProxyOptions {
        clickhouse_url: url,
        ..Default::default()
    })
    .await;
    let refused = untrusting.get(QUERY).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let refused = untrusting.get(EXPORT).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    let ready = untrusting.get("/readyz").await;
    assert_eq!(
        ready.json()["checks"]["clickhouse"]["ok"],
        false,
        "{}",
        ready.text()
    );
}

/// The ClickHouse-compatible endpoint with ClickHouse behind `https://`: its
/// cached (MISS, then HIT) and passed-through statements reach ClickHouse
/// over TLS, verified against `clickhouse.ca` like the named API's.
#[tokio::test]
async fn the_clickhouse_endpoint_reaches_clickhouse_over_https_verified_against_the_configured_ca()
{
    use crate::chhttp::{basic, send};
    let ca = Ca::new("dashcache-it ClickHouse CA");
    let relay = TlsRelay::start(&ca.server("clickhouse")).await;
    let dir = cert_dir("tls-chhttp");
    let ca_file = dir.0.join("clickhouse-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let url = format!("https://127.0.0.1:{}", relay.port);
    let trusting = Proxy::start_with(ProxyOptions {
        clickhouse_url: url.clone(),
        set: vec![("clickhouse", "ca", ca_file.display().to_string().into())],
        ..Default::default()
    })
    .await;
    let plain = Proxy::start().await;
    let ask = |proxy: &Proxy, sql: &'static str| {
        let auth = basic("test", &proxy.key);
        let url = format!("{}/", proxy.ch_base);
        async move { send(&url, &[("authorization", auth.as_str())], Some(sql)).await }
    };
    // Cached by the default rule: computed over TLS, then a hit.
    let cached = "SELECT country, count() AS n FROM demo.events WHERE tenant_id = 'acme' \
                  GROUP BY country ORDER BY country FORMAT TSV";
    // `system.` tables are passed through (ttl 0 in the shipped rules).
    let passed = "SELECT name FROM system.databases WHERE name = 'demo' FORMAT TSV";
    let expected = ask(&plain, cached).await;
    assert_eq!(expected.status, 200, "{}", expected.text());
    let first = ask(&trusting, cached).await;
    assert_eq!(first.status, 200, "{}\n{}", first.text(), trusting.log());
    assert_eq!(first.cache(), "MISS");
    assert_eq!(first.text(), expected.text());
    let again = ask(&trusting, cached).await;
    assert_eq!(again.cache(), "HIT");
    assert_eq!(again.text(), expected.text());
    let through = ask(&trusting, passed).await;
    assert_eq!(through.status, 200, "{}", through.text());
    assert_eq!(through.cache(), "BYPASS");
    assert_eq!(through.text(), "demo\n");

    // Without `ca` the built-in public roots decide: this server is not
    // trusted, and the endpoint answers as ClickHouse does when unreachable.
    let untrusting = Proxy::start_with(ProxyOptions {
        clickhouse_url: url,
        ..Default::default()
    })
    .await;
    for sql in [cached, passed] {
        let refused = ask(&untrusting, sql).await;
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(
            refused.header("x-clickhouse-exception-code"),
            Some("210"),
            "{}",
            refused.text()
        );
    }
}

/// A Redis server that speaks only TLS (`--tls-port`), with `issued` as its
/// certificate, on its own port. Killed on drop.
struct TlsRedis {
    port: u16,
    child: std::process::Child,
    _dir: crate::harness::TempDir,
}

impl TlsRedis {
    async fn start(issued: &Issued) -> TlsRedis {
        let dir = cert_dir("tls-redis");
        install(&dir.0, issued);
        let port = crate::harness::free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(dir.0.join("cert.pem"))
            .arg("--tls-key-file")
            .arg(dir.0.join("key.pem"))
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/services up installs it)");
        let listening =
            until(|| async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() }).await;
        assert!(listening, "redis-server --tls-port did not start");
        TlsRedis {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn redis_over_rediss_is_verified_against_the_configured_ca() {
    let ca = Ca::new("dashcache-it Redis CA");
    let redis = TlsRedis::start(&ca.server("redis")).await;
    let dir = cert_dir("tls-redis-ca");
    let ca_file = dir.0.join("redis-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let trusting = Proxy::start_with(ProxyOptions {
        redis_url: url.clone(),
        set: vec![
            ("redis", "ca", ca_file.display().to_string().into()),
            // No in-process cache: a HIT comes from Redis, over TLS.
            ("cache", "l1_max_bytes", 0.into()),
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(trusting.get("/readyz").await.status, 200);
    let first = trusting.get(QUERY).await;
    assert_eq!(first.status, 200, "{}", first.text());
    let stored = until(|| async { trusting.get(QUERY).await.cache() == "HIT" }).await;
    assert!(
        stored,
        "no answer came back from Redis:\n{}",
        trusting.log()
    );

    // Without `ca` the system's trust store decides: this server is not in it.
    let untrusting = Proxy::start_with(ProxyOptions {
        redis_url: url,
        ..Default::default()
    })
    .await;
    let ready = untrusting.get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(
        ready.json()["checks"]["redis"]["ok"],
        false,
        "{}",
        ready.text()
    );
    assert_eq!(
        ready.json()["checks"]["clickhouse"]["ok"],
        true,
        "{}",
        ready.text()
    );
}

/// Polls `condition` (bounded, ~30 s) until it holds.
async fn until<F, Fut>(condition: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
