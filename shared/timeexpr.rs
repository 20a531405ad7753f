//! Time expressions as dashboards send them, resolved to UTC seconds.
//!
//! Owns the grammar of `time` parameters: `YYYY-MM-DD` (midnight UTC),
//! `YYYY-MM-DD HH:MM:SS` (UTC), RFC 3339 (`2024-05-01T10:00:00+02:00`), and the
//! relative forms `now`, `today`, `start_of_month`, each optionally followed by
//! `-<duration>` or `+<duration>` (`now-7d`, `today-30d`, `now-1h30m`).
//!
//! `now` is rounded down to a step (a query's `now_step`, one minute by default)
//! so that the same relative request made a few seconds later lands on the same
//! cache key. It does not know about parameters or ranges: see [`crate::params`].

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeZone, Utc};
use std::time::Duration;

/// The earliest and latest instants ClickHouse's `DateTime` can hold.
const MIN_SECS: i64 = 0;
const MAX_SECS: i64 = u32::MAX as i64;

/// Resolves `text` to seconds since the Unix epoch (UTC).
///
/// `now` is the request's clock reading; `now_step` the rounding of `now`.
pub fn resolve(text: &str, now: DateTime<Utc>, now_step: Duration) -> Result<i64, String> {
    let text = text.trim();
    let secs = match relative_base(text) {
        Some((base, rest)) => {
            let base = base_instant(base, now, now_step);
            base + offset(rest)?
        }
        None => absolute(text)?,
    };
    if !(MIN_SECS..=MAX_SECS).contains(&secs) {
        return Err("is outside the supported range (1970-01-01 to 2106-02-07)".into());
    }
    Ok(secs)
}

/// Formats seconds as an RFC 3339 UTC instant, for messages and documents.
pub fn format(secs: i64) -> String {
    match Utc.timestamp_opt(secs, 0).single() {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => secs.to_string(),
    }
}

fn relative_base(text: &str) -> Option<(&str, &str)> {
    ["start_of_month", "today", "now"]
        .into_iter()
        .find_map(|base| text.strip_prefix(base).map(|rest| (base, rest)))
}

fn base_instant(base: &str, now: DateTime<Utc>, now_step: Duration) -> i64 {
    let now_secs = now.timestamp();
    let day = now_secs.div_euclid(86_400) * 86_400;
    match base {
        "now" => {
            let step = now_step.as_secs().max(1) as i64;
            now_secs.div_euclid(step) * step
        }
        "today" => day,
        _ => {
            let date = now.date_naive();
            NaiveDate::from_ymd_opt(date.year(), date.month(), 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc().timestamp())
                .unwrap_or(day)
        }
    }
}

fn offset(rest: &str) -> Result<i64, String> {
    if rest.is_empty() {
        return Ok(0);
    }
    let (sign, amount) = match rest.as_bytes()[0] {
        b'-' => (-1, &rest[1..]),
        b'+' => (1, &rest[1..]),
        _ => return Err("is not a date, a datetime or a relative time like now-7d".into()),
    };
    let duration = humantime::parse_duration(amount)
        .map_err(|_| format!("has a bad offset `{amount}` (use e.g. 7d, 1h, 30m)"))?;
    let secs = i64::try_from(duration.as_secs()).map_err(|_| "offset is too large".to_string())?;
    if secs > MAX_SECS {
        return Err("offset is too large".into());
    }
    Ok(sign * secs)
}

fn absolute(text: &str) -> Result<i64, String> {
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return date
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc().timestamp())
            .ok_or_else(|| "is not a valid date".into());
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp());
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S") {
        return Ok(t.and_utc().timestamp());
    }
    Err("is not a date (YYYY-MM-DD), an RFC 3339 datetime or a relative time like now-7d".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, 15, 10, 17, 42).unwrap()
    }

    fn at(text: &str) -> Result<String, String> {
        resolve(text, now(), Duration::from_secs(60)).map(format)
    }

    #[test]
    fn absolute_forms() {
        assert_eq!(at("2024-01-02").unwrap(), "2024-01-02T00:00:00Z");
        assert_eq!(at("2024-01-02T03:04:05Z").unwrap(), "2024-01-02T03:04:05Z");
        assert_eq!(
            at("2024-01-02T03:04:05+02:00").unwrap(),
            "2024-01-02T01:04:05Z"
        );
        assert_eq!(at("2024-01-02 03:04:05").unwrap(), "2024-01-02T03:04:05Z");
    }

    #[test]
    fn relative_forms_round_now_to_the_step() {
        assert_eq!(at("now").unwrap(), "2024-03-15T10:17:00Z");
        assert_eq!(at("now-1h").unwrap(), "2024-03-15T09:17:00Z");
        assert_eq!(at("now-7d").unwrap(), "2024-03-08T10:17:00Z");
        assert_eq!(at("today").unwrap(), "2024-03-15T00:00:00Z");
        assert_eq!(at("today+1d").unwrap(), "2024-03-16T00:00:00Z");
        assert_eq!(at("start_of_month").unwrap(), "2024-03-01T00:00:00Z");
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "2024-02-30",
            "now-",
            "now-7x",
            "now*2",
            "now-99999999999d",
            "1900-01-01",
            "'; DROP TABLE x",
        ] {
            assert!(at(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
