//! `GET /metrics` on the admin port after a known sequence of requests: the OpenMetrics
//! exposition is parsed (name, labels, value) and every count checked exactly.

mod observe;
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use observe::{scrape, scrape_until, Exposition};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const USER: &str = "metrics-alice";

/// Session routes: `/game` unlimited, `/limited` one request per hour; live sessions counted
/// every 100 ms; idle rate-limit keys never evicted during the test. `local_cache = false`
/// sends every session check to Redis, so that Redis counts are exact.
fn config(upstream: &Upstream, redis: &RedisServer, local_cache: bool) -> String {
    session_config(
        upstream,
        redis,
        &format!(
            "[session]\nlocal_cache = {local_cache}\n\
             [metrics]\nactive_sessions_interval = \"100ms\"\n\
             [rate_limit]\ngc_interval = \"1h\"\n\
             [[routes]]\npath_prefix = \"/game\"\nauth = \"session\"\n\
             [[routes]]\npath_prefix = \"/limited\"\nauth = \"session\"\n\
             rate_limit = {{ requests = 1, per = \"1h\" }}\n"
        ),
    )
}

async fn get(proxy: &Proxy, path: &str, bearer: Option<&str>) -> u16 {
    let mut req = client().get(proxy.url(path));
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.send().await.unwrap().status().as_u16()
}

/// The rejections as `(reason, code) -> count`, every sample of the family.
fn rejections(exposition: &Exposition) -> BTreeMap<(String, String), f64> {
    exposition
        .matching("portcullis_rejections_total", &[])
        .into_iter()
        .map(|s| {
            assert_eq!(s.labels.len(), 2, "{s:?}");
            (
                (s.labels["reason"].clone(), s.labels["code"].clone()),
                s.value,
            )
        })
        .collect()
}

/// Requests as `(route_class, status) -> count`, every sample of the family.
fn requests(exposition: &Exposition) -> BTreeMap<(String, String), f64> {
    exposition
        .matching("portcullis_requests_total", &[])
        .into_iter()
        .map(|s| {
            assert_eq!(s.labels.len(), 2, "{s:?}");
            (
                (s.labels["route_class"].clone(), s.labels["status"].clone()),
                s.value,
            )
        })
        .collect()
}

fn counts<const N: usize>(pairs: [((&str, &str), f64); N]) -> BTreeMap<(String, String), f64> {
    pairs
        .into_iter()
        .map(|((a, b), n)| ((a.to_string(), b.to_string()), n))
        .collect()
}

