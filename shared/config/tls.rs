//! The TLS settings of one listener (`[proxy.tls]`), as written.
//!
//! Only their shape and where their files are: paths relative to the config
//! file are made absolute against its directory when the file is read.
//! Reading the PEM files, building the rustls config and reloading it belong
//! to [`crate::tls`]; whether the files are usable is checked by
//! [`crate::check`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// TLS on a listener: its certificate chain and private key (PEM files,
/// reloaded when they change or on SIGHUP), and optionally the CA bundle
/// client certificates must chain to (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// The certificate chain, leaf first (PEM), e.g. certbot's `fullchain.pem`.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, every client must present a certificate issued by one of
    /// these CAs (PEM bundle); the handshake of one without fails.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How long a client may take to finish the handshake.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

impl ListenerTls {
    /// Makes relative paths absolute against `base` (the config file's directory).
    pub fn resolve_against(&mut self, base: &Path) {
        for path in [&mut self.cert, &mut self.key]
            .into_iter()
            .chain(self.client_ca.as_mut())
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    /// The files whose change reloads the listener's TLS config.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()]
            .into_iter()
            .chain(self.client_ca.as_deref())
    }
}
