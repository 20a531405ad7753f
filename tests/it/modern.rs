//! Current ClickHouse servers' HTTP behaviour, replayed byte for byte.
//!
//! No server newer than 18.16 installs here, so a loopback server replays what
//! current releases write on the wire, as their source writes it
//! (`WriteBufferFromHTTP1ServerResponse::cancelWithException`,
//! `JSONRowOutputFormat::finalizeImpl`, `JSONUtils::writeException`):
//! - an error before the first byte: a 4xx/5xx with `X-ClickHouse-Exception-Code`,
//!   or (progress headers already sent, 22.5+) the same header on a `200 OK`;
//! - 23.9–25.10 (`http_write_exception_in_output_format=1`): JSON formats
//!   carry the exception as their own member, `"exception": "Code: …"`;
//! - 25.1–25.10: a chunk `__exception__\r\n<message>\n`, and the final chunk
//!   deliberately never sent (the connection is closed instead);
//! - 25.11+: `X-ClickHouse-Exception-Tag` on every response, and a failure
//!   writes `\r\n__exception__\r\n<TAG>\r\n<message>\n<length> <TAG>\r\n__exception__\r\n`
//!   before breaking the stream the same way;
//! - 25.10+: `enable_http_compression` is on by default, so a server gzips
//!   whenever the request says `Accept-Encoding: gzip`.
//!
//! The proxy pointed at such a server must never serve or cache these as
//! success: before the first byte a JSON 503, after it a transfer the client
//! sees as cut (an NDJSON export ends with an `{"error":…}` line).

use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Proxy, ProxyOptions, Reply, request};

/// One request the fixture server received: its head (request line and
/// headers, lower-cased names) and its body (the SQL).
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    sql: String,
}

impl Seen {
    /// The value of `name` in the request's URL query.
    fn param(&self, name: &str) -> Option<String> {
        let target = self.head.lines().next()?.split(' ').nth(1)?;
        let query = target.split_once('?')?.1;
        form_urlencoded::parse(query.as_bytes())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.into_owned())
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The ClickHouse format the crate asked for (`default_format`).
    fn format(&self) -> String {
        self.param("default_format").unwrap_or_else(|| "TSV".into())
    }
}

/// What the server writes for one request: the exact bytes, and whether it
/// then closes the connection (a broken stream) instead of keeping it alive.
struct Wire {
    bytes: Vec<u8>,
    close: bool,
}

type Respond = dyn Fn(&Seen) -> Wire + Send + Sync;

