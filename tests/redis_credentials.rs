//! Where portcullis finds its Redis and how it logs in: `REDIS_HOST` / `REDIS_PORT` /
//! `REDIS_PASSWORD` over `redis.url`, and an ACL user named in `redis.url`. The real binary runs
//! as a child process with the Redis environment each test gives it (variables are never set
//! on the test process, whose tests run in parallel), against a real redis-server.

mod observe;
mod support;

use std::time::{Duration, Instant};

use observe::{portcullis_command, Binary};
use serde_json::Value;
use support::{client, dead_addr, json, stored_ids, token, RedisServer, Upstream};

/// The password a test redis-server is given (never a placeholder portcullis would refuse).
const PASSWORD: &str = "c3a1f0b29e7d48aa9d1e5b6f7a8c9d0e";

/// The real binary with only the test's `env` for Redis (no other REDIS_* or PORTCULLIS_*).
async fn start(config: &str, env: &[(&str, &str)]) -> Binary {
    let mut command = portcullis_command(support::TEST_SECRET);
    command.envs(env.iter().copied());
    Binary::listening(command, config).await
}

/// Polls `/readyz` for `how_long` (after the admin port answers): it must never be 200.
/// Returns the last body.
async fn assert_never_ready(running: &mut Binary, how_long: Duration) -> Value {
    let until = Instant::now() + how_long;
    loop {
        let (status, body) = running.readyz().await;
        assert_eq!(status, 503, "{body}\n{}", running.output());
        assert_eq!(body["ready"], false, "{body}");
        if Instant::now() >= until {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a session for `user` through the session API; the response status and body.
async fn create_session(running: &Binary, user: &str) -> (u16, Value) {
    let response = client()
        .post(running.url("/api/v1/sessions/create"))
        .bearer_auth(token(user, None))
        .send()
        .await
        .expect("create session");
    let status = response.status().as_u16();
    (status, json(response).await)
}

/// Opens a session and checks that a request under it reaches the upstream.
async fn assert_serves_sessions(running: &Binary, user: &str, upstream: &Upstream) -> String {
    let (status, body) = create_session(running, user).await;
    assert_eq!(status, 201, "{body}\n{}", running.output());
    let session = body["data"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no sessionId in {body}"))
        .to_string();
    let before = upstream.count();
    let response = client()
        .get(running.url("/play/state"))
        .bearer_auth(token(user, Some(&session)))
        .send()
        .await
        .expect("proxied request");
    assert_eq!(response.status(), 200, "{}", running.output());
    assert_eq!(upstream.count(), before + 1);
    assert_eq!(
        upstream
            .last()
            .headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok()),
        Some(session.as_str())
    );
    session
}

fn config(upstream: &Upstream, redis_url: &str) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\n\n[redis]\nurl = \"{redis_url}\"\n",
        upstream.url()
    )
}

/// A connection to `redis` as `user` (the default user when `None`) with `password`.
fn conn_as(redis: &RedisServer, user: Option<&str>, password: &str) -> redis::Connection {
    let user = user.unwrap_or("");
    redis::Client::open(format!(
        "redis://{user}:{password}@127.0.0.1:{}",
        redis.port
    ))
    .expect("redis url")
    .get_connection()
    .expect("authenticated connection to the test redis")
}

/// Makes the default user of `redis` need [`PASSWORD`], as `--requirepass` would.
fn require_password(redis: &RedisServer) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query(&mut redis.conn())
        .expect("CONFIG SET requirepass");
    // From now on a connection without the password is refused.
    let refused = redis::cmd("PING").query::<String>(&mut redis.conn());
    assert!(refused.is_err(), "redis still answers without a password");
}

// ------------------------------------------------------------------------------------------
// REDIS_HOST / REDIS_PORT
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn redis_host_and_redis_port_replace_the_host_and_port_of_redis_url() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    // Neither the host (which cannot resolve) nor the port (nothing listens) of the URL leads
    // anywhere: only both variables together reach the test redis.
    let elsewhere = format!("redis://redis.invalid:{}", dead_addr().port());
    let port = redis.port.to_string();
    let mut running = start(
        &config(&upstream, &elsewhere),
        &[("REDIS_HOST", "127.0.0.1"), ("REDIS_PORT", &port)],
    )
    .await;

    let ready = running.wait_ready().await;
    assert_eq!(ready["checks"]["redis"], "ok", "{ready}");
    let session = assert_serves_sessions(&running, "player-1", &upstream).await;
    assert!(
        stored_ids(&mut redis.conn(), "player-1").contains(&session),
        "the session is not in the Redis named by REDIS_HOST and REDIS_PORT"
    );
}

