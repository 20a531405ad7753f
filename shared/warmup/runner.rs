//! Running one warm-up job once: lease, keys, ClickHouse, cache, history, metrics.
//!
//! Owns what a run does: claim the scheduled time and the job's lease (so one
//! host runs it), list the keys (configured parameter sets, or the most
//! requested keys for a `popular` job), skip entries that stay fresh past
//! `refresh_ahead` (XFetch-adjusted), compute the others through the same
//! coalescer and [`Filler`] as the proxy with the job's concurrency limit and
//! ClickHouse settings, and record the run in the history and the metrics.
//! When to run is the caller's business: `dashcache-scheduler`'s daemon, or
//! [`super::schedule`] inside the proxy.
//!
//! What it runs with ([`Parts`]) comes from the process: a scheduler of its
//! own builds its cache client, ClickHouse client and coalescer
//! ([`Parts::own`]); a proxy hands over its own, so a warmed answer lands in
//! the very cache its requests read (without Redis, its memory) and a warm-up
//! and a request for the same key are one computation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::jobs::{Target, WarmupJob};
use crate::admission::Admission;
use crate::backoff::Backoff;
use crate::cache::Cache;
use crate::catalog::Catalog;
use crate::check::warmup::WarmupKind;
use crate::clickhouse::ClickHouse;
use crate::clock::now_ms;
use crate::coalesce::{Coalescer, FlightError, Role, Subscriber};
use crate::config::Config;
use crate::fill::{FillJob, Filler};
use crate::freshness::{self, Freshness};
use crate::metrics::{JobLabels, JobOutcomeLabels, Metrics};
use crate::outcome::StoreOutcome;
use crate::params::Clock;
use crate::popularity::{PopularityError, Recorder};
use crate::redis_conn::{RedisConn, RedisConnError, Timeouts};
use crate::store::Store;
use chrono::Utc;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::history::{self, Counts};
use super::lease::{LeaseOutcome, Leases};

/// What runs use, from the process that runs them.
#[derive(Clone)]
pub struct Parts {
    /// Where warmed answers go (and what `refresh_ahead` reads).
    pub cache: Arc<Cache>,
    pub clickhouse: ClickHouse,
    pub coalescer: Arc<Coalescer>,
    /// Computations at ClickHouse at once (`[clickhouse] max_in_flight`).
    pub admission: Arc<Admission>,
    /// The demand `popular` jobs read.
    pub popularity: Arc<Recorder>,
    pub metrics: Arc<Metrics>,
    /// The run history.
    pub store: Store,
}

impl Parts {
    /// The parts of a process of its own (`dashcache-scheduler`): a Redis
    /// cache client with the scheduler's patience and no L1, its own
    /// ClickHouse client (health checks for as long as the parts live) and
    /// coalescer, and a popularity reader. Needs `[redis]`: warmed answers
    /// reach the proxies only through it.
    pub fn own(config: &Config, store: Store, metrics: Arc<Metrics>) -> Result<Parts, RunnerError> {
        let Some(redis) = &config.redis else {
            return Err(RunnerError::NoRedis);
        };
        let mut redis_config = redis.clone();
        redis_config.timeout = redis.timeout.max(config.scheduler.redis_timeout);
        let cache = Arc::new(Cache::new(
            &config.cache,
            Some(&redis_config),
            config.min_retention(),
            metrics.clone(),
            false,
        )?);
        let popularity = Recorder::new(
            RedisConn::open(redis, Timeouts::relaxed(config.scheduler.redis_timeout))?,
            &config.cache.key_prefix,
            &config.popularity,
        )?;
        Ok(Parts {
            cache,
            clickhouse: ClickHouse::new(&config.clickhouse, metrics.clone()),
            coalescer: Coalescer::new(),
            admission: Admission::of(&config.clickhouse, metrics.clone()),
            popularity,
            metrics,
            store,
        })
    }
}

/// Everything runs need, built from one version of the config.
pub struct Runner {
    pub config: Config,
    pub catalog: Catalog,
    pub jobs: Vec<WarmupJob>,
    pub host: String,
    parts: Parts,
    leases: Leases,
}

