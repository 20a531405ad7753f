//! `dashcache-proxy keys add|list|revoke`: managing API keys in the control store.
//!
//! The secret of a new key is printed once, on stdout, and stored nowhere.

use std::time::Duration;

use crate::auth::keys::{KeyStore, valid_tenant};
use crate::auth::tier::Tiers;
use clap::Subcommand;
use dashcache::config::Config;
use dashcache::store::{Store, StoreError};

/// Why a `keys` command failed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("storing the key: {0}")]
    Storing(#[source] StoreError),
    #[error("unknown tier `{tier}` (configured: {})", known.join(", "))]
    UnknownTier { tier: String, known: Vec<String> },
    #[error("tenant `{0}` must be 1-64 characters of a-z, A-Z, 0-9, _ and -")]
    BadTenant(String),
    #[error("no active key `{0}`")]
    NoActiveKey(String),
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Mint a key; prints it once.
    Add {
        #[arg(long)]
        tier: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        label: Option<String>,
        /// Lifetime, e.g. 90d (default: no expiry).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by id; takes effect within `auth.reload_interval`.
    Revoke { id: String },
}

/// Key management needs the store and the tier names, not a config that
/// passes every check: keys can be minted while a query is being fixed.
pub async fn run(config: &Config, command: KeysCommand) -> Result<(), KeysError> {
    let store = Store::from_config(config).await?;
    let keys = KeyStore::new(store);
    match command {
        KeysCommand::Add {
            tier,
            tenant,
            label,
            expires,
        } => {
            let tiers = Tiers::new(config);
            if tiers.get(&tier).is_none() {
                let known = tiers.names().map(str::to_owned).collect();
                return Err(KeysError::UnknownTier { tier, known });
            }
            if !valid_tenant(&tenant) {
                return Err(KeysError::BadTenant(tenant));
            }
            let (key, secret) = keys
                .add(&tier, &tenant, label.as_deref(), expires)
                .await
                .map_err(KeysError::Storing)?;
            eprintln!(
                "created {} (tier {tier}, tenant {tenant}); the key is shown once:",
                key.id
            );
            println!("{secret}");
        }
        KeysCommand::List => {
            println!(
                "{:<16} {:<12} {:<16} {:<20} {:<20} {:<20} label",
                "id", "tier", "tenant", "created", "expires", "revoked"
            );
            for key in keys.list().await? {
                let time = |ms: Option<i64>| {
                    ms.map_or("-".to_string(), |ms| dashcache::timeexpr::format(ms / 1000))
                };
                println!(
                    "{:<16} {:<12} {:<16} {:<20} {:<20} {:<20} {}",
                    key.id,
                    key.tier,
                    key.tenant,
                    time(Some(key.created_ms)),
                    time(key.expires_ms),
                    time(key.revoked_ms),
                    key.label.as_deref().unwrap_or("")
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if !keys.revoke(&id).await? {
                return Err(KeysError::NoActiveKey(id));
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
