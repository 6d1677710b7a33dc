//! HTTP/1.1 connection lifecycle: keep-alive across resting (hyper's state is dropped between
//! requests and rebuilt on the next byte), pipelining, request bodies, and the limits that close
//! a resting connection.

mod observe;
mod support;

use std::time::{Duration, Instant};

use observe::scrape_until;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// One raw HTTP/1.1 connection to the proxy, and the bytes read past the last response.
struct RawConn {
    stream: TcpStream,
    leftover: Vec<u8>,
}

impl RawConn {
    async fn open(proxy: &Proxy) -> RawConn {
        RawConn {
            stream: TcpStream::connect(proxy.addr).await.expect("connect"),
            leftover: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.expect("send");
    }

    /// The next response, or None if the connection closed before one.
    async fn response(&mut self) -> Option<RawResponse> {
        read_raw_response(&mut self.stream, &mut self.leftover).await
    }

    /// GET `path` on this connection and expect a 200.
    async fn get_ok(&mut self, path: &str) {
        self.send(get(path)).await;
        let response = self.response().await.expect("a response");
        assert_eq!(response.status, 200, "GET {path}");
    }
}

/// Waits until the proxy counts `n` connections at rest (waiting for their client's next
/// byte with no parser).
async fn wait_resting(proxy: &Proxy, n: f64) {
    scrape_until(proxy.admin, &format!("{n} resting connection(s)"), |e| {
        e.get("portcullis_resting_connections", &[]) == Some(n)
    })
    .await;
}

#[tokio::test]
async fn one_connection_carries_many_requests_across_rests() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = RawConn::open(&proxy).await;

    // Between every two requests the connection rests (after 20 ms quiet, hyper is dropped at
    // the boundary and a new one reads the next request); the client sees one ordinary
    // keep-alive connection.
    for i in 0..5 {
        if i > 0 {
            // A request wakes the connection: a count of one is this rest, not the last.
            wait_resting(&proxy, 1.0).await;
        }
        conn.get_ok(&format!("/n/{i}")).await;
    }
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/n/0", "/n/1", "/n/2", "/n/3", "/n/4"]);
}

#[tokio::test]
async fn a_connection_quiet_for_seconds_still_serves_the_next_request() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = RawConn::open(&proxy).await;
    conn.get_ok("/first").await;
    // Long past the rest delay and the one-second fallback: resting is not a close.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    conn.get_ok("/second").await;
    assert_eq!(upstream.last().target, "/second");
}

#[tokio::test]
async fn pipelined_requests_are_all_answered_in_order() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = RawConn::open(&proxy).await;

    // Three requests in one write: the bytes of the later ones are already read when the first
    // one is done, and must be handed on, not lost, if the connection rests in between.
    let batch = format!(
        "{}POST /p/2 HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello{}",
        get("/p/1"),
        get("/p/3")
    );
    conn.send(batch).await;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let response = conn
            .response()
            .await
            .expect("every pipelined request is answered");
        assert_eq!(response.status, 200);
        bodies.push(String::from_utf8(response.body).unwrap());
    }
    assert_eq!(bodies, ["", "hello", ""]);
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/p/1", "/p/2", "/p/3"]);
}

/// An upstream that answers every request with its body, telling the test each time the first
/// five bytes of a body have arrived (the rest may still be on the way).
async fn body_echo_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel();
    let targets = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = targets.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let started = started_tx.clone();
            let seen = seen.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let started = started.clone();
                    seen.lock().unwrap().push(req.uri().path().to_owned());
                    async move {
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        let mut told = false;
                        while let Some(frame) = body.frame().await {
                            if let Ok(data) = frame?.into_data() {
                                got.extend_from_slice(&data);
                            }
                            if !told && got.len() >= 5 {
                                told = true;
                                let _ = started.send(());
                            }
                        }
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(got),
                        )))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, started_rx, targets)
}

#[tokio::test]
async fn a_request_body_sent_in_pieces_then_another_request() {
    let (upstream, mut body_started, targets) = body_echo_upstream().await;
    let proxy = Proxy::start(&open_config(&format!("http://{upstream}"))).await;
    let mut conn = RawConn::open(&proxy).await;

    conn.send(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\nfirst")
        .await;
    // The rest of the body comes only once the first piece has gone through to the upstream;
    // nothing may treat the pause as a message boundary.
    tokio::time::timeout(Duration::from_secs(5), body_started.recv())
        .await
        .expect("the first piece of the body reached the upstream within 5 s")
        .expect("the upstream runs");
    conn.send(b"-half").await;
    let response = conn.response().await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"first-half");

    conn.send(get("/after")).await;
    let response = conn.response().await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(*targets.lock().unwrap(), ["/upload", "/after"]);
}

