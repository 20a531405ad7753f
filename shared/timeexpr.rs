//! Time expressions as dashboards send them: parsed, canonical, resolved.
//!
//! Owns the grammar of `time` parameters: `YYYY-MM-DD` (midnight UTC),
//! `YYYY-MM-DD HH:MM:SS` (UTC), RFC 3339 (`2024-05-01T10:00:00+02:00`), and the
//! relative forms `now`, `today`, `yesterday`, `start_of_month`, each optionally
//! followed by `-<duration>` or `+<duration>` (`now-7d`, `today-30d`, `now-1h30m`).
//!
//! A relative expression has a canonical text ([`TimeExpr::canonical`]: `now-7d`
//! and `now-168h` are both `now-7d`, `yesterday` is `today-1d`), which is what
//! cache keys are made of, so a dashboard polling "the last 7 days" keeps one
//! key; it is resolved to an instant only when an answer is computed. `now` is
//! rounded down to a step (one minute) when resolved. It also owns how
//! instants and spans are written for people ([`format`], [`span_text`]). It
//! does not know about parameters or ranges: see [`crate::params`].

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeZone, Utc};
use std::time::Duration;

/// The earliest and latest instants ClickHouse's `DateTime` can hold.
const MIN_SECS: i64 = 0;
const MAX_SECS: i64 = u32::MAX as i64;

/// The absolute time range an answer covers, `[from, to)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimeRange {
    pub from: i64,
    pub to: i64,
}

impl TimeRange {
    /// The `X-Time-Range` header value: an ISO 8601 interval in UTC.
    pub fn header_value(&self) -> String {
        format!("{}/{}", format(self.from), format(self.to))
    }
}

/// Why a text is not a time. Each message completes a sentence about the
/// parameter (`from is not a valid date`), as 422 answers show it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// An instant ClickHouse's `DateTime` cannot hold.
    #[error("is outside the supported range (1970-01-01 to 2106-02-07)")]
    OutOfRange,
    /// A relative base followed by something that is not `-` or `+` a duration.
    #[error("is not a date, a datetime or a relative time like now-7d")]
    NotAnOffset,
    /// The duration after `-` or `+` does not parse.
    #[error("has a bad offset `{0}` (use e.g. 7d, 1h, 30m)")]
    BadOffset(String),
    #[error("offset is too large")]
    OffsetTooLarge,
    /// `YYYY-MM-DD` that names no day.
    #[error("is not a valid date")]
    InvalidDate,
    /// None of the grammar's forms.
    #[error("is not a date (YYYY-MM-DD), an RFC 3339 datetime or a relative time like now-7d")]
    Unrecognized,
}

/// A parsed time expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeExpr {
    /// An instant, seconds since the Unix epoch (UTC).
    At(i64),
    /// A base instant of the clock plus an offset in seconds.
    Relative { base: Base, offset: i64 },
}

/// What a relative expression counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// The clock, rounded down to the step.
    Now,
    /// Midnight UTC of the current day (`yesterday` is `today-1d`).
    Today,
    /// Midnight UTC of the first day of the current month.
    StartOfMonth,
}

impl Base {
    const fn name(self) -> &'static str {
        match self {
            Base::Now => "now",
            Base::Today => "today",
            Base::StartOfMonth => "start_of_month",
        }
    }
}

impl TimeExpr {
    /// Parses `text`; the error says what is wrong, for a 422.
    pub fn parse(text: &str) -> Result<TimeExpr, TimeError> {
        let text = text.trim();
        let expr = match relative_base(text) {
            Some((base, shift, rest)) => TimeExpr::Relative {
                base,
                offset: shift + offset(rest)?,
            },
            None => TimeExpr::At(absolute(text)?),
        };
        if let TimeExpr::At(secs) = expr {
            in_range(secs)?;
        }
        Ok(expr)
    }

    pub fn is_relative(self) -> bool {
        matches!(self, TimeExpr::Relative { .. })
    }

    /// The instant this expression names at `now` (`now` rounded to `now_step`).
    pub fn resolve(self, now: DateTime<Utc>, now_step: Duration) -> Result<i64, TimeError> {
        let secs = match self {
            TimeExpr::At(secs) => secs,
            TimeExpr::Relative { base, offset } => base_instant(base, now, now_step) + offset,
        };
        in_range(secs)?;
        Ok(secs)
    }

    /// One text per meaning: an instant in RFC 3339 UTC, a relative expression
    /// as its base and its offset in the largest whole unit (`now-7d`).
    pub fn canonical(self) -> String {
        match self {
            TimeExpr::At(secs) => format(secs),
            TimeExpr::Relative { base, offset: 0 } => base.name().to_owned(),
            TimeExpr::Relative { base, offset } => {
                let sign = if offset < 0 { '-' } else { '+' };
                let n = offset.unsigned_abs();
                let (amount, unit) = [(86_400, 'd'), (3_600, 'h'), (60, 'm')]
                    .into_iter()
                    .find(|(size, _)| n % size == 0)
                    .map_or((n, 's'), |(size, unit)| (n / size, unit));
                format!("{}{sign}{amount}{unit}", base.name())
            }
        }
    }
}

fn in_range(secs: i64) -> Result<(), TimeError> {
    if (MIN_SECS..=MAX_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(TimeError::OutOfRange)
    }
}

/// Resolves `text` to seconds since the Unix epoch (UTC).
///
/// `now` is the request's clock reading; `now_step` the rounding of `now`.
pub fn resolve(text: &str, now: DateTime<Utc>, now_step: Duration) -> Result<i64, TimeError> {
    TimeExpr::parse(text)?.resolve(now, now_step)
}

