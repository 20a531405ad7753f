//! Per-key rate limits: GCRA, shared across proxies through Redis.
//!
//! The generic cell rate algorithm keeps one number per key, the theoretical
//! arrival time (TAT): a request is allowed when `TAT - now <= tau` (tau = the
//! burst's worth of intervals), and then pushes TAT one interval further. The
//! check-and-update is one Lua script in Redis, so every proxy sharing Redis
//! sees one limit. While Redis is unreachable, and always when there is no
//! Redis (one host, no `[redis]`), the same algorithm runs in process memory,
//! so limits still hold per process. Answers carry what the
//! IETF `RateLimit-*` headers need.
//!
//! Checks of one key that arrive while a script for that key is in flight
//! wait and go to Redis together, as one script call deciding `n` requests in
//! arrival order: a busy key costs one Redis round trip per batch, not per
//! request, and the decisions are the same as one by one.
//!
//! A busy key (a batch of two or more) also takes a *lease*: the script call
//! asks for up to [`Rate::lease`] requests more than the batch holds — at
//! most 1/64 of the burst and 100 ms of the rate — and this process allows
//! that many of the key's next requests without asking Redis, within
//! [`LEASE_US`]; what is not used by then is dropped. Redis counted them when
//! they were taken, so across every proxy a key is never allowed more than
//! its rate; a proxy holding an unused lease can make another one refuse up to
//! that many requests early. Tiers with a burst under 64 have no leases: their
//! decisions are exact, one by one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::auth::tier::Tier;
use dashcache::cache::Cache;

/// Lua: KEYS[1] = the key's TAT; ARGV = now, interval, tau (microseconds),
/// n requests. Returns {how many of the n are allowed, TAT before them}.
const GCRA_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local fits = math.floor((tau - (tat - now)) / interval) + 1
if fits < 0 then fits = 0 end
local allowed = math.min(n, fits)
if allowed > 0 then
  local new_tat = tat + allowed * interval
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
end
return {allowed, string.format('%.0f', tat)}
";

/// The verdict on one request, with what the response headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests allowed per window (the burst).
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the limit is fully replenished.
    pub reset_secs: u64,
    /// Seconds until a denied request may be retried (0 when allowed).
    pub retry_after_secs: u64,
}

/// How long a lease's requests may be allowed without asking Redis.
const LEASE_US: i64 = 1_000_000;

/// A tier's rate in the algorithm's units.
#[derive(Debug, Clone, Copy)]
struct Rate {
    interval_us: i64,
    tau_us: i64,
    burst: u32,
    /// Requests a busy key takes ahead: min(burst / 64, the rate's 100 ms).
    lease: usize,
}

impl Rate {
    fn of(tier: &Tier) -> Rate {
        let interval_us = (60_000_000 / i64::from(tier.requests_per_minute.max(1))).max(1);
        let burst = tier.burst.max(1);
        let per_100ms = u64::from(tier.requests_per_minute) / 600;
        Rate {
            interval_us,
            tau_us: interval_us * i64::from(burst - 1),
            burst,
            lease: usize::try_from((u64::from(burst) / 64).min(per_100ms)).unwrap_or(0),
        }
    }

    /// The decision given the TAT before (`allowed`) or at (denied) the request.
    fn decide(&self, allowed: bool, tat_us: i64, now_us: i64) -> Decision {
        let ahead = (tat_us - now_us).max(0);
        let secs = |us: i64| (us.max(0) as u64).div_ceil(1_000_000);
        if allowed {
            let remaining = (self.tau_us + self.interval_us - ahead) / self.interval_us;
            Decision {
                allowed,
                limit: self.burst,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(0),
                reset_secs: secs(ahead),
                retry_after_secs: 0,
            }
        } else {
            Decision {
                allowed,
                limit: self.burst,
                remaining: 0,
                reset_secs: secs(ahead),
                retry_after_secs: secs(ahead - self.tau_us).max(1),
            }
        }
    }

