//! JSON logs (`--log-format json`, `log.format = "json"`): the real binary runs as a child
//! process, requests go through it, and what it writes is read back and parsed line by line.
//! The access line carries the documented fields at the top level; no token, Authorization
//! value or query string is ever written.

mod observe;
mod support;

use observe::{portcullis_command, Binary};
use serde_json::Value;
use support::{client, json, open_config, session_config, token, RedisServer, Upstream};

/// The real binary with `args` before its subcommand and no PORTCULLIS_* variables (the
/// config's log settings apply).
async fn start(config: &str, args: &[&str]) -> Binary {
    let mut command = portcullis_command(support::TEST_SECRET);
    command.args(args);
    Binary::listening(command, config).await
}

/// Every non-empty line of `out`, each of which must be one JSON object.
fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line:?}\n{out}"));
            assert!(value.is_object(), "log line is not a JSON object: {line}");
            value
        })
        .collect()
}

/// The single line with this target whose span carries `request_id`.
fn line_of<'a>(lines: &'a [Value], target: &str, request_id: &str) -> &'a Value {
    let found: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == target && l["span"]["request_id"] == request_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {target} line of {request_id}: {found:#?}"
    );
    found[0]
}

/// Requests through `running` (a session opened, a proxied request with a query, one refused
/// without a token); checks the JSON lines they leave. Returns the tokens used, which must
/// appear nowhere in the output.
async fn exercise_and_check(running: &Binary, upstream: &Upstream) {
    let create_token = token("player-1", None);
    let resp = client()
        .post(running.url("/api/v1/sessions/create"))
        .header("x-request-id", "log-create-1")
        .bearer_auth(&create_token)
        .send()
        .await
        .expect("create session");
    assert_eq!(resp.status(), 201);
    let session = json(resp).await["data"]["sessionId"]
        .as_str()
        .expect("sessionId")
        .to_string();

    let play_token = token("player-1", Some(&session));
    let query_secret = "q-secret-7f3a9c1e";
    let resp = client()
        .get(running.url(&format!("/play/move?x=1&access_token={query_secret}")))
        .header("x-request-id", "log-play-1")
        .bearer_auth(&play_token)
        .header("cookie", "sid=cookie-secret-5b2d")
        .send()
        .await
        .expect("proxied request");
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.count(), 1);

    let resp = client()
        .get(running.url("/play/move"))
        .header("x-request-id", "log-refused-1")
        .header("authorization", "Bearer not-a-jwt-but-secret-9e8d")
        .send()
        .await
        .expect("refused request");
    assert_eq!(resp.status(), 401);

    let out = running
        .wait_for_lines(&["log-create-1", "log-play-1", "log-refused-1"])
        .await;
    let lines = json_lines(&out);

    // The session's creation: an api line.
    let create = line_of(&lines, "portcullis::access", "log-create-1");
    assert_eq!(create["method"], "POST", "{create}");
    assert_eq!(create["path"], "/api/v1/sessions/create", "{create}");
    assert_eq!(create["status"], 201, "{create}");
    assert_eq!(create["route_class"], "api", "{create}");

    // The proxied request: every documented field, at the top level.
    let play = line_of(&lines, "portcullis::access", "log-play-1");
    assert_eq!(play["message"], "request", "{play}");
    assert_eq!(play["level"], "INFO", "{play}");
    assert!(play["timestamp"].is_string(), "{play}");
    assert_eq!(play["method"], "GET", "{play}");
    assert_eq!(
        play["path"], "/play/move",
        "the query is never logged: {play}"
    );
    assert_eq!(play["version"], "HTTP/1.1", "{play}");
    assert_eq!(play["status"], 200, "{play}");
    assert_eq!(play["route_class"], "session", "{play}");
    assert_eq!(play["client_ip"], "127.0.0.1", "{play}");
    assert_eq!(play["user_id"], "player-1", "{play}");
    let total = play["total_ms"].as_f64().expect("total_ms is a number");
    let upstream_ms = play["upstream_ms"]
        .as_f64()
        .expect("upstream_ms is a number");
    assert!(
        total >= 0.0 && upstream_ms >= 0.0 && upstream_ms <= total,
        "{play}"
    );
    assert!(play.get("code").is_none(), "{play}");

    // The refusal: its code, no user, no upstream time, and an audit event beside it.
    let refused = line_of(&lines, "portcullis::access", "log-refused-1");
    assert_eq!(refused["status"], 401, "{refused}");
    assert_eq!(refused["code"], "TOKEN_INVALID", "{refused}");
    assert!(refused["total_ms"].is_number(), "{refused}");
    assert!(refused.get("user_id").is_none(), "{refused}");
    assert!(refused.get("upstream_ms").is_none(), "{refused}");
    let audit = line_of(&lines, "audit", "log-refused-1");
    assert_eq!(audit["event"], "request_rejected", "{audit}");
    assert_eq!(audit["code"], "TOKEN_INVALID", "{audit}");

    // No token, Authorization value, cookie or query value anywhere, in either stream.
    let everything = running.output();
    for secret in [
        create_token.as_str(),
        play_token.as_str(),
        // A JWT's signature alone is as good as a leak of it.
        play_token.rsplit('.').next().expect("signature"),
        "not-a-jwt-but-secret-9e8d",
        "Bearer",
        "cookie-secret-5b2d",
        query_secret,
    ] {
        assert!(
            !everything.contains(secret),
            "the log contains {secret:?}:\n{everything}"
        );
    }
}

