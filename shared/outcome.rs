//! States that cross modules, as enums: where an answer came from, what
//! happened to a computed answer, how a request fared in the miss queue.
//!
//! Each gives its header value, metric label and log field from one place
//! ([`CacheStatus::as_str`] and friends), and lists every value (`ALL`) so
//! that metrics can export each series at 0 from the start. This module is a
//! leaf: it owns no behaviour and imports nothing of the crate.

/// Where an answer came from: the `X-Cache` header, the `result` label of
/// `dashcache_cache_requests_total` and the request log's `cache` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// A fresh stored answer (in-process L1 or Redis).
    Hit,
    /// Past its TTL, within grace: served while one background refresh runs.
    Stale,
    /// This request started the computation, in this process.
    Miss,
    /// Read along with a computation another request started.
    Coalesced,
    /// Not cacheable (or the client opted out): sent to ClickHouse as it is.
    Bypass,
}

impl CacheStatus {
    pub const ALL: [CacheStatus; 5] = [
        CacheStatus::Hit,
        CacheStatus::Stale,
        CacheStatus::Miss,
        CacheStatus::Coalesced,
        CacheStatus::Bypass,
    ];

    /// The status an `X-Cache` header value names (`None`: none of them).
    pub fn from_header(value: &[u8]) -> Option<CacheStatus> {
        CacheStatus::ALL
            .into_iter()
            .find(|status| status.as_str().as_bytes() == value)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Stale => "STALE",
            CacheStatus::Miss => "MISS",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// What became of one computation's attempt at ClickHouse:
/// `dashcache_clickhouse_attempts_total{result}`. Only `sent` reached a server;
/// the others cost ClickHouse nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// A server answered (with data or an error of its own).
    Sent,
    /// No replica could be connected to.
    Unreachable,
    /// A refresh not started: every replica is ejected (until a health check re-admits one).
    Ejected,
    /// Not started: the key's last computation failed and its backoff runs.
    BackingOff,
    /// A refresh not started: every ClickHouse slot of the process is taken
    /// (the stored answer is served; a later read refreshes it).
    Busy,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 5] = [
        AttemptOutcome::Sent,
        AttemptOutcome::Unreachable,
        AttemptOutcome::Ejected,
        AttemptOutcome::BackingOff,
        AttemptOutcome::Busy,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Sent => "sent",
            AttemptOutcome::Unreachable => "unreachable",
            AttemptOutcome::Ejected => "ejected",
            AttemptOutcome::BackingOff => "backing_off",
            AttemptOutcome::Busy => "busy",
        }
    }
}

/// How a computation got (or did not get) a slot at ClickHouse:
/// `dashcache_clickhouse_admissions_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdmissionOutcome {
    /// A slot was free.
    AtOnce,
    /// A slot freed up while it waited in line.
    AfterWait,
    /// The line was full: refused at once.
    QueueFull,
    /// No slot within `clickhouse.queue_wait`.
    WaitTimeout,
}

impl AdmissionOutcome {
    pub const ALL: [AdmissionOutcome; 4] = [
        AdmissionOutcome::AtOnce,
        AdmissionOutcome::AfterWait,
        AdmissionOutcome::QueueFull,
        AdmissionOutcome::WaitTimeout,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AdmissionOutcome::AtOnce => "at_once",
            AdmissionOutcome::AfterWait => "after_wait",
            AdmissionOutcome::QueueFull => "queue_full",
            AdmissionOutcome::WaitTimeout => "wait_timeout",
        }
    }
}

/// What became of a computed answer: `dashcache_cache_stores_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOutcome {
    Stored,
    /// Larger than `cache.max_entry_bytes`: served, not kept.
    TooLarge,
    /// Redis refused or did not answer in time.
    Failed,
}

impl StoreOutcome {
    pub const ALL: [StoreOutcome; 3] = [
        StoreOutcome::Stored,
        StoreOutcome::TooLarge,
        StoreOutcome::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            StoreOutcome::Stored => "stored",
            StoreOutcome::TooLarge => "too_large",
            StoreOutcome::Failed => "failed",
        }
    }
}

/// How an export ended: `dashcache_exports_ended_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportOutcome {
    Complete,
    /// The client left before the end.
    Cancelled,
    Failed,
    /// Cut at the tier's row or byte limit.
    Truncated,
}

impl ExportOutcome {
    pub const ALL: [ExportOutcome; 4] = [
        ExportOutcome::Complete,
        ExportOutcome::Cancelled,
        ExportOutcome::Failed,
        ExportOutcome::Truncated,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ExportOutcome::Complete => "complete",
            ExportOutcome::Cancelled => "cancelled",
            ExportOutcome::Failed => "failed",
            ExportOutcome::Truncated => "truncated",
        }
    }
}

/// How a request that had to start a computation got its turn under the
/// key's `max_concurrent_misses`: `dashcache_miss_queue_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueOutcome {
    /// A slot was free.
    Immediate,
    /// Waited in line, then got a slot.
    Queued,
    /// The line was full: 429.
    Full,
    /// Waited `miss_queue_wait` without a slot: 429.
    TimedOut,
}

impl QueueOutcome {
    pub const ALL: [QueueOutcome; 4] = [
        QueueOutcome::Immediate,
        QueueOutcome::Queued,
        QueueOutcome::Full,
        QueueOutcome::TimedOut,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            QueueOutcome::Immediate => "immediate",
            QueueOutcome::Queued => "queued",
            QueueOutcome::Full => "full",
            QueueOutcome::TimedOut => "timed_out",
        }
    }
}

/// A rate-limit decision: `dashcache_rate_limit_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateOutcome {
    Allowed,
    Limited,
}

impl RateOutcome {
    pub const ALL: [RateOutcome; 2] = [RateOutcome::Allowed, RateOutcome::Limited];

    pub const fn as_str(self) -> &'static str {
        match self {
            RateOutcome::Allowed => "allowed",
            RateOutcome::Limited => "limited",
        }
    }
}

/// Kinds of failed ClickHouse queries: `dashcache_clickhouse_errors_total{kind}`
/// (the values of `UpstreamError::kind`).
pub const UPSTREAM_ERROR_KINDS: [&str; 4] = ["connect", "status", "body", "timeout"];

/// Which kind of cross-origin request: `dashcache_cors_requests_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CorsKind {
    /// `OPTIONS` with `Access-Control-Request-Method`: the browser asks first.
    Preflight,
    /// Any other request that carries `Origin`.
    Actual,
}

impl CorsKind {
    pub const ALL: [CorsKind; 2] = [CorsKind::Preflight, CorsKind::Actual];

    pub const fn as_str(self) -> &'static str {
        match self {
            CorsKind::Preflight => "preflight",
            CorsKind::Actual => "actual",
        }
    }
}

/// Whether a request's `Origin` is allowed by `[cors]`:
/// `dashcache_cors_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CorsOutcome {
    Allowed,
    /// Answered without CORS headers: the browser keeps the answer from the page.
    Refused,
}

impl CorsOutcome {
    pub const ALL: [CorsOutcome; 2] = [CorsOutcome::Allowed, CorsOutcome::Refused];

    pub const fn as_str(self) -> &'static str {
        match self {
            CorsOutcome::Allowed => "allowed",
            CorsOutcome::Refused => "refused",
        }
    }
}
