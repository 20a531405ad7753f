//! Talks to the service manager: systemd's `sd_notify` protocol.
//!
//! Owns the few messages a long-running binary sends about itself: `READY=1`
//! once it serves (and, from then on, `WATCHDOG=1` pings at half the
//! `WatchdogSec=` interval when systemd asked for them through
//! `WATCHDOG_USEC`), `RELOADING=1` … `READY=1` around a configuration reload,
//! and `STOPPING=1` when it begins to shut down. Outside systemd (no
//! `NOTIFY_SOCKET` in the environment) every call is a no-op, so the binaries
//! call these unconditionally.
//!
//! It does not decide *when* a binary is ready: the proxy calls [`ready`]
//! right after its listener is bound, the scheduler after its schedule is
//! installed. A failed notification is logged, never fatal: the service
//! manager's own timeouts handle a process that cannot reach it.

use std::time::Duration;

use sd_notify::NotifyState;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot send {what} to the service manager: {source}")]
    Send {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Whether a service manager listens for notifications (`NOTIFY_SOCKET` set).
pub fn supervised() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The watchdog interval systemd expects pings within (`WATCHDOG_USEC`, for
/// this process), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|interval| !interval.is_zero())
}

/// How often to ping: half the interval, as `sd_watchdog_enabled(3)` advises.
pub fn ping_period(interval: Duration) -> Duration {
    (interval / 2).max(Duration::from_millis(1))
}

/// Tells the service manager the process serves: sends `READY=1` with a
/// status line and, when a watchdog is configured, starts pinging it from a
/// task of the current tokio runtime (so a wedged runtime stops the pings
/// and systemd restarts the service). Must be called inside a runtime.
pub fn ready(status: &str) {
    log(send(
        "READY=1",
        &[NotifyState::Ready, NotifyState::Status(status)],
    ));
    if let Some(interval) = watchdog_interval() {
        spawn_watchdog(interval);
    }
}

/// Tells the service manager a reload begins (`RELOADING=1`, with the
/// monotonic timestamp systemd 253+ requires). Follow with [`reloaded`].
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    log(send("RELOADING=1", &states));
}

/// Tells the service manager a reload is over, whatever its outcome
/// (`READY=1` with a status line saying how it went).
pub fn reloaded(status: &str) {
    log(send(
        "READY=1",
        &[NotifyState::Ready, NotifyState::Status(status)],
    ));
}

/// Tells the service manager the process is shutting down (`STOPPING=1`).
pub fn stopping() {
    log(send(
        "STOPPING=1",
        &[NotifyState::Stopping, NotifyState::Status("stopping")],
    ));
}

fn spawn_watchdog(interval: Duration) {
    let period = ping_period(interval);
    tracing::info!(?interval, ?period, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            log(send("WATCHDOG=1", &[NotifyState::Watchdog]));
        }
    });
}

/// Sends `states` if a service manager listens; a no-op otherwise.
fn send(what: &'static str, states: &[NotifyState]) -> Result<(), NotifyError> {
    sd_notify::notify(states).map_err(|source| NotifyError::Send { what, source })
}

fn log(result: Result<(), NotifyError>) {
    if let Err(err) = result {
        tracing::warn!(error = %err, "service manager notification failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_watchdog_interval() {
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            ping_period(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
    }
}