    /// Decisions for `n` requests in order, given how many Redis allowed and
    /// the TAT before them.
    fn decide_batch(&self, n: usize, allowed: usize, tat_us: i64, now_us: i64) -> Vec<Decision> {
        let start = tat_us.max(now_us);
        (0..n)
            .map(|i| {
                if i < allowed {
                    self.decide(true, start + (i as i64 + 1) * self.interval_us, now_us)
                } else {
                    self.decide(false, start + allowed as i64 * self.interval_us, now_us)
                }
            })
            .collect()
    }

    /// One GCRA step on a locally kept TAT.
    fn step(&self, tat_us: &mut i64, now_us: i64) -> Decision {
        let tat = (*tat_us).max(now_us);
        if tat - now_us > self.tau_us {
            return self.decide(false, tat, now_us);
        }
        *tat_us = tat + self.interval_us;
        self.decide(true, *tat_us, now_us)
    }
}

/// Rate limits of every key.
pub struct RateLimiter {
    cache: Arc<Cache>,
    prefix: String,
    script: redis::Script,
    /// TATs kept in process while Redis is unreachable.
    local: Mutex<HashMap<String, i64>>,
    /// Per key: checks waiting for the next script call, and whether one runs.
    batches: Mutex<HashMap<String, Batch>>,
}

#[derive(Default)]
struct Batch {
    waiting: Vec<(Rate, oneshot::Sender<Decision>)>,
    running: bool,
    /// Requests taken from Redis ahead of time, left to allow (see the module doc).
    leased: usize,
    lease_until_us: i64,
    /// The TAT the next leased request is decided with (for its headers).
    lease_tat_us: i64,
}

