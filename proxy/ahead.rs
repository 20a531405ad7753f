//! Refresh-ahead of answers in use: one timer per stored answer that is being
//! read, firing just before the answer's freshness ends.
//!
//! A dashboard polls "last 7 days" every 30–60 s. Early refresh by reads
//! (XFetch, `cache.early_refresh`) only helps when a read happens to land in
//! the refresh window; a window shorter than the polling interval lets some
//! answers expire (a `STALE` answer older than its TTL), a longer one refreshes
//! every answer well before it needs it. Here the first `HIT` of a stored
//! answer arms one timer for that answer (key + creation time) at
//! `fresh_until - lead`; when it fires, the handler's callback refreshes the
//! answer if it is still the one the timer was armed for. An answer that is
//! read is then renewed once per TTL, just in time; one nobody reads after its
//! computation (a one-off request) is never refreshed by this.
//!
//! Owns: the armed set (bounded by `cache.refresh_ahead_keys`) and the timers.
//! Does not own: what a refresh does, or whether the answer was replaced in the
//! meantime (the callback decides, see `handlers::query`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashcache::cache::{CacheKey, EntryHeader};

/// How long before an answer's freshness ends its timer fires: twice its
/// compute time plus a second, at most half its TTL.
pub fn lead_ms(header: &EntryHeader) -> i64 {
    let ttl = (header.fresh_until_ms - header.created_ms).max(0);
    let compute = i64::try_from(header.compute_ms).unwrap_or(i64::MAX / 4);
    compute.saturating_mul(2).saturating_add(1_000).min(ttl / 2)
}

pub struct RefreshAhead {
    /// Key → creation time of the stored answer its timer is armed for.
    armed: Mutex<HashMap<CacheKey, i64>>,
    max_keys: usize,
}

impl RefreshAhead {
    /// At most `max_keys` armed timers (0 turns refresh-ahead off).
    pub fn new(max_keys: usize) -> Arc<RefreshAhead> {
        Arc::new(RefreshAhead {
            armed: Mutex::new(HashMap::new()),
            max_keys,
        })
    }

    /// Arms the timer for the answer `header` describes under `key`, unless
    /// one is armed for it already, the set is full, or the answer's fire time
    /// has passed (reads in the last moments are early refresh's job). At
    /// `fresh_until - lead` the future `fire()` makes (only when a timer is
    /// armed) runs on a task of its own. Returns whether a timer was armed.
    pub fn arm<M, F>(
        self: &Arc<Self>,
        key: &CacheKey,
        header: &EntryHeader,
        now_ms: i64,
        fire: M,
    ) -> bool
    where
        M: FnOnce() -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        if self.max_keys == 0 {
            return false;
        }
        let fire_at = header.fresh_until_ms - lead_ms(header);
        if fire_at <= now_ms {
            return false;
        }
        let created = header.created_ms;
        {
            let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
            match armed.get(key) {
                Some(&at) if at >= created => return false,
                Some(_) => {}
                None if armed.len() >= self.max_keys => return false,
                None => {}
            }
            armed.insert(key.clone(), created);
        }
        let fire = fire();
        let this = Arc::downgrade(self);
        let key = key.clone();
        let wait = Duration::from_millis(u64::try_from(fire_at - now_ms).unwrap_or(0));
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(this) = this.upgrade() else { return };
            {
                let mut armed = this.armed.lock().unwrap_or_else(PoisonError::into_inner);
                // A newer answer may have armed its own timer meanwhile.
                if armed.get(&key) == Some(&created) {
                    armed.remove(&key);
                }
            }
            fire.await;
        });
        true
    }

    /// Timers armed and not yet fired.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.armed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn header(created_ms: i64, ttl_ms: i64, compute_ms: u64) -> EntryHeader {
        EntryHeader {
            created_ms,
            fresh_until_ms: created_ms + ttl_ms,
            stale_until_ms: created_ms + ttl_ms * 10,
            compute_ms,
            etag: String::new(),
            content_type: String::new(),
            encoding: "identity".into(),
            range: None,
            headers: Vec::new(),
        }
    }

    fn key(name: &str) -> CacheKey {
        CacheKey::new("test", name, None, dashcache::format::Format::Json, "")
    }

    #[test]
    fn the_lead_is_twice_the_compute_time_plus_a_second_within_half_the_ttl() {
        assert_eq!(lead_ms(&header(0, 120_000, 100)), 1_200);
        assert_eq!(lead_ms(&header(0, 120_000, 50_000)), 60_000);
        assert_eq!(lead_ms(&header(0, 1_000, 0)), 500);
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_per_stored_answer_fires_before_it_expires() {
        let ahead = RefreshAhead::new(10);
        let fired = Arc::new(AtomicUsize::new(0));
        let h = header(0, 60_000, 0);
        for _ in 0..3 {
            let fired = fired.clone();
            ahead.arm(&key("a"), &h, 1_000, move || async move {
                fired.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(ahead.len(), 1);
        // 59 s after the read at 1 s: just before the fire time (60 s - 1 s lead).
        tokio::time::sleep(Duration::from_millis(57_999)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert_eq!(ahead.len(), 0);
        // A newer answer under the same key arms again.
        let fired2 = fired.clone();
        assert!(ahead.arm(
            &key("a"),
            &header(60_000, 60_000, 0),
            60_000,
            move || async move {
                fired2.fetch_add(1, Ordering::SeqCst);
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_set_is_bounded_and_late_reads_arm_nothing() {
        let ahead = RefreshAhead::new(2);
        assert!(ahead.arm(&key("a"), &header(0, 60_000, 0), 0, || async {}));
        assert!(ahead.arm(&key("b"), &header(0, 60_000, 0), 0, || async {}));
        assert!(!ahead.arm(&key("c"), &header(0, 60_000, 0), 0, || async {}));
        // Past the fire time (59 s): early refresh's window handles it.
        assert!(!ahead.arm(&key("d"), &header(0, 60_000, 0), 59_500, || async {}));
        assert!(!RefreshAhead::new(0).arm(&key("e"), &header(0, 60_000, 0), 0, || async {}));
    }
}
