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
//! file ([`crate::web`]); whether a key is needed is the router's
//! (`auth.protect_metrics`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashcache::clock;
use dashcache::metrics::{HttpLabels, Metrics, OutcomeLabels, ResultLabels};
use dashcache::outcome::{CacheStatus, QueueOutcome};
use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::reply::{self, Body};
use crate::routes::Route;
use crate::state::App;

/// How often the counters are sampled.
pub const EVERY: Duration = Duration::from_secs(5);
/// How many samples are kept: 15 minutes.
pub const KEEP: usize = 180;
/// The longest a read of Redis or the control store may take for the page.
const IO_BOUND: Duration = Duration::from_secs(2);
/// Most requested answers and warm-up runs shown.
const TOP: usize = 10;

/// The counters at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: i64,
    /// `/v1/query` and `/v1/export` answers, any status.
    requests: u64,
    /// Per [`CacheStatus::ALL`].
    by_cache: [u64; CacheStatus::ALL.len()],
}

impl Sample {
    fn now(metrics: &Metrics) -> Sample {
        let mut requests = 0;
        for route in [Route::Query, Route::Export] {
            for &status in route.statuses() {
                requests += metrics
                    .http_requests
                    .get_or_create(&HttpLabels {
                        route: route.as_str(),
                        status,
                    })
                    .get();
            }
        }
        Sample {
            at_ms: clock::now_ms(),
            requests,
            by_cache: CacheStatus::ALL.map(|status| {
                metrics
                    .cache_requests
                    .get_or_create(&ResultLabels {
                        result: status.as_str(),
                    })
                    .get()
            }),
        }
    }

    /// Requests/s and hit ratio (HIT and STALE of all cache results; none
    /// without cache results) from `self` to `later`.
    fn rates(&self, later: &Sample) -> Value {
        let secs = (later.at_ms - self.at_ms).max(1) as f64 / 1000.0;
        let delta: Vec<u64> = (0..CacheStatus::ALL.len())
            .map(|i| later.by_cache[i].saturating_sub(self.by_cache[i]))
            .collect();
        let answered: u64 = delta.iter().sum();
        let hits = delta[0] + delta[1];
        json!({
            "from_ms": self.at_ms,
            "at_ms": later.at_ms,
            "requests_per_s": later.requests.saturating_sub(self.requests) as f64 / secs,
            "hit_ratio": (answered > 0).then(|| hits as f64 / answered as f64),
            "by_cache": CacheStatus::ALL.iter().zip(&delta)
                .map(|(s, d)| (s.as_str().to_owned(), json!(d)))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// The last [`KEEP`] samples, oldest first.
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Starts sampling `metrics` every [`EVERY`] for as long as the process runs.
    pub fn spawn(metrics: Arc<Metrics>) -> Arc<History> {
        let history = Arc::new(History {
            samples: Mutex::new(VecDeque::with_capacity(KEEP + 1)),
        });
        let weak = Arc::downgrade(&history);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(history) = weak.upgrade() else {
                    return;
                };
                history.push(Sample::now(&metrics));
            }
        });
        history
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.push_back(sample);
        while samples.len() > KEEP {
            samples.pop_front();
        }
    }

    /// Rates between consecutive samples, and from the last one to `now`.
    fn series(&self, now: &Sample) -> Vec<Value> {
        let samples: Vec<Sample> = self
            .samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        let mut series: Vec<Value> = samples.windows(2).map(|w| w[0].rates(&w[1])).collect();
        if let Some(last) = samples.last()
            && now.at_ms > last.at_ms
        {
            series.push(last.rates(now));
        }
        series
    }
}

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

    let (redis, popular, runs) = tokio::join!(
        tokio::time::timeout(IO_BOUND, app.cache.redis().ping()),
        tokio::time::timeout(IO_BOUND, app.popularity.top(1, TOP)),
        tokio::time::timeout(IO_BOUND, warmup_runs(app)),
    );
    let redis = match redis {
        Ok(Ok(())) => json!({ "ok": true }),
        Ok(Err(err)) => json!({ "ok": false, "error": err.to_string() }),
        Err(_) => json!({ "ok": false, "error": format!("no answer within {IO_BOUND:?}") }),
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

/// The last [`TOP`] warm-up runs, newest first.
async fn warmup_runs(app: &App) -> Result<Vec<Value>, sqlx::Error> {
    type Row = (
        String,
        String,
        i64,
        Option<i64>,
        String,
        i64,
        i64,
        i64,
        i64,
        Option<String>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT job, host, started_ms, ended_ms, outcome, keys_warmed, keys_skipped, \
         keys_failed, bytes, error FROM warmup_runs ORDER BY started_ms DESC LIMIT 10",
    )
    .fetch_all(app.store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(job, host, started_ms, ended_ms, outcome, warmed, skipped, failed, bytes, error)| {
                json!({
                    "job": job, "host": host, "started_ms": started_ms, "ended_ms": ended_ms,
                    "outcome": outcome, "keys_warmed": warmed, "keys_skipped": skipped,
                    "keys_failed": failed, "bytes": bytes, "error": error,
                })
            },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_the_hit_ratio_counts_hits_and_stale() {
        let a = Sample {
            at_ms: 0,
            requests: 10,
            by_cache: [5, 0, 5, 0, 0],
        };
        let b = Sample {
            at_ms: 5000,
            requests: 60,
            by_cache: [35, 5, 10, 0, 0],
        };
        let rates = a.rates(&b);
        assert_eq!(rates["requests_per_s"], 10.0);
        assert_eq!(rates["hit_ratio"], 0.875);
        assert_eq!(rates["by_cache"]["MISS"], 5);
        assert!(a.rates(&a)["hit_ratio"].is_null());
    }

    #[tokio::test]
    async fn history_keeps_the_last_samples_only() {
        let history = History::spawn(Arc::new(Metrics::new()));
        for i in 0..(KEEP as i64 + 20) {
            history.push(Sample {
                at_ms: i * 5000,
                requests: 0,
                by_cache: [0; CacheStatus::ALL.len()],
            });
        }
        let now = Sample {
            at_ms: i64::MAX / 2,
            requests: 0,
            by_cache: [0; CacheStatus::ALL.len()],
        };
        assert!(history.series(&now).len() <= KEEP);
    }
}
