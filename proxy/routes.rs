//! Routing, and what every request gets: metrics and a log line.
//!
//! | route | handler |
//! |---|---|
//! | `GET /v1/query/{name}` | [`crate::query`] |
//! | `GET /v1/export/{name}` | [`crate::export`] |
//! | `GET /healthz` | liveness |
//! | `GET /metrics` | Prometheus text |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use dashcache::metrics::{HttpLabels, RouteLabels};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::app::App;
use crate::reply::{self, Body};
use crate::{auth, export, query};

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
    app.metrics
        .http_duration
        .get_or_create(&RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    if route == "query" || route == "export" {
        let cache = response
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info!(
            method = %req.method(),
            uri = %req.uri(),
            status = status.as_u16(),
            cache,
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
    if let Some(name) = path.strip_prefix("/v1/query/") {
        let response = match auth::authenticate(app, req).await {
            Ok(caller) => {
                let mut response = query::handle(app, name, req, &caller).await;
                auth::rate_headers(response.headers_mut(), &caller.rate);
                response
            }
            Err(response) => response,
        };
        return ("query", response);
    }
    if let Some(name) = path.strip_prefix("/v1/export/") {
        let response = match auth::authenticate(app, req).await {
            Ok(caller) => {
                let mut response = export::handle(app, name, req, &caller).await;
                auth::rate_headers(response.headers_mut(), &caller.rate);
                response
            }
            Err(response) => response,
        };
        return ("export", response);
    }
    let (route, protected) = match path {
        "/healthz" => ("healthz", app.config.auth.protect_health),
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
