//! Routing, and what every request gets: metrics and a log line.
//!
//! | route | handler |
//! |---|---|
//! | `GET /v1/query/{name}` | [`crate::query`] |
//! | `GET /v1/export/{name}` | [`crate::export`] |
//! | `GET /healthz` | liveness |
//! | `GET /readyz` | readiness: ClickHouse and Redis reachable |
//! | `GET /metrics` | Prometheus text |
//! | `GET /openapi.json` | [`crate::openapi`] (no API key needed) |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashcache::metrics::{HttpLabels, RouteLabels};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::app::App;
use crate::reply::{self, Body};
use crate::{auth, export, query};
use dashcache::format::Format;
use dashcache::outcome::CacheStatus;

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    app.metrics.http_in_flight.inc();
    let (route, response) = route(&app, &req).await;
    app.metrics.http_in_flight.dec();

    let status = response.status();
    app.metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            status: status.as_u16(),
        })
        .inc();
    let cache = response
        .extensions()
        .get::<CacheStatus>()
        .map_or("-", |status| status.as_str());
    app.metrics
        .http_duration
        .get_or_create(&RouteLabels { route, cache })
        .observe(started.elapsed().as_secs_f64());
    if route == "query" || route == "export" {
        let key = response
            .extensions()
            .get::<KeyId>()
            .map_or("-", |k| k.0.as_str());
        tracing::info!(
            method = %req.method(),
            route,
            uri = %req.uri(),
            status = status.as_u16(),
            cache,
            key,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    Ok(response)
}

async fn route(app: &Arc<App>, req: &Request<Incoming>) -> (&'static str, Response<Body>) {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not supported; use GET", req.method()),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return ("other", response);
    }
    let path = req.uri().path();
    let api = if let Some(name) = path.strip_prefix("/v1/query/") {
        Some(("query", name))
    } else {
        path.strip_prefix("/v1/export/")
            .map(|name| ("export", name))
    };
    if let Some((route, name)) = api {
        let response = match auth::authenticate(app, req).await {
            Ok(caller) => {
                let mut response = if route == "query" {
                    query::handle(app, name, req, &caller).await
                } else {
                    export::handle(app, name, req, &caller).await
                };
                auth::rate_headers(response.headers_mut(), &caller.rate);
                response
                    .extensions_mut()
                    .insert(KeyId(caller.key.id.clone()));
                response
            }
            Err(response) => response,
        };
        return (route, response);
    }
    if path == "/openapi.json" {
        return ("openapi", crate::openapi::response(&app.openapi));
    }
    let (route, protected) = match path {
        "/healthz" => ("healthz", app.config.auth.protect_health),
        "/readyz" => ("readyz", app.config.auth.protect_health),
        "/metrics" => ("metrics", app.config.auth.protect_metrics),
        _ => {
            let response = reply::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {path}"),
            );
            return ("other", response);
        }
    };
    if protected && let Err(response) = auth::authenticate(app, req).await {
        return (route, response);
    }
    let response = if route == "healthz" {
        reply::json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
    } else if route == "readyz" {
        readiness(app).await
    } else {
        let mut response = Response::new(reply::full(app.metrics.render()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        response
    };
    (route, response)
}

/// The API key id a response was made for (never the key), for the log line.
#[derive(Clone)]
struct KeyId(String);

/// `/readyz`: 200 when ClickHouse and Redis answer, else 503; the body names
/// each dependency's state. (The config was loaded, or the process would not run.)
async fn readiness(app: &App) -> Response<Body> {
    let (clickhouse, redis) = tokio::join!(clickhouse_ready(app), app.cache.redis().ping());
    let check = |result: &Result<(), String>| match result {
        Ok(()) => serde_json::json!({ "ok": true }),
        Err(err) => serde_json::json!({ "ok": false, "error": err }),
    };
    let ready = clickhouse.is_ok() && redis.is_ok();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "config": { "ok": true },
            "clickhouse": check(&clickhouse),
            "redis": check(&redis),
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply::json(status, &body)
}

async fn clickhouse_ready(app: &App) -> Result<(), String> {
    let probe = async {
        let mut answer = app
            .filler
            .clickhouse
            .query("SELECT 1", Format::Csv, "")
            .map_err(|e| e.to_string())?;
        while answer.next().await.map_err(|e| e.to_string())?.is_some() {}
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .unwrap_or_else(|_| Err("no answer within 2s".into()))
}
