//! The stored form of one answer: a small versioned header and the body bytes.
//!
//! Layout: `DCE` magic, one version byte ([`super::VERSION`]), the header length
//! (u32, big-endian), the header as JSON, then the body exactly as ClickHouse
//! produced it. The header carries what freshness decisions need (created,
//! fresh until, stale until, how long the query took) and what HTTP responses
//! need (ETag, content type). Decoding the body is zero-copy.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::VERSION;

const MAGIC: &[u8; 3] = b"DCE";
const PREFIX_LEN: usize = MAGIC.len() + 1 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("not a dashcache entry")]
    NotAnEntry,
    #[error("entry version {0} is not {VERSION}")]
    Version(u8),
    #[error("entry is truncated")]
    Truncated,
    #[error("entry header is malformed: {0}")]
    Header(String),
}

/// What is known about a stored answer besides its bytes. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryHeader {
    pub created_ms: i64,
    /// Until then the answer is fresh (a HIT).
    pub fresh_until_ms: i64,
    /// Until then a stale answer may still be served while it is refreshed.
    pub stale_until_ms: i64,
    /// How long ClickHouse took to compute it (XFetch's delta).
    pub compute_ms: u64,
    pub etag: String,
    pub content_type: String,
    /// Content encoding of the stored body (`identity` or `gzip`).
    pub encoding: String,
    /// The absolute time range the answer covers, for queries with a range
    /// (a relative request resolves to a new one at every refresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<crate::timeexpr::TimeRange>,
    /// Response headers of the answer to replay with it (the ClickHouse-compatible
    /// endpoint keeps ClickHouse's `Content-Type` and `X-ClickHouse-*` here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// One stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub header: EntryHeader,
    pub body: Bytes,
    /// The uncompressed body, once some request needed it (not stored).
    pub identity: std::sync::OnceLock<Bytes>,
    /// Set by the first read of this in-process copy that armed (or tried to
    /// arm) the proxy's refresh-ahead timer; later reads skip it (not stored).
    pub read_once: std::sync::OnceLock<()>,
    /// The header values it is served with, made by the first read of this
    /// in-process copy ([`Entry::served`]; not stored).
    pub served: std::sync::OnceLock<ServedHeaders>,
}

/// What HTTP answers carry of a stored answer as header values: made once
/// per in-process copy, so a hit formats no dates and validates no text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServedHeaders {
    pub etag: Option<http::HeaderValue>,
    pub content_type: Option<http::HeaderValue>,
    /// `X-Time-Range`: the absolute range the answer covers.
    pub time_range: Option<http::HeaderValue>,
}

impl Entry {
    /// A weak ETag derived from the uncompressed body: the same answer has
    /// the same tag whichever content encoding carries it.
    pub fn etag_of(body: &[u8]) -> String {
        let digest = Sha256::digest(body);
        format!("W/\"{}\"", hex::encode(&digest[..12]))
    }

    /// The header values this answer is served with (made on first use).
    pub fn served(&self) -> &ServedHeaders {
        self.served.get_or_init(|| ServedHeaders {
            etag: http::HeaderValue::from_str(&self.header.etag).ok(),
            content_type: http::HeaderValue::from_str(&self.header.content_type).ok(),
            time_range: self
                .header
                .range
                .and_then(|range| http::HeaderValue::from_str(&range.header_value()).ok()),
        })
    }

    /// The stored body's content encoding.
    pub fn encoding(&self) -> crate::encoding::Encoding {
        crate::encoding::Encoding::from_token(&self.header.encoding)
            .unwrap_or(crate::encoding::Encoding::Identity)
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut out = BytesMut::with_capacity(PREFIX_LEN + header.len() + self.body.len());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u32(header.len() as u32);
        out.put_slice(&header);
        out.put_slice(&self.body);
        out.into()
    }

    pub fn decode(bytes: Bytes) -> Result<Entry, EntryError> {
        if bytes.len() < PREFIX_LEN || &bytes[..3] != MAGIC {
            return Err(EntryError::NotAnEntry);
        }
        if bytes[3] != VERSION {
            return Err(EntryError::Version(bytes[3]));
        }
        let header_len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let body_start = PREFIX_LEN
            .checked_add(header_len)
            .filter(|&end| end <= bytes.len())
            .ok_or(EntryError::Truncated)?;
        let header = serde_json::from_slice(&bytes[PREFIX_LEN..body_start])
            .map_err(|e| EntryError::Header(e.to_string()))?;
        Ok(Entry {
            header,
            body: bytes.slice(body_start..),
            identity: Default::default(),
            read_once: Default::default(),
            served: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let body = Bytes::from_static(b"{\"data\":[]}\n");
        Entry {
            header: EntryHeader {
                created_ms: 1,
                fresh_until_ms: 2,
                stale_until_ms: 3,
                compute_ms: 4,
                etag: Entry::etag_of(&body),
                content_type: "application/json".into(),
                encoding: "identity".into(),
                range: Some(crate::timeexpr::TimeRange { from: 5, to: 6 }),
                headers: vec![("x-clickhouse-format".into(), "JSON".into())],
            },
            body,
            identity: Default::default(),
            read_once: Default::default(),
            served: Default::default(),
        }
    }

    #[test]
    fn round_trips() {
        let e = entry();
        assert_eq!(Entry::decode(Bytes::from(e.encode())).unwrap(), e);
    }

    #[test]
    fn refuses_foreign_old_and_truncated_bytes() {
        let encoded = entry().encode();
        let mut old = encoded.clone();
        old[3] = VERSION.wrapping_add(1);
        assert_eq!(
            Entry::decode(Bytes::from(old)),
            Err(EntryError::Version(VERSION.wrapping_add(1)))
        );
        assert_eq!(
            Entry::decode(Bytes::from_static(b"hello world")),
            Err(EntryError::NotAnEntry)
        );
        assert_eq!(
            Entry::decode(Bytes::from(encoded[..12].to_vec())),
            Err(EntryError::Truncated)
        );
    }
}
