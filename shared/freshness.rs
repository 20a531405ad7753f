//! Is a stored answer fresh, stale or gone, and should it be refreshed early?
//!
//! Pure decisions over an entry's header and a clock reading; no I/O. Early
//! refresh is XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): a read at
//! `now` refreshes when `now - delta * beta * ln(r) >= fresh_until`, with `r`
//! uniform in (0, 1] and `delta` the time the answer took to compute. Slow
//! answers and hot keys are refreshed earlier; one read of many does it, so a
//! popular entry is renewed before it expires instead of stampeding after.
//!
//! XFetch's window scales with the compute time, so a cheap answer (10 ms)
//! would be refreshed early only by a read in the last few tens of
//! milliseconds of its life. A read in the last `window` share of the TTL
//! (`cache.early_refresh`, e.g. 0.2) refreshes too, so an answer that is
//! being read is renewed before it expires, however cheap it is.

use crate::cache::EntryHeader;

/// What a stored answer is good for at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it (HIT); `refresh_early` asks for a background refresh now.
    Fresh { refresh_early: bool },
    /// Past its freshness, within grace: serve it (STALE) and refresh.
    Stale,
    /// Past grace: do not serve it.
    Expired,
}

/// When reads refresh an answer early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyRefresh {
    /// XFetch's beta: above 1 earlier, below 1 later, 0 never by XFetch.
    pub beta: f64,
    /// A read in this last share of the TTL (0.0–1.0) refreshes.
    pub window: f64,
}

impl EarlyRefresh {
    /// XFetch alone (no window).
    pub const fn xfetch(beta: f64) -> EarlyRefresh {
        EarlyRefresh { beta, window: 0.0 }
    }
}

/// Judges `header` at `now_ms`; `r` is a uniform sample in (0, 1].
pub fn judge(header: &EntryHeader, now_ms: i64, beta: f64, r: f64) -> Freshness {
    judge_read(header, now_ms, EarlyRefresh::xfetch(beta), r, 0)
}

/// Like [`judge`], for a reader that accepts answers up to `min_ttl_ms` old
/// as fresh even past their TTL (cheaper tiers), with early refresh by
/// XFetch or by the last `early.window` of the answer's own TTL.
pub fn judge_read(
    header: &EntryHeader,
    now_ms: i64,
    early: EarlyRefresh,
    r: f64,
    min_ttl_ms: i64,
) -> Freshness {
    let fresh_until = header
        .fresh_until_ms
        .max(header.created_ms.saturating_add(min_ttl_ms));
    if now_ms >= header.stale_until_ms.max(fresh_until) {
        return Freshness::Expired;
    }
    if now_ms >= fresh_until {
        return Freshness::Stale;
    }
    Freshness::Fresh {
        refresh_early: in_window(header, now_ms, early.window)
            || xfetch(now_ms, fresh_until, header.compute_ms, early.beta, r),
    }
}

/// Whether `now_ms` is in the last `window` share of the answer's own TTL.
fn in_window(header: &EntryHeader, now_ms: i64, window: f64) -> bool {
    if window.is_nan() || window <= 0.0 {
        return false;
    }
    let ttl = (header.fresh_until_ms - header.created_ms).max(0) as f64;
    now_ms as f64 >= header.fresh_until_ms as f64 - ttl * window.min(1.0)
}

/// XFetch's test. A zero compute time counts as 1 ms.
pub fn xfetch(now_ms: i64, fresh_until_ms: i64, delta_ms: u64, beta: f64, r: f64) -> bool {
    if beta <= 0.0 || !(r > 0.0 && r <= 1.0) {
        return false;
    }
    let gap = -(delta_ms.max(1) as f64) * beta * r.ln();
    now_ms as f64 + gap >= fresh_until_ms as f64
}

/// A uniform sample in (0, 1] for [`judge`].
pub fn sample() -> f64 {
    1.0 - rand::random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fresh_until_ms: i64, stale_until_ms: i64, compute_ms: u64) -> EntryHeader {
        EntryHeader {
            created_ms: 0,
            fresh_until_ms,
            stale_until_ms,
            compute_ms,
            etag: String::new(),
            content_type: String::new(),
            encoding: "identity".into(),
            range: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn fresh_stale_expired() {
        let h = header(1_000, 2_000, 10);
        assert_eq!(
            judge(&h, 0, 1.0, 1.0),
            Freshness::Fresh {
                refresh_early: false
            }
        );
        assert_eq!(judge(&h, 1_000, 1.0, 1.0), Freshness::Stale);
        assert_eq!(judge(&h, 1_999, 1.0, 1.0), Freshness::Stale);
        assert_eq!(judge(&h, 2_000, 1.0, 1.0), Freshness::Expired);
    }

    #[test]
    fn a_min_ttl_extends_freshness_for_its_caller() {
        let h = header(1_000, 2_000, 10);
        assert_eq!(
            judge_read(&h, 1_500, EarlyRefresh::xfetch(0.0), 1.0, 1_800),
            Freshness::Fresh {
                refresh_early: false
            }
        );
        assert_eq!(
            judge_read(&h, 1_900, EarlyRefresh::xfetch(0.0), 1.0, 1_800),
            Freshness::Stale
        );
        assert_eq!(
            judge_read(&h, 1_500, EarlyRefresh::xfetch(0.0), 1.0, 0),
            Freshness::Stale
        );
    }

    #[test]
    fn a_read_in_the_last_share_of_the_ttl_refreshes_however_cheap_the_answer() {
        // Created at 0, fresh until 10 s, computed in 1 ms.
        let h = EntryHeader {
            created_ms: 0,
            ..header(10_000, 20_000, 1)
        };
        let early = EarlyRefresh {
            beta: 1.0,
            window: 0.2,
        };
        let refresh = |now| match judge_read(&h, now, early, 0.5, 0) {
            Freshness::Fresh { refresh_early } => refresh_early,
            other => panic!("{other:?}"),
        };
        assert!(!refresh(7_999), "before the last 20 %");
        assert!(refresh(8_000));
        assert!(refresh(9_999));
        // XFetch alone would not: its window is about a millisecond here.
        assert_eq!(
            judge_read(&h, 9_000, EarlyRefresh::xfetch(1.0), 0.5, 0),
            Freshness::Fresh {
                refresh_early: false
            }
        );
    }

    #[test]
    fn xfetch_refreshes_earlier_for_slow_queries_and_small_samples() {
        // 100 ms before expiry, a 50 ms query: ln(r) must be below -2 (r < 0.135).
        assert!(!xfetch(900, 1_000, 50, 1.0, 0.2));
        assert!(xfetch(900, 1_000, 50, 1.0, 0.1));
        // A query that took 1 s: almost any sample refreshes 100 ms before expiry.
        assert!(xfetch(900, 1_000, 1_000, 1.0, 0.9));
        // r = 1 never refreshes early; beta 0 disables it.
        assert!(!xfetch(999, 1_000, 1_000_000, 1.0, 1.0));
        assert!(!xfetch(999, 1_000, 1_000_000, 0.0, 0.01));
    }

    #[test]
    fn xfetch_probability_matches_the_formula() {
        // P(refresh) = exp(-(fresh_until - now) / (delta * beta)) = exp(-1) here.
        let n = 100_000;
        let hits = (1..=n)
            .filter(|i| xfetch(0, 100, 100, 1.0, *i as f64 / n as f64))
            .count();
        let p = hits as f64 / n as f64;
        assert!((p - (-1.0f64).exp()).abs() < 0.001, "{p}");
    }
}
