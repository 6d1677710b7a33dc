//! Each worker keeps its upstream connections alive in a pool: reused while read to the end,
//! closed when idle too long, when over `pool_max_idle`, or when a response was left unread.

mod support;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::*;

const BIG: usize = 8 * 1024 * 1024;

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
        arrived.recv().await.expect("request reached the upstream");
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
