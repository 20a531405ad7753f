//! API keys: minting, storing (hashed) and recognising them.
//!
//! A key is `dck_` + 48 hex digits of CSPRNG output, shown once when minted.
//! The control store keeps only its SHA-256 (`api_keys.key_hash`) with the
//! key's tier, tenant, label, expiry and revocation. [`KeyStore`] is the
//! store side (used by `dashcache-proxy keys …`); [`KeyRing`] is the proxy's
//! in-memory index, reloaded every few seconds so new, revoked and expired
//! keys take effect without a restart. A presented key is hashed and looked
//! up by its hash: nothing compares secret bytes, so lookups leak no timing
//! about stored keys. What a tier allows is [`crate::auth::tier`]'s business.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use dashcache::clock;
use dashcache::store::{Store, StoreError};

/// Every key starts with this, so leaked keys are easy to recognise and scan for.
pub const PREFIX: &str = "dck_";

/// A key as stored: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    pub tier: String,
    pub tenant: String,
    pub label: Option<String>,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
}

/// Why a request's key was not accepted (all answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")]
    Missing,
    #[error("unknown API key")]
    Unknown,
    #[error("API key expired")]
    Expired,
    #[error("API key revoked")]
    Revoked,
}

type KeyHash = [u8; 32];

fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// Tenants are names, not free text: they end up in cache keys and SQL.
pub fn valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The control store's `api_keys` table.
#[derive(Clone, Debug)]
pub struct KeyStore {
    store: Store,
}

/// One `api_keys` row: `key_hash`, then the fields of an [`ApiKey`].
type StoredRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
    Option<i64>,
);

impl KeyStore {
    pub fn new(store: Store) -> KeyStore {
        KeyStore { store }
    }

    /// Mints a key; returns it with the secret, which is not kept anywhere.
    pub async fn add(
        &self,
        tier: &str,
        tenant: &str,
        label: Option<&str>,
        expires_in: Option<Duration>,
    ) -> Result<(ApiKey, String), StoreError> {
        let secret = format!("{PREFIX}{}", hex::encode(rand::random::<[u8; 24]>()));
        let now = chrono::Utc::now().timestamp_millis();
        let key = ApiKey {
            id: format!("key_{}", hex::encode(rand::random::<[u8; 6]>())),
            tier: tier.to_owned(),
            tenant: tenant.to_owned(),
            label: label.map(str::to_owned),
            created_ms: now,
            expires_ms: expires_in
                .map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
            revoked_ms: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, key_hash, tier, tenant, label, created_ms, expires_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.id)
        .bind(hex::encode(hash(&secret)))
        .bind(&key.tier)
        .bind(&key.tenant)
        .bind(key.label.clone())
        .bind(key.created_ms)
        .bind(key.expires_ms)
        .execute(self.store.pool())
        .await?;
        Ok((key, secret))
    }

    /// Every key, oldest first.
    pub async fn list(&self) -> Result<Vec<ApiKey>, StoreError> {
        Ok(self.rows().await?.into_iter().map(|(_, key)| key).collect())
    }

    /// Revokes a key by id; false if there is no such (unrevoked) key.
    pub async fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        let done =
            sqlx::query("UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
                .bind(now)
                .bind(id)
                .execute(self.store.pool())
                .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn rows(&self) -> Result<Vec<(KeyHash, ApiKey)>, StoreError> {
        let rows: Vec<StoredRow> = sqlx::query_as(
            "SELECT key_hash, id, tier, tenant, label, created_ms, expires_ms, revoked_ms \
                 FROM api_keys ORDER BY created_ms, id",
        )
        .fetch_all(self.store.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(
                |(key_hash, id, tier, tenant, label, created_ms, expires_ms, revoked_ms)| {
                    let mut digest = [0u8; 32];
                    hex::decode_to_slice(&key_hash, &mut digest).ok()?;
                    let key = ApiKey {
                        id,
                        tier,
                        tenant,
                        label,
                        created_ms,
                        expires_ms,
                        revoked_ms,
                    };
                    Some((digest, key))
                },
            )
            .collect())
    }
}

/// The proxy's in-memory view of every key, by hash.
#[derive(Default)]
pub struct KeyRing {
    keys: RwLock<Arc<HashMap<KeyHash, Arc<ApiKey>>>>,
    /// Reloads started so far; every reload holds `reloading`.
    started: AtomicU64,
    reloading: tokio::sync::Mutex<()>,
    /// When the last reload caused by an unknown key ran (Unix ms).
    on_demand_ms: AtomicI64,
}

/// The shortest time between two reloads caused by unknown keys, so a flood
/// of made-up keys costs the store at most ten reads a second.
const ON_DEMAND_RELOAD_MS: i64 = 100;

impl KeyRing {
    /// Like [`KeyRing::check`], but an unknown key first makes sure the ring
    /// has read the store since the request arrived, so a key minted a moment
    /// ago works at once instead of after the next periodic reload.
    /// Concurrent requests share one reload.
    pub async fn check_or_reload(
        &self,
        presented: Option<&str>,
        now_ms: i64,
        store: &KeyStore,
    ) -> Result<Arc<ApiKey>, KeyError> {
        match self.check(presented, now_ms) {
            Err(KeyError::Unknown) => {
                let arrived = self.started.load(Ordering::Acquire);
                let _one = self.reloading.lock().await;
                // A reload that started after we arrived has finished by now
                // (reloads hold the lock) and saw every key minted before.
                if self.started.load(Ordering::Acquire) == arrived {
                    // None has: run one, but no sooner than ON_DEMAND_RELOAD_MS
                    // after the last on-demand one. The wait is bounded, and
                    // everyone queued behind it is answered by that one reload,
                    // so a flood of made-up keys costs the store at most ten
                    // reads a second and never refuses a key minted a moment ago.
                    let last = self.on_demand_ms.load(Ordering::Relaxed);
                    let wait = last + ON_DEMAND_RELOAD_MS - clock::now_ms();
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
                    }
                    self.on_demand_ms.store(clock::now_ms(), Ordering::Relaxed);
                    if let Err(err) = self.reload_locked(store).await {
                        tracing::warn!(error = %err, "cannot reload API keys");
                    }
                }
                self.check(presented, now_ms)
            }
            other => other,
        }
    }

