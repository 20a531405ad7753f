//! Demand per canonical request, counted cheaply in Redis, for popularity-driven warm-up.
//!
//! Owns the [`Recorder`] the proxy calls on every cached-query request: it
//! only bumps a counter in an in-process map; a background flusher sends the
//! counts to Redis every `flush_interval` as one pipeline of `ZINCRBY` into a
//! sorted set per UTC hour (with an `EXPIRE` of `retention`), so requests never
//! wait on Redis for this. Without Redis (one host) the flusher adds them to
//! hourly counts in process memory instead (bounded: at most `max_pending`
//! answers an hour, hours older than `retention` dropped). And the readers
//! `popular` jobs use: the most requested keys of the last N hours,
//! [`Recorder::top`] (either place) and [`top`] (Redis).
//!
//! A member is `query \t tenant \t format \t canonical query` (the bound
//! parameters without the tenant, times absolute), which binds again to the
//! same cache key. It does not decide what to refresh: that is the scheduler's.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;

use crate::cache::CacheKey;
use crate::config::PopularityConfig;
use crate::format::Format;
use crate::params::Bound;
use crate::redis_conn::RedisConn;

#[derive(Debug, thiserror::Error)]
pub enum PopularityError {
    #[error("popularity: redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One requested answer, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    pub query: String,
    pub tenant: Option<String>,
    pub format: Format,
    /// URL-encoded canonical parameters without the tenant.
    pub params: String,
}

impl Demand {
    fn member(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}",
            self.query,
            self.tenant.as_deref().unwrap_or(""),
            self.format.name(),
            self.params
        )
    }

    fn parse(member: &str) -> Option<Demand> {
        let mut parts = member.splitn(4, '\t');
        let query = parts.next()?.to_owned();
        let tenant = Some(parts.next()?)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        let format = Format::from_param(parts.next()?)?;
        let params = parts.next()?.to_owned();
        Some(Demand {
            query,
            tenant,
            format,
            params,
        })
    }

    /// The parameters as URL-style pairs, ready to bind again.
    pub fn raw(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.params.as_bytes())
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect()
    }
}

/// Counts requests in memory; [`Recorder::flush`] sends them to Redis, or
/// to the hourly counts it keeps itself without Redis.
pub struct Recorder {
    /// Counts by cache key, with the member each count goes to.
    pending: Mutex<HashMap<String, (String, u64)>>,
    config: PopularityConfig,
    prefix: String,
    sink: Sink,
    /// Requests not counted because `max_pending` was reached.
    dropped: std::sync::atomic::AtomicU64,
}

/// Where flushed counts go.
enum Sink {
    Redis(RedisConn),
    /// Per UTC hour (hours since the epoch): count per member.
    Memory(Mutex<BTreeMap<i64, HashMap<String, u64>>>),
}

impl Recorder {
    /// A recorder writing under `prefix` (the config's `cache.key_prefix`)
    /// through `conn` (any topology: one flush touches one hour's key).
    /// No Redis round trip happens here.
    pub fn new(
        conn: RedisConn,
        prefix: &str,
        config: &PopularityConfig,
    ) -> Result<Arc<Recorder>, PopularityError> {
        Ok(Recorder::with_sink(Sink::Redis(conn), prefix, config))
    }

    /// A recorder keeping its hourly counts in this process (no Redis).
    pub fn in_memory(prefix: &str, config: &PopularityConfig) -> Arc<Recorder> {
        Recorder::with_sink(Sink::Memory(Mutex::default()), prefix, config)
    }

    fn with_sink(sink: Sink, prefix: &str, config: &PopularityConfig) -> Arc<Recorder> {
        Arc::new(Recorder {
            pending: Mutex::new(HashMap::new()),
            config: config.clone(),
            prefix: prefix.to_owned(),
            sink,
            dropped: Default::default(),
        })
    }