#[tokio::test]
async fn an_unread_request_body_never_turns_into_a_request() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(
        &upstream.url(),
        "[server]\nmax_body_bytes = 1024\n",
    ))
    .await;
    let mut conn = RawConn::open(&proxy).await;

    // Refused on its declared length, before its body is read. The body's bytes look like a
    // request of their own: they must be drained or the connection closed, never parsed.
    let smuggled = get("/smuggled");
    let body = format!("{smuggled}{}", "x".repeat(2048 - smuggled.len()));
    let request = format!(
        "POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.send(request).await;
    let refused = conn.response().await.unwrap();
    assert_eq!(refused.status, 413);

    // Either the connection serves the next request properly or it was closed.
    if conn.stream.write_all(get("/next").as_bytes()).await.is_ok() {
        if let Some(response) = conn.response().await {
            assert_eq!(response.status, 200);
            assert_eq!(upstream.last().target, "/next");
        }
    }
    assert!(
        upstream.seen().iter().all(|s| s.target != "/smuggled"),
        "body bytes were forwarded as a request"
    );
}

#[tokio::test]
async fn a_resting_connection_closes_after_header_read_timeout() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&config_with(
        &upstream.url(),
        "[server]\nheader_read_timeout = \"400ms\"\n",
    ))
    .await;
    let mut conn = RawConn::open(&proxy).await;
    conn.get_ok("/once").await;
    let answered = Instant::now();
    assert!(
        conn.response().await.is_none(),
        "the idle connection was closed"
    );
    let waited = answered.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed after {waited:?}, before the keep-alive limit"
    );
}

#[tokio::test]
async fn shutdown_closes_resting_connections_at_once() {
    let upstream = Upstream::echo().await;
    let mut proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = RawConn::open(&proxy).await;
    conn.get_ok("/idle").await;

    // Nothing in flight: shutdown need not wait out shutdown_grace (30 s) for this one.
    let stopped = proxy.shutdown();
    assert!(conn.response().await.is_none());
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("shutdown did not wait for the idle connection")
        .expect("portcullis stopped cleanly");
}

#[tokio::test]
async fn a_request_head_arriving_in_pieces_at_a_resting_connection_is_reassembled() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = RawConn::open(&proxy).await;
    conn.get_ok("/before").await;
    wait_resting(&proxy, 1.0).await;

    // Half a head wakes the resting connection: the hyper that takes over reads those bytes
    // (from then on a half-read head keeps the connection busy, and it does not rest), then
    // waits for the rest, which comes only once the connection is no longer at rest.
    conn.send(b"GET /spl").await;
    wait_resting(&proxy, 0.0).await;
    conn.send(b"it HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let response = conn.response().await.unwrap();
    assert_eq!(response.status, 200);
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/before", "/split"]);
}

#[tokio::test]
async fn connection_close_is_honoured_after_the_response() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = RawConn::open(&proxy).await;
    conn.send(b"GET /last HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await;
    let response = conn.response().await.unwrap();
    assert_eq!(response.status, 200);
    // The client asked to close: no resting, the connection ends after its one response.
    assert!(conn.response().await.is_none());
}

/// Sends `start`, then one more header line every 100 ms, as a slow-loris client does: the
/// head never completes. The connection must be closed `header_read_timeout` (500 ms) after
/// the head's first byte, with nothing forwarded; returns how long that took.
async fn trickled_head_is_cut_off(conn: &mut RawConn, start: &[u8]) -> Duration {
    let first_byte = Instant::now();
    conn.send(start).await;
    let closed = loop {
        tokio::select! {
            response = conn.response() => break response,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                // A write may fail once the proxy has closed; the read then reports it.
                let _ = conn.stream.write_all(b"X-Pad: a\r\n").await;
            }
        }
    };
    let took = first_byte.elapsed();
    assert!(
        closed.is_none(),
        "the unfinished head got a response: {closed:?}"
    );
    assert!(
        took >= Duration::from_millis(450),
        "cut off after {took:?}, before header_read_timeout"
    );
    assert!(
        took < Duration::from_secs(3),
        "a head trickled in for {took:?}"
    );
    took
}

