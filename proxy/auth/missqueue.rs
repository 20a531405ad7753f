//! The miss queue: at most `max_concurrent_misses` computations per API key
//! and process at once; the requests over that wait their turn in arrival
//! order instead of being refused.
//!
//! Only a request that has to *start* a computation takes a slot (one that
//! reads along with a running flight costs ClickHouse nothing). A request over
//! the cap waits, first come first served (tokio's semaphore is fair), for at
//! most the tier's `miss_queue_wait`, and at most `miss_queue` of a key wait at
//! once; only then is it refused (429). The slot is held by the computation
//! itself until it ends (see `Filler::spawn_after`), so ClickHouse never runs
//! more than the cap for one key from one process.
//!
//! It does not own the rate limit ([`super::ratelimit`]) or what a tier
//! allows ([`super::tier`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::auth::tier::Tier;
use dashcache::coalesce::FlightError;
use dashcache::metrics::Metrics;
use dashcache::outcome::QueueOutcome;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Every key's line, by key id.
pub struct MissQueue {
    lines: Mutex<HashMap<String, Arc<Line>>>,
    metrics: Arc<Metrics>,
}

/// One key's slots and the number of requests waiting for one.
struct Line {
    slots: Arc<Semaphore>,
    capacity: usize,
    waiting: AtomicUsize,
}

/// A slot of a key's allowance, given back on drop.
pub struct MissSlot {
    _permit: OwnedSemaphorePermit,
}

/// Counts one waiting request for as long as it waits, whatever ends the wait.
struct Waiting<'a> {
    line: &'a Line,
    metrics: &'a Metrics,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.line.waiting.fetch_sub(1, Ordering::AcqRel);
        self.metrics.miss_queue_waiting.dec();
    }
}

impl MissQueue {
    pub fn new(metrics: Arc<Metrics>) -> MissQueue {
        MissQueue {
            lines: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// A slot for `key_id` under `tier`'s allowance: at once when one is free,
    /// else after waiting in line. The returned future owns what it needs, so
    /// it can run in the computation's own task.
    pub fn admit(
        &self,
        key_id: &str,
        tier: &Tier,
    ) -> impl Future<Output = Result<MissSlot, FlightError>> + Send + 'static {
        let line = self.line(key_id, tier.max_concurrent_misses);
        let metrics = self.metrics.clone();
        let (max_waiting, wait) = (tier.miss_queue, tier.miss_queue_wait);
        let refusal = format!(
            "at most {} uncached queries per key at once for tier `{}`, and {} more waiting",
            tier.max_concurrent_misses, tier.name, tier.miss_queue
        );
        async move {
            if let Ok(permit) = line.slots.clone().try_acquire_owned() {
                metrics.queue_outcome(QueueOutcome::Immediate);
                return Ok(MissSlot { _permit: permit });
            }
            if line.waiting.fetch_add(1, Ordering::AcqRel) >= max_waiting {
                line.waiting.fetch_sub(1, Ordering::AcqRel);
                metrics.queue_outcome(QueueOutcome::Full);
                return Err(FlightError::OverCapacity(refusal));
            }
            metrics.miss_queue_waiting.inc();
            let waiting = Waiting {
                line: &line,
                metrics: &metrics,
            };
            let turn = tokio::time::timeout(wait, line.slots.clone().acquire_owned()).await;
            drop(waiting);
            match turn {
                Ok(Ok(permit)) => {
                    metrics.queue_outcome(QueueOutcome::Queued);
                    Ok(MissSlot { _permit: permit })
                }
                // The semaphore is never closed; treat it like a timeout.
                Ok(Err(_)) | Err(_) => {
                    metrics.queue_outcome(QueueOutcome::TimedOut);
                    Err(FlightError::OverCapacity(format!(
                        "{refusal}; waited {}s for a turn",
                        wait.as_secs_f64()
                    )))
                }
            }
        }
    }

    /// The line of `key_id`; a new one if its tier's cap changed.
    fn line(&self, key_id: &str, capacity: usize) -> Arc<Line> {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(line) = lines.get(key_id)
            && line.capacity == capacity
        {
            return line.clone();
        }
        let line = Arc::new(Line {
            slots: Arc::new(Semaphore::new(capacity.max(1))),
            capacity,
            waiting: AtomicUsize::new(0),
        });
        lines.insert(key_id.to_owned(), line.clone());
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tier(cap: usize, queue: usize, wait: Duration) -> Tier {
        Tier {
            max_concurrent_misses: cap,
            miss_queue: queue,
            miss_queue_wait: wait,
            ..Tier::for_tests()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_cap_waits_in_order_then_times_out() {
        let queue = MissQueue::new(Arc::new(Metrics::new()));
        let tier = tier(2, 2, Duration::from_secs(10));
        let a = queue.admit("k", &tier).await.expect("first slot");
        let _b = queue.admit("k", &tier).await.expect("second slot");
        // Two wait; a third finds the line full at once.
        let third = tokio::spawn(queue.admit("k", &tier));
        let fourth = tokio::spawn(queue.admit("k", &tier));
        tokio::task::yield_now().await;
        while queue.line("k", 2).waiting.load(Ordering::Acquire) < 2 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            queue.admit("k", &tier).await,
            Err(FlightError::OverCapacity(_))
        ));
        // A slot given back goes to the first in line.
        drop(a);
        let third = third.await.expect("task").expect("third got a's slot");
        // The fourth is still waiting; its wait runs out.
        assert!(matches!(
            fourth.await.expect("task"),
            Err(FlightError::OverCapacity(_))
        ));
        drop(third);
        // Other keys have their own line.
        assert!(queue.admit("other", &tier).await.is_ok());
    }
}
