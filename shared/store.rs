//! The control store: dashcache's own small relational state, through sqlx.
//!
//! SQLite file by default (`sqlite:///var/lib/dashcache/control.db`), PostgreSQL
//! when several hosts share it (`postgres://…`): one code path over sqlx's `Any`
//! driver, portable SQL with `$n` placeholders. Migrations live in
//! `sql/store/` and run at connect. What is stored (run history, API keys) is
//! owned by the modules that use the pool; this one only connects.

use std::str::FromStr;

use crate::config::Config;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("control store {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("control store {url}: cannot create the directory {dir}: {source}")]
    Directory {
        url: String,
        dir: String,
        source: std::io::Error,
    },
    #[error(
        "{source} (store.url in {}: point it at a writable location, or a postgres:// URL)",
        file.display()
    )]
    Configured {
        file: std::path::PathBuf,
        source: Box<StoreError>,
    },
    #[error("control store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("control store: {0}")]
    Query(#[from] sqlx::Error),
}

/// A connected, migrated control store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// Connects the store `config` names; an error names the file and setting.
    pub async fn from_config(config: &Config) -> Result<Store, StoreError> {
        Store::connect(&config.store.url)
            .await
            .map_err(|source| StoreError::Configured {
                file: config.path.clone(),
                source: Box::new(source),
            })
    }

    /// Connects to `url` (creating a SQLite file if missing) and migrates it.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let connect_err = |source| StoreError::Connect {
            url: redact(url),
            source,
        };
        let pool = if url.starts_with("sqlite:") {
            if let Some(dir) = sqlite_dir(url) {
                std::fs::create_dir_all(&dir).map_err(|source| StoreError::Directory {
                    url: redact(url),
                    dir: dir.display().to_string(),
                    source,
                })?;
            }
            // The Any driver cannot pass SQLite options: build a SQLite pool
            // first so the file is created (WAL), then reopen it through Any.
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .map_err(connect_err)?
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            sqlx::SqlitePool::connect_with(options)
                .await
                .map_err(connect_err)?
                .close()
                .await;
            AnyPoolOptions::new().max_connections(4).connect(url).await
        } else {
            AnyPoolOptions::new().max_connections(8).connect(url).await
        }
        .map_err(connect_err)?;
        // Several processes may start on a new store at once; the losers of
        // the race see the winner's migrations on a retry.
        let mut attempt = 0;
        loop {
            match sqlx::migrate!("sql/store").run(&pool).await {
                Ok(()) => break,
                Err(err) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(error = %err, attempt, "control store migration raced; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100 * attempt)).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(Store { pool })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// The directory of a SQLite URL's file, if it names one.
fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let file = rest.split('?').next().unwrap_or(rest);
    if file.is_empty() || file.starts_with(':') {
        return None;
    }
    std::path::Path::new(file)
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.to_owned())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
    }

    #[tokio::test]
    async fn sqlite_file_is_created_and_migrated_twice_without_harm() {
        let dir = std::env::temp_dir().join(format!("dashcache-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/control.db", dir.display());
        let store = Store::connect(&url).await.unwrap();
        sqlx::query("INSERT INTO api_keys (id, key_hash, tier, tenant, created_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind("k1")
            .bind("h")
            .bind("free")
            .bind("acme")
            .bind(1_i64)
            .execute(store.pool())
            .await
            .unwrap();
        drop(store);
        let again = Store::connect(&url).await.unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM api_keys")
            .fetch_one(again.pool())
            .await
            .unwrap();
        assert_eq!(n, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
