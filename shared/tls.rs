//! TLS for the proxy's listeners: PEM files in, a reloadable rustls config out.
//!
//! Owns reading a listener's certificate chain, private key and client CA
//! bundle ([`crate::config::ListenerTls`]) into a rustls server config (ring
//! provider, TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, client certificates
//! verified against `client_ca` when it is set), the [`TlsError`] naming the
//! setting and file at fault (the config check reports it as a diagnostic),
//! and [`ServerTls`]: the config a listener hands to new handshakes, swapped
//! whole by [`ServerTls::reload`] (on SIGHUP, or when [`ServerTls::watch`]
//! sees the files' directory change). A reload that fails keeps the current
//! config and says why; established connections keep the certificate they
//! were made with either way.
//!
//! It also makes the client config for upstreams reached over `https://`
//! ([`client_config`]: the `ca` bundle, or the built-in Mozilla roots;
//! [`clickhouse_client_config`]: ClickHouse's, for every client that reaches it;
//! [`clickhouse_connector`]: those clients' connector).
//!
//! It does not accept connections or run handshakes: the proxy's server does,
//! with [`ServerTls::acceptor`] on each connection's own task.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use std::{fmt, io};

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerTls;

/// Which file of a listener's TLS settings a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
    /// The CA bundle a client trusts (`[clickhouse] ca`).
    Ca,
}

impl TlsFile {
    /// The setting that names the file (`cert`, `key`, `client_ca`).
    pub const fn setting(self) -> &'static str {
        match self {
            TlsFile::Cert => "cert",
            TlsFile::Key => "key",
            TlsFile::ClientCa => "client_ca",
            TlsFile::Ca => "ca",
        }
    }
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFile::Cert => "certificate chain",
            TlsFile::Key => "private key",
            TlsFile::ClientCa => "client CA bundle",
            TlsFile::Ca => "CA bundle",
        })
    }
}

/// Why a listener's TLS config could not be made (or remade).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}: cannot read: {source}", path.display())]
    Read {
        what: TlsFile,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        what: TlsFile,
        path: PathBuf,
        reason: String,
    },
    #[error("watching {} for certificate changes: {source}", dir.display())]
    Watch { dir: PathBuf, source: notify::Error },
}

impl TlsError {
    /// The file the problem is about (none for a watch that could not start).
    pub fn file(&self) -> Option<TlsFile> {
        match self {
            TlsError::Read { what, .. } | TlsError::Invalid { what, .. } => Some(*what),
            TlsError::Watch { .. } => None,
        }
    }
}

/// The files of one listener as read, so that a reload can tell whether they changed.
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(settings: &ListenerTls) -> Result<Files, TlsError> {
    let read = |what: TlsFile, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    Ok(Files {
        cert: read(TlsFile::Cert, &settings.cert)?,
        key: read(TlsFile::Key, &settings.key)?,
        client_ca: settings
            .client_ca
            .as_deref()
            .map(|path| read(TlsFile::ClientCa, path))
            .transpose()?,
    })
}

/// Every certificate of a PEM file (at least one).
fn certificates(
    what: TlsFile,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("not PEM: {err}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "no `BEGIN CERTIFICATE` block (expected a PEM certificate)".into(),
        ));
    }
    Ok(certs)
}