fn slow_head_config(upstream: &Upstream) -> String {
    config_with(
        &upstream.url(),
        "[server]\nheader_read_timeout = \"500ms\"\n",
    )
}

#[tokio::test]
async fn a_request_head_trickling_in_is_cut_off_at_header_read_timeout() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&slow_head_config(&upstream)).await;
    let mut conn = RawConn::open(&proxy).await;
    trickled_head_is_cut_off(&mut conn, b"GET /slow HTTP/1.1\r\nHost: test\r\n").await;
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn a_second_head_trickling_in_is_cut_off_too() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&slow_head_config(&upstream)).await;
    let mut conn = RawConn::open(&proxy).await;
    conn.get_ok("/first").await;
    trickled_head_is_cut_off(&mut conn, b"GET /slow HTTP/1.1\r\nHost: test\r\n").await;
    assert!(upstream.seen().iter().all(|s| s.target != "/slow"));
}

#[tokio::test]
async fn a_pipelined_head_trickling_in_is_cut_off_too() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&slow_head_config(&upstream)).await;
    let mut conn = RawConn::open(&proxy).await;
    // The first request and the start of the second arrive in one read.
    let start = format!("{}GET /slow HTTP/1.1\r\nHost: test\r\n", get("/first"));
    let first_byte = Instant::now();
    conn.send(start.as_bytes()).await;
    let response = conn
        .response()
        .await
        .expect("the first request is answered");
    assert_eq!(response.status, 200);
    let before = first_byte.elapsed();
    let took = trickled_head_is_cut_off(&mut conn, b"").await;
    assert!(before + took < Duration::from_secs(3));
    assert!(upstream.seen().iter().all(|s| s.target != "/slow"));
}

#[tokio::test]
async fn a_head_that_stops_halfway_is_cut_off() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&slow_head_config(&upstream)).await;
    let mut conn = RawConn::open(&proxy).await;
    let first_byte = Instant::now();
    conn.send(b"GET /half HTTP/1.1\r\nHo").await;
    assert!(conn.response().await.is_none());
    let took = first_byte.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert_eq!(upstream.count(), 0);
}

/// One shutdown with a request in flight: the response is answered, the connection then
/// closes and shutdown completes. Returns whether the response said `connection: close`.
async fn shutdown_with_a_request_in_flight() -> bool {
    let (upstream, mut arrived, gate) = gated_upstream().await;
    // One worker: both connections' tasks run on one thread.
    let mut proxy = Proxy::start(&config_with(&upstream.url(), "[server]\nworkers = 1\n")).await;
    let mut idle = RawConn::open(&proxy).await;
    let mut busy = RawConn::open(&proxy).await;
    busy.send(get("/slow")).await;
    reached_upstream(&mut arrived).await;

    let stopped = proxy.shutdown();
    // The idle connection closes when its task sees the stop: by then the stop signal has
    // been sent, and has woken the busy one's task too.
    assert!(idle.response().await.is_none());
    gate.send(true).unwrap();
    let response = busy
        .response()
        .await
        .expect("the in-flight request is answered");
    assert_eq!(response.status, 200);
    let said_close = response.header("connection") == Some("close");
    // Either way the connection ends after its response.
    assert!(busy.response().await.is_none());
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("shutdown completed within 5 s")
        .expect("portcullis stopped cleanly");
    said_close
}

#[tokio::test]
async fn shutdown_ends_a_busy_connection_after_its_in_flight_response() {
    // hyper is told while the request is in flight, so the response says the connection ends,
    // even when the upstream's answer wakes the connection before the stop signal does.
    assert!(
        shutdown_with_a_request_in_flight().await,
        "the in-flight response did not say `connection: close`"
    );
}

// ------------------------------------------------------------------------------------------
// Idle connections that do not finish
// ------------------------------------------------------------------------------------------

/// An upstream that answers every request with a `len`-byte body written in one go, behind a
/// proxy whose `idle_timeout` is 1 s.
async fn large_response_behind_proxy(len: usize) -> (RawUpstream, Proxy) {
    let mut response = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    response.resize(response.len() + len, b'x');
    let upstream = RawUpstream::start(Box::leak(response.into_boxed_slice())).await;
    let proxy = Proxy::start(&config_with(
        &upstream.url(),
        "[server]\nidle_timeout = \"1s\"\n",
    ))
    .await;
    (upstream, proxy)
}

