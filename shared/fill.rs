//! Computing one missing answer: ClickHouse → flight readers → cache.
//!
//! A fill runs as a detached task that owns a flight's [`Producer`]: it reads
//! ClickHouse's answer chunk by chunk, hands each chunk to the flight's readers
//! as it arrives, and, when the answer is complete, verified and within the
//! size limit, stores it as one [`Entry`]. A failed answer is never stored.
//! Proxy misses and scheduler warm-ups both go through [`Filler::spawn`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::cache::{CacheKey, Entry, EntryHeader, RedisCache};
use crate::clickhouse::ClickHouse;
use crate::coalesce::Producer;
use crate::format::Format;
use crate::metrics::{Metrics, ResultLabels};

/// One answer to compute.
#[derive(Debug, Clone)]
pub struct FillJob {
    pub key: CacheKey,
    pub query: String,
    pub sql: String,
    pub format: Format,
    pub ttl: Duration,
}

/// What fills need: ClickHouse, the cache and the size limit.
pub struct Filler {
    pub clickhouse: ClickHouse,
    pub cache: Arc<RedisCache>,
    pub metrics: Arc<Metrics>,
    pub max_entry_bytes: usize,
}

impl Filler {
    /// Starts computing `job` in the background; its answer goes to `producer`'s flight.
    pub fn spawn(self: &Arc<Self>, job: FillJob, producer: Producer) {
        let filler = self.clone();
        tokio::spawn(async move { filler.run(job, producer).await });
    }

    async fn run(&self, job: FillJob, mut producer: Producer) {
        let started = Instant::now();
        let query_id = query_id();
        let mut answer = match self.clickhouse.query(&job.sql, job.format, &query_id) {
            Ok(answer) => answer,
            Err(err) => {
                tracing::warn!(query = %job.query, %query_id, error = %err, "ClickHouse query failed");
                producer.fail(err.into());
                return;
            }
        };
        let mut size = 0usize;
        loop {
            match answer.next().await {
                Ok(Some(chunk)) => {
                    size += chunk.len();
                    producer.push(chunk);
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::warn!(query = %job.query, %query_id, error = %err, "ClickHouse query failed");
                    producer.fail(err.into());
                    return;
                }
            }
        }
        let compute = started.elapsed();
        self.metrics
            .clickhouse_duration
            .observe(compute.as_secs_f64());
        producer.complete();

        let outcome = if size > self.max_entry_bytes {
            tracing::debug!(query = %job.query, size, "answer too large to cache");
            "too_large"
        } else {
            let mut body = BytesMut::with_capacity(size);
            for chunk in producer.chunks() {
                body.extend_from_slice(&chunk);
            }
            let entry = new_entry(body.freeze(), &job, compute);
            if self.cache.put(&job.key, &entry, job.ttl).await {
                "stored"
            } else {
                "failed"
            }
        };
        self.metrics
            .cache_stores
            .get_or_create(&ResultLabels { result: outcome })
            .inc();
        // Dropping the producer lands the flight: later requests read the cache.
    }
}

fn new_entry(body: bytes::Bytes, job: &FillJob, compute: Duration) -> Entry {
    let now = chrono::Utc::now().timestamp_millis();
    let fresh_until = now.saturating_add(i64::try_from(job.ttl.as_millis()).unwrap_or(i64::MAX));
    Entry {
        header: EntryHeader {
            created_ms: now,
            fresh_until_ms: fresh_until,
            stale_until_ms: fresh_until,
            compute_ms: u64::try_from(compute.as_millis()).unwrap_or(u64::MAX),
            etag: Entry::etag_of(&body),
            content_type: job.format.content_type().to_owned(),
            encoding: "identity".into(),
        },
        body,
    }
}

/// A query id unique across processes and restarts, to find a query in
/// `system.processes` (and kill it).
fn query_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "dashcache-{}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
