//! The process around the proxy: graceful shutdown, health endpoints, `check-config`, signals.

mod observe;
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

async fn connect_refused(addr: std::net::SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let mut proxy = Proxy::start(&open_config(&upstream.url())).await;
    let public = proxy.addr;

    let in_flight = tokio::spawn(client().get(proxy.url("/slow")).send());
    reached_upstream(&mut arrived).await;

    let mut stopped = proxy.shutdown();
    eventually("the public listener to close", || connect_refused(public)).await;
    // Draining waits for the held request (shutdown_grace is 30 s by default).
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut stopped)
            .await
            .is_err(),
        "shutdown finished while a request was still in flight"
    );

    gate.send(true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight request finished within 5 s")
        .unwrap()
        .expect("the in-flight request got its response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "finished");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("shutdown completed within 5 s")
        .expect("portcullis stopped cleanly");
}

#[tokio::test]
async fn readyz_turns_503_while_draining() {
    let redis = RedisServer::start();
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let config = config_with(
        &upstream.url(),
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    );
    let mut proxy = Proxy::start(&config).await;
    let readyz = proxy.admin_url("/readyz");
    assert_eq!(client().get(&readyz).send().await.unwrap().status(), 200);

    let in_flight = tokio::spawn(client().get(proxy.url("/slow")).send());
    reached_upstream(&mut arrived).await;
    let stopped = proxy.shutdown();
    // While the held request drains, /readyz says why traffic should go elsewhere.
    eventually("/readyz to answer 503 shutting down", || {
        let readyz = readyz.clone();
        async move {
            match client().get(&readyz).send().await {
                Ok(r) if r.status() == 503 => {
                    let body = json(r).await;
                    body["ready"] == false && body["checks"]["shutdown"] == "shutting down"
                }
                _ => false,
            }
        }
    })
    .await;
    gate.send(true).unwrap();
    assert_eq!(in_flight.await.unwrap().unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .unwrap()
        .unwrap();
}

/// Each worker's connections get the grace at the same time, not one worker after another.
#[tokio::test]
async fn the_grace_runs_once_however_many_workers_hold_unfinished_requests() {
    let (upstream, mut arrived, _gate) = gated_upstream().await;
    let config = config_with(
        &upstream.url(),
        "[server]\nworkers = 4\nshutdown_grace = \"3s\"\n",
    );
    let mut proxy = Proxy::start(&config).await;
    // Connections are dealt to the workers in turn: one stuck request on each.
    let mut in_flight = Vec::new();
    for i in 0..4 {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        in_flight.push(tokio::spawn(
            client.get(proxy.url(&format!("/forever/{i}"))).send(),
        ));
    }
    for _ in 0..4 {
        reached_upstream(&mut arrived).await;
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), proxy.shutdown())
        .await
        .expect("the drain ends")
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3), "{took:?}");
    // One after the other, four workers would take twelve seconds; side by side, three and
    // whatever the load adds.
    assert!(took < Duration::from_secs(8), "the drain took {took:?}");
}

#[tokio::test]
async fn shutdown_gives_up_on_a_request_that_outlasts_the_grace() {
    let (upstream, mut arrived, _gate) = gated_upstream().await;
    let config = config_with(&upstream.url(), "[server]\nshutdown_grace = \"200ms\"\n");
    let mut proxy = Proxy::start(&config).await;
    let _in_flight = tokio::spawn(client().get(proxy.url("/forever")).send());
    reached_upstream(&mut arrived).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown())
        .await
        .expect("shutdown_grace bounds the drain")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn healthz_answers_200_on_the_admin_port() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = client()
        .get(proxy.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = json(resp).await;
    assert_eq!(body["alive"], true, "{body}");
    assert_eq!(
        upstream.count(),
        0,
        "health checks must not reach the upstream"
    );
}

#[tokio::test]
async fn readyz_answers_200_json_on_the_admin_port() {
    // Ready means the session store answers too.
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let config = config_with(
        &upstream.url(),
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    );
    let proxy = Proxy::start(&config).await;
    let resp = client()
        .get(proxy.admin_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = json(resp).await;
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["checks"]["shutdown"], "ok", "{body}");
}

