//! What the session layer keeps in Redis: one key per user holding their sessions, which never
//! keeps an expired session once touched by a write, never outlives the user's longest-lived
//! session, stays within `session.max_per_user`, and costs little memory.

mod observe;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use observe::{Exposition, SessionsKey, ROUNDING_MS};
use support::*;

struct Setup {
    redis: RedisServer,
    proxy: Proxy,
    upstream: Upstream,
}

async fn setup_with(extra: &str) -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = session_config(
        &upstream,
        &redis,
        &format!("[session]\nttl = \"60s\"\n{extra}"),
    );
    let proxy = Proxy::start(&config).await;
    Setup {
        redis,
        proxy,
        upstream,
    }
}

async fn setup() -> Setup {
    setup_with("").await
}

impl Setup {
    async fn create(&self, user: &str) -> String {
        create_session(&self.proxy, &token(user, None)).await
    }

    async fn list_ids(&self, user: &str) -> BTreeSet<String> {
        let resp = client()
            .get(self.proxy.url("/api/v1/sessions/user/sessions"))
            .bearer_auth(token(user, None))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        json(resp).await["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessionId"].as_str().unwrap().to_string())
            .collect()
    }

    async fn delete(&self, user: &str, id: &str) {
        let resp = client()
            .delete(self.proxy.url(&format!("/api/v1/sessions/{id}")))
            .bearer_auth(token(user, None))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    async fn extend(&self, user: &str, id: &str) {
        let resp = client()
            .post(self.proxy.url(&format!("/api/v1/sessions/{id}/extend")))
            .bearer_auth(token(user, None))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    /// `GET` of the session through the API, with a token for `user` not bound to it.
    async fn get(&self, user: &str, id: &str) -> reqwest::Response {
        client()
            .get(self.proxy.url(&format!("/api/v1/sessions/{id}")))
            .bearer_auth(token(user, None))
            .send()
            .await
            .unwrap()
    }

    /// Overwrites byte `at` of the user's stored value with `byte`, as another writer might.
    fn patch_stored(&self, user: &str, at: usize, byte: u8) {
        let mut conn = self.redis.conn();
        let mut value: Vec<u8> = redis::cmd("GET")
            .arg(sessions_key(user))
            .query(&mut conn)
            .unwrap();
        value[at] = byte;
        let _: () = redis::cmd("SET")
            .arg(sessions_key(user))
            .arg(value)
            .arg("KEEPTTL")
            .query(&mut conn)
            .unwrap();
    }

    async fn proxied(&self, user: &str, id: &str) -> reqwest::Response {
        client()
            .get(self.proxy.url("/game"))
            .bearer_auth(token(user, Some(id)))
            .send()
            .await
            .unwrap()
    }

    fn stored_ids(&self, user: &str) -> BTreeSet<String> {
        stored_ids(&mut self.redis.conn(), user)
    }

    fn expire_in(&self, user: &str, id: &str, ms: i64) {
        expire_session_in(&mut self.redis.conn(), user, id, ms);
    }

    fn key_exists(&self, user: &str) -> bool {
        let n: i64 = redis::cmd("EXISTS")
            .arg(sessions_key(user))
            .query(&mut self.redis.conn())
            .unwrap();
        n == 1
    }

    /// Asserts the user's key lives exactly as long as their longest-lived session: never
    /// longer (it would outlive the sessions), never shorter (it would forget live ones).
    fn assert_key_ttl_matches(&self, user: &str, ids: &[&str], when: &str) {
        // The key's PTTL and the sessions' expiries, read at one instant.
        let read = SessionsKey::read(&mut self.redis.conn(), &sessions_key(user));
        let key = read.pttl;
        let longest = ids
            .iter()
            .map(|id| read.ttl_ms(id).unwrap_or(-2))
            .max()
            .unwrap_or(-2);
        assert!(key > 0, "{when}: key PTTL is {key}");
        assert!(
            key <= longest + ROUNDING_MS,
            "{when}: key PTTL {key} ms exceeds the longest session's {longest} ms"
        );
        assert!(
            key >= longest - ROUNDING_MS,
            "{when}: key PTTL {key} ms is shorter than the longest session's {longest} ms"
        );
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn an_expired_session_is_refused_everywhere_and_list_drops_it() {
    let s = setup().await;
    let a = s.create("alice").await;
    let b = s.create("alice").await;
    s.expire_in("alice", &a, -1);
    assert_eq!(s.stored_ids("alice"), set(&[&a, &b]), "precondition");
    let resp = s.proxied("alice", &a).await;
    assert_error(resp, 401, "SESSION_INVALID").await;
    assert_eq!(s.upstream.count(), 0);
    let resp = s.get("alice", &a).await;
    assert_error(resp, 404, "SESSION_NOT_FOUND").await;
    // A token bound to the expired session (still stored) can no longer use the API.
    let resp = client()
        .get(s.proxy.url("/api/v1/sessions/user/sessions"))
        .bearer_auth(token("alice", Some(&a)))
        .send()
        .await
        .unwrap();
    assert_error(resp, 401, "SESSION_INVALID").await;
    assert_eq!(s.stored_ids("alice"), set(&[&a, &b]), "a refusal wrote");
    assert_eq!(s.list_ids("alice").await, set(&[&b]));
    assert_eq!(
        s.stored_ids("alice"),
        set(&[&b]),
        "list kept the expired one"
    );
    s.assert_key_ttl_matches("alice", &[&b], "after list");
}

#[tokio::test]
async fn list_of_only_expired_sessions_removes_the_key() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.expire_in("alice", &a, -1);
    assert!(s.key_exists("alice"), "precondition");
    assert!(s.list_ids("alice").await.is_empty());
    assert!(!s.key_exists("alice"), "a key of no live session remains");
}

#[tokio::test]
async fn create_drops_expired_sessions() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.expire_in("alice", &a, -1);
    let b = s.create("alice").await;
    assert_eq!(s.stored_ids("alice"), set(&[&b]));
}

#[tokio::test]
async fn the_key_lives_as_long_as_the_longest_session_after_create() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.assert_key_ttl_matches("alice", &[&a], "after the first create");
    // A shorter-lived session must not shorten the key; a new one lengthens it.
    s.expire_in("alice", &a, 10_000);
    s.assert_key_ttl_matches("alice", &[&a], "precondition");
    let b = s.create("alice").await;
    s.assert_key_ttl_matches("alice", &[&a, &b], "after the second create");
}

