//! An answer read over a connection of its own, driven by its reader.
//!
//! Owns one query sent to one ClickHouse server (`http://` or `https://`) as
//! an HTTP/1.1 `POST` on a fresh connection whose hyper connection future is
//! polled inside the reader's own polls ([`DirectCursor::next`]), not on a
//! task of its own. ClickHouse 18.16 streams its answers in 4 KiB chunks, and
//! a pooled client's connection task hands each one to the reader's task with
//! two wake-ups, often across worker threads: for a long export that hand-off
//! was most of the proxy's cost (BENCHMARKS.md, issue 18). Read here, a chunk
//! costs a function call.
//!
//! What it does not own: which server and which settings
//! ([`crate::clickhouse`] builds the [`Target`] from the config and passes
//! each query's settings), failover before the first byte, the held-back tail
//! and the exception check ([`crate::clickhouse::Answer`]). Its errors are the
//! `clickhouse` crate's (`Network` before an answer, `BadResponse` with the
//! server's text for an error status), so both clients fail alike.
//!
//! For exports only: a connection per query costs a TCP (and TLS) handshake,
//! which a pooled client saves the many small queries of fills.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clickhouse::error::Error;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service;

/// The most of an error answer's body kept as its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

type Stream = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
type Connection = http1::Connection<Stream, Full<Bytes>>;

/// One ClickHouse server as the direct client reaches it: where, as whom, and
/// the settings every query carries.
#[derive(Clone)]
pub struct Target {
    /// `scheme://authority` (what the connector connects to).
    server: Uri,
    /// The URL's path (`/` when it has none), the query string goes after it.
    path: String,
    host: HeaderValue,
    user: HeaderValue,
    password: Option<HeaderValue>,
    settings: Vec<(String, String)>,
    connector: HttpsConnector<HttpConnector>,
}

impl Target {
    /// `url`: the server's `http://` or `https://` URL (`tls` checks the
    /// certificate of the latter); `None` when it is not one, or the user or
    /// password cannot be a header value (the pooled client is used then).
    pub fn new(
        url: &str,
        user: &str,
        password: Option<&str>,
        settings: Vec<(String, String)>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Option<Target> {
        let uri: Uri = url.parse().ok()?;
        let authority = uri.authority()?.clone();
        let server = Uri::builder()
            .scheme(uri.scheme()?.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .ok()?;
        let mut http = HttpConnector::new();
        http.set_keepalive(Some(Duration::from_secs(60)));
        http.set_nodelay(true);
        let connector = crate::tls::clickhouse_connector(Arc::unwrap_or_clone(tls), http);
        Some(Target {
            server,
            path: uri.path().to_owned(),
            host: HeaderValue::from_str(authority.as_str()).ok()?,
            user: HeaderValue::from_str(user).ok()?,
            password: match password {
                Some(password) => {
                    let mut value = HeaderValue::from_str(password).ok()?;
                    value.set_sensitive(true);
                    Some(value)
                }
                None => None,
            },
            settings,
            connector,
        })
    }

    /// Adds (or replaces) a setting every query carries.
    pub fn set(&mut self, name: &str, value: &str) {
        self.settings.retain(|(n, _)| n != name);
        self.settings.push((name.to_owned(), value.to_owned()));
    }

    /// `sql` with `default_format` and these settings on top of the
    /// target's. Nothing is sent until [`DirectCursor::next`].
    pub fn query<'a>(
        &self,
        sql: &str,
        format: &str,
        settings: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<DirectCursor, Error> {
        let mut query = form_urlencoded::Serializer::new(String::with_capacity(256));
        query.append_pair("default_format", format);
        // This query's settings replace the target's of the same name.
        let own: Vec<(&str, &str)> = settings.into_iter().collect();
        for (name, value) in &self.settings {
            if !own.iter().any(|(n, _)| n == name) {
                query.append_pair(name, value);
            }
        }
        for (name, value) in own {
            query.append_pair(name, value);
        }
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}?{}", self.path, query.finish()))
            .header(header::HOST, self.host.clone())
            .header(header::CONTENT_LENGTH, sql.len())
            .header(header::USER_AGENT, "dashcache")
            .header("x-clickhouse-user", self.user.clone());
        if let Some(password) = &self.password {
            request = request.header("x-clickhouse-key", password.clone());
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(sql.as_bytes())))
            .map_err(|e| Error::InvalidParams(Box::new(e)))?;
        Ok(DirectCursor {
            state: State::Unsent(Box::new(Unsent {
                request,
                server: self.server.clone(),
                connector: self.connector.clone(),
            })),
        })
    }
}

/// One query's answer: the body's chunks as they arrive. Dropping it closes
/// the connection (ClickHouse then stops the query at its next write).
pub struct DirectCursor {
    state: State,
}

