//! Computing one answer: ClickHouse → flight readers → cache, once across processes.
//!
//! A fill runs as a detached task that owns a flight's [`Producer`], so no
//! client going away cancels it for the others. It first takes the key's Redis
//! lock. If another process holds it, the fill waits for that process's answer
//! to land in Redis and hands it to its readers; if the lock disappears without
//! an answer (the holder failed or died), it takes over. Holding the lock, it
//! reads ClickHouse's answer chunk by chunk, hands each chunk to the readers as
//! it arrives, and stores a complete, verified answer within the size limit as
//! one [`Entry`]. A computation that fails before its first byte is retried once,
//! so one failure is not fanned out to every reader. A failed answer is never stored.
//!
//! ClickHouse is spared when it struggles: a key whose computation failed is
//! not computed again before its [`Backoff`] ends (its readers hear so at once),
//! a computation runs only in one of the process's [`Admission`] slots, and
//! [`Filler::may_refresh`] starts no background refresh while every replica is
//! ejected, the key backs off, or every slot is taken.
//!
//! Proxy misses, background refreshes and scheduler warm-ups all go through
//! [`Filler::spawn`].
//!
//! A fill reaches the outside world through two narrow interfaces:
//! [`AnswerStore`] (answers and locks shared between processes: Redis behind
//! the [`Cache`], or [`memory::MemoryStore`] in one process) and [`Upstream`]
//! (where answers are computed: [`ClickHouse`]). The state machine — lock,
//! wait, take over, retry once, store — is tested in process against
//! in-memory implementations with a paused clock (`tests.rs`).

pub mod memory;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::admission::Admission;
use crate::backoff::Backoff;
use crate::cache::{Cache, CacheKey, Entry, EntryHeader};
use crate::catalog::{Asked, TimeRange};
use crate::clickhouse::{Answer, ClickHouse, UpstreamError};
use crate::clock::now_ms;
use crate::coalesce::{FlightError, Producer};
use crate::config::CoalesceConfig;
use crate::encoding::{self, Encoding, STORE_THRESHOLD};
use crate::format::Format;
use crate::metrics::Metrics;
use crate::outcome::{AttemptOutcome, StoreOutcome};

/// One answer to compute.
#[derive(Debug, Clone)]
pub struct FillJob {
    pub key: CacheKey,
    pub query: String,
    /// The SQL as resolved when the job was made.
    pub sql: String,
    /// The time range that SQL reads (stored with the answer).
    pub range: Option<TimeRange>,
    /// For a request asked relative to the clock (`now-7d`): resolved again
    /// when a refresh computes it, so the refreshed answer covers the range
    /// as of then while its cache key stays the same.
    pub asked: Option<Arc<Asked>>,
    pub format: Format,
    pub ttl: Duration,
    pub grace: Duration,
    /// For a refresh: `created_ms` of the entry it replaces. An answer at
    /// least that new, stored meanwhile by anyone, makes the computation moot.
    pub replaces: Option<i64>,
}

/// Where computed answers are shared between processes, with the per-key
/// locks that make several processes compute a key once.
pub trait AnswerStore: Send + Sync {
    /// The stored answer under `key`, as other processes see it.
    fn shared(&self, key: &CacheKey) -> BoxFuture<'_, Option<Entry>>;
    /// Stores `entry`; false when the store did not take it.
    fn put(&self, key: &CacheKey, entry: Arc<Entry>, now_ms: i64) -> BoxFuture<'_, bool>;
    /// Tries to take `key`'s computation lock for `ttl`.
    fn lock(&self, key: &CacheKey, ttl: Duration) -> BoxFuture<'_, LockOutcome>;
    /// Whether someone holds `key`'s lock; `None` when the store cannot tell.
    fn is_locked(&self, key: &CacheKey) -> BoxFuture<'_, Option<bool>>;
}

