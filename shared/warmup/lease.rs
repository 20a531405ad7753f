//! Leases: which process runs a job, and which scheduled time was claimed.
//!
//! With Redis ([`Leases::Redis`]) it owns two kinds of keys under the config's key prefix:
//! - a *slot* per (job, scheduled time), claimed once with `SET NX` and kept
//!   for a day, so several schedulers (or proxies running jobs) firing the
//!   same scheduled time run it once;
//! - a *lease* per job ([`crate::lock`]: a guard renewed every third of
//!   its TTL, released on drop), so two hosts never run the same job at the
//!   same time. If its holder dies, the lease expires after its TTL.
//!
//! Both carry the job name as a Redis Cluster hash tag, and every command or
//! script touches one key, so they work on any topology ([`RedisConn`]).
//!
//! Without Redis ([`Leases::Local`]: one proxy on one host) there is no other
//! process to share a scheduled time with, so every slot is this process's,
//! and a job's lease is a flag in this process, given back when its guard drops.
//!
//! It does not decide what to do when a lease is taken; [`super::runner`] does.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::lock::{self, Acquire, LockGuard};
use crate::redis_conn::RedisConn;

/// How long a claimed slot is remembered.
const SLOT_TTL: Duration = Duration::from_secs(24 * 3600);

fn slot_key(prefix: &str, job: &str, scheduled_ms: i64) -> String {
    format!("{prefix}:warmup:{{{job}}}:slot:{scheduled_ms}")
}

fn lease_key(prefix: &str, job: &str) -> String {
    format!("{prefix}:warmup:{{{job}}}:lease")
}

/// Where slots and leases are kept.
pub enum Leases {
    /// Shared by every process using this Redis; round trips bounded by `timeout`.
    Redis { conn: RedisConn, timeout: Duration },
    /// This process alone: the jobs running now.
    Local(Arc<Mutex<HashSet<String>>>),
}

/// A held job lease, released on [`Lease::release`] or drop.
pub enum Lease {
    Redis(LockGuard),
    Local(LocalLease),
}

/// What trying to take a job's lease gave.
pub enum LeaseOutcome {
    Held(Lease),
    /// Someone else runs the job; `holder` is the name it took it under.
    Busy {
        holder: Option<String>,
    },
}

impl Leases {
    /// Leases of this process alone.
    pub fn local() -> Leases {
        Leases::Local(Arc::default())
    }

    /// Claims a scheduled time of `job` for this process; false when another
    /// process did.
    pub async fn claim_slot(
        &self,
        prefix: &str,
        job: &str,
        scheduled_ms: i64,
        holder: &str,
    ) -> Result<bool, redis::RedisError> {
        let Leases::Redis { conn, .. } = self else {
            return Ok(true);
        };
        let set: Option<String> = redis::cmd("SET")
            .arg(slot_key(prefix, job, scheduled_ms))
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(SLOT_TTL.as_millis() as u64)
            .query_async(&mut conn.clone())
            .await?;
        Ok(set.is_some())
    }

    /// Takes `job`'s lease for `ttl` (renewed while held), or tells who holds it.
    pub async fn acquire(
        &self,
        prefix: &str,
        job: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<LeaseOutcome, redis::RedisError> {
        match self {
            Leases::Redis { conn, timeout } => {
                match lock::acquire(conn, lease_key(prefix, job), holder, ttl, *timeout).await? {
                    Acquire::Held(guard) => Ok(LeaseOutcome::Held(Lease::Redis(guard))),
                    Acquire::Busy { holder } => Ok(LeaseOutcome::Busy { holder }),
                }
            }
            Leases::Local(running) => {
                let fresh = running
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(job.to_owned());
                Ok(if fresh {
                    LeaseOutcome::Held(Lease::Local(LocalLease {
                        running: running.clone(),
                        job: job.to_owned(),
                    }))
                } else {
                    LeaseOutcome::Busy {
                        holder: Some("this process".into()),
                    }
                })
            }
        }
    }
}

impl Lease {
    /// Gives the lease back now (with Redis: waits for it to confirm, bounded).
    pub async fn release(self) {
        match self {
            Lease::Redis(guard) => guard.release().await,
            Lease::Local(lease) => drop(lease),
        }
    }
}

/// A job running in this process; the job is free again when it drops.
pub struct LocalLease {
    running: Arc<Mutex<HashSet<String>>>,
    job: String,
}

impl Drop for LocalLease {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_lease_is_held_once_until_it_is_released() {
        let leases = Leases::local();
        assert!(leases.claim_slot("p", "j", 1, "me").await.unwrap());
        let Ok(LeaseOutcome::Held(lease)) = leases.acquire("p", "j", "me", Duration::ZERO).await
        else {
            panic!("the first lease is held");
        };
        assert!(matches!(
            leases.acquire("p", "j", "me", Duration::ZERO).await,
            Ok(LeaseOutcome::Busy { .. })
        ));
        assert!(matches!(
            leases.acquire("p", "other", "me", Duration::ZERO).await,
            Ok(LeaseOutcome::Held(_))
        ));
        lease.release().await;
        assert!(matches!(
            leases.acquire("p", "j", "me", Duration::ZERO).await,
            Ok(LeaseOutcome::Held(_))
        ));
    }
}
