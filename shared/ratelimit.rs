//! Per-key rate limits: GCRA, shared across proxies through Redis.
//!
//! The generic cell rate algorithm keeps one number per key, the theoretical
//! arrival time (TAT): a request is allowed when `TAT - now <= tau` (tau = the
//! burst's worth of intervals), and then pushes TAT one interval further. The
//! check-and-update is one Lua script in Redis, so every proxy sharing Redis
//! sees one limit. While Redis is unreachable the same algorithm runs in
//! process memory, so limits still hold per process. Answers carry what the
//! IETF `RateLimit-*` headers need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::cache::Cache;
use crate::tier::Tier;

/// Lua: KEYS[1] = the key's TAT; ARGV = now, interval, tau (microseconds).
/// Returns {allowed, tat after the decision}.
const GCRA_SCRIPT: &str = r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tau = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tau then return {0, tat} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, new_tat}
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

/// A tier's rate in the algorithm's units.
#[derive(Debug, Clone, Copy)]
struct Rate {
    interval_us: i64,
    tau_us: i64,
    burst: u32,
}

impl Rate {
    fn of(tier: &Tier) -> Rate {
        let interval_us = (60_000_000 / i64::from(tier.requests_per_minute.max(1))).max(1);
        Rate {
            interval_us,
            tau_us: interval_us * i64::from(tier.burst.max(1) - 1),
            burst: tier.burst.max(1),
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
    local: Mutex<HashMap<String, i64>>,
}

impl RateLimiter {
    pub fn new(cache: Arc<Cache>, key_prefix: &str) -> RateLimiter {
        RateLimiter {
            cache,
            prefix: format!("{key_prefix}:rl:"),
            script: redis::Script::new(GCRA_SCRIPT),
            local: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request of `key_id` against its tier's rate.
    pub async fn check(&self, key_id: &str, tier: &Tier, now_us: i64) -> Decision {
        let rate = Rate::of(tier);
        let mut invocation = self.script.key(format!("{}{key_id}", self.prefix));
        invocation
            .arg(now_us)
            .arg(rate.interval_us)
            .arg(rate.tau_us);
        if let Some((allowed, tat)) = self.cache.redis().invoke::<(i64, i64)>(invocation).await {
            return rate.decide(allowed == 1, tat, now_us);
        }
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
    use crate::tier::Allowed;
    use std::time::Duration;

    fn tier(per_minute: u32, burst: u32) -> Tier {
        Tier {
            name: "t".into(),
            requests_per_minute: per_minute,
            burst,
            max_concurrent_misses: 1,
            queries: Allowed::All,
            exports: Allowed::All,
            export_max_rows: 0,
            export_max_bytes: 0,
            export_max_duration: Duration::ZERO,
            min_ttl: Duration::ZERO,
        }
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
