//! Errors of the ClickHouse-compatible endpoint, in ClickHouse's shape.
//!
//! Owns every error answer the endpoint makes itself: the status current
//! ClickHouse servers send for the code (`exceptionCodeToHTTPStatus`),
//! `X-ClickHouse-Exception-Code`, and a `Code: N. DB::Exception: … (NAME)`
//! text body, so BI tools and client libraries report them as they report
//! ClickHouse's own. Errors ClickHouse sent are passed on as they came (see
//! [`passed_on`]). The named API's JSON errors (`crate::error`) are not used here.

use bytes::Bytes;
use dashcache::clickhouse::UpstreamError;
use dashcache::coalesce::FlightError;
use http::{HeaderValue, Response, StatusCode, header};

use crate::reply::{self, Body};

/// An error dashcache answers itself, by ClickHouse error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChError {
    /// 62: the statement cannot be read (not UTF-8, too large, unterminated).
    Syntax,
    /// 164: not a read-only statement, or several statements.
    Readonly,
    /// 516: missing or wrong credentials.
    AuthenticationFailed,
    /// 497: the key's tier may not use the endpoint.
    AccessDenied,
    /// 201: over the tier's request rate.
    QuotaExceeded,
    /// 202: too many uncached statements of one key, or readers of one answer.
    TooManyQueries,
    /// 159: no answer in time.
    Timeout,
    /// 210: ClickHouse cannot be reached, or the computation broke off.
    Network,
}

impl ChError {
    pub const fn code(self) -> u32 {
        match self {
            ChError::Syntax => 62,
            ChError::Readonly => 164,
            ChError::AuthenticationFailed => 516,
            ChError::AccessDenied => 497,
            ChError::QuotaExceeded => 201,
            ChError::TooManyQueries => 202,
            ChError::Timeout => 159,
            ChError::Network => 210,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ChError::Syntax => "SYNTAX_ERROR",
            ChError::Readonly => "READONLY",
            ChError::AuthenticationFailed => "AUTHENTICATION_FAILED",
            ChError::AccessDenied => "ACCESS_DENIED",
            ChError::QuotaExceeded => "QUOTA_EXCEEDED",
            ChError::TooManyQueries => "TOO_MANY_SIMULTANEOUS_QUERIES",
            ChError::Timeout => "TIMEOUT_EXCEEDED",
            ChError::Network => "NETWORK_ERROR",
        }
    }

    /// The status a current ClickHouse server sends for the code; 429 and
    /// 503 where dashcache asks the client to come back later.
    pub const fn status(self) -> StatusCode {
        match self {
            ChError::Syntax => StatusCode::BAD_REQUEST,
            ChError::AuthenticationFailed | ChError::AccessDenied => StatusCode::FORBIDDEN,
            ChError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ChError::QuotaExceeded | ChError::TooManyQueries => StatusCode::TOO_MANY_REQUESTS,
            ChError::Network => StatusCode::SERVICE_UNAVAILABLE,
            ChError::Readonly => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error answer with `message`.
    pub fn reply(self, message: &str) -> Response<Body> {
        let text = format!(
            "Code: {}. DB::Exception: {message}. ({}) (version dashcache {})\n",
            self.code(),
            self.name(),
            env!("CARGO_PKG_VERSION")
        );
        exception(self.status(), Some(self.code()), Bytes::from(text))
    }

    /// The answer with a `Retry-After` of `secs`.
    pub fn reply_retry(self, message: &str, secs: u64) -> Response<Body> {
        let mut response = self.reply(message);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        response
    }
}

/// A text exception answer.
fn exception(status: StatusCode, code: Option<u32>, body: Bytes) -> Response<Body> {
    let mut response = Response::new(reply::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    if let Some(code) = code {
        headers.insert("x-clickhouse-exception-code", HeaderValue::from(code));
    }
    response
}

/// A failed computation as the client sees it: ClickHouse's own error (its
/// status, code and text) when it sent one, else dashcache's.
pub fn passed_on(err: &FlightError) -> Response<Body> {
    match err {
        FlightError::Upstream(UpstreamError::Query {
            code,
            message,
            status,
        }) => {
            let status = status
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            exception(status, *code, Bytes::from(message.clone()))
        }
        // An exception in the body of a 200 that ended before any byte was
        // passed on: what ClickHouse sends with `wait_end_of_query=1`.
        FlightError::Upstream(UpstreamError::Body {
            code: Some(code),
            message,
        }) => exception(
            StatusCode::INTERNAL_SERVER_ERROR,
            Some(*code),
            Bytes::from(format!("{}\n", message.trim_end())),
        ),
        FlightError::Upstream(err) if err.is_timeout() => {
            ChError::Timeout.reply("ClickHouse did not answer in time")
        }
        FlightError::Upstream(UpstreamError::Connect(_)) => {
            ChError::Network.reply_retry("ClickHouse is unreachable", 1)
        }
        FlightError::Upstream(_) | FlightError::Aborted => {
            ChError::Network.reply_retry("the query ended without a complete answer", 1)
        }
        FlightError::WaitTimeout(wait) => ChError::Timeout.reply(&format!(
            "no answer from the process computing it within {}s",
            wait.as_secs()
        )),
        FlightError::OverCapacity(detail) => ChError::TooManyQueries.reply_retry(detail, 1),
        FlightError::Saturated(refused) => ChError::TooManyQueries.reply_retry(
            &format!("ClickHouse is busy with this proxy's other queries ({refused})"),
            1,
        ),
        FlightError::BackingOff(wait) => ChError::Network.reply_retry(
            &format!(
                "ClickHouse failed this query moments ago; it is tried again in {}s",
                wait.as_secs().max(1)
            ),
            wait.as_secs().max(1),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_clickhouse_s_shape() {
        let response = ChError::AuthenticationFailed.reply("k1: Authentication failed");
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()["x-clickhouse-exception-code"], "516");
        let response = ChError::Readonly.reply("no");
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()["x-clickhouse-exception-code"], "164");
        let passed = passed_on(&FlightError::Upstream(UpstreamError::Query {
            code: Some(60),
            message: "Code: 60, e.displayText() = DB::Exception: Table default.nope doesn't exist., e.what() = DB::Exception\n".into(),
            status: Some(404),
        }));
        assert_eq!(passed.status(), 404);
        assert_eq!(passed.headers()["x-clickhouse-exception-code"], "60");
    }
}