/// Why a runner cannot be built from a checked config.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Redis(#[from] RedisConnError),
    #[error(transparent)]
    Popularity(#[from] PopularityError),
    #[error(
        "dashcache-scheduler shares warmed answers with the proxies through Redis, and this config has no [redis]: add one, or let the proxy run the warm-up jobs ([scheduler] in_proxy, README \"Single host: no Redis\")"
    )]
    NoRedis,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every key warmed or still fresh.
    Ok,
    /// Some keys failed.
    Partial,
    /// Nothing could be done (every key failed, or no lease/store/keys).
    Failed,
    /// Cut at shutdown.
    Interrupted,
    /// Another host still runs this job.
    Overlap,
    /// Another scheduler claimed this scheduled time: nothing recorded here.
    NotMine,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
            Outcome::Interrupted => "interrupted",
            Outcome::Overlap => "overlap",
            Outcome::NotMine => "not_mine",
        }
    }

    pub fn succeeded(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::NotMine)
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub outcome: Outcome,
    pub counts: Counts,
    pub error: Option<String>,
}

enum KeyResult {
    Warmed(i64),
    Skipped,
    Failed(String),
}

impl Runner {
    /// A runner of `jobs` with `parts`: slots and leases in Redis with
    /// `[redis]`, else in this process.
    pub fn new(
        config: Config,
        catalog: Catalog,
        jobs: Vec<WarmupJob>,
        parts: Parts,
    ) -> Result<Runner, RunnerError> {
        let leases = match &config.redis {
            Some(redis) => Leases::Redis {
                conn: RedisConn::open(redis, Timeouts::relaxed(config.scheduler.redis_timeout))?,
                timeout: redis.timeout.max(config.scheduler.redis_timeout),
            },
            None => Leases::local(),
        };
        let host = config.scheduler.host.clone().unwrap_or_else(hostname);
        Ok(Runner {
            config,
            catalog,
            jobs,
            host,
            parts,
            leases,
        })
    }

