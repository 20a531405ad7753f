//! Content encodings: negotiation, one-shot and streaming compression.
//!
//! Stored answers of [`STORE_THRESHOLD`] bytes or more are kept gzip-compressed
//! (every HTTP client accepts gzip, so such hits cost no compression work;
//! for the rare client that refuses gzip, the in-process cache keeps the
//! decompressed body once made);
//! streamed answers are compressed chunk by chunk, each chunk flushed so the
//! client can decode what it has. Which encoding a response gets is
//! [`negotiate`]'s call from `Accept-Encoding`. HTTP plumbing is the proxy's.

use std::io::{Read, Write};

use bytes::Bytes;

/// Answers at least this large are stored compressed. Smaller ones are
/// stored as they are: most dashboard answers, served to any client at no cost.
pub const STORE_THRESHOLD: usize = 16 * 1024;

/// A content encoding dashcache can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    /// The `Content-Encoding` token (and the entry header's `encoding`).
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }

    pub fn from_token(token: &str) -> Option<Encoding> {
        match token {
            "identity" => Some(Encoding::Identity),
            "gzip" | "x-gzip" => Some(Encoding::Gzip),
            "zstd" => Some(Encoding::Zstd),
            _ => None,
        }
    }
}

/// The best of `offered` for a request's `Accept-Encoding` (highest q-value,
/// then the order of `offered`); identity when nothing offered is acceptable.
pub fn negotiate(accept_encoding: Option<&str>, offered: &[Encoding]) -> Encoding {
    let Some(accept) = accept_encoding else {
        return Encoding::Identity;
    };
    let mut best = (0.0f32, Encoding::Identity);
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let token = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
            })
            .unwrap_or(1.0);
        if q <= 0.0 {
            continue;
        }
        let candidates: Vec<Encoding> = if token == "*" {
            offered.to_vec()
        } else {
            Encoding::from_token(&token).into_iter().collect()
        };
        for encoding in candidates {
            let Some(rank) = offered.iter().position(|o| *o == encoding) else {
                continue;
            };
            let better = q > best.0
                || (q == best.0
                    && offered
                        .iter()
                        .position(|o| *o == best.1)
                        .is_none_or(|r| rank < r));
            if better && encoding != Encoding::Identity {
                best = (q, encoding);
            }
        }
    }
    best.1
}

/// Compresses a whole body.
pub fn compress(body: &[u8], encoding: Encoding) -> std::io::Result<Bytes> {
    match encoding {
        Encoding::Identity => Ok(Bytes::copy_from_slice(body)),
        Encoding::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::new(6),
            );
            encoder.write_all(body)?;
            encoder.finish().map(Bytes::from)
        }
        Encoding::Zstd => zstd::bulk::compress(body, 3).map(Bytes::from),
    }
}

/// Decompresses a whole body, refusing to produce more than `limit` bytes.
pub fn decompress(body: &[u8], encoding: Encoding, limit: usize) -> std::io::Result<Bytes> {
    let mut out = Vec::new();
    let read = match encoding {
        Encoding::Identity => return Ok(Bytes::copy_from_slice(body)),
        Encoding::Gzip => flate2::read::GzDecoder::new(body)
            .take(limit as u64 + 1)
            .read_to_end(&mut out)?,
        Encoding::Zstd => zstd::stream::read::Decoder::new(body)?
            .take(limit as u64 + 1)
            .read_to_end(&mut out)?,
    };
    if read > limit {
        return Err(std::io::Error::other("decompressed body exceeds its limit"));
    }
    Ok(Bytes::from(out))
}

/// Compresses a stream chunk by chunk.
pub enum StreamEncoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(Box<zstd::stream::write::Encoder<'static, Vec<u8>>>),
}

impl StreamEncoder {
    /// `None` for identity: nothing to do.
    pub fn new(encoding: Encoding) -> std::io::Result<Option<StreamEncoder>> {
        Ok(match encoding {
            Encoding::Identity => None,
            // Level 1: streamed answers are compressed once per client.
            Encoding::Gzip => Some(StreamEncoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(1),
            ))),
            Encoding::Zstd => Some(StreamEncoder::Zstd(Box::new(
                zstd::stream::write::Encoder::new(Vec::new(), 1)?,
            ))),
        })
    }

    /// Compresses one chunk and flushes, so everything so far is decodable.
    pub fn chunk(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
        match self {
            StreamEncoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
            StreamEncoder::Zstd(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(Bytes::from(std::mem::take(e.get_mut())))
            }
        }
    }

    /// The closing bytes of the compressed stream.
    pub fn finish(self) -> std::io::Result<Bytes> {
        match self {
            StreamEncoder::Gzip(e) => e.finish().map(Bytes::from),
            StreamEncoder::Zstd(e) => e.finish().map(Bytes::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_q_values_then_our_preference() {
        let both = [Encoding::Zstd, Encoding::Gzip];
        assert_eq!(negotiate(None, &both), Encoding::Identity);
        assert_eq!(negotiate(Some("gzip, deflate, br"), &both), Encoding::Gzip);
        assert_eq!(negotiate(Some("gzip, zstd"), &both), Encoding::Zstd);
        assert_eq!(negotiate(Some("zstd;q=0.5, gzip"), &both), Encoding::Gzip);
        assert_eq!(
            negotiate(Some("gzip;q=0, zstd;q=0"), &both),
            Encoding::Identity
        );
        assert_eq!(negotiate(Some("*"), &both), Encoding::Zstd);
        assert_eq!(negotiate(Some("br"), &both), Encoding::Identity);
        assert_eq!(negotiate(Some("GZIP"), &[Encoding::Gzip]), Encoding::Gzip);
    }

    #[test]
    fn round_trips_whole_and_streamed() {
        let body = b"{\"t\":\"2024-01-01\",\"revenue\":1.5}\n".repeat(500);
        for encoding in [Encoding::Gzip, Encoding::Zstd] {
            let packed = compress(&body, encoding).unwrap();
            assert!(packed.len() < body.len() / 5);
            assert_eq!(decompress(&packed, encoding, body.len()).unwrap(), body);
            assert!(decompress(&packed, encoding, body.len() - 1).is_err());

            let mut stream = StreamEncoder::new(encoding).unwrap().unwrap();
            let mut out = Vec::new();
            for chunk in body.chunks(700) {
                out.extend_from_slice(&stream.chunk(chunk).unwrap());
            }
            out.extend_from_slice(&stream.finish().unwrap());
            assert_eq!(decompress(&out, encoding, body.len()).unwrap(), body);
        }
    }
}
