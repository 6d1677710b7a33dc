//! Request ids: a well-formed incoming `X-Request-Id` is kept, anything else is replaced by a
//! generated UUID; either way it reaches the upstream, comes back to the client, and is on the
//! log lines of that request (span field `request_id`, seen by a capturing subscriber).

mod observe;
mod support;

use observe::capture;
use support::*;

/// Sends GET `path` with the given X-Request-Id header values; returns the id the client got
/// back and the one the upstream received.
async fn round_trip(
    proxy: &Proxy,
    upstream: &Upstream,
    path: &str,
    ids: &[&str],
) -> (String, String) {
    let mut req = client().get(proxy.url(path));
    for id in ids {
        req = req.header("x-request-id", *id);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let returned: Vec<String> = resp
        .headers()
        .get_all("x-request-id")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(returned.len(), 1, "exactly one id back: {returned:?}");
    let seen = upstream
        .seen()
        .into_iter()
        .find(|s| s.target == path)
        .expect("the request reached the upstream");
    let upstream_ids: Vec<String> = seen
        .headers
        .get_all("x-request-id")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        upstream_ids.len(),
        1,
        "exactly one id upstream: {upstream_ids:?}"
    );
    (returned[0].clone(), upstream_ids[0].clone())
}

fn assert_generated(id: &str) {
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("{id:?} is not a UUID"));
    assert_eq!(parsed.get_version_num(), 4, "{id}");
    assert_eq!(parsed.hyphenated().to_string(), id, "lower-case hyphenated");
}

#[tokio::test]
async fn a_well_formed_id_is_kept_passed_upstream_returned_and_logged() {
    let capture = capture();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    for (n, id) in [
        format!("client-{unique}"),
        format!("a.b:c+d/e=f_g-{unique}"),
        format!("{}{unique}", "x".repeat(128 - unique.len())),
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/kept/{n}");
        let (returned, upstream_id) = round_trip(&proxy, &upstream, &path, &[id]).await;
        assert_eq!(&returned, id);
        assert_eq!(&upstream_id, id);
        let lines = capture.access_lines(id).await;
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(lines[0].field("path"), Some(path.as_str()));
        assert_eq!(lines[0].field("status"), Some("200"));
    }
}

#[tokio::test]
async fn a_malformed_or_missing_id_is_replaced_by_a_generated_uuid() {
    let capture = capture();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let too_long = "y".repeat(129);
    let cases: [(&str, Vec<&str>); 6] = [
        ("missing", vec![]),
        ("too-long", vec![too_long.as_str()]),
        ("space", vec!["has space"]),
        ("semicolon", vec!["abc;rm"]),
        ("quote", vec!["a\"b"]),
        ("two-headers", vec!["first-id", "second-id"]),
    ];
    let mut generated = Vec::new();
    for (name, ids) in cases {
        let path = format!("/replaced/{name}");
        let (returned, upstream_id) = round_trip(&proxy, &upstream, &path, &ids).await;
        assert_generated(&returned);
        assert_eq!(
            upstream_id, returned,
            "{name}: the upstream gets the same id"
        );
        assert!(!ids.contains(&returned.as_str()));
        let lines = capture.access_lines(&returned).await;
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(lines[0].field("path"), Some(path.as_str()));
        generated.push(returned);
    }
    generated.sort();
    generated.dedup();
    assert_eq!(generated.len(), 6, "each request gets its own id");
}

#[tokio::test]
async fn a_rejected_request_returns_its_id_and_every_log_line_of_it_carries_the_id() {
    let capture = capture();
    let mut redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(
        &upstream,
        &redis,
        "[[routes]]\npath_prefix = \"/game\"\nauth = \"session\"\n",
    ))
    .await;
    let user = format!("rid-{}", uuid::Uuid::new_v4());
    let sid = create_session(&proxy, &token(&user, None)).await;

    // Refused before the upstream: the id still comes back, and is on the access line.
    let id = format!("rejected-{}", uuid::Uuid::new_v4());
    let resp = client()
        .get(proxy.url("/game/x"))
        .header("x-request-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-request-id"], id.as_str());
    let lines = capture.access_lines(&id).await;
    assert_eq!(lines[0].field("code"), Some("TOKEN_MISSING"));

    // With Redis down the gate logs a warning, the access log a line and the audit trail an
    // event: all three carry the request's id.
    redis.stop();
    let id = format!("redis-down-{}", uuid::Uuid::new_v4());
    let resp = client()
        .get(proxy.url("/game/y"))
        .bearer_auth(token(&user, Some(&sid)))
        .header("x-request-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-request-id"], id.as_str());
    capture.access_lines(&id).await;
    let of_request: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| e.span_field("request_id") == Some(id.as_str()))
        .collect();
    let targets: Vec<&str> = of_request.iter().map(|e| e.target.as_str()).collect();
    assert!(targets.contains(&"portcullis::access"), "{targets:?}");
    assert!(targets.contains(&"audit"), "{targets:?}");
    assert!(
        of_request
            .iter()
            .any(|e| e.target.starts_with("portcullis::session")
                && e.level == tracing::Level::WARN),
        "the gate's warning is in the request's span: {of_request:#?}"
    );
    // Nothing portcullis logged about this request was outside its span: every warning
    // emitted after the request that mentions the session check carries the id.
    let stray: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|e| {
            e.field("message")
                .is_some_and(|m| m.contains("session check failed"))
                && e.span_field("request_id").is_none()
        })
        .collect();
    assert!(stray.is_empty(), "{stray:#?}");
}
