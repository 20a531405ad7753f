//! A request reduced to what the cache needs: validated, bound, rendered and
//! keyed ([`Prepared`]), remembered for one `now` step so repeated dashboard
//! requests skip that work ([`PreparedMemo`]).
//!
//! It answers nothing itself beyond the 422/500 of a request that does not
//! bind or render; freshness and flights are the query handler's.

use std::sync::Arc;

use chrono::Utc;
use dashcache::cache::CacheKey;
use dashcache::catalog::{Asked, QueryDef, TimeRange};
use dashcache::format::Format;
use dashcache::params::{Bound, RawParam};
use http::Response;

use crate::error::{self, ApiError};
use crate::reply::Body;

/// A request reduced to what the cache needs: validated, bound, rendered, keyed.
pub struct Prepared {
    pub key: CacheKey,
    pub sql: String,
    pub bound: Bound,
    pub format: Format,
    /// The absolute range `sql` reads.
    pub range: Option<TimeRange>,
    /// Set when the request is relative to the clock: refreshes resolve it again.
    pub asked: Option<Arc<Asked>>,
}

thread_local! {
    /// The memo key of the request at hand, built here so a hit allocates nothing.
    static MEMO_KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The memo's key: query, tenant, `now` step and query string (NUL-separated:
/// none of them holds one).
fn memo_key(out: &mut String, query: &str, tenant: Option<&str>, step: i64, raw_query: &str) {
    use std::fmt::Write;
    out.clear();
    let _ = write!(
        out,
        "{query}\u{0}{}\u{0}{step}\u{0}{raw_query}",
        tenant.unwrap_or("")
    );
}

/// Recently prepared requests, by query, tenant, `now` step and query string.
pub struct PreparedMemo {
    memo: moka::sync::Cache<String, Arc<Prepared>>,
}

impl PreparedMemo {
    /// A memo whose entries live one `now` step.
    pub fn new(now_step: std::time::Duration) -> PreparedMemo {
        PreparedMemo {
            memo: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(now_step)
                .build(),
        }
    }

    /// Validates, binds, renders and keys a request, or says why not (422/500).
    ///
    /// Within one `now` step the same query string from the same tenant always
    /// gives the same result, so it is remembered: a repeated dashboard
    /// request skips parsing, binding, rendering and hashing.
    pub fn prepare(
        &self,
        key_prefix: &str,
        query: &Arc<QueryDef>,
        raw_query: &str,
        tenant: Option<&str>,
        now: chrono::DateTime<Utc>,
    ) -> Result<Arc<Prepared>, Box<Response<Body>>> {
        let step = query.now_step.as_secs().max(1) as i64;
        let remembered = MEMO_KEY.with_borrow_mut(|memo| {
            memo_key(
                memo,
                &query.name,
                tenant,
                now.timestamp().div_euclid(step),
                raw_query,
            );
            self.memo.get(memo.as_str())
        });
        if let Some(prepared) = remembered {
            return Ok(prepared);
        }
        let mut memo = String::new();
        memo_key(
            &mut memo,
            &query.name,
            tenant,
            now.timestamp().div_euclid(step),
            raw_query,
        );
        let raw: Vec<RawParam> = form_urlencoded::parse(raw_query.as_bytes()).collect();
        let (format, params, mut problems) = Format::split_param(raw, &Format::ALL);
        let format = format.unwrap_or(Format::Json);
        let clock = query.clock(now);
        let bound = match query.bind(&params, &clock, tenant) {
            Ok(bound) if problems.is_empty() => bound,
            Ok(_) => return Err(Box::new(error::invalid(&problems))),
            Err(more) => {
                problems.extend(more);
                return Err(Box::new(error::invalid(&problems)));
            }
        };
        let sql = query.render(&bound).map_err(|err| {
            tracing::error!(query = %query.name, error = %err, "template rendering failed");
            Box::new(ApiError::Internal.reply("query template error"))
        })?;
        let key = query.cache_key(key_prefix, tenant, format, &bound);
        let asked = bound
            .is_relative()
            .then(|| Arc::new(Asked::new(query, &bound, tenant)));
        let prepared = Arc::new(Prepared {
            key,
            sql,
            range: query.range_of(&bound),
            asked,
            bound,
            format,
        });
        self.memo.insert(memo, prepared.clone());
        Ok(prepared)
    }
}
