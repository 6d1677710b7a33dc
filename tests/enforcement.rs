//! The session gate on proxied requests: a live session owned by the token's subject, the
//! identity headers the upstream sees (and never the client's copies), revocation, and route
//! policy judged on the normalised path.

mod support;

use serde_json::json;
use support::*;

const ROUTES: &str = "\
[[routes]]
path_prefix = \"/public\"
auth = \"none\"

[[routes]]
path_prefix = \"/profile\"
auth = \"jwt\"

[[routes]]
path_prefix = \"/public/admin\"
auth = \"session\"
";

struct Setup {
    redis: RedisServer,
    upstream: Upstream,
    proxy: Proxy,
}

async fn setup_with(extra: &str) -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, extra)).await;
    Setup {
        redis,
        upstream,
        proxy,
    }
}

async fn setup() -> Setup {
    setup_with(ROUTES).await
}

impl Setup {
    async fn create(&self, user: &str, platform: &str) -> String {
        let body = json!({"metadata": {"platform": platform}});
        open_session(&self.proxy, &token(user, None), Some(body)).await
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        client().get(self.proxy.url(path))
    }

    async fn delete(&self, user: &str, id: &str) -> reqwest::Response {
        client()
            .delete(self.proxy.url(&format!("/api/v1/sessions/{id}")))
            .bearer_auth(token(user, None))
            .send()
            .await
            .unwrap()
    }
}

const IDENTITY: [&str; 3] = ["x-user-id", "x-session-id", "x-session-platform"];

/// The client's attempt to speak for someone else.
fn spoofed(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    req.header("x-user-id", "admin")
        .header("x-user-id", "root")
        .header("X-Session-Platform", "android")
}