    /// The key a request presented, if it is valid at `now_ms`.
    pub fn check(&self, presented: Option<&str>, now_ms: i64) -> Result<Arc<ApiKey>, KeyError> {
        let presented = presented.ok_or(KeyError::Missing)?;
        let keys = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let key = keys.get(&hash(presented)).ok_or(KeyError::Unknown)?;
        if key.revoked_ms.is_some() {
            return Err(KeyError::Revoked);
        }
        if key.expires_ms.is_some_and(|at| now_ms >= at) {
            return Err(KeyError::Expired);
        }
        Ok(key.clone())
    }

    /// Keys valid at `now_ms` (not revoked, not expired), per tier (for `/status`).
    pub fn per_tier(&self, now_ms: i64) -> BTreeMap<String, usize> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut tiers = BTreeMap::new();
        for key in keys.values() {
            if key.revoked_ms.is_none() && key.expires_ms.is_none_or(|at| now_ms < at) {
                *tiers.entry(key.tier.clone()).or_insert(0) += 1;
            }
        }
        tiers
    }

    /// Re-reads every key from the store.
    pub async fn reload(&self, store: &KeyStore) -> Result<usize, StoreError> {
        let _one = self.reloading.lock().await;
        self.reload_locked(store).await
    }

    async fn reload_locked(&self, store: &KeyStore) -> Result<usize, StoreError> {
        self.started.fetch_add(1, Ordering::AcqRel);
        let rows = store.rows().await?;
        let count = rows.len();
        let keys = rows.into_iter().map(|(h, k)| (h, Arc::new(k))).collect();
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(count)
    }

    /// Reloads every `interval` until the process ends; failures keep the
    /// last good set and are logged.
    pub fn spawn_reloads(self: &Arc<Self>, store: KeyStore, interval: Duration) {
        let ring = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                every.tick().await;
                match ring.reload(&store).await {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("API keys reloaded again");
                    }
                    Ok(_) => {}
                    Err(err) if !failing => {
                        failing = true;
                        tracing::warn!(error = %err, "cannot reload API keys; keeping the last set");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_stored_hashed_and_checked_by_hash() {
        let dir = std::env::temp_dir().join(format!("dashcache-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&format!("sqlite://{}/c.db", dir.display()))
            .await
            .unwrap();
        let keys = KeyStore::new(store.clone());
        let (key, secret) = keys.add("pro", "acme", Some("dash"), None).await.unwrap();
        assert!(secret.starts_with(PREFIX) && secret.len() == PREFIX.len() + 48);
        let (expired, expired_secret) = keys
            .add("pro", "acme", None, Some(Duration::ZERO))
            .await
            .unwrap();

        let stored: Vec<(String,)> = sqlx::query_as("SELECT key_hash FROM api_keys")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert!(
            stored
                .iter()
                .all(|(h,)| !h.contains(&secret[PREFIX.len()..]) && h.len() == 64)
        );

        let ring = KeyRing::default();
        ring.reload(&keys).await.unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        assert_eq!(ring.check(Some(&secret), now).unwrap().id, key.id);
        assert_eq!(ring.check(None, now), Err(KeyError::Missing));
        assert_eq!(ring.check(Some("dck_nope"), now), Err(KeyError::Unknown));
        assert_eq!(
            ring.check(Some(&expired_secret), now),
            Err(KeyError::Expired)
        );
        assert!(keys.revoke(&key.id).await.unwrap());
        assert!(!keys.revoke(&key.id).await.unwrap());
        ring.reload(&keys).await.unwrap();
        assert_eq!(ring.check(Some(&secret), now), Err(KeyError::Revoked));
        let listed = keys.list().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().any(|k| k.id == expired.id));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tenants_are_names() {
        assert!(valid_tenant("acme"));
        assert!(valid_tenant("globex-eu_2"));
        assert!(!valid_tenant(""));
        assert!(!valid_tenant("a'b"));
        assert!(!valid_tenant(&"a".repeat(65)));
    }
}
