//! The ClickHouse-compatible HTTP endpoint: BI tools connect to dashcache as to ClickHouse.
//!
//! Its own listener (`[clickhouse_http] listen`), served by the same
//! `server::accept_until` and `drain` as the API, with this router:
//!
//! | request | answer |
//! |---|---|
//! | `GET /ping`, `HEAD /ping` | `Ok.` (no credentials needed) |
//! | `GET /` without `query` | `Ok.` (as ClickHouse) |
//! | `GET /?query=…`, `POST /` (SQL in the body, or `query=` plus the body) | [`handler`] |
//! | `HEAD /` | 200, as ClickHouse |
//! | `OPTIONS` | 204 with CORS headers (as current servers) |
//!
//! Parts: [`request`] (what a request asks), [`auth`] (credentials → key,
//! tier, ClickHouse user), [`statement`] (read-only classification),
//! [`rules`] (TTLs), [`upstream`] (the raw exchange with ClickHouse),
//! [`error`] (ClickHouse's error shape), [`handler`] (cache, coalescing,
//! pass-through). The cache, flights, fills, rate limits and miss queue are
//! the named API's (`App`); nothing here is shared with the scheduler.

pub mod auth;
pub mod endpoint;
pub mod error;
pub mod handler;
pub mod request;
pub mod rules;
pub mod statement;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::reply::{self, Body};
use crate::route::Route;
use crate::state::App;

/// Every request of the endpoint: routing, metrics (`route="clickhouse"`) and the request log.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    app.metrics.http_in_flight.inc();
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let response = route(&app, req).await;
    app.metrics.http_in_flight.dec();
    let status = response.status();
    let route = Route::ClickHouse.as_str();
    let cache = Route::ClickHouse.count(&app.metrics, &response, started);
    if crate::routes::logged(&app.config.proxy, status) {
        let key = response
            .extensions()
            .get::<crate::routes::KeyId>()
            .map_or("-", |k| k.0.as_str());
        // The path only: the query string can carry credentials.
        tracing::info!(
            method = %method,
            route,
            path = uri.path(),
            status = status.as_u16(),
            cache,
            key,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    Ok(response)
}

async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let asks_query = req
        .uri()
        .query()
        .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(name, _)| name == "query"));
    match (req.method(), path) {
        (&Method::OPTIONS, _) => options(),
        (&Method::GET, "/ping") => text(StatusCode::OK, "Ok.\n"),
        (&Method::HEAD, "/ping" | "/") => head(),
        (&Method::GET, "/") if !asks_query => text(StatusCode::OK, "Ok.\n"),
        (&Method::GET | &Method::POST, "/") => handler::handle(app, req).await,
        (_, "/" | "/ping") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed: use GET or POST\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            &format!("There is no handle {path}\n\nUse / or /ping for health checks.\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(reply::full(body.to_owned()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    response
}

/// `HEAD /`: ClickHouse answers 200 with the headers of its `Ok.` page.
fn head() -> Response<Body> {
    let mut response = Response::new(reply::empty());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=UTF-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(4));
    response
}

/// A CORS preflight, answered as current ClickHouse servers do.
fn options() -> Response<Body> {
    let mut response = Response::new(reply::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, GET, OPTIONS"),
    );
    headers.insert(
        "access-control-allow-headers",
        HeaderValue::from_static(
            "origin, x-requested-with, x-clickhouse-format, x-clickhouse-user, x-clickhouse-key, x-clickhouse-database, authorization, content-type",
        ),
    );
    headers.insert("access-control-max-age", HeaderValue::from(86400));
    response
}