#[tokio::test]
async fn admin_endpoints_refuse_other_methods_with_405_and_allow() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = client()
        .post(proxy.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
    assert_eq!(json(resp).await["error"]["code"], "METHOD_NOT_ALLOWED");
}

/// Held connections cannot lock the kubelet's probes out: past the limit, the oldest goes.
#[tokio::test]
async fn the_admin_port_keeps_a_bounded_number_of_connections_and_serves_the_newest() {
    use tokio::io::AsyncReadExt;
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    // Connections that never send a request.
    let mut held = Vec::new();
    for _ in 0..portcullis::admin::MAX_ADMIN_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(proxy.admin).await.unwrap());
    }
    // A probe still gets its answer...
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client().get(proxy.admin_url("/healthz")).send(),
    )
    .await
    .expect("the probe answered while 64 connections are held")
    .unwrap();
    assert_eq!(resp.status(), 200);
    // ... and the oldest held connection was closed to make room.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), held[0].read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the oldest admin connection is still open"
    );
}

#[tokio::test]
async fn health_endpoints_are_not_on_the_public_port() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let resp = client().get(proxy.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Forwarded like any other path.
    assert_eq!(upstream.last().target, "/healthz");
}

// ------------------------------------------------------------------------------------------
// The real binary
// ------------------------------------------------------------------------------------------

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text);
    observe::portcullis_command(TEST_SECRET)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run portcullis check-config")
}