#[tokio::test]
async fn the_key_shrinks_to_the_longest_remaining_session_after_destroy() {
    let s = setup().await;
    let short = s.create("alice").await;
    s.expire_in("alice", &short, 10_000);
    let long = s.create("alice").await;
    s.assert_key_ttl_matches("alice", &[&short, &long], "before destroy");
    s.delete("alice", &long).await;
    s.assert_key_ttl_matches("alice", &[&short], "after destroying the longest");
    assert_eq!(s.stored_ids("alice"), set(&[&short]));
}

#[tokio::test]
async fn destroying_the_last_session_removes_the_key() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.delete("alice", &a).await;
    assert!(!s.key_exists("alice"));
}

#[tokio::test]
async fn the_key_follows_a_session_that_is_extended() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.expire_in("alice", &a, 5_000);
    s.extend("alice", &a).await;
    s.assert_key_ttl_matches("alice", &[&a], "after extend");
    let ttl = session_ttl_ms(&mut s.redis.conn(), "alice", &a).unwrap();
    assert!(ttl > 55_000, "extend left the TTL at {ttl}");
}

#[tokio::test]
async fn the_key_follows_a_session_slid_by_a_proxied_request() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.expire_in("alice", &a, 5_000);
    assert_eq!(s.proxied("alice", &a).await.status(), 200);
    s.assert_key_ttl_matches("alice", &[&a], "after a proxied request");
    let ttl = session_ttl_ms(&mut s.redis.conn(), "alice", &a).unwrap();
    assert!(ttl > 55_000, "the request left the TTL at {ttl}");
}

#[tokio::test]
async fn a_slide_leaves_the_users_other_sessions_as_they_were() {
    let s = setup().await;
    let a = s.create("alice").await;
    let b = s.create("alice").await;
    s.expire_in("alice", &a, 5_000);
    s.expire_in("alice", &b, 7_000);
    let before = stored_session(&mut s.redis.conn(), "alice", &b).unwrap();
    assert_eq!(s.proxied("alice", &a).await.status(), 200);
    let after = stored_session(&mut s.redis.conn(), "alice", &b).unwrap();
    assert_eq!(after, before, "b was changed by a's slide");
    let a_ttl = session_ttl_ms(&mut s.redis.conn(), "alice", &a).unwrap();
    assert!(a_ttl > 55_000, "a was not slid: {a_ttl}");
}

