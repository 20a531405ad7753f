//! Per-key backoff after failed computations: no retry storm at a failing ClickHouse.
//!
//! A key whose computation failed is not computed again before its backoff
//! ends: `refresh_backoff` after the first failure, doubling with each further
//! failure up to `refresh_backoff_max`, each wait drawn uniformly from its upper
//! half (jitter, so keys that failed together do not retry together). A success
//! forgets the key. The map is bounded (`MAX_KEYS`, least recently used go
//! first): a key pushed out merely may be tried again early.
//!
//! It decides nothing about replicas (that is [`crate::upstream`]) and starts
//! nothing: [`crate::fill::Filler`] asks it before computing and tells it how
//! the computation ended. Times are tokio's clock, so tests run paused.

use std::time::Duration;

use tokio::time::Instant;

use crate::cache::CacheKey;
use crate::config::CoalesceConfig;

/// Keys remembered at most (a key's state is a few dozen bytes).
pub const MAX_KEYS: u64 = 100_000;

#[derive(Debug, Clone, Copy)]
struct State {
    failures: u32,
    until: Instant,
}

/// The backoff state of every key that failed lately.
pub struct Backoff {
    base: Duration,
    max: Duration,
    keys: moka::sync::Cache<CacheKey, State>,
}

impl Backoff {
    /// First wait `base`, doubling up to `max` (a zero `base` disables backoff).
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            keys: moka::sync::Cache::builder().max_capacity(MAX_KEYS).build(),
        }
    }

    /// How long `key` must still wait before it may be computed; `None`: now.
    pub fn wait(&self, key: &CacheKey) -> Option<Duration> {
        let state = self.keys.get(key)?;
        let now = Instant::now();
        (now < state.until).then(|| state.until - now)
    }

    /// The backoff `[coalesce]` configures.
    pub fn of(config: &CoalesceConfig) -> Backoff {
        Backoff::new(config.backoff, config.backoff_max)
    }

    /// Records a failed computation of `key`; the wait it now has.
    pub fn failed(&self, key: &CacheKey) -> Duration {
        if self.base.is_zero() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let (base, max) = (self.base, self.max);
        let entry = self.keys.entry(key.clone()).and_upsert_with(|old| {
            let failures = old.map_or(0, |e| e.value().failures).saturating_add(1);
            let wait = jittered(delay(base, max, failures), rand::random::<f64>());
            State {
                failures,
                until: now + wait,
            }
        });
        entry.into_value().until.saturating_duration_since(now)
    }

    /// Records a successful computation of `key`: it starts afresh.
    pub fn succeeded(&self, key: &CacheKey) {
        self.keys.invalidate(key);
    }

    /// Failures in a row recorded for `key` (0 when none).
    pub fn failures(&self, key: &CacheKey) -> u32 {
        self.keys.get(key).map_or(0, |s| s.failures)
    }
}

/// The upper bound of the wait after `failures` failures in a row.
fn delay(base: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << doublings).min(max)
}

/// A wait in `[d/2, d]` for a uniform `r` in `[0, 1)`.
fn jittered(d: Duration, r: f64) -> Duration {
    d.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Format;

    fn key(n: u32) -> CacheKey {
        CacheKey::new("t", "q", None, Format::Csv, &n.to_string())
    }

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_stays_in_the_upper_half() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let bounds: Vec<u64> = (1..=8).map(|n| delay(base, max, n).as_secs()).collect();
        assert_eq!(bounds, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(delay(base, max, u32::MAX), max);
        let d = Duration::from_secs(8);
        assert_eq!(jittered(d, 0.0), Duration::from_secs(4));
        assert!(jittered(d, 0.999) <= d);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_key_waits_longer_each_time_and_a_success_resets_it() {
        let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(4));
        assert_eq!(backoff.wait(&key(1)), None);
        let first = backoff.failed(&key(1));
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        assert!(backoff.wait(&key(1)).is_some());
        assert_eq!(backoff.wait(&key(2)), None, "per key");
        tokio::time::advance(first).await;
        assert_eq!(backoff.wait(&key(1)), None, "over after its wait");
        let waits: Vec<Duration> = (0..4).map(|_| backoff.failed(&key(1))).collect();
        assert!(waits[0] >= Duration::from_secs(1), "{waits:?}");
        assert!(waits[1] >= Duration::from_secs(2), "{waits:?}");
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(4)),
            "capped: {waits:?}"
        );
        assert_eq!(backoff.failures(&key(1)), 5);
        backoff.succeeded(&key(1));
        assert_eq!(backoff.wait(&key(1)), None);
        assert_eq!(backoff.failures(&key(1)), 0);
    }

    #[test]
    fn a_zero_base_disables_it() {
        let backoff = Backoff::new(Duration::ZERO, Duration::from_secs(30));
        assert_eq!(backoff.failed(&key(1)), Duration::ZERO);
        assert_eq!(backoff.wait(&key(1)), None);
    }
}
