//! The session API against a real redis-server: every endpoint, its answers and its errors.

mod observe;
mod support;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use observe::{SessionsKey, ROUNDING_MS};
use serde_json::{json, Value};
use support::*;

const API: &str = "/api/v1/sessions";
const TTL_SECS: i64 = 3600;

struct Setup {
    redis: RedisServer,
    proxy: Proxy,
    _upstream: Upstream,
}

async fn setup_with(extra: &str) -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = session_config(
        &upstream,
        &redis,
        &format!("[session]\nttl = \"1h\"\n\n{extra}"),
    );
    let proxy = Proxy::start(&config).await;
    Setup {
        redis,
        proxy,
        _upstream: upstream,
    }
}

async fn setup() -> Setup {
    setup_with("").await
}

impl Setup {
    fn url(&self, rest: &str) -> String {
        self.proxy.url(&format!("{API}{rest}"))
    }

    async fn create_with(&self, user: &str, body: Option<&str>, ua: Option<&str>) -> Value {
        let mut req = client()
            .post(self.url("/create"))
            .bearer_auth(token(user, None));
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        if let Some(ua) = ua {
            req = req.header("user-agent", ua);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 201, "create");
        json(resp).await
    }

    async fn create(&self, user: &str) -> String {
        create_session(&self.proxy, &token(user, None)).await
    }

    async fn get(&self, user: &str, id: &str) -> reqwest::Response {
        client()
            .get(self.url(&format!("/{id}")))
            .bearer_auth(token(user, None))
            .send()
            .await
            .unwrap()
    }

    async fn get_ok(&self, user: &str, id: &str) -> Value {
        let resp = self.get(user, id).await;
        assert_eq!(resp.status(), 200, "get session");
        let body = json(resp).await;
        assert_eq!(body["success"], true, "{body}");
        body["data"].clone()
    }

