//! What the session layer keeps in Redis: the user's index never lists a dead session and never
//! outlives the user's longest-lived session; one session costs little memory.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::*;

/// Slack between two PTTL readings taken by separate commands.
const SLACK_MS: i64 = 50;

struct Setup {
    redis: RedisServer,
    proxy: Proxy,
    _upstream: Upstream,
}

async fn setup() -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = session_config(&upstream, &redis, "[session]\nttl = \"60s\"\n");
    let proxy = Proxy::start(&config).await;
    Setup {
        redis,
        proxy,
        _upstream: upstream,
    }
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

    fn members(&self, user: &str) -> BTreeSet<String> {
        redis::cmd("HKEYS")
            .arg(index_key(user))
            .query(&mut self.redis.conn())
            .unwrap()
    }

    fn pexpire(&self, key: &str, ms: i64) {
        let _: () = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(ms)
            .query(&mut self.redis.conn())
            .unwrap();
    }

    /// Asserts the index lives exactly as long as the user's longest-lived session: never
    /// longer (it would outlive the sessions), never shorter (it would forget live ones).
    fn assert_index_ttl_matches(&self, user: &str, ids: &[&str], when: &str) {
        let mut conn = self.redis.conn();
        // The index is read first, so that time passing can only make it look shorter.
        let index = pttl(&mut conn, &index_key(user));
        let longest = ids
            .iter()
            .map(|id| pttl(&mut conn, &session_key(user, id)))
            .max()
            .unwrap_or(-2);
        assert!(index > 0, "{when}: index PTTL is {index}");
        assert!(
            index <= longest + SLACK_MS,
            "{when}: index PTTL {index} ms exceeds the longest session's {longest} ms"
        );
        assert!(
            index >= longest - SLACK_MS,
            "{when}: index PTTL {index} ms is shorter than the longest session's {longest} ms"
        );
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn list_prunes_a_session_whose_key_was_deleted_behind_its_back() {
    let s = setup().await;
    let a = s.create("alice").await;
    let b = s.create("alice").await;
    let _: () = redis::cmd("DEL")
        .arg(session_key("alice", &a))
        .query(&mut s.redis.conn())
        .unwrap();
    assert_eq!(s.members("alice"), set(&[&a, &b]), "precondition");
    assert_eq!(s.list_ids("alice").await, set(&[&b]));
    assert_eq!(s.members("alice"), set(&[&b]), "the index still lists it");
}

#[tokio::test]
async fn list_prunes_a_session_that_expired() {
    let s = setup().await;
    let a = s.create("alice").await;
    let b = s.create("alice").await;
    s.pexpire(&session_key("alice", &a), 1);
    // Wait (bounded) for Redis to consider it gone.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(session_key("alice", &a))
            .query(&mut s.redis.conn())
            .unwrap();
        if exists == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "session key never expired");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(s.list_ids("alice").await, set(&[&b]));
    assert_eq!(s.members("alice"), set(&[&b]));
    s.assert_index_ttl_matches("alice", &[&b], "after list");
}

#[tokio::test]
async fn list_of_only_dead_sessions_removes_the_index() {
    let s = setup().await;
    let a = s.create("alice").await;
    let _: () = redis::cmd("DEL")
        .arg(session_key("alice", &a))
        .query(&mut s.redis.conn())
        .unwrap();
    assert!(s.list_ids("alice").await.is_empty());
    let exists: i64 = redis::cmd("EXISTS")
        .arg(index_key("alice"))
        .query(&mut s.redis.conn())
        .unwrap();
    assert_eq!(exists, 0, "an index of no live session remains");
}

#[tokio::test]
async fn create_prunes_dead_sessions_from_the_index() {
    let s = setup().await;
    let a = s.create("alice").await;
    let _: () = redis::cmd("DEL")
        .arg(session_key("alice", &a))
        .query(&mut s.redis.conn())
        .unwrap();
    let b = s.create("alice").await;
    assert_eq!(s.members("alice"), set(&[&b]));
}

