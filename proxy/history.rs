//! What the `/status` page charts: the request and cache counters sampled
//! every [`EVERY`] for the last [`KEEP`] samples (bounded), and the rates
//! between samples. Owns the sampling task; the page and `/status.json` are
//! `handlers::status`'s.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashcache::clock;
use dashcache::metrics::{HttpLabels, Metrics, ResultLabels};
use dashcache::outcome::CacheStatus;
use serde_json::{Value, json};

use crate::route::Route;

/// How often the counters are sampled.
pub const EVERY: Duration = Duration::from_secs(5);
/// How many samples are kept: 15 minutes.
pub const KEEP: usize = 180;
/// The counters at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) at_ms: i64,
    /// `/v1/query` and `/v1/export` answers, any status.
    pub(crate) requests: u64,
    /// Per [`CacheStatus::ALL`].
    pub(crate) by_cache: [u64; CacheStatus::ALL.len()],
}

impl Sample {
    pub(crate) fn now(metrics: &Metrics) -> Sample {
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
    pub(crate) fn rates(&self, later: &Sample) -> Value {
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
    pub(crate) fn series(&self, now: &Sample) -> Vec<Value> {
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
