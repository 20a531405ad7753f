//! In-process miss coalescing (singleflight) with streaming fan-out.
//!
//! The first request for a missing key becomes the leader of a [`Flight`] and
//! gets its [`Producer`]; every concurrent request for the same key joins the
//! flight as a follower. All of them, leader included, read the answer through a
//! [`Subscriber`], chunk by chunk as it arrives, so followers stream too instead
//! of waiting for the whole body. The producer is driven by a detached task (see
//! [`crate::fill`]), so no client going away can cancel the computation for the
//! others. A flight keeps its chunks until it ends, which is bounded by
//! ClickHouse's `max_result_bytes`.
//!
//! This module knows nothing about ClickHouse or Redis; it moves bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::watch;

use crate::cache::CacheKey;
use crate::clickhouse::UpstreamError;
use crate::outcome::StoreOutcome;

/// Why a flight ended without a complete answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlightError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the computation ended without an answer")]
    Aborted,
    #[error("no answer from the process computing it within {0:?}")]
    WaitTimeout(std::time::Duration),
    /// The computation never started: its caller is over its concurrency
    /// allowance (the proxy's miss queue was full or its wait ran out).
    #[error("{0}")]
    OverCapacity(String),
    /// The computation never started: the key's last one failed and its
    /// backoff ([`crate::backoff`]) has this long to run.
    #[error("the last computation failed; not tried again for {0:?}")]
    BackingOff(std::time::Duration),
    /// The computation never started: this process has as many running at
    /// ClickHouse as it may, and its line was full or the wait ran out.
    #[error(transparent)]
    Saturated(#[from] crate::admission::Refused),
}

/// The flights currently in the air, by cache key.
#[derive(Default)]
pub struct Coalescer {
    flights: Mutex<HashMap<CacheKey, Arc<Flight>>>,
}

/// What joining a key gave a request.
pub enum Role {
    /// Nobody was computing this key: compute it with the producer.
    Leader(Producer, Subscriber),
    /// Somebody is: read along.
    Follower(Subscriber),
    /// Somebody is, and too many requests already wait for it.
    Overloaded,
}

impl Coalescer {
    pub fn new() -> Arc<Coalescer> {
        Arc::new(Coalescer::default())
    }

    /// Joins the flight for `key`, starting one if there is none; at most
    /// `max_waiters` readers per flight.
    pub fn join(self: &Arc<Self>, key: &CacheKey, max_waiters: usize) -> Role {
        let mut flights = lock(&self.flights);
        // A flight that already failed is not joined: its failure belongs to
        // the requests that were waiting for it, not to newcomers.
        if let Some(flight) = flights.get(key).filter(|f| !f.failed()) {
            if flight.readers.load(Ordering::Relaxed) >= max_waiters {
                return Role::Overloaded;
            }
            return Role::Follower(flight.subscribe());
        }
        let flight = Arc::new(Flight::new());
        flights.insert(key.clone(), flight.clone());
        drop(flights);
        let subscriber = flight.subscribe();
        let producer = Producer {
            flight,
            key: key.clone(),
            coalescer: self.clone(),
            ended: false,
        };
        Role::Leader(producer, subscriber)
    }

    /// Number of flights in the air (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }

    /// Requests reading along with a flight they did not start (for `/status`).
    pub fn waiting(&self) -> usize {
        lock(&self.flights)
            .values()
            .map(|f| f.readers.load(Ordering::Relaxed).saturating_sub(1))
            .sum()
    }

    fn land(&self, key: &CacheKey, flight: &Arc<Flight>) {
        let mut flights = lock(&self.flights);
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
    }
}

/// One computation of one key, shared by every request that wants it.
pub struct Flight {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    readers: AtomicUsize,
    /// Whether this process ran the computation (rather than picking up
    /// another process's answer).
    computed: AtomicBool,
}