    pub fn job(&self, name: &str) -> Option<&WarmupJob> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// Runs `job` now. `scheduled` is the fire time of a scheduled run (which
    /// several schedulers may fire: only one runs it); `None` for `run JOB`.
    /// `stop` cuts the run short (shutdown deadline).
    pub async fn run(
        &self,
        job: &WarmupJob,
        scheduled: Option<i64>,
        stop: CancellationToken,
    ) -> Report {
        let prefix = &self.config.cache.key_prefix;
        let holder = format!("{}/{}", self.host, std::process::id());
        if let Some(at) = scheduled {
            match self.leases.claim_slot(prefix, &job.name, at, &holder).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(job = %job.name, "this scheduled run was claimed by another scheduler");
                    return self.report(job, Outcome::NotMine, Counts::default(), None);
                }
                Err(err) => {
                    let msg = format!("cannot claim the run in Redis: {err}");
                    return self
                        .record_unstarted(job, scheduled, Outcome::Failed, msg)
                        .await;
                }
            }
        }
        let lease = match self
            .leases
            .acquire(prefix, &job.name, &holder, self.config.scheduler.lease_ttl)
            .await
        {
            Ok(LeaseOutcome::Held(lease)) => lease,
            Ok(LeaseOutcome::Busy { holder }) => {
                let other = holder.unwrap_or_else(|| "another scheduler".into());
                let msg = format!("still running on {other}");
                return self
                    .record_unstarted(job, scheduled, Outcome::Overlap, msg)
                    .await;
            }
            Err(err) => {
                let msg = format!("cannot take the job lease in Redis: {err}");
                return self
                    .record_unstarted(job, scheduled, Outcome::Failed, msg)
                    .await;
            }
        };
        let report = self.run_leased(job, scheduled, stop).await;
        lease.release().await;
        report
    }

    async fn run_leased(
        &self,
        job: &WarmupJob,
        scheduled: Option<i64>,
        stop: CancellationToken,
    ) -> Report {
        let started = Instant::now();
        let id = match history::start(
            &self.parts.store,
            &job.name,
            &self.host,
            scheduled,
            now_ms(),
        )
        .await
        {
            Ok(id) => Some(id),
            Err(err) => {
                tracing::error!(job = %job.name, error = %err, "cannot record the run in the history; running it anyway");
                None
            }
        };
        tracing::info!(job = %job.name, "warm-up run started");
        let execution = self.execute(job, stop).await;
        let (outcome, error) = execution.verdict(job);
        self.record(
            job,
            id.as_ref(),
            started,
            outcome,
            &execution,
            error.as_deref(),
        )
        .await;
        self.report(job, outcome, execution.counts, error)
    }

    /// Warms every key of a run, at most `concurrency` at a time, until done
    /// or `stop`.
    async fn execute(&self, job: &WarmupJob, stop: CancellationToken) -> Execution {
        let (targets, problems) = self.targets(job).await;
        let mut run = Execution {
            counts: Counts {
                failed: problems.len() as i64,
                ..Counts::default()
            },
            problems,
            total: targets.len(),
            interrupted: false,
        };
        let filler = Arc::new(Filler {
            upstream: Arc::new(
                self.parts
                    .clickhouse
                    .clone()
                    .with_settings(job.settings.iter().map(|(n, v)| (n.as_str(), v.as_str()))),
            ),
            store: self.parts.cache.clone(),
            metrics: self.parts.metrics.clone(),
            max_entry_bytes: self.config.cache.max_entry_bytes,
            coalesce: self.config.coalesce.clone(),
            backoff: Arc::new(Backoff::of(&self.config.coalesce)),
            admission: self.parts.admission.clone(),
        });
        let mut results = futures_util::stream::iter(targets.into_iter().map(|t| {
            let filler = filler.clone();
            async move {
                let result = self.warm(&t, job.refresh_ahead, &filler).await;
                (t, result)
            }
        }))
        .buffer_unordered(job.concurrency.max(1));
        loop {
            let next = tokio::select! {
                next = results.next() => next,
                _ = stop.cancelled() => { run.interrupted = true; None }
            };
            let Some((target, result)) = next else { break };
            match result {
                KeyResult::Warmed(bytes) => {
                    run.counts.warmed += 1;
                    run.counts.bytes += bytes;
                }
                KeyResult::Skipped => run.counts.skipped += 1,
                KeyResult::Failed(msg) => {
                    run.counts.failed += 1;
                    run.problems.push(format!("{}: {msg}", target.describe()));
                }
            }
        }
        run
    }

    /// Writes a finished run to the history, the metrics and the log.
    async fn record(
        &self,
        job: &WarmupJob,
        id: Option<&String>,
        started: Instant,
        outcome: Outcome,
        run: &Execution,
        error: Option<&str>,
    ) {
        let counts = run.counts;
        if let Some(id) = id
            && let Err(err) = history::finish(
                &self.parts.store,
                id,
                now_ms(),
                outcome.as_str(),
                counts,
                error,
            )
            .await
        {
            tracing::error!(job = %job.name, error = %err, "cannot record the end of the run in the history");
        }
        let labels = JobLabels {
            job: job.name.clone(),
        };
        self.parts
            .metrics
            .warmup
            .duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.parts
            .metrics
            .warmup
            .bytes
            .get_or_create(&labels)
            .inc_by(counts.bytes.max(0) as u64);
        for (result, n) in [
            ("warmed", counts.warmed),
            ("skipped", counts.skipped),
            ("failed", counts.failed),
        ] {
            self.parts
                .metrics
                .warmup
                .keys
                .get_or_create(&JobOutcomeLabels {
                    job: job.name.clone(),
                    outcome: result,
                })
                .inc_by(n.max(0) as u64);
        }
        for problem in run.problems.iter().take(20) {
            tracing::error!(job = %job.name, "warm-up key failed: {problem}");
        }
        let log = format!(
            "warm-up run ended: {} (warmed {}, still fresh {}, failed {}, {} bytes)",
            outcome.as_str(),
            counts.warmed,
            counts.skipped,
            counts.failed,
            counts.bytes
        );
        match outcome {
            Outcome::Ok if counts.warmed == 0 => {
                tracing::warn!(job = %job.name, "{log}; warmed nothing: {}", error.unwrap_or("every key was still fresh"))
            }
            Outcome::Ok => tracing::info!(job = %job.name, "{log}"),
            Outcome::Partial | Outcome::Interrupted => {
                tracing::warn!(job = %job.name, "{log}: {}", error.unwrap_or(""))
            }
            _ => tracing::error!(job = %job.name, "{log}: {}", error.unwrap_or("")),
        }
    }

    /// Records a run that could not start, and reports it.
    async fn record_unstarted(
        &self,
        job: &WarmupJob,
        scheduled: Option<i64>,
        outcome: Outcome,
        msg: String,
    ) -> Report {
        let now = now_ms();
        let recorded =
            match history::start(&self.parts.store, &job.name, &self.host, scheduled, now).await {
                Ok(id) => {
                    history::finish(
                        &self.parts.store,
                        &id,
                        now,
                        outcome.as_str(),
                        Counts::default(),
                        Some(&msg),
                    )
                    .await
                }
                Err(err) => Err(err),
            };
        if let Err(err) = recorded {
            tracing::error!(job = %job.name, error = %err, "cannot record the run in the history");
        }
        match outcome {
            Outcome::Overlap => tracing::warn!(job = %job.name, "warm-up run skipped: {msg}"),
            _ => tracing::error!(job = %job.name, "warm-up run failed: {msg}"),
        }
        self.report(job, outcome, Counts::default(), Some(msg))
    }

    fn report(
        &self,
        job: &WarmupJob,
        outcome: Outcome,
        counts: Counts,
        error: Option<String>,
    ) -> Report {
        if outcome != Outcome::NotMine {
            let labels = JobOutcomeLabels {
                job: job.name.clone(),
                outcome: outcome.as_str(),
            };
            self.parts.metrics.warmup.runs.get_or_create(&labels).inc();
            if outcome == Outcome::Ok {
                self.parts
                    .metrics
                    .warmup
                    .last_success
                    .get_or_create(&JobLabels {
                        job: job.name.clone(),
                    })
                    .set(Utc::now().timestamp());
            }
        }
        Report {
            outcome,
            counts,
            error,
        }
    }

    /// The keys of a run, and a message for each that could not be made.
    async fn targets(&self, job: &WarmupJob) -> (Vec<Target>, Vec<String>) {
        let prefix = &self.config.cache.key_prefix;
        let clock = Clock {
            now: Utc::now(),
            now_step: self.config.cache.now_step,
        };
        match job.kind {
            WarmupKind::Query { .. } => {
                let (targets, problems) = job.targets(prefix, &clock);
                (targets, problems.iter().map(ToString::to_string).collect())
            }
            WarmupKind::Popular { top, hours } => {
                let demand = match self.parts.popularity.top(hours, top).await {
                    Ok(demand) => demand,
                    Err(err) => return (Vec::new(), vec![err.to_string()]),
                };
                let mut targets = Vec::new();
                for (d, _count) in demand {
                    let Some(query) = self.catalog.get(&d.query) else {
                        tracing::debug!(query = %d.query, "popular key of a query no longer in the catalog");
                        continue;
                    };
                    match Target::new(
                        query,
                        prefix,
                        d.tenant.as_deref(),
                        d.format,
                        &d.raw(),
                        &clock,
                    ) {
                        Ok(t) => targets.push(t),
                        // The catalog changed since it was requested: not this run's failure.
                        Err(err) => {
                            tracing::debug!(query = %d.query, "popular key no longer binds: {err}")
                        }
                    }
                }
                (targets, Vec::new())
            }
        }
    }

    /// Warms one key unless it stays fresh past `refresh_ahead`.
    async fn warm(
        &self,
        target: &Target,
        refresh_ahead: Duration,
        filler: &Arc<Filler>,
    ) -> KeyResult {
        let now = now_ms();
        let beta = self.config.cache.xfetch_beta;
        let existing = self.parts.cache.get(&target.key, now).await;
        if let Some(entry) = &existing {
            let ahead = now.saturating_add(refresh_ahead.as_millis() as i64);
            let r = freshness::sample();
            let fresh = matches!(
                freshness::judge(&entry.header, now, beta, r),
                Freshness::Fresh { .. }
            );
            let near = ahead >= entry.header.fresh_until_ms
                || freshness::xfetch(
                    ahead,
                    entry.header.fresh_until_ms,
                    entry.header.compute_ms,
                    beta,
                    r,
                );
            if fresh && !near {
                return KeyResult::Skipped;
            }
        }
        let replaces = existing.as_ref().map(|e| e.header.created_ms);
        let job = FillJob {
            key: target.key.clone(),
            query: target.query.name.clone(),
            sql: target.sql.clone(),
            range: target.range,
            asked: target.asked.clone(),
            format: target.format,
            ttl: target.query.ttl,
            grace: target.query.grace,
            replaces,
        };
        let subscriber = match self.parts.coalescer.join(&target.key, usize::MAX) {
            Role::Leader(producer, subscriber) => {
                filler.spawn(job, producer);
                subscriber
            }
            Role::Follower(subscriber) => subscriber,
            Role::Overloaded => return KeyResult::Failed("too many waiters".into()),
        };
        let mut subscriber = subscriber;
        let bytes = match drain(&mut subscriber).await {
            Ok(bytes) => bytes,
            Err(err) => return KeyResult::Failed(err.to_string()),
        };
        // The answer streamed; the flight says whether it was stored.
        match subscriber.stored() {
            Some(StoreOutcome::Stored) => KeyResult::Warmed(bytes),
            Some(StoreOutcome::TooLarge) => KeyResult::Failed(format!(
                "computed ({bytes} bytes) but not stored: larger than cache.max_entry_bytes"
            )),
            Some(StoreOutcome::Failed) | None => KeyResult::Failed(format!(
                "computed ({bytes} bytes) but not stored: the cache refused it (Redis did not answer, or larger than cache.memory_max_bytes)"
            )),
        }
    }
}