#[tokio::test]
async fn metrics_after_a_known_sequence_have_the_expected_counts() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config(&upstream, &redis, false)).await;

    // The exposition is OpenMetrics text.
    let resp = client()
        .get(proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let first = Exposition::parse(&resp.text().await.unwrap());
    assert!(first.saw_eof, "an OpenMetrics exposition ends with # EOF");
    // Nothing has been answered on the public listener yet (scrapes are not counted): no
    // sample of the family at all, whatever its labels.
    assert_eq!(
        requests(&first),
        BTreeMap::new(),
        "portcullis_requests_total before any request"
    );

    // Two sessions through the API (api 201 x2).
    let anonymous_session = token(USER, None);
    let a = create_session(&proxy, &anonymous_session).await;
    let b = create_session(&proxy, &anonymous_session).await;
    let with_a = token(USER, Some(&a));

    // Three proxied 200s on session routes; the third uses up /limited's quota.
    assert_eq!(get(&proxy, "/game/1", Some(&with_a)).await, 200);
    assert_eq!(get(&proxy, "/game/2", Some(&with_a)).await, 200);
    assert_eq!(get(&proxy, "/limited/1", Some(&with_a)).await, 200);
    // One rate-limited (decided before Redis).
    assert_eq!(get(&proxy, "/limited/2", Some(&with_a)).await, 429);
    // Two token rejections.
    assert_eq!(get(&proxy, "/game/3", None).await, 401);
    assert_eq!(get(&proxy, "/game/4", Some("not-a-jwt")).await, 401);
    // One session rejection: a well-formed token naming a session that does not exist.
    let stranger = token(USER, Some(&uuid::Uuid::new_v4().to_string()));
    assert_eq!(get(&proxy, "/game/5", Some(&stranger)).await, 401);
    // Extend A, destroy B (api 200 x2).
    let resp = client()
        .post(proxy.url(&format!("/api/v1/sessions/{a}/extend")))
        .bearer_auth(&anonymous_session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = client()
        .delete(proxy.url(&format!("/api/v1/sessions/{b}")))
        .bearer_auth(&anonymous_session)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The periodic SCAN catches up with the one live session.
    scrape_until(proxy.admin, "portcullis_sessions_active 1", |e| {
        e.get("portcullis_sessions_active", &[]) == Some(1.0)
    })
    .await;

    // One request refused because Redis is gone.
    redis.stop();
    assert_eq!(get(&proxy, "/game/6", Some(&with_a)).await, 503);

    let m = scrape(proxy.admin).await;
    assert!(m.saw_eof);

    // Families are typed (labelled families appear once they have a sample).
    for (family, kind) in [
        ("portcullis_requests", "counter"),
        ("portcullis_rejections", "counter"),
        ("portcullis_request_duration_seconds", "histogram"),
        ("portcullis_upstream_duration_seconds", "histogram"),
        ("portcullis_redis_command_duration_seconds", "histogram"),
        ("portcullis_redis_errors", "counter"),
        ("portcullis_sessions_created", "counter"),
        ("portcullis_sessions_extended", "counter"),
        ("portcullis_sessions_destroyed", "counter"),
        ("portcullis_sessions_active", "gauge"),
        ("portcullis_open_connections", "gauge"),
        ("portcullis_resting_connections", "gauge"),
        ("portcullis_open_tunnels", "gauge"),
        ("portcullis_tunnels_session_ended", "counter"),
        ("portcullis_upstream_connections_opened", "counter"),
        ("portcullis_upstream_connections_idle", "gauge"),
        ("portcullis_upstream_requests_replayed", "counter"),
        ("portcullis_rate_limit_tracked_keys", "gauge"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "TYPE of {family}: {:?}",
            m.types
        );
    }
    assert_eq!(
        requests(&m),
        counts([
            (("api", "201"), 2.0),
            (("api", "200"), 2.0),
            (("session", "200"), 3.0),
            (("session", "429"), 1.0),
            (("session", "401"), 3.0),
            (("session", "503"), 1.0),
        ]),
        "portcullis_requests_total"
    );
    assert_eq!(
        rejections(&m),
        counts([
            (("token", "TOKEN_MISSING"), 1.0),
            (("token", "TOKEN_INVALID"), 1.0),
            (("session", "SESSION_INVALID"), 1.0),
            (("rate_limit", "RATE_LIMITED"), 1.0),
            (("redis_unavailable", "SESSION_STORE_UNAVAILABLE"), 1.0),
        ]),
        "portcullis_rejections_total"
    );

    // Whole-request latency: one observation per request, by route class.
    for (class, n) in [("session", 8.0), ("api", 4.0)] {
        let labels = [("route_class", class)];
        assert_eq!(
            m.get("portcullis_request_duration_seconds_count", &labels),
            Some(n),
            "{class}"
        );
        assert_eq!(
            m.get(
                "portcullis_request_duration_seconds_bucket",
                &[("route_class", class), ("le", "+Inf")]
            ),
            Some(n),
            "{class} +Inf bucket"
        );
        assert!(m.value("portcullis_request_duration_seconds_sum", &labels) > 0.0);
    }
    assert_eq!(
        m.matching("portcullis_request_duration_seconds_count", &[])
            .len(),
        2,
        "only the session and api classes saw requests"
    );
    // Upstream latency: only the three forwarded requests.
    assert_eq!(
        m.get("portcullis_upstream_duration_seconds_count", &[]),
        Some(3.0)
    );
    assert_eq!(upstream.count(), 3);

    // Redis: the gate slides the session once per session-route request that got past the
    // token and the rate limit (3 ok, 1 unknown session, 1 with Redis down), and extend slides
    // it once more; creates and the destroy are one script each.
    for (op, n) in [
        ("session_touch", 6.0),
        ("session_create", 2.0),
        ("session_destroy", 1.0),
    ] {
        assert_eq!(
            m.get(
                "portcullis_redis_command_duration_seconds_count",
                &[("op", op)]
            ),
            Some(n),
            "redis op {op}"
        );
    }
    let touch_errors = m.matching("portcullis_redis_errors_total", &[("op", "session_touch")]);
    assert_eq!(touch_errors.len(), 1, "{touch_errors:?}");
    assert_eq!(touch_errors[0].value, 1.0);
    assert!(
        ["unavailable", "timeout"].contains(&touch_errors[0].labels["kind"].as_str()),
        "{touch_errors:?}"
    );
    for op in ["session_create", "session_destroy"] {
        assert_eq!(
            m.sum("portcullis_redis_errors_total", &[("op", op)]),
            0.0,
            "{op}"
        );
    }

    // Session counters (created: see sessions_created_total_counts_each_create).
    assert_eq!(m.get("portcullis_sessions_extended_total", &[]), Some(1.0));
    assert_eq!(m.get("portcullis_sessions_destroyed_total", &[]), Some(1.0));

    // One user in the session API limiter, the same user in /limited's limiter.
    assert_eq!(m.get("portcullis_rate_limit_tracked_keys", &[]), Some(2.0));
}

#[tokio::test]
async fn sessions_created_total_counts_each_create() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config(&upstream, &redis, true)).await;
    let t = token(USER, None);
    for _ in 0..3 {
        create_session(&proxy, &t).await;
    }
    let m = scrape(proxy.admin).await;
    assert_eq!(m.get("portcullis_sessions_created_total", &[]), Some(3.0));
}

