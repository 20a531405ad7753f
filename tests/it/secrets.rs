//! API keys never travel in URLs and never reach the logs: a key in a query
//! string is refused (400, saying which header to use, never echoing it), and
//! a run's log holds no full key, whatever the requests did (the request log
//! names keys by id).

use crate::harness::{Proxy, ProxyOptions};

const URL: &str = "/v1/query/top_countries?from=today-20d&to=today-2d&limit=3";

#[tokio::test]
async fn a_key_in_the_url_is_refused_and_no_log_line_holds_a_key() {
    let proxy = Proxy::start_with(ProxyOptions {
        set: vec![
            ("proxy", "request_log", "all".into()),
            ("auth", "protect_metrics", true.into()),
        ],
        ..Default::default()
    })
    .await;
    let key = proxy.key.clone();
    let bearer = format!("Bearer {key}");
    assert_eq!(proxy.get(URL).await.status, 200);

    for (path, headers) in [
        // With the key in a header as well: still refused, the URL leaked it.
        (
            format!("{URL}&api_key={key}"),
            vec![("authorization", bearer.as_str())],
        ),
        (format!("{URL}&token={key}"), vec![]),
        (format!("{URL}&Access_Token={key}"), vec![]),
        (
            format!("/v1/export/events?from=today-1d&to=today&key={key}"),
            vec![],
        ),
        (format!("/metrics?apikey={key}"), vec![]),
    ] {
        let reply = proxy.get_with(&path, &headers).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
        let body = reply.json();
        assert_eq!(body["type"], "key_in_url", "{path}");
        let detail = body["detail"].as_str().expect("detail");
        assert!(
            detail.contains("X-API-Key") && detail.contains("Authorization: Bearer"),
            "{detail}"
        );
        assert!(!reply.text().contains(&key), "{path}: the key is echoed");
    }

    // Wrong, revoked: 401s that do not echo what was sent.
    let unknown = format!("{key}x");
    let reply = proxy
        .get_with(URL, &[("authorization", &format!("Bearer {unknown}"))])
        .await;
    assert_eq!(reply.status, 401);
    assert!(!reply.text().contains(&unknown));
    // A second key, sent as X-API-Key: its id is logged, never the key.
    let second = proxy.add_key("enterprise", "acme");
    let reply = proxy.get_with(URL, &[("x-api-key", second.as_str())]).await;
    assert_eq!(reply.status, 200);

    let log = proxy.log();
    assert!(
        log.contains("REDACTED"),
        "the refused URLs are not logged:\n{log}"
    );
    assert!(
        log.contains("\"key_"),
        "requests are logged with key ids:\n{log}"
    );
    for secret in [&key, &unknown, &second] {
        assert!(
            !log.contains(secret.as_str()),
            "a key is in the log:\n{log}"
        );
    }
}

/// The ClickHouse-compatible endpoint takes the key as a password (Basic,
/// `X-ClickHouse-Key`, or ClickHouse's own `password` URL parameter): its
/// request log names the key by id and the path only, never the key.
#[tokio::test]
async fn the_clickhouse_endpoint_logs_no_key_however_it_is_sent() {
    use crate::chhttp::{basic, send};
    let proxy = Proxy::start_with(ProxyOptions {
        set: vec![("proxy", "request_log", "all".into())],
        ..Default::default()
    })
    .await;
    let key = proxy.key.clone();
    let wrong = format!("{key}x");
    let base = format!("{}/", proxy.ch_base);
    let select = "SELECT count() FROM demo.events WHERE tenant_id = 'acme' FORMAT TSV";
    let as_basic = basic("", &key);
    let replies = [
        send(&base, &[("authorization", &as_basic)], Some(select)).await,
        send(
            &base,
            &[("x-clickhouse-user", ""), ("x-clickhouse-key", &key)],
            Some(select),
        )
        .await,
        send(&format!("{base}?password={key}"), &[], Some(select)).await,
        // Refused: a write, and a wrong key.
        send(
            &base,
            &[("authorization", &as_basic)],
            Some("DROP TABLE demo.events"),
        )
        .await,
        send(&base, &[("x-clickhouse-key", &wrong)], Some(select)).await,
    ];
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses[..3], [200, 200, 200], "{statuses:?}");
    assert!(statuses[3] >= 400 && statuses[4] >= 400, "{statuses:?}");
    for reply in &replies {
        let body = reply.text();
        assert!(
            !body.contains(&key) && !body.contains(&wrong),
            "a key is echoed: {body}"
        );
    }

    let log = proxy.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("\"clickhouse\"") && l.contains("request"))
        .count();
    assert!(lines >= 5, "the endpoint's requests are not logged:\n{log}");
    assert!(
        log.contains("\"key_"),
        "requests are logged with key ids:\n{log}"
    );
    for secret in [&key, &wrong] {
        assert!(
            !log.contains(secret.as_str()),
            "a key is in the log:\n{log}"
        );
    }
}