#[tokio::test]
async fn log_format_json_flag_writes_access_lines_as_json() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let mut running = start(
        &session_config(&upstream, &redis, ""),
        &["--log-format", "json"],
    )
    .await;
    running.wait_ready().await;
    exercise_and_check(&running, &upstream).await;
}

#[tokio::test]
async fn log_format_json_in_the_config_writes_access_lines_as_json() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let mut running = start(
        &session_config(&upstream, &redis, "[log]\nformat = \"json\"\n"),
        &[],
    )
    .await;
    running.wait_ready().await;
    exercise_and_check(&running, &upstream).await;
}

/// The README's quieter filter keeps the access and audit lines, each with its request id.
#[tokio::test]
async fn the_documented_quiet_filter_keeps_access_and_audit_lines_with_their_request_ids() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    // portcullis::app=info for the start line, which tells the test the ports.
    let quiet = "[log]\nformat = \"json\"\nlevel = \"warn,portcullis::app=info,\
                 portcullis::request_id=info,portcullis::access=info,audit=info\"\n";
    let mut running = start(&session_config(&upstream, &redis, quiet), &[]).await;
    running.wait_ready().await;
    exercise_and_check(&running, &upstream).await;
}

#[tokio::test]
async fn the_log_format_flag_overrides_the_config() {
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;

    // The flag's json over the file's text.
    let mut running = start(
        &session_config(&upstream, &redis, "[log]\nformat = \"text\"\n"),
        &["--log-format", "json"],
    )
    .await;
    running.wait_ready().await;
    let resp = client()
        .get(running.url("/open"))
        .header("x-request-id", "flag-json-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let out = running.wait_for_lines(&["flag-json-1"]).await;
    let lines = json_lines(&out);
    assert_eq!(
        line_of(&lines, "portcullis::access", "flag-json-1")["status"],
        401
    );
    drop(running);

    // The flag's text over the file's json: the access line is not JSON.
    let mut running = start(
        &session_config(&upstream, &redis, "[log]\nformat = \"json\"\n"),
        &["--log-format", "text"],
    )
    .await;
    running.wait_ready().await;
    let resp = client()
        .get(running.url("/open"))
        .header("x-request-id", "flag-text-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let out = running.wait_for_lines(&["flag-text-1"]).await;
    let line = out
        .lines()
        .find(|l| l.contains("flag-text-1") && l.contains("portcullis::access"))
        .unwrap_or_else(|| panic!("no access line:\n{out}"));
    assert!(
        serde_json::from_str::<Value>(line).is_err(),
        "a text-mode line parsed as JSON: {line}"
    );
    assert!(line.contains("status=401"), "{line}");
    // Written to a pipe, not a terminal: no colour escape codes.
    assert!(
        !out.contains('\x1b'),
        "escape codes in piped text logs:\n{out:?}"
    );
}

/// rustls warns about what a TLS client did wrong, such as naming the server by an IP address
/// (wrk and other tools do): at its default level every such handshake would write a line, so
/// any client could fill the log. Its messages are capped at `error` unless `log.level` names
/// rustls itself.
#[tokio::test]
async fn what_a_tls_client_does_wrong_does_not_fill_the_log() {
    let ca = observe::TestCa::new();
    let leaf = ca.leaf("localhost", 4001);
    let volume = observe::SecretVolume::new(&leaf.cert_pem, &leaf.key_pem);
    let redis = RedisServer::start();
    let upstream = Upstream::echo().await;
    let handshake_with_ip_name = |addr: std::net::SocketAddr| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string()])
            .args(["-servername", "127.0.0.1", "-brief"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openssl s_client");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(said.contains("CONNECTION ESTABLISHED"), "{said}");
    };

    let config = session_config(&upstream, &redis, &volume.tls_section("1h"));
    let mut running = start(&config, &[]).await;
    running.wait_ready().await;
    // The warning is written while the ClientHello is read, before the server answers it: once
    // a handshake is through, whatever it logged is in the output.
    for _ in 0..3 {
        handshake_with_ip_name(running.public);
    }
    let out = running.output();
    assert!(!out.contains("SNI"), "{out}");

    // Asked for by name, rustls' warnings are written.
    let verbose = format!("[log]\nlevel = \"info,rustls=warn\"\n{config}");
    let mut running = start(&verbose, &[]).await;
    running.wait_ready().await;
    handshake_with_ip_name(running.public);
    let mut waited = 0;
    while !running.output().contains("SNI") {
        assert!(waited < 500, "no rustls warning: {}", running.output());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        waited += 1;
    }
}

/// An upstream that cannot be reached is named in the log with the cause, at WARN, once for a
/// burst of refused requests rather than once per request.
#[tokio::test]
async fn a_failing_upstream_is_warned_of_with_its_cause_once_per_burst() {
    let redis = RedisServer::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        "[redis]\nurl = \"{}\"\n{}",
        redis.url(),
        open_config(&format!("http://{dead}"))
    );
    let running = start(&config, &[]).await;
    let ids = ["dead-upstream-0", "dead-upstream-1", "dead-upstream-2"];
    for id in ids {
        let resp = client()
            .get(running.url("/"))
            .header("x-request-id", id)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502);
    }
    let mut needles = ids.to_vec();
    needles.push("upstream request failed");
    let out = running.wait_for_lines(&needles).await;
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("upstream request failed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(
        warnings[0].to_lowercase().contains("refused"),
        "the cause is named: {}",
        warnings[0]
    );
}