#[tokio::test]
async fn sessions_active_follows_live_sessions() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config(&upstream, &redis, true)).await;
    scrape_until(proxy.admin, "sessions_active 0", |e| {
        e.get("portcullis_sessions_active", &[]) == Some(0.0)
    })
    .await;
    let t1 = token("active-1", None);
    let t2 = token("active-2", None);
    let s1 = create_session(&proxy, &t1).await;
    create_session(&proxy, &t1).await;
    create_session(&proxy, &t2).await;
    scrape_until(proxy.admin, "sessions_active 3", |e| {
        e.get("portcullis_sessions_active", &[]) == Some(3.0)
    })
    .await;
    // Keys outside the session namespace are not counted, nor values inside it that are not
    // sessions, and they do not stop the count.
    let _: () = redis::cmd("SET")
        .arg("aeturnis:other:thing")
        .arg("x")
        .query(&mut redis.conn())
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg("aeturnis:sessions:{not-a-user}")
        .arg("field")
        .arg("x")
        .query(&mut redis.conn())
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("aeturnis:sessions:{garbage}")
        .arg("x")
        .query(&mut redis.conn())
        .unwrap();
    let resp = client()
        .delete(proxy.url(&format!("/api/v1/sessions/{s1}")))
        .bearer_auth(&t1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    scrape_until(proxy.admin, "sessions_active 2", |e| {
        e.get("portcullis_sessions_active", &[]) == Some(2.0)
    })
    .await;
    // A session past its expiry is not counted, even while its user's key is still there:
    // counted while live, then no longer once it has expired.
    let s3 = create_session(&proxy, &t2).await;
    scrape_until(proxy.admin, "sessions_active 3 with s3", |e| {
        e.get("portcullis_sessions_active", &[]) == Some(3.0)
    })
    .await;
    expire_session_in(&mut redis.conn(), "active-2", &s3, -1);
    scrape_until(proxy.admin, "sessions_active 2 again", |e| {
        e.get("portcullis_sessions_active", &[]) == Some(2.0)
    })
    .await;
    assert_eq!(stored_ids(&mut redis.conn(), "active-2").len(), 2);
}

