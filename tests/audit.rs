//! The audit trail (tracing target `audit`), captured by a test subscriber installed once for
//! this binary: one event per session created, extended, destroyed and evicted and per rejected
//! request, with who, which session, from where, on which platform and why. Never a token.

mod observe;
mod support;

use observe::{capture, Captured};
use support::*;

/// Session routes `/game` and `/limited` (one request per hour); the upstream must answer
/// within 2 s.
fn config(upstream: &Upstream, redis: &RedisServer) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\nrequest_timeout = \"2s\"\n\
         [redis]\nurl = \"{}\"\n\
         [[routes]]\npath_prefix = \"/game\"\nauth = \"session\"\n\
         [[routes]]\npath_prefix = \"/limited\"\nauth = \"session\"\n\
         rate_limit = {{ requests = 1, per = \"1h\" }}\n",
        upstream.url(),
        redis.url()
    )
}

/// An upstream that echoes, except that `/game/slow` never answers.
async fn upstream() -> Upstream {
    Upstream::start(|seen| async move {
        if seen.target.starts_with("/game/slow") {
            std::future::pending::<()>().await;
        }
        http::Response::new(http_body_util::Full::new(seen.body))
    })
    .await
}

/// A request id unique to this run, so that tests sharing the subscriber never mix events.
fn rid(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4())
}

/// GET `path` with an optional bearer token and the given request id; the status.
async fn get(proxy: &Proxy, path: &str, bearer: Option<&str>, request_id: &str) -> u16 {
    let mut req = client()
        .get(proxy.url(path))
        .header("x-request-id", request_id);
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.send().await.unwrap().status().as_u16()
}

/// The audit events emitted while serving the request with this id: waits (bounded) for its
/// access line first, which is written just before any audit event of a rejection.
async fn audit_of(request_id: &str) -> Vec<Captured> {
    let capture = capture();
    capture.access_lines(request_id).await;
    capture
        .events()
        .into_iter()
        .filter(|e| e.target == "audit" && e.span_field("request_id") == Some(request_id))
        .collect()
}

/// Exactly one audit event for the request, a rejection with this reason and code.
async fn one_rejection(request_id: &str, reason: &str, code: &str, status: &str) -> Captured {
    let events = audit_of(request_id).await;
    assert_eq!(events.len(), 1, "audit events of {request_id}: {events:#?}");
    let e = events.into_iter().next().unwrap();
    assert_eq!(e.field("event"), Some("request_rejected"), "{e:#?}");
    assert_eq!(e.field("reason"), Some(reason), "{e:#?}");
    assert_eq!(e.field("code"), Some(code), "{e:#?}");
    assert_eq!(e.field("status"), Some(status), "{e:#?}");
    assert_eq!(e.field("client_ip"), Some("127.0.0.1"), "{e:#?}");
    e
}

/// Audit events of one kind for one user.
async fn session_events(event: &str, user: &str, session: &str) -> Vec<Captured> {
    let found = capture()
        .wait_for(&format!("{event} of {user}"), |e| {
            e.target == "audit"
                && e.field("event") == Some(event)
                && e.field("user_id") == Some(user)
        })
        .await;
    for e in &found {
        assert_eq!(e.field("session_id"), Some(session), "{e:#?}");
    }
    found
}

