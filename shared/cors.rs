//! CORS rules that do not depend on HTTP serving: what an origin pattern of
//! `[cors] allowed_origins` means and whether an origin matches it, and the
//! request and response headers always allowed and exposed.
//!
//! The config check ([`crate::check`]) parses patterns with
//! [`OriginPattern::parse`] to report bad ones; the proxy compiles the same
//! patterns once at start and answers preflights and adds headers. This module
//! does no I/O and knows nothing of requests.

use std::fmt;

/// Request headers a page may always send (`Access-Control-Allow-Headers`).
pub const ALLOWED_HEADERS: &[&str] = &[
    "Authorization",
    "X-API-Key",
    "If-None-Match",
    "Accept",
    "Accept-Encoding",
];

/// Response headers a page may always read (`Access-Control-Expose-Headers`).
pub const EXPOSED_HEADERS: &[&str] = &[
    "X-Cache",
    "Age",
    "ETag",
    "Cache-Control",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Retry-After",
    "Server-Timing",
    "Content-Disposition",
    "X-Time-Range",
];

/// One entry of `allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// `*`: any origin.
    Any,
    /// One origin, `scheme://host[:port]`, lowercase.
    Exact(String),
    /// `scheme://*.domain[:port]`: every subdomain of `domain` (not `domain`
    /// itself), with exactly that scheme and port.
    Subdomains {
        /// `https://`
        scheme: String,
        /// `.example.com` or `.example.com:8443`
        suffix: String,
    },
}

/// Why an `allowed_origins` entry is not an origin pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("`{0}` has no scheme: write it as a browser sends it, e.g. `https://{0}`")]
    NoScheme(String),
    #[error("`{0}`: only http and https origins can be allowed")]
    Scheme(String),
    #[error(
        "`{0}` is not an origin: an origin is scheme://host[:port], without a path or a trailing slash"
    )]
    NotAnOrigin(String),
    #[error("`{0}`: a wildcard may only stand for subdomains, as in `https://*.example.com`")]
    Wildcard(String),
    #[error(
        "`null` cannot be allowed: it is the origin of files and sandboxed pages, which anyone can make"
    )]
    Null,
}

impl OriginPattern {
    pub fn parse(text: &str) -> Result<OriginPattern, OriginError> {
        let text = text.trim();
        if text == "*" {
            return Ok(OriginPattern::Any);
        }
        if text.eq_ignore_ascii_case("null") {
            return Err(OriginError::Null);
        }
        let lower = text.to_ascii_lowercase();
        let Some((scheme, rest)) = lower.split_once("://") else {
            return Err(OriginError::NoScheme(text.to_owned()));
        };
        if scheme != "http" && scheme != "https" {
            return Err(OriginError::Scheme(text.to_owned()));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        };
        if let Some(port) = port
            && (port.is_empty()
                || !port.bytes().all(|b| b.is_ascii_digit())
                || port.parse::<u16>().is_err())
        {
            return Err(OriginError::NotAnOrigin(text.to_owned()));
        }
        let (wildcard, domain) = match host.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, host),
        };
        if domain.contains('*') {
            return Err(OriginError::Wildcard(text.to_owned()));
        }
        if !is_host(domain) {
            return Err(OriginError::NotAnOrigin(text.to_owned()));
        }
        if wildcard {
            Ok(OriginPattern::Subdomains {
                scheme: format!("{scheme}://"),
                suffix: rest[1..].to_owned(),
            })
        } else {
            Ok(OriginPattern::Exact(lower))
        }
    }

    /// Whether `origin` (an `Origin` header's bytes) matches.
    pub fn matches(&self, origin: &[u8]) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(exact) => origin.eq_ignore_ascii_case(exact.as_bytes()),
            OriginPattern::Subdomains { scheme, suffix } => {
                let (scheme, suffix) = (scheme.as_bytes(), suffix.as_bytes());
                if origin.len() <= scheme.len() + suffix.len()
                    || !origin[..scheme.len()].eq_ignore_ascii_case(scheme)
                    || !origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                {
                    return false;
                }
                // What the `*` stands for: one or more labels, no port, no path.
                let labels = &origin[scheme.len()..origin.len() - suffix.len()];
                labels.first() != Some(&b'.')
                    && labels.last() != Some(&b'.')
                    && labels
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            }
        }
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginPattern::Any => f.write_str("*"),
            OriginPattern::Exact(origin) => f.write_str(origin),
            OriginPattern::Subdomains { scheme, suffix } => write!(f, "{scheme}*{suffix}"),
        }
    }
}