impl RateLimiter {
    pub fn new(cache: Arc<Cache>, key_prefix: &str) -> Arc<RateLimiter> {
        Arc::new(RateLimiter {
            cache,
            prefix: format!("{key_prefix}:rl:"),
            script: redis::Script::new(GCRA_SCRIPT),
            local: Mutex::new(HashMap::new()),
            batches: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one request of `key_id` against its tier's rate.
    pub async fn check(self: &Arc<Self>, key_id: &str, tier: &Tier, now_us: i64) -> Decision {
        let rate = Rate::of(tier);
        if self.cache.redis().is_none() {
            return self.local_step(key_id, rate, now_us);
        }
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
            // The key's batch exists while its checks run: no allocation then.
            let batch = match batches.get_mut(key_id) {
                Some(batch) => batch,
                None => batches.entry(key_id.to_owned()).or_default(),
            };
            if batch.leased > 0 && now_us < batch.lease_until_us {
                batch.leased -= 1;
                batch.lease_tat_us += rate.interval_us;
                return rate.decide(true, batch.lease_tat_us, now_us);
            }
            batch.leased = 0;
            batch.waiting.push((rate, tx));
            !std::mem::replace(&mut batch.running, true)
        };
        if lead {
            let limiter = self.clone();
            let key_id = key_id.to_owned();
            tokio::spawn(async move { limiter.drain(&key_id).await });
        }
        match rx.await {
            Ok(decision) => decision,
            // The draining task died: decide locally rather than fail.
            Err(_) => self.local_step(key_id, rate, now_us),
        }
    }

    /// Decides every waiting check of `key_id`, batch by batch.
    async fn drain(&self, key_id: &str) {
        loop {
            let waiting = {
                let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
                let Some(batch) = batches.get_mut(key_id) else {
                    return;
                };
                if batch.waiting.is_empty() {
                    if batch.leased == 0 {
                        batches.remove(key_id);
                    } else {
                        batch.running = false;
                    }
                    return;
                }
                std::mem::take(&mut batch.waiting)
            };
            // A tier change between checks is rare; the batch uses the newest rate.
            let Some(&(rate, _)) = waiting.last() else {
                continue;
            };
            let now_us = chrono::Utc::now().timestamp_micros();
            let n = waiting.len();
            let ahead = if n >= 2 { rate.lease } else { 0 };
            let mut invocation = self.script.key(format!("{}{key_id}", self.prefix));
            invocation
                .arg(now_us)
                .arg(rate.interval_us)
                .arg(rate.tau_us)
                .arg(n + ahead);
            let redis = self.cache.redis();
            let decided = match redis {
                Some(redis) => redis.invoke::<(i64, i64)>(invocation).await,
                None => None,
            };
            let decisions = match decided {
                Some((allowed, tat)) => {
                    let allowed = usize::try_from(allowed).unwrap_or(0);
                    if allowed > n {
                        self.lease(
                            key_id,
                            allowed - n,
                            tat.max(now_us) + n as i64 * rate.interval_us,
                            now_us,
                        );
                    }
                    rate.decide_batch(n, allowed.min(n), tat, now_us)
                }
                None => (0..n)
                    .map(|_| self.local_step(key_id, rate, now_us))
                    .collect(),
            };
            for ((_, tx), decision) in waiting.into_iter().zip(decisions) {
                let _ = tx.send(decision);
            }
        }
    }

    /// Keeps `count` requests Redis allowed ahead of time for the key's next
    /// checks; `tat_us`: the TAT after the batch that took them.
    fn lease(&self, key_id: &str, count: usize, tat_us: i64, now_us: i64) {
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(batch) = batches.get_mut(key_id) {
            batch.leased = count;
            batch.lease_until_us = now_us + LEASE_US;
            batch.lease_tat_us = tat_us;
        }
    }

    fn local_step(&self, key_id: &str, rate: Rate, now_us: i64) -> Decision {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        if local.len() > 100_000 {
            local.retain(|_, tat| *tat > now_us);
        }
        rate.step(local.entry(key_id.to_owned()).or_insert(0), now_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(per_minute: u32, burst: u32) -> Tier {
        Tier {
            requests_per_minute: per_minute,
            burst,
            ..Tier::for_tests()
        }
    }

    #[test]
    fn leases_are_a_64th_of_the_burst_and_100_ms_of_the_rate_at_most() {
        // Small bursts (the tests' 10, the shipped free tier's 20): exact.
        assert_eq!(Rate::of(&tier(60, 10)).lease, 0);
        assert_eq!(Rate::of(&tier(60, 20)).lease, 0);
        // The shipped enterprise tier: 6000/min = 10 per 100 ms, burst 1000 / 64 = 15.
        assert_eq!(Rate::of(&tier(6000, 1000)).lease, 10);
        assert_eq!(Rate::of(&tier(600, 100)).lease, 1);
        assert_eq!(Rate::of(&tier(60_000_000, 1_000_000_000)).lease, 100_000);
    }

    #[test]
    fn a_batch_decides_like_one_by_one() {
        let rate = Rate::of(&tier(60, 3));
        let now = 1_000_000_000;
        let mut tat = 0;
        let single: Vec<Decision> = (0..5).map(|_| rate.step(&mut tat, now)).collect();
        // What the script returns for 5 requests on a fresh key: 3 allowed, TAT before = 0.
        assert_eq!(rate.decide_batch(5, 3, 0, now), single);
    }

    #[test]
    fn a_burst_then_one_request_per_interval() {
        let rate = Rate::of(&tier(60, 3));
        let mut tat = 0;
        let now = 1_000_000_000;
        let got: Vec<(bool, u32)> = (0..4)
            .map(|_| rate.step(&mut tat, now))
            .map(|d| (d.allowed, d.remaining))
            .collect();
        assert_eq!(got, vec![(true, 2), (true, 1), (true, 0), (false, 0)]);
        let denied = rate.step(&mut tat, now);
        assert_eq!(denied.retry_after_secs, 1);
        assert_eq!(denied.reset_secs, 3);
        // One interval (1 s) later, one more request fits.
        assert!(rate.step(&mut tat, now + 1_000_000).allowed);
        assert!(!rate.step(&mut tat, now + 1_000_000).allowed);
    }
}
