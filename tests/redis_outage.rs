//! Redis going away mid-test: portcullis fails closed, fast, with 503 and forwards nothing;
//! `/readyz` says so; when Redis is back the service resumes without a restart.

mod observe;
mod support;

use std::time::{Duration, Instant};

use support::*;

/// Redis timeouts far longer than any test: a failure that comes back quickly was detected,
/// not waited out.
const PATIENT: &str = "command_timeout = \"30s\"\nconnect_timeout = \"30s\"\n";

/// "Without waiting for a timeout": far under [`PATIENT`]'s, yet generous for a loaded machine.
const FAST: Duration = Duration::from_secs(5);

struct Setup {
    redis: RedisServer,
    upstream: Upstream,
    proxy: Proxy,
}

/// A proxy in front of an echo upstream with sessions in `redis`; `redis_section` is added to
/// the `[redis]` table.
async fn setup_with(redis: RedisServer, redis_section: &str) -> Setup {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[upstream]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n{redis_section}\n",
        upstream.url(),
        redis.url()
    );
    let proxy = Proxy::start(&config).await;
    Setup {
        redis,
        upstream,
        proxy,
    }
}

async fn setup() -> Setup {
    setup_with(RedisServer::start(), PATIENT).await
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
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
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

// A second worker keeps the in-process proxy's heartbeat running while the test thread makes
// synchronous calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_does_not_answer_in_time_gives_503() {
    // The default timeouts (250 ms a command): here they are what turns a Redis that does not
    // answer into a 503.
    let s = setup_with(RedisServer::start(), "").await;
    let sid = create_session(&s.proxy, &token("alice", None)).await;
    // A session the gate has not seen yet, so the local cache cannot answer for it. (Opened
    // first: opening a session rewrites the user's key, which empties the cache of the user.)
    let fresh = create_session(&s.proxy, &token("alice", None)).await;
    // The first session is admitted from the local cache (once the cache is live).
    observe::until_cached(
        &s.proxy.url("/game"),
        &token("alice", Some(&sid)),
        s.proxy.admin,
    )
    .await;
    let forwarded = s.upstream.count();
    let not_answered = |m: &observe::Exposition| {
        let lookups = |result| {
            m.value(
                "portcullis_session_cache_lookups_total",
                &[("result", result)],
            )
        };
        lookups("stale") + lookups("off")
    };
    let not_answered_before = not_answered(&observe::scrape(s.proxy.admin).await);

    // Redis stops answering (SIGSTOP: connections stay open, nothing comes back) until the test
    // lets it go on; its every reply was sent before `stopped`.
    s.redis.pause();
    let stopped = Instant::now();

    // The cached session is refused as soon as Redis stops proving that invalidations flow:
    // the cache answers only while a heartbeat sent at most MAX_STALENESS ago was answered,
    // and none sent after `stopped` can be. So a probe sent later than that (twice the bound:
    // some margin) is refused however slow the machine; earlier ones may still be admitted.
    let staleness = portcullis::session::cache::MAX_STALENESS;
    let mut admitted_from_cache = 0;
    loop {
        let sent = stopped.elapsed();
        let (resp, _) = s.proxied(&sid).await;
        if resp.status() == 503 {
            assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
            println!(
                "stopped: the cached session was admitted {admitted_from_cache} times, then \
                 refused by a probe sent {sent:?} after"
            );
            // Counted as the cache not answering for want of a heartbeat (or, on a slow
            // machine, for the connection already given up), not as a missing entry.
            assert_eq!(
                not_answered(&observe::scrape(s.proxy.admin).await),
                not_answered_before + 1.0
            );
            break;
        }
        assert_eq!(resp.status(), 200);
        admitted_from_cache += 1;
        assert!(
            sent <= staleness * 2,
            "a cached session was still admitted by a probe sent {sent:?} after Redis stopped \
             answering"
        );
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "a cached session was still admitted {:?} after Redis stopped answering",
            stopped.elapsed()
        );
    }
    // The session the cache never saw: each check waits for the command timeout, then 503
    // (Redis stays stopped, so nothing else could end the wait).
    for attempt in 0..4 {
        let (resp, took) = s.proxied(&fresh).await;
        println!("stopped, attempt {attempt}: {} in {took:?}", resp.status());
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        // The command timeout (250 ms), with room for a loaded machine: not a hang.
        assert!(
            took < Duration::from_millis(2250),
            "attempt {attempt} took {took:?}"
        );
    }
    assert_eq!(s.upstream.count(), forwarded + admitted_from_cache);
    s.redis.signal("CONT");

    // And it recovers by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (resp, _) = s.proxied(&sid).await;
        if resp.status() == 200 {
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(Instant::now() < deadline, "no recovery after SIGCONT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_redis_that_was_never_reachable_gives_a_fast_503() {
    let mut redis = RedisServer::start();
    redis.stop();
    let s = setup_with(redis, PATIENT).await;
    let sid = uuid::Uuid::new_v4().to_string();
    for attempt in 0..3 {
        let (resp, took) = s.proxied(&sid).await;
        assert_error(resp, 503, "SESSION_STORE_UNAVAILABLE").await;
        assert!(took < FAST, "attempt {attempt} took {took:?}");
    }
    assert_eq!(s.upstream.count(), 0);
}