/// What a run did, before it is judged and recorded.
struct Execution {
    counts: Counts,
    /// One line per key that failed (or could not be made).
    problems: Vec<String>,
    total: usize,
    interrupted: bool,
}

impl Execution {
    /// The run's outcome, and the error its history row carries.
    fn verdict(&self, job: &WarmupJob) -> (Outcome, Option<String>) {
        let (counts, total) = (self.counts, self.total);
        let outcome = if self.interrupted {
            Outcome::Interrupted
        } else if counts.failed == 0 && !(total == 0 && job_is_query(job)) {
            Outcome::Ok
        } else if counts.warmed + counts.skipped > 0 {
            Outcome::Partial
        } else {
            Outcome::Failed
        };
        let error = match (self.interrupted, self.problems.len()) {
            (true, _) => Some(format!(
                "cut at shutdown after {} of {total} keys",
                counts.warmed + counts.skipped + counts.failed
            )),
            (false, 0) if total == 0 && job_is_query(job) => Some("no keys to warm".into()),
            (false, 0) => None,
            (false, n) => Some(format!(
                "{n} keys failed; first: {}",
                self.problems.first().map(String::as_str).unwrap_or("")
            )),
        };
        (outcome, error)
    }
}

fn job_is_query(job: &WarmupJob) -> bool {
    matches!(job.kind, WarmupKind::Query { .. })
}

/// Reads a flight to its end: its size, or why it failed.
async fn drain(subscriber: &mut Subscriber) -> Result<i64, FlightError> {
    let mut bytes = 0i64;
    while let Some(chunk) = subscriber.next().await {
        bytes += chunk?.len() as i64;
    }
    Ok(bytes)
}

/// This machine's host name, for the history.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