/// A held computation lock: renewed while held, released when dropped.
pub trait HeldLock: Send {
    /// Releases it now (waiting for the store to confirm).
    fn release(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// What trying to take a computation lock gave.
pub enum LockOutcome {
    /// This process holds it until the guard is dropped.
    Acquired(Box<dyn HeldLock>),
    /// Another process holds it: it is computing the key.
    Held,
    /// The store cannot tell: compute without a lock.
    Unavailable,
}

/// Where answers are computed.
pub trait Upstream: Send + Sync {
    /// Starts `sql`; nothing may be sent before the first read.
    fn query(
        &self,
        sql: &str,
        format: Format,
        query_id: &str,
    ) -> Result<Box<dyn AnswerStream>, UpstreamError>;
    /// How many replicas a query can fail over to.
    fn replicas(&self) -> usize;
    /// Whether some replica is up; while none is, refreshes are not started.
    fn available(&self) -> bool {
        true
    }
}

/// An answer being read, chunk by chunk; `None` at its verified end.
pub trait AnswerStream: Send {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>>;
    /// Response headers to keep with the answer and replay on hits (known
    /// once the first `next` returned); none by default.
    fn headers(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

impl AnswerStore for Cache {
    fn shared(&self, key: &CacheKey) -> BoxFuture<'_, Option<Entry>> {
        let key = key.clone();
        Box::pin(async move { self.shared(&key).await })
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>, now_ms: i64) -> BoxFuture<'_, bool> {
        let key = key.clone();
        Box::pin(async move { Cache::put(self, &key, entry, now_ms).await })
    }

    fn lock(&self, key: &CacheKey, ttl: Duration) -> BoxFuture<'_, LockOutcome> {
        let Some(redis) = self.redis() else {
            return match self.memory() {
                Some(memory) => AnswerStore::lock(memory, key, ttl),
                None => Box::pin(async { LockOutcome::Unavailable }),
            };
        };
        let key = key.clone();
        Box::pin(async move {
            match redis.lock(&key, ttl).await {
                crate::cache::LockOutcome::Acquired(guard) => {
                    LockOutcome::Acquired(Box::new(guard))
                }
                crate::cache::LockOutcome::Held => LockOutcome::Held,
                crate::cache::LockOutcome::Unavailable => LockOutcome::Unavailable,
            }
        })
    }

    fn is_locked(&self, key: &CacheKey) -> BoxFuture<'_, Option<bool>> {
        let Some(redis) = self.redis() else {
            return match self.memory() {
                Some(memory) => AnswerStore::is_locked(memory, key),
                None => Box::pin(async { None }),
            };
        };
        let key = key.clone();
        Box::pin(async move { redis.is_locked(&key).await })
    }
}

impl HeldLock for crate::lock::LockGuard {
    fn release(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { crate::lock::LockGuard::release(*self).await })
    }
}

impl Upstream for ClickHouse {
    fn query(
        &self,
        sql: &str,
        format: Format,
        query_id: &str,
    ) -> Result<Box<dyn AnswerStream>, UpstreamError> {
        Ok(Box::new(ClickHouse::query(self, sql, format, query_id)?))
    }

    fn replicas(&self) -> usize {
        ClickHouse::replicas(self)
    }

    fn available(&self) -> bool {
        ClickHouse::available(self)
    }
}

impl AnswerStream for Answer {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        Box::pin(Answer::next(self))
    }
}

/// What fills need: where answers are computed and shared, and the limits.
pub struct Filler {
    pub upstream: Arc<dyn Upstream>,
    pub store: Arc<dyn AnswerStore>,
    pub metrics: Arc<Metrics>,
    pub max_entry_bytes: usize,
    pub coalesce: CoalesceConfig,
    /// Per-key waits after failed computations (`Backoff::of(&coalesce)`).
    pub backoff: Arc<Backoff>,
    /// Slots at ClickHouse (`Admission::of(&config.clickhouse, …)`), shared by
    /// every filler of the process.
    pub admission: Arc<Admission>,
}

