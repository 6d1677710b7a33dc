//! Test harness: real parts on ephemeral ports. A real `redis-server` per test (never 6379),
//! a real upstream HTTP server that records what reaches it, and portcullis itself bound to
//! port 0 and running in-process.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::app::App;
use portcullis::config::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// ------------------------------------------------------------------------------------------
// Redis
// ------------------------------------------------------------------------------------------

/// A real redis-server on an ephemeral port, private to one test, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        // The port is picked free, then handed to redis; retry if another process took it.
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for redis"),
            };
            if server.spawn() {
                return server;
            }
            server.stop();
        }
        panic!("could not start redis-server");
    }

    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().expect("utf-8 temp dir"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        self.wait_ready()
    }

    /// True once our redis-server answers on the port; false if it exited (the port was taken
    /// after [`free_port`] let it go) or did not answer within 10 s.
    fn wait_ready(&mut self) -> bool {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if let Ok(mut conn) = redis::Client::open(self.url()).and_then(|c| c.get_connection()) {
                // Another test's server may hold the port: only ours, by its process id, counts.
                if let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut conn) {
                    let answering = info
                        .lines()
                        .find_map(|l| l.strip_prefix("process_id:"))
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    if answering == Some(pid) {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends the server a signal (`STOP`, `CONT`, ...) with `kill`.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{sig} {pid} failed");
    }

    /// Stops the server (SIGSTOP: its connections stay open, nothing comes back) and returns
    /// once the kernel says it is stopped, so every reply it sent came before the return.
    pub fn pause(&self) {
        self.signal("STOP");
        let stat = format!("/proc/{}/stat", self.pid());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&stat).expect("/proc stat");
            // `pid (comm) state ...`: the command may hold spaces and parentheses, the state
            // follows the last `)`.
            let (_, rest) = text.rsplit_once(')').expect("stat format");
            if rest.trim_start().starts_with('T') {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    /// A synchronous connection for assertions.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_connection()
            .expect("connect to test redis")
    }

    /// Stops the server (SIGKILL), keeping its port for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub fn restart(&mut self) {
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Calls of one command since start, from INFO commandstats (0 when never called).
    pub fn command_calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn())
            .expect("INFO commandstats");
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Total commands processed by the server except INFO itself.
    pub fn total_calls(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn())
            .expect("INFO commandstats");
        info.lines()
            .filter(|l| l.starts_with("cmdstat_") && !l.starts_with("cmdstat_info:"))
            .filter_map(|l| l.split("calls=").nth(1))
            .filter_map(|rest| rest.split(',').next())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------------------------------
// Upstream
// ------------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

type Handler =
    Arc<dyn Fn(Seen) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>> + Send + Sync>;

/// A real HTTP/1.1 server that records every request and answers with `handler`.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Answers 200 with the request body echoed back.
    pub async fn echo() -> Upstream {
        Upstream::start(|seen| async move { Response::new(Full::new(seen.body)) }).await
    }

    pub async fn start<F, Fut>(handler: F) -> Upstream
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |seen| Box::pin(handler(seen)));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ended = closed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let handler = handler.clone();
                let record = record.clone();
                let ended = ended.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let record = record.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let seen = Seen {
                                method: parts.method,
                                target: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.as_str().to_owned())
                                    .unwrap_or_default(),
                                headers: parts.headers,
                                body,
                            };
                            record.lock().expect("upstream record").push(seen.clone());
                            Ok::<_, Infallible>(handler(seen).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                    ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            seen,
            connections,
            closed,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections that have ended (closed by either side) so far.
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("upstream record").clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("upstream record").len()
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the upstream received no request")
    }

    /// Stops accepting (already open connections may linger until dropped).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream whose every request waits until the test opens the gate, and that tells the test
