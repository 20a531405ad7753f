//! Routing, and what every request gets: metrics and a log line.
//!
//! | route | handler |
//! |---|---|
//! | `GET /v1/query/{name}` | [`crate::query`] |
//! | `GET /v1/export/{name}` | [`crate::export`] |
//! | `GET /healthz` | liveness (a key when `auth.protect_health`) |
//! | `GET /readyz` | readiness: ClickHouse and Redis reachable (a key when `auth.protect_health`) |
//! | `GET /metrics` | Prometheus text (an operator's key when `auth.protect_metrics`) |
//! | `GET /openapi.json` | [`crate::openapi`] (no API key needed) |
//! | `GET /docs`, `/docs/*` | Swagger UI over `/openapi.json`, [`crate::web`] (no API key needed) |
//! | `GET /status`, `/status/*` | the operator page, [`crate::web`] (no data in it: no key needed) |
//! | `GET /status.json` | [`crate::handlers::status`]: always a key of a tier with `operator = true` |
//! | `OPTIONS *` with `Origin` and `Access-Control-Request-Method` | CORS preflight, [`crate::cors`] (no API key, no I/O) |
//!
//! The operator routes name tenants, keys per tier and requested parameters:
//! a tenant's key gets 403 there ([`auth::not_operator`]).
//!
//! Every other answer, errors included, gets its CORS headers from
//! [`crate::cors::Cors::decorate`] here.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::auth;
use crate::cors::Cors;
use crate::error::ApiError;
use crate::handlers::{export, health, query, status};
use crate::reply::Body;
use crate::route::Route;
use crate::state::App;
use dashcache::config::{ProxyConfig, RequestLog};

pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    app.metrics.http_in_flight.inc();
    let (route, mut response) = route(&app, &req).await;
    app.metrics.http_in_flight.dec();
    if route != Route::Preflight {
        app.cors
            .decorate(req.headers().get(header::ORIGIN), response.headers_mut());
    }

    let status = response.status();
    let cache = route.count(&app.metrics, &response, started);
    if matches!(route, Route::Query | Route::Export) && logged(&app.config.proxy, status) {
        let key = response
            .extensions()
            .get::<KeyId>()
            .map_or("-", |k| k.0.as_str());
        tracing::info!(
            method = %req.method(),
            route = route.as_str(),
            uri = %auth::loggable_uri(req.uri()),
            status = status.as_u16(),
            cache,
            key,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    Ok(response)
}

async fn route(app: &Arc<App>, req: &Request<Incoming>) -> (Route, Response<Body>) {
    if Cors::is_preflight(req)
        && let Some(origin) = req.headers().get(header::ORIGIN)
    {
        return (Route::Preflight, app.cors.preflight(origin));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let response =
            ApiError::MethodNotAllowed.reply(format!("{} is not supported; use GET", req.method()));
        return (Route::Other, response);
    }
    let path = req.uri().path();
    let api = if let Some(name) = path.strip_prefix("/v1/query/") {
        Some((Route::Query, name))
    } else {
        path.strip_prefix("/v1/export/")
            .map(|name| (Route::Export, name))
    };
    if let Some((route, name)) = api {
        if let Some(refused) = auth::key_in_url(req.uri()) {
            return (route, refused);
        }
        let response = match app.auth.authenticate(req).await {
            Ok(caller) => {
                let mut response = if route == Route::Query {
                    query::handle(app, name, req, &caller).await
                } else {
                    export::handle(app, name, req, &caller).await
                };
                auth::rate_headers(response.headers_mut(), &caller.rate);
                if may_log(&app.config.proxy, response.status()) {
                    response
                        .extensions_mut()
                        .insert(KeyId(caller.key.id.clone()));
                }
                response
            }
            Err(response) => response,
        };
        return (route, response);
    }
    if path == "/openapi.json" {
        return (Route::OpenApi, crate::openapi::response(&app.openapi));
    }
    if let Some(asset) = crate::web::find(&crate::web::DOCS, path) {
        return (Route::Docs, asset.respond(req.headers()).await);
    }
    if let Some(asset) = crate::web::find(&crate::web::STATUS, path) {
        return (Route::Status, asset.respond(req.headers()).await);
    }
    let (route, guard) = match path {
        "/healthz" => (
            Route::Healthz,
            Guard::any_key_if(app.config.auth.protect_health),
        ),
        "/readyz" => (
            Route::Readyz,
            Guard::any_key_if(app.config.auth.protect_health),
        ),
        "/metrics" if app.config.auth.protect_metrics => (Route::Metrics, Guard::Operator),
        "/metrics" => (Route::Metrics, Guard::Open),
        "/status.json" => (Route::Status, Guard::Operator),
        _ => {
            let response = ApiError::NotFound.reply(format!("no route for {path}"));
            return (Route::Other, response);
        }
    };
    if guard != Guard::Open {
        if let Some(refused) = auth::key_in_url(req.uri()) {
            return (route, refused);
        }
        match app.auth.authenticate(req).await {
            Err(response) => return (route, response),
            Ok(caller) if guard == Guard::Operator && !caller.tier.operator => {
                return (route, auth::not_operator(&caller, path));
            }
            Ok(_) => {}
        }
    }
    let response = match route {
        Route::Healthz => health::liveness(),
        Route::Readyz => health::readiness(app).await,
        Route::Status => status::json(app).await,
        _ => health::metrics(app),
    };
    (route, response)
}

/// Who may read a service route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// Anyone (names no tenant, key or parameter).
    Open,
    /// Any valid key (`auth.protect_health`).
    AnyKey,
    /// A key of a tier with `operator = true`: `/status.json` always,
    /// `/metrics` with `auth.protect_metrics`.
    Operator,
}

impl Guard {
    fn any_key_if(protected: bool) -> Guard {
        if protected {
            Guard::AnyKey
        } else {
            Guard::Open
        }
    }
}

/// Whether the request log takes a request that got `status`.
pub(crate) fn logged(config: &ProxyConfig, status: StatusCode) -> bool {
    let error = status.as_u16() >= 400;
    match config.request_log {
        RequestLog::Off => false,
        RequestLog::Errors => error,
        RequestLog::Sampled => error || rand::random::<f64>() < config.request_log_sample,
        RequestLog::All => true,
    }
}

/// Whether the request log may take a request that got `status` (its key
/// id is kept for the line only then: no work for the hits it never logs).
pub(crate) fn may_log(config: &ProxyConfig, status: StatusCode) -> bool {
    match config.request_log {
        RequestLog::Off => false,
        RequestLog::Errors => status.as_u16() >= 400,
        RequestLog::Sampled | RequestLog::All => true,
    }
}

/// The API key id a response was made for (never the key), for the log line.
#[derive(Clone)]
pub(crate) struct KeyId(pub String);
