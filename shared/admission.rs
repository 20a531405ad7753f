//! How many computations one process runs at ClickHouse at once, and how many wait.
//!
//! At most `clickhouse.max_in_flight` computations (misses, refreshes,
//! warm-ups: from their first attempt to their last byte, the retry included)
//! run at once; up to `clickhouse.max_queued` more wait, each at most
//! `clickhouse.queue_wait`, in arrival order (tokio's semaphore is fair). The
//! rest are refused at once. So a ClickHouse that turns slow gets no more
//! than the configured concurrency from this process, and the requests behind
//! it are bounded in count and in time, while stored answers keep being served.
//!
//! It does not decide what is computed (that is [`crate::fill`]) nor count
//! per API key (the proxy's miss queue); exports are not counted here (their
//! tier limits bound them).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ClickHouseConfig;
use crate::metrics::Metrics;
use crate::outcome::AdmissionOutcome;

/// The limit of one process.
pub struct Admission {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    max_queued: usize,
    queue_wait: Duration,
    queued: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Why a computation was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} computations already wait for ClickHouse")]
    QueueFull(usize),
    #[error("no ClickHouse slot within {0:?}")]
    WaitTimeout(Duration),
}

/// A slot at ClickHouse, given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.clickhouse_in_flight.dec();
    }
}

/// Counts a waiting computation while it waits.
struct Waiting<'a>(&'a Admission);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.clickhouse_queued.dec();
    }
}

impl Admission {
    pub fn new(
        max_in_flight: usize,
        max_queued: usize,
        queue_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Arc<Admission> {
        let max_in_flight = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Admission {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            max_queued,
            queue_wait,
            queued: AtomicUsize::new(0),
            metrics,
        })
    }

    /// The limit `[clickhouse]` configures.
    pub fn of(config: &ClickHouseConfig, metrics: Arc<Metrics>) -> Arc<Admission> {
        Admission::new(
            config.max_in_flight,
            config.max_queued,
            config.queue_wait,
            metrics,
        )
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// Whether a slot is free now (nobody waits for it).
    pub fn has_free_slot(&self) -> bool {
        self.permits.available_permits() > 0
    }

    /// A slot now, or after waiting in line (bounded in count and time).
    pub async fn enter(&self) -> Result<Slot, Refused> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(self.admitted(permit, AdmissionOutcome::AtOnce));
        }
        let queued = self.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.metrics.admission(AdmissionOutcome::QueueFull);
            return Err(Refused::QueueFull(queued));
        }
        self.metrics.clickhouse_queued.inc();
        let waiting = Waiting(self);
        let permit =
            tokio::time::timeout(self.queue_wait, self.permits.clone().acquire_owned()).await;
        drop(waiting);
        match permit {
            Ok(Ok(permit)) => Ok(self.admitted(permit, AdmissionOutcome::AfterWait)),
            // The semaphore is never closed; time ran out.
            _ => {
                self.metrics.admission(AdmissionOutcome::WaitTimeout);
                Err(Refused::WaitTimeout(self.queue_wait))
            }
        }
    }

    fn admitted(&self, permit: OwnedSemaphorePermit, outcome: AdmissionOutcome) -> Slot {
        self.metrics.admission(outcome);
        self.metrics.clickhouse_in_flight.inc();
        Slot {
            _permit: permit,
            metrics: self.metrics.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_most_the_limit_runs_a_bounded_line_waits_a_bounded_time() {
        let admission = Admission::new(2, 1, Duration::from_secs(5), Arc::new(Metrics::new()));
        let a = admission.enter().await.expect("first");
        let _b = admission.enter().await.expect("second");
        // The third waits in line; the fourth finds the line full.
        let third = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.enter().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(admission.enter().await.err(), Some(Refused::QueueFull(1)));
        // A slot frees up: the one in line gets it.
        drop(a);
        assert_eq!(third.await.expect("joined"), Ok(()));
        // With both slots taken again, a waiter gives up after `queue_wait`.
        let _c = admission.enter().await.expect("a free slot");
        assert_eq!(
            admission.enter().await.err(),
            Some(Refused::WaitTimeout(Duration::from_secs(5)))
        );
        let text = admission.metrics.render();
        for (outcome, n) in [
            ("at_once", 3),
            ("after_wait", 1),
            ("queue_full", 1),
            ("wait_timeout", 1),
        ] {
            assert!(
                text.contains(&format!(
                    "dashcache_clickhouse_admissions_total{{outcome=\"{outcome}\"}} {n}"
                )),
                "{text}"
            );
        }
    }
}
