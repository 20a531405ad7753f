//! The proxy's shared state: what every request handler can reach.
//!
//! Built once from the config at start; cheap to share (`Arc`). It depends on
//! the parts it holds (auth, the prepared-request memo, the library), never on
//! the handlers or routes that use it.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::keys::{KeyRing, KeyStore};
use crate::auth::ratelimit::RateLimiter;
use crate::auth::tier::Tiers;
use dashcache::admission::Admission;
use dashcache::backoff::Backoff;
use dashcache::cache::Cache;
use dashcache::catalog::Catalog;
use dashcache::check::Checked;
use dashcache::clickhouse::ClickHouse;
use dashcache::coalesce::Coalescer;
use dashcache::config::Config;
use dashcache::fill::Filler;
use dashcache::metrics::Metrics;
use dashcache::popularity::{PopularityError, Recorder};
use dashcache::redis_conn::{RedisConn, RedisConnError, Timeouts};
use dashcache::store::{Store, StoreError};
use dashcache::warmup::runner::Parts;

use crate::ahead::RefreshAhead;
use crate::auth::Auth;
use crate::auth::missqueue::MissQueue;
use crate::cors::Cors;
use crate::history::History;
use crate::prepared::PreparedMemo;

pub struct App {
    pub config: Config,
    pub catalog: Catalog,
    /// API keys, tiers, rate limits and the miss queue.
    pub auth: Auth,
    /// Recently prepared requests (see [`crate::prepared`]).
    pub prepared: PreparedMemo,
    pub cache: Arc<Cache>,
    /// ClickHouse: computations go through `filler`; exports and `/readyz` use it directly.
    pub clickhouse: ClickHouse,
    pub coalescer: Arc<Coalescer>,
    pub filler: Arc<Filler>,
    pub metrics: Arc<Metrics>,
    /// Demand per canonical key, for the scheduler's `popular` job.
    pub popularity: Arc<Recorder>,
    /// `GET /openapi.json`, generated from the catalog at start.
    pub openapi: bytes::Bytes,
    /// Timers that refresh answers being read just before they expire.
    pub ahead: Arc<RefreshAhead>,
    /// `[cors]`: preflights and the CORS headers of every answer.
    pub cors: Cors,
    /// The control store (API keys; `/status` reads the warm-up history).
    pub store: Store,
    /// What `/status` charts: the counters sampled over the last minutes.
    pub history: Arc<History>,
    /// The ClickHouse-compatible endpoint's servers, TTL rules and passwords.
    pub clickhouse_http: crate::chhttp::endpoint::Endpoint,
    /// The warm-up jobs, when this proxy runs them (`[scheduler] in_proxy`).
    pub warmup: Option<crate::warmup::InProxy>,
}

/// Why the proxy could not start with a config that passed the check.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Redis(#[from] RedisConnError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("loading API keys: {0}")]
    Keys(#[source] StoreError),
    #[error(transparent)]
    Popularity(#[from] PopularityError),
    #[error(transparent)]
    Engine(#[from] dashcache::engine::chdb::ChdbError),
    #[error("warm-up jobs: {0}")]
    Warmup(#[from] dashcache::warmup::runner::RunnerError),
}

impl App {
    /// Builds the state of a checked config: tiers, the control store, the keys.
    pub async fn new(checked: Checked) -> Result<Arc<App>, StartError> {
        let Checked {
            config,
            catalog,
            warmups,
        } = checked;
        let tiers = Tiers::new(&config);
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(Cache::new(
            &config.cache,
            config.redis.as_ref(),
            config.min_retention(),
            metrics.clone(),
            true,
        )?);
        let store = Store::from_config(&config).await?;
        let key_store = KeyStore::new(store.clone());
        let keys = Arc::new(KeyRing::default());
        let count = keys.reload(&key_store).await.map_err(StartError::Keys)?;
        tracing::info!(keys = count, "API keys loaded");
        keys.spawn_reloads(key_store.clone(), config.auth.reload_interval);
        let clickhouse = ClickHouse::open(&config.clickhouse, metrics.clone())?;
        let filler = Arc::new(Filler {
            upstream: Arc::new(clickhouse.clone()),
            store: cache.clone(),
            metrics: metrics.clone(),
            max_entry_bytes: config.cache.max_entry_bytes,
            coalesce: config.coalesce.clone(),
            backoff: Arc::new(Backoff::of(&config.coalesce)),
            admission: Admission::of(&config.clickhouse, metrics.clone()),
        });
        // Its own connection: a flush is one big pipeline, allowed more time
        // than the cache's round trips. Without Redis, counts stay in memory.
        let popularity = match &config.redis {
            Some(redis) => Recorder::new(
                RedisConn::open(redis, Timeouts::relaxed(Duration::from_secs(5)))?,
                &config.cache.key_prefix,
                &config.popularity,
            )?,
            None => {
                tracing::info!(
                    max_bytes = config.cache.memory_max_bytes,
                    "no [redis]: answers, locks, rate limits and request counts are kept in this process"
                );
                Recorder::in_memory(&config.cache.key_prefix, &config.popularity)
            }
        };
        popularity.spawn_flusher();
        let coalescer = Coalescer::new();
        let warmup = crate::warmup::InProxy::start(
            &config,
            &catalog,
            warmups,
            Parts {
                cache: cache.clone(),
                clickhouse: clickhouse.clone(),
                coalescer: coalescer.clone(),
                admission: filler.admission.clone(),
                popularity: popularity.clone(),
                metrics: metrics.clone(),
                store: store.clone(),
            },
        )?;
        Ok(Arc::new(App {
            warmup,
            cors: Cors::new(&config.cors, &metrics),
            store,
            history: History::spawn(metrics.clone()),
            clickhouse_http: crate::chhttp::endpoint::Endpoint::new(&config, metrics.clone()),
            openapi: crate::openapi::build(&catalog, &config.auth),
            popularity,
            auth: Auth {
                limiter: RateLimiter::new(cache.clone(), &config.cache.key_prefix),
                misses: MissQueue::new(metrics.clone()),
                tiers,
                keys,
                key_store,
                metrics: metrics.clone(),
            },
            prepared: PreparedMemo::new(config.cache.now_step),
            ahead: RefreshAhead::new(config.cache.refresh_ahead_keys),
            catalog,
            cache,
            clickhouse,
            coalescer,
            filler,
            metrics,
            config,
        }))
    }
}