/// A connection that closes after its response (`Connection: close`) lingers: the client's
/// bytes it has no use for (a next request, the rest of a body) are read and dropped while the
/// response drains. Closed with them unread, the socket would be reset, and the kernel would
/// throw away what of the response it had not sent yet.
#[tokio::test]
async fn a_connection_closed_after_its_response_lets_the_response_drain() {
    const BODY: usize = 4 << 20;
    let (_upstream, proxy) = large_response_behind_proxy(BODY).await;
    let mut conn = RawConn::open(&proxy).await;
    conn.send("GET /big HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await;
    conn.send(vec![b'x'; 64 * 1024]).await;
    // Slow to start reading (well within idle_timeout): the proxy has written the whole
    // response to its socket and closed before the client takes most of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.stream.read_to_end(&mut all))
        .await
        .expect("the connection closed");
    assert!(read.is_ok(), "after {} bytes: {read:?}", all.len());
    let head_end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    assert_eq!(all.len() - head_end, BODY, "the whole body arrived");
}

/// An HTTP/1.0 client gets a response without a length, which ends where the connection does.
/// When the upstream's answer breaks off, or breaks its framing, the connection is reset rather
/// than closed, so that the client cannot take the part it got for the whole response.
#[tokio::test]
async fn a_response_that_breaks_off_resets_the_connection() {
    for answer in [
        // Chunked, cut off after its first chunk.
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"[..],
        // A chunk-size line ending in a bare LF.
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"[..],
    ] {
        let upstream = RawUpstream::start(answer).await;
        let proxy = Proxy::start(&open_config(&upstream.url())).await;
        let mut conn = RawConn::open(&proxy).await;
        conn.send("GET /cut HTTP/1.0\r\nHost: test\r\n\r\n").await;
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), conn.stream.read_to_end(&mut got))
            .await
            .expect("the connection ended");
        let got = String::from_utf8_lossy(&got);
        // What of the response arrives before the reset depends on timing (a reset can
        // overtake it); that it ends in one does not.
        assert!(got.is_empty() || got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(
            end.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the broken response ended like a whole one: {end:?}, {got:?}"
        );
    }
}

/// A client that stops reading a large response holds its connection, and an upstream one,
/// only until idle_timeout plus the few seconds an idle close may take.
#[tokio::test]
async fn a_client_that_stops_reading_its_response_is_dropped() {
    let (_upstream, proxy) = large_response_behind_proxy(32 << 20).await;
    let mut stalled = RawConn::open(&proxy).await;
    stalled.send(get("/big")).await;
    let open = |n: f64| {
        move |e: &observe::Exposition| e.get("portcullis_open_connections", &[]) == Some(n)
    };
    scrape_until(proxy.admin, "the stalled connection open", open(1.0)).await;
    // Never read: the response stalls once the socket buffers are full. Dropped within
    // idle_timeout (1 s) and the 5 s an idle close may take, not held for ever.
    scrape_until(proxy.admin, "the stalled connection dropped", open(0.0)).await;
    drop(stalled);
}

/// Client sockets carry TCP keepalive, so that a client that vanished without closing (a phone
/// that lost its network, holding a WebSocket) is noticed. `ss` shows the proxy's side of the
/// connection with its keepalive timer running, a minute at first.
#[tokio::test]
async fn client_sockets_carry_tcp_keepalive() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut conn = RawConn::open(&proxy).await;
    conn.get_ok("/").await;
    let filter = format!("( sport = :{} )", proxy.addr.port());
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &filter])
        .output()
        .expect("run ss (iproute2)");
    let listed = String::from_utf8_lossy(&out.stdout);
    // `timer:(keepalive,59sec,0)`: the kernel's own default would be two hours.
    let first_probe = listed
        .split("timer:(keepalive,")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no keepalive timer: {listed}"));
    assert!(
        first_probe.ends_with("sec") || first_probe == "1min",
        "a minute or less to the first probe, not {first_probe}: {listed}"
    );
}

/// The raw bytes of an HTTP/2 client that never makes a request.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const H2_PING: &[u8] = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00\x01\x02\x03\x04\x05\x06\x07\x08";
/// A HEADERS frame announcing a 200-byte block on stream 1, without the block.
const H2_HEADERS_START: &[u8] = b"\x00\x00\xc8\x01\x04\x00\x00\x00\x01";

