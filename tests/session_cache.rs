//! The local session cache: a confirmed session is admitted from memory, kept exact by Redis
//! invalidations, so a destroyed session is refused by every replica within 100 ms.

mod observe;
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use observe::scrape;
use support::*;

async fn get_status(url: &str, bearer: &str) -> u16 {
    client()
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

// The in-process proxy shares the test's runtime; a second worker keeps its heartbeat to Redis
// going while the test thread blocks on synchronous Redis calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_requests_on_a_cached_session_cost_no_redis_command() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    // No periodic SCAN for the active-sessions gauge while the commands are counted.
    let proxy = Proxy::start(&session_config(
        &upstream,
        &redis,
        "[metrics]\nactive_sessions_interval = \"1h\"\n",
    ))
    .await;
    let sid = create_session(&proxy, &token("alice", None)).await;
    let t = token("alice", Some(&sid));
    // The first requests check Redis and fill the cache.
    let warm_up = observe::until_cached(&proxy.url("/game"), &t, proxy.admin).await;

    // A connection held throughout, so that reading the counts adds no command between them.
    let mut conn = redis.conn();
    let lookups_before = scrape(proxy.admin).await;
    let commands_before = commandstats(&mut conn);
    for _ in 0..50 {
        assert_eq!(get_status(&proxy.url("/game"), &t).await, 200);
    }
    let commands_after = commandstats(&mut conn);
    let lookups_after = scrape(proxy.admin).await;

    let lookups = |result| {
        let labels = [("result", result)];
        let name = "portcullis_session_cache_lookups_total";
        lookups_after.value(name, &labels) - lookups_before.value(name, &labels)
    };
    let (hits, misses) = (lookups("hit"), lookups("miss"));
    // Answering from memory needs the heartbeat to have been answered within the cache's
    // staleness bound, so a stalled machine may send a few checks to Redis (`stale`); but the
    // cached entry itself is never passed over.
    let in_redis = misses + lookups("stale") + lookups("off");
    assert_eq!(hits + in_redis, 50.0, "one lookup per request");
    assert_eq!(misses, 0.0, "the cached session was passed over");
    assert!(
        hits > 0.0,
        "no request was admitted from the cache ({in_redis} went to Redis)"
    );
    // Besides the heartbeat (PING and ROLE), the only commands are one session check (a script) per
    // request the cache did not answer: a request answered from memory costs none.
    let ran: BTreeMap<String, u64> = commands_after
        .iter()
        .filter(|(command, _)| !["ping", "role"].contains(&command.as_str()))
        .map(|(command, n)| {
            let before = commands_before.get(command).copied().unwrap_or(0);
            (command.clone(), n - before)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let expected: BTreeMap<String, u64> = if in_redis > 0.0 {
        BTreeMap::from([("evalsha".to_string(), in_redis as u64)])
    } else {
        BTreeMap::new()
    };
    assert_eq!(
        ran, expected,
        "Redis commands for 50 requests ({hits} admitted from the cache)"
    );
    assert_eq!(upstream.count(), warm_up + 50);
    assert_eq!(upstream.last().headers["x-session-id"], sid.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_deleted_in_redis_by_someone_else_is_refused_at_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, "")).await;
    let sid = create_session(&proxy, &token("bob", None)).await;
    let t = token("bob", Some(&sid));
    observe::until_cached(&proxy.url("/game"), &t, proxy.admin).await;
    let _: () = redis::cmd("DEL")
        .arg(sessions_key("bob"))
        .query(&mut redis.conn())
        .unwrap();
    let deleted = Instant::now();
    refused_within(&proxy.url("/game"), &t, deleted, Duration::from_millis(100)).await;
}

/// Probes `url` with `token` until a probe *sent* more than `bound` after `ended` (taken once
/// the session's end was acknowledged) has been answered, asserting that every such probe is
/// refused with 401 and that, once refused, the session stays refused. Probes sent earlier may
/// still be admitted from a cache that has not heard yet.
///
/// Judging each probe by when it was sent (not by when it was answered, nor by how long the
/// polling took) keeps the check exact on a slow machine: a probe's own latency can only
/// make the proxy look at it later, when the cache knows even more.
async fn refused_within(url: &str, token: &str, ended: Instant, bound: Duration) {
    let mut first_refused: Option<Duration> = None;
    loop {
        let sent = ended.elapsed();
        let status = get_status(url, token).await;
        match status {
            401 => {
                first_refused.get_or_insert(sent);
                if sent > bound {
                    println!("first refused probe sent {first_refused:?} after the session ended");
                    return;
                }
            }
            200 => {
                assert!(
                    first_refused.is_none(),
                    "admitted again by a probe sent {sent:?} after the session ended, though \
                     one sent {first_refused:?} after was refused"
                );
                assert!(
                    sent <= bound,
                    "a probe sent {sent:?} after the session ended was still admitted \
                     (bound {bound:?})"
                );
            }
            other => panic!("probe sent {sent:?} after the session ended answered {other}"),
        }
    }
}

/// Requests on one session spread over two replicas: with the cache on, `lastActive` is
/// rewritten at most once per `slide_interval`, so one replica's check does not empty the
/// other's cache for the other's next check to do the same, request after request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_taking_turns_on_a_session_do_not_empty_each_others_cache_on_every_request() {
    const SLIDE: Duration = Duration::from_millis(200);
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = session_config(
        &upstream,
        &redis,
        "[session]\nlast_active_resolution = \"10ms\"\nslide_interval = \"200ms\"\n\
         [metrics]\nactive_sessions_interval = \"1h\"\n",
    );
    let a = Proxy::start(&config).await;
    let b = Proxy::start(&config).await;
    let sid = create_session(&a, &token("dave", None)).await;
    let t = token("dave", Some(&sid));

    let mut conn = redis.conn();
    let writes = |conn: &mut redis::Connection| commandstats(conn).get("setrange").copied();
    let before = writes(&mut conn).unwrap_or(0);
    let started = Instant::now();
    // Each request more than last_active_resolution after the one before, on the other
    // replica, over several slide intervals.
    for _ in 0..20 {
        for replica in [&a, &b] {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(get_status(&replica.url("/game"), &t).await, 200);
        }
    }
    let rewrites = writes(&mut conn).unwrap_or(0) - before;
    // At most one rewrite per slide interval (and one for a slide straddling each end).
    let bound = (started.elapsed().as_millis() / SLIDE.as_millis()) as u64 + 2;
    assert!(
        rewrites <= bound,
        "{rewrites} rewrites of the session for 40 requests in {:?} (at most {bound})",
        started.elapsed()
    );
}

