//! The routes of both listeners as an enum: the `route` label of the
//! request metrics and the log's `route` field from one place, and the
//! statuses each route answers with (so every series exists at 0 from the
//! start). Routing itself is `routes` (the API) and `chhttp` (the
//! ClickHouse-compatible endpoint); this module knows neither.

use std::time::Instant;

use dashcache::metrics::{HttpLabels, Metrics, RouteLabels};
use dashcache::outcome::CacheStatus;
use http::Response;

use crate::reply::names::X_CACHE;

/// The routes, for metric labels and the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Query,
    Export,
    OpenApi,
    Healthz,
    Readyz,
    Metrics,
    /// `/docs` and its files.
    Docs,
    /// `/status`, its files and `/status.json`.
    Status,
    /// A CORS preflight.
    Preflight,
    /// The ClickHouse-compatible endpoint (its own listener, `crate::chhttp`).
    ClickHouse,
    /// Anything else (404, 405).
    Other,
}

impl Route {
    pub const ALL: [Route; 11] = [
        Route::Query,
        Route::Export,
        Route::OpenApi,
        Route::Healthz,
        Route::Readyz,
        Route::Metrics,
        Route::Docs,
        Route::Status,
        Route::Preflight,
        Route::ClickHouse,
        Route::Other,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Query => "query",
            Route::Export => "export",
            Route::OpenApi => "openapi",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Docs => "docs",
            Route::Status => "status",
            Route::Preflight => "preflight",
            Route::ClickHouse => "clickhouse",
            Route::Other => "other",
        }
    }

    /// The statuses this route answers with, so that each series of
    /// `dashcache_http_requests_total` exists (at 0) from the start.
    pub const fn statuses(self) -> &'static [u16] {
        match self {
            Route::Query => &[200, 304, 400, 401, 403, 404, 422, 429, 500, 503],
            Route::Export => &[200, 400, 401, 403, 404, 413, 422, 429, 503],
            Route::OpenApi | Route::Docs => &[200],
            Route::Healthz => &[200, 400, 401],
            Route::Metrics | Route::Status => &[200, 400, 401, 403],
            Route::Readyz => &[200, 400, 401, 503],
            Route::Preflight => &[204, 403],
            Route::ClickHouse => &[200, 400, 403, 404, 408, 429, 500, 503],
            Route::Other => &[404, 405],
        }
    }

    /// Creates every (route, status) series at 0.
    pub fn zero_series(metrics: &dashcache::metrics::Metrics) {
        for route in Route::ALL {
            for &status in route.statuses() {
                let _ = metrics.http_requests.get_or_create(&HttpLabels {
                    route: route.as_str(),
                    status,
                });
            }
        }
    }

    /// Counts one answer of this route: `dashcache_http_requests_total` by
    /// status and the duration histogram by the response's `X-Cache` (`-`
    /// without one). Returns that cache label.
    pub fn count<B>(
        self,
        metrics: &Metrics,
        response: &Response<B>,
        started: Instant,
    ) -> &'static str {
        metrics
            .http_requests
            .get_or_create(&HttpLabels {
                route: self.as_str(),
                status: response.status().as_u16(),
            })
            .inc();
        let cache = response
            .headers()
            .get(X_CACHE)
            .and_then(|value| CacheStatus::from_header(value.as_bytes()))
            .map_or("-", |status| status.as_str());
        metrics
            .http_duration
            .get_or_create(&RouteLabels {
                route: self.as_str(),
                cache,
            })
            .observe(started.elapsed().as_secs_f64());
        cache
    }
}
