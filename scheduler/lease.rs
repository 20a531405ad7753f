//! Redis leases: which host runs a job, and which scheduled time was claimed.
//!
//! Owns two kinds of keys under the config's key prefix:
//! - a *slot* per (job, scheduled time), claimed once with `SET NX` and kept
//!   for a day, so several schedulers firing the same scheduled time run it once;
//! - a *lease* per job, held while a run goes on and renewed every third of
//!   its TTL, so two hosts never run the same job at the same time. If its
//!   holder dies, the lease expires after its TTL and the next run can start.
//!
//! Both carry the job name as a Redis Cluster hash tag, and every command or
//! script touches one key, so they work on any topology ([`RedisConn`]).
//!
//! It does not decide what to do when a lease is taken; [`crate::runner`] does.

use std::time::Duration;

use dashcache::redis_conn::RedisConn;

/// How long a claimed slot is remembered.
const SLOT_TTL: Duration = Duration::from_secs(24 * 3600);

const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) else return 0 end";

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

/// A held job lease; renewed in the background until [`Lease::release`].
pub struct Lease {
    conn: RedisConn,
    key: String,
    token: String,
    renewal: tokio::task::JoinHandle<()>,
}

/// Takes `job`'s lease, or tells who holds it.
pub async fn acquire(
    conn: &RedisConn,
    prefix: &str,
    job: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Result<Lease, String>, redis::RedisError> {
    let key = lease_key(prefix, job);
    let token = format!("{holder} {}", uuid::Uuid::new_v4());
    let ttl_ms = ttl.as_millis().max(1) as u64;
    let mut c = conn.clone();
    let set: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms)
        .query_async(&mut c)
        .await?;
    if set.is_none() {
        let holder: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
        let holder = holder
            .and_then(|h| h.rsplit_once(' ').map(|(who, _)| who.to_owned()))
            .unwrap_or_else(|| "another scheduler".into());
        return Ok(Err(holder));
    }
    let renewal = {
        let (mut c, key, token) = (conn.clone(), key.clone(), token.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ttl / 3);
            every.tick().await;
            loop {
                every.tick().await;
                let renewed: Result<i64, _> = redis::Script::new(RENEW)
                    .key(&key)
                    .arg(&token)
                    .arg(ttl_ms)
                    .invoke_async(&mut c)
                    .await;
                match renewed {
                    Ok(1) => {}
                    Ok(_) => {
                        tracing::error!(lease = %key, "job lease lost: another host may start this job");
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(lease = %key, error = %err, "could not renew job lease")
                    }
                }
            }
        })
    };
    Ok(Ok(Lease {
        conn: conn.clone(),
        key,
        token,
        renewal,
    }))
}

impl Lease {
    /// Gives the lease back (only if still ours).
    pub async fn release(mut self) {
        self.renewal.abort();
        let released: Result<i64, _> = redis::Script::new(RELEASE)
            .key(&self.key)
            .arg(&self.token)
            .invoke_async(&mut self.conn)
            .await;
        if let Err(err) = released {
            tracing::warn!(lease = %self.key, error = %err, "could not release job lease; it expires by itself");
        }
    }
}
