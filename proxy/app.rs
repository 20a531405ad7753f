//! The proxy's shared state: what every request handler can reach.
//!
//! Built once from the config at start; cheap to share (`Arc`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dashcache::cache::Cache;
use dashcache::catalog::Catalog;
use dashcache::clickhouse::ClickHouse;
use dashcache::coalesce::Coalescer;
use dashcache::config::Config;
use dashcache::fill::Filler;
use dashcache::keys::{KeyRing, KeyStore};
use dashcache::metrics::Metrics;
use dashcache::popularity::Recorder;
use dashcache::ratelimit::RateLimiter;
use dashcache::redis_conn::{RedisConn, Timeouts};
use dashcache::store::Store;
use dashcache::tier::Tiers;

use crate::missqueue::MissQueue;

pub struct App {
    pub config: Config,
    pub catalog: Catalog,
    pub tiers: Tiers,
    pub keys: Arc<KeyRing>,
    pub key_store: KeyStore,
    pub limiter: Arc<RateLimiter>,
    /// Per-key turns at starting a computation (`max_concurrent_misses`).
    pub misses: MissQueue,
    /// Recently prepared requests (see `query::prepare`).
    pub prepared: moka::sync::Cache<String, Arc<crate::query::Prepared>>,
    pub cache: Arc<Cache>,
    pub coalescer: Arc<Coalescer>,
    pub filler: Arc<Filler>,
    pub metrics: Arc<Metrics>,
    /// Demand per canonical key, for the scheduler's `popular` job.
    pub popularity: Arc<Recorder>,
    /// `GET /openapi.json`, generated from the catalog at start.
    pub openapi: bytes::Bytes,
}

impl App {
    /// Compiles the config, connects the control store and loads the keys.
    pub async fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let catalog = Catalog::load(&config)?;
        let tiers = Tiers::load(&config)?;
        let metrics = Arc::new(Metrics::new());
        crate::routes::Route::zero_series(&metrics);
        let cache = Arc::new(Cache::new(&config, metrics.clone(), true)?);
        let store = Store::from_config(&config).await?;
        let key_store = KeyStore::new(store);
        let keys = Arc::new(KeyRing::default());
        let count = keys.reload(&key_store).await.context("loading API keys")?;
        tracing::info!(keys = count, "API keys loaded");
        keys.spawn_reloads(key_store.clone(), config.auth.reload_interval);
        let filler = Arc::new(Filler {
            clickhouse: ClickHouse::new(&config.clickhouse, metrics.clone()),
            cache: cache.clone(),
            metrics: metrics.clone(),
            max_entry_bytes: config.cache.max_entry_bytes,
            coalesce: config.coalesce.clone(),
        });
        // Its own connection: a flush is one big pipeline, allowed more time
        // than the cache's round trips.
        let popularity = Recorder::new(
            RedisConn::open(&config.redis, Timeouts::relaxed(Duration::from_secs(5)))?,
            &config.cache.key_prefix,
            &config.popularity,
        )?;
        popularity.spawn_flusher();
        Ok(Arc::new(App {
            openapi: crate::openapi::build(&catalog, &config.auth),
            popularity,
            limiter: RateLimiter::new(cache.clone(), &config.cache.key_prefix),
            misses: MissQueue::new(metrics.clone()),
            prepared: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(config.cache.now_step)
                .build(),
            catalog,
            tiers,
            keys,
            key_store,
            cache,
            coalescer: Coalescer::new(),
            filler,
            metrics,
            config,
        }))
    }
}