/// when a request has arrived.
pub async fn gated_upstream() -> (
    Upstream,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    tokio::sync::watch::Sender<bool>,
) {
    let (arrived_tx, arrived_rx) = tokio::sync::mpsc::unbounded_channel();
    let (gate_tx, gate_rx) = tokio::sync::watch::channel(false);
    let upstream = Upstream::start(move |_seen| {
        let arrived = arrived_tx.clone();
        let mut gate = gate_rx.clone();
        async move {
            let _ = arrived.send(());
            let _ = gate.wait_for(|open| *open).await;
            reply(http::StatusCode::OK, "finished")
        }
    })
    .await;
    (upstream, arrived_rx, gate_tx)
}

/// Waits (at most 5 s) until a request reaches a [`gated_upstream`], which then holds it.
pub async fn reached_upstream(arrived: &mut tokio::sync::mpsc::UnboundedReceiver<()>) {
    tokio::time::timeout(std::time::Duration::from_secs(5), arrived.recv())
        .await
        .expect("the request reached the upstream within 5 s")
        .expect("the upstream runs");
}

/// A response with a status and body, for upstream handlers.
pub fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

// ------------------------------------------------------------------------------------------
// portcullis
// ------------------------------------------------------------------------------------------

/// portcullis running in-process on ephemeral ports.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Parses a test's TOML as portcullis would, with [`TEST_SECRET`] as `JWT_SECRET` (relative
/// paths resolve against the current dir).
pub fn test_config(toml: &str) -> Config {
    let env = [("JWT_SECRET".to_string(), TEST_SECRET.to_string())];
    Config::from_toml(toml, Path::new("."), &env)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{toml}"))
}

impl Proxy {
    /// Starts portcullis with the given TOML (relative paths resolve against the current dir).
    pub async fn start(toml: &str) -> Proxy {
        let config = test_config(toml);
        Proxy::start_config(config).await
    }

    pub async fn start_config(config: Config) -> Proxy {
        let public = TcpListener::bind("127.0.0.1:0").await.expect("bind public");
        Proxy::start_on(config, public).await
    }

    /// Starts portcullis serving its public side on `public`, bound by the test.
    pub async fn start_on(config: Config, public: TcpListener) -> Proxy {
        portcullis::tls::install_crypto_provider();
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = public.local_addr().expect("public addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let app = App::build(config).expect("portcullis builds");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            app.run(public, admin, shutdown)
                .await
                .expect("portcullis runs");
        });
        Proxy {
            addr,
            admin: admin_addr,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The admin port's /metrics text.
    pub async fn metrics_text(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .expect("/metrics body")
    }

    /// Starts a graceful shutdown; the returned handle resolves when portcullis has stopped.
    pub fn shutdown(&mut self) -> JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("proxy already shut down")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The HMAC secret every test proxy verifies tokens with (given as JWT_SECRET).
pub const TEST_SECRET: &str = "portcullis-test-secret-0123456789abcdef";

/// A route table entry that forwards everything without authentication.
pub const OPEN_ROUTES: &str = "[[routes]]\npath_prefix = \"/\"\nauth = \"none\"\n";

/// Minimal config for a proxy in front of `upstream` with no authentication anywhere.
pub fn open_config(upstream: &str) -> String {
    format!("[upstream]\nurl = \"{upstream}\"\n{OPEN_ROUTES}")
}

/// A plain HTTP client (HTTP/1.1, no pooling surprises).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// The parsed JSON envelope of a response.
pub async fn json(resp: reqwest::Response) -> serde_json::Value {
    let text = resp.text().await.expect("response body");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// Asserts a response is the JSON error envelope with `status` and `code`.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body = json(resp).await;
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    body
}

// ------------------------------------------------------------------------------------------
// Tokens and sessions
// ------------------------------------------------------------------------------------------

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Base64url without padding (JWT segments).
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Signs `claims` with `alg` and an HMAC `secret`.
pub fn sign_hmac(
    alg: jsonwebtoken::Algorithm,
    secret: &[u8],
    claims: &serde_json::Value,
) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("sign token")
}

/// Signs `claims` with HS256 and [`TEST_SECRET`].
pub fn sign(claims: &serde_json::Value) -> String {
    sign_hmac(
        jsonwebtoken::Algorithm::HS256,
        TEST_SECRET.as_bytes(),
        claims,
    )
}

/// A valid HS256 token for `sub` (one hour), with `sid` when given.
pub fn token(sub: &str, sid: Option<&str>) -> String {
    let mut claims = serde_json::json!({
        "sub": sub,
        "iat": now_secs(),
        "exp": now_secs() + 3600,
    });
    if let Some(sid) = sid {
        claims["sid"] = serde_json::Value::from(sid);
    }
    sign(&claims)
}

/// A portcullis config in front of `upstream` with sessions in `redis`; `extra` is appended
/// (further sections such as `[session]`, `[jwt]` or `[[routes]]`, but not `[redis]`).
pub fn session_config(upstream: &Upstream, redis: &RedisServer, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\n\n{extra}\n",
        upstream.url(),
        redis.url()
    )
}

