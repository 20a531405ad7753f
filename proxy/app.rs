//! The proxy's shared state: what every request handler can reach.
//!
//! Built once from the config at start; cheap to share (`Arc`).

use std::sync::Arc;

use dashcache::cache::Cache;
use dashcache::catalog::Catalog;
use dashcache::clickhouse::ClickHouse;
use dashcache::coalesce::Coalescer;
use dashcache::config::Config;
use dashcache::fill::Filler;
use dashcache::metrics::Metrics;

pub struct App {
    pub config: Config,
    pub catalog: Catalog,
    pub cache: Arc<Cache>,
    pub coalescer: Arc<Coalescer>,
    pub filler: Arc<Filler>,
    pub metrics: Arc<Metrics>,
}

impl App {
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let catalog = Catalog::load(&config)?;
        let metrics = Arc::new(Metrics::new());
        let cache = Arc::new(Cache::new(&config, metrics.clone(), true)?);
        let filler = Arc::new(Filler {
            clickhouse: ClickHouse::new(&config.clickhouse, metrics.clone()),
            cache: cache.clone(),
            metrics: metrics.clone(),
            max_entry_bytes: config.cache.max_entry_bytes,
            coalesce: config.coalesce.clone(),
        });
        Ok(Arc::new(App {
            catalog,
            cache,
            coalescer: Coalescer::new(),
            filler,
            metrics,
            config,
        }))
    }
}