#[test]
fn check_config_accepts_a_valid_file() {
    let out = check_config(&config_with(
        "http://127.0.0.1:8080",
        "[server]\nlisten = \"127.0.0.1:8443\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n",
    ));
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_rejects_an_unknown_key_naming_it() {
    let out = check_config(&config_with(
        "http://127.0.0.1:8080",
        "[server]\nlisen = \"127.0.0.1:8443\"\n",
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.lisen"), "{stderr}");
}

#[test]
fn check_config_rejects_a_bad_duration_naming_the_key() {
    let out = check_config(&config_with(
        "http://127.0.0.1:8080",
        "[upstream]\nrequest_timeout = \"soon\"\n",
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upstream.request_timeout"), "{stderr}");
}

#[test]
fn check_config_rejects_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = observe::portcullis_command(TEST_SECRET)
        .args(["check-config", "--config"])
        .arg(dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("absent.toml"), "{stderr}");
}

/// The soft and hard open-file limits of process `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().unwrap().to_string();
    let hard = fields.next().unwrap().to_string();
    (soft, hard)
}

/// Started at a soft open-file limit of 256 (as some container runtimes start processes at
/// 1024), portcullis raises it to the hard limit; and warns when even that cannot hold
/// `server.max_connections` proxied connections (two descriptors each).
#[tokio::test]
async fn the_binary_raises_its_open_file_limit_and_warns_when_the_hard_one_is_too_low() {
    let upstream = Upstream::echo().await;
    let config = config_with(
        &upstream.url(),
        &format!(
            "[server]\nmax_connections = 300\nshutdown_delay = \"0s\"\n[redis]\nurl = \"redis://{}\"\n",
            dead_addr()
        ),
    );
    const TOO_LOW: &str = "the open-file limit cannot hold server.max_connections";
    // 300 connections want 2 × 300 + 1024 = 1624 descriptors: the test's own hard limit (kept
    // by the first run) normally holds that; 1500 does not.
    let (_, own_hard) = open_file_limits(std::process::id());
    let own_hard_too_low = own_hard.parse::<u64>().is_ok_and(|hard| hard < 1624);
    for (limits, warned) in [
        ("--nofile=256:", own_hard_too_low),
        ("--nofile=256:1500", true),
    ] {
        let command = observe::portcullis_command_under(&["prlimit", limits, "--"], TEST_SECRET);
        let mut binary = observe::Binary::listening(command, &config).await;
        binary.wait_healthy().await;
        let (soft, hard) = open_file_limits(binary.pid);
        assert_eq!(
            soft, hard,
            "{limits}: the soft limit was raised to the hard one"
        );
        assert_ne!(soft, "256", "{limits}");
        assert_eq!(
            binary.logged(TOO_LOW),
            warned,
            "{limits}:\n{}",
            binary.output()
        );
        binary.signal("TERM");
        binary.wait_exit(Duration::from_secs(10)).await;
    }
}

/// Once the shutdown has begun, a signal asking for more haste ends the process at once,
/// rather than after `server.shutdown_delay` (30 s here) and the drain of a request held at the
/// upstream: after SIGTERM a second SIGTERM or a SIGINT, after SIGINT a second SIGINT.
#[tokio::test]
async fn a_second_signal_ends_the_binary_at_once() {
    let (upstream, mut arrived, _gate) = gated_upstream().await;
    let config = config_with(
        &upstream.url(),
        &format!(
            "[server]\nshutdown_delay = \"30s\"\n[redis]\nurl = \"redis://{}\"\n",
            dead_addr()
        ),
    );
    for (first, second) in [("TERM", "TERM"), ("TERM", "INT"), ("INT", "INT")] {
        let mut binary =
            observe::Binary::listening(observe::portcullis_command(TEST_SECRET), &config).await;
        binary.wait_healthy().await;
        let _held = tokio::spawn(client().get(binary.url("/held")).send());
        reached_upstream(&mut arrived).await;
        binary.signal(first);
        binary.wait_shutting_down().await;
        binary.signal(second);
        let status = binary.wait_exit(Duration::from_secs(5)).await;
        assert_eq!(status.code(), Some(1), "{first} then {second}");
        assert!(binary.logged("second signal"), "{}", binary.output());
    }
}

/// A SIGTERM after a SIGINT asks for nothing the prompt shutdown is not doing already (a script
/// passing Ctrl-C on to a process the terminal interrupted too): the drain runs to its end.
#[tokio::test]
async fn sigterm_after_sigint_lets_the_prompt_shutdown_finish() {
    let (upstream, mut arrived, gate) = gated_upstream().await;
    let config = config_with(
        &upstream.url(),
        &format!("[redis]\nurl = \"redis://{}\"\n", dead_addr()),
    );
    let mut binary =
        observe::Binary::listening(observe::portcullis_command(TEST_SECRET), &config).await;
    binary.wait_healthy().await;
    let in_flight = tokio::spawn(client().get(binary.url("/held")).send());
    reached_upstream(&mut arrived).await;
    binary.signal("INT");
    binary.wait_shutting_down().await;
    binary.signal("TERM");
    // The held request still gets its answer, and the process exits cleanly after it.
    gate.send(true).unwrap();
    let resp = in_flight
        .await
        .unwrap()
        .expect("the held request was answered");
    assert_eq!(resp.status(), 200);
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}\n{}", binary.output());
    assert!(!binary.logged("second signal"), "{}", binary.output());
}

#[tokio::test]
async fn binary_exits_0_after_sigterm() {
    let upstream = Upstream::echo().await;
    let config = config_with(
        &upstream.url(),
        &format!(
            "[server]\nshutdown_delay = \"0s\"\n[redis]\nurl = \"redis://{}\"\n",
            dead_addr()
        ),
    );
    let mut binary =
        observe::Binary::listening(observe::portcullis_command(TEST_SECRET), &config).await;
    binary.wait_healthy().await;
    // It is really serving: a request goes through to the upstream.
    let resp = client().get(binary.url("/through")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last().target, "/through");

    binary.signal("TERM");
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}

/// Past `server.max_connections`, connections wait in the kernel's accept queue: after a
/// restart thousands of clients reconnect at once, and a short queue (128, as `bind` asks for)
/// drops their SYNs, each retried only a second later.
#[tokio::test]
async fn connections_past_the_limit_wait_in_a_long_accept_queue() {
    let upstream = Upstream::echo().await;
    let config = config_with(&upstream.url(), "[server]\nmax_connections = 1\n");
    let binary =
        observe::Binary::listening(observe::portcullis_command(TEST_SECRET), &config).await;
    // The one connection it serves, held open.
    let held = tokio::net::TcpStream::connect(binary.public).await.unwrap();
    // The kernel completes a handshake for each connection its queue has room for; the rest
    // wait for a SYN retry, a second or more away.
    const WAITING: usize = 400;
    let handshakes = (0..WAITING).map(|_| {
        tokio::time::timeout(
            Duration::from_millis(900),
            tokio::net::TcpStream::connect(binary.public),
        )
    });
    let done = futures_util::future::join_all(handshakes).await;
    let queued = done.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(
        queued, WAITING,
        "only {queued} of {WAITING} found room in the queue"
    );
    drop(held);
}
