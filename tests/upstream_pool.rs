//! Each worker keeps its upstream connections alive in a pool: reused while read to the end,
//! closed when idle too long, when over `pool_max_idle`, or when a response was left unread.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::*;

const BIG: usize = 8 * 1024 * 1024;

/// The value of a metric without labels the proxy exports (0 when it has none yet).
async fn metric(proxy: &Proxy, name: &str) -> f64 {
    let text = proxy.metrics_text().await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Answers by path: `/empty` 204, `/big` 8 MiB, anything else echoes the body.
async fn upstream() -> Upstream {
    Upstream::start(|seen| async move {
        match seen.target.as_str() {
            "/empty" => reply(StatusCode::NO_CONTENT, ""),
            "/big" => http::Response::new(Full::new(Bytes::from(vec![b'x'; BIG]))),
            _ => http::Response::new(Full::new(seen.body)),
        }
    })
    .await
}

fn one_worker(upstream: &Upstream, upstream_extra: &str) -> String {
    config_with(
        &upstream.url(),
        &format!("[server]\nworkers = 1\n[upstream]\n{upstream_extra}\n"),
    )
}

#[tokio::test]
async fn one_upstream_connection_carries_every_kind_of_exchange() {
    let upstream = upstream().await;
    let proxy = Proxy::start(&one_worker(&upstream, "")).await;
    let client = client();

    for round in 0..3 {
        let resp = client.get(proxy.url("/plain")).send().await.unwrap();
        assert_eq!(resp.status(), 200);

        // Bodiless answers are never read: their connection comes back when they are dropped.
        let resp = client.head(proxy.url("/plain")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let resp = client.get(proxy.url("/empty")).send().await.unwrap();
        assert_eq!(resp.status(), 204);

        let body = vec![b'b'; 100_000 + round];
        let resp = client
            .post(proxy.url("/echo"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.bytes().await.unwrap(), body);

        let resp = client.get(proxy.url("/big")).send().await.unwrap();
        assert_eq!(resp.bytes().await.unwrap().len(), BIG);
    }
    assert_eq!(upstream.count(), 15);
    assert_eq!(
        upstream.connections(),
        1,
        "every request reused the first connection"
    );
    let opened = metric(&proxy, "portcullis_upstream_connections_opened_total").await;
    assert_eq!(opened, 1.0);
    let waiting = metric(&proxy, "portcullis_upstream_connections_idle").await;
    assert_eq!(waiting, 1.0, "the one connection waits in the pool");
}

#[tokio::test]
async fn a_request_without_host_gets_the_upstreams() {
    let upstream = upstream().await;
    let proxy = Proxy::start(&one_worker(&upstream, "")).await;
    let resp = send_raw(proxy.addr, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(resp.status, 200);
    let host = upstream.last().headers[http::header::HOST].clone();
    assert_eq!(host, upstream.addr.to_string());
}

#[tokio::test]
async fn idle_connections_close_after_pool_idle_timeout() {
    let upstream = upstream().await;
    let proxy = Proxy::start(&one_worker(&upstream, "pool_idle_timeout = \"200ms\"")).await;
    let client = client();

    let resp = client.get(proxy.url("/a")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.closed(), 0);
    eventually("the idle upstream connection to close", || async {
        upstream.closed() == 1
    })
    .await;

    // The next request opens a fresh connection rather than using the closed one.
    let resp = client.get(proxy.url("/b")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn no_more_than_pool_max_idle_connections_stay_open() {
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let proxy = Proxy::start(&one_worker(&upstream, "pool_max_idle = 1")).await;

    // Three requests at once need three upstream connections.
    let mut held = Vec::new();
    for i in 0..3 {
        let url = proxy.url(&format!("/held/{i}"));
        held.push(tokio::spawn(async move {
            // Separate clients, so that the three requests are on three connections.
            client().get(url).send().await.unwrap().status()
        }));
        reached_upstream(&mut arrived).await;
    }
    assert_eq!(upstream.connections(), 3);
    gate.send(true).unwrap();
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }

    // Only one may wait in the pool: the other two are closed.
    eventually("two of three idle connections to close", || async {
        upstream.closed() == 2
    })
    .await;
    let resp = client().get(proxy.url("/after")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.connections(), 3, "the kept connection was reused");
}

#[tokio::test]
async fn a_response_left_unread_takes_its_connection_with_it() {
    let upstream = upstream().await;
    let proxy = Proxy::start(&one_worker(&upstream, "")).await;

    // The client reads the head of a large response, then goes away.
    let walks_away = client();
    let resp = walks_away.get(proxy.url("/big")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    drop(walks_away);

    // The upstream connection, with the rest of that body on it, is closed, not pooled.
    eventually("the half-read upstream connection to close", || async {
        upstream.closed() == 1
    })
    .await;
    let resp = client().get(proxy.url("/next")).send().await.unwrap();
    assert_eq!(resp.bytes().await.unwrap(), "");
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_not_reused() {
    let upstream = Upstream::start(|_seen| async {
        let mut resp = reply(StatusCode::OK, "once");
        resp.headers_mut()
            .insert(http::header::CONNECTION, "close".parse().unwrap());
        resp
    })
    .await;
    let proxy = Proxy::start(&one_worker(&upstream, "")).await;
    let client = client();
    for _ in 0..4 {
        let resp = client.get(proxy.url("/x")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        // The upstream's hop-by-hop `Connection: close` stays between it and portcullis.
        assert!(resp.headers().get("connection").is_none());
        assert_eq!(resp.text().await.unwrap(), "once");
    }
    assert_eq!(upstream.connections(), 4);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closes_is_let_go_long_before_its_idle_timeout() {
    // Answers without `Connection: close`, then closes anyway (a keep-alive timeout of zero).
    let upstream = RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let proxy = Proxy::start(&config_with(
        &upstream.url(),
        "[server]\nworkers = 1\n[upstream]\npool_idle_timeout = \"60s\"\n",
    ))
    .await;
    let resp = client().get(proxy.url("/once")).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "ok");
    // Within the reaper's look (a second), not at pool_idle_timeout.
    eventually("the closed connection to leave the pool", || async {
        metric(&proxy, "portcullis_upstream_connections_idle").await == 0.0
    })
    .await;
}

/// Longer than a pooled connection must have been idle for its requests to be sent again.
const IDLE_AT_RISK: std::time::Duration =
    portcullis::forward::REPLAY_AFTER_IDLE.saturating_add(std::time::Duration::from_millis(50));

/// An upstream that answers the first request on each connection and keeps the connection,
/// then closes it when the next request arrives, unanswered: the moment a keep-alive timeout
/// or a reload closes a connection that portcullis is just sending on.
async fn closes_under_the_second_request() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(AtomicUsize::new(0));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for answered in 0.. {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    seen.fetch_add(1, Ordering::SeqCst);
                    buf.clear();
                    if answered > 0 {
                        return; // closes with the request unanswered
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// A proxy (one worker) in front of [`closes_under_the_second_request`], whose one pooled
/// connection has answered a request and then been idle long enough for a keep-alive timeout
/// to be what closes it. Returns the proxy, its client, and the upstream's count of heads.
async fn pooled_connection_that_closes_next() -> (Proxy, reqwest::Client, Arc<AtomicUsize>) {
    let (addr, heads) = closes_under_the_second_request().await;
    let proxy = Proxy::start(&config_with(
        &format!("http://{addr}"),
        "[server]\nworkers = 1\n",
    ))
    .await;
    let client = client();
    let resp = client.get(proxy.url("/one")).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "first");
    tokio::time::sleep(IDLE_AT_RISK).await;
    (proxy, client, heads)
}

#[tokio::test]
async fn an_idempotent_request_is_sent_again_when_its_pooled_connection_closes_under_it() {
    let (proxy, client, heads) = pooled_connection_that_closes_next().await;

    // Sent on the pooled connection, which closes; sent again on a new one, which answers.
    let resp = client.get(proxy.url("/two")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "first");
    assert_eq!(heads.load(Ordering::SeqCst), 3);
    let replayed = metric(&proxy, "portcullis_upstream_requests_replayed_total").await;
    assert_eq!(replayed, 1.0);
    let opened = metric(&proxy, "portcullis_upstream_connections_opened_total").await;
    assert_eq!(opened, 2.0);
}

#[tokio::test]
async fn a_request_with_a_body_is_never_sent_twice() {
    let (proxy, client, heads) = pooled_connection_that_closes_next().await;

    let resp = client
        .post(proxy.url("/buy"))
        .body("item=1")
        .send()
        .await
        .unwrap();
    assert_error(resp, 502, "UPSTREAM_UNAVAILABLE").await;
    assert_eq!(
        heads.load(Ordering::SeqCst),
        2,
        "the POST reached the upstream once"
    );
    let replayed = metric(&proxy, "portcullis_upstream_requests_replayed_total").await;
    assert_eq!(replayed, 0.0);
}

/// `upstream.max_connections` bounds the connections open to the upstream however many
/// requests one HTTP/2 client has in flight: past it a request waits (within
/// `connect_timeout`) for a connection to come back, or is refused with 503 `UPSTREAM_BUSY`.
#[tokio::test]
async fn upstream_connections_are_bounded_however_many_streams_a_client_opens() {
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let proxy = Proxy::start(&one_worker(
        &upstream,
        "max_connections = 2\nconnect_timeout = \"300ms\"",
    ))
    .await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let first_held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(h2.get(proxy.url("/held")).send()))
        .collect();
    reached_upstream(&mut arrived).await;
    reached_upstream(&mut arrived).await;

    // A third stream finds no room: refused once connect_timeout has passed.
    let resp = h2.get(proxy.url("/third")).send().await.unwrap();
    assert_error(resp, 503, "UPSTREAM_BUSY").await;
    assert_eq!(upstream.connections(), 2);
    assert_eq!(
        upstream.count(),
        2,
        "the refused request reached the upstream"
    );

    // On a second proxy, one that waits gets the first connection to come back, and no new one
    // is opened.
    let proxy = Proxy::start(&one_worker(
        &upstream,
        "max_connections = 2\nconnect_timeout = \"10s\"",
    ))
    .await;
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(h2.get(proxy.url("/held")).send()))
        .collect();
    reached_upstream(&mut arrived).await;
    reached_upstream(&mut arrived).await;
    let waiting = tokio::spawn(h2.get(proxy.url("/waits")).send());
    eventually("the third request to wait for a connection", || async {
        metric(&proxy, "portcullis_upstream_requests_waiting").await == 1.0
    })
    .await;
    gate.send(true).unwrap();
    for request in held {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.connections(), 4, "two for each proxy");
    assert_eq!(
        metric(&proxy, "portcullis_upstream_requests_waiting").await,
        0.0
    );
    for request in first_held {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
}

/// Idle connections in one worker's pool do not keep another worker's requests from the
/// upstream: a request that finds no place closes one of them and takes its place.
#[tokio::test]
async fn another_workers_idle_connections_give_way_under_max_connections() {
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let config = config_with(
        &upstream.url(),
        "[server]\nworkers = 2\n[upstream]\nmax_connections = 2\nconnect_timeout = \"5s\"\n\
         pool_idle_timeout = \"60s\"\n",
    );
    let proxy = Proxy::start(&config).await;
    let h2 = || {
        reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .unwrap()
    };
    // One client connection, so one worker: two requests leave two idle connections there.
    let first = h2();
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(first.get(proxy.url("/first")).send()))
        .collect();
    reached_upstream(&mut arrived).await;
    reached_upstream(&mut arrived).await;
    gate.send(true).unwrap();
    for request in held {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    eventually(
        "both connections idle in the first worker's pool",
        || async { metric(&proxy, "portcullis_upstream_connections_idle").await == 2.0 },
    )
    .await;

    // The next client connection goes to the other worker, whose pool is empty.
    // Without giving way, it would wait out connect_timeout (5 s, well within the idle
    // connections' 60 s) and be refused.
    let resp = h2().get(proxy.url("/second")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.connections(), 3);
}
