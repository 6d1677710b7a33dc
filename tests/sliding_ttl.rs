//! Sliding sessions, in real time with a short ttl: requests keep a session alive, silence
//! lets it expire, and each request puts the TTL in Redis back to full.

mod observe;
mod support;

use std::time::{Duration, Instant};

use observe::{SessionsKey, ROUNDING_MS};
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

    /// Redis' clock, Unix milliseconds.
    fn redis_now_ms(&self) -> u64 {
        u64::try_from(redis_now_ms(&mut self.redis.conn())).expect("a time after 1970")
    }

    /// Sends one request on `sid` (which must be admitted) and asserts that it slid the session
    /// to expire `ttl_ms` after the request was checked: Redis decides the new expiry by its own
    /// clock, at a moment between the readings of that clock before and after the request. The
    /// key holding the session lives exactly as long as the session. Returns the stored session.
    async fn assert_request_slides(
        &self,
        sid: &str,
        ttl_ms: u64,
        when: &str,
    ) -> portcullis::session::record::Record {
        let before = self.redis_now_ms();
        let resp = self.request(sid).await;
        assert_eq!(resp.status(), 200, "{when}");
        let read = SessionsKey::read(&mut self.redis.conn(), &sessions_key("alice"));
        let after = u64::try_from(read.now_ms).expect("a time after 1970");
        let stored = read.session(sid).expect("session stored").clone();
        assert!(
            stored.expires_ms >= before + ttl_ms && stored.expires_ms <= after + ttl_ms,
            "{when}: the session expires at {}, not {ttl_ms} ms after the request (made between \
             {before} and {after})",
            stored.expires_ms
        );
        let ttl = read.ttl_ms(sid).expect("session stored");
        assert!(
            (ttl - ROUNDING_MS..=ttl + ROUNDING_MS).contains(&read.pttl),
            "{when}: the key's PTTL {} ms does not follow the session's {ttl} ms",
            read.pttl
        );
        stored
    }
}

#[tokio::test]
async fn requests_keep_a_session_alive_well_past_its_ttl() {
    let s = setup().await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    let created = Instant::now();
    let mut last_active = s.last_active_ms(&sid);
    for round in 0..6 {
        // Time passing is what is tested: each request comes well after the session last slid.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stored = s
            .assert_request_slides(&sid, TTL_MS as u64, &format!("round {round}"))
            .await;
        let now = stored.last_active_ms;
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
    // A long ttl, and a few seconds left: the request is checked long before the session would
    // expire, however slow the machine. Without the local cache, which would hold lastActive
    // to the slide interval.
    let s = setup_with(
        "[session]\nttl = \"60s\"\nlast_active_resolution = \"0s\"\nlocal_cache = false\n",
    )
    .await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    expire_session_in(&mut s.redis.conn(), "alice", &sid, 3_000);
    assert!(s.key_pttl() <= 3_000, "precondition");
    let before = s.redis_now_ms();
    let stored = s
        .assert_request_slides(&sid, 60_000, "after a request")
        .await;
    let after = s.redis_now_ms();
    assert!(
        (before..=after).contains(&stored.last_active_ms),
        "lastActive {} was not set to the request's time (between {before} and {after})",
        stored.last_active_ms
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