/// The rustls server config of `files`: fails if any file is not what its
/// setting says, or the key is not the leaf certificate's.
fn build(settings: &ListenerTls, files: &Files) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(TlsFile::Cert, &settings.cert, &files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|err| TlsError::Invalid {
        what: TlsFile::Key,
        path: settings.key.clone(),
        reason: match err {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no private key block (expected PEM PKCS#8, PKCS#1 or SEC1)".into()
            }
            err => format!("not PEM: {err}"),
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError::Invalid {
            what: TlsFile::Cert,
            path: settings.cert.clone(),
            reason: err.to_string(),
        })?;
    let builder = match (&settings.client_ca, &files.client_ca) {
        (Some(path), Some(pem)) => {
            let invalid = |reason: String| TlsError::Invalid {
                what: TlsFile::ClientCa,
                path: path.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for cert in certificates(TlsFile::ClientCa, path, pem)? {
                roots
                    .add(cert)
                    .map_err(|err| invalid(format!("not a usable CA certificate: {err}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| invalid(err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| TlsError::Invalid {
            what: TlsFile::Key,
            path: settings.key.clone(),
            reason: format!(
                "does not go with the certificate {}: {err}",
                settings.cert.display()
            ),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client's CA bundle (`[clickhouse] ca`, `[redis] ca`): PEM, at least
/// one certificate (blocking read).
pub fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what: TlsFile::Ca,
        path: path.to_owned(),
        source,
    })?;
    certificates(TlsFile::Ca, path, &pem)
}

/// The TLS config of a client (ClickHouse over `https://`): trusts the CAs
/// of the PEM bundle `ca`, or the Mozilla roots built in; TLS 1.2 and 1.3;
/// `http/1.1` by ALPN. Reads `ca` (blocking: at start-up and reload, like
/// the config file itself).
pub fn client_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_ca(path)? {
                roots.add(cert).map_err(|err| TlsError::Invalid {
                    what: TlsFile::Ca,
                    path: path.to_owned(),
                    reason: format!("not a usable CA certificate: {err}"),
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| TlsError::Invalid {
        what: TlsFile::Ca,
        path: ca.map(Path::to_owned).unwrap_or_default(),
        reason: err.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(config)
}

/// The client config for ClickHouse servers over `https://`
/// (`clickhouse.ca`), shared by the named API's clients and the
/// ClickHouse-compatible endpoint's. The config check has read the file
/// already, so a failure here means it went away since: logged, and a
/// config that trusts no server is returned (those servers fail their
/// handshakes until a restart) rather than one that trusts more than asked.
pub fn clickhouse_client_config(config: &crate::config::ClickHouseConfig) -> rustls::ClientConfig {
    client_config(config.ca.as_deref()).unwrap_or_else(|err| {
        tracing::error!(error = %err, "clickhouse.ca: trusting no server certificate");
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
    })
}

/// The connector of every HTTP client that reaches ClickHouse: `https://`
/// over `tls`, `http://` as it is, HTTP/1.1; `http`'s socket options are the
/// caller's.
pub fn clickhouse_connector(
    tls: rustls::ClientConfig,
    mut http: hyper_util::client::legacy::connect::HttpConnector,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Reads and checks a listener's TLS files (blocking: for the config check
/// and start-up, before serving).
pub fn check(settings: &ListenerTls) -> Result<(), TlsError> {
    build(settings, &read(settings)?).map(drop)
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// A change in the files' directories.
    FileChange,
}

impl Trigger {
    pub const fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// New handshakes use the new files.
    Changed,
    /// The files are as they were.
    Unchanged,
    /// The new files are unusable: the current config stays (logged).
    Kept,
}

/// A listener's TLS: the config new handshakes get, and how to renew it.
pub struct ServerTls {
    settings: ListenerTls,
    /// The listener's name in log lines (`proxy`).
    name: &'static str,
    current: RwLock<(Arc<Files>, Arc<ServerConfig>)>,
    /// One reload at a time.
    reloading: Mutex<()>,
}

impl ServerTls {
    /// Reads the files and builds the config (or says which file is at fault).
    pub async fn load(name: &'static str, settings: &ListenerTls) -> Result<Arc<Self>, TlsError> {
        let settings = settings.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let files = read(&settings)?;
            let config = build(&settings, &files)?;
            Ok((settings, files, config))
        })
        .await
        .map_err(|err| TlsError::Read {
            what: TlsFile::Cert,
            path: PathBuf::new(),
            source: io::Error::other(err),
        })?;
        let (settings, files, config) = loaded?;
        Ok(Arc::new(ServerTls {
            settings,
            name,
            current: RwLock::new((Arc::new(files), config)),
            reloading: Mutex::new(()),
        }))
    }

    /// The acceptor for one new connection: the config as of now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        TlsAcceptor::from(current.1.clone())
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.settings.handshake_timeout
    }

    /// Reads the files again; if they changed and are usable, new handshakes
    /// use them. Unusable files keep the current config. Logs the outcome
    /// (files found unchanged after a directory change only at debug level:
    /// other files there change too).
    pub async fn reload(self: &Arc<Self>, why: Trigger) -> Reloaded {
        let this = self.clone();
        let outcome = tokio::task::spawn_blocking(move || this.reload_blocking(why)).await;
        outcome.unwrap_or(Reloaded::Kept)
    }

    fn reload_blocking(&self, trigger: Trigger) -> Reloaded {
        let why = trigger.as_str();
        let _one = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let cert = self.settings.cert.display();
        let outcome = read(&self.settings).and_then(|files| {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            if *current.0 == files {
                return Ok(None);
            }
            drop(current);
            let config = build(&self.settings, &files)?;
            Ok(Some((files, config)))
        });
        match outcome {
            Ok(None) => {
                if trigger == Trigger::Signal {
                    tracing::info!(listener = self.name, %cert, why, "TLS certificate files unchanged");
                } else {
                    tracing::debug!(listener = self.name, %cert, why, "TLS certificate files unchanged");
                }
                Reloaded::Unchanged
            }
            Ok(Some((files, config))) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    (Arc::new(files), config);
                tracing::info!(
                    listener = self.name,
                    %cert,
                    why,
                    "TLS certificate reloaded: new connections use it"
                );
                Reloaded::Changed
            }
            Err(err) => {
                tracing::warn!(
                    listener = self.name,
                    error = %err,
                    why,
                    "TLS certificate not reloaded: keeping the current one"
                );
                Reloaded::Kept
            }
        }
    }

    /// Reloads when anything changes in the directories of the files
    /// (certbot and Kubernetes replace symlinks, editors rename: a watch on
    /// the files themselves would miss those). Stops when the returned
    /// watcher is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<notify::RecommendedWatcher, TlsError> {
        use notify::Watcher as _;
        let mut dirs: Vec<PathBuf> = self
            .settings
            .files()
            .map(|file| match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        // The files' own names, and the `..data`-style entries Kubernetes
        // swaps to replace a mounted secret at once.
        let names: Vec<std::ffi::OsString> = self
            .settings
            .files()
            .filter_map(|file| file.file_name().map(|name| name.to_owned()))
            .collect();
        let concerns = move |path: &Path| {
            path.file_name().is_some_and(|name| {
                names.iter().any(|n| n == name) || name.as_encoded_bytes().starts_with(b"..")
            })
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event
                    && !event.kind.is_access()
                    && event.paths.iter().any(|path| concerns(path))
                {
                    let _ = tx.send(());
                }
            })
            .map_err(|source| TlsError::Watch {
                dir: dirs[0].clone(),
                source,
            })?;
        for dir in &dirs {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .map_err(|source| TlsError::Watch {
                    dir: dir.clone(),
                    source,
                })?;
        }
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // A renewal is several events (both files, renames): settle first.
                tokio::time::sleep(Duration::from_millis(300)).await;
                while rx.try_recv().is_ok() {}
                let Some(this) = this.upgrade() else { return };
                this.reload(Trigger::FileChange).await;
            }
        });
        Ok(watcher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            let dir = std::env::temp_dir().join(format!(
                "dashcache-tls-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn settings(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> ListenerTls {
        ListenerTls {
            cert,
            key,
            client_ca,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    fn self_signed() -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        (made.cert.pem(), made.signing_key.serialize_pem())
    }

    #[test]
    fn a_matching_chain_and_key_build_a_config_offering_h2_and_http1() {
        let dir = Dir::new();
        let (cert, key) = self_signed();
        let settings = settings(dir.write("c.pem", &cert), dir.write("k.pem", &key), None);
        check(&settings).unwrap();
        let config = build(&settings, &read(&settings).unwrap()).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn each_unusable_file_is_named_with_its_setting() {
        let dir = Dir::new();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let good_cert = dir.write("c.pem", &cert);
        let good_key = dir.write("k.pem", &key);
        let cases = [
            (
                settings(dir.0.join("missing.pem"), good_key.clone(), None),
                TlsFile::Cert,
                "cannot read",
            ),
            (
                settings(dir.write("empty.pem", ""), good_key.clone(), None),
                TlsFile::Cert,
                "no `BEGIN CERTIFICATE` block",
            ),
            (
                settings(good_cert.clone(), dir.write("nokey.pem", &cert), None),
                TlsFile::Key,
                "no private key block",
            ),
            (
                settings(good_cert.clone(), dir.write("other.pem", &other_key), None),
                TlsFile::Key,
                "does not go with the certificate",
            ),
            (
                settings(
                    good_cert.clone(),
                    good_key.clone(),
                    Some(dir.write("ca.pem", "garbage")),
                ),
                TlsFile::ClientCa,
                "no `BEGIN CERTIFICATE` block",
            ),
        ];
        for (settings, file, reason) in cases {
            let err = check(&settings).unwrap_err();
            assert_eq!(err.file(), Some(file), "{err}");
            assert!(err.to_string().contains(reason), "{err}");
        }
    }

    #[tokio::test]
    async fn a_reload_takes_new_files_and_keeps_the_config_when_they_are_bad() {
        let dir = Dir::new();
        let (cert, key) = self_signed();
        let settings = settings(dir.write("c.pem", &cert), dir.write("k.pem", &key), None);
        let tls = ServerTls::load("test", &settings).await.unwrap();
        let first = tls.acceptor().config().clone();
        assert_eq!(tls.reload(Trigger::Signal).await, Reloaded::Unchanged);
        dir.write("c.pem", "garbage");
        assert_eq!(tls.reload(Trigger::Signal).await, Reloaded::Kept);
        assert!(Arc::ptr_eq(tls.acceptor().config(), &first));
        let (cert, key) = self_signed();
        dir.write("c.pem", &cert);
        dir.write("k.pem", &key);
        assert_eq!(tls.reload(Trigger::FileChange).await, Reloaded::Changed);
        assert!(!Arc::ptr_eq(tls.acceptor().config(), &first));
    }
}
