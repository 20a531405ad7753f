//! `/status.json`: what `/metrics` knows, for a person, and the history the
//! `/status` page charts.
//!
//! Owns [`History`] (the request and cache counters sampled every
//! [`EVERY`] for the last [`KEEP`] samples, bounded) and the document
//! `/status.json` serves: hit ratio and requests/s over the last minutes,
//! answers by `X-Cache`, computations in flight and their waiters, the miss
//! queue, ClickHouse replicas, Redis, the most requested answers, the last
//! warm-up runs (control store) and API keys per tier. Reads of Redis and the
//! control store are bounded by [`IO_BOUND`]; a failed one is reported in its
//! section, never as an error of the page. The page itself is a compiled-in
//! file ([`crate::web`]); the router serves this document only to keys of
//! a tier with `operator = true` (it names tenants, parameters and keys per
//! tier).

use std::time::Duration;

use dashcache::metrics::OutcomeLabels;
use dashcache::outcome::{CacheStatus, QueueOutcome};
use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::history::{EVERY, Sample};
use crate::reply::{self, Body};
use crate::state::App;

/// The longest a read of Redis or the control store may take for the page.
const IO_BOUND: Duration = Duration::from_secs(2);
/// Most requested answers and warm-up runs shown.
const TOP: usize = 10;

/// `GET /status.json`.
pub async fn json(app: &App) -> Response<Body> {
    let metrics = &app.metrics;
    let now = Sample::now(metrics);
    let series = app.history.series(&now);
    let by_cache: serde_json::Map<String, Value> = CacheStatus::ALL
        .iter()
        .zip(now.by_cache)
        .map(|(s, n)| (s.as_str().to_owned(), json!(n)))
        .collect();
    let answered: u64 = now.by_cache.iter().sum();
    let queue: serde_json::Map<String, Value> = QueueOutcome::ALL
        .iter()
        .map(|o| {
            let n = metrics
                .miss_queue
                .get_or_create(&OutcomeLabels {
                    outcome: o.as_str(),
                })
                .get();
            (o.as_str().to_owned(), json!(n))
        })
        .collect();

    let redis_ping = async {
        match app.cache.redis() {
            Some(redis) => Some(tokio::time::timeout(IO_BOUND, redis.ping()).await),
            None => None,
        }
    };
    let (redis, popular, runs) = tokio::join!(
        redis_ping,
        tokio::time::timeout(IO_BOUND, app.popularity.top(1, TOP)),
        tokio::time::timeout(IO_BOUND, warmup_runs(app)),
    );
    let redis = match redis {
        // One host: answers live in this process's memory.
        None => json!({
            "ok": true,
            "configured": false,
            "memory_bytes": app.cache.memory().map(|m| m.weighted_bytes()),
            "memory_max_bytes": app.cache.memory().map(|m| m.max_bytes()),
        }),
        Some(Ok(Ok(()))) => json!({ "ok": true }),
        Some(Ok(Err(err))) => json!({ "ok": false, "error": err.to_string() }),
        Some(Err(_)) => {
            json!({ "ok": false, "error": format!("no answer within {IO_BOUND:?}") })
        }
    };
    let popular = match popular {
        Ok(Ok(top)) => json!({ "hours": 1, "answers": top.iter().map(|(d, n)| json!({
            "query": d.query,
            "tenant": d.tenant,
            "format": d.format.name(),
            "params": d.params,
            "requests": n,
        })).collect::<Vec<_>>() }),
        Ok(Err(err)) => json!({ "error": err.to_string() }),
        Err(_) => json!({ "error": format!("no answer within {IO_BOUND:?}") }),
    };
    let runs = match runs {
        Ok(Ok(runs)) => json!({ "runs": runs }),
        Ok(Err(err)) => json!({ "error": err.to_string() }),
        Err(_) => json!({ "error": format!("no answer within {IO_BOUND:?}") }),
    };
    let body = json!({
        "now_ms": now.at_ms,
        "sample_every_s": EVERY.as_secs(),
        "requests": {
            "total": now.requests,
            "in_flight": metrics.http_in_flight.get(),
            "open_connections": metrics.open_connections.get(),
        },
        "cache": {
            "by_cache": by_cache,
            "hit_ratio": (answered > 0).then(|| (now.by_cache[0] + now.by_cache[1]) as f64 / answered as f64),
            "l1_hits": metrics.l1_hits.get(),
            "early_refreshes": metrics.early_refreshes.get(),
            "refresh_failures": metrics.refresh_failures.get(),
        },
        "series": series,
        "computations": {
            "in_flight": app.coalescer.in_flight(),
            "waiting": app.coalescer.waiting(),
            "miss_queue_waiting": metrics.miss_queue_waiting.get(),
            "miss_queue": queue,
        },
        "clickhouse": {
            "replicas": app.clickhouse.replica_states(),
            "queries": metrics.clickhouse_queries.get(),
            "failovers": metrics.clickhouse_failovers.get(),
        },
        "redis": redis,
        "redis_errors": metrics.redis_errors.get(),
        "popular": popular,
        "warmup": runs,
        "api_keys_per_tier": app.auth.keys.per_tier(now.at_ms),
    });
    let mut response = reply::json(StatusCode::OK, &body);
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// The last 10 warm-up runs, newest first (the control store's history, as
/// `dashcache-scheduler history` reads it).
async fn warmup_runs(app: &App) -> Result<Vec<Value>, dashcache::store::StoreError> {
    let runs = dashcache::warmup::history::list(&app.store, None, 10).await?;
    Ok(runs
        .into_iter()
        .map(|run| {
            json!({
                "job": run.job, "host": run.host, "started_ms": run.started_ms,
                "ended_ms": run.ended_ms, "outcome": run.outcome,
                "keys_warmed": run.counts.warmed, "keys_skipped": run.counts.skipped,
                "keys_failed": run.counts.failed, "bytes": run.counts.bytes, "error": run.error,
            })
        })
        .collect())
}