/// A portcullis process of its own in front of `upstream`, on `redis`, ready to serve.
async fn replica(redis: &RedisServer, upstream: &Upstream) -> observe::Binary {
    let config = format!(
        "[server]\nshutdown_delay = \"0s\"\n[upstream]\nurl = \"{}\"\n[redis]\nurl = \"{}\"\n",
        upstream.url(),
        redis.url()
    );
    let mut replica =
        observe::Binary::listening(observe::portcullis_command(TEST_SECRET), &config).await;
    replica.wait_ready().await;
    replica
}

/// Opens a session through `replica`'s session API; its id.
async fn open_on(replica: &observe::Binary, login: &str) -> String {
    let created = client()
        .post(replica.url("/api/v1/sessions/create"))
        .bearer_auth(login)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    json(created).await["data"]["sessionId"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_destroyed_through_one_replica_is_refused_by_the_other_within_100ms() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let a = replica(&redis, &upstream).await;
    let b = replica(&redis, &upstream).await;

    let login = token("carol", None);
    // carol's sessions share one Redis key: ending one must not end the other.
    let sid = open_on(&a, &login).await;
    let kept = open_on(&a, &login).await;
    let t = token("carol", Some(&sid));
    let t_kept = token("carol", Some(&kept));
    // Both replicas have confirmed (and cached) both sessions. A check that rewrites
    // lastActive empties the other replica's cache of carol, so the session to be destroyed
    // is confirmed from b's cache last: b holds it when it is destroyed through a.
    for (replica, bearer) in [(&a, &t), (&a, &t_kept), (&b, &t_kept), (&b, &t)] {
        observe::until_cached(&replica.url("/game"), bearer, replica.admin).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_everywhere_through_one_replica_is_refused_by_the_other_within_100ms() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let a = replica(&redis, &upstream).await;
    let b = replica(&redis, &upstream).await;

    let login = token("dave", None);
    let mut bound = Vec::new();
    for _ in 0..2 {
        bound.push(token("dave", Some(&open_on(&a, &login).await)));
    }
    // b holds both sessions in its cache when they end through a.
    for bearer in &bound {
        observe::until_cached(&b.url("/game"), bearer, b.admin).await;
    }
    let signed_out = client()
        .delete(a.url("/api/v1/sessions/user/sessions"))
        .bearer_auth(&login)
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 200);
    let at = Instant::now();
    for bearer in &bound {
        refused_within(&b.url("/game"), bearer, at, Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_to_a_signed_out_token_leave_the_users_cache_alone() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(&upstream, &redis, "")).await;
    let api = |path: &str| proxy.url(&format!("/api/v1/sessions{path}"));
    // Stolen two minutes before the user signed out everywhere.
    let stolen = sign(&serde_json::json!({
        "sub": "alice", "iat": now_secs() - 120, "exp": now_secs() + 3600,
    }));
    let signed_out = client()
        .delete(api("/user/sessions"))
        .bearer_auth(token("alice", None))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_out.status(), 200);
    let sid = create_session(&proxy, &token("alice", None)).await;
    let t = token("alice", Some(&sid));
    observe::until_cached(&proxy.url("/game"), &t, proxy.admin).await;

    let name = "portcullis_session_cache_lookups_total";
    let misses_before = scrape(proxy.admin).await.value(name, &[("result", "miss")]);
    for refused in [
        client().delete(api(&format!("/{sid}"))),
        client().delete(api("/user/sessions")),
    ] {
        let resp = refused.bearer_auth(&stolen).send().await.unwrap();
        assert_error(resp, 401, "SIGNED_OUT").await;
    }
    assert_eq!(get_status(&proxy.url("/game"), &t).await, 200);
    let misses = scrape(proxy.admin).await.value(name, &[("result", "miss")]) - misses_before;
    assert_eq!(misses, 0.0, "a refused call emptied the user's cache");
}

/// Redis tells no process of its own writes, so the replica that ends a session must forget
/// it itself, whatever became of the caller: here the client goes away (its HTTP/2 connection
/// closed) while its destroy waits in Redis, and the replica still refuses the session once
/// Redis has run it, rather than admitting it from its cache until the next slide (an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_whose_client_went_away_still_empties_the_cache() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&session_config(
        &upstream,
        &redis,
        "[session]\nslide_interval = \"1h\"\n",
    ))
    .await;
    let sid = create_session(&proxy, &token("dave", None)).await;
    let t = token("dave", Some(&sid));
    observe::until_cached(&proxy.url("/game"), &t, proxy.admin).await;

    // Writes wait in Redis (the heartbeat's PING and ROLE do not), so the destroy is held there.
    let mut conn = redis.conn();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query(&mut conn)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, driver) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let driver = tokio::spawn(driver);
    let delete = http::Request::delete(proxy.url(&format!("/api/v1/sessions/{sid}")))
        .header("authorization", format!("Bearer {t}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let answer = tokio::spawn(h2.send_request(delete));
    eventually("the destroy waits in Redis", || {
        let info: String = redis::cmd("INFO").arg("clients").query(&mut conn).unwrap();
        let waiting = info.contains("blocked_clients:1");
        async move { waiting }
    })
    .await;
    // The client goes away: its connection closes, and with it the stream of the destroy.
    answer.abort();
    driver.abort();
    drop(h2);
    observe::scrape_until(proxy.admin, "the client's connection closed", |e| {
        e.get("portcullis_open_connections", &[]) == Some(0.0)
    })
    .await;
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut conn)
        .unwrap();

    eventually(
        "the destroyed session refused by the replica that ended it",
        || {
            let url = proxy.url("/game");
            let t = t.clone();
            async move { get_status(&url, &t).await == 401 }
        },
    )
    .await;
    assert!(stored_ids(&mut conn, "dave").is_empty());
}
