//! `/healthz` (the process runs), `/readyz` (ClickHouse and Redis answer)
//! and `/metrics` (Prometheus text). Whether they need a key is the router's.

use http::{HeaderValue, Response, StatusCode, header};

use crate::reply::{self, Body};
use crate::state::App;

/// `/healthz`: 200 while the process runs.
pub fn liveness() -> Response<Body> {
    reply::json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// `/metrics`: the OpenMetrics text of every metric.
pub fn metrics(app: &App) -> Response<Body> {
    let mut response = Response::new(reply::full(app.metrics.render()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// `/readyz`: 200 when ClickHouse and Redis answer, else 503; the body names
/// each dependency's state. (The config was loaded, or the process would not run.)
pub async fn readiness(app: &App) -> Response<Body> {
    let (clickhouse, redis) = tokio::join!(app.clickhouse.ping(), app.cache.redis().ping());
    fn check<E: std::fmt::Display>(result: &Result<(), E>) -> serde_json::Value {
        match result {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(err) => serde_json::json!({ "ok": false, "error": err.to_string() }),
        }
    }
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