/// A query not sent yet: what sending it takes.
struct Unsent {
    request: Request<Full<Bytes>>,
    server: Uri,
    connector: HttpsConnector<HttpConnector>,
}

enum State {
    /// (Boxed: larger than the others, and once per query.)
    Unsent(Box<Unsent>),
    Reading {
        /// `None` once it has ended (cleanly; an error ends the body too).
        connection: Option<Pin<Box<Connection>>>,
        body: Incoming,
    },
    /// The body ended cleanly.
    Done,
    /// Failed, or abandoned while sending: never read as an (empty) answer.
    Broken,
}

impl DirectCursor {
    /// The next chunk of the body; `None` at its end. The first call sends
    /// the query and fails with `Network` when the server cannot be reached
    /// (or breaks the connection before its answer), or `BadResponse` with
    /// the server's text for an error status. Cancel-safe once the query was
    /// sent: a chunk that has not arrived stays unread.
    pub async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        if matches!(self.state, State::Unsent(_))
            && let State::Unsent(unsent) = std::mem::replace(&mut self.state, State::Broken)
        {
            let Unsent {
                request,
                server,
                connector,
            } = *unsent;
            let (connection, body) = send(connector, server, request).await?;
            self.state = State::Reading { connection, body };
        }
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Error>> {
        let (connection, body) = match &mut self.state {
            State::Reading { connection, body } => (connection, body),
            State::Done => return Poll::Ready(Ok(None)),
            State::Unsent(_) | State::Broken => {
                return Poll::Ready(Err(Error::Network("the query's answer broke off".into())));
            }
        };
        loop {
            // The connection reads the socket and feeds the body; polled here,
            // in the reader's task, with the reader's waker.
            if let Some(conn) = connection
                && let Poll::Ready(ended) = conn.as_mut().poll(cx)
            {
                *connection = None;
                if let Err(err) = ended {
                    self.state = State::Broken;
                    return Poll::Ready(Err(Error::Network(Box::new(err))));
                }
            }
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    self.state = State::Broken;
                    return Poll::Ready(Err(Error::Network(Box::new(err))));
                }
                Poll::Ready(None) => {
                    self.state = State::Done;
                    return Poll::Ready(Ok(None));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Connects, sends `request` and drives the connection until the answer's
/// head: the body of a `200 OK`, or the error status's text.
async fn send(
    mut connector: HttpsConnector<HttpConnector>,
    server: Uri,
    request: Request<Full<Bytes>>,
) -> Result<(Option<Pin<Box<Connection>>>, Incoming), Error> {
    let network = |e: Box<dyn std::error::Error + Send + Sync>| Error::Network(e);
    poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(network)?;
    let io = connector.call(server).await.map_err(network)?;
    let (mut sender, connection) = http1::handshake(io)
        .await
        .map_err(|e| Error::Network(Box::new(e)))?;
    let mut connection = Box::pin(connection);
    let mut response = std::pin::pin!(sender.send_request(request));
    let mut running = true;
    let response = poll_fn(|cx| {
        if running && let Poll::Ready(ended) = connection.as_mut().poll(cx) {
            running = false;
            if let Err(err) = ended {
                return Poll::Ready(Err(err));
            }
        }
        response.as_mut().poll(cx)
    })
    .await
    .map_err(|e| Error::Network(Box::new(e)))?;
    drop(sender);
    let (parts, body) = response.into_parts();
    if parts.status == StatusCode::OK && !parts.headers.contains_key("x-clickhouse-exception-code")
    {
        // Nothing asks for compression: an encoded body is not the answer's
        // bytes (like the pooled client, which refuses it too).
        if let Some(encoding) = parts.headers.get(header::CONTENT_ENCODING)
            && !encoding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"identity")
        {
            return Err(Error::Decompression(
                format!("ClickHouse sent Content-Encoding: {encoding:?}, which was not asked for")
                    .into(),
            ));
        }
        // (A connection that has ended already fed the whole body.)
        return Ok((running.then_some(connection), body));
    }
    let mut cursor = DirectCursor {
        state: State::Reading {
            connection: running.then_some(connection),
            body,
        },
    };
    let mut text = BytesMut::new();
    while let Ok(Some(chunk)) = poll_fn(|cx| cursor.poll_chunk(cx)).await {
        let room = MAX_ERROR_BODY.saturating_sub(text.len());
        text.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    Err(Error::BadResponse(if text.is_empty() {
        match parts.headers.get("x-clickhouse-exception-code") {
            Some(code) => format!("Code: {}", code.to_str().unwrap_or("?")),
            None => parts.status.to_string(),
        }
    } else {
        text
    }))
}
