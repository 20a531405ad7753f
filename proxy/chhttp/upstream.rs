//! Sending a statement to ClickHouse as the client asked it, and reading the answer safely.
//!
//! Owns the raw HTTP exchange of the ClickHouse-compatible endpoint: a POST
//! of the SQL with the forwarded parameters (and dashcache's `readonly` and
//! limits) as the tier's ClickHouse user, over `http://` or `https://` (the
//! server's certificate checked against `clickhouse.ca`, with the same rustls
//! client config as the named API's clients), to the configured replicas in turn
//! when one cannot be reached before its answer starts. [`Exchange`] is a
//! [`dashcache::fill::Upstream`] (nothing is sent before the first read), so
//! misses go through the same `Filler` — lock, coalescing, retry once, store
//! — as the named API. [`RawAnswer`] keeps ClickHouse's response headers and,
//! like `dashcache::clickhouse::Answer`, holds back the body's last
//! [`TAIL_HOLDBACK`](dashcache::holdback::TAIL_HOLDBACK) bytes until the end ([`Holdback`]) and fails an answer ClickHouse
//! appended an exception to (every framing `exception_start` knows), so such
//! a body is never stored and a client sees a broken stream, not a clean end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashcache::clickhouse::{UpstreamError, error_code, exception_start};
use dashcache::fill::{AnswerStream, Upstream};
use dashcache::format::Format;
use dashcache::holdback::{GATHER, Holdback};
use dashcache::metrics::Metrics;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Response headers of ClickHouse kept with an answer and replayed on hits.
pub const KEPT_HEADERS: [&str; 5] = [
    "content-type",
    "x-clickhouse-format",
    "x-clickhouse-timezone",
    "x-clickhouse-server-display-name",
    "x-clickhouse-summary",
];

/// Largest error body read from ClickHouse.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The HTTP client and the servers, shared by every request.
#[derive(Clone)]
pub struct Servers {
    /// `http://` and `https://` servers; over TLS, certificates are checked
    /// as the named API's clients check them (`clickhouse.ca`).
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    urls: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Servers {
    /// `tls`: the client config for `https://` servers
    /// (`dashcache::tls::clickhouse_client_config`).
    pub fn new(urls: Vec<String>, tls: rustls::ClientConfig, metrics: Arc<Metrics>) -> Servers {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = dashcache::tls::clickhouse_connector(tls, http);
        Servers {
            client: Client::builder(TokioExecutor::new()).build(connector),
            urls: Arc::new(urls),
            next: Arc::default(),
            metrics,
        }
    }
}

/// One statement to run, with everything it is sent with.
pub struct Exchange {
    pub servers: Servers,
    pub sql: String,
    /// Parameters in the URL (settings, `database`, `default_format`, …).
    pub params: Vec<(String, String)>,
    pub user: String,
    pub password: Option<String>,
    /// The format the body is in, as far as exception detection needs it.
    pub detect: Format,
    /// Bound on waiting for the answer to start and for each chunk.
    pub read_timeout: Duration,
}

impl Exchange {
    /// Starts the exchange (nothing is sent before the first `next`).
    pub fn start(self: &Arc<Self>, query_id: &str) -> RawAnswer {
        self.servers.metrics.clickhouse_queries.inc();
        RawAnswer {
            exchange: self.clone(),
            query_id: query_id.to_owned(),
            body: None,
            headers: Vec::new(),
            tail: Holdback::new(),
        }
    }

    fn request(&self, url: &str, query_id: &str) -> Result<http::Request<Full<Bytes>>, String> {
        use base64::Engine as _;
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("query_id", query_id);
        for (name, value) in &self.params {
            query.append_pair(name, value);
        }
        let credentials = format!("{}:{}", self.user, self.password.as_deref().unwrap_or(""));
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        );
        http::Request::post(format!("{}/?{}", url.trim_end_matches('/'), query.finish()))
            .header(http::header::AUTHORIZATION, auth)
            .body(Full::new(Bytes::from(self.sql.clone())))
            .map_err(|e| e.to_string())
    }

    /// Sends to the servers in turn until one answers.
    async fn send(&self, query_id: &str) -> Result<http::Response<Incoming>, UpstreamError> {
        let urls = &self.servers.urls;
        if urls.is_empty() {
            return Err(UpstreamError::Connect(
                "no ClickHouse server configured".into(),
            ));
        }
        let first = self.servers.next.fetch_add(1, Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..urls.len() {
            let url = &urls[(first + i) % urls.len()];
            let request = self
                .request(url, query_id)
                .map_err(UpstreamError::Connect)?;
            match tokio::time::timeout(self.read_timeout, self.servers.client.request(request))
                .await
            {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(err)) if err.is_connect() => last = format!("{url}: {err}"),
                Ok(Err(err)) => return Err(UpstreamError::Connect(format!("{url}: {err}"))),
                Err(_) => return Err(UpstreamError::Timeout(self.read_timeout)),
            }
        }
        Err(UpstreamError::Connect(last))
    }
}

