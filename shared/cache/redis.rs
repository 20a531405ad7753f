//! Entries in Redis, with graceful degradation.
//!
//! One connection ([`RedisConn`]: a multiplexed connection that reconnects by
//! itself, to a single server, a Redis Cluster or a Sentinel-found master)
//! serves every task. Each operation is bounded by the configured
//! timeout; a refused connection or a timeout (a black-holed Redis) marks Redis
//! down for `retry_after` at once (other errors after three in a row), during
//! which reads are misses and writes are skipped without waiting, so a dead
//! Redis costs requests nothing but the cache. After that window exactly one
//! operation probes again (the others still skip Redis until it has its
//! answer), so a Redis that never answers costs one timeout per `retry_after`,
//! not one per request; success brings caching back without a restart.
//!
//! It also takes the per-key computation locks that make several proxy
//! processes run a missing key once ([`crate::lock`]: a guard that renews
//! and releases). A lock key is the entry key plus `:lock`, in the same Redis
//! Cluster slot (the key's hash tag). Every command and script here touches one key, so all of it works
//! on Cluster.

use crate::clock::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands;

use super::{CacheKey, Entry};
use crate::config::RedisConfig;
use crate::lock::{self, Acquire, LockGuard};
use crate::metrics::Metrics;
use crate::redis_conn::{RedisConn, RedisConnError, Timeouts};

/// What trying to take a computation lock gave.
#[derive(Debug)]
pub enum LockOutcome {
    /// This process holds it until the guard is dropped (renewed meanwhile).
    Acquired(LockGuard),
    /// Another process holds it: it is computing the key.
    Held,
    /// Redis cannot tell: compute without a lock.
    Unavailable,
}

/// What reading one key gave.
pub enum Fetched {
    Found(Arc<Entry>),
    /// Redis answered: no (usable) entry.
    Missing,
    /// Redis did not answer (down window, error or timeout).
    Unavailable,
}

/// The Redis side of the cache.
pub struct RedisCache {
    conn: RedisConn,
    timeout: Duration,
    retry_after: Duration,
    /// Unix ms before which Redis is not tried (0: up).
    down_until_ms: AtomicI64,
    down: AtomicBool,
    /// Failures since the last success.
    failures: AtomicU32,
    metrics: Arc<Metrics>,
}