/// A host name or address as it appears in an origin: DNS labels, an IPv4
/// address, or a bracketed IPv6 address.
fn is_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Whether `name` can be a header name (an RFC 9110 token).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, origin: &str) -> bool {
        OriginPattern::parse(pattern)
            .unwrap()
            .matches(origin.as_bytes())
    }

    #[test]
    fn exact_origins_match_only_themselves() {
        assert!(allows(
            "https://dash.example.com",
            "https://dash.example.com"
        ));
        assert!(allows(
            "https://Dash.Example.com",
            "https://dash.example.com"
        ));
        assert!(allows("http://127.0.0.1:3000", "http://127.0.0.1:3000"));
        assert!(!allows(
            "https://dash.example.com",
            "http://dash.example.com"
        ));
        assert!(!allows(
            "https://dash.example.com",
            "https://dash.example.com:444"
        ));
        assert!(!allows(
            "https://dash.example.com",
            "https://dash.example.com.evil.net"
        ));
        assert!(!allows("http://127.0.0.1:3000", "http://127.0.0.1:3001"));
        assert!(allows("http://[::1]:8080", "http://[::1]:8080"));
    }

    #[test]
    fn a_wildcard_stands_for_subdomains_only() {
        let p = "https://*.example.com";
        assert!(allows(p, "https://a.example.com"));
        assert!(allows(p, "https://a.b.example.com"));
        assert!(allows(p, "https://A-1.example.com"));
        assert!(!allows(p, "https://example.com"));
        assert!(!allows(p, "https://.example.com"));
        assert!(!allows(p, "http://a.example.com"));
        assert!(!allows(p, "https://a.example.com:8443"));
        assert!(!allows(p, "https://evilexample.com"));
        assert!(!allows(p, "https://a.example.com.evil.net"));
        assert!(!allows(p, "https://x:1@a.example.com"));
        let ported = "http://*.localhost:8080";
        assert!(allows(ported, "http://a.localhost:8080"));
        assert!(!allows(ported, "http://a.localhost"));
        assert!(!allows(ported, "http://a.localhost:8081"));
        assert!(allows("*", "https://anything.test"));
    }

    #[test]
    fn bad_patterns_say_why() {
        use OriginError::*;
        let err = |p: &str| OriginPattern::parse(p).unwrap_err();
        assert_eq!(err("dash.example.com"), NoScheme("dash.example.com".into()));
        assert_eq!(
            err("ftp://x.example.com"),
            Scheme("ftp://x.example.com".into())
        );
        assert_eq!(
            err("https://x.example.com/"),
            NotAnOrigin("https://x.example.com/".into())
        );
        assert_eq!(
            err("https://x.example.com/app"),
            NotAnOrigin("https://x.example.com/app".into())
        );
        assert_eq!(
            err("https://x.example.com:99999"),
            NotAnOrigin("https://x.example.com:99999".into())
        );
        assert_eq!(
            err("https://a.*.example.com"),
            Wildcard("https://a.*.example.com".into())
        );
        assert_eq!(
            err("https://*example.com"),
            Wildcard("https://*example.com".into())
        );
        assert_eq!(err("null"), Null);
    }

    #[test]
    fn header_names_are_tokens() {
        assert!(is_header_name("X-Dashboard-Id"));
        assert!(!is_header_name("X Dashboard"));
        assert!(!is_header_name(""));
        assert!(!is_header_name("X-Ä"));
    }
}
