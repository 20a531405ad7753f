//! One request to the ClickHouse-compatible endpoint, as dashcache reads it.
//!
//! Owns splitting what a client sends (URL parameters, the body, the
//! `X-ClickHouse-*` headers) into: the credentials, the SQL, the parameters
//! forwarded to ClickHouse (settings, `database`, `default_format`,
//! `param_*`, `compress`, with the tier's limits applied), and the cache
//! identity. Parameters that only concern one connection or one client —
//! `query_id`, `session_*`, `wait_end_of_query`, progress settings,
//! compression of the response, credentials — are neither forwarded nor part
//! of the identity; neither are `User-Agent` or any other header.

use std::collections::BTreeMap;

use http::HeaderMap;

/// Parameters that never reach ClickHouse and never split the cache.
const DROPPED: &[&str] = &[
    "query",
    "query_id",
    "session_id",
    "session_timeout",
    "session_check",
    "wait_end_of_query",
    "buffer_size",
    "send_progress_in_http_headers",
    "http_headers_progress_interval_ms",
    "send_progress",
    "user",
    "password",
    "quota_key",
    "enable_http_compression",
    "http_zlib_compression_level",
    "readonly",
    "no_cache",
    "use_query_cache",
    "log_comment",
];

/// Limits a client may lower but not raise.
pub const LIMITS: [&str; 3] = ["max_execution_time", "max_result_rows", "max_result_bytes"];

/// Credentials as presented, in ClickHouse's ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// What a request asks, split up.
#[derive(Debug, Clone)]
pub struct Asked {
    pub credentials: Option<Credentials>,
    /// Parameters sent on to ClickHouse (before the tier's limits), sorted.
    pub forwarded: BTreeMap<String, String>,
    /// The client's `query_id`, if any (echoed in `X-ClickHouse-Query-Id`).
    pub query_id: Option<String>,
    /// `enable_http_compression=1`: the response may be compressed.
    pub compress_response: bool,
    /// `no_cache=1` or `use_query_cache=0`.
    pub no_cache: bool,
}

/// Reads the URL's parameters and the headers.
pub fn read(query: Option<&str>, headers: &HeaderMap) -> (Asked, Option<String>) {
    let mut forwarded = BTreeMap::new();
    let mut sql = None;
    let mut url_user = None;
    let mut url_password = None;
    let mut query_id = None;
    let mut compress_response = false;
    let mut no_cache = false;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "query" => sql = Some(value.into_owned()),
            "user" => url_user = Some(value.into_owned()),
            "password" => url_password = Some(value.into_owned()),
            "query_id" => query_id = Some(value.into_owned()).filter(|v| !v.is_empty()),
            "enable_http_compression" => compress_response = value == "1",
            "no_cache" => no_cache |= value == "1",
            "use_query_cache" => no_cache |= value == "0",
            other if DROPPED.contains(&other) => {}
            other => {
                forwarded.insert(other.to_owned(), value.into_owned());
            }
        }
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if !forwarded.contains_key("database")
        && let Some(database) = header("x-clickhouse-database")
    {
        forwarded.insert("database".into(), database);
    }
    if !forwarded.contains_key("default_format")
        && let Some(format) = header("x-clickhouse-format")
    {
        forwarded.insert("default_format".into(), format);
    }
    let credentials = basic(headers)
        .or_else(|| {
            header("x-clickhouse-user").map(|user| Credentials {
                user,
                password: header("x-clickhouse-key").unwrap_or_default(),
            })
        })
        .or_else(|| {
            url_user.clone().map(|user| Credentials {
                user,
                password: url_password.clone().unwrap_or_default(),
            })
        })
        .or_else(|| {
            // A key alone (no user) still identifies a dashcache key.
            url_password.map(|password| Credentials {
                user: String::new(),
                password,
            })
        });
    (
        Asked {
            credentials,
            forwarded,
            query_id,
            compress_response,
            no_cache,
        },
        sql,
    )
}