/// Why Redis did not answer a readiness check.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error(transparent)]
    Redis(redis::RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl RedisCache {
    /// Prepares a connection; nothing is sent until the first operation, so a
    /// proxy starts even while Redis is down.
    pub fn new(config: &RedisConfig, metrics: Arc<Metrics>) -> Result<RedisCache, RedisConnError> {
        let conn = RedisConn::open(config, Timeouts::of(config))?;
        Ok(RedisCache {
            conn,
            timeout: config.timeout,
            retry_after: config.retry_after,
            down_until_ms: AtomicI64::new(0),
            down: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            metrics,
        })
    }

    /// The entry under `key`; `None` for a miss, an undecodable entry (an older
    /// version) or while Redis is unreachable.
    pub async fn get(&self, key: &CacheKey) -> Option<Entry> {
        match self.fetch(key).await {
            Fetched::Found(entry) => Some(Arc::unwrap_or_clone(entry)),
            Fetched::Missing | Fetched::Unavailable => None,
        }
    }

    /// Like [`RedisCache::get`], telling a miss from an unreachable Redis.
    pub async fn fetch(&self, key: &CacheKey) -> Fetched {
        let Some(mut conn) = self.available() else {
            return Fetched::Unavailable;
        };
        let reply =
            tokio::time::timeout(self.timeout, conn.get::<_, Option<Vec<u8>>>(key.as_str())).await;
        let Some(found) = self.settle(reply) else {
            return Fetched::Unavailable;
        };
        let Some(bytes) = found else {
            return Fetched::Missing;
        };
        match Entry::decode(Bytes::from(bytes)) {
            Ok(entry) => Fetched::Found(Arc::new(entry)),
            Err(err) => {
                tracing::debug!(key = %key, error = %err, "ignoring undecodable cache entry");
                Fetched::Missing
            }
        }
    }

    /// Stores `entry` under `key` for `ttl`; false when it was not stored.
    pub async fn put(&self, key: &CacheKey, entry: &Entry, ttl: Duration) -> bool {
        let Some(mut conn) = self.available() else {
            return false;
        };
        let ttl_ms = millis(ttl);
        let encoded = entry.encode();
        let reply = tokio::time::timeout(
            self.timeout,
            conn.pset_ex::<_, _, ()>(key.as_str(), encoded, ttl_ms),
        )
        .await;
        self.settle(reply).is_some()
    }

    /// Tries to take the computation lock of `key` for `ttl` (see [`crate::lock`]).
    pub async fn lock(&self, key: &CacheKey, ttl: Duration) -> LockOutcome {
        let Some(conn) = self.available() else {
            return LockOutcome::Unavailable;
        };
        let reply = lock::acquire(&conn, lock_key(key), "fill", ttl, self.timeout).await;
        match self.settle(Ok(reply)) {
            Some(Acquire::Held(guard)) => LockOutcome::Acquired(guard),
            Some(Acquire::Busy { .. }) => LockOutcome::Held,
            None => LockOutcome::Unavailable,
        }
    }

    /// Whether another process holds the lock of `key`; `None` if Redis cannot tell.
    pub async fn is_locked(&self, key: &CacheKey) -> Option<bool> {
        let conn = self.available()?;
        let reply = lock::is_locked(&conn, &lock_key(key), self.timeout).await;
        self.settle(Ok(reply))
    }

    /// Runs a Lua script; `None` while Redis is unreachable or on error.
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = self.available()?;
        let reply =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<T>(&mut conn)).await;
        self.settle(reply)
    }

    /// The connection, for other users of the same Redis (rate limits go
    /// through [`RedisCache::invoke`]; the popularity recorder shares it).
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Whether Redis is currently considered reachable.
    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// Asks Redis for a PONG now (readiness checks), bypassing the down window.
    pub async fn ping(&self) -> Result<(), PingError> {
        let mut conn = self.conn.clone();
        let reply = tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(PingError::Redis(err)),
            Err(_) => Err(PingError::Timeout(self.timeout)),
        }
    }

    /// A connection handle, unless Redis is in its down window. When the
    /// window ends, one caller gets the handle (the probe) and moves the window
    /// on by `retry_after`; [`RedisCache::settle`] ends it if the probe succeeds.
    fn available(&self) -> Option<RedisConn> {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return Some(self.conn.clone());
        }
        let now = now_ms();
        if now < until {
            return None;
        }
        let next = now.saturating_add(self.retry_ms());
        self.down_until_ms
            .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| self.conn.clone())
    }

    fn retry_ms(&self) -> i64 {
        i64::try_from(self.retry_after.as_millis()).unwrap_or(i64::MAX)
    }

    /// Records the outcome of one operation and returns its value on success.
    fn settle<T>(
        &self,
        reply: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let error = match reply {
            Ok(Ok(value)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis is reachable again; caching resumes");
                }
                self.down_until_ms.store(0, Ordering::Relaxed);
                self.failures.store(0, Ordering::Relaxed);
                return Some(value);
            }
            Ok(Err(err)) => (
                err.to_string(),
                err.is_connection_refusal() || err.is_timeout() || err.is_io_error(),
            ),
            // No answer in time: a black-holed or overloaded Redis. Waiting
            // on it again per request would cost every request the timeout.
            Err(_) => (format!("no answer within {:?}", self.timeout), true),
        };
        let (error, at_once) = error;
        self.metrics.redis_errors.inc();
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if !at_once && failures < 3 {
            tracing::debug!(%error, failures, "redis operation failed");
            return None;
        }
        self.down_until_ms
            .store(now_ms().saturating_add(self.retry_ms()), Ordering::Relaxed);
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "redis unreachable; answering from ClickHouse without cache");
        }
        None
    }
}

fn lock_key(key: &CacheKey) -> String {
    format!("{key}:lock")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
