//! One Redis connection for every part of dashcache, whatever the topology.
//!
//! Owns turning `[redis]` into a connection: a single server (`url`), a Redis
//! Cluster (`cluster_nodes`, the redis crate's cluster-async client, which
//! follows slot moves and failovers by itself), or a master found through
//! Sentinel (`sentinel_master` + `sentinel_addresses`: the master is asked of
//! the sentinels, and asked again after a connection error or a `READONLY`
//! reply, so a failover is followed without a restart). [`RedisConn`] is a
//! cheap-to-clone handle implementing [`redis::aio::ConnectionLike`], so
//! commands, pipelines and scripts run on it unchanged. Nothing is sent when
//! it is built: a process starts while Redis is down. `rediss://` URLs are
//! TLS (rustls), checked against `redis.ca` when set (single server and
//! Cluster).
//!
//! It does not decide what to do when Redis fails (the cache degrades, the
//! popularity recorder drops counts, the scheduler skips a run): callers do.
//! Keys that one command or script touches together must share a hash tag;
//! that is the callers' business too (see `cache::key`, `popularity`).

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value};

use crate::config::RedisConfig;

/// Why a Redis connection could not be prepared (a bad config, not an outage).
#[derive(Debug, thiserror::Error)]
pub enum RedisConnError {
    #[error("[redis]: {0}")]
    Topology(#[from] TopologyError),
    #[error("[redis]: {0}")]
    Redis(#[from] RedisError),
    /// `redis.ca` cannot be read.
    #[error("redis.ca: cannot read {}: {source}", path.display())]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// `[redis]` keys that describe no single topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("cluster_nodes and sentinel_* are exclusive: pick one topology")]
    ClusterAndSentinel,
    #[error("Sentinel needs both sentinel_master and sentinel_addresses")]
    HalfSentinel,
}

impl TopologyError {
    /// The key of `[redis]` to point at.
    pub fn key(self, config: &RedisConfig) -> &'static str {
        match self {
            TopologyError::ClusterAndSentinel => "cluster_nodes",
            TopologyError::HalfSentinel if config.sentinel_master.is_some() => "sentinel_master",
            TopologyError::HalfSentinel => "sentinel_addresses",
        }
    }
}

/// How the connection behaves on a slow or dead server.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Bound on connecting and on each reply (`None`: the crate's defaults).
    pub response: Option<Duration>,
    /// Longest wait between reconnection attempts.
    pub max_reconnect_delay: Duration,
}

impl Timeouts {
    /// The cache's: every round trip bounded by `[redis] timeout`.
    pub fn of(config: &RedisConfig) -> Timeouts {
        Timeouts {
            response: Some(config.timeout),
            max_reconnect_delay: config.retry_after,
        }
    }

    /// Background writers and the scheduler: bounded by `response`.
    pub fn relaxed(response: Duration) -> Timeouts {
        Timeouts {
            response: Some(response),
            max_reconnect_delay: Duration::from_secs(1),
        }
    }
}

/// Which topology `[redis]` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Single,
    Cluster,
    Sentinel,
}

impl Topology {
    pub fn of(config: &RedisConfig) -> Result<Topology, TopologyError> {
        let cluster = !config.cluster_nodes.is_empty();
        let sentinel = config.sentinel_master.is_some() || !config.sentinel_addresses.is_empty();
        match (cluster, sentinel) {
            (true, true) => Err(TopologyError::ClusterAndSentinel),
            (true, false) => Ok(Topology::Cluster),
            (false, true) => {
                if config.sentinel_master.is_none() || config.sentinel_addresses.is_empty() {
                    return Err(TopologyError::HalfSentinel);
                }
                Ok(Topology::Sentinel)
            }
            (false, false) => Ok(Topology::Single),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::Cluster => "cluster",
            Topology::Sentinel => "sentinel",
        }
    }
}

/// A Redis connection handle of any topology; clones share the connection.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(SentinelConn),
}

impl RedisConn {
    /// Prepares a connection for `[redis]`; connects lazily.
    pub fn open(config: &RedisConfig, timeouts: Timeouts) -> Result<RedisConn, RedisConnError> {
        let certificates = tls_certificates(config)?;
        match Topology::of(config)? {
            Topology::Single => {
                let client = match certificates {
                    Some(certificates) => {
                        redis::Client::build_with_tls(config.url.as_str(), certificates)?
                    }
                    None => redis::Client::open(config.url.as_str())?,
                };
                Ok(RedisConn::Single(manager(client, timeouts)?))
            }
            Topology::Cluster => {
                let mut builder = ClusterClientBuilder::new(config.cluster_nodes.clone())
                    .retries(1)
                    .min_retry_wait(10)
                    .max_retry_wait(
                        u64::try_from(timeouts.max_reconnect_delay.as_millis()).unwrap_or(1000),
                    );
                if let Some(certificates) = certificates {
                    builder = builder.certs(certificates);
                }
                let mut cluster_config = ClusterConfig::new();
                if let Some(t) = timeouts.response {
                    builder = builder.connection_timeout(t).response_timeout(t);
                    cluster_config = cluster_config
                        .set_connection_timeout(t)
                        .set_response_timeout(t);
                }
                let client = builder.build()?;
                Ok(RedisConn::Cluster(
                    client.get_pending_async_connection_with_config(cluster_config),
                ))
            }
            Topology::Sentinel => {
                // The master's db and password come from `url` when it names them.
                let info = config.url.as_str().into_connection_info()?;
                let node = SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info.redis_settings().clone());
                let master = config.sentinel_master.clone().unwrap_or_default();
                let client = SentinelClient::build(
                    config.sentinel_addresses.clone(),
                    master,
                    Some(node),
                    SentinelServerType::Master,
                )?;
                Ok(RedisConn::Sentinel(SentinelConn {
                    inner: Arc::new(SentinelInner {
                        client: tokio::sync::Mutex::new(client),
                        current: RwLock::new(None),
                        timeouts,
                    }),
                }))
            }
        }
    }
}

