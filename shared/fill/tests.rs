//! The fill / coalesce / freshness state machine in process: a scripted
//! upstream, the memory store standing in for Redis (a lock taken by the test
//! is "another process"), and a paused clock, so waits, polls and timeouts
//! take no real time and every outcome is deterministic.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use super::memory::MemoryStore;
use super::*;
use crate::coalesce::{Coalescer, Role, Subscriber};
use crate::freshness::{self, Freshness};

/// What the upstream does on one call.
enum Step {
    /// Refuses before any byte (a connection error).
    Unreachable,
    /// Answers these chunks.
    Answer(&'static [&'static str]),
    /// Sends these chunks, then fails.
    FailAfter(&'static [&'static str]),
    /// The computation panics.
    Panic,
    /// ClickHouse answers an error status (a syntax error, an unknown table).
    Refused(u16),
    /// Answers these chunks with these response headers.
    WithHeaders(
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
    ),
}

/// An upstream that follows a script and counts its calls.
#[derive(Default)]
struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    calls: AtomicUsize,
    /// False: every replica is ejected.
    up: AtomicBool,
}

impl Scripted {
    fn new(steps: Vec<Step>) -> Arc<Scripted> {
        Arc::new(Scripted {
            steps: Mutex::new(steps.into()),
            calls: AtomicUsize::new(0),
            up: AtomicBool::new(true),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

struct Chunks {
    chunks: VecDeque<Bytes>,
    fail_at_end: bool,
    headers: Vec<(String, String)>,
}

impl AnswerStream for Chunks {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        let next = match self.chunks.pop_front() {
            Some(chunk) => Ok(Some(chunk)),
            None if self.fail_at_end => Err(UpstreamError::Body {
                code: Some(241),
                message: "memory limit exceeded".into(),
            }),
            None => Ok(None),
        };
        Box::pin(async move { next })
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.headers.clone()
    }
}

impl Upstream for Scripted {
    fn query(
        &self,
        _sql: &str,
        _format: Format,
        _query_id: &str,
    ) -> Result<Box<dyn AnswerStream>, UpstreamError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let step = self
            .steps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
            .unwrap_or(Step::Unreachable);
        let mut headers = Vec::new();
        let (chunks, fail_at_end) = match step {
            Step::Unreachable => return Err(UpstreamError::Connect("connection refused".into())),
            Step::Answer(chunks) => (chunks, false),
            Step::FailAfter(chunks) => (chunks, true),
            Step::Panic => panic!("the computation panicked"),
            Step::Refused(status) => {
                return Err(UpstreamError::Query {
                    code: Some(60),
                    message: "Code: 60. DB::Exception: Table x doesn't exist".into(),
                    status: Some(status),
                });
            }
            Step::WithHeaders(chunks, kept) => {
                headers = kept
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                    .collect();
                (chunks, false)
            }
        };
        Ok(Box::new(Chunks {
            chunks: chunks
                .iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
            fail_at_end,
            headers,
        }))
    }

    fn replicas(&self) -> usize {
        1
    }

    fn available(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
}

struct World {
    filler: Arc<Filler>,
    store: Arc<MemoryStore>,
    upstream: Arc<Scripted>,
    coalescer: Arc<Coalescer>,
    metrics: Arc<Metrics>,
}

fn world(steps: Vec<Step>) -> World {
    let store = Arc::new(MemoryStore::new(1 << 20));
    let upstream = Scripted::new(steps);
    let metrics = Arc::new(Metrics::new());
    let filler = Arc::new(Filler {
        upstream: upstream.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        max_entry_bytes: 1 << 20,
        coalesce: CoalesceConfig::default(),
        backoff: Arc::new(Backoff::of(&CoalesceConfig::default())),
        admission: Admission::new(4, 16, Duration::from_secs(10), metrics.clone()),
    });
    World {
        filler,
        store,
        upstream,
        coalescer: Coalescer::new(),
        metrics,
    }
}

fn key() -> CacheKey {
    CacheKey::new("t", "q", None, Format::Csv, "k")
}

fn job(replaces: Option<i64>) -> FillJob {
    FillJob {
        key: key(),
        query: "q".into(),
        sql: "SELECT 1".into(),
        range: None,
        asked: None,
        format: Format::Csv,
        ttl: Duration::from_secs(60),
        grace: Duration::from_secs(3600),
        replaces,
    }
}

impl World {
    /// Leads a flight for the key and starts its fill; the leader's reader.
    fn start(&self, job: FillJob) -> Subscriber {
        match self.coalescer.join(&job.key, 16) {
            Role::Leader(producer, subscriber) => {
                self.filler.spawn(job, producer);
                subscriber
            }
            _ => panic!("a flight was already running"),
        }
    }

    fn join(&self) -> Subscriber {
        match self.coalescer.join(&key(), 16) {
            Role::Follower(subscriber) => subscriber,
            _ => panic!("no flight to join"),
        }
    }
}

/// The whole answer a reader gets, or its error.
async fn read(mut reader: Subscriber) -> Result<String, FlightError> {
    let mut body = Vec::new();
    while let Some(chunk) = reader.next().await {
        body.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(start_paused = true)]
async fn leader_and_followers_get_one_computation_and_it_is_stored() {
    let w = world(vec![Step::Answer(&["a,", "b\n"])]);
    let leader = w.start(job(None));
    let follower = w.join();
    assert_eq!(read(leader).await.expect("answer"), "a,b\n");
    assert_eq!(read(follower).await.expect("answer"), "a,b\n");
    assert_eq!(w.upstream.calls(), 1);
    let stored = w.store.get(&key()).expect("stored");
    assert_eq!(&stored.body[..], b"a,b\n");
    assert!(
        !w.store.is_locked(&key()).await.unwrap_or(true),
        "lock released"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_before_the_first_byte_is_retried_once_and_reaches_no_reader() {
    let w = world(vec![Step::Unreachable, Step::Answer(&["ok\n"])]);
    let leader = w.start(job(None));
    assert_eq!(read(leader).await.expect("the retry answers"), "ok\n");
    assert_eq!(w.upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_client_error_from_clickhouse_is_not_retried_but_a_server_error_is() {
    let w = world(vec![Step::Refused(404), Step::Answer(&["never\n"])]);
    let leader = w.start(job(None));
    assert!(matches!(
        read(leader).await,
        Err(FlightError::Upstream(UpstreamError::Query {
            status: Some(404),
            ..
        }))
    ));
    assert_eq!(w.upstream.calls(), 1, "saying it again would not change it");
    assert!(w.store.get(&key()).is_none());

    let w = world(vec![Step::Refused(500), Step::Answer(&["ok\n"])]);
    assert_eq!(
        read(w.start(job(None))).await.expect("the retry answers"),
        "ok\n"
    );
    assert_eq!(w.upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_answer_s_headers_reach_readers_and_the_stored_entry() {
    let kept: &[(&str, &str)] = &[("content-type", "text/csv"), ("x-clickhouse-format", "CSV")];
    let w = world(vec![Step::WithHeaders(&["a\n", "b\n"], kept)]);
    let mut leader = w.start(job(None));
    let first = leader.next().await.expect("a chunk").expect("no error");
    assert_eq!(first, "a\n");
    let headers = leader.headers();
    assert_eq!(headers.len(), 2);
    assert_eq!(
        headers[1],
        ("x-clickhouse-format".to_owned(), "CSV".to_owned())
    );
    assert_eq!(read(leader).await.expect("the rest"), "b\n");
    let stored = w.store.get(&key()).expect("stored");
    assert_eq!(stored.header.headers, *headers);
}

#[tokio::test(start_paused = true)]
async fn two_failures_fail_the_readers_and_store_nothing() {
    let w = world(vec![
        Step::Unreachable,
        Step::Unreachable,
        Step::Answer(&["late"]),
    ]);
    let leader = w.start(job(None));
    let follower = w.join();
    assert!(matches!(
        read(leader).await,
        Err(FlightError::Upstream(UpstreamError::Connect(_)))
    ));
    assert!(read(follower).await.is_err());
    assert_eq!(w.upstream.calls(), 2, "retried once, not more");
    assert!(w.store.get(&key()).is_none(), "a failure is never stored");
    // A newcomer does not join the failed flight: it starts a new one.
    assert!(matches!(w.coalescer.join(&key(), 16), Role::Leader(..)));
}

#[tokio::test(start_paused = true)]
async fn a_failure_after_the_first_byte_is_not_retried_and_not_stored() {
    let w = world(vec![Step::FailAfter(&["partial"]), Step::Answer(&["x"])]);
    let leader = w.start(job(None));
    assert!(matches!(
        read(leader).await,
        Err(FlightError::Upstream(UpstreamError::Body { .. }))
    ));
    assert_eq!(w.upstream.calls(), 1);
    assert!(w.store.get(&key()).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_waiter_takes_over_when_the_holder_gives_up_without_an_answer() {
    let w = world(vec![Step::Answer(&["mine\n"])]);
    // Another process holds the key's lock.
    let LockOutcome::Acquired(other) = w.store.lock(&key(), Duration::from_secs(600)).await else {
        panic!("a fresh key is not locked");
    };
    let leader = w.start(job(None));
    // It waits (polling on the paused clock) while the lock is held...
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        w.upstream.calls(),
        0,
        "computed while another holds the lock"
    );
    // ...and computes itself once the holder goes away with no answer.
    drop(other);
    assert_eq!(read(leader).await.expect("taken over"), "mine\n");
    assert_eq!(w.upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_hands_over_the_holders_answer_without_computing() {
    let w = world(vec![Step::Answer(&["never"])]);
    let LockOutcome::Acquired(other) = w.store.lock(&key(), Duration::from_secs(600)).await else {
        panic!("a fresh key is not locked");
    };
    let leader = w.start(job(None));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The other process stores its answer and releases the lock.
    let entry = new_entry(
        Bytes::from_static(b"theirs\n"),
        Encoding::Identity,
        Entry::etag_of(b"theirs\n"),
        &job(None),
        Duration::from_millis(3),
        now_ms(),
    );
    assert!(w.store.put(&key(), Arc::new(entry), now_ms()).await);
    drop(other);
    assert_eq!(read(leader).await.expect("handed over"), "theirs\n");
    assert_eq!(w.upstream.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_lock_held_past_the_wait_timeout_fails_the_readers_with_a_timeout() {
    let w = world(vec![Step::Answer(&["never"])]);
    let LockOutcome::Acquired(_other) = w.store.lock(&key(), Duration::from_secs(3600)).await
    else {
        panic!("a fresh key is not locked");
    };
    let leader = w.start(job(None));
    assert!(matches!(
        read(leader).await,
        Err(FlightError::WaitTimeout(_))
    ));
    assert_eq!(w.upstream.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_computation_that_panics_releases_its_lock_at_once() {
    let w = world(vec![Step::Panic, Step::Answer(&["again\n"])]);
    let leader = w.start(job(None));
    // The panic ends the flight without an answer...
    assert!(matches!(read(leader).await, Err(FlightError::Aborted)));
    // ...and the lock went with it: the next computation takes it at once,
    // with no wait for the lock's TTL (no clock advance needed).
    assert!(!w.store.is_locked(&key()).await.unwrap_or(true));
    let again = w.start(job(None));
    assert_eq!(read(again).await.expect("computed again"), "again\n");
}

#[tokio::test(start_paused = true)]
async fn the_waiter_cap_turns_the_next_reader_away() {
    let w = world(vec![]);
    let Role::Leader(_producer, _leader) = w.coalescer.join(&key(), 2) else {
        panic!("first is the leader");
    };
    let _second = w.coalescer.join(&key(), 2);
    assert!(matches!(w.coalescer.join(&key(), 2), Role::Overloaded));
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_stale_answer_served_and_is_counted() {
    let w = world(vec![
        Step::Answer(&["v1\n"]),
        Step::Unreachable,
        Step::Unreachable,
    ]);
    assert_eq!(read(w.start(job(None))).await.expect("v1"), "v1\n");
    let stored = w.store.get(&key()).expect("stored");
    // Past its TTL, within grace: STALE, and a refresh starts...
    let later = stored.header.fresh_until_ms + 1;
    assert_eq!(
        freshness::judge(&stored.header, later, 1.0, 0.5),
        Freshness::Stale
    );
    let refresh = w.start(job(Some(stored.header.created_ms)));
    // ...which fails (stale-if-error): nothing replaces the stored answer.
    assert!(read(refresh).await.is_err());
    assert_eq!(w.metrics.refresh_failures.get(), 1);
    let kept = w.store.get(&key()).expect("still stored");
    assert_eq!(kept.header.created_ms, stored.header.created_ms);
    assert_eq!(
        freshness::judge(&kept.header, later, 1.0, 0.5),
        Freshness::Stale,
        "the old answer is still served"
    );
}

#[tokio::test(start_paused = true)]
async fn xfetch_asks_a_hot_entry_for_an_early_refresh_that_replaces_it() {
    let w = world(vec![Step::Answer(&["v1\n"]), Step::Answer(&["v2\n"])]);
    read(w.start(job(None))).await.expect("v1");
    let first = w.store.get(&key()).expect("stored");
    // Well before expiry, a large beta (or a slow query) asks for a refresh
    // now; a small one does not.
    let soon = first.header.fresh_until_ms - 1_000;
    assert_eq!(
        freshness::judge(&first.header, soon, 1.0, 0.5),
        Freshness::Fresh {
            refresh_early: false
        }
    );
    assert_eq!(
        freshness::judge(&first.header, soon, 1e9, 0.5),
        Freshness::Fresh {
            refresh_early: true
        }
    );
    let refresh = w.start(job(Some(first.header.created_ms)));
    assert_eq!(read(refresh).await.expect("v2"), "v2\n");
    let second = w.store.get(&key()).expect("stored");
    assert_eq!(&second.body[..], b"v2\n");
    assert!(second.header.created_ms >= first.header.created_ms);
}

fn attempts(metrics: &Metrics, outcome: &str) -> f64 {
    let text = metrics.render();
    let series = format!("dashcache_clickhouse_attempts_total{{result=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test(start_paused = true)]
async fn a_failed_computation_backs_off_its_key_until_it_may_run_again_and_success_resets_it() {
    let w = world(vec![
        Step::Unreachable,
        Step::Unreachable,
        Step::Answer(&["back\n"]),
    ]);
    assert!(read(w.start(job(None))).await.is_err());
    assert_eq!(w.upstream.calls(), 2);
    // Asked again at once: its readers hear so without ClickHouse being asked.
    assert!(matches!(
        read(w.start(job(None))).await,
        Err(FlightError::BackingOff(_))
    ));
    assert!(matches!(
        w.filler.may_refresh(&key()),
        Err(Skip::BackingOff(_))
    ));
    assert_eq!(w.upstream.calls(), 2, "nothing sent while backing off");
    assert_eq!(attempts(&w.metrics, "backing_off"), 2.0);
    assert_eq!(attempts(&w.metrics, "ejected"), 0.0, "exported at 0");
    // Another key is not held back.
    let other = CacheKey::new("t", "q", None, Format::Csv, "other");
    assert_eq!(w.filler.may_refresh(&other), Ok(()));
    // The backoff ends (at most `backoff` after a first failure): computed again.
    tokio::time::advance(CoalesceConfig::default().backoff).await;
    assert_eq!(w.filler.may_refresh(&key()), Ok(()));
    assert_eq!(read(w.start(job(None))).await.expect("answer"), "back\n");
    assert_eq!(w.filler.backoff.failures(&key()), 0, "a success resets it");
}

#[tokio::test(start_paused = true)]
async fn no_refresh_starts_while_every_clickhouse_slot_is_taken() {
    let w = world(vec![]);
    let held: Vec<_> = futures_util::future::join_all((0..4).map(|_| w.filler.admission.enter()))
        .await
        .into_iter()
        .map(|slot| slot.expect("a slot"))
        .collect();
    assert_eq!(w.filler.may_refresh(&key()), Err(Skip::Busy));
    assert_eq!(attempts(&w.metrics, "busy"), 1.0);
    drop(held);
    assert_eq!(w.filler.may_refresh(&key()), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn no_refresh_starts_while_every_replica_is_ejected() {
    let w = world(vec![Step::Answer(&["ok\n"])]);
    w.upstream.up.store(false, Ordering::SeqCst);
    assert_eq!(w.filler.may_refresh(&key()), Err(Skip::Ejected));
    assert_eq!(attempts(&w.metrics, "ejected"), 1.0);
    // A health check re-admits a replica: refreshes start again.
    w.upstream.up.store(true, Ordering::SeqCst);
    assert_eq!(w.filler.may_refresh(&key()), Ok(()));
    assert_eq!(w.upstream.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stale_answer_read_a_thousand_times_at_a_dead_upstream_costs_a_bounded_number_of_queries()
{
    let w = world(vec![Step::Answer(&["v1\n"])]);
    read(w.start(job(None))).await.expect("v1");
    let stored = w.store.get(&key()).expect("stored");
    // From now on every call fails (the script is exhausted).
    // 1000 reads over 10 s, each serving the stale answer and asking for a
    // refresh, as the proxy's handler does.
    // (Freshness is judged on the wall clock: as if read just past the TTL.)
    let now = stored.header.fresh_until_ms + 1;
    for _ in 0..1000 {
        assert!(
            w.store
                .get(&key())
                .is_some_and(|e| freshness::judge(&e.header, now, 1.0, 0.5) == Freshness::Stale),
            "the stale answer stays served"
        );
        if w.filler.may_refresh(&key()).is_ok()
            && let Role::Leader(producer, reader) = w.coalescer.join(&key(), usize::MAX)
        {
            w.filler
                .spawn(job(Some(stored.header.created_ms)), producer);
            let _ = read(reader).await;
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    // Backoff 1 s doubling, each wait at least half its bound: attempts at
    // 0 s and after >= 0.5, 1, 2 and 4 s more (7.5 s in all), so at most 5
    // attempts of 2 calls (the retry) in 10 s, instead of one per read.
    let calls = w.upstream.calls() - 1; // the first answer
    assert!((2..=10).contains(&calls), "{calls} calls");
    assert_eq!(w.metrics.refresh_failures.get() as usize * 2, calls);
    let kept = w.store.get(&key()).expect("still stored");
    assert_eq!(kept.header.created_ms, stored.header.created_ms);
}

#[tokio::test(start_paused = true)]
async fn an_error_clickhouse_reports_about_the_query_is_said_again_without_backoff() {
    let w = world(vec![Step::Refused(404), Step::Refused(404)]);
    for _ in 0..2 {
        assert!(matches!(
            read(w.start(job(None))).await,
            Err(FlightError::Upstream(UpstreamError::Query { .. }))
        ));
    }
    assert_eq!(
        w.upstream.calls(),
        2,
        "each request hears ClickHouse's own error"
    );
    assert_eq!(w.filler.backoff.failures(&key()), 0);
    assert_eq!(w.filler.may_refresh(&key()), Ok(()));
}