/// Sends `first`, then `each` every 200 ms, reading whatever comes back, until the server
/// closes the connection; returns how long that took (panics past 8 s).
async fn kept_busy_without_a_request(proxy: &Proxy, first: &[u8], each: &'static [u8]) -> Duration {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    write.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
    write.write_all(first).await.unwrap();
    let writer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write.write_all(each).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    writer.abort();
    assert!(
        closed.is_ok(),
        "the connection was held for 8 s without a request"
    );
    started.elapsed()
}

/// A request body the body type of the HTTP/2 tests: boxed, so that one connection can send
/// different kinds.
type H2Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

/// An HTTP/2 connection to the proxy (prior knowledge), its driver spawned.
async fn h2_connection(
    proxy: &Proxy,
) -> (
    hyper::client::conn::http2::SendRequest<H2Body>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (h2, tokio::spawn(conn))
}

/// A request body the test feeds a piece at a time; it ends when the sender is dropped.
fn fed_body() -> (tokio::sync::mpsc::Sender<bytes::Bytes>, H2Body) {
    use http_body_util::BodyExt;
    let (part, mut parts) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        parts.poll_recv(cx).map(|data| {
            data.map(|data| Ok::<_, std::convert::Infallible>(http_body::Frame::data(data)))
        })
    }));
    (part, body.boxed())
}

/// An empty request body of [`H2Body`]'s type.
fn no_body() -> H2Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::new().boxed()
}

fn h2_idle_config(upstream: &Upstream) -> String {
    config_with(
        &upstream.url(),
        "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\n",
    )
}

#[tokio::test]
async fn http2_pings_do_not_keep_a_connection_without_requests() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&h2_idle_config(&upstream)).await;
    let took = kept_busy_without_a_request(&proxy, H2_PING, H2_PING).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

#[tokio::test]
async fn an_http2_request_head_trickling_in_is_cut_off() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&h2_idle_config(&upstream)).await;
    kept_busy_without_a_request(&proxy, H2_HEADERS_START, b"\x00").await;
    assert_eq!(upstream.count(), 0);
}

#[tokio::test]
async fn an_http2_connection_in_use_is_kept_past_the_first_request_limit() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&h2_idle_config(&upstream)).await;
    let (mut h2, _conn) = h2_connection(&proxy).await;
    // Requests 250 ms apart for 3 s: past header_read_timeout (1 s) and idle_timeout (2 s)
    // counted from the start, never idle that long (a slow request under load still leaves
    // the gap well under the 1 s limit).
    for i in 0..12 {
        let req = http::Request::get(format!("http://{}/r{i}", proxy.addr))
            .body(no_body())
            .unwrap();
        let resp = h2
            .send_request(req)
            .await
            .expect("the connection still serves");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(upstream.count(), 12);
}