/// An [`Exchange`] as a fill's upstream: every computation of the key runs
/// it (with a fresh query id).
pub struct Fill(pub Arc<Exchange>);

impl Upstream for Fill {
    fn query(
        &self,
        _sql: &str,
        _format: Format,
        query_id: &str,
    ) -> Result<Box<dyn AnswerStream>, UpstreamError> {
        Ok(Box::new(self.0.start(query_id)))
    }

    fn replicas(&self) -> usize {
        self.0.servers.urls.len()
    }
}

/// ClickHouse's answer being read: chunks known not to be (part of) an
/// appended exception, and the response headers to keep.
pub struct RawAnswer {
    exchange: Arc<Exchange>,
    query_id: String,
    body: Option<Incoming>,
    headers: Vec<(String, String)>,
    tail: Holdback,
}

impl RawAnswer {
    /// The response headers kept (after the first `next`).
    pub fn kept_headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The next safe chunk; `None` at the verified end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        if self.body.is_none() && !self.tail.is_finished() {
            self.open().await?;
        }
        loop {
            if let Some(piece) = self.tail.pass() {
                return Ok(Some(piece));
            }
            if self.tail.is_finished() {
                return Ok(None);
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(None);
            };
            match tokio::time::timeout(self.exchange.read_timeout, body.frame()).await {
                Ok(frame) => self.take(frame)?,
                Err(_) => return Err(UpstreamError::Timeout(self.exchange.read_timeout)),
            }
            // What arrives right after goes along (a frame that is not
            // there yet stays unread).
            while self.tail.wants_more()
                && let Some(body) = self.body.as_mut()
                && let Ok(frame) = tokio::time::timeout(GATHER, body.frame()).await
            {
                self.take(frame)?;
            }
        }
    }

    /// Takes one frame of the body: data, the end, or a break.
    fn take(
        &mut self,
        frame: Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>,
    ) -> Result<(), UpstreamError> {
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.tail.push(data);
                }
                Ok(())
            }
            None => {
                self.body = None;
                self.verify_tail()
            }
            Some(Err(err)) => Err(UpstreamError::Body {
                code: None,
                message: format!("the answer broke off: {err}"),
            }),
        }
    }

    /// Sends the request; an error status becomes [`UpstreamError::Query`]
    /// with ClickHouse's status, code and text.
    async fn open(&mut self) -> Result<(), UpstreamError> {
        let response = self.exchange.send(&self.query_id).await?;
        let status = response.status();
        let header_code = response
            .headers()
            .get("x-clickhouse-exception-code")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        self.headers = KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                let value = response.headers().get(*name)?.to_str().ok()?;
                Some(((*name).to_owned(), value.to_owned()))
            })
            .collect();
        if status.is_success() && header_code.is_none() {
            self.body = Some(response.into_body());
            return Ok(());
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_ERROR_BODY);
        let text = match tokio::time::timeout(self.exchange.read_timeout, body.collect()).await {
            Ok(Ok(collected)) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            _ => String::new(),
        };
        Err(UpstreamError::Query {
            code: header_code.or_else(|| error_code(text.as_bytes())),
            message: text,
            status: Some(status.as_u16()),
        })
    }

    /// Checks the held tail of a complete body for an appended exception.
    fn verify_tail(&mut self) -> Result<(), UpstreamError> {
        let (tail, before) = self.tail.finish();
        if let Some(at) = exception_start(&tail, before, self.exchange.detect) {
            return Err(UpstreamError::Body {
                code: error_code(&tail[at..]),
                message: String::from_utf8_lossy(&tail[at..]).into_owned(),
            });
        }
        if self.exchange.detect == Format::Json
            && (before.is_some() || !tail.is_empty())
            && !tail.trim_ascii_end().ends_with(b"}")
        {
            return Err(UpstreamError::Body {
                code: None,
                message: "JSON answer ended before its closing brace".into(),
            });
        }
        self.tail.keep(tail);
        Ok(())
    }
}

impl AnswerStream for RawAnswer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        Box::pin(self.next_chunk())
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }
}

/// The format a ClickHouse output format name reads as for exception
/// detection: whole JSON documents, JSON lines, CSV, or lines (the rest).
pub fn detect(format: &str) -> Format {
    let upper = format.to_ascii_uppercase();
    if upper.starts_with("JSON") && upper.contains("EACHROW") {
        Format::Ndjson
    } else if upper.starts_with("JSON") {
        Format::Json
    } else if upper.starts_with("CSV") {
        Format::Csv
    } else {
        Format::Tsv
    }
}
