//! Web files compiled into the binary (`include_bytes!`) and how they are
//! served: `/docs` (Swagger UI from the npm package `swagger-ui-dist`, pinned
//! in `tests/browser/package.json` and copied in by `scripts/vendor`) and the
//! files of `/status`.
//!
//! Owns each file's content type, caching and compression (gzip, made once
//! per file on first request off the async runtime) and the pages' Content
//! Security Policy (only the proxy's own origin: nothing loads from a CDN).
//! What the pages show is theirs; the data behind `/status` is
//! [`crate::handlers::status`]'s.

use bytes::Bytes;
use dashcache::encoding::{self, Encoding};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use tokio::sync::OnceCell;

use crate::reply::{self, Body};

/// Scripts, styles and fetches from this origin only; inline styles for
/// Swagger UI; images also as data: URLs.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// One compiled-in file.
pub struct Asset {
    pub path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
    /// `Cache-Control`.
    cache: &'static str,
    gzip: OnceCell<Option<Bytes>>,
}

impl Asset {
    const fn new(
        path: &'static str,
        content_type: &'static str,
        bytes: &'static [u8],
        cache: &'static str,
    ) -> Asset {
        Asset {
            path,
            content_type,
            bytes,
            cache,
            gzip: OnceCell::const_new(),
        }
    }

    /// The file, gzipped when the client takes gzip and it is worth it.
    pub async fn respond(&'static self, request: &HeaderMap) -> Response<Body> {
        let accept = request
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok());
        let gzip = if self.bytes.len() >= 1024
            && encoding::negotiate(accept, &[Encoding::Gzip]) == Encoding::Gzip
        {
            self.gzip
                .get_or_init(|| async {
                    tokio::task::spawn_blocking(|| {
                        encoding::compress(self.bytes, Encoding::Gzip).ok()
                    })
                    .await
                    .ok()
                    .flatten()
                })
                .await
                .clone()
        } else {
            None
        };
        let mut response = match &gzip {
            Some(body) => Response::new(reply::full(body.clone())),
            None => Response::new(reply::full(Bytes::from_static(self.bytes))),
        };
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(self.cache));
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        if gzip.is_some() {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        if self.content_type.starts_with("text/html") {
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
        }
        response
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
/// Pages and their scripts change with the binary: revalidate.
const FRESH: &str = "no-cache";
/// Swagger UI changes only with its pinned version.
const DAY: &str = "public, max-age=86400";

/// `/docs` and its files.
pub static DOCS: [Asset; 4] = [
    Asset::new("/docs", HTML, include_bytes!("web/docs.html"), FRESH),
    Asset::new("/docs/docs.js", JS, include_bytes!("web/docs.js"), FRESH),
    Asset::new(
        "/docs/swagger-ui-bundle.js",
        JS,
        include_bytes!("web/swagger-ui/swagger-ui-bundle.js"),
        DAY,
    ),
    Asset::new(
        "/docs/swagger-ui.css",
        CSS,
        include_bytes!("web/swagger-ui/swagger-ui.css"),
        DAY,
    ),
];

/// `/status` and its files (the data comes from `/status.json`).
pub static STATUS: [Asset; 3] = [
    Asset::new("/status", HTML, include_bytes!("web/status.html"), FRESH),
    Asset::new(
        "/status/status.js",
        JS,
        include_bytes!("web/status.js"),
        FRESH,
    ),
    Asset::new(
        "/status/status.css",
        CSS,
        include_bytes!("web/status.css"),
        FRESH,
    ),
];

/// The compiled-in file at `path` among `assets` (`/docs/` is `/docs`).
pub fn find(assets: &'static [Asset], path: &str) -> Option<&'static Asset> {
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    assets.iter().find(|a| a.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn files_are_served_gzipped_when_taken_and_as_they_are_otherwise() {
        let bundle = find(&DOCS, "/docs/swagger-ui-bundle.js").unwrap();
        let mut accept = HeaderMap::new();
        accept.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        let zipped = bundle.respond(&accept).await;
        assert_eq!(zipped.headers()[header::CONTENT_ENCODING], "gzip");
        let body = zipped.into_body().collect().await.unwrap().to_bytes();
        let plain = encoding::decompress(&body, Encoding::Gzip, 8 << 20).unwrap();
        assert_eq!(&plain[..], bundle.bytes);
        let identity = bundle.respond(&HeaderMap::new()).await;
        assert!(identity.headers().get(header::CONTENT_ENCODING).is_none());
        let page = find(&DOCS, "/docs/")
            .unwrap()
            .respond(&HeaderMap::new())
            .await;
        assert_eq!(page.headers()[header::CONTENT_TYPE], HTML);
        assert!(
            page.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'")
        );
        assert!(find(&DOCS, "/docs/nope.js").is_none());
    }
}
