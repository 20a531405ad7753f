//! The HTTP server: accept loop, connections, TLS, graceful shutdown.
//!
//! HTTP/1.1 and HTTP/2 (hyper-util's auto builder), over plain TCP or TLS:
//! TLS is a property of a [`Listener`] (its [`ServerTls`]), so every listener
//! served here gets it the same way. The TLS handshake runs on the
//! connection's own task, bounded by the listener's `handshake_timeout`, never
//! in the accept loop; ALPN picks HTTP/2 or HTTP/1.1. SIGHUP reloads the
//! listeners' certificates (so does a change of their files); the rest of the
//! config is read at start. On SIGTERM or Ctrl-C it stops accepting, lets
//! in-flight requests and streams finish for up to `proxy.shutdown_grace`,
//! then returns. The socket has `SO_REUSEPORT`, so a new process can take
//! over the port before the old one stops.
//! With `[clickhouse_http] enabled`, a second listener serves the
//! ClickHouse-compatible endpoint (`crate::chhttp`) the same way (with the same
//! TLS), stopped by the same signal.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use crate::reply::Body;
use dashcache::tls::{ServerTls, TlsError, Trigger};

use crate::routes;
use crate::state::App;

/// The listening socket could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Why the proxy could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The listener's certificate or key could not be loaded or watched.
    #[error("[proxy.tls]: {0}")]
    Tls(#[from] TlsError),
}

/// A listening socket and how its connections are secured.
pub struct Listener {
    pub tcp: TcpListener,
    /// `None`: plain HTTP.
    pub tls: Option<Arc<ServerTls>>,
}

impl Listener {
    /// HTTPS: every connection is a TLS handshake first.
    pub fn tls(tcp: TcpListener, tls: Arc<ServerTls>) -> Listener {
        Listener {
            tcp,
            tls: Some(tls),
        }
    }
}

impl From<TcpListener> for Listener {
    /// Plain HTTP.
    fn from(tcp: TcpListener) -> Listener {
        Listener { tcp, tls: None }
    }
}

/// Binds the configured (or given) address and serves until SIGTERM/Ctrl-C.
pub async fn run(app: Arc<App>, listen: Option<SocketAddr>) -> Result<(), ServeError> {
    let addr = listen.unwrap_or(app.config.proxy.listen);
    let tls = match &app.config.proxy.tls {
        Some(settings) => Some(ServerTls::load("proxy", settings).await?),
        None => None,
    };
    // Kept for as long as the server runs: dropping a watcher stops it.
    let _watchers = tls
        .iter()
        .map(|tls| tls.watch())
        .collect::<Result<Vec<_>, _>>()?;
    let listener = bind(addr)
        .and_then(|listener| Ok((listener.local_addr()?, listener)))
        .map_err(|source| ListenError { addr, source });
    let (local, listener) = listener?;
    let clickhouse = if app.config.clickhouse_http.enabled {
        let addr = app.config.clickhouse_http.listen;
        let listener = bind(addr)
            .and_then(|listener| Ok((listener.local_addr()?, listener)))
            .map_err(|source| ListenError { addr, source })?;
        tracing::info!(addr = %listener.0, "ClickHouse-compatible endpoint listening");
        Some(listener.1)
    } else {
        None
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %local, scheme, queries = app.catalog.iter().count(), "dashcache-proxy listening");
    // Signal handlers first: a SIGTERM or SIGHUP sent right after READY=1 must
    // find them installed (SIGHUP's default action would end the process).
    reload_tls_on_sighup(tls.iter().cloned().collect());
    let shutdown = shutdown_signal();
    // systemd (Type=notify): config, keys and listener are ready; no-op outside systemd.
    let over = if tls.is_some() { " (TLS)" } else { "" };
    dashcache::service::ready(&format!("listening on {local}{over}"));
    // Every listener gets the same TLS (or none).
    let secured = |tcp: TcpListener| match &tls {
        Some(tls) => Listener::tls(tcp, tls.clone()),
        None => Listener::from(tcp),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let clickhouse = clickhouse.map(|tcp| {
        let listener = secured(tcp);
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let graceful = accept_until(
                listener,
                &app,
                stop.cancelled_owned(),
                crate::chhttp::handle,
            )
            .await;
            drain(&app, graceful).await;
        })
    });
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal.cancel();
    });
    serve(secured(listener), app, stop.cancelled_owned()).await;
    if let Some(clickhouse) = clickhouse {
        let _ = clickhouse.await;
    }
    Ok(())
}