    async fn list(&self, user: &str) -> Vec<Value> {
        let resp = client()
            .get(self.url("/user/sessions"))
            .bearer_auth(token(user, None))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "list");
        let body = json(resp).await;
        assert_eq!(body["success"], true, "{body}");
        body["data"]
            .as_array()
            .unwrap_or_else(|| panic!("data is not an array: {body}"))
            .clone()
    }

    async fn post_create_raw(
        &self,
        user: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        client()
            .post(self.url("/create"))
            .bearer_auth(token(user, None))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// The ids of the sessions stored for `user`.
    fn stored_ids(&self, user: &str) -> BTreeSet<String> {
        stored_ids(&mut self.redis.conn(), user)
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn time(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    assert!(s.ends_with('Z'), "{s} is not UTC (Z)");
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

fn assert_uuid_v4(s: &str) {
    let id = uuid::Uuid::parse_str(s).unwrap_or_else(|_| panic!("{s} is not a UUID"));
    assert_eq!(id.get_version_num(), 4, "{s} is not a v4 UUID");
    assert_eq!(s, id.hyphenated().to_string(), "canonical lowercase form");
}

// ---------------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_without_a_body_answers_201_with_only_session_id_and_expiry() {
    let s = setup().await;
    let before = Utc::now();
    let resp = client()
        .post(s.url("/create"))
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body = json(resp).await;
    assert_eq!(keys(&body), set(&["success", "data"]), "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(
        keys(&body["data"]),
        set(&["sessionId", "expiresAt"]),
        "{body}"
    );
    let id = body["data"]["sessionId"].as_str().unwrap();
    assert_uuid_v4(id);
    let expires = time(&body["data"]["expiresAt"]);
    let expected = before + chrono::Duration::seconds(TTL_SECS);
    assert!(
        (expires - expected).num_seconds().abs() <= 5,
        "expiresAt {expires} is not now + ttl ({expected})"
    );
    // The session is stored under the documented key, with the full TTL.
    let read = SessionsKey::read(&mut s.redis.conn(), &sessions_key("alice"));
    let ttl = read.ttl_ms(id).expect("stored");
    assert!(
        ttl > (TTL_SECS - 5) * 1000 && ttl <= TTL_SECS * 1000,
        "TTL {ttl}"
    );
    assert!(
        read.pttl >= ttl - ROUNDING_MS,
        "the key dies before the session: key PTTL {} ms, session {ttl} ms",
        read.pttl
    );
    assert_eq!(s.stored_ids("alice"), set(&[id]));
}

#[tokio::test]
async fn create_with_metadata_stores_platform_device_and_user_agent_from_the_body() {
    let s = setup().await;
    let body = s
        .create_with(
            "alice",
            Some(r#"{"metadata":{"platform":"android","deviceId":"device-7","userAgent":"Game/2.0"}}"#),
            Some("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"),
        )
        .await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    let session = s.get_ok("alice", id).await;
    assert_eq!(
        session["metadata"],
        json!({"platform":"android","deviceId":"device-7","userAgent":"Game/2.0","ipAddress":"127.0.0.1"})
    );
}

#[tokio::test]
async fn create_with_an_empty_metadata_object_is_accepted() {
    let s = setup().await;
    let body = s
        .create_with("alice", Some(r#"{"metadata":{}}"#), None)
        .await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    let session = s.get_ok("alice", id).await;
    assert_eq!(
        session["metadata"],
        json!({"platform":"web","ipAddress":"127.0.0.1"})
    );
    let body = s.create_with("alice", Some("{}"), None).await;
    assert!(body["data"]["sessionId"].is_string());
}

#[tokio::test]
async fn platform_is_detected_from_the_user_agent_when_the_body_has_none() {
    let s = setup().await;
    let cases = [
        (
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
            "ios",
        ),
        ("Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X)", "ios"),
        ("MyGame/1.2 iOS/17.1", "ios"),
        ("Mozilla/5.0 (Linux; Android 14; Pixel 8)", "android"),
        ("okhttp/4.12.0", "android"),
        ("Dalvik/2.1.0 (Linux; U; Android 13)", "android"),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120",
            "web",
        ),
        ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0)", "web"),
    ];
    for (ua, platform) in cases {
        let body = s.create_with("alice", None, Some(ua)).await;
        let id = body["data"]["sessionId"].as_str().unwrap();
        let session = s.get_ok("alice", id).await;
        assert_eq!(session["metadata"]["platform"], platform, "{ua}");
        assert_eq!(session["metadata"]["userAgent"], ua);
    }
    // No User-Agent at all: web.
    let body = s.create_with("alice", None, None).await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    assert_eq!(s.get_ok("alice", id).await["metadata"]["platform"], "web");
}

#[tokio::test]
async fn platform_in_the_body_wins_over_the_user_agent() {
    let s = setup().await;
    let body = s
        .create_with(
            "alice",
            Some(r#"{"metadata":{"platform":"web"}}"#),
            Some("Mozilla/5.0 (Linux; Android 14; Pixel 8)"),
        )
        .await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    assert_eq!(s.get_ok("alice", id).await["metadata"]["platform"], "web");
}

#[tokio::test]
async fn user_agent_comes_from_the_header_when_the_body_has_none() {
    let s = setup().await;
    let body = s
        .create_with(
            "alice",
            Some(r#"{"metadata":{"deviceId":"d1"}}"#),
            Some("GameClient/3.1 (Linux)"),
        )
        .await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    let session = s.get_ok("alice", id).await;
    assert_eq!(session["metadata"]["userAgent"], "GameClient/3.1 (Linux)");
    // Neither body nor header: no userAgent field at all.
    let body = s.create_with("alice", None, None).await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    let session = s.get_ok("alice", id).await;
    assert!(session["metadata"].get("userAgent").is_none(), "{session}");
}

#[tokio::test]
async fn ip_address_is_the_client_address_not_the_body_nor_an_untrusted_forwarded_for() {
    let s = setup().await;
    let resp = client()
        .post(s.url("/create"))
        .bearer_auth(token("alice", None))
        .header("x-forwarded-for", "203.0.113.9")
        .header("content-type", "application/json")
        .body(r#"{"metadata":{"ipAddress":"198.51.100.66"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = json(resp).await["data"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let session = s.get_ok("alice", &id).await;
    assert_eq!(session["metadata"]["ipAddress"], "127.0.0.1");
}

#[tokio::test]
async fn ip_address_comes_from_x_forwarded_for_when_the_peer_is_a_trusted_proxy() {
    let s = setup_with("[server]\ntrusted_proxies = [\"127.0.0.1\"]\n").await;
    let resp = client()
        .post(s.url("/create"))
        .bearer_auth(token("alice", None))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = json(resp).await["data"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let session = s.get_ok("alice", &id).await;
    assert_eq!(session["metadata"]["ipAddress"], "203.0.113.9");
}

#[tokio::test]
async fn the_stored_value_is_the_documented_record_under_one_hash_tagged_key_per_user() {
    let s = setup().await;
    let body = s
        .create_with(
            "alice",
            Some(r#"{"metadata":{"platform":"ios","deviceId":"dev-1","userAgent":"Game|1.0"}}"#),
            None,
        )
        .await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    let mut conn = s.redis.conn();
    let value: Vec<u8> = redis::cmd("GET")
        .arg(sessions_key("alice"))
        .query(&mut conn)
        .unwrap();
    // The documented layout, byte by byte: version, length, id, three times, details.
    assert_eq!(value[0], 1, "version");
    let len = usize::from(u16::from_be_bytes([value[1], value[2]]));
    assert_eq!(value.len(), 3 + len, "one record");
    let body = &value[3..];
    assert_eq!(&body[..16], uuid::Uuid::parse_str(id).unwrap().as_bytes());
    let time_at = |at: usize| {
        body[at..at + 6]
            .iter()
            .fold(0i64, |n, b| (n << 8) | i64::from(*b))
    };
    let (expires, last_active, created) = (time_at(16), time_at(22), time_at(28));
    assert_eq!(
        last_active, created,
        "a new session was last active when created"
    );
    assert_eq!(expires, created + TTL_SECS * 1000);
    let now = redis_now_ms(&mut conn);
    assert!(
        (now - 5_000..=now).contains(&created),
        "createdAt {created}, now {now}"
    );
    assert_eq!(&body[34..], b"i\x05dev-1\x04\x7f\x00\x00\x01Game|1.0");
    // One key per user, hash-tagged on the user id; nothing else was written.
    assert!(sessions_key("alice").contains("{alice}"));
    let kind: String = redis::cmd("TYPE")
        .arg(sessions_key("alice"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(kind, "string");
    let all: BTreeSet<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert_eq!(all, set(&[&sessions_key("alice")]));
}

#[tokio::test]
async fn keys_use_the_configured_key_prefix() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = format!(
        "[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"mmo\"\n",
        upstream.url(),
        redis.url()
    );
    let proxy = Proxy::start(&config).await;
    let id = create_session(&proxy, &token("alice", None)).await;
    let all: BTreeSet<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(all, set(&["mmo:sessions:{alice}"]));
    let stored: Vec<u8> = redis::cmd("GET")
        .arg("mmo:sessions:{alice}")
        .query(&mut redis.conn())
        .unwrap();
    let bodies = portcullis::session::record::bodies(&stored).unwrap();
    let record = portcullis::session::record::decode(bodies[0]).unwrap();
    assert_eq!(record.session_id.to_string(), id);
}

// ---------------------------------------------------------------------------------------------
// get
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn get_returns_the_session_with_exactly_the_contract_field_names() {
    let s = setup().await;
    let before = Utc::now();
    let body = s
        .create_with(
            "alice",
            Some(r#"{"metadata":{"platform":"ios","deviceId":"dev-9","userAgent":"Game/1"}}"#),
            None,
        )
        .await;
    let id = body["data"]["sessionId"].as_str().unwrap();
    let resp = s.get("alice", id).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body = json(resp).await;
    assert_eq!(keys(&body), set(&["success", "data"]));
    let data = &body["data"];
    assert_eq!(
        keys(data),
        set(&[
            "sessionId",
            "userId",
            "createdAt",
            "lastActive",
            "expiresAt",
            "metadata"
        ])
    );
    assert_eq!(
        keys(&data["metadata"]),
        set(&["platform", "userAgent", "ipAddress", "deviceId"])
    );
    assert_eq!(data["sessionId"], id);
    assert_eq!(data["userId"], "alice");
    let created = time(&data["createdAt"]);
    let last = time(&data["lastActive"]);
    let expires = time(&data["expiresAt"]);
    assert!((created - before).num_seconds().abs() <= 5, "{created}");
    assert!(
        last >= created,
        "lastActive {last} before createdAt {created}"
    );
    assert!(
        ((expires - created).num_seconds() - TTL_SECS).abs() <= 5,
        "expiresAt {expires} vs createdAt {created}"
    );
}

/// HEAD answers as GET would, without content, over HTTP/1.1 and HTTP/2 alike: the API's
/// answers, its refusals and the OpenAPI document. (An HTTP/2 client resets a stream whose
/// answer to a HEAD carries DATA.)
#[tokio::test]
async fn head_answers_with_the_gets_head_and_no_content_over_both_protocols() {
    let s = setup().await;
    let id = s.create("alice").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (version, client) in [("HTTP/1.1", client()), ("HTTP/2", h2)] {
        for (path, auth, status) in [
            (format!("/{id}"), true, 200),
            ("/user/sessions".to_string(), true, 200),
            ("/openapi.json".to_string(), false, 200),
            ("/user/sessions".to_string(), false, 401),
        ] {
            let send = |method: reqwest::Method| {
                let mut req = client.request(method, s.url(&path));
                if auth {
                    req = req.bearer_auth(token("alice", None));
                }
                req.send()
            };
            let what = format!("{version} {path} auth={auth}");
            let get = send(reqwest::Method::GET).await.unwrap();
            assert_eq!(get.status(), status, "GET {what}");
            let get_type = get.headers()["content-type"].clone();
            let get_len = get.bytes().await.unwrap().len();
            assert!(get_len > 0, "GET {what}");

            let head = send(reqwest::Method::HEAD)
                .await
                .unwrap_or_else(|e| panic!("HEAD {what}: {e}"));
            assert_eq!(head.status(), status, "HEAD {what}");
            assert_eq!(head.headers()["content-type"], get_type, "HEAD {what}");
            assert_eq!(
                head.headers()["content-length"].to_str().unwrap(),
                get_len.to_string(),
                "HEAD {what}"
            );
            let content = head
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("HEAD {what}: {e}"));
            assert!(content.is_empty(), "HEAD {what}");
        }
    }
}

#[tokio::test]
async fn get_does_not_slide_the_session() {
    let s = setup().await;
    let id = s.create("alice").await;
    let mut conn = s.redis.conn();
    expire_session_in(&mut conn, "alice", &id, 10_000);
    let session = s.get_ok("alice", &id).await;
    let expires = time(&session["expiresAt"]);
    let left = (expires - Utc::now()).num_milliseconds();
    assert!(
        (5_000..=11_000).contains(&left),
        "expiresAt is {left} ms away"
    );
    assert!(session_ttl_ms(&mut conn, "alice", &id).unwrap() <= 10_000);
    assert!(pttl(&mut conn, &sessions_key("alice")) <= 10_000);
}

#[tokio::test]
async fn get_of_an_unknown_session_is_404_session_not_found() {
    let s = setup().await;
    s.create("alice").await;
    let resp = s.get("alice", &uuid::Uuid::new_v4().to_string()).await;
    assert_error(resp, 404, "SESSION_NOT_FOUND").await;
}

// ---------------------------------------------------------------------------------------------
// list
// ---------------------------------------------------------------------------------------------

/// Sessions opened in the same millisecond are listed in the order they were opened (the order
/// the user's value holds them in), not by id.
#[tokio::test]
async fn sessions_opened_in_one_millisecond_list_in_the_order_they_were_opened() {
    let s = setup().await;
    // Two sessions whose ids sort the other way round from the order they were opened in
    // (an even chance for each user).
    let mut i = 0;
    let (user, first, second) = loop {
        let user = format!("same-ms-{i}");
        let first = s.create(&user).await;
        let second = s.create(&user).await;
        if first > second {
            break (user, first, second);
        }
        i += 1;
        assert!(i < 64, "64 pairs of ids all sorted in their opening order");
    };
    // Opened in the same millisecond.
    rewrite_sessions(&mut s.redis.conn(), &user, |records| {
        records[1].created_ms = records[0].created_ms;
    });
    let listed: Vec<String> = s
        .list(&user)
        .await
        .iter()
        .map(|v| v["sessionId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, [first, second]);
}

#[tokio::test]
async fn list_returns_only_the_callers_sessions_oldest_first() {
    let s = setup().await;
    let a1 = s.create("alice").await;
    let b1 = s.create("bob").await;
    let a2 = s.create("alice").await;
    let alice = s.list("alice").await;
    let ids: Vec<&str> = alice
        .iter()
        .map(|v| v["sessionId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [a1.as_str(), a2.as_str()]);
    for session in &alice {
        assert_eq!(session["userId"], "alice");
        assert_eq!(
            keys(session),
            set(&[
                "sessionId",
                "userId",
                "createdAt",
                "lastActive",
                "expiresAt",
                "metadata"
            ])
        );
    }
    let bob = s.list("bob").await;
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0]["sessionId"], b1.as_str());
}

#[tokio::test]
async fn list_of_a_user_without_sessions_is_an_empty_array() {
    let s = setup().await;
    s.create("alice").await;
    assert!(s.list("carol").await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// extend
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn extend_puts_the_ttl_back_to_full_and_answers_id_and_expiry() {
    let s = setup().await;
    let id = s.create("alice").await;
    let mut conn = s.redis.conn();
    expire_session_in(&mut conn, "alice", &id, 5_000);
    let before = Utc::now();
    let resp = client()
        .post(s.url(&format!("/{id}/extend")))
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = json(resp).await;
    assert_eq!(body["success"], true);
    assert_eq!(keys(&body["data"]), set(&["sessionId", "expiresAt"]));
    assert_eq!(body["data"]["sessionId"], id.as_str());
    let expires = time(&body["data"]["expiresAt"]);
    let expected = before + chrono::Duration::seconds(TTL_SECS);
    assert!((expires - expected).num_seconds().abs() <= 5, "{expires}");
    let read = SessionsKey::read(&mut conn, &sessions_key("alice"));
    let ttl = read.ttl_ms(&id).unwrap();
    assert!(ttl > (TTL_SECS - 5) * 1000, "TTL after extend is {ttl}");
    assert!(
        read.pttl >= ttl - ROUNDING_MS,
        "the key did not follow: key PTTL {} ms, session {ttl} ms",
        read.pttl
    );
}

#[tokio::test]
async fn extend_of_an_unknown_session_is_404_and_creates_nothing() {
    let s = setup().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let resp = client()
        .post(s.url(&format!("/{unknown}/extend")))
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "SESSION_NOT_FOUND").await;
    let n: i64 = redis::cmd("DBSIZE").query(&mut s.redis.conn()).unwrap();
    assert_eq!(n, 0, "extend of an unknown session wrote keys");
}

// ---------------------------------------------------------------------------------------------
// delete
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn delete_answers_200_success_and_removes_only_that_session() {
    let s = setup().await;
    let keep = s.create("alice").await;
    let id = s.create("alice").await;
    let resp = client()
        .delete(s.url(&format!("/{id}")))
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json(resp).await, json!({"success": true}));
    assert_eq!(s.stored_ids("alice"), set(&[&keep]));
    assert_error(s.get("alice", &id).await, 404, "SESSION_NOT_FOUND").await;
}

#[tokio::test]
async fn delete_of_an_unknown_or_already_deleted_session_is_404() {
    let s = setup().await;
    let id = s.create("alice").await;
    let delete = || {
        client()
            .delete(s.url(&format!("/{id}")))
            .bearer_auth(token("alice", None))
            .send()
    };
    assert_eq!(delete().await.unwrap().status(), 200);
    assert_error(delete().await.unwrap(), 404, "SESSION_NOT_FOUND").await;
}

#[tokio::test]
async fn delete_of_user_sessions_ends_every_session_of_the_caller_and_no_other() {
    let s = setup().await;
    let mine = [
        s.create("alice").await,
        s.create("alice").await,
        s.create("alice").await,
    ];
    let theirs = s.create("bob").await;
    let proxied = |id: &str| {
        client()
            .get(s.proxy.url("/game/state"))
            .bearer_auth(token("alice", Some(id)))
            .send()
    };
    for id in &mine {
        assert_eq!(proxied(id).await.unwrap().status(), 200);
    }
    // Signed out from one of the sessions, with a token bound to it.
    let bound = token("alice", Some(&mine[0]));
    let sign_out = |bearer: String| {
        client()
            .delete(s.url("/user/sessions"))
            .bearer_auth(bearer)
            .send()
    };
    let resp = sign_out(bound.clone()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        json(resp).await,
        json!({"success": true, "data": {"destroyed": 3}})
    );

    assert!(s.stored_ids("alice").is_empty());
    assert!(s.list("alice").await.is_empty());
    assert_eq!(s.stored_ids("bob"), set(&[&theirs]));
    for id in &mine {
        assert_error(proxied(id).await.unwrap(), 401, "SESSION_INVALID").await;
    }
    // The token bound to one of them died with it; a login token finds nothing left to end.
    assert_error(sign_out(bound).await.unwrap(), 401, "SESSION_INVALID").await;
    let again = sign_out(token("alice", None)).await.unwrap();
    assert_eq!(
        json(again).await,
        json!({"success": true, "data": {"destroyed": 0}})
    );
}

#[tokio::test]
async fn after_signing_out_everywhere_a_token_issued_before_can_do_nothing_in_the_api() {
    let s = setup().await;
    let claims = |sub: &str, iat: Value, exp: u64| json!({"sub": sub, "iat": iat, "exp": exp});
    // Issued two minutes ago: older than the sign-out by more than `jwt.leeway` (30 s).
    let issued =
        |sub: &str, ago: u64| sign(&claims(sub, json!(now_secs() - ago), now_secs() + 3600));
    let stolen = issued("alice", 120);
    let create = |bearer: &str| client().post(s.url("/create")).bearer_auth(bearer).send();
    let list = |bearer: &str| {
        client()
            .get(s.url("/user/sessions"))
            .bearer_auth(bearer)
            .send()
    };
    let sign_out = |bearer: &str| {
        client()
            .delete(s.url("/user/sessions"))
            .bearer_auth(bearer)
            .send()
    };
    let opened = json(create(&stolen).await.unwrap()).await;
    let stolen_sid = opened["data"]["sessionId"].as_str().unwrap().to_string();
    let bound_stolen = sign(&json!({
        "sub": "alice", "sid": stolen_sid, "iat": now_secs() - 120, "exp": now_secs() + 3600,
    }));
    let bobs = issued("bob", 120);

    // Signed out with a token good for two hours, longer than the session TTL (1 h).
    let signing_out = sign(&claims("alice", json!(now_secs()), now_secs() + 7200));
    assert_eq!(sign_out(&signing_out).await.unwrap().status(), 200);
    let ttl: i64 = redis::cmd("TTL")
        .arg("aeturnis:signed-out:{alice}")
        .query(&mut s.redis.conn())
        .unwrap();
    assert!(
        (7200 - 5..=7200 + 30).contains(&ttl),
        "remembered while the signing-out token is good (plus the leeway), not {ttl} s"
    );

    let refused = create(&stolen).await.unwrap();
    assert_eq!(
        refused
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert_error(refused, 401, "SIGNED_OUT").await;
    assert!(s.stored_ids("alice").is_empty(), "nothing was opened");
    // The user signs in again; the old token can neither see nor end what they open.
    let fresh = s.create("alice").await;
    assert_error(list(&stolen).await.unwrap(), 401, "SIGNED_OUT").await;
    let get = client()
        .get(s.url(&format!("/{fresh}")))
        .bearer_auth(&stolen)
        .send();
    assert_error(get.await.unwrap(), 401, "SIGNED_OUT").await;
    assert_error(sign_out(&stolen).await.unwrap(), 401, "SIGNED_OUT").await;
    let extend = client()
        .post(s.url(&format!("/{fresh}/extend")))
        .bearer_auth(&stolen)
        .send();
    assert_error(extend.await.unwrap(), 401, "SIGNED_OUT").await;
    let destroy = client()
        .delete(s.url(&format!("/{fresh}")))
        .bearer_auth(&stolen)
        .send();
    assert_error(destroy.await.unwrap(), 401, "SIGNED_OUT").await;
    assert_eq!(s.stored_ids("alice"), set(&[&fresh]));
    // A token bound to a session the sign-out ended hears that its session is gone, as it
    // would whatever ended it.
    assert_error(list(&bound_stolen).await.unwrap(), 401, "SESSION_INVALID").await;
    // A fractional iat (RFC 7519 allows one) counts by its whole seconds.
    let fractional = |ago: f64| {
        sign(&claims(
            "alice",
            json!(now_secs() as f64 - ago),
            now_secs() + 3600,
        ))
    };
    assert_error(create(&fractional(120.5)).await.unwrap(), 401, "SIGNED_OUT").await;
    assert_eq!(create(&fractional(0.25)).await.unwrap().status(), 201);
    // Within the allowed clock skew of the sign-out, a token counts as issued after it.
    assert_eq!(create(&issued("alice", 10)).await.unwrap().status(), 201);
    // A token without a usable iat cannot be told apart, so it is not refused.
    for iat in [Value::Null, json!("yesterday")] {
        let undated = sign(&claims("alice", iat, now_secs() + 3600));
        assert_eq!(create(&undated).await.unwrap().status(), 201);
    }
    // Other users are not affected.
    assert_eq!(create(&bobs).await.unwrap().status(), 201);
}

#[tokio::test]
async fn the_sign_out_check_is_made_in_each_calls_own_round_trip() {
    let s = setup().await;
    let token = sign(&json!({"sub": "alice", "iat": now_secs(), "exp": now_secs() + 3600}));
    let id = s.create("alice").await;
    let ops = |m: &observe::Exposition| {
        [
            "session_list",
            "session_get",
            "session_touch",
            "session_destroy",
        ]
        .map(|op| {
            m.sum(
                "portcullis_redis_command_duration_seconds_count",
                &[("op", op)],
            )
        })
    };
    let total =
        |m: &observe::Exposition| m.sum("portcullis_redis_command_duration_seconds_count", &[]);
    let m = observe::scrape(s.proxy.admin).await;
    let (before, all_before) = (ops(&m), total(&m));
    let list = client().get(s.url("/user/sessions")).bearer_auth(&token);
    assert_eq!(list.send().await.unwrap().status(), 200);
    let get = client().get(s.url(&format!("/{id}"))).bearer_auth(&token);
    assert_eq!(get.send().await.unwrap().status(), 200);
    let extend = client()
        .post(s.url(&format!("/{id}/extend")))
        .bearer_auth(&token);
    assert_eq!(extend.send().await.unwrap().status(), 200);
    let destroy = client()
        .delete(s.url(&format!("/{id}")))
        .bearer_auth(&token);
    assert_eq!(destroy.send().await.unwrap().status(), 200);
    let m = observe::scrape(s.proxy.admin).await;
    let after = ops(&m);
    let calls: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    assert_eq!(calls, [1.0, 1.0, 1.0, 1.0], "one round trip each");
    let all = total(&m);
    assert_eq!(all - all_before, 4.0, "and no other");

    // Refused for signing out: an answer from Redis, not a Redis error.
    let stolen = sign(&json!({"sub": "alice", "iat": now_secs() - 120, "exp": now_secs() + 3600}));
    let sign_out = client().delete(s.url("/user/sessions")).bearer_auth(&token);
    assert_eq!(sign_out.send().await.unwrap().status(), 200);
    let list = client().get(s.url("/user/sessions")).bearer_auth(&stolen);
    assert_error(list.send().await.unwrap(), 401, "SIGNED_OUT").await;
    let m = observe::scrape(s.proxy.admin).await;
    assert_eq!(total(&m) - all, 2.0, "the sign-out and the refused list");
    assert_eq!(m.sum("portcullis_redis_errors_total", &[]), 0.0);
}

#[tokio::test]
async fn signing_out_with_a_token_good_for_centuries_is_remembered_for_at_most_100_years() {
    let s = setup().await;
    let forever =
        sign(&json!({"sub": "alice", "iat": now_secs(), "exp": now_secs() + 200 * 31_557_600}));
    let resp = client()
        .delete(s.url("/user/sessions"))
        .bearer_auth(&forever)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ttl: i64 = redis::cmd("TTL")
        .arg("aeturnis:signed-out:{alice}")
        .query(&mut s.redis.conn())
        .unwrap();
    assert!(
        (100 * 31_557_600 - 5..=100 * 31_557_600).contains(&ttl),
        "{ttl}"
    );
}

#[tokio::test]
async fn a_later_sign_out_never_shortens_how_long_an_earlier_one_is_remembered() {
    let s = setup().await;
    let sign_out_with = |good_for: u64| {
        let token = sign(&json!({"sub": "alice", "iat": now_secs(), "exp": now_secs() + good_for}));
        client()
            .delete(s.url("/user/sessions"))
            .bearer_auth(token)
            .send()
    };
    let remembered = || -> i64 {
        redis::cmd("TTL")
            .arg("aeturnis:signed-out:{alice}")
            .query(&mut s.redis.conn())
            .unwrap()
    };
    assert_eq!(sign_out_with(7200).await.unwrap().status(), 200);
    let first = remembered();
    assert!((7200 - 5..=7200 + 30).contains(&first), "{first}");
    // Signed out again with a token good for a minute: the session TTL (1 h) would be its own
    // hold, but a token stolen before the first sign-out stays shut out for its two hours.
    assert_eq!(sign_out_with(60).await.unwrap().status(), 200);
    let second = remembered();
    assert!(
        (first - 5..=first).contains(&second),
        "the second sign-out cut the hold from {first} s to {second} s"
    );
}

/// The time tokens are judged against moves forward only: a sign-out made while Redis' clock
/// reads earlier (stepped back, or a failover to a server behind) keeps the later one.
#[tokio::test]
async fn a_sign_out_never_moves_the_time_tokens_are_judged_against_back() {
    let s = setup().await;
    let key = "aeturnis:signed-out:{alice}";
    let ahead = now_secs() + 3600;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(ahead)
        .arg("EX")
        .arg(7200)
        .query(&mut s.redis.conn())
        .unwrap();
    // A token issued after that time: it may sign out, and the time stays.
    let token = sign(&json!({"sub": "alice", "iat": ahead + 60, "exp": ahead + 7200}));
    let resp = client()
        .delete(s.url("/user/sessions"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let at: u64 = redis::cmd("GET")
        .arg(key)
        .query(&mut s.redis.conn())
        .unwrap();
    assert_eq!(at, ahead);
}

#[tokio::test]
async fn a_sign_out_that_cannot_read_the_sessions_writes_nothing_and_can_be_made_again() {
    let s = setup().await;
    // Issued two minutes ago: a sign-out noted by a failed attempt would refuse it.
    let token = sign(&json!({"sub": "alice", "iat": now_secs() - 120, "exp": now_secs() + 3600}));
    let sign_out = || {
        client()
            .delete(s.url("/user/sessions"))
            .bearer_auth(&token)
            .send()
    };
    let _: () = redis::cmd("SET")
        .arg("aeturnis:sessions:{alice}")
        .arg("not the session layout")
        .query(&mut s.redis.conn())
        .unwrap();
    let failed = sign_out().await.unwrap();
    assert!(failed.status().is_server_error(), "{}", failed.status());
    let noted: bool = redis::cmd("EXISTS")
        .arg("aeturnis:signed-out:{alice}")
        .query(&mut s.redis.conn())
        .unwrap();
    assert!(!noted, "a sign-out that failed was noted");
    let _: () = redis::cmd("DEL")
        .arg("aeturnis:sessions:{alice}")
        .query(&mut s.redis.conn())
        .unwrap();
    assert_eq!(sign_out().await.unwrap().status(), 200);
}

// ---------------------------------------------------------------------------------------------
// another user's session
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn another_users_session_is_404_on_get_extend_and_delete_and_stays_untouched() {
    let s = setup().await;
    let id = s.create("alice").await;
    let mut conn = s.redis.conn();
    expire_session_in(&mut conn, "alice", &id, 20_000);

    assert_error(s.get("mallory", &id).await, 404, "SESSION_NOT_FOUND").await;
    let resp = client()
        .post(s.url(&format!("/{id}/extend")))
        .bearer_auth(token("mallory", None))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "SESSION_NOT_FOUND").await;
    let resp = client()
        .delete(s.url(&format!("/{id}")))
        .bearer_auth(token("mallory", None))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "SESSION_NOT_FOUND").await;

    // Still alive, not extended, and not listed for the other user.
    let ttl = session_ttl_ms(&mut conn, "alice", &id).unwrap();
    assert!(ttl > 0 && ttl <= 20_000, "TTL {ttl}");
    assert!(stored_ids(&mut conn, "mallory").is_empty());
    assert!(s.list("mallory").await.is_empty());
    assert_eq!(s.get_ok("alice", &id).await["sessionId"], id.as_str());
}

#[tokio::test]
async fn the_404_for_another_users_session_is_identical_to_an_unknown_one() {
    let s = setup().await;
    let id = s.create("alice").await;
    let foreign = s.get("mallory", &id).await.text().await.unwrap();
    let unknown = s
        .get("mallory", &uuid::Uuid::new_v4().to_string())
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(foreign, unknown);
}

// ---------------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------------

fn message(body: &Value) -> String {
    body["error"]["message"].as_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn create_rejects_malformed_json_with_400() {
    let s = setup().await;
    for bad in [
        r#"{"metadata":"#,
        "not json",
        r#"{"metadata":{"platform":"web",}}"#,
    ] {
        let body = assert_error(s.post_create_raw("alice", bad).await, 400, "BAD_REQUEST").await;
        assert!(message(&body).contains("JSON"), "{body}");
    }
    assert!(
        s.stored_ids("alice").is_empty(),
        "a rejected create stored a session"
    );
}

#[tokio::test]
async fn create_rejects_trailing_data_after_the_json_body() {
    let s = setup().await;
    for bad in [r#"{"metadata":{}}}"#, r#"{"metadata":{}} x"#, r#"{}{}"#] {
        let resp = s.post_create_raw("alice", bad).await;
        let body = assert_error(resp, 400, "BAD_REQUEST").await;
        assert!(message(&body).contains("JSON"), "{bad}: {body}");
    }
    assert!(
        s.stored_ids("alice").is_empty(),
        "a rejected create stored a session"
    );
}

#[tokio::test]
async fn create_rejects_wrong_types_naming_the_field() {
    let s = setup().await;
    let cases = [
        (r#"{"metadata":{"deviceId":5}}"#, "metadata.deviceId"),
        (r#"{"metadata":{"userAgent":["x"]}}"#, "metadata.userAgent"),
        (r#"{"metadata":{"platform":true}}"#, "metadata.platform"),
        (r#"{"metadata":"web"}"#, "metadata"),
    ];
    for (bad, field) in cases {
        let body = assert_error(s.post_create_raw("alice", bad).await, 400, "BAD_REQUEST").await;
        assert!(message(&body).contains(field), "{bad}: {body}");
    }
    assert!(s.stored_ids("alice").is_empty());
}

#[tokio::test]
async fn create_rejects_a_json_array_instead_of_an_object() {
    let s = setup().await;
    for bad in ["[]", r#"[{"platform":"ios"}]"#] {
        let resp = s.post_create_raw("alice", bad).await;
        assert_error(resp, 400, "BAD_REQUEST").await;
    }
    assert!(s.stored_ids("alice").is_empty());
}

#[tokio::test]
async fn create_rejects_an_unknown_platform() {
    let s = setup().await;
    for platform in ["windows", "Web", "IOS", ""] {
        let bad = format!(r#"{{"metadata":{{"platform":"{platform}"}}}}"#);
        let body = assert_error(s.post_create_raw("alice", bad).await, 400, "BAD_REQUEST").await;
        assert!(message(&body).contains("platform"), "{platform:?}: {body}");
    }
    assert!(s.stored_ids("alice").is_empty());
}

#[tokio::test]
async fn create_rejects_unknown_fields_naming_them() {
    let s = setup().await;
    let cases = [
        (r#"{"meta":{}}"#, "meta"),
        (r#"{"metadata":{"colour":"red"}}"#, "colour"),
        (
            r#"{"metadata":{"platform":"web"},"userId":"bob"}"#,
            "userId",
        ),
    ];
    for (bad, field) in cases {
        let body = assert_error(s.post_create_raw("alice", bad).await, 400, "BAD_REQUEST").await;
        assert!(message(&body).contains(field), "{bad}: {body}");
    }
    assert!(s.stored_ids("alice").is_empty());
}

#[tokio::test]
async fn create_rejects_a_device_id_with_a_separator_or_too_long() {
    let s = setup().await;
    let long = "d".repeat(129);
    for device in ["a|b", "", long.as_str(), "a\\u0001b"] {
        let bad = format!(r#"{{"metadata":{{"deviceId":"{device}"}}}}"#);
        let body = assert_error(s.post_create_raw("alice", bad).await, 400, "BAD_REQUEST").await;
        assert!(message(&body).contains("deviceId"), "{device:?}: {body}");
    }
    assert!(s.stored_ids("alice").is_empty());
}

#[tokio::test]
async fn create_rejects_a_user_agent_over_512_bytes_in_the_body() {
    let s = setup().await;
    let bad = format!(r#"{{"metadata":{{"userAgent":"{}"}}}}"#, "u".repeat(513));
    let body = assert_error(s.post_create_raw("alice", bad).await, 400, "BAD_REQUEST").await;
    assert!(message(&body).contains("userAgent"), "{body}");
}

#[tokio::test]
async fn create_rejects_a_user_agent_with_control_characters_in_the_body() {
    let s = setup().await;
    for ua in [
        "\\u0000\\u001b[31mred",
        "Game/1\\r\\nX-Evil: 1",
        "Game\\t1",
        "Game\\u007f",
        "Game\\u009b31m",
    ] {
        let bad = format!(r#"{{"metadata":{{"userAgent":"{ua}"}}}}"#);
        let body = assert_error(s.post_create_raw("alice", bad).await, 400, "BAD_REQUEST").await;
        assert!(
            message(&body).contains("metadata.userAgent"),
            "{ua:?}: {body}"
        );
    }
    assert!(s.stored_ids("alice").is_empty());
    // Printable text beyond ASCII is fine.
    let created = s
        .create_with(
            "alice",
            Some(r#"{"metadata":{"userAgent":"Jeu/1 (é, 日本)"}}"#),
            None,
        )
        .await;
    let id = created["data"]["sessionId"].as_str().unwrap();
    let session = s.get_ok("alice", id).await;
    assert_eq!(session["metadata"]["userAgent"], "Jeu/1 (é, 日本)");

    // From the header (no userAgent in the body), control characters are dropped.
    let created = s
        .create_with("alice", None, Some("Game/1\tX\u{9b}[31m"))
        .await;
    let id = created["data"]["sessionId"].as_str().unwrap();
    let session = s.get_ok("alice", id).await;
    assert_eq!(session["metadata"]["userAgent"], "Game/1X[31m");
}

#[tokio::test]
async fn create_rejects_a_body_over_16_kib_with_413_and_accepts_one_of_exactly_16_kib() {
    let s = setup().await;
    let json = r#"{"metadata":{"platform":"ios"}}"#;
    let exact = format!("{json}{}", " ".repeat(16 * 1024 - json.len()));
    assert_eq!(exact.len(), 16 * 1024);
    let resp = s.post_create_raw("alice", exact.clone()).await;
    assert_eq!(resp.status(), 201, "a 16 KiB body is allowed");

    let over = format!("{exact} ");
    let resp = s.post_create_raw("alice", over).await;
    assert_error(resp, 413, "PAYLOAD_TOO_LARGE").await;

    // Streamed without a length, too.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 10 * 1024]), Ok(vec![b' '; 10 * 1024])];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = s.post_create_raw("alice", body).await;
    assert_error(resp, 413, "PAYLOAD_TOO_LARGE").await;
    assert_eq!(s.stored_ids("alice").len(), 1);
}

#[tokio::test]
async fn a_session_id_that_is_not_a_uuid_is_400_on_get_extend_and_delete() {
    let s = setup().await;
    let t = token("alice", None);
    for bad in ["not-a-uuid", "12345", "xyz'"] {
        let resp = client()
            .get(s.url(&format!("/{bad}")))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        let body = assert_error(resp, 400, "INVALID_SESSION_ID").await;
        assert!(
            message(&body).contains(bad.trim_end_matches('\'')),
            "{body}"
        );
        let resp = client()
            .post(s.url(&format!("/{bad}/extend")))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_error(resp, 400, "INVALID_SESSION_ID").await;
        let resp = client()
            .delete(s.url(&format!("/{bad}")))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_error(resp, 400, "INVALID_SESSION_ID").await;
    }
}

#[tokio::test]
async fn a_wrong_method_on_a_known_endpoint_is_405() {
    let s = setup().await;
    let id = s.create("alice").await;
    let t = token("alice", None);
    let cases = [
        (reqwest::Method::GET, "/create".to_string()),
        (reqwest::Method::PUT, "/create".to_string()),
        (reqwest::Method::DELETE, "/create".to_string()),
        (reqwest::Method::POST, "/user/sessions".to_string()),
        (reqwest::Method::PUT, "/user/sessions".to_string()),
        (reqwest::Method::POST, format!("/{id}")),
        (reqwest::Method::PUT, format!("/{id}")),
        (reqwest::Method::PATCH, format!("/{id}")),
        (reqwest::Method::GET, format!("/{id}/extend")),
        (reqwest::Method::DELETE, format!("/{id}/extend")),
        (reqwest::Method::POST, "/openapi.json".to_string()),
    ];
    for (method, path) in cases {
        let resp = client()
            .request(method.clone(), s.url(&path))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert!(resp.headers().contains_key("allow"), "{method} {path}");
        assert_error(resp, 405, "METHOD_NOT_ALLOWED").await;
    }
    // None of them touched the session.
    assert_eq!(s.stored_ids("alice"), set(&[&id]));
}

#[tokio::test]
async fn a_405_lists_in_allow_exactly_the_methods_the_endpoint_answers() {
    let s = setup().await;
    let t = token("alice", None);
    let id = s.create("alice").await;
    let cases = [
        ("/create".to_string(), "POST"),
        (format!("/{id}/extend"), "POST"),
        ("/openapi.json".to_string(), "GET, HEAD"),
        // Last: their DELETEs end the session the others use.
        (format!("/{id}"), "GET, HEAD, DELETE"),
        ("/user/sessions".to_string(), "GET, HEAD, DELETE"),
    ];
    for (path, allow) in &cases {
        let resp = client()
            .request(reqwest::Method::PATCH, s.url(path))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "PATCH {path}");
        assert_eq!(
            resp.headers().get("allow").and_then(|v| v.to_str().ok()),
            Some(*allow),
            "PATCH {path}"
        );
    }
    // Every method named is answered.
    for (path, allow) in &cases {
        for method in allow.split(", ") {
            let resp = client()
                .request(method.parse().unwrap(), s.url(path))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap();
            assert!(
                resp.status().is_success(),
                "{method} {path}: {}",
                resp.status()
            );
        }
    }
}

#[tokio::test]
async fn an_unknown_path_under_the_api_prefix_is_404_not_found() {
    let s = setup().await;
    let id = s.create("alice").await;
    let t = token("alice", None);
    for path in [
        "".to_string(),
        "/".to_string(),
        "/a/b/c".to_string(),
        "/user/sessions/x".to_string(),
        format!("/{id}/renew"),
        format!("/{id}/extend/now"),
    ] {
        let resp = client()
            .get(s.url(&path))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "GET {API}{path}");
        assert_error(resp, 404, "NOT_FOUND").await;
    }
}

#[tokio::test]
async fn every_endpoint_but_the_openapi_document_needs_a_token() {
    let s = setup().await;
    let id = s.create("alice").await;
    let cases = [
        (reqwest::Method::POST, "/create".to_string()),
        (reqwest::Method::GET, "/user/sessions".to_string()),
        (reqwest::Method::GET, format!("/{id}")),
        (reqwest::Method::POST, format!("/{id}/extend")),
        (reqwest::Method::DELETE, format!("/{id}")),
    ];
    for (method, path) in &cases {
        let resp = client()
            .request(method.clone(), s.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer"),
            "{method} {path}"
        );
        assert_error(resp, 401, "TOKEN_MISSING").await;

        let resp = client()
            .request(method.clone(), s.url(path))
            .bearer_auth("not.a.token")
            .send()
            .await
            .unwrap();
        assert_error(resp, 401, "TOKEN_INVALID").await;
    }
    // The session survived the anonymous DELETE, and nothing else was created.
    assert_eq!(s.stored_ids("alice"), set(&[&id]));
}

/// A token bound to a session (a `sid` claim) is good for the API only while that session
/// lives: once it is destroyed, the token can neither open a new session nor see or end the
/// user's others. A token without `sid` is not affected.
#[tokio::test]
async fn a_token_bound_to_a_destroyed_session_can_no_longer_use_the_api() {
    let s = setup().await;
    let login = token("mallory", None);
    let kept = create_session(&s.proxy, &login).await;
    let bound_to = create_session(&s.proxy, &login).await;
    let bound = token("mallory", Some(&bound_to));
    let get = |url: String, bearer: &str| client().get(url).bearer_auth(bearer).send();

    // While its session lives, the bound token manages the user's sessions.
    let list = get(s.url("/user/sessions"), &bound).await.unwrap();
    assert_eq!(list.status(), 200);
    // Destroyed (logged out, or kicked by an operator through Redis).
    let _: () = redis::cmd("DEL")
        .arg(sessions_key("mallory"))
        .query(&mut s.redis.conn())
        .unwrap();
    let fresh = create_session(&s.proxy, &login).await; // the user logs in again elsewhere
    let writes = || s.redis.command_calls("set") + s.redis.command_calls("setrange");
    let (writes_before, commands_before) = (writes(), s.redis.total_calls());

    assert_error(
        get(s.url("/user/sessions"), &bound).await.unwrap(),
        401,
        "SESSION_INVALID",
    )
    .await;
    assert_error(
        get(s.url(&format!("/{kept}")), &bound).await.unwrap(),
        401,
        "SESSION_INVALID",
    )
    .await;
    let create = client().post(s.url("/create")).bearer_auth(&bound).send();
    assert_error(create.await.unwrap(), 401, "SESSION_INVALID").await;
    let extend = client()
        .post(s.url(&format!("/{fresh}/extend")))
        .bearer_auth(&bound)
        .send();
    assert_error(extend.await.unwrap(), 401, "SESSION_INVALID").await;
    let destroy = client()
        .delete(s.url(&format!("/{bound_to}")))
        .bearer_auth(&bound)
        .send();
    assert_error(destroy.await.unwrap(), 401, "SESSION_INVALID").await;
    // Each refusal asked Redis about the session; none wrote anything.
    assert_eq!(writes(), writes_before);
    assert!(s.redis.total_calls() > commands_before);

    // The unbound login token still works.
    let list = get(s.url("/user/sessions"), &login).await.unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(json(list).await["data"].as_array().map(Vec::len), Some(1));
}

/// A body that breaks its own chunked framing is the client's malformed request, here as on
/// proxied routes, and opens no session.
#[tokio::test]
async fn a_create_whose_body_breaks_its_framing_is_a_malformed_request() {
    let s = setup().await;
    let request = format!(
        "POST {API}/create HTTP/1.1\r\nHost: game.example\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n3\r\n{{}} \r\nzz\r\n",
        token("alice", None)
    );
    let resp = send_raw(s.proxy.addr, request.as_bytes()).await;
    resp.assert_error(400, "MALFORMED_REQUEST");
    assert!(stored_ids(&mut s.redis.conn(), "alice").is_empty());
}

/// A create whose body stalls is dropped with its connection at `idle_timeout`, like any
/// stalled upload: the call's own task, which outlives a client that goes away, starts only
/// once the body has all arrived.
#[tokio::test]
async fn a_create_whose_body_stalls_is_dropped_with_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup_with("[server]\nidle_timeout = \"1s\"\n").await;
    let mut stream = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    let head = format!(
        "POST {API}/create HTTP/1.1\r\nHost: game.example\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 100\r\n\r\n{{\"metadata\"",
        token("alice", None)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Nothing more is sent. The connection closes, without an answer.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the connection was still open after 10 s");
    assert!(stored_ids(&mut s.redis.conn(), "alice").is_empty());
}

/// Only a call that reads its body (a create) waits for it: a list sent with a large body,
/// which it has no use for, gets its answer.
#[tokio::test]
async fn a_call_that_reads_no_body_answers_whatever_body_comes() {
    let s = setup().await;
    let mut request = format!(
        "GET {API}/user/sessions HTTP/1.1\r\nHost: game.example\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 20000\r\nConnection: close\r\n\r\n",
        token("alice", None)
    )
    .into_bytes();
    request.extend_from_slice(&[b'x'; 20_000]);
    let resp = send_raw(s.proxy.addr, &request).await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
}
