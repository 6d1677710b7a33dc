//! Connections are served on `server.workers` threads, each with its own upstream pool.

mod support;

use std::time::Duration;

use support::*;

/// A client with its own connection pool, so each one is a separate connection to portcullis.
fn own_connection() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .build()
        .expect("client")
}

#[tokio::test]
async fn each_worker_opens_its_own_upstream_connections() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(&upstream.url(), "[server]\nworkers = 3\n")).await;

    // Three client connections, one request each, one after the other. Connections are dealt
    // to the workers in turn, and a worker's request can only use its own pool: three
    // upstream connections, where one shared pool would have reused a single one.
    for i in 0..3 {
        let resp = own_connection()
            .get(proxy.url(&format!("/w/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(upstream.count(), 3);
    assert_eq!(upstream.connections(), 3);

    // A fourth connection lands on the first worker again, whose pooled connection is reused
    // for both its requests: still three upstream connections.
    let client = own_connection();
    for i in 0..2 {
        let resp = client
            .get(proxy.url(&format!("/again/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(upstream.count(), 5);
    assert_eq!(
        upstream.connections(),
        3,
        "upstream connections for 5 requests"
    );
}

#[tokio::test]
async fn shutdown_drains_the_requests_of_every_worker() {
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let mut proxy = Proxy::start(&config_with(&upstream.url(), "[server]\nworkers = 3\n")).await;

    // One held request per worker.
    let mut in_flight = Vec::new();
    for i in 0..3 {
        let url = proxy.url(&format!("/held/{i}"));
        in_flight.push(tokio::spawn(own_connection().get(url).send()));
        reached_upstream(&mut arrived).await;
    }

    let mut stopped = proxy.shutdown();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut stopped)
            .await
            .is_err(),
        "shutdown finished while requests were in flight"
    );
    gate.send(true).unwrap();
    for request in in_flight {
        let resp = tokio::time::timeout(Duration::from_secs(5), request)
            .await
            .expect("the held request finished")
            .unwrap()
            .expect("the held request got its response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "finished");
    }
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("shutdown completed")
        .expect("portcullis stopped cleanly");
}