/// A loopback server answering every query with `respond` (the health
/// check's `SELECT 1` and `KILL QUERY` get a current server's plain answer).
struct FixtureServer {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FixtureServer {
    async fn start(respond: impl Fn(&Seen) -> Wire + Send + Sync + 'static) -> FixtureServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Respond> = Arc::new(respond);
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream, respond.clone(), seen.clone()));
                }
            }
        });
        FixtureServer { url, seen, task }
    }

    /// The queries received so far (health checks and kills left out).
    fn queries(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for FixtureServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, respond: Arc<Respond>, seen: Arc<Mutex<Vec<Seen>>>) {
    let mut buffer = Vec::new();
    loop {
        // The head, up to the blank line.
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let sql = String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned();
        buffer.drain(..head_end + length);
        let request = Seen { head, sql };
        let wire = if request.sql.trim() == "SELECT 1" {
            success(&request, b"1\n".to_vec(), false)
        } else if request.sql.starts_with("KILL QUERY") {
            success(&request, Vec::new(), false)
        } else {
            seen.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(request.clone());
            respond(&request)
        };
        if stream.write_all(&wire.bytes).await.is_err() || wire.close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// The exception tag of the 25.11+ fixtures (16 random lower-case letters there).
const TAG: &str = "dngjzjnxkvlwkeua";

/// A current server's response head. `tagged`: 25.11+ (the tag header on every
/// response); `extra`: headers the case adds (exception code, encoding).
fn head(status: &str, request: &Seen, tagged: bool, extra: &[(&str, &str)]) -> String {
    let format = request.format();
    let content_type = match format.as_str() {
        "JSON" => "application/json; charset=UTF-8",
        "JSONEachRow" => "application/x-ndjson; charset=UTF-8",
        "CSVWithNames" => "text/csv; charset=UTF-8; header=present",
        _ => "text/tab-separated-values; charset=UTF-8",
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\n\
         Date: Thu, 03 Dec 2026 19:00:00 GMT\r\n\
         Connection: Keep-Alive\r\n\
         Content-Type: {content_type}\r\n\
         Transfer-Encoding: chunked\r\n\
         X-ClickHouse-Server-Display-Name: ch-1\r\n\
         X-ClickHouse-Query-Id: {}\r\n\
         X-ClickHouse-Format: {format}\r\n\
         X-ClickHouse-Timezone: UTC\r\n",
        request.param("query_id").unwrap_or_default()
    );
    if tagged {
        head.push_str(&format!("X-ClickHouse-Exception-Tag: {TAG}\r\n"));
    }
    head.push_str("Keep-Alive: timeout=30, max=9999\r\n");
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(
        "X-ClickHouse-Summary: {\"read_rows\":\"3000\",\"read_bytes\":\"24000\",\"written_rows\":\"0\",\"written_bytes\":\"0\",\"total_rows_to_read\":\"3000\",\"result_rows\":\"0\",\"result_bytes\":\"0\",\"elapsed_ns\":\"1250000\"}\r\n\r\n",
    );
    head
}

/// `data` as HTTP/1.1 chunks of at most 16 KiB (one per flushed buffer).
fn chunked(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in data.chunks(16 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The final chunk a complete response ends with.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A complete 200 answer with `body`.
fn success(request: &Seen, body: Vec<u8>, tagged: bool) -> Wire {
    let mut bytes = head("200 OK", request, tagged, &[]).into_bytes();
    bytes.extend(chunked(&body));
    bytes.extend_from_slice(LAST_CHUNK);
    Wire {
        bytes,
        close: false,
    }
}

const MESSAGE: &str = "Code: 395. DB::Exception: Value passed to 'throwIf' function is non-zero: while executing 'FUNCTION throwIf(equals(__table1.number, 2_UInt8) :: 1) -> throwIf(equals(__table1.number, 2_UInt8)) UInt8 : 0'. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO) (version 25.8.1.1)";

/// `rows` rows of the requested format, as the server writes them before a
/// failure (JSON without its closing part).
fn rows(request: &Seen, rows: usize) -> Vec<u8> {
    let mut out = String::new();
    let format = request.format();
    match format.as_str() {
        "JSON" => out.push_str(
            "{\n\t\"meta\":\n\t[\n\t\t{\n\t\t\t\"name\": \"n\",\n\t\t\t\"type\": \"UInt64\"\n\t\t},\n\t\t{\n\t\t\t\"name\": \"s\",\n\t\t\t\"type\": \"String\"\n\t\t}\n\t],\n\n\t\"data\":\n\t[",
        ),
        "CSVWithNames" => out.push_str("\"n\",\"s\"\n"),
        "TSVWithNames" => out.push_str("n\ts\n"),
        _ => {}
    }
    for n in 0..rows {
        match format.as_str() {
            "JSON" => {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(&format!(
                    "\n\t\t{{\n\t\t\t\"n\": {n},\n\t\t\t\"s\": \"row {n:08}\"\n\t\t}}"
                ));
            }
            "JSONEachRow" => out.push_str(&format!("{{\"n\":{n},\"s\":\"row {n:08}\"}}\n")),
            "CSVWithNames" => out.push_str(&format!("{n},\"row {n:08}\"\n")),
            _ => out.push_str(&format!("{n}\trow {n:08}\n")),
        }
    }
    out.into_bytes()
}

/// The rest of a complete JSON document after `rows` rows.
fn json_end(rows: usize) -> String {
    format!(
        "\n\t],\n\n\t\"rows\": {rows},\n\n\t\"statistics\":\n\t{{\n\t\t\"elapsed\": 0.001,\n\t\t\"rows_read\": {rows},\n\t\t\"bytes_read\": 8000\n\t}}\n}}\n"
    )
}

/// A complete answer of `n` rows in the requested format.
fn complete_body(request: &Seen, n: usize) -> Vec<u8> {
    let mut body = rows(request, n);
    if request.format() == "JSON" {
        body.extend(json_end(n).into_bytes());
    }
    body
}

/// Rows before a failure: few (the failure is known before the proxy's
/// first byte: 64 KiB are held back) or many (it comes after).
#[derive(Clone, Copy, Debug, PartialEq)]
enum When {
    BeforeFirstByte,
    MidStream,
}

impl When {
    fn rows(self) -> usize {
        match self {
            When::BeforeFirstByte => 3,
            // ~150 KiB in every format: past the proxy's 64 KiB hold-back.
            When::MidStream => 5000,
        }
    }
}

/// 23.9–25.10 with `http_write_exception_in_output_format=1`: the format
/// writes the exception as its own member and the response completes.
fn in_output_format(request: &Seen, when: When) -> Wire {
    let n = when.rows();
    let mut body = rows(request, n);
    match request.format().as_str() {
        "JSON" => body.extend(
            format!(
                "\n\t],\n\n\t\"rows\": {n},\n\n\t\"exception\": {}\n}}\n",
                serde_json::to_string(MESSAGE).expect("json")
            )
            .into_bytes(),
        ),
        "JSONEachRow" => body.extend(
            format!(
                "{{\"exception\": {}}}\n",
                serde_json::to_string(MESSAGE).expect("json")
            )
            .into_bytes(),
        ),
        // Formats without an exception writer get the text appended.
        _ => body.extend(format!("{MESSAGE}\n").into_bytes()),
    }
    success(request, body, false)
}

/// 25.1–25.10: a new chunk with the marker and the message, then the
/// connection closed without the final chunk.
fn marker_unterminated(request: &Seen, when: When) -> Wire {
    let mut bytes = head("200 OK", request, false, &[]).into_bytes();
    bytes.extend(chunked(&rows(request, when.rows())));
    bytes.extend(chunked(format!("__exception__\r\n{MESSAGE}\n").as_bytes()));
    Wire { bytes, close: true }
}

/// 25.11+: the tagged block in a chunk of its own, then the stream broken.
fn tagged_block(request: &Seen, when: When) -> Wire {
    let mut bytes = head("200 OK", request, true, &[]).into_bytes();
    bytes.extend(chunked(&rows(request, when.rows())));
    let message = format!("{MESSAGE}\n").replace("25.8.1.1", "25.11.1.1");
    let block = format!(
        "\r\n__exception__\r\n{TAG}\r\n{message}{} {TAG}\r\n__exception__\r\n",
        message.len()
    );
    bytes.extend(chunked(block.as_bytes()));
    Wire { bytes, close: true }
}

/// An error before anything was sent: the status and `X-ClickHouse-Exception-Code`.
fn refused(request: &Seen, status: &str, code: u32, message: &str) -> Wire {
    let code_text = code.to_string();
    let mut bytes = head(
        status,
        request,
        true,
        &[("X-ClickHouse-Exception-Code", code_text.as_str())],
    )
    .into_bytes();
    bytes.extend(chunked(format!("{message}\n").as_bytes()));
    bytes.extend_from_slice(LAST_CHUNK);
    Wire {
        bytes,
        close: false,
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

/// A 25.10+ server: a complete answer, gzipped when the request accepts gzip
/// (`enable_http_compression=1` by default); `always`: a front that
/// compresses whatever the request said.
fn compressing(request: &Seen, always: bool) -> Wire {
    let body = complete_body(request, 50);
    let accepts = request
        .header("accept-encoding")
        .is_some_and(|v| v.contains("gzip"));
    if !(accepts || always) {
        return success(request, body, true);
    }
    let mut bytes = head("200 OK", request, true, &[("Content-Encoding", "gzip")]).into_bytes();
    bytes.extend(chunked(&gzip(&body)));
    bytes.extend_from_slice(LAST_CHUNK);
    Wire {
        bytes,
        close: false,
    }
}

/// A proxy whose ClickHouse is `server`, with a query `fixture` (its SQL
/// only reaches the fixture server).
async fn proxy_for(server: &FixtureServer) -> Proxy {
    Proxy::start_with(ProxyOptions {
        clickhouse_url: server.url.clone(),
        extra_queries: vec![(
            "fixture".into(),
            "SELECT number AS n, toString(number) AS s FROM numbers(10)".into(),
            "ttl = \"5m\"".into(),
        )],
        // Every request reaches the fixture: what is checked is how each
        // answer is judged, not the backoff after a failure (outage.rs).
        set: vec![("coalesce", "backoff", "0s".into())],
        ..Default::default()
    })
    .await
}

/// The query paths, one per format.
const QUERY_PATHS: [&str; 4] = [
    "/v1/query/fixture?format=json",
    "/v1/query/fixture?format=ndjson",
    "/v1/query/fixture?format=csv",
    "/v1/query/fixture?format=tsv",
];

/// The export paths, one per line format.
const EXPORT_PATHS: [&str; 3] = [
    "/v1/export/events?from=2026-01-01&to=2026-01-02&format=ndjson",
    "/v1/export/events?from=2026-01-01&to=2026-01-02&format=csv",
    "/v1/export/events?from=2026-01-01&to=2026-01-02&format=tsv",
];

/// `reply` is not a complete success and leaks nothing of the exception.
/// A query failing before its first byte is a JSON 503 naming the code; an
/// export may instead stream the complete rows before the failure and then
/// end as a failure (NDJSON: an `{"error":…}` line; CSV/TSV: cut).
fn assert_failed(reply: Option<&Reply>, what: &str, when: When) {
    let export = what.contains("/v1/export/");
    let Some(reply) = reply else {
        // Cut before the response head was out: the client sees an error.
        assert!(
            export || when == When::MidStream,
            "{what}: no response at all"
        );
        return;
    };
    if when == When::BeforeFirstByte && (!export || reply.status != 200) {
        assert_eq!(reply.status, 503, "{what}: {:?}", reply.body);
        assert_eq!(reply.json()["type"], "upstream_error", "{what}");
        assert!(
            export
                || reply.json()["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("395")),
            "{what}: {}",
            reply.text()
        );
    }
    let body = match &reply.body {
        Err(_) => return, // cut: the client knows it is incomplete
        Ok(body) => String::from_utf8_lossy(body).into_owned(),
    };
    assert!(!body.contains("__exception__"), "{what}: marker leaked");
    assert!(!body.contains(TAG), "{what}: tag leaked");
    assert!(!body.contains("DB::Exception"), "{what}: exception leaked");
    if reply.status == 200 {
        // A 200 whose body arrived whole must say it failed: an NDJSON
        // export's last line is its error.
        let last = body.lines().last().unwrap_or_default();
        assert!(
            what.contains("ndjson") && last.starts_with("{\"error\"") && last.contains("395"),
            "{what}: a failed answer arrived as a complete success ({} bytes, last line {last:?})",
            body.len()
        );
    }
}

/// GET `path` with the proxy's key; `None` when the transfer was cut before
/// the response head arrived (hyper drops a response whose body fails before
/// its first bytes were flushed).
async fn fetch(proxy: &Proxy, path: &str) -> Option<Reply> {
    let auth = format!("Bearer {}", proxy.key);
    request(
        &format!("{}{path}", proxy.base),
        &[("authorization", auth.as_str())],
    )
    .await
    .ok()
}

/// Every query and export path against `respond`: never a success, never cached.
async fn check_never_success(respond: fn(&Seen, When) -> Wire, when: When, name: &str) {
    let server = FixtureServer::start(move |r| respond(r, when)).await;
    let proxy = proxy_for(&server).await;
    for path in QUERY_PATHS.iter().chain(&EXPORT_PATHS) {
        let what = format!("{name} {when:?} {path}");
        let before = server.queries().len();
        let reply = fetch(&proxy, path).await;
        assert_failed(reply.as_ref(), &what, when);
        // Not cached: the same request goes to the server again.
        let again = fetch(&proxy, path).await;
        assert!(again.as_ref().is_none_or(|r| r.cache() != "HIT"), "{what}");
        assert_failed(again.as_ref(), &what, when);
        assert!(server.queries().len() >= before + 2, "{what}");
    }
    assert_eq!(
        proxy
            .metric("dashcache_cache_stores_total{result=\"stored\"}")
            .await,
        0.0,
        "{name} {when:?}"
    );
}

#[tokio::test]
async fn exceptions_in_the_output_format_23_9_to_25_10_are_never_served() {
    for when in [When::BeforeFirstByte, When::MidStream] {
        check_never_success(in_output_format, when, "exception in output format").await;
    }
}

#[tokio::test]
async fn the_25_1_marker_on_an_unterminated_stream_is_never_served() {
    for when in [When::BeforeFirstByte, When::MidStream] {
        check_never_success(marker_unterminated, when, "__exception__ unterminated").await;
    }
}

#[tokio::test]
async fn the_25_11_tagged_block_is_never_served() {
    for when in [When::BeforeFirstByte, When::MidStream] {
        check_never_success(tagged_block, when, "tagged __exception__").await;
    }
}

#[tokio::test]
async fn an_error_before_the_first_byte_with_its_exception_code_is_a_503() {
    // 500 (throwIf); 403 READONLY (a readonly=1 profile refusing the
    // proxy's settings); a 200 whose headers carry the code (progress
    // headers were already sent).
    let cases: [(&str, u32, &str); 3] = [
        ("500 Internal Server Error", 395, MESSAGE),
        (
            "403 Forbidden",
            164,
            "Code: 164. DB::Exception: dashcache: Cannot modify 'max_execution_time' setting in readonly mode. (READONLY) (version 25.11.1.1)",
        ),
        (
            "200 OK",
            159,
            "Code: 159. DB::Exception: Timeout exceeded: elapsed 30.0 seconds, maximum: 30. (TIMEOUT_EXCEEDED) (version 25.11.1.1)",
        ),
    ];
    for (status, code, message) in cases {
        let server = FixtureServer::start(move |r| refused(r, status, code, message)).await;
        let proxy = proxy_for(&server).await;
        for path in QUERY_PATHS.iter().chain(&EXPORT_PATHS) {
            let what = format!("{status} {code} {path}");
            for _ in 0..2 {
                let reply = proxy.get(path).await;
                assert_eq!(reply.status, 503, "{what}: {:?}", reply.body);
                assert_ne!(reply.cache(), "HIT", "{what}");
                let kind = if code == 159 {
                    "upstream_timeout"
                } else {
                    "upstream_error"
                };
                assert_eq!(reply.json()["type"], kind, "{what}");
                if path.starts_with("/v1/query/") && code != 159 {
                    let detail = reply.json()["detail"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    assert!(detail.contains(&code.to_string()), "{what}: {detail}");
                }
                assert!(!reply.text().contains("DB::Exception"), "{what}");
            }
        }
        assert_eq!(
            proxy
                .metric("dashcache_cache_stores_total{result=\"stored\"}")
                .await,
            0.0
        );
    }
}

#[tokio::test]
async fn a_current_servers_clean_answers_are_served_and_cached_with_the_proxys_settings() {
    // 25.10+: compression on by default, the tag header on every response.
    let server = FixtureServer::start(|r| compressing(r, false)).await;
    let proxy = proxy_for(&server).await;
    for path in QUERY_PATHS {
        let first = proxy.get(path).await;
        assert_eq!(first.status, 200, "{path}: {:?}", first.body);
        assert_eq!(first.cache(), "MISS", "{path}");
        let second = proxy.get(path).await;
        assert_eq!(second.cache(), "HIT", "{path}");
        assert_eq!(first.text(), second.text(), "{path}");
    }
    for path in EXPORT_PATHS {
        let reply = proxy.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
        assert!(reply.text().contains("row 00000049"), "{path}");
    }
    let queries = server.queries();
    assert_eq!(queries.len(), QUERY_PATHS.len() + EXPORT_PATHS.len());
    for query in &queries {
        // dashcache never asks for compression, so such a server sends plain bytes...
        assert_eq!(query.header("accept-encoding"), None, "{}", query.head);
        // ...and every query carries the settings a readonly=1 user must be
        // allowed to change (README: "ClickHouse user").
        for setting in [
            "readonly",
            "max_execution_time",
            "max_result_rows",
            "max_result_bytes",
            "result_overflow_mode",
            "output_format_json_quote_64bit_integers",
            "query_id",
        ] {
            assert!(query.param(setting).is_some(), "{setting}: {}", query.head);
        }
        assert_eq!(query.param("readonly").as_deref(), Some("1"));
        assert_eq!(
            query
                .param("output_format_json_quote_64bit_integers")
                .as_deref(),
            Some("0")
        );
    }
}

#[tokio::test]
async fn a_compressed_body_the_proxy_did_not_ask_for_is_never_served() {
    let server = FixtureServer::start(|r| compressing(r, true)).await;
    let proxy = proxy_for(&server).await;
    for path in QUERY_PATHS.iter().chain(&EXPORT_PATHS) {
        for _ in 0..2 {
            let reply = proxy.get(path).await;
            assert_eq!(reply.status, 503, "{path}: {:?}", reply.body);
            assert_ne!(reply.cache(), "HIT", "{path}");
        }
    }
}