/// Opens a session for the token's subject through the session API (default prefix) and
/// returns its id.
pub async fn create_session(proxy: &Proxy, token: &str) -> String {
    open_session(proxy, token, None).await
}

/// As [`create_session`], with a create body (`{"metadata": ...}`) when given.
pub async fn open_session(proxy: &Proxy, token: &str, body: Option<serde_json::Value>) -> String {
    let mut request = client()
        .post(proxy.url("/api/v1/sessions/create"))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let resp = request.send().await.expect("create session");
    assert_eq!(resp.status().as_u16(), 201, "session create");
    let body = json(resp).await;
    body["data"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no sessionId in {body}"))
        .to_string()
}

/// The Redis key holding a user's sessions under the default key prefix.
pub fn sessions_key(user: &str) -> String {
    format!("aeturnis:sessions:{{{user}}}")
}

/// Redis' clock in Unix milliseconds (the clock session expiry is decided by).
pub fn redis_now_ms(conn: &mut redis::Connection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query(conn).expect("TIME");
    secs * 1000 + micros / 1000
}

/// Every session stored for a user, expired or not, in storage order.
pub fn stored_sessions(
    conn: &mut redis::Connection,
    user: &str,
) -> Vec<portcullis::session::record::Record> {
    use portcullis::session::record;
    let value: Option<Vec<u8>> = redis::cmd("GET")
        .arg(sessions_key(user))
        .query(conn)
        .expect("GET");
    let Some(value) = value else {
        return Vec::new();
    };
    record::bodies(&value)
        .expect("stored value in the session layout")
        .into_iter()
        .map(|body| record::decode(body).expect("session record"))
        .collect()
}

/// The ids of every session stored for a user, expired or not.
pub fn stored_ids(conn: &mut redis::Connection, user: &str) -> std::collections::BTreeSet<String> {
    stored_sessions(conn, user)
        .iter()
        .map(|r| r.session_id.to_string())
        .collect()
}

/// The stored session `id` of `user`.
pub fn stored_session(
    conn: &mut redis::Connection,
    user: &str,
    id: &str,
) -> Option<portcullis::session::record::Record> {
    stored_sessions(conn, user)
        .into_iter()
        .find(|r| r.session_id.to_string() == id)
}

/// Milliseconds until the stored session `id` of `user` expires by Redis' clock (negative once
/// expired); `None` when it is not stored.
pub fn session_ttl_ms(conn: &mut redis::Connection, user: &str, id: &str) -> Option<i64> {
    let now = redis_now_ms(conn);
    let record = stored_session(conn, user, id)?;
    Some(i64::try_from(record.expires_ms).expect("expiry") - now)
}

/// Makes session `id` of `user` expire `ms` from now by Redis' clock (in the past when
/// negative), as time passing would, and the key with the user's longest-lived session, as
/// portcullis keeps it.
pub fn expire_session_in(conn: &mut redis::Connection, user: &str, id: &str, ms: i64) {
    let now = redis_now_ms(conn);
    rewrite_sessions(conn, user, |records| {
        let target = records
            .iter_mut()
            .find(|r| r.session_id.to_string() == id)
            .unwrap_or_else(|| panic!("session {id} of {user} is not stored"));
        target.expires_ms = u64::try_from(now + ms).expect("a time after 1970");
    });
}

/// Rewrites the stored sessions of `user` through `change` (records in their stored order),
/// the key expiring with the longest-lived one, as portcullis keeps it.
pub fn rewrite_sessions(
    conn: &mut redis::Connection,
    user: &str,
    change: impl FnOnce(&mut Vec<portcullis::session::record::Record>),
) {
    use portcullis::session::record;
    let now = redis_now_ms(conn);
    let mut records = stored_sessions(conn, user);
    change(&mut records);
    let mut value = vec![record::VERSION];
    for r in &records {
        let body = record::body(r).expect("encodable");
        value.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        value.extend_from_slice(&body);
    }
    let longest = records.iter().map(|r| r.expires_ms).max().unwrap_or(0);
    let key = sessions_key(user);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(value)
        .arg("KEEPTTL")
        .query(conn)
        .expect("SET");
    if i64::try_from(longest).expect("expiry") > now {
        let _: () = redis::cmd("PEXPIREAT")
            .arg(&key)
            .arg(longest)
            .query(conn)
            .expect("PEXPIREAT");
    }
}

/// PTTL of a key in milliseconds (-2 missing, -1 persistent).
pub fn pttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(conn).expect("PTTL")
}

