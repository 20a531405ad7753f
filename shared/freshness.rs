//! Is a stored answer fresh, stale or gone, and should it be refreshed early?
//!
//! Pure decisions over an entry's header and a clock reading; no I/O. Early
//! refresh is XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): a read at
//! `now` refreshes when `now - delta * beta * ln(r) >= fresh_until`, with `r`
//! uniform in (0, 1] and `delta` the time the answer took to compute. Slow
//! answers and hot keys are refreshed earlier; one read of many does it, so a
//! popular entry is renewed before it expires instead of stampeding after.

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

/// Judges `header` at `now_ms`; `r` is a uniform sample in (0, 1].
pub fn judge(header: &EntryHeader, now_ms: i64, beta: f64, r: f64) -> Freshness {
    judge_with_min_ttl(header, now_ms, beta, r, 0)
}

/// Like [`judge`], for a caller that accepts answers up to `min_ttl_ms` old
/// as fresh even past their TTL (cheaper tiers).
pub fn judge_with_min_ttl(
    header: &EntryHeader,
    now_ms: i64,
    beta: f64,
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
        refresh_early: xfetch(now_ms, fresh_until, header.compute_ms, beta, r),
    }
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
            judge_with_min_ttl(&h, 1_500, 0.0, 1.0, 1_800),
            Freshness::Fresh {
                refresh_early: false
            }
        );
        assert_eq!(
            judge_with_min_ttl(&h, 1_900, 0.0, 1.0, 1_800),
            Freshness::Stale
        );
        assert_eq!(judge_with_min_ttl(&h, 1_500, 0.0, 1.0, 0), Freshness::Stale);
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