/// Serves `listener` until `shutdown` completes, then drains in-flight
/// requests for up to `proxy.shutdown_grace` (mini-redis's
/// `server::run(listener, shutdown)`): the caller owns the socket and the
/// signal, so a test can serve on its own listener and stop it at will.
/// A plain `TcpListener` serves HTTP; a [`Listener::tls`] serves HTTPS.
pub async fn serve(
    listener: impl Into<Listener>,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) {
    crate::route::Route::zero_series(&app.metrics);
    let graceful = accept_until(listener.into(), &app, shutdown, routes::handle).await;
    dashcache::service::stopping();
    drain(&app, graceful).await;
    if let Err(err) = app.popularity.flush().await {
        tracing::warn!(error = %err, "could not flush request counts at shutdown");
    }
}

/// The accept loop of [`serve`] until `shutdown`, with `handler` answering
/// every request (the API's routes, or the ClickHouse-compatible
/// endpoint's); the connections it opened, to [`drain`].
pub async fn accept_until<H, F>(
    listener: Listener,
    app: &Arc<App>,
    shutdown: impl Future<Output = ()>,
    handler: H,
) -> GracefulShutdown
where
    H: Fn(Arc<App>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let Listener { tcp: listener, tls } = listener;
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(err) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service_app = app.clone();
                let service = service_fn(move |req| handler(service_app.clone(), req));
                let open = app.metrics.open_connections.clone();
                open.inc();
                let Some(tls) = &tls else {
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                        open.dec();
                    });
                    continue;
                };
                // The handshake on the connection's own task: a slow or silent
                // client holds up no one else.
                let (acceptor, timeout) = (tls.acceptor(), tls.handshake_timeout());
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let conn = builder.serve_connection(TokioIo::new(stream), service);
                            let _ = watcher.watch(conn.into_owned()).await;
                        }
                        // Scanners, clients that do not trust the certificate,
                        // clients without a required certificate: theirs to report.
                        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, ?timeout, "TLS handshake timed out"),
                    }
                    open.dec();
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    graceful
}

/// Lets `graceful`'s connections finish for up to `proxy.shutdown_grace`.
pub async fn drain(app: &App, graceful: GracefulShutdown) {
    let grace = app.config.proxy.shutdown_grace;
    tracing::info!(?grace, "shutting down: finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("shutdown grace elapsed; closing remaining connections"),
    }
}

/// The listening socket, with `SO_REUSEPORT`: a new process can bind the same
/// port while the old one drains, so restarts lose no connection.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// SIGHUP reloads the listeners' TLS certificates (certbot's deploy hook
/// sends it); the rest of the config is read at start, which it says
/// (restart to apply a config change). Installed before serving: SIGHUP would
/// end the process by default.
fn reload_tls_on_sighup(listeners: Vec<Arc<ServerTls>>) {
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // Each reload logs what it did.
                for tls in &listeners {
                    tls.reload(Trigger::Signal).await;
                }
                tracing::warn!(
                    tls_listeners = listeners.len(),
                    "SIGHUP: only TLS certificates are reloaded; dashcache-proxy reads the rest of its config at start: restart it to apply other changes"
                );
            }
        });
    }
}

/// Resolves on SIGTERM or Ctrl-C. The SIGTERM handler is installed when this
/// is called, not when the future is first polled.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}