    /// The `k` most requested answers of the last `hours` hours (the current
    /// one included), most requested first: what `popular` jobs warm and
    /// `/status` shows.
    pub async fn top(&self, hours: u32, k: usize) -> Result<Vec<(Demand, u64)>, PopularityError> {
        let now = Utc::now();
        let counts = match &self.sink {
            Sink::Redis(conn) => return top(&mut conn.clone(), &self.prefix, hours, k, now).await,
            Sink::Memory(counts) => counts,
        };
        if k == 0 || hours == 0 {
            return Ok(Vec::new());
        }
        let this_hour = hour_of(now);
        let mut sums: HashMap<&str, u64> = HashMap::new();
        let counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, members) in counts.range(this_hour - i64::from(hours) + 1..=this_hour) {
            for (member, n) in members {
                *sums.entry(member).or_default() += n;
            }
        }
        let mut ranked: Vec<(&str, u64)> = sums.into_iter().collect();
        // Most requested first; ties in a stable order.
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        Ok(ranked
            .into_iter()
            .take(k)
            .filter_map(|(m, n)| Demand::parse(m).map(|d| (d, n)))
            .collect())
    }

    /// Counts one request for a bound query. Never blocks on I/O; a key
    /// already counted since the last flush costs no allocation.
    pub fn record(
        &self,
        key: &CacheKey,
        query: &str,
        tenant: Option<&str>,
        format: Format,
        bound: &Bound,
    ) {
        if !self.config.enabled {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let len = pending.len();
        match pending.get_mut(key.as_str()) {
            Some((_, n)) => *n += 1,
            None if len < self.config.max_pending => {
                let member = Demand {
                    query: query.to_owned(),
                    tenant: tenant.map(str::to_owned),
                    format,
                    params: bound.asked_query(),
                }
                .member();
                pending.insert(key.as_str().to_owned(), (member, 1));
            }
            None => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Sends the counts gathered so far to the current hour's sorted set, in
    /// one pipeline. Counts that could not be sent are lost (demand is a hint).
    pub async fn flush(&self) -> Result<usize, PopularityError> {
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            return Ok(0);
        }
        let conn = match &self.sink {
            Sink::Redis(conn) => conn,
            Sink::Memory(counts) => {
                let now = Utc::now();
                let keep_hours = i64::try_from(self.config.retention.as_secs() / 3600)
                    .unwrap_or(i64::MAX)
                    .max(1);
                let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
                let this_hour = hour_of(now);
                counts.retain(|hour, _| *hour > this_hour.saturating_sub(keep_hours));
                let members = counts.entry(this_hour).or_default();
                for (member, count) in batch.into_values() {
                    let len = members.len();
                    match members.get_mut(&member) {
                        Some(n) => *n += count,
                        None if len < self.config.max_pending => {
                            members.insert(member, count);
                        }
                        None => {
                            self.dropped
                                .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                return Ok(members.len());
            }
        };
        let key = hour_key(&self.prefix, Utc::now());
        let mut pipe = redis::pipe();
        for (member, count) in batch.values() {
            pipe.zincr(&key, member, *count).ignore();
        }
        let retention = i64::try_from(self.config.retention.as_secs()).unwrap_or(i64::MAX);
        pipe.expire(&key, retention).ignore();
        let mut conn = conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(batch.len())
    }

    /// Requests not counted because too many distinct keys were pending.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flushes every `flush_interval` until the task is aborted.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let recorder = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(recorder.config.flush_interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(err) = recorder.flush().await {
                    tracing::warn!(error = %err, "could not flush request counts");
                }
            }
        })
    }
}

/// Hours since the epoch (UTC) of `at`.
fn hour_of(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(3600)
}

/// The sorted set of one UTC hour. All share one Redis Cluster hash tag so
/// they can be unioned.
pub fn hour_key(prefix: &str, at: DateTime<Utc>) -> String {
    format!("{prefix}:popular:{{popular}}:{}", at.format("%Y%m%d%H"))
}

