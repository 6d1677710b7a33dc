//! Redis going away mid-test: portcullis fails closed, fast, with 503 and forwards nothing;
//! `/readyz` says so; when Redis is back the service resumes without a restart.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// "Well under a second".
const FAST: Duration = Duration::from_millis(500);

struct Setup {
    redis: RedisServer,
    upstream: Upstream,
    proxy: Proxy,
}

async fn setup_with(redis: RedisServer, extra: &str) -> Setup {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, extra)).await;
    Setup {
        redis,
        upstream,
        proxy,
    }
}

async fn setup() -> Setup {
    setup_with(RedisServer::start(), "").await
}

impl Setup {
    async fn proxied(&self, sid: &str) -> (reqwest::Response, Duration) {
        let started = Instant::now();
        let resp = client()
            .get(self.proxy.url("/game"))
            .bearer_auth(token("alice", Some(sid)))
            .send()
            .await
            .unwrap();
        (resp, started.elapsed())
    }

    async fn readyz(&self) -> (u16, serde_json::Value) {
        let resp = client()
            .get(self.proxy.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, json(resp).await)
    }

    /// Creates a session, retrying (bounded) while the store is still coming back.
    async fn create_when_back(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let resp = client()
                .post(self.proxy.url("/api/v1/sessions/create"))
                .bearer_auth(token("alice", None))
                .send()
                .await
                .unwrap();
            if resp.status() == 201 {
                return json(resp).await["data"]["sessionId"]
                    .as_str()
                    .unwrap()
                    .to_string();
            }
            assert_eq!(resp.status(), 503, "while Redis comes back");
            assert!(
                Instant::now() < deadline,
                "portcullis did not reconnect to Redis within 10s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn redis_stopped_mid_test_gives_a_fast_503_and_forwards_nothing() {
    let mut s = setup().await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    let (resp, _) = s.proxied(&sid).await;
    assert_eq!(resp.status(), 200);
    let forwarded = s.upstream.count();

    s.redis.stop();
    for attempt in 0..5 {
        let (resp, took) = s.proxied(&sid).await;
        println!("attempt {attempt}: {} in {took:?}", resp.status());
        assert!(resp.headers().get("www-authenticate").is_none());
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        assert!(took < FAST, "attempt {attempt} took {took:?}");
    }
    assert_eq!(
        s.upstream.count(),
        forwarded,
        "a request was forwarded unchecked"
    );
}

#[tokio::test]
async fn readyz_names_redis_while_it_is_down() {
    let mut s = setup().await;
    let (status, body) = s.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["redis"], "ok", "{body}");

    s.redis.stop();
    let started = Instant::now();
    let (status, body) = s.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false, "{body}");
    let reason = body["checks"]["redis"].as_str().unwrap_or_default();
    assert!(!reason.is_empty() && reason != "ok", "{body}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn the_session_api_answers_503_while_redis_is_down() {
    let mut s = setup().await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    s.redis.stop();
    let t = token("alice", None);
    let requests = [
        client().post(s.proxy.url("/api/v1/sessions/create")),
        client().get(s.proxy.url("/api/v1/sessions/user/sessions")),
        client().get(s.proxy.url(&format!("/api/v1/sessions/{sid}"))),
        client().post(s.proxy.url(&format!("/api/v1/sessions/{sid}/extend"))),
        client().delete(s.proxy.url(&format!("/api/v1/sessions/{sid}"))),
    ];
    for req in requests {
        let started = Instant::now();
        let resp = req.bearer_auth(&t).send().await.unwrap();
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    }
    // The OpenAPI document needs no Redis.
    let resp = client()
        .get(s.proxy.url("/api/v1/sessions/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn service_resumes_when_redis_is_back_without_restarting_portcullis() {
    let mut s = setup().await;
    let old = create_session(&s.proxy, &token("alice", None)).await;
    s.redis.stop();
    let (resp, _) = s.proxied(&old).await;
    assert_eq!(resp.status(), 503);

    s.redis.restart();
    // Persistence is off: the old session is gone, so a new one is opened once Redis answers.
    let sid = s.create_when_back().await;
    let before = s.upstream.count();
    let (resp, _) = s.proxied(&sid).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.upstream.count(), before + 1);
    assert_eq!(s.upstream.last().headers["x-session-id"], sid.as_str());
    let (resp, _) = s.proxied(&old).await;
    assert_error(resp, 401, "SESSION_INVALID").await;
    let (status, body) = s.readyz().await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_redis_that_does_not_answer_in_time_gives_503() {
    let s = setup_with(RedisServer::start(), "").await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    let forwarded = {
        let (resp, _) = s.proxied(&sid).await;
        assert_eq!(resp.status(), 200);
        s.upstream.count()
    };
    // A session the gate has not seen yet, so the local cache cannot answer for it.
    let fresh = create_session(&s.proxy, &token("alice", None)).await;
    let mut admin = s.redis.conn();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3_000)
        .arg("ALL")
        .query(&mut admin)
        .unwrap();
    let paused = Instant::now();
    for attempt in 0..4 {
        let (resp, took) = s.proxied(&fresh).await;
        println!("paused, attempt {attempt}: {} in {took:?}", resp.status());
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        assert!(
            took < Duration::from_secs(1),
            "attempt {attempt} took {took:?}"
        );
    }
    // The cached session is refused too, as soon as Redis stops proving that invalidations
    // flow (its heartbeat goes unanswered): within the cache's staleness bound.
    let mut admitted_from_cache = 0;
    loop {
        let (resp, _) = s.proxied(&sid).await;
        if resp.status() == 503 {
            break;
        }
        assert_eq!(resp.status(), 200);
        admitted_from_cache += 1;
        assert!(
            paused.elapsed() < portcullis::session::cache::MAX_STALENESS * 3,
            "a cached session was still admitted {:?} after Redis stopped answering",
            paused.elapsed()
        );
    }
    assert_eq!(s.upstream.count(), forwarded + admitted_from_cache);
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut admin)
        .unwrap();

    // And it recovers by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (resp, _) = s.proxied(&sid).await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(
            Instant::now() < deadline,
            "no recovery after CLIENT UNPAUSE"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_that_was_never_reachable_gives_a_fast_503() {
    let mut redis = RedisServer::start();
    redis.stop();
    let s = setup_with(redis, "").await;
    let sid = uuid::Uuid::new_v4().to_string();
    for attempt in 0..3 {
        let (resp, took) = s.proxied(&sid).await;
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        assert!(took < FAST, "attempt {attempt} took {took:?}");
    }
    assert_eq!(s.upstream.count(), 0);
}
