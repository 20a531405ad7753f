//! Building responses: the body type, JSON errors, streamed answers.
//!
//! Every error leaves the proxy as JSON: `{"detail": "...", "type": "..."}`, or
//! for invalid parameters FastAPI's 422 shape, `{"detail": [{loc, msg, type}]}`.

use bytes::Bytes;
use dashcache::coalesce::Subscriber;
use dashcache::params::Problem;
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

/// A JSON error: what went wrong (`detail`) and a stable machine-readable `type`.
pub fn error(status: StatusCode, kind: &str, detail: impl Into<String>) -> Response<Body> {
    json(
        status,
        &serde_json::json!({ "detail": detail.into(), "type": kind }),
    )
}

/// 422 listing every invalid parameter.
pub fn invalid(problems: &[Problem]) -> Response<Body> {
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &serde_json::json!({ "detail": problems }),
    )
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
