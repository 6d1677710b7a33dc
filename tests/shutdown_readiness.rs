//! The real binary's two ways to stop: SIGTERM turns `/readyz` 503 for `server.shutdown_delay`
//! while the public listener still serves (so a load balancer stops sending first), then exits
//! 0; SIGINT closes the listener at once.

mod observe;
mod support;

use std::time::{Duration, Instant};

use observe::{portcullis_command, Binary};
use support::*;

fn config(upstream: &Upstream, redis: &RedisServer, shutdown_delay: &str) -> String {
    config_with(
        &upstream.url(),
        &format!(
            "[server]\nshutdown_delay = \"{shutdown_delay}\"\n[redis]\nurl = \"{}\"\n",
            redis.url()
        ),
    )
}

async fn readyz(binary: &Binary) -> Option<(u16, serde_json::Value)> {
    let resp = client()
        .get(format!("http://{}/readyz", binary.admin))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.ok()?))
}

/// A client that opens a new connection for every request.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn start(upstream: &Upstream, redis: &RedisServer, shutdown_delay: &str) -> Binary {
    let mut binary = Binary::listening(
        portcullis_command(TEST_SECRET),
        &config(upstream, redis, shutdown_delay),
    )
    .await;
    // Ready (Redis answers) and serving.
    binary.wait_ready().await;
    let resp = fresh_client()
        .get(format!("http://{}/warm-up", binary.public))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    binary
}

#[tokio::test]
async fn sigterm_turns_readyz_503_while_the_listener_still_serves_then_exits_0() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let mut binary = start(&upstream, &redis, "2s").await;

    // Taken before the signal goes: the delay cannot have started earlier.
    let signalled = Instant::now();
    binary.signal("TERM");
    let mut not_ready = None;
    let deadline = Instant::now() + Duration::from_secs(2);
    while not_ready.is_none() {
        if let Some((503, body)) = readyz(&binary).await {
            not_ready = Some(body);
        } else {
            assert!(Instant::now() < deadline, "/readyz never turned 503");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let body = not_ready.unwrap();
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["checks"]["shutdown"], "shutting down", "{body}");

    // Still inside the delay (past it, the listener is closed and the connection refused): a
    // new connection to the public port is accepted and answered.
    let resp = fresh_client()
        .get(format!("http://{}/during-delay", binary.public))
        .send()
        .await
        .expect("the public listener still accepts during the delay");
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().target, "/during-delay");
    binary.assert_running();

    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "exited after {took:?}, before the 2 s delay"
    );
}

#[tokio::test]
async fn sigint_closes_the_listener_without_the_delay() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    // A delay long enough that no slowness of the machine can pass for skipping it.
    let mut binary = start(&upstream, &redis, "30s").await;

    let signalled = Instant::now();
    binary.signal("INT");
    let status = binary.wait_exit(Duration::from_secs(40)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(10),
        "SIGINT waited {took:?}; it must skip the 30 s delay"
    );
    assert!(
        tokio::net::TcpStream::connect(binary.public).await.is_err(),
        "the public listener is closed"
    );
}