// ---------------------------------------------------------------------------------------------
// Admitted requests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_live_session_is_forwarded_with_the_validated_identity() {
    let s = setup().await;
    let sid = s.create("alice", "ios").await;
    let resp = s
        .get("/game/state?x=1")
        .bearer_auth(token("alice", Some(&sid)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = s.upstream.last();
    assert_eq!(seen.target, "/game/state?x=1");
    assert_eq!(seen.headers["x-user-id"], "alice");
    assert_eq!(seen.headers["x-session-id"], sid.as_str());
    assert_eq!(seen.headers["x-session-platform"], "ios");
}

#[tokio::test]
async fn the_session_id_may_come_from_the_x_session_id_header() {
    let s = setup().await;
    let sid = s.create("alice", "android").await;
    let resp = s
        .get("/game")
        .bearer_auth(token("alice", None))
        .header("x-session-id", sid.to_uppercase())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-user-id"], "alice");
    // The validated, canonical id; not the client's spelling of it.
    assert_eq!(seen.headers["x-session-id"], sid.as_str());
    assert_eq!(seen.headers["x-session-platform"], "android");
    assert_eq!(seen.headers.get_all("x-session-id").iter().count(), 1);
}

#[tokio::test]
async fn the_sid_claim_wins_over_the_x_session_id_header() {
    let s = setup().await;
    let claimed = s.create("alice", "web").await;
    let other = s.create("alice", "ios").await;
    let resp = s
        .get("/game")
        .bearer_auth(token("alice", Some(&claimed)))
        .header("x-session-id", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-session-id"], claimed.as_str());
    assert_eq!(seen.headers["x-session-platform"], "web");
}

#[tokio::test]
async fn a_configured_session_id_header_is_read_and_the_configured_names_are_sent() {
    let s = setup_with(
        "[identity]\nuser_id_header = \"x-player\"\nsession_id_header = \"x-player-session\"\nplatform_header = \"x-player-platform\"\n",
    )
    .await;
    let sid = s.create("alice", "ios").await;
    let resp = s
        .get("/game")
        .bearer_auth(token("alice", None))
        .header("x-player-session", &sid)
        .header("x-player", "admin")
        .header("x-player-platform", "android")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-player"], "alice");
    assert_eq!(seen.headers["x-player-session"], sid.as_str());
    assert_eq!(seen.headers["x-player-platform"], "ios");
    assert_eq!(seen.headers.get_all("x-player").iter().count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Refused requests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_token_without_any_session_id_is_401_session_invalid() {
    let s = setup().await;
    s.create("alice", "web").await;
    let resp = s
        .get("/game")
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert_error(resp, 401, "SESSION_INVALID").await;
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn missing_expired_destroyed_and_foreign_sessions_get_one_and_the_same_401() {
    let s = setup().await;
    let mut conn = s.redis.conn();
    let destroyed = s.create("alice", "web").await;
    assert_eq!(s.delete("alice", &destroyed).await.status(), 200);
    let expired = s.create("alice", "web").await;
    expire_session_in(&mut conn, "alice", &expired, -1);
    let foreign = s.create("bob", "web").await;
    let unknown = uuid::Uuid::new_v4().to_string();

    let mut answers = Vec::new();
    for (what, sid) in [
        ("unknown", unknown.as_str()),
        ("not a uuid", "not-a-session"),
        ("destroyed", destroyed.as_str()),
        ("expired", expired.as_str()),
        ("another user's", foreign.as_str()),
    ] {
        let resp = s
            .get("/game")
            .bearer_auth(token("alice", Some(sid)))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let challenge = resp.headers()["www-authenticate"].clone();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 401, "{what}: {body}");
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["error"]["code"], "SESSION_INVALID", "{what}");
        answers.push((what, challenge, body));
    }
    for (what, challenge, body) in &answers[1..] {
        assert_eq!(challenge, &answers[0].1, "{what} vs {}", answers[0].0);
        assert_eq!(body, &answers[0].2, "{what} vs {}", answers[0].0);
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn destroy_revokes_the_session_at_once() {
    let s = setup().await;
    let sid = s.create("alice", "web").await;
    let t = token("alice", Some(&sid));
    assert_eq!(
        s.get("/game")
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let forwarded = s.upstream.count();

    assert_eq!(s.delete("alice", &sid).await.status(), 200);

    let resp = s.get("/game").bearer_auth(&t).send().await.unwrap();
    assert_error(resp, 401, "SESSION_INVALID").await;
    // The same id through the header is dead too.
    let resp = s
        .get("/game")
        .bearer_auth(token("alice", None))
        .header("x-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "SESSION_INVALID").await;
    assert_eq!(
        s.upstream.count(),
        forwarded,
        "a revoked session was forwarded"
    );
}

#[tokio::test]
async fn another_users_session_id_is_401_on_the_proxy_and_404_on_the_api() {
    let s = setup().await;
    let bobs = s.create("bob", "web").await;
    s.create("alice", "web").await;

    let resp = s
        .get("/game")
        .bearer_auth(token("alice", Some(&bobs)))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "SESSION_INVALID").await;
    let resp = s
        .get("/game")
        .bearer_auth(token("alice", None))
        .header("x-session-id", &bobs)
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "SESSION_INVALID").await;
    assert_eq!(s.upstream.count(), 0);

    let resp = client()
        .get(s.proxy.url(&format!("/api/v1/sessions/{bobs}")))
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "SESSION_NOT_FOUND").await;

    // Bob's session is still his and still works for him.
    let resp = s
        .get("/game")
        .bearer_auth(token("bob", Some(&bobs)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.last().headers["x-user-id"], "bob");
}

// ---------------------------------------------------------------------------------------------
// Spoofed identity headers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn spoofed_identity_headers_are_replaced_on_a_session_route() {
    let s = setup().await;
    let sid = s.create("alice", "web").await;
    let other = uuid::Uuid::new_v4().to_string();
    let resp = spoofed(s.get("/game"))
        .bearer_auth(token("alice", Some(&sid)))
        .header("x-session-id", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = s.upstream.last();
    for name in IDENTITY {
        assert_eq!(seen.headers.get_all(name).iter().count(), 1, "{name}");
    }
    assert_eq!(seen.headers["x-user-id"], "alice");
    assert_eq!(seen.headers["x-session-id"], sid.as_str());
    assert_eq!(seen.headers["x-session-platform"], "web");
}

#[tokio::test]
async fn a_jwt_route_forwards_only_the_verified_user_id() {
    let s = setup().await;
    let sid = s.create("alice", "ios").await;
    let scripts = s.redis.command_calls("evalsha");
    let resp = spoofed(s.get("/profile/me"))
        .bearer_auth(token("alice", Some(&sid)))
        .header("x-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = s.upstream.last();
    assert_eq!(seen.headers.get_all("x-user-id").iter().count(), 1);
    assert_eq!(seen.headers["x-user-id"], "alice");
    assert!(seen.headers.get("x-session-id").is_none());
    assert!(seen.headers.get("x-session-platform").is_none());
    // No session is consulted on a jwt route.
    assert_eq!(s.redis.command_calls("evalsha"), scripts);
    let resp = s
        .get("/profile/me")
        .bearer_auth(token("nobody-with-a-session", None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        s.upstream.last().headers["x-user-id"],
        "nobody-with-a-session"
    );
}

#[tokio::test]
async fn a_jwt_route_still_needs_a_valid_token() {
    let s = setup().await;
    let resp = spoofed(s.get("/profile/me")).send().await.unwrap();
    assert_error(resp, 401, "TOKEN_MISSING").await;
    let resp = spoofed(s.get("/profile/me"))
        .bearer_auth("junk")
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "TOKEN_INVALID").await;
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn a_none_route_forwards_no_identity_header_at_all() {
    let s = setup().await;
    let sid = s.create("alice", "ios").await;
    for auth in [
        Some(token("alice", Some(&sid))),
        Some("junk".to_string()),
        None,
    ] {
        let mut req = spoofed(s.get("/public/news")).header("x-session-id", &sid);
        if let Some(t) = &auth {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{auth:?}");
        let seen = s.upstream.last();
        for name in IDENTITY {
            assert!(
                seen.headers.get(name).is_none(),
                "{name} reached the upstream"
            );
        }
    }
}

#[tokio::test]
async fn a_rejected_request_with_spoofed_headers_never_reaches_the_upstream() {
    let s = setup().await;
    let sid = s.create("alice", "ios").await;
    for auth in [
        None,
        Some("junk".to_string()),
        Some(token("alice", Some(&uuid::Uuid::new_v4().to_string()))),
        Some(token("mallory", None)),
    ] {
        let mut req = spoofed(s.get("/game")).header("x-session-id", &sid);
        if let Some(t) = &auth {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
    }
    assert_eq!(s.upstream.count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Route normalisation
// ---------------------------------------------------------------------------------------------

/// Each resolves to `/game`, which needs a session.
const TRAVERSALS: [&str; 5] = [
    "/public/../game",
    "/public/%2e%2e/game",
    "/public/%2E%2E/game",
    "/public/./../game",
    "/public/x/../../game",
];

/// Paths that backends read in incompatible ways: refused, whatever the route.
const AMBIGUOUS: [&str; 8] = [
    "/public/..%2fgame",
    "/public/%2e%2e%2fgame",
    "/game/%2e%2e%2fpublic",
    "/game/%2E%2E%5Cpublic",
    "/game/x\\..\\..\\public",
    "/public/%zz",
    "/public/%00/x",
    "/public/%",
];

#[tokio::test]
async fn the_open_route_itself_passes_without_a_token() {
    let s = setup().await;
    let (status, _) = raw_request(s.proxy.addr, "/public/news", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(s.upstream.last().target, "/public/news");
}

#[tokio::test]
async fn dot_segments_out_of_an_open_route_are_judged_by_their_target() {
    let s = setup().await;
    for target in TRAVERSALS {
        let (status, body) = raw_request(s.proxy.addr, target, &[]).await;
        assert_eq!(status, 401, "{target} without a token: {body}");
        assert!(body.contains("TOKEN_MISSING"), "{target}: {body}");
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "a traversal reached the upstream unchecked"
    );
}

#[tokio::test]
async fn prefixes_match_whole_segments_only() {
    let s = setup().await;
    for target in ["/publicity", "/public-x/y", "/profiles"] {
        let (status, body) = raw_request(s.proxy.addr, target, &[]).await;
        assert_eq!(status, 401, "{target}: {body}");
    }
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn an_authorised_traversal_is_forwarded_as_it_was_judged() {
    let s = setup().await;
    let sid = s.create("alice", "web").await;
    let auth = format!("Bearer {}", token("alice", Some(&sid)));
    for target in TRAVERSALS {
        let target = format!("{target}?q=%2e%2e");
        let (status, body) =
            raw_request(s.proxy.addr, &target, &[("authorization", auth.as_str())]).await;
        assert_eq!(status, 200, "{target}: {body}");
        let seen = s.upstream.last();
        // The upstream sees the path portcullis judged; the query goes byte for byte.
        assert_eq!(seen.target, "/game?q=%2e%2e", "{target}");
        assert_eq!(seen.headers["x-session-id"], sid.as_str());
    }
}

#[tokio::test]
async fn paths_that_backends_read_differently_are_refused_before_any_other_work() {
    let s = setup().await;
    let sid = s.create("alice", "web").await;
    let auth = format!("Bearer {}", token("alice", Some(&sid)));
    // Held across the requests, so that reading the counts adds no commands between them. The
    // heartbeat (PING and ROLE) runs on its own schedule and is left out.
    let mut redis = s.redis.conn();
    let commands = |redis: &mut redis::Connection| {
        let mut counts = commandstats(redis);
        counts.retain(|command, _| !["ping", "role"].contains(&command.as_str()));
        counts
    };
    let commands_before = commands(&mut redis);
    for target in AMBIGUOUS {
        for headers in [vec![], vec![("authorization", auth.as_str())]] {
            let (status, body) = raw_request(s.proxy.addr, target, &headers).await;
            assert_eq!(status, 400, "{target}: {body}");
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["success"], false, "{target}");
            assert_eq!(body["error"]["code"], "INVALID_PATH", "{target}");
        }
    }
    assert_eq!(
        s.upstream.count(),
        0,
        "an ambiguous path reached the upstream"
    );
    // Not even the session was looked up.
    assert_eq!(
        commands(&mut redis),
        commands_before,
        "Redis commands were spent on an ambiguous path"
    );
}

/// Backends that ignore case, strip `;parameters` (servlet containers) or decode escapes could
/// run `/public/admin`'s handler (session) for each of these; none gets the open route's pass.
#[tokio::test]
async fn every_reading_of_a_path_is_held_to_the_strictest_route_it_could_reach() {
    let s = setup().await;
    for target in [
        "/public/ADMIN",
        "/public/Admin/users",
        "/PUBLIC/admin",
        "/public/admin;",
        "/public/admin;jsessionid=x/users",
        "/public/x/..;/admin",
        "/public/adm%69n",
        "/public/adm%49N",
        "/public/admin%3bx",
    ] {
        let (status, body) = raw_request(s.proxy.addr, target, &[]).await;
        assert_eq!(status, 401, "{target}: {body}");
        assert!(body.contains("TOKEN_MISSING"), "{target}: {body}");
    }
    assert_eq!(s.upstream.count(), 0, "a reading got past its route");

    // The open route's own paths, in any of those forms, stay open.
    for target in [
        "/public/news",
        "/public/News;v=2",
        "/public/n%65ws",
        "/public/a%20b",
    ] {
        let (status, body) = raw_request(s.proxy.addr, target, &[]).await;
        assert_eq!(status, 200, "{target}: {body}");
    }
}

#[tokio::test]
async fn a_traversal_into_the_session_api_is_served_by_the_api_not_forwarded() {
    let s = setup().await;
    s.create("alice", "web").await;
    let auth = format!("Bearer {}", token("alice", None));
    let (status, body) = raw_request(
        s.proxy.addr,
        "/public/../api/v1/sessions/user/sessions",
        &[("authorization", auth.as_str())],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"sessionId\""), "{body}");
    let (status, _) = raw_request(
        s.proxy.addr,
        "/public/%2e%2e/api/v1/sessions/user/sessions",
        &[],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(s.upstream.count(), 0);
}

#[tokio::test]
async fn naming_identity_headers_in_connection_cannot_strip_the_validated_ones() {
    let s = setup().await;
    let sid = s.create("alice", "ios").await;
    let resp = s
        .get("/game")
        .bearer_auth(token("alice", Some(&sid)))
        .header("connection", "x-user-id, x-session-id, x-session-platform")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = s.upstream.last();
    assert_eq!(seen.headers["x-user-id"], "alice");
    assert_eq!(seen.headers["x-session-id"], sid.as_str());
    assert_eq!(seen.headers["x-session-platform"], "ios");
}