/// For `rediss://` servers: rustls with the ring provider (the redis crate
/// takes the process default), trusting `redis.ca` when set (else the
/// system's trust store, the crate's default).
fn tls_certificates(
    config: &RedisConfig,
) -> Result<Option<redis::TlsCertificates>, RedisConnError> {
    let rediss = std::iter::once(&config.url)
        .chain(&config.cluster_nodes)
        .chain(&config.sentinel_addresses)
        .any(|url| {
            url.get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
        });
    if rediss {
        // Err: a provider is installed already (by an earlier call).
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(path) = &config.ca else {
        return Ok(None);
    };
    let root_cert = std::fs::read(path).map_err(|source| RedisConnError::Ca {
        path: path.clone(),
        source,
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    }))
}

fn manager(client: redis::Client, timeouts: Timeouts) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(timeouts.response)
        .set_response_timeout(timeouts.response)
        .set_number_of_retries(1)
        .set_max_delay(timeouts.max_reconnect_delay);
    ConnectionManager::new_lazy_with_config(client, config)
}

/// The master of a Sentinel-monitored group, re-resolved after errors.
#[derive(Clone)]
pub struct SentinelConn {
    inner: Arc<SentinelInner>,
}

struct SentinelInner {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The master's connection, `None` until resolved or after an error.
    current: RwLock<Option<ConnectionManager>>,
    timeouts: Timeouts,
}

impl SentinelConn {
    async fn master(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(conn) = self.read_current() {
            return Ok(conn);
        }
        let mut client = self.inner.client.lock().await;
        // Another task may have resolved it while we waited for the lock.
        if let Some(conn) = self.read_current() {
            return Ok(conn);
        }
        let master = client.async_get_client().await?;
        let conn = manager(master, self.inner.timeouts)?;
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(conn)
    }

    fn read_current(&self) -> Option<ConnectionManager> {
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// After an error that may mean a failover, ask the sentinels again.
    fn check(&self, err: &RedisError) {
        if err.is_io_error()
            || err.is_connection_refusal()
            || err.is_connection_dropped()
            || err.is_timeout()
            || err.code() == Some("READONLY")
        {
            *self
                .inner
                .current
                .write()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
            RedisConn::Sentinel(s) => Box::pin(async move {
                let mut conn = s.master().await.inspect_err(|e| s.check(e))?;
                conn.req_packed_command(cmd)
                    .await
                    .inspect_err(|e| s.check(e))
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Sentinel(s) => Box::pin(async move {
                let mut conn = s.master().await.inspect_err(|e| s.check(e))?;
                conn.req_packed_commands(cmd, offset, count)
                    .await
                    .inspect_err(|e| s.check(e))
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
            RedisConn::Sentinel(s) => s.read_current().map_or(0, |c| c.get_db()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> RedisConfig {
        let config = crate::config::Config::parse(text, std::path::Path::new("c.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        config.redis.unwrap_or_default()
    }

    #[test]
    fn topology_follows_the_keys_given() {
        assert_eq!(Topology::of(&config("")).ok(), Some(Topology::Single));
        let cluster = config("[redis]\ncluster_nodes = [\"redis://127.0.0.1:7000\"]\n");
        assert_eq!(Topology::of(&cluster).ok(), Some(Topology::Cluster));
        let sentinel = config(
            "[redis]\nsentinel_master = \"m\"\nsentinel_addresses = [\"redis://127.0.0.1:26379\"]\n",
        );
        assert_eq!(Topology::of(&sentinel).ok(), Some(Topology::Sentinel));
        let half = config("[redis]\nsentinel_master = \"m\"\n");
        assert_eq!(Topology::of(&half), Err(TopologyError::HalfSentinel));
        assert_eq!(TopologyError::HalfSentinel.key(&half), "sentinel_master");
        let both = config(
            "[redis]\ncluster_nodes = [\"redis://a:1\"]\nsentinel_master = \"m\"\nsentinel_addresses = [\"redis://b:2\"]\n",
        );
        assert_eq!(Topology::of(&both), Err(TopologyError::ClusterAndSentinel));
    }

    #[tokio::test]
    async fn every_topology_opens_without_a_server() {
        let timeouts = Timeouts::relaxed(Duration::from_millis(100));
        for text in [
            "",
            "[redis]\ncluster_nodes = [\"redis://127.0.0.1:1\"]\n",
            "[redis]\nsentinel_master = \"m\"\nsentinel_addresses = [\"redis://127.0.0.1:1\"]\n",
        ] {
            assert!(RedisConn::open(&config(text), timeouts).is_ok(), "{text}");
        }
    }
}
