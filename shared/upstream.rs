//! Which ClickHouse replica runs the next query.
//!
//! Owns the health of a list of replicas (`[clickhouse] replicas`): each is
//! *up* or *ejected*. A replica is ejected when a query cannot reach it (at
//! once) or when `eject_after` background checks in a row fail; one good check
//! re-admits it. [`Pool::pick`] chooses, among the replicas that are up and not
//! yet tried for this query, the one with the fewest queries in flight per
//! unit of weight (ties go round-robin), so a slow replica gets less work and
//! weights split an idle load. When every replica is ejected it still picks
//! one (in turn): trying a server that may be back beats failing unasked.
//! Background refreshes ask [`Pool::any_up`] first and are not started while
//! every replica is ejected (a health check re-admits one).
//!
//! It does not talk to ClickHouse: the background check's probe and the
//! queries themselves are [`crate::clickhouse`]'s. Per-replica metrics
//! (`dashcache_clickhouse_replica_up{replica}`, queries, ejections) are kept here.

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::ReplicaConfig;
use crate::metrics::{Metrics, ReplicaLabels};

/// One replica's state.
pub struct Replica {
    /// Its URL: the `replica` label of its metrics.
    pub name: String,
    weight: u32,
    up: AtomicBool,
    in_flight: AtomicUsize,
    failed_checks: AtomicU32,
}

impl Replica {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// The replicas of one upstream (queries, or exports) and their health.
pub struct Pool {
    replicas: Vec<Replica>,
    /// Round-robin start among equally loaded replicas.
    next: AtomicUsize,
    eject_after: u32,
    metrics: Arc<Metrics>,
}

/// A query in flight on a replica; the count drops with it.
pub struct InFlight {
    pool: Arc<Pool>,
    index: usize,
}

impl InFlight {
    pub fn replica(&self) -> usize {
        self.index
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.pool.replicas[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(replicas: &[ReplicaConfig], eject_after: u32, metrics: Arc<Metrics>) -> Arc<Pool> {
        let replicas: Vec<Replica> = replicas
            .iter()
            .map(|r| Replica {
                name: without_credentials(r.url.trim_end_matches('/')),
                weight: r.weight.max(1),
                up: AtomicBool::new(true),
                in_flight: AtomicUsize::new(0),
                failed_checks: AtomicU32::new(0),
            })
            .collect();
        for replica in &replicas {
            metrics
                .clickhouse_replica_up
                .get_or_create(&labels(replica))
                .set(1);
        }
        Arc::new(Pool {
            replicas,
            next: AtomicUsize::new(0),
            eject_after: eject_after.max(1),
            metrics,
        })
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether any replica is up (not ejected).
    pub fn any_up(&self) -> bool {
        self.replicas.iter().any(Replica::is_up)
    }

    pub fn replica(&self, index: usize) -> &Replica {
        &self.replicas[index]
    }

    /// The replica for the next attempt of a query that already tried `tried`;
    /// `None` when every replica was tried.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let untried = |i: &usize| !tried.contains(i);
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let order = (0..n).map(|k| (start + k) % n).filter(untried);
        let healthy = order
            .clone()
            .filter(|&i| self.replicas[i].is_up())
            .min_by(|&a, &b| self.load(a).total_cmp(&self.load(b)));
        // `min_by` keeps the first of equals: the rotation breaks ties.
        healthy.or_else(|| order.clone().next())
    }

    fn load(&self, index: usize) -> f64 {
        let replica = &self.replicas[index];
        (replica.in_flight() as f64 + 1.0) / f64::from(replica.weight)
    }

    /// Counts a query starting on `index` until the guard drops.
    pub fn start(self: &Arc<Self>, index: usize) -> InFlight {
        let replica = &self.replicas[index];
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .clickhouse_replica_queries
            .get_or_create(&labels(replica))
            .inc();
        InFlight {
            pool: self.clone(),
            index,
        }
    }

    /// A query could not reach `index`: eject it now.
    pub fn unreachable(&self, index: usize, error: &dyn Display) {
        let replica = &self.replicas[index];
        replica
            .failed_checks
            .store(self.eject_after, Ordering::Relaxed);
        self.set_up(index, false, error);
    }

    /// The outcome of one background check of `index`.
    pub fn checked<E: Display>(&self, index: usize, result: Result<(), E>) {
        let replica = &self.replicas[index];
        match result {
            Ok(()) => {
                replica.failed_checks.store(0, Ordering::Relaxed);
                self.set_up(index, true, &"");
            }
            Err(error) => {
                let failed = replica.failed_checks.fetch_add(1, Ordering::Relaxed) + 1;
                if failed >= self.eject_after {
                    self.set_up(index, false, &error);
                }
            }
        }
    }

    fn set_up(&self, index: usize, up: bool, error: &dyn Display) {
        let replica = &self.replicas[index];
        if replica.up.swap(up, Ordering::Relaxed) == up {
            return;
        }
        let labels = labels(replica);
        self.metrics
            .clickhouse_replica_up
            .get_or_create(&labels)
            .set(i64::from(up));
        if up {
            tracing::info!(replica = %replica.name, "ClickHouse replica answers again; re-admitted");
        } else {
            self.metrics
                .clickhouse_replica_ejections
                .get_or_create(&labels)
                .inc();
            tracing::warn!(replica = %replica.name, %error, "ClickHouse replica ejected");
        }
    }

    /// Checks every replica every `interval` with `probe` (which bounds its
    /// own time) until the pool is dropped.
    pub fn spawn_checks<P, F, E>(self: &Arc<Self>, interval: Duration, probe: P)
    where
        P: Fn(usize) -> F + Send + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool: Weak<Pool> = Arc::downgrade(self);
        let interval = interval.max(Duration::from_millis(10));
        runtime.spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(n) = pool.upgrade().map(|p| p.len()) else {
                    return;
                };
                let results = futures_util::future::join_all((0..n).map(&probe)).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                for (index, result) in results.into_iter().enumerate() {
                    pool.checked(index, result);
                }
            }
        });
    }
}

