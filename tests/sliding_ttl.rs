//! Sliding sessions, in real time with a short ttl: requests keep a session alive, silence
//! lets it expire, and each request puts the TTL in Redis back to full.

mod support;

use std::time::{Duration, Instant};

use support::*;

const TTL_MS: i64 = 2_000;

struct Setup {
    redis: RedisServer,
    upstream: Upstream,
    proxy: Proxy,
}

async fn setup_with(session: &str) -> Setup {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, session)).await;
    Setup {
        redis,
        upstream,
        proxy,
    }
}

async fn setup() -> Setup {
    setup_with("[session]\nttl = \"2s\"\nlast_active_resolution = \"0s\"\n").await
}

impl Setup {
    async fn request(&self, sid: &str) -> reqwest::Response {
        client()
            .get(self.proxy.url("/game"))
            .bearer_auth(token("alice", Some(sid)))
            .send()
            .await
            .unwrap()
    }

    fn stored(&self, sid: &str) -> portcullis::session::record::Record {
        stored_session(&mut self.redis.conn(), "alice", sid).expect("session stored")
    }

    fn last_active_ms(&self, sid: &str) -> u64 {
        self.stored(sid).last_active_ms
    }

    /// Milliseconds the session has left in Redis.
    fn ttl(&self, sid: &str) -> i64 {
        session_ttl_ms(&mut self.redis.conn(), "alice", sid).expect("session stored")
    }

    /// PTTL of the key holding alice's sessions.
    fn key_pttl(&self) -> i64 {
        pttl(&mut self.redis.conn(), &sessions_key("alice"))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn requests_keep_a_session_alive_well_past_its_ttl() {
    let s = setup().await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    let created = Instant::now();
    let mut last_active = s.last_active_ms(&sid);
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let resp = s.request(&sid).await;
        assert_eq!(resp.status(), 200, "round {round}");
        let ttl = s.ttl(&sid);
        assert!(
            ttl > TTL_MS - 250,
            "round {round}: TTL {ttl} ms is not back near {TTL_MS}"
        );
        assert!(
            s.key_pttl() >= ttl - 50,
            "round {round}: the key dies first"
        );
        let now = s.last_active_ms(&sid);
        assert!(now > last_active, "round {round}: lastActive did not move");
        last_active = now;
    }
    assert!(created.elapsed() > Duration::from_millis(3 * TTL_MS as u64 / 2));
    assert_eq!(s.upstream.count(), 6);
}

#[tokio::test]
async fn silence_lets_a_session_expire_and_then_it_is_401_session_invalid() {
    let s = setup().await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    let last = Instant::now();
    assert_eq!(s.request(&sid).await.status(), 200);
    let forwarded = s.upstream.count();

    // Wait, bounded, for Redis to expire it (its key goes with the user's last session): only
    // time can do this.
    let key = sessions_key("alice");
    loop {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut s.redis.conn())
            .unwrap();
        if exists == 0 {
            break;
        }
        assert!(
            last.elapsed() < Duration::from_secs(4),
            "the session outlived its ttl"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        last.elapsed() >= Duration::from_millis(TTL_MS as u64 - 100),
        "the session died after {:?}, before its ttl",
        last.elapsed()
    );

    let resp = s.request(&sid).await;
    assert_error(resp, 401, "SESSION_INVALID").await;
    assert_eq!(s.upstream.count(), forwarded);
    let resp = client()
        .get(s.proxy.url(&format!("/api/v1/sessions/{sid}")))
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_error(resp, 404, "SESSION_NOT_FOUND").await;
}

#[tokio::test]
async fn a_request_puts_the_ttl_in_redis_back_near_full() {
    let s = setup().await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    expire_session_in(&mut s.redis.conn(), "alice", &sid, 300);
    assert!(s.key_pttl() <= 300, "precondition");
    let before = now_ms();
    assert_eq!(s.request(&sid).await.status(), 200);
    let ttl = s.ttl(&sid);
    assert!(ttl > TTL_MS - 100, "TTL after a request is {ttl}");
    let key = s.key_pttl();
    assert!(key > TTL_MS - 100, "key PTTL after a request is {key}");
    let last_active = s.last_active_ms(&sid);
    assert!(
        last_active >= before && last_active <= now_ms(),
        "lastActive {last_active} was not set to the request's time ({before})"
    );
}

#[tokio::test]
async fn last_active_is_rewritten_at_most_once_per_resolution_but_the_ttl_always_slides() {
    let s = setup_with("[session]\nttl = \"60s\"\nlast_active_resolution = \"30s\"\n").await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    let stored = s.stored(&sid);
    expire_session_in(&mut s.redis.conn(), "alice", &sid, 3_000);
    assert_eq!(s.request(&sid).await.status(), 200);
    let after = s.stored(&sid);
    assert_eq!(
        after.last_active_ms, stored.last_active_ms,
        "lastActive was rewritten within the resolution"
    );
    assert_eq!(after.metadata, stored.metadata);
    let ttl = s.ttl(&sid);
    assert!(ttl > 59_000, "TTL after a request is {ttl}");
    assert!(s.key_pttl() > 59_000, "the key did not follow");
}