#[tokio::test]
async fn the_index_lives_as_long_as_the_longest_session_after_create() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.assert_index_ttl_matches("alice", &[&a], "after the first create");
    // A shorter-lived session must not shorten the index; a new one lengthens it.
    s.pexpire(&session_key("alice", &a), 10_000);
    s.pexpire(&index_key("alice"), 10_000);
    let b = s.create("alice").await;
    s.assert_index_ttl_matches("alice", &[&a, &b], "after the second create");
}

#[tokio::test]
async fn the_index_shrinks_to_the_longest_remaining_session_after_destroy() {
    let s = setup().await;
    let short = s.create("alice").await;
    s.pexpire(&session_key("alice", &short), 10_000);
    let long = s.create("alice").await;
    s.assert_index_ttl_matches("alice", &[&short, &long], "before destroy");
    s.delete("alice", &long).await;
    s.assert_index_ttl_matches("alice", &[&short], "after destroying the longest");
    assert_eq!(s.members("alice"), set(&[&short]));
}

#[tokio::test]
async fn destroying_the_last_session_removes_the_index() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.delete("alice", &a).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(index_key("alice"))
        .query(&mut s.redis.conn())
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn the_index_follows_a_session_that_is_extended() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.pexpire(&session_key("alice", &a), 5_000);
    s.pexpire(&index_key("alice"), 5_000);
    s.extend("alice", &a).await;
    s.assert_index_ttl_matches("alice", &[&a], "after extend");
    let ttl = pttl(&mut s.redis.conn(), &session_key("alice", &a));
    assert!(ttl > 55_000, "extend left PTTL at {ttl}");
}

#[tokio::test]
async fn the_index_follows_a_session_slid_by_a_proxied_request() {
    let s = setup().await;
    let a = s.create("alice").await;
    s.pexpire(&session_key("alice", &a), 5_000);
    s.pexpire(&index_key("alice"), 5_000);
    let resp = client()
        .get(s.proxy.url("/game"))
        .bearer_auth(token("alice", Some(&a)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    s.assert_index_ttl_matches("alice", &[&a], "after a proxied request");
}

#[tokio::test]
async fn a_proxied_request_recreates_a_lost_index_entry() {
    let s = setup().await;
    let a = s.create("alice").await;
    let _: () = redis::cmd("DEL")
        .arg(index_key("alice"))
        .query(&mut s.redis.conn())
        .unwrap();
    let resp = client()
        .get(s.proxy.url("/game"))
        .bearer_auth(token("alice", Some(&a)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.members("alice"), set(&[&a]));
    s.assert_index_ttl_matches("alice", &[&a], "after re-adding");
    assert_eq!(s.list_ids("alice").await, set(&[&a]));
}

#[tokio::test]
async fn one_session_with_a_120_byte_user_agent_uses_under_400_bytes_of_redis_memory() {
    let s = setup().await;
    let ua = format!(
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) {}",
        "x".repeat(79)
    );
    assert_eq!(ua.len(), 120);
    let body = serde_json::json!({
        "metadata": {"userAgent": ua, "deviceId": "3f2c9a1e-device-0001"}
    });
    let resp = client()
        .post(s.proxy.url("/api/v1/sessions/create"))
        .bearer_auth(token("player-000042", None))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let id = json(resp).await["data"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    let mut conn = s.redis.conn();
    let key = session_key("player-000042", &id);
    let session: i64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&key)
        .query(&mut conn)
        .unwrap();
    let index: i64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(index_key("player-000042"))
        .query(&mut conn)
        .unwrap();
    let value: String = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    println!(
        "MEMORY USAGE: session key {session} bytes (value {} bytes), user index {index} bytes",
        value.len()
    );
    assert!(session < 400, "one session costs {session} bytes");
}