/// Formats seconds as an RFC 3339 UTC instant, for messages and documents.
pub fn format(secs: i64) -> String {
    match Utc.timestamp_opt(secs, 0).single() {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => secs.to_string(),
    }
}

/// A span as operators think of ranges, for messages and documents: whole
/// days as `1 day` / `31 days`, longer spans in days to two decimals
/// (`1.50 days`), shorter ones as a duration (`5m`, `4h`, `1h 30m`).
pub fn span_text(span: Duration) -> String {
    const DAY: u64 = 86_400;
    let secs = span.as_secs();
    match secs {
        DAY => "1 day".into(),
        s if s > 0 && s % DAY == 0 => format!("{} days", s / DAY),
        s if s > DAY => format!("{:.2} days", s as f64 / DAY as f64),
        _ => humantime::format_duration(span).to_string(),
    }
}

/// The base a relative expression starts with, the shift it implies
/// (`yesterday` is `today` − 1 day) and the rest of the text.
fn relative_base(text: &str) -> Option<(Base, i64, &str)> {
    [
        ("start_of_month", Base::StartOfMonth, 0),
        ("yesterday", Base::Today, -86_400),
        ("today", Base::Today, 0),
        ("now", Base::Now, 0),
    ]
    .into_iter()
    .find_map(|(name, base, shift)| text.strip_prefix(name).map(|rest| (base, shift, rest)))
}

fn base_instant(base: Base, now: DateTime<Utc>, now_step: Duration) -> i64 {
    let now_secs = now.timestamp();
    let day = now_secs.div_euclid(86_400) * 86_400;
    match base {
        Base::Now => {
            let step = now_step.as_secs().max(1) as i64;
            now_secs.div_euclid(step) * step
        }
        Base::Today => day,
        Base::StartOfMonth => {
            let date = now.date_naive();
            NaiveDate::from_ymd_opt(date.year(), date.month(), 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc().timestamp())
                .unwrap_or(day)
        }
    }
}

fn offset(rest: &str) -> Result<i64, TimeError> {
    if rest.is_empty() {
        return Ok(0);
    }
    let (sign, amount) = match rest.as_bytes()[0] {
        b'-' => (-1, &rest[1..]),
        b'+' => (1, &rest[1..]),
        _ => return Err(TimeError::NotAnOffset),
    };
    let duration =
        humantime::parse_duration(amount).map_err(|_| TimeError::BadOffset(amount.to_owned()))?;
    let secs = i64::try_from(duration.as_secs()).map_err(|_| TimeError::OffsetTooLarge)?;
    if secs > MAX_SECS {
        return Err(TimeError::OffsetTooLarge);
    }
    Ok(sign * secs)
}

fn absolute(text: &str) -> Result<i64, TimeError> {
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return date
            .and_hms_opt(0, 0, 0)
            .map(|d| d.and_utc().timestamp())
            .ok_or(TimeError::InvalidDate);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp());
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S") {
        return Ok(t.and_utc().timestamp());
    }
    Err(TimeError::Unrecognized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_in_days_when_a_day_or_longer() {
        let span = |secs| span_text(Duration::from_secs(secs));
        assert_eq!(span(86_400), "1 day");
        assert_eq!(span(31 * 86_400), "31 days");
        assert_eq!(span(730 * 86_400), "730 days");
        assert_eq!(span(36 * 3_600), "1.50 days");
        assert_eq!(span(300), "5m");
        assert_eq!(span(4 * 3_600), "4h");
        assert_eq!(span(5_400), "1h 30m");
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 3, 15, 10, 17, 42).unwrap()
    }

    fn at(text: &str) -> Result<String, TimeError> {
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
        assert_eq!(at("yesterday").unwrap(), "2024-03-14T00:00:00Z");
    }

    #[test]
    fn relative_forms_have_one_canonical_text() {
        let canonical = |text: &str| TimeExpr::parse(text).unwrap().canonical();
        assert_eq!(canonical("now-7d"), "now-7d");
        assert_eq!(canonical("now-168h"), "now-7d");
        assert_eq!(canonical("now-10080m"), "now-7d");
        assert_eq!(canonical(" now-1h30m "), "now-90m");
        assert_eq!(canonical("now+0s"), "now");
        assert_eq!(canonical("yesterday"), "today-1d");
        assert_eq!(canonical("today-24h"), "today-1d");
        assert_eq!(canonical("start_of_month"), "start_of_month");
        assert_eq!(canonical("2024-01-02"), "2024-01-02T00:00:00Z");
        assert_eq!(
            canonical("2024-01-02T03:04:05+02:00"),
            "2024-01-02T01:04:05Z"
        );
        // The canonical text means the same instant.
        for text in ["now-1h30m", "yesterday", "today+36h", "start_of_month-1d"] {
            let expr = TimeExpr::parse(text).unwrap();
            let again = TimeExpr::parse(&expr.canonical()).unwrap();
            assert_eq!(again, expr, "{text}");
            assert_eq!(at(text), at(&expr.canonical()));
        }
        assert!(TimeExpr::parse("now-7d").unwrap().is_relative());
        assert!(!TimeExpr::parse("2024-01-02").unwrap().is_relative());
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "",
            "yesterday-",
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
        // The variants say which rule a text broke, in the words of a 422.
        assert_eq!(at("now-7x"), Err(TimeError::BadOffset("7x".into())));
        assert_eq!(at("now*2"), Err(TimeError::NotAnOffset));
        assert_eq!(at("1900-01-01"), Err(TimeError::OutOfRange));
        assert_eq!(at("2024-02-30"), Err(TimeError::Unrecognized));
        assert_eq!(
            TimeError::BadOffset("7x".into()).to_string(),
            "has a bad offset `7x` (use e.g. 7d, 1h, 30m)"
        );
    }
}