#[tokio::test]
async fn session_created_extended_and_destroyed_are_audited_once_each() {
    capture();
    let redis = RedisServer::start();
    let upstream = upstream().await;
    let proxy = Proxy::start(&config(&upstream, &redis)).await;
    let user = format!("audit-life-{}", uuid::Uuid::new_v4());
    let t = token(&user, None);

    let resp = client()
        .post(proxy.url("/api/v1/sessions/create"))
        .bearer_auth(&t)
        .json(&serde_json::json!({"metadata": {"platform": "android"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let sid = json(resp).await["data"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();

    let created = session_events("session_created", &user, &sid).await;
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!(created[0].field("platform"), Some("android"));
    assert_eq!(created[0].field("client_ip"), Some("127.0.0.1"));
    assert!(created[0].span_field("request_id").is_some());

    let resp = client()
        .post(proxy.url(&format!("/api/v1/sessions/{sid}/extend")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let extended = session_events("session_extended", &user, &sid).await;
    assert_eq!(extended.len(), 1, "{extended:#?}");
    assert_eq!(extended[0].field("platform"), Some("android"));
    assert_eq!(extended[0].field("client_ip"), Some("127.0.0.1"));

    let resp = client()
        .delete(proxy.url(&format!("/api/v1/sessions/{sid}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let destroyed = session_events("session_destroyed", &user, &sid).await;
    assert_eq!(destroyed.len(), 1, "{destroyed:#?}");
    assert_eq!(destroyed[0].field("platform"), Some("android"));
    assert_eq!(destroyed[0].field("client_ip"), Some("127.0.0.1"));

    // A second destroy finds nothing: a 404, audited as a rejection, not as a destroy.
    let request_id = rid("destroy-again");
    let resp = client()
        .delete(proxy.url(&format!("/api/v1/sessions/{sid}")))
        .bearer_auth(&t)
        .header("x-request-id", &request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    one_rejection(&request_id, "session", "SESSION_NOT_FOUND", "404").await;
    assert_eq!(
        session_events("session_destroyed", &user, &sid).await.len(),
        1
    );
}

/// A change Redis was sent but did not answer within `redis.command_timeout` may still be made
/// once Redis goes on: the caller hears so, and the audit trail names the change and its
/// session, so a session that comes to exist (or to end) that way is accounted for.
// Two workers: the test thread's synchronous Redis calls must not stall the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_redis_does_not_confirm_in_time_is_audited_as_unconfirmed() {
    capture();
    let redis = RedisServer::start();
    let upstream = upstream().await;
    let proxy = Proxy::start(&config(&upstream, &redis)).await;
    let user = format!("audit-unconfirmed-{}", uuid::Uuid::new_v4());
    let t = token(&user, None);
    let sid = create_session(&proxy, &t).await;
    // Each script has run once, so Redis knows it: a script it does not know is sent again in
    // full only after Redis answers, and would not be made at all after a timeout.
    let other = create_session(&proxy, &t).await;
    let resp = client()
        .delete(proxy.url(&format!("/api/v1/sessions/{other}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    redis.pause();
    let resp = client()
        .delete(proxy.url(&format!("/api/v1/sessions/{sid}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    let body = assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("may still take effect"), "{body}");
    let resp = client()
        .post(proxy.url("/api/v1/sessions/create"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
    // Both were emitted before their answers.
    let unconfirmed = capture()
        .wait_for(&format!("session_change_unconfirmed of {user}"), |e| {
            e.target == "audit"
                && e.field("event") == Some("session_change_unconfirmed")
                && e.field("user_id") == Some(user.as_str())
        })
        .await;
    let change = |name: &str| {
        let found: Vec<&Captured> = unconfirmed
            .iter()
            .filter(|e| e.field("change") == Some(name))
            .collect();
        assert_eq!(found.len(), 1, "{name}: {unconfirmed:#?}");
        assert_eq!(found[0].field("client_ip"), Some("127.0.0.1"));
        assert!(found[0].span_field("request_id").is_some());
        found[0].field("session_id").map(str::to_string)
    };
    assert_eq!(change("destroy").as_deref(), Some(sid.as_str()));
    let created = change("create").expect("the new session's id");
    assert_eq!(unconfirmed.len(), 2, "{unconfirmed:#?}");

    // Redis goes on, and makes both changes: the audit trail had named them.
    redis.signal("CONT");
    let mut conn = redis.conn();
    let want = std::collections::BTreeSet::from([created]);
    eventually("both changes to land", || {
        let ids = stored_ids(&mut conn, &user);
        let done = ids == want;
        async move { done }
    })
    .await;
}

#[tokio::test]
async fn signing_out_everywhere_audits_each_session_it_ended() {
    capture();
    let redis = RedisServer::start();
    let upstream = upstream().await;
    let proxy = Proxy::start(&config(&upstream, &redis)).await;
    let user = format!("audit-sign-out-{}", uuid::Uuid::new_v4());
    let t = token(&user, None);
    let on = |platform: &str| Some(serde_json::json!({"metadata": {"platform": platform}}));
    let web = open_session(&proxy, &t, on("web")).await;
    let ios = open_session(&proxy, &t, on("ios")).await;

    let resp = client()
        .delete(proxy.url("/api/v1/sessions/user/sessions"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Emitted before the answer, so both are there once one is.
    let destroyed = capture()
        .wait_for(&format!("session_destroyed of {user}"), |e| {
            e.target == "audit"
                && e.field("event") == Some("session_destroyed")
                && e.field("user_id") == Some(user.as_str())
        })
        .await;
    let mut ended: Vec<(&str, &str)> = destroyed
        .iter()
        .map(|e| {
            assert_eq!(e.field("client_ip"), Some("127.0.0.1"), "{e:#?}");
            (
                e.field("session_id").unwrap_or_default(),
                e.field("platform").unwrap_or_default(),
            )
        })
        .collect();
    ended.sort_unstable();
    let mut want = vec![(web.as_str(), "web"), (ios.as_str(), "ios")];
    want.sort_unstable();
    assert_eq!(ended, want);
    let m = observe::scrape(proxy.admin).await;
    assert_eq!(m.get("portcullis_sessions_destroyed_total", &[]), Some(2.0));
}

#[tokio::test]
async fn a_session_ended_to_stay_within_max_per_user_is_audited_as_evicted() {
    capture();
    let redis = RedisServer::start();
    let upstream = upstream().await;
    let proxy = Proxy::start(&format!(
        "{}[session]\nmax_per_user = 1\n",
        config(&upstream, &redis)
    ))
    .await;
    let user = format!("audit-evict-{}", uuid::Uuid::new_v4());
    let t = token(&user, None);
    let ios = || Some(serde_json::json!({"metadata": {"platform": "ios"}}));
    let first = open_session(&proxy, &t, ios()).await;
    let second = open_session(&proxy, &t, ios()).await;
    let evicted = session_events("session_evicted", &user, &first).await;
    assert_eq!(evicted.len(), 1, "{evicted:#?}");
    assert_eq!(evicted[0].field("platform"), Some("ios"));
    assert_eq!(evicted[0].field("client_ip"), Some("127.0.0.1"));
    assert!(evicted[0].span_field("request_id").is_some());
    let resp = client()
        .get(proxy.url(&format!("/api/v1/sessions/{second}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the new session replaced it");
}

#[tokio::test]
async fn every_rejected_request_is_audited_once_with_who_and_why() {
    capture();
    let mut redis = RedisServer::start();
    let upstream = upstream().await;
    let proxy = Proxy::start(&config(&upstream, &redis)).await;
    let user = format!("audit-rej-{}", uuid::Uuid::new_v4());
    let sid = create_session(&proxy, &token(&user, None)).await;
    let with_session = token(&user, Some(&sid));
    // Never used on a proxied route, so never in the local session cache: with Redis down its
    // check must go to Redis.
    let spare = create_session(&proxy, &token(&user, None)).await;

    // A request that passes is not audited.
    let ok = rid("ok");
    assert_eq!(get(&proxy, "/game/ok", Some(&with_session), &ok).await, 200);
    assert!(audit_of(&ok).await.is_empty());
    // Its access line names the caller and the upstream's time, both brought back on the
    // forwarded response.
    let lines = capture().access_lines(&ok).await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0].field("user_id"), Some(user.as_str()), "{lines:#?}");
    assert_eq!(lines[0].field("status"), Some("200"), "{lines:#?}");
    assert!(lines[0].field("upstream_ms").is_some(), "{lines:#?}");

    let missing = rid("missing");
    assert_eq!(get(&proxy, "/game/a", None, &missing).await, 401);
    let e = one_rejection(&missing, "token", "TOKEN_MISSING", "401").await;
    assert_eq!(e.field("user_id"), None, "{e:#?}");
    assert_eq!(e.field("path"), Some("/game/a"));

    let bad = rid("bad");
    assert_eq!(get(&proxy, "/game/b", Some("abc.def.ghi"), &bad).await, 401);
    let e = one_rejection(&bad, "token", "TOKEN_INVALID", "401").await;
    assert_eq!(e.field("user_id"), None, "{e:#?}");

    let unknown_sid = uuid::Uuid::new_v4().to_string();
    let no_session = rid("no-session");
    assert_eq!(
        get(
            &proxy,
            "/game/c",
            Some(&token(&user, Some(&unknown_sid))),
            &no_session
        )
        .await,
        401
    );
    let e = one_rejection(&no_session, "session", "SESSION_INVALID", "401").await;
    assert_eq!(e.field("user_id"), Some(user.as_str()), "{e:#?}");
    assert_eq!(e.field("session_id"), Some(unknown_sid.as_str()), "{e:#?}");

    assert_eq!(
        get(
            &proxy,
            "/limited/1",
            Some(&with_session),
            &rid("limited-ok")
        )
        .await,
        200
    );
    let limited = rid("limited");
    assert_eq!(
        get(&proxy, "/limited/2", Some(&with_session), &limited).await,
        429
    );
    let e = one_rejection(&limited, "rate_limit", "RATE_LIMITED", "429").await;
    assert_eq!(e.field("user_id"), Some(user.as_str()), "{e:#?}");
    assert_eq!(e.field("session_id"), Some(sid.as_str()), "{e:#?}");

    // The upstream is too slow but the session is live: the platform is known by then.
    let slow = rid("upstream-slow");
    assert_eq!(
        get(&proxy, "/game/slow", Some(&with_session), &slow).await,
        504
    );
    let e = one_rejection(&slow, "upstream", "UPSTREAM_TIMEOUT", "504").await;
    assert_eq!(e.field("user_id"), Some(user.as_str()), "{e:#?}");
    assert_eq!(e.field("session_id"), Some(sid.as_str()), "{e:#?}");
    assert_eq!(e.field("platform"), Some("web"), "{e:#?}");

    redis.stop();
    let down = rid("redis-down");
    assert_eq!(
        get(&proxy, "/game/e", Some(&token(&user, Some(&spare))), &down).await,
        503
    );
    let e = one_rejection(
        &down,
        "redis_unavailable",
        "SESSION_STORE_UNAVAILABLE",
        "503",
    )
    .await;
    assert_eq!(e.field("user_id"), Some(user.as_str()), "{e:#?}");
    assert_eq!(e.field("session_id"), Some(spare.as_str()), "{e:#?}");
}

#[tokio::test]
async fn no_token_cookie_or_authorization_reaches_any_log_event() {
    let capture = capture();
    let redis = RedisServer::start();
    let upstream = upstream().await;
    let proxy = Proxy::start(&config(&upstream, &redis)).await;
    let user = format!("audit-leak-{}", uuid::Uuid::new_v4());
    let anonymous_session = token(&user, None);
    let sid = create_session(&proxy, &anonymous_session).await;
    let with_session = token(&user, Some(&sid));
    // A well-formed token with a distinctive payload whose signature is wrong.
    let forged = format!(
        "{}.{}.c2lnbmF0dXJlLWNhbmFyeQ",
        b64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64url(br#"{"sub":"TOKENCANARY","sid":"not-a-uuid"}"#)
    );
    // Tokens whose header or claims a JSON parser would quote in its error: an algorithm no
    // one knows, and a validly signed claim of the wrong type.
    let unknown_alg = format!(
        "{}.{}.c2lnbmF0dXJl",
        b64url(br#"{"alg":"ALGCANARY","typ":"JWT"}"#),
        b64url(br#"{"sub":"x"}"#)
    );
    let claim_of_wrong_type = sign(&serde_json::json!({"sub": user, "exp": "EXPCANARY"}));
    const COOKIE: &str = "sid=COOKIECANARY4242; auth=ALSOSECRET";
    let mut ids = Vec::new();

    let mut send = |method: http::Method, path: String, bearer: Option<String>| {
        let request_id = rid("leak");
        ids.push(request_id.clone());
        let mut req = client()
            .request(method, proxy.url(&path))
            .header("x-request-id", &request_id)
            .header("cookie", COOKIE)
            .header("x-api-key", "HEADERCANARY");
        if let Some(bearer) = bearer {
            req = req.header("authorization", format!("Bearer {bearer}"));
        }
        req.send()
    };
    for (method, path, bearer, status) in [
        (
            http::Method::GET,
            "/game/1?access_token=QUERYCANARY".to_string(),
            Some(with_session.clone()),
            200,
        ),
        (
            http::Method::GET,
            "/game/2".to_string(),
            Some(forged.clone()),
            401,
        ),
        (http::Method::GET, "/game/3".to_string(), None, 401),
        (
            http::Method::GET,
            "/game/3a".to_string(),
            Some(unknown_alg.clone()),
            401,
        ),
        (
            http::Method::GET,
            "/game/3b".to_string(),
            Some(claim_of_wrong_type.clone()),
            401,
        ),
        (
            http::Method::GET,
            "/game/4".to_string(),
            Some(anonymous_session.clone()),
            401,
        ),
        (
            http::Method::GET,
            "/limited/5".to_string(),
            Some(with_session.clone()),
            200,
        ),
        (
            http::Method::GET,
            "/limited/6".to_string(),
            Some(with_session.clone()),
            429,
        ),
        (
            http::Method::GET,
            "/api/v1/sessions/user/sessions".to_string(),
            Some(with_session.clone()),
            200,
        ),
        (
            http::Method::POST,
            format!("/api/v1/sessions/{sid}/extend"),
            Some(with_session.clone()),
            200,
        ),
        (
            http::Method::GET,
            "/api/v1/sessions/not-a-uuid".to_string(),
            Some(with_session.clone()),
            400,
        ),
        (
            http::Method::DELETE,
            format!("/api/v1/sessions/{sid}"),
            Some(with_session.clone()),
            200,
        ),
        (
            http::Method::GET,
            "/game/7".to_string(),
            Some(with_session.clone()),
            401,
        ),
    ] {
        let resp = send(method, path.clone(), bearer).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
    }
    // The upstream saw the cookie and the query: they were really sent.
    let seen = upstream.seen();
    assert!(seen.iter().any(|s| s.headers.get("cookie").is_some()));
    assert!(seen.iter().any(|s| s.target.contains("QUERYCANARY")));

    for id in &ids {
        capture.access_lines(id).await;
    }
    let events = capture.events();
    assert!(
        events.iter().any(|e| e.level == tracing::Level::DEBUG
            || e.level == tracing::Level::TRACE
            || e.target == "audit"),
        "the subscriber sees more than info access lines"
    );
    let mut texts: Vec<String> = events.iter().map(Captured::all_text).collect();
    for (name, fields) in capture.span_records.lock().unwrap().iter() {
        texts.push(format!("{name} {fields:?}"));
    }
    let secrets = [
        with_session.as_str(),
        anonymous_session.as_str(),
        forged.as_str(),
        // Any JWT at all: every one starts with base64url of `{"`.
        "eyJ",
        "Bearer",
        "bearer ",
        "TOKENCANARY",
        "ALGCANARY",
        "EXPCANARY",
        "COOKIECANARY",
        "ALSOSECRET",
        "HEADERCANARY",
        "QUERYCANARY",
        "access_token",
    ];
    for text in &texts {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "a log event carries {secret:?}: {text}"
            );
        }
    }
}

/// The session id a client names in its header is only a claim: the audit trail records it as
/// the session id it parses to, and records none for text that is not one.
#[tokio::test]
async fn a_session_id_header_reaches_the_audit_trail_only_as_a_session_id() {
    capture();
    let redis = RedisServer::start();
    let upstream = upstream().await;
    let proxy = Proxy::start(&config(&upstream, &redis)).await;
    let user = format!("audit-hint-{}", uuid::Uuid::new_v4());
    let bearer = format!("Bearer {}", token(&user, None));
    let with_hint = |hint: String, request_id: String| {
        client()
            .get(proxy.url("/game/x"))
            .header("authorization", bearer.clone())
            .header("x-session-id", hint)
            .header("x-request-id", request_id)
            .send()
    };

    let junk = rid("hint-junk");
    let resp = with_hint("A".repeat(4000), junk.clone()).await.unwrap();
    assert_eq!(resp.status(), 401);
    let e = one_rejection(&junk, "session", "SESSION_INVALID", "401").await;
    assert_eq!(e.field("user_id"), Some(user.as_str()), "{e:#?}");
    assert_eq!(e.field("session_id"), None, "{e:#?}");

    let unknown = uuid::Uuid::new_v4();
    let shouted = rid("hint-upper");
    let resp = with_hint(unknown.to_string().to_uppercase(), shouted.clone())
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let e = one_rejection(&shouted, "session", "SESSION_INVALID", "401").await;
    assert_eq!(
        e.field("session_id"),
        Some(unknown.to_string().as_str()),
        "{e:#?}"
    );
    assert_eq!(upstream.count(), 0);
}

/// A request whose client goes away before its answer still leaves an access line: status 499
/// (nginx's "client closed request"), code ABANDONED, with its request id.
#[tokio::test]
async fn an_abandoned_request_leaves_a_499_access_line() {
    use tokio::io::AsyncWriteExt;
    capture();
    let upstream = upstream().await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(&format!(
        "{}[[routes]]\npath_prefix = \"/game/slow\"\nauth = \"none\"\n",
        config(&upstream, &redis)
    ))
    .await;
    let id = rid("abandoned");
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(
            format!("GET /game/slow/abandoned HTTP/1.1\r\nHost: game.example\r\nX-Request-Id: {id}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    eventually("the request to reach the upstream", || async {
        upstream.count() == 1
    })
    .await;
    drop(client);
    let lines = capture().access_lines(&id).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0].field("status"), Some("499"), "{lines:?}");
    assert_eq!(lines[0].field("code"), Some("ABANDONED"), "{lines:?}");
    assert_eq!(
        lines[0].field("path"),
        Some("/game/slow/abandoned"),
        "{lines:?}"
    );
}