/// An HTTP/2 upload held up by an upstream that stops reading leaves its connection idle: no
/// body frame moves (the client is held by flow control, and the stalled body itself is not
/// being read, so its own timer never runs), and the request has not all arrived, so it does
/// not count as waiting for its answer. The connection is closed after idle_timeout (and the
/// grace an idle close may take) rather than held for ever.
#[tokio::test]
async fn an_http2_upload_held_up_by_its_upstream_is_cut_off() {
    // An upstream that takes connections and never reads from them.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let proxy = Proxy::start(&config_with(
        &format!("http://{upstream_addr}"),
        // More than the socket buffers on the way can take, and allowed.
        "[server]\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\n\
         max_body_bytes = 268435456\n",
    ))
    .await;
    let (mut h2, conn) = h2_connection(&proxy).await;
    const LEN: usize = 64 << 20;
    let (part, body) = fed_body();
    let req = http::Request::post(format!("http://{}/upload", proxy.addr))
        .header(http::header::CONTENT_LENGTH, LEN.to_string())
        .body(body)
        .unwrap();
    // Sends as fast as the proxy takes it, which stops once the buffers to the upstream fill.
    let sender = tokio::spawn(async move {
        let chunk = bytes::Bytes::from(vec![b'u'; 64 * 1024]);
        for _ in 0..LEN / chunk.len() {
            if part.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(15), h2.send_request(req))
        .await
        .expect("an upload held up by its upstream held its connection for 15 s");
    assert!(
        answer.is_err(),
        "the held-up upload got an answer: {:?}",
        answer.map(|r| r.status())
    );
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the connection ended")
        .unwrap()
        .ok();
    sender.abort();
    held.abort();
}

/// One stalled upload on an HTTP/2 connection whose other streams stay busy: the connection is
/// not idle, so its own idle check cannot end it; the stalled body does, after idle_timeout,
/// with a 408, and lets go of the upstream connection it held.
#[tokio::test]
async fn a_stalled_http2_upload_beside_busy_streams_gets_408() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&h2_idle_config(&upstream)).await;
    let (h2, _conn) = h2_connection(&proxy).await;
    let (part, body) = fed_body();
    let req = http::Request::post(format!("http://{}/upload", proxy.addr))
        .header(http::header::CONTENT_LENGTH, "100000")
        .body(body)
        .unwrap();
    part.send(bytes::Bytes::from_static(b"first bytes"))
        .await
        .unwrap();
    let mut stalled_sender = h2.clone();
    let started = Instant::now();
    let stalled = tokio::spawn(async move { stalled_sender.send_request(req).await });
    // Another stream every 250 ms keeps the connection busy throughout.
    let mut busy = h2.clone();
    let answer = loop {
        if stalled.is_finished() {
            break stalled
                .await
                .unwrap()
                .expect("the stalled upload got an answer");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the stalled upload was held for 10 s"
        );
        let get = http::Request::get(format!("http://{}/busy", proxy.addr))
            .body(no_body())
            .unwrap();
        let resp = busy.send_request(get).await.expect("the connection serves");
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(answer.status(), 408);
    // Not before idle_timeout (2 s) of quiet, though.
    assert!(started.elapsed() >= Duration::from_millis(1900));
    eventually(
        "the stalled upload's upstream connection is let go",
        || async { upstream.closed() >= 1 },
    )
    .await;
    drop(part);
}