#[tokio::test]
async fn a_value_that_is_not_in_the_session_layout_fails_closed_everywhere() {
    let s = setup().await;
    let a = s.create("alice").await;
    let t = token("alice", None);
    let bound = token("alice", Some(&a));
    let api = |path: &str| s.proxy.url(&format!("/api/v1/sessions{path}"));
    // Not the layout at all; a record whose length runs past the end; a record too short to
    // hold a session.
    let mut overrun = vec![1u8, 0, 200];
    overrun.extend_from_slice(uuid::Uuid::parse_str(&a).unwrap().as_bytes());
    let short = [1u8, 0, 3, 1, 2, 3];
    // The session's own record, whole, and a stray byte after it: the record is found before
    // the byte is reached, and the value is still not the layout.
    let mut trailing: Vec<u8> = redis::cmd("GET")
        .arg(sessions_key("alice"))
        .query(&mut s.redis.conn())
        .unwrap();
    trailing.push(0);
    let values: [&[u8]; 4] = [b"not a session record", &overrun, &short, &trailing];
    for value in values {
        let _: () = redis::cmd("SET")
            .arg(sessions_key("alice"))
            .arg(value)
            .query(&mut s.redis.conn())
            .unwrap();
        let answers = [
            s.proxied("alice", &a).await,
            client()
                .get(api(&format!("/{a}")))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap(),
            client()
                .get(api("/user/sessions"))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap(),
            client()
                .post(api(&format!("/{a}/extend")))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap(),
            client()
                .delete(api(&format!("/{a}")))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap(),
            client()
                .post(api("/create"))
                .bearer_auth(&t)
                .send()
                .await
                .unwrap(),
            // A bound token's session is looked for in the value first.
            client()
                .post(api("/create"))
                .bearer_auth(&bound)
                .send()
                .await
                .unwrap(),
        ];
        for resp in answers {
            assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        }
        assert_eq!(s.upstream.count(), 0, "forwarded unchecked");
        let kept: Vec<u8> = redis::cmd("GET")
            .arg(sessions_key("alice"))
            .query(&mut s.redis.conn())
            .unwrap();
        assert_eq!(kept, value, "a value not in the layout was overwritten");
    }
}

/// A record in the layout whose details cannot be read fails closed on proxied routes as in the
/// API: the per-request check reads the whole record, not only the platform it needs.
#[tokio::test]
async fn a_session_whose_details_cannot_be_read_is_refused_everywhere() {
    let s = setup().await;
    let a = s.create("alice").await;
    // version, record length, session id, three times, platform: then the device id's length,
    // made to run past the record.
    s.patch_stored("alice", 1 + 2 + 16 + 18 + 1, 255);
    assert_error(
        s.proxied("alice", &a).await,
        503,
        "SESSION_STORE_UNAVAILABLE",
    )
    .await;
    let resp = s.get("alice", &a).await;
    assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
    assert_eq!(s.upstream.count(), 0, "forwarded unchecked");
}

/// A session that makes room for a new one but cannot be read (its details written by another
/// hand) is still ended, and the create that ended it still succeeds.
#[tokio::test]
async fn a_create_that_evicts_an_unreadable_session_succeeds() {
    let s = setup_with("max_per_user = 1\n").await;
    let old = s.create("alice").await;
    // version, record length, session id, three times: then the platform, made unknown.
    s.patch_stored("alice", 1 + 2 + 16 + 18, b'?');
    let new = s.create("alice").await;
    assert_eq!(s.stored_ids("alice"), set(&[&new]), "{old} was not ended");
}