/// Calls per command from INFO commandstats, read on a connection the caller holds (so that
/// opening a connection adds no commands between two readings). INFO itself is left out.
pub fn commandstats(conn: &mut redis::Connection) -> std::collections::BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(":calls=")?;
            let n = rest.split(',').next()?.parse().ok()?;
            Some((name.to_string(), n))
        })
        .filter(|(name, _)| name != "info")
        .collect()
}

/// Sends one raw HTTP/1.1 request (`target` exactly as given) and returns the status and body.
pub async fn raw_request(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to proxy");
    let mut head = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send request");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("response within 10s")
        .expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

// ------------------------------------------------------------------------------------------
// Helpers for the integration tests of the proxy core (tests/proxy.rs, websocket.rs, tls.rs,
// lifecycle.rs).
// ------------------------------------------------------------------------------------------

/// A port that was free a moment ago, for configs of the real binary (which binds itself).
pub fn pick_free_port() -> u16 {
    free_port()
}

/// A loopback address on which nothing listens (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// [`open_config`] with `extra` TOML merged into it, table by table: `extra` may add keys to
/// `[upstream]` or add sections such as `[server]` without repeating a table header.
pub fn config_with(upstream: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut base: toml::Table = open_config(upstream).parse().expect("open_config is TOML");
    let extra: toml::Table = extra
        .parse()
        .unwrap_or_else(|e| panic!("extra config is not TOML: {e}\n{extra}"));
    merge(&mut base, extra);
    toml::to_string(&base).expect("serialise merged config")
}

/// Polls `check` every 10 ms until it is true; panics naming `what` after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream's side of a WebSocket upgrade: reads the request head a byte at a time (so that
/// what the client sends right behind it stays unread) and answers a bare 101. False when the
/// connection ended first.
pub async fn accept_upgrade<S>(stream: &mut S) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return false;
        }
        head.push(byte[0]);
    }
    let switched =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    stream.write_all(switched).await.is_ok()
}