#[tokio::test]
async fn with_the_local_cache_every_session_check_is_a_hit_or_a_redis_touch() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config(&upstream, &redis, true)).await;
    let sid = create_session(&proxy, &token(USER, None)).await;
    let with_session = token(USER, Some(&sid));
    // Until the cache is live (tracking connection up, heartbeat answered) checks go to Redis;
    // then a confirmed session is admitted from memory.
    let mut sent = 0.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(get(&proxy, "/game/cached", Some(&with_session)).await, 200);
        sent += 1.0;
        let m = scrape(proxy.admin).await;
        if m.value(
            "portcullis_session_cache_lookups_total",
            &[("result", "hit")],
        ) > 0.0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cache hit after {sent} requests"
        );
    }
    let m = scrape(proxy.admin).await;
    let lookups = |result| {
        m.value(
            "portcullis_session_cache_lookups_total",
            &[("result", result)],
        )
    };
    let (hit, miss, off) = (
        lookups("hit"),
        lookups("miss") + lookups("stale"),
        lookups("off"),
    );
    assert_eq!(hit + miss + off, sent, "one lookup per session check");
    assert_eq!(
        m.get(
            "portcullis_redis_command_duration_seconds_count",
            &[("op", "session_touch")]
        ),
        Some(miss + off),
        "every check not answered from memory is one touch in Redis"
    );
    assert_eq!(
        m.get(
            "portcullis_requests_total",
            &[("route_class", "session"), ("status", "200")]
        ),
        Some(sent)
    );
    assert_eq!(m.get("portcullis_session_cache_entries", &[]), Some(1.0));
    assert_eq!(m.matching("portcullis_rejections_total", &[]).len(), 0);
}

/// Opens a connection to the proxy and completes one keep-alive HTTP/1.1 request on it.
async fn kept_alive(proxy: &Proxy) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    get_held(&mut stream, proxy).await;
    stream
}

/// Sends `GET /held` on a kept-alive connection and reads the whole response.
async fn get_held(stream: &mut tokio::net::TcpStream, proxy: &Proxy) {
    let head = format!("GET /held HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr);
    stream.write_all(head.as_bytes()).await.unwrap();
    // The echo upstream answers an empty body with Content-Length: 0.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("response within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");
}

/// A kept-alive connection with nothing in flight rests (gives back its parser and buffers)
/// within tens of milliseconds of its response, not at the one-second fallback kept for
/// connections whose reads never showed hyper idle, and wakes for its next request.
#[tokio::test]
async fn a_quiet_keep_alive_connection_rests_soon_after_its_response() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resting =
        |n: f64| move |e: &Exposition| e.get("portcullis_resting_connections", &[]) == Some(n);
    let mut stream = kept_alive(&proxy).await;
    for round in 0..3 {
        let answered = std::time::Instant::now();
        scrape_until(proxy.admin, "the connection at rest", resting(1.0)).await;
        let waited = answered.elapsed();
        assert!(
            waited < Duration::from_millis(700),
            "round {round}: rested {waited:?} after the response; the fallback is 1 s"
        );
        // The next request wakes it: served on the same socket, then it rests again.
        get_held(&mut stream, &proxy).await;
    }
    let m = scrape_until(proxy.admin, "the connection at rest", resting(1.0)).await;
    assert_eq!(m.get("portcullis_open_connections", &[]), Some(1.0));
    drop(stream);
    scrape_until(proxy.admin, "no connection at rest", resting(0.0)).await;
    assert_eq!(upstream.count(), 4);
}