#[derive(Default)]
struct State {
    chunks: Vec<Bytes>,
    outcome: Option<Result<(), FlightError>>,
    /// What became of the complete answer, told by the producer.
    stored: Option<StoreOutcome>,
    /// Response headers of the answer (set before its first chunk), for
    /// readers that replay the upstream's headers.
    headers: Arc<Vec<(String, String)>>,
}

impl Flight {
    fn new() -> Flight {
        Flight {
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
            readers: AtomicUsize::new(0),
            computed: AtomicBool::new(false),
        }
    }

    fn failed(&self) -> bool {
        matches!(lock(&self.state).outcome, Some(Err(_)))
    }

    fn subscribe(self: &Arc<Self>) -> Subscriber {
        self.readers.fetch_add(1, Ordering::Relaxed);
        Subscriber {
            flight: self.clone(),
            next: 0,
            changed: self.changed.subscribe(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut lock(&self.state));
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// The writing end of a flight. Dropping it without [`Producer::complete`] or
/// [`Producer::fail`] fails the flight, so readers never hang; dropping it
/// after either lands the flight (new requests go to the cache again).
pub struct Producer {
    flight: Arc<Flight>,
    key: CacheKey,
    coalescer: Arc<Coalescer>,
    ended: bool,
}

impl Producer {
    /// Records that this process runs the computation (readers then report MISS).
    pub fn mark_computed(&self) {
        self.flight.computed.store(true, Ordering::Relaxed);
    }

    /// Whether any chunk was pushed yet.
    pub fn started(&self) -> bool {
        !lock(&self.flight.state).chunks.is_empty()
    }

    /// Sets the answer's response headers; call before the first [`Producer::push`].
    pub fn set_headers(&self, headers: Vec<(String, String)>) {
        self.flight
            .update(|state| state.headers = Arc::new(headers));
    }

    /// The headers set with [`Producer::set_headers`].
    pub fn headers(&self) -> Arc<Vec<(String, String)>> {
        lock(&self.flight.state).headers.clone()
    }

    pub fn push(&self, chunk: Bytes) {
        self.flight.update(|state| state.chunks.push(chunk));
    }

    /// Marks the answer complete: readers finish once they have every chunk.
    /// The flight stays joinable (with the whole answer) until the producer is
    /// dropped, which should happen once the answer is in the cache.
    pub fn complete(&mut self) {
        self.end(Ok(()));
    }

    /// Marks the answer complete and says what became of it (stored, too
    /// large, refused), so a reader that must know — a warm-up — need not
    /// look in the cache to find out.
    pub fn complete_stored(&mut self, stored: StoreOutcome) {
        lock(&self.flight.state).stored = Some(stored);
        self.end(Ok(()));
    }

    pub fn fail(&mut self, err: FlightError) {
        self.end(Err(err));
    }

    /// Every chunk so far, in order (the whole body after `complete`).
    pub fn chunks(&self) -> Vec<Bytes> {
        lock(&self.flight.state).chunks.clone()
    }

    fn end(&mut self, outcome: Result<(), FlightError>) {
        if !self.ended {
            self.ended = true;
            self.flight.update(|state| state.outcome = Some(outcome));
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.end(Err(FlightError::Aborted));
        self.coalescer.land(&self.key, &self.flight);
    }
}

/// A reader of a flight, from its first chunk.
pub struct Subscriber {
    flight: Arc<Flight>,
    next: usize,
    changed: watch::Receiver<u64>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.flight.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Subscriber {
    /// Whether this process computed the answer (see [`Producer::mark_computed`]).
    pub fn computed_here(&self) -> bool {
        self.flight.computed.load(Ordering::Relaxed)
    }

    /// What became of the complete answer, once the flight completed (`None`
    /// before, or when the producer did not say).
    pub fn stored(&self) -> Option<StoreOutcome> {
        lock(&self.flight.state).stored
    }

    /// The answer's response headers (see [`Producer::set_headers`]); empty
    /// until set, so read them after the first chunk or the end.
    pub fn headers(&self) -> Arc<Vec<(String, String)>> {
        lock(&self.flight.state).headers.clone()
    }

    /// The next chunk; `None` once the answer is complete.
    pub async fn next(&mut self) -> Option<Result<Bytes, FlightError>> {
        loop {
            self.changed.borrow_and_update();
            {
                let state = lock(&self.flight.state);
                if let Some(chunk) = state.chunks.get(self.next) {
                    self.next += 1;
                    return Some(Ok(chunk.clone()));
                }
                match &state.outcome {
                    Some(Ok(())) => return None,
                    Some(Err(err)) => return Some(Err(err.clone())),
                    None => {}
                }
            }
            if self.changed.changed().await.is_err() {
                return Some(Err(FlightError::Aborted));
            }
        }
    }
}

/// Locks a mutex, ignoring poisoning: the guarded state stays consistent
/// because every update is a single push or assignment.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Format;

    fn key(n: u8) -> CacheKey {
        CacheKey::new("t", "q", None, Format::Json, &n.to_string())
    }

    #[tokio::test]
    async fn followers_stream_what_the_leader_produces() {
        let coalescer = Coalescer::new();
        let Role::Leader(mut producer, mut leader) = coalescer.join(&key(1), 10) else {
            panic!("first join must lead")
        };
        producer.push(Bytes::from_static(b"a"));
        let Role::Follower(mut follower) = coalescer.join(&key(1), 10) else {
            panic!("second join must follow")
        };
        assert!(matches!(coalescer.join(&key(2), 10), Role::Leader(..)));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(chunk) = follower.next().await {
                got.extend_from_slice(&chunk.unwrap());
            }
            got
        });
        producer.push(Bytes::from_static(b"b"));
        producer.complete();
        assert_eq!(reader.await.unwrap(), b"ab");
        assert_eq!(leader.next().await.unwrap().unwrap(), "a");
        // Until the producer is dropped, late requests still join the finished flight.
        assert!(matches!(coalescer.join(&key(1), 10), Role::Follower(_)));
        drop(producer);
        assert!(matches!(coalescer.join(&key(1), 10), Role::Leader(..)));
    }

    #[tokio::test]
    async fn newcomers_never_join_a_failed_flight() {
        let coalescer = Coalescer::new();
        let Role::Leader(mut producer, mut reader) = coalescer.join(&key(5), 10) else {
            panic!("first join must lead")
        };
        producer.fail(FlightError::Aborted);
        assert!(matches!(
            reader.next().await,
            Some(Err(FlightError::Aborted))
        ));
        // The failed producer has not landed yet: a newcomer still leads.
        let Role::Leader(second, _) = coalescer.join(&key(5), 10) else {
            panic!("a newcomer must start a new flight")
        };
        drop(producer);
        // Landing the failed flight leaves the new one in place.
        assert!(matches!(coalescer.join(&key(5), 10), Role::Follower(_)));
        drop(second);
    }

    #[tokio::test]
    async fn waiters_per_key_are_capped() {
        let coalescer = Coalescer::new();
        let _leader = coalescer.join(&key(4), 2);
        let second = coalescer.join(&key(4), 2);
        assert!(matches!(second, Role::Follower(_)));
        assert!(matches!(coalescer.join(&key(4), 2), Role::Overloaded));
        drop(second);
        assert!(matches!(coalescer.join(&key(4), 2), Role::Follower(_)));
    }

    #[tokio::test]
    async fn a_dropped_producer_fails_its_readers() {
        let coalescer = Coalescer::new();
        let Role::Leader(producer, mut reader) = coalescer.join(&key(3), 10) else {
            panic!("first join must lead")
        };
        drop(producer);
        assert!(matches!(
            reader.next().await,
            Some(Err(FlightError::Aborted))
        ));
        assert_eq!(coalescer.in_flight(), 0);
    }
}