#[tokio::test]
async fn without_the_variables_the_same_config_reaches_no_redis() {
    // The control for the test above: its redis.url alone really leads nowhere.
    let _redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let elsewhere = format!("redis://redis.invalid:{}", dead_addr().port());
    let mut running = start(&config(&upstream, &elsewhere), &[]).await;
    let body = assert_never_ready(&mut running, Duration::from_secs(1)).await;
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    let (status, body) = create_session(&running, "player-1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "SESSION_STORE_UNAVAILABLE", "{body}");
}

// ------------------------------------------------------------------------------------------
// REDIS_PASSWORD
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn redis_password_alone_supplies_the_password_redis_requires() {
    let redis = RedisServer::start();
    require_password(&redis);
    let upstream = Upstream::echo().await;
    // The URL has no password at all.
    let mut running = start(
        &config(&upstream, &redis.url()),
        &[("REDIS_PASSWORD", PASSWORD)],
    )
    .await;

    let ready = running.wait_ready().await;
    assert_eq!(ready["checks"]["redis"], "ok", "{ready}");
    let session = assert_serves_sessions(&running, "player-1", &upstream).await;
    assert!(stored_ids(&mut conn_as(&redis, None, PASSWORD), "player-1").contains(&session));
}

#[tokio::test]
async fn redis_password_wins_over_the_password_in_redis_url() {
    let redis = RedisServer::start();
    require_password(&redis);
    let upstream = Upstream::echo().await;
    let url = format!(
        "redis://:stale-password-0123456789@127.0.0.1:{}",
        redis.port
    );
    let mut running = start(&config(&upstream, &url), &[("REDIS_PASSWORD", PASSWORD)]).await;

    let ready = running.wait_ready().await;
    assert_eq!(ready["checks"]["redis"], "ok", "{ready}");
    assert_serves_sessions(&running, "player-1", &upstream).await;
}

#[tokio::test]
async fn without_redis_password_a_redis_that_requires_one_fails_closed() {
    let redis = RedisServer::start();
    require_password(&redis);
    let upstream = Upstream::echo().await;
    let mut running = start(&config(&upstream, &redis.url()), &[]).await;

    let body = assert_never_ready(&mut running, Duration::from_secs(1)).await;
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    let log = running.wait_for_lines(&["cannot connect to Redis"]).await;
    assert!(
        log.contains("NOAUTH"),
        "the log does not say Redis wants a password:\n{log}"
    );
    let address = format!("127.0.0.1:{}", redis.port);
    assert!(
        log.lines()
            .any(|l| l.contains("cannot connect to Redis") && l.contains(&address)),
        "the warning does not name the Redis it tried:\n{log}"
    );
    let (status, body) = create_session(&running, "player-1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "SESSION_STORE_UNAVAILABLE", "{body}");
    // Nothing was written.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut conn_as(&redis, None, PASSWORD))
        .expect("KEYS");
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(upstream.count(), 0);
}

// ------------------------------------------------------------------------------------------
// An ACL user in redis.url
// ------------------------------------------------------------------------------------------

const ACL_USER: &str = "portcullis";
const ACL_PASSWORD: &str = "7d0c5e4b3a29181f6e5d4c3b2a190817";

/// Adds the user portcullis logs in as: its own keys only, no admin or dangerous commands
/// except `ROLE` (which README asks for), and a password on the default user so that nothing
/// gets in without logging in.
fn acl_redis() -> RedisServer {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(ACL_USER)
        .arg("reset")
        .arg("on")
        .arg(format!(">{ACL_PASSWORD}"))
        .arg("~aeturnis:*")
        .arg("resetchannels")
        .arg("+@all")
        .arg("-@admin")
        .arg("-@dangerous")
        .arg("+role")
        .query(&mut conn)
        .expect("ACL SETUSER");
    require_password(&redis);
    redis
}

#[tokio::test]
async fn an_acl_user_in_redis_url_serves_sessions_within_its_permissions() {
    let redis = acl_redis();
    let upstream = Upstream::echo().await;
    let url = format!("redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{}", redis.port);
    let mut running = start(&config(&upstream, &url), &[]).await;

    let ready = running.wait_ready().await;
    assert_eq!(ready["checks"]["redis"], "ok", "{ready}");
    let session = assert_serves_sessions(&running, "player-1", &upstream).await;
    // Ending the session works too (a write through a script).
    let response = client()
        .delete(running.url(&format!("/api/v1/sessions/{session}")))
        .bearer_auth(token("player-1", Some(&session)))
        .send()
        .await
        .expect("end session");
    let status = response.status();
    assert!(status.is_success(), "{status}: {}", json(response).await);

    let mut admin = conn_as(&redis, None, PASSWORD);
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut admin)
        .expect("CLIENT LIST");
    assert!(
        clients
            .lines()
            .any(|l| l.contains(&format!(" user={ACL_USER} "))),
        "portcullis is not connected as {ACL_USER}:\n{clients}"
    );
    // Nothing portcullis sent was denied by the ACL.
    let denied: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut admin)
        .expect("ACL LOG");
    assert!(denied.is_empty(), "the ACL denied commands: {denied:?}");
    // Client tracking (the local session cache) works for this user too.
    let log = running.output();
    assert!(!log.contains("tracking unavailable"), "{log}");
    assert!(!log.contains("cannot connect to Redis"), "{log}");
}

#[tokio::test]
async fn a_wrong_acl_password_fails_closed_and_says_why() {
    let redis = acl_redis();
    let upstream = Upstream::echo().await;
    let url = format!(
        "redis://{ACL_USER}:not-the-password-0123456789@127.0.0.1:{}",
        redis.port
    );
    let mut running = start(&config(&upstream, &url), &[]).await;

    let body = assert_never_ready(&mut running, Duration::from_secs(1)).await;
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    // Readiness names the refusal too, as the README says, and never the password.
    let redis_check = body["checks"]["redis"].as_str().unwrap_or_default();
    assert!(redis_check.contains("WRONGPASS"), "{body}");
    assert!(!redis_check.contains("not-the-password"), "{body}");
    let (status, body) = create_session(&running, "player-1").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "SESSION_STORE_UNAVAILABLE", "{body}");
    let response = client()
        .get(running.url("/play/state"))
        .bearer_auth(token(
            "player-1",
            Some("0b6c3a8e-4f1d-4c2b-9a7e-5d3f1e2c4b6a"),
        ))
        .send()
        .await
        .expect("proxied request");
    assert_eq!(response.status(), 503);
    assert_eq!(upstream.count(), 0);
    // The log names the refusal (not just "unavailable"), and never the password.
    let log = running.wait_for_lines(&["WRONGPASS"]).await;
    assert!(
        log.contains("WRONGPASS"),
        "the log does not say the login was refused:\n{log}"
    );
    assert!(!log.contains("not-the-password"), "{log}");
}
