//! Prometheus metrics of a dashcache process.
//!
//! Owns the registry and every metric handle; other modules count through the
//! fields of [`Metrics`]. Rendering to the text exposition format is
//! [`Metrics::render`]; serving it is the proxy's job.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::outcome::{
    AdmissionOutcome, AttemptOutcome, CacheStatus, CorsKind, CorsOutcome, ExportOutcome,
    QueueOutcome, RateOutcome, StoreOutcome, UPSTREAM_ERROR_KINDS,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    /// X-Cache of the answer (`-` for routes without one).
    pub cache: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CorsLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub replica: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~100 s
    Histogram::new(exponential_buckets(0.0001, 2.5, 16))
}

/// Every metric of a process.
pub struct Metrics {
    registry: Registry,
    /// The per-request counters, found once: `[CacheStatus::ALL]` and
    /// `[RateOutcome::ALL]` in order (a family lookup hashes its labels).
    hot_cache: Vec<Counter>,
    hot_rate: Vec<Counter>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: HistogramFamily<RouteLabels>,
    pub http_in_flight: Gauge,
    pub open_connections: Gauge,
    /// HIT, STALE, MISS, COALESCED per request.
    pub cache_requests: Family<ResultLabels, Counter>,
    /// Outcome of storing a computed answer: stored, too_large, failed.
    pub cache_stores: Family<ResultLabels, Counter>,
    pub l1_hits: Counter,
    /// Answers served from L1 because Redis was unreachable or had lost them.
    pub l1_fallbacks: Counter,
    /// Without `[redis]`: bytes of the answers kept in process memory (as of the last store).
    pub memory_answers_bytes: Gauge,
    pub early_refreshes: Counter,
    pub ahead_refreshes: Counter,
    pub refresh_failures: Counter,
    pub clickhouse_queries: Counter,
    /// Computations by whether they reached ClickHouse (see [`AttemptOutcome`]).
    pub clickhouse_attempts: Family<ResultLabels, Counter>,
    /// Computations holding a slot at ClickHouse (see [`crate::admission`]).
    pub clickhouse_in_flight: Gauge,
    /// Computations waiting for a slot.
    pub clickhouse_queued: Gauge,
    pub clickhouse_admissions: Family<OutcomeLabels, Counter>,
    pub clickhouse_errors: Family<KindLabels, Counter>,
    pub clickhouse_duration: Histogram,
    pub redis_errors: Counter,
    /// Per ClickHouse replica (see [`crate::upstream`]): 1 up, 0 ejected.
    pub clickhouse_replica_up: Family<ReplicaLabels, Gauge>,
    /// Attempts sent to each replica (failovers and retries included).
    pub clickhouse_replica_queries: Family<ReplicaLabels, Counter>,
    pub clickhouse_replica_ejections: Family<ReplicaLabels, Counter>,
    /// Queries moved to another replica because theirs could not be reached.
    pub clickhouse_failovers: Counter,
    pub exports_started: Counter,
    /// Ended exports by outcome: complete, cancelled (client left), failed, truncated.
    pub exports_ended: Family<ResultLabels, Counter>,
    pub export_bytes: Counter,
    pub export_first_byte: Histogram,
    /// Requests that had to start a computation, by how they got a slot
    /// under their key's `max_concurrent_misses` (see [`QueueOutcome`]).
    pub miss_queue: Family<OutcomeLabels, Counter>,
    /// Requests waiting in a key's miss queue now.
    pub miss_queue_waiting: Gauge,
    /// Rate-limit decisions (allowed, limited).
    pub rate_limit: Family<OutcomeLabels, Counter>,
    /// Requests carrying `Origin`, by kind (preflight, actual) and whether
    /// `[cors]` allows the origin (allowed, refused).
    pub cors_requests: Family<CorsLabels, Counter>,
    /// The scheduler's warm-up runs.
    pub warmup: WarmupMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("dashcache");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let http_duration = HistogramFamily::<RouteLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to the response head by route and cache result",
            http_duration.clone(),
        );
        let http_in_flight = Gauge::default();
        registry.register(
            "http_in_flight_requests",
            "Requests being answered",
            http_in_flight.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open",
            open_connections.clone(),
        );
        let cache_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Cached-query requests by cache result (HIT, STALE, MISS, COALESCED)",
            cache_requests.clone(),
        );
        let cache_stores = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_stores",
            "Computed answers by store outcome (stored, too_large, failed)",
            cache_stores.clone(),
        );
        let l1_hits = Counter::default();
        registry.register(
            "l1_hits",
            "Answers served from the in-process cache",
            l1_hits.clone(),
        );
        let l1_fallbacks = Counter::default();
        registry.register(
            "l1_fallbacks",
            "Answers served from process memory because Redis was unreachable or had lost them",
            l1_fallbacks.clone(),
        );
        let memory_answers_bytes = Gauge::default();
        registry.register(
            "memory_answers_bytes",
            "Without [redis]: bytes of the answers kept in process memory (bounded by cache.memory_max_bytes)",
            memory_answers_bytes.clone(),
        );
        let early_refreshes = Counter::default();
        registry.register(
            "early_refreshes",
            "Background refreshes started by XFetch before an answer expired",
            early_refreshes.clone(),
        );
        let ahead_refreshes = Counter::default();
        registry.register(
            "ahead_refreshes",
            "Background refreshes started just before a read answer expired (refresh-ahead)",
            ahead_refreshes.clone(),
        );
        let refresh_failures = Counter::default();
        registry.register(
            "refresh_failures",
            "Refreshes of a cached answer that failed (the old answer keeps being served)",
            refresh_failures.clone(),
        );
        let clickhouse_queries = Counter::default();
        registry.register(
            "clickhouse_queries",
            "Queries sent to ClickHouse",
            clickhouse_queries.clone(),
        );
        let clickhouse_attempts = Family::<ResultLabels, Counter>::default();
        registry.register(
            "clickhouse_attempts",
            "Query attempts by outcome: sent (a server answered), unreachable (no replica could be connected to), ejected (a refresh not started: every replica ejected), backing_off (not started: the key failed lately), busy (a refresh not started: every ClickHouse slot taken)",
            clickhouse_attempts.clone(),
        );
        let clickhouse_in_flight = Gauge::default();
        registry.register(
            "clickhouse_in_flight",
            "Computations running at ClickHouse (at most clickhouse.max_in_flight)",
            clickhouse_in_flight.clone(),
        );
        let clickhouse_queued = Gauge::default();
        registry.register(
            "clickhouse_queued",
            "Computations waiting for a ClickHouse slot (at most clickhouse.max_queued)",
            clickhouse_queued.clone(),
        );
        let clickhouse_admissions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "clickhouse_admissions",
            "Computations by how they got a ClickHouse slot: at_once, after_wait, or refused (queue_full, wait_timeout)",
            clickhouse_admissions.clone(),
        );
        let clickhouse_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "clickhouse_errors",
            "Failed ClickHouse queries by kind (connect, status, body, timeout)",
            clickhouse_errors.clone(),
        );
        let clickhouse_duration = latency_histogram();
        registry.register(
            "clickhouse_query_duration_seconds",
            "Time for ClickHouse to produce a whole answer",
            clickhouse_duration.clone(),
        );
        let exports_started = Counter::default();
        registry.register(
            "exports_started",
            "Exports that began streaming",
            exports_started.clone(),
        );
        let exports_ended = Family::<ResultLabels, Counter>::default();
        registry.register(
            "exports_ended",
            "Exports by outcome (complete, cancelled, failed, truncated)",
            exports_ended.clone(),
        );
        let export_bytes = Counter::default();
        registry.register(
            "export_bytes",
            "Bytes streamed by exports",
            export_bytes.clone(),
        );
        let export_first_byte = latency_histogram();
        registry.register(
            "export_first_byte_seconds",
            "Time from an export request to its first body byte",
            export_first_byte.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Failed or timed-out Redis operations",
            redis_errors.clone(),
        );
        let clickhouse_replica_up = Family::<ReplicaLabels, Gauge>::default();
        registry.register(
            "clickhouse_replica_up",
            "Whether a ClickHouse replica takes queries (1) or is ejected (0)",
            clickhouse_replica_up.clone(),
        );
        let clickhouse_replica_queries = Family::<ReplicaLabels, Counter>::default();
        registry.register(
            "clickhouse_replica_queries",
            "Query attempts sent to each ClickHouse replica",
            clickhouse_replica_queries.clone(),
        );
        let clickhouse_replica_ejections = Family::<ReplicaLabels, Counter>::default();
        registry.register(
            "clickhouse_replica_ejections",
            "Times a ClickHouse replica was ejected (unreachable, or failing checks)",
            clickhouse_replica_ejections.clone(),
        );
        let clickhouse_failovers = Counter::default();
        registry.register(
            "clickhouse_failovers",
            "Queries moved to another replica because theirs could not be reached",
            clickhouse_failovers.clone(),
        );
        let miss_queue = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "miss_queue",
            "Requests that started a computation, by how they got a slot (immediate, queued, full, timed_out)",
            miss_queue.clone(),
        );
        let miss_queue_waiting = Gauge::default();
        registry.register(
            "miss_queue_waiting",
            "Requests waiting for a computation slot of their key",
            miss_queue_waiting.clone(),
        );
        let rate_limit = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "rate_limit",
            "Rate-limit decisions (allowed, limited)",
            rate_limit.clone(),
        );
        let cors_requests = Family::<CorsLabels, Counter>::default();
        registry.register(
            "cors_requests",
            "Requests from pages on other origins by kind (preflight, actual) and result (allowed, refused)",
            cors_requests.clone(),
        );
        let warmup = WarmupMetrics::register(&mut registry);
        let hot_cache = CacheStatus::ALL
            .iter()
            .map(|status| {
                cache_requests
                    .get_or_create(&ResultLabels {
                        result: status.as_str(),
                    })
                    .clone()
            })
            .collect();
        let hot_rate = RateOutcome::ALL
            .iter()
            .map(|outcome| {
                rate_limit
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome.as_str(),
                    })
                    .clone()
            })
            .collect();
        let metrics = Metrics {
            hot_cache,
            hot_rate,
            cors_requests,
            miss_queue,
            miss_queue_waiting,
            rate_limit,
            warmup,
            registry,
            http_requests,
            http_duration,
            http_in_flight,
            open_connections,
            cache_requests,
            cache_stores,
            l1_hits,
            l1_fallbacks,
            memory_answers_bytes,
            early_refreshes,
            ahead_refreshes,
            refresh_failures,
            clickhouse_queries,
            clickhouse_attempts,
            clickhouse_in_flight,
            clickhouse_queued,
            clickhouse_admissions,
            clickhouse_errors,
            clickhouse_duration,
            redis_errors,
            clickhouse_replica_up,
            clickhouse_replica_queries,
            clickhouse_replica_ejections,
            clickhouse_failovers,
            exports_started,
            exports_ended,
            export_bytes,
            export_first_byte,
        };
        metrics.zero_known_series();
        metrics
    }

    /// Creates every series whose label values are known in advance, at 0,
    /// so that alerts and panels on them have data before the first event.
    fn zero_known_series(&self) {
        for status in CacheStatus::ALL {
            let _ = self.cache_requests.get_or_create(&ResultLabels {
                result: status.as_str(),
            });
        }
        for outcome in StoreOutcome::ALL {
            let _ = self.cache_stores.get_or_create(&ResultLabels {
                result: outcome.as_str(),
            });
        }
        for outcome in ExportOutcome::ALL {
            let _ = self.exports_ended.get_or_create(&ResultLabels {
                result: outcome.as_str(),
            });
        }
        for outcome in AdmissionOutcome::ALL {
            let _ = self.clickhouse_admissions.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        for outcome in AttemptOutcome::ALL {
            let _ = self.clickhouse_attempts.get_or_create(&ResultLabels {
                result: outcome.as_str(),
            });
        }
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = self.clickhouse_errors.get_or_create(&KindLabels { kind });
        }
        for outcome in QueueOutcome::ALL {
            let _ = self.miss_queue.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        for outcome in RateOutcome::ALL {
            let _ = self.rate_limit.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        for kind in CorsKind::ALL {
            for result in CorsOutcome::ALL {
                let _ = self.cors_requests.get_or_create(&CorsLabels {
                    kind: kind.as_str(),
                    result: result.as_str(),
                });
            }
        }
        for result in ["ok", "rejected"] {
            let _ = self.warmup.reloads.get_or_create(&ResultLabels { result });
        }
    }

    /// Counts one cache result.
    pub fn cache_result(&self, status: CacheStatus) {
        if let Some(counter) = CacheStatus::ALL
            .iter()
            .position(|s| *s == status)
            .and_then(|i| self.hot_cache.get(i))
        {
            counter.inc();
        }
    }

    pub fn admission(&self, outcome: AdmissionOutcome) {
        self.clickhouse_admissions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn attempt(&self, outcome: AttemptOutcome) {
        self.clickhouse_attempts
            .get_or_create(&ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
    }

    pub fn store_outcome(&self, outcome: StoreOutcome) {
        self.cache_stores
            .get_or_create(&ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
    }

    pub fn export_ended(&self, outcome: ExportOutcome) {
        self.exports_ended
            .get_or_create(&ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
    }

    pub fn queue_outcome(&self, outcome: QueueOutcome) {
        self.miss_queue
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn rate_outcome(&self, outcome: RateOutcome) {
        if let Some(counter) = RateOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .and_then(|i| self.hot_rate.get(i))
        {
            counter.inc();
        }
    }

    pub fn cors_outcome(&self, kind: CorsKind, result: CorsOutcome) {
        self.cors_requests
            .get_or_create(&CorsLabels {
                kind: kind.as_str(),
                result: result.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobOutcomeLabels {
    pub job: String,
    pub outcome: &'static str,
}

/// Metrics of warm-up runs (scheduler).
pub struct WarmupMetrics {
    /// Runs by job and outcome (ok, partial, failed, interrupted, overlap).
    pub runs: Family<JobOutcomeLabels, Counter>,
    /// Keys by job and result (warmed, skipped, failed).
    pub keys: Family<JobOutcomeLabels, Counter>,
    pub bytes: Family<JobLabels, Counter>,
    pub duration: HistogramFamily<JobLabels>,
    /// Unix time of the last run without failures, per job.
    pub last_success: Family<JobLabels, Gauge>,
    /// Config reloads by result (ok, rejected).
    pub reloads: Family<ResultLabels, Counter>,
}

impl WarmupMetrics {
    fn register(registry: &mut Registry) -> WarmupMetrics {
        let runs = Family::<JobOutcomeLabels, Counter>::default();
        registry.register(
            "warmup_runs",
            "Warm-up runs by job and outcome",
            runs.clone(),
        );
        let keys = Family::<JobOutcomeLabels, Counter>::default();
        registry.register(
            "warmup_keys",
            "Warm-up keys by job and result (warmed, skipped, failed)",
            keys.clone(),
        );
        let bytes = Family::<JobLabels, Counter>::default();
        registry.register(
            "warmup_bytes",
            "Bytes of warmed answers by job",
            bytes.clone(),
        );
        let duration = HistogramFamily::<JobLabels>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "warmup_run_duration_seconds",
            "Duration of warm-up runs by job",
            duration.clone(),
        );
        let last_success = Family::<JobLabels, Gauge>::default();
        registry.register(
            "warmup_last_success_timestamp_seconds",
            "Unix time of the last warm-up run without failures, by job",
            last_success.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "scheduler_reloads",
            "Config reloads by result (ok, rejected)",
            reloads.clone(),
        );
        WarmupMetrics {
            runs,
            keys,
            bytes,
            duration,
            last_success,
            reloads,
        }
    }
}
