//! Socket.IO through portcullis, with the real thing on both sides: a Node.js Socket.IO server
//! as the game backend and the Socket.IO client a game would ship (tests/socketio/). The
//! client connects by long polling, upgrades to WebSocket, and the server sees the identity
//! portcullis verified; a caller without a token gets nowhere, and destroying the session ends
//! the socket.
//!
//! Needs `node` and `npm` (deploy/test.sh installs them); the packages are installed from
//! tests/socketio/package-lock.json on first use.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn app_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketio")
}

/// Installs the locked packages, once per test binary, unless an install newer than the lock
/// file is there. Under `flock`, so that two test runs never install into one directory at
/// once (`npm ci` empties `node_modules` first).
fn packages() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let status = Command::new("flock")
            .args([".install.lock", "sh", "-c"])
            .arg(
                "[ node_modules/.package-lock.json -nt package-lock.json ] || \
                 npm ci --no-audit --no-fund --loglevel=error",
            )
            .current_dir(app_dir())
            .status()
            .expect("run flock (util-linux)");
        assert!(
            status.success(),
            "npm ci in tests/socketio failed: node and npm must be installed (deploy/test.sh \
             installs nodejs and npm)"
        );
    });
}

/// A node process, killed on drop.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node(script: &str, args: &[&str]) -> (Node, BufReader<ChildStdout>) {
    packages();
    let mut child = Command::new("node")
        .arg(app_dir().join(script))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("node must be installed (deploy/test.sh installs nodejs)");
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    (Node(child), stdout)
}

/// The next JSON line a node process prints (read on a blocking thread, bounded).
async fn next_line(stdout: BufReader<ChildStdout>) -> (Value, BufReader<ChildStdout>) {
    let read = tokio::task::spawn_blocking(move || {
        let mut stdout = stdout;
        let mut line = String::new();
        let read = stdout.read_line(&mut line).expect("read node's output");
        assert!(read > 0, "node exited without printing the next line");
        (line, stdout)
    });
    let (line, stdout) = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("node printed a line within 20 s")
        .expect("reader thread");
    let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (value, stdout)
}

/// The lines a node process prints up to and including the first `event`.
async fn lines_until(
    mut stdout: BufReader<ChildStdout>,
    event: &str,
) -> (Vec<Value>, BufReader<ChildStdout>) {
    let mut lines = Vec::new();
    loop {
        let (line, rest) = next_line(stdout).await;
        stdout = rest;
        let done = line["event"] == event;
        lines.push(line);
        if done {
            return (lines, stdout);
        }
        assert!(lines.len() < 10, "no {event} in {lines:?}");
    }
}

struct Game {
    _server: Node,
    /// Kept open: a server whose output had no reader would die on its next write.
    _server_output: BufReader<ChildStdout>,
    proxy: Proxy,
    _redis: RedisServer,
}

/// The Socket.IO server behind portcullis, `/socket.io` a session route.
async fn game() -> Game {
    let (server, stdout) = node("server.js", &[]);
    let (listening, server_output) = next_line(stdout).await;
    let port = listening["port"].as_u64().expect("the server's port");
    let redis = RedisServer::start();
    let proxy = Proxy::start(&format!(
        "[upstream]\nurl = \"http://127.0.0.1:{port}\"\n[redis]\nurl = \"{}\"\n\
         [[routes]]\npath_prefix = \"/socket.io\"\nauth = \"session\"\n",
        redis.url()
    ))
    .await;
    Game {
        _server: server,
        _server_output: server_output,
        proxy,
        _redis: redis,
    }
}

#[tokio::test]
async fn a_socket_io_client_connects_upgrades_and_the_server_sees_who_it_is() {
    let game = game().await;
    let sid = create_session(&game.proxy, &token("player-7", None)).await;
    let bearer = token("player-7", Some(&sid));
    let (_client, out) = node("client.js", &[&game.proxy.url("/"), &bearer]);

    let (events, _) = lines_until(out, "whoami").await;
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    // Opened by long polling, then upgraded (connect comes before or after the upgrade).
    assert_eq!(events[0]["event"], "open", "{events:?}");
    assert_eq!(events[0]["transport"], "polling", "{events:?}");
    assert!(names.contains(&"connect"), "{events:?}");
    let upgrade = events.iter().find(|e| e["event"] == "upgrade");
    assert_eq!(
        upgrade.map(|e| &e["transport"]),
        Some(&Value::from("websocket")),
        "{events:?}"
    );
    let whoami = events.last().expect("whoami");
    assert_eq!(whoami["user"], "player-7", "{whoami}");
    assert_eq!(whoami["session"], sid.as_str(), "{whoami}");
    assert_eq!(whoami["platform"], "web", "{whoami}");
    // Both ends have moved to WebSocket, through portcullis' tunnel.
    assert_eq!(whoami["transport"], "websocket", "{whoami}");
    assert_eq!(whoami["client_transport"], "websocket", "{whoami}");
}

#[tokio::test]
async fn a_socket_io_client_without_a_token_is_refused() {
    let game = game().await;
    let (_client, out) = node("client.js", &[&game.proxy.url("/")]);
    let (refused, _) = next_line(out).await;
    assert_eq!(refused["event"], "connect_error", "{refused}");
    // The polling handshake got portcullis' 401.
    assert_eq!(refused["status"], 401, "{refused}");
}

#[tokio::test]
async fn destroying_the_session_ends_the_socket() {
    let game = game().await;
    let sid = create_session(&game.proxy, &token("player-8", None)).await;
    let bearer = token("player-8", Some(&sid));
    let (_client, out) = node("client.js", &[&game.proxy.url("/"), &bearer]);
    let (events, out) = lines_until(out, "whoami").await;
    let whoami = events.last().expect("whoami");
    assert_eq!(whoami["client_transport"], "websocket", "{whoami}");

    let destroyed = client()
        .delete(game.proxy.url(&format!("/api/v1/sessions/{sid}")))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(destroyed.status(), 200);
    let (ended, _) = next_line(out).await;
    assert_eq!(ended["event"], "disconnect", "{ended}");
    assert_eq!(ended["reason"], "transport close", "{ended}");
}
