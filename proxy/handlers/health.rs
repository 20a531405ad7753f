//! `/healthz` (the process runs), `/readyz` (ClickHouse and Redis answer;
//! without `[redis]` there is no Redis to wait for)
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

/// `/readyz`: 200 when ClickHouse and Redis (if configured) answer, else 503;
/// the body names each dependency's state. (The config was loaded, or the
/// process would not run.)
pub async fn readiness(app: &App) -> Response<Body> {
    let redis = async {
        match app.cache.redis() {
            Some(redis) => Some(redis.ping().await),
            None => None,
        }
    };
    let (clickhouse, redis) = tokio::join!(app.clickhouse.ping(), redis);
    fn check<E: std::fmt::Display>(result: &Result<(), E>) -> serde_json::Value {
        match result {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(err) => serde_json::json!({ "ok": false, "error": err.to_string() }),
        }
    }
    let ready = clickhouse.is_ok() && redis.as_ref().is_none_or(Result::is_ok);
    let redis = match &redis {
        Some(result) => check(result),
        None => serde_json::json!({ "ok": true, "configured": false }),
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "config": { "ok": true },
            "clickhouse": check(&clickhouse),
            "redis": redis,
        }
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply::json(status, &body)
}