/// Why a refresh is not started now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Every ClickHouse replica is ejected: wait for a health check.
    Ejected,
    /// The key's last computation failed; its backoff has this long to run.
    BackingOff(Duration),
    /// Every ClickHouse slot of this process is taken: misses go first.
    Busy,
}

/// How waiting on another process's lock ended.
enum Remote {
    Landed(Arc<Entry>),
    Released,
    TimedOut,
}

impl Filler {
    /// Whether a background refresh of `key` may start now: not while every
    /// replica is ejected, nor while the key backs off after a failure, nor
    /// while every ClickHouse slot is taken (a refresh does not queue ahead of
    /// misses). A skipped refresh is counted; the stored answer keeps being
    /// served and a later read asks again.
    pub fn may_refresh(&self, key: &CacheKey) -> Result<(), Skip> {
        let skip = if !self.upstream.available() {
            Skip::Ejected
        } else if let Some(wait) = self.backoff.wait(key) {
            Skip::BackingOff(wait)
        } else if !self.admission.has_free_slot() {
            Skip::Busy
        } else {
            return Ok(());
        };
        self.metrics.attempt(match skip {
            Skip::Ejected => AttemptOutcome::Ejected,
            Skip::BackingOff(_) => AttemptOutcome::BackingOff,
            Skip::Busy => AttemptOutcome::Busy,
        });
        Err(skip)
    }

    /// Starts computing `job` in the background; its answer goes to `producer`'s flight.
    pub fn spawn(self: &Arc<Self>, job: FillJob, producer: Producer) {
        let filler = self.clone();
        tokio::spawn(async move { filler.run(job, producer).await });
    }

    /// Like [`Filler::spawn`], but the computation first waits for `turn`
    /// (e.g. a slot of the caller's concurrency allowance), and holds what it
    /// yields until the computation ends, so the allowance counts the whole
    /// computation, not just the time to the first byte. If `turn` refuses,
    /// the flight fails with that refusal and nothing is computed. The wait
    /// happens in the detached task: the leading client leaving the queue does
    /// not fail the requests reading along.
    pub fn spawn_after<T, P>(self: &Arc<Self>, job: FillJob, mut producer: Producer, turn: T)
    where
        T: Future<Output = Result<P, FlightError>> + Send + 'static,
        P: Send + 'static,
    {
        let filler = self.clone();
        tokio::spawn(async move {
            match turn.await {
                Ok(held) => {
                    filler.run(job, producer).await;
                    drop(held);
                }
                Err(refused) => producer.fail(refused),
            }
        });
    }

    async fn run(&self, mut job: FillJob, mut producer: Producer) {
        if let Some(wait) = self.backoff.wait(&job.key) {
            // Failed moments ago: its readers hear so at once, ClickHouse
            // is not asked again before the backoff ends.
            self.metrics.attempt(AttemptOutcome::BackingOff);
            producer.fail(FlightError::BackingOff(wait));
            return;
        }
        if job.replaces.is_some()
            && let Some(asked) = &job.asked
        {
            match asked.resolve(chrono::Utc::now()) {
                Ok(resolved) => {
                    job.sql = resolved.sql;
                    job.range = resolved.range;
                }
                Err(msg) => {
                    tracing::warn!(key = %job.key, "a relative request no longer resolves: {msg}");
                    producer.fail(FlightError::Aborted);
                    return;
                }
            }
        }
        let deadline = Instant::now() + self.coalesce.wait_timeout;
        loop {
            let guard = match self.store.lock(&job.key, self.coalesce.lock_ttl).await {
                LockOutcome::Held => match self.await_remote(&job, deadline).await {
                    Remote::Landed(entry) => {
                        self.hand_over(&entry, &mut producer).await;
                        return;
                    }
                    Remote::Released => continue,
                    Remote::TimedOut => {
                        producer.fail(FlightError::WaitTimeout(self.coalesce.wait_timeout));
                        return;
                    }
                },
                LockOutcome::Acquired(guard) => Some(guard),
                LockOutcome::Unavailable => None,
            };
            if let Some(guard) = guard {
                if let Some(entry) = self.landed(&job).await {
                    // Stored by someone between our lookup and our lock.
                    guard.release().await;
                    self.hand_over(&entry, &mut producer).await;
                    return;
                }
                // The guard renews the lock while this computes and releases
                // it however the computation ends (a panic included).
                self.compute(&job, &mut producer).await;
                guard.release().await;
            } else {
                self.compute(&job, &mut producer).await;
            }
            return;
        }
    }