/// Reads from `stream` until a whole request head (up to its blank line) has arrived; false if
/// the peer closed first. Bytes past the head in the same read are consumed too.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when it came chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the JSON error envelope with `status` and `code`.
    pub fn assert_error(&self, status: u16, code: &str) -> serde_json::Value {
        assert_eq!(self.status, status, "status of {self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)));
        assert_eq!(body["success"], false, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        body
    }
}

/// Writes `request` to a new connection exactly as given (no normalisation of any kind) and
/// reads one response. The response ends at its Content-Length, at the end of its chunked body,
/// or when the server closes; give up after 10 s.
pub async fn send_raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect for a raw request");
        stream.write_all(request).await.expect("write raw request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(response) = parse_raw_response(&buf) {
                return response;
            }
            let n = match stream.read(&mut chunk).await {
                Ok(n) => n,
                Err(e) => panic!(
                    "raw read failed after {} bytes: {e}: {:?}",
                    buf.len(),
                    String::from_utf8_lossy(&buf)
                ),
            };
            if n == 0 {
                return parse_raw_response_at_eof(&buf).unwrap_or_else(|| {
                    panic!(
                        "connection closed before a complete response: {:?}",
                        String::from_utf8_lossy(&buf)
                    )
                });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no response to the raw request within 10 s")
}

/// Reads one response off a connection the test keeps using; None if the connection closes
/// before any byte of one. Bytes after the response (a pipelined next one) stay in `leftover`.
pub async fn read_raw_response(
    stream: &mut tokio::net::TcpStream,
    leftover: &mut Vec<u8>,
) -> Option<RawResponse> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(response) = parse_raw_response(leftover) {
                let used = raw_response_len(leftover).expect("a parsed response has a length");
                leftover.drain(..used);
                return Some(response);
            }
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                assert!(
                    leftover.is_empty(),
                    "connection closed inside a response: {:?}",
                    String::from_utf8_lossy(leftover)
                );
                return None;
            }
            leftover.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no response within 10 s")
}

/// The length of the content-length-framed response at the start of `buf`.
fn raw_response_len(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let (_, headers, _) = split_head(buf)?;
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())?;
    Some(head_end + len)
}

/// Header lines as (lower-cased name, value), in order.
type RawHeaders = Vec<(String, String)>;

fn split_head(buf: &[u8]) -> Option<(u16, RawHeaders, &[u8])> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, &buf[end + 4..]))
}

fn parse_raw_response(buf: &[u8]) -> Option<RawResponse> {
    let (status, headers, rest) = split_head(buf)?;
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if let Some(len) = get("content-length") {
        let len: usize = len.parse().expect("numeric content-length");
        return (rest.len() >= len).then(|| RawResponse {
            status,
            headers: headers.clone(),
            body: rest[..len].to_vec(),
        });
    }
    if get("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        let body = dechunk(rest)?;
        return Some(RawResponse {
            status,
            headers,
            body,
        });
    }
    None
}

fn parse_raw_response_at_eof(buf: &[u8]) -> Option<RawResponse> {
    parse_raw_response(buf).or_else(|| {
        let (status, headers, rest) = split_head(buf)?;
        Some(RawResponse {
            status,
            headers,
            body: rest.to_vec(),
        })
    })
}

/// A complete chunked body, or None while more is needed.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return rest.windows(2).any(|w| w == b"\r\n").then_some(body);
        }
        if rest.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// An upstream that answers every connection's first request with the fixed bytes `response`
/// and then closes, so tests control every byte of what the proxy gets back.
pub struct RawUpstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start(response: &'static [u8]) -> RawUpstream {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().expect("raw upstream addr");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    // Read the request head (the tests send no bodies here), then answer.
                    if !read_head(&mut stream).await {
                        return;
                    }
                    let _ = stream.write_all(response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawUpstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// As [`Proxy::start`], also returning the proxy's count of live Upgrade tunnels.
    pub async fn start_counting_tunnels(
        toml: &str,
    ) -> (Proxy, Arc<portcullis::forward::TunnelCount>) {
        let config = test_config(toml);
        portcullis::tls::install_crypto_provider();
        let public = TcpListener::bind("127.0.0.1:0").await.expect("bind public");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = public.local_addr().expect("public addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let app = App::build(config).expect("portcullis builds");
        let tunnels = app.upstream.tunnels();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            app.run(public, admin, shutdown)
                .await
                .expect("portcullis runs");
        });
        let proxy = Proxy {
            addr,
            admin: admin_addr,
            stop: Some(stop_tx),
            task: Some(task),
        };
        (proxy, tunnels)
    }
}