#[tokio::test]
async fn opening_more_than_max_per_user_ends_the_least_recently_active() {
    let s = setup_with("max_per_user = 2\nlast_active_resolution = \"0s\"\nlocal_cache = false\n")
        .await;
    let a = s.create("alice").await;
    let b = s.create("alice").await;
    // Requests make a the most recently active, so b is the least.
    let b_active = stored_session(&mut s.redis.conn(), "alice", &b)
        .unwrap()
        .last_active_ms;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        assert_eq!(s.proxied("alice", &a).await.status(), 200);
        let a_active = stored_session(&mut s.redis.conn(), "alice", &a)
            .unwrap()
            .last_active_ms;
        if a_active > b_active {
            break;
        }
        assert!(Instant::now() < deadline, "lastActive never moved");
    }
    let c = s.create("alice").await;
    assert_eq!(s.list_ids("alice").await, set(&[&a, &c]));
    assert_eq!(s.stored_ids("alice"), set(&[&a, &c]));
    let resp = s.proxied("alice", &b).await;
    assert_error(resp, 401, "SESSION_INVALID").await;
    assert_eq!(s.proxied("alice", &a).await.status(), 200);
    let metrics = Exposition::parse(&s.proxy.metrics_text().await);
    assert_eq!(
        metrics.get("portcullis_sessions_evicted_total", &[]),
        Some(1.0),
        "portcullis_sessions_evicted_total"
    );
    // Other users are not affected by alice's cap.
    let d = s.create("bob").await;
    assert_eq!(s.stored_ids("bob"), set(&[&d]));
}

/// The size behind the memory figures bench/run.sh reports: one session with a 120-byte
/// User-Agent, a 36-character device id and an IPv4 address is one value of 200 bytes.
#[tokio::test]
async fn one_session_with_a_120_byte_user_agent_is_a_200_byte_value() {
    let s = setup().await;
    let ua = format!(
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) {}",
        "x".repeat(79)
    );
    assert_eq!(ua.len(), 120);
    let body = serde_json::json!({
        "metadata": {"userAgent": ua, "deviceId": "3f2c9a1e-8d4b-4c1a-9e2f-7b6a5d4c3b2a"}
    });
    let user = "6ba7b810-9dad-51d1-80b4-00c04fd430c8";
    let resp = client()
        .post(s.proxy.url("/api/v1/sessions/create"))
        .bearer_auth(token(user, None))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let value: Vec<u8> = redis::cmd("GET")
        .arg(sessions_key(user))
        .query(&mut s.redis.conn())
        .unwrap();
    // version, record length, session id, three u48 times, platform, device id and IPv4
    // address with their lengths, User-Agent (README: Redis keys).
    let layout = 1 + 2 + 16 + 3 * 6 + 1 + (1 + 36) + (1 + 4) + 120;
    assert_eq!(layout, 200);
    assert_eq!(value.len(), layout);
}

#[tokio::test]
async fn a_check_with_nothing_due_writes_nothing_and_a_due_slide_writes_once() {
    // ttl 60s: slides are due once 3s (ttl/20) have passed since the last; lastActive every 30s.
    let s = setup_with("last_active_resolution = \"30s\"\nlocal_cache = false\n").await;
    let a = s.create("alice").await;
    let mut conn = s.redis.conn();
    let value = |conn: &mut redis::Connection| -> Vec<u8> {
        redis::cmd("GET")
            .arg(sessions_key("alice"))
            .query(conn)
            .unwrap()
    };
    let writes = |conn: &mut redis::Connection| {
        let stats = commandstats(conn);
        ["setrange", "pexpire", "set", "del"]
            .iter()
            .map(|c| stats.get(*c).copied().unwrap_or(0))
            .sum::<u64>()
    };
    let stored = value(&mut conn);
    let before = writes(&mut conn);
    for _ in 0..5 {
        assert_eq!(s.proxied("alice", &a).await.status(), 200);
    }
    assert_eq!(writes(&mut conn), before, "a check with nothing due wrote");
    assert_eq!(value(&mut conn), stored);

    s.expire_in("alice", &a, 5_000);
    let before = commandstats(&mut conn);
    assert_eq!(s.proxied("alice", &a).await.status(), 200);
    let after = commandstats(&mut conn);
    let delta = |c: &str| after.get(c).unwrap_or(&0) - before.get(c).unwrap_or(&0);
    assert_eq!(delta("setrange"), 1, "{after:?}");
    assert_eq!(delta("pexpire"), 1, "{after:?}");
    let ttl = session_ttl_ms(&mut conn, "alice", &a).unwrap();
    assert!(ttl > 59_000, "the due slide left the TTL at {ttl}");
}
