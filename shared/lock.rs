//! A Redis lock with a guard: `SET NX PX` with a random token, renewed every
//! third of its TTL while held, released when the guard is dropped.
//!
//! One implementation for every lock of the product: the per-key computation
//! locks of fills (several proxies run a missing key once) and the scheduler's
//! job leases (two hosts never run one job at once). Renewal and release are
//! compare-and-act Lua scripts on the token, so a lock that expired and was
//! taken by another process is never extended or deleted by its old holder.
//! Dropping the guard — a normal end, an early return, a panic unwinding the
//! task — stops the renewal at once and releases the lock, so nobody waits
//! out the TTL because a holder went away without saying so; only a holder
//! that dies with its process leaves the lock to expire.
//!
//! It does not know what is locked or what waiters do (see `fill` and the
//! scheduler's runner); every command touches one key, so it works on Redis
//! Cluster when the key carries its hash tag.

use std::time::Duration;

use crate::redis_conn::RedisConn;

const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) else return 0 end";

/// What trying to take a lock gave.
#[derive(Debug)]
pub enum Acquire {
    /// This process holds it until the guard is dropped.
    Held(LockGuard),
    /// Someone else holds it; `holder` is the name it took it under.
    Busy { holder: Option<String> },
}

/// Tries to take the lock `key` for `ttl` in the name of `holder` (a host or
/// process name, for messages). Each Redis round trip is bounded by `timeout`.
pub async fn acquire(
    conn: &RedisConn,
    key: String,
    holder: &str,
    ttl: Duration,
    timeout: Duration,
) -> Result<Acquire, redis::RedisError> {
    let token = format!("{holder} {}", uuid::Uuid::new_v4());
    let ttl_ms = millis(ttl);
    let mut c = conn.clone();
    let set = bounded(
        timeout,
        redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async::<Option<String>>(&mut c),
    )
    .await?;
    if set.is_none() {
        let current: Option<String> =
            bounded(timeout, redis::cmd("GET").arg(&key).query_async(&mut c)).await?;
        let holder = current.and_then(|h| h.rsplit_once(' ').map(|(who, _)| who.to_owned()));
        return Ok(Acquire::Busy { holder });
    }
    let renewal = tokio::spawn(renew_until_lost(
        conn.clone(),
        key.clone(),
        token.clone(),
        ttl,
        timeout,
    ));
    Ok(Acquire::Held(LockGuard {
        held: Some(Held {
            conn: conn.clone(),
            key,
            token,
            timeout,
        }),
        renewal,
    }))
}

/// Whether `key` is locked by anyone now.
pub async fn is_locked(
    conn: &RedisConn,
    key: &str,
    timeout: Duration,
) -> Result<bool, redis::RedisError> {
    let mut c = conn.clone();
    bounded(timeout, redis::cmd("EXISTS").arg(key).query_async(&mut c)).await
}

/// A held lock. Renewed in the background; released on [`LockGuard::release`]
/// or, failing that, on drop.
pub struct LockGuard {
    held: Option<Held>,
    renewal: tokio::task::JoinHandle<()>,
}

struct Held {
    conn: RedisConn,
    key: String,
    token: String,
    timeout: Duration,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key())
            .finish()
    }
}

impl LockGuard {
    /// The locked key.
    pub fn key(&self) -> &str {
        self.held.as_ref().map_or("", |h| h.key.as_str())
    }

    /// Releases the lock now and waits for Redis to confirm (bounded).
    pub async fn release(mut self) {
        self.renewal.abort();
        if let Some(held) = self.held.take() {
            held.release().await;
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewal.abort();
        if let Some(held) = self.held.take() {
            // Dropped without `release` (an early return, a panic): give the
            // lock back in the background. Without a runtime (the process is
            // ending) it expires by itself after its TTL.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(held.release());
            }
        }
    }
}

impl Held {
    async fn release(mut self) {
        let released = bounded(
            self.timeout,
            redis::Script::new(RELEASE)
                .key(&self.key)
                .arg(&self.token)
                .invoke_async::<i64>(&mut self.conn),
        )
        .await;
        if let Err(err) = released {
            tracing::warn!(lock = %self.key, error = %err, "could not release a lock; it expires by itself");
        }
    }
}

/// Extends the lock every third of its TTL until it is no longer ours.
async fn renew_until_lost(
    mut conn: RedisConn,
    key: String,
    token: String,
    ttl: Duration,
    timeout: Duration,
) {
    let mut every = tokio::time::interval(ttl / 3);
    every.tick().await;
    loop {
        every.tick().await;
        let renewed = bounded(
            timeout,
            redis::Script::new(RENEW)
                .key(&key)
                .arg(&token)
                .arg(millis(ttl))
                .invoke_async::<i64>(&mut conn),
        )
        .await;
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(lock = %key, "lock lost (expired and taken by another holder)");
                return;
            }
            Err(err) => tracing::debug!(lock = %key, error = %err, "could not renew a lock"),
        }
    }
}

/// `op` within `timeout`; a timeout is an I/O error like a dropped connection.
async fn bounded<T>(
    timeout: Duration,
    op: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    match tokio::time::timeout(timeout, op).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from Redis within {timeout:?}"),
        ))),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