/// The `k` most requested answers of the `hours` hours up to `now` (the
/// current hour included), most requested first, with their counts.
/// One atomic pipeline on keys of one hash tag, so it works on Cluster too.
pub async fn top(
    conn: &mut impl ConnectionLike,
    prefix: &str,
    hours: u32,
    k: usize,
    now: DateTime<Utc>,
) -> Result<Vec<(Demand, u64)>, PopularityError> {
    if k == 0 || hours == 0 {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = (0..hours)
        .map(|h| hour_key(prefix, now - chrono::Duration::hours(i64::from(h))))
        .collect();
    let scratch = format!(
        "{prefix}:popular:{{popular}}:union:{:016x}",
        rand::random::<u64>()
    );
    let stop = isize::try_from(k).unwrap_or(isize::MAX) - 1;
    let (members,): (Vec<(String, f64)>,) = redis::pipe()
        .atomic()
        .zunionstore(&scratch, &keys)
        .ignore()
        .cmd("ZRANGE")
        .arg(&scratch)
        .arg(0)
        .arg(stop)
        .arg("REV")
        .arg("WITHSCORES")
        .del(&scratch)
        .ignore()
        .query_async(conn)
        .await?;
    Ok(members
        .into_iter()
        .filter_map(|(m, score)| Demand::parse(&m).map(|d| (d, score as u64)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::TENANT;
    use crate::params::Value;

    #[test]
    fn members_round_trip_without_the_tenant_in_params() {
        let mut bound = Bound::default();
        bound.push("from", Value::Time(0));
        bound.push("country", Value::StrList(vec!["DE".into(), "FR".into()]));
        bound.push("plan", Value::StrList(vec![]));
        bound.push(TENANT, Value::Str("acme".into()));
        let demand = Demand {
            query: "revenue".into(),
            tenant: Some("acme".into()),
            format: Format::Csv,
            params: bound.asked_query(),
        };
        assert!(!demand.params.contains("tenant"), "{}", demand.params);
        assert!(!demand.params.contains("plan"), "{}", demand.params);
        assert_eq!(Demand::parse(&demand.member()), Some(demand.clone()));
        assert_eq!(
            demand.raw(),
            vec![
                ("from".to_string(), "1970-01-01T00:00:00Z".to_string()),
                ("country".to_string(), "DE,FR".to_string()),
            ]
        );
    }

    #[test]
    fn hour_keys_share_a_hash_tag() {
        let t = DateTime::parse_from_rfc3339("2026-11-01T08:15:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(hour_key("dc", t), "dc:popular:{popular}:2026110108");
    }

    #[tokio::test]
    async fn without_redis_counts_are_kept_in_memory_and_ranked() {
        let recorder = Recorder::in_memory("dc", &PopularityConfig::default());
        let record = |name: &str, times: usize| {
            let mut bound = Bound::default();
            bound.push("country", Value::Str(name.into()));
            let key = CacheKey::new("dc", "revenue", None, Format::Csv, name);
            for _ in 0..times {
                recorder.record(&key, "revenue", Some("acme"), Format::Csv, &bound);
            }
        };
        record("DE", 3);
        record("FR", 5);
        assert!(
            recorder.top(1, 10).await.unwrap().is_empty(),
            "not flushed yet"
        );
        recorder.flush().await.unwrap();
        record("DE", 4);
        recorder.flush().await.unwrap();
        let top = recorder.top(3, 10).await.unwrap();
        let got: Vec<(String, u64)> = top.iter().map(|(d, n)| (d.params.clone(), *n)).collect();
        assert_eq!(
            got,
            vec![("country=DE".to_owned(), 7), ("country=FR".to_owned(), 5)]
        );
        assert_eq!(top[0].0.tenant.as_deref(), Some("acme"));
        assert_eq!(recorder.top(3, 1).await.unwrap().len(), 1);
    }
}