#[tokio::test]
async fn open_connections_counts_held_keep_alive_connections() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    scrape_until(proxy.admin, "no open connections", |e| {
        e.get("portcullis_open_connections", &[]) == Some(0.0)
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(kept_alive(&proxy).await);
    }
    scrape_until(proxy.admin, "4 open connections", |e| {
        e.get("portcullis_open_connections", &[]) == Some(4.0)
    })
    .await;
    held.truncate(1);
    scrape_until(proxy.admin, "1 open connection", |e| {
        e.get("portcullis_open_connections", &[]) == Some(1.0)
    })
    .await;
    drop(held);
    scrape_until(proxy.admin, "no open connections", |e| {
        e.get("portcullis_open_connections", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(upstream.count(), 4);
}

#[tokio::test]
async fn open_tunnels_counts_a_websocket_while_it_is_open() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = listener.local_addr().unwrap();
    let _echo = tokio::spawn(portcullis::echo::serve(listener));
    let proxy = Proxy::start(&open_config(&format!("http://{echo}"))).await;
    let m = scrape(proxy.admin).await;
    assert_eq!(m.get("portcullis_open_tunnels", &[]), Some(0.0));

    let (mut ws, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr)),
    )
    .await
    .expect("handshake within 5 s")
    .expect("WebSocket through the proxy");
    assert_eq!(response.status(), 101);
    // The echo upstream's hello, then an echo: the tunnel really carries traffic.
    let hello = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(matches!(hello, Some(Ok(Message::Text(_)))), "{hello:?}");
    ws.send(Message::text("ping through")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(&echoed, Some(Ok(Message::Text(t))) if t.as_str() == "ping through"),
        "{echoed:?}"
    );
    scrape_until(proxy.admin, "1 open tunnel", |e| {
        e.get("portcullis_open_tunnels", &[]) == Some(1.0)
    })
    .await;

    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    drop(ws);
    scrape_until(proxy.admin, "no open tunnels", |e| {
        e.get("portcullis_open_tunnels", &[]) == Some(0.0)
    })
    .await;
    // The request that opened the tunnel was counted, as a 101 on an unauthenticated route.
    let m = scrape(proxy.admin).await;
    assert_eq!(
        m.get(
            "portcullis_requests_total",
            &[("route_class", "none"), ("status", "101")]
        ),
        Some(1.0)
    );
}

#[test]
fn the_parser_reads_labels_escapes_and_histograms() {
    let text = "# HELP x_total A counter.\n# TYPE x counter\n\
                x_total{a=\"1\",b=\"q\\\"uote\\\\ \\n\"} 3\n\
                x_total{a=\"2\",b=\"\"} 4.5\n\
                # TYPE h histogram\n\
                h_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n\
                g -1\n# EOF\n";
    let e = Exposition::parse(text);
    assert!(e.saw_eof);
    assert_eq!(e.types["x"], "counter");
    assert_eq!(
        e.get("x_total", &[("a", "1"), ("b", "q\"uote\\ \n")]),
        Some(3.0)
    );
    assert_eq!(e.get("x_total", &[("a", "2"), ("b", "")]), Some(4.5));
    assert_eq!(
        e.get("x_total", &[("a", "1")]),
        None,
        "labels match exactly"
    );
    assert_eq!(e.sum("x_total", &[]), 7.5);
    assert_eq!(e.get("h_bucket", &[("le", "+Inf")]), Some(2.0));
    assert_eq!(e.get("h_count", &[]), Some(2.0));
    assert_eq!(e.get("g", &[]), Some(-1.0));
}

/// A client whose connection is reset in the middle of its upload is counted as the request's
/// fault (400 `MALFORMED_REQUEST`, reason `request`), as a clean close there is, not as the
/// upstream failing.
#[tokio::test]
async fn a_client_reset_mid_upload_is_counted_against_the_request_not_the_upstream() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(
        b"POST /upload HTTP/1.1\r\nHost: game.example\r\nContent-Length: 1000000\r\n\r\n",
    )
    .await
    .unwrap();
    conn.write_all(&[b'x'; 64 * 1024]).await.unwrap();
    // The forwarder has the request once it has connected upstream; then the client goes,
    // with a reset rather than a close.
    eventually("the upload goes upstream", || async {
        upstream.connections() > 0
    })
    .await;
    conn.set_zero_linger().unwrap();
    drop(conn);
    let m = scrape_until(proxy.admin, "the broken upload counted", |e| {
        !e.matching("portcullis_rejections_total", &[]).is_empty()
    })
    .await;
    assert_eq!(
        rejections(&m),
        BTreeMap::from([(
            ("request".to_string(), "MALFORMED_REQUEST".to_string()),
            1.0
        )])
    );
}
