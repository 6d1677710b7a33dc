//! The local session cache: a confirmed session is admitted from memory, kept exact by Redis
//! invalidations, so a destroyed session is refused by every replica within 100 ms.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn evalsha(redis: &RedisServer) -> u64 {
    commandstats(&mut redis.conn())
        .get("evalsha")
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn repeated_requests_on_a_cached_session_cost_no_redis_command() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, "")).await;
    let sid = create_session(&proxy, &token("alice", None)).await;
    let t = token("alice", Some(&sid));
    // The first request checks Redis and fills the cache.
    let first = client()
        .get(proxy.url("/game"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let before = evalsha(&redis);
    for _ in 0..50 {
        let resp = client()
            .get(proxy.url("/game"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(
        evalsha(&redis) - before <= 1,
        "50 requests within the slide interval should need at most one check, took {}",
        evalsha(&redis) - before
    );
    assert_eq!(upstream.count(), 51);
    assert_eq!(upstream.last().headers["x-session-id"], sid.as_str());
}

#[tokio::test]
async fn a_session_deleted_in_redis_by_someone_else_is_refused_at_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, "")).await;
    let sid = create_session(&proxy, &token("bob", None)).await;
    let t = token("bob", Some(&sid));
    for _ in 0..3 {
        let resp = client()
            .get(proxy.url("/game"))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let _: () = redis::cmd("DEL")
        .arg(sessions_key("bob"))
        .query(&mut redis.conn())
        .unwrap();
    let deleted = Instant::now();
    refused_within(&proxy.url("/game"), &t, deleted, Duration::from_millis(100)).await;
}

/// Polls until `url` refuses `token` with 401, failing if that takes longer than `bound`
/// after `since`.
async fn refused_within(url: &str, token: &str, since: Instant, bound: Duration) {
    loop {
        let resp = client().get(url).bearer_auth(token).send().await.unwrap();
        if resp.status() == 401 {
            let took = since.elapsed();
            assert!(took <= bound, "refused only after {took:?}");
            return;
        }
        assert_eq!(resp.status(), 200);
        assert!(since.elapsed() <= bound, "still admitted after {bound:?}");
    }
}

/// A portcullis process on its own ports, sharing `redis`.
struct Replica {
    child: Child,
    public: u16,
    admin: u16,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(redis: &RedisServer, upstream: &Upstream) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let (public, admin) = (pick_free_port(), pick_free_port());
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{public}\"\nshutdown_delay = \"0s\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\n",
            upstream.url(),
            redis.url()
        );
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(&path)
            .env("JWT_SECRET", TEST_SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let replica = Replica {
            child,
            public,
            admin,
            _dir: dir,
        };
        let ready = format!("http://127.0.0.1:{}/readyz", replica.admin);
        eventually("replica ready", || {
            let ready = ready.clone();
            async move {
                client()
                    .get(&ready)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await;
        replica
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.public)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_session_destroyed_through_one_replica_is_refused_by_the_other_within_100ms() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let a = Replica::start(&redis, &upstream).await;
    let b = Replica::start(&redis, &upstream).await;

    let login = token("carol", None);
    let open = || async {
        let created = client()
            .post(a.url("/api/v1/sessions/create"))
            .bearer_auth(&login)
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        json(created).await["data"]["sessionId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // carol's sessions share one Redis key: ending one must not end the other.
    let sid = open().await;
    let kept = open().await;
    let t = token("carol", Some(&sid));
    let t_kept = token("carol", Some(&kept));
    // Both replicas have confirmed (and cached) both sessions.
    for replica in [&a, &b] {
        for bearer in [&t, &t_kept] {
            for _ in 0..3 {
                let resp = client()
                    .get(replica.url("/game"))
                    .bearer_auth(bearer)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
            }
        }
    }
    let destroyed = client()
        .delete(a.url(&format!("/api/v1/sessions/{sid}")))
        .bearer_auth(&login)
        .send()
        .await
        .unwrap();
    assert_eq!(destroyed.status(), 200);
    let at = Instant::now();
    refused_within(&b.url("/game"), &t, at, Duration::from_millis(100)).await;
    let resp = client()
        .get(a.url("/game"))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        401,
        "the replica that destroyed it refuses at once"
    );
    for replica in [&a, &b] {
        let resp = client()
            .get(replica.url("/game"))
            .bearer_auth(&t_kept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the user's other session still works");
    }
}