    /// Gives readers a stored answer (uncompressed: readers get identity bytes).
    async fn hand_over(&self, entry: &Entry, producer: &mut Producer) {
        let encoding = entry.encoding();
        let body = if encoding == Encoding::Identity {
            Ok(entry.body.clone())
        } else {
            let (packed, limit) = (entry.body.clone(), self.max_entry_bytes);
            tokio::task::spawn_blocking(move || encoding::decompress(&packed, encoding, limit))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        match body {
            Ok(body) => {
                producer.set_headers(entry.header.headers.clone());
                producer.push(body);
                // Another process stored it: it is in the shared store.
                producer.complete_stored(StoreOutcome::Stored);
            }
            Err(err) => {
                tracing::error!(etag = %entry.header.etag, error = %err, "stored answer does not decompress");
                producer.fail(FlightError::Aborted);
            }
        }
    }

    /// Waits while another process holds the key's lock.
    async fn await_remote(&self, job: &FillJob, deadline: Instant) -> Remote {
        loop {
            if Instant::now() >= deadline {
                return Remote::TimedOut;
            }
            tokio::time::sleep(self.coalesce.poll_interval).await;
            match self.store.is_locked(&job.key).await {
                Some(true) => continue,
                Some(false) => {
                    return match self.landed(job).await {
                        Some(entry) => Remote::Landed(entry),
                        None => Remote::Released,
                    };
                }
                None => return Remote::Released,
            }
        }
    }

    /// A fresh answer in Redis that makes this job moot.
    async fn landed(&self, job: &FillJob) -> Option<Arc<Entry>> {
        let now = now_ms();
        let entry = self.store.shared(&job.key).await?;
        let newer = entry.header.created_ms > job.replaces.unwrap_or(i64::MIN);
        (newer && now < entry.header.fresh_until_ms).then(|| Arc::new(entry))
    }

    /// Runs the query (retrying once if it fails before its first byte) and
    /// stores the answer.
    async fn compute(&self, job: &FillJob, producer: &mut Producer) {
        // Held until the answer's last byte: ClickHouse never runs more than
        // `max_in_flight` of this process's computations.
        let _slot = match self.admission.enter().await {
            Ok(slot) => slot,
            Err(refused) => {
                tracing::debug!(query = %job.query, %refused, "not computed: ClickHouse is saturated");
                producer.fail(refused.into());
                return;
            }
        };
        let started = Instant::now();
        let mut attempt = 1;
        let size = loop {
            match self.attempt(job, producer).await {
                Ok(size) => break size,
                // With several replicas, a query that could not connect has
                // already been tried on each of them: retrying would only
                // multiply the attempts. A 4xx from ClickHouse (a syntax
                // error, an unknown table) would only be said again.
                Err(err) if attempt == 1 && !producer.started() && self.worth_retrying(&err) => {
                    tracing::warn!(query = %job.query, error = %err, "ClickHouse query failed; retrying once");
                    attempt += 1;
                }
                Err(err) => {
                    // Only a ClickHouse that is unwell holds the key back; an
                    // error it reported about the query itself (a syntax error,
                    // an unknown table, a denied grant) is said again at once,
                    // as ClickHouse would.
                    let wait = if err.says_server_unwell() {
                        self.backoff.failed(&job.key)
                    } else {
                        Duration::ZERO
                    };
                    tracing::warn!(query = %job.query, error = %err, backoff = ?wait, "ClickHouse query failed");
                    if job.replaces.is_some() {
                        self.metrics.refresh_failures.inc();
                    }
                    producer.fail(err.into());
                    return;
                }
            }
        };
        self.backoff.succeeded(&job.key);
        let compute = started.elapsed();
        self.metrics
            .clickhouse_duration
            .observe(compute.as_secs_f64());

        // Store before completing: a client that has the whole answer and asks
        // again must find it in the cache.
        let outcome = if size > self.max_entry_bytes {
            tracing::debug!(query = %job.query, size, "answer too large to cache");
            StoreOutcome::TooLarge
        } else {
            let mut body = BytesMut::with_capacity(size);
            for chunk in producer.chunks() {
                body.extend_from_slice(&chunk);
            }
            let body = body.freeze();
            let etag = Entry::etag_of(&body);
            let (body, encoding) = stored_form(body).await;
            let now = now_ms();
            let mut entry = new_entry(body, encoding, etag, job, compute, now);
            entry.header.headers = producer.headers().as_ref().clone();
            let entry = Arc::new(entry);
            if self.store.put(&job.key, entry, now).await {
                StoreOutcome::Stored
            } else {
                StoreOutcome::Failed
            }
        };
        self.metrics.store_outcome(outcome);
        producer.complete_stored(outcome);
        // The caller drops the producer, which lands the flight: later
        // requests read the cache.
    }

    /// Whether a failure before the first byte may go away on a second try.
    fn worth_retrying(&self, err: &UpstreamError) -> bool {
        match err {
            UpstreamError::Connect(_) => self.upstream.replicas() <= 1,
            UpstreamError::Query {
                status: Some(400..=499),
                ..
            } => false,
            _ => true,
        }
    }

    /// One run of the query; the answer's size on success.
    async fn attempt(&self, job: &FillJob, producer: &Producer) -> Result<usize, UpstreamError> {
        let mut answer = self.upstream.query(&job.sql, job.format, &unique_id())?;
        producer.mark_computed();
        let mut size = 0usize;
        let mut first = true;
        while let Some(chunk) = answer.next().await? {
            if first {
                first = false;
                producer.set_headers(answer.headers());
            }
            size += chunk.len();
            producer.push(chunk);
        }
        if first {
            producer.set_headers(answer.headers());
        }
        Ok(size)
    }
}

/// The body as it is stored: gzip from [`STORE_THRESHOLD`] bytes on
/// (compressed off the async runtime when large), else as it came.
async fn stored_form(body: Bytes) -> (Bytes, Encoding) {
    if body.len() < STORE_THRESHOLD {
        return (body, Encoding::Identity);
    }
    let packed = if body.len() < 64 * 1024 {
        encoding::compress(&body, Encoding::Gzip)
    } else {
        let copy = body.clone();
        tokio::task::spawn_blocking(move || encoding::compress(&copy, Encoding::Gzip))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    match packed {
        Ok(packed) => (packed, Encoding::Gzip),
        Err(err) => {
            tracing::warn!(error = %err, "compression failed; storing the answer as it is");
            (body, Encoding::Identity)
        }
    }
}

fn new_entry(
    body: Bytes,
    encoding: Encoding,
    etag: String,
    job: &FillJob,
    compute: Duration,
    now: i64,
) -> Entry {
    let fresh_until = now.saturating_add(millis(job.ttl));
    Entry {
        header: EntryHeader {
            created_ms: now,
            fresh_until_ms: fresh_until,
            stale_until_ms: fresh_until.saturating_add(millis(job.grace)),
            compute_ms: u64::try_from(compute.as_millis()).unwrap_or(u64::MAX),
            etag,
            content_type: job.format.content_type().to_owned(),
            encoding: encoding.token().into(),
            range: job.range,
            headers: Vec::new(),
        },
        body,
        identity: Default::default(),
        read_once: Default::default(),
        served: Default::default(),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// An id unique across processes and restarts: ClickHouse query ids (to find
/// a query in `system.processes`) and lock tokens.
fn unique_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "dashcache-{}-{}-{}-{:08x}",
        std::process::id(),
        now_ms(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}
