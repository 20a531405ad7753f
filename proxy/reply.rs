//! Building responses: the body type, JSON bodies, streamed answers.
//!
//! Streamed bodies can be compressed on the fly ([`compressed`]). Error
//! answers are not built here but in [`crate::error`], on top of [`json`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use dashcache::coalesce::Subscriber;
use dashcache::encoding::{Encoding, StreamEncoder};
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A body that starts with `first` and goes on with what `rest` yields.
/// A failure mid-stream aborts the response, so the client sees a truncated
/// transfer, never a complete-looking wrong answer.
pub fn stream(first: Bytes, rest: Subscriber) -> Body {
    let first = futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(first)) });
    let rest = futures_util::stream::unfold(rest, |mut rest| async move {
        let item = rest.next().await?;
        Some((item.map(Frame::data).map_err(BoxError::from), rest))
    });
    StreamBody::new(futures_util::StreamExt::chain(first, rest)).boxed_unsync()
}

/// `body` compressed on the fly with `encoding` (identity: unchanged).
pub fn compressed(body: Body, encoding: Encoding) -> Body {
    match StreamEncoder::new(encoding) {
        Ok(Some(encoder)) => Compressed {
            inner: body,
            encoder: Some(encoder),
        }
        .boxed_unsync(),
        Ok(None) => body,
        Err(err) => {
            tracing::warn!(error = %err, "cannot start compression; sending identity");
            body
        }
    }
}

/// A body compressed chunk by chunk.
struct Compressed {
    inner: Body,
    encoder: Option<StreamEncoder>,
}

impl http_body::Body for Compressed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.encoder.is_none() {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: none are sent
                    };
                    let Some(encoder) = self.encoder.as_mut() else {
                        return Poll::Ready(None);
                    };
                    let out = encoder.chunk(&data).map_err(BoxError::from)?;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    let Some(encoder) = self.encoder.take() else {
                        return Poll::Ready(None);
                    };
                    let out = encoder.finish().map_err(BoxError::from)?;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }
}

/// Names of the headers dashcache's own answers carry, as constants: a
/// `&str` name is parsed and checked on every insert.
pub mod names {
    use http::HeaderName;

    pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
    pub const X_TIME_RANGE: HeaderName = HeaderName::from_static("x-time-range");
    pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
    pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
    pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
    pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
}

/// Numbers below this are header values made once ([`number`], [`private_max_age`]).
const SMALL: u64 = 4096;

/// Header values made once for the whole process: their text is leaked
/// (a few hundred KiB once), so a clone is free.
fn table(text: impl Fn(u64) -> String) -> Vec<HeaderValue> {
    (0..SMALL)
        .map(|n| HeaderValue::from_static(Box::leak(text(n).into_boxed_str())))
        .collect()
}

/// A number as a header value (`Age`, `RateLimit-*`): no allocation for
/// the small ones a hit mostly has.
pub fn number(n: u64) -> HeaderValue {
    static NUMBERS: std::sync::LazyLock<Vec<HeaderValue>> =
        std::sync::LazyLock::new(|| table(|n| n.to_string()));
    match usize::try_from(n).ok().and_then(|i| NUMBERS.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from(n),
    }
}

/// `Cache-Control: private, max-age=N`: answers are per tenant, so browsers
/// may keep them and shared caches may not.
pub fn private_max_age(secs: u64) -> HeaderValue {
    static VALUES: std::sync::LazyLock<Vec<HeaderValue>> =
        std::sync::LazyLock::new(|| table(|n| format!("private, max-age={n}")));
    match usize::try_from(secs).ok().and_then(|i| VALUES.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from_str(&format!("private, max-age={secs}"))
            .unwrap_or_else(|_| HeaderValue::from_static("private, no-cache")),
    }
}

/// Marks a response as negotiated on `Accept-Encoding`, with `encoding`.
pub fn set_encoding(headers: &mut http::HeaderMap, encoding: Encoding) {
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if encoding != Encoding::Identity {
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(encoding.token()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_max_ages_read_the_same_from_the_table_and_beyond_it() {
        for n in [0, 1, 59, SMALL - 1, SMALL, 86_400, u64::MAX] {
            assert_eq!(number(n).to_str().unwrap(), n.to_string());
            assert_eq!(
                private_max_age(n).to_str().unwrap(),
                format!("private, max-age={n}")
            );
        }
    }
}