/// A URL as metrics and logs show it: any `user:password@` left out.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) if scheme.is_empty() => rest[at + 1..].to_owned(),
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

fn labels(replica: &Replica) -> ReplicaLabels {
    ReplicaLabels {
        replica: replica.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_names_leave_credentials_out() {
        assert_eq!(
            without_credentials("https://reader:s3cret@ch1:8443/x"),
            "https://ch1:8443/x"
        );
        assert_eq!(
            without_credentials("http://10.0.0.2:8123"),
            "http://10.0.0.2:8123"
        );
        assert_eq!(
            without_credentials("http://ch1:8123/?a=b@c"),
            "http://ch1:8123/?a=b@c"
        );
    }

    fn pool(weights: &[u32]) -> Arc<Pool> {
        let replicas: Vec<ReplicaConfig> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| ReplicaConfig {
                url: format!("http://127.0.0.1:{}", 8000 + i),
                weight,
            })
            .collect();
        Pool::new(&replicas, 2, Arc::new(Metrics::new()))
    }

    #[test]
    fn idle_replicas_take_turns_and_busy_ones_wait() {
        let pool = pool(&[1, 1]);
        let a = pool.pick(&[]);
        let b = pool.pick(&[]);
        assert_ne!(a, b, "round robin among idle replicas");
        let _busy = pool.start(0);
        for _ in 0..4 {
            assert_eq!(pool.pick(&[]), Some(1), "the idle one");
        }
    }

    #[test]
    fn weights_share_the_load() {
        let pool = pool(&[3, 1]);
        let mut held = Vec::new();
        let mut counts = [0; 2];
        for _ in 0..8 {
            let i = pool.pick(&[]).expect("a replica");
            counts[i] += 1;
            held.push(pool.start(i));
        }
        assert_eq!(counts, [6, 2]);
    }

    #[test]
    fn ejected_replicas_are_skipped_until_a_good_check() {
        let pool = pool(&[1, 1]);
        pool.unreachable(0, &"refused");
        assert!(!pool.replica(0).is_up());
        for _ in 0..4 {
            assert_eq!(pool.pick(&[]), Some(1));
        }
        // Tried the healthy one already: the ejected one is still a chance.
        assert_eq!(pool.pick(&[1]), Some(0));
        assert_eq!(pool.pick(&[0, 1]), None);
        pool.checked(0, Ok::<(), &str>(()));
        assert!(pool.replica(0).is_up());
    }

    #[test]
    fn checks_eject_after_failures_in_a_row() {
        let pool = pool(&[1, 1]);
        pool.checked(1, Err("timeout"));
        assert!(pool.replica(1).is_up(), "one failed check is not enough");
        pool.checked(1, Ok::<(), &str>(()));
        pool.checked(1, Err("timeout"));
        assert!(pool.replica(1).is_up(), "a success resets the count");
        pool.checked(1, Err("timeout"));
        assert!(!pool.replica(1).is_up());
        let text = pool.metrics.render();
        assert!(
            text.contains("dashcache_clickhouse_replica_up{replica=\"http://127.0.0.1:8001\"} 0"),
            "{text}"
        );
    }
}
