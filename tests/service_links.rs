//! Kubernetes service-link variables: every pod of a namespace gets `REDIS_PORT=tcp://...`,
//! `REDIS_SERVICE_HOST`, ... for a Service named `redis`, and `PORTCULLIS_PORT=tcp://...`, ...
//! for one named `portcullis`. portcullis reads REDIS_* and PORTCULLIS_* variables, so the real
//! binary is started here with exactly such an environment and must start, be ready, and serve
//! sessions from the Redis of its config file.
//!
//! The link variables name 10.x addresses on purpose: nothing may ever connect there, so the test
//! passes only when portcullis ignores them (a connection attempt would fail the readiness wait).

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{client, json, pick_free_port, stored_ids, token, RedisServer, Upstream};

/// What the kubelet puts into a pod for a Service `redis` (10.0.0.5:6379, port named `redis`),
/// a Service `portcullis` (10.0.0.7:8443, port named `https`) and a Service `portcullis-admin`
/// (10.0.0.8:9090).
const SERVICE_LINKS: &[(&str, &str)] = &[
    ("REDIS_PORT", "tcp://10.0.0.5:6379"),
    ("REDIS_SERVICE_HOST", "10.0.0.5"),
    ("REDIS_SERVICE_PORT", "6379"),
    ("REDIS_SERVICE_PORT_REDIS", "6379"),
    ("REDIS_PORT_6379_TCP", "tcp://10.0.0.5:6379"),
    ("REDIS_PORT_6379_TCP_ADDR", "10.0.0.5"),
    ("REDIS_PORT_6379_TCP_PORT", "6379"),
    ("REDIS_PORT_6379_TCP_PROTO", "tcp"),
    ("PORTCULLIS_PORT", "tcp://10.0.0.7:8443"),
    ("PORTCULLIS_SERVICE_HOST", "10.0.0.7"),
    ("PORTCULLIS_SERVICE_PORT", "8443"),
    ("PORTCULLIS_SERVICE_PORT_HTTPS", "8443"),
    ("PORTCULLIS_PORT_8443_TCP", "tcp://10.0.0.7:8443"),
    ("PORTCULLIS_PORT_8443_TCP_ADDR", "10.0.0.7"),
    ("PORTCULLIS_PORT_8443_TCP_PORT", "8443"),
    ("PORTCULLIS_PORT_8443_TCP_PROTO", "tcp"),
    ("PORTCULLIS_ADMIN_PORT", "tcp://10.0.0.8:9090"),
    ("PORTCULLIS_ADMIN_SERVICE_HOST", "10.0.0.8"),
    ("PORTCULLIS_ADMIN_SERVICE_PORT", "9090"),
    ("PORTCULLIS_ADMIN_PORT_9090_TCP", "tcp://10.0.0.8:9090"),
    ("PORTCULLIS_ADMIN_PORT_9090_TCP_ADDR", "10.0.0.8"),
    ("PORTCULLIS_ADMIN_PORT_9090_TCP_PORT", "9090"),
    ("PORTCULLIS_ADMIN_PORT_9090_TCP_PROTO", "tcp"),
];

/// The real binary as a child process, killed on drop.
struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, config: &str) -> Running {
    let path = dir.join("config.toml");
    std::fs::write(&path, config).expect("write config");
    let log = dir.join("portcullis.log");
    let stderr = std::fs::File::create(&log).expect("create log file");
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        // Only what a pod would have: the secret and the service links.
        .env_clear()
        .env("JWT_SECRET", support::TEST_SECRET)
        .envs(SERVICE_LINKS.iter().copied())
        .arg("--config")
        .arg(&path)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start portcullis");
    Running { child, log }
}

#[tokio::test]
async fn service_link_variables_neither_crash_nor_redirect_portcullis() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let (public, admin) = (pick_free_port(), pick_free_port());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{public}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [upstream]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n",
        upstream.url(),
        redis.url()
    );
    let mut running = start(dir.path(), &config);

    // Ready: listening where the file says (not 10.0.0.7:8443), with Redis (not 10.0.0.5) ok.
    let deadline = Instant::now() + Duration::from_secs(15);
    let ready = loop {
        if let Ok(Some(status)) = running.child.try_wait() {
            panic!("portcullis exited with {status}:\n{}", running.log());
        }
        let response = client()
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(response) = response {
            if response.status() == 200 {
                break json(response).await;
            }
        }
        assert!(
            Instant::now() < deadline,
            "portcullis never became ready:\n{}",
            running.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["checks"]["redis"], "ok", "{ready}");

    // A session is created in the configured Redis and a request under it reaches the upstream.
    let base = format!("http://127.0.0.1:{public}");
    let created = client()
        .post(format!("{base}/api/v1/sessions/create"))
        .bearer_auth(token("player-1", None))
        .send()
        .await
        .expect("create session");
    assert_eq!(created.status(), 201, "{}", running.log());
    let body = json(created).await;
    let session = body["data"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no sessionId in {body}"))
        .to_string();
    assert!(
        stored_ids(&mut redis.conn(), "player-1").contains(&session),
        "the session is not in the configured Redis"
    );

    let response = client()
        .get(format!("{base}/play/move?x=1"))
        .bearer_auth(token("player-1", Some(&session)))
        .send()
        .await
        .expect("proxied request");
    assert_eq!(response.status(), 200, "{}", running.log());
    let seen = upstream.last();
    assert_eq!(seen.target, "/play/move?x=1");
    assert_eq!(
        seen.headers.get("x-user-id").and_then(|v| v.to_str().ok()),
        Some("player-1")
    );
    assert_eq!(
        seen.headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok()),
        Some(session.as_str())
    );

    // Without a session the same request is refused: enforcement is on.
    let refused = client()
        .get(format!("{base}/play/move?x=1"))
        .send()
        .await
        .expect("unauthenticated request");
    assert_eq!(refused.status(), 401);
    assert_eq!(upstream.count(), 1);
}