/// A MONITOR connection to a test redis-server: every command the server executes, one line
/// each, in order. Commands run inside a Lua script are marked `[<db> lua]`; commands sent by a
/// client carry the client's address.
pub struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    _stream: std::net::TcpStream,
}

impl Monitor {
    /// Starts monitoring; returns once the server has acknowledged MONITOR.
    pub fn start(redis: &RedisServer) -> Monitor {
        use std::io::{BufRead, BufReader, Write};
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", redis.port)).expect("connect for MONITOR");
        stream
            .write_all(b"*1\r\n$7\r\nMONITOR\r\n")
            .expect("send MONITOR");
        let mut reader = BufReader::new(stream.try_clone().expect("clone monitor stream"));
        let mut ok = String::new();
        reader.read_line(&mut ok).expect("MONITOR reply");
        assert_eq!(ok.trim_end(), "+OK", "MONITOR refused");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                let line = line.strip_prefix('+').unwrap_or(&line).to_string();
                sink.lock().expect("monitor lines").push(line);
            }
        });
        Monitor {
            lines,
            _stream: stream,
        }
    }

    /// Sends `ECHO <marker>` from a fresh connection and waits (bounded) until the monitor has
    /// seen it: every command the server ran before that is then in [`Monitor::lines`].
    pub fn sync(&self, redis: &RedisServer, marker: &str) {
        let _: String = redis::cmd("ECHO")
            .arg(marker)
            .query(&mut redis.conn())
            .expect("ECHO marker");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.lines().iter().any(|l| is_marker(l, marker)) {
            assert!(Instant::now() < deadline, "MONITOR never showed {marker}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Everything seen so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("monitor lines").clone()
    }

    /// Lines seen between the two markers passed to [`Monitor::sync`].
    pub fn between(&self, from: &str, to: &str) -> Vec<String> {
        let lines = self.lines();
        let start = lines
            .iter()
            .position(|l| is_marker(l, from))
            .expect("first marker");
        let end = lines
            .iter()
            .position(|l| is_marker(l, to))
            .expect("second marker");
        lines[start + 1..end].to_vec()
    }
}

/// True for the MONITOR line of `ECHO <marker>` (clients may spell commands in any case).
fn is_marker(line: &str, marker: &str) -> bool {
    monitor_command(line) == "echo" && line.ends_with(&format!(" \"{marker}\""))
}

/// True for a MONITOR line of a command run inside a Lua script.
pub fn monitor_line_is_lua(line: &str) -> bool {
    line.split_once('[')
        .and_then(|(_, rest)| rest.split_once(']'))
        .is_some_and(|(source, _)| source.ends_with(" lua"))
}

/// The command name of a MONITOR line, lowercase.
pub fn monitor_command(line: &str) -> String {
    line.split_once("] \"")
        .and_then(|(_, rest)| rest.split('"').next())
        .unwrap_or("")
        .to_ascii_lowercase()
}

// ------------------------------------------------------------------------------------------
// certificates

/// A test CA and a certificate it signed for one name, all made in the test.
pub struct TestCerts {
    pub ca_pem: String,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    pub leaf_pem: String,
    pub leaf_der: rustls::pki_types::CertificateDer<'static>,
    pub key_pem: String,
    /// The leaf's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

/// A CA named `ca_name` and a certificate it signed for `name`, a DNS name or an IP address.
pub fn test_certs(ca_name: &str, name: &str) -> TestCerts {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
        .expect("CA certificate");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec![name.to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf certificate");
    TestCerts {
        ca_pem: ca.pem(),
        ca_der: rustls::pki_types::CertificateDer::from(ca.der().to_vec()),
        leaf_pem: leaf.pem(),
        leaf_der: leaf.der().clone(),
        key_pem: leaf_key.serialize_pem(),
        key_der: leaf_key.serialize_der(),
    }
}
