//! Redis leases: which host runs a job, and which scheduled time was claimed.
//!
//! Owns two kinds of keys under the config's key prefix:
//! - a *slot* per (job, scheduled time), claimed once with `SET NX` and kept
//!   for a day, so several schedulers firing the same scheduled time run it once;
//! - a *lease* per job ([`dashcache::lock`]: a guard renewed every third of
//!   its TTL, released on drop), so two hosts never run the same job at the
//!   same time. If its holder dies, the lease expires after its TTL.
//!
//! Both carry the job name as a Redis Cluster hash tag, and every command or
//! script touches one key, so they work on any topology ([`RedisConn`]).
//!
//! It does not decide what to do when a lease is taken; [`crate::runner`] does.

use std::time::Duration;

use dashcache::lock::{self, Acquire};
use dashcache::redis_conn::RedisConn;

/// How long a claimed slot is remembered.
const SLOT_TTL: Duration = Duration::from_secs(24 * 3600);

fn slot_key(prefix: &str, job: &str, scheduled_ms: i64) -> String {
    format!("{prefix}:warmup:{{{job}}}:slot:{scheduled_ms}")
}

fn lease_key(prefix: &str, job: &str) -> String {
    format!("{prefix}:warmup:{{{job}}}:lease")
}

/// Claims a scheduled time of `job` for this host; false when another host did.
pub async fn claim_slot(
    conn: &mut RedisConn,
    prefix: &str,
    job: &str,
    scheduled_ms: i64,
    holder: &str,
) -> Result<bool, redis::RedisError> {
    let set: Option<String> = redis::cmd("SET")
        .arg(slot_key(prefix, job, scheduled_ms))
        .arg(holder)
        .arg("NX")
        .arg("PX")
        .arg(SLOT_TTL.as_millis() as u64)
        .query_async(conn)
        .await?;
    Ok(set.is_some())
}

/// Takes `job`'s lease, or tells who holds it. The lease is a
/// [`dashcache::lock::LockGuard`]: renewed while held, given back when dropped.
pub async fn acquire(
    conn: &RedisConn,
    prefix: &str,
    job: &str,
    holder: &str,
    ttl: Duration,
    timeout: Duration,
) -> Result<Acquire, redis::RedisError> {
    lock::acquire(conn, lease_key(prefix, job), holder, ttl, timeout).await
}