/// `Authorization: Basic base64(user:password)`.
fn basic(headers: &HeaderMap) -> Option<Credentials> {
    use base64::Engine as _;
    let value = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':').unwrap_or((&text, ""));
    Some(Credentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

/// The SQL of a request: the `query` parameter, then the body (ClickHouse
/// joins them with a newline).
pub fn sql(param: Option<String>, body: &[u8]) -> Result<String, std::str::Utf8Error> {
    let body = std::str::from_utf8(body)?;
    Ok(match (param, body.is_empty()) {
        (Some(param), true) => param,
        (Some(param), false) => format!("{param}\n{body}"),
        (None, _) => body.to_owned(),
    })
}

/// `forwarded` with the limits no client may raise: each of [`LIMITS`] is
/// the smaller of the client's value and `ceiling`'s, and `readonly` is dashcache's.
pub fn with_limits(
    forwarded: &BTreeMap<String, String>,
    readonly: u8,
    ceilings: [u64; 3],
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = vec![("readonly".into(), readonly.to_string())];
    for (name, ceiling) in LIMITS.iter().zip(ceilings) {
        let asked = forwarded
            .get(*name)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|v| *v > 0);
        let value = asked.map_or(ceiling, |asked| asked.min(ceiling));
        out.push(((*name).to_owned(), value.to_string()));
    }
    out.extend(
        forwarded
            .iter()
            .filter(|(name, _)| !LIMITS.contains(&name.as_str()))
            .map(|(n, v)| (n.clone(), v.clone())),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_parameters_are_dropped_and_settings_kept() {
        let mut headers = HeaderMap::new();
        headers.insert("x-clickhouse-format", "JSON".parse().unwrap());
        headers.insert("user-agent", "grafana/1".parse().unwrap());
        let (asked, sql) = read(
            Some(
                "query=SELECT+1&query_id=q1&session_id=s&wait_end_of_query=1&max_threads=2&param_x=3&database=demo&user=k1&password=secret&enable_http_compression=1",
            ),
            &headers,
        );
        assert_eq!(sql.as_deref(), Some("SELECT 1"));
        assert_eq!(asked.query_id.as_deref(), Some("q1"));
        assert!(asked.compress_response);
        let forwarded: Vec<_> = asked
            .forwarded
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            forwarded,
            [
                "database=demo",
                "default_format=JSON",
                "max_threads=2",
                "param_x=3"
            ]
        );
        assert_eq!(
            asked.credentials,
            Some(Credentials {
                user: "k1".into(),
                password: "secret".into()
            })
        );
    }

    #[test]
    fn credentials_come_from_basic_then_headers_then_parameters() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Basic dTE6cDE=".parse().unwrap()); // u1:p1
        headers.insert("x-clickhouse-user", "u2".parse().unwrap());
        headers.insert("x-clickhouse-key", "p2".parse().unwrap());
        let (asked, _) = read(Some("user=u3&password=p3"), &headers);
        assert_eq!(asked.credentials.unwrap().user, "u1");
        headers.remove("authorization");
        let (asked, _) = read(Some("user=u3&password=p3"), &headers);
        assert_eq!(asked.credentials.unwrap().password, "p2");
        let (asked, _) = read(Some("user=u3&password=p3"), &HeaderMap::new());
        assert_eq!(asked.credentials.unwrap().user, "u3");
        let (asked, _) = read(None, &HeaderMap::new());
        assert_eq!(asked.credentials, None);
    }

    #[test]
    fn limits_are_lowered_never_raised() {
        let mut forwarded = BTreeMap::new();
        forwarded.insert("max_execution_time".into(), "1".into());
        forwarded.insert("max_result_rows".into(), "999999999".into());
        forwarded.insert("extremes".into(), "1".into());
        let sent = with_limits(&forwarded, 1, [30, 1000, 5000]);
        let sent: Vec<_> = sent.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            sent,
            [
                "readonly=1",
                "max_execution_time=1",
                "max_result_rows=1000",
                "max_result_bytes=5000",
                "extremes=1"
            ]
        );
    }

    #[test]
    fn the_query_parameter_and_the_body_are_joined() {
        assert_eq!(sql(Some("SELECT".into()), b"1").unwrap(), "SELECT\n1");
        assert_eq!(sql(None, b"SELECT 1").unwrap(), "SELECT 1");
        assert_eq!(sql(Some("SELECT 2".into()), b"").unwrap(), "SELECT 2");
    }
}
