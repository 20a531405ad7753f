//! Entries in Redis, with graceful degradation.
//!
//! One connection ([`RedisConn`]: a multiplexed connection that reconnects by
//! itself, to a single server, a Redis Cluster or a Sentinel-found master)
//! serves every task. Each operation is bounded by the configured
//! timeout; a failure marks Redis down for `retry_after`, during which reads are
//! misses and writes are skipped without waiting, so a dead Redis costs requests
//! nothing but the cache. The first operation after that window probes again,
//! and success brings caching back without a restart.
//!
//! It also holds the per-key computation locks that make several proxy
//! processes run a missing key once: `SET NX PX` with a random token, renewed
//! and released only by the holder (compare-and-act Lua scripts). A lock key is
//! the entry key plus `:lock`, in the same Redis Cluster slot (the key's hash
//! tag). Every command and script here touches one key, so all of it works
//! on Cluster.

use crate::clock::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands;

use super::{CacheKey, Entry};
use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::redis_conn::{RedisConn, RedisConnError, Timeouts};

/// What trying to take a computation lock gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// This process holds it now.
    Acquired,
    /// Another process holds it: it is computing the key.
    Held,
    /// Redis cannot tell: compute without a lock.
    Unavailable,
}

const RENEW_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) else return 0 end";

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

impl RedisCache {
    /// Prepares a connection; nothing is sent until the first operation, so a
    /// proxy starts even while Redis is down.
    pub fn new(
        config: &RedisConfig,
        metrics: Arc<Metrics>,
    ) -> Result<RedisCache, redis::RedisError> {
        let conn = match RedisConn::open(config, Timeouts::of(config)) {
            Ok(conn) => conn,
            Err(RedisConnError::Redis(err)) => return Err(err),
            Err(RedisConnError::Config(msg)) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "bad [redis] topology",
                    msg,
                )));
            }
        };
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
        let mut conn = self.available()?;
        let reply =
            tokio::time::timeout(self.timeout, conn.get::<_, Option<Vec<u8>>>(key.as_str())).await;
        let bytes = self.settle(reply)??;
        match Entry::decode(Bytes::from(bytes)) {
            Ok(entry) => Some(entry),
            Err(err) => {
                tracing::debug!(key = %key, error = %err, "ignoring undecodable cache entry");
                None
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

    /// Tries to take the computation lock of `key` for `ttl`.
    pub async fn lock(&self, key: &CacheKey, token: &str, ttl: Duration) -> LockOutcome {
        let Some(mut conn) = self.available() else {
            return LockOutcome::Unavailable;
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(lock_key(key))
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let reply =
            tokio::time::timeout(self.timeout, cmd.query_async::<Option<String>>(&mut conn)).await;
        match self.settle(reply) {
            Some(Some(_)) => LockOutcome::Acquired,
            Some(None) => LockOutcome::Held,
            None => LockOutcome::Unavailable,
        }
    }

    /// Extends a lock this process holds; false if it is no longer ours.
    pub async fn renew(&self, key: &CacheKey, token: &str, ttl: Duration) -> bool {
        let script = redis::Script::new(RENEW_SCRIPT);
        let mut invocation = script.key(lock_key(key));
        invocation.arg(token).arg(millis(ttl));
        self.invoke::<i64>(invocation).await == Some(1)
    }

    /// Releases a lock this process holds (a lock that expired and was taken
    /// by another process is left alone).
    pub async fn unlock(&self, key: &CacheKey, token: &str) {
        let script = redis::Script::new(RELEASE_SCRIPT);
        let mut invocation = script.key(lock_key(key));
        invocation.arg(token);
        self.invoke::<i64>(invocation).await;
    }

    /// Whether another process holds the lock of `key`; `None` if Redis cannot tell.
    pub async fn is_locked(&self, key: &CacheKey) -> Option<bool> {
        let mut conn = self.available()?;
        let reply = tokio::time::timeout(self.timeout, conn.exists::<_, bool>(lock_key(key))).await;
        self.settle(reply)
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
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let reply = tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// A connection handle, unless Redis is in its down window.
    fn available(&self) -> Option<RedisConn> {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if until != 0 && now_ms() < until {
            return None;
        }
        Some(self.conn.clone())
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
            Ok(Err(err)) => (err.to_string(), err.is_connection_refusal()),
            Err(_) => (format!("no answer within {:?}", self.timeout), false),
        };
        let (error, refused) = error;
        self.metrics.redis_errors.inc();
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if !refused && failures < 3 {
            tracing::debug!(%error, failures, "redis operation failed");
            return None;
        }
        let retry_ms = i64::try_from(self.retry_after.as_millis()).unwrap_or(i64::MAX);
        self.down_until_ms
            .store(now_ms().saturating_add(retry_ms), Ordering::Relaxed);
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