/// An HTTP/2 client reading a large response slowly is making progress: the connection is not
/// closed for idleness under it, though the whole body takes many idle timeouts to read.
#[tokio::test]
async fn an_http2_client_reading_a_large_response_slowly_is_not_idle() {
    use http_body_util::BodyExt;
    const BODY: usize = 2 << 20;
    let (_upstream, proxy) = large_response_behind_proxy(BODY).await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    // A 16 KiB window: the proxy can send no further ahead of the reader than that.
    let (mut h2, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .adaptive_window(false)
            .initial_stream_window_size(16 * 1024)
            .initial_connection_window_size(16 * 1024)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(format!("http://{}{path}", proxy.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let resp = h2.send_request(get("/big")).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Read at 256 KiB/s on a fixed schedule: each piece the proxy reads from the upstream (at
    // most 32 KiB) drains well within idle_timeout, the whole body in 8 s. (Pieces of more than
    // 64 KiB would count as progress a part at a time; the proxy's reads no longer make any.)
    const BYTES_PER_SEC: f64 = 256.0 * 1024.0;
    let mut body = resp.into_body();
    let mut received = 0;
    let started = Instant::now();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the response arrives whole");
        if let Some(data) = frame.data_ref() {
            received += data.len();
        }
        let due = Duration::from_secs_f64(received as f64 / BYTES_PER_SEC);
        tokio::time::sleep_until((started + due).into()).await;
    }
    assert_eq!(received, BODY);
    // Had the connection been judged idle while the body was drained, it would have been
    // told to go away (GOAWAY), and this request would be refused.
    h2.ready()
        .await
        .expect("the connection still serves after the slow read");
    let next = h2
        .send_request(get("/after"))
        .await
        .expect("the connection still serves after the slow read");
    assert_eq!(next.status(), 200);
}

/// Each request an HTTP/2 client resets before its answer still went to the upstream, which
/// goes on working on it: a client that resets most of its requests is flooding the backend
/// through the proxy (rapid reset, CVE-2023-44487, on the far side), and its connection is
/// closed after 100 of them in a burst.
#[tokio::test]
async fn an_http2_client_resetting_most_requests_before_their_answers_is_closed() {
    let (upstream, mut arrived, _gate) = gated_upstream().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let (mut h2, _driver) = h2_connection(&proxy).await;
    let mut reset = 0;
    let closed = loop {
        assert!(reset < 300, "still served after {reset} requests reset");
        if h2.ready().await.is_err() {
            break true;
        }
        let request = http::Request::get(proxy.url("/slow"))
            .body(no_body())
            .unwrap();
        let mut answer = Box::pin(h2.send_request(request));
        tokio::select! {
            // It reached the upstream: the client resets it (dropping it sends RST_STREAM).
            _ = arrived.recv() => reset += 1,
            // Refused: the connection is closing.
            answered = &mut answer => {
                assert!(answered.is_err(), "an answer from the gated upstream");
                break true;
            }
            () = tokio::time::sleep(Duration::from_secs(10)) => break false,
        }
    };
    assert!(
        closed,
        "the request neither reached the upstream nor was refused"
    );
    assert!((100..=150).contains(&reset), "closed after {reset} resets");
}

/// Over HTTP/2 as over HTTP/1.1, which authority a request is for must be clear: a second Host
/// is refused rather than dropped, and so is a request that names none.
#[tokio::test]
async fn an_http2_request_with_two_hosts_or_none_is_refused() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let (mut h2, _driver) = h2_connection(&proxy).await;
    let two_hosts = http::Request::get(proxy.url("/x"))
        .header("host", proxy.addr.to_string())
        .header("host", "elsewhere.example")
        .body(no_body())
        .unwrap();
    let no_authority = http::Request::get("/x").body(no_body()).unwrap();
    for request in [two_hosts, no_authority] {
        h2.ready().await.unwrap();
        let answer = h2.send_request(request).await.unwrap();
        assert_eq!(answer.status(), 400);
    }
    assert_eq!(upstream.count(), 0);
}

/// An HTTP/2 client that takes none of a response (it never opens the stream's window) while it
/// keeps its connection busy with other requests does not hold that response's upstream
/// connection: the connection's own idle check never fires, so each stream is watched too.
#[tokio::test]
async fn an_http2_response_the_client_takes_none_of_lets_its_upstream_connection_go() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                if !head.starts_with(b"GET /big ") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                        )
                        .await;
                    return;
                }
                // An endless body, written until the proxy lets the connection go.
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                let chunk = [
                    format!("{:x}\r\n", 64 * 1024).into_bytes(),
                    vec![b'x'; 64 * 1024],
                    b"\r\n".to_vec(),
                ]
                .concat();
                while stream.write_all(&chunk).await.is_ok() {}
                let _ = closed.send(());
            });
        }
    });
    let proxy = Proxy::start(&config_with(
        &format!("http://{upstream_addr}"),
        "[server]\nidle_timeout = \"1s\"\n",
    ))
    .await;
    let (mut h2, _driver) = h2_connection(&proxy).await;
    h2.ready().await.unwrap();
    let big = http::Request::get(proxy.url("/big"))
        .body(no_body())
        .unwrap();
    // The head comes; the body is never read, so the client never opens the stream's window.
    let held = h2.send_request(big).await.unwrap();
    assert_eq!(held.status(), 200);
    let busy = async {
        loop {
            h2.ready().await.unwrap();
            let small = http::Request::get(proxy.url("/small"))
                .body(no_body())
                .unwrap();
            let answer = h2.send_request(small).await.unwrap();
            assert_eq!(answer.status(), 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        () = busy => unreachable!(),
        closed = tokio::time::timeout(Duration::from_secs(10), closed_rx.recv()) => {
            closed.expect("the upstream connection let go within 10 s").unwrap();
        }
    }
    drop(held);
}

/// Each HTTP/2 stream may hold an upstream connection and its buffers: a connection is allowed
/// 128 at once (nginx's default), as its first SETTINGS frame says.
#[tokio::test]
async fn an_http2_connection_is_allowed_128_streams_at_once() {
    let upstream = Upstream::echo().await;
    let proxy = Proxy::start(&open_config(&upstream.url())).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(H2_PREFACE_AND_SETTINGS).await.unwrap();
    // The server's preface is a SETTINGS frame: 9 bytes of frame head, then 6 per setting.
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
        .await
        .expect("the server's SETTINGS within 5 s")
        .unwrap();
    assert_eq!(head[3], 0x4, "a SETTINGS frame first: {head:?}");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    let max_concurrent_streams = payload
        .chunks_exact(6)
        .find(|setting| setting[..2] == [0, 3])
        .map(|setting| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]));
    assert_eq!(max_concurrent_streams, Some(128), "{payload:?}");
}
